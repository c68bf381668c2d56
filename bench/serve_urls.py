"""URLs of the load benchmark: the example project's, plus two routes to compare with.

* ``bench/trivial/<name>``: a trivial Django view answering a thumbnail's bytes from memory,
  the most a Django request can do here;
* ``bench/static/<name>``: the same thumbnail as a file, served by
  ``django.views.static.serve`` (how sorl-thumbnail, easy-thumbnails and imagekit thumbnails
  reach a browser through Django).

The thumbnails are the warm picture URLs' own bytes, written by ``bench/serve_bench.py`` into
``settings.BENCH_FILES_DIR``. No torch is imported here (a web process).
"""

from pathlib import Path

from django.conf import settings
from django.http import Http404, HttpResponse
from django.urls import path, re_path
from django.utils._os import safe_join
from django.views.static import serve

from project.urls import urlpatterns as project_urlpatterns

_MEMORY: dict[str, bytes] = {}


def trivial(request, name: str) -> HttpResponse:
    """The thumbnail ``name`` from this process's memory (read from its file once)."""
    data = _MEMORY.get(name)
    if data is None:
        try:
            data = Path(safe_join(settings.BENCH_FILES_DIR, name)).read_bytes()
        except (OSError, ValueError) as exc:
            raise Http404(name) from exc
        _MEMORY[name] = data
    response = HttpResponse(data, content_type="image/webp")
    response["Content-Length"] = str(len(data))
    return response


urlpatterns = [
    *project_urlpatterns,
    path("bench/trivial/<str:name>", trivial),
    re_path(
        r"^bench/static/(?P<path>[\w.-]+)$", serve, {"document_root": settings.BENCH_FILES_DIR}
    ),
]

"""The admin change list of 100 rows with a cold decode cache: render time, and what it costs.

    python bench/admin_bench.py [--rows 100] [--repeat 30] [--sqlite]

Builds a throwaway database (PostgreSQL on 127.0.0.1 when reachable, else SQLite), stores
``--rows`` ready photos whose latents come from no model (the page must not need one), logs in
and renders ``/admin/demo/photo/`` ``--repeat`` times through Django's test client, printing
p50/p90 of the page, its query count, and then the cold cost of serving every thumbnail URL on
the page once (the instant preview plus a warm-up task to an in-memory broker) and warm (from the
cache). It checks that neither torch nor a model was loaded and that no query read a blob.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import reachable  # noqa: E402  (after the path insert)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument(
        "--sqlite", action="store_true", help="Use SQLite even if PostgreSQL is up."
    )
    args = parser.parse_args()

    var = tempfile.mkdtemp(prefix="lsbench-admin-")
    os.environ["LATENTSTORE_VAR_DIR"] = var
    os.environ["CELERY_BROKER_URL"] = "memory://"
    # As in production: no SQL logging, no debug pages.
    os.environ["DJANGO_DEBUG"] = "0"
    os.environ["DJANGO_ALLOWED_HOSTS"] = "testserver"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    use_pg = reachable(5432) and not args.sqlite
    if use_pg:
        os.environ["DATABASE_URL"] = "postgresql://postgres@127.0.0.1:5432/postgres"
    else:
        os.environ["DATABASE_URL"] = f"sqlite:///{var}/bench.sqlite3"

    import django
    from django.conf import settings

    django.setup()
    # Per-process LocMem for the bench: nothing to clean up in a shared cache.
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    from django.db import connection

    test_name = f"lsbench_{uuid.uuid4().hex[:8]}"
    connection.settings_dict["TEST"]["NAME"] = test_name if use_pg else f"{var}/t.sqlite3"
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        run(args, use_pg)
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)


def run(args: argparse.Namespace, use_pg: bool) -> None:
    from django.contrib.auth import get_user_model
    from django.core.cache import caches
    from django.db import connection, reset_queries
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from latentstore import cache as tiers
    from tests.rows import make_rows

    make_rows(args.rows, distinct=True)
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("b", "b@example.com", "pw"))

    def page() -> str:
        response = client.get("/admin/demo/photo/")
        assert response.status_code == 200
        return response.content.decode()

    from project.admin import PhotoAdmin

    page()  # imports, template compilation
    times, plain = [], []
    for _ in range(args.repeat):
        caches["default"].clear()
        tiers.reset()
        start = time.perf_counter()
        html = page()
        times.append((time.perf_counter() - start) * 1000)
        # The same page without the thumbnail column, side by side: what thumbnails cost.
        PhotoAdmin.latent_thumbnail_column = False
        try:
            start = time.perf_counter()
            page()
            plain.append((time.perf_counter() - start) * 1000)
        finally:
            PhotoAdmin.latent_thumbnail_column = True
    reset_queries()
    with CaptureQueriesContext(connection) as queries:
        html = page()
    query_count = len(queries)  # (read now: later requests reset the connection's log)
    urls = re.findall(r'<img src="(/latents/p/[^"]+)"', html)
    assert len(urls) == min(args.rows, 100), len(urls)
    blob_reads = [
        q["sql"]
        for q in queries.captured_queries
        if '"image_staged"' in q["sql"] or '"demo_photo"."image",' in q["sql"]
    ]

    caches["default"].clear()
    tiers.reset()
    start = time.perf_counter()
    for url in urls:
        assert client.get(url).status_code == 200
    cold = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    for url in urls:
        client.get(url)
    again = (time.perf_counter() - start) * 1000
    # What the warm-up decodes put in the cache (no worker runs here: put pictures in place).
    from latentstore import signing
    from latentstore.decoding import get_cache, key_for
    from project.models import Photo

    for url in urls:
        ref = signing.read(url.rsplit("/", 1)[1].rsplit(".", 1)[0])
        image = Photo.objects.get(pk=ref.pk).image
        key, _ = key_for(image, ref.decoder, ref.size, ref.format)
        get_cache().set(key, client.get(url).content)
    start = time.perf_counter()
    for url in urls:
        client.get(url)
    warm = (time.perf_counter() - start) * 1000

    db = "PostgreSQL" if use_pg else "SQLite"
    print(
        f"{time.strftime('%Y-%m-%d')}  {os.cpu_count()} CPUs  Python {sys.version.split()[0]}  {db}"
    )
    print(f"change list of {len(urls)} rows, cold decode cache, {args.repeat} renders:")
    for label, values in (("with thumbnails", times), ("without the column", plain)):
        print(
            f"  {label:20s} p50 {statistics.median(values):6.1f} ms   p90 "
            f"{statistics.quantiles(values, n=10)[-1]:6.1f} ms   min {min(values):6.1f} ms"
        )
    print(
        f"  ratio of p50s {statistics.median(times) / statistics.median(plain):.2f}; "
        f"{query_count} queries, {len(blob_reads)} reading a blob"
    )
    n = len(urls)
    print(f"serving its {n} thumbnail URLs (each a request through the test client):")
    print(f"  cold, preview + warm-up task   {cold:6.0f} ms  ({cold / n:.2f} ms each)")
    print(f"  again, warm-up deduplicated    {again:6.0f} ms  ({again / n:.2f} ms each)")
    print(f"  decoded pictures cached        {warm:6.0f} ms  ({warm / n:.2f} ms each)")
    print(f"torch imported: {'torch' in sys.modules}; diffusers: {'diffusers' in sys.modules}")
    assert not blob_reads and "torch" not in sys.modules


if __name__ == "__main__":
    main()

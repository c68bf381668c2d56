"""HTML for stored pictures: ``<img>`` tags with their fitted size, placeholders, state badges.

Used by the ``{% latent_img %}`` template tag and the admin. Nothing here reads a latent blob or
decodes anything: a ready image links its signed URL (the view serves the cached decode or the
instant preview), a pending or failed one a static placeholder of the same size.
"""

from __future__ import annotations

import html
import re
from typing import TYPE_CHECKING, Any

from django.templatetags.static import static
from django.utils.safestring import SafeString

from latentstore.decoding import fit_size
from latentstore.fields import EMPTY, ENCODING, FAILED, PENDING, READY

if TYPE_CHECKING:
    from latentstore.fields import LatentImage

_ATTRIBUTE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
PLACEHOLDERS = {
    PENDING: "latentstore/pending.svg",
    ENCODING: "latentstore/pending.svg",
    FAILED: "latentstore/failed.svg",
    EMPTY: "latentstore/empty.svg",
}
STATE_LABELS = {
    EMPTY: "no image",
    PENDING: "pending",
    ENCODING: "encoding",
    READY: "ready",
    FAILED: "failed",
}


def display_size(image: LatentImage, size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """The image's size fitted into ``size`` (None when the row has no size yet)."""
    if not image.width or not image.height:
        return None
    return fit_size((image.width, image.height), size)


def escape(value: Any) -> str:
    # The same characters as django.utils.html.escape, without its lazy-string wrapper, which
    # cost a third of a change list's thumbnails.
    return html.escape(str(value), quote=True)


def _attrs(attrs: dict[str, Any]) -> str:
    # Keys are attribute names from code or template keyword arguments (\w+), never user data.
    return "".join(
        f' {k}="{escape(v)}"' for k, v in attrs.items() if v is not None and v is not False
    )


def picture_tag(
    image: LatentImage,
    size: int | tuple[int, int] | None = None,
    *,
    decoder: str | None = None,
    format: str = "webp",
    alt: str = "",
    density: int = 1,
    empty: bool = False,
    upscale: bool = True,
    **attrs: Any,
) -> SafeString:
    """``<img>`` of ``image`` fitted into ``size``, or a same-size placeholder until it is ready.

    ``density`` asks for a picture that many times larger than the displayed box (2 for sharp
    thumbnails on high-DPI screens). ``attrs`` become HTML attributes (``class_`` for
    ``class``); ``loading="lazy"`` and ``decoding="async"`` are the defaults. An empty image
    renders nothing unless ``empty=True``; ``upscale=False`` never shows it larger than it is.
    """
    state = image.state
    if state == EMPTY and not empty:
        return SafeString("")
    if not upscale and size is not None and image.width and image.height:
        w, h = (size, size) if isinstance(size, int) else size
        if w >= image.width and h >= image.height:
            size = None
    fitted = display_size(image, size)
    attrs = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
    for name in attrs:
        if not _ATTRIBUTE_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not an HTML attribute name")
    css = " ".join(filter(None, ["latent-img", f"latent-img-{state}", attrs.pop("class", None)]))
    common = {
        "width": fitted[0] if fitted else None,
        "height": fitted[1] if fitted else None,
        "class": css,
        "data-latent-state": state,
        "loading": attrs.pop("loading", "lazy"),
        "decoding": attrs.pop("decoding", "async"),
    }
    if state == READY:
        box = None
        if size is not None:
            w, h = (size, size) if isinstance(size, int) else size
            box = (w * density, h * density)
        src = image.url(decoder=decoder, size=box, format=format)
        more = _attrs({**common, **attrs})
        return SafeString(f'<img src="{escape(src)}" alt="{escape(alt)}"{more}>')
    title = image.error if state == FAILED and image.error else STATE_LABELS.get(state, state)
    src = static(PLACEHOLDERS.get(state, PLACEHOLDERS[PENDING]))
    more = _attrs({**common, "title": title, **attrs})
    return SafeString(f'<img src="{escape(src)}" alt="{escape(alt or title)}"{more}>')


def state_badge(image: LatentImage, error: str | None = None) -> SafeString:
    """A small coloured label: ``pending``, ``encoding``, ``ready``, ``failed`` (with the error)."""
    state = image.state if error is None else "error"
    label = STATE_LABELS.get(state, state)
    message = error if error is not None else (image.error if state == FAILED else "")
    more = _attrs({"title": message or None})
    return SafeString(
        f'<span class="latent-badge latent-badge-{escape(state)}" '
        f'data-latent-state="{escape(state)}"{more}>{escape(label)}</span>'
    )

"""HTML for stored pictures: ``<img>`` and responsive ``<picture>`` tags, placeholders, badges.

Used by the ``{% latent_img %}`` and ``{% latent_picture %}`` template tags, the admin and the
REST field. Nothing here reads a latent blob or decodes anything: a ready image links its signed
URLs (the view serves the cached decode or the instant preview), a pending or failed one a
static placeholder of the same size.
"""

from __future__ import annotations

import bisect
import functools
import html
import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from django.templatetags.static import static
from django.utils.safestring import SafeString

from latentstore import conf
from latentstore.decoding import CONTENT_TYPES, fit_size, normalise_format
from latentstore.fields import EMPTY, ENCODING, FAILED, PENDING, READY
from latentstore.pictures import width_box
from latentstore.signing import EXTENSIONS, set_base

if TYPE_CHECKING:
    from latentstore.fields import LatentImage

logger = logging.getLogger("latentstore.html")

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
    attrs = _attribute_names(attrs)
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


def _attribute_names(attrs: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments as attribute names: ``class_`` → ``class``, ``aria_x`` → ``aria-x``."""
    named = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
    for name in named:
        if not _ATTRIBUTE_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not an HTML attribute name")
    return named


def _words(value: str | Iterable[Any] | None) -> list[str]:
    # "320 640 1280", "avif, webp" or a list, as a template or Python caller writes them.
    if value is None:
        return []
    if isinstance(value, (int, str)):
        value = str(value).replace(",", " ").split()
    return [str(v).strip() for v in value if str(v).strip()]


def picture_formats(formats: str | Iterable[str] | None = None) -> list[str]:
    """``formats`` (default ``PICTURE_FORMATS``) normalised: ``["AVIF", "WEBP"]``, no repeats.

    Raises ``ValueError`` for a format latentstore cannot serve.
    """
    names = _words(conf.get_settings()["PICTURE_FORMATS"] if formats is None else formats)
    return list(dict.fromkeys(normalise_format(name) for name in names))


def parse_widths(widths: str | Iterable[Any] | None = None) -> tuple[int, ...]:
    """``widths`` (default ``PICTURE_WIDTHS``) as sorted, distinct ints: ``"640 320"`` →
    ``(320, 640)``. Raises ``ValueError`` for a width that is not a positive whole number."""
    if widths is None or widths == "":
        widths = conf.get_settings()["PICTURE_WIDTHS"]
    return _parse_widths(widths if isinstance(widths, (str, int)) else tuple(widths))


@functools.lru_cache(maxsize=256)  # a listing asks for the same widths once per row
def _parse_widths(widths: str | int | tuple[Any, ...]) -> tuple[int, ...]:
    try:
        wanted = tuple(sorted({int(w) for w in _words(widths)}))
    except ValueError:
        raise ValueError(f"widths must be whole numbers, got {widths!r}") from None
    if not wanted or wanted[0] < 1:
        raise ValueError(f"widths must be positive, got {widths!r}")
    return wanted


def picture_candidates(
    image: LatentImage, widths: str | Iterable[Any] | None = None, *, upscale: bool = False
) -> list[tuple[int, tuple[int, int] | None]]:
    """The ``srcset`` candidates of ``image``: ``(width in pixels, size box)``, narrowest first.

    ``widths`` default to ``PICTURE_WIDTHS``. Widths above the image's own are left out unless
    ``upscale``, and the image's own width (box None: the original size) takes their place, so
    the largest screens still get every pixel there is. A width whose box would pass
    ``URL_MAX_SIZE`` (a very tall picture) is left out. Empty while the image has no size.
    Raises ``ValueError`` for a width that is not a positive whole number.
    """
    own_w, own_h = image.width, image.height
    if not own_w or not own_h:
        return []
    wanted = parse_widths(widths)
    count, own = candidate_count(own_w, own_h, wanted, upscale)
    candidates: list[tuple[int, tuple[int, int] | None]] = [
        (width, width_box((own_w, own_h), width)) for width in wanted[:count]
    ]
    if own:
        candidates.append((own_w, None))
    return candidates


_SETTING = object()  # candidate_count's limit: URL_MAX_SIZE


def candidate_count(
    own_w: int,
    own_h: int,
    wanted: tuple[int, ...],
    upscale: bool = False,
    limit: int | None | object = _SETTING,
) -> tuple[int, bool]:
    """How many of the sorted ``wanted`` widths are srcset candidates of a ``own_w`` x
    ``own_h`` picture (always the first ones), and whether its own size follows them (see
    :func:`picture_candidates`). ``limit`` defaults to ``URL_MAX_SIZE``."""
    count = len(wanted) if upscale else bisect.bisect_left(wanted, own_w)
    if limit is _SETTING:
        limit = conf.get_settings()["URL_MAX_SIZE"]
    if limit is not None:
        # A box's width and height both grow with its width, so those within the limit come
        # first. width_box's height, ceil(own_h * w / own_w), passes the limit exactly when
        # own_h * w does limit * own_w: whole numbers, no rounding.
        while count and (
            wanted[count - 1] > limit or own_h * wanted[count - 1] > limit * own_w  # type: ignore[operator]
        ):
            count -= 1
    return count, not upscale and (count == 0 or wanted[-1] >= own_w)


def picture_set(
    image: LatentImage,
    candidates: list[tuple[int, tuple[int, int] | None]],
    formats: list[str],
    decoder: str | None = None,
) -> str:
    """The signed base path of every candidate in every format: one signature for them all
    (:func:`latentstore.signing.set_base`); ``base + "0.avif"`` is the first candidate as AVIF.
    ``decoder`` defaults to the field's. Raises ``LatentsNotReady`` unless the image is ready."""
    boxes = [box for _width, box in candidates]
    return set_base(image, decoder or image.field.decoder, boxes, formats)


def srcset(
    base: str,
    candidates: list[tuple[int, tuple[int, int] | None]],
    format: str,
    prefix: str = "",
) -> str:
    """A ``srcset`` value: each candidate's URL in ``format`` (in a :func:`picture_set` made
    with these candidates), with its ``…w`` descriptor; ``prefix`` (a scheme and host, for an
    API's absolute URLs) goes before each."""
    ext = EXTENSIONS[format]
    return ", ".join(
        f"{prefix}{base}{index}.{ext} {width}w" for index, (width, _box) in enumerate(candidates)
    )


def responsive_picture(
    image: LatentImage,
    *,
    widths: str | Iterable[Any] | None = None,
    sizes: str | None = None,
    formats: str | Iterable[str] | None = None,
    decoder: str | None = None,
    alt: str = "",
    upscale: bool = False,
    empty: bool = False,
    **attrs: Any,
) -> SafeString:
    """``<picture>`` of ``image``: one ``<source>`` per format, a JPEG ``<img>`` to fall back on.

    Each ``<source>`` has a ``srcset`` of signed URLs at ``widths`` (``…w`` descriptors, see
    :func:`picture_candidates`) and ``sizes``; the ``<img>`` is JPEG at the middle width, with
    that picture's ``width`` and ``height`` (the aspect ratio, so the page does not shift),
    ``decoding="async"`` and ``loading="lazy"`` unless ``attrs`` say otherwise. ``attrs``
    become attributes of the ``<img>`` (``class_`` for ``class``). A pending image renders its
    placeholder in the same markup at the same aspect ratio; a failed one ``PICTURE_PLACEHOLDER``
    with ``alt`` (the error as ``title``). An empty image renders nothing unless ``empty=True``.

    Nothing that depends on the row raises: a picture whose URLs cannot be made (a decoder
    alias since removed, a size above ``URL_MAX_SIZE``, no ``latentstore.urls``) is logged and
    shown as failed. Bad arguments (``widths="big"``, an unknown format) raise ``ValueError``.
    """
    state = image.state
    if state == EMPTY and not empty:
        return SafeString("")
    names = picture_formats(formats)
    candidates = picture_candidates(image, widths, upscale=upscale)
    sizes = conf.get_settings()["PICTURE_SIZES"] if sizes is None else sizes
    attrs = _attribute_names(attrs)
    error = image.error if state == FAILED else ""
    if state == READY:
        try:
            return _ready_picture(image, candidates, names, sizes, decoder, alt, attrs)
        except Exception as exc:  # never a server error for a page of pictures
            logger.warning("Cannot link the picture of %r: %s", image, exc, exc_info=True)
            state, error = FAILED, f"{type(exc).__name__}: {exc}"
    return _placeholder_picture(image, state, error, candidates, alt, attrs)


def _img_attrs(state: str, fitted: tuple[int, int] | None, attrs: dict[str, Any]) -> str:
    css = " ".join(filter(None, ["latent-img", f"latent-img-{state}", attrs.get("class")]))
    return _attrs(
        {
            "width": fitted[0] if fitted else None,
            "height": fitted[1] if fitted else None,
            **attrs,
            "class": css,
            "data-latent-state": state,
            "loading": attrs.get("loading", "lazy"),
            "decoding": attrs.get("decoding", "async"),
        }
    )


def _opening(state: str) -> str:
    return f'<picture class="latent-picture latent-picture-{state}" data-latent-state="{state}">'


def _ready_picture(
    image: LatentImage,
    candidates: list[tuple[int, tuple[int, int] | None]],
    formats: list[str],
    sizes: str,
    decoder: str | None,
    alt: str,
    attrs: dict[str, Any],
) -> SafeString:
    base = picture_set(image, candidates, list(dict.fromkeys([*formats, "JPEG"])), decoder)
    sources = "".join(
        f'<source type="{CONTENT_TYPES[fmt]}"'
        + _attrs({"srcset": srcset(base, candidates, fmt), "sizes": sizes or None})
        + ">"
        for fmt in formats
    )
    middle = len(candidates) // 2
    fitted = display_size(image, candidates[middle][1])
    src = f"{base}{middle}.jpg"
    img = f'<img src="{escape(src)}" alt="{escape(alt)}"{_img_attrs(READY, fitted, attrs)}>'
    return SafeString(f"{_opening(READY)}{sources}{img}</picture>")


def _placeholder_picture(
    image: LatentImage,
    state: str,
    error: str,
    candidates: list[tuple[int, tuple[int, int] | None]],
    alt: str,
    attrs: dict[str, Any],
) -> SafeString:
    # The same box as the ready picture's <img>: nothing moves when the image becomes ready.
    box = candidates[len(candidates) // 2][1] if candidates else None
    fitted = display_size(image, box)
    if state == FAILED:
        path = conf.get_settings()["PICTURE_PLACEHOLDER"]
    else:
        path = PLACEHOLDERS.get(state, PLACEHOLDERS[PENDING])
    title = error or STATE_LABELS.get(state, state)
    more = _img_attrs(state, fitted, {"title": title, **attrs})
    img = f'<img src="{escape(static(path))}" alt="{escape(alt or title)}"{more}>'
    return SafeString(f"{_opening(state)}{img}</picture>")


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

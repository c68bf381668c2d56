"""The view behind signed picture URLs: the cached decode, else the instant preview.

A request never waits for a neural decode. The picture comes from the decode cache when it is
there (immutable, ``ETag`` + long ``Cache-Control``); otherwise the view answers with the
latent→RGB preview (``no-cache``, a weak ETag of its own) and schedules one warm-up decode on
the decode queue, so the next request is sharp. A decoder that is itself instant (``rgb``) is
rendered and cached at once.

A bad, tampered or expired token is refused (403) before the database is asked anything; a token
whose row is gone, no longer ready or holds other latents now is 404.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from django.core import signing
from django.core.exceptions import FieldDoesNotExist
from django.http import HttpRequest, HttpResponse, HttpResponseForbidden, HttpResponseNotFound
from django.utils.cache import patch_cache_control
from django.utils.html import escape
from django.utils.http import parse_etags
from django.views.decorators.http import require_safe

from latentstore import conf
from latentstore import signing as picture_signing
from latentstore.cache import verified_rows
from latentstore.columns import READY
from latentstore.decoders import InvalidDecoderError, decoders
from latentstore.decoding import (
    CONTENT_TYPES,
    MASTER_FORMAT,
    derive,
    get_cache,
    preview_bytes,
    render_rendition,
    rendition,
    schedule_warmup,
)
from latentstore.pictures import sniff_format, width_box
from latentstore.queries import get_field

logger = logging.getLogger("latentstore.views")

_SMALL_COLUMNS = ("state", "digest", "width", "height", "autoencoder", "error")


@require_safe
def picture(request: HttpRequest, token: str, ext: str) -> HttpResponse:
    """Serve the picture a signed token names (see the module docstring)."""
    try:
        ref = picture_signing.read(token)
    except picture_signing.URLExpired:
        return HttpResponseForbidden("This picture URL has expired.", content_type="text/plain")
    except signing.BadSignature:
        return HttpResponseForbidden("Bad picture URL signature.", content_type="text/plain")
    if picture_signing.FORMATS_BY_EXTENSION.get(ext) != ref.format:
        return _not_found()
    return _serve(request, ref)


@require_safe
def picture_in_set(request: HttpRequest, token: str, index: str, ext: str) -> HttpResponse:
    """Serve picture ``index`` of a picture-set token (``{% latent_picture %}``, the REST field)
    as ``ext`` (``index`` ``p``: its preview): what the token lists and nothing else, served
    like :func:`picture`."""
    position = index if index == picture_signing.PREVIEW_INDEX else int(index)
    try:
        ref = picture_signing.read_set(token, position, ext)
    except picture_signing.URLExpired:
        return HttpResponseForbidden("This picture URL has expired.", content_type="text/plain")
    except signing.BadSignature:
        return HttpResponseForbidden("Bad picture URL signature.", content_type="text/plain")
    except LookupError:
        return _not_found()
    return _serve(request, ref)


@dataclass(frozen=True)
class _RowFacts:
    """The columns of a verified row that a cache hit needs (as a LatentImage offers them)."""

    digest: str
    width: int
    height: int
    autoencoder: str


def _serve(request: HttpRequest, ref: picture_signing.PictureRef) -> HttpResponse:
    """The response to a verified token: the cached picture, else the preview and a warm-up."""
    try:
        if not _width_only(ref):  # checked once the row's size gives it its height
            picture_signing.size_box(ref.size)  # the limit may have been lowered since signing
        model, field = get_field(ref.label, ref.field)
        backend = decoders[ref.decoder]
    except (ValueError, LookupError, FieldDoesNotExist, TypeError, InvalidDecoderError):
        return _not_found()
    # A row this process verified a moment ago: a cache hit needs no query (the bound is
    # URL_ROW_CHECK_SECONDS); a miss goes the whole way below.
    row_key = (ref.label, ref.pk, ref.field, ref.digest)
    facts = verified_rows.get(row_key, time.monotonic())
    if facts is not None:
        sized = _sized(ref, facts.width, facts.height)
        hit = _cached(request, sized, facts, backend) if sized is not None else None
        if hit is not None:
            return hit
    image = _ready_image(model, field, ref)
    if image is None:
        return _not_found()
    seconds = conf.get_settings()["URL_ROW_CHECK_SECONDS"]
    if seconds:
        facts = _RowFacts(image.digest, image.width, image.height, image.autoencoder)
        verified_rows.add(row_key, facts, time.monotonic() + seconds)
    sized = _sized(ref, image.width, image.height)
    if sized is None:
        return _not_found()
    return _picture_or_preview(request, sized, image, backend)


def _width_only(ref: picture_signing.PictureRef) -> bool:
    return ref.size is not None and ref.size[1] == picture_signing.WIDTH_ONLY


def _sized(
    ref: picture_signing.PictureRef, width: int | None, height: int | None
) -> picture_signing.PictureRef | None:
    """``ref`` with a width-only box made whole from the row's size, as the srcset candidate's
    box was (None when that box passes ``URL_MAX_SIZE``, or the row has no size)."""
    if not _width_only(ref):
        return ref
    if not width or not height:
        return None
    box = width_box((width, height), ref.size[0])  # type: ignore[index]
    try:
        picture_signing.size_box(box)
    except ValueError:
        return None
    return replace(ref, size=box)


def _ready_image(model: Any, field: Any, ref: picture_signing.PictureRef) -> Any | None:
    """The row's image if it is ready and still holds the token's latents, else None."""
    # Small columns only: a cache hit reads no blob; a preview fetches it by one more query.
    columns = ["pk", *(field.companion_attname(c) for c in _SMALL_COLUMNS)]
    try:
        instance = model._base_manager.only(*columns).filter(pk=ref.pk).first()
    except (ValueError, TypeError):  # a pk of the wrong type for this model
        return None
    if instance is None:
        return None
    image = getattr(instance, field.name)
    if image.state != READY or image.digest != ref.digest:
        return None
    return image


def _picture_or_preview(
    request: HttpRequest, ref: picture_signing.PictureRef, image: Any, backend: Any
) -> HttpResponse:
    """The cached (or derived, or instantly rendered) picture; else the preview and a warm-up."""
    found = rendition(image, backend, ref.size, ref.format)
    size = f"{found.size[0]}x{found.size[1]}"
    content_type = CONTENT_TYPES[ref.format]
    cache = get_cache()
    data = cache.get(found.key)
    if data is None:  # another format of this size may be cached: AVIF, WebP, JPEG share it
        data = derive(image, found, cache)
    if data is None and backend.instant:
        try:
            data = render_rendition(image, found)
        except Exception as exc:  # a corrupt blob or latents the decoder refuses
            return _unreadable(ref, exc)
        cache.set(found.key, data, conf.get_settings()["CACHE_TIMEOUT"])
    if data is not None:
        etag = f'"{image.digest}-{found.fingerprint}-{size}-{ref.format.lower()}"'
        # An old token of a since-changed decoder still gets the current picture, but not for
        # long: its URL no longer names this content.
        fresh = found.fingerprint == ref.fingerprint
        return _respond(request, data, content_type, etag, ref, immutable=fresh)

    etag = f'W/"{image.digest}-preview-{size}-{ref.format.lower()}"'
    if _matches(request, etag):  # the client has the preview: the latents are readable
        schedule_warmup(image, backend, ref.size, MASTER_FORMAT)
        return _not_modified(etag, ref, immutable=False)
    try:
        # The box, not the fitted target: fitting the target again may lose a pixel (64x38
        # of a 200x120 picture fits to 63x38), and the srcset promised the target's width.
        data = preview_bytes(image, ref.size, ref.format)
    except Exception as exc:  # unreadable latents: no decode would succeed either
        return _unreadable(ref, exc)
    # The warm-up decodes the size's lossless master: every format of the size derives from it.
    schedule_warmup(image, backend, ref.size, MASTER_FORMAT)
    return _respond(request, data, content_type, etag, ref, immutable=False)


def _cached(
    request: HttpRequest, ref: picture_signing.PictureRef, facts: _RowFacts, backend: Any
) -> HttpResponse | None:
    """The response from the cache alone (no query, no decode), or None on a miss."""
    found = rendition(facts, backend, ref.size, ref.format)
    data = get_cache().get(found.key)
    if data is None:
        return None
    size = f"{found.size[0]}x{found.size[1]}"
    etag = f'"{facts.digest}-{found.fingerprint}-{size}-{ref.format.lower()}"'
    fresh = found.fingerprint == ref.fingerprint
    return _respond(request, data, CONTENT_TYPES[ref.format], etag, ref, immutable=fresh)


def _matches(request: HttpRequest, etag: str) -> bool:
    header = request.headers.get("If-None-Match")
    if not header:
        return False
    tags = parse_etags(header)
    if tags == ["*"]:
        return True
    # Weak comparison (RFC 9110 13.1.2): W/"x" and "x" match.
    bare = etag.removeprefix("W/")
    return any(tag.removeprefix("W/") == bare for tag in tags)


def _cache_headers(response: HttpResponse, etag: str, ref: Any, immutable: bool) -> None:
    response["ETag"] = etag
    if immutable:
        seconds = conf.get_settings()["URL_CACHE_SECONDS"]
        if ref.expires is not None:
            seconds = max(0, min(seconds, int(ref.expires - time.time())))
        patch_cache_control(response, public=True, max_age=seconds, immutable=True)
    else:
        # A preview or an out-of-date URL: browsers must ask again (a cheap 304 meanwhile).
        patch_cache_control(response, no_cache=True)


def _respond(
    request: HttpRequest, data: bytes, content_type: str, etag: str, ref: Any, immutable: bool
) -> HttpResponse:
    if _matches(request, etag):
        return _not_modified(etag, ref, immutable)
    # A format that cannot hold the picture's size (WebP past 16,383 px) was replaced when the
    # file was made: the bytes say which format they are.
    actual = sniff_format(data) or ref.format
    if actual != ref.format:
        content_type = CONTENT_TYPES[actual]
    response = HttpResponse(data, content_type=content_type)
    if actual != ref.format:
        response["X-Latentstore-Format"] = f"{actual}; {ref.format} cannot hold this size"
    response["Content-Length"] = str(len(data))
    response["Content-Disposition"] = (
        f'inline; filename="{ref.label.replace(".", "-")}-{ref.pk}-{ref.field}.{ref.extension}"'
    )
    _cache_headers(response, etag, ref, immutable)
    return response


def _not_modified(etag: str, ref: Any, immutable: bool) -> HttpResponse:
    response = HttpResponse(status=304)
    # A 304 has no body: HttpResponse's default text/html would describe nothing (and a cache
    # that merges it into the stored response would mislabel the picture).
    del response["Content-Type"]
    _cache_headers(response, etag, ref, immutable)
    return response


def _not_found() -> HttpResponse:
    return HttpResponseNotFound("No such picture.", content_type="text/plain")


ERROR_SVG = """<svg xmlns="http://www.w3.org/2000/svg" width="160" height="120">
<title>{title}</title>
<rect width="100%" height="100%" fill="#fdecea"/>
<rect x="1" y="1" width="158" height="118" fill="none" stroke="#ba2121" stroke-width="2"/>
<text x="50%" y="45%" text-anchor="middle" font-family="sans-serif" font-size="28"
 fill="#ba2121">!</text>
<text x="50%" y="70%" text-anchor="middle" font-family="sans-serif" font-size="12"
 fill="#ba2121">unreadable latents</text>
</svg>"""


def _unreadable(ref: Any, exc: Exception) -> HttpResponse:
    """The stored latents cannot be read: a small error picture, logged, never cached.

    It answers 200: the page that embeds it (the admin's change list, say) shows an error badge
    where the thumbnail would be, rather than a broken image and a server error per row. The
    ``X-Latentstore-Error`` header carries the reason for monitoring.
    """
    logger.warning(
        "Cannot show %s pk=%s (%s) with %r: %s", ref.label, ref.pk, ref.field, ref.decoder, exc
    )
    response = HttpResponse(
        ERROR_SVG.format(title=escape(f"{type(exc).__name__}: {exc}")[:300]),
        content_type="image/svg+xml",
    )
    response["X-Latentstore-Error"] = f"unreadable latents: {type(exc).__name__}"
    patch_cache_control(response, no_store=True)
    return response

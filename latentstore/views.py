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
from latentstore.decoders import InvalidDecoderError, decoders
from latentstore.decoding import (
    CONTENT_TYPES,
    decoder_fingerprint,
    encode_picture,
    get_cache,
    key_for,
    render,
    schedule_warmup,
)
from latentstore.encoding import get_field
from latentstore.fields import READY

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
    try:
        picture_signing.size_box(ref.size)  # the limit may have been lowered since signing
        model, field = get_field(ref.label, ref.field)
        backend = decoders[ref.decoder]
    except (ValueError, LookupError, FieldDoesNotExist, TypeError, InvalidDecoderError):
        return _not_found()

    # Small columns only: a cache hit reads no blob; a preview fetches it by one more query.
    columns = ["pk", *(field.companion_attname(c) for c in _SMALL_COLUMNS)]
    try:
        instance = model._base_manager.only(*columns).filter(pk=ref.pk).first()
    except (ValueError, TypeError):  # a pk of the wrong type for this model
        return _not_found()
    if instance is None:
        return _not_found()
    image = getattr(instance, field.name)
    if image.state != READY or image.digest != ref.digest:
        return _not_found()

    key, target = key_for(image, ref.decoder, ref.size, ref.format)
    fingerprint = decoder_fingerprint(ref.decoder, image._companion("autoencoder"))
    size = f"{target[0]}x{target[1]}"
    etag = f'"{image.digest}-{fingerprint}-{size}-{ref.format.lower()}"'
    content_type = CONTENT_TYPES[ref.format]
    cache = get_cache()

    data = cache.get(key)
    if data is None and backend.instant:
        try:
            data = render(image, ref.decoder, target, ref.format)
        except Exception as exc:  # a corrupt blob or latents the decoder refuses
            return _unreadable(ref, exc)
        cache.set(key, data, conf.get_settings()["CACHE_TIMEOUT"])
    if data is not None:
        # An old token of a since-changed decoder still gets the current picture, but not for
        # long: its URL no longer names this content.
        fresh = fingerprint == ref.fingerprint
        return _respond(request, data, content_type, etag, ref, immutable=fresh)

    etag = f'W/"{image.digest}-preview-{size}-{ref.format.lower()}"'
    if _matches(request, etag):  # the client has the preview: the latents are readable
        schedule_warmup(image, ref.decoder, ref.size, ref.format)
        return _not_modified(etag, ref, immutable=False)
    try:
        data = encode_picture(image.preview(target), ref.format)
    except Exception as exc:  # unreadable latents: no decode would succeed either
        return _unreadable(ref, exc)
    schedule_warmup(image, ref.decoder, ref.size, ref.format)
    return _respond(request, data, content_type, etag, ref, immutable=False)


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
    response = HttpResponse(data, content_type=content_type)
    response["Content-Length"] = str(len(data))
    response["Content-Disposition"] = (
        f'inline; filename="{ref.label.replace(".", "-")}-{ref.pk}-{ref.field}.{ref.extension}"'
    )
    _cache_headers(response, etag, ref, immutable)
    return response


def _not_modified(etag: str, ref: Any, immutable: bool) -> HttpResponse:
    response = HttpResponse(status=304)
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

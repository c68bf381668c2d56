"""Signed picture URLs: a token that names one row's picture and nothing else.

The token is Django's :class:`~django.core.signing.Signer` (HMAC-SHA256 with ``SECRET_KEY``,
``SECRET_KEY_FALLBACKS`` honoured) over a compact JSON list: model label, primary key, field,
decoder alias, size box, format, the latent blob's digest, the decoder's fingerprint and an
optional expiry. Nobody can enumerate rows, ask for another size or format, or keep using a URL
after the image was replaced: the digest in the token must still be the row's.

Because the token carries the content address (digest + decoder fingerprint + size + format),
the response is immutable and may be cached for a long time. Tokens are deterministic (no
timestamp of issue), so a page rendered twice links the same URLs and browsers reuse their copy;
with ``URL_EXPIRES`` the expiry is rounded up to an eighth of that period for the same reason.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.core import signing
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.urls import NoReverseMatch, get_script_prefix, get_urlconf, reverse

from latentstore import conf
from latentstore.decoding import decoder_fingerprint, normalise_format

if TYPE_CHECKING:
    from latentstore.fields import LatentImage

SALT = "latentstore.image-url"
TOKEN_VERSION = 1
EXTENSIONS = {"WEBP": "webp", "PNG": "png", "JPEG": "jpg"}
FORMATS_BY_EXTENSION = {ext: fmt for fmt, ext in EXTENSIONS.items()}


class URLExpired(signing.BadSignature):
    """A correctly signed token whose expiry has passed."""


@dataclass(frozen=True)
class PictureRef:
    """What a valid token names."""

    label: str
    pk: Any
    field: str
    decoder: str
    size: tuple[int, int] | None
    format: str
    digest: str
    fingerprint: str
    expires: int | None

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


def _signer() -> signing.Signer:
    return signing.Signer(salt=SALT)


def size_box(size: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    """Normalise and bound a size box: None (original size) or ``(w, h)`` within URL_MAX_SIZE."""
    if size is None:
        return None
    bad = ValueError(f"size must be an int or a (width, height) pair, got {size!r}")
    if isinstance(size, bool):
        raise bad
    if isinstance(size, int):
        box = (size, size)
    else:
        try:
            box = tuple(int(v) for v in size)
        except (TypeError, ValueError):
            raise bad from None
        if len(box) != 2:
            raise bad
    limit = conf.get_settings()["URL_MAX_SIZE"]
    if min(box) < 1 or (limit is not None and max(box) > limit):
        raise ValueError(f"size {size!r} is outside 1..{limit} (the URL_MAX_SIZE setting)")
    return box  # type: ignore[return-value]


def _expiry(now: float) -> int | None:
    expires = conf.get_settings()["URL_EXPIRES"]
    if expires is None:
        return None
    step = max(1, int(expires) // 8)
    return math.ceil((now + int(expires)) / step) * step


def sign(
    image: LatentImage,
    decoder: str,
    size: int | tuple[int, int] | None = None,
    format: str = "webp",
    *,
    now: float | None = None,
) -> tuple[str, str]:
    """The token and file extension for ``image`` decoded by ``decoder`` at ``size``."""
    from latentstore.fields import READY, LatentsNotReady

    fmt = normalise_format(format)
    box = size_box(size)
    if image.state != READY or not image.digest:
        raise LatentsNotReady(
            f"{image.field.model._meta.label}.{image.field.name} has no picture to link "
            f"(state {image.state!r})",
            state=image.state,
        )
    instance = image.instance
    pk = instance.pk if isinstance(instance.pk, int | str) else str(instance.pk)
    fingerprint = decoder_fingerprint(decoder, image._companion("autoencoder"))
    payload = [
        TOKEN_VERSION,
        instance._meta.label_lower,
        pk,
        image.field.name,
        decoder,
        list(box) if box else None,
        fmt,
        image.digest,
        fingerprint,
        _expiry(time.time() if now is None else now),
    ]
    # Not compressed: zlib saves a few characters of hex and costs a fifth of the signing time.
    return _signer().sign_object(payload), EXTENSIONS[fmt]


def url_for(
    image: LatentImage,
    decoder: str,
    size: int | tuple[int, int] | None = None,
    format: str = "webp",
    *,
    now: float | None = None,
) -> str:
    """The signed URL (a path) of ``image``'s picture; see :meth:`LatentImage.url`."""
    token, ext = sign(image, decoder, size, format, now=now)
    return _url_prefix(get_urlconf(), get_script_prefix()) + f"{token}.{ext}"


@functools.lru_cache(maxsize=32)
def _url_prefix(urlconf: str | None, script_prefix: str) -> str:
    # reverse() costs ~0.1 ms with a long token; a page of 100 thumbnails reverses once.
    try:
        url = reverse("latentstore:picture", kwargs={"token": "T", "ext": "png"}, urlconf=urlconf)
    except NoReverseMatch:
        raise ImproperlyConfigured(
            "Signed image URLs need latentstore's URLs: add "
            "path('latents/', include('latentstore.urls')) to your ROOT_URLCONF."
        ) from None
    if not url.endswith("/T.png"):
        raise ImproperlyConfigured(f"latentstore.urls reversed to an unexpected {url!r}")
    return url.removesuffix("T.png")


@receiver(setting_changed)
def _forget_url_prefix(*, setting: str, **kwargs: Any) -> None:
    if setting in ("ROOT_URLCONF", "FORCE_SCRIPT_NAME"):
        _url_prefix.cache_clear()


def read(token: str, *, now: float | None = None) -> PictureRef:
    """Verify ``token`` and say what it names; raises ``BadSignature`` (or :class:`URLExpired`).

    Checks nothing in the database: the caller still has to find the row and compare digests.
    """
    payload = _signer().unsign_object(token)
    try:
        version, label, pk, field, decoder, box, fmt, digest, fingerprint, expires = payload
    except (TypeError, ValueError):
        raise signing.BadSignature("Malformed latentstore token") from None
    if version != TOKEN_VERSION or fmt not in EXTENSIONS:
        raise signing.BadSignature("Unknown latentstore token version or format")
    if expires is not None and (time.time() if now is None else now) >= expires:
        raise URLExpired("This picture URL has expired")
    return PictureRef(
        label=label,
        pk=pk,
        field=field,
        decoder=decoder,
        size=tuple(box) if box else None,
        format=fmt,
        digest=digest,
        fingerprint=fingerprint,
        expires=expires,
    )

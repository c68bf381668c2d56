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

import base64
import functools
import hashlib
import hmac
import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.conf import settings as django_settings
from django.core import signing
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.urls import NoReverseMatch, get_script_prefix, get_urlconf, reverse
from django.utils.encoding import force_bytes

from latentstore import conf
from latentstore.decoding import decoder_fingerprint, normalise_format
from latentstore.dispatch import json_pk
from latentstore.latents import is_number

if TYPE_CHECKING:
    from latentstore.fields import LatentImage

SALT = "latentstore.image-url"
TOKEN_VERSION = 1
EXTENSIONS = {"WEBP": "webp", "PNG": "png", "JPEG": "jpg", "AVIF": "avif"}
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


def _salt() -> str:
    """The signer's salt: changing ``URL_SALT`` revokes every URL signed before."""
    extra = conf.get_settings()["URL_SALT"]
    return f"{SALT}:{extra}" if extra else SALT


def _signer() -> signing.Signer:
    return signing.Signer(salt=_salt())


@functools.lru_cache(maxsize=4)
def _mac_key(salt: str, secret: str | bytes) -> bytes:
    # Signer derives its HMAC key from the salt and SECRET_KEY on every call; a listing signs
    # thousands of tokens, so the key is derived once per salt and secret.
    return hashlib.sha256(force_bytes(salt + "signer") + force_bytes(secret)).digest()


def _sign_object(payload: list[Any]) -> str:
    """``Signer(salt=SALT).sign_object(payload)``, the same string, computed faster: JSON
    without spaces, URL-safe base64 without padding, ``value:signature`` (HMAC-SHA256 with
    the key Django's ``salted_hmac`` derives). Tokens are still read by Django's Signer."""
    value = base64.urlsafe_b64encode(
        json.dumps(payload, separators=(",", ":")).encode("latin-1")
    ).rstrip(b"=")
    mac = hmac.digest(_mac_key(_salt(), django_settings.SECRET_KEY), value, "sha256")
    return f"{value.decode()}:{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


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


def expiry(now: float | None = None) -> int | None:
    """The expiry a URL signed at ``now`` carries (None without ``URL_EXPIRES``): rounded up to
    an eighth of the period, so URLs signed within that eighth are the same string."""
    return _expiry(time.time() if now is None else now)


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
    fmt = normalise_format(format)
    box = size_box(size)
    image.require_ready()
    instance = image.instance
    fingerprint = decoder_fingerprint(decoder, image.autoencoder)
    payload = [
        TOKEN_VERSION,
        instance._meta.label_lower,
        json_pk(instance.pk),
        image.field.name,
        decoder,
        list(box) if box else None,
        fmt,
        image.digest,
        fingerprint,
        _expiry(time.time() if now is None else now),
    ]
    # Not compressed: zlib saves a few characters of hex and costs a fifth of the signing time.
    return _sign_object(payload), EXTENSIONS[fmt]


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
    return url_prefix() + f"{token}.{ext}"


def url_prefix() -> str:
    """The path that signed picture URLs start with (``/latents/p/``), for the current URLconf
    and script prefix; raises ``ImproperlyConfigured`` without ``latentstore.urls``."""
    return _url_prefix(get_urlconf(), get_script_prefix())


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


def _unsign(token: str) -> list[Any]:
    """The verified payload of ``token``, its fields type-checked: a token signed by us can
    still be malformed (an old version, a bug, a leaked key), and must never cause a 500.

    Raises ``BadSignature`` for anything but ten fields of the expected types.
    """
    payload = _unsign_object(token)
    if not isinstance(payload, list) or len(payload) != 10:
        raise signing.BadSignature("Malformed latentstore token")
    version, _label, pk, _field, _decoder, _box, _fmt, _digest, _fingerprint, expires = payload
    strings = (payload[1], payload[3], payload[4], payload[7], payload[8])
    if (
        not _is_int(version)
        or not all(isinstance(value, str) for value in strings)
        or not (_is_int(pk) or isinstance(pk, str))
        or not (expires is None or is_number(expires))
    ):
        raise signing.BadSignature("Malformed latentstore token")
    return payload


def _unsign_object(token: str) -> Any:
    """``Signer(salt=...).unsign_object(token)``, verified faster: the HMAC key is derived once
    per salt and secret (Django derives it on every call), ``SECRET_KEY_FALLBACKS`` honoured.
    A compressed token (never ours) goes through Django's own code."""
    value, sep, mac = token.rpartition(":")
    if not sep or value.startswith("."):
        return _signer().unsign_object(token)
    raw = value.encode()
    salt = _salt()
    for secret in (django_settings.SECRET_KEY, *django_settings.SECRET_KEY_FALLBACKS):
        expected = base64.urlsafe_b64encode(hmac.digest(_mac_key(salt, secret), raw, "sha256"))
        if hmac.compare_digest(expected.rstrip(b"="), mac.encode()):
            break
    else:
        raise signing.BadSignature("Bad picture URL signature")
    try:
        return json.loads(base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4)))
    except ValueError:  # binascii.Error and JSONDecodeError are ValueErrors
        raise signing.BadSignature("Malformed latentstore token") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_box(box: Any) -> bool:
    """None (the original size) or ``[width, height]`` of positive ints."""
    if box is None:
        return True
    return isinstance(box, list) and len(box) == 2 and all(_is_int(v) and v > 0 for v in box)


def _check_expiry(expires: float | None, now: float | None) -> None:
    """Refuse a token past its expiry, and one without any where ``URL_EXPIRES`` requires one
    (signed before expiry was turned on: it must not stay valid for ever)."""
    if expires is None:
        if conf.get_settings()["URL_EXPIRES"] is not None:
            raise URLExpired("This picture URL has no expiry, and this server requires one")
        return
    if (time.time() if now is None else now) >= expires:
        raise URLExpired("This picture URL has expired")


def read(token: str, *, now: float | None = None) -> PictureRef:
    """Verify ``token`` and say what it names; raises ``BadSignature`` (or :class:`URLExpired`).

    Checks nothing in the database: the caller still has to find the row and compare digests.
    """
    payload = _unsign(token)
    version, box, fmt, expires = payload[0], payload[5], payload[6], payload[9]
    if version != TOKEN_VERSION or fmt not in EXTENSIONS or not _is_box(box):
        raise signing.BadSignature("Unknown latentstore token version or format")
    _check_expiry(expires, now)
    return _ref(payload, box, fmt)


# --- picture sets: one token for every size and format of a <picture> or an API object ----------
#
# A responsive picture links a dozen URLs (widths x formats). Signing each costs an HMAC and a
# JSON dump apiece, which made an API listing of 5,000 rows 50x slower than a plain field. A
# set token signs the row, the decoder, the list of size boxes and the list of formats once;
# each URL adds only ``/<box index>.<extension>``, and the view serves nothing outside the lists.

SET_VERSION = 2


def sign_set(
    image: LatentImage,
    decoder: str,
    sizes: list[Any],
    formats: list[str],
    *,
    now: float | None = None,
) -> str:
    """One token for ``image`` by ``decoder`` at each of ``sizes`` in each of ``formats``."""
    fmts = [normalise_format(f) for f in formats]
    boxes = [_bounded(size) for size in sizes]
    image.require_ready()
    instance = image.instance
    payload = [
        SET_VERSION,
        instance._meta.label_lower,
        json_pk(instance.pk),
        image.field.name,
        decoder,
        [list(box) if box else None for box in boxes],
        fmts,
        image.digest,
        decoder_fingerprint(decoder, image.autoencoder),
        _expiry(time.time() if now is None else now),
    ]
    return _sign_object(payload)


def _bounded(size: Any) -> tuple[int, int] | None:
    # size_box() for the boxes a listing passes by the thousand: a pair of ints in the limit
    # is taken as it is; anything else goes through size_box's checks (and its errors).
    if type(size) is tuple and len(size) == 2 and type(size[0]) is int and type(size[1]) is int:
        limit = conf.get_settings()["URL_MAX_SIZE"]
        if min(size) >= 1 and (limit is None or max(size) <= limit):
            return size
    return size_box(size)


def set_base(
    image: LatentImage,
    decoder: str,
    sizes: list[Any],
    formats: list[str],
    *,
    now: float | None = None,
) -> str:
    """The path every URL of a picture set starts with: ``set_base(...) + "2.avif"`` is the
    third size of ``sizes`` as AVIF (``EXTENSIONS`` gives each format's extension)."""
    return url_prefix() + sign_set(image, decoder, sizes, formats, now=now) + "/"


def read_set(token: str, index: int, ext: str, *, now: float | None = None) -> PictureRef:
    """Verify a set ``token`` and say which picture ``/<index>.<ext>`` names in it.

    Raises ``BadSignature`` (or :class:`URLExpired`) for a bad token, ``LookupError`` for an
    index or extension the token does not list. Checks nothing in the database.
    """
    payload = _unsign(token)
    version, boxes, fmts, expires = payload[0], payload[5], payload[6], payload[9]
    if (
        version != SET_VERSION
        or not isinstance(boxes, list)
        or not all(_is_box(box) for box in boxes)
        or not isinstance(fmts, list)
        or not all(isinstance(f, str) for f in fmts)
    ):
        raise signing.BadSignature("Unknown latentstore token version")
    _check_expiry(expires, now)
    fmt = FORMATS_BY_EXTENSION.get(ext)
    if fmt not in fmts or not 0 <= index < len(boxes):
        raise LookupError(f"No picture {index}.{ext} in this set")
    return _ref(payload, boxes[index], fmt)


def _ref(payload: list[Any], box: list[int] | None, fmt: str) -> PictureRef:
    """The :class:`PictureRef` of a verified payload, for one of its boxes and formats."""
    _version, label, pk, field, decoder, _boxes, _fmts, digest, fingerprint, expires = payload
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

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
import binascii
import functools
import hashlib
import hmac
import json
import math
import struct
import time
from dataclasses import dataclass, replace
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
from latentstore.packing import (
    FORMAT_CODES,
    Reader,
    pack_box,
    pack_hex_or_text,
    pack_text,
)

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


_B64_URL = bytes.maketrans(b"+/", b"-_")
_B64_STD = bytes.maketrans(b"-_", b"+/")


def _b64(data: bytes) -> bytes:
    """URL-safe base64 without padding (what Django's Signer writes)."""
    return binascii.b2a_base64(data, newline=False).translate(_B64_URL).rstrip(b"=")


def _sign_object(payload: list[Any]) -> str:
    """``Signer(salt=SALT).sign_object(payload)``, the same string, computed faster: JSON
    without spaces, URL-safe base64 without padding, ``value:signature`` (HMAC-SHA256 with
    the key Django's ``salted_hmac`` derives). Tokens are still read by Django's Signer."""
    value = _b64(json.dumps(payload, separators=(",", ":")).encode("ascii"))
    mac = hmac.digest(_mac_key(_salt(), django_settings.SECRET_KEY), value, "sha256")
    return f"{value.decode()}:{_b64(mac).decode()}"


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
#
# Version 3 (this one) is packed bytes, not JSON: a row's links repeat its token a dozen times,
# so its length is most of an API object's size and of the time to build it (163 characters
# for a five-width AVIF + WebP set with a preview, against 312 as JSON). Its MAC is keyed
# BLAKE2b-128 of the bytes, keyed as Django's Signer keys its HMAC (salt + SECRET_KEY).
# It may also list one preview (another decoder, one box, one format) at ``/p.<ext>``.
# Version 2 tokens (JSON, Django's Signer, no preview) are still read.

SET_VERSION = 3
#: A set's box ``(width, WIDTH_ONLY)`` names the picture scaled to ``width`` pixels wide: the
#: view makes the box from the row's size (:func:`latentstore.pictures.width_box`), so rows of
#: any height share one token template.
WIDTH_ONLY = 0
#: The index of a set's preview in its URLs: ``set_base(...) + "p.webp"``.
PREVIEW_INDEX = "p"
_MAC_BYTES = 16
_MAC_CHARS = 22  # unpadded base64 of 16 bytes


def _set_mac(key: bytes) -> Any:
    """A set token's MAC with ``key`` absorbed: keyed BLAKE2b (RFC 7693: a MAC by itself, no
    HMAC construction), 128 bits. A listing copies it per row instead of keying it again."""
    return hashlib.blake2b(key=key, digest_size=_MAC_BYTES)


@dataclass(frozen=True)
class SetTemplate:
    """The packed bytes of a set token around the two things that differ between rows of one
    size: the primary key goes between ``head`` and ``middle``, the digest after ``middle``."""

    head: bytes
    middle: bytes
    tail: bytes


class SetSigner:
    """Signs picture-set tokens of many rows with one decoder, one list of formats and one
    optional preview: what a listing or a page of pictures does once per row.

    A token's bytes are the same for every row of a model field with the same size boxes and
    autoencoder, except the primary key and the digest: :meth:`template` packs them once, and
    :meth:`sign_row` costs two joins, base64 and one HMAC. A signer keeps the key, the expiry
    (``URL_EXPIRES`` from ``now``, or from its creation) and the decoders' fingerprints it
    was made with: make one per request (a serializer field, a template render), not one per
    process.

    ``preview`` is ``(decoder, size, format)`` of a picture served at ``/p.<ext>`` in the set.
    """

    def __init__(
        self,
        decoder: str,
        formats: list[str],
        preview: tuple[str, Any, str] | None = None,
        *,
        now: float | None = None,
    ) -> None:
        self.decoder = decoder
        self.formats = [normalise_format(f) for f in formats]
        self.preview = None
        if preview is not None:
            alias, size, fmt = preview
            self.preview = (alias, size_box(size), normalise_format(fmt))
        self.expires = _expiry(time.time() if now is None else now)
        self._mac = _set_mac(_mac_key(_salt(), django_settings.SECRET_KEY))
        self._templates: dict[tuple[Any, ...], SetTemplate] = {}

    def sign(
        self,
        label: str,
        pk: Any,
        field: str,
        digest: str,
        autoencoder: str,
        boxes: tuple[tuple[int, int] | None, ...],
    ) -> str:
        """The token of row ``pk`` of model ``label`` (lower case), field ``field``, holding
        latents ``digest`` of ``autoencoder``, at each of ``boxes`` (``(w, h)`` or None).

        Checks nothing about the row: the caller knows it is ready (see :func:`sign_set`).
        """
        return self.sign_row(self.template(label, field, autoencoder, boxes), pk, digest)

    def template(
        self, label: str, field: str, autoencoder: str, boxes: tuple[tuple[int, int] | None, ...]
    ) -> SetTemplate:
        """The :class:`SetTemplate` of rows of ``label``.``field`` with latents of
        ``autoencoder``, at ``boxes`` (made once per signer)."""
        key = (label, field, autoencoder, boxes)
        template = self._templates.get(key)
        if template is None:
            if len(self._templates) >= 1024:  # bounded: a listing has few distinct shapes
                self._templates.clear()
            template = self._templates[key] = self._pack(label, field, autoencoder, boxes)
        return template

    def sign_row(self, template: SetTemplate, pk: Any, digest: str) -> str:
        """The token of row ``pk`` holding latents ``digest``, in ``template``."""
        pk_text = (str(pk) if type(pk) is int else json.dumps(json_pk(pk))).encode("utf-8")
        try:  # what pack_hex_or_text packs, sooner: blob digests are 32 lower-case hex digits
            raw_digest = bytes.fromhex(digest) if len(digest) == 32 else None
        except ValueError:
            raw_digest = None
        if raw_digest is not None and raw_digest.hex() != digest:
            raw_digest = None
        if len(pk_text) < 0x80 and raw_digest is not None:  # the usual: 16 bytes, short pk
            packed = b"%b%c%b%b\x01\x10%b%b" % (
                template.head, len(pk_text), pk_text, template.middle, raw_digest, template.tail,
            )  # fmt: skip
        else:
            packed = b"".join(
                (template.head, pack_text(pk_text.decode("utf-8")), template.middle,
                 pack_hex_or_text(digest), template.tail)
            )  # fmt: skip
        mac = self._mac.copy()
        mac.update(packed)  # the bytes, not their base64: fewer to hash
        return f"{_b64(packed).decode()}:{_b64(mac.digest()).decode()}"

    def _pack(
        self, label: str, field: str, autoencoder: str, boxes: tuple[tuple[int, int] | None, ...]
    ) -> SetTemplate:
        if len(boxes) > 255 or not boxes:
            raise ValueError(f"a picture set lists 1 to 255 sizes, not {len(boxes)}")
        middle = [pack_text(field), pack_text(self.decoder), bytes((len(boxes),))]
        middle += [pack_box(_set_box(box)) for box in boxes]
        middle += [bytes((len(self.formats),)), bytes(FORMAT_CODES[f] for f in self.formats)]
        tail = [
            pack_hex_or_text(decoder_fingerprint(self.decoder, autoencoder)),
            b"\x00" if self.expires is None else b"\x01" + struct.pack(">Q", int(self.expires)),
        ]
        if self.preview is None:
            tail.append(b"\x00")
        else:
            alias, box, fmt = self.preview
            tail += [
                b"\x01",
                pack_text(alias),
                pack_box(box),
                bytes((FORMAT_CODES[fmt],)),
                pack_hex_or_text(decoder_fingerprint(alias, autoencoder)),
            ]
        head = bytes((SET_VERSION,)) + pack_text(label)
        return SetTemplate(head, b"".join(middle), b"".join(tail))


def _read_packed(
    data: bytes,
) -> tuple[list[Any], tuple[str, tuple[int, int] | None, str, str] | None]:
    """A version-3 payload as the JSON versions' ten fields, and its preview (or None)."""
    reader = Reader(data)
    if reader.byte() != SET_VERSION:
        raise signing.BadSignature("Unknown latentstore token version")
    label = reader.text()
    try:
        pk = json.loads(reader.text())
    except ValueError:
        raise signing.BadSignature("Malformed latentstore token") from None
    field, decoder = reader.text(), reader.text()
    boxes = [reader.box() for _ in range(reader.byte())]
    fmts = [reader.format() for _ in range(reader.byte())]
    digest, fingerprint = reader.hex_or_text(), reader.hex_or_text()
    expires = struct.unpack(">Q", reader.take(8))[0] if reader.byte() else None
    preview = None
    if reader.byte():
        alias, box, fmt = reader.text(), reader.box(), reader.format()
        preview = (alias, box, fmt, reader.hex_or_text())
    if reader.at != len(data) or not (_is_int(pk) or isinstance(pk, str)) or not boxes:
        raise signing.BadSignature("Malformed latentstore token")
    payload = [SET_VERSION, label, pk, field, decoder, boxes, fmts, digest, fingerprint, expires]
    return payload, preview


def _unsign_packed(token: str) -> bytes:
    """The verified bytes of a version-3 token (``SECRET_KEY_FALLBACKS`` honoured)."""
    value, _sep, mac = token.rpartition(":")
    raw = value.encode()
    try:
        packed = binascii.a2b_base64(
            raw.translate(_B64_STD) + b"=" * (-len(raw) % 4), strict_mode=True
        )
    except binascii.Error:
        raise signing.BadSignature("Bad picture URL signature") from None
    if _b64(packed) != raw:  # one spelling per token: a URL names its bytes one way
        raise signing.BadSignature("Bad picture URL signature")
    salt = _salt()
    for secret in (django_settings.SECRET_KEY, *django_settings.SECRET_KEY_FALLBACKS):
        expected = _set_mac(_mac_key(salt, secret))
        expected.update(packed)
        if hmac.compare_digest(_b64(expected.digest()), mac.encode()):
            return packed
    raise signing.BadSignature("Bad picture URL signature")


def sign_set(
    image: LatentImage,
    decoder: str,
    sizes: list[Any],
    formats: list[str],
    *,
    preview: tuple[str, Any, str] | None = None,
    now: float | None = None,
) -> str:
    """One token for ``image`` by ``decoder`` at each of ``sizes`` in each of ``formats``, and
    ``preview`` (``(decoder, size, format)``) at index :data:`PREVIEW_INDEX` when given.

    Raises ``LatentsNotReady`` unless the image is ready; for many rows use :class:`SetSigner`.
    """
    boxes = tuple(_bounded(size) for size in sizes)
    image.require_ready()
    instance = image.instance
    return SetSigner(decoder, formats, preview, now=now).sign(
        instance._meta.label_lower,
        instance.pk,
        image.field.name,
        image.digest,
        image.autoencoder,
        boxes,
    )


def _set_box(box: Any) -> tuple[int, int] | None:
    """A size box of a set: None, ``(width, 0)`` (:data:`WIDTH_ONLY`) or a bounded box."""
    if box and type(box) is tuple and len(box) == 2 and box[1] == WIDTH_ONLY:
        limit = conf.get_settings()["URL_MAX_SIZE"]
        if type(box[0]) is not int or box[0] < 1 or (limit is not None and box[0] > limit):
            raise ValueError(f"width {box[0]!r} is outside 1..{limit} (the URL_MAX_SIZE setting)")
        return box
    return _bounded(box) if box else None


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
    preview: tuple[str, Any, str] | None = None,
    now: float | None = None,
) -> str:
    """The path every URL of a picture set starts with: ``set_base(...) + "2.avif"`` is the
    third size of ``sizes`` as AVIF (``EXTENSIONS`` gives each format's extension), and
    ``set_base(...) + "p.webp"`` the preview when one is given."""
    token = sign_set(image, decoder, sizes, formats, preview=preview, now=now)
    return url_prefix() + token + "/"


def read_set(token: str, index: int | str, ext: str, *, now: float | None = None) -> PictureRef:
    """Verify a set ``token`` and say which picture ``/<index>.<ext>`` names in it (``index``
    :data:`PREVIEW_INDEX` names its preview).

    Raises ``BadSignature`` (or :class:`URLExpired`) for a bad token, ``LookupError`` for an
    index or extension the token does not list. Checks nothing in the database.
    """
    preview = None
    if len(token.rpartition(":")[2]) == _MAC_CHARS:
        payload, preview = _read_packed(_unsign_packed(token))
    else:
        payload = _unsign(token)
        if (
            payload[0] != 2
            or not isinstance(payload[5], list)
            or not all(_is_box(box) for box in payload[5])
            or not isinstance(payload[6], list)
            or not all(isinstance(f, str) for f in payload[6])
        ):
            raise signing.BadSignature("Unknown latentstore token version")
    boxes, fmts = payload[5], payload[6]
    _check_expiry(payload[9], now)
    fmt = FORMATS_BY_EXTENSION.get(ext)
    if index == PREVIEW_INDEX:
        if preview is None or fmt != preview[2]:
            raise LookupError(f"No preview {index}.{ext} in this set")
        alias, box, _fmt, fingerprint = preview
        return replace(_ref(payload, box, fmt), decoder=alias, fingerprint=fingerprint)
    if fmt not in fmts or not isinstance(index, int) or not 0 <= index < len(boxes):
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

"""The latent blob codec: a versioned, self-describing, checksummed container for one latent.

Numpy and the standard library only -- no Django, no torch -- so any process can read latents.

Layout of a version-1 blob (all integers little-endian)::

    offset  size  field
    0       4     magic b"LTNT"
    4       2     u16 format version (1)
    6       4     u32 header length N
    10      N     header: UTF-8 JSON object, keys sorted, no whitespace (see below)
    10+N    P     payload: the latents, C-contiguous (C, h, w), little-endian
                    float16: P = C*h*w*2
                    int8:    P = C*h*w, per-channel affine quantisation (see below)
                    int4:    P = ceil(C*h*w / 2), per-channel affine, two values a byte
    10+N+P  16    blake2b (digest_size=16) of every byte before it

The header holds every :class:`LatentHeader` field (``version``, ``autoencoder``, ``family``,
``fingerprint``, ``scaling_factor``, ``shift_factor``, ``shape``, ``dtype``, ``width``,
``height``, ``downsample``, ``pad_right``, ``pad_bottom``) and, for int8 and int4 only,
``quant``: ``{"offset": [lo per channel], "scale": [scale per channel]}``. The quantisation
parameters live in the header (not the payload) so the payload is one plain array and the header
is the single place that says how to read it; JSON floats round-trip exactly.

int8 quantisation, per channel c with lo = min(x_c), hi = max(x_c):
``scale = (hi - lo) / 255`` (0 when hi == lo), ``q = round((x - lo) / scale) - 128`` (q = -128
when scale == 0), read back as ``x' = (q + 128) * scale + lo``. The error is at most scale / 2
(a channel whose step would be below float32's normal range, i.e. that varies by < 3e-36, is
stored as constant).

int4 works the same way with 16 levels: ``scale = (hi - lo) / 15``, ``q = round((x - lo) /
scale)`` in 0..15 (unsigned), read back as ``x' = q * scale + lo``. Values are packed two to a
byte in C order, the even-indexed value in the low nibble; for an odd count the last byte's high
nibble is zero (and checked). It quarters float16's payload; whether that is usable depends on
the decoder -- see ``bench/quality_report.py`` for measured PSNR (it is not near-lossless).

Measured quantisation error (4x64x64 latents, raw values with per-channel std 5 and means
~N(0, 1), the spread of SD-VAE ``latent_dist.mean``; error divided by the channel's std, 50 draws
each from numpy's default_rng(0), packed and unpacked with this module):

    values          storage   max |err| / std (mean, worst)   RMS err / std   blob bytes
    Gaussian        float16   0.0015, 0.0016                   0.00021         33013
    Gaussian        int8      0.0151, 0.0167                   0.0082          16815
    Laplace         int8      0.025,  0.031                    0.013           16813
    Student-t(4)    int8      0.047,  0.112                    0.021           16811

int8's worst case is half a step, (max - min) / 510 per channel, so it grows with outliers:
about 1.5 % of a channel's std on Gaussian latents (10x float16's worst error, 40x in RMS) and
up to ~11 % on heavy-tailed ones. float16 therefore stays the default
(``LATENTSTORE["LATENT_DTYPE"]``); int8 is an opt-in that halves storage.

The checksum doubles as the content address (:func:`blob_digest`): it covers the header too, so
the same numbers from different weights get different addresses.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "STORAGE_DTYPES",
    "LatentFormatError",
    "LatentHeader",
    "blob_digest",
    "pack",
    "read_header",
    "unpack",
]

MAGIC = b"LTNT"
FORMAT_VERSION = 1
STORAGE_DTYPES = ("float16", "int8", "int4")

_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_PREFIX_SIZE = _PREFIX.size  # 10
_CHECKSUM_SIZE = 16
# A real header is a few hundred bytes (about 1 KB for int8 with 16 channels); a huge length
# field means corruption, and refusing it early gives a clearer message than a JSON error.
MAX_HEADER_BYTES = 64 * 1024

_F16_OVERFLOW = 65520.0
_F32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32, ~1.2e-38
_NUMPY_DTYPES = {"float16": np.dtype("<f2"), "int8": np.dtype("i1"), "int4": np.dtype("u1")}
# Quantisation levels of the affine dtypes (their steps: (max - min) / (levels - 1)).
_LEVELS = {"int8": 256, "int4": 16}
_HEADER_KEYS = frozenset(
    (
        "version",
        "autoencoder",
        "family",
        "fingerprint",
        "scaling_factor",
        "shift_factor",
        "shape",
        "dtype",
        "width",
        "height",
        "downsample",
        "pad_right",
        "pad_bottom",
    )
)


class LatentFormatError(ValueError):
    """A blob that is not a readable latent: truncated, corrupt, unknown version, bad checksum."""


@dataclass(frozen=True)
class LatentHeader:
    """What a stored latent is and where it came from (everything except the numbers)."""

    version: int
    autoencoder: str  # alias in settings, e.g. "default"
    family: str  # e.g. "sd"
    fingerprint: str  # weights fingerprint (hex)
    scaling_factor: float
    shift_factor: float
    shape: tuple[int, int, int]  # (C, h, w) of the stored latents (padded grid)
    dtype: str  # "float16" | "int8" | "int4"
    width: int  # original (displayed) image width in pixels
    height: int
    downsample: int  # pixels per latent cell (8 for SD)
    pad_right: int  # pixels of padding added on the right / bottom before encoding
    pad_bottom: int

    @property
    def origin(self) -> dict[str, str]:
        """The identity of the autoencoder that wrote these latents."""
        return {
            "autoencoder": self.autoencoder,
            "family": self.family,
            "fingerprint": self.fingerprint,
        }

    @property
    def payload_nbytes(self) -> int:
        """Size in bytes of the payload this header describes."""
        c, h, w = self.shape
        if self.dtype == "int4":
            return (c * h * w + 1) // 2
        return c * h * w * _NUMPY_DTYPES[self.dtype].itemsize


# --------------------------------------------------------------------------------------------
# pack


def pack(
    latents: np.ndarray,
    *,
    autoencoder: str,
    family: str,
    fingerprint: str,
    scaling_factor: float,
    shift_factor: float,
    width: int,
    height: int,
    downsample: int = 8,
    dtype: str = "float16",
) -> bytes:
    """Serialise raw latents ``(C, h, w)`` and their origin into a self-describing blob.

    ``latents`` must be a finite floating-point array whose values fit in float16 (|x| <= 65504,
    whatever ``dtype`` is, so that switching the storage dtype never changes what can be stored).
    ``width``/``height`` are the image's size in pixels; the latent grid must be the smallest
    that covers it (``(w - 1) * downsample < width <= w * downsample``), and the padding is
    recorded. Raises :class:`ValueError` for anything else; never stores inf or NaN.
    """
    arr = _checked_array(latents, dtype)
    c, h, w = (int(n) for n in arr.shape)
    for name, value in (("autoencoder", autoencoder), ("family", family)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if not isinstance(fingerprint, str):
        raise ValueError(f"fingerprint must be a string, got {fingerprint!r}")
    scaling_factor = _finite_float("scaling_factor", scaling_factor)
    shift_factor = _finite_float("shift_factor", shift_factor)
    if scaling_factor == 0.0:
        raise ValueError("scaling_factor must not be 0")
    width, height, downsample, pad_right, pad_bottom = _padding(w, h, width, height, downsample)
    header: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "autoencoder": autoencoder,
        "family": family,
        "fingerprint": fingerprint,
        "scaling_factor": scaling_factor,
        "shift_factor": shift_factor,
        "shape": [c, h, w],
        "dtype": dtype,
        "width": width,
        "height": height,
        "downsample": downsample,
        "pad_right": pad_right,
        "pad_bottom": pad_bottom,
    }
    payload = _payload(arr, dtype, header)
    return _frame(header, payload)


def _checked_array(latents: np.ndarray, dtype: str) -> np.ndarray:
    """``latents`` as a 3-D, non-empty, finite float array within float16's range."""
    arr = np.asarray(latents)
    if arr.ndim != 3:
        raise ValueError(f"latents must be 3-D (C, h, w), got shape {arr.shape}")
    if arr.dtype.kind != "f":
        raise ValueError(f"latents must be a floating-point array, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"latents must not be empty, got shape {arr.shape}")
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    # min/max propagate NaN, so two cheap reductions check finiteness and range together.
    # |x| >= 65520 would round to inf in float16 (65504 is the largest finite half).
    lo, hi = float(arr.min()), float(arr.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("latents contain NaN or infinity")
    if max(-lo, hi) >= _F16_OVERFLOW:
        raise ValueError(
            f"latents exceed the float16 range: max |x| = {max(-lo, hi):.6g}, "
            f"must be below {_F16_OVERFLOW:.0f} (float16 max is 65504)"
        )
    return arr


def _padding(
    w: int, h: int, width: Any, height: Any, downsample: Any
) -> tuple[int, int, int, int, int]:
    """Check that a ``w x h`` grid is the smallest covering ``width x height``; return the
    sizes as ints and the padding ``(width, height, downsample, pad_right, pad_bottom)``."""
    for name, value in (("width", width), ("height", height), ("downsample", downsample)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    width, height, downsample = int(width), int(height), int(downsample)
    pad_right = w * downsample - width
    pad_bottom = h * downsample - height
    if not (0 <= pad_right < downsample and 0 <= pad_bottom < downsample):
        raise ValueError(
            f"a {w}x{h} latent grid at {downsample} px per cell does not match a "
            f"{width}x{height} image (expected a {-(-width // downsample)}x"
            f"{-(-height // downsample)} grid)"
        )
    return width, height, downsample, pad_right, pad_bottom


def _payload(arr: np.ndarray, dtype: str, header: dict[str, Any]) -> bytes:
    """The stored values in ``dtype``; quantised dtypes add their ``quant`` entry to header."""
    if dtype == "float16":
        return arr.astype(_NUMPY_DTYPES["float16"], order="C").tobytes()
    if dtype == "int8":
        q, offset, scale = _quantize(arr, _LEVELS["int8"])
        header["quant"] = {"offset": offset, "scale": scale}
        q -= 128  # stored signed: -128..127
        return q.astype(np.int8).tobytes()
    q, offset, scale = _quantize(arr, _LEVELS["int4"])
    header["quant"] = {"offset": offset, "scale": scale}
    return _pack_nibbles(q.reshape(-1))


def _frame(header: dict[str, Any], payload: bytes) -> bytes:
    """Magic, version and header length, the JSON header, the payload and a checksum."""
    # Sorted keys and fixed separators: equal inputs give byte-identical blobs (stable digests).
    header_bytes = json.dumps(
        header, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False
    ).encode("utf-8")
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise ValueError(f"header too large ({len(header_bytes)} bytes > {MAX_HEADER_BYTES})")
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes))
    checksum = hashlib.blake2b(prefix, digest_size=_CHECKSUM_SIZE)
    checksum.update(header_bytes)
    checksum.update(payload)
    return b"".join((prefix, header_bytes, payload, checksum.digest()))


def _quantize(arr: np.ndarray, levels: int) -> tuple[np.ndarray, list[float], list[float]]:
    """Per-channel affine quantisation to ``0 .. levels - 1`` (int16 array of arr's shape)."""
    top = float(levels - 1)
    # float32 is plenty: the step is 1/255 of the range, float32 rounding is 1e-7 of it.
    x = arr.astype(np.float32, copy=False).reshape(arr.shape[0], -1)
    lo = x.min(axis=1)
    scale = (x.max(axis=1).astype(np.float64) - lo) / top
    # A step below float32's normal range would underflow on read-back (and its inverse
    # overflow here); such a channel varies by < 3e-36, so store it as constant instead.
    scale[scale < _F32_TINY] = 0.0
    # hi == lo: a zero inverse makes every q 0, which reads back as lo exactly.
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0).astype(np.float32)
    t = x - lo[:, None]
    t *= inv[:, None]
    np.rint(t, out=t)
    np.clip(t, 0.0, top, out=t)  # float32 rounding could in theory reach top + 0.5 -> top + 1
    q = t.astype(np.int16).reshape(arr.shape)
    return q, [float(v) for v in lo], [float(v) for v in scale]


def _pack_nibbles(q: np.ndarray) -> bytes:
    """Values 0..15, two a byte: even index in the low nibble; an odd count pads a zero."""
    if len(q) % 2:
        q = np.concatenate([q, np.zeros(1, q.dtype)])
    pairs = q.astype(np.uint8).reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).astype(np.uint8).tobytes()


def _unpack_nibbles(view: memoryview, count: int, offset: int) -> np.ndarray:
    raw = np.frombuffer(view, dtype="u1", count=(count + 1) // 2, offset=offset)
    q = np.empty(2 * len(raw), dtype=np.uint8)
    q[0::2] = raw & 0x0F
    q[1::2] = raw >> 4
    if count % 2 and q[-1] != 0:
        raise LatentFormatError("latent blob is corrupt: the int4 padding nibble is not zero")
    return q[:count]


# --------------------------------------------------------------------------------------------
# unpack / read_header / blob_digest


def unpack(
    blob: bytes | bytearray | memoryview, *, float16: bool = False
) -> tuple[LatentHeader, np.ndarray]:
    """Verify and read a blob: return its header and the latents as float32 ``(C, h, w)``.

    With ``float16=True`` a float16 blob's latents come back as stored: a read-only float16
    view of the blob, no conversion (an export writing float16 would convert twice); other
    storage dtypes are float32 either way. Raises :class:`LatentFormatError` saying what is
    wrong for a blob that is truncated, too long, corrupt (checksum), of an unknown version, or
    that holds non-finite values.
    """
    view = _as_view(blob)
    header, quant, payload_start = _parse_header(view)
    expected = payload_start + header.payload_nbytes + _CHECKSUM_SIZE
    if len(view) < expected:
        raise LatentFormatError(
            f"latent blob is truncated: expected {expected} bytes, got {len(view)}"
        )
    if len(view) > expected:
        raise LatentFormatError(
            f"latent blob has {len(view) - expected} unexpected trailing bytes: "
            f"expected {expected} bytes, got {len(view)}"
        )
    body_end = expected - _CHECKSUM_SIZE
    actual = hashlib.blake2b(view[:body_end], digest_size=_CHECKSUM_SIZE).digest()
    if actual != view[body_end:]:
        raise LatentFormatError(
            "latent blob is corrupt: checksum mismatch "
            f"(stored {bytes(view[body_end:]).hex()}, computed {actual.hex()})"
        )

    count = math.prod(header.shape)
    if header.dtype == "float16":
        bits = np.frombuffer(view, dtype="<u2", count=count, offset=payload_start)
        if float16:
            if ((bits & 0x7C00) == 0x7C00).any():  # an all-ones exponent: inf or NaN
                raise LatentFormatError("latent blob holds NaN or infinite values")
            return header, bits.view("<f2").reshape(header.shape)
        latents = _half_bits_to_float32(bits).reshape(header.shape)
    else:
        offset, scale = quant
        if header.dtype == "int8":
            raw = np.frombuffer(view, dtype="i1", count=count, offset=payload_start)
            latents = raw.astype(np.float32).reshape(header.shape)
            latents += np.float32(128.0)
        else:
            q = _unpack_nibbles(view, count, payload_start)
            latents = q.astype(np.float32).reshape(header.shape)
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            latents *= np.asarray(scale, dtype=np.float32)[:, None, None]
            latents += np.asarray(offset, dtype=np.float32)[:, None, None]
        # Finite offsets and scales can still overflow float32 in a forged header.
        if not np.isfinite(latents).all():
            raise LatentFormatError("latent blob holds values that are not finite in float32")
    return header, latents


def read_header(blob: bytes | bytearray | memoryview) -> LatentHeader:
    """Read and validate only the header; the payload may be absent (a prefix of the blob is
    enough, e.g. a ``substring`` of the column). Does not verify the checksum: use
    :func:`unpack` to read the latents."""
    header, _quant, _start = _parse_header(_as_view(blob))
    return header


def blob_digest(blob: bytes | bytearray | memoryview) -> str:
    """The blob's content address: the hex of its stored checksum (32 hex digits).

    Reads the last 16 bytes after a cheap sanity check of the prefix; it does not re-hash, so
    it is constant-time. Two blobs share a digest only if their header and payload are equal.
    """
    view = _as_view(blob)
    _check_prefix(view)
    if len(view) < _PREFIX_SIZE + _CHECKSUM_SIZE:
        raise LatentFormatError(
            f"latent blob is truncated: {len(view)} bytes cannot hold a prefix and a checksum"
        )
    return view[-_CHECKSUM_SIZE:].hex()


# --------------------------------------------------------------------------------------------
# helpers


def _as_view(blob: object) -> memoryview:
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise TypeError(f"a latent blob must be bytes, bytearray or memoryview, not {type(blob)}")
    view = memoryview(blob)
    if view.ndim != 1 or view.itemsize != 1:
        try:
            view = view.cast("B")
        except TypeError as exc:
            raise TypeError(f"latent blob memoryview is not contiguous bytes: {exc}") from None
    return view


def _check_prefix(view: memoryview) -> tuple[int, int]:
    n = len(view)
    if n == 0:
        raise LatentFormatError("latent blob is empty")
    head = bytes(view[: len(MAGIC)])
    if head != MAGIC[: len(head)]:
        raise LatentFormatError(f"not a latent blob: bad magic {head!r} (expected {MAGIC!r})")
    if n < _PREFIX_SIZE:
        raise LatentFormatError(
            f"latent blob is truncated: got {n} bytes, less than the {_PREFIX_SIZE}-byte prefix"
        )
    _magic, version, header_len = _PREFIX.unpack_from(view)
    if version != FORMAT_VERSION:
        raise LatentFormatError(
            f"unsupported latent format version {version} (this code reads {FORMAT_VERSION})"
        )
    return version, header_len


def _parse_header(
    view: memoryview,
) -> tuple[LatentHeader, tuple[tuple[float, ...], tuple[float, ...]] | None, int]:
    _version, header_len = _check_prefix(view)
    if header_len > MAX_HEADER_BYTES:
        raise LatentFormatError(
            f"latent blob is corrupt: header length {header_len} exceeds {MAX_HEADER_BYTES}"
        )
    payload_start = _PREFIX_SIZE + header_len
    if len(view) < payload_start:
        raise LatentFormatError(
            f"latent blob is truncated: the header needs {payload_start} bytes, got {len(view)}"
        )
    header, quant = _decode_header(bytes(view[_PREFIX_SIZE:payload_start]))
    return header, quant, payload_start


# Many blobs share a handful of distinct headers' worth of parsing cost (~12 us of JSON and
# validation); results are immutable and failures are not cached, so a small LRU is safe.
@functools.lru_cache(maxsize=512)
def _decode_header(raw: bytes) -> tuple[LatentHeader, Any]:
    try:
        obj = json.loads(str(raw, "utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LatentFormatError(f"latent blob header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise LatentFormatError("latent blob header is not a JSON object")
    return _header_from_dict(obj)


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name}")


def _header_from_dict(obj: dict[str, Any]) -> tuple[LatentHeader, Any]:
    def bad(msg: str) -> LatentFormatError:
        return LatentFormatError(f"latent blob header is invalid: {msg}")

    keys = set(obj)
    missing = _HEADER_KEYS - keys
    if missing:
        raise bad(f"missing {', '.join(sorted(missing))}")
    extra = keys - _HEADER_KEYS - {"quant"}
    if extra:
        raise bad(f"unexpected {', '.join(sorted(extra))}")

    for key in ("autoencoder", "family", "fingerprint", "dtype"):
        if not isinstance(obj[key], str):
            raise bad(f"{key} must be a string, got {obj[key]!r}")
    for key in ("version", "width", "height", "downsample", "pad_right", "pad_bottom"):
        if not _is_int(obj[key]):
            raise bad(f"{key} must be an integer, got {obj[key]!r}")
    for key in ("scaling_factor", "shift_factor"):
        if not is_number(obj[key]):
            raise bad(f"{key} must be a number, got {obj[key]!r}")
    if obj["version"] != FORMAT_VERSION:
        raise bad(f"version {obj['version']} does not match the prefix ({FORMAT_VERSION})")
    dtype = obj["dtype"]
    if dtype not in _NUMPY_DTYPES:
        raise bad(f"dtype {dtype!r} is not one of {STORAGE_DTYPES}")
    shape = obj["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(_is_int(n) and n >= 1 for n in shape)
    ):
        raise bad(f"shape must be 3 positive integers, got {shape!r}")
    c, h, w = shape
    width, height, ds = obj["width"], obj["height"], obj["downsample"]
    if width < 1 or height < 1 or ds < 1:
        raise bad("width, height and downsample must be positive")
    if obj["pad_right"] != w * ds - width or obj["pad_bottom"] != h * ds - height:
        raise bad(
            f"padding ({obj['pad_right']}, {obj['pad_bottom']}) does not match a {w}x{h} grid "
            f"at {ds} px per cell for a {width}x{height} image"
        )
    if not (0 <= obj["pad_right"] < ds and 0 <= obj["pad_bottom"] < ds):
        raise bad(f"a {w}x{h} grid does not fit a {width}x{height} image at {ds} px per cell")

    quant = _quant_from_dict(obj, dtype, c, bad)
    header = LatentHeader(
        version=obj["version"],
        autoencoder=obj["autoencoder"],
        family=obj["family"],
        fingerprint=obj["fingerprint"],
        scaling_factor=float(obj["scaling_factor"]),
        shift_factor=float(obj["shift_factor"]),
        shape=(c, h, w),
        dtype=dtype,
        width=width,
        height=height,
        downsample=ds,
        pad_right=obj["pad_right"],
        pad_bottom=obj["pad_bottom"],
    )
    return header, quant


def _quant_from_dict(
    obj: dict[str, Any], dtype: str, channels: int, bad: Any
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The per-channel ``(offset, scale)`` of quantised latents (None for float16)."""
    if dtype not in _LEVELS:
        if "quant" in obj:
            raise bad(f"quant is only valid for int8 and int4, not {dtype}")
        return None
    q = obj.get("quant")
    if not isinstance(q, dict) or set(q) != {"offset", "scale"}:
        raise bad(f"{dtype} latents need quant = {{offset, scale}}")
    offset, scale = q["offset"], q["scale"]
    for name, values in (("offset", offset), ("scale", scale)):
        if (
            not isinstance(values, list)
            or len(values) != channels
            or not all(is_number(v) for v in values)
        ):
            raise bad(f"quant.{name} must be {channels} numbers")
    if any(s < 0 for s in scale):
        raise bad("quant.scale must not be negative")
    return tuple(float(v) for v in offset), tuple(float(v) for v in scale)


_TWO_POW_112 = np.float32(2.0**112)


def _half_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Exact float16 -> float32, about twice as fast as numpy's astype; rejects inf/NaN.

    numpy converts halves one at a time in software here; moving the 15 magnitude bits into a
    float32's place and multiplying by 2**112 (= 2**(127 - 15)) re-biases the exponent, and the
    multiply also normalises float16 subnormals exactly. The sign bit is ORed back afterwards.
    """
    u = bits.astype(np.uint32)
    sign = (u & 0x8000) << 16
    u &= 0x7FFF
    # pack never writes inf/NaN (all exponent bits set), so any mean a forged or buggy writer.
    if u.max() >= 0x7C00:
        raise LatentFormatError("latent blob holds NaN or infinite values")
    u <<= 13
    f = u.view(np.float32)
    f *= _TWO_POW_112
    u |= sign
    return f


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """Whether ``value`` is a finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _finite_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a number, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return result

"""Upload validation and the RGB policy: Pillow only (no numpy, no torch), safe for the web tier.

Two jobs, kept apart on purpose:

* :func:`inspect_image` runs when an image is assigned to a field. It parses the *header* only
  (``PIL.Image.open`` restricted to the allowed formats; no pixel data is decoded), so a 50 MB
  upload or a decompression bomb costs microseconds to accept or refuse.
* :func:`open_rgb` / :func:`to_rgb` run in the worker, right before encoding. They decode the
  pixels and turn whatever came in into one 8-bit sRGB image, by the policy below.

RGB policy (what :func:`to_rgb` does, in this order)
----------------------------------------------------
1. **Animations** (GIF, APNG, WebP, multi-page TIFF): the first frame is used.
2. **EXIF orientation** is applied (``ImageOps.exif_transpose``), so width and height are the
   *displayed* size, the same numbers :func:`inspect_image` reported. An unreadable EXIF block is
   ignored (orientation 1) rather than failing the image.
3. **High bit depth** is reduced to 8 bits by *scaling*, never by clipping:

   * ``I;16`` (16-bit greyscale, e.g. 16-bit PNG/TIFF): ``v * 255 / 65535``.
   * ``I`` (32-bit integer): values within 0..255 are kept; within 0..65535 they are scaled as
     16-bit; any other range is stretched linearly from its minimum..maximum to 0..255.
   * ``F`` (32-bit float): values within 0..1 are scaled by 255 (the usual convention for float
     TIFF); within 0..255 kept; any other range stretched from its minimum..maximum.

   A ``transparency`` key on such an image is dropped (it refers to 16-bit values).
4. **Transparency** is *composited* onto ``background`` (default white, the
   ``ALPHA_BACKGROUND`` setting): ``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, palette
   images with a transparent index, and ``L``/``RGB`` images with a PNG ``tRNS`` colour key. The
   alpha channel is set aside, the colour channels go through step 5, and the result is blended
   as ``colour * a + background * (1 - a)``. Autoencoders see no alpha.
5. **Colour space**: an embedded ICC profile is converted to sRGB with LittleCMS
   (``PIL.ImageCms``, perceptual intent). This is what makes a CMYK JPEG from print or a Display
   P3 photo from a phone come out with the right colours. If the profile is unreadable, does not
   match the image's mode, or LittleCMS is unavailable, the image falls back *silently* to Pillow's
   plain ``convert("RGB")`` (its pixels are then taken to be sRGB already). Without a profile:
   ``CMYK`` uses Pillow's naive conversion (``R = 255 - C - K`` clipped, etc.), ``L`` and ``1``
   are replicated to three channels, ``LAB`` goes through a CIELAB -> sRGB transform, and
   ``YCbCr``/``HSV``/``RGBX`` use ``convert("RGB")``.

The result is always a fresh ``RGB`` image with no ``icc_profile`` or ``transparency`` in its
``info``. Pillow's own decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is honoured by
both entry points; keep ``ImageFile.LOAD_TRUNCATED_IMAGES`` at its default (``False``), or
truncated uploads will be encoded as grey-filled pictures instead of failing.
"""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from django.core.exceptions import ValidationError
from PIL import Image, ImageFile, ImageOps

__all__ = ["ImageInfo", "inspect_image", "open_rgb", "to_rgb"]

logger = logging.getLogger(__name__)

# EXIF Orientation values that turn the picture by 90 degrees (stored width is displayed height).
_SWAPPED_ORIENTATIONS = frozenset({5, 6, 7, 8})
_ORIENTATION_TAG = 0x0112

# Formats Pillow can recognise from their first bytes: used only to *name* a recognised but
# disallowed format in the error message. Deliberately short: each one is a header parser that
# runs on untrusted bytes, and formats with no magic number (TGA, some raw formats) would claim
# random data.
_RECOGNISABLE_FORMATS = (
    "JPEG",
    "PNG",
    "GIF",
    "WEBP",
    "BMP",
    "TIFF",
    "AVIF",
    "ICO",
    "PSD",
    "JPEG2000",
    "QOI",
    "DDS",
)

# Pillow opens a JPEG that carries an MPO index (most phone cameras write one) as "MPO"; for an
# upload policy it is a JPEG.
_FORMAT_ALIASES = {"MPO": "JPEG"}

# Common spellings of format names in settings.
_SETTING_ALIASES = {"JPG": "JPEG", "TIF": "TIFF", "MPO": "JPEG", "JPEG 2000": "JPEG2000"}

# Errors Pillow raises from header parsers and decoders for bytes that are not what they claim.
_PARSE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)


@dataclass(frozen=True)
class ImageInfo:
    """What a header parse tells: the format and the *displayed* size (after EXIF orientation)."""

    format: str
    width: int
    height: int


def inspect_image(
    data: bytes | bytearray | memoryview,
    *,
    allowed_formats: Iterable[str],
    max_pixels: int,
) -> ImageInfo:
    """Validate an upload from its header alone and return its format and displayed size.

    No pixel data is decoded, so this is cheap for any size and safe against decompression bombs:
    the pixel count is read from the header and refused when above ``max_pixels`` or Pillow's
    ``MAX_IMAGE_PIXELS``, whichever is lower.

    Raises :class:`django.core.exceptions.ValidationError` with one of the codes ``"empty"``,
    ``"not_an_image"``, ``"format"`` or ``"too_large_pixels"``.
    """
    allowed = _normalise_formats(allowed_formats)
    if not data:
        raise ValidationError("The file is empty.", code="empty")
    try:
        img = _open_header(data, allowed)
    except _BombError as exc:
        raise _too_many_pixels(exc.pixels, max_pixels) from None
    if img is None:
        raise _not_allowed_or_not_image(data, allowed)

    with img:
        fmt = _FORMAT_ALIASES.get(img.format or "", img.format or "")
        if fmt not in allowed:  # a plugin that answered for a format it shares a prefix with
            raise _format_error(fmt, allowed)
        width, height = img.size
        if width < 1 or height < 1:
            raise ValidationError(
                "The image has no pixels (%(width)s x %(height)s).",
                code="not_an_image",
                params={"width": width, "height": height},
            )
        pixels = width * height
        limit = _pixel_limit(max_pixels)
        if pixels > limit:
            raise _too_many_pixels(pixels, max_pixels)
        if _header_orientation(img) in _SWAPPED_ORIENTATIONS and not _already_oriented(img):
            width, height = height, width
    return ImageInfo(format=fmt, width=width, height=height)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Return ``img`` as a new 8-bit sRGB ``RGB`` image, by the policy in this module's docstring.

    ``img`` is not modified (an animated image is rewound to its first frame).
    """
    bg = tuple(int(c) for c in background)
    if len(bg) != 3:
        raise ValueError(f"background must be an (R, G, B) triple, not {background!r}")
    if getattr(img, "is_animated", False):
        img.seek(0)
    img = _exif_transpose(img)
    icc = img.info.get("icc_profile")

    img = _to_8bit(img)

    alpha: Image.Image | None = None
    if img.mode in ("RGBa", "La"):  # premultiplied: unpremultiply before splitting
        img = img.convert("RGBA" if img.mode == "RGBa" else "LA")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    elif img.mode in ("L", "RGB") and "transparency" in img.info:
        img = img.convert("LA" if img.mode == "L" else "RGBA")
    if img.mode in ("RGBA", "LA"):
        alpha = img.getchannel("A")
        img = img.convert("RGB" if img.mode == "RGBA" else "L")

    rgb = _to_srgb(img, icc)

    if alpha is not None:
        out = Image.new("RGB", rgb.size, bg)
        out.paste(rgb, (0, 0), alpha)  # colour * a + background * (1 - a)
        rgb = out
    # rgb is a new image in every path (exif_transpose copies), so its info can be edited.
    rgb.info.pop("icc_profile", None)
    rgb.info.pop("transparency", None)
    return rgb


def open_rgb(
    data: bytes | bytearray | memoryview,
    background: tuple[int, int, int] = (255, 255, 255),
    *,
    allowed_formats: Iterable[str] | None = None,
    max_pixels: int | None = None,
) -> Image.Image:
    """Decode image bytes and return them as RGB by :func:`to_rgb`'s policy.

    Pillow's decompression-bomb limit is in force (above ``PIL.Image.MAX_IMAGE_PIXELS`` the image
    is refused, not merely warned about), and so is ``max_pixels`` when given. ``allowed_formats``
    (optional) restricts the decoders tried, as at upload time.

    Raises :class:`ValueError` with a readable message for empty, unrecognised, too large,
    truncated or corrupt data.
    """
    if not data:
        raise ValueError("The image data is empty.")
    formats = None if allowed_formats is None else _normalise_formats(allowed_formats)
    try:
        img = _open_header(data, formats)
    except _BombError as exc:
        raise ValueError(
            f"The image has {exc.pixels} pixels, above the decompression-bomb limit "
            f"of {_pixel_limit(max_pixels)}."
        ) from None
    if img is None:
        raise ValueError(
            "The data is not an image in a format that can be read"
            + (f" (allowed: {', '.join(formats)})." if formats else ".")
        )
    width, height = img.size
    if width < 1 or height < 1:
        raise ValueError(f"The image has no pixels ({width} x {height}).")
    if width * height > _pixel_limit(max_pixels):
        raise ValueError(
            f"The image has {width * height} pixels ({width} x {height}), above the limit "
            f"of {_pixel_limit(max_pixels)}."
        )
    try:
        img.load()
        return to_rgb(img, background)
    except _PARSE_ERRORS as exc:
        raise ValueError(
            f"The {img.format or 'image'} data is truncated or corrupt and cannot be decoded "
            f"({exc})."
        ) from exc
    except Image.DecompressionBombError as exc:  # e.g. a frame larger than the header said
        raise ValueError(f"The image is too large to decode safely ({exc}).") from exc


# --- helpers ---------------------------------------------------------------------------------


class _BombError(Exception):
    def __init__(self, pixels: int | None) -> None:
        super().__init__(pixels)
        self.pixels = pixels


def _normalise_formats(formats: Iterable[str]) -> tuple[str, ...]:
    names = (str(f).strip().upper() for f in formats)
    return tuple(dict.fromkeys(_SETTING_ALIASES.get(n, n) for n in names))


def _pixel_limit(max_pixels: int | None) -> int | float:
    limits = [n for n in (max_pixels, Image.MAX_IMAGE_PIXELS) if n is not None]
    return min(limits) if limits else float("inf")


def _open_header(
    data: bytes | bytearray | memoryview, formats: tuple[str, ...] | None
) -> ImageFile.ImageFile | None:
    """``Image.open`` (header only) restricted to ``formats``; None when no plugin accepts it.

    Pillow's bomb check runs inside ``Image.open``; its error, and its warning when the caller's
    warning filters turn warnings into errors, come out as :class:`_BombError`. Without such a
    filter the warning is only a warning, and callers compare the size with
    ``MAX_IMAGE_PIXELS`` themselves (warnings.catch_warnings would be simpler but is not
    thread-safe, and web servers run threads).
    """
    if formats is not None:
        Image.init()
        # Pillow raises KeyError for a name it has no plugin for (a typo in the setting).
        formats = tuple(f for f in formats if f in Image.OPEN)
        if not formats:
            return None
    try:
        return Image.open(io.BytesIO(data), formats=list(formats) if formats else None)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _BombError(_pixels_from_message(str(exc))) from None
    except _PARSE_ERRORS:  # UnidentifiedImageError is an OSError
        return None


def _pixels_from_message(message: str) -> int | None:
    # "Image size (10000000000 pixels) exceeds limit of ..."
    head, _, tail = message.partition("(")
    number = tail.split(" ", 1)[0]
    return int(number) if number.isdigit() else None


def _too_many_pixels(pixels: int | None, max_pixels: int | None) -> ValidationError:
    limit = _pixel_limit(max_pixels)
    if pixels is None:
        return ValidationError(
            "The image has too many pixels (the limit is %(limit)s).",
            code="too_large_pixels",
            params={"limit": limit},
        )
    return ValidationError(
        "The image has %(pixels)s pixels; the limit is %(limit)s.",
        code="too_large_pixels",
        params={"pixels": pixels, "limit": limit},
    )


def _format_error(fmt: str, allowed: tuple[str, ...]) -> ValidationError:
    return ValidationError(
        "%(format)s images are not accepted. Allowed formats: %(allowed)s.",
        code="format",
        params={"format": fmt, "allowed": ", ".join(allowed) or "none"},
    )


def _not_allowed_or_not_image(
    data: bytes | bytearray | memoryview, allowed: tuple[str, ...]
) -> ValidationError:
    """Tell "a BMP, which is not allowed" apart from "not an image at all"."""
    others = [f for f in _RECOGNISABLE_FORMATS if f not in allowed]
    img = None
    if others:
        try:
            img = _open_header(data, tuple(others))
        except _BombError:
            img = None
    if img is not None:
        with img:
            fmt = _FORMAT_ALIASES.get(img.format or "", img.format or "")
        if fmt not in allowed:
            return _format_error(fmt, allowed)
    return ValidationError(
        "The file is not an image, or is damaged. Allowed formats: %(allowed)s.",
        code="not_an_image",
        params={"allowed": ", ".join(allowed) or "none"},
    )


def _header_orientation(img: Image.Image) -> int:
    """EXIF orientation (1..8) without decoding pixels.

    ``PngImageFile.getexif`` loads the whole image when the eXIf chunk was not in the header, so
    the base implementation is called directly; it reads what the header parse put in ``info``
    (and TIFF's IFD), plus an XMP ``tiff:Orientation``, as ``exif_transpose`` does.
    """
    try:
        value = Image.Image.getexif(img).get(_ORIENTATION_TAG, 1)
    except Exception:  # a malformed EXIF block: to_rgb ignores it too
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _already_oriented(img: Image.Image) -> bool:
    """True when the plugin already reports the displayed size (Pillow's TIFF plugin does)."""
    tags = getattr(img, "tag_v2", None)
    if tags is None:
        return False
    stored = (tags.get(256), tags.get(257))  # ImageWidth, ImageLength as written in the file
    return stored != img.size and stored == img.size[::-1]


def _exif_transpose(img: Image.Image) -> Image.Image:
    img.load()  # outside the try: a decode error must not pass for an EXIF problem
    try:
        return ImageOps.exif_transpose(img)
    except _PARSE_ERRORS + (KeyError,) as exc:
        logger.info("Ignoring unreadable EXIF data (%s); orientation left as stored", exc)
        return img.copy()


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float images down to ``L``; other modes pass through."""
    mode = img.mode
    if mode.startswith("I;16"):
        out = img.convert("I").point(lambda v: v * (255 / 65535) + 0.5).convert("L")  # rounded
    elif mode in ("I", "F"):
        lo, hi = img.getextrema()
        if mode == "F" and lo >= 0 and hi <= 1:
            scale, offset = 255.0, 0.0
        elif lo >= 0 and hi <= 255:
            scale, offset = 1.0, 0.0
        elif mode == "I" and lo >= 0 and hi <= 65535:
            scale, offset = 255 / 65535, 0.0
        elif hi > lo:
            scale = 255 / (hi - lo)
            offset = -lo * scale
        else:  # a constant image outside 0..255
            scale, offset = 0.0, 128.0
        # point() on I/F takes exactly this affine form; +0.5 rounds on the truncating convert.
        out = img.point(lambda v: v * scale + offset + 0.5) if (scale, offset) != (1, 0) else img
        out = out.convert("L")
    else:
        return img
    out.info = {k: v for k, v in img.info.items() if k != "transparency"}
    return out


_SRGB_PROFILE = None


def _srgb_profile():  # -> ImageCms.ImageCmsProfile
    global _SRGB_PROFILE
    if _SRGB_PROFILE is None:
        from PIL import ImageCms

        _SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return _SRGB_PROFILE


def _to_srgb(img: Image.Image, icc: bytes | None) -> Image.Image:
    """Colour channels (no alpha) to sRGB: ICC transform when possible, else ``convert``."""
    if icc and img.mode in ("RGB", "L", "CMYK", "LAB"):
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            out = ImageCms.profileToProfile(img, source, _srgb_profile(), outputMode="RGB")
            if out is not None:
                return out
        except Exception as exc:  # broken or mismatched profile, no LittleCMS: documented fallback
            logger.debug("ICC profile not applied (%s); using plain RGB conversion", exc)
    if img.mode == "RGB":
        return img
    if img.mode == "LAB":
        try:
            from PIL import ImageCms

            lab = ImageCms.createProfile("LAB")
            out = ImageCms.profileToProfile(img, lab, _srgb_profile(), outputMode="RGB")
            if out is not None:
                return out
        except Exception as exc:
            logger.debug("CIELAB transform failed (%s); using plain RGB conversion", exc)
    return img.convert("RGB")

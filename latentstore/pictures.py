"""Picture files: the formats latentstore serves, each format's limits, saving and sniffing.

No model and no cache here: a decoded (or previewed) PIL image becomes the bytes of a PNG, WebP,
AVIF or JPEG file. A format that cannot hold a picture's size (WebP stops at 16,383 pixels a
side) never turns a valid picture into an error: :func:`picture_bytes` falls back to a format
that holds it, and :func:`sniff_format` tells the server which one a cached file is.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image as PILImage

FORMATS = {"PNG": "PNG", "WEBP": "WEBP", "JPEG": "JPEG", "JPG": "JPEG", "AVIF": "AVIF"}
CONTENT_TYPES = {
    "PNG": "image/png",
    "WEBP": "image/webp",
    "JPEG": "image/jpeg",
    "AVIF": "image/avif",
}
#: The largest side, in pixels, each format can hold (None: no practical limit). Measured with
#: Pillow 13: WebP refuses 16,384; libjpeg stops at 65,500; AVIF encodes 65,536 but not 70,000.
FORMAT_LIMITS: dict[str, int | None] = {"WEBP": 16383, "JPEG": 65500, "AVIF": 65536, "PNG": None}


def fitting_format(format: str, size: tuple[int, int]) -> str:
    """``format`` if it can hold a picture of ``size``; else the closest that can: JPEG for a
    lossy format, then PNG, which holds any size."""
    for candidate in (format, "JPEG", "PNG"):
        limit = FORMAT_LIMITS[candidate]
        if limit is None or max(size) <= limit:
            return candidate
    return "PNG"  # unreachable: PNG has no limit


def width_box(original: tuple[int, int], width: int) -> tuple[int, int]:
    """The size box of the original scaled to ``width`` pixels wide: ``(width, height)`` with
    the height rounded up, so the box's height never binds and the fitted picture is exactly
    ``width`` wide. A srcset candidate's box; a picture-set token may name it by width alone."""
    own_w, own_h = original
    return width, max(1, math.ceil(own_h * width / own_w))


def fit_size(original: tuple[int, int], size: int | tuple[int, int] | None) -> tuple[int, int]:
    """The output size: the original, or the original fitted into a ``size`` box (aspect kept)."""
    width, height = original
    if size is None:
        return width, height
    box_w, box_h = (size, size) if isinstance(size, int) else size
    if box_w <= 0 or box_h <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    scale = min(box_w / width, box_h / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def normalise_format(format: str) -> str:
    """``"png"``, ``"webp"``, ``"jpeg"``/``"jpg"`` (any case) → ``PNG``, ``WEBP``, ``JPEG``."""
    try:
        return FORMATS[format.upper()]
    except KeyError:
        raise ValueError(
            f"Unsupported format {format!r}; use one of PNG, WEBP, JPEG, AVIF"
        ) from None


def picture_bytes(img: PILImage.Image, format: str) -> bytes:
    """``img`` saved as an image file (``PNG``, ``WEBP``, ``AVIF`` or ``JPEG``), as served and
    cached; in :func:`fitting_format` when ``format`` cannot hold ``img``'s size."""
    format = fitting_format(format, img.size)
    buf = io.BytesIO()
    if format == "PNG":
        img.save(buf, format="PNG", compress_level=1)
    elif format == "WEBP":
        img.save(buf, format="WEBP", quality=90, method=4)
    elif format == "AVIF":
        # speed 8: a 1280x720 picture in 0.12 s instead of 0.41 s at Pillow's default 6, for
        # 2 % more bytes (measured here); the transcode runs inside a picture request.
        img.save(buf, format="AVIF", quality=60, speed=8)
    else:
        img.convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def transcode(data: bytes, format: str) -> bytes:
    """A picture file saved again in ``format``: same pixels, no resize, no decoder."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as picture:
        picture.load()
        return picture_bytes(picture, normalise_format(format))


_MAGIC = (
    (b"\x89PNG", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
)


def sniff_format(data: bytes) -> str | None:
    """The format of a picture file by its first bytes (None: not one of ours)."""
    for magic, format in _MAGIC:
        if data.startswith(magic):
            return format
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:12] in (b"ftypavif", b"ftypavis"):
        return "AVIF"
    return None

"""A generated corpus of hostile, broken and unusual uploads, each with its outcome by our policy.

Every case is built here from nothing (no files checked in), so the corpus is reproducible and
reviewable. ``expect`` is one of:

* ``"rejected"`` -- a ``ValidationError`` with ``code`` at the form, before anything is stored;
* ``"failed"``   -- accepted by the cheap header check, then the worker marks the row ``failed``
  with a message containing ``message`` (the original stays staged: nothing is lost);
* ``"ready"``    -- a valid if unusual image that the RGB policy handles; it is encoded, and the
  stored size is ``size`` (the displayed size, after EXIF orientation).

The policy itself lives in ``latentstore/images.py`` and docs/field.md.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageCms, PngImagePlugin

from tests.tiny import image_bytes, make_test_image


@dataclass(frozen=True)
class Case:
    name: str
    what: str  # one line for the robustness report
    build: Callable[[], bytes]
    expect: str  # "rejected" | "failed" | "ready"
    code: str = ""  # ValidationError code, for "rejected"
    message: str = ""  # fragment of the row's error, for "failed"
    size: tuple[int, int] | None = None  # displayed size, for "ready"
    filename: str = "upload.jpg"
    content_type: str = "image/jpeg"
    settings: tuple[tuple[str, object], ...] = ()  # LATENTSTORE overrides for this case

    @property
    def data(self) -> bytes:
        return self.build()


def _picture(width: int = 48, height: int = 32, seed: int = 1) -> Image.Image:
    return make_test_image(width, height, seed=seed)


def _png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR is patched (CRC fixed) to claim another size."""
    data = bytearray(image_bytes(_picture(16, 8), "PNG"))
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small baseline JPEG whose SOF0 segment is patched to claim another size."""
    data = bytearray(image_bytes(_picture(16, 8), "JPEG", quality=90))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def _truncated(fmt: str) -> Callable[[], bytes]:
    def build() -> bytes:
        data = image_bytes(
            _picture(64, 64, seed=5), fmt, **({"quality": 90} if fmt == "JPEG" else {})
        )
        return data[: len(data) // 2]

    return build


def _cmyk_jpeg() -> bytes:
    return image_bytes(_picture().convert("CMYK"), "JPEG", quality=90)


def _sixteen_bit_png() -> bytes:
    return image_bytes(make_test_image(48, 32, seed=2, mode="I;16"), "PNG")


def _palette_transparent_png() -> bytes:
    img = _picture().quantize(colors=16)
    return image_bytes(img, "PNG", transparency=0)


def _animated(fmt: str) -> Callable[[], bytes]:
    def build() -> bytes:
        frames = [_picture(seed=s) for s in range(3)]
        buf = io.BytesIO()
        frames[0].save(
            buf, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0
        )
        return buf.getvalue()

    return build


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    return image_bytes(_picture(48, 32), "JPEG", quality=90, exif=exif.tobytes())


def _icc_jpeg() -> bytes:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return image_bytes(_picture(), "JPEG", quality=90, icc_profile=srgb)


def _progressive_jpeg() -> bytes:
    return image_bytes(_picture(), "JPEG", quality=90, progressive=True, optimize=True)


def _multipage_tiff() -> bytes:
    buf = io.BytesIO()
    _picture(seed=1).save(buf, format="TIFF", save_all=True, append_images=[_picture(seed=2)])
    return buf.getvalue()


def _huge_text_chunk_png() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "x" * (4 * 1024 * 1024))  # 4 MB of tEXt, above Pillow's 1 MB cap
    return image_bytes(_picture(), "PNG", pnginfo=info)


def _ztxt_bomb_png() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "A" * (16 * 1024 * 1024), zip=True)  # 16 MB inflating from 16 KB
    return image_bytes(_picture(), "PNG", pnginfo=info)


def _big_exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x010E] = "y" * 60_000  # ImageDescription filling most of a 64 KB APP1 segment
    exif[0x0112] = 1
    return image_bytes(_picture(), "JPEG", quality=90, exif=exif.tobytes())


def _polyglot_jpeg_html() -> bytes:
    return image_bytes(_picture(), "JPEG", quality=90) + b"<html><script>alert(1)</script></html>"


def _lying_png() -> bytes:
    """Header says 64x64; the pixel data is an 8x8 image's."""
    small = bytearray(image_bytes(_picture(8, 8), "PNG"))
    struct.pack_into(">II", small, 16, 64, 64)
    struct.pack_into(">I", small, 29, zlib.crc32(bytes(small[12:29])))
    return bytes(small)


SVG = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" '
    b'width="100" height="100"><rect width="100" height="100" fill="red"/></svg>'
)

CASES: tuple[Case, ...] = (
    Case("zero-bytes", "empty file", lambda: b"", "rejected", code="empty"),
    Case(
        "text-named-jpg",
        "plain text named .jpg",
        lambda: b"just some words, not a picture\n" * 20,
        "rejected",
        code="not_an_image",
    ),
    Case(
        "html-named-jpg",
        "HTML named .jpg, sent as image/jpeg",
        lambda: b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>",
        "rejected",
        code="not_an_image",
    ),
    Case(
        "svg",
        "SVG (vector, scriptable)",
        lambda: SVG,
        "rejected",
        code="not_an_image",
        filename="a.svg",
        content_type="image/svg+xml",
    ),
    Case(
        "pdf-named-png",
        "PDF named .png",
        lambda: b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n",
        "rejected",
        code="not_an_image",
        filename="a.png",
        content_type="image/png",
    ),
    Case(
        "png-bomb",
        "PNG declaring 100000x100000 pixels",
        lambda: _png_claiming(100_000, 100_000),
        "rejected",
        code="too_large_pixels",
        filename="a.png",
        content_type="image/png",
    ),
    Case(
        "jpeg-bomb",
        "JPEG declaring 65000x65000 pixels",
        lambda: _jpeg_claiming(65_000, 65_000),
        "rejected",
        code="too_large_pixels",
    ),
    Case(
        "over-pixel-cap",
        "5000x4000 PNG above a 16 MP cap set to 4 MP",
        lambda: _png_claiming(5000, 4000),
        "rejected",
        code="too_large_pixels",
        filename="a.png",
        content_type="image/png",
        settings=(("MAX_PIXELS", 4_000_000),),
    ),
    Case(
        "over-byte-cap",
        "upload larger than MAX_UPLOAD_BYTES",
        lambda: image_bytes(_picture(), "PNG"),
        "rejected",
        code="too_large_bytes",
        filename="a.png",
        content_type="image/png",
        settings=(("MAX_UPLOAD_BYTES", 512),),
    ),
    Case(
        "zero-width-png",
        "PNG declaring 0x32 pixels",
        lambda: _png_claiming(0, 32),
        "rejected",
        code="not_an_image",
        filename="a.png",
        content_type="image/png",
    ),
    Case(
        "unsupported-ico",
        "ICO (not an allowed format)",
        lambda: image_bytes(_picture(32, 32), "ICO"),
        "rejected",
        code="format",
        filename="a.ico",
        content_type="image/x-icon",
    ),
    Case(
        "disallowed-by-setting",
        "BMP with BMP removed from ALLOWED_FORMATS",
        lambda: image_bytes(_picture(), "BMP"),
        "rejected",
        code="format",
        filename="a.bmp",
        content_type="image/bmp",
        settings=(("ALLOWED_FORMATS", ("JPEG", "PNG", "WEBP")),),
    ),
    Case(
        "huge-text-chunk",
        "PNG with a 4 MB tEXt chunk (metadata is not kept)",
        _huge_text_chunk_png,
        "ready",
        size=(48, 32),
        filename="a.png",
        content_type="image/png",
    ),
    Case(
        "ztxt-bomb",
        "PNG with a zTXt chunk inflating to 16 MB",
        _ztxt_bomb_png,
        "rejected",
        code="not_an_image",
        filename="a.png",
        content_type="image/png",
    ),
    Case(
        "truncated-jpeg",
        "JPEG cut in half",
        _truncated("JPEG"),
        "failed",
        message="truncated or corrupt",
    ),
    Case(
        "truncated-png",
        "PNG cut in half",
        _truncated("PNG"),
        "failed",
        message="truncated or corrupt",
        filename="a.png",
        content_type="image/png",
    ),
    Case(
        "lying-png",
        "PNG whose header says 64x64 over 8x8 data",
        _lying_png,
        "failed",
        message="truncated or corrupt",
        filename="a.png",
        content_type="image/png",
    ),
    Case(
        "one-pixel",
        "1x1 PNG",
        lambda: image_bytes(_picture(1, 1), "PNG"),
        "ready",
        size=(1, 1),
        filename="a.png",
        content_type="image/png",
    ),
    Case(
        "hundred-thousand-by-one",
        "100000x1 PNG",
        lambda: image_bytes(Image.new("RGB", (100_000, 1), (200, 30, 30)), "PNG"),
        "ready",
        size=(100_000, 1),
        filename="a.png",
        content_type="image/png",
    ),
    Case("cmyk-jpeg", "CMYK JPEG (print)", _cmyk_jpeg, "ready", size=(48, 32)),
    Case(
        "sixteen-bit-png",
        "16-bit greyscale PNG",
        _sixteen_bit_png,
        "ready",
        size=(48, 32),
        filename="a.png",
        content_type="image/png",
    ),
    Case(
        "palette-transparent",
        "palette PNG with a transparent index",
        _palette_transparent_png,
        "ready",
        size=(48, 32),
        filename="a.png",
        content_type="image/png",
    ),
    Case(
        "la-png",
        "greyscale + alpha PNG",
        lambda: image_bytes(make_test_image(48, 32, mode="LA"), "PNG"),
        "ready",
        size=(48, 32),
        filename="a.png",
        content_type="image/png",
    ),
    Case(
        "rgba-png",
        "RGBA PNG",
        lambda: image_bytes(make_test_image(48, 32, mode="RGBA"), "PNG"),
        "ready",
        size=(48, 32),
        filename="a.png",
        content_type="image/png",
    ),
    Case(
        "animated-gif",
        "animated GIF, 3 frames",
        _animated("GIF"),
        "ready",
        size=(48, 32),
        filename="a.gif",
        content_type="image/gif",
    ),
    Case(
        "animated-webp",
        "animated WebP, 3 frames",
        _animated("WEBP"),
        "ready",
        size=(48, 32),
        filename="a.webp",
        content_type="image/webp",
    ),
    Case(
        "exif-rotated-jpeg",
        "JPEG with EXIF orientation 6",
        _exif_rotated_jpeg,
        "ready",
        size=(32, 48),
    ),
    Case("icc-jpeg", "JPEG with an embedded ICC profile", _icc_jpeg, "ready", size=(48, 32)),
    Case("progressive-jpeg", "progressive JPEG", _progressive_jpeg, "ready", size=(48, 32)),
    Case(
        "multipage-tiff",
        "two-page TIFF",
        _multipage_tiff,
        "ready",
        size=(48, 32),
        filename="a.tif",
        content_type="image/tiff",
    ),
    Case(
        "avif",
        "AVIF",
        lambda: image_bytes(_picture(), "AVIF", quality=60),
        "ready",
        size=(48, 32),
        filename="a.avif",
        content_type="image/avif",
    ),
    Case(
        "png-named-jpg",
        "PNG named .jpg, sent as image/jpeg",
        lambda: image_bytes(_picture(), "PNG"),
        "ready",
        size=(48, 32),
    ),
    Case(
        "jpeg-as-text-plain",
        "JPEG named .png, sent as text/plain",
        lambda: image_bytes(_picture(), "JPEG", quality=90),
        "ready",
        size=(48, 32),
        filename="a.png",
        content_type="text/plain",
    ),
    Case("big-exif", "JPEG with a 60 KB EXIF description", _big_exif_jpeg, "ready", size=(48, 32)),
    Case(
        "jpeg-html-polyglot", "JPEG with HTML appended", _polyglot_jpeg_html, "ready", size=(48, 32)
    ),
)

BY_NAME = {case.name: case for case in CASES}
assert len(BY_NAME) == len(CASES), "case names must be unique"

"""Upload validation (header only) and the RGB policy of latentstore.images."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
import warnings
import zlib

import pytest
from django.core.exceptions import ValidationError
from PIL import Image, ImageCms, ImageFile

from latentstore.images import ImageInfo, inspect_image, open_rgb, to_rgb
from tests.tiny import image_bytes, make_test_image

ALL = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
MAX = 16_777_216
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def inspect(data: bytes, allowed=ALL, max_pixels=MAX) -> ImageInfo:
    return inspect_image(data, allowed_formats=allowed, max_pixels=max_pixels)


def rejection(data: bytes, allowed=ALL, max_pixels=MAX) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        inspect(data, allowed, max_pixels)
    return info.value


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR is patched (CRC fixed) to claim another size."""
    data = bytearray(image_bytes(make_test_image(16, 8), "PNG"))
    assert data[12:16] == b"IHDR"
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def close(a, b, tol=3) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


# --- inspect_image: accepted uploads ---------------------------------------------------------


@pytest.mark.parametrize("fmt", ALL)
def test_inspect_reports_format_and_size(fmt):
    data = image_bytes(make_test_image(37, 21), fmt)
    assert inspect(data) == ImageInfo(format=fmt, width=37, height=21)


def test_inspect_accepts_any_case_in_allowed_formats():
    data = image_bytes(make_test_image(10, 6), "PNG")
    assert inspect(data, allowed=["png"]).format == "PNG"


def test_allowed_format_spellings_and_unknown_names():
    data = image_bytes(make_test_image(10, 6), "JPEG")
    assert inspect(data, allowed=("jpg",)).format == "JPEG"
    assert inspect(image_bytes(make_test_image(10, 6), "TIFF"), allowed=("tif",)).format == "TIFF"
    # A name Pillow has no plugin for must not crash the upload (Pillow raises KeyError).
    assert rejection(data, allowed=("NOPE",)).code == "format"
    assert inspect(data, allowed=("NOPE", "JPEG")).format == "JPEG"
    assert open_rgb(data, allowed_formats=("NOPE", "jpg")).size == (10, 6)


def test_inspect_accepts_bytearray_and_memoryview():
    data = image_bytes(make_test_image(10, 6), "PNG")
    assert inspect(bytearray(data)).width == 10
    assert inspect(memoryview(data)).height == 6


def test_mpo_from_a_phone_camera_counts_as_jpeg():
    img = make_test_image(40, 20)
    data = image_bytes(img, "MPO", save_all=True, append_images=[make_test_image(40, 20, 1)])
    assert Image.open(io.BytesIO(data)).format == "MPO"  # what Pillow calls it
    assert inspect(data, allowed=("JPEG",)) == ImageInfo("JPEG", 40, 20)
    assert rejection(data, allowed=("PNG",)).code == "format"
    assert open_rgb(data, allowed_formats=("JPEG",)).size == (40, 20)


def test_pixel_cap_is_inclusive():
    assert inspect(png_claiming(4096, 4096), max_pixels=4096 * 4096).width == 4096
    assert rejection(png_claiming(4096, 4097), max_pixels=4096 * 4096).code == "too_large_pixels"


def _all_load_methods():
    seen, todo = set(), [ImageFile.ImageFile]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        todo.extend(cls.__subclasses__())
    return [cls for cls in seen if "load" in cls.__dict__]


@pytest.fixture
def no_decoding(monkeypatch):
    """Make any pixel decode fail loudly: inspect_image must not need one."""

    def boom(*args, **kwargs):
        raise AssertionError("inspect_image decoded pixel data")

    Image.init()
    monkeypatch.setattr(Image, "_getdecoder", boom)
    for cls in _all_load_methods():
        monkeypatch.setattr(cls, "load", boom)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(image_bytes(make_test_image(40, 20), fmt), id=fmt)
        for fmt in ALL
        if fmt != "TIFF"
    ]
    + [
        pytest.param(image_bytes(make_test_image(40, 20), "JPEG", exif=_exif(6)), id="jpeg-exif"),
        pytest.param(image_bytes(make_test_image(40, 20), "PNG", exif=_exif(6)), id="png-exif"),
        pytest.param(image_bytes(make_test_image(40, 20), "WEBP", exif=_exif(6)), id="webp-exif"),
        pytest.param(
            image_bytes(make_test_image(40, 20), "TIFF", tiffinfo={0x0112: 6}), id="tiff-exif"
        ),
    ],
)
def test_inspect_never_decodes_pixels(no_decoding, data):
    info = inspect(data)
    assert {info.width, info.height} == {40, 20}


@pytest.mark.parametrize("fmt", ALL)
def test_no_decoding_fixture_does_catch_a_decode(no_decoding, fmt):
    # Guards the guard: if a plugin's load escaped the patch, the test above would prove nothing.
    with pytest.raises(AssertionError, match="decoded pixel data"):
        open_rgb(image_bytes(make_test_image(40, 20), fmt))


def test_inspect_refuses_a_bomb_without_decoding(no_decoding):
    # 10^10 pixels: a decode would need 30 GB. The header alone must refuse it, quickly.
    start = time.perf_counter()
    error = rejection(png_claiming(100_000, 100_000))
    assert time.perf_counter() - start < 0.5
    assert error.code == "too_large_pixels"
    assert "10000000000" in error.messages[0] and "limit" in error.messages[0]


def test_inspect_applies_own_pixel_cap_below_pillows(no_decoding):
    # 25 MP: fine for Pillow (its warning starts at ~89 MP), too many for MAX_PIXELS.
    error = rejection(png_claiming(5000, 5000), max_pixels=MAX)
    assert error.code == "too_large_pixels"
    assert "25000000" in error.messages[0] and str(MAX) in error.messages[0]


def test_inspect_honours_pillows_limit_when_max_pixels_is_higher(no_decoding):
    # 10^8 pixels: above Image.MAX_IMAGE_PIXELS (a DecompressionBombWarning, not an error).
    data = png_claiming(10_000, 10_000)
    with pytest.warns(Image.DecompressionBombWarning):
        assert rejection(data, max_pixels=10**9).code == "too_large_pixels"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning raised as an exception is caught too
        assert rejection(data, max_pixels=10**9).code == "too_large_pixels"


# --- inspect_image: refused uploads ----------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"Hello, this is a plain text file.\n" * 10, id="text"),
        pytest.param(
            b"<!DOCTYPE html><html><head><title>x</title></head><body>hi</body></html>",
            id="html",
        ),
        pytest.param(
            b'<?xml version="1.0" encoding="UTF-8"?>\n'
            b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">'
            b'<rect width="100" height="100" fill="red"/></svg>',
            id="svg",
        ),
        pytest.param(bytes(range(256)) * 4, id="binary-noise"),
        pytest.param(b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n", id="pdf"),
        pytest.param(image_bytes(make_test_image(16, 8), "PNG")[:20], id="png-cut-in-header"),
    ],
)
def test_inspect_refuses_non_images(data):
    error = rejection(data)
    assert error.code == "not_an_image"
    assert "not an image" in error.messages[0]


def test_inspect_refuses_empty():
    error = rejection(b"")
    assert error.code == "empty"
    assert "empty" in error.messages[0]


@pytest.mark.parametrize(
    ("fmt", "allowed"),
    [("BMP", ("JPEG", "PNG")), ("PNG", ("JPEG",)), ("WEBP", ("JPEG", "PNG")), ("ICO", ("PNG",))],
)
def test_inspect_refuses_disallowed_format_by_name(fmt, allowed):
    error = rejection(image_bytes(make_test_image(16, 16), fmt), allowed=allowed)
    assert error.code == "format"
    message = error.messages[0]
    assert fmt in message and "not accepted" in message
    assert all(a in message for a in allowed)


# --- EXIF orientation --------------------------------------------------------------------------


def _marked(width: int = 40, height: int = 20) -> Image.Image:
    """White picture with a red block at the stored top-left corner."""
    img = Image.new("RGB", (width, height), WHITE)
    img.paste(RED, (0, 0, 10, 8))
    return img


# Where the stored top-left corner ends up when displayed (EXIF spec, orientation 1..8).
CORNER_AFTER = {
    1: "top-left",
    2: "top-right",
    3: "bottom-right",
    4: "bottom-left",
    5: "top-left",
    6: "top-right",
    7: "bottom-right",
    8: "bottom-left",
}


def _red_corner(img: Image.Image) -> str:
    w, h = img.size
    corners = {
        "top-left": (2, 2),
        "top-right": (w - 3, 2),
        "bottom-left": (2, h - 3),
        "bottom-right": (w - 3, h - 3),
    }
    red = [name for name, xy in corners.items() if close(img.getpixel(xy), RED, 40)]
    assert len(red) == 1, red
    return red[0]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_jpeg(orientation):
    data = image_bytes(_marked(), "JPEG", quality=95, exif=_exif(orientation))
    info = inspect(data)
    expected = (20, 40) if orientation >= 5 else (40, 20)
    assert (info.width, info.height) == expected
    img = open_rgb(data)
    assert img.size == expected
    assert _red_corner(img) == CORNER_AFTER[orientation]


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_other_formats_agree_with_decode(fmt, orientation):
    if fmt == "TIFF":
        data = image_bytes(_marked(), fmt, tiffinfo={0x0112: orientation})
    else:
        data = image_bytes(_marked(), fmt, exif=_exif(orientation), **_lossless(fmt))
    info = inspect(data)
    img = open_rgb(data)
    assert (info.width, info.height) == img.size == ((20, 40) if orientation > 4 else (40, 20))
    assert _red_corner(img) == CORNER_AFTER[orientation]


def _lossless(fmt):
    return {"lossless": True} if fmt == "WEBP" else {}


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_is_ignored_not_fatal():
    data = image_bytes(_marked(), "JPEG", exif=b"Exif\x00\x00MM\x00*garbage")
    assert (inspect(data).width, inspect(data).height) == (40, 20)
    assert open_rgb(data).size == (40, 20)


# --- to_rgb: the RGB policy --------------------------------------------------------------------

MODES = ["RGB", "RGBA", "LA", "L", "1", "P", "CMYK", "I;16", "I;16B", "I", "F", "YCbCr", "LAB"]


@pytest.mark.parametrize("mode", MODES)
def test_to_rgb_returns_fresh_rgb_of_same_size(mode):
    src = make_test_image(37, 21, mode=mode) if mode != "LAB" else _lab_image()
    out = to_rgb(src)
    assert out.mode == "RGB" and out.size == src.size
    assert out is not src
    assert "icc_profile" not in out.info and "transparency" not in out.info
    lo, hi = zip(*out.getextrema(), strict=True)
    assert max(hi) - min(lo) > 50, "the picture's contrast survived the conversion"


def _lab_image() -> Image.Image:
    lab = ImageCms.createProfile("LAB")
    srgb = ImageCms.createProfile("sRGB")
    return ImageCms.profileToProfile(make_test_image(37, 21), srgb, lab, outputMode="LAB")


def test_lab_goes_through_a_colour_transform():
    red_lab = ImageCms.profileToProfile(
        Image.new("RGB", (4, 4), (200, 30, 40)),
        ImageCms.createProfile("sRGB"),
        ImageCms.createProfile("LAB"),
        outputMode="LAB",
    )
    assert close(to_rgb(red_lab).getpixel((0, 0)), (200, 30, 40), 4)


def test_rgba_is_composited_onto_background():
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((1, 0), (255, 0, 0, 255))  # opaque red
    img.putpixel((2, 0), (255, 0, 0, 128))  # half red
    out = to_rgb(img, background=(0, 0, 255))
    assert out.getpixel((0, 0)) == BLUE
    assert out.getpixel((1, 0)) == RED
    assert close(out.getpixel((2, 0)), (128, 0, 127), 1)
    assert to_rgb(img).getpixel((0, 0)) == WHITE  # the default background


def test_premultiplied_rgba_is_unpremultiplied_first():
    img = Image.new("RGBA", (2, 1))
    img.putpixel((0, 0), (200, 100, 0, 128))
    img.putpixel((1, 0), (10, 20, 30, 255))
    premultiplied = img.convert("RGBa")
    assert close(to_rgb(premultiplied).getpixel((0, 0)), to_rgb(img).getpixel((0, 0)), 2)
    assert to_rgb(premultiplied).getpixel((1, 0)) == (10, 20, 30)


def test_la_is_composited_onto_background():
    img = Image.merge("LA", (Image.new("L", (2, 1), 0), Image.new("L", (2, 1), 0)))
    img.putpixel((1, 0), (0, 255))
    out = to_rgb(img, background=(10, 200, 30))
    assert out.getpixel((0, 0)) == (10, 200, 30)
    assert out.getpixel((1, 0)) == (0, 0, 0)


def _palette_with_transparent_index() -> Image.Image:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0
    return img


def test_palette_with_transparency_is_composited():
    out = to_rgb(_palette_with_transparent_index(), background=(1, 2, 3))
    assert out.getpixel((0, 0)) == (1, 2, 3)  # index 0 (red) is transparent
    assert out.getpixel((1, 0)) == GREEN


def test_transparent_gif_through_open_rgb():
    data = image_bytes(_palette_with_transparent_index(), "GIF", transparency=0)
    out = open_rgb(data, background=(9, 9, 9))
    assert out.getpixel((0, 0)) == (9, 9, 9) and out.getpixel((1, 0)) == GREEN


def test_pa_is_composited():
    pa = _palette_with_transparent_index().convert("PA")
    assert pa.mode == "PA"
    out = to_rgb(pa, background=(1, 2, 3))
    assert out.getpixel((0, 0)) == (1, 2, 3) and out.getpixel((1, 0)) == GREEN


def test_png_trns_colour_key_is_transparent():
    img = Image.new("RGB", (2, 1), RED)
    img.putpixel((1, 0), GREEN)
    data = image_bytes(img, "PNG", transparency=RED)
    assert Image.open(io.BytesIO(data)).mode == "RGB"  # the key is only in info
    out = open_rgb(data, background=(0, 0, 0))
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == GREEN


def test_cmyk_without_profile_is_converted():
    img = Image.new("CMYK", (2, 1), (255, 0, 0, 0))  # pure cyan
    img.putpixel((1, 0), (0, 0, 0, 255))  # black
    out = to_rgb(img)
    assert out.getpixel((0, 0)) == (0, 255, 255) and out.getpixel((1, 0)) == (0, 0, 0)


def test_cmyk_jpeg_through_open_rgb():
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    out = open_rgb(image_bytes(img, "JPEG", quality=95))
    assert out.mode == "RGB"
    assert close(out.getpixel((8, 8)), RED, 10)


def _grey16(values: list[int], mode: str = "I;16") -> Image.Image:
    order = "big" if mode == "I;16B" else "little"
    data = b"".join(v.to_bytes(2, order) for v in values)
    return Image.frombytes(mode, (len(values), 1), data)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_sixteen_bit_is_scaled_not_clipped(mode):
    out = to_rgb(_grey16([0, 257, 32768, 65535], mode))
    assert [out.getpixel((x, 0)) for x in range(4)] == [
        (0, 0, 0),
        (1, 1, 1),
        (128, 128, 128),  # clipping would give 255
        (255, 255, 255),
    ]


def test_sixteen_bit_png_through_open_rgb():
    data = image_bytes(_grey16([0, 16384, 32768, 65535]), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = open_rgb(data)
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 64, 128, 255]


def _int_image(values: list[int]) -> Image.Image:
    img = Image.new("I", (len(values), 1))
    for x, v in enumerate(values):
        img.putpixel((x, 0), v)
    return img


def test_int32_policy():
    grey = [to_rgb(_int_image([0, 100, 255])).getpixel((x, 0))[0] for x in range(3)]
    assert grey == [0, 100, 255]  # 8-bit values in an int container: kept
    grey = [to_rgb(_int_image([0, 32768, 65535])).getpixel((x, 0))[0] for x in range(3)]
    assert grey == [0, 128, 255]  # 16-bit range: scaled
    grey = [to_rgb(_int_image([-1000, 0, 1000])).getpixel((x, 0))[0] for x in range(3)]
    assert grey == [0, 128, 255]  # anything else: stretched min..max


def _float_image(values: list[float]) -> Image.Image:
    img = Image.new("F", (len(values), 1))
    for x, v in enumerate(values):
        img.putpixel((x, 0), v)
    return img


def test_float_policy():
    grey = [to_rgb(_float_image([0.0, 0.5, 1.0])).getpixel((x, 0))[0] for x in range(3)]
    assert grey == [0, 128, 255]  # 0..1 floats scaled by 255
    grey = [to_rgb(_float_image([0.0, 100.0, 200.0])).getpixel((x, 0))[0] for x in range(3)]
    assert grey == [0, 100, 200]


def test_grey_and_bilevel_become_three_equal_channels():
    grey = Image.new("L", (2, 1), 77)
    assert to_rgb(grey).getpixel((0, 0)) == (77, 77, 77)
    bilevel = Image.new("1", (2, 1), 1)
    assert to_rgb(bilevel).getpixel((0, 0)) == WHITE


# ICC: a profile whose red and green primaries are swapped relative to sRGB. A red pixel tagged
# with it *is* sRGB green, so a converted image must come out green; a plain convert stays red.


def _swapped_primaries_profile() -> bytes:
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    (count,) = struct.unpack_from(">I", data, 128)
    entries = {}
    for i in range(count):
        sig, offset, size = struct.unpack_from(">4sII", data, 132 + 12 * i)
        entries[sig] = (i, offset, size)
    (ir, offr, sizer), (ig, offg, sizeg) = entries[b"rXYZ"], entries[b"gXYZ"]
    struct.pack_into(">4sII", data, 132 + 12 * ir, b"rXYZ", offg, sizeg)
    struct.pack_into(">4sII", data, 132 + 12 * ig, b"gXYZ", offr, sizer)
    return bytes(data)


def test_icc_profile_is_converted_to_srgb():
    img = Image.new("RGB", (4, 4), RED)
    img.info["icc_profile"] = _swapped_primaries_profile()
    out = to_rgb(img)
    assert close(out.getpixel((0, 0)), GREEN, 2)
    assert "icc_profile" not in out.info


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_icc_profile_through_open_rgb(fmt):
    icc = _swapped_primaries_profile()
    data = image_bytes(Image.new("RGB", (16, 16), RED), fmt, icc_profile=icc, quality=95)
    assert close(open_rgb(data).getpixel((8, 8)), GREEN, 12)


def test_icc_profile_with_alpha_converts_colour_and_keeps_alpha():
    img = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    img.putpixel((1, 0), (255, 0, 0, 0))
    img.info["icc_profile"] = _swapped_primaries_profile()
    out = to_rgb(img, background=(0, 0, 255))
    assert close(out.getpixel((0, 0)), GREEN, 2)
    assert out.getpixel((1, 0)) == BLUE


@pytest.mark.parametrize(
    "profile",
    [b"not an icc profile at all" * 4, b"", None],
    ids=["garbage", "empty", "none"],
)
def test_broken_icc_profile_falls_back_silently(profile):
    img = Image.new("RGB", (4, 4), (200, 100, 50))
    img.info["icc_profile"] = profile
    assert to_rgb(img).getpixel((0, 0)) == (200, 100, 50)


def test_mismatched_icc_profile_falls_back_silently():
    img = Image.new("L", (4, 4), 90)  # an RGB profile on a grey image cannot be applied
    img.info["icc_profile"] = _swapped_primaries_profile()
    assert to_rgb(img).getpixel((0, 0)) == (90, 90, 90)


# --- animations --------------------------------------------------------------------------------


def _animation(fmt: str) -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE, GREEN)]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    return image_bytes(frames[0], fmt, save_all=True, append_images=frames[1:], **extra)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animation_uses_first_frame(fmt):
    data = _animation(fmt)
    img = Image.open(io.BytesIO(data))
    assert img.is_animated and img.n_frames == 3
    assert close(open_rgb(data).getpixel((4, 4)), RED, 2)
    img.seek(2)  # somebody left the image on its last frame
    assert close(to_rgb(img).getpixel((4, 4)), RED, 2)


# --- open_rgb: decode errors ---------------------------------------------------------------------


def test_open_rgb_truncated_jpeg_is_a_clear_value_error():
    data = image_bytes(make_test_image(256, 256), "JPEG", quality=90)
    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        open_rgb(data[: len(data) * 6 // 10])
    assert "JPEG" in str(info.value)


def test_open_rgb_truncated_png_is_a_clear_value_error():
    data = image_bytes(make_test_image(128, 128), "PNG")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        open_rgb(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"just some text\n" * 5, "not an image"),
        (png_claiming(100_000, 100_000), "decompression-bomb limit"),
    ],
)
def test_open_rgb_refuses_bad_input(data, match):
    with pytest.raises(ValueError, match=match):
        open_rgb(data)


def test_open_rgb_optional_limits():
    data = image_bytes(make_test_image(40, 20), "PNG")
    with pytest.raises(ValueError, match="above the limit of 100"):
        open_rgb(data, max_pixels=100)
    with pytest.raises(ValueError, match="allowed: JPEG"):
        open_rgb(data, allowed_formats=("JPEG",))
    assert open_rgb(data, allowed_formats=("PNG",), max_pixels=800).size == (40, 20)


def test_open_rgb_pixels_match_the_source():
    img = make_test_image(37, 21)
    assert open_rgb(image_bytes(img, "PNG")).tobytes() == img.tobytes()


def test_web_tier_import_pulls_in_no_torch_or_numpy():
    code = (
        "import sys, latentstore.images; "
        "bad = [m for m in ('torch', 'numpy', 'diffusers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

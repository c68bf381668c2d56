"""The training and held-out images: sample pictures that ship inside PyPI packages, and text.

Sources (all installed by the ``train`` extra, none downloaded):

- scikit-image's bundled ``skimage/data`` directory (photos, greyscale scenes, textures, scans);
- scikit-learn's ``load_sample_images()`` files (``china.jpg``, ``flower.jpg``);
- matplotlib's ``mpl-data/sample_data`` (``grace_hopper.jpg``, logos);
- text rendered with Pillow in matplotlib's bundled DejaVu fonts, at several sizes.

:data:`HELD_OUT` names whole photos that training never sees (one or more from each package);
quality is measured on them. Everything is addressed as ``"package:file"`` so the model card
can say exactly which files were used.
"""

from __future__ import annotations

import importlib.util
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "HELD_OUT",
    "TRAIN_IMAGES",
    "CropSampler",
    "held_out_images",
    "load_image",
    "render_text",
]

#: Whole photos never used for training: the held-out set for PSNR/SSIM.
HELD_OUT: tuple[str, ...] = (
    "skimage:chelsea.png",
    "skimage:rocket.jpg",
    "sklearn:flower.jpg",
    "matplotlib:grace_hopper.jpg",
)

#: Training pictures. Greyscale ones are used as grey RGB; transparent ones go onto white.
TRAIN_IMAGES: tuple[str, ...] = (
    # colour photos and micrographs
    "skimage:astronaut.png",
    "skimage:coffee.png",
    "skimage:motorcycle_left.png",
    "skimage:motorcycle_right.png",
    "skimage:hubble_deep_field.jpg",
    "skimage:ihc.png",
    "skimage:retina.jpg",
    "sklearn:china.jpg",
    # greyscale scenes, textures and scans
    "skimage:camera.png",
    "skimage:brick.png",
    "skimage:coins.png",
    "skimage:moon.png",
    "skimage:clock_motion.png",
    "skimage:cell.png",
    "skimage:page.png",
    "skimage:text.png",
    # graphics: flat colours and hard edges
    "skimage:color.png",
    "skimage:logo.png",
    "skimage:phantom.png",
    "matplotlib:logo2.png",
)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"{package} is not installed; the training images come from it "
            "(pip install -e '.[train]')"
        )
    return Path(spec.origin).parent


_DATA_DIRS = {
    "skimage": ("skimage", "data"),
    "sklearn": ("sklearn", "datasets/images"),
    "matplotlib": ("matplotlib", "mpl-data/sample_data"),
}


def image_path(name: str) -> Path:
    """The file behind ``"package:file"`` (e.g. ``"skimage:astronaut.png"``)."""
    source, _, filename = name.partition(":")
    try:
        package, subdir = _DATA_DIRS[source]
    except KeyError:
        raise ValueError(f"unknown image source {source!r} in {name!r}") from None
    return _package_dir(package) / subdir / filename


def load_image(name: str) -> Image.Image:
    """Load ``"package:file"`` as RGB; transparency is composited onto white."""
    with Image.open(image_path(name)) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "P"):
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")


def held_out_images() -> list[tuple[str, Image.Image]]:
    """The held-out photos at their native size, as ``(name, RGB image)``."""
    return [(name, load_image(name)) for name in HELD_OUT]


# --- text -------------------------------------------------------------------------------------

_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
)
_ALPHABET = string.ascii_letters + string.digits + ".,;:!?()-'\"&%$#@/"


def _font_path(filename: str) -> Path:
    return _package_dir("matplotlib") / "mpl-data" / "fonts" / "ttf" / filename


def _words(rng: random.Random, count: int) -> str:
    # Random letters in word-like runs: real glyph shapes and spacing, no corpus to ship.
    return " ".join(
        "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 9))) for _ in range(count)
    )


def render_text(
    width: int,
    height: int,
    rng: random.Random,
    sizes: Sequence[int] = (7, 9, 11, 13, 16, 20, 26, 34),
    background: Image.Image | None = None,
) -> Image.Image:
    """Lines of text in a random DejaVu font, size and colour over a plain or photo background."""
    if background is None:
        light = rng.random() < 0.7
        base = rng.randint(200, 255) if light else rng.randint(0, 60)
        tint = [min(255, max(0, base + rng.randint(-25, 25))) for _ in range(3)]
        img = Image.new("RGB", (width, height), tuple(tint))
    else:
        img = background.copy()
        light = float(np.asarray(img.convert("L")).mean()) > 110
    draw = ImageDraw.Draw(img)
    size = rng.choice(sizes)
    font = ImageFont.truetype(str(_font_path(rng.choice(_FONTS))), size)
    ink = rng.randint(0, 70) if light else rng.randint(190, 255)
    colour = tuple(min(255, max(0, ink + rng.randint(-40, 40))) for _ in range(3))
    y = rng.randint(-size // 2, size // 2)
    while y < height:
        x = rng.randint(-size * 3, size // 2)
        draw.text((x, y), _words(rng, max(2, 2 * width // max(size, 1))), font=font, fill=colour)
        y += int(size * rng.uniform(1.1, 1.6))
    return img


# --- training crops ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    name: str
    pixels: np.ndarray  # uint8 (H, W, 3)


def _weight(pixels: np.ndarray) -> float:
    h, w, _ = pixels.shape
    sample = pixels[::8, ::8].astype(np.int16)
    colour = np.abs(sample - sample.mean(axis=2, keepdims=True)).mean() > 2.0
    return (h * w) ** 0.5 * (2.0 if colour else 1.0)


class CropSampler:
    """Random training crops: pictures at several scales (crops, flips, transposes) and text.

    Deterministic for a given ``seed``. A picture is picked with a weight of the square root of
    its area (a big photo holds more distinct crops than a small one, but should not drown the
    rest: the 1411x1411 retina scan is mostly smooth orange), doubled for colour pictures, which
    are fewer than the greyscale ones.
    """

    def __init__(
        self,
        crop: int,
        *,
        seed: int,
        names: Sequence[str] = TRAIN_IMAGES,
        scales: Sequence[float] = (1.0, 0.7, 0.45),
        text_fraction: float = 0.15,
    ) -> None:
        leaked = set(names) & set(HELD_OUT)
        if leaked:
            raise ValueError(f"held-out images in the training set: {sorted(leaked)}")
        self.crop = crop
        self.text_fraction = text_fraction
        self.rng = random.Random(seed)
        self.sources: list[_Source] = []
        for name in names:
            picture = load_image(name)
            for scale in scales:
                w, h = round(picture.width * scale), round(picture.height * scale)
                if min(w, h) < crop:
                    continue
                scaled = picture if scale == 1.0 else picture.resize((w, h), Image.LANCZOS)
                self.sources.append(_Source(f"{name}@{scale}", np.asarray(scaled)))
        if not self.sources:
            raise ValueError(f"no training picture is at least {crop}x{crop} pixels")
        weights = np.array([_weight(s.pixels) for s in self.sources])
        self.weights = list(weights / weights.sum())

    def _picture_crop(self) -> np.ndarray:
        (source,) = self.rng.choices(self.sources, weights=self.weights)
        h, w, _ = source.pixels.shape
        top, left = self.rng.randint(0, h - self.crop), self.rng.randint(0, w - self.crop)
        patch = source.pixels[top : top + self.crop, left : left + self.crop]
        if self.rng.random() < 0.5:
            patch = patch[:, ::-1]
        if self.rng.random() < 0.25:
            patch = patch.transpose(1, 0, 2)
        return patch

    def _text_crop(self) -> np.ndarray:
        background = None
        if self.rng.random() < 0.25:  # captions over photos, not only on paper
            background = Image.fromarray(np.ascontiguousarray(self._picture_crop()))
        return np.asarray(render_text(self.crop, self.crop, self.rng, background=background))

    def batch(self, size: int) -> np.ndarray:
        """``size`` crops as uint8 ``(N, crop, crop, 3)``."""
        crops = [
            self._text_crop() if self.rng.random() < self.text_fraction else self._picture_crop()
            for _ in range(size)
        ]
        return np.stack(crops)

"""Instant latent -> RGB previews: a per-family linear projection, no model, no torch.

Each family has a ``channels x 3`` matrix and a bias (see :mod:`latentstore.families`) fitted
so that ``model_space_latents @ factors + bias`` approximates the decoded image in [-1, 1] at
latent resolution. It is blurry and slightly off in colour, but costs well under a millisecond,
so it serves as a placeholder while the real decode is pending.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from latentstore.families import Family, get_family

__all__ = ["latents_to_rgb"]


def latents_to_rgb(
    latents: np.ndarray,
    family: str,
    scaling_factor: float,
    shift_factor: float,
    size: tuple[int, int],
) -> Image.Image:
    """Project raw latents ``(C, h, w)`` to an RGB image, resized to ``size = (width, height)``.

    ``latents`` are raw (``latent_dist.mean``, as stored); ``scaling_factor``/``shift_factor``
    are the ones recorded with them, which map raw latents to the model space the family's
    RGB factors expect: ``(raw - shift_factor) * scaling_factor``. Values in [-1, 1] map to
    [0, 255] and are clipped outside it. The projection is computed at latent resolution and
    resized with bilinear filtering. Raises :class:`ValueError` for a shape or channel count
    that does not fit the family, and :class:`latentstore.families.UnknownFamily` for an
    unknown family.
    """
    fam = get_family(family)
    arr = np.asarray(latents)
    if arr.ndim != 3:
        raise ValueError(f"latents must be 3-D (C, h, w), got shape {arr.shape}")
    c, h, w = arr.shape
    if c != fam.channels:
        raise ValueError(
            f"latents have {c} channels but family {fam.name!r} has {fam.channels}; "
            "they were not written by an autoencoder of this family"
        )
    if h == 0 or w == 0:
        raise ValueError(f"latents must not be empty, got shape {arr.shape}")
    if arr.dtype.kind != "f":
        raise ValueError(f"latents must be a floating-point array, got dtype {arr.dtype}")
    out_w, out_h = _check_size(size)

    weight, bias = _affine(fam, float(scaling_factor), float(shift_factor))
    # (h*w, C) @ (C, 3): one BLAS call yields pixels already in the interleaved RGB order that
    # PIL wants; the transposed view needs no copy when the input is float32.
    pixels = arr.reshape(c, h * w).astype(np.float32, copy=False).T @ weight
    pixels += bias
    # NaN or inf would become arbitrary bytes; stored latents never hold them (the codec checks).
    if not np.isfinite(pixels).all():
        raise ValueError("latents contain NaN or infinity")
    np.clip(pixels, 0.0, 255.0, out=pixels)
    rgb = pixels.astype(np.uint8)  # truncation; the +0.5 folded into the bias makes it round
    image = Image.frombuffer("RGB", (w, h), rgb, "raw", "RGB", 0, 1)
    if (out_w, out_h) == (w, h):
        return image.copy()  # detach from the numpy buffer
    return image.resize((out_w, out_h), Image.Resampling.BILINEAR)


@functools.lru_cache(maxsize=64)
def _affine(fam: Family, scaling: float, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Fold scaling, shift, projection, bias and the [-1, 1] -> [0, 255] map into one affine map.

    byte = 127.5 * (((raw - shift) * scaling) @ F + b) + 127.5 + 0.5
         = raw @ (127.5 * scaling * F) + (127.5 * (b - shift * scaling * F.sum(0)) + 128)
    The arrays are read-only: they are shared between calls.
    """
    factors = np.asarray(fam.rgb_factors, dtype=np.float64)  # (C, 3)
    weight = 127.5 * scaling * factors
    bias = 127.5 * (np.asarray(fam.rgb_bias) - shift * scaling * factors.sum(axis=0)) + 128.0
    weight = weight.astype(np.float32)
    bias = bias.astype(np.float32)
    weight.flags.writeable = False
    bias.flags.writeable = False
    return weight, bias


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    try:
        out_w, out_h = size
    except (TypeError, ValueError):
        raise ValueError(f"size must be a (width, height) pair, got {size!r}") from None
    for value in (out_w, out_h):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"size must be two positive integers, got {size!r}")
    return int(out_w), int(out_h)

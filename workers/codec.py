"""Batched encode (RGB images -> raw latents) and decode (raw latents -> RGB image).

Latents here are *raw*: the autoencoder's ``latent_dist.mean`` (deterministic, no sampling),
not multiplied by ``scaling_factor`` nor shifted. That is what the decoder takes back, and the
blob header records scaling/shift for anyone who needs model-space latents.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from workers.autoencoders import LoadedAutoencoder
from workers.images import to_pil, to_tensor

__all__ = ["NonFiniteImage", "NonFiniteLatents", "decode_latents", "encode_images"]


class NonFiniteLatents(ValueError):
    """The encoder produced NaN or infinity for some images (``indices`` says which).

    ``results`` holds the finite latents of the other images (``None`` at the bad indices), so a
    caller can keep the good part of a batch. Float16 overflow is the usual cause: try
    ``DTYPE: "float32"``.
    """

    def __init__(self, indices: Sequence[int], results: list[np.ndarray | None]) -> None:
        self.indices = list(indices)
        self.results = results
        which = ", ".join(str(i) for i in self.indices)
        noun = "image" if len(self.indices) == 1 else "images"
        super().__init__(
            f"The autoencoder produced non-finite latents (NaN or inf) for {noun} {which} "
            f"of {len(results)}; float16 overflow is the usual cause (try DTYPE float32)."
        )


class NonFiniteImage(ValueError):
    """The decoder produced NaN or infinity (usually float16 overflow)."""


def encode_images(
    ae: LoadedAutoencoder, images: Sequence[Image.Image], *, max_batch: int | None = None
) -> list[np.ndarray]:
    """Encode RGB images to raw latents: one float32 ``(C, ceil(H/d), ceil(W/d))`` array each.

    Images of the same size are stacked into one batch (at most ``max_batch`` per forward pass
    when given), so a list of same-size photos costs one call. Results come back in input order.
    Deterministic: the distribution's mean, under ``torch.inference_mode``.

    Raises :class:`NonFiniteLatents` naming the input indices whose latents are not finite, and
    ``ValueError`` for a non-RGB image.
    """
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be positive, not {max_batch}")
    groups: dict[tuple[int, int], list[int]] = {}
    for index, img in enumerate(images):
        groups.setdefault(img.size, []).append(index)

    results: list[np.ndarray | None] = [None] * len(images)
    bad: list[int] = []
    step = max_batch or len(images) or 1
    for indices in groups.values():
        for start in range(0, len(indices), step):
            chunk = indices[start : start + step]
            x = torch.cat([to_tensor(images[i], ae.downsample)[0] for i in chunk])
            with torch.inference_mode():
                x = x.to(device=ae.device, dtype=ae.dtype)
                mean = ae.model.encode(x).latent_dist.mean
                finite = torch.isfinite(mean).flatten(1).all(dim=1).cpu().tolist()
                mean = mean.to("cpu", torch.float32).numpy()
            for row, (i, ok) in enumerate(zip(chunk, finite, strict=True)):
                if ok:
                    results[i] = mean[row].copy()  # own memory: not a view into the batch
                else:
                    bad.append(i)
    if bad:
        raise NonFiniteLatents(sorted(bad), results)
    return results  # type: ignore[return-value]  # no None left when nothing was bad


def decode_latents(
    ae: LoadedAutoencoder, latents: np.ndarray, width: int, height: int
) -> Image.Image:
    """Decode raw latents ``(C, h, w)`` to an RGB image of exactly ``width x height``.

    The decoder returns the padded grid (``w * d`` by ``h * d`` pixels); the right/bottom padding
    added at encode time is cropped off. Raises ``ValueError`` for latents of the wrong shape or
    with non-finite values, and :class:`NonFiniteImage` if the decoder's output is not finite.
    """
    arr = np.asarray(latents)
    if arr.ndim != 3:
        raise ValueError(f"expected latents of shape (C, h, w), got {arr.shape}")
    channels, h, w = arr.shape
    if channels != ae.latent_channels:
        raise ValueError(
            f"latents have {channels} channels; autoencoder {ae.alias!r} expects "
            f"{ae.latent_channels}"
        )
    d = ae.downsample
    if not (1 <= width <= w * d and 1 <= height <= h * d):
        raise ValueError(
            f"cannot decode a {width}x{height} image from a {w}x{h} latent grid "
            f"(at most {w * d}x{h * d} pixels)"
        )
    # A copy: stored latents are read-only arrays, and torch wants writable memory.
    z = torch.from_numpy(np.array(arr, dtype=np.float32, order="C", copy=True)).unsqueeze(0)
    if not bool(torch.isfinite(z).all()):
        raise ValueError("latents contain NaN or infinity")
    with torch.inference_mode():
        sample = ae.model.decode(z.to(device=ae.device, dtype=ae.dtype)).sample
        if not bool(torch.isfinite(sample).all()):
            raise NonFiniteImage(
                f"Autoencoder {ae.alias!r} decoded to NaN or infinity "
                f"(float16 overflow is the usual cause; try DTYPE float32)"
            )
        return to_pil(sample[0], width, height)

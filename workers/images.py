"""PIL images to autoencoder input tensors and back: [-1, 1] range, padding to the latent grid.

An autoencoder that downsamples by ``d`` needs height and width divisible by ``d``. Images are
padded on the right and bottom by replicating the edge pixels (a flat border would put a false
edge into the latents next to the picture) and the padding is cropped off again after decoding.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["padding_for", "to_pil", "to_tensor", "to_uint8"]


def padding_for(width: int, height: int, downsample: int) -> tuple[int, int]:
    """Pixels to add on the right and bottom so both sides are multiples of ``downsample``."""
    if downsample < 1:
        raise ValueError(f"downsample must be positive, not {downsample}")
    return (-width) % downsample, (-height) % downsample


def to_tensor(img: Image.Image, downsample: int) -> tuple[torch.Tensor, int, int]:
    """Return ``(x, pad_right, pad_bottom)``: ``x`` is float32 ``(1, 3, H', W')`` in [-1, 1].

    ``img`` must already be RGB (``latentstore.images.to_rgb`` applies the RGB policy); anything
    else is refused rather than converted here, so the policy lives in one place.
    """
    if img.mode != "RGB":
        raise ValueError(
            f"expected an RGB image, got mode {img.mode!r} (use latentstore.images.to_rgb)"
        )
    width, height = img.size
    pad_right, pad_bottom = padding_for(width, height, downsample)
    # np.array copies: torch.from_numpy on Pillow's read-only buffer would warn.
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)
    x = x.to(torch.float32).div_(127.5).sub_(1.0)
    if pad_right or pad_bottom:
        x = F.pad(x, (0, pad_right, 0, pad_bottom), mode="replicate")
    return x, pad_right, pad_bottom


def to_pil(x: torch.Tensor, width: int, height: int) -> Image.Image:
    """Turn a ``(3, H', W')`` (or ``(1, 3, H', W')``) tensor in [-1, 1] into an RGB image.

    The top-left ``width x height`` pixels are kept: the padding :func:`to_tensor` added is
    cropped, not resized away. Values outside [-1, 1] are clipped.
    """
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(x.shape)}")
    if width < 1 or height < 1 or width > x.shape[2] or height > x.shape[1]:
        raise ValueError(
            f"cannot crop {width}x{height} from a {x.shape[2]}x{x.shape[1]} decoded image"
        )
    pixels = to_uint8(x[:, :height, :width].detach()).permute(1, 2, 0).contiguous().to("cpu")
    return Image.fromarray(pixels.numpy())  # uint8 HxWx3: RGB


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] as 8-bit pixel values (clipped, rounded half to even).

    Computed where the tensor is: from a GPU, one copy of uint8 pixels is a quarter of the
    bytes of float32 ones.
    """
    return x.to(torch.float32).clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)

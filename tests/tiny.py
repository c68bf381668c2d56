"""Test helpers: tiny *real* autoencoders saved to disk, and synthetic pictures.

The autoencoder is diffusers' own ``AutoencoderKL`` with a tiny config (a few thousand
parameters) that still has four blocks, so it downsamples 8x like the real SD VAE; it is seeded,
saved with ``save_pretrained(..., safe_serialization=True)`` and loaded back through the same
``PRETRAINED`` path production uses. Its weights are random: latents and decodes have the right
shapes and determinism, not pretty pictures.
"""

from __future__ import annotations

import io
import pathlib
import random
import sys
from typing import Any

from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "image_bytes",
    "make_test_image",
    "save_tiny_autoencoder",
    "save_tiny_consistency_decoder",
    "save_tiny_taesd",
    "tiny_autoencoder_config",
]


def tiny_autoencoder_config(
    *,
    latent_channels: int = 4,
    scaling_factor: float = 0.18215,
    shift_factor: float | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """The keyword arguments of the tiny ``AutoencoderKL`` (8x downsampling, 8 channels wide)."""
    config: dict[str, Any] = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (8, 8, 8, 8),
        "layers_per_block": 1,
        # Two channels per group, as every real VAE has several: with one channel per group,
        # GroupNorm refuses the 1x1 activations of images of 8 px or less.
        "norm_num_groups": 4,
        "latent_channels": latent_channels,
        "sample_size": 32,
        "scaling_factor": scaling_factor,
        "shift_factor": shift_factor,
    }
    config.update(overrides)
    return config


def save_tiny_autoencoder(
    path: str | pathlib.Path,
    *,
    seed: int = 0,
    latent_channels: int = 4,
    scaling_factor: float = 0.18215,
    shift_factor: float | None = None,
    **overrides: Any,
) -> pathlib.Path:
    """Build a seeded tiny ``AutoencoderKL``, ``save_pretrained`` it (safetensors) to ``path``.

    ``overrides`` go to the ``AutoencoderKL`` constructor, e.g. the SD3-style
    ``latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
    scaling_factor=1.5305, shift_factor=0.0609``. Returns ``path``.
    """
    import torch
    from diffusers import AutoencoderKL

    path = pathlib.Path(path)
    config = tiny_autoencoder_config(
        latent_channels=latent_channels,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        **overrides,
    )
    torch.manual_seed(seed)
    model = AutoencoderKL(**config)
    model.save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_taesd(
    path: str | pathlib.Path, *, seed: int = 0, latent_channels: int = 4
) -> pathlib.Path:
    """A seeded tiny ``AutoencoderTiny`` (TAESD's class; 8x, four blocks of 8 channels), saved.

    Like the real TAESD it upsamples three times by 2 and reads model-space latents.
    """
    import torch
    from diffusers import AutoencoderTiny

    path = pathlib.Path(path)
    torch.manual_seed(seed)
    model = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=latent_channels,
    )
    model.save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_consistency_decoder(path: str | pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """A seeded tiny ``ConsistencyDecoderVAE``, saved with safetensors.

    diffusers' own test config (a 2-level UNet of 2 and 4 channels, groups of 2, 7 input and 6
    output channels), except that the encoder has four blocks: the decoder upsamples by
    ``2 ** (len(encoder blocks) - 1)``, and SD latents are 8x.
    """
    import torch
    from diffusers import ConsistencyDecoderVAE

    path = pathlib.Path(path)
    torch.manual_seed(seed)
    model = ConsistencyDecoderVAE(
        encoder_block_out_channels=(2, 4, 4, 4),
        encoder_in_channels=3,
        encoder_out_channels=4,
        encoder_down_block_types=("DownEncoderBlock2D",) * 4,
        encoder_norm_num_groups=2,
        decoder_add_attention=False,
        decoder_block_out_channels=(2, 4),
        decoder_down_block_types=("ResnetDownsampleBlock2D",) * 2,
        decoder_up_block_types=("ResnetUpsampleBlock2D",) * 2,
        decoder_downsample_padding=1,
        decoder_in_channels=7,
        decoder_out_channels=6,
        decoder_layers_per_block=1,
        decoder_norm_eps=1e-05,
        decoder_norm_num_groups=2,
        decoder_num_train_timesteps=1024,
        decoder_resnet_time_scale_shift="scale_shift",
        decoder_time_embedding_type="learned",
        latent_channels=4,
        scaling_factor=0.18215,
    )
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_test_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A smooth, non-trivial synthetic picture: colour gradients, a disc, a bar and a ring.

    Different seeds give different colours and positions. ``mode`` is any Pillow mode the RGB
    picture converts to (``RGBA`` and ``LA`` get a horizontal alpha ramp; ``I;16`` a full 16-bit
    range; ``I`` and ``F`` the 8-bit values).
    """
    rng = random.Random(seed)
    # Gradients: each channel a different ramp (horizontal, vertical, diagonal).
    gx = Image.linear_gradient("L").rotate(90).resize((width, height), Image.Resampling.BILINEAR)
    gy = Image.linear_gradient("L").resize((width, height), Image.Resampling.BILINEAR)
    gr = Image.radial_gradient("L").resize((width, height), Image.Resampling.BILINEAR)
    channels = [gx, gy, gr]
    rng.shuffle(channels)
    img = Image.merge("RGB", channels)

    draw = ImageDraw.Draw(img)
    size = min(width, height)

    def colour() -> tuple[int, int, int]:
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

    cx, cy = rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height
    r = max(1.0, size * rng.uniform(0.15, 0.3))
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour())
    bar = max(1, round(size * 0.12))
    y0 = rng.randrange(max(1, height - bar))
    draw.rectangle((0, y0, width - 1, y0 + bar), fill=colour())
    cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
    r = max(2.0, size * rng.uniform(0.2, 0.35))
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour(), width=max(1, bar // 2))
    # Soften the shape edges: a natural picture has few pixel-sharp steps.
    img = img.filter(ImageFilter.GaussianBlur(radius=max(0.5, size / 64)))
    return _to_mode(img, mode)


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    if mode == "RGB":
        return img
    width, height = img.size
    ramp = Image.linear_gradient("L").rotate(90).resize((width, height))
    if mode == "RGBA":
        out = img.copy()
        out.putalpha(ramp)
        return out
    if mode == "LA":
        out = img.convert("L")
        return Image.merge("LA", (out, ramp))
    if mode.startswith("I;16"):
        # Spread 8-bit grey over the full 16-bit range (v * 257), as a real 16-bit scan would be.
        grey = img.convert("L").convert("I").point(lambda v: v * 257)
        return _i_to_i16(grey, mode)
    if mode in ("I", "F"):
        return img.convert("L").convert(mode)
    if mode == "P":
        return img.quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    return img.convert(mode)


def _i_to_i16(img: Image.Image, mode: str) -> Image.Image:
    # Pillow's convert() from I to the 16-bit modes clips to 8 bits; build the bytes instead.
    order = {"I;16B": "big", "I;16N": sys.byteorder}.get(mode, "little")
    data = b"".join(int(v).to_bytes(2, order) for v in img.get_flattened_data())
    return Image.frombytes(mode, img.size, data)


def image_bytes(img: Image.Image, format: str = "PNG", **save_kwargs: Any) -> bytes:
    """``img`` saved to bytes in ``format`` (``save_kwargs`` go to ``Image.save``)."""
    buf = io.BytesIO()
    img.save(buf, format=format, **save_kwargs)
    return buf.getvalue()


def save_overflowing_autoencoder(
    path: str | pathlib.Path, *, seed: int = 0, scale: float = 1e6
) -> pathlib.Path:
    """A tiny ``AutoencoderKL`` whose first convolutions are scaled by ``scale``, saved to ``path``.

    In float32 the GroupNorm after them brings the activations back to order one, so encode
    and decode are finite; in float16 they exceed its range (65504) and the outputs turn into
    NaN, as the SDXL VAE's do. The weights are real, on disk, loaded by the production path.
    """
    import torch
    from diffusers import AutoencoderKL

    path = pathlib.Path(path)
    torch.manual_seed(seed)
    model = AutoencoderKL(**tiny_autoencoder_config())
    with torch.no_grad():
        for conv in (model.encoder.conv_in, model.decoder.conv_in):
            conv.weight.mul_(scale)
            conv.bias.mul_(scale)
    model.save_pretrained(path, safe_serialization=True)
    return path

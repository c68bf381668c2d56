"""The encode-time quality gate: decode what was just stored and measure it against the input.

The worker calls :func:`round_trip_psnrs` for a batch's fresh blobs when the field's
:class:`latentstore.quality.QualityPolicy` asks for it: each blob is unpacked (so the storage
dtype's rounding counts), decoded by the same autoencoder (batched), cropped to the picture's
size and compared with the preprocessed input (the RGB picture the encoder saw, after EXIF and
the RGB policy) by PSNR; the policy then says what is low-fidelity. :func:`measure_round_trip`
is the same measurement for a bare ``AutoencoderKL`` (training, the quality report, tests).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from latentstore.latents import unpack
from latentstore.quality import psnr
from latentstore_workers.autoencoders import LoadedAutoencoder, _latent_factors
from latentstore_workers.batching import NonFinite
from latentstore_workers.codec import decode_latents, decode_outcomes, encode_images

__all__ = [
    "RoundTrip",
    "measure_round_trip",
    "measure_round_trips",
    "round_trip_psnrs",
    "wrap",
]

logger = logging.getLogger("latentstore_workers.quality")


def round_trip_psnrs(
    ae: LoadedAutoencoder, pictures: Sequence[Image.Image], blobs: Sequence[bytes]
) -> list[float | Exception]:
    """PSNR (dB) of each picture against the decode of its blob, decoded in batches.

    A decoder that overflows to NaN/inf (float32 too) counts as 0 dB: the stored latents cannot
    be shown faithfully by this model, which is exactly what the gate is there to flag. Any
    other failure of an item is returned in its place.
    """
    items = []
    for blob in blobs:
        header, latents = unpack(blob)
        items.append((latents, header.width, header.height))
    results: list[float | Exception] = []
    for picture, outcome in zip(pictures, decode_outcomes(ae, items), strict=True):
        if isinstance(outcome.error, NonFinite):
            logger.warning("Round-trip decode of a fresh encode was not finite: %s", outcome.error)
            results.append(0.0)
        elif outcome.error is not None:
            results.append(outcome.error)
        else:
            results.append(psnr(picture, outcome.value))
    return results


# model -> (the state of its weights when hashed, their fingerprint). Weak keys: a model is
# forgotten with its last user; the value holds no reference back to it.
_fingerprints: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]] = (
    weakref.WeakKeyDictionary()
)


def _weights_state(model: torch.nn.Module) -> tuple | None:
    """What changes when the weights do: in-place writes move a tensor's version counter, and a
    replaced tensor (``load_state_dict(assign=True)``, a cast) has other storage."""
    try:
        return tuple(
            (name, t.data_ptr(), t._version) for name, t in model.state_dict(keep_vars=True).items()
        )
    except RuntimeError:  # inference tensors (made under torch.inference_mode) keep no version
        return None


def _fingerprint(model: torch.nn.Module) -> str:
    from latentstore_workers.autoencoders import fingerprint_state_dict

    state = _weights_state(model)
    hit = _fingerprints.get(model)
    if state is not None and hit is not None and hit[0] == state:
        return hit[1]
    fingerprint = fingerprint_state_dict(model)
    if state is not None:
        _fingerprints[model] = (state, fingerprint)
    return fingerprint


def wrap(
    model: AutoencoderKL, family: str = "ls-small", alias: str = "measure"
) -> LoadedAutoencoder:
    """A bare float32 CPU ``AutoencoderKL`` as the workers' :class:`LoadedAutoencoder`.

    The weights are fingerprinted once per model, not on every call (the training script's
    evaluation measures a model three times per picture): again only when a weight was written
    in place or replaced since. Writes through ``tensor.data`` bypass the version counter that
    shows this, so change weights with ``torch.no_grad()`` instead.
    """
    scaling, shift, downsample = _latent_factors(model.config)
    return LoadedAutoencoder(
        alias=alias,
        model=model,
        device=torch.device("cpu"),
        dtype=torch.float32,
        family=family,
        fingerprint=_fingerprint(model),
        scaling_factor=scaling,
        shift_factor=shift,
        downsample=downsample,
    )


@dataclass(frozen=True)
class RoundTrip:
    """One picture through encode -> blob -> decode."""

    psnr: float
    ssim: float | None
    nbytes: int  # size of the blob
    blob: bytes
    decoded: Image.Image


def measure_round_trip(
    model: AutoencoderKL | LoadedAutoencoder,
    picture: Image.Image,
    *,
    dtype: str = "float16",
    ssim: bool = False,
) -> RoundTrip:
    """Encode ``picture`` (RGB), pack the latents as ``dtype``, decode, and compare.

    The production path end to end (padding, ``latent_dist.mean``, the blob codec, decode,
    crop, 8-bit rounding). ``ssim=True`` adds SSIM (scikit-image, Gaussian window, sigma 1.5,
    mean over channels), which needs scikit-image installed.
    """
    return measure_round_trips(model, picture, (dtype,), ssim=ssim)[dtype]


def measure_round_trips(
    model: AutoencoderKL | LoadedAutoencoder,
    picture: Image.Image,
    dtypes: Sequence[str],
    *,
    ssim: bool = False,
) -> dict[str, RoundTrip]:
    """:func:`measure_round_trip` for several storage dtypes, encoding the picture once."""
    ae = model if isinstance(model, LoadedAutoencoder) else wrap(model)
    (latents,) = encode_images(ae, [picture])
    trips = {}
    for dtype in dtypes:
        blob = ae.pack(latents, picture.width, picture.height, dtype)
        header, stored = unpack(blob)
        decoded = decode_latents(ae, stored, header.width, header.height)
        trips[dtype] = RoundTrip(
            psnr=psnr(picture, decoded),
            ssim=structural_similarity(picture, decoded) if ssim else None,
            nbytes=len(blob),
            blob=blob,
            decoded=decoded,
        )
    return trips


def structural_similarity(reference: Image.Image, test: Image.Image) -> float:
    """SSIM of two RGB pictures (Wang et al. 2004 settings), averaged over the channels."""
    from skimage.metrics import structural_similarity as ssim

    return float(
        ssim(
            np.asarray(reference),
            np.asarray(test),
            data_range=255,
            channel_axis=2,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    )

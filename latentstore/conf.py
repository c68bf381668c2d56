"""The LATENTSTORE setting: defaults, normalisation, and a cache reset on ``setting_changed``.

Everything else reads configuration through :func:`get_settings` so tests that use
``override_settings(LATENTSTORE=...)`` see the new values at once.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed
from django.dispatch import receiver

DEFAULT_AUTOENCODER: dict[str, Any] = {
    "PRETRAINED": "stabilityai/sd-vae-ft-mse",
    "FAMILY": "sd",
    "DTYPE": "float16",
    "DEVICE": "auto",
    "SUBFOLDER": None,
    "REVISION": None,
    # How the worker runs it (see workers/autoencoders.py). DTYPE applies on GPUs; on CPU,
    # half-precision convolutions are slow or missing, so CPU_DTYPE (float32) is used there.
    "CPU_DTYPE": "float32",
    # channels_last memory layout. Off by default: measured on an H200 (README, "GPU
    # benchmark"), eager GroupNorm in channels_last is 3x slower and costs more than the
    # convolutions gain; with COMPILE it may pay off -- measure.
    "CHANNELS_LAST": False,
    # torch.compile the encoder and decoder: False, True, or a dict of torch.compile kwargs.
    "COMPILE": False,
    # Images with more pixels than this are encoded/decoded tile by tile (bounded memory).
    "TILE_ABOVE_PIXELS": 1024 * 1024,
    "TILE_SIZE": 512,  # pixels per tile side (latent tiles are TILE_SIZE / downsample)
    "TILE_OVERLAP": 0.25,  # fraction of a tile blended with its neighbours
}

DEFAULTS: dict[str, Any] = {
    # alias -> how to load it; the alias, family and weights fingerprint are stamped into latents.
    "AUTOENCODERS": {"default": DEFAULT_AUTOENCODER},
    # alias -> {"BACKEND": dotted path, "OPTIONS": {...}}; "default" and "rgb" are added
    # when absent.
    "DECODERS": {},
    # Django CACHES alias that holds decoded images.
    "CACHE": "default",
    # Seconds a decoded image stays in the shared cache (None: the cache's own default).
    "CACHE_TIMEOUT": 60 * 60 * 24 * 30,
    # Storage dtype of latent blobs: "float16" (default) or "int8" (per-channel affine).
    "LATENT_DTYPE": "float16",
    # Upload policy, checked at assignment before anything is stored.
    "ALLOWED_FORMATS": ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF"),
    "MAX_PIXELS": 16_777_216,  # 4096 x 4096
    "MAX_UPLOAD_BYTES": 50 * 1024 * 1024,
    # Background that transparent pixels are composited onto before encoding.
    "ALPHA_BACKGROUND": (255, 255, 255),
    # Keep the original upload in a Django storage after encoding (else it is discarded):
    # True, False, or "low_fidelity" (only rows whose round-trip PSNR is below MIN_PSNR).
    "KEEP_ORIGINAL": False,
    # Encode-time quality gate: decode right after encoding, store the round-trip PSNR.
    "QUALITY_CHECK": False,
    # Rows whose round-trip PSNR (dB) is below this are low-fidelity.
    "MIN_PSNR": 20.0,
    "ORIGINALS_STORAGE": "default",  # a STORAGES alias
    "ORIGINALS_PREFIX": "latentstore/originals/",
    # Celery routing and recovery.
    "ENCODE_TASK": "latentstore.encode",
    "DECODE_TASK": "latentstore.decode",
    "ENCODE_BATCH_TASK": "latentstore.encode_batch",
    "DECODE_BATCH_TASK": "latentstore.decode_batch",
    "ENCODE_QUEUE": "latents.encode",
    "DECODE_QUEUE": "latents.decode",
    # Batching on the workers: rows per encode message and per forward pass (at most), pictures
    # per decode forward pass; a worker given fewer rows tops its batch up with other pending
    # rows of the same field where the database can SELECT ... FOR UPDATE SKIP LOCKED.
    "ENCODE_BATCH_SIZE": 16,
    "DECODE_BATCH_SIZE": 8,
    "FILL_BATCHES": True,
    # ... and, while the backlog lasts, keeps claiming the field's next batches for up to this
    # many seconds per task, decoding pixels and writing back while the model runs (0: off).
    "DRAIN_SECONDS": 60,
    # Bytes of activations one forward pass may use; None: 80 % of the GPU's free memory when
    # the model loads, or a quarter of the RAM on CPU. Bigger images make smaller batches.
    "MEMORY_BUDGET": None,
    # Threads that decode uploads (Pillow) on the worker while the model runs.
    "PIXEL_THREADS": 4,
    # Seconds before an item is retried after a transient failure (one entry per attempt).
    "RETRY_DELAYS": (2, 10, 30),
    "LEASE_SECONDS": 600,  # a pending/encoding row older than this is re-enqueued by the sweeper
    "MAX_ATTEMPTS": 3,  # encode attempts before a row is marked failed
    "DECODE_TIMEOUT": 120,  # seconds decode() waits for a worker-side decode
    # Concurrent misses for one picture decode it once: the first takes a lock in the cache for
    # this long; the others wait up to as long for its result, then decode it themselves.
    "DECODE_LOCK_TIMEOUT": 60,
    # Per-process LRU of decoded pictures in front of CACHE, bounded in bytes (0: off).
    "LOCAL_CACHE_BYTES": 32 * 1024 * 1024,
    # Signed image URLs (image.url(), {% latent_img %}, the admin): the largest size box one
    # may ask for, how long a URL stays valid (None: as long as the picture exists) and how
    # long browsers and CDNs may keep a sharp picture.
    "URL_MAX_SIZE": 2048,
    "URL_EXPIRES": None,
    "URL_CACHE_SECONDS": 365 * 24 * 60 * 60,
    # A picture served as the instant preview schedules one warm-up decode on the decode
    # queue; further requests within this many seconds do not schedule another.
    "WARMUP_LOCK_SECONDS": 120,
}


class ImproperlyConfiguredLatentstore(Exception):
    """Raised for a LATENTSTORE setting that cannot work (system checks give the details)."""


@functools.cache
def get_settings() -> dict[str, Any]:
    """Return the effective LATENTSTORE settings (defaults merged with the project's)."""
    user = getattr(django_settings, "LATENTSTORE", {}) or {}
    merged = copy.deepcopy(DEFAULTS)
    for key, value in user.items():
        merged[key] = copy.deepcopy(value)
    merged["AUTOENCODERS"] = {
        alias: {**DEFAULT_AUTOENCODER, **cfg} for alias, cfg in merged["AUTOENCODERS"].items()
    }
    merged["ALLOWED_FORMATS"] = tuple(f.upper() for f in merged["ALLOWED_FORMATS"])
    merged["ALPHA_BACKGROUND"] = tuple(merged["ALPHA_BACKGROUND"])
    merged["RETRY_DELAYS"] = tuple(merged["RETRY_DELAYS"]) or (0,)
    return merged


def get_autoencoder_config(alias: str) -> dict[str, Any]:
    """Return one autoencoder's settings, or raise KeyError naming the configured aliases."""
    autoencoders = get_settings()["AUTOENCODERS"]
    try:
        return autoencoders[alias]
    except KeyError:
        raise KeyError(
            f"No autoencoder {alias!r} in LATENTSTORE['AUTOENCODERS'] "
            f"(configured: {', '.join(sorted(autoencoders)) or 'none'})"
        ) from None


@receiver(setting_changed)
def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting in ("LATENTSTORE", "CACHES", "STORAGES"):
        get_settings.cache_clear()
        # Late import: decoders imports conf.
        from latentstore import decoders

        decoders.reset()

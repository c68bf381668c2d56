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
    # channels_last memory layout: "auto" is on for a CPU (the SD VAE encodes 8-14% faster in it
    # there, docs/benchmarks.md) and off for a GPU (on an H200, eager GroupNorm in channels_last
    # is 3x slower and costs more than the convolutions gain; with COMPILE it may pay off).
    "CHANNELS_LAST": "auto",
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
    # Threads that decode uploads (Pillow) on the worker while the model runs (beside a CPU
    # model, only as many as the cores torch leaves free, at least one).
    "PIXEL_THREADS": 4,
    # Images per forward pass on a CPU, where big batches are slower per picture: "auto" picks
    # the size with the best measured pictures/s (from the worker's own passes, per shape), an
    # integer fixes it, None uses the memory plan as on a GPU. Bounded by the batch sizes above.
    "CPU_BATCH_SIZE": "auto",
    # torch's threads on a CPU worker (None: torch's default, one per core it may use).
    "CPU_THREADS": None,
    # A worker whose claim found rows arriving (others pending, but fewer than its next pass
    # takes) waits this long, once, and claims again before it starts; nothing pending: no wait.
    "FILL_WAIT_SECONDS": 0.05,
    # Seconds before an item is retried after a transient failure (one entry per attempt).
    "RETRY_DELAYS": (2, 10, 30),
    # A claim's lease: the worker's heartbeat renews it every third of this while it works on
    # the rows; a pending/encoding row whose lease ran out is re-enqueued by the sweeper. With
    # the sweeper every 60 s, a dead worker's rows are back in work within about 2 minutes.
    "LEASE_SECONDS": 60,
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
    # A process that found a picture's row ready serves that picture from the cache without
    # asking the database again for this many seconds (0: every request queries): a deleted or
    # re-uploaded row's picture stays servable at most this long.
    "URL_ROW_CHECK_SECONDS": 10,
    # Mixed into every URL's signature: change it to revoke every URL signed before (without
    # rotating SECRET_KEY, which signs sessions and more).
    "URL_SALT": "",
    # Seconds a preview (served while the decode is pending) stays in the cache, and the
    # longest side it is rendered at: a placeholder gains nothing from more pixels than its
    # latent grid has, and a 2,000 px preview cost a second of CPU per request.
    "PREVIEW_CACHE_SECONDS": 300,
    "PREVIEW_MAX_SIDE": 512,
    # A picture served as the instant preview schedules one warm-up decode on the decode
    # queue; further requests within this many seconds do not schedule another.
    "WARMUP_LOCK_SECONDS": 120,
    # {% latent_picture %} and the REST field: the widths of each srcset (those above the
    # picture's own width are left out), the <source> formats in order of preference (the
    # fallback <img> is JPEG), the default `sizes` attribute, and the static file shown for
    # a failed image.
    "PICTURE_WIDTHS": (320, 640, 960, 1280, 1920),
    "PICTURE_FORMATS": ("avif", "webp"),
    "PICTURE_SIZES": "100vw",
    "PICTURE_PLACEHOLDER": "latentstore/failed.svg",
}


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
    # Modules that build things from these settings (the decoder registry, the caches) listen
    # to the same signal themselves: conf, at the bottom of the package, imports none of them.
    if setting in ("LATENTSTORE", "CACHES", "STORAGES"):
        get_settings.cache_clear()

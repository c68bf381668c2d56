"""Load autoencoders from ``LATENTSTORE["AUTOENCODERS"]``, once per process, with a fingerprint.

``PRETRAINED`` is a Hugging Face hub id or a local directory written by diffusers'
``save_pretrained``; weights are read with safetensors only (``use_safetensors=True``: a repo that
has only pickled ``.bin`` weights is refused rather than unpickled).

CUDA must never be initialised in a process that later forks (Celery's prefork pool forks its
children from the main process): a CUDA context does not survive ``fork`` and the child fails or
hangs. So nothing here runs at import time, models are loaded lazily in the process that uses
them, and the cache is keyed by ``os.getpid()`` so a forked child never picks up a model its
parent happened to load (it loads its own). Run GPU workers with ``--pool solo`` or
``--pool threads``, or ``prefork`` where only the children touch the model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL
from django.core.signals import setting_changed
from django.dispatch import receiver

from latentstore.conf import get_autoencoder_config

__all__ = ["LoadedAutoencoder", "clear_cache", "fingerprint_state_dict", "load_autoencoder"]

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class LoadedAutoencoder:
    """A loaded autoencoder and everything that gets stamped into the latents it writes."""

    alias: str
    model: AutoencoderKL
    device: torch.device
    dtype: torch.dtype
    family: str
    fingerprint: str  # 16 hex chars; identifies the weights, not the dtype or device
    scaling_factor: float
    shift_factor: float
    downsample: int  # pixels per latent cell

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)


# (pid, alias) -> (the config it was loaded from, the model)
_cache: dict[tuple[int, str], tuple[dict[str, Any], LoadedAutoencoder]] = {}
_lock = threading.Lock()


def _reinit_lock_after_fork() -> None:
    # A lock held by another thread at fork time would stay locked forever in the child.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_reinit_lock_after_fork)


def load_autoencoder(alias: str) -> LoadedAutoencoder:
    """Return the autoencoder configured as ``alias``, loading it on first use in this process.

    Loads with ``AutoencoderKL.from_pretrained(PRETRAINED, subfolder=SUBFOLDER, revision=REVISION,
    use_safetensors=True)``; computes the weights fingerprint in float32 before casting to
    ``DTYPE`` and moving to ``DEVICE``. Raises ``KeyError`` for an unknown alias and ``ValueError``
    for a bad ``DTYPE``/``DEVICE``.
    """
    config = dict(get_autoencoder_config(alias))
    key = (os.getpid(), alias)
    with _lock:
        hit = _cache.get(key)
        # A changed setting (override_settings, or a reconfigured alias) means a different model.
        if hit is not None and hit[0] == config:
            return hit[1]
        loaded = _load(alias, config)
        _cache[key] = (config, loaded)
        return loaded


def clear_cache() -> None:
    """Forget every loaded autoencoder (the models are freed when nothing else holds them)."""
    with _lock:
        _cache.clear()
    if torch.cuda.is_initialized():  # never initialise CUDA just to empty its cache
        torch.cuda.empty_cache()


@receiver(setting_changed)
def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting == "LATENTSTORE":
        clear_cache()


def fingerprint_state_dict(model: torch.nn.Module) -> str:
    """blake2b (8 bytes, 16 hex chars) over the float32 state dict in sorted key order.

    Every tensor contributes its name, dtype, shape and bytes. Floating-point tensors are hashed
    as float32 so the fingerprint names the weights, whatever dtype they are later run in.
    """
    h = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach()
        if t.is_floating_point():
            t = t.to(torch.float32)
        t = t.to("cpu").contiguous()
        h.update(name.encode("utf-8"))
        h.update(b"\0")
        h.update(str(t.dtype).removeprefix("torch.").encode("ascii"))
        h.update(b"\0")
        h.update(repr(tuple(t.shape)).encode("ascii"))
        h.update(b"\0")
        # A uint8 view gives the raw bytes for any dtype without a numpy round trip.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _resolve_device(name: str | None) -> torch.device:
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"Invalid DEVICE {name!r}: {exc}") from None


def _resolve_dtype(alias: str, name: str | None, device: torch.device) -> torch.dtype:
    key = (name or "float32").strip().lower().removeprefix("torch.")
    try:
        dtype = _DTYPES[key]
    except KeyError:
        raise ValueError(
            f"Autoencoder {alias!r}: DTYPE {name!r} is not one of {', '.join(_DTYPES)}"
        ) from None
    if device.type == "cpu" and dtype != torch.float32:
        # Half-precision convolutions on CPU are slow or unimplemented; the latents differ only
        # in rounding, and the fingerprint does not depend on the dtype.
        logger.warning(
            "Autoencoder %r: DTYPE %s on CPU is slow or unsupported; using float32", alias, key
        )
        dtype = torch.float32
    return dtype


def _load(alias: str, config: dict[str, Any]) -> LoadedAutoencoder:
    device = _resolve_device(config.get("DEVICE"))
    dtype = _resolve_dtype(alias, config.get("DTYPE"), device)
    pretrained = config["PRETRAINED"]
    kwargs: dict[str, Any] = {
        "use_safetensors": True,
        # Without accelerate, diffusers warns on every load that it falls back to this anyway.
        "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None,
    }
    if config.get("SUBFOLDER"):
        kwargs["subfolder"] = config["SUBFOLDER"]
    if config.get("REVISION"):
        kwargs["revision"] = config["REVISION"]
    logger.info("Loading autoencoder %r from %s (%s, %s)", alias, pretrained, device, dtype)
    # Loaded in float32 (the default): the fingerprint is computed before any cast.
    model = AutoencoderKL.from_pretrained(pretrained, **kwargs)
    model.eval()
    model.requires_grad_(False)
    fingerprint = fingerprint_state_dict(model)
    if dtype != torch.float32:
        if getattr(model, "_keep_in_fp32_modules", None):
            model.to(dtype=dtype)
        else:
            # diffusers' ModelMixin.to warns about "modules that should be kept in float32: []"
            # on every dtype cast; with no such modules the plain nn.Module cast is the same.
            torch.nn.Module.to(model, dtype=dtype)
    model.to(device=device)

    cfg = model.config
    family = str(config.get("FAMILY") or "")
    _check_family(alias, family, int(cfg.latent_channels))
    shift = getattr(cfg, "shift_factor", None)
    return LoadedAutoencoder(
        alias=alias,
        model=model,
        device=device,
        dtype=dtype,
        family=family,
        fingerprint=fingerprint,
        scaling_factor=float(cfg.scaling_factor),
        shift_factor=float(shift) if shift is not None else 0.0,
        downsample=2 ** (len(cfg.block_out_channels) - 1),
    )


def _check_family(alias: str, family: str, channels: int) -> None:
    """Refuse a FAMILY whose channel count contradicts the model (previews would be garbage)."""
    from latentstore.families import UnknownFamily, get_family

    try:
        known = get_family(family)
    except UnknownFamily:
        # A custom family: the VAE decoder still works, only the instant preview cannot.
        logger.warning("Autoencoder %r: FAMILY %r is not a known family", alias, family)
        return
    if known.channels != channels:
        raise ValueError(
            f"Autoencoder {alias!r}: FAMILY {family!r} has {known.channels} latent channels "
            f"but the model writes {channels}; set FAMILY to the model's family"
        )

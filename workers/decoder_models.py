"""Load the decoder-only models (TAESD, the consistency decoder), once per process.

The VAE decoders reuse the autoencoders of :mod:`latentstore_workers.autoencoders`; the models here
are decoders in their own right, configured in a decoder's ``OPTIONS`` rather than in
``AUTOENCODERS``:

- diffusers ``AutoencoderTiny`` (TAESD) and ``ConsistencyDecoderVAE``, loaded with
  ``from_pretrained(pretrained, use_safetensors=True)`` from a hub id or a ``save_pretrained``
  directory — a repository with only pickled ``.bin`` weights is refused, never unpickled;
- OpenAI's ``consistencydecoder`` package, which downloads and loads a TorchScript archive (see
  :func:`load_openai_consistency_decoder`; opt-in only).

As in :mod:`latentstore_workers.autoencoders`, nothing loads at import time and the cache is keyed
by ``os.getpid()``: a process that forks (Celery's prefork pool) never hands a model, or a CUDA
context, to its children; each child loads its own.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from django.core.signals import setting_changed
from django.dispatch import receiver

from latentstore.decoders import weights_signature
from latentstore_workers.autoencoders import _resolve_device, _resolve_dtype, load_pretrained

__all__ = [
    "LoadedDecoderModel",
    "clear_cache",
    "load_consistency_decoder",
    "load_openai_consistency_decoder",
    "load_tiny_autoencoder",
    "resolve_device_dtype",
]

logger = logging.getLogger(__name__)


@dataclass
class LoadedDecoderModel:
    """A loaded decoder model, where it runs, and a lock for models that are not thread-safe."""

    model: Any
    device: torch.device
    dtype: torch.dtype
    # ConsistencyDecoderVAE keeps its scheduler's timesteps on the model, and OpenAI's package
    # draws from the global RNG: one decode at a time per model.
    lock: threading.Lock = field(default_factory=threading.Lock)


_cache: dict[tuple, LoadedDecoderModel] = {}
_lock = threading.Lock()


def _reinit_lock_after_fork() -> None:
    # A lock held by another thread at fork time would stay locked forever in the child.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_reinit_lock_after_fork)


def clear_cache() -> None:
    """Forget every loaded decoder model (freed when nothing else holds them)."""
    with _lock:
        _cache.clear()


@receiver(setting_changed)
def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting == "LATENTSTORE":
        clear_cache()


def resolve_device_dtype(
    owner: str, device: str | None, dtype: str | None
) -> tuple[torch.device, torch.dtype]:
    """``device`` ``auto``/``cpu``/``cuda[:N]``; ``dtype`` ``auto`` (float16 on CUDA, else
    float32) or a name. Raises ``ValueError`` naming ``owner`` for a bad value."""
    resolved = _resolve_device(device)
    if (dtype or "auto").strip().lower() == "auto":
        return resolved, torch.float16 if resolved.type == "cuda" else torch.float32
    return resolved, _resolve_dtype(owner, dtype, resolved)


def _cached(key: tuple, load) -> LoadedDecoderModel:
    key = (os.getpid(), *key)
    with _lock:
        hit = _cache.get(key)
        if hit is None:
            hit = _cache[key] = load()
        return hit


def _from_pretrained(
    cls: type,
    pretrained: str,
    subfolder: str | None,
    revision: str | None,
    device: torch.device,
    dtype: torch.dtype,
) -> LoadedDecoderModel:
    logger.info("Loading %s from %s (%s, %s)", cls.__name__, pretrained, device, dtype)
    model, _ = load_pretrained(
        cls, pretrained, device=device, dtype=dtype, subfolder=subfolder, revision=revision
    )
    return LoadedDecoderModel(model=model, device=device, dtype=dtype)


def load_tiny_autoencoder(
    pretrained: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    device: str | None = "auto",
    dtype: str | None = "auto",
) -> LoadedDecoderModel:
    """diffusers ``AutoencoderTiny`` (TAESD) from ``pretrained``, loaded once per process."""
    from diffusers import AutoencoderTiny

    dev, dt = resolve_device_dtype(f"TAESD {pretrained}", device, dtype)
    key = ("taesd", pretrained, weights_signature(pretrained), subfolder, revision, str(dev), dt)
    return _cached(
        key, lambda: _from_pretrained(AutoencoderTiny, pretrained, subfolder, revision, dev, dt)
    )


def load_consistency_decoder(
    pretrained: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    device: str | None = "auto",
    dtype: str | None = "auto",
) -> LoadedDecoderModel:
    """diffusers ``ConsistencyDecoderVAE`` from ``pretrained``, loaded once per process."""
    from diffusers import ConsistencyDecoderVAE

    dev, dt = resolve_device_dtype(f"consistency decoder {pretrained}", device, dtype)
    key = ("consistency", pretrained, weights_signature(pretrained), subfolder, revision)
    return _cached(
        (*key, str(dev), dt),
        lambda: _from_pretrained(ConsistencyDecoderVAE, pretrained, subfolder, revision, dev, dt),
    )


def load_openai_consistency_decoder(
    *, device: str | None = "auto", dtype: str | None = "auto", download_root: str | None = None
) -> LoadedDecoderModel:
    """OpenAI's ``consistencydecoder.ConsistencyDecoder``, loaded once per process.

    **This loads a TorchScript archive**, a pickle-based format, which the package downloads
    from ``openaipublic.azureedge.net`` and checks against a sha256 pinned in its source. It is
    the one exception to latentstore's no-pickle rule, taken only when a decoder is configured
    with ``OPTIONS["allow_torchscript"] = True``. Raises ``ImportError`` when the package is not
    installed (``pip install git+https://github.com/openai/consistencydecoder.git``).
    """
    from consistencydecoder import ConsistencyDecoder  # not on PyPI; see the docstring

    dev, dt = resolve_device_dtype("the consistencydecoder package", device, dtype)

    def load() -> LoadedDecoderModel:
        kwargs: dict[str, Any] = {"device": str(dev)}
        if download_root:
            kwargs["download_root"] = download_root
        logger.info("Loading OpenAI's consistency decoder (TorchScript) on %s", dev)
        # The package is used as its README shows: the checkpoint as shipped, latents passed in
        # ``dt`` (float16 on CUDA there); ``dt`` is the dtype of the latents we hand it.
        return LoadedDecoderModel(model=ConsistencyDecoder(**kwargs), device=dev, dtype=dt)

    return _cached(("openai-consistency", download_root, str(dev), dt), load)

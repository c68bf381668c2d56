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

How a model runs is set per autoencoder: ``DTYPE`` (float16/bfloat16/float32 on GPUs;
``CPU_DTYPE`` on CPU, float32 unless asked), ``CHANNELS_LAST`` memory layout, ``COMPILE``
(``torch.compile`` of the encoder and decoder) and tiling (``TILE_ABOVE_PIXELS``, ``TILE_SIZE``,
``TILE_OVERLAP``). A reduced-precision model gets a float32 twin on demand (:meth:`float32`) for
the items whose output overflowed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL, ModelMixin
from django.core.signals import setting_changed
from django.dispatch import receiver

from latentstore.conf import get_autoencoder_config, get_settings
from latentstore_workers.weights import local_files_only

__all__ = [
    "LoadedAutoencoder",
    "clear_cache",
    "fingerprint_state_dict",
    "load_autoencoder",
    "load_pretrained",
]

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=ModelMixin)

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
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    channels_last: bool = False
    compiled: bool = False
    tile_above_pixels: int | None = None  # None: never tile
    tile_size: int = 512
    memory_budget: int = 0  # bytes of activations one forward pass may use
    # One forward pass at a time per model: tiling is a switch on the shared module, and a
    # GPU runs one kernel stream anyway.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    # (operation, input shape) -> largest batch that fitted after an out-of-memory split.
    batch_caps: dict[tuple[str, tuple[int, ...]], int] = field(
        default_factory=dict, repr=False, compare=False
    )
    # (operation, input shape) -> {batch size: (passes, best seconds per picture)} of the CPU
    # passes run so far: what the CPU batch plan is chosen from (latentstore_workers.cpu).
    pass_times: dict[tuple[str, tuple[int, int]], dict[int, tuple[int, float]]] = field(
        default_factory=dict, repr=False, compare=False
    )
    _float32: LoadedAutoencoder | None = field(default=None, repr=False, compare=False)

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def block_width(self) -> int:
        """Channels of the full-resolution blocks: what activation memory scales with."""
        return int(self.model.config.block_out_channels[0])

    def pack(self, latents: Any, width: int, height: int, dtype: str = "float16") -> bytes:
        """A latent blob of ``latents`` stamped with this autoencoder's identity and factors."""
        from latentstore.latents import pack

        return pack(
            latents,
            autoencoder=self.alias,
            family=self.family,
            fingerprint=self.fingerprint,
            scaling_factor=self.scaling_factor,
            shift_factor=self.shift_factor,
            width=width,
            height=height,
            downsample=self.downsample,
            dtype=dtype,
        )

    def should_tile(self, width: int, height: int) -> bool:
        """Whether a ``width x height`` picture goes through the tiled encoder/decoder."""
        return self.tile_above_pixels is not None and width * height > self.tile_above_pixels

    @contextlib.contextmanager
    def tiling(self, enabled: bool) -> Iterator[None]:
        """Hold the model's lock with diffusers' tiling switched on or off for one call."""
        with self.lock:
            before = self.model.use_tiling
            self.model.use_tiling = enabled
            try:
                yield
            finally:
                self.model.use_tiling = before

    def float32(self) -> LoadedAutoencoder:
        """This autoencoder in float32 (itself when it already is), loaded on first use.

        The twin is read from the same weights (checked by fingerprint), not upcast from the
        reduced-precision copy, so an item re-run after a float16 overflow gets exactly what a
        float32 worker would have written.
        """
        if self.dtype == torch.float32:
            return self
        with self.lock:
            if self._float32 is None:
                config = {**self.config, "DTYPE": "float32", "CPU_DTYPE": "float32"}
                config["COMPILE"] = False  # a rare path: not worth a compilation
                twin = _load(self.alias, config)
                if twin.fingerprint != self.fingerprint:
                    raise RuntimeError(
                        f"Autoencoder {self.alias!r}: the weights on disk changed since they were "
                        f"loaded ({self.fingerprint} -> {twin.fingerprint}); restart the worker"
                    )
                twin.memory_budget = self.memory_budget
                self._float32 = twin
            return self._float32


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


def _parse_dtype(alias: str, setting: str, name: str | None) -> torch.dtype:
    key = (name or "float32").strip().lower().removeprefix("torch.")
    try:
        return _DTYPES[key]
    except KeyError:
        raise ValueError(
            f"Autoencoder {alias!r}: {setting} {name!r} is not one of {', '.join(_DTYPES)}"
        ) from None


def _resolve_dtype(
    alias: str, name: str | None, device: torch.device, cpu_name: str | None = "float32"
) -> torch.dtype:
    """``DTYPE`` on a GPU; on CPU ``CPU_DTYPE`` (``cpu_name``), float32 unless asked."""
    dtype = _parse_dtype(alias, "DTYPE", name)
    if device.type != "cpu":
        return dtype
    cpu_dtype = _parse_dtype(alias, "CPU_DTYPE", cpu_name)
    if dtype != cpu_dtype and cpu_dtype == torch.float32:
        # Half-precision convolutions on CPU are slow or unimplemented; the latents differ only
        # in rounding, and the fingerprint does not depend on the dtype.
        # Debug, not a warning: every CPU process of a GPU-first configuration would say it.
        logger.debug(
            "Autoencoder %r: DTYPE %s is for GPUs; on CPU it runs in CPU_DTYPE %s",
            alias,
            str(dtype).removeprefix("torch."),
            str(cpu_dtype).removeprefix("torch."),
        )
    return cpu_dtype


def _tiling(alias: str, config: dict[str, Any], downsample: int) -> tuple[int | None, int, float]:
    above = config.get("TILE_ABOVE_PIXELS")
    size = int(config.get("TILE_SIZE") or 512)
    overlap = float(config.get("TILE_OVERLAP", 0.25))
    if size < downsample or size % downsample:
        raise ValueError(
            f"Autoencoder {alias!r}: TILE_SIZE {size} must be a positive multiple of {downsample}"
        )
    if not 0 <= overlap < 1:
        raise ValueError(f"Autoencoder {alias!r}: TILE_OVERLAP {overlap} must be in [0, 1)")
    return (None if above is None else int(above)), size, overlap


def _compile(alias: str, model: AutoencoderKL, spec: Any) -> bool:
    if not spec:
        return False
    if spec is True:
        options: dict[str, Any] = {}
    elif isinstance(spec, dict):
        options = dict(spec)
    else:
        raise ValueError(
            f"Autoencoder {alias!r}: COMPILE must be False, True or a dict of torch.compile "
            f"options, not {spec!r}"
        )
    # The encoder and decoder hold all the compute; the outer encode()/decode() keep their
    # Python-level switches (tiling, slicing) outside the compiled graphs.
    model.encoder.compile(**options)
    model.decoder.compile(**options)
    return True


def load_pretrained(
    cls: type[M],
    pretrained: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    subfolder: str | None = None,
    revision: str | None = None,
    fingerprint: bool = False,
) -> tuple[M, str | None]:
    """``cls.from_pretrained`` from safetensors only, frozen, cast to ``dtype``, on ``device``.

    ``pretrained`` is a hub id or a ``save_pretrained`` directory; a repository with only pickled
    ``.bin`` weights is refused (``use_safetensors=True``), never unpickled. Returns the model
    (in eval mode, without gradients) and, with ``fingerprint=True``, the
    :func:`fingerprint_state_dict` of the weights as loaded, in float32 before any cast.
    """
    kwargs: dict[str, Any] = {
        "use_safetensors": True,
        # Without accelerate, diffusers warns on every load that it falls back to this anyway.
        "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None,
    }
    if subfolder:
        kwargs["subfolder"] = subfolder
    if revision:
        kwargs["revision"] = revision
    if local_files_only(pretrained, subfolder, revision):
        # Cached, and the hub cannot be asked whether it changed: the client would retry for
        # ~23 s on every load before falling back to the cache.
        kwargs["local_files_only"] = True
    # Loaded in float32 (the default): the fingerprint is computed before any cast.
    model = cls.from_pretrained(pretrained, **kwargs)
    model.eval()
    model.requires_grad_(False)
    digest = fingerprint_state_dict(model) if fingerprint else None
    if dtype != torch.float32:
        if getattr(model, "_keep_in_fp32_modules", None):
            model.to(dtype=dtype)
        else:
            # diffusers' ModelMixin.to warns about "modules that should be kept in float32: []"
            # on every dtype cast; with no such modules the plain nn.Module cast is the same.
            torch.nn.Module.to(model, dtype=dtype)
    model.to(device=device)
    return model, digest


def _latent_factors(config: Any) -> tuple[float, float, int]:
    """``(scaling_factor, shift_factor, downsample)`` of an ``AutoencoderKL`` config."""
    shift = getattr(config, "shift_factor", None)
    return (
        float(config.scaling_factor),
        float(shift) if shift is not None else 0.0,
        2 ** (len(config.block_out_channels) - 1),
    )


def _load(alias: str, config: dict[str, Any]) -> LoadedAutoencoder:
    device = _resolve_device(config.get("DEVICE"))
    dtype = _resolve_dtype(alias, config.get("DTYPE"), device, config.get("CPU_DTYPE", "float32"))
    pretrained = config["PRETRAINED"]
    logger.info("Loading autoencoder %r from %s (%s, %s)", alias, pretrained, device, dtype)
    model, fingerprint = load_pretrained(
        AutoencoderKL,
        pretrained,
        device=device,
        dtype=dtype,
        subfolder=config.get("SUBFOLDER"),
        revision=config.get("REVISION"),
        fingerprint=True,
    )
    assert fingerprint is not None  # asked for above

    cfg = model.config
    family = str(config.get("FAMILY") or "")
    _check_family(alias, family, int(cfg.latent_channels))
    scaling, shift, downsample = _latent_factors(cfg)
    tile_above, tile_size, overlap = _tiling(alias, config, downsample)
    model.tile_sample_min_size = tile_size
    model.tile_latent_min_size = tile_size // downsample
    model.tile_overlap_factor = overlap
    channels_last = channels_last_for(config.get("CHANNELS_LAST", "auto"), device)
    if channels_last:
        # Convolutions on tensor cores want NHWC; inputs are made channels-last to match.
        model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        # Fixed shapes per batch: let cuDNN pick the fastest convolution algorithms once.
        torch.backends.cudnn.benchmark = True
    compiled = _compile(alias, model, config.get("COMPILE"))
    from latentstore_workers.memory import default_budget

    budget = get_settings()["MEMORY_BUDGET"]
    return LoadedAutoencoder(
        alias=alias,
        model=model,
        device=device,
        dtype=dtype,
        family=family,
        fingerprint=fingerprint,
        scaling_factor=scaling,
        shift_factor=shift,
        downsample=downsample,
        config=dict(config),
        channels_last=channels_last,
        compiled=compiled,
        tile_above_pixels=tile_above,
        tile_size=tile_size,
        memory_budget=int(budget) if budget else default_budget(device),
    )


def channels_last_for(setting: Any, device: torch.device) -> bool:
    """Whether a model on ``device`` runs in the channels-last layout: ``CHANNELS_LAST`` True or
    False, or "auto" (the default): on a CPU, where oneDNN's convolutions are faster in it (SD
    VAE encode 8-14 %, decode 4-8 % on the 2-core development machine), not on a GPU."""
    if isinstance(setting, str) and setting.lower() == "auto":
        return device.type == "cpu"
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"CHANNELS_LAST must be True, False or 'auto', not {setting!r}")


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

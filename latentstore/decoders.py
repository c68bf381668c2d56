"""The decoder registry: alias → {BACKEND, OPTIONS}, built lazily, cached, reset on settings change.

It follows Django's ``StorageHandler``. With only ``AUTOENCODERS`` configured it offers
``"default"`` (each latent's own autoencoder, ``latentstore_workers.decoders.VAEDecoder``) and
``"rgb"`` (the model-free latent→RGB projection). Backends are imported on first use, so the web
tier loads torch only if it decodes with a torch backend locally.

A backend subclasses :class:`BaseDecoder` and implements :meth:`BaseDecoder.decode`; it says which
latent families it reads (:attr:`BaseDecoder.families`) and refuses latents it cannot read by
raising :class:`IncompatibleLatents` from :meth:`BaseDecoder.check`, naming the decoders that can.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.functional import cached_property
from django.utils.module_loading import import_string

from latentstore import conf
from latentstore.exceptions import DecoderUnavailable

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

    from latentstore.latents import LatentHeader

DEFAULT_DECODERS: dict[str, dict[str, Any]] = {
    "default": {"BACKEND": "latentstore_workers.decoders.VAEDecoder", "OPTIONS": {}},
    "rgb": {"BACKEND": "latentstore.decoders.LatentRGBDecoder", "OPTIONS": {}},
}

#: Where a decoder runs: in the calling process, or on a worker through the decode queue.
RUN_LOCAL, RUN_WORKER = "local", "worker"


class InvalidDecoderError(KeyError):
    """No decoder of that alias is configured."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class DecoderConfigError(ImproperlyConfigured):
    """A decoder's ``BACKEND``/``OPTIONS`` cannot work (raised when it is built).

    ``manage.py check`` builds every configured decoder and reports this error under
    ``check_id`` with ``hint``, so a bad configuration shows up at deploy time, not at the first
    decode.
    """

    def __init__(
        self, message: str, *, hint: str | None = None, check_id: str = "latentstore.E020"
    ) -> None:
        super().__init__(message)
        self.hint = hint
        self.check_id = check_id


class IncompatibleLatents(ValueError):
    """A decoder was asked to read latents it cannot read (another family or weights).

    The message names the decoder, what it reads, the latents' origin and the configured
    decoders that can read them (also in ``able``).
    """

    def __init__(self, message: str, *, able: list[str] | None = None) -> None:
        super().__init__(message)
        self.able = list(able or ())


class BaseDecoder:
    """Base class for decoder backends (configure them in ``LATENTSTORE["DECODERS"]``).

    ``LATENTSTORE["DECODERS"][alias] = {"BACKEND": "dotted.path.ToIt", "OPTIONS": {...}}``; the
    registry builds one instance per alias and process: ``cls(alias, **OPTIONS)``. The common
    option ``RUN`` is ``"local"`` (decode in the calling process) or ``"worker"`` (send a decode
    task and wait for its result in the shared cache).

    A subclass:

    - implements :meth:`decode` (raw latents as stored → an RGB image of the original size, the
      encode-time padding cropped off);
    - sets :attr:`families` (or overrides :meth:`readable_families`) to the latent families it
      reads, and overrides :meth:`check` to refuse anything else it cannot read, with
      :meth:`incompatible`;
    - keeps ``__init__`` cheap: instances are built by ``manage.py check`` and for cache keys,
      in the web tier; load models lazily in :meth:`decode` (and raise
      :class:`DecoderConfigError` from ``__init__`` for options that cannot work);
    - overrides :meth:`fingerprint` if its output depends on more than its class and options
      (weights on disk, say);
    - is thread-safe: one instance serves every thread of a process.
    """

    #: Model families this backend reads; None means any.
    families: tuple[str, ...] | None = None
    #: Concurrent misses for the same picture wait for one decode (a short cache lock). Off for
    #: decoders so cheap that the lock's round trips would cost more than decoding twice.
    single_flight: bool = True
    #: Runs a torch model: a process without torch cannot run it locally (see the W044 check).
    needs_torch: bool = False
    #: Cheap enough to render inside a picture request on a cache miss (instead of serving the
    #: preview and scheduling a warm-up decode).
    instant: bool = False

    def __init__(self, alias: str, RUN: str = RUN_LOCAL, **options: Any) -> None:
        if RUN not in (RUN_LOCAL, RUN_WORKER):
            raise DecoderConfigError(
                f"Decoder {alias!r} has RUN={RUN!r}.",
                hint="Use 'local' or 'worker'.",
                check_id="latentstore.E009",
            )
        self.alias = alias
        self.run = RUN
        self.options = options

    def readable_families(self) -> tuple[str, ...] | None:
        """The latent families this decoder reads (None: any), known without loading a model."""
        return self.families

    def can_read(self, header: LatentHeader) -> bool:
        """A cheap answer (no model load) to "would :meth:`check` accept these latents?".

        Used to list, in a refusal, the decoders that can read the latents instead.
        """
        families = self.readable_families()
        return families is None or header.family in families

    def check(self, header: LatentHeader) -> None:
        """Raise :class:`IncompatibleLatents` when these latents cannot be read by this decoder."""
        families = self.readable_families()
        if families is not None and header.family not in families:
            raise self.incompatible(header, f"reads {', '.join(map(repr, families))} latents")

    def incompatible(
        self, header: LatentHeader, what: str, hint: str | None = None
    ) -> IncompatibleLatents:
        """The refusal to raise from :meth:`check`: ``what`` says what this decoder reads.

        The message names this decoder and what it reads, the latents' family, weights and
        autoencoder, and the configured decoders that can read them.
        """
        able = _who_can(header, exclude=self.alias)
        if able:
            who = f"decoders that can read them: {', '.join(able)}"
        else:
            who = "no configured decoder can read them"
        return IncompatibleLatents(
            f"Decoder {self.alias!r} {what}, but these are {header.family!r} latents "
            f"(weights {header.fingerprint}) from autoencoder {header.autoencoder!r}; {who}"
            + (f" ({hint})" if hint else "")
            + ".",
            able=able,
        )

    def fingerprint(self, autoencoder: str) -> str:
        """A cheap identity of what this decoder produces for latents of ``autoencoder`` (alias).

        It goes into cache keys.

        It must change whenever the output could (other options, other weights); it must not
        need to load a model, or a cache hit would cost a model load.
        """
        payload = json.dumps(
            [type(self).__module__ + "." + type(self).__qualname__, self.options],
            sort_keys=True,
            default=str,
        )
        return hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()

    def decode(self, header: LatentHeader, latents: np.ndarray) -> PILImage.Image:
        """Return an RGB image of the original size (``header.width`` × ``header.height``).

        ``latents`` are raw (the autoencoder's ``latent_dist.mean``, as stored, float32,
        read-only); ``header`` says where they come from, their scaling/shift and padding.
        """
        raise NotImplementedError

    def decode_batch(
        self, items: Sequence[tuple[LatentHeader, np.ndarray]]
    ) -> list[PILImage.Image | Exception]:
        """Decode several latents; per item the picture, or the exception that stopped it.

        The default decodes one at a time; model-backed decoders override it to batch.
        """
        results: list[PILImage.Image | Exception] = []
        for header, latents in items:
            try:
                results.append(self.decode(header, latents))
            except Exception as exc:  # one bad item must not cost the others their pictures
                results.append(exc)
        return results


def _who_can(header: LatentHeader, exclude: str | None = None) -> list[str]:
    able = []
    for alias in decoders.aliases():
        if alias == exclude:
            continue
        try:
            if decoders[alias].can_read(header):
                able.append(alias)
        except Exception:  # a broken alias must not hide the answer about the others
            continue
    return able


class LatentRGBDecoder(BaseDecoder):
    """The instant linear latent→RGB projection (a C×3 matrix per family): no model, no torch."""

    single_flight = False  # ~1 ms: cheaper than a lock's round trips to a shared cache
    instant = True

    def readable_families(self) -> tuple[str, ...]:
        from latentstore.families import FAMILIES

        return tuple(FAMILIES)

    def can_read(self, header: LatentHeader) -> bool:
        from latentstore.families import FAMILIES

        family = FAMILIES.get(header.family)
        return family is not None and family.channels == header.shape[0]

    def check(self, header: LatentHeader) -> None:
        from latentstore.families import FAMILIES

        family = FAMILIES.get(header.family)
        if family is None:
            raise self.incompatible(header, f"reads {', '.join(map(repr, FAMILIES))} latents")
        if family.channels != header.shape[0]:
            raise IncompatibleLatents(
                f"Decoder {self.alias!r}: family {header.family!r} has {family.channels} "
                f"channels but these latents have {header.shape[0]}."
            )

    def decode(self, header: LatentHeader, latents: np.ndarray) -> PILImage.Image:
        from latentstore.preview import latents_to_rgb

        # Project the whole padded grid at full size and crop the padding off, as the model
        # decoders do; stretching the grid onto the original size would shift it by up to a cell.
        c, h, w = latents.shape
        grid = (w * header.downsample, h * header.downsample)
        picture = latents_to_rgb(
            latents, header.family, header.scaling_factor, header.shift_factor, size=grid
        )
        if grid != (header.width, header.height):
            picture = picture.crop((0, 0, header.width, header.height))
        return picture


def weights_signature(pretrained: str) -> str:
    """Cheap identity of a PRETRAINED location: a hub id as is, a local dir by its files' stat."""
    path = Path(pretrained)
    if not path.is_dir():
        return pretrained
    parts = []
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.suffix in (".safetensors", ".json", ".bin"):
            st = file.stat()
            parts.append(f"{file.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}")
    return os.path.abspath(pretrained) + "|" + ";".join(parts)


class DecoderHandler:
    """``decoders[alias]`` → a backend instance, built on first use and cached per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._backends: dict[str, BaseDecoder] = {}

    @cached_property
    def settings(self) -> dict[str, dict[str, Any]]:
        configured = conf.get_settings()["DECODERS"] or {}
        merged = {alias: dict(cfg) for alias, cfg in DEFAULT_DECODERS.items()}
        for alias, cfg in configured.items():
            merged[alias] = {"OPTIONS": {}, **cfg}
        return merged

    def aliases(self) -> list[str]:
        return list(self.settings)

    def __getitem__(self, alias: str) -> BaseDecoder:
        backend = self._backends.get(alias)
        if backend is not None:
            return backend
        with self._lock:
            backend = self._backends.get(alias)
            if backend is None:
                backend = self._backends[alias] = self.create(alias)
        return backend

    def create(self, alias: str) -> BaseDecoder:
        try:
            cfg = self.settings[alias]
        except KeyError:
            raise InvalidDecoderError(
                f"No decoder {alias!r} in LATENTSTORE['DECODERS'] "
                f"(configured: {', '.join(self.settings)})"
            ) from None
        backend_path = cfg.get("BACKEND")
        if not backend_path:
            raise InvalidDecoderError(f"Decoder {alias!r} has no BACKEND")
        try:
            backend_cls = import_string(backend_path)
        except ModuleNotFoundError as exc:
            raise missing_module(alias, exc) from exc
        return backend_cls(alias, **cfg.get("OPTIONS", {}))

    def reset(self) -> None:
        with self._lock:
            self._backends.clear()
            self.__dict__.pop("settings", None)


decoders = DecoderHandler()

#: Top-level packages whose absence means "the worker extra is not installed here".
WORKER_PACKAGES = ("torch", "diffusers", "safetensors", "latentstore_workers")


def missing_module(alias: str, exc: ModuleNotFoundError) -> Exception:
    """The error to raise when decoder ``alias`` hits ``exc``: :class:`DecoderUnavailable`
    naming the fix when the worker extra is missing, else ``exc`` itself."""
    package = (exc.name or "").partition(".")[0]
    if package in WORKER_PACKAGES:
        return DecoderUnavailable(alias, package)
    return exc


def reset() -> None:
    """Forget built backends and settings (called on ``setting_changed``)."""
    decoders.reset()


@receiver(setting_changed)
def _reset_on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting in ("LATENTSTORE", "CACHES", "STORAGES"):
        reset()

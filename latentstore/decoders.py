"""The decoder registry: alias → {BACKEND, OPTIONS}, built lazily, cached, reset on settings change.

It follows Django's ``StorageHandler``. With only ``AUTOENCODERS`` configured it offers
``"default"`` (each latent's own autoencoder, ``workers.decoders.VAEDecoder``) and ``"rgb"`` (the
model-free latent→RGB projection). Backends are imported on first use, so the web tier loads
torch only if it decodes with a torch backend locally.

A backend subclasses :class:`BaseDecoder` and implements :meth:`BaseDecoder.decode`; it refuses
latents it cannot read by raising :class:`IncompatibleLatents` from :meth:`BaseDecoder.check`.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.utils.functional import cached_property
from django.utils.module_loading import import_string

from latentstore import conf

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

    from latentstore.latents import LatentHeader

DEFAULT_DECODERS: dict[str, dict[str, Any]] = {
    "default": {"BACKEND": "workers.decoders.VAEDecoder", "OPTIONS": {}},
    "rgb": {"BACKEND": "latentstore.decoders.LatentRGBDecoder", "OPTIONS": {}},
}

#: Where a decoder runs: in the calling process, or on a worker through the decode queue.
RUN_LOCAL, RUN_WORKER = "local", "worker"


class InvalidDecoderError(KeyError):
    """No decoder of that alias is configured."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class IncompatibleLatents(ValueError):
    """A decoder was asked to read latents it cannot read (another family or weights)."""


class BaseDecoder:
    """Base class for decoder backends (configure them in ``LATENTSTORE["DECODERS"]``).

    ``OPTIONS`` arrive as keyword arguments. The common option ``RUN`` is ``"local"`` (decode in
    the calling process) or ``"worker"`` (send a decode task and wait for its result in the
    cache). Subclasses implement :meth:`decode` and usually :meth:`check`.
    """

    #: Model families this backend reads; None means any.
    families: tuple[str, ...] | None = None

    def __init__(self, alias: str, RUN: str = RUN_LOCAL, **options: Any) -> None:
        self.alias = alias
        self.run = RUN
        self.options = options

    def check(self, header: LatentHeader) -> None:
        """Raise :class:`IncompatibleLatents` when these latents cannot be read by this decoder."""
        if self.families is not None and header.family not in self.families:
            raise IncompatibleLatents(
                f"Decoder {self.alias!r} reads {', '.join(self.families)} latents, but these are "
                f"{header.family!r} latents from autoencoder {header.autoencoder!r}"
                f"{_who_can(header)}."
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
        """Return an RGB image of the original size (``header.width`` × ``header.height``)."""
        raise NotImplementedError

    def decode_many(
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


def _who_can(header: LatentHeader) -> str:
    able = []
    for alias in decoders.aliases():
        try:
            backend = decoders[alias]
        except Exception:  # a broken alias must not hide the answer about the others
            continue
        if backend.families is None or header.family in backend.families:
            able.append(alias)
    return f"; decoders that can: {', '.join(able)}" if able else ""


class LatentRGBDecoder(BaseDecoder):
    """The instant linear latent→RGB projection (a 3×C matrix per family): no model, no torch."""

    def check(self, header: LatentHeader) -> None:
        from latentstore.families import UnknownFamily, get_family

        try:
            family = get_family(header.family)
        except UnknownFamily as exc:
            raise IncompatibleLatents(str(exc)) from None
        if family.channels != header.shape[0]:
            raise IncompatibleLatents(
                f"Decoder {self.alias!r}: family {header.family!r} has {family.channels} "
                f"channels but these latents have {header.shape[0]}."
            )

    def decode(self, header: LatentHeader, latents: np.ndarray) -> PILImage.Image:
        from latentstore.preview import latents_to_rgb

        return latents_to_rgb(
            latents,
            header.family,
            header.scaling_factor,
            header.shift_factor,
            size=(header.width, header.height),
        )


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
        backend_cls = import_string(backend_path)
        return backend_cls(alias, **cfg.get("OPTIONS", {}))

    def reset(self) -> None:
        with self._lock:
            self._backends.clear()
            self.__dict__.pop("settings", None)


decoders = DecoderHandler()


def reset() -> None:
    """Forget built backends and settings (called on ``setting_changed``)."""
    decoders.reset()

"""Cached decoding: one picture of a stored image, from the cache or decoded now.

A decode goes one way: the value object (``fields.LatentImage``) asks this module, which looks
the decoder backend up once (:func:`rendition`), reads the cache, and on a miss runs the backend
here or sends a decode task to a worker (``RUN="worker"``).

A cache key is made of the blob digest, the decoder alias and fingerprint, the output size and
format — all known from the row's small columns, so a cache hit reads no blob and loads no model,
and a re-encoded row (new digest) can never be served an old picture.
"""

from __future__ import annotations

import io
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from latentstore import conf
from latentstore.blobs import prefetch_blobs
from latentstore.cache import get_cache, picture_key
from latentstore.decoders import RUN_WORKER, BaseDecoder, decoders, missing_module
from latentstore.dispatch import Pending, decode_tasks, send_decode_tasks
from latentstore.exceptions import DecodeFailed, DecodeTimeout
from latentstore.pictures import (
    CONTENT_TYPES,
    fit_size,
    normalise_format,
    picture_bytes,
    transcode,
)
from latentstore.preview import preview_picture

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from latentstore.fields import LatentImage

__all__ = [
    "CONTENT_TYPES",
    "DecodeFailed",
    "DecodeTimeout",
    "Rendition",
    "decode_bytes",
    "decode_image",
    "decode_images",
    "decoder_fingerprint",
    "derive",
    "fit_size",
    "get_cache",
    "key_for",
    "MASTER_FORMAT",
    "master_of",
    "normalise_format",
    "picture_bytes",
    "render",
    "render_many",
    "render_rendition",
    "rendition",
    "schedule_warmup",
    "transcode",
]

logger = logging.getLogger("latentstore.decoding")

#: The lossless picture of one size that its other formats are made from (:func:`derive`):
#: a decoder runs once per size, however many formats a page asks for.
MASTER_FORMAT = "PNG"


_FINGERPRINT_SECONDS = 1.0
_fingerprints: dict[tuple[str, str], tuple[float, Any, str]] = {}


def fingerprint_of(backend: BaseDecoder, autoencoder: str) -> str:
    """``backend.fingerprint(autoencoder)``, remembered for a second.

    A fingerprint stats the weights files (~0.1 ms); a page of thumbnails asks for the same one
    a hundred times, and every cache hit needs it. A changed setting builds a new backend, which
    the memo notices at once.
    """
    now = time.monotonic()
    hit = _fingerprints.get((backend.alias, autoencoder))
    if hit is not None and hit[0] > now and hit[1] is backend:
        return hit[2]
    fingerprint = backend.fingerprint(autoencoder)
    if len(_fingerprints) > 1024:
        _fingerprints.clear()
    _fingerprints[(backend.alias, autoencoder)] = (now + _FINGERPRINT_SECONDS, backend, fingerprint)
    return fingerprint


def decoder_fingerprint(alias: str, autoencoder: str) -> str:
    """The fingerprint of decoder ``alias`` for latents of ``autoencoder`` (see
    :meth:`~latentstore.decoders.BaseDecoder.fingerprint`)."""
    return fingerprint_of(decoders[alias], autoencoder)


@dataclass(frozen=True)
class Rendition:
    """One picture of one image: which decoder makes it, at what size, in what format, and the
    cache key it lives under."""

    alias: str
    backend: BaseDecoder
    size: tuple[int, int]
    format: str
    fingerprint: str
    key: str


def rendition(
    image: LatentImage, decoder: str | BaseDecoder, size: Any = None, format: str = "PNG"
) -> Rendition:
    """The :class:`Rendition` of ``image`` by ``decoder`` (an alias, or a backend already
    looked up) fitted into ``size``.

    Looks an alias up (raising ``InvalidDecoderError`` for an unknown one); reads only the
    row's small columns (size, digest, autoencoder), never the blob.
    """
    backend = decoders[decoder] if isinstance(decoder, str) else decoder
    fmt = normalise_format(format)
    target = fit_size((image.width, image.height), size)
    fingerprint = fingerprint_of(backend, image.autoencoder)
    key = picture_key(image.digest, backend.alias, fingerprint, target, fmt)
    return Rendition(backend.alias, backend, target, fmt, fingerprint, key)


def key_for(image: LatentImage, alias: str, size: Any, format: str) -> tuple[str, tuple[int, int]]:
    """The cache key of ``image`` decoded by ``alias`` at ``size`` in ``format``, and that size."""
    found = rendition(image, alias, size, format)
    return found.key, found.size


def master_of(image: LatentImage, found: Rendition) -> Rendition:
    """The lossless :data:`MASTER_FORMAT` rendition of ``found``'s size (``found`` if it is one)."""
    if found.format == MASTER_FORMAT:
        return found
    key = picture_key(image.digest, found.alias, found.fingerprint, found.size, MASTER_FORMAT)
    return replace(found, format=MASTER_FORMAT, key=key)


def derive(image: LatentImage, found: Rendition, cache: Any = None) -> bytes | None:
    """``found``'s picture made from the cached master of its size, then cached itself.

    None when ``found`` is the master or the master is not cached (yet). The master is
    lossless, so the result is the very file a decode straight to ``found.format`` would give.
    """
    if found.format == MASTER_FORMAT:
        return None
    cache = get_cache() if cache is None else cache
    master = cache.get(master_of(image, found).key)
    if master is None:
        return None
    data = transcode(master, found.format)
    cache.set(found.key, data, conf.get_settings()["CACHE_TIMEOUT"])
    return data


def _finish(picture: PILImage.Image, target: Sequence[int], format: str) -> bytes:
    """A decoded picture resized to ``target`` (if it is not that size) and saved as a file."""
    from PIL import Image

    target = (int(target[0]), int(target[1]))
    if picture.size != target:
        picture = picture.resize(target, Image.Resampling.LANCZOS)
    return picture_bytes(picture, format)


def render(image: LatentImage, alias: str, target: tuple[int, int], format: str) -> bytes:
    """Decode ``image`` with ``alias`` in this process and save the picture (no cache)."""
    return _render(decoders[alias], image, target, format)


def render_rendition(image: LatentImage, found: Rendition) -> bytes:
    """Decode ``image`` as ``found`` says in this process and save the picture (no cache)."""
    return _render(found.backend, image, found.size, found.format)


def _render(backend: BaseDecoder, image: LatentImage, target: Sequence[int], format: str) -> bytes:
    header, latents = image.unpack()
    try:
        backend.check(header)
        picture = backend.decode(header, latents)
    except ModuleNotFoundError as exc:  # torch missing in a web process: say how to fix it
        raise missing_module(backend.alias, exc) from exc
    return _finish(picture, target, format)


def render_many(
    images: Sequence[LatentImage],
    alias: str,
    targets: Sequence[tuple[int, int]],
    format: str,
) -> list[bytes | Exception]:
    """:func:`render` for several images at once: the backend decodes them in batches.

    Returns, per image, the saved picture or the exception that stopped it (a row without
    latents, latents the decoder refuses, a failed decode).
    """
    backend = decoders[alias]
    results: list[bytes | Exception | None] = [None] * len(images)
    prepared = []
    for index, image in enumerate(images):
        try:
            header, latents = image.unpack()
            backend.check(header)
        except ModuleNotFoundError as exc:  # torch missing in a web process: say how to fix it
            results[index] = missing_module(backend.alias, exc)
            continue
        except Exception as exc:
            results[index] = exc
            continue
        prepared.append((index, header, latents))
    try:
        pictures = backend.decode_batch([(header, latents) for _i, header, latents in prepared])
    except ModuleNotFoundError as exc:  # torch missing in a web process: say how to fix it
        raise missing_module(backend.alias, exc) from exc
    for (index, _header, _latents), picture in zip(prepared, pictures, strict=True):
        if isinstance(picture, ModuleNotFoundError):
            results[index] = missing_module(backend.alias, picture)
        elif isinstance(picture, Exception):
            results[index] = picture
            continue
        results[index] = _finish(picture, targets[index], format)
    return results  # type: ignore[return-value]  # every index was filled


def decode_images(
    images: Sequence[LatentImage],
    decoder: str | None = None,
    size: Any = None,
    format: str = "PNG",
    *,
    return_exceptions: bool = False,
) -> list[Any]:
    """Decoded pictures (image files, as bytes) of many images: one cache round trip, batches.

    Hits come from one ``get_many``; the misses are decoded together — in batches in this
    process, or by ``latentstore.decode_batch`` tasks on the workers for ``RUN="worker"``
    decoders — and stored with one ``set_many``. ``decoder`` defaults to each image's field
    decoder. Raises the first error, or with ``return_exceptions=True`` returns it in that
    image's place (a listing can then show the others).
    """
    format = normalise_format(format)
    results: list[Any] = [None] * len(images)
    wanted: dict[str, list[tuple[int, Rendition]]] = {}
    for index, image in enumerate(images):
        alias = decoder or image.field.decoder
        try:
            image.require_ready()
            found = rendition(image, alias, size, format)
        except Exception as exc:
            results[index] = exc
            continue
        wanted.setdefault(alias, []).append((index, found))
    cache = get_cache()
    for alias, entries in wanted.items():
        hits = cache.get_many(list({r.key for _i, r in entries}))
        missing: dict[str, tuple[int, Rendition]] = {}  # one decode per distinct key
        for index, found in entries:
            if found.key in hits:
                results[index] = hits[found.key]
            else:
                missing.setdefault(found.key, (index, found))
        if missing:
            decoded = _decode_misses(images, alias, list(missing.values()), cache)
            for index, found in entries:
                if found.key in decoded:
                    results[index] = decoded[found.key]
    if not return_exceptions:
        for value in results:
            if isinstance(value, Exception):
                raise value
    return results


#: The name this function had before 0.2 (kept for existing callers).
decode_many = decode_images


def _decode_misses(
    images: Sequence[LatentImage],
    alias: str,
    misses: Sequence[tuple[int, Rendition]],
    cache: Any,
) -> dict[str, bytes | Exception]:
    """Decode the cache misses of :func:`decode_images` for one decoder, by key."""
    backend = misses[0][1].backend
    fmt = misses[0][1].format
    if backend.run == RUN_WORKER:
        pending = [(images[i], r.key, r.size) for i, r in misses]
        return _decode_on_workers(pending, alias, fmt, batch=True)
    todo = [images[i] for i, _r in misses]
    # Rows listed without their blobs (without_blobs) would otherwise each fetch their own in
    # render_many's unpack(): one query per model here instead of one per row.
    prefetch_blobs(todo)
    rendered = render_many(todo, alias, [r.size for _i, r in misses], fmt)
    decoded = dict(zip((r.key for _i, r in misses), rendered, strict=True))
    cache.set_many(
        {key: value for key, value in decoded.items() if not isinstance(value, Exception)},
        conf.get_settings()["CACHE_TIMEOUT"],
    )
    return decoded


def decode_bytes(image: LatentImage, alias: str, size: Any = None, format: str = "PNG") -> bytes:
    """The decoded picture as an image file, from the cache or decoded now (then cached)."""
    format = normalise_format(format)
    image.require_ready()
    found = rendition(image, alias, size, format)
    cache = get_cache()
    data = cache.get(found.key)
    if data is not None:
        return data
    if found.format != MASTER_FORMAT:
        # Every format of one size comes from that size's one (cached) lossless decode.
        data = transcode(decode_bytes(image, alias, size, MASTER_FORMAT), found.format)
        cache.set(found.key, data, conf.get_settings()["CACHE_TIMEOUT"])
        return data
    backend = found.backend

    def compute() -> bytes:
        if backend.run == RUN_WORKER:
            pending = [(image, found.key, found.size)]
            result = _decode_on_workers(pending, alias, found.format, batch=False)[found.key]
            if isinstance(result, Exception):
                raise result
            return result
        data = render_rendition(image, found)
        cache.set(found.key, data, conf.get_settings()["CACHE_TIMEOUT"])
        return data

    if not backend.single_flight:
        return compute()
    settings = conf.get_settings()
    wait = settings["DECODE_LOCK_TIMEOUT"]
    if backend.run == RUN_WORKER:  # the lock must outlive the holder's wait for the worker
        wait = max(wait, settings["DECODE_TIMEOUT"])
    return _single_flight(cache, found.key, compute, wait)


def _single_flight(cache: Any, key: str, compute: Callable[[], bytes], wait: float) -> bytes:
    """``compute()`` once for concurrent misses of ``key``, across threads and processes.

    The first caller takes a short lock in the cache (``cache.add``: atomic in every Django
    cache backend) and computes; the others poll the cache for its result. A waiter that sees
    the lock go without a result (the decode failed) takes the lock and tries itself; one that
    waits past ``wait`` seconds computes without the lock rather than fail. The lock is
    released however the computation ends, and expires after ``wait`` if its process dies.
    """
    timeout = max(1, math.ceil(wait))
    lock_key = key + ":lock"
    # An int, which Django's Redis cache stores as is (other values it pickles).
    token = secrets.randbits(62) + 1
    deadline = time.monotonic() + wait
    delay = 0.005
    while True:
        if cache.add(lock_key, token, timeout):
            try:
                data = cache.get(key)  # finished by another caller since our miss?
                return data if data is not None else compute()
            finally:
                if cache.get(lock_key) == token:  # not if it expired and another took it
                    cache.delete(lock_key)
        data = cache.get(key)
        if data is not None:
            return data
        if time.monotonic() >= deadline:
            logger.warning(
                "Waited %s s for another process to decode %s; decoding it here", wait, key
            )
            return compute()
        time.sleep(delay)
        delay = min(delay * 1.5, 0.1)


def decode_image(image: LatentImage, alias: str, size: Any = None, format: str = "PNG"):
    """:func:`decode_bytes`, opened as a PIL image."""
    from PIL import Image

    data = decode_bytes(image, alias, size=size, format=format)
    picture = Image.open(io.BytesIO(data))
    picture.load()
    return picture


def preview_bytes(image: LatentImage, size: Any = None, format: str = "PNG") -> bytes:
    """The instant preview of ``image`` fitted into ``size``, as a file: from the cache, or
    rendered now, once for concurrent requests, and cached for ``PREVIEW_CACHE_SECONDS``.

    Its longest side is at most ``PREVIEW_MAX_SIDE``: a larger box gets a smaller picture (the
    page scales it), because upscaling a projection adds no detail and a 2,047 px preview cost
    a second per request. Reads the blob only on a miss.
    """
    settings = conf.get_settings()
    fmt = normalise_format(format)
    target = fit_size((image.width, image.height), size)
    side = max(1, int(settings["PREVIEW_MAX_SIDE"]))
    key = picture_key(image.digest, "preview", f"{side:016x}", target, fmt)
    cache = get_cache()
    data = cache.get(key)
    if data is not None:
        return data

    def compute() -> bytes:
        header, latents = image.unpack()
        shown = target if max(target) <= side else fit_size(target, side)
        picture = picture_bytes(preview_picture(header, latents, shown), fmt)
        cache.set(key, picture, settings["PREVIEW_CACHE_SECONDS"])
        return picture

    return _single_flight(cache, key, compute, wait=10.0)


def schedule_warmup(
    image: LatentImage, decoder: str | BaseDecoder, size: Any = None, format: str = "PNG"
) -> bool:
    """Send one decode task so the picture is in the cache by the next view; True if sent.

    Deduplicated for ``WARMUP_LOCK_SECONDS`` by a cache ``add`` on the picture's key, so a page
    of thumbnails viewed by many people costs one decode per picture. Never waits; a broker that
    cannot be reached is logged and forgotten (the page keeps its preview).
    """
    settings = conf.get_settings()
    found = rendition(image, decoder, size, format)
    cache = get_cache()
    if not cache.add(found.key + ":warming", 1, settings["WARMUP_LOCK_SECONDS"]):
        return False
    try:
        pending = [(image, found.key, found.size)]
        send_decode_tasks(decode_tasks(pending, found.alias, found.format, batch=False))
    except Exception as exc:  # kombu raises several unrelated types for an unreachable broker
        cache.delete(found.key + ":warming")
        logger.warning("Could not schedule a warm-up decode of %s: %s", found.key, exc)
        return False
    return True


# --- decoding on the workers ----------------------------------------------------------------
#
# The cache doubles as the result backend (see latentstore.dispatch): it must therefore be shared
# between web and worker processes (Redis, Memcached, database or file-based — not LocMem).


def _decode_on_workers(
    pending: Sequence[Pending], alias: str, format: str, *, batch: bool
) -> dict[str, bytes | Exception]:
    """Send decode tasks for ``pending`` and wait for each picture, or its error, in the cache.

    Returns, per key, the picture, a :class:`DecodeFailed` with the worker's message, or a
    :class:`DecodeTimeout` when nothing arrived within ``DECODE_TIMEOUT`` seconds.
    """
    settings = conf.get_settings()
    cache = get_cache()
    # A failure left by an earlier attempt is not this one's answer.
    cache.delete_many([key + ":error" for _image, key, _target in pending])
    send_decode_tasks(decode_tasks(pending, alias, format, batch=batch))
    waiting = {key: image for image, key, _target in pending}
    decoded: dict[str, bytes | Exception] = {}
    deadline = time.monotonic() + settings["DECODE_TIMEOUT"]
    delay = 0.01
    while waiting and time.monotonic() < deadline:
        found = cache.get_many([k for key in waiting for k in (key, key + ":error")])
        for key in list(waiting):
            if key in found:
                decoded[key] = found[key]
                del waiting[key]
            elif key + ":error" in found:
                decoded[key] = DecodeFailed(found[key + ":error"])
                del waiting[key]
        if waiting:
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
    for key, image in waiting.items():
        instance = image.instance
        decoded[key] = DecodeTimeout(
            f"No decode from a worker within {settings['DECODE_TIMEOUT']} s for "
            f"{instance._meta.label} pk={instance.pk} ({alias}); "
            f"is a worker consuming {settings['DECODE_QUEUE']!r}?"
        )
    return decoded

"""Cached decoding: content-addressed cache keys, local or worker-side decode, size fitting.

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
from typing import TYPE_CHECKING, Any

from latentstore import conf
from latentstore.decoders import RUN_WORKER, decoders

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from latentstore.fields import LatentImage

logger = logging.getLogger("latentstore.decoding")

KEY_VERSION = "v1"
FORMATS = {"PNG": "PNG", "WEBP": "WEBP", "JPEG": "JPEG", "JPG": "JPEG"}
CONTENT_TYPES = {"PNG": "image/png", "WEBP": "image/webp", "JPEG": "image/jpeg"}


class DecodeFailed(RuntimeError):
    """A worker-side decode failed; the message is the worker's."""


class DecodeTimeout(TimeoutError):
    """A worker-side decode did not arrive in the cache within ``DECODE_TIMEOUT`` seconds."""


def fit_size(original: tuple[int, int], size: int | tuple[int, int] | None) -> tuple[int, int]:
    """The output size: the original, or the original fitted into a ``size`` box (aspect kept)."""
    width, height = original
    if size is None:
        return width, height
    box_w, box_h = (size, size) if isinstance(size, int) else size
    if box_w <= 0 or box_h <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    scale = min(box_w / width, box_h / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def normalise_format(format: str) -> str:
    try:
        return FORMATS[format.upper()]
    except KeyError:
        raise ValueError(f"Unsupported format {format!r}; use one of PNG, WEBP, JPEG") from None


def cache_key(digest: str, alias: str, fingerprint: str, size: tuple[int, int], format: str) -> str:
    return f"latentstore:{KEY_VERSION}:{digest}:{alias}:{fingerprint}:{size[0]}x{size[1]}:{format}"


_FINGERPRINT_SECONDS = 1.0
_fingerprints: dict[tuple[str, str], tuple[float, Any, str]] = {}


def decoder_fingerprint(alias: str, autoencoder: str) -> str:
    """``decoders[alias].fingerprint(autoencoder)``, remembered for a second.

    A fingerprint stats the weights files (~0.1 ms); a page of thumbnails asks for the same one
    a hundred times, and every cache hit needs it. A changed setting builds a new backend, which
    the memo notices at once.
    """
    backend = decoders[alias]
    now = time.monotonic()
    hit = _fingerprints.get((alias, autoencoder))
    if hit is not None and hit[0] > now and hit[1] is backend:
        return hit[2]
    fingerprint = backend.fingerprint(autoencoder)
    if len(_fingerprints) > 1024:
        _fingerprints.clear()
    _fingerprints[(alias, autoencoder)] = (now + _FINGERPRINT_SECONDS, backend, fingerprint)
    return fingerprint


def key_for(image: LatentImage, alias: str, size: Any, format: str) -> tuple[str, tuple[int, int]]:
    """The cache key of ``image`` decoded by ``alias`` at ``size`` in ``format``, and that size."""
    target = fit_size((image.width, image.height), size)
    fingerprint = decoder_fingerprint(alias, image._companion("autoencoder"))
    return cache_key(image.digest, alias, fingerprint, target, format), target


def get_cache():
    """The decode cache: this process's LRU in front of the shared cache named by ``CACHE``."""
    from latentstore.cache import tiered

    return tiered(conf.get_settings()["CACHE"])


def schedule_warmup(image: LatentImage, alias: str, size: Any = None, format: str = "PNG") -> bool:
    """Send one decode task so the picture is in the cache by the next view; True if sent.

    Deduplicated for ``WARMUP_LOCK_SECONDS`` by a cache ``add`` on the picture's key, so a page
    of thumbnails viewed by many people costs one decode per picture. Never waits; a broker that
    cannot be reached is logged and forgotten (the page keeps its preview).
    """
    settings = conf.get_settings()
    format = normalise_format(format)
    key, target = key_for(image, alias, size, format)
    cache = get_cache()
    if not cache.add(key + ":warming", 1, settings["WARMUP_LOCK_SECONDS"]):
        return False
    try:
        _send_tasks(_decode_tasks([(image, key, target)], alias, format, batch=False))
    except Exception as exc:  # kombu raises several unrelated types for an unreachable broker
        cache.delete(key + ":warming")
        logger.warning("Could not schedule a warm-up decode of %s: %s", key, exc)
        return False
    return True


def encode_picture(img: PILImage.Image, format: str) -> bytes:
    buf = io.BytesIO()
    if format == "PNG":
        img.save(buf, format="PNG", compress_level=1)
    elif format == "WEBP":
        img.save(buf, format="WEBP", quality=90, method=4)
    else:
        img.convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _finish(picture: PILImage.Image, target: Sequence[int], format: str) -> bytes:
    """A decoded picture resized to ``target`` (if it is not that size) and encoded."""
    from PIL import Image

    target = (int(target[0]), int(target[1]))
    if picture.size != target:
        picture = picture.resize(target, Image.Resampling.LANCZOS)
    return encode_picture(picture, format)


def render(image: LatentImage, alias: str, target: tuple[int, int], format: str) -> bytes:
    """Decode ``image`` with ``alias`` in this process and encode the picture (no cache)."""
    backend = decoders[alias]
    header, latents = image.unpack()
    backend.check(header)
    return _finish(backend.decode(header, latents), target, format)


def render_many(
    images: Sequence[LatentImage],
    alias: str,
    targets: Sequence[tuple[int, int]],
    format: str,
) -> list[bytes | Exception]:
    """:func:`render` for several images at once: the backend decodes them in batches.

    Returns, per image, the encoded picture or the exception that stopped it (a row without
    latents, latents the decoder refuses, a failed decode).
    """
    backend = decoders[alias]
    results: list[bytes | Exception | None] = [None] * len(images)
    prepared = []
    for index, image in enumerate(images):
        try:
            header, latents = image.unpack()
            backend.check(header)
        except Exception as exc:
            results[index] = exc
            continue
        prepared.append((index, header, latents))
    pictures = backend.decode_many([(header, latents) for _i, header, latents in prepared])
    for (index, _header, _latents), picture in zip(prepared, pictures, strict=True):
        if isinstance(picture, Exception):
            results[index] = picture
            continue
        results[index] = _finish(picture, targets[index], format)
    return results  # type: ignore[return-value]  # every index was filled


def decode_many(
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
    from latentstore.fields import READY, LatentsNotReady, prefetch_blobs

    format = normalise_format(format)
    results: list[Any] = [None] * len(images)
    wanted: dict[str, list[tuple[int, str, tuple[int, int]]]] = {}
    for index, image in enumerate(images):
        alias = decoder or image.field.decoder
        try:
            if image.state != READY or not image.digest:
                image._require_blob()
                raise LatentsNotReady("latents are not ready", state=image.state)
            key, target = key_for(image, alias, size, format)
        except Exception as exc:
            results[index] = exc
            continue
        wanted.setdefault(alias, []).append((index, key, target))
    cache = get_cache()
    timeout = conf.get_settings()["CACHE_TIMEOUT"]
    for alias, entries in wanted.items():
        found = cache.get_many(list({key for _i, key, _t in entries}))
        missing: dict[str, tuple[int, tuple[int, int]]] = {}  # one decode per distinct key
        for index, key, target in entries:
            if key in found:
                results[index] = found[key]
            else:
                missing.setdefault(key, (index, target))
        if not missing:
            continue
        todo = [(index, key, target) for key, (index, target) in missing.items()]
        if decoders[alias].run == RUN_WORKER:
            pending = [(images[i], key, target) for i, key, target in todo]
            decoded = _decode_on_workers(pending, alias, format, batch=True)
        else:
            misses = [images[i] for i, _k, _t in todo]
            # Rows listed without their blobs (without_blobs) would otherwise each fetch their
            # own in render_many's unpack(): one query per model here instead of one per row.
            prefetch_blobs(misses)
            rendered = render_many(misses, alias, [t for _i, _k, t in todo], format)
            decoded = dict(zip((key for _i, key, _t in todo), rendered, strict=True))
            cache.set_many(
                {key: value for key, value in decoded.items() if not isinstance(value, Exception)},
                timeout,
            )
        for index, key, _target in entries:
            if key in decoded:
                results[index] = decoded[key]
    if not return_exceptions:
        for value in results:
            if isinstance(value, Exception):
                raise value
    return results


def decode_bytes(image: LatentImage, alias: str, size: Any = None, format: str = "PNG") -> bytes:
    """The decoded picture as an image file, from the cache or decoded now (then cached)."""
    from latentstore.fields import READY, LatentsNotReady

    format = normalise_format(format)
    if image.state != READY or not image.digest:
        image._require_blob()  # raises LatentsNotReady with the row's state and error
        raise LatentsNotReady("latents are not ready", state=image.state)
    key, target = key_for(image, alias, size, format)
    cache = get_cache()
    data = cache.get(key)
    if data is not None:
        return data
    backend = decoders[alias]

    def compute() -> bytes:
        if backend.run == RUN_WORKER:
            result = _decode_on_workers([(image, key, target)], alias, format, batch=False)[key]
            if isinstance(result, Exception):
                raise result
            return result
        data = render(image, alias, target, format)
        cache.set(key, data, conf.get_settings()["CACHE_TIMEOUT"])
        return data

    if not backend.single_flight:
        return compute()
    settings = conf.get_settings()
    wait = settings["DECODE_LOCK_TIMEOUT"]
    if backend.run == RUN_WORKER:  # the lock must outlive the holder's wait for the worker
        wait = max(wait, settings["DECODE_TIMEOUT"])
    return _single_flight(cache, key, compute, wait)


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


# --- decoding on the workers ----------------------------------------------------------------
#
# The cache doubles as the result backend, so no Celery result store is needed: a decode task
# puts the picture at its key in the shared cache, or its error at ``key + ":error"``. The cache
# must therefore be shared between web and worker processes (Redis, Memcached, database or
# file-based — not LocMem).

# What a worker is asked for: the image, the cache key it puts the picture at, the size.
Pending = tuple["LatentImage", str, tuple[int, int]]


def _decode_tasks(
    pending: Sequence[Pending], alias: str, format: str, *, batch: bool
) -> list[tuple[str, list[Any]]]:
    """The decode tasks, ``(task name, args)``, that put each pending picture in the cache.

    ``batch=False``: one ``DECODE_TASK`` per picture (a warm-up, ``decode()``); ``batch=True``:
    ``DECODE_BATCH_TASK``s, one per model field and ``DECODE_BATCH_SIZE`` pictures.
    """
    # Here, not at the top: encoding imports the ORM, and this module stays import-light.
    from latentstore.encoding import _json_pk

    settings = conf.get_settings()
    if not batch:
        return [
            (
                settings["DECODE_TASK"],
                [
                    image.instance._meta.label,
                    _json_pk(image.instance.pk),
                    image.field.name,
                    alias,
                    list(target),
                    format,
                    key,
                ],
            )
            for image, key, target in pending
        ]
    groups: dict[tuple[str, str], list[Pending]] = {}
    for entry in pending:
        image = entry[0]
        groups.setdefault((image.instance._meta.label, image.field.name), []).append(entry)
    step = max(1, int(settings["DECODE_BATCH_SIZE"]))
    tasks = []
    for (label, field_name), entries in groups.items():
        for start in range(0, len(entries), step):
            items = [
                [_json_pk(image.instance.pk), list(target), key]
                for image, key, target in entries[start : start + step]
            ]
            tasks.append((settings["DECODE_BATCH_TASK"], [label, field_name, alias, format, items]))
    return tasks


def _send_tasks(tasks: Sequence[tuple[str, list[Any]]]) -> None:
    from celery import current_app

    queue = conf.get_settings()["DECODE_QUEUE"]
    for name, args in tasks:
        current_app.send_task(name, args=args, queue=queue)


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
    _send_tasks(_decode_tasks(pending, alias, format, batch=batch))
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

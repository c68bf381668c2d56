"""The worker's Celery tasks: encode uploads in batches, decode latents into the shared cache.

All are registered by *name* (``latentstore.encode``, ``latentstore.encode_batch``,
``latentstore.decode``, ``latentstore.decode_batch``); the web tier sends them with
``send_task`` and never imports this module (or torch). Payloads are JSON pointers only.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task, signals
from django.db import DatabaseError, InterfaceError

from latentstore import conf, queries
from latentstore_workers.weights import check_at_start

logger = logging.getLogger("latentstore_workers.tasks")

#: What an encode message answers when its row needs nothing from this worker.
NOTHING_TO_DO = "nothing to do: re-uploaded, already done, or taken by another batch"

# A worker whose autoencoder weights can be neither found nor downloaded refuses to start.
signals.worker_init.connect(check_at_start, weak=False)


def _retry_delay(task) -> int:
    delays = conf.get_settings()["RETRY_DELAYS"]
    return delays[min(task.request.retries, len(delays) - 1)]


def _encode(task, label: str, field_name: str, items: list[tuple[Any, str]]):
    from latentstore_workers.pipeline import encode_rows

    try:
        return encode_rows(label, field_name, items, fill=True)
    except (DatabaseError, InterfaceError) as exc:
        # The claim or the write-back could not reach the database; unfinished rows were
        # handed back (pending) where possible, so the retry claims them again.
        raise task.retry(exc=exc, countdown=_retry_delay(task)) from exc


@shared_task(
    name="latentstore.encode",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    max_retries=5,
)
def encode(self, label: str, pk: Any, field_name: str, token: str) -> str:
    """Encode one staged upload (token-checked), topping the batch up with pending rows on PG.

    Returns the named row's fate: ``ready``, ``failed``, ``retry``, or :data:`NOTHING_TO_DO`
    when the row was re-uploaded, finished, or taken by another worker's batch meanwhile (the
    worker logs this return value: it must not read as a problem).
    """
    report = _encode(self, label, field_name, [(pk, token)])
    fate = report.items.get(str(pk), "stale")
    return NOTHING_TO_DO if fate == "stale" else fate


@shared_task(
    name="latentstore.encode_batch",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    max_retries=5,
)
def encode_batch(self, label: str, field_name: str, items: list[list[Any]]) -> dict[str, int]:
    """Encode the rows named by ``[[pk, token], ...]`` of one model field, in batches.

    Stale items (re-uploaded, already done, held by another worker) are skipped and the others
    still land; redelivering the same message changes nothing. Returns counts of what happened.
    """
    pointers = [(pk, token) for pk, token in items]
    return _encode(self, label, field_name, pointers).as_dict()


@shared_task(name="latentstore.decode", bind=True, acks_late=True, ignore_result=True)
def decode(
    self, label: str, pk: Any, field_name: str, alias: str, size: list[int], format: str, key: str
) -> str:
    """Decode one row with decoder ``alias`` and put the picture in the shared cache at ``key``.

    Answers ``"cached"`` without decoding when the picture is in the cache already (a warm-up
    sent again after a backlog), and ``"in flight"`` when another worker is decoding it now.
    """
    from latentstore.decoding import get_cache, render

    cache = get_cache()
    if cache.get(key) is not None:
        return "cached"
    if not _claim_decode(cache, key):
        return "in flight"
    try:
        model, field = queries.get_field(label, field_name)
        instance = model._base_manager.get(pk=pk)
        image = getattr(instance, field.name)
        data = render(image, alias, (int(size[0]), int(size[1])), format)
    except Exception as exc:
        logger.exception("Decode of %s pk=%s with %r failed", label, pk, alias)
        cache.set(key + ":error", f"{type(exc).__name__}: {exc}", 60)
        return "failed"
    finally:
        cache.delete(key + _DECODING)
    cache.set(key, data, conf.get_settings()["CACHE_TIMEOUT"])
    return "ok"


# A worker decoding a picture holds this beside its key, so a second message for the same
# picture (a warm-up sent twice, two workers) does not decode it again. Not the ":lock" a web
# process holds while it waits for a worker: that one would make the worker skip its own job.
_DECODING = ":decoding"


def _claim_decode(cache: Any, key: str) -> bool:
    """Take the decode of ``key`` for this worker; False when another holds it."""
    timeout = max(1, int(conf.get_settings()["DECODE_LOCK_TIMEOUT"]))
    return bool(cache.add(key + _DECODING, 1, timeout))


@shared_task(name="latentstore.decode_batch", bind=True, acks_late=True, ignore_result=True)
def decode_batch(
    self, label: str, field_name: str, alias: str, format: str, items: list[list[Any]]
) -> dict[str, int]:
    """Decode ``[[pk, [width, height], cache key], ...]`` rows with ``alias`` in batches.

    The rows are read in one query; each picture (or its error, under ``key + ":error"``) is
    put in the shared cache, where the web process waiting for it finds it.
    """
    from latentstore.decoding import get_cache

    model, field = queries.get_field(label, field_name)
    cache = get_cache()
    cached = cache.get_many([key for _pk, _size, key in items])
    # Only what is neither cached nor being decoded by another worker is decoded here.
    todo = [item for item in items if item[2] not in cached and _claim_decode(cache, item[2])]
    try:
        pictures, errors = _decode_rows(model, field, label, alias, format, todo)
    finally:
        cache.delete_many([key + _DECODING for _pk, _size, key in todo])
    if pictures:
        cache.set_many(pictures, conf.get_settings()["CACHE_TIMEOUT"])
    if errors:
        cache.set_many(errors, 60)
    return {"ok": len(pictures), "failed": len(errors), "skipped": len(items) - len(todo)}


def _decode_rows(
    model: Any, field: Any, label: str, alias: str, format: str, items: list[list[Any]]
) -> tuple[dict[str, bytes], dict[str, str]]:
    """Decode ``[[pk, size, key], ...]`` in batches: pictures and error notes, by cache key."""
    from latentstore.decoding import render_many

    rows = model._base_manager.in_bulk([pk for pk, _size, _key in items])
    found, targets, keys, errors = [], [], [], {}
    for pk, size, key in items:
        instance = rows.get(model._meta.pk.to_python(pk))
        if instance is None:
            errors[key + ":error"] = f"{label} pk={pk} does not exist"
            continue
        found.append(getattr(instance, field.name))
        targets.append((int(size[0]), int(size[1])))
        keys.append(key)
    try:
        rendered = render_many(found, alias, targets, format)
    except Exception as exc:  # the decoder itself could not be built or loaded
        logger.exception("Batch decode of %s with %r failed", label, alias)
        rendered = [exc] * len(found)
    pictures = {}
    for key, result in zip(keys, rendered, strict=True):
        if isinstance(result, Exception):
            errors[key + ":error"] = f"{type(result).__name__}: {result}"
        else:
            pictures[key] = result
    return pictures, errors

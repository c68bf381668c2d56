"""Everything latentstore sends to Celery, by task name: pointers only, never pixels or torch.

The web tier never imports a task: it names it (``ENCODE_TASK``, ``DECODE_TASK``, ...) and sends
JSON arguments that point into the database — ``(model label, pk, field, token)`` for an encode.
The row is the record of truth; a message that is lost costs only the sweeper's delay, and one
that is delivered twice finds its row already claimed or done.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from latentstore import conf

logger = logging.getLogger("latentstore.encoding")


def json_pk(pk: Any) -> Any:
    """A primary key as a message carries it: ints and strings as they are, others (UUID) as
    their string."""
    return pk if isinstance(pk, (int, str)) else str(pk)


def send_task(name: str, args: list[Any], **options: Any) -> None:
    """Send the task ``name`` with JSON ``args`` through the project's Celery app.

    Raises whatever kombu raises when the broker cannot be reached; callers decide whether that
    is worth a warning (encodes: the sweeper retries) or an error.
    """
    from celery import current_app

    current_app.send_task(name, args=args, **options)


# --- encodes -------------------------------------------------------------------------------------

_collecting = threading.local()


@contextlib.contextmanager
def batched_enqueue() -> Iterator[None]:
    """Send the encodes of the saves committed inside as batch messages, on exit.

    Each save normally sends its own message when its transaction commits. Around a bulk import
    the per-row messages can be folded into a few batch messages::

        with batched_enqueue():
            with transaction.atomic():
                for upload in uploads:
                    Photo.objects.create(image=upload)

    Only encodes sent while the block runs are collected (put the block around the
    transaction, not inside it). Collected encodes are sent even if the block raises: their
    rows are committed.
    """
    stack = getattr(_collecting, "stack", None)
    if stack is None:
        stack = _collecting.stack = []
    collected: list[tuple[str, str, Any, str]] = []
    stack.append(collected)
    try:
        yield
    finally:
        stack.pop()
        target = stack[-1] if stack else None
        if target is not None:  # nested: the outermost block sends
            target.extend(collected)
        else:
            groups: dict[tuple[str, str], list[tuple[Any, str]]] = {}
            for label, field_name, pk, token in collected:
                groups.setdefault((label, field_name), []).append((pk, token))
            for (label, field_name), items in groups.items():
                enqueue_encode_batch(label, field_name, items)


def enqueue_encode(label: str, pk: Any, field_name: str, token: uuid.UUID | str) -> bool:
    """Send the encode task by name. Returns False (and logs) when the broker is unreachable.

    A failed send loses nothing: the row is pending in the database and the sweeper enqueues
    it once its lease has passed. Inside :func:`batched_enqueue` the row is collected instead.
    """
    stack = getattr(_collecting, "stack", None)
    if stack:
        stack[-1].append((label, field_name, pk, str(token)))
        return True
    settings = conf.get_settings()
    try:
        send_task(
            settings["ENCODE_TASK"],
            [label, json_pk(pk), field_name, str(token)],
            queue=settings["ENCODE_QUEUE"],
        )
    except Exception as exc:  # kombu raises several unrelated types for an unreachable broker
        logger.warning(
            "Could not enqueue the encode of %s pk=%s (%s, token %s); the sweeper will retry: %s",
            label,
            pk,
            field_name,
            token,
            exc,
        )
        return False
    return True


def enqueue_encode_batch(
    label: str,
    field_name: str,
    items: Sequence[tuple[Any, uuid.UUID | str]],
    *,
    countdown: float | None = None,
) -> int:
    """Enqueue the encode of many ``(pk, token)`` rows of one field; returns how many were sent.

    The bulk entry point for commands, the sweeper and bulk saves: one
    ``latentstore.encode_batch`` message per ``ENCODE_BATCH_SIZE`` rows, each carrying
    ``(label, field, [[pk, token], ...])``. ``countdown`` delays delivery (retries). Rows whose
    message cannot be sent stay pending in the database and are picked up by the sweeper.
    """
    settings = conf.get_settings()
    size = max(1, int(settings["ENCODE_BATCH_SIZE"]))
    pointers = [[json_pk(pk), str(token)] for pk, token in items]
    options: dict[str, Any] = {"queue": settings["ENCODE_QUEUE"]}
    if countdown:
        options["countdown"] = countdown
    sent = 0
    for start in range(0, len(pointers), size):
        chunk = pointers[start : start + size]
        try:
            send_task(settings["ENCODE_BATCH_TASK"], [label, field_name, chunk], **options)
        except Exception as exc:  # see enqueue_encode
            logger.warning(
                "Could not enqueue the encode of %d rows of %s (%s, pks %s); the sweeper will "
                "retry: %s",
                len(chunk),
                label,
                field_name,
                ", ".join(str(pk) for pk, _token in chunk),
                exc,
            )
            continue
        sent += len(chunk)
    return sent


# --- decodes -------------------------------------------------------------------------------------
#
# A decode task puts its picture at a cache key (or its error at ``key + ":error"``): the cache
# doubles as the result backend, so no Celery result store is needed.

#: What a worker is asked to decode: the image (a LatentImage), the cache key the picture goes
#: to, and the size.
Pending = tuple[Any, str, tuple[int, int]]


def decode_tasks(
    pending: Sequence[Pending], alias: str, format: str, *, batch: bool
) -> list[tuple[str, list[Any]]]:
    """The decode tasks, ``(task name, args)``, that put each pending picture in the cache.

    ``batch=False``: one ``DECODE_TASK`` per picture (a warm-up, ``decode()``); ``batch=True``:
    ``DECODE_BATCH_TASK``s, one per model field and ``DECODE_BATCH_SIZE`` pictures.
    """
    settings = conf.get_settings()
    if not batch:
        return [
            (
                settings["DECODE_TASK"],
                [
                    image.instance._meta.label,
                    json_pk(image.instance.pk),
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
                [json_pk(image.instance.pk), list(target), key]
                for image, key, target in entries[start : start + step]
            ]
            tasks.append((settings["DECODE_BATCH_TASK"], [label, field_name, alias, format, items]))
    return tasks


def send_decode_tasks(tasks: Sequence[tuple[str, list[Any]]]) -> None:
    """Send :func:`decode_tasks` to the decode queue (raises when the broker is unreachable)."""
    queue = conf.get_settings()["DECODE_QUEUE"]
    for name, args in tasks:
        send_task(name, args, queue=queue)

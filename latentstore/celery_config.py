"""Celery settings that latentstore's delivery guarantees depend on.

The row is the record of truth and the broker holds only pointers, so a task may be delivered
more than once; the token-checked write-back makes that harmless. What must not happen is a task
acknowledged before its work is done, a worker hoarding messages, or a broker that redelivers a
long encode while it is still running. :func:`configure` applies those settings to a Celery app.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

#: Seconds a worker may spend on one encode/decode task before it is killed.
TASK_TIME_LIMIT = 30 * 60

RELIABLE_SETTINGS: dict[str, Any] = {
    # Acknowledge after the task finished, and requeue when the worker process dies mid-task.
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    # One message at a time per process: a slow GPU batch must not hold others' work hostage.
    "worker_prefetch_multiplier": 1,
    # No pickle, anywhere.
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "result_accept_content": ["json"],
    "task_ignore_result": True,
    "task_time_limit": TASK_TIME_LIMIT,
    "task_soft_time_limit": TASK_TIME_LIMIT - 60,
    "task_routes": {
        "latentstore.encode": {"queue": "latents.encode"},
        "latentstore.encode_batch": {"queue": "latents.encode"},
        "latentstore.decode": {"queue": "latents.decode"},
        "latentstore.decode_batch": {"queue": "latents.decode"},
        "latentstore.sweep": {"queue": "latents.encode"},
    },
    # A save must not hang when the broker is down: the row stays pending and the sweeper
    # enqueues it later.
    "broker_connection_timeout": 2.0,
    "broker_connection_retry_on_startup": True,
    "task_publish_retry_policy": {
        "max_retries": 2,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 0.5,
    },
}

#: Redis/SQS redeliver an unacknowledged message after this many seconds; it must exceed the
#: hard time limit or a long-running encode would be handed to a second worker while it runs.
VISIBILITY_TIMEOUT = TASK_TIME_LIMIT + 10 * 60


def configure(app: Celery) -> Celery:
    """Give ``app`` latentstore's reliability settings as defaults (lazily: safe at import).

    A project that needs a different limit or route sets it in its own Celery config, which wins.
    The serializer settings are part of the security model (no pickle): a project that accepts
    pickle fails the ``latentstore.E005`` system check.
    """
    app.add_defaults(RELIABLE_SETTINGS)

    def _visibility(**kwargs: Any) -> None:
        options = dict(app.conf.broker_transport_options or {})
        options.setdefault("visibility_timeout", VISIBILITY_TIMEOUT)
        app.conf.broker_transport_options = options

    app.on_after_configure.connect(_visibility, weak=False)
    return app

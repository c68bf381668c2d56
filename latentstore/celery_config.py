"""Wiring latentstore into a project's Celery app: one call, :func:`configure`.

The row is the record of truth and the broker holds only pointers, so a task may be delivered
more than once; the token-checked write-back makes that harmless. What must not happen is a task
acknowledged before its work is done, a worker hoarding messages, or a broker that redelivers a
long encode while it is still running. :func:`configure` applies those settings to a Celery app,
registers latentstore's task modules (the sweeper, and the encode/decode tasks of the worker
extra) and schedules the sweeper on Celery beat. The system checks (``latentstore.wiring``) say
when any of it is missing.
"""

from __future__ import annotations

import importlib.util
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


#: The module of the sweeper task (no model, no torch: any process may import it).
SWEEP_TASKS = "latentstore.tasks"
#: The module of the encode and decode tasks (the worker extra: it loads torch when it runs).
WORKER_TASKS = "latentstore_workers.tasks"
#: The beat entry :func:`configure` adds when the project's schedule has no sweeper.
SWEEP_ENTRY = "latentstore-sweep"
#: Seconds between two sweeps on Celery beat (a lost message waits at most the lease plus this).
SWEEP_EVERY = 60.0


def task_modules() -> list[str]:
    """The modules whose tasks a latentstore worker must register: the sweeper's, and the
    worker extra's where it is installed (a web-only install has no encode tasks to run)."""
    modules = [SWEEP_TASKS]
    if importlib.util.find_spec("latentstore_workers") is not None:
        modules.append(WORKER_TASKS)
    return modules


def has_sweeper(schedule: dict[str, Any] | None) -> bool:
    """Whether a beat schedule runs ``latentstore.sweep``, under whatever entry name."""
    return any(
        isinstance(entry, dict) and entry.get("task") == "latentstore.sweep"
        for entry in (schedule or {}).values()
    )


def configure(app: Celery, *, sweep_every: float | None = SWEEP_EVERY) -> Celery:
    """Wire latentstore into ``app``; call it once in your project's ``celery.py``.

    It gives ``app`` latentstore's reliability settings as defaults, registers the task modules
    a worker needs (:func:`task_modules`) and, unless the project's ``beat_schedule`` already
    runs ``latentstore.sweep``, schedules the sweeper every ``sweep_every`` seconds (None: no
    entry; run ``manage.py latents_sweep`` from cron instead). Everything is applied lazily,
    when the app reads its configuration, so the call is safe at import time, before Django's
    settings are loaded.

    A project that needs a different limit or route sets it in its own Celery config, which wins.
    The serializer settings are part of the security model (no pickle): a project that accepts
    pickle fails the ``latentstore.E005`` system check.
    """
    app.add_defaults(RELIABLE_SETTINGS)

    def _wire(**kwargs: Any) -> None:
        options = dict(app.conf.broker_transport_options or {})
        options.setdefault("visibility_timeout", VISIBILITY_TIMEOUT)
        app.conf.broker_transport_options = options
        include = list(app.conf.include or ())
        app.conf.include = tuple(include + [m for m in task_modules() if m not in include])
        schedule = dict(app.conf.beat_schedule or {})
        if sweep_every is not None and not has_sweeper(schedule):
            schedule[SWEEP_ENTRY] = {"task": "latentstore.sweep", "schedule": float(sweep_every)}
            app.conf.beat_schedule = schedule

    if app.configured:  # its configuration was read already: no signal will come
        _wire()
    else:
        app.on_after_configure.connect(_wire, weak=False)
    return app

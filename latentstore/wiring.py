"""System checks for the wiring a project can get wrong without any error at the time.

Each of these once left rows ``pending`` forever with nothing saying why: no Celery app in the
web process (messages went to kombu's default ``amqp://localhost``), a broker URL never set,
latentstore's tasks missing from the worker, no sweeper on Celery beat, and a neural decoder set
to run in a web process that has no torch.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from django.core import checks
from django.utils.module_loading import import_string

from latentstore import conf
from latentstore.celery_config import has_sweeper, task_modules
from latentstore.decoders import RUN_LOCAL, DecoderHandler


def project_app() -> Any | None:
    """The Celery app this process sends tasks through, or None when only Celery's fallback
    app exists (nobody imported the project's ``celery.py``)."""
    from celery._state import get_current_app

    app = get_current_app()
    # Celery's own fallback: named "default" and never made current.
    if app.main == "default" and not app.set_as_current:
        return None
    return app


@checks.register("latentstore")
def check_celery(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """The web process has the project's Celery app, with a broker, latentstore's task modules
    and the sweeper on its beat schedule."""
    app = project_app()
    if app is None:
        return [
            checks.Error(
                "No Celery app is loaded in this process: latentstore's encodes would go to "
                "Celery's default broker (amqp://localhost) or nowhere.",
                id="latentstore.E040",
                hint="In your project package's __init__.py: "
                "`from .celery import app as celery_app` and `__all__ = ('celery_app',)`.",
            )
        ]
    errors: list[checks.CheckMessage] = []
    if not (app.conf.broker_url or app.conf.broker_write_url):
        errors.append(
            checks.Error(
                f"The Celery app {app.main!r} has no broker URL: kombu would fall back to "
                "amqp://localhost.",
                id="latentstore.E041",
                hint="Set CELERY_BROKER_URL in your settings, e.g. 'redis://127.0.0.1:6379/0'.",
            )
        )
    declared = set(app.conf.include or ()) | set(app.conf.imports or ())
    missing = [module for module in task_modules() if module not in declared]
    if missing:
        errors.append(
            checks.Error(
                f"The Celery app {app.main!r} does not import {', '.join(missing)}: workers "
                "would ignore latentstore's tasks as unregistered.",
                id="latentstore.E042",
                hint="Call latentstore.celery_config.configure(app) in your celery.py.",
            )
        )
    if not has_sweeper(app.conf.beat_schedule):
        errors.append(
            checks.Warning(
                "Celery beat has no schedule for latentstore.sweep: rows whose message was "
                "lost (a broker restart, a killed worker) would stay pending.",
                id="latentstore.W043",
                hint="Call latentstore.celery_config.configure(app) and run `celery -A "
                "<project> beat`, or run `manage.py latents_sweep` from cron every minute.",
            )
        )
    return errors


@checks.register("latentstore")
def check_local_decoders(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """A decoder that runs in this process can run here: its backend imports, and torch is
    installed when the backend needs it."""
    try:
        settings = DecoderHandler().settings
        conf.get_settings()
    except Exception:
        return []  # check_settings reports it
    has_torch = importlib.util.find_spec("torch") is not None
    warnings: list[checks.CheckMessage] = []
    for alias, cfg in settings.items():
        options = cfg.get("OPTIONS") or {}
        if options.get("RUN", RUN_LOCAL) != RUN_LOCAL or not cfg.get("BACKEND"):
            continue
        try:
            backend = import_string(cfg["BACKEND"])
        except ImportError as exc:
            reason = f"its backend {cfg['BACKEND']!r} cannot be imported here ({exc})"
        else:
            if has_torch or not getattr(backend, "needs_torch", False):
                continue
            reason = "it needs torch, which is not installed here"
        warnings.append(
            checks.Warning(
                f"Decoder {alias!r} decodes in this process, but {reason}: decode() and cache "
                "misses of its pictures would fail here.",
                id="latentstore.W044",
                hint=f"Set LATENTSTORE['DECODERS'][{alias!r}]['OPTIONS']['RUN'] = 'worker' so "
                "GPU workers decode, or install the worker extra here "
                "(pip install 'latentstore[worker]').",
            )
        )
    return warnings

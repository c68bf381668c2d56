"""Celery tasks that need no model: the sweeper (run it from Celery beat)."""

from __future__ import annotations

from celery import shared_task

from latentstore import encoding


@shared_task(name="latentstore.sweep", ignore_result=True)
def sweep() -> dict[str, int]:
    """Re-enqueue rows stuck pending/encoding past their lease; fail those past the cap."""
    result = encoding.sweep()
    return {"requeued": result.requeued, "failed": result.failed, "not_sent": result.not_sent}

"""The runnable example project: settings, the Celery app, URLs and a demo app (Photo)."""

# Importing the Celery app here makes it the current app in every Django process, so
# latentstore's on-commit enqueue (send_task by name) uses this project's broker settings.
from project.celery import app as celery_app

__all__ = ("celery_app",)

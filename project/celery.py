"""The example project's Celery app.

The web tier only ever sends tasks by name (latentstore never imports the worker code);
``include`` makes the worker process import the torch side when it starts.
"""

import os

from celery import Celery

from latentstore.celery_config import configure

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("project", include=["latentstore.tasks", "latentstore_workers.tasks"])
app.config_from_object("django.conf:settings", namespace="CELERY")
configure(app)

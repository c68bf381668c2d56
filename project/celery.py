"""The example project's Celery app: Celery's standard file for Django, plus configure(app).

The web tier only ever sends tasks by name (latentstore never imports the worker code);
``configure`` registers latentstore's task modules, which a worker imports when it starts, and
schedules the sweeper on beat (``project/settings.py`` sets its own entry, which is kept).
"""

import os

from celery import Celery

from latentstore.celery_config import configure

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
configure(app)

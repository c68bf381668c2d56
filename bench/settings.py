"""Django settings of the benchmark: the example project's, configured from the environment.

``bench/gpu_bench.py`` sets ``LATENTSTORE_BENCH`` (the LATENTSTORE setting as JSON),
``DATABASE_URL``, ``CELERY_BROKER_URL``, ``CELERY_BROKER_KEYPREFIX`` and
``LATENTSTORE_BENCH_DB`` (its own throw-away database) for itself and for the Celery worker it
starts, so both processes see the same model, database and queues.
"""

import json
import os

from project.settings import *  # noqa: F403
from project.settings import DATABASES

if os.environ.get("LATENTSTORE_BENCH"):
    LATENTSTORE = json.loads(os.environ["LATENTSTORE_BENCH"])

if os.environ.get("LATENTSTORE_BENCH_DB"):
    DATABASES["default"]["TEST"] = {"NAME": os.environ["LATENTSTORE_BENCH_DB"]}

CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
LOGGING_CONFIG = None  # the benchmark prints its own table; workers log warnings to stderr

"""Settings of the load benchmark (``bench/serve_bench.py``): the example project's, plus two
comparison routes (``bench/serve_urls.py``).

Everything else comes from ``project/settings.py`` and the environment the benchmark sets
(``DATABASE_URL``, ``CELERY_BROKER_URL``, ``REDIS_CACHE_URL``, ``CELERY_BROKER_KEYPREFIX``,
``LATENTSTORE_PRETRAINED``). The ``LATENTSTORE_BENCH_*`` variables below are the benchmark's
own; unset, the project's defaults hold.
"""

import os

from project.settings import *  # noqa: F403
from project.settings import CACHES, CELERY_BEAT_SCHEDULE, LATENTSTORE

ROOT_URLCONF = "bench.serve_urls"

#: The thumbnails the trivial view and ``django.views.static.serve`` answer with.
BENCH_FILES_DIR = os.environ.get("LATENTSTORE_BENCH_FILES", "")

# One key prefix per run in the shared cache, so the benchmark never touches other keys.
if os.environ.get("LATENTSTORE_BENCH_CACHE_PREFIX") and "KEY_PREFIX" not in CACHES["default"]:
    CACHES["default"]["KEY_PREFIX"] = os.environ["LATENTSTORE_BENCH_CACHE_PREFIX"]

# Short runs (the benchmark's own test) may shorten the lease and the sweep interval.
if os.environ.get("LATENTSTORE_BENCH_LEASE_SECONDS"):
    LATENTSTORE = {
        **LATENTSTORE,
        "LEASE_SECONDS": float(os.environ["LATENTSTORE_BENCH_LEASE_SECONDS"]),
    }
if os.environ.get("LATENTSTORE_BENCH_SWEEP_SECONDS"):
    CELERY_BEAT_SCHEDULE = {
        name: {**entry, "schedule": float(os.environ["LATENTSTORE_BENCH_SWEEP_SECONDS"])}
        for name, entry in CELERY_BEAT_SCHEDULE.items()
    }

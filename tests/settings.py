"""Settings for the test suite: real PostgreSQL and Redis on 127.0.0.1 when they are there.

Without PostgreSQL the suite runs on SQLite and the tests that need PostgreSQL skip, saying so;
without Redis the Redis tests skip. ``LATENTSTORE_TEST_DB=sqlite`` forces SQLite.
"""

import json
import os
import socket
import tempfile
import uuid

from project.settings import *  # noqa: F403
from project.settings import INSTALLED_APPS


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


POSTGRES_AVAILABLE = os.environ.get("LATENTSTORE_TEST_DB") != "sqlite" and _reachable(5432)
REDIS_AVAILABLE = _reachable(6379)
REDIS_URL = os.environ.get("LATENTSTORE_TEST_REDIS", "redis://127.0.0.1:6379/13")

TEST_VAR_DIR = tempfile.mkdtemp(prefix="latentstore-tests-")

if POSTGRES_AVAILABLE:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": "postgres",
            "USER": os.environ.get("PGUSER", "postgres"),
            "HOST": "127.0.0.1",
            "PORT": "5432",
            # pytest-xdist-free suite; one test database per run, named per process so two
            # runs on one machine (a developer and CI) do not drop each other's database.
            "TEST": {"NAME": f"test_latentstore_{os.getpid()}"},
        }
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.path.join(TEST_VAR_DIR, "db.sqlite3"),
            "TEST": {"NAME": os.path.join(TEST_VAR_DIR, "test.sqlite3")},
            "OPTIONS": {"timeout": 30},
        }
    }

CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
}
if REDIS_AVAILABLE:
    CACHES["redis"] = {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": f"lstest-{uuid.uuid4().hex[:8]}",
    }
    # latentstore's own Redis backend (persistent clients, no pickle), same per-run prefix rule.
    CACHES["latents-redis"] = {
        "BACKEND": "latentstore.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": f"lstest-{uuid.uuid4().hex[:8]}",
    }

STORAGES = {
    "default": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": os.path.join(TEST_VAR_DIR, "media")},
    },
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# A command run as a subprocess by a test reads the files that test wrote.
if os.environ.get("LATENTSTORE_TEST_MEDIA"):
    STORAGES["default"]["OPTIONS"]["location"] = os.environ["LATENTSTORE_TEST_MEDIA"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# S3 for real: django-storages against moto's server mode, which tests/conftest.py (s3_server)
# starts on this port. Set in the environment so worker and command subprocesses agree.
S3_PORT = int(os.environ.setdefault("LATENTSTORE_TEST_S3_PORT", str(_free_port())))
STORAGES["s3"] = {
    "BACKEND": "storages.backends.s3.S3Storage",
    "OPTIONS": {
        "bucket_name": "latentstore-tests",
        "endpoint_url": f"http://127.0.0.1:{S3_PORT}",
        "access_key": "testing",
        "secret_key": "testing",
        "region_name": "us-east-1",
        "addressing_style": "path",
        "querystring_auth": False,
        "file_overwrite": True,
    },
}

# Messages of this run live under their own key prefix, so concurrent runs share Redis safely.
CELERY_BROKER_URL = REDIS_URL if REDIS_AVAILABLE else "memory://"
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "global_keyprefix": os.environ.get("LATENTSTORE_TEST_KEYPREFIX")
    or f"lstest-{uuid.uuid4().hex[:8]}:",
    # Redis BRPOP waits this long (default 1 s): every test worker's shutdown waits for it.
    "polling_interval": 0.2,
}

# A worker process started by a test joins that test's database, queues and LATENTSTORE.
if os.environ.get("LATENTSTORE_TEST_DB_NAME") and POSTGRES_AVAILABLE:
    DATABASES["default"]["NAME"] = os.environ["LATENTSTORE_TEST_DB_NAME"]
    # A fault test may route the worker's database through a proxy it can cut.
    DATABASES["default"]["PORT"] = os.environ.get("LATENTSTORE_TEST_DB_PORT", "5432")
    DATABASES["default"]["OPTIONS"] = {"connect_timeout": 3}
if os.environ.get("LATENTSTORE_TEST_CONFIG"):
    LATENTSTORE = json.loads(os.environ["LATENTSTORE_TEST_CONFIG"])

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
INSTALLED_APPS = [*INSTALLED_APPS, "tests.testapp"]

"""Example settings.

Embedded defaults need no server: SQLite and kombu's filesystem broker under ``var/``.
Set ``DATABASE_URL`` (postgresql://...) and ``CELERY_BROKER_URL`` (redis://...) to run the same
thing on PostgreSQL and Redis; ``REDIS_CACHE_URL`` puts decoded images in Redis.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("LATENTSTORE_VAR_DIR", BASE_DIR / "var"))

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "dev-only-insecure-key-change-me")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["*"] if DEBUG else os.environ.get("DJANGO_ALLOWED_HOSTS", "").split(",")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "latentstore",
    "project.apps.DemoConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def database_from_url(url: str) -> dict:
    """Parse ``postgresql://user:pass@host:port/name`` or ``sqlite:///path`` (DATABASES)."""
    parts = urlparse(url)
    if parts.scheme in ("postgres", "postgresql"):
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": unquote(parts.path.lstrip("/")),
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
        }
    if parts.scheme == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": unquote(parts.path) or ":memory:"}
    raise ValueError(
        f"Unsupported DATABASE_URL scheme {parts.scheme!r} (postgresql:// or sqlite://)"
    )


DATABASES = {
    "default": database_from_url(
        os.environ.get("DATABASE_URL", f"sqlite:///{VAR_DIR / 'latentstore.sqlite3'}")
    )
}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # The demo's worker writes while the demo reads: wait for the lock instead of failing.
    DATABASES["default"]["OPTIONS"] = {"timeout": 30}
else:
    # Persistent connections, checked before reuse: with CONN_MAX_AGE=0 every picture request
    # opened a new PostgreSQL connection (215 req/s warm here, against ~1,000 with 60).
    DATABASES["default"]["CONN_MAX_AGE"] = 60
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

if os.environ.get("REDIS_CACHE_URL"):
    CACHES = {
        "default": {
            # Django's RedisCache with one client per process and no pickle.
            "BACKEND": "latentstore.cache.RedisCache",
            "LOCATION": os.environ["REDIS_CACHE_URL"],
        }
    }
else:
    # File-based so the worker process and the web process share decoded images.
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(VAR_DIR / "cache"),
        }
    }

STORAGES = {
    "default": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(VAR_DIR / "media")},
    },
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
MEDIA_URL = "media/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- latentstore -------------------------------------------------------------------------------
SD_VAE = "stabilityai/sd-vae-ft-mse"


def hf_cache_has(repo_id: str) -> bool:
    """Whether a hub model's safetensors weights are in the local Hugging Face cache.

    Reads the cache layout directly (no huggingface_hub import: the web tier does not need it).
    """
    hf_home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    hub = Path(os.environ.get("HF_HUB_CACHE") or hf_home / "hub")
    snapshots = hub / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return any(snapshots.glob("*/diffusion_pytorch_model.safetensors"))


def default_autoencoder() -> tuple[str, str]:
    """``(PRETRAINED, FAMILY)``: LATENTSTORE_PRETRAINED, else the SD VAE when it is on disk,
    else the small autoencoder that ships with latentstore (no download needed)."""
    if os.environ.get("LATENTSTORE_PRETRAINED"):
        return os.environ["LATENTSTORE_PRETRAINED"], os.environ.get("LATENTSTORE_FAMILY", "sd")
    if hf_cache_has(SD_VAE):
        return SD_VAE, "sd"
    from latentstore_workers.pretrained import LS_SMALL, LS_SMALL_FAMILY  # paths only, no torch

    return str(LS_SMALL), LS_SMALL_FAMILY


_PRETRAINED, _FAMILY = default_autoencoder()
LATENTSTORE = {
    "AUTOENCODERS": {
        "default": {
            # A hub id or a local directory written by diffusers' save_pretrained.
            "PRETRAINED": _PRETRAINED,
            "FAMILY": _FAMILY,
            "DTYPE": "float16",
            "DEVICE": "auto",
        },
    },
    "CACHE": "default",
}

# --- Celery ------------------------------------------------------------------------------------
# Reliability settings (acks_late, JSON only, prefetch 1, ...) are applied by
# latentstore.celery_config.configure(app) in project/celery.py; only the transport is chosen here.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "filesystem://")
if CELERY_BROKER_URL.startswith("filesystem://"):
    _broker_dir = VAR_DIR / "broker"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        # The option is processed_folder (a misspelt key silently loses messages).
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
        "polling_interval": 0.1,
    }
elif os.environ.get("CELERY_BROKER_KEYPREFIX"):
    # Several projects (or test runs) can share one Redis without taking each other's messages.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"global_keyprefix": os.environ["CELERY_BROKER_KEYPREFIX"]}

# The sweeper re-enqueues rows whose message was lost (run `celery -A project beat`).
CELERY_BEAT_SCHEDULE = {
    "latentstore-sweep": {"task": "latentstore.sweep", "schedule": 60.0},
}

"""System checks for the LATENTSTORE setting (``manage.py check``)."""

from __future__ import annotations

from typing import Any

from django.core import checks
from django.core.cache import caches
from django.core.cache.backends.locmem import LocMemCache
from django.utils.module_loading import import_string

from latentstore import conf


@checks.register("latentstore")
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    try:
        settings = conf.get_settings()
    except Exception as exc:  # a setting that cannot even be merged
        return [checks.Error(f"LATENTSTORE cannot be read: {exc}", id="latentstore.E001")]

    from latentstore.families import FAMILIES

    autoencoders = settings["AUTOENCODERS"]
    if not autoencoders:
        errors.append(
            checks.Error(
                "LATENTSTORE['AUTOENCODERS'] is empty.",
                id="latentstore.E002",
                hint="Configure at least a 'default' autoencoder.",
            )
        )
    for alias, cfg in autoencoders.items():
        if not cfg.get("PRETRAINED"):
            errors.append(
                checks.Error(
                    f"Autoencoder {alias!r} has no PRETRAINED.",
                    id="latentstore.E003",
                    hint="A hub id such as 'stabilityai/sd-vae-ft-mse' or a local directory "
                    "written by save_pretrained.",
                )
            )
        if cfg.get("FAMILY") not in FAMILIES:
            errors.append(
                checks.Error(
                    f"Autoencoder {alias!r} has unknown FAMILY {cfg.get('FAMILY')!r}.",
                    id="latentstore.E004",
                    hint=f"Known families: {', '.join(sorted(FAMILIES))}.",
                )
            )
        if cfg.get("DTYPE") not in ("float32", "float16", "bfloat16"):
            errors.append(
                checks.Error(
                    f"Autoencoder {alias!r} has DTYPE {cfg.get('DTYPE')!r}.",
                    id="latentstore.E006",
                    hint="Use 'float32', 'float16' or 'bfloat16'.",
                )
            )

    from latentstore.decoders import DecoderHandler

    handler = DecoderHandler()
    for alias, cfg in handler.settings.items():
        backend = cfg.get("BACKEND")
        if not backend:
            errors.append(checks.Error(f"Decoder {alias!r} has no BACKEND.", id="latentstore.E007"))
            continue
        options = cfg.get("OPTIONS", {}) or {}
        target = options.get("autoencoder")
        if target is not None and target not in autoencoders:
            errors.append(
                checks.Error(
                    f"Decoder {alias!r} is configured for autoencoder {target!r}, which does not "
                    "exist.",
                    id="latentstore.E008",
                    hint=f"Configured autoencoders: {', '.join(sorted(autoencoders))}.",
                )
            )
        if options.get("RUN", "local") not in ("local", "worker"):
            errors.append(
                checks.Error(
                    f"Decoder {alias!r} has RUN={options.get('RUN')!r}.",
                    id="latentstore.E009",
                    hint="Use 'local' or 'worker'.",
                )
            )
        if not backend.startswith("workers."):
            # The web tier must be able to import its own backends (worker ones load torch).
            try:
                import_string(backend)
            except ImportError as exc:
                errors.append(
                    checks.Error(
                        f"Decoder {alias!r}: cannot import {backend!r}: {exc}",
                        id="latentstore.E012",
                    )
                )
        if options.get("RUN") == "worker":
            try:
                cache = caches[settings["CACHE"]]
            except Exception:
                cache = None
            if isinstance(cache, LocMemCache):
                errors.append(
                    checks.Error(
                        f"Decoder {alias!r} runs on workers but LATENTSTORE['CACHE'] is a LocMem "
                        "cache, which workers cannot write to.",
                        id="latentstore.E013",
                        hint="Use Redis, Memcached, the database or file-based cache.",
                    )
                )

    try:
        caches[settings["CACHE"]]
    except Exception as exc:
        errors.append(
            checks.Error(
                f"LATENTSTORE['CACHE'] = {settings['CACHE']!r}: {exc}",
                id="latentstore.E014",
                hint="Name an alias of CACHES.",
            )
        )
    if settings["LATENT_DTYPE"] not in ("float16", "int8"):
        errors.append(
            checks.Error(
                f"LATENT_DTYPE {settings['LATENT_DTYPE']!r} is not 'float16' or 'int8'.",
                id="latentstore.E015",
            )
        )

    try:
        from celery import current_app

        accepted = {str(c).lower() for c in current_app.conf.accept_content or ()}
        serializer = str(current_app.conf.task_serializer).lower()
    except Exception:  # pragma: no cover - Celery is a dependency
        accepted, serializer = set(), "json"
    if (
        "pickle" in accepted
        or "application/x-python-serialize" in accepted
        or serializer == "pickle"
    ):
        errors.append(
            checks.Error(
                "The Celery app accepts pickle; latentstore requires JSON only.",
                id="latentstore.E005",
                hint="Call latentstore.celery_config.configure(app) and do not override "
                "accept_content/task_serializer.",
            )
        )
    return errors


@checks.register("latentstore", checks.Tags.urls)
def check_urls(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Signed picture URLs (``url()``, ``{% latent_img %}``, the admin) need latentstore.urls."""
    from django.urls import NoReverseMatch, reverse

    try:
        reverse("latentstore:picture", kwargs={"token": "T", "ext": "png"})
    except NoReverseMatch:
        return [
            checks.Warning(
                "latentstore.urls is not included in ROOT_URLCONF: image.url(), "
                "{% latent_img %} and the admin's thumbnails cannot link pictures.",
                id="latentstore.W001",
                hint="Add path('latents/', include('latentstore.urls')) to your urlpatterns.",
            )
        ]
    except Exception:  # a broken URLconf is reported by Django's own checks
        return []
    return []

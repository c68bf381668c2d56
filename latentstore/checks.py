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

    errors += _check_worker_settings(settings)

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


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_worker_settings(settings: dict[str, Any]) -> list[checks.CheckMessage]:
    """How workers batch and run models (IDs E050-E059, issue 5)."""
    errors: list[checks.CheckMessage] = []
    for key in ("ENCODE_BATCH_SIZE", "DECODE_BATCH_SIZE", "PIXEL_THREADS"):
        if not _positive_int(settings.get(key)):
            errors.append(
                checks.Error(
                    f"LATENTSTORE[{key!r}] = {settings.get(key)!r} is not a positive integer.",
                    id="latentstore.E050",
                )
            )
    budget = settings.get("MEMORY_BUDGET")
    if budget is not None and not _positive_int(budget):
        errors.append(
            checks.Error(
                f"LATENTSTORE['MEMORY_BUDGET'] = {budget!r} is not a number of bytes.",
                id="latentstore.E051",
                hint="None (80 % of free GPU memory, a quarter of RAM on CPU) or bytes, "
                "e.g. 16 * 2**30.",
            )
        )
    drain = settings.get("DRAIN_SECONDS")
    if not (isinstance(drain, (int, float)) and not isinstance(drain, bool) and drain >= 0):
        errors.append(
            checks.Error(
                f"LATENTSTORE['DRAIN_SECONDS'] = {drain!r} must be seconds (>= 0).",
                id="latentstore.E057",
            )
        )
    delays = settings.get("RETRY_DELAYS")
    if not all(isinstance(d, (int, float)) and d >= 0 for d in delays or ()):
        errors.append(
            checks.Error(
                f"LATENTSTORE['RETRY_DELAYS'] = {delays!r} must be seconds (>= 0).",
                id="latentstore.E056",
            )
        )
    for alias, cfg in settings["AUTOENCODERS"].items():
        if cfg.get("CPU_DTYPE") not in ("float32", "float16", "bfloat16"):
            errors.append(
                checks.Error(
                    f"Autoencoder {alias!r} has CPU_DTYPE {cfg.get('CPU_DTYPE')!r}.",
                    id="latentstore.E052",
                    hint="Use 'float32' (the default), 'float16' or 'bfloat16'.",
                )
            )
        tile = cfg.get("TILE_SIZE")
        if not _positive_int(tile) or tile % 8:
            errors.append(
                checks.Error(
                    f"Autoencoder {alias!r} has TILE_SIZE {tile!r}.",
                    id="latentstore.E053",
                    hint="Pixels per tile side: a positive multiple of the model's downsampling "
                    "(8 for the SD families), e.g. 512.",
                )
            )
        above = cfg.get("TILE_ABOVE_PIXELS")
        overlap = cfg.get("TILE_OVERLAP")
        if (above is not None and not (isinstance(above, int) and above >= 0)) or not (
            isinstance(overlap, (int, float)) and 0 <= overlap < 1
        ):
            errors.append(
                checks.Error(
                    f"Autoencoder {alias!r} has TILE_ABOVE_PIXELS {above!r} / TILE_OVERLAP "
                    f"{overlap!r}.",
                    id="latentstore.E054",
                    hint="TILE_ABOVE_PIXELS: None (never tile) or a pixel count; TILE_OVERLAP: "
                    "a fraction in [0, 1).",
                )
            )
        compile_spec = cfg.get("COMPILE")
        if not isinstance(compile_spec, (bool, dict)):
            errors.append(
                checks.Error(
                    f"Autoencoder {alias!r} has COMPILE {compile_spec!r}.",
                    id="latentstore.E055",
                    hint="False, True, or a dict of torch.compile options such as "
                    "{'mode': 'max-autotune'}.",
                )
            )
    return errors

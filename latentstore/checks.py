"""System checks for the LATENTSTORE setting (``manage.py check``)."""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core import checks
from django.core.cache import caches
from django.core.cache.backends.locmem import LocMemCache
from django.utils.module_loading import import_string

from latentstore import conf
from latentstore.decoders import DecoderConfigError, DecoderHandler
from latentstore.families import FAMILIES
from latentstore.fields import LatentImageField
from latentstore.latents import STORAGE_DTYPES
from latentstore.quality import option_problems
from latentstore.queries import declared_latent_fields


@checks.register("latentstore")
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """The LATENTSTORE setting: autoencoders, workers, decoders, cache, storage, quality, and a
    Celery app that accepts JSON only."""
    try:
        settings = conf.get_settings()
    except Exception as exc:  # a setting that cannot even be merged
        return [checks.Error(f"LATENTSTORE cannot be read: {exc}", id="latentstore.E001")]
    return [
        *_check_autoencoders(settings["AUTOENCODERS"]),
        *_check_worker_settings(settings),
        *_check_decoders(settings),
        *_check_cache_and_dtype(settings),
        *_check_quality_settings(settings),
        *_check_serializer(),
    ]


def _check_autoencoders(autoencoders: dict[str, Any]) -> list[checks.CheckMessage]:
    """Each autoencoder names weights, a known family and a dtype (E002-E004, E006)."""
    if not autoencoders:
        return [
            checks.Error(
                "LATENTSTORE['AUTOENCODERS'] is empty.",
                id="latentstore.E002",
                hint="Configure at least a 'default' autoencoder.",
            )
        ]
    errors: list[checks.CheckMessage] = []
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
    return errors


def _check_decoders(settings: dict[str, Any]) -> list[checks.CheckMessage]:
    """Each decoder has a backend that imports and builds, for autoencoders that exist
    (E007-E009, E012, E013, E020, E022)."""
    autoencoders = settings["AUTOENCODERS"]
    errors: list[checks.CheckMessage] = []
    for alias, cfg in DecoderHandler().settings.items():
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
        errors.extend(_check_backend(alias, backend, options, autoencoders, errors))
        if options.get("RUN") == "worker" and _is_locmem(settings["CACHE"]):
            errors.append(
                checks.Error(
                    f"Decoder {alias!r} runs on workers but LATENTSTORE['CACHE'] is a LocMem "
                    "cache, which workers cannot write to.",
                    id="latentstore.E013",
                    hint="Use Redis, Memcached, the database or file-based cache.",
                )
            )
    return errors


def _is_locmem(alias: str) -> bool:
    try:
        return isinstance(caches[alias], LocMemCache)
    except Exception:
        return False  # an unknown alias is E014's to report


def _check_cache_and_dtype(settings: dict[str, Any]) -> list[checks.CheckMessage]:
    """CACHE names a Django cache (E014); LATENT_DTYPE is a storage dtype (E015)."""
    errors: list[checks.CheckMessage] = []
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
    if settings["LATENT_DTYPE"] not in STORAGE_DTYPES:
        errors.append(
            checks.Error(
                f"LATENT_DTYPE {settings['LATENT_DTYPE']!r} is not one of "
                f"{', '.join(map(repr, STORAGE_DTYPES))}.",
                id="latentstore.E015",
            )
        )
    return errors


def _check_serializer() -> list[checks.CheckMessage]:
    """The Celery app accepts JSON only: no pickle, anywhere (E005)."""
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
        return [
            checks.Error(
                "The Celery app accepts pickle; latentstore requires JSON only.",
                id="latentstore.E005",
                hint="Call latentstore.celery_config.configure(app) and do not override "
                "accept_content/task_serializer.",
            )
        ]
    return []


def _build(alias: str, cfg: dict[str, Any]) -> Any:
    """The backend of decoder ``alias`` built as the registry would, or None if it cannot be."""
    try:
        return import_string(cfg["BACKEND"])(alias, **(cfg.get("OPTIONS") or {}))
    except Exception:
        return None


def _check_backend(
    alias: str,
    backend: str,
    options: dict[str, Any],
    autoencoders: dict[str, Any],
    reported: list[checks.CheckMessage],
) -> list[checks.CheckMessage]:
    """Import and build one decoder as the registry would; check what it reads."""
    try:
        backend_cls = import_string(backend)
    except ImportError as exc:
        if backend.startswith("latentstore_workers."):
            return []  # a worker-only module may need torch, which a web host may lack
        message = f"Decoder {alias!r}: cannot import {backend!r}: {exc}"
        return [checks.Error(message, id="latentstore.E012")]
    try:
        instance = backend_cls(alias, **options)
    except DecoderConfigError as exc:
        already = {(e.id, e.msg) for e in reported}
        if exc.check_id in ("latentstore.E008", "latentstore.E009") and any(
            e_id == exc.check_id and repr(alias) in msg for e_id, msg in already
        ):
            return []  # said already by the generic check above
        return [checks.Error(str(exc), hint=exc.hint, id=exc.check_id)]
    except Exception as exc:
        return [
            checks.Error(
                f"Decoder {alias!r} ({backend}) cannot be built from its OPTIONS: "
                f"{type(exc).__name__}: {exc}",
                id="latentstore.E020",
            )
        ]
    target = options.get("autoencoder")
    families = instance.readable_families()
    family = autoencoders.get(target, {}).get("FAMILY") if target is not None else None
    if family is not None and families is not None and family not in families:
        return [
            checks.Error(
                f"Decoder {alias!r} is configured for autoencoder {target!r}, whose {family!r} "
                f"latents it cannot read (it reads {', '.join(map(repr, families)) or 'none'}).",
                id="latentstore.E022",
                hint="Point it at an autoencoder of a family it reads, or use another backend.",
            )
        ]
    return []


@checks.register("latentstore", checks.Tags.models)
def check_fields(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Each LatentImageField names a configured autoencoder and a decoder that can read it."""
    try:
        settings = conf.get_settings()
    except Exception:
        return []  # check_settings reports it
    handler = DecoderHandler()
    built: dict[str, Any] = {}
    errors: list[checks.CheckMessage] = []
    for app_config in app_configs or apps.get_app_configs():
        for model in app_config.get_models():
            for field in declared_latent_fields(model):
                errors += _field_errors(field, settings["AUTOENCODERS"], handler, built)
    return errors


def _field_errors(
    field: LatentImageField,
    autoencoders: dict[str, Any],
    handler: DecoderHandler,
    built: dict[str, Any],
) -> list[checks.CheckMessage]:
    """E025, E026 and E022 for one field; ``built`` remembers the decoders built so far."""
    errors: list[checks.CheckMessage] = []
    ae = autoencoders.get(field.autoencoder)
    if ae is None:
        errors.append(
            checks.Error(
                f"autoencoder={field.autoencoder!r} is not in LATENTSTORE['AUTOENCODERS'].",
                obj=field,
                id="latentstore.E025",
                hint=f"Configured autoencoders: {', '.join(sorted(autoencoders))}.",
            )
        )
    if field.decoder not in handler.settings:
        errors.append(
            checks.Error(
                f"decoder={field.decoder!r} is not in LATENTSTORE['DECODERS'].",
                obj=field,
                id="latentstore.E026",
                hint=f"Configured decoders: {', '.join(handler.settings)}.",
            )
        )
        return errors
    if ae is None:
        return errors
    if field.decoder not in built:
        built[field.decoder] = _build(field.decoder, handler.settings[field.decoder])
    backend = built[field.decoder]
    families = backend.readable_families() if backend is not None else None
    if families is not None and ae.get("FAMILY") not in families:
        errors.append(
            checks.Error(
                f"decoder={field.decoder!r} reads {', '.join(map(repr, families)) or 'no'} "
                f"latents, but autoencoder={field.autoencoder!r} writes {ae.get('FAMILY')!r} "
                "latents.",
                obj=field,
                id="latentstore.E022",
                hint="Choose a decoder that reads the autoencoder's family.",
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


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_worker_settings(settings: dict[str, Any]) -> list[checks.CheckMessage]:
    """How workers batch and run models (IDs E050-E059)."""
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
    for key in ("DRAIN_SECONDS", "FILL_WAIT_SECONDS"):
        seconds = settings.get(key)
        if not (
            isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds >= 0
        ):
            errors.append(
                checks.Error(
                    f"LATENTSTORE[{key!r}] = {seconds!r} must be seconds (>= 0).",
                    id="latentstore.E057",
                )
            )
    errors += _check_cpu_settings(settings)
    delays = settings.get("RETRY_DELAYS")
    if not all(isinstance(d, (int, float)) and d >= 0 for d in delays or ()):
        errors.append(
            checks.Error(
                f"LATENTSTORE['RETRY_DELAYS'] = {delays!r} must be seconds (>= 0).",
                id="latentstore.E056",
            )
        )
    for alias, cfg in settings["AUTOENCODERS"].items():
        errors += _check_autoencoder_runtime(alias, cfg)
    return errors


def _check_cpu_settings(settings: dict[str, Any]) -> list[checks.CheckMessage]:
    """How a CPU worker sizes its batches and threads (E058)."""
    errors: list[checks.CheckMessage] = []
    batch = settings.get("CPU_BATCH_SIZE")
    if not (batch is None or batch == "auto" or _positive_int(batch)):
        errors.append(
            checks.Error(
                f"LATENTSTORE['CPU_BATCH_SIZE'] = {batch!r}.",
                id="latentstore.E058",
                hint='"auto" (measured), a positive integer, or None (the memory plan).',
            )
        )
    threads = settings.get("CPU_THREADS")
    if not (threads is None or _positive_int(threads)):
        errors.append(
            checks.Error(
                f"LATENTSTORE['CPU_THREADS'] = {threads!r} is not a positive integer.",
                id="latentstore.E058",
                hint="None: torch's default, one thread per core the worker may use.",
            )
        )
    return errors


def _check_autoencoder_runtime(alias: str, cfg: dict[str, Any]) -> list[checks.CheckMessage]:
    """How a worker runs one autoencoder: CPU dtype, tiling, compilation, layout (E052-E055,
    E059)."""
    errors: list[checks.CheckMessage] = []
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
    layout = cfg.get("CHANNELS_LAST")
    if not (isinstance(layout, bool) or (isinstance(layout, str) and layout.lower() == "auto")):
        errors.append(
            checks.Error(
                f"Autoencoder {alias!r} has CHANNELS_LAST {layout!r}.",
                id="latentstore.E059",
                hint="'auto' (the default: on for a CPU, off for a GPU), True or False.",
            )
        )
    return errors


def _check_quality_settings(settings: dict[str, Any]) -> list[checks.CheckMessage]:
    """KEEP_ORIGINAL, QUALITY_CHECK and MIN_PSNR: the rules of a field's options (E030-E033),
    worded and numbered for the settings, where None is a bad value rather than "unset"."""
    problems = option_problems(
        settings["KEEP_ORIGINAL"],
        settings["QUALITY_CHECK"],
        settings["MIN_PSNR"],
        unset_allowed=False,
    )
    ids = {
        "keep_original": ("latentstore.E034", None),
        "quality_check": ("latentstore.E035", None),
        "min_psnr": ("latentstore.E036", "A PSNR threshold such as 20.0."),
    }
    errors = []
    for name, why in problems.items():
        check_id, hint = ids[name]
        key = name.upper()
        errors.append(checks.Error(f"{key} {settings[key]!r} {why}.", hint=hint, id=check_id))
    return errors

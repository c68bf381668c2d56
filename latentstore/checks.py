"""System checks for the LATENTSTORE setting (``manage.py check``)."""

from __future__ import annotations

from typing import Any

from django.apps import apps
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
        errors.extend(_check_backend(alias, backend, options, autoencoders, errors))
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
    from latentstore.latents import STORAGE_DTYPES

    if settings["LATENT_DTYPE"] not in STORAGE_DTYPES:
        errors.append(
            checks.Error(
                f"LATENT_DTYPE {settings['LATENT_DTYPE']!r} is not one of "
                f"{', '.join(map(repr, STORAGE_DTYPES))}.",
                id="latentstore.E015",
            )
        )

    errors += _check_quality_settings(settings)

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
    from latentstore.decoders import DecoderConfigError

    try:
        backend_cls = import_string(backend)
    except ImportError as exc:
        if backend.startswith("workers."):
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
    from latentstore.decoders import DecoderHandler
    from latentstore.fields import LatentImageField

    try:
        settings = conf.get_settings()
    except Exception:
        return []  # check_settings reports it
    autoencoders = settings["AUTOENCODERS"]
    handler = DecoderHandler()
    configs = app_configs or apps.get_app_configs()
    built: dict[str, Any] = {}
    errors: list[checks.CheckMessage] = []
    for app_config in configs:
        for model in app_config.get_models():
            for field in model._meta.local_fields:
                if not isinstance(field, LatentImageField):
                    continue
                ae = autoencoders.get(field.autoencoder)
                if ae is None:
                    errors.append(
                        checks.Error(
                            f"autoencoder={field.autoencoder!r} is not in "
                            "LATENTSTORE['AUTOENCODERS'].",
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
                    continue
                if ae is None:
                    continue
                if field.decoder not in built:
                    built[field.decoder] = _build(field.decoder, handler.settings[field.decoder])
                backend = built[field.decoder]
                families = backend.readable_families() if backend is not None else None
                if families is not None and ae.get("FAMILY") not in families:
                    errors.append(
                        checks.Error(
                            f"decoder={field.decoder!r} reads "
                            f"{', '.join(map(repr, families)) or 'no'} latents, but "
                            f"autoencoder={field.autoencoder!r} writes {ae.get('FAMILY')!r} "
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


def _check_quality_settings(settings: dict[str, Any]) -> list[checks.CheckMessage]:
    """KEEP_ORIGINAL, QUALITY_CHECK and MIN_PSNR: the rules of a field's options (E030-E033),
    worded and numbered for the settings, where None is a bad value rather than "unset"."""
    from latentstore.quality import option_problems

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

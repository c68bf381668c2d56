"""Finding LatentImageFields and their rows: the model's fields, listings without blobs, filters.

Every module that asks "which LatentImageFields does this model (or project) have?" asks here,
so the rule is written once: :func:`latent_fields_of` for one model (inherited fields included),
:func:`all_latent_fields` for the project (each field once, with the model that declares it).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

from django.apps import apps
from django.db import models

from latentstore.blobs import prefetch_blobs
from latentstore.fields import LatentImageField
from latentstore.quality import low_fidelity_q

__all__ = [
    "all_latent_fields",
    "declared_latent_fields",
    "get_field",
    "latent_fields_of",
    "low_fidelity",
    "prefetch_blobs",
    "without_blobs",
]


@functools.cache  # read per row by the admin's change list; a model's fields do not change
def latent_fields_of(model: type[models.Model]) -> tuple[LatentImageField, ...]:
    """The model's :class:`LatentImageField` s, in declaration order (inherited ones included)."""
    return tuple(f for f in model._meta.concrete_fields if isinstance(f, LatentImageField))


def declared_latent_fields(model: type[models.Model]) -> tuple[LatentImageField, ...]:
    """The :class:`LatentImageField` s whose columns are in ``model``'s own table: not those a
    multi-table child inherits, none for a proxy."""
    return tuple(f for f in latent_fields_of(model) if f.model is model)


def all_latent_fields() -> Iterator[tuple[type[models.Model], LatentImageField]]:
    """Every ``(model, field)`` of the installed models, each field once: with the concrete
    model that declares it (not again through a multi-table child or a proxy)."""
    for model in apps.get_models():
        for field in declared_latent_fields(model):
            yield model, field


def get_field(label: str, field_name: str) -> tuple[type[models.Model], LatentImageField]:
    """Resolve ``("app_label.Model", "image")`` to the model class and its LatentImageField.

    Raises ``LookupError`` for an unknown model, ``FieldDoesNotExist`` for an unknown field and
    ``TypeError`` for a field of another kind.
    """
    model = apps.get_model(label)
    field = model._meta.get_field(field_name)
    if not isinstance(field, LatentImageField):
        raise TypeError(f"{label}.{field_name} is not a LatentImageField")
    return model, field


def without_blobs(queryset: models.QuerySet) -> models.QuerySet:
    """Defer every latent blob and staged original of the queryset's model (for listings).

    ``state``, ``width``, ``height`` and ``digest`` stay loaded, so thumbnails that come from the
    decode cache need no blob at all.
    """
    names = []
    for field in latent_fields_of(queryset.model):
        names += [field.name, field.companion_attname("staged")]
    return queryset.defer(*names)


def low_fidelity(
    queryset: models.QuerySet, field: str | None = None, min_psnr: float | None = None
) -> models.QuerySet:
    """Rows of ``queryset`` whose measured round-trip PSNR is below the field's threshold.

    ``field`` names the LatentImageField (optional when the model has one); ``min_psnr``
    overrides the field's threshold. Rows never measured (gate off) are not included. The same
    as ``queryset.filter(<field>_psnr__lt=threshold)``.
    """
    candidates = list(latent_fields_of(queryset.model))
    fields = [f for f in candidates if field is None or f.name == field]
    if len(fields) != 1:
        names = ", ".join(f.name for f in candidates) or "none"
        raise ValueError(
            f"name one LatentImageField of {queryset.model._meta.label} "
            f"(field={field!r}; candidates: {names})"
        )
    (target,) = fields
    return queryset.filter(low_fidelity_q(target, min_psnr))

"""The columns a LatentImageField adds beside its own, and the row states they record.

The field owns one binary column (the latent blob); every other fact about the image lives in
companion columns named ``<field>_<suffix>`` (:data:`COMPANIONS`), which ``makemigrations``
writes like any other field.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, NamedTuple

from django.db import models
from django.db.models import F

EMPTY, PENDING, ENCODING, READY, FAILED = "empty", "pending", "encoding", "ready", "failed"
STATE_CHOICES = [
    (EMPTY, "empty"),
    (PENDING, "pending"),
    (ENCODING, "encoding"),
    (READY, "ready"),
    (FAILED, "failed"),
]

# The key in instance.__dict__ of the names of the LatentImageFields assigned since the object
# was loaded or last saved.
_DIRTY = "_latentstore_dirty"


def dirty(instance: models.Model) -> set[str]:
    """Names of ``instance``'s LatentImageFields that were assigned and not saved yet."""
    return instance.__dict__.setdefault(_DIRTY, set())


class CompanionField:
    """Mixin for the columns a LatentImageField adds next to its own.

    It knows its owner field so that a save which did not touch the image writes ``col = col``
    instead of the in-memory (possibly stale) value. When a migration state already carries the
    column (models rendered from migrations), the owner's copy is not added a second time.
    """

    def __init__(self, *args: Any, owner: str, **kwargs: Any) -> None:
        self.owner = owner
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> tuple[str, str, list, dict]:
        name, _path, args, kwargs = super().deconstruct()
        kwargs["owner"] = self.owner
        # Migrations name the classes where users import them (as Django shortens its own
        # fields' paths to django.db.models): moving the module must not alter migrations.
        return name, f"latentstore.fields.{type(self).__name__}", args, kwargs

    def contribute_to_class(self, cls: type[models.Model], name: str, **kwargs: Any) -> None:
        if any(f.name == name for f in cls._meta.local_fields):
            return
        super().contribute_to_class(cls, name, **kwargs)

    def pre_save(self, model_instance: models.Model, add: bool) -> Any:
        if add or self.owner in dirty(model_instance):
            return super().pre_save(model_instance, add)
        return F(self.attname)


class LatentStateField(CompanionField, models.CharField):
    pass


class LatentTokenField(CompanionField, models.UUIDField):
    pass


class LatentTextField(CompanionField, models.TextField):
    pass


class LatentCharField(CompanionField, models.CharField):
    pass


class LatentBytesField(CompanionField, models.BinaryField):
    pass


class LatentSizeField(CompanionField, models.PositiveIntegerField):
    pass


class LatentCountField(CompanionField, models.PositiveSmallIntegerField):
    pass


class LatentTimeField(CompanionField, models.DateTimeField):
    pass


class LatentFloatField(CompanionField, models.FloatField):
    pass


def companions(owner: str) -> dict[str, models.Field]:
    """New companion columns for a LatentImageField named ``owner``, keyed by suffix."""
    common = {"owner": owner, "editable": False}
    return {
        "state": LatentStateField(
            max_length=16, choices=STATE_CHOICES, default=EMPTY, db_index=True, **common
        ),
        "token": LatentTokenField(null=True, blank=True, **common),
        "error": LatentTextField(blank=True, default="", **common),
        "staged": LatentBytesField(null=True, blank=True, **common),
        "width": LatentSizeField(null=True, blank=True, **common),
        "height": LatentSizeField(null=True, blank=True, **common),
        "attempts": LatentCountField(default=0, **common),
        "changed": LatentTimeField(null=True, blank=True, **common),
        "digest": LatentCharField(max_length=64, blank=True, default="", **common),
        "autoencoder": LatentCharField(max_length=64, blank=True, default="", **common),
        "original": LatentCharField(max_length=255, blank=True, default="", **common),
        # Round-trip PSNR (dB) measured by the encode-time quality gate; None when not measured.
        "psnr": LatentFloatField(null=True, blank=True, **common),
    }


#: Suffixes of the companion columns (``<field>_<suffix>``).
COMPANIONS: tuple[str, ...] = tuple(companions("x"))
#: The value each companion column holds for an empty image.
COMPANION_DEFAULTS: dict[str, Any] = {k: f.get_default() for k, f in companions("x").items()}


def pending_upload(token: Any, autoencoder: str, now: Any) -> dict[str, Any]:
    """The companion values, by suffix, of a row whose image was (re)staged for encoding:
    every writer of a new upload (a save, a re-encode, an import) starts from these."""
    return {
        "state": PENDING,
        "token": token,
        "error": "",
        "attempts": 0,
        "changed": now,
        "digest": "",
        "autoencoder": autoencoder,
        "original": "",
        "psnr": None,
    }


def by_column(field: Any, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` keyed by suffix (``"latents"`` for the blob itself) → keyed by column name,
    ready for ``QuerySet.update()``."""
    return {
        (field.attname if key == "latents" else field.companion_attname(key)): value
        for key, value in values.items()
    }


class ImageFacts(NamedTuple):
    """A row's companion columns that a listing reads, at once (:meth:`LatentImage.facts`)."""

    state: str
    width: int | None
    height: int | None
    digest: str
    autoencoder: str
    error: str


@functools.lru_cache(maxsize=256)
def facts_reader(field: str) -> tuple[tuple[str, ...], operator.itemgetter[Any]]:
    """The attribute names of field ``field``'s :class:`ImageFacts`, and a getter that reads
    them out of an instance's ``__dict__`` in one call (``KeyError`` for a deferred one)."""
    names = tuple(f"{field}_{suffix}" for suffix in ImageFacts._fields)
    return names, operator.itemgetter(*names)

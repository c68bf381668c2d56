"""The latent blob as the descriptor holds it, and fetching it when the queryset deferred it.

A listing defers the blob (``latentstore.queries.without_blobs``): state, size and digest are
enough for a cached thumbnail. When a blob is needed after all it is fetched by one query per
row, or by :func:`prefetch_blobs` for many rows at once. A fetched blob is remembered beside the
instance, not written into the field's attribute, so the field stays deferred and a later
``save()`` does not send the blob back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.db import connections, models


class StoredBlob(bytes):
    """The latent blob exactly as read from the database (not a new upload)."""


class _StoredNone:
    """The database said NULL: no latents (yet).

    A sentinel rather than None because Model.__init__ cannot tell a NULL read from the database
    from a user's ``obj.image = None`` (which clears the image); ``values()`` shows it too.
    """

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "<no stored latents>"


STORED_NONE = _StoredNone()


def is_stored(value: Any) -> bool:
    """Whether ``value`` came from the database (a blob or NULL), not from an assignment."""
    return isinstance(value, (StoredBlob, _StoredNone))


def from_db(value: bytes | memoryview | None) -> StoredBlob | _StoredNone:
    """What the descriptor holds for a blob column's database value."""
    return STORED_NONE if value is None else StoredBlob(value)


_FETCHED = "_latentstore_fetched"


def forget(instance: models.Model, attname: str) -> None:
    """Drop the fetched copy of ``instance``'s blob column ``attname`` (after a refresh)."""
    instance.__dict__.get(_FETCHED, {}).pop(attname, None)


def fetched_blob(instance: models.Model, attname: str) -> StoredBlob | _StoredNone:
    """The deferred blob column ``attname`` of ``instance``: fetched once, then remembered."""
    memo = instance.__dict__.setdefault(_FETCHED, {})
    if attname not in memo:
        if instance.pk is None:
            return STORED_NONE
        manager = type(instance)._base_manager.db_manager(instance._state.db)
        memo[attname] = from_db(
            manager.filter(pk=instance.pk).values_list(attname, flat=True).first()
        )
    return memo[attname]


def prefetch_blobs(images: Iterable[Any]) -> None:
    """Fetch the deferred blobs of ``images`` (LatentImages) in one query per model and database.

    Each image then finds its blob exactly as its own first ``blob`` access would have, so a
    batch decode over rows of ``without_blobs`` reads them all at once instead of one query per
    row. Images whose blob is loaded or already fetched are left alone.
    """
    groups: dict[tuple[type[models.Model], str | None, str], dict[Any, list]] = {}
    for image in images:
        instance, attname = image.instance, image.field.attname
        if (
            instance.pk is None
            or attname in instance.__dict__
            or attname in instance.__dict__.get(_FETCHED, {})
        ):
            continue
        key = (type(instance), instance._state.db, attname)
        pk = instance._meta.pk.to_python(instance.pk)
        groups.setdefault(key, {}).setdefault(pk, []).append(instance)
    for (model, db, attname), by_pk in groups.items():
        manager = model._base_manager.db_manager(db)
        pks = list(by_pk)
        # SQLite caps the parameters of a query: as in_bulk(), ask in slices below the cap.
        step = connections[manager.db].features.max_query_params or len(pks)
        rows: dict[Any, Any] = {}
        for start in range(0, len(pks), step):
            page = manager.filter(pk__in=pks[start : start + step])
            rows.update(page.values_list("pk", attname))
        for pk, instances in by_pk.items():
            fetched = from_db(rows.get(pk))  # a deleted row: no latents
            for instance in instances:
                instance.__dict__.setdefault(_FETCHED, {})[attname] = fetched


def column(instance: models.Model, attname: str) -> Any:
    """The value of column ``attname``: as loaded, or read now when the queryset deferred it
    (not remembered: a large column such as the staged original is read only when asked)."""
    if attname in instance.__dict__:
        return instance.__dict__[attname]
    manager = type(instance)._base_manager.db_manager(instance._state.db)
    return manager.filter(pk=instance.pk).values_list(attname, flat=True).first()

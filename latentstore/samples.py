"""Ready rows as training samples: selecting them, their latent spaces, reading their latents.

What ``latents_export`` (:mod:`latentstore.exports`) and ``LatentDataset``
(:mod:`latentstore.training`) share:

* **Selecting rows**: a field by label, only ready rows, a ``--filter`` of queryset lookups,
  and walking them in primary-key order a page per query (:func:`keyset_pages`, or
  :func:`prefetched` with the next page read by a thread).
* **One latent space**: :func:`scan_origins` reads every selected blob's header (a
  ``substring`` of the column; no payload is read) and counts the origins (autoencoder alias,
  family, weights fingerprint, scaling and shift); more than one is refused unless mixing is
  asked for.
* **Reading latents**: :func:`read_latents` (float16 blobs as stored, verified) and
  :func:`model_space` (``(raw - shift_factor) * scaling_factor``, what trainers feed a model).
* **Model columns** beside the latents (captions, titles): :func:`column_specs`.

Numpy and Django only; no torch.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import numpy as np
from django.core.exceptions import FieldDoesNotExist, FieldError, ValidationError
from django.db import connections, models
from django.db.models.functions import Substr

from latentstore.columns import COMPANIONS, READY
from latentstore.fields import LatentImageField
from latentstore.latents import (
    MAX_HEADER_BYTES,
    LatentFormatError,
    LatentHeader,
    read_header,
    unpack,
)
from latentstore.queries import get_field, latent_fields_of

__all__ = [
    "ORIGIN_FIELDS",
    "SAMPLE_FIELDS",
    "ColumnSpec",
    "ExportError",
    "MixedOrigins",
    "Origin",
    "OriginScan",
    "apply_filter",
    "column_specs",
    "json_pk",
    "keyset_pages",
    "kind_of",
    "model_space",
    "parse_filter",
    "prefetched",
    "read_latents",
    "ready_rows",
    "resolve_field",
    "scan_origins",
]

#: Per-sample fields of every export (model columns may not reuse these names).
SAMPLE_FIELDS = ("pk", "latents", "width", "height", "pad_right", "pad_bottom", "crop", "digest")
#: Per-sample origin fields, added when latent spaces may be mixed.
ORIGIN_FIELDS = ("autoencoder", "family", "fingerprint", "scaling_factor", "shift_factor")

# Bytes of the blob the origin scan reads: the 10-byte prefix and a header (about 300 bytes for
# float16; about 1 KB for int8 with 16 channels). Longer headers are read again, a page of them
# in one query (see scan_origins).
_HEAD_BYTES = 1024
_LONG_HEAD_BYTES = 10 + MAX_HEADER_BYTES


class ExportError(Exception):
    """The export cannot start or go on; the message says why and what to do."""


class MixedOrigins(ExportError):
    """The selected rows were written by more than one autoencoder (or other weights)."""

    def __init__(self, message: str, origins: dict[Origin, int]) -> None:
        super().__init__(message)
        self.origins = origins


# --------------------------------------------------------------------------------------------
# selecting rows


def resolve_field(label: str) -> tuple[type[models.Model], LatentImageField]:
    """The model and LatentImageField of ``app_label.Model.field``."""
    parts = label.split(".")
    if len(parts) != 3:
        raise ExportError(f"{label!r}: name the field as app_label.Model.field.")
    try:
        return get_field(".".join(parts[:2]), parts[2])
    except (LookupError, FieldDoesNotExist, TypeError, ValueError) as exc:
        raise ExportError(f"{label!r}: {exc}") from None


def ready_rows(rows: models.QuerySet, field: LatentImageField) -> models.QuerySet:
    """``rows`` whose ``field`` holds latents (state ready and a blob)."""
    return rows.filter(
        **{field.companion_attname("state"): READY, f"{field.attname}__isnull": False}
    )


def parse_filter(text: str) -> dict[str, Any]:
    """The ``--filter`` JSON: an object of queryset lookups, e.g. ``{"title__startswith": "a"}``."""
    try:
        lookups = json.loads(text)
    except ValueError as exc:
        raise ExportError(f"--filter is not valid JSON: {exc}") from None
    if not isinstance(lookups, dict):
        raise ExportError(
            '--filter takes a JSON object of queryset lookups, e.g. {"title__startswith": "a"}.'
        )
    return lookups


def apply_filter(rows: models.QuerySet, lookups: dict[str, Any]) -> models.QuerySet:
    """``rows.filter(**lookups)``, with a bad lookup reported as an :class:`ExportError`."""
    try:
        filtered = rows.filter(**lookups)
        str(filtered.query)  # compiles the lookups: a bad value fails here, not mid-export
    except (FieldError, FieldDoesNotExist, ValueError, TypeError, ValidationError) as exc:
        raise ExportError(f"--filter: {exc}") from None
    return filtered


# --------------------------------------------------------------------------------------------
# origins


@dataclass(frozen=True, order=True)
class Origin:
    """The latent space of a stored latent: who wrote it and how to bring it to model space."""

    autoencoder: str
    family: str
    fingerprint: str
    scaling_factor: float
    shift_factor: float
    downsample: int

    @classmethod
    def of(cls, header: LatentHeader) -> Origin:
        return cls(
            header.autoencoder,
            header.family,
            header.fingerprint,
            header.scaling_factor,
            header.shift_factor,
            header.downsample,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "autoencoder": self.autoencoder,
            "family": self.family,
            "fingerprint": self.fingerprint,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "downsample": self.downsample,
        }

    def describe(self) -> str:
        return (
            f"autoencoder {self.autoencoder!r} (family {self.family!r}, weights "
            f"{self.fingerprint or '?'}, scaling {self.scaling_factor:g}, shift "
            f"{self.shift_factor:g})"
        )


@dataclass
class OriginScan:
    """What the header scan found: origins with row counts, storage dtypes, unreadable rows."""

    origins: dict[Origin, int] = dataclass_field(default_factory=dict)
    first_pk: dict[Origin, Any] = dataclass_field(default_factory=dict)
    storage_dtypes: dict[str, int] = dataclass_field(default_factory=dict)
    bad: dict[Any, str] = dataclass_field(default_factory=dict)
    pks: list[Any] | None = None
    rows: int = 0

    def add(self, pk: Any, header: LatentHeader) -> None:
        origin = Origin.of(header)
        self.rows += 1
        if origin not in self.origins:
            self.origins[origin] = 0
            self.first_pk[origin] = pk
        self.origins[origin] += 1
        self.storage_dtypes[header.dtype] = self.storage_dtypes.get(header.dtype, 0) + 1
        if self.pks is not None:
            self.pks.append(pk)

    def require_one(self, what: str = "export") -> None:
        """Raise :class:`MixedOrigins` when the rows come from more than one latent space."""
        if len(self.origins) <= 1:
            return
        lines = "; ".join(
            f"{n} rows from {o.describe()} (e.g. pk={self.first_pk[o]})"
            for o, n in sorted(self.origins.items(), key=lambda item: -item[1])
        )
        raise MixedOrigins(
            f"The selected rows come from {len(self.origins)} latent spaces: {lines}. One "
            f"{what} mixes no latent spaces: select one with --filter (or re-encode the others "
            "with latents_reencode --origin-mismatch), or pass --allow-mixed to record the "
            "origin per row.",
            dict(self.origins),
        )


def keyset_pages(
    rows: models.QuerySet,
    names: tuple[str, ...],
    size: int,
    after: Any = None,
    blob: str | None = None,
) -> Iterator[list[tuple[Any, ...]]]:
    """``rows.values_list(*names)`` in primary-key order, ``size`` rows a query.

    ``names[0]`` must be ``"pk"``. Keyset pagination (``pk > last``, an index range scan per
    page) rather than one cursor: no transaction stays open for the whole walk (holding back
    vacuum), and PostgreSQL never materialises the result as it does for the ``WITH HOLD``
    cursor that ``QuerySet.iterator()`` opens in autocommit mode.

    ``blob`` (one of ``names``, a binary column) comes as ``bytes``, read on PostgreSQL by a
    second query per page in the binary protocol: in text form a bytea travels as hex, twice its
    size, and reading 32 KB blobs that way took 3.5x as long. A row gone between the two
    queries has ``None`` there.
    """
    if blob is None or connections[rows.db].vendor != "postgresql":
        yield from _keyset_pages(rows, names, size, after)
        return
    at = names.index(blob)
    others = names[:at] + names[at + 1 :]
    for page in _keyset_pages(rows, others, size, after):
        blobs = _binary_blobs(rows, blob, [row[0] for row in page])
        yield [(*row[:at], blobs.get(row[0]), *row[at:]) for row in page]


def _keyset_pages(
    rows: models.QuerySet, names: tuple[str, ...], size: int, after: Any
) -> Iterator[list[tuple[Any, ...]]]:
    ordered = rows.order_by("pk")
    while True:
        page = ordered if after is None else ordered.filter(pk__gt=after)
        values = list(page.values_list(*names)[:size])
        if not values:
            return
        yield values
        after = values[-1][0]


def _binary_blobs(rows: models.QuerySet, attname: str, pks: list[Any]) -> dict[Any, bytes]:
    """Column ``attname`` of the rows ``pks`` of ``rows.model``, read in the binary protocol."""
    connection = connections[rows.db]
    meta = rows.model._meta
    quote = connection.ops.quote_name
    pk_type = meta.pk.rel_db_type(connection)
    sql = (
        f"SELECT {quote(meta.pk.column)}, {quote(meta.get_field(attname).column)} "
        f"FROM {quote(meta.db_table)} WHERE {quote(meta.pk.column)} = ANY(%s::{pk_type}[])"
    )
    connection.ensure_connection()
    import psycopg  # PostgreSQL only; Django's own cursors bind client-side, without binary

    with psycopg.Cursor(connection.connection) as cursor:
        # Never a named prepared statement: a transaction-pooling pgbouncer would lose it.
        cursor.execute(sql, [pks], binary=True, prepare=False)
        return dict(cursor.fetchall())


def prefetched(
    rows: models.QuerySet,
    names: tuple[str, ...],
    size: int,
    after: Any = None,
    prepare: Callable[[list[tuple[Any, ...]]], list[Any]] | None = None,
    blob: str | None = None,
) -> Iterator[list[Any]]:
    """:func:`keyset_pages` (``blob`` as there), read one page ahead by a thread with its own
    connection.

    While this thread converts and writes a page, the next one travels from the database, and
    ``prepare`` (when given) turns it into what this thread wants (checksums verified, say:
    hashing releases the GIL) on the reader thread. In an open transaction the pages are read
    and prepared here instead: another connection would not see the transaction's rows.
    """
    prepare = prepare or (lambda page: page)
    if connections[rows.db].in_atomic_block:
        for page in keyset_pages(rows, names, size, after, blob):
            yield prepare(page)
        return
    ready: queue.Queue[Any] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def read() -> None:
        try:
            for page in keyset_pages(rows, names, size, after, blob):
                page = prepare(page)
                while not stop.is_set():
                    try:
                        ready.put(page, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            ready.put(_Failed(exc))
        finally:
            connections.close_all()  # this thread's own connections

    reader = threading.Thread(target=read, name="latents-export-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        reader.join()


_DONE = object()


@dataclass
class _Failed:
    error: BaseException


def scan_origins(
    rows: models.QuerySet,
    field: LatentImageField,
    *,
    page_size: int = 2000,
    keep_pks: bool = False,
) -> OriginScan:
    """Read every selected blob's header (a ``substring`` of the column, not the payload).

    Rows in primary-key order, a page at a time. ``keep_pks`` keeps the primary keys of the
    readable rows (:class:`~latentstore.training.LatentDataset` partitions them).
    """
    scan = OriginScan(pks=[] if keep_pks else None)
    query = rows.annotate(_latentstore_head=_head(field, _HEAD_BYTES))
    for page in keyset_pages(query, ("pk", "_latentstore_head"), page_size):
        headers: dict[Any, LatentHeader] = {}
        longer = []
        for pk, prefix in page:
            try:
                headers[pk] = read_header(_bytes(prefix))
            except LatentFormatError as exc:
                if prefix is not None and len(prefix) >= _HEAD_BYTES:
                    longer.append(pk)  # a header longer than the prefix (legal to 64 KB)
                else:
                    scan.bad[pk] = str(exc)
        if longer:
            again = dict(
                rows.filter(pk__in=longer)
                .annotate(_latentstore_head=_head(field, _LONG_HEAD_BYTES))
                .values_list("pk", "_latentstore_head")
            )
            for pk in longer:
                try:
                    headers[pk] = read_header(_bytes(again.get(pk)))
                except LatentFormatError as exc:
                    scan.bad[pk] = str(exc)
        for pk, _prefix in page:
            header = headers.get(pk)
            if header is not None:
                scan.add(pk, header)
    return scan


def _head(field: LatentImageField, nbytes: int) -> Substr:
    return Substr(field.attname, 1, nbytes, output_field=models.BinaryField())


def _bytes(value: Any) -> bytes:
    if value is None:
        raise LatentFormatError("latent blob is empty")
    return bytes(value)


def read_latents(blob: bytes | memoryview) -> tuple[LatentHeader, np.ndarray]:
    """A blob's header and latents, verified: float16 blobs as their stored float16 values (a
    read-only view of the blob, no conversion), others as float32 (``unpack(float16=True)``).
    An export of float16 latents would otherwise convert every value to float32 and back."""
    return unpack(blob, float16=True)


def model_space(latents: np.ndarray, header: LatentHeader) -> np.ndarray:
    """``(raw - shift_factor) * scaling_factor`` with the blob's own factors, float32.

    What diffusion trainers feed their model (diffusers: ``latents = (latent_dist.mean -
    vae.config.shift_factor) * vae.config.scaling_factor``; SD's shift is 0).
    """
    z = np.asarray(latents, dtype=np.float32)
    if header.shift_factor:
        z = z - np.float32(header.shift_factor)
    return z * np.float32(header.scaling_factor)


# --------------------------------------------------------------------------------------------
# model columns beside the latents


@dataclass(frozen=True)
class ColumnSpec:
    """A model column exported beside each latent."""

    name: str  # as asked for (and as exported)
    attname: str  # what values_list reads
    kind: str  # string | int | float | bool | datetime | date | time | duration | json | decimal

    def arrow_type(self) -> Any:
        import pyarrow as pa

        return {
            "string": pa.string(),
            "int": pa.int64(),
            "float": pa.float64(),
            "bool": pa.bool_(),
            "datetime": pa.timestamp("us", tz="UTC"),
            "naive_datetime": pa.timestamp("us"),
            "date": pa.date32(),
            "time": pa.time64("us"),
            "duration": pa.duration("us"),
            "json": pa.string(),
            "decimal": pa.string(),
        }[self.kind]

    def to_arrow(self, value: Any) -> Any:
        if value is None:
            return None
        if self.kind == "json":
            return json.dumps(value, sort_keys=True, default=str)
        if self.kind in ("string", "decimal"):
            return str(value)
        return value

    def to_json(self, value: Any) -> Any:
        if value is None or self.kind == "json":
            return value
        if isinstance(value, dt.timedelta):
            return value.total_seconds()
        if isinstance(value, dt.datetime | dt.date | dt.time):
            return value.isoformat()
        if isinstance(value, decimal.Decimal | uuid.UUID) or self.kind == "string":
            return str(value)
        return value

    @property
    def type_name(self) -> str:
        return {
            "string": "string",
            "int": "int64",
            "float": "float64",
            "bool": "bool",
            "datetime": "timestamp[us, UTC]",
            "naive_datetime": "timestamp[us]",
            "date": "date32",
            "time": "time64[us]",
            "duration": "duration[us] (seconds in JSON)",
            "json": "string (JSON text; a JSON value in webdataset)",
            "decimal": "string (exact decimal)",
        }[self.kind]


_KINDS = {
    "CharField": "string",
    "TextField": "string",
    "SlugField": "string",
    "EmailField": "string",
    "URLField": "string",
    "FilePathField": "string",
    "FileField": "string",
    "ImageField": "string",
    "GenericIPAddressField": "string",
    "UUIDField": "string",
    "AutoField": "int",
    "BigAutoField": "int",
    "SmallAutoField": "int",
    "IntegerField": "int",
    "BigIntegerField": "int",
    "SmallIntegerField": "int",
    "PositiveIntegerField": "int",
    "PositiveBigIntegerField": "int",
    "PositiveSmallIntegerField": "int",
    "FloatField": "float",
    "BooleanField": "bool",
    "NullBooleanField": "bool",
    "DateTimeField": "datetime",
    "DateField": "date",
    "TimeField": "time",
    "DurationField": "duration",
    "JSONField": "json",
    "DecimalField": "decimal",
}


def kind_of(field: models.Field) -> str:
    target = field.target_field if field.is_relation else field
    kind = _KINDS.get(target.get_internal_type(), "string")
    if kind == "datetime":
        from django.conf import settings

        if not settings.USE_TZ:
            kind = "naive_datetime"
    return kind


def column_specs(
    model: type[models.Model], field: LatentImageField, names: list[str] | tuple[str, ...]
) -> list[ColumnSpec]:
    """The model columns named by ``--columns``, checked: concrete, not latents or binary."""
    specs: list[ColumnSpec] = []
    latent_columns = set()
    for latent in latent_fields_of(model):
        latent_columns |= {latent.name, *(latent.companion_attname(s) for s in COMPANIONS)}
    reserved = set(SAMPLE_FIELDS) | set(ORIGIN_FIELDS)
    for name in names:
        if name in reserved:
            raise ExportError(
                f"--columns: {name!r} is a per-sample field of every export "
                f"({', '.join(SAMPLE_FIELDS + ORIGIN_FIELDS)}); it cannot be a column too."
            )
        if name in {s.name for s in specs}:
            raise ExportError(f"--columns names {name!r} twice.")
        try:
            column = model._meta.get_field(name)
        except FieldDoesNotExist:
            column = next((f for f in model._meta.concrete_fields if f.attname == name), None)
            if column is None:
                choices = ", ".join(
                    f.name
                    for f in model._meta.concrete_fields
                    if f.name not in latent_columns and f.get_internal_type() != "BinaryField"
                )
                raise ExportError(
                    f"--columns: {model._meta.label} has no field {name!r} (columns: {choices})."
                ) from None
        if not getattr(column, "concrete", False) or column.many_to_many or column.one_to_many:
            raise ExportError(f"--columns: {name!r} is not a column of {model._meta.label}.")
        if column.name in latent_columns or name in latent_columns:
            raise ExportError(
                f"--columns: {name!r} belongs to a LatentImageField; the latents and their "
                "size, padding and digest are in every sample already."
            )
        if column.get_internal_type() == "BinaryField":
            raise ExportError(f"--columns: {name!r} is a binary column; it is not exported.")
        specs.append(ColumnSpec(name=name, attname=column.attname, kind=kind_of(column)))
    return specs


def json_pk(value: Any) -> Any:
    """A primary key as JSON holds it: an int as is, anything else (UUID, text) as a string."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    return str(value)

"""Bring existing images in: from an ``ImageField`` / ``FileField`` into a ``LatentImageField``.

:func:`import_images` walks the rows in primary key order, a page (one transaction) at a time.
For each row it reads the old field's file through *that field's storage*, in chunks and never
past ``MAX_UPLOAD_BYTES``, hashing it; validates it as an upload is validated and (unless
``verify=False``) decodes its pixels once, cheaply, so a truncated file is refused here; stages
it like an upload (conditional ``UPDATE`` on the token and state it was read with) and writes an
:class:`~latentstore.models.ImportRecord` (source, sha256, token) in the same transaction. A
page's encodes go out as batch messages once it has committed. The next page's files are read
and checked on a few threads while the current page is written.

A rerun skips rows whose record has the file's sha256, so a killed run started again imports
each remaining row exactly once; a row whose latent field holds another image is left alone
unless ``replace``. A bad source never stops the run: its row is left as it was and listed.
:func:`delete_sources` deletes sources only once their rows are ready (see its rules there and
in docs/import-export.md). Reading and checking one source file: :mod:`latentstore.sources`.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import logging
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import FieldDoesNotExist
from django.db import models, router, transaction
from django.utils import timezone

from latentstore import conf
from latentstore.columns import EMPTY, FAILED, READY, by_column, pending_upload
from latentstore.dispatch import enqueue_encode_batch
from latentstore.fields import LatentImageField
from latentstore.quality import QualityPolicy
from latentstore.sources import Source, SourceError, prepare, read_source, shared_names

logger = logging.getLogger("latentstore.importing")

# What happened to a row (the keys of ImportReport.skipped / kept).
ALREADY = "already imported"
NO_SOURCE = "no source file"
OTHER_IMAGE = "holds another image (--replace imports over it)"
SOURCE_CHANGED = "source changed since it was imported (--replace imports it again)"
CHANGED = "changed meanwhile"

# Why a source is kept by delete_sources().
NOT_IMPORTED = "not imported"
NOT_READY = "not ready yet"
RESTAGED = "staged again since the import (a new upload or re-encode)"
MISMATCH = "source changed since it was imported"
SHARED = "shared with another row"
LOW_QUALITY = "below the quality gate"
NOT_MEASURED = "quality gate on, PSNR not measured"
MISSING = "missing"


@dataclass
class ImportReport:
    """What an import (or a delete pass) did, for summaries, reports and tests."""

    imported: int = 0  # staged (or, in a dry run, would be)
    skipped: Counter = field(default_factory=Counter)  # reason -> rows
    errors: list[tuple[Any, str, str]] = field(default_factory=list)  # (pk, source, reason)
    deleted: int = 0  # source files deleted (or would be)
    kept: Counter = field(default_factory=Counter)  # reason -> sources kept by the delete pass
    last_pk: Any = None  # the last row looked at (resume with --after)

    @property
    def failed(self) -> int:
        return len(self.errors)

    def write_csv(self, path: str | os.PathLike) -> None:
        """The rows that could not be imported (or deleted): ``pk,source,reason``."""
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["pk", "source", "reason"])
            for pk, source, reason in self.errors:
                writer.writerow([pk, source, reason])


# --- resolving names ---------------------------------------------------------------------------


def resolve(target: str, source: str, apps: Any = None) -> tuple[type[models.Model], Any, Any]:
    """``("app.Model.field", "old_field")`` -> (model, LatentImageField, FileField).

    Raises ``ValueError`` with a message fit for the command line.
    """
    if apps is None:
        from django.apps import apps
    parts = target.split(".")
    if len(parts) != 3:
        raise ValueError(f"{target!r}: name the field as app_label.Model.field")
    try:
        model = apps.get_model(parts[0], parts[1])
    except LookupError:
        raise ValueError(f"Unknown model {parts[0]}.{parts[1]}") from None
    label = model._meta.label
    try:
        latent = model._meta.get_field(parts[2])
    except FieldDoesNotExist:
        raise ValueError(f"{label} has no field {parts[2]!r}") from None
    if not isinstance(latent, LatentImageField):
        raise ValueError(f"{label}.{parts[2]} is not a LatentImageField")
    try:
        old = model._meta.get_field(source)
    except FieldDoesNotExist:
        names = [f.name for f in model._meta.concrete_fields if isinstance(f, models.FileField)]
        raise ValueError(
            f"{label} has no field {source!r} (its file fields: {', '.join(names) or 'none'})"
        ) from None
    if not isinstance(old, models.FileField):
        raise ValueError(f"--from {label}.{source} is not an ImageField or FileField")
    return model, latent, old


# --- the import --------------------------------------------------------------------------------


@dataclass
class _Row:
    pk: Any
    name: str
    state: str
    token: uuid.UUID | None
    original: str
    record: Any  # ImportRecord or None
    future: Future | None = None
    outcome: str = ""  # a skip reason decided without reading


def _record_model(apps: Any = None) -> type[models.Model]:
    if apps is None:
        from latentstore.models import ImportRecord

        return ImportRecord
    return apps.get_model("latentstore", "ImportRecord")


def _records_of(
    records: type[models.Model], db: str, label: str, name: str, chunk: list[tuple]
) -> dict[str, Any]:
    """The ImportRecords of a page's rows (its tuples start with the primary key), by pk text."""
    return {
        r.object_pk: r
        for r in records._base_manager.using(db).filter(
            model=label, field=name, object_pk__in=[str(c[0]) for c in chunk]
        )
    }


def _pages(rows: models.QuerySet, columns: Sequence[str], size: int) -> Iterator[list[tuple]]:
    """Keyset pagination over ``rows`` by primary key: tuples of ``columns``."""
    last = None
    while True:
        page = rows.order_by("pk")
        if last is not None:
            page = page.filter(pk__gt=last)
        chunk = list(page.values_list("pk", *columns)[:size])
        if not chunk:
            return
        yield chunk
        last = chunk[-1][0]


def import_images(
    model: type[models.Model],
    field: LatentImageField,
    source_field: Any,
    rows: models.QuerySet | None = None,
    *,
    batch_size: int = 100,
    limit: int | None = None,
    replace: bool = False,
    dry_run: bool = False,
    verify: bool = True,
    threads: int | None = None,
    apps: Any = None,
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Import ``source_field``'s files of ``rows`` (default: every row) into ``field``.

    ``limit`` stops after that many rows are imported. ``apps`` is a migration's app registry
    (see :func:`import_in_migration`). ``progress(n)`` is called as rows are done.
    """
    run = _Import(
        model,
        field,
        source_field,
        limit=limit,
        replace=replace,
        dry_run=dry_run,
        verify=verify,
        apps=apps,
        progress=progress,
    )
    if rows is None:
        rows = model._base_manager.all()
    col = field.companion_attname
    columns = [source_field.attname, col("state"), col("token"), col("original")]
    threads = threads or min(4, (os.cpu_count() or 1) + 1)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="latents-import") as pool:
        pending: list[_Row] | None = None
        for chunk in _pages(rows, columns, batch_size):
            planned = run.plan(chunk, pool)
            if pending is not None and not run.write(pending):
                pending = None
                _cancel(planned)
                break
            pending = planned
            if limit is not None and run.report.imported >= limit:
                pending = None
                _cancel(planned)
                break
        if pending is not None:
            run.write(pending)
    return run.report


class _Import:
    """One :func:`import_images` call: where it reads and stages, and its report so far."""

    def __init__(
        self,
        model: type[models.Model],
        field: LatentImageField,
        source_field: Any,
        *,
        limit: int | None,
        replace: bool,
        dry_run: bool,
        verify: bool,
        apps: Any,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.report = ImportReport()
        self.records = _record_model(apps)
        self.model, self.field, self.source_field = model, field, source_field
        self.label, self.name = model._meta.label, field.name
        self.storage = source_field.storage
        self.limit_bytes = int(conf.get_settings()["MAX_UPLOAD_BYTES"])
        self.db = router.db_for_write(model)
        self.keeps_originals = bool(QualityPolicy.for_field(field).keep_original)
        self.limit, self.replace, self.dry_run, self.verify = limit, replace, dry_run, verify
        self.progress = progress

    def plan(self, chunk: list[tuple], pool: ThreadPoolExecutor) -> list[_Row]:
        """A page's rows with their import records; the files worth reading start reading."""
        found = _records_of(self.records, self.db, self.label, self.name, chunk)
        planned = []
        for pk, source_name, state, token, original in chunk:
            row = _Row(pk, source_name or "", state, token, original, found.get(str(pk)))
            if not row.name:
                row.outcome = NO_SOURCE
            elif row.record is None and state != EMPTY and not self.replace:
                row.outcome = OTHER_IMAGE  # decided without reading the file
            else:
                row.future = pool.submit(
                    prepare, self.storage, row.name, self.limit_bytes, self.verify
                )
            planned.append(row)
        return planned

    def write(self, planned: list[_Row]) -> bool:
        """Stage a planned page; False once ``limit`` is reached."""
        staged: list[tuple[Any, uuid.UUID]] = []
        new_records = []
        old_originals: list[str] = []
        going = True
        db = self.db
        with transaction.atomic(using=db) if not self.dry_run else contextlib.nullcontext():
            for row in planned:
                self.report.last_pk = row.pk
                if self.limit is not None and self.report.imported >= self.limit:
                    going = False
                    break
                if self.progress:
                    self.progress(1)
                done = self._import_row(row)
                if done is None:
                    continue
                token, source = done
                staged.append((row.pk, token))
                if row.original and self.keeps_originals:
                    old_originals.append(row.original)
                new_records.append(self._record(row, source, token))
            self._save_records(new_records)
            if staged:
                label, name = self.label, self.name
                transaction.on_commit(lambda: enqueue_encode_batch(label, name, staged), using=db)
            if old_originals:
                transaction.on_commit(lambda: _delete_originals(old_originals), using=db)
        _cancel(planned)  # rows after the limit: their reads are not needed
        return going

    def _import_row(self, row: _Row) -> tuple[uuid.UUID, Source] | None:
        """Read, check and stage one row, counting the outcome; its token and source if staged."""
        report = self.report
        if row.outcome:
            report.skipped[row.outcome] += 1
            return None
        source = self._source(row)
        if source is None:
            return None
        reason = self._skip_reason(row, source)
        if reason:
            report.skipped[reason] += 1
            return None
        if self.dry_run:
            report.imported += 1
            return None
        token = uuid.uuid4()
        if not self._stage(row, source, token):
            report.skipped[CHANGED] += 1
            return None
        report.imported += 1
        return token, source

    def _source(self, row: _Row) -> Source | None:
        """The row's file as its reader thread left it; None (the error listed) if it is bad."""
        assert row.future is not None
        try:
            return row.future.result()
        except SourceError as exc:
            self.report.errors.append((row.pk, row.name, str(exc)))
        except Exception as exc:  # a bug or an unexpected library error: still go on
            self.report.errors.append((row.pk, row.name, f"{type(exc).__name__}: {exc}"))
        finally:
            row.future = None  # free the bytes as soon as the row is written
        return None

    def _skip_reason(self, row: _Row, source: Source) -> str:
        """Why a readable source is not imported into its row ("" when it is)."""
        record = row.record
        if record is not None and record.sha256 == source.sha256:
            if row.state not in (EMPTY, FAILED) and not self.replace:
                return ALREADY
        elif row.state != EMPTY and not self.replace:
            return SOURCE_CHANGED if record is not None else OTHER_IMAGE
        return ""

    def _stage(self, row: _Row, source: Source, token: uuid.UUID) -> bool:
        """Stage ``source`` as a new upload is staged, if the row still has the state and token
        it was read with."""
        col = self.field.companion_attname
        current = self.model._base_manager.using(self.db).filter(
            pk=row.pk, **{col("state"): row.state}
        )
        if row.token is None:
            current = current.filter(**{f"{col('token')}__isnull": True})
        else:
            current = current.filter(**{col("token"): row.token})
        values = {
            **pending_upload(token, self.field.autoencoder, timezone.now()),
            "staged": source.data,
            "width": source.width,
            "height": source.height,
            "latents": None,
        }
        return bool(current.update(**by_column(self.field, values)))

    def _record(self, row: _Row, source: Source, token: uuid.UUID) -> models.Model:
        """The ImportRecord of a staged row (unsaved)."""
        return self.records(
            model=self.label,
            object_pk=str(row.pk),
            field=self.name,
            source_field=self.source_field.name,
            source=row.name,
            sha256=source.sha256,
            size=len(source.data),
            token=token,
            imported_at=timezone.now(),
        )

    def _save_records(self, new_records: list[models.Model]) -> None:
        """Save a page's ImportRecords, replacing those of earlier imports of the same rows."""
        if not new_records:
            return
        self.records._base_manager.using(self.db).bulk_create(
            new_records,
            update_conflicts=True,
            unique_fields=["model", "object_pk", "field"],
            update_fields=["source_field", "source", "sha256", "size", "token", "imported_at"],
        )


def _cancel(planned: list[_Row]) -> None:
    for row in planned:
        if row.future is not None:
            row.future.cancel()
            row.future = None


def _delete_originals(names: list[str]) -> None:
    from latentstore.staging import originals_storage

    for original in names:
        try:
            originals_storage().delete(original)
        except Exception as exc:  # an orphan is better than an import undone
            logger.warning("Could not delete the replaced kept original %s: %s", original, exc)


# --- deleting sources --------------------------------------------------------------------------


def delete_sources(
    model: type[models.Model],
    field: LatentImageField,
    source_field: Any,
    rows: models.QuerySet | None = None,
    *,
    batch_size: int = 100,
    dry_run: bool = False,
    threads: int | None = None,
    apps: Any = None,
    progress: Callable[[int], None] | None = None,
    report: ImportReport | None = None,
) -> ImportReport:
    """Delete the source files whose import is done, and clear the old field of their rows.

    A file is deleted only when its row is ``ready`` with the token the import staged, the
    file's sha256 still matches the record, the quality gate passed (when on), and no file field
    of any installed model holds the same name on another row.
    """
    report = report or ImportReport()
    records = _record_model(apps)
    label, name = model._meta.label, field.name
    storage = source_field.storage
    limit_bytes = int(conf.get_settings()["MAX_UPLOAD_BYTES"])
    policy = QualityPolicy.for_field(field)
    col = field.companion_attname
    if rows is None:
        rows = model._base_manager.all()
    rows = rows.exclude(**{source_field.attname: ""}).exclude(
        **{f"{source_field.attname}__isnull": True}
    )
    columns = [source_field.attname, col("state"), col("token"), col("psnr")]
    db = router.db_for_write(model)
    threads = threads or min(4, (os.cpu_count() or 1) + 1)

    def read(source_name: str) -> str:
        return read_source(storage, source_name, limit_bytes)[1]

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="latents-delete") as pool:
        start_read = functools.partial(pool.submit, read)
        for chunk in _pages(rows, columns, batch_size):
            found = _records_of(records, db, label, name, chunk)
            candidates = _candidates(chunk, found, policy, report, progress, start_read)
            if not candidates:
                continue
            shared = shared_names(model, source_field, {c[1]: c[0] for c in candidates}, db)
            for candidate in candidates:
                if progress:
                    progress(1)
                if _delete_one(storage, candidate, shared, dry_run, report):
                    pk, source_name = candidate[:2]
                    model._base_manager.using(db).filter(
                        pk=pk, **{source_field.attname: source_name}
                    ).update(**{source_field.attname: ""})
    return report


def _candidates(
    chunk: list[tuple],
    found: dict[str, Any],
    policy: QualityPolicy,
    report: ImportReport,
    progress: Callable[[int], None] | None,
    start_read: Callable[[str], Future],
) -> list[tuple[Any, str, Any, Future]]:
    """The page's rows whose source may go, their sha256 being read; the others counted kept."""
    candidates = []
    for pk, source_name, state, token, psnr in chunk:
        report.last_pk = pk
        record = found.get(str(pk))
        reason = _keep_reason(record, source_name, state, token, psnr, policy)
        if reason:
            report.kept[reason] += 1
            if progress:
                progress(1)
            continue
        candidates.append((pk, source_name, record, start_read(source_name)))
    return candidates


def _keep_reason(
    record: Any, source_name: str, state: str, token: Any, psnr: Any, policy: QualityPolicy
) -> str:
    """Why a row's source is kept without reading it ("" when it may go: the file is next)."""
    if record is None or record.source != source_name:
        return NOT_IMPORTED
    if state != READY:
        return NOT_READY
    if token != record.token:
        return RESTAGED
    if policy.check and psnr is None:
        return NOT_MEASURED
    if policy.check and policy.is_low_fidelity(psnr):
        return LOW_QUALITY
    return ""


def _delete_one(
    storage: Any,
    candidate: tuple[Any, str, Any, Future],
    shared: set[str],
    dry_run: bool,
    report: ImportReport,
) -> bool:
    """Delete a candidate's file unless the file says keep it; True once the storage lost it."""
    pk, source_name, record, future = candidate
    try:
        sha = future.result()
    except SourceError as exc:
        if str(exc) == "missing file":
            report.kept[MISSING] += 1
        else:
            report.errors.append((pk, source_name, f"delete: {exc}"))
        return False
    if sha != record.sha256:
        report.kept[MISMATCH] += 1
        return False
    if source_name in shared:
        report.kept[SHARED] += 1
        return False
    if dry_run:
        report.deleted += 1
        return False
    try:
        storage.delete(source_name)
    except Exception as exc:
        report.errors.append(
            (pk, source_name, f"delete: storage error: {type(exc).__name__}: {exc}")
        )
        return False
    report.deleted += 1
    return True


# --- inside a migration ------------------------------------------------------------------------


def import_in_migration(
    app_label: str,
    model_name: str,
    field_name: str,
    source: str,
    *,
    batch_size: int = 100,
    replace: bool = False,
    verify: bool = True,
    strict: bool = False,
) -> Callable[[Any, Any], None]:
    """A ``RunPython`` function importing ``source``'s files into ``field_name``, for small tables.

    ``migrations.RunPython(import_in_migration("photos", "Photo", "image", source="old"),
    migrations.RunPython.noop)``, in a migration that depends on ``("latentstore",
    "0001_initial")``. It runs inside the migration's transaction (on PostgreSQL): every staged
    original waits in it until the migration commits, and the encodes are sent only then. Use it
    for a few thousand rows at most; for more, for remote storage, or when a deploy must not wait
    for the files, run ``latents_import`` instead (docs/import-export.md). Bad sources are logged
    and their rows left as they were; ``strict=True`` fails the migration instead.
    """

    def forwards(apps: Any, schema_editor: Any) -> None:
        model, field, old = resolve(f"{app_label}.{model_name}.{field_name}", source, apps=apps)
        rows = model._base_manager.using(schema_editor.connection.alias).all()
        report = import_images(
            model,
            field,
            old,
            rows,
            batch_size=batch_size,
            replace=replace,
            verify=verify,
            apps=apps,
        )
        for pk, name, reason in report.errors:
            logger.warning(
                "latentstore import: %s pk=%s %s: %s", model._meta.label, pk, name, reason
            )
        if strict and report.errors:
            raise RuntimeError(
                f"{report.failed} rows of {model._meta.label} could not be imported "
                f"(first: pk={report.errors[0][0]} {report.errors[0][1]}: {report.errors[0][2]})"
            )

    forwards.__name__ = f"import_{app_label}_{model_name}_{field_name}".lower()
    return forwards

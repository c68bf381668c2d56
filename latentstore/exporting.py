"""A way back out: write each ready row's picture to a storage or directory, with a manifest.

``kind="original"`` writes the kept original (``KEEP_ORIGINAL`` / ``keep_original``) byte for
byte, under the extension of its own format; ``kind="decoded"`` decodes the latents (batched,
through the decode cache, as ``latents_warm`` does) into PNG, WebP or JPEG.

Files go to ``<app_label>.<model>/<field>/<kind>/<pk>.<ext>`` and each written file gets a line
in ``<app_label>.<model>/<field>/manifest.csv``: ``pk,path,width,height,digest,kind``, where
``digest`` is the content address of the row's latents. A rerun skips rows whose manifest line
has the same digest, so an interrupted export continues where it stopped and a row encoded again
since is exported again.

On a local directory (any storage with ``path()``) the manifest is appended to after each page
and flushed; on other storages (S3) it is rewritten after a page at most every
``MANIFEST_EVERY`` seconds and at the end (rows written after the last rewrite are simply
exported again by the next run).
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings as django_settings
from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage, Storage, storages
from django.db import models

from latentstore.columns import READY
from latentstore.decoding import decode_images, fit_size, normalise_format
from latentstore.fields import LatentImageField
from latentstore.queries import without_blobs

KINDS = ("original", "decoded")
MANIFEST_COLUMNS = ["pk", "path", "width", "height", "digest", "kind"]
MANIFEST_EVERY = 10.0  # seconds between manifest rewrites on storages without a local path
EXTENSIONS = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
    "AVIF": "avif",
}

ALREADY = "already exported"
NO_ORIGINAL = "no kept original"


@dataclass
class ExportReport:
    exported: int = 0
    skipped: Counter = field(default_factory=Counter)
    errors: list[tuple[Any, str]] = field(default_factory=list)  # (pk, reason)
    manifest: str = ""
    last_pk: Any = None


def target_storage(spec: str) -> tuple[Storage, str]:
    """A ``STORAGES`` alias, else a directory (created if needed): the storage and its name."""
    if spec in getattr(django_settings, "STORAGES", {}):
        return storages[spec], f"storage {spec!r}"
    path = os.path.abspath(spec)
    os.makedirs(path, exist_ok=True)
    return FileSystemStorage(location=path), path


def base_path(model: type[models.Model], field: LatentImageField) -> str:
    return f"{model._meta.label_lower}/{field.name}"


class Manifest:
    """The manifest CSV of one field in a target storage: read once, then added to."""

    def __init__(self, storage: Storage, name: str) -> None:
        self.storage = storage
        self.name = name
        self.entries: dict[tuple[str, str], list[str]] = {}  # (pk, kind) -> line
        self._superseded = 0
        self._dirty = False
        self._written = time.monotonic()
        try:
            self.local: str | None = storage.path(name)
        except NotImplementedError:
            self.local = None
        self._read()
        self._fh = None

    def _read(self) -> None:
        try:
            if self.local is not None:
                if not os.path.exists(self.local):
                    return
                fh: Any = open(self.local, newline="", encoding="utf-8")
            else:
                if not self.storage.exists(self.name):
                    return
                with self.storage.open(self.name, "rb") as raw:
                    fh = io.StringIO(raw.read().decode("utf-8"))
            with fh:
                for line in csv.DictReader(fh):
                    key = (line["pk"], line["kind"])
                    if key in self.entries:
                        self._superseded += 1
                    self.entries[key] = [line[c] for c in MANIFEST_COLUMNS]
        except (KeyError, csv.Error, UnicodeDecodeError) as exc:
            raise ValueError(
                f"{self.name} is not a manifest written by this command: {exc}"
            ) from None

    def digest(self, pk: Any, kind: str) -> str | None:
        line = self.entries.get((str(pk), kind))
        return line[4] if line else None

    def add(self, lines: list[list[str]]) -> None:
        if not lines:
            return
        for line in lines:
            key = (line[0], line[5])
            if key in self.entries:
                self._superseded += 1
            self.entries[key] = line
        if self.local is not None:
            new = not os.path.exists(self.local)
            if self._fh is None:
                os.makedirs(os.path.dirname(self.local), exist_ok=True)
                self._fh = open(self.local, "a", newline="", encoding="utf-8")
            writer = csv.writer(self._fh)
            if new:
                writer.writerow(MANIFEST_COLUMNS)
            writer.writerows(lines)
            self._fh.flush()
            os.fsync(self._fh.fileno())
        else:
            self._dirty = True
            if time.monotonic() - self._written >= MANIFEST_EVERY:
                self._rewrite()

    def _rewrite(self) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(self.entries.values())
        data = buf.getvalue().encode("utf-8")
        if self.local is not None:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            tmp = f"{self.local}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.local)
        else:
            save_exactly(self.storage, self.name, data)
        self._dirty = False
        self._superseded = 0
        self._written = time.monotonic()

    def close(self) -> None:
        """Write what is pending; a manifest with superseded lines is written anew, compacted."""
        if self._dirty or self._superseded:
            self._rewrite()
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def save_exactly(storage: Storage, name: str, data: bytes) -> str:
    """Save ``data`` under exactly ``name``, replacing a file already there."""
    saved = storage.save(name, ContentFile(data))
    if saved != name:  # the storage kept the old file and chose another name
        storage.delete(saved)
        storage.delete(name)
        saved = storage.save(name, ContentFile(data))
        if saved != name:
            raise OSError(f"the storage saved {name!r} as {saved!r}")
    return saved


def _original_format(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format or ""
    return {"MPO": "JPEG"}.get(fmt, fmt)


def export_images(
    model: type[models.Model],
    field: LatentImageField,
    storage: Storage,
    *,
    kind: str = "decoded",
    format: str = "PNG",
    size: int | None = None,
    decoder: str | None = None,
    rows: models.QuerySet | None = None,
    batch_size: int = 50,
    limit: int | None = None,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ExportReport:
    """Export the ready rows of ``rows`` (default: all); see the module docstring."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    fmt = normalise_format(format)
    base = base_path(model, field)
    manifest = Manifest(storage, f"{base}/manifest.csv")
    run = _Run(
        field=field,
        storage=storage,
        manifest=manifest,
        base=base,
        kind=kind,
        fmt=fmt,
        size=size,
        decoder=decoder,
        dry_run=dry_run,
        progress=progress,
        report=ExportReport(manifest=manifest.name),
    )
    report = run.report
    if rows is None:
        rows = model._base_manager.all()
    rows = without_blobs(rows.filter(**{field.companion_attname("state"): READY}))
    last = None
    try:
        while limit is None or report.exported < limit:
            instances = _page_after(rows, last, batch_size)
            if not instances:
                break
            last = instances[-1].pk
            todo = run.not_exported(instances)
            if limit is not None:
                todo = todo[: limit - report.exported]
            lines = run.write(todo)
            if not dry_run:
                manifest.add(lines)
            if limit is not None and report.exported >= limit:
                break
    finally:
        if not dry_run:
            manifest.close()
    return report


def _page_after(rows: models.QuerySet, last: Any, size: int) -> list[models.Model]:
    """The next ``size`` rows past primary key ``last`` (keyset pagination, in pk order)."""
    page = rows.order_by("pk")
    if last is not None:
        page = page.filter(pk__gt=last)
    return list(page[:size])


@dataclass
class _Run:
    """One :func:`export_images` call: where its pictures go, what they are, its report."""

    field: LatentImageField
    storage: Storage
    manifest: Manifest
    base: str
    kind: str
    fmt: str
    size: int | None
    decoder: str | None
    dry_run: bool
    progress: Callable[[int], None] | None
    report: ExportReport

    def not_exported(self, instances: list[models.Model]) -> list[Any]:
        """The images of ``instances`` that the manifest lacks (or holds with another digest)."""
        todo = []
        for instance in instances:
            image = getattr(instance, self.field.name)
            if self.manifest.digest(instance.pk, self.kind) == image.digest:
                self.report.skipped[ALREADY] += 1
                if self.progress:
                    self.progress(1)
                continue
            todo.append(image)
        return todo

    def write(self, images: list[Any]) -> list[list[str]]:
        """Make and save the pictures of ``images``; the manifest lines of those written."""
        lines = []
        pictures = _pictures(images, self.kind, self.fmt, self.size, self.decoder, self.dry_run)
        for image, picture in zip(images, pictures, strict=True):
            pk = image.instance.pk
            self.report.last_pk = pk
            if self.progress:
                self.progress(1)
            if isinstance(picture, _Skip):
                self.report.skipped[picture.reason] += 1
                continue
            if isinstance(picture, Exception):
                self.report.errors.append((pk, f"{type(picture).__name__}: {picture}"))
                continue
            data, ext, (width, height) = picture
            path = f"{self.base}/{self.kind}/{pk}.{ext}"
            if not self.dry_run:
                try:
                    save_exactly(self.storage, path, data)
                except Exception as exc:
                    self.report.errors.append((pk, f"{type(exc).__name__}: {exc}"))
                    continue
            self.report.exported += 1
            lines.append([str(pk), path, str(width), str(height), image.digest, self.kind])
        return lines


class _Skip:
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _pictures(
    images: list[Any], kind: str, fmt: str, size: int | None, decoder: str | None, dry_run: bool
) -> list[Any]:
    """Per image: (bytes, extension, (width, height)), a _Skip, or the exception."""
    if not images:
        return []
    out: list[Any] = []
    if kind == "original":
        for image in images:
            if not image.has_original:
                out.append(_Skip(NO_ORIGINAL))
                continue
            try:
                data = b"" if dry_run else image.original_bytes()
                ext = "" if dry_run else EXTENSIONS.get(_original_format(data), "bin")
            except Exception as exc:  # a missing or unreadable kept original
                out.append(exc)
                continue
            out.append((data, ext, (image.width, image.height)))
        return out
    ext = EXTENSIONS[fmt]
    if dry_run:
        return [(b"", ext, fit_size((i.width, i.height), size)) for i in images]
    decoded = decode_images(images, decoder, size, fmt, return_exceptions=True)
    for image, value in zip(images, decoded, strict=True):
        if isinstance(value, Exception):
            out.append(value)
        else:
            out.append((value, ext, fit_size((image.width, image.height), size)))
    return out

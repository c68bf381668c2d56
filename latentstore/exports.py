"""Training sets straight from the table: Parquet or WebDataset shards of stored latents.

``manage.py latents_export app.Model.field --out DIR`` (:mod:`.management.commands.latents_export`)
is a thin layer over :class:`Exporter`. The rows are the record of truth and already hold what a
trainer's "cache latents" step computes, so an export is a streaming copy:

* **What goes out.** Only ready rows, in primary-key order, a page per query (``values_list``
  of the primary key, the blob and the chosen columns; keyset pagination, see
  :func:`latentstore.samples.keyset_pages`). A thread reads the next page and verifies its
  checksums while this one is converted and, for Parquet, another writes the last one: memory
  holds a few pages whatever the row count. Every sample carries ``pk``, ``latents``
  ``(C, h, w)``, ``width``/``height`` of the original picture, its padding (``pad_right``,
  ``pad_bottom``) and crop box, the blob's ``digest`` and the chosen model columns.
* **One latent space.** A scan of the blobs' headers (a ``substring`` of the column: no payload
  is read) finds every origin (autoencoder alias, family, weights fingerprint, scaling and
  shift) before anything is written. More than one is refused unless ``allow_mixed``, which
  records the origin per row.
* **Formats.** ``hf``: Parquet shards ``data/train-NNNNN.parquet`` that
  ``datasets.load_dataset("parquet", data_dir=DIR)`` reads (``latents`` is a nested list
  column of float16/float32). ``webdataset``: tar shards ``data/train-NNNNN.tar``, written with
  the standard library, one ``KEY.npy`` (``numpy.save``, no pickle) and one ``KEY.json`` per
  sample, which the ``webdataset`` package reads.
* **Resumable by shard.** A shard is written under a ``.tmp`` name and renamed when complete;
  ``latentstore-progress.json`` then lists it with the last primary key it holds. A rerun with
  the same options drops partial files and continues after that key, so an interrupted export
  ends with every row exactly once (and a rerun of a finished one appends rows added since).
* **A dataset card.** ``README.md`` (with Hugging Face ``configs`` front matter) and
  ``latentstore.json`` say what a latent is here: the autoencoder, family, scaling and shift and
  whether they were applied, ``latent_dist.mean`` (not a sample), the dtype, the count, the
  columns, the padding convention, and how to read it.

Selecting rows and reading latents live in :mod:`latentstore.samples` (shared with
``LatentDataset``), the shard files in :mod:`latentstore.shards`, the card in
:mod:`latentstore.cards`. Numpy and pyarrow only (pyarrow for ``hf``, imported when used); no
torch.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import numpy as np
from django.db import models

from latentstore.cards import build_card, card_markdown
from latentstore.fields import LatentImageField
from latentstore.latents import LatentFormatError, blob_digest
from latentstore.samples import (
    ExportError,
    MixedOrigins,
    Origin,
    OriginScan,
    column_specs,
    json_pk,
    kind_of,
    model_space,
    prefetched,
    read_latents,
    ready_rows,
    scan_origins,
)
from latentstore.shards import (
    DATA_DIR,
    EXTENSIONS,
    ParquetShard,
    TarShard,
    add_tar_sample,
    arrow_schema,
    arrow_table,
    lock_folder,
    write_json_atomic,
    write_text_atomic,
)

__all__ = [
    "CARD_JSON",
    "FORMATS",
    "OUT_DTYPES",
    "PROGRESS_FILE",
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "Exporter",
    "MixedOrigins",
    "Plan",
    "parse_size",
]

FORMATS = ("hf", "webdataset")
OUT_DTYPES = ("float16", "float32")
PROGRESS_FILE = "latentstore-progress.json"
CARD_JSON = "latentstore.json"
CARD_README = "README.md"
LOCK_FILE = ".latentstore-export.lock"
STATE_VERSION = 1
DEFAULT_SHARD_SIZE = 256 * 1024 * 1024

_SHARD_RE = re.compile(r"^train-(\d{5,})\.(parquet|tar)(\.tmp)?$")


def parse_size(text: str | int) -> int:
    """Bytes from ``268435456``, ``256MB``, ``256MiB``, ``1.5G`` (K/M/G/T are powers of 1024)."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", str(text), re.I)
        if not match:
            raise ExportError(f"--shard-size {text!r}: expected bytes, e.g. 268435456 or 256MB.")
        power = " kmgt".index(match.group(2).lower() or " ")
        size = int(float(match.group(1)) * 1024**power)
    if size < 1:
        raise ExportError("--shard-size must be positive.")
    return size


# --------------------------------------------------------------------------------------------
# the exporter


@dataclass
class ExportOptions:
    """What to export and how (the command's options; see the module docstring)."""

    format: str = "hf"
    dtype: str = "float16"
    model_space: bool = False
    columns: tuple[str, ...] = ()
    filter: dict[str, Any] | None = None
    ids: tuple[Any, ...] = ()
    after: Any = None
    allow_mixed: bool = False
    shard_size: int = DEFAULT_SHARD_SIZE
    page_size: int = 200
    overwrite: bool = False


@dataclass
class ExportResult:
    """What a run did (the command prints it)."""

    out: Path
    rows: int = 0  # exported by this run
    total: int = 0  # in the dataset now
    shards: int = 0  # written by this run
    bytes: int = 0  # of the shards written by this run
    skipped: dict[str, str] = dataclass_field(default_factory=dict)  # pk -> why (this run)
    resumed_after: Any = None
    seconds: float = 0.0
    complete: bool = False


@dataclass
class Plan:
    """What :meth:`Exporter.prepare` found: the scan, the rows left, where to resume."""

    scan: OriginScan
    todo: int
    resume_after: Any
    shards_done: int


@dataclass
class _Pending:
    """The rows since the last completed shard: the shard they go to (once one is readable), the
    Parquet page not yet handed to its writer, the unreadable rows and the rows per origin."""

    shard: Any = None
    page: list[dict[str, Any]] = dataclass_field(default_factory=list)
    page_bytes: int = 0
    skipped: dict[str, str] = dataclass_field(default_factory=dict)  # pk -> why
    origins: dict[Origin, int] = dataclass_field(default_factory=dict)


class Exporter:
    """Writes one LatentImageField's ready rows as a training set (see the module docstring).

    ``rows`` is the selection (``--ids``/``--after``/``--filter`` applied); the exporter adds
    the ready filter and the resume point. Use :meth:`prepare` (checks, the origin scan), then
    :meth:`run`.
    """

    def __init__(
        self,
        model: type[models.Model],
        field: LatentImageField,
        out: str | os.PathLike[str],
        options: ExportOptions,
        rows: models.QuerySet | None = None,
        command_line: str = "",
    ) -> None:
        if options.format not in FORMATS:
            raise ExportError(f"--format {options.format!r}: use one of {', '.join(FORMATS)}.")
        if options.dtype not in OUT_DTYPES:
            raise ExportError(f"--dtype {options.dtype!r}: use one of {', '.join(OUT_DTYPES)}.")
        if options.page_size < 1:
            raise ExportError("--batch-size must be positive.")
        if options.format == "hf":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise ExportError(
                    "--format hf writes Parquet with pyarrow: pip install 'latentstore[datasets]'."
                ) from None
        self.model = model
        self.field = field
        self.out = Path(out).resolve()
        self.options = options
        self.columns = column_specs(model, field, options.columns)
        self.rows = ready_rows(rows if rows is not None else model._base_manager.all(), field)
        self.label = f"{model._meta.label}.{field.name}"
        self.command_line = command_line
        self._pk_field = model._meta.pk
        self._state: dict[str, Any] = {}
        self._lock: Any = None
        self._schema: Any = None
        self._thread: Any = None
        self._origin: Origin | None = None  # the one latent space, unless allow_mixed

    # -- the identity of an export: a rerun must ask for the same thing to continue it
    def selection(self) -> dict[str, Any]:
        o = self.options
        return {
            "source": self.label,
            "format": o.format,
            "dtype": o.dtype,
            "model_space": o.model_space,
            "columns": list(o.columns),
            "filter": o.filter,
            "ids": [json_pk(v) for v in o.ids],
            "after": json_pk(o.after),
            "allow_mixed": o.allow_mixed,
        }

    @property
    def data_dir(self) -> Path:
        return self.out / DATA_DIR

    def prepare(self, dry_run: bool = False) -> Plan:
        """Lock the output folder, load or start the progress file, scan the origins.

        With ``dry_run`` nothing is created or removed (and nothing locked).
        """
        self._open_out(dry_run)
        state = self._state
        scan = scan_origins(self.rows, self.field, page_size=max(self.options.page_size, 2000))
        if not self.options.allow_mixed:
            scan.require_one()
            recorded = state.get("origin")
            if recorded and scan.origins:
                (origin,) = scan.origins
                if origin.as_dict() != recorded:
                    raise ExportError(
                        f"The rows now come from {origin.describe()}, but the shards in "
                        f"{self.out} hold latents of {Origin(**recorded).describe()}. "
                        "Start again with --overwrite, or export to a new --out."
                    )
        resume_after = self._pk(state["last_pk"]) if state.get("last_pk") is not None else None
        todo = scan.rows
        if resume_after is not None:
            todo = self.rows.filter(pk__gt=resume_after).count()
            todo = min(todo, scan.rows)
        return Plan(
            scan=scan,
            todo=todo,
            resume_after=resume_after,
            shards_done=len(state.get("shards", [])),
        )

    def close(self) -> None:
        """Release the output folder's lock."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _open_out(self, dry_run: bool = False) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise ExportError(f"--out {out} is a file, not a folder.")
        if not dry_run:
            out.mkdir(parents=True, exist_ok=True)
            self._lock = lock_folder(out / LOCK_FILE)
        progress = out / PROGRESS_FILE
        if self.options.overwrite and not dry_run:
            self._clear()
        elif not progress.exists() and out.is_dir():
            stray = [p.name for p in out.iterdir() if p.name != LOCK_FILE]
            if stray:
                raise ExportError(
                    f"--out {out} is not empty and holds no latentstore export "
                    f"({', '.join(sorted(stray)[:5])}); pick an empty folder."
                )
        if progress.exists():
            try:
                state = json.loads(progress.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise ExportError(f"{progress} is not readable ({exc}); use --overwrite.") from None
            if state.get("version") != STATE_VERSION:
                raise ExportError(f"{progress} has an unknown version; use --overwrite.")
            wanted = self.selection()
            differ = [k for k in wanted if state.get("selection", {}).get(k) != wanted[k]]
            if differ:
                was = ", ".join(f"{k}={state['selection'].get(k)!r}" for k in differ)
                now = ", ".join(f"{k}={wanted[k]!r}" for k in differ)
                raise ExportError(
                    f"{out} holds an export made with other options ({was}; asked now: {now}). "
                    "Rerun with the same options to continue it, --overwrite to start again, "
                    "or choose another --out."
                )
            self._state = state
        else:
            self._state = {
                "version": STATE_VERSION,
                "selection": self.selection(),
                "origin": None,
                "origins": [],
                "shards": [],
                "last_pk": None,
                "skipped": {},
                "complete": False,
                "started": _now(),
            }
        if not dry_run:
            self._drop_partial()

    def _clear(self) -> None:
        """Remove what an export writes (and nothing else) for --overwrite."""
        for name in (PROGRESS_FILE, CARD_JSON, CARD_README):
            with contextlib.suppress(FileNotFoundError):
                (self.out / name).unlink()
        if self.data_dir.is_dir():
            for path in self.data_dir.iterdir():
                if _SHARD_RE.match(path.name):
                    path.unlink()
            with contextlib.suppress(OSError):
                self.data_dir.rmdir()

    def _drop_partial(self) -> None:
        """Shards of an interrupted run that the progress file does not list: remove them."""
        if not self.data_dir.is_dir():
            return
        listed = {Path(s["path"]).name for s in self._state.get("shards", [])}
        for path in self.data_dir.iterdir():
            if _SHARD_RE.match(path.name) and path.name not in listed:
                path.unlink()

    def _pk(self, value: Any) -> Any:
        return self._pk_field.to_python(value)

    # -- the run
    def run(
        self, on_row: Callable[[int], None] | None = None, plan: Plan | None = None
    ) -> ExportResult:
        """Write the rows after the resume point into new shards; then the dataset card."""
        plan = plan or self.prepare()
        started = time.perf_counter()
        result = ExportResult(out=self.out, resumed_after=plan.resume_after)
        if plan.scan.origins and not self.options.allow_mixed:
            (self._origin,) = plan.scan.origins
            self._state["origin"] = self._origin.as_dict()
        self.data_dir.mkdir(exist_ok=True)
        names = ("pk", self.field.attname, *(c.attname for c in self.columns))
        pages = prefetched(
            self.rows,
            names,
            self.options.page_size,
            plan.resume_after,
            prepare=_verified,
            blob=self.field.attname,
        )
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="latents-export")
        try:
            self._write_rows((row for page in pages for row in page), result, on_row)
        finally:
            pages.close()  # stops the reader thread
            self._thread.shutdown()
        self._finish(result, plan.scan)
        result.seconds = time.perf_counter() - started
        return result

    def _write_rows(
        self, stream: Iterator[Any], result: ExportResult, on_row: Callable[[int], None] | None
    ) -> None:
        """Write the rows of ``stream`` into new shards, completing each when it is full."""
        pending = _Pending()
        index = sum(s["rows"] for s in self._state["shards"])
        pk = None
        try:
            for pk, blob, extra, read in stream:
                try:
                    sample = self._sample(pk, blob, extra, read)
                except (LatentFormatError, ExportError) as exc:
                    pending.skipped[str(json_pk(pk))] = str(exc)
                    result.skipped[str(json_pk(pk))] = str(exc)
                else:
                    full = self._add(pending, sample, index)
                    index += 1
                    result.rows += 1
                    if full:
                        self._close_shard(pending, pk, result)
                        pending = _Pending()
                if on_row:
                    on_row(1)
            if pending.shard is not None:
                self._close_shard(pending, pk, result)
            elif pending.skipped:  # only unreadable rows after the last shard
                self._record(None, pk, pending.skipped, pending.origins)
        except BaseException:
            if pending.shard is not None:
                pending.shard.abort()
            raise

    def _add(self, pending: _Pending, sample: dict[str, Any], index: int) -> bool:
        """Add ``sample`` to the pending shard (opened on its first row); True once it is full."""
        pending.origins[sample["_origin"]] = pending.origins.get(sample["_origin"], 0) + 1
        if pending.shard is None:
            pending.shard = self._new_shard(len(self._state["shards"]))
        if self.options.format == "webdataset":
            add_tar_sample(pending.shard, sample, index, self.options.allow_mixed, self.columns)
            return pending.shard.nbytes >= self.options.shard_size
        pending.page.append(sample)
        pending.page_bytes += sample["latents"].nbytes + 64
        full = pending.shard.nbytes + pending.page_bytes >= self.options.shard_size
        if full or len(pending.page) >= self.options.page_size:
            pending.shard.write(self._table(pending.page))
            pending.page, pending.page_bytes = [], 0
        return full

    def _close_shard(self, pending: _Pending, last_pk: Any, result: ExportResult) -> None:
        """Write the pending shard's last page, complete it and count it in ``result``."""
        if pending.page:
            pending.shard.write(self._table(pending.page))
            pending.page = []
        result.bytes += self._complete(pending.shard, last_pk, pending.skipped, pending.origins)
        result.shards += 1

    def _finish(self, result: ExportResult, scan: OriginScan) -> None:
        """Mark the export complete in the progress file and write the dataset card."""
        state = self._state
        state["complete"] = True
        state["finished"] = _now()
        write_json_atomic(self.out / PROGRESS_FILE, state)
        result.total = sum(s["rows"] for s in state["shards"])
        result.complete = True
        self.write_card(scan)

    def _new_shard(self, number: int) -> Any:
        path = self.data_dir / f"train-{number:05d}.{EXTENSIONS[self.options.format]}"
        if self.options.format == "webdataset":
            return TarShard(path)
        return ParquetShard(path, self.schema(), self._thread)

    def _complete(
        self, shard: Any, last_pk: Any, skipped: dict[str, str], origins: dict[Origin, int]
    ) -> int:
        size = shard.close()
        entry = {
            "path": f"{DATA_DIR}/{shard.path.name}",
            "rows": shard.rows,
            "bytes": size,
            "last_pk": json_pk(last_pk),
        }
        self._record(entry, last_pk, skipped, origins)
        return size

    def _record(
        self,
        entry: dict[str, Any] | None,
        last_pk: Any,
        skipped: dict[str, str],
        origins: dict[Origin, int],
    ) -> None:
        """Make a finished shard (and the rows it covers) durable in the progress file."""
        state = self._state
        if entry is not None:
            state["shards"].append(entry)
        state["last_pk"] = json_pk(last_pk)
        state["skipped"].update(skipped)
        counts = {
            Origin(**{k: v for k, v in o.items() if k != "rows"}): o["rows"]
            for o in state["origins"]
        }
        for origin, n in origins.items():
            counts[origin] = counts.get(origin, 0) + n
        state["origins"] = [{**o.as_dict(), "rows": n} for o, n in sorted(counts.items())]
        state["complete"] = False
        write_json_atomic(self.out / PROGRESS_FILE, state)

    # -- samples
    def _sample(self, pk: Any, blob: Any, extra: tuple[Any, ...], read: Any) -> dict[str, Any]:
        if isinstance(read, Exception):
            raise read
        header, latents = read
        origin = Origin.of(header)
        if self._origin is not None and origin != self._origin:
            raise ExportError(
                f"re-encoded since the scan with {origin.describe()}; not exported (rerun the "
                "export to include it, or --allow-mixed)"
            )
        if self.options.model_space:
            latents = model_space(latents, header)
        out = latents.astype(self.options.dtype, copy=False)
        if self.options.dtype == "float16" and self.options.model_space:
            if not np.isfinite(out).all():
                raise ExportError("model-space latents exceed float16; export with --dtype float32")
        sample: dict[str, Any] = {
            "pk": pk,
            "latents": out,
            "width": header.width,
            "height": header.height,
            "pad_right": header.pad_right,
            "pad_bottom": header.pad_bottom,
            "crop": [0, 0, header.width, header.height],
            "digest": blob_digest(blob),
            "_origin": origin,
        }
        for spec, value in zip(self.columns, extra, strict=True):
            sample[spec.name] = value
        return sample

    def schema(self) -> Any:
        """The Parquet shards' Arrow schema (made once)."""
        if self._schema is None:
            self._schema = arrow_schema(
                self.options.dtype, kind_of(self._pk_field), self.options.allow_mixed, self.columns
            )
        return self._schema

    def _table(self, page: list[dict[str, Any]]) -> Any:
        return arrow_table(page, self.schema(), self.options.allow_mixed, self.columns)

    # -- the dataset card
    def write_card(self, scan: OriginScan | None = None) -> dict[str, Any]:
        """Write ``latentstore.json`` and ``README.md`` beside the shards; return the former."""
        card = build_card(
            label=self.model._meta.label,
            field=self.field.name,
            options=self.options,
            state=self._state,
            specs=self.columns,
            pk_type="int64" if kind_of(self._pk_field) == "int" else "string",
            scan=scan,
            out=self.out,
            command=self.command_line,
            created=_now(),
        )
        write_json_atomic(self.out / CARD_JSON, card)
        write_text_atomic(self.out / CARD_README, card_markdown(card))
        return card


def _verified(page: list[tuple[Any, ...]]) -> list[tuple[Any, Any, tuple[Any, ...], Any]]:
    """``(pk, blob, other columns, (header, latents) or the LatentFormatError)`` per row."""
    rows = []
    for values in page:
        blob = values[1]
        try:
            if not blob:
                raise LatentFormatError("no latents (the row changed since the scan)")
            read: Any = read_latents(blob)
        except LatentFormatError as exc:
            read = exc
        rows.append((values[0], blob, values[2:], read))
    return rows


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()

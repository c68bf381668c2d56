"""The files of an export: Parquet and tar shards written under a ``.tmp`` name, samples as
Arrow tables and tar members, Arrow arrays built from numpy buffers, ustar headers, atomic JSON
and text, a lock on the output folder.

Used by :mod:`latentstore.exports`; pyarrow is imported where Parquet is written.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tarfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from latentstore.samples import ORIGIN_FIELDS, SAMPLE_FIELDS, ColumnSpec, ExportError, json_pk

__all__ = [
    "DATA_DIR",
    "EXTENSIONS",
    "ParquetShard",
    "TarShard",
    "add_tar_sample",
    "arrow_array",
    "arrow_schema",
    "arrow_table",
    "buffer_array",
    "lock_folder",
    "nested_latents",
    "nested_type",
    "tar_header",
    "write_json_atomic",
    "write_text_atomic",
]

#: Shards live in ``DIR/data``: ``train-00000.parquet`` or ``train-00000.tar``, ...
DATA_DIR = "data"
EXTENSIONS = {"hf": "parquet", "webdataset": "tar"}

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")  # ASCII, no dot: a webdataset key


class ParquetShard:
    """One Parquet file under a ``.tmp`` name, a row group per page, written by a thread.

    ``write_table`` runs on the exporter's writer thread (pyarrow releases the GIL there) while
    the next page is read and converted; at most two pages wait for it, so memory stays flat.
    """

    def __init__(self, path: Path, schema: Any, writer: ThreadPoolExecutor) -> None:
        import pyarrow.parquet as pq

        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._writer = pq.ParquetWriter(
            self._file,
            schema,
            # Latents are noise to a compressor: snappy gives nothing back and costs time.
            compression="none",
            use_dictionary=False,
            write_statistics=["pk"],
            # Levels and values in batches of a million, not 1,024: a latent is 16,384 values,
            # and the writer's per-batch work cost a fifth of its time.
            write_batch_size=1 << 20,
        )
        self._thread = writer
        self._pending: list[Future[None]] = []
        self._queued = 0
        self.rows = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the row groups handed to the writer (the file's size, give or take)."""
        return self._queued

    def write(self, table: Any) -> None:
        while len(self._pending) >= 2:
            self._pending.pop(0).result()
        self._pending.append(self._thread.submit(self._writer.write_table, table))
        self.rows += table.num_rows
        self._queued += table.nbytes

    def close(self) -> int:
        for pending in self._pending:
            pending.result()
        self._writer.close()
        return _finish(self._file, self.tmp, self.path)

    def abort(self) -> None:
        for pending in self._pending:
            with contextlib.suppress(Exception):
                pending.result()
        with contextlib.suppress(Exception):
            self._writer.close()
        _abandon(self._file, self.tmp)


class TarShard:
    """One tar file of ``KEY.npy`` + ``KEY.json`` members, under a ``.tmp`` name until complete.

    Written block by block as ``tarfile`` writes a ustar archive (a 512-byte header per member,
    data padded to 512 bytes, two zero blocks and padding to a 10 KiB record at the end); the
    headers come from one ``tarfile`` template with the name, size and checksum filled in.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self.nbytes = 0
        self.rows = 0

    def add(self, key: str, npy: bytes, meta: bytes) -> None:
        for name, data in ((f"{key}.npy", npy), (f"{key}.json", meta)):
            padding = -len(data) % tarfile.BLOCKSIZE
            self._file.write(tar_header(name, len(data)))
            self._file.write(data)
            self._file.write(bytes(padding))
            self.nbytes += tarfile.BLOCKSIZE + len(data) + padding
        self.rows += 1

    def close(self) -> int:
        end = 2 * tarfile.BLOCKSIZE
        end += -(self.nbytes + end) % tarfile.RECORDSIZE
        self._file.write(bytes(end))
        return _finish(self._file, self.tmp, self.path)

    def abort(self) -> None:
        _abandon(self._file, self.tmp)


def arrow_schema(dtype: str, pk_kind: str, allow_mixed: bool, columns: list[ColumnSpec]) -> Any:
    """The Parquet shards' schema: every sample's fields, the origin (``allow_mixed``), the
    model columns."""
    import pyarrow as pa

    value = pa.float16() if dtype == "float16" else pa.float32()
    fields = [
        pa.field("pk", pa.int64() if pk_kind == "int" else pa.string(), nullable=False),
        # Nothing in it is ever null: saying so spares the writer its null bookkeeping.
        pa.field("latents", nested_type(value), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("pad_right", pa.int32()),
        pa.field("pad_bottom", pa.int32()),
        pa.field("crop", pa.list_(pa.int32(), 4)),
        pa.field("digest", pa.string()),
    ]
    if allow_mixed:
        fields += [pa.field(n, pa.string()) for n in ORIGIN_FIELDS[:3]]
        fields += [pa.field(n, pa.float64()) for n in ORIGIN_FIELDS[3:]]
    fields += [pa.field(c.name, c.arrow_type()) for c in columns]
    return pa.schema(fields)


def arrow_table(
    page: list[dict[str, Any]], schema: Any, allow_mixed: bool, columns: list[ColumnSpec]
) -> Any:
    """A page of samples as an Arrow table of :func:`arrow_schema`'s ``schema``."""
    import pyarrow as pa

    crops = np.asarray([s["crop"] for s in page], dtype=np.int32).reshape(-1)
    arrays = [
        arrow_array([_arrow_pk(s["pk"]) for s in page], schema.field("pk").type),
        nested_latents([s["latents"] for s in page], schema.field("latents").type),
        *(arrow_array([s[n] for s in page], pa.int32()) for n in SAMPLE_FIELDS[2:6]),
        pa.FixedSizeListArray.from_arrays(buffer_array(crops), type=schema.field("crop").type),
        arrow_array([s["digest"] for s in page], pa.string()),
    ]
    if allow_mixed:
        for name in ORIGIN_FIELDS:
            values = [getattr(s["_origin"], name) for s in page]
            arrays.append(arrow_array(values, schema.field(name).type))
    for spec in columns:
        arrays.append(arrow_array([spec.to_arrow(s[spec.name]) for s in page], spec.arrow_type()))
    return pa.Table.from_arrays(arrays, schema=schema)


def _arrow_pk(value: Any) -> Any:
    return value if isinstance(value, int) else str(value)


def add_tar_sample(
    shard: TarShard,
    sample: dict[str, Any],
    index: int,
    allow_mixed: bool,
    columns: list[ColumnSpec],
) -> None:
    """Add ``sample`` to ``shard`` as ``KEY.npy`` and ``KEY.json``; ``index`` names the rows
    whose primary key is no webdataset key."""
    pk_text = str(sample["pk"])
    key = pk_text if _SAFE_KEY.match(pk_text) and len(pk_text) <= 90 else f"row{index:09d}"
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(sample["latents"]), allow_pickle=False)
    meta: dict[str, Any] = {
        "pk": json_pk(sample["pk"]),
        "width": sample["width"],
        "height": sample["height"],
        "pad_right": sample["pad_right"],
        "pad_bottom": sample["pad_bottom"],
        "crop": sample["crop"],
        "digest": sample["digest"],
    }
    if allow_mixed:
        meta.update({name: getattr(sample["_origin"], name) for name in ORIGIN_FIELDS})
    for spec in columns:
        meta[spec.name] = spec.to_json(sample[spec.name])
    data = json.dumps(meta, ensure_ascii=False, sort_keys=False).encode("utf-8")
    shard.add(key, buf.getvalue(), data)


def _tar_template() -> bytes:
    info = tarfile.TarInfo("x")
    info.mode = 0o644
    info.mtime = 0  # equal exports give equal bytes
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


_TAR_TEMPLATE = _tar_template()


def tar_header(name: str, size: int) -> bytes:
    """The ustar header ``tarfile`` writes for a regular file ``name`` (ASCII, at most 100
    bytes) of ``size`` bytes, mode 644, owner 0, time 0."""
    raw = name.encode("ascii")
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    header = bytearray(_TAR_TEMPLATE)
    header[0:100] = raw.ljust(100, b"\0")
    header[124:136] = b"%011o\0" % size
    header[148:156] = b" " * 8  # the checksum counts its own field as spaces
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _finish(fh: Any, tmp: Path, path: Path) -> int:
    fh.flush()
    os.fsync(fh.fileno())
    size = fh.tell()
    fh.close()
    os.replace(tmp, path)
    return size


def _abandon(fh: Any, tmp: Path) -> None:
    with contextlib.suppress(Exception):
        fh.close()
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, ensure_ascii=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def nested_type(value: Any) -> Any:
    """``list<list<list<value>>>`` (C, h, w) without nulls."""
    import pyarrow as pa

    for _level in range(3):
        value = pa.list_(pa.field("item", value, nullable=False))
    return value


def nested_latents(arrays: list[np.ndarray], list_type: Any) -> Any:
    """``list<list<list<value>>>`` of (C, h, w) arrays of any shapes, built from offsets."""
    import pyarrow as pa

    shapes = np.asarray([a.shape for a in arrays], dtype=np.int64).reshape(-1, 3)
    c, h, w = shapes[:, 0], shapes[:, 1], shapes[:, 2]
    values = buffer_array(np.concatenate([a.reshape(-1) for a in arrays]))

    def offsets(lengths: np.ndarray) -> Any:
        out = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=out[1:])
        return buffer_array(out.astype(np.int32))

    rows = offsets(np.repeat(w, c * h))
    planes = offsets(np.repeat(h, c))
    channels = offsets(c)
    inner = pa.ListArray.from_arrays(rows, values, type=list_type.value_type.value_type)
    middle = pa.ListArray.from_arrays(planes, inner, type=list_type.value_type)
    return pa.ListArray.from_arrays(channels, middle, type=list_type)


# Arrow arrays are built from numpy buffers here rather than with ``pyarrow.array``: that one
# imports pandas (when installed, as ``datasets`` installs it) to look for pandas objects, which
# costs an export process a second and ~150 MB of memory.
_NUMPY_OF_ARROW = {
    "int32": np.int32,
    "int64": np.int64,
    "float": np.float32,
    "double": np.float64,
    "halffloat": np.float16,
}


def buffer_array(values: np.ndarray) -> Any:
    """A null-free Arrow array over a numpy array's buffer (no copy)."""
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(
        pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)]
    )


def arrow_array(values: list[Any], arrow_type: Any) -> Any:
    """An Arrow array of ``values`` (``None`` is null): strings, numbers and booleans from
    buffers, anything else through ``pyarrow.array``."""
    import pyarrow as pa

    n = len(values)
    nulls = np.fromiter((v is None for v in values), dtype=bool, count=n)
    null_count = int(nulls.sum())
    validity = pa.py_buffer(np.packbits(~nulls, bitorder="little")) if null_count else None
    if pa.types.is_string(arrow_type):
        data = [b"" if v is None else str(v).encode("utf-8") for v in values]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, data), dtype=np.int64, count=n), out=offsets[1:])
        if offsets[-1] < 2**31:
            buffers = [
                validity,
                pa.py_buffer(offsets.astype(np.int32)),
                pa.py_buffer(b"".join(data)),
            ]
            return pa.Array.from_buffers(arrow_type, n, buffers, null_count=null_count)
    elif str(arrow_type) in _NUMPY_OF_ARROW:
        numbers = np.fromiter(
            (0 if v is None else v for v in values), dtype=_NUMPY_OF_ARROW[str(arrow_type)], count=n
        )
        buffers = [validity, pa.py_buffer(numbers)]
        return pa.Array.from_buffers(arrow_type, n, buffers, null_count=null_count)
    elif pa.types.is_boolean(arrow_type):
        bits = np.packbits(np.fromiter((bool(v) for v in values), bool, n), bitorder="little")
        buffers = [validity, pa.py_buffer(bits)]
        return pa.Array.from_buffers(arrow_type, n, buffers, null_count=null_count)
    return pa.array(values, type=arrow_type)


class _Lock:
    def __init__(self, fh: Any) -> None:
        self._fh = fh

    def close(self) -> None:
        self._fh.close()


def lock_folder(path: Path) -> _Lock:
    """An exclusive lock on ``path`` (released when closed or when the process dies)."""
    fh = open(path, "a+")  # noqa: SIM115 - kept open while the export runs
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory lock
        return _Lock(fh)
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise ExportError(
            f"Another latents_export is writing to {path.parent}; wait for it or choose "
            "another --out."
        ) from None
    return _Lock(fh)

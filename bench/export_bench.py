"""Training exports and LatentDataset against their floors, measured side by side in one run.

    python bench/export_bench.py [--rows 1000,4000] [--rounds 3] [--workers 2] [--batch 32]

The issue's figures use ``--rows 2500,10000``. Builds a throwaway PostgreSQL database (127.0.0.1)
with the largest ``--rows`` count of ready photos holding 4x64x64 float16 latents (512x512
pictures, seeded noise: no model is needed), then for each count:

* **export rate**: ``manage.py latents_export`` (``--format hf`` and ``webdataset``) in its own
  process, its rows/s as the command reports them (header scan, streaming, shards, card), against
  a bare server-side-cursor loop in this process that only reads the blob column
  (``SELECT image ... ORDER BY id`` through Django's chunked cursor), and the same loop in
  psycopg's binary protocol (the export reads blobs that way); rounds interleave them and the
  median is reported;
* **peak RSS** of each export process (``wait4``'s ``ru_maxrss``): flat means bounded memory;

and at the largest count:

* **dataset throughput**: ``LatentDataset`` through ``DataLoader(batch_size=--batch,
  num_workers=--workers)``, the dataset built inside the timing (its header scan included),
  against the exported Parquet read back with Hugging Face ``datasets``
  (``load_dataset("parquet", data_dir=...).with_format("torch")`` through the same DataLoader;
  building the Arrow cache is timed separately and left out of the ratio).

Prints a table and the ratios; writes nothing outside a temporary folder and drops its database.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import sd_blob  # noqa: E402  (after the path insert)

PG = "postgresql://postgres@127.0.0.1:5432"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1000,4000", help="Row counts, comma-separated.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds per count (median).")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers.")
    parser.add_argument("--batch", type=int, default=32, help="DataLoader batch size.")
    parser.add_argument("--database-url", default=f"{PG}/postgres")
    args = parser.parse_args()
    counts = sorted(int(n) for n in args.rows.split(","))

    var = Path(tempfile.mkdtemp(prefix="lsbench-export-"))
    os.environ.update(
        {
            "LATENTSTORE_VAR_DIR": str(var),
            "CELERY_BROKER_URL": "memory://",
            "DJANGO_DEBUG": "0",
            "DATABASE_URL": args.database_url,
            "DJANGO_SETTINGS_MODULE": "project.settings",
            "HF_DATASETS_CACHE": str(var / "hf-cache"),
            "HF_HUB_OFFLINE": "1",
        }
    )
    import django

    django.setup()
    from django.db import connection

    name = f"lsbench_export_{uuid.uuid4().hex[:8]}"
    connection.settings_dict["TEST"]["NAME"] = name
    old = connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        run(args, counts, var, f"{args.database_url.rsplit('/', 1)[0]}/{name}")
    finally:
        connection.creation.destroy_test_db(old, verbosity=0)
        shutil.rmtree(var, ignore_errors=True)
    return 0


def fill(count: int) -> list[int]:
    """``count`` ready photos with distinct 4x64x64 float16 latents; their pks, ascending."""
    import numpy as np
    from django.db import connection, transaction

    from latentstore.latents import blob_digest
    from project.models import Photo

    pks = sorted(
        p.pk for p in Photo.objects.bulk_create(Photo(title=f"p{i}") for i in range(count))
    )
    rng = np.random.default_rng(0)
    table = Photo._meta.db_table
    sql = (
        f"UPDATE \"{table}\" SET image = %s, image_state = 'ready', image_digest = %s, "
        "image_width = 512, image_height = 512, image_autoencoder = 'default' WHERE id = %s"
    )
    with transaction.atomic(), connection.cursor() as cursor:
        for start in range(0, count, 500):
            params = []
            for pk in pks[start : start + 500]:
                z = rng.normal(scale=5.0, size=(4, 64, 64)).astype("float32")
                blob = sd_blob(z, 512, 512)
                params.append((blob, blob_digest(blob), pk))
            cursor.executemany(sql, params)
    with connection.cursor() as cursor:
        cursor.execute(f'VACUUM ANALYZE "{table}"')
    return pks


def bare_loop(last_pk: int, binary: bool = False) -> tuple[int, float]:
    """Rows and seconds of a server-side cursor reading only the blob column: Django's (bytea
    as hex text), or with ``binary`` psycopg's in the binary protocol (as the export reads)."""
    from django.db import connection, transaction

    from project.models import Photo

    table = Photo._meta.db_table
    start = time.perf_counter()
    n = nbytes = 0
    with transaction.atomic():
        if binary:
            cursor = connection.connection.cursor(name="bare_binary", binary=True)
        else:
            cursor = connection.chunked_cursor()
        with cursor:
            cursor.execute(
                f"SELECT image FROM \"{table}\" WHERE image_state = 'ready' AND id <= %s "
                "ORDER BY id",
                [last_pk],
            )
            while rows := cursor.fetchmany(200):
                for (blob,) in rows:
                    nbytes += len(blob)
                    n += 1
    return n, time.perf_counter() - start


def run_export(url: str, out: Path, last_pk: int, fmt: str) -> dict:
    """latents_export in a child process, with its peak RSS from wait4."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "DATABASE_URL": url}
    command = [sys.executable, "manage.py", "latents_export", "demo.Photo.image",
               "--out", str(out), "--format", fmt,
               "--filter", json.dumps({"pk__lte": last_pk})]  # fmt: skip
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log, text=True)
        _pid, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read()
    if process.returncode:
        raise RuntimeError(f"latents_export failed ({process.returncode}):\n{output}")
    match = re.search(r"Exported (\d+) rows .* in ([\d.]+) s", output)
    if not match:
        raise RuntimeError(f"unexpected output:\n{output}")
    return {
        "rows": int(match.group(1)),
        "seconds": float(match.group(2)),
        "wall": wall,
        "rss_mb": usage.ru_maxrss / 1024,  # kilobytes on Linux
    }


def dataset_rate(last_pk: int, workers: int, batch: int) -> tuple[int, float]:
    import torch
    from torch.utils.data import DataLoader

    from latentstore.training import LatentDataset
    from project.models import Photo

    start = time.perf_counter()
    ds = LatentDataset(Photo.objects.filter(pk__lte=last_pk), model_space=False)
    n = 0
    for batch_ in DataLoader(ds, batch_size=batch, num_workers=workers):
        assert batch_["latents"].dtype == torch.float32
        n += len(batch_["latents"])
    return n, time.perf_counter() - start


def hf_rate(out: Path, cache: Path, workers: int, batch: int) -> tuple[int, float, float]:
    import datasets
    from torch.utils.data import DataLoader

    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    ds = datasets.load_dataset("parquet", data_dir=str(out), split="train", cache_dir=str(cache))
    loaded = time.perf_counter() - start
    ds = ds.with_format("torch", columns=["pk", "latents"])
    start = time.perf_counter()
    n = 0
    for batch_ in DataLoader(ds, batch_size=batch, num_workers=workers):
        n += len(batch_["latents"])
    return n, time.perf_counter() - start, loaded


def run(args: argparse.Namespace, counts: list[int], var: Path, url: str) -> None:
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    log(f"filling {counts[-1]} rows of 4x64x64 float16 latents")
    pks = fill(counts[-1])
    results = []
    for count in counts:
        last_pk = pks[count - 1]
        bare, binary, ours = [], [], {"hf": [], "webdataset": []}
        for round_ in range(args.rounds):
            n, seconds = bare_loop(last_pk)
            assert n == count, (n, count)
            bare.append(n / seconds)
            n, seconds = bare_loop(last_pk, binary=True)
            assert n == count, (n, count)
            binary.append(n / seconds)
            for fmt in ours:
                result = run_export(url, var / f"out-{fmt}", last_pk, fmt)
                assert result["rows"] == count, result
                ours[fmt].append(result)
            log(
                f"{count} rows, round {round_ + 1}: bare {bare[-1]:.0f} rows/s, "
                + ", ".join(
                    f"{f} {r[-1]['rows'] / r[-1]['seconds']:.0f} rows/s" for f, r in ours.items()
                )
            )
        results.append((count, bare, binary, ours))

    last_pk = pks[counts[-1] - 1]
    log("dataset throughput")
    rates_ds, rates_hf, loads = [], [], []
    for _ in range(args.rounds):
        n, seconds = dataset_rate(last_pk, args.workers, args.batch)
        assert n == counts[-1]
        rates_ds.append(n / seconds)
        n, seconds, loaded = hf_rate(var / "out-hf", var / "hf-cache", args.workers, args.batch)
        assert n == counts[-1]
        rates_hf.append(n / seconds)
        loads.append(loaded)

    import datasets
    import django
    import pyarrow
    import torch
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        pg = cursor.fetchone()[0]
    print(
        f"# latentstore export benchmark — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), PostgreSQL {pg}, Python "
        f"{platform.python_version()}, Django {django.get_version()}, pyarrow "
        f"{pyarrow.__version__}, datasets {datasets.__version__}, torch {torch.__version__}"
    )
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"4x64x64 float16 latents (32 KB blobs); median of {args.rounds} rounds; load average "
        f"at the end {load} (other work on the machine slows both sides of each ratio)\n"
    )
    print(
        "| rows | bare cursor loop | export hf | ratio | peak RSS "
        "| export webdataset | ratio | peak RSS |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for count, bare, _binary, ours in results:
        base = statistics.median(bare)
        cells = [f"{count}", f"{base:,.0f} rows/s"]
        for fmt in ("hf", "webdataset"):
            rate = statistics.median(r["rows"] / r["seconds"] for r in ours[fmt])
            rss = max(r["rss_mb"] for r in ours[fmt])
            cells += [f"{rate:,.0f} rows/s", f"{rate / base:.2f}x", f"{rss:.0f} MB"]
        print("| " + " | ".join(cells) + " |")
    print(
        "\nThe bare loop reads through Django's server-side cursor, as a project would; bytea "
        "comes as hex text. The same loop in psycopg's binary protocol, as the export reads:\n"
    )
    print("| rows | bare loop, binary protocol | export hf | ratio | export webdataset | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for count, _bare, binary, ours in results:
        base = statistics.median(binary)
        cells = [f"{count}", f"{base:,.0f} rows/s"]
        for fmt in ("hf", "webdataset"):
            rate = statistics.median(r["rows"] / r["seconds"] for r in ours[fmt])
            cells += [f"{rate:,.0f} rows/s", f"{rate / base:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    ds_rate, hf_rate_ = statistics.median(rates_ds), statistics.median(rates_hf)
    print(
        f"\nDataset throughput, {counts[-1]} rows, DataLoader(batch_size={args.batch}, "
        f"num_workers={args.workers}):\n"
    )
    print("| reader | rate | ratio |")
    print("|---|---:|---:|")
    print(f"| LatentDataset, from PostgreSQL (scan included) | {ds_rate:,.0f} rows/s | "
          f"{ds_rate / hf_rate_:.2f}x |")  # fmt: skip
    print(f"| datasets, exported Parquet (Arrow cache built) | {hf_rate_:,.0f} rows/s | 1.00x |")
    print(
        f"\n(datasets' load_dataset of the Parquet shards — building its Arrow cache — took "
        f"{statistics.median(loads):.2f} s more, not counted above.)"
    )
    first, last = results[0], results[-1]
    growth = max(r["rss_mb"] for r in last[3]["hf"]) / max(r["rss_mb"] for r in first[3]["hf"])
    print(
        f"\nExport peak RSS from {first[0]} to {last[0]} rows ({last[0] / first[0]:.1f}x the "
        f"rows): {growth:.2f}x."
    )


if __name__ == "__main__":
    sys.exit(main())

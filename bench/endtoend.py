"""The end-to-end part of ``bench/gpu_bench.py``: the whole path, as users run it.

A real Celery worker process (``-P solo``) on Redis and PostgreSQL encodes rows saved by this
process, which plays the web process:

- **one by one**: ``Photo.objects.create(image=...)`` per row, each committing on its own and
  sending its own message, as a site's uploads do; timed from the first save until every row
  is ready;
- **bulk**: the same saves in one transaction inside ``batched_enqueue`` (batch messages), as
  an import does; timed the same way;
- **first picture**: one row saved on an idle, warm worker, until it is ready;
- **stale messages**: ``encode`` messages naming rows that are already done (what the messages
  of rows another claim took cost the worker), timed until the queue is empty;
- **host stages**: ``encode_rows`` run in this process on fresh rows, its per-stage seconds
  (decoding the upload, stacking, the model, unpacking, packing, the write-back) per picture.

The worker is warmed first (the model loaded, and one row per size encoded). Nothing here is a
test: measurements only.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LABEL = "demo.Photo"


@dataclass
class EndToEnd:
    """What one size measured: seconds per path, and the host stages per picture."""

    size: int
    rows: int
    seed: float = 0.0  # the seed loop over as many pictures, run beside each round
    one_by_one: float = 0.0
    bulk: float = 0.0
    first: float = 0.0  # best of the tries
    seed_one: float = 0.0  # the seed loop's best time for one picture, beside those tries
    stale_ms: float = 0.0  # per message, through Celery and Redis (sending included)
    stale_cpu_ms: float = 0.0  # per message, the worker process's CPU time
    stale_claim_ms: float = 0.0  # per message, the worker function alone (in this process)
    stages_ms: dict[str, float] = field(default_factory=dict)  # per picture


def jpegs(images) -> list[bytes]:
    out = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


class Worker:
    """A ``celery worker -P solo`` process on this benchmark's database and queues."""

    def __init__(self, env: dict[str, str]) -> None:
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "project",
            "--quiet",
            "worker",
            "-P",
            "solo",
            "-Q",
            "latents.encode",
            "--loglevel=WARNING",
            "--without-heartbeat",
            "--without-mingle",
            "--without-gossip",
            "-n",
            f"bench-{os.getpid()}@%h",
        ]
        self.proc = subprocess.Popen(command, env=env, cwd=ROOT)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {self.proc.returncode}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def database_url() -> str:
    from urllib.parse import quote

    from django.db import connection

    db = connection.settings_dict
    credentials = quote(db["USER"] or "") + (
        ":" + quote(db["PASSWORD"]) if db.get("PASSWORD") else ""
    )
    return f"postgresql://{credentials}@{db['HOST']}:{db['PORT']}/{quote(db['NAME'])}"


def wait_ready(worker: Worker, pks: list[int], poll: float, timeout: float = 1800) -> None:
    """Until every row is ready (a failed row is an error: the benchmark would be wrong)."""
    from project.models import Photo

    deadline = time.monotonic() + timeout
    rows = Photo.objects.filter(pk__in=pks)
    while rows.exclude(image_state="ready").exists():
        if rows.filter(image_state="failed").exists():
            raise RuntimeError("a row failed to encode")
        worker.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"rows not encoded within {timeout} s")
        time.sleep(poll)


def timed_saves(worker: Worker, blobs: list[bytes], poll: float, *, bulk: bool) -> float:
    """From the first save to every row ready: saved one by one (a message each, as a site's
    uploads) or in one transaction inside ``batched_enqueue`` (batch messages, as an import).

    The end is the last row's write-back time as the worker recorded it (``image_changed``, the
    same clock), not when this process noticed: polling often would take CPU from the worker.
    """
    from django.db import transaction
    from django.db.models import Max

    from latentstore.encoding import batched_enqueue
    from project.models import Photo

    start = time.time()
    if bulk:
        with batched_enqueue(), transaction.atomic():
            photos = [Photo.objects.create(title="bench", image=b) for b in blobs]
    else:
        photos = [Photo.objects.create(title="bench", image=b) for b in blobs]
    pks = [p.pk for p in photos]
    wait_ready(worker, pks, poll)
    last = Photo.objects.filter(pk__in=pks).aggregate(last=Max("image_changed"))["last"]
    return last.timestamp() - start


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stale_cost(worker: Worker, messages: int, broker_url: str, prefix: str) -> tuple[float, float]:
    """Milliseconds per ``encode`` message that finds its row done: wall time through Celery
    and Redis (sent all at once, until the worker has taken the last one off the queue, so the
    sending counts too), and the worker process's CPU time."""
    import redis

    from latentstore.encoding import enqueue_encode
    from project.models import Photo

    photo = Photo.objects.filter(image_state="ready").first()
    client = redis.Redis.from_url(broker_url)
    key = f"{prefix}latents.encode"
    cpu = cpu_seconds(worker.proc.pid)
    start = time.perf_counter()
    for _ in range(messages):
        enqueue_encode(LABEL, photo.pk, "image", photo.image_token)
    while client.llen(key):
        worker.check()
        time.sleep(0.005)
    wall = time.perf_counter() - start
    time.sleep(0.2)  # the last message, taken off the queue, is still being answered
    cpu = cpu_seconds(worker.proc.pid) - cpu
    return wall * 1000 / messages, cpu * 1000 / messages


def stale_claim_cost(tries: int) -> float:
    """Milliseconds of the worker function for a message whose row another claim took: the
    claim transaction, no model, no blob (in this process, without Celery)."""
    from latentstore_workers.pipeline import encode_rows
    from project.models import Photo

    photo = Photo.objects.filter(image_state="ready").first()
    items = [(photo.pk, str(photo.image_token))]
    encode_rows(LABEL, "image", items)  # warm
    start = time.perf_counter()
    for _ in range(tries):
        encode_rows(LABEL, "image", items)
    return (time.perf_counter() - start) * 1000 / tries


def host_stages(blobs: list[bytes]) -> dict[str, float]:
    """Milliseconds per picture of each host stage of ``encode_rows`` on fresh rows, in this
    process (bulk_create: no messages, so the worker process does not take them)."""
    from latentstore_workers.pipeline import encode_rows
    from project.models import Photo

    photos = Photo.objects.bulk_create([Photo(title="stages", image=b) for b in blobs])
    items = [(p.pk, str(p.image_token)) for p in photos]
    report = encode_rows(LABEL, "image", items, fill=False)
    if report.ready != len(blobs):
        raise RuntimeError(f"stages: {report.as_dict()}")
    return {stage: 1000 * s / len(blobs) for stage, s in report.seconds.items()}


def run(
    args: Any,
    sizes: list[int],
    pictures: Callable[[int, int, int], list],
    seed_loop: Callable[[int, int], float],
    log: Callable,
) -> list[EndToEnd]:
    """The end-to-end measurements of each size (see the module docstring).

    Each of ``args.rounds`` rounds runs ``seed_loop(size, count)`` (the plain loop over as many
    pictures, in this process), then one-by-one saves, then a bulk import: on a shared machine
    the three see the same load. The fastest of each counts.
    """
    from django.test.utils import setup_databases, teardown_databases

    old = setup_databases(verbosity=0, interactive=False)
    worker = None
    results = []
    try:
        worker = Worker({**os.environ, "DATABASE_URL": database_url()})
        # Checking for the end costs a query: frequent checks would steal a small CPU's cores
        # (the end itself is read from the rows).
        poll = 0.01 if args.device_type == "cuda" else 0.1
        prefix = os.environ.get("CELERY_BROKER_KEYPREFIX", "")
        for size in sizes:
            count = args.e2e_count
            total = 2 * count + args.stage_rows + args.first_runs + 1
            blobs = jpegs(pictures(size, total, args.seed + size))
            timed_saves(worker, blobs[:1], poll, bulk=False)  # warm: the model, this shape
            result = EndToEnd(size, count)
            firsts, ones = [], []
            for i in range(args.first_runs):  # each beside the seed loop's time for one picture
                ones.append(seed_loop(size, 1))
                firsts.append(timed_saves(worker, blobs[1 + i : 2 + i], poll, bulk=False))
            result.first, result.seed_one = min(firsts), min(ones)
            rest = blobs[1 + args.first_runs :]
            rounds = [
                measure_round(worker, size, rest[: 2 * count], seed_loop, log, poll)
                for _ in range(max(1, args.rounds))
            ]
            result.seed, result.one_by_one, result.bulk = (
                min(r) for r in zip(*rounds, strict=True)
            )
            result.stale_ms, result.stale_cpu_ms = stale_cost(
                worker, args.stale_messages, args.broker_url, prefix
            )
            result.stale_claim_ms = stale_claim_cost(50)
            log(
                f"  stale message: {result.stale_ms:.1f} ms, worker CPU {result.stale_cpu_ms:.1f} "
                f"ms ({result.stale_claim_ms:.1f} ms the claim alone)"
            )
            result.stages_ms = host_stages(rest[2 * count : 2 * count + args.stage_rows])
            results.append(result)
    finally:
        if worker is not None:
            worker.stop()
        teardown_databases(old, verbosity=0)
    return results


def measure_round(
    worker: Worker,
    size: int,
    blobs: list[bytes],
    seed_loop: Callable[[int, int], float],
    log: Callable,
    poll: float,
) -> tuple[float, float, float]:
    """Seconds of the seed loop, of one-by-one saves and of a bulk import (half the blobs each)."""
    count = len(blobs) // 2
    seed = seed_loop(size, count)
    one = timed_saves(worker, blobs[:count], poll, bulk=False)
    bulk = timed_saves(worker, blobs[count:], poll, bulk=True)
    log(
        f"  {size}², {count} rows: seed {count / seed:.2f}, one by one {count / one:.2f}, "
        f"bulk {count / bulk:.2f} images/s"
    )
    return seed, one, bulk


STAGES = ("claim", "decode", "stack", "forward", "unpack", "pack", "write")


def stage_table(results: list[EndToEnd]) -> str:
    """Milliseconds per picture of each host stage (the model's own time as "forward")."""
    lines = [
        "| size | " + " | ".join(STAGES) + " | host total (all but forward) |",
        "|---|" + "---|" * (len(STAGES) + 1),
    ]
    for r in results:
        host = sum(v for k, v in r.stages_ms.items() if k != "forward")
        cells = " | ".join(f"{r.stages_ms.get(s, 0.0):.2f}" for s in STAGES)
        lines.append(f"| {r.size}² | {cells} | {host:.2f} |")
    return "\n".join(lines) + "\n"

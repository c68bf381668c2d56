"""The load benchmark: the example project served for real, measured in one command.

    .venv/bin/python bench/serve_bench.py [--out table.md] [--requests 2000] [--concurrency 32]

On this machine and loopback only, it sets up a fresh PostgreSQL database (dropped at the end),
keys under one prefix in a Redis database of its own (deleted at the end), and runs:

* gunicorn serving the example project (``project.wsgi``, 2 workers x 4 threads, gthread) with
  ``bench/serve_settings.py``: the project's settings plus two comparison routes;
* one ``celery -A project worker -P solo -Q latents.encode,latents.decode`` and
  ``celery -A project beat``; the worker, beat and the uploading processes reach Redis through
  a TCP proxy that the benchmark can cut (``tests/faults.py``'s ``TcpProxy``).

Rows hold real photos (crops of scikit-image's samples) encoded by the worker with the shipped
``ls-small`` autoencoder. A load generator of its own (threads, persistent HTTP/1.1 connections
through ``http.client``) then runs, at ``--concurrency`` connections:

1. a cold burst over every signed picture URL (``--rows`` x ``--sizes``): previews, warm-ups;
2. a wait until the worker has decoded the warm-ups (decodes per picture: the worker's log);
3. ``--rounds`` interleaved rounds of: the warm URLs, the same with ``If-None-Match`` (304),
   a trivial Django view answering the same thumbnails from memory, and the same thumbnails
   as files through ``django.views.static.serve``;
4. faults: ``--uploads`` photos saved through the ORM from ``--upload-procs`` processes, in two
   waves: during the first the worker is killed with ``kill -9`` mid-batch (a new one is
   started at once); during the second the broker is cut for ``--cut-seconds``. A PostgreSQL
   trigger counts every write of a blob (duplicate writes); rows not ready at the end are lost.

It prints a table (phase, requests, req/s, p50, p99, statuses) and the figures (decodes per
picture, rows lost, duplicate writes, time to drain after each fault, warm/static and
warm/trivial), and writes it as Markdown to ``--out``. Every request count and wait is bounded
(``--max-seconds`` ends the run in any case); everything it started is stopped, on every exit.
Exit status 1 when a row was lost or written twice, or a request failed with 5xx.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
SETTINGS = "bench.serve_settings"
TASK_LINE = re.compile(
    r"Task (latentstore\.\w+)\[([0-9a-f-]+)\] (received|succeeded in [\d.e-]+s: (.*)|raised|"
    r"failed|retry)"
)


# --- measurements ---------------------------------------------------------------------------
@dataclass
class Burst:
    """Requests of one phase: their latencies (s), statuses and immutable (sharp) answers."""

    key: str  # cold, warm, 304, trivial, static, uploads
    name: str
    requests: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    sharp: int = 0
    rate: bool = True  # False: req/s means nothing (paced uploads)

    def add(self, other: Burst) -> Burst:
        self.requests += other.requests
        self.seconds += other.seconds
        self.latencies += other.latencies
        self.statuses.update(other.statuses)
        self.sharp += other.sharp
        return self

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """The ``q`` quantile of the latencies, in milliseconds."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def status_text(self) -> str:
        return ", ".join(f"{k}×{v}" for k, v in sorted(self.statuses.items(), key=str))


def _client(port: int, paths: list[str], headers: dict, barrier: Any, out: list, slot: int):
    """One connection's share of a burst: ``paths`` in order, on one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    latencies, statuses, sharp = [], Counter(), 0
    try:
        conn.connect()
    finally:
        barrier.wait()
    for path in paths:
        started = time.perf_counter()
        try:
            conn.request("GET", path, headers=headers.get(path, {}))
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as exc:
            statuses[f"error {type(exc).__name__}"] += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            continue
        latencies.append(time.perf_counter() - started)
        statuses[response.status] += 1
        sharp += "immutable" in (response.getheader("Cache-Control") or "")
    conn.close()
    out[slot] = (latencies, statuses, sharp)


def burst(
    name: str, port: int, paths: list[str], total: int, concurrency: int, headers=None
) -> Burst:
    """``total`` GETs over ``paths`` (round robin) from ``concurrency`` keep-alive connections."""
    concurrency = max(1, min(concurrency, total))
    plan = [
        [paths[i % len(paths)] for i in range(j, total, concurrency)] for j in range(concurrency)
    ]
    barrier = threading.Barrier(concurrency + 1)
    out: list = [None] * concurrency
    threads = [
        threading.Thread(target=_client, args=(port, plan[j], headers or {}, barrier, out, j))
        for j in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    result = Burst("", name, requests=total, seconds=time.perf_counter() - started)
    for latencies, statuses, sharp in filter(None, out):
        result.latencies += latencies
        result.statuses.update(statuses)
        result.sharp += sharp
    return result


def fetch(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


# --- the services ---------------------------------------------------------------------------
class Stack:
    """The processes, database, Redis keys and files of one run; :meth:`close` undoes them all."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = f"lsserve{os.getpid()}x{secrets.token_hex(3)}"
        self.tmp = Path(tempfile.mkdtemp(prefix="lsserve-"))
        self.files = self.tmp / "files"
        self.files.mkdir()
        self.procs: dict[str, subprocess.Popen] = {}
        self.workers = 0
        self.proxy: Any = None
        self.port = _free_port()
        self.secret = secrets.token_urlsafe(32)
        self.database_created = False

    def env(self, *, proxied: bool) -> dict[str, str]:
        """The environment of every process; ``proxied``: the broker through the TCP proxy."""
        from latentstore_workers.pretrained import LS_SMALL, LS_SMALL_FAMILY  # paths, no torch

        db = f"/{self.args.redis_db}"
        broker_port = self.proxy.port if proxied else REDIS_PORT
        env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
        env.update(
            DJANGO_SETTINGS_MODULE=SETTINGS,
            DJANGO_SECRET_KEY=self.secret,
            DJANGO_DEBUG="0",
            DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            DATABASE_URL=f"postgresql://postgres@127.0.0.1:5432/{self.run_id}",
            CELERY_BROKER_URL=f"redis://{REDIS_HOST}:{broker_port}{db}",
            CELERY_BROKER_KEYPREFIX=f"{self.run_id}.broker:",
            REDIS_CACHE_URL=f"redis://{REDIS_HOST}:{REDIS_PORT}{db}",
            LATENTSTORE_BENCH_CACHE_PREFIX=f"{self.run_id}.cache",
            LATENTSTORE_BENCH_FILES=str(self.files),
            LATENTSTORE_VAR_DIR=str(self.tmp / "var"),
            LATENTSTORE_PRETRAINED=str(LS_SMALL),
            LATENTSTORE_FAMILY=LS_SMALL_FAMILY,
        )
        if self.args.lease_seconds:
            env["LATENTSTORE_BENCH_LEASE_SECONDS"] = str(self.args.lease_seconds)
        if self.args.sweep_seconds:
            env["LATENTSTORE_BENCH_SWEEP_SECONDS"] = str(self.args.sweep_seconds)
        return env

    def create_database(self) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.run_id}"')
        self.database_created = True

    def spawn(self, name: str, cmd: list[str], proxied: bool) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                cmd,
                env=self.env(proxied=proxied),
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped with its children
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_gunicorn(self) -> None:
        a = self.args
        cmd = [sys.executable, "-m", "gunicorn", "project.wsgi:application", "-k", "gthread"]
        cmd += ["--workers", str(a.gunicorn_workers), "--threads", str(a.gunicorn_threads)]
        cmd += ["--bind", f"127.0.0.1:{self.port}", "--log-level", "warning"]
        self.spawn("gunicorn", cmd, proxied=False)

    def start_worker(self) -> str:
        self.workers += 1
        name = f"worker-{self.workers}"
        cmd = [sys.executable, "-m", "celery", "-A", "project", "worker", "-P", "solo"]
        cmd += ["-Q", "latents.encode,latents.decode", "--loglevel", "INFO"]
        cmd += ["--without-gossip", "--without-mingle", "-n", f"{self.run_id}-{name}@%h"]
        self.spawn(name, cmd, proxied=True)
        return name

    def start_beat(self) -> None:
        cmd = [sys.executable, "-m", "celery", "-A", "project", "beat", "--loglevel", "INFO"]
        cmd += ["--schedule", str(self.tmp / "celerybeat-schedule")]
        cmd += ["--pidfile", str(self.tmp / "celerybeat.pid")]
        self.spawn("beat", cmd, proxied=True)

    def worker_logs(self) -> str:
        return "".join(self.log(f"worker-{n}") for n in range(1, self.workers + 1))

    def wait_worker_ready(self, name: str, timeout: float) -> None:
        def ready() -> bool:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited:\n{self.log(name)[-3000:]}")
            return " ready." in self.log(name)

        wait_for(ready, timeout, f"{name} to start")

    def wait_gunicorn(self, timeout: float) -> None:
        def up() -> bool:
            if self.procs["gunicorn"].poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{self.log('gunicorn')[-3000:]}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                return fetch(self.port, "/bench/trivial/none.webp")[0] == 404
            return False

        wait_for(up, timeout, "gunicorn to answer")

    def stop(self, name: str, sig: int = signal.SIGTERM, wait: float = 20.0) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def close(self) -> None:
        """Stop every process, drop the database, delete the run's Redis keys and files."""
        for name in list(self.procs):
            with contextlib.suppress(Exception):
                self.stop(name)
        if self.proxy is not None:
            with contextlib.suppress(Exception):
                self.proxy.close()
        with contextlib.suppress(Exception):
            from django.db import connections

            connections.close_all()
        if self.database_created:
            import psycopg

            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.run_id}" WITH (FORCE)')
        import redis

        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=self.args.redis_db)
        for key in client.scan_iter(match=f"{self.run_id}*", count=1000):
            client.delete(key)
        client.close()
        if self.args.logs:
            _copy_logs(self.tmp, Path(self.args.logs))
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


def _copy_logs(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for path in src.glob("*.log"):
        (dest / path.name).write_bytes(path.read_bytes())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


# --- the database side (in this process, through the ORM) -----------------------------------
def setup_django(stack: Stack) -> None:
    os.environ.update(stack.env(proxied=False))  # this process: the broker directly
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    install_write_counter()


def install_write_counter() -> None:
    """A trigger logging every UPDATE that writes a blob: a row logged twice was written twice."""
    from django.db import connection

    from project.models import Photo

    table = Photo._meta.db_table  # its blob column is "image"
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE ls_blob_writes (row_id bigint NOT NULL)")
        cursor.execute(
            "CREATE FUNCTION ls_count_blob_write() RETURNS trigger AS $$ BEGIN "
            "INSERT INTO ls_blob_writes VALUES (NEW.id); RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        cursor.execute(
            f"CREATE TRIGGER ls_count_blob_write AFTER UPDATE OF image ON {table} "
            "FOR EACH ROW WHEN (NEW.image IS NOT NULL) EXECUTE FUNCTION ls_count_blob_write()"
        )


def duplicate_writes() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM (SELECT row_id FROM ls_blob_writes GROUP BY row_id "
            "HAVING count(*) > 1) AS twice"
        )
        return int(cursor.fetchone()[0])


def states(pks: list[int]) -> Counter:
    """How many of ``pks`` are in each state (``missing``: no such row)."""
    from project.models import Photo

    found = dict(Photo.objects.filter(pk__in=pks).values_list("pk", "image_state"))
    return Counter(found.get(pk, "missing") for pk in pks)


def seed_rows(count: int, size: int, timeout: float) -> list[Any]:
    """``count`` photos saved through the ORM, encoded by the worker; returns them ready."""
    from bench.serve_upload import picture_png
    from project.models import Photo

    pks = [
        Photo.objects.create(title=f"seed-{i}", image=picture_png(i, size)).pk for i in range(count)
    ]

    def settled() -> bool:
        counts = states(pks)
        return not counts["pending"] + counts["encoding"]

    wait_for(settled, timeout, f"the worker to encode {count} photos")
    if (counts := states(pks))["ready"] != count:
        raise RuntimeError(f"not every photo could be encoded: {dict(counts)}")
    return list(Photo.objects.filter(pk__in=pks).order_by("pk"))


# --- the worker's log -----------------------------------------------------------------------
@dataclass
class TaskLog:
    """What the workers' logs say about one task family (``latentstore.decode*``, say)."""

    received: set[str] = field(default_factory=set)
    finished: set[str] = field(default_factory=set)
    decoded: int = 0  # pictures a decode task decoded ("ok"); "cached"/"in flight" are skips
    skipped: int = 0


def task_log(text: str, prefix: str) -> TaskLog:
    log = TaskLog()
    for match in TASK_LINE.finditer(text):
        name, task_id, event, value = match.groups()
        if not name.startswith(prefix):
            continue
        if event == "received":
            log.received.add(task_id)
            continue
        log.finished.add(task_id)
        if value is None:
            continue
        if name == "latentstore.decode":
            log.decoded += value.strip() == "'ok'"
            log.skipped += value.strip() in ("'cached'", "'in flight'")
        elif name == "latentstore.decode_batch":
            counts = {k: int(v) for k, v in re.findall(r"'(\w+)': (\d+)", value)}
            log.decoded += counts.get("ok", 0)
            log.skipped += counts.get("skipped", 0)
    return log


def wait_decodes_drained(stack: Stack, timeout: float, quiet: float = 1.5) -> float:
    """Wait until the decode queue is empty and every decode task received has finished, for
    ``quiet`` seconds in a row; returns the seconds waited."""
    from latentstore.broker import queue_depths

    started = time.monotonic()
    quiet_since = None
    while time.monotonic() - started < timeout:
        log = task_log(stack.worker_logs(), "latentstore.decode")
        depth = queue_depths(["latents.decode"])[0].messages
        if depth == 0 and log.received <= log.finished:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= quiet:
                return quiet_since - started
        else:
            quiet_since = None
        time.sleep(0.2)
    raise TimeoutError(f"the warm-up decodes did not finish within {timeout:.0f} s")


# --- the load phases ------------------------------------------------------------------------
def picture_paths(photos: list[Any], sizes: list[int], fmt: str) -> list[str]:
    return [photo.image.url(size=size, format=fmt) for photo in photos for size in sizes]


def prime(stack: Stack, urls: list[str]) -> tuple[list[str], dict, int]:
    """GET every warm URL once: write its bytes as the comparison files; returns the file names,
    ``If-None-Match`` headers per URL, and how many URLs were not sharp (not decoded) yet."""
    names, revalidate, misses = [], {}, 0
    for i, url in enumerate(urls):
        status, headers, body = fetch(stack.port, url)
        if status != 200:
            raise RuntimeError(f"{url} answered {status}: {body[:200]!r}")
        misses += "immutable" not in headers.get("Cache-Control", "")
        name = f"p{i:04d}.{url.rsplit('.', 1)[-1]}"
        (stack.files / name).write_bytes(body)
        names.append(name)
        revalidate[url] = {"If-None-Match": headers["ETag"]}
    for name in names:  # the trivial view reads each file once; the page cache holds them
        fetch(stack.port, f"/bench/trivial/{name}")
        fetch(stack.port, f"/bench/static/{name}")
    return names, revalidate, misses


def load_phases(stack: Stack, urls: list[str]) -> tuple[list[Burst], dict[str, Any]]:
    """Cold burst, warm-up wait, then interleaved rounds of warm, 304, trivial and static."""
    a = stack.args
    before = task_log(stack.worker_logs(), "latentstore.decode")
    cold = burst(
        f"cold: {len(urls)} URLs (previews, warm-ups)", stack.port, urls, a.requests, a.concurrency
    )
    cold.key = "cold"
    print(f"  cold burst: {cold.rps:.0f} req/s; waiting for the warm-up decodes", flush=True)
    drained = wait_decodes_drained(stack, a.warmup_timeout)
    after = task_log(stack.worker_logs(), "latentstore.decode")
    names, revalidate, misses = prime(stack, urls)
    phases = {
        "warm": Burst("warm", "warm: same URLs (cache hits)"),
        "304": Burst("304", "revalidation: If-None-Match → 304"),
        "trivial": Burst("trivial", "trivial view: same bytes from memory"),
        "static": Burst("static", "django.views.static.serve: same files"),
    }
    paths = {
        "warm": urls,
        "304": urls,
        "trivial": [f"/bench/trivial/{n}" for n in names],
        "static": [f"/bench/static/{n}" for n in names],
    }
    for r in range(a.rounds):  # interleaved, so the machine's other load hits them alike
        share = a.requests // a.rounds + (r < a.requests % a.rounds)
        for key, total in phases.items():
            headers = revalidate if key == "304" else None
            total.add(burst(total.name, stack.port, paths[key], share, a.concurrency, headers))
    figures = {
        "pictures": len(urls),
        "decodes": after.decoded - before.decoded,
        "decode_skips": after.skipped - before.skipped,
        "warmup_drain_s": drained,
        "not_warm": misses,
    }
    return [cold, *phases.values()], figures


# --- faults ---------------------------------------------------------------------------------
def start_uploaders(stack: Stack, wave: str, count: int, interval: float) -> list[tuple]:
    """``count`` uploads split over ``--upload-procs`` processes; returns (process, out file)."""
    procs = []
    n = max(1, min(stack.args.upload_procs, count))
    for p in range(n):
        share = count // n + (p < count % n)
        out = stack.tmp / f"upload-{wave}-{p}.json"
        cmd = [sys.executable, "-m", "bench.serve_upload", "--wave", wave, "--proc", str(p)]
        cmd += ["--count", str(share), "--size", str(stack.args.upload_size)]
        cmd += ["--interval", str(interval), "--out", str(out)]
        procs.append((stack.spawn(f"upload-{wave}-{p}", cmd, proxied=True), out))
    return procs


def finish_uploaders(stack: Stack, procs: list[tuple], timeout: float) -> list[dict]:
    saved = []
    for proc, out in procs:
        proc.wait(timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"an uploader failed:\n{stack.log(out.stem)[-3000:]}")
        saved += json.loads(out.read_text())
    return saved


def wave_states(wave: str) -> Counter:
    from project.models import Photo

    rows = Photo.objects.filter(title__startswith=f"{wave}-").values_list("image_state")
    return Counter(state for (state,) in rows)


def kill_mid_batch(
    stack: Stack, name: str, wave: str, uploaders: list, timeout: float
) -> tuple[int, float]:
    """``kill -9`` the worker once it holds rows of ``wave`` (claimed, ``encoding``) and has
    written some; returns how many rows it held, and when it was killed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = wave_states(wave)
        done = all(proc.poll() is not None for proc, _ in uploaders)
        if counts["encoding"] and (counts["ready"] or done):
            break
        time.sleep(0.01)
    killed_at = time.monotonic()
    os.kill(stack.procs[name].pid, signal.SIGKILL)
    stack.procs[name].wait(timeout=30)
    return wave_states(wave)["encoding"], killed_at


def wait_waves(waves: dict[str, tuple[list[int], float]], deadline: float) -> dict[str, Any]:
    """Seconds from each wave's fault until none of its rows is pending or encoding (None:
    not by ``deadline``)."""
    done: dict[str, float] = {}
    while len(done) < len(waves) and time.monotonic() < deadline:
        for wave, (pks, since) in waves.items():
            counts = states(pks)
            if wave not in done and not counts["pending"] + counts["encoding"]:
                done[wave] = time.monotonic() - since
        time.sleep(0.2)
    return {wave: done.get(wave) for wave in waves}


def fault_phase(stack: Stack) -> tuple[Burst, dict[str, Any], list[int]]:
    """Uploads in two waves: ``kill -9`` of the worker mid-batch, then a broker cut."""
    a = stack.args
    first = a.uploads // 2
    kill_wave = start_uploaders(stack, "kill", first, 0.0)
    held, killed_at = kill_mid_batch(stack, f"worker-{stack.workers}", "kill", kill_wave, 120)
    print(f"  kill -9 of the worker holding {held} rows; a new worker starts", flush=True)
    worker = stack.start_worker()  # as systemd's Restart=always would
    saved = finish_uploaders(stack, kill_wave, 300)
    kill_pks = [s["pk"] for s in saved if s["pk"] is not None]
    # One fault at a time: the new worker is up and has taken the wave's unclaimed rows (those
    # the dead worker held wait for their lease) before the broker is cut.
    stack.wait_worker_ready(worker, 300)
    wait_for(lambda: not states(kill_pks)["pending"], a.drain_timeout, "the new worker", 0.2)

    per_proc = -(-(a.uploads - first) // max(1, a.upload_procs))
    cut_wave = start_uploaders(stack, "cut", a.uploads - first, (a.cut_seconds + 2) / per_proc)
    wait_for(lambda: wave_states("cut").total(), 120, "the second wave's first upload", 0.02)
    stack.proxy.cut()
    print(f"  broker cut for {a.cut_seconds} s", flush=True)
    time.sleep(a.cut_seconds)
    stack.proxy.restore()
    restored_at = time.monotonic()
    cut_saved = finish_uploaders(stack, cut_wave, 300)
    cut_pks = [s["pk"] for s in cut_saved if s["pk"] is not None]
    saved += cut_saved

    waves = {"kill": (kill_pks, killed_at), "cut": (cut_pks, restored_at)}
    drains = wait_waves(waves, restored_at + a.drain_timeout)
    uploads = Burst(
        "uploads",
        f"uploads: {len(saved)} saves from {a.upload_procs} processes (ORM)",
        requests=len(saved),
        latencies=[s["seconds"] for s in saved],
        statuses=Counter("saved" if s["pk"] is not None else "raised" for s in saved),
        rate=False,
    )
    figures = {"held": held, "drain_kill_s": drains["kill"], "drain_cut_s": drains["cut"]}
    return uploads, figures, kill_pks + cut_pks


# --- the run and its report -----------------------------------------------------------------
def run(stack: Stack) -> tuple[list[Burst], dict[str, Any]]:
    from tests.faults import TcpProxy

    a = stack.args
    stack.proxy = TcpProxy(REDIS_PORT, host=REDIS_HOST)
    print(
        f"  run {stack.run_id}: database {stack.run_id}, Redis db {a.redis_db} keys "
        f"{stack.run_id}*, gunicorn on 127.0.0.1:{stack.port}",
        flush=True,
    )
    stack.create_database()
    setup_django(stack)
    stack.start_gunicorn()
    stack.start_beat()
    worker = stack.start_worker()
    stack.wait_gunicorn(120)
    stack.wait_worker_ready(worker, 300)
    print(f"  services up; encoding {a.rows} photos", flush=True)
    photos = seed_rows(a.rows, a.picture_size, a.warmup_timeout)
    urls = picture_paths(photos, a.sizes, a.format)
    bursts, figures = load_phases(stack, urls)
    pks = [photo.pk for photo in photos]
    if a.uploads:
        print(f"  faults: {a.uploads} uploads from {a.upload_procs} processes", flush=True)
        uploads, fault_figures, upload_pks = fault_phase(stack)
        bursts.append(uploads)
        figures.update(fault_figures)
        pks += upload_pks
    figures["rows"] = len(pks)
    figures["states"] = states(pks)
    figures["duplicates"] = duplicate_writes()
    return bursts, figures


def _seconds(value: float | None, timeout: float) -> str:
    return f"{value:.1f} s" if value is not None else f"not drained within {timeout:.0f} s"


def figure_rows(bursts: list[Burst], figures: dict[str, Any], args: Any) -> list[tuple]:
    by_key = {b.key: b for b in bursts}
    warm = by_key["warm"].rps
    fives = sum(v for b in bursts for k, v in b.statuses.items() if str(k).startswith("5"))
    lost = figures["rows"] - figures["states"]["ready"]
    state_text = ", ".join(f"{k} {v}" for k, v in sorted(figures["states"].items()))
    rows = [
        (
            "decodes per picture",
            f"{figures['decodes'] / figures['pictures']:.2f} "
            f"({figures['decodes']} decodes for {figures['pictures']} pictures; "
            f"{figures['decode_skips']} warm-ups skipped as cached or in flight)",
        ),
        (
            "warm-ups decoded",
            f"{figures['warmup_drain_s']:.1f} s after the cold burst; "
            f"{figures['not_warm']} URLs still not sharp after it",
        ),
        ("5xx responses", str(fives)),
        (
            "rows lost (not ready at the end, or missing)",
            f"{lost} of {figures['rows']} ({state_text})",
        ),
        ("duplicate writes", str(figures["duplicates"])),
    ]
    if "held" in figures:
        rows += [
            (
                "time to drain after `kill -9`",
                _seconds(figures["drain_kill_s"], args.drain_timeout)
                + f" ({figures['held']} rows held by the killed worker)",
            ),
            (
                f"time to drain after a {args.cut_seconds:g} s broker cut",
                _seconds(figures["drain_cut_s"], args.drain_timeout) + " after it came back",
            ),
        ]
    rows += [
        ("warm / static.serve", f"{warm / by_key['static'].rps:.2f}×"),
        ("warm / trivial view", f"{warm / by_key['trivial'].rps:.2f}×"),
    ]
    return rows


def markdown(bursts: list[Burst], figures: dict[str, Any], meta: dict[str, str], args) -> str:
    lines = [
        f"Measured {meta['date']} on {meta['machine']}; load average {meta['load']}.",
        f"Command: `{meta['command']}`.",
        "",
        "| phase | requests | req/s | p50 ms | p99 ms | statuses | sharp |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for b in bursts:
        rps = f"{b.rps:,.0f}" if b.rate else "—"
        sharp = f"{b.sharp:,}" if b.key in ("cold", "warm", "304") else "—"
        lines.append(
            f"| {b.name} | {b.requests:,} | {rps} | {b.percentile(0.5):.1f} | "
            f"{b.percentile(0.99):.1f} | {b.status_text()} | {sharp} |"
        )
    lines += ["", "| figure | value |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in figure_rows(bursts, figures, args)]
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="also write the table as Markdown to this file")
    p.add_argument("--rows", type=int, default=32, help="photos behind the picture URLs")
    p.add_argument("--sizes", default="128,256", help="URL sizes per photo (comma-separated)")
    p.add_argument("--format", default="webp", choices=["webp", "png", "jpg", "avif"])
    p.add_argument("--picture-size", type=int, default=256, help="side of the seeded photos")
    p.add_argument("--requests", type=int, default=2000, help="requests per burst")
    p.add_argument("--concurrency", type=int, default=32, help="keep-alive connections")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the warm phases")
    p.add_argument("--uploads", type=int, default=200, help="uploads under faults (0: none)")
    p.add_argument("--upload-procs", type=int, default=4)
    p.add_argument("--upload-size", type=int, default=192)
    p.add_argument("--cut-seconds", type=float, default=10.0, help="how long the broker is cut")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the rows after the faults",
    )
    p.add_argument("--warmup-timeout", type=float, default=300.0)
    p.add_argument("--gunicorn-workers", type=int, default=2)
    p.add_argument("--gunicorn-threads", type=int, default=4)
    p.add_argument("--redis-db", type=int, default=12, help="Redis database (keys prefixed)")
    p.add_argument("--lease-seconds", type=float, help="override LEASE_SECONDS (short runs)")
    p.add_argument("--sweep-seconds", type=float, help="override the sweep interval on beat")
    p.add_argument("--max-seconds", type=int, default=1500, help="end the run after this")
    p.add_argument("--logs", help="copy the processes' logs into this folder at the end")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.rounds = max(1, args.rounds)
    return args


def _interrupt(signum: int, frame: Any) -> None:
    if signum == signal.SIGALRM:
        raise TimeoutError("--max-seconds reached")
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from bench.common import reachable

    missing = [
        name for name, port in (("PostgreSQL", 5432), ("Redis", REDIS_PORT)) if not reachable(port)
    ]
    if missing:
        print(f"{' and '.join(missing)} not reachable on 127.0.0.1", file=sys.stderr)
        return 2
    load = os.getloadavg()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(),
        "command": " ".join(["python", "bench/serve_bench.py", *(argv or sys.argv[1:])]),
    }
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGALRM, _interrupt)
    signal.alarm(args.max_seconds)
    stack = Stack(args)
    try:
        bursts, figures = run(stack)
    except BaseException:
        for name in stack.procs:
            print(f"--- {name} log (tail) ---\n{stack.log(name)[-2000:]}", file=sys.stderr)
        raise
    finally:
        signal.alarm(0)
        stack.close()
    after = os.getloadavg()
    meta["load"] = (
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min) before, {after[0]:.2f} after"
    )
    text = markdown(bursts, figures, meta, args)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
    fives = sum(v for b in bursts for k, v in b.statuses.items() if str(k).startswith("5"))
    lost = figures["rows"] - figures["states"]["ready"]
    return 1 if lost or figures["duplicates"] or fives else 0


if __name__ == "__main__":
    sys.exit(main())

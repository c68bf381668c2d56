"""The newcomer: a new site wired from ``docs/your-project.md`` alone, on the built wheel.

It builds the sdist and the wheel (``python -m build``, ``twine check``), installs the wheel into
a fresh virtualenv with the CPU torch, runs ``django-admin startproject`` for a site that has a
``workers`` package of its own, and writes every file from the page's titled code blocks (the
test writes none of the wiring itself). Then, on PostgreSQL and Redis, it runs the page's
commands: migrations, the check, a worker and beat. Pictures saved through the page's shell
snippets become ready; a worker killed with ``kill -9`` in the middle of a batch leaves rows that
beat's sweeper brings back; a signed URL is served by ``runserver``.

The only lines the test adds to the site are timings (a 5 s lease and a sweep every 2 s, so
recovery shows in seconds rather than minutes) and the environment the page's settings read.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings as django_settings

from tests.faults import wait_until
from tests.tiny import image_bytes, make_test_image

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "your-project.md"

pytestmark = [
    pytest.mark.heavy,
    pytest.mark.skipif(
        not (django_settings.POSTGRES_AVAILABLE and django_settings.REDIS_AVAILABLE),
        reason="the newcomer's site runs on PostgreSQL and Redis on 127.0.0.1",
    ),
]

FENCE = re.compile(r'^```(\w+) title="([^"]+)"\n(.*?)^```', re.M | re.S)


def page_blocks() -> dict[str, tuple[str, str]]:
    """The page's titled code blocks: title -> (language, code)."""
    blocks = {}
    for language, title, code in FENCE.findall(PAGE.read_text()):
        assert title not in blocks, f"two blocks titled {title!r}"
        blocks[title] = (language, code)
    return blocks


def test_the_page_has_the_blocks_a_site_needs():
    blocks = page_blocks()
    files = [t for t in blocks if "/" in t.split(" ")[0]]
    assert {"mysite/celery.py", "mysite/__init__.py", "photos/models.py", "mysite/urls.py"} <= set(
        files
    )
    assert "mysite/settings.py (add at the end)" in blocks
    install = blocks["Install (CPU)"][1]
    # The CPU torch first, from PyTorch's CPU index; then the package with its worker extra.
    lines = install.strip().splitlines()
    assert lines[0].startswith("pip install torch") and "whl/cpu" in lines[0]
    assert lines[1] == 'pip install "latentstore[worker]"'


def run(cmd, *, cwd, env, timeout=600, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def pg_database():
    import psycopg

    name = f"newcomer_{os.getpid()}_{int(time.time())}"
    admin = psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


class Processes:
    """Background processes of the site (worker, beat, server), each logging to a file."""

    def __init__(self, site: Path, env: dict[str, str]) -> None:
        self.site, self.env = site, env
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.site / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            cmd, cwd=self.site, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.site / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def shell_command(block: str) -> str:
    """A page block as one line to run: the documented command, with the site's interpreter."""
    return block.strip()


def test_a_new_site_wired_from_the_docs_works_first_time(tmp_path, pg_database):
    import psycopg

    blocks = page_blocks()
    python = sys.executable

    # 1. Build and check the distributions.
    dist = tmp_path / "dist"
    run(
        [python, "-m", "build", "--sdist", "--wheel", "--outdir", str(dist), str(ROOT)],
        cwd=ROOT,
        env=os.environ.copy(),
        timeout=900,
    )
    wheels = list(dist.glob("latentstore-*.whl"))
    assert len(wheels) == 1 and list(dist.glob("latentstore-*.tar.gz"))
    run(
        [python, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())],
        cwd=ROOT,
        env=os.environ.copy(),
    )

    # 2. A fresh virtualenv: the CPU torch first (as the page says), then the wheel.
    venv = tmp_path / "venv"
    run(["python3.11", "-m", "venv", str(venv)], cwd=tmp_path, env=os.environ.copy())
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "CELERY_"))}
    clean_env.pop("PYTHONPATH", None)
    run([*pip, "torch==2.13.0"], cwd=tmp_path, env=clean_env, timeout=900)
    run([*pip, f"{wheels[0]}[worker]"], cwd=tmp_path, env=clean_env, timeout=900)
    bin_dir = venv / "bin"

    # 3. A new site with a workers package of its own, and the page's files.
    site = tmp_path / "site"
    site.mkdir()
    env = {
        **clean_env,
        "PATH": f"{bin_dir}{os.pathsep}{clean_env.get('PATH', '')}",
        "PGDATABASE": pg_database,
        "PGHOST": "127.0.0.1",
        "PGUSER": "postgres",
        "CACHE_URL": "redis://127.0.0.1:6379/10",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/11",
        "HF_HUB_OFFLINE": "1",
    }
    run([str(bin_dir / "django-admin"), "startproject", "mysite", "."], cwd=site, env=env)
    ls_small = run(
        [
            str(bin_dir / "python"),
            "-c",
            "from latentstore_workers.pretrained import LS_SMALL; print(LS_SMALL)",
        ],
        cwd=site,
        env=env,
    ).stdout.strip()
    env.update(LATENTSTORE_PRETRAINED=ls_small, LATENTSTORE_FAMILY="ls-small")
    assert ".venv" not in ls_small and str(venv) in ls_small, "the wheel's copy, not the repo's"
    (site / "workers").mkdir()
    (site / "workers" / "__init__.py").write_text('OWN = "the site\'s own workers package"\n')

    # The page's commands, run with the site's interpreter ("python manage.py ...").
    def manage(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return run(
            [str(bin_dir / "python"), "manage.py", *args], cwd=site, env=env, timeout=timeout
        )

    assert shell_command(blocks["Create the app"][1]) == "python manage.py startapp photos"
    manage("startapp", "photos")
    for title, (language, code) in blocks.items():
        target, _, how = title.partition(" ")
        if language != "python" or "/" not in target:
            continue
        path = site / target
        if how == "(add at the end)":
            path.write_text(path.read_text() + "\n" + code)
        else:
            assert not how, f"unknown block title {title!r}"
            path.write_text(code)
    settings_py = site / "mysite" / "settings.py"
    settings_py.write_text(
        settings_py.read_text()
        + "\n# The test's timings: recovery in seconds rather than minutes.\n"
        + 'LATENTSTORE["LEASE_SECONDS"] = 5\n'
        + 'CELERY_BEAT_SCHEDULE = {"sweep": {"task": "latentstore.sweep", "schedule": 2.0}}\n'
    )

    # 4. The page's database commands (python manage.py ...), the check among them.
    for line in blocks["Set up the database"][1].strip().splitlines():
        assert line.startswith("python manage.py ")
        result = manage(*line.split()[2:])
        if line.endswith(" check"):
            assert "System check identified no issues" in result.stdout + result.stderr
    probe = manage(
        "shell",
        "-v",
        "0",
        "-c",
        "import workers, latentstore_workers; print(workers.OWN); "
        "print(latentstore_workers.__file__)",
    ).stdout
    assert "the site's own workers package" in probe and str(venv) in probe

    processes = Processes(site, env)
    try:
        worker_cmd, beat_cmd = (line.split() for line in blocks["Workers"][1].strip().splitlines())
        assert worker_cmd[:3] == ["celery", "-A", "mysite"] and "beat" in beat_cmd
        beat = processes.start("beat", [str(bin_dir / "celery"), *beat_cmd[1:]])
        worker = processes.start("worker", [str(bin_dir / "celery"), *worker_cmd[1:]])
        wait_until(
            lambda: " ready." in processes.log("worker"), timeout=180, what="the worker to start"
        )

        # 5. The page's shell snippets: a picture saved, then ready.
        (site / "cat.jpg").write_bytes(image_bytes(make_test_image(96, 64, seed=1), "JPEG"))
        saved = manage("shell", "-v", "0", "-c", blocks["Try it (manage.py shell)"][1]).stdout
        assert saved.strip() == "pending", saved

        def states() -> dict[str, int]:
            # Straight from the site's database: polling must be quicker than an encode.
            with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={pg_database}") as db:
                rows = db.execute(
                    "SELECT image_state, count(*) FROM photos_photo GROUP BY image_state"
                ).fetchall()
            return dict(rows)

        wait_until(
            lambda: states() == {"ready": 1},
            timeout=180,
            interval=1.0,
            what="the first picture to be ready",
        )
        later = manage(
            "shell", "-v", "0", "-c", blocks["A moment later (manage.py shell)"][1]
        ).stdout
        lines = later.strip().splitlines()
        assert lines[0] == "ready 96 64", later
        assert lines[1] == "(4, 8, 12)", later
        url = lines[2]
        assert url.startswith("/latents/p/") and url.endswith(".webp"), url

        # 6. A signed URL served by the site.
        port = free_port()
        processes.start(
            "server",
            [str(bin_dir / "python"), "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
        )

        def fetch():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{url}", timeout=5) as r:
                    return r.status, r.headers["Content-Type"], r.read()
            except OSError:
                return None

        status, content_type, body = wait_until(fetch, timeout=60, what="the server")
        assert status == 200 and content_type == "image/webp" and body[:4] == b"RIFF"

        # 7. kill -9 of the worker in the middle of a batch; beat's sweeper brings it back.
        for n in range(6):
            (site / f"big{n}.jpg").write_bytes(
                image_bytes(make_test_image(1024, 768, seed=10 + n), "JPEG")
            )
        manage(
            "shell",
            "-v",
            "0",
            "-c",
            "from photos.models import Photo\n"
            + "\n".join(
                f'Photo.objects.create(title="big{n}", image="big{n}.jpg")' for n in range(6)
            ),
        )
        wait_until(
            lambda: states().get("encoding", 0) > 0,
            timeout=120,
            interval=0.05,
            what="the worker to claim the batch",
        )
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        left = states()
        assert left.get("encoding", 0) > 0, left
        processes.start("worker2", [str(bin_dir / "celery"), *worker_cmd[1:]])
        wait_until(
            lambda: states() == {"ready": 7},
            timeout=300,
            interval=1.0,
            what="every picture to be ready after the kill",
        )
        attempts = manage(
            "shell",
            "-v",
            "0",
            "-c",
            "from photos.models import Photo; "
            "print(max(Photo.objects.values_list('image_attempts', flat=True)))",
        ).stdout
        assert int(attempts) >= 2, "a killed claim was taken again"
        assert "latentstore.sweep" in processes.log("beat") or beat.poll() is None
        assert "Received unregistered task" not in processes.log("worker2")
    finally:
        processes.stop_all()
        for name in ("worker", "worker2", "beat", "server"):
            log = processes.log(name)
            if log:
                shutil.copy(site / f"{name}.log", tmp_path / f"{name}.log")

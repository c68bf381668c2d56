"""bench/serve_bench.py end to end at tiny sizes: gunicorn, a real worker and beat, PostgreSQL
and Redis, a ``kill -9`` and a broker cut. Every phase is in the table, nothing is lost or
written twice, and the run leaves no database, Redis key or process behind."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.settings import _reachable

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.heavy,
    pytest.mark.skipif(
        not _reachable(5432),
        reason="PostgreSQL is not reachable on 127.0.0.1:5432 (the benchmark creates its "
        "own database there)",
    ),
    pytest.mark.skipif(not _reachable(6379), reason="Redis is not reachable on 127.0.0.1:6379"),
    pytest.mark.skipif(
        importlib.util.find_spec("gunicorn") is None,
        reason="gunicorn is not installed (pip install 'latentstore[bench]')",
    ),
]

PHASES = (
    "cold: 3 URLs",
    "warm: same URLs",
    "revalidation: If-None-Match",
    "trivial view:",
    "django.views.static.serve:",
    "uploads: 8 saves from 2 processes",
)


def test_tiny_run_measures_every_phase_and_loses_nothing(tmp_path):
    out = tmp_path / "serve.md"
    args = ["--rows", "3", "--sizes", "64", "--requests", "60", "--concurrency", "4"]
    args += ["--rounds", "1", "--uploads", "8", "--upload-procs", "2", "--cut-seconds", "1"]
    args += ["--lease-seconds", "8", "--sweep-seconds", "3", "--drain-timeout", "150"]
    args += ["--max-seconds", "500", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    result = subprocess.run(
        [sys.executable, "bench/serve_bench.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    table = out.read_text()
    assert table in result.stdout  # printed and written alike
    for phase in PHASES:
        assert f"| {phase}" in table, table
    assert "| 304×60 |" in table  # every revalidation answered Not Modified
    assert "| rows lost (not ready at the end, or missing) | 0 of 11 (ready 11) |" in table
    assert "| duplicate writes | 0 |" in table
    assert "| 5xx responses | 0 |" in table
    assert "| decodes per picture | 1.00 (3 decodes for 3 pictures" in table
    assert re.search(r"\| time to drain after `kill -9` \| \d+\.\d s", table), table
    assert re.search(r"\| time to drain after a 1 s broker cut \| \d+\.\d s", table), table
    assert re.search(r"\| warm / static\.serve \| \d+\.\d\d× \|", table), table

    # Nothing is left behind: the database is dropped and the run's Redis keys are deleted.
    run_id = re.search(r"run (lsserve\w+):", result.stdout).group(1)
    import psycopg
    import redis

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres") as conn:
        query = "SELECT count(*) FROM pg_database WHERE datname = %s"
        assert conn.execute(query, [run_id]).fetchone()[0] == 0
    client = redis.Redis(host="127.0.0.1", port=6379, db=12)
    assert not list(client.scan_iter(match=f"{run_id}*"))
    client.close()

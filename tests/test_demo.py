"""The README's first command, ``manage.py latents_demo``, run for real in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def run_demo(tmp_path: Path, **env_overrides: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "LATENTSTORE_VAR_DIR": str(tmp_path / "var"),
        **env_overrides,
    }
    for key in (
        "DATABASE_URL",
        "CELERY_BROKER_URL",
        "CELERY_BROKER_KEYPREFIX",
        "LATENTSTORE_PRETRAINED",
    ):
        if key not in env_overrides:
            env.pop(key, None)
    return subprocess.run(
        [sys.executable, "manage.py", "latents_demo", "--count", "2", "--size", "64"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def check_output(out: subprocess.CompletedProcess, tmp_path: Path, database: str, broker: str):
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    header = next(line for line in lines if line.startswith("image "))
    table = lines[lines.index(header) :]
    rows = [line for line in table if line.startswith(("astronaut.png", "coffee.png"))]
    assert len(rows) == 2, out.stdout
    assert f"Database: {database}; broker: {broker}" in out.stdout
    # No SD VAE on disk: the demo says it uses the shipped ls-small model, and its pictures are
    # real reconstructions (a random-weight model scores about 10 dB here).
    assert "ls-small" in out.stdout and "RANDOM" not in out.stdout
    assert "PSNR dB" in header
    for row in rows:
        # ... blob B, PNG B, JPEG90 B, PSNR dB, encode s, decode s, cached ms, preview ms
        assert float(row.split()[-5]) > 16.0, row
    sheet = Image.open(tmp_path / "var" / "demo" / "contact_sheet.png")
    assert sheet.width > 3 * 64


def test_demo_on_the_embedded_default(tmp_path):
    """SQLite, kombu's filesystem broker and a worker the command starts: no server at all."""
    out = run_demo(tmp_path)
    check_output(out, tmp_path, "sqlite3", "filesystem")


@pytest.mark.skipif(
    not (django_settings.POSTGRES_AVAILABLE and django_settings.REDIS_AVAILABLE),
    reason="PostgreSQL and Redis on 127.0.0.1 are needed for the server variant of the demo",
)
def test_demo_on_postgresql_and_redis(tmp_path):
    import psycopg

    name = f"latentstore_demo_{uuid.uuid4().hex[:8]}"
    with psycopg.connect("postgresql://postgres@127.0.0.1/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        out = run_demo(
            tmp_path,
            DATABASE_URL=f"postgresql://postgres@127.0.0.1/{name}",
            CELERY_BROKER_URL="redis://127.0.0.1:6379/14",
            CELERY_BROKER_KEYPREFIX=f"{name}:",
        )
        check_output(out, tmp_path, "postgresql", "redis")
    finally:
        with psycopg.connect("postgresql://postgres@127.0.0.1/postgres", autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

"""Rows with latents made without a model (for listings and the no-torch checks).

No torch here, and no test fixtures: subprocesses that prove the web tier never imports torch
use it too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from latentstore.latents import blob_digest, pack, read_header


def fake_blob(seed: int = 0) -> bytes:
    """Latents of a 40x24 picture from no model at all (an unknown weights fingerprint)."""
    z = np.random.default_rng(seed).normal(size=(4, 3, 5)).astype("float32")
    return pack(
        z,
        autoencoder="default",
        family="sd",
        fingerprint="0" * 16,
        scaling_factor=0.18215,
        shift_factor=0.0,
        width=40,
        height=24,
    )


def make_rows(
    count: int, state: str = "ready", start: int = 0, distinct: bool = False
) -> list[int]:
    """``count`` photos in ``state`` without encoding anything (bulk, for listings).

    Ready rows share one blob (so one content address) unless ``distinct``.
    """
    from project.models import Photo

    photos = Photo.objects.bulk_create([Photo(title=f"p{start + i}") for i in range(count)])
    pks = [p.pk for p in photos]
    blob = fake_blob()
    values = {"image_state": state, "image_width": 40, "image_height": 24}
    if state == "ready":
        values.update(image=blob, image_digest=blob_digest(blob), image_autoencoder="default")
    elif state == "failed":
        values.update(image_error="The image could not be read: broken", image_staged=b"x")
    else:
        values.update(image_staged=b"x")
    Photo.objects.filter(pk__in=pks).update(**values)
    if distinct and state == "ready":
        for i, pk in enumerate(pks):
            blob = fake_blob(start + i + 1)
            Photo.objects.filter(pk=pk).update(image=blob, image_digest=blob_digest(blob))
    return pks


def latent_blob(
    width: int = 40,
    height: int = 24,
    *,
    seed: int = 0,
    channels: int = 4,
    dtype: str = "float16",
    **origin,
) -> bytes:
    """Seeded latents of a ``width`` x ``height`` picture from no model (the spread of SD-VAE
    means: std 5), packed with ``origin`` (``autoencoder``, ``family``, ``fingerprint``,
    ``scaling_factor``, ``shift_factor``; by default those of :func:`fake_blob`)."""
    grid = (channels, -(-height // 8), -(-width // 8))
    z = np.random.default_rng(seed).normal(scale=5.0, size=grid).astype("float32")
    stamp = {
        "autoencoder": "default",
        "family": "sd",
        "fingerprint": "0" * 16,
        "scaling_factor": 0.18215,
        "shift_factor": 0.0,
        **origin,
    }
    return pack(z, width=width, height=height, dtype=dtype, **stamp)


def store_ready(model, pk, blob: bytes, field: str = "image") -> None:
    """Give row ``pk`` the latents ``blob`` in state ready, as a worker's write-back leaves it."""
    header = read_header(blob)
    model._base_manager.filter(pk=pk).update(
        **{
            field: blob,
            f"{field}_state": "ready",
            f"{field}_digest": blob_digest(blob),
            f"{field}_width": header.width,
            f"{field}_height": header.height,
            f"{field}_autoencoder": header.autoencoder,
        }
    )


def run_web_tier(script: str, var_dir: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh web-tier process: the example project on SQLite under
    ``var_dir`` and an in-memory broker, so whatever it imports is what the web tier imports."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "LATENTSTORE_VAR_DIR": str(var_dir),
        "DATABASE_URL": f"sqlite:///{var_dir}/db.sqlite3",
        "CELERY_BROKER_URL": "memory://",
    }
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )

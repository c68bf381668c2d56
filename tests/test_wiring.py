"""Wiring a project's Celery app and workers: configure(app), the checks that catch what a
project can leave out, weights a worker cannot load, decoders that cannot run in a web process.

Most of these run a small project of their own in a subprocess, because what they test is what
a process without our example project's wiring does.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from celery import Celery
from django.core.management import call_command

from latentstore.celery_config import SWEEP_ENTRY, WORKER_TASKS, configure
from latentstore_workers.pretrained import LS_SMALL
from project.models import Photo
from tests.faults import WorkerProcess
from tests.test_field import encode_now

ROOT = Path(__file__).resolve().parent.parent


# --- configure(app) ------------------------------------------------------------------------------


def test_configure_registers_the_task_modules_and_schedules_the_sweeper():
    app = Celery("wired", set_as_current=False)
    configure(app)
    assert set(app.conf.include) == {"latentstore.tasks", WORKER_TASKS}
    assert app.conf.beat_schedule[SWEEP_ENTRY] == {"task": "latentstore.sweep", "schedule": 60.0}
    assert app.conf.task_acks_late and app.conf.accept_content == ["json"]


def test_configure_keeps_the_projects_own_modules_and_sweeper_entry():
    app = Celery("wired", include=["myapp.tasks"], set_as_current=False)
    app.conf.beat_schedule = {"every-minute": {"task": "latentstore.sweep", "schedule": 30}}
    configure(app)
    assert app.conf.include[0] == "myapp.tasks" and WORKER_TASKS in app.conf.include
    assert list(app.conf.beat_schedule) == ["every-minute"], "no second sweeper entry"


def test_configure_without_a_beat_entry_and_after_the_config_was_read():
    app = Celery("wired", set_as_current=False)
    assert app.conf.include == ()  # reading the configuration now: no signal will come later
    configure(app, sweep_every=None)
    assert "latentstore.tasks" in app.conf.include
    assert SWEEP_ENTRY not in (app.conf.beat_schedule or {})


# --- checks of a project's wiring ----------------------------------------------------------------

SETTINGS = """
import os
SECRET_KEY = "wiring-test"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "latentstore", "pics"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
LATENTSTORE = {"AUTOENCODERS": {"default": {
    "PRETRAINED": os.environ["WIRED_PRETRAINED"], "FAMILY": "ls-small", "DTYPE": "float32"}}}
if os.environ.get("WIRED_BROKER"):
    CELERY_BROKER_URL = os.environ["WIRED_BROKER"]
"""

CELERY = """
import os
from celery import Celery
from latentstore.celery_config import configure

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "wired.settings")
app = Celery("wired")
app.config_from_object("django.conf:settings", namespace="CELERY")
if os.environ.get("WIRED_CONFIGURE"):
    configure(app)
"""

MODELS = """
from django.db import models
from latentstore.fields import LatentImageField


class Pic(models.Model):
    image = LatentImageField(blank=True)
"""


@pytest.fixture
def wired(tmp_path):
    """A project of its own: ``run(script, **env)`` runs Python in it with Django set up."""
    (tmp_path / "wired").mkdir()
    (tmp_path / "wired" / "settings.py").write_text(SETTINGS)
    (tmp_path / "wired" / "celery.py").write_text(CELERY)
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "__init__.py").write_text("")
    (tmp_path / "pics" / "models.py").write_text(MODELS)

    def run(script: str, *, app: bool = True, **env: str) -> subprocess.CompletedProcess:
        # The project's package imports its Celery app, as the docs say, or forgets to.
        init = "from .celery import app as celery_app\n" if app else ""
        (tmp_path / "wired" / "__init__.py").write_text(init)
        full_env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("DJANGO_", "CELERY_", "LATENTSTORE_"))
        }
        full_env.update(
            {
                "DJANGO_SETTINGS_MODULE": "wired.settings",
                "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
                "WIRED_PRETRAINED": str(LS_SMALL),
                **env,
            }
        )
        code = "import django\ndjango.setup()\n" + textwrap.dedent(script)
        return subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


CHECK = """
from django.core.management import call_command
from django.core.management.base import SystemCheckError
try:
    call_command("check")
except SystemCheckError as exc:
    print(exc)
"""


def check_ids(result: subprocess.CompletedProcess) -> set[str]:
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"latentstore\.[EW]\d{3}", result.stdout + result.stderr))


def test_a_web_process_without_the_projects_celery_app_fails_the_check(wired):
    ids = check_ids(wired(CHECK, app=False, WIRED_BROKER="redis://127.0.0.1:6379/0"))
    assert "latentstore.E040" in ids


def test_a_broker_url_never_set_fails_the_check(wired):
    ids = check_ids(wired(CHECK, WIRED_CONFIGURE="1"))
    assert ids & {"latentstore.E040", "latentstore.E041", "latentstore.E042"} == {
        "latentstore.E041"
    }


def test_an_app_without_configure_misses_the_tasks_and_the_sweeper(wired):
    ids = check_ids(wired(CHECK, WIRED_BROKER="redis://127.0.0.1:6379/0"))
    assert {"latentstore.E042", "latentstore.W043"} <= ids
    assert "latentstore.E041" not in ids


def test_a_project_wired_as_documented_passes_the_checks(wired):
    result = wired(CHECK, WIRED_BROKER="redis://127.0.0.1:6379/0", WIRED_CONFIGURE="1")
    assert check_ids(result) == set(), result.stdout
    assert "System check identified no issues" in result.stdout + result.stderr


# A web tier without torch: torch (and diffusers) cannot be imported in the subprocess.
NO_TORCH = """
import sys
sys.modules["torch"] = None
sys.modules["diffusers"] = None
"""

DECODE_WITHOUT_TORCH = """
import numpy as np
from latentstore.blobs import StoredBlob
from latentstore.exceptions import DecoderUnavailable
from latentstore.latents import blob_digest, pack
from pics.models import Pic

blob = pack(np.zeros((4, 2, 3), np.float32), autoencoder="default", family="ls-small",
            fingerprint="f" * 16, scaling_factor=1.0, shift_factor=0.0, width=24, height=16)
pic = Pic(image_state="ready", image_digest=blob_digest(blob), image_width=24, image_height=16,
          image_autoencoder="default")
pic.image = StoredBlob(blob)
try:
    pic.image.decode(size=20)
except DecoderUnavailable as exc:
    print("UNAVAILABLE:", exc)
print("TORCH LOADED:", sys.modules.get("torch") is not None)
"""


def test_a_web_process_without_torch_is_warned_and_told_how_to_decode(wired):
    env = {"WIRED_BROKER": "redis://127.0.0.1:6379/0", "WIRED_CONFIGURE": "1"}
    ids = check_ids(wired(NO_TORCH.lstrip() + CHECK, **env))
    assert ids == {"latentstore.W044"}
    result = wired(NO_TORCH.lstrip() + DECODE_WITHOUT_TORCH, **env)
    assert result.returncode == 0, result.stderr
    assert "UNAVAILABLE: Decoder 'default' runs in this process" in result.stdout
    assert "'RUN'] = 'worker'" in result.stdout and "latentstore[worker]" in result.stdout
    assert "TORCH LOADED: False" in result.stdout


# --- autoencoder weights a worker cannot load ------------------------------------------------


def fake_hub_cache(root: Path, repo: str, source: Path) -> Path:
    """A Hugging Face cache holding ``repo`` at revision main, as the hub client lays it out."""
    folder = root / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / ("a" * 40)
    shutil.copytree(source, snapshot)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("a" * 40)
    return root


WEIGHTS = """
from latentstore_workers import weights
print("PROBLEM:", weights.problem("default", {"PRETRAINED": "acme/tiny-vae"}))
"""


def test_missing_weights_are_reported_offline_and_unreachable(wired, tmp_path):
    empty = tmp_path / "hf-empty"
    empty.mkdir()
    offline = wired(WEIGHTS, HF_HUB_CACHE=str(empty), HF_HUB_OFFLINE="1")
    assert "PROBLEM: Autoencoder 'default': weights 'acme/tiny-vae'" in offline.stdout
    assert "HF_HUB_OFFLINE is set" in offline.stdout and "save_pretrained" in offline.stdout
    # Nothing listens on port 9 of the loopback: the hub cannot be reached, at once.
    unreachable = wired(WEIGHTS, HF_HUB_CACHE=str(empty), HF_ENDPOINT="http://127.0.0.1:9")
    assert "the hub (http://127.0.0.1:9) cannot be reached" in unreachable.stdout


LOAD_CACHED = """
import time
import torch
from diffusers import AutoencoderKL
from latentstore_workers import weights
from latentstore_workers.autoencoders import load_pretrained

print("PROBLEM:", weights.problem("default", {"PRETRAINED": "acme/tiny-vae"}))
start = time.monotonic()
model, _ = load_pretrained(AutoencoderKL, "acme/tiny-vae", device=torch.device("cpu"),
                           dtype=torch.float32)
print("LOADED:", type(model).__name__, round(time.monotonic() - start, 1))
"""


def test_cached_weights_load_from_the_cache_alone_when_the_hub_is_out_of_reach(
    wired, tmp_path, tiny_vae_dir
):
    cache = fake_hub_cache(tmp_path / "hf", "acme/tiny-vae", Path(tiny_vae_dir))
    # Not offline, and the hub unreachable: without local_files_only the client would retry.
    result = wired(LOAD_CACHED, HF_HUB_CACHE=str(cache), HF_ENDPOINT="http://127.0.0.1:9")
    assert result.returncode == 0, result.stderr
    assert "PROBLEM: None" in result.stdout
    loaded = next(line for line in result.stdout.splitlines() if line.startswith("LOADED:"))
    assert loaded.split()[1] == "AutoencoderKL" and float(loaded.split()[2]) < 15


def test_a_worker_whose_weights_cannot_be_had_refuses_to_start(worker_env, tmp_path, settings):
    settings.LATENTSTORE = {
        "AUTOENCODERS": {"default": {"PRETRAINED": "acme/not-here", "FAMILY": "sd"}}
    }
    empty = tmp_path / "hf-empty"
    empty.mkdir()
    env = worker_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(empty))
    worker = WorkerProcess(env, "noweights").start()
    try:
        assert worker.proc is not None
        started = time.monotonic()
        code = worker.proc.wait(timeout=120)
        elapsed = time.monotonic() - started
    finally:
        worker.stop()
    output = worker.output()
    assert code != 0, output[-2000:]
    assert "weights 'acme/not-here' are not a local directory" in output
    assert " ready." not in output
    assert elapsed < 60, f"the refusal took {elapsed:.0f} s"


# --- small things ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_304_carries_no_content_type(client, png_bytes):
    photo = Photo.objects.create(title="r", image=png_bytes)
    encode_now(photo)
    url = photo.image.url(size=32, decoder="rgb")
    first = client.get(url)
    again = client.get(url, headers={"if-none-match": first["ETag"]})
    assert again.status_code == 304
    assert "Content-Type" not in again, again.headers


@pytest.mark.django_db
def test_warm_takes_several_sizes_after_one_option(png_bytes):
    from io import StringIO

    from latentstore.decoding import get_cache, key_for

    photo = Photo.objects.create(title="w", image=png_bytes)
    encode_now(photo)
    out = StringIO()
    call_command("latents_warm", "--size", "32", "16", "--decoder", "rgb", stdout=out)
    assert "2 warmed" in out.getvalue(), out.getvalue()
    for size in (32, 16):
        key, _ = key_for(photo.image, "rgb", size, "WEBP")
        assert get_cache().get(key) is not None


def test_a_gpu_dtype_on_cpu_is_no_warning(settings, tiny_vae_dir, caplog):
    from latentstore_workers.autoencoders import clear_cache, load_autoencoder

    settings.LATENTSTORE = {
        "AUTOENCODERS": {
            "default": {
                "PRETRAINED": str(tiny_vae_dir),
                "FAMILY": "sd",
                "DTYPE": "float16",
                "DEVICE": "cpu",
            }
        }
    }
    clear_cache()
    with caplog.at_level(logging.WARNING, logger="latentstore_workers"):
        loaded = load_autoencoder("default")
    assert str(loaded.dtype) == "torch.float32"
    assert not [r for r in caplog.records if "is for GPUs" in r.getMessage()]

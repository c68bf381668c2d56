"""Shared fixtures: tiny real autoencoders, latentstore settings, a real Celery worker."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
from django.conf import settings as django_settings

from tests.robustness import Report
from tests.tiny import image_bytes, make_test_image, save_tiny_autoencoder

_REPORT = Report()

requires_postgres = pytest.mark.skipif(
    not django_settings.POSTGRES_AVAILABLE,
    reason="PostgreSQL is not reachable on 127.0.0.1:5432 (the suite ran on SQLite)",
)
requires_redis = pytest.mark.skipif(
    not django_settings.REDIS_AVAILABLE,
    reason="Redis is not reachable on 127.0.0.1:6379",
)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A seeded tiny AutoencoderKL (8x downsampling, 4 channels) saved as safetensors."""
    return save_tiny_autoencoder(tmp_path_factory.mktemp("tiny-vae"), seed=0)


@pytest.fixture(scope="session")
def other_vae_dir(tmp_path_factory):
    """Same architecture, other seed: other weights, another fingerprint."""
    return save_tiny_autoencoder(tmp_path_factory.mktemp("other-vae"), seed=1)


def ls_small_entry(path=None) -> dict:
    """An ``AUTOENCODERS`` entry for the shipped ls-small weights (or an ls-small model saved at
    ``path``), float32 on the CPU."""
    from latentstore_workers.pretrained import LS_SMALL

    return {
        "PRETRAINED": str(path or LS_SMALL),
        "FAMILY": "ls-small",
        "DTYPE": "float32",
        "DEVICE": "cpu",
    }


# The suite runs on a CPU but pins the batch plan a GPU uses (memory-bounded), so a test's
# forward passes are the same on every machine; the CPU's measured plan ("auto", the default)
# has its own tests (tests/test_cpu_plan.py).
GPU_PLAN = {"CPU_BATCH_SIZE": None}


def shipped_config(**extra) -> dict:
    """``LATENTSTORE`` with the shipped ls-small as the default autoencoder, plus ``extra``."""
    return {"AUTOENCODERS": {"default": ls_small_entry()}, **GPU_PLAN, **extra}


def latentstore_config(vae_dir, **extra):
    return {
        "AUTOENCODERS": {
            "default": {
                "PRETRAINED": str(vae_dir),
                "FAMILY": "sd",
                "DTYPE": "float32",
                "DEVICE": "cpu",
            },
        },
        **GPU_PLAN,
        **extra,
    }


@pytest.fixture(autouse=True)
def latentstore_settings(settings, tiny_vae_dir):
    """Every test runs against the tiny model, loaded through the production PRETRAINED path."""
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir)
    return settings


@pytest.fixture(autouse=True)
def _clear_cache():
    from django.core.cache import caches

    from latentstore import cache

    caches["default"].clear()
    cache.reset()  # the per-process LRU in front of it
    yield


@pytest.fixture
def fault_settings(settings):
    """``fault_settings(LEASE_SECONDS=1, ...)``: this test's LATENTSTORE, with these keys."""

    def apply(**options) -> None:
        settings.LATENTSTORE = {**settings.LATENTSTORE, **options}

    return apply


@pytest.fixture
def png_bytes():
    return image_bytes(make_test_image(40, 24, seed=3), "PNG")


def drain(queue: str, timeout: float = 0.5) -> list:
    """Take every message waiting in ``queue`` on the real broker: [(task name, args, message)].

    Waits up to ``timeout`` for the first message, then 0.05 s for each next one. Polls with
    non-blocking gets: a blocking get leaves a Redis ``BRPOP`` outstanding, and closing the
    channel then waits for it, a second per call.
    """
    import json
    import time

    from project.celery import app

    taken = []
    with app.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue, no_ack=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    message = simple.get_nowait()
                except simple.Empty:
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(0.01)
                    continue
                assert message.content_type == "application/json", message.content_type
                args, _kwargs, _embed = json.loads(message.body)
                taken.append((message.headers["task"], args, message))
                deadline = time.monotonic() + 0.05
        finally:
            simple.close()
    return taken


def encode_pointers(messages) -> list[list]:
    """The ``[label, pk, field, token]`` pointers in drained encode messages, single or batch."""
    pointers = []
    for name, args, _message in messages:
        if name == "latentstore.encode":
            pointers.append(list(args))
        elif name == "latentstore.encode_batch":
            label, field, items = args
            pointers += [[label, pk, field, token] for pk, token in items]
    return pointers


@pytest.fixture
def broker():
    """The real broker, emptied of latentstore messages before and after the test."""
    if not django_settings.REDIS_AVAILABLE:
        pytest.skip("Redis is not reachable on 127.0.0.1:6379 (the broker of these tests)")
    for queue in ("latents.encode", "latents.decode"):
        drain(queue, timeout=0.05)
    yield drain
    for queue in ("latents.encode", "latents.decode"):
        drain(queue, timeout=0.05)


@pytest.fixture
def celery_worker(transactional_db):
    """A real Celery worker (solo pool, in a thread) consuming the encode and decode queues."""
    if not django_settings.REDIS_AVAILABLE:
        pytest.skip("Redis is not reachable on 127.0.0.1:6379 (the broker of the worker tests)")
    import logging

    from celery.contrib.testing.worker import start_worker

    from project.celery import app

    # Messages an earlier test left behind (a retry due later, handed back when its worker
    # stopped) would fill their batch with this test's pending rows: start from empty queues.
    for queue in ("latents.encode", "latents.decode"):
        drain(queue, timeout=0.05)
    # The test worker sets the root logger to ERROR; later tests' caplog must still see warnings.
    root_level = logging.getLogger().level
    with start_worker(
        app,
        pool="solo",
        perform_ping_check=False,
        queues=["latents.encode", "latents.decode"],
        shutdown_timeout=30,
    ) as worker:
        yield worker
    logging.getLogger().setLevel(root_level)


@pytest.fixture
def worker_env(settings, tmp_path):
    """The environment of a worker process joining this test's database, queues and settings."""
    from django.db import connection

    def make(**extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "LATENTSTORE_TEST_DB_NAME": connection.settings_dict["NAME"],
            "LATENTSTORE_TEST_KEYPREFIX": django_settings.CELERY_BROKER_TRANSPORT_OPTIONS[
                "global_keyprefix"
            ],
            "LATENTSTORE_TEST_CONFIG": json.dumps(settings.LATENTSTORE),
            "LATENTSTORE_VAR_DIR": str(tmp_path),
            **extra,
        }

    return make


def reset_broker_pools() -> None:
    """Drop the Celery app's pooled broker connections (after the broker URL or server changed)."""
    from project.celery import app

    app._pool = None
    app.amqp._producer_pool = None


@contextlib.contextmanager
def broker_unreachable(url: str = "redis://127.0.0.1:1/0"):
    """Point the project's Celery app at a port where nothing listens, connection pools included.

    Changing ``broker_url`` alone is not enough: the app keeps pooled connections to the broker
    it used before, and a send would quietly go through them.
    """
    from project.celery import app

    old = app.conf.broker_url
    app.conf.broker_url = url
    reset_broker_pools()
    try:
        yield app
    finally:
        app.conf.broker_url = old
        reset_broker_pools()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP API (moto's server mode) on the port tests/settings.py points the
    ``"s3"`` STORAGES alias at, with its bucket created; yields a boto3 client."""
    pytest.importorskip("storages", reason="django-storages is not installed")
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    import boto3
    from moto.server import ThreadedMotoServer

    options = django_settings.STORAGES["s3"]["OPTIONS"]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=django_settings.S3_PORT, verbose=False)
    server.start()
    try:
        client = boto3.client(
            "s3",
            endpoint_url=options["endpoint_url"],
            aws_access_key_id=options["access_key"],
            aws_secret_access_key=options["secret_key"],
            region_name=options["region_name"],
        )
        client.create_bucket(Bucket=options["bucket_name"])
        yield client
    finally:
        server.stop()


@pytest.fixture
def robustness():
    """Records what a fault or bad-input test did to its rows, for the robustness report."""
    return _REPORT


def _expect_robustness_cases(items):
    from tests.corpus import CASES

    names = {item.nodeid for item in items}
    corpus_selected = all(
        any(case.name in nodeid and "test_bad_inputs" in nodeid for nodeid in names)
        for case in CASES
    )
    _REPORT.expected_inputs = {c.name for c in CASES} if corpus_selected else set()
    # The fault tests: all of them, or the manual keeps its last complete report.
    from tests.robustness import FAULTS

    fault_tests = [n for n in names if "test_faults.py::" in n]
    _REPORT.expected_faults = set(FAULTS) if len(fault_tests) >= len(FAULTS) else {"(all)"}


def pytest_runtest_logreport(report):
    if report.failed:  # any failure: the manual keeps its last complete report
        _REPORT.failed_tests += 1


def pytest_sessionfinish(session, exitstatus):
    if _REPORT.entries:
        _REPORT.write()


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip without CUDA. ``heavy`` tests run in the full suite (and so in .ci/run);
    ``-m "not heavy"`` leaves them out of a quick run."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    cuda = False
    if gpu_items:
        import torch

        cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(skip_gpu)
    _expect_robustness_cases(items)

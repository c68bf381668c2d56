"""Concurrent misses for the same picture decode it once (a short lock in the shared cache).

Threads stand in for concurrent requests; the lock lives in the Django cache, so the same code
serves threads of one process (LocMem) and processes on many machines (Redis). The backend is a
real one that counts its calls and holds each decode until the test opens its gate.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
from django.core.cache import caches
from PIL import Image

from latentstore import decoding
from latentstore.decoders import BaseDecoder
from project.models import Photo
from tests.conftest import latentstore_config, requires_redis
from tests.test_field import encode_now

pytestmark = pytest.mark.django_db(transaction=True)

CACHES = [
    pytest.param("default", id="locmem"),
    pytest.param("redis", id="redis", marks=requires_redis),
]


class GatedDecoder(BaseDecoder):
    """Counts its decodes; the first one waits for the gate, and fails if told to."""

    calls = 0
    entered = threading.Event()
    gate = threading.Event()
    fail_first = False
    _lock = threading.Lock()

    @classmethod
    def reset(cls) -> None:
        cls.calls = 0
        cls.entered = threading.Event()
        cls.gate = threading.Event()
        cls.fail_first = False

    def decode(self, header, latents):
        cls = GatedDecoder
        with cls._lock:
            cls.calls += 1
            first = cls.calls == 1
        if first:
            cls.entered.set()
            assert cls.gate.wait(60), "the test never opened the gate"
            if cls.fail_first:
                raise RuntimeError("the first decode failed")
        return Image.new("RGB", (header.width, header.height), (10, 20, 30))


@pytest.fixture
def gated(settings, tiny_vae_dir, png_bytes):
    """A ready photo and a ``gated`` decoder; yields a function that configures the cache."""
    photo = Photo.objects.create(title="lock", image=png_bytes)
    encode_now(photo)
    GatedDecoder.reset()
    used = []

    def use(cache_alias: str, **extra):
        settings.LATENTSTORE = latentstore_config(
            tiny_vae_dir,
            CACHE=cache_alias,
            DECODERS={"gated": {"BACKEND": "tests.test_decode_lock.GatedDecoder"}},
            **extra,
        )
        used.append(cache_alias)
        return photo

    yield use
    GatedDecoder.gate.set()
    for alias in used:  # delete only this test's keys: other runs may share the Redis database
        image = Photo.objects.get(pk=photo.pk).image
        key, _ = decoding.key_for(image, "gated", None, "PNG")
        caches[alias].delete_many([key, key + ":lock"])


def copies(photo, n):
    """``n`` independent objects for the row, blobs loaded: the threads touch no database."""
    objs = [Photo.objects.get(pk=photo.pk) for _ in range(n)]
    for obj in objs:
        obj.image.unpack()
    return objs


def run(objs):
    results, errors = {}, {}

    def one(i, obj):
        try:
            results[i] = obj.image.decoded_bytes(decoder="gated")
        except Exception as exc:
            errors[i] = exc

    threads = [threading.Thread(target=one, args=(i, o)) for i, o in enumerate(objs)]
    for thread in threads:
        thread.start()
    return threads, results, errors


@pytest.mark.parametrize("cache_alias", CACHES)
def test_concurrent_misses_decode_once(gated, cache_alias):
    photo = gated(cache_alias)
    threads, results, errors = run(copies(photo, 6))
    assert GatedDecoder.entered.wait(60)
    time.sleep(0.3)  # let the other five reach the lock; later arrivals would hit the cache
    GatedDecoder.gate.set()
    for thread in threads:
        thread.join(60)
    assert errors == {}
    assert GatedDecoder.calls == 1
    assert len(results) == 6 and len(set(results.values())) == 1
    key, _ = decoding.key_for(photo.image, "gated", None, "PNG")
    assert caches[cache_alias].get(key + ":lock") is None, "the lock is released"


@pytest.mark.parametrize("cache_alias", CACHES)
def test_a_failed_decode_releases_the_lock_and_a_waiter_decodes(gated, cache_alias):
    photo = gated(cache_alias)
    GatedDecoder.fail_first = True
    first_threads, first_results, first_errors = run(copies(photo, 1))
    assert GatedDecoder.entered.wait(60)
    waiter_threads, waiter_results, waiter_errors = run(copies(photo, 1))
    time.sleep(0.3)  # the waiter polls while the first decode holds the lock
    GatedDecoder.gate.set()
    for thread in first_threads + waiter_threads:
        thread.join(60)
    assert isinstance(first_errors[0], RuntimeError)
    assert waiter_errors == {} and waiter_results[0]
    assert GatedDecoder.calls == 2
    key, _ = decoding.key_for(photo.image, "gated", None, "PNG")
    assert caches[cache_alias].get(key + ":lock") is None
    Photo.objects.get(pk=photo.pk).image.decoded_bytes(decoder="gated")  # now a cache hit
    assert GatedDecoder.calls == 2


def test_a_waiter_past_the_deadline_decodes_itself(gated, caplog):
    photo = gated("default", DECODE_LOCK_TIMEOUT=0.2)
    holder_threads, holder_results, _ = run(copies(photo, 1))
    assert GatedDecoder.entered.wait(60)
    with caplog.at_level(logging.WARNING, logger="latentstore.decoding"):
        data = Photo.objects.get(pk=photo.pk).image.decoded_bytes(decoder="gated")
    assert data and GatedDecoder.calls == 2
    assert holder_threads[0].is_alive(), "the holder is still decoding: the waiter did not wait"
    assert "decoding it here" in caplog.text
    GatedDecoder.gate.set()
    holder_threads[0].join(60)
    assert holder_results[0] == data


def test_cheap_decoders_take_no_lock(gated):
    from latentstore.decoders import decoders

    gated("default")
    assert decoders["rgb"].single_flight is False
    assert decoders["gated"].single_flight is True
    assert decoders["default"].single_flight is True


@requires_redis
def test_a_stale_worker_error_does_not_answer_a_new_request(
    settings, tiny_vae_dir, celery_worker, png_bytes
):
    from tests.test_protocol import wait_for

    settings.LATENTSTORE = latentstore_config(
        tiny_vae_dir,
        CACHE="redis",
        DECODERS={
            "default": {
                "BACKEND": "latentstore_workers.decoders.VAEDecoder",
                "OPTIONS": {"RUN": "worker"},
            }
        },
    )
    photo = Photo.objects.create(title="stale", image=png_bytes)
    assert wait_for(photo).state == "ready"
    key, _ = decoding.key_for(photo.image, "default", 20, "PNG")
    cache = caches["redis"]
    cache.set(key + ":error", "RuntimeError: a failure of an earlier attempt", 60)
    try:
        assert photo.image.decode(size=20).size == (20, 12)
    finally:
        cache.delete_many([key, key + ":error", key + ":lock"])

"""The lease heartbeat: a live worker keeps its rows however long a pass takes; a dead worker's
rows come back within a short lease.

Workers are real processes; ``slow:N`` makes every encode pass of the real model sleep N s first
(``tests/fault_worker.py``), a long GPU batch on this CPU.
"""

from __future__ import annotations

import time

import pytest

from latentstore import conf, encoding
from latentstore.celery_config import SWEEP_EVERY
from latentstore_workers.leases import Heartbeat
from project.models import Photo
from tests.conftest import requires_postgres, requires_redis
from tests.faults import WorkerProcess, wait_until
from tests.test_batch_tasks import blob_write_counter, png
from tests.test_faults import pointers, saved_without_messages, states

pytestmark = [pytest.mark.django_db(transaction=True), requires_postgres, requires_redis]

LABEL = "demo.Photo"


def test_by_default_a_dead_workers_rows_are_back_within_two_minutes():
    # The lease runs out, then the next sweep re-sends: at most lease + sweep interval.
    assert conf.DEFAULTS["LEASE_SECONDS"] + SWEEP_EVERY <= 120


def test_a_long_healthy_batch_is_never_taken_over(broker, fault_settings, worker_env):
    fault_settings(ENCODE_BATCH_SIZE=2, LEASE_SECONDS=1)
    photos = saved_without_messages([png(seed=i) for i in range(2)])
    with blob_write_counter() as writes:
        # Each pass sleeps 5 s: five leases long. Without the heartbeat the sweeper below would
        # re-send the rows and a second claim would count another attempt.
        with WorkerProcess(worker_env(), "slow", fault="slow:5") as worker:
            assert encoding.enqueue_encode_batch(LABEL, "image", pointers(photos)) == 2
            wait_until(lambda: states(photos) == ["encoding"] * 2, what="the batch claimed")
            requeued = 0
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline and states(photos) == ["encoding"] * 2:
                requeued += encoding.sweep().requeued
                time.sleep(0.25)
            assert requeued == 0, "the sweeper took a live worker's rows"
            wait_until(lambda: states(photos) == ["ready"] * 2, timeout=60, what="the encode")
            assert worker.alive()
        assert writes() == {p.pk: 1 for p in photos}
    attempts = Photo.objects.filter(pk__in=[p.pk for p in photos]).values_list(
        "image_attempts", flat=True
    )
    assert set(attempts) == {1}


def test_a_killed_workers_rows_come_back_after_the_lease(broker, fault_settings, worker_env):
    fault_settings(ENCODE_BATCH_SIZE=2, LEASE_SECONDS=2)
    photos = saved_without_messages([png(seed=10 + i) for i in range(2)])
    doomed = WorkerProcess(worker_env(), "doomed", fault="slow:600").start()
    try:
        doomed.wait_ready()
        assert encoding.enqueue_encode_batch(LABEL, "image", pointers(photos)) == 2
        wait_until(lambda: states(photos) == ["encoding"] * 2, what="the batch claimed")
        time.sleep(3)  # its heartbeat renewed the leases meanwhile: nothing to sweep
        assert encoding.sweep().requeued == 0
    finally:
        doomed.kill9()
    killed = time.monotonic()
    wait_until(lambda: encoding.sweep().requeued == 2, timeout=10, interval=0.2,
               what="the sweeper to take the dead worker's rows")  # fmt: skip
    assert time.monotonic() - killed <= 2 + 1.5, "back within the lease (and a sweep)"
    assert states(photos) == ["pending"] * 2


def test_a_beat_renews_only_rows_still_in_work(png_bytes):
    photo = Photo.objects.create(title="b", image=png_bytes)
    (claim,) = encoding.claim_batch(LABEL, "image", [(photo.pk, str(photo.image_token))])
    old = Photo.objects.get(pk=photo.pk).image_changed
    heartbeat = Heartbeat(lambda: [claim], every=60)
    time.sleep(0.01)
    assert heartbeat.beat() == 1
    assert Photo.objects.get(pk=photo.pk).image_changed > old
    assert encoding.write_back(claim, b"not a real blob", "d" * 32)
    assert heartbeat.beat() == 0, "a finished row is not renewed"
    with Heartbeat(lambda: [claim], every=0.05) as running:
        wait_until(lambda: running.beats >= 2, timeout=5, what="two beats")

"""Faults against real PostgreSQL, Redis and ``celery worker`` processes: nothing is lost.

Each test breaks one thing the way production breaks it — a worker killed mid-batch, Redis
restarted with its queue gone, the broker down at ``save()``, a rolled-back transaction, a
re-upload racing an encode, a poison picture, the database cut during write-back, a corrupt
blob — and ends with every row ``ready`` or honestly ``failed``, each written exactly once.
What happened is recorded for the robustness report of docs/robustness.md
(``tests/robustness.py``).

Workers are real processes (``tests.faults.WorkerProcess``) sharing the test's database, broker
key prefix and ``LATENTSTORE`` settings; a slow or poisoned encode is injected into the real
diffusers model by ``tests.fault_worker``.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction

from latentstore import encoding
from latentstore.broker import queue_depths
from latentstore.latents import LatentFormatError
from project.models import Photo
from tests.conftest import (
    broker_unreachable,
    requires_postgres,
    requires_redis,
    reset_broker_pools,
)
from tests.fault_worker import POISON_MESSAGE
from tests.faults import WorkerProcess, proxied, wait_until
from tests.robustness import FAULTS
from tests.settings import _reachable
from tests.test_batch_tasks import blob_write_counter, png
from tests.test_field import encode_now
from tests.tiny import image_bytes

pytestmark = [pytest.mark.django_db(transaction=True), requires_postgres, requires_redis]

LABEL = "demo.Photo"


def magenta(size=(40, 24)) -> bytes:
    from PIL import Image

    return image_bytes(Image.new("RGB", size, (255, 0, 255)), "PNG")


def states(photos) -> list[str]:
    rows = Photo.objects.filter(pk__in=[p.pk for p in photos])
    by_pk = dict(rows.values_list("pk", "image_state"))
    return [by_pk.get(p.pk, "lost") for p in photos]


def settle(photos, timeout: float = 120.0, sweep_every: float | None = None) -> list[Photo]:
    """Wait until every row is ready or failed, running the sweeper every ``sweep_every`` s."""
    deadline = time.monotonic() + timeout
    next_sweep = time.monotonic() + (sweep_every or 0)
    while time.monotonic() < deadline:
        if all(s in ("ready", "failed") for s in states(photos)):
            break
        if sweep_every is not None and time.monotonic() >= next_sweep:
            call_command("latents_sweep", stdout=io.StringIO(), stderr=io.StringIO())
            next_sweep = time.monotonic() + sweep_every
        time.sleep(0.1)
    fresh = list(Photo.objects.filter(pk__in=[p.pk for p in photos]).order_by("pk"))
    assert len(fresh) == len(photos), "a row vanished"
    left = {p.pk: p.image_state for p in fresh if p.image_state not in ("ready", "failed")}
    assert not left, f"rows still in flight after {timeout} s: {left}"
    return fresh


def lost(photos) -> int:
    """Rows neither ready nor failed-with-their-upload-kept: the only way to lose an image."""
    missing = 0
    for p in Photo.objects.filter(pk__in=[p.pk for p in photos]):
        if p.image_state == "ready" and p.image.blob:
            continue
        if p.image_state == "failed" and p.image.original_bytes():
            continue
        missing += 1
    return missing + len(photos) - Photo.objects.filter(pk__in=[p.pk for p in photos]).count()


def pointers(photos) -> list[tuple[int, str]]:
    return [(p.pk, str(p.image_token)) for p in photos]


def saved_without_messages(blobs: list[bytes]) -> list[Photo]:
    with broker_unreachable():  # the rows exist, no message does yet
        return [Photo.objects.create(title=f"f{i}", image=b) for i, b in enumerate(blobs)]


def record(robustness, name: str, outcome: str, photos) -> None:
    robustness.fault(name, FAULTS[name], outcome, lost=lost(photos))


# --- kill -9 in the middle of a batch -----------------------------------------------------------


def test_worker_killed_mid_batch_the_rows_are_swept_and_encoded_once(
    broker, fault_settings, worker_env, robustness
):
    fault_settings(ENCODE_BATCH_SIZE=4, LEASE_SECONDS=3)
    photos = saved_without_messages([png(seed=i) for i in range(4)])
    with blob_write_counter() as writes:
        doomed = WorkerProcess(worker_env(), "doomed", fault="slow:600").start()
        try:
            doomed.wait_ready()
            assert encoding.enqueue_encode_batch(LABEL, "image", pointers(photos)) == 4
            wait_until(lambda: states(photos) == ["encoding"] * 4, what="the batch to be claimed")
            time.sleep(0.5)  # well inside the forward pass
        finally:
            doomed.kill9()
        assert writes() == {}
        with WorkerProcess(worker_env(), "rescuer"):
            # The killed worker's message stays unacknowledged in Redis (until its visibility
            # timeout); the sweeper finds the expired leases long before that.
            fresh = settle(photos, sweep_every=1.0)
        assert [p.image_state for p in fresh] == ["ready"] * 4
        assert writes() == {p.pk: 1 for p in photos}, "each row written exactly once"
        assert {p.image_attempts for p in fresh} == {2}
    record(
        robustness,
        "kill-9",
        "4 rows claimed by the killed worker; the sweeper re-enqueued them after the lease; "
        "another worker encoded each exactly once (attempt 2)",
        photos,
    )


# --- Redis restarted without persistence --------------------------------------------------------


REDIS_START = [
    "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
    "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
    "--logfile", "/var/log/redis/ci.log",
]  # fmt: skip


def _redis_up() -> bool:
    return _reachable(6379)


def restart_redis() -> None:
    """Stop Redis without saving (its queues are gone) and start it as the machine does."""
    import redis

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH: cannot restart Redis here")
    try:
        redis.Redis(host="127.0.0.1", port=6379).shutdown(nosave=True)
    except redis.exceptions.ConnectionError:
        pass  # it went down while answering
    wait_until(lambda: not _redis_up(), timeout=10, what="Redis to stop")
    start_redis()


def start_redis() -> None:
    Path("/var/lib/redis").mkdir(parents=True, exist_ok=True)
    Path("/var/log/redis").mkdir(parents=True, exist_ok=True)
    subprocess.run(REDIS_START, check=True, timeout=30)
    wait_until(_redis_up, timeout=10, what="Redis to start")


def test_redis_restarted_without_persistence_the_sweeper_requeues(
    broker, fault_settings, worker_env, robustness
):
    fault_settings(LEASE_SECONDS=1)
    photos = [Photo.objects.create(title=f"r{i}", image=png(seed=i)) for i in range(3)]
    (before,) = queue_depths(["latents.encode"])
    assert before.messages == 3
    try:
        restart_redis()
    finally:
        if not _redis_up():  # leave Redis running, whatever happened
            start_redis()
        reset_broker_pools()
    (after,) = queue_depths(["latents.encode"])
    assert after.messages == 0, "the restart emptied the queue"
    assert states(photos) == ["pending"] * 3
    time.sleep(1.2)  # past the lease
    with WorkerProcess(worker_env(), "after-restart"):
        fresh = settle(photos, sweep_every=1.0)
    assert [p.image_state for p in fresh] == ["ready"] * 3
    record(
        robustness,
        "redis-restart",
        "3 queued messages vanished with Redis; the sweeper re-enqueued the pending rows; all 3 "
        "ready",
        photos,
    )


# --- broker unreachable at save() ---------------------------------------------------------------


def test_broker_down_at_save_the_row_waits_and_the_sweeper_enqueues_it(
    broker, fault_settings, worker_env, robustness, caplog
):
    fault_settings(LEASE_SECONDS=1)
    with broker_unreachable():
        photo = Photo.objects.create(title="offline", image=png())
    assert photo.pk and photo.image.state == "pending"
    assert "Could not enqueue the encode" in caplog.text and "sweeper will retry" in caplog.text
    assert broker("latents.encode") == [], "nothing reached the real broker"
    time.sleep(1.2)
    with WorkerProcess(worker_env(), "back"):
        (fresh,) = settle([photo], sweep_every=1.0)
    assert fresh.image_state == "ready" and fresh.image_attempts == 1
    record(
        robustness,
        "broker-down-at-save",
        "save() returned, the row stayed pending; once the broker was back the sweeper enqueued "
        "it; ready",
        [photo],
    )


# --- transaction rolled back --------------------------------------------------------------------


def test_rolled_back_transactions_send_nothing_and_leave_nothing(
    broker, fault_settings, robustness
):
    fault_settings(KEEP_ORIGINAL=True)
    (kept,) = [Photo.objects.create(title="kept", image=png(seed=1))]
    encode_now(kept)
    kept.refresh_from_db()
    blob, token = kept.image.blob, kept.image_token
    broker("latents.encode")
    originals = Path(django_settings.STORAGES["default"]["OPTIONS"]["location"])
    files_before = sorted(originals.rglob("*")) if originals.exists() else []

    class Abort(Exception):
        pass

    with pytest.raises(Abort), transaction.atomic():
        Photo.objects.create(title="never", image=png(seed=2))
        kept.image = png((64, 48), seed=3)
        kept.save()
        raise Abort

    assert not Photo.objects.filter(title="never").exists()
    kept.refresh_from_db()
    assert kept.image_state == "ready" and kept.image.blob == blob and kept.image_token == token
    assert kept.image_staged is None
    assert broker("latents.encode") == [], "no task for a rolled-back save"
    assert (sorted(originals.rglob("*")) if originals.exists() else []) == files_before
    record(
        robustness,
        "rollback",
        "no row, no message, no staged or stored original from the rolled-back saves; the "
        "existing row kept its latents",
        [kept],
    )


# --- re-upload while the old version is encoding ------------------------------------------------


def test_reupload_while_encoding_keeps_only_the_newest(
    broker, fault_settings, worker_env, robustness
):
    fault_settings(ENCODE_BATCH_SIZE=1)
    with blob_write_counter() as writes:
        with WorkerProcess(worker_env(), "slow", fault="slow:2") as worker:
            photo = Photo.objects.create(title="v1", image=png((40, 24), seed=1))
            wait_until(lambda: states([photo]) == ["encoding"], what="v1 to be claimed")
            photo.image = png((64, 48), seed=2)
            photo.save()
            (fresh,) = settle([photo])
        assert fresh.image_state == "ready"
        assert (fresh.image.width, fresh.image.height) == (64, 48)
        assert fresh.image.latents.shape == (4, 6, 8)
        assert writes() == {photo.pk: 1}, "the stale v1 result was dropped, not written"
    assert "Dropped a stale encode" in worker.output() or "stale" in worker.output()
    record(
        robustness,
        "reupload-while-encoding",
        "v1's result arrived after v2 was saved and was dropped; v2 (64x48) stored, one write",
        [photo],
    )


# --- a poison item --------------------------------------------------------------------------------


def test_poison_item_fails_after_the_cap_and_the_worker_lives(
    broker, fault_settings, worker_env, robustness
):
    fault_settings(ENCODE_BATCH_SIZE=4, MAX_ATTEMPTS=3, RETRY_DELAYS=[0.2])
    good = saved_without_messages([png(seed=i) for i in range(3)])
    (poison,) = saved_without_messages([magenta()])
    with WorkerProcess(worker_env(), "poisoned", fault="poison") as worker:
        encoding.enqueue_encode_batch(LABEL, "image", pointers([*good, poison]))
        fresh = settle([*good, poison])
        assert worker.alive(), "the worker survived the poison"
        later = Photo.objects.create(title="later", image=png(seed=9))
        (after,) = settle([later])
        assert worker.alive()
    by_pk = {p.pk: p for p in fresh}
    assert all(by_pk[p.pk].image_state == "ready" for p in good), "batch-mates still encoded"
    assert {by_pk[p.pk].image_attempts for p in good} == {1}
    bad = by_pk[poison.pk]
    assert bad.image_state == "failed" and bad.image_attempts == 3
    assert "Gave up after 3 attempts" in bad.image_error and POISON_MESSAGE in bad.image_error
    assert bad.image.original_bytes() == magenta(), "the upload is kept for a later retry"
    assert after.image_state == "ready"
    record(
        robustness,
        "poison",
        f"its batch was bisected, 3 batch-mates ready; the poison row failed after 3 attempts "
        f"({bad.image_error[:60]}...); the same worker encoded the next upload",
        [*good, poison, later],
    )


# --- the database cut during write-back ---------------------------------------------------------


def test_database_cut_during_write_back_is_retried(broker, fault_settings, worker_env, robustness):
    fault_settings(ENCODE_BATCH_SIZE=1, LEASE_SECONDS=8, RETRY_DELAYS=[1])
    with proxied(int(connection.settings_dict["PORT"] or 5432)) as proxy:
        env = worker_env(LATENTSTORE_TEST_DB_PORT=str(proxy.port))
        with blob_write_counter() as writes:
            with WorkerProcess(env, "cut", fault="slow:2") as worker:
                photo = Photo.objects.create(title="cut", image=png())
                wait_until(lambda: states([photo]) == ["encoding"], what="the claim")
                proxy.cut()  # while the batch is on the "device": its write-back finds no DB
                time.sleep(3.5)
                proxy.restore()
                (fresh,) = settle([photo], sweep_every=2.0)
            assert fresh.image_state == "ready" and fresh.image.blob
            assert writes() == {photo.pk: 1}
        log = worker.output()
    retried = "Write-back failed" in log or "Retry in" in log or "Interrupted" in log
    assert retried, f"the cut did not reach the write-back:\n{log[-3000:]}"
    record(
        robustness,
        "database-cut",
        "the worker's database connections were cut mid-encode for 3.5 s; the write-back was "
        "retried and landed once",
        [photo],
    )


# --- a corrupt blob -------------------------------------------------------------------------------


def test_corrupt_blob_is_a_clear_error_and_the_rest_keeps_working(
    client, broker, fault_settings, robustness
):
    photos = [Photo.objects.create(title=f"c{i}", image=png(seed=i)) for i in range(3)]
    for p in photos:
        encode_now(p)
    broker("latents.encode")
    truncated, flipped, fine = (Photo.objects.get(pk=p.pk) for p in photos)
    Photo.objects.filter(pk=truncated.pk).update(image=truncated.image.blob[:-7])
    damaged = bytearray(flipped.image.blob)
    damaged[len(damaged) // 2] ^= 0xFF
    Photo.objects.filter(pk=flipped.pk).update(image=bytes(damaged))

    for pk in (truncated.pk, flipped.pk):
        with pytest.raises(LatentFormatError) as info:
            _ = Photo.objects.get(pk=pk).image.latents
        assert str(info.value), "a message a person can read"
    assert Photo.objects.get(pk=fine.pk).image.decode().size == (40, 24)

    admin = get_user_model().objects.create_superuser("root", "r@example.com", "pw")
    client.force_login(admin)
    listing = client.get("/admin/demo/photo/")
    assert listing.status_code == 200 and listing.content.count(b'class="latent-thumb"') == 3
    form = client.get(f"/admin/demo/photo/{truncated.pk}/change/")
    assert form.status_code == 200 and b"The stored latents are unreadable" in form.content
    picture = client.get(Photo.objects.get(pk=flipped.pk).image.url(size=(32, 32)))
    assert picture.status_code < 500

    status = io.StringIO()
    call_command("latents_status", "--no-queues", stdout=status)
    assert "ready" in status.getvalue()
    warm = io.StringIO()
    with pytest.raises(CommandError) as failed:
        call_command("latents_warm", "--size", "32", stdout=warm, stderr=io.StringIO())
    assert "1 warmed" in warm.getvalue() and "2 failed" in warm.getvalue()
    assert f"pk={truncated.pk}" in str(failed.value) and f"pk={flipped.pk}" in str(failed.value)
    record(
        robustness,
        "corrupt-blob",
        "a truncated and a bit-flipped blob raise LatentFormatError; the admin shows an error "
        "badge, latents_status works, latents_warm warms the rest and exits 1 naming both",
        [fine],
    )

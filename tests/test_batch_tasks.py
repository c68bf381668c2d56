"""Batch encode tasks end to end: a real Celery worker, Redis, PostgreSQL and the tiny model.

The worker runs in a thread of this process, so it uses the very autoencoder object the test
loads (the model cache is per process): forward pre-hooks on it observe the real batches and
inject faults around the real model.
"""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest
from django.db import connection, transaction
from PIL import Image

from latentstore import encoding
from latentstore_workers import tasks as worker_tasks
from latentstore_workers.autoencoders import load_autoencoder
from latentstore_workers.codec import encode_images
from project.models import Photo
from tests.conftest import broker_unreachable, requires_postgres
from tests.test_batching import all_black, watch
from tests.tiny import image_bytes, make_test_image

pytestmark = pytest.mark.django_db(transaction=True)

LABEL = "demo.Photo"


def wait_all(photos, states=("ready", "failed"), timeout=90.0):
    deadline = time.monotonic() + timeout
    pks = [p.pk for p in photos]
    while time.monotonic() < deadline:
        rows = dict(Photo.objects.filter(pk__in=pks).values_list("pk", "image_state"))
        if all(rows[pk] in states for pk in pks):
            for p in photos:
                p.refresh_from_db()
            return photos
        time.sleep(0.05)
    raise AssertionError(f"not all of {pks} reached {states}: {rows}")


def png(size=(40, 24), seed=0) -> bytes:
    return image_bytes(make_test_image(*size, seed=seed), "PNG")


@contextlib.contextmanager
def blob_write_counter():
    """A PostgreSQL trigger that logs every UPDATE writing the blob column; yields a reader."""
    table = Photo._meta.db_table
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

    def writes() -> dict[int, int]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT row_id, count(*) FROM ls_blob_writes GROUP BY row_id")
            return dict(cursor.fetchall())

    try:
        yield writes
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TRIGGER IF EXISTS ls_count_blob_write ON {table}")
            cursor.execute("DROP FUNCTION IF EXISTS ls_count_blob_write()")
            cursor.execute("DROP TABLE IF EXISTS ls_blob_writes")


def test_batched_enqueue_folds_saves_into_batch_messages(broker):
    with encoding.batched_enqueue():
        with transaction.atomic():
            photos = [Photo.objects.create(title=f"b{i}", image=png(seed=i)) for i in range(5)]
    messages = broker("latents.encode")
    assert [name for name, _args, _m in messages] == ["latentstore.encode_batch"]
    ((_name, (label, field, items), _m),) = messages
    assert (label, field) == (LABEL, "image")
    assert [tuple(i) for i in items] == [(p.pk, str(p.image_token)) for p in photos]


def test_batched_enqueue_sends_nothing_for_a_rolled_back_transaction(broker):
    with encoding.batched_enqueue():
        with pytest.raises(RuntimeError):
            with transaction.atomic():
                Photo.objects.create(title="gone", image=png())
                raise RuntimeError("rollback")
    assert broker("latents.encode") == []


def test_bulk_saves_are_encoded_in_batches_equal_to_one_by_one(celery_worker):
    ae = load_autoencoder("default")
    sizes = [(40, 24)] * 4 + [(64, 48)] * 2
    uploads = [make_test_image(*size, seed=i) for i, size in enumerate(sizes)]
    expected = encode_images(ae, uploads, max_batch=1)
    with watch(ae.model.encoder) as shapes:
        with encoding.batched_enqueue():
            with transaction.atomic():
                photos = [
                    Photo.objects.create(title=f"b{i}", image=image_bytes(img, "PNG"))
                    for i, img in enumerate(uploads)
                ]
        wait_all(photos)
    assert sorted(s[0] for s in shapes) == [2, 4]  # one forward pass per size
    for photo, value in zip(photos, expected, strict=True):
        assert photo.image.state == "ready", photo.image.error
        assert photo.image_attempts == 1
        # float16 storage: the blob rounds what the batch computed.
        np.testing.assert_allclose(photo.image.latents, value, rtol=2e-3, atol=2e-3)


@requires_postgres
def test_a_single_message_fills_its_batch_with_pending_rows(celery_worker):
    ae = load_autoencoder("default")
    with broker_unreachable():  # rows staged while the broker was down: no messages
        photos = [Photo.objects.create(title=f"s{i}", image=png(seed=i)) for i in range(5)]
    with watch(ae.model.encoder) as shapes:
        assert encoding.enqueue_encode(LABEL, photos[0].pk, "image", photos[0].image_token)
        wait_all(photos)
    assert [s[0] for s in shapes] == [5]  # one message, one forward pass, five rows
    assert all(p.image.state == "ready" and p.image_attempts == 1 for p in photos)


@requires_postgres
def test_one_message_drains_the_backlog_in_pipelined_batches(celery_worker, settings):
    settings.LATENTSTORE = {**settings.LATENTSTORE, "ENCODE_BATCH_SIZE": 2}
    ae = load_autoencoder("default")
    with broker_unreachable():
        photos = [Photo.objects.create(title=f"q{i}", image=png(seed=i)) for i in range(7)]
    with watch(ae.model.encoder) as shapes:
        assert encoding.enqueue_encode(LABEL, photos[0].pk, "image", photos[0].image_token)
        wait_all(photos)
    assert [s[0] for s in shapes] == [2, 2, 2, 1]  # batches claimed one after another
    assert all(p.image.state == "ready" and p.image_attempts == 1 for p in photos)


def test_batch_with_a_stale_and_a_poison_item(celery_worker, settings, caplog):
    settings.LATENTSTORE = {**settings.LATENTSTORE, "RETRY_DELAYS": (0,), "MAX_ATTEMPTS": 3}
    ae = load_autoencoder("default")
    with broker_unreachable():
        good = [Photo.objects.create(title=f"g{i}", image=png(seed=i)) for i in range(3)]
        poison = Photo.objects.create(
            title="poison", image=image_bytes(Image.new("RGB", (40, 24)), "PNG")
        )
        stale = Photo.objects.create(title="stale", image=png(seed=7))
    items = [(p.pk, str(p.image_token)) for p in [*good, poison, stale]]
    stale.image = png(size=(64, 48), seed=8)  # re-uploaded after the message was made
    with broker_unreachable():
        stale.save()

    def fault(x):  # the black picture crashes the forward pass, wherever it is batched
        if all_black(x):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with watch(ae.model.encoder, fault=fault):
        assert encoding.enqueue_encode_batch(LABEL, "image", items) == 5
        wait_all([*good, poison])
    for photo in good:
        assert photo.image.state == "ready" and photo.image_attempts == 1
    # Retried (released, re-sent) until the attempt cap, then failed with the reason.
    assert poison.image.state == "failed"
    assert poison.image_attempts == 3
    assert "Gave up after 3 attempts" in poison.image.error
    assert "illegal memory access" in poison.image.error
    assert poison.image.original_bytes()  # nothing lost
    # The stale pointer wrote nothing: the row waits for its new upload's own encode, or (on
    # PostgreSQL) a worker filled its batch with the new upload, token and all.
    stale.refresh_from_db()
    if encoding.can_fill():
        stale = wait_all([stale])[0]
        assert stale.image.state == "ready" and stale.image.latents.shape == (4, 6, 8)
    else:
        assert stale.image_state == "pending" and stale.image_attempts == 0
    # The worker lives on.
    after = Photo.objects.create(title="after", image=png(seed=11))
    assert wait_all([after])[0].image.state == "ready"


def test_unreadable_upload_in_a_batch_fails_alone(celery_worker):
    with broker_unreachable():
        good = Photo.objects.create(title="good", image=png(seed=1))
        data = png(size=(64, 64), seed=5)
        broken = Photo.objects.create(title="broken", image=data[: len(data) // 2])
    items = [(p.pk, str(p.image_token)) for p in (good, broken)]
    assert encoding.enqueue_encode_batch(LABEL, "image", items) == 2
    wait_all([good, broken])
    assert good.image.state == "ready"
    assert broken.image.state == "failed" and "could not be read" in broken.image.error


def test_a_redelivered_batch_changes_nothing(celery_worker):
    with broker_unreachable():
        photos = [Photo.objects.create(title=f"r{i}", image=png(seed=i)) for i in range(3)]
    items = [[p.pk, str(p.image_token)] for p in photos]
    assert encoding.enqueue_encode_batch(LABEL, "image", items) == 3
    wait_all(photos)
    blobs = [p.image.blob for p in photos]
    # The same message again (a redelivery after a crash, or the sweeper's) is all stale.
    report = worker_tasks.encode_batch.apply(args=[LABEL, "image", items]).get()
    assert report == {"ready": 0, "stale": 3, "failed": 0, "retried": 0, "filled": 0}
    for photo, blob in zip(photos, blobs, strict=True):
        photo.refresh_from_db()
        assert photo.image.blob == blob and photo.image_attempts == 1


@requires_postgres
def test_two_workers_given_the_same_messages_write_each_row_once():
    """Two workers (threads, own connections) run duplicated batch messages concurrently.

    A trigger counts every UPDATE that writes the blob column: each row is written exactly once,
    and claimed exactly once (attempts == 1), so encoded exactly once.
    """
    with blob_write_counter() as writes:
        load_autoencoder("default")
        with broker_unreachable():
            photos = [Photo.objects.create(title=f"d{i}", image=png(seed=i)) for i in range(12)]
        items = [[p.pk, str(p.image_token)] for p in photos]
        halves = [items[:6], items[6:]]
        reports = []
        barrier = threading.Barrier(2)

        def worker(i):
            from django.db import connections

            try:
                barrier.wait(30)
                for batch in (halves[i], halves[1 - i], items):  # every message, twice over
                    reports.append(worker_tasks.encode_batch.apply(args=[LABEL, "image", batch]))
            finally:
                connections.close_all()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        results = [r.get() for r in reports]
        assert sum(r["ready"] for r in results) == 12
        for photo in photos:
            photo.refresh_from_db()
            assert photo.image.state == "ready" and photo.image_attempts == 1
        assert writes() == {p.pk: 1 for p in photos}


def test_a_long_batch_renews_its_leases_between_passes(settings):
    settings.LATENTSTORE = {**settings.LATENTSTORE, "ENCODE_BATCH_SIZE": 2}
    ae = load_autoencoder("default")
    with broker_unreachable():
        photos = [Photo.objects.create(title=f"l{i}", image=png(seed=i)) for i in range(6)]
    leases = []
    passes = []

    def encoding_leases():
        return sorted(
            Photo.objects.filter(image_state="encoding").values_list("image_changed", flat=True)
        )

    def observe(x):
        passes.append(x.shape[0])
        if len(passes) == 1:  # the first pass: all six rows claimed at one time
            leases.append(encoding_leases())
        elif len(passes) == 2:
            # On a CPU each pass is handed back before the next one is computed: by the second,
            # the background thread has written the first batch back and renewed the four rows
            # still waiting (it may still be at it while this pass starts).
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                current = encoding_leases()
                if len(current) == 4 and min(current) > leases[0][0]:
                    break
                time.sleep(0.01)
            leases.append(current)

    items = [(p.pk, str(p.image_token)) for p in photos]
    with watch(ae.model.encoder, fault=observe):
        report = worker_tasks.encode_batch.apply(args=[LABEL, "image", items]).get()
    assert report["ready"] == 6
    assert passes == [2, 2, 2]
    first, later = leases
    assert len(first) == 6 and len(set(first)) == 1  # one claim
    assert len(later) == 4 and min(later) > first[0]  # renewed after the first pass


@pytest.mark.heavy
@requires_postgres
def test_two_worker_processes_with_duplicated_messages_write_each_row_once(
    broker, settings, worker_env
):
    """Two real ``celery worker`` processes, one broker, one database, every message twice."""
    from tests.faults import WorkerProcess

    settings.LATENTSTORE = {**settings.LATENTSTORE, "ENCODE_BATCH_SIZE": 4}
    photos = []
    with blob_write_counter() as writes:
        with broker_unreachable():
            photos = [Photo.objects.create(title=f"m{i}", image=png(seed=i)) for i in range(24)]
        workers = [WorkerProcess(worker_env(), f"w{i}") for i in range(2)]
        try:
            for worker in workers:
                worker.start()
            items = [(p.pk, str(p.image_token)) for p in photos]
            for _duplicate in range(2):
                assert encoding.enqueue_encode_batch(LABEL, "image", items) == 24
            wait_all(photos, timeout=300)
        finally:
            for worker in workers:
                worker.stop()
        assert all(p.image.state == "ready" and p.image_attempts == 1 for p in photos)
        assert writes() == {p.pk: 1 for p in photos}

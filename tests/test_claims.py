"""Claims, leases and write-backs of batches: what keeps several workers from stepping on rows.

The concurrency tests run two "workers" as two threads, each with its own database connection
(Django's connections are per thread), against the real PostgreSQL.
"""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
from django.db import connection, connections, transaction
from django.utils import timezone

from latentstore import encoding
from latentstore.fields import ENCODING, PENDING, READY
from project.models import Photo
from tests.conftest import requires_postgres
from tests.tiny import image_bytes, make_test_image

pytestmark = pytest.mark.django_db(transaction=True)

LABEL = "demo.Photo"


def staged(n: int, size=(40, 24), seed=0) -> list[Photo]:
    """``n`` pending rows, created without sending any message (bulk_create has no signals)."""
    photos = [
        Photo(title=f"p{i}", image=image_bytes(make_test_image(*size, seed=seed + i), "PNG"))
        for i in range(n)
    ]
    created = Photo.objects.bulk_create(photos)
    return list(Photo.objects.filter(pk__in=[p.pk for p in created]).order_by("pk"))


def pointers(photos) -> list[tuple[int, str]]:
    return [(p.pk, str(p.image_token)) for p in photos]


def test_bulk_create_stages_rows_without_messages():
    (photo,) = staged(1)
    assert photo.image_state == PENDING and photo.image_staged and photo.image_token


def test_claim_batch_takes_named_rows_and_skips_stale_ones():
    a, b, c = staged(3)
    items = [(a.pk, str(a.image_token)), (b.pk, str(uuid.uuid4())), (c.pk, str(c.image_token))]
    claims = encoding.claim_batch(LABEL, "image", items)
    assert [cl.pk for cl in claims] == [a.pk, c.pk]
    assert all(cl.attempts == 1 and not cl.filled and cl.staged for cl in claims)
    assert (claims[0].width, claims[0].height) == (40, 24)
    b.refresh_from_db()
    assert b.image_state == PENDING and b.image_attempts == 0  # untouched
    a.refresh_from_db()
    assert a.image_state == ENCODING and a.image_changed is not None


def test_malformed_pointers_are_ignored_not_fatal(caplog):
    (a,) = staged(1)
    claims = encoding.claim_batch(LABEL, "image", [(a.pk, "not-a-uuid")])
    assert claims == []
    assert "malformed token" in caplog.text


def test_a_leased_row_is_not_claimed_again_until_its_lease_expires(settings):
    (photo,) = staged(1)
    items = pointers([photo])
    assert len(encoding.claim_batch(LABEL, "image", items)) == 1
    # A duplicate message (or one redelivered while the worker still runs) finds it leased.
    assert encoding.claim_batch(LABEL, "image", items) == []
    assert encoding.claim("demo.Photo", photo.pk, "image", str(photo.image_token)) is None
    # The worker died: once the lease has run out the row can be claimed again (attempt 2).
    expired = timezone.now() - timedelta(seconds=settings.LATENTSTORE.get("LEASE_SECONDS", 600))
    Photo.objects.filter(pk=photo.pk).update(image_changed=expired - timedelta(seconds=1))
    (again,) = encoding.claim_batch(LABEL, "image", items)
    assert again.attempts == 2


def test_claims_past_the_attempt_cap_fail_the_row():
    (photo,) = staged(1)
    Photo.objects.filter(pk=photo.pk).update(image_attempts=3)
    assert encoding.claim_batch(LABEL, "image", pointers([photo])) == []
    photo.refresh_from_db()
    assert photo.image_state == "failed" and "Gave up after 3 attempts" in photo.image_error


@requires_postgres
def test_fill_takes_other_pending_rows_same_size_and_oldest_first():
    named = staged(1, size=(40, 24))[0]
    other_size = staged(2, size=(64, 48), seed=10)
    same_size = staged(3, size=(40, 24), seed=20)
    now = timezone.now()
    for age, photo in enumerate([*other_size, *same_size]):
        Photo.objects.filter(pk=photo.pk).update(image_changed=now - timedelta(seconds=age))
    claims = encoding.claim_batch(LABEL, "image", pointers([named]), fill=4)
    assert claims[0].pk == named.pk and not claims[0].filled
    # Three of the named row's size (oldest first), then the oldest of the other size.
    assert [c.pk for c in claims[1:]] == [
        same_size[2].pk,
        same_size[1].pk,
        same_size[0].pk,
        other_size[1].pk,
    ]
    assert all(c.filled and c.attempts == 1 for c in claims[1:])
    assert Photo.objects.filter(image_state=ENCODING).count() == 5
    assert Photo.objects.get(pk=other_size[0].pk).image_state == PENDING


@requires_postgres
def test_fill_skips_rows_locked_by_another_transaction_without_waiting():
    named, locked, free = staged(3)
    holding, release = threading.Event(), threading.Event()

    def hold_lock():
        try:
            with transaction.atomic():
                list(Photo.objects.select_for_update().filter(pk=locked.pk))
                holding.set()
                release.wait(30)
        finally:
            connections.close_all()

    thread = threading.Thread(target=hold_lock)
    thread.start()
    try:
        assert holding.wait(30)
        claims = encoding.claim_batch(LABEL, "image", pointers([named]), fill=5)
        assert [c.pk for c in claims] == [named.pk, free.pk]  # the locked row was skipped
    finally:
        release.set()
        thread.join(30)
    assert Photo.objects.get(pk=locked.pk).image_state == PENDING


def run_in_threads(count: int, work) -> list:
    """Run ``work(i)`` in ``count`` threads started together; return their results."""
    barrier = threading.Barrier(count)
    results: list = [None] * count
    errors: list = []

    def target(i):
        try:
            barrier.wait(30)
            results[i] = work(i)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


@requires_postgres
def test_two_workers_claiming_concurrently_never_share_a_row():
    photos = staged(40)
    everything = pointers(photos)

    def worker(i):
        taken = []
        while True:
            # Both name the same rows (a duplicated message) and fill from the backlog.
            named = everything[i * 3 : i * 3 + 6]
            claims = encoding.claim_batch(LABEL, "image", named, fill=5)
            if not claims:
                return taken
            taken += [c.pk for c in claims]

    first, second = run_in_threads(2, worker)
    assert not set(first) & set(second)
    assert len(first) == len(set(first)) and len(second) == len(set(second))
    assert set(first) | set(second) == {p.pk for p in photos}
    assert first and second  # both got work: neither starved
    assert set(Photo.objects.values_list("image_attempts", flat=True)) == {1}


def test_write_back_many_checks_each_token():
    a, b, c = staged(3)
    claims = encoding.claim_batch(LABEL, "image", pointers([a, b, c]))
    b.image = image_bytes(make_test_image(32, 32, seed=9), "PNG")  # re-uploaded meanwhile
    b.save()
    stored = encoding.write_back_many(
        [(cl, f"blob-{cl.pk}".encode(), f"d{cl.pk}") for cl in claims]
    )
    assert stored == [True, False, True]
    for photo in (a, c):
        photo.refresh_from_db()
        assert photo.image_state == READY and photo.image_staged is None
        assert photo.image.blob == f"blob-{photo.pk}".encode()
        assert photo.image_digest == f"d{photo.pk}"
    b.refresh_from_db()
    assert b.image_state == PENDING and b.image.blob is None and b.image_staged


@pytest.mark.parametrize("psnrs", [None, [None, None], [None, 21.5], [30.25, 100.0]])
def test_write_back_many_stores_measured_and_unmeasured_psnrs(psnrs):
    """Regression: an all-NULL PSNR column (gate off) was sent as text and PostgreSQL refused."""
    rows = staged(2)
    claims = encoding.claim_batch(LABEL, "image", pointers(rows))
    results = [(cl, f"blob-{cl.pk}".encode(), f"d{cl.pk}") for cl in claims]
    assert encoding.write_back_many(results, psnrs=psnrs) == [True, True]
    expected = psnrs or [None, None]
    for photo, value in zip(rows, expected, strict=True):
        photo.refresh_from_db()
        assert photo.image_state == READY and photo.image_psnr == value


@pytest.mark.parametrize("psnrs", [None, [21.5, None]])
def test_write_back_many_sends_no_per_row_psnr_when_nothing_was_measured(psnrs):
    """Gate off: the PSNR column is one NULL, not a CASE with a branch per row (and a cast)."""
    from django.test.utils import CaptureQueriesContext

    claims = encoding.claim_batch(LABEL, "image", pointers(staged(3)))
    with CaptureQueriesContext(connection) as queries:
        stored = encoding.write_back_many(
            [(cl, b"x", f"d{cl.pk}") for cl in claims], psnrs=psnrs and psnrs + [None]
        )
    assert stored == [True, True, True]
    (update,) = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("UPDATE")]
    psnr_sql = update[update.index('"image_psnr" = ') :]
    if psnrs is None:
        assert psnr_sql.startswith('"image_psnr" = NULL') and "CAST" not in update, update
    else:
        # The measured values keep their cast CASE: (...)::double precision, or CAST(... AS ...).
        assert psnr_sql.startswith(('"image_psnr" = (CASE WHEN', '"image_psnr" = CAST(CASE')), (
            update
        )


def test_write_back_many_never_overwrites_a_finished_row():
    (a,) = staged(1)
    (claim,) = encoding.claim_batch(LABEL, "image", pointers([a]))
    assert encoding.write_back_many([(claim, b"first", "d1")]) == [True]
    assert encoding.write_back_many([(claim, b"second", "d2")]) == [False]
    a.refresh_from_db()
    assert a.image.blob == b"first"


def test_renew_extends_the_lease_and_release_hands_rows_back():
    a, b = staged(2)
    claims = encoding.claim_batch(LABEL, "image", pointers([a, b]))
    past = timezone.now() - timedelta(hours=1)
    Photo.objects.update(image_changed=past)
    assert encoding.renew(claims) == 2
    assert all(p.image_changed > past for p in Photo.objects.all())
    assert encoding.release(claims[:1], "Attempt 1 failed: cuDNN error") == 1
    a.refresh_from_db()
    assert a.image_state == PENDING and a.image_error == "Attempt 1 failed: cuDNN error"
    assert a.image_attempts == 1  # counted; the next claim counts the next
    (again,) = encoding.claim_batch(LABEL, "image", pointers([a]))
    assert again.attempts == 2


@requires_postgres
def test_a_row_released_with_a_back_off_is_left_alone_by_fills_until_then():
    a, b = staged(2)
    (claim,) = encoding.claim_batch(LABEL, "image", pointers([a]))
    encoding.release([claim], "Attempt 1 failed: out of memory", retry_after=60)
    assert [c.pk for c in encoding.claim_batch(LABEL, "image", [], fill=5)] == [b.pk]
    # Its own retry message may take it, back-off or not.
    (again,) = encoding.claim_batch(LABEL, "image", pointers([a]))
    assert again.attempts == 2


def test_sweeper_resets_expired_claims_and_sends_batches(broker, settings):
    settings.LATENTSTORE = {**settings.LATENTSTORE, "ENCODE_BATCH_SIZE": 2}
    old_pending, expired, fresh = staged(3)
    encoding.claim_batch(LABEL, "image", pointers([expired, fresh]))  # workers took these
    past = timezone.now() - timedelta(hours=1)
    Photo.objects.filter(pk__in=[old_pending.pk, expired.pk]).update(image_changed=past)
    result = encoding.sweep()
    assert (result.requeued, result.failed, result.not_sent) == (2, 0, 0)
    messages = broker("latents.encode")
    assert [(name, args[0], args[1]) for name, args, _m in messages] == [
        ("latentstore.encode_batch", LABEL, "image")
    ]
    assert sorted(tuple(i) for i in messages[0][1][2]) == sorted(pointers([old_pending, expired]))
    expired.refresh_from_db()
    assert expired.image_state == PENDING  # claimable again: its worker is presumed dead
    fresh.refresh_from_db()
    assert fresh.image_state == ENCODING  # still leased to a live worker
    assert encoding.sweep().requeued == 0  # renewed: not again until another lease passes


@requires_postgres
def test_claims_cost_a_constant_number_of_queries():
    from django.test.utils import CaptureQueriesContext

    few, many = staged(2), staged(12, seed=50)
    with CaptureQueriesContext(connection) as small:
        encoding.claim_batch(LABEL, "image", pointers(few), fill=0)
    with CaptureQueriesContext(connection) as large:
        claims = encoding.claim_batch(LABEL, "image", pointers(many), fill=4)
    assert len(claims) == 12
    assert len(large.captured_queries) <= len(small.captured_queries) + 2  # + the fill's two
    with CaptureQueriesContext(connection) as writes:
        encoding.write_back_many([(c, b"x", f"d{c.pk}") for c in claims])
    assert len(writes.captured_queries) <= 4  # savepoint/begin, lock, update, commit


def test_sweep_can_be_limited_to_some_fields(broker):
    from tests.testapp.models import Item

    (photo,) = staged(1)
    Item.objects.bulk_create([Item(name="i", picture=image_bytes(make_test_image(16, 16), "PNG"))])
    past = timezone.now() - timedelta(hours=1)
    Photo.objects.update(image_changed=past)
    Item.objects.update(picture_changed=past)
    field = Item._meta.get_field("picture")
    assert encoding.sweep(fields=[(Item, field)]).requeued == 1
    photo.refresh_from_db()
    assert photo.image_changed == past  # not this sweep's field
    assert [m[1][0] for m in broker("latents.encode")] == ["testapp.Item"]

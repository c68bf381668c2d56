"""The whole path with a real Celery worker through Redis, on PostgreSQL (or SQLite, said so)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone

from latentstore import encoding
from latentstore_workers import tasks as worker_tasks
from project.models import Photo
from tests.conftest import broker_unreachable
from tests.rows import run_web_tier
from tests.testapp.models import Item
from tests.tiny import image_bytes, make_test_image

pytestmark = pytest.mark.django_db(transaction=True)


def wait_for(obj, field="image", states=("ready", "failed"), timeout=60.0):
    deadline = time.monotonic() + timeout
    image = getattr(obj, field)
    while time.monotonic() < deadline:
        image.refresh()
        if image.state in states:
            return image
        time.sleep(0.05)
    raise AssertionError(f"{obj!r}.{field} still {image.state!r} after {timeout} s")


def test_save_is_encoded_by_a_real_worker(celery_worker, png_bytes):
    photo = Photo.objects.create(title="cat", image=png_bytes)
    image = wait_for(photo)
    assert image.state == "ready", image.error
    assert image.latents.shape == (4, 3, 5)
    assert photo.image_staged is None
    assert photo.image_attempts == 1


def test_reupload_while_encoding_keeps_only_the_newest(celery_worker):
    first = image_bytes(make_test_image(40, 24, seed=1), "PNG")
    second = image_bytes(make_test_image(64, 48, seed=2), "PNG")
    photo = Photo.objects.create(title="v1", image=first)
    old_token = photo.image_token
    # The worker may already hold v1: take the claim ourselves, as a slow worker would.
    stale_claim = encoding.claim("demo.Photo", photo.pk, "image", str(old_token))

    photo.image = second
    photo.save()
    image = wait_for(photo)
    assert image.state == "ready" and (image.width, image.height) == (64, 48)
    newest = image.blob

    if stale_claim is not None:  # the slow worker finishes v1 now: dropped as stale
        assert encoding.write_back(stale_claim, b"stale", "stale") is False
    # And a redelivered v1 message is a no-op too.
    assert (
        worker_tasks.encode.apply(args=["demo.Photo", photo.pk, "image", str(old_token)]).get()
        == worker_tasks.NOTHING_TO_DO
    )
    photo.image.refresh()
    assert photo.image.blob == newest
    assert photo.image.latents.shape == (4, 6, 8)


def test_unreadable_image_fails_with_a_message_and_keeps_the_original(celery_worker):
    data = image_bytes(make_test_image(64, 64, seed=5), "PNG")
    truncated = data[: len(data) // 2]  # the header parses; the pixels do not
    photo = Photo.objects.create(title="broken", image=truncated)
    image = wait_for(photo)
    assert image.state == "failed"
    assert "could not be read" in image.error
    assert image.original_bytes() == truncated  # nothing lost


def test_sweeper_reenqueues_rows_whose_message_was_lost(celery_worker, png_bytes):
    from latentstore.fields import PENDING

    # A row staged while the broker was down: pending, no message anywhere.
    photo = Photo.objects.create(title="lost", image=png_bytes)
    wait_for(photo)
    Photo.objects.filter(pk=photo.pk).update(
        image_state=PENDING,
        image=None,
        image_digest="",
        image_staged=png_bytes,
        image_changed=timezone.now() - timedelta(hours=1),
    )
    result = encoding.sweep()
    assert result.requeued == 1
    assert wait_for(photo).state == "ready"
    assert encoding.sweep().requeued == 0


def test_sweeper_gives_up_after_the_attempt_cap(png_bytes):
    photo = Photo.objects.create(title="poison", image=png_bytes)
    Photo.objects.filter(pk=photo.pk).update(
        image_attempts=3, image_changed=timezone.now() - timedelta(hours=1)
    )
    result = encoding.sweep()
    assert result.failed == 1
    photo.image.refresh()
    assert photo.image.state == "failed"
    assert "Gave up after 3 attempts" in photo.image.error


def test_claim_past_the_attempt_cap_fails_the_row(png_bytes):
    photo = Photo.objects.create(title="cap", image=png_bytes)
    Photo.objects.filter(pk=photo.pk).update(image_attempts=3)
    assert (
        worker_tasks.encode.apply(
            args=["demo.Photo", photo.pk, "image", str(photo.image_token)]
        ).get()
        == worker_tasks.NOTHING_TO_DO
    )
    photo.image.refresh()
    assert photo.image.state == "failed" and "Gave up" in photo.image.error


def test_save_succeeds_when_the_broker_is_unreachable(settings, png_bytes, caplog):
    caplog.set_level("WARNING", logger="latentstore.encoding")
    with broker_unreachable():
        started = time.monotonic()
        photo = Photo.objects.create(title="offline", image=png_bytes)
        elapsed = time.monotonic() - started
    photo.refresh_from_db()
    assert photo.image.state == "pending"
    assert elapsed < 15
    # Regression: the warning's format string had fewer %s than arguments and never rendered.
    (record,) = [r for r in caplog.records if r.name == "latentstore.encoding"]
    assert f"pk={photo.pk}" in record.getMessage() and "sweeper will retry" in record.getMessage()


def test_kept_original_goes_to_storage(celery_worker, png_bytes):
    item = Item.objects.create(name="keep", picture=png_bytes)
    image = wait_for(item, "picture")
    assert image.state == "ready", image.error
    assert item.picture_staged is None
    assert item.picture_original.startswith("latentstore/originals/testapp.item/picture/")
    assert image.original_bytes() == png_bytes


def test_web_tier_never_imports_torch(tmp_path, png_bytes):
    """Saving, listing, reading latents and the rgb decode all work without importing torch."""
    script = f"""
import sys, django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from project.models import Photo
p = Photo.objects.create(title="x", image={png_bytes!r})
assert Photo.objects.get(pk=p.pk).image.state == "pending"
from latentstore.latents import blob_digest
from tests.rows import fake_blob
blob = fake_blob()
Photo.objects.filter(pk=p.pk).update(image=blob, image_state="ready",
                                     image_digest=blob_digest(blob), image_autoencoder="default")
q = Photo.objects.get(pk=p.pk)
assert q.image.latents.shape == (4, 3, 5)
assert q.image.decode(decoder="rgb").size == (40, 24)
assert q.image.preview(size=16).size == (16, 10)
assert "torch" not in sys.modules and "diffusers" not in sys.modules, "torch was imported"
print("NO-TORCH-OK")
"""
    out = run_web_tier(script, tmp_path, timeout=120)
    assert "NO-TORCH-OK" in out.stdout, out.stderr


def test_enqueue_encode_batch_sends_batch_messages_of_pointers(broker, png_bytes, settings):
    settings.LATENTSTORE = {**settings.LATENTSTORE, "ENCODE_BATCH_SIZE": 2}
    photos = [Photo.objects.create(title=f"b{i}", image=png_bytes) for i in range(3)]
    broker("latents.encode")  # the saves' own messages
    sent = encoding.enqueue_encode_batch(
        "demo.Photo", "image", [(p.pk, p.image_token) for p in photos]
    )
    assert sent == 3
    messages = broker("latents.encode")
    # One message per ENCODE_BATCH_SIZE rows, each (label, field, [[pk, token], ...]).
    assert [name for name, _args, _m in messages] == ["latentstore.encode_batch"] * 2
    assert [len(args[2]) for _name, args, _m in messages] == [2, 1]
    pointers = set()
    for _name, (label, field, items), _m in messages:
        assert (label, field) == ("demo.Photo", "image")
        pointers |= {tuple(item) for item in items}
    assert pointers == {(p.pk, str(p.image_token)) for p in photos}


def test_enqueue_encode_batch_counts_what_could_not_be_sent(png_bytes):
    photo = Photo.objects.create(title="x", image=png_bytes)
    with broker_unreachable():
        items = [(photo.pk, photo.image_token)]
        assert encoding.enqueue_encode_batch("demo.Photo", "image", items) == 0


def test_sweeper_gives_a_token_to_pending_rows_that_have_none(celery_worker, png_bytes):
    # Regression: a pending row without a token (a bulk update, a hand edit) crashed the sweep
    # ("None" is not a UUID) and could never be claimed.
    photo = Photo.objects.create(title="tokenless", image=png_bytes)
    Photo.objects.filter(pk=photo.pk).update(
        image_token=None, image_changed=timezone.now() - timedelta(hours=1)
    )
    assert encoding.sweep().requeued == 1
    image = wait_for(photo)
    assert image.state == "ready" and photo.image_token is not None

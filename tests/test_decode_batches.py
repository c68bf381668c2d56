"""Decoding many rows at once: one cache round trip, batched forward passes, per-item errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from django.core.cache import caches
from PIL import Image

from latentstore import cache as latent_cache
from latentstore.decoding import decode_images as decode_many
from latentstore.decoding import key_for
from latentstore.fields import LatentsNotReady
from latentstore.maintenance import small_rows
from latentstore_workers.autoencoders import load_autoencoder
from project.models import Photo
from tests.conftest import broker_unreachable, latentstore_config, requires_redis
from tests.rows import make_rows
from tests.test_batch_tasks import wait_all
from tests.test_batching import watch
from tests.test_field import encode_now
from tests.tiny import image_bytes, make_test_image

pytestmark = pytest.mark.django_db(transaction=True)


def ready_photos(sizes) -> list[Photo]:
    photos = []
    for i, size in enumerate(sizes):
        with broker_unreachable():
            photo = Photo.objects.create(
                title=f"d{i}", image=image_bytes(make_test_image(*size, seed=i), "PNG")
            )
        encode_now(photo)
        assert photo.image.state == "ready"
        photos.append(photo)
    return photos


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), int)


def test_decode_many_batches_the_misses_and_matches_one_by_one():
    photos = ready_photos([(40, 24), (40, 24), (40, 24), (64, 48)])
    singles = [np.asarray(p.image.decode(), int) for p in photos]
    caches["default"].clear()
    latent_cache.reset()  # and the per-process LRU in front of it
    ae = load_autoencoder("default")
    with watch(ae.model.decoder) as shapes:
        pictures = decode_many([p.image for p in photos])
    assert sorted(s[0] for s in shapes) == [1, 3]  # one forward pass per latent size
    for data, single in zip(pictures, singles, strict=True):
        assert np.abs(pixels(data) - single).max() <= 1
    # Now everything is cached: no model runs at all.
    with watch(ae.model.decoder) as shapes:
        again = decode_many([p.image for p in photos])
    assert shapes == [] and again == pictures


def test_decode_many_sizes_and_errors_per_item():
    ready = ready_photos([(40, 24), (40, 24)])
    with broker_unreachable():
        pending = Photo.objects.create(title="p", image=image_bytes(make_test_image(8, 8), "PNG"))
    images = [ready[0].image, pending.image, ready[1].image]
    with pytest.raises(LatentsNotReady):
        decode_many(images, size=20)
    results = decode_many(images, size=20, return_exceptions=True)
    assert isinstance(results[1], LatentsNotReady)
    assert [Image.open(io.BytesIO(results[i])).size for i in (0, 2)] == [(20, 12), (20, 12)]
    rgb = decode_many([ready[0].image], decoder="rgb", format="webp")
    assert Image.open(io.BytesIO(rgb[0])).format == "WEBP"
    # The same picture twice is decoded once and returned twice.
    twice = decode_many([ready[0].image, ready[0].image], size=10)
    assert twice[0] == twice[1] and Image.open(io.BytesIO(twice[0])).size == (10, 6)


@pytest.fixture
def worker_decodes(settings, tiny_vae_dir, celery_worker):
    """Decodes run on a real worker (``RUN: "worker"``) through the Redis cache; returns a
    maker of photos encoded by that worker."""
    settings.LATENTSTORE = latentstore_config(
        tiny_vae_dir,
        CACHE="redis",
        DECODE_BATCH_SIZE=2,
        DECODERS={
            "default": {
                "BACKEND": "latentstore_workers.decoders.VAEDecoder",
                "OPTIONS": {"RUN": "worker"},
            }
        },
    )

    def encoded(count: int, prefix: str) -> list[Photo]:
        photos = [
            Photo.objects.create(
                title=f"{prefix}{i}", image=image_bytes(make_test_image(40, 24, seed=i), "PNG")
            )
            for i in range(count)
        ]
        wait_all(photos)
        return photos

    try:
        yield encoded
    finally:
        caches["redis"].clear()


@requires_redis
def test_decode_many_on_workers_sends_batch_tasks(worker_decodes):
    photos = worker_decodes(3, "w")
    ae = load_autoencoder("default")
    with watch(ae.model.decoder) as shapes:
        pictures = decode_many([p.image for p in photos], size=20)
    assert sorted(s[0] for s in shapes) == [1, 2]  # DECODE_BATCH_SIZE rows per task
    assert [Image.open(io.BytesIO(d)).size for d in pictures] == [(20, 12)] * 3
    Photo.objects.filter(pk=photos[0].pk).update(image_digest="gone")  # a miss again
    photos[0].refresh_from_db()
    Photo.objects.filter(pk=photos[0].pk).delete()
    (missing,) = decode_many([photos[0].image], size=20, return_exceptions=True)
    assert "does not exist" in str(missing)


@requires_redis
def test_a_stale_worker_error_does_not_answer_a_new_batch(worker_decodes):
    photos = worker_decodes(2, "s")
    key, _ = key_for(photos[0].image, "default", 20, "PNG")
    caches["redis"].set(key + ":error", "RuntimeError: a failure of an earlier attempt", 60)
    pictures = decode_many([p.image for p in photos], size=20, return_exceptions=True)
    assert not any(isinstance(d, Exception) for d in pictures), pictures
    assert [Image.open(io.BytesIO(d)).size for d in pictures] == [(20, 12)] * 2


def test_decode_many_reads_the_deferred_blobs_in_one_query(django_assert_num_queries):
    """Rows listed without their blobs (``small_rows``): one query for all the misses' blobs,
    not one per row."""
    pks = make_rows(5, distinct=True)
    images = [row.image for row in small_rows(Photo).filter(pk__in=pks)]
    with django_assert_num_queries(1):
        pictures = decode_many(images, decoder="rgb", size=16, return_exceptions=True)
    assert all(isinstance(p, bytes) for p in pictures), pictures
    # The fetched blobs stay with the images: reading them again costs nothing.
    with django_assert_num_queries(0):
        assert [image.nbytes > 0 for image in images] == [True] * 5


def test_decode_many_matches_prefetched_blobs_by_uuid_primary_key(django_assert_num_queries):
    from latentstore.queries import without_blobs
    from tests.testapp.models import Item

    for i in range(3):
        with broker_unreachable():
            item = Item.objects.create(
                name=f"u{i}", picture=image_bytes(make_test_image(40, 24, seed=i), "PNG")
            )
        assert encode_now(item, "picture") == "ready"
    listed = list(without_blobs(Item.objects.order_by("name")))
    with django_assert_num_queries(1):
        pictures = decode_many([i.picture for i in listed], decoder="rgb", size=16)
    stored = Item.objects.order_by("name")  # the same pictures as from fully loaded rows
    assert pictures == decode_many([i.picture for i in stored], decoder="rgb", size=16)

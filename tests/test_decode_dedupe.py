"""A picture is decoded once, however many warm-up messages a backlog piled up for it.

Stop the worker, view cold pictures, let the warm-up lock pass, view them again: each picture
now has two decode messages waiting. The worker must decode each once, answering the second
from the cache; two workers never decode the same picture at the same time.
"""

from __future__ import annotations

import time

import pytest

from latentstore.decoders import decoders
from latentstore.decoding import get_cache, key_for
from latentstore_workers import tasks as worker_tasks
from project.models import Photo
from tests.conftest import latentstore_config
from tests.test_field import encode_now
from tests.tiny import image_bytes, make_test_image

pytestmark = pytest.mark.django_db


@pytest.fixture
def count_decodes(monkeypatch):
    """The pictures the default decoder's class really decoded, one by one or in batches."""
    backend_class = type(decoders["default"])
    calls: list[int] = []
    one, many = backend_class.decode, backend_class.decode_batch

    def decode(self, header, latents):
        calls.append(header.width)
        return one(self, header, latents)

    def decode_batch(self, items):
        calls.extend(header.width for header, _latents in items)
        return many(self, items)

    monkeypatch.setattr(backend_class, "decode", decode)
    monkeypatch.setattr(backend_class, "decode_batch", decode_batch)
    return calls


def ready_photos(n: int) -> list[Photo]:
    photos = []
    for seed in range(n):
        photo = Photo.objects.create(
            title=f"p{seed}", image=image_bytes(make_test_image(40, 24, seed=seed), "PNG")
        )
        encode_now(photo)
        photos.append(photo)
    return photos


def test_warm_ups_piled_up_by_a_backlog_decode_each_picture_once(
    client, broker, settings, tiny_vae_dir, count_decodes
):
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, WARMUP_LOCK_SECONDS=1)
    photos = ready_photos(4)
    urls = [photo.image.url(size=32) for photo in photos]
    for url in urls:  # no worker: previews, and one warm-up each
        assert client.get(url).status_code == 200
    time.sleep(1.2)  # the warm-up lock passes while the worker is still down
    for url in urls:
        assert client.get(url).status_code == 200
    messages = [args for name, args, _m in broker("latents.decode") if name == "latentstore.decode"]
    assert len(messages) == 8, "two warm-ups per picture are waiting"

    answers = [worker_tasks.decode.apply(args=args).get() for args in messages]
    assert sorted(answers) == ["cached"] * 4 + ["ok"] * 4
    assert len(count_decodes) == 4, "one decode per picture"
    for args in messages:  # each message's own cache key holds its picture
        assert get_cache().get(args[-1]) is not None


def test_a_picture_being_decoded_elsewhere_is_not_decoded_again(count_decodes):
    (photo,) = ready_photos(1)
    key, target = key_for(photo.image, "default", 32, "WEBP")
    args = ["demo.Photo", photo.pk, "image", "default", list(target), "WEBP", key]
    cache = get_cache()
    cache.add(key + ":decoding", 1, 60)  # another worker is on it
    assert worker_tasks.decode.apply(args=args).get() == "in flight"
    assert count_decodes == [] and cache.get(key) is None
    cache.delete(key + ":decoding")
    assert worker_tasks.decode.apply(args=args).get() == "ok"
    assert cache.get(key + ":decoding") is None, "the claim is let go after the decode"


def test_a_batch_decode_skips_what_is_cached_or_in_flight(count_decodes):
    a, b, c = ready_photos(3)
    items = []
    for photo in (a, b, c):
        key, target = key_for(photo.image, "default", 20, "PNG")
        items.append([photo.pk, list(target), key])
    cache = get_cache()
    cache.set(items[0][2], b"already", 60)
    cache.add(items[1][2] + ":decoding", 1, 60)
    result = worker_tasks.decode_batch.apply(
        args=["demo.Photo", "image", "default", "PNG", items]
    ).get()
    assert result == {"ok": 1, "failed": 0, "skipped": 2}
    assert len(count_decodes) == 1 and cache.get(items[2][2]) is not None
    assert cache.get(items[0][2]) == b"already"

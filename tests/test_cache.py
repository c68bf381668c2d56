"""The two cache tiers: the per-process LRU and latentstore's Redis backend."""

from __future__ import annotations

import os
import threading

import pytest
from django.core.cache import caches
from django.test import override_settings

from latentstore import cache as tiers
from latentstore.cache import get_cache
from latentstore.cache import picture_key as cache_key
from project.models import Photo
from tests.conftest import latentstore_config, requires_redis
from tests.test_field import encode_now

KEY = cache_key("ab" * 16, "default", "0123456789abcdef", (40, 24), "PNG")


def key(n: int) -> str:
    return cache_key(f"{n:032x}", "default", "0123456789abcdef", (40, 24), "WEBP")


def test_content_keys_are_recognised_and_nothing_else():
    assert tiers.is_content_key(KEY)
    assert tiers.is_content_key(cache_key("f" * 32, "rgb", "0" * 16, (1, 1), "JPEG"))
    for other in (KEY + ":error", KEY + ":warming", "latentstore:v1:lock", "x", "", None):
        assert not tiers.is_content_key(other)


def test_lru_is_bounded_by_bytes_and_evicts_the_least_recently_used():
    lru = tiers.LocalLRU(max_bytes=300, max_item_bytes=300)
    for n in range(3):
        assert lru.set(key(n), bytes([n]) * 100)
    assert lru.nbytes == 300
    assert lru.get(key(0)) == b"\0" * 100  # 0 is now the most recent
    lru.set(key(3), b"3" * 100)
    assert key(1) not in lru and key(0) in lru and key(2) in lru and key(3) in lru
    assert lru.nbytes == 300
    lru.set(key(0), b"x" * 250)  # replacing a value re-counts its bytes
    assert lru.nbytes <= 300 and lru.get(key(0)) == b"x" * 250


def test_lru_refuses_values_larger_than_its_item_limit():
    lru = tiers.LocalLRU(max_bytes=800)  # items up to an eighth: 100 bytes
    assert not lru.set(KEY, b"x" * 101)
    assert KEY not in lru and lru.nbytes == 0
    assert tiers.LocalLRU(max_bytes=0).set(KEY, b"x") is False


def test_lru_survives_concurrent_writers_within_its_budget():
    lru = tiers.LocalLRU(max_bytes=10_000, max_item_bytes=1000)

    def work(offset: int) -> None:
        for n in range(500):
            lru.set(key(offset + n % 50), b"y" * (n % 200 + 1))
            lru.get(key(offset + (n * 7) % 50))

    threads = [threading.Thread(target=work, args=(i * 100,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lru.nbytes == sum(len(lru.get(k) or b"") for k in list(lru._data))
    assert lru.nbytes <= 10_000


def test_tiered_get_fills_the_lru_only_with_content_addressed_bytes():
    cache = get_cache()
    shared = caches["default"]
    shared.set(KEY, b"picture")
    shared.set(KEY + ":error", "a message")
    assert cache.get(KEY) == b"picture"
    assert KEY in cache.local
    assert cache.get(KEY + ":error") == "a message"
    assert KEY + ":error" not in cache.local
    shared.delete(KEY)
    assert cache.get(KEY) == b"picture", "the LRU serves a content-addressed picture"
    found = cache.get_many([KEY, KEY + ":error", "missing"])
    assert found == {KEY: b"picture", KEY + ":error": "a message"}


def test_tiered_set_delete_and_locks():
    cache = get_cache()
    cache.set(KEY, b"abc", 60)
    assert caches["default"].get(KEY) == b"abc" and KEY in cache.local
    assert cache.add(KEY + ":warming", 1, 60) is True
    assert cache.add(KEY + ":warming", 1, 60) is False  # add goes to the shared tier
    assert KEY + ":warming" not in cache.local
    cache.delete(KEY)
    assert KEY not in cache.local and caches["default"].get(KEY) is None


def test_lru_is_reset_when_settings_change(settings, tiny_vae_dir):
    cache = get_cache()
    cache.set(KEY, b"abc", 60)
    assert tiers.local_cache().get(KEY) == b"abc"
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, LOCAL_CACHE_BYTES=1234)
    assert tiers.local_cache().get(KEY) is None
    assert tiers.local_cache().max_bytes == 1234
    with override_settings(
        CACHES={"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}}
    ):
        assert len(tiers.local_cache()) == 0


@pytest.mark.django_db
def test_a_reencoded_row_never_gets_the_old_picture_from_the_lru(png_bytes):
    """Regression guard for the LRU: a new upload has a new digest, so a new key."""
    from tests.tiny import image_bytes, make_test_image

    photo = Photo.objects.create(title="lru", image=png_bytes)
    encode_now(photo)
    first = photo.image.decoded_bytes(decoder="rgb")
    photo.image = image_bytes(make_test_image(40, 24, seed=9), "PNG")
    photo.save()
    encode_now(photo)
    second = photo.image.decoded_bytes(decoder="rgb")
    assert second != first
    assert len(tiers.local_cache()) == 2


# --- latentstore.cache.RedisCache --------------------------------------------------------------


@requires_redis
def test_redis_backend_round_trips_values_without_pickle():
    cache = caches["latents-redis"]
    cache.set("bytes", b"\x80\x04picture")  # looks like a pickle header: stored as bytes
    cache.set("text", "héllo")
    cache.set("number", 41)
    cache.set("json", {"a": [1, 2.5, None]})
    assert cache.get("bytes") == b"\x80\x04picture"
    assert cache.get("text") == "héllo"
    assert cache.incr("number") == 42 and cache.get("number") == 42
    assert cache.get("json") == {"a": [1, 2.5, None]}
    assert cache.get_many(["bytes", "text", "nope"]) == {
        "bytes": b"\x80\x04picture",
        "text": "héllo",
    }
    raw = cache._cache.get_client().get(cache.make_key("bytes"))
    assert raw == b"\x00b\x80\x04picture", "bytes are stored as they are"
    with pytest.raises(TypeError, match="never pickles"):
        cache.set("object", object())
    assert cache.add("lock", 1, 30) and not cache.add("lock", 1, 30)
    cache.delete_many(["bytes", "text", "number", "json", "lock"])


@requires_redis
def test_redis_backend_keeps_one_client_per_process():
    cache = caches["latents-redis"]
    first = cache._cache.get_client()
    assert cache._cache.get_client(write=True) is first
    seen = []
    thread = threading.Thread(
        target=lambda: seen.append(caches["latents-redis"]._cache.get_client())
    )
    thread.start()
    thread.join()
    assert seen == [first], "other threads share the client (and its connection pool)"


@requires_redis
def test_redis_backend_clear_deletes_only_its_own_keys():
    cache = caches["latents-redis"]
    other = cache._cache.get_client()
    other.set("lstest-not-ours", b"keep me", ex=60)
    cache.set("mine", b"go")
    cache.clear()
    assert cache.get("mine") is None
    assert other.get("lstest-not-ours") == b"keep me"
    other.delete("lstest-not-ours")


@requires_redis
@pytest.mark.django_db
def test_decode_cache_on_the_redis_backend(settings, tiny_vae_dir, png_bytes):
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, CACHE="latents-redis")
    photo = Photo.objects.create(title="r", image=png_bytes)
    encode_now(photo)
    data = photo.image.decoded_bytes(decoder="rgb", size=20)
    tiers.reset()  # a fresh process: only the shared tier has it
    assert photo.image.decoded_bytes(decoder="rgb", size=20) == data
    assert len(tiers.local_cache()) == 1
    caches["latents-redis"].clear()


def test_decoder_fingerprint_memo_follows_settings_and_expires(
    settings, tiny_vae_dir, other_vae_dir, monkeypatch
):
    from latentstore import decoding

    first = decoding.decoder_fingerprint("default", "default")
    assert decoding.decoder_fingerprint("default", "default") == first
    settings.LATENTSTORE = latentstore_config(other_vae_dir)
    # Weights replaced on disk under the same setting: seen once the memo expires (now).
    monkeypatch.setattr(decoding, "_FINGERPRINT_SECONDS", 0.0)
    second = decoding.decoder_fingerprint("default", "default")
    assert second != first, "a new setting builds a new backend: no stale fingerprint"
    weights = next(other_vae_dir.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        assert decoding.decoder_fingerprint("default", "default") != second
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))

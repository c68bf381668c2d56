"""Read paths for decoded pictures, measured side by side in one run.

    python bench/cache_bench.py [--redis redis://127.0.0.1:6379/13] [--rounds 15] [--ops 300]

Prints, per payload (a 256² WebP thumbnail and a 512² PNG, as the decode cache holds them):

* a raw ``GET`` on a persistent redis-py client (the floor for any Redis cache),
* Django's ``RedisCache.get`` (builds a client per call, unpickles),
* ``latentstore.cache.RedisCache.get`` (the shared tier: one client per process, no pickle),
* a per-process LRU hit (``TieredCache.get``),
* ``FileSystemStorage`` open + read of the same bytes,
* ``decode_bytes()`` end to end on an LRU hit (cache key, decoder fingerprint, lookup), for
  the rgb decoder and the VAE decoder (whose fingerprint stats the weights files),

and the instant latent→RGB preview of a 512² image at 256². Each method runs ``--ops``
operations per round; rounds interleave the methods so machine load hits them alike; the median
round is reported. Needs Redis; writes only keys under a random prefix and deletes them.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import sd_blob  # noqa: E402  (after the path insert)


def setup_django(redis_url: str, var: str) -> str:
    import django
    from django.conf import settings

    prefix = f"lsbench-{uuid.uuid4().hex[:8]}"
    settings.configure(
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "latentstore",
            "project.apps.DemoConfig",
        ],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        CACHES={
            "django": {
                "BACKEND": "django.core.cache.backends.redis.RedisCache",
                "LOCATION": redis_url,
                "KEY_PREFIX": prefix + "-django",
            },
            "default": {
                "BACKEND": "latentstore.cache.RedisCache",
                "LOCATION": redis_url,
                "KEY_PREFIX": prefix,
            },
        },
        LATENTSTORE={
            "AUTOENCODERS": {
                "default": {"PRETRAINED": os.path.join(var, "vae"), "FAMILY": "sd"},
            },
            "CACHE": "default",
        },
        CELERY_BROKER_URL="memory://",
        USE_TZ=True,
    )
    django.setup()
    return prefix


def picture(size: int, fmt: str) -> bytes:
    """A natural photo (scikit-image's astronaut when installed) as the cache would hold it."""
    from PIL import Image

    from latentstore.decoding import picture_bytes

    try:
        from skimage import data

        img = Image.fromarray(data.astronaut())
    except ImportError:
        img = Image.radial_gradient("L").convert("RGB")
    return picture_bytes(img.resize((size, size), Image.Resampling.LANCZOS), fmt)


def timed(fn, ops: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(ops):
        fn()
    return (time.perf_counter_ns() - start) / ops / 1000.0  # µs per op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--ops", type=int, default=300)
    args = parser.parse_args()

    var = tempfile.mkdtemp(prefix="lsbench-")
    # A save_pretrained-like directory: the VAE decoder's fingerprint stats these files.
    os.makedirs(os.path.join(var, "vae"))
    for name, size in (("config.json", 800), ("diffusion_pytorch_model.safetensors", 1 << 20)):
        with open(os.path.join(var, "vae", name), "wb") as fh:
            fh.write(b"\0" * size)
    setup_django(args.redis, var)

    import numpy as np
    import redis
    from django.core.cache import caches
    from django.core.files.storage import FileSystemStorage

    from latentstore import cache as tiers
    from latentstore.cache import get_cache
    from latentstore.cache import picture_key as cache_key
    from latentstore.decoding import decode_bytes, key_for
    from latentstore.latents import blob_digest
    from latentstore.preview import latents_to_rgb
    from project.models import Photo

    raw = redis.Redis.from_url(args.redis)
    django_cache, ours = caches["django"], caches["default"]
    storage = FileSystemStorage(location=os.path.join(var, "media"))
    tiered = get_cache()

    z = np.random.default_rng(0).normal(size=(4, 64, 64)).astype("float32")
    blob = sd_blob(z, 512, 512)
    photo = Photo(
        pk=1,
        title="bench",
        image_state="ready",
        image_digest=blob_digest(blob),
        image_width=512,
        image_height=512,
        image_autoencoder="default",
    )
    photo.__dict__["image"] = photo._meta.get_field("image").from_db_value(blob, None, None)

    print(f"{time.strftime('%Y-%m-%d')}  {os.cpu_count()} CPUs  Python {sys.version.split()[0]}")
    print(f"redis {args.redis}; {args.rounds} rounds x {args.ops} ops; median round, µs per op\n")

    payloads = {
        "256² WebP": ("WEBP", 256, picture(256, "WEBP")),
        "512² PNG": ("PNG", 512, picture(512, "PNG")),
    }
    for label, (fmt, size, data) in payloads.items():
        key = cache_key(photo.image.digest, "bench", "0123456789abcdef", (size, size), fmt)
        raw_key = f"lsbench-raw-{uuid.uuid4().hex}"
        raw.set(raw_key, data)
        django_cache.set(key, data)
        ours.set(key, data)
        tiers.local_cache().set(key, data)
        name = storage.save(f"{uuid.uuid4().hex}.{fmt.lower()}", io.BytesIO(data))
        decode_bytes(photo.image, "rgb", size=size, format=fmt)  # cached in both tiers now
        # The default (VAE) decoder's picture, put in place so that no model is needed.
        tiered.set(key_for(photo.image, "default", size, fmt)[0], data)
        assert raw.get(raw_key) == django_cache.get(key) == ours.get(key) == tiered.get(key)

        def fs_read(name=name):
            with storage.open(name, "rb") as fh:
                return fh.read()

        methods = {
            "raw redis-py GET (persistent client)": lambda raw_key=raw_key: raw.get(raw_key),
            "Django RedisCache.get": lambda key=key: django_cache.get(key),
            "latentstore RedisCache.get (shared tier)": lambda key=key: ours.get(key),
            "LRU hit (TieredCache.get)": lambda key=key: tiered.get(key),
            "FileSystemStorage open+read": fs_read,
            "decode_bytes() LRU hit, rgb decoder": lambda size=size, fmt=fmt: decode_bytes(
                photo.image, "rgb", size=size, format=fmt
            ),
            "decode_bytes() LRU hit, VAE decoder": lambda size=size, fmt=fmt: decode_bytes(
                photo.image, "default", size=size, format=fmt
            ),
        }
        rounds: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(args.rounds):
            for method, fn in methods.items():
                rounds[method].append(timed(fn, args.ops))
        med = {m: statistics.median(v) for m, v in rounds.items()}
        base_raw = med["raw redis-py GET (persistent client)"]
        base_fs = med["FileSystemStorage open+read"]
        print(f"{label}: {len(data):,} bytes")
        for method, value in med.items():
            ratio = f"{value / base_raw:5.2f}x raw GET" if "LRU" not in method else ""
            if "LRU" in method or "decode_bytes" in method:
                ratio = f"{value / base_fs:5.2f}x FS read"
            print(f"  {method:44s} {value:9.1f} µs   {ratio}")
        print()
        raw.delete(raw_key)
        django_cache.delete(key)  # (its clear() would flush the whole Redis database)
        storage.delete(name)

    # The instant preview: latents of a 512² picture projected to a 256² RGB image.
    header = photo.image.header
    rounds = {"latents_to_rgb 4x64x64 -> 256²": [], "LatentImage.preview(256) (unpack+project)": []}
    for _ in range(args.rounds):
        rounds["latents_to_rgb 4x64x64 -> 256²"].append(
            timed(lambda: latents_to_rgb(z, "sd", header.scaling_factor, 0.0, (256, 256)), args.ops)
        )
        photo.image._unpacked = None
        rounds["LatentImage.preview(256) (unpack+project)"].append(
            timed(lambda: (setattr(photo.image, "_unpacked", None), photo.image.preview(256)), 100)
        )
    print("preview 512² -> 256²")
    for method, values in rounds.items():
        print(f"  {method:44s} {statistics.median(values) / 1000:9.3f} ms")

    ours.clear()  # every key under this run's prefix


if __name__ == "__main__":
    main()

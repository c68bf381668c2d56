"""Pictures for the load benchmark, and one of its uploading processes.

``python -m bench.serve_upload --wave kill --proc 0 --count 25 --out saved.json`` saves
``--count`` photos through the ORM (``Photo.objects.create``), one real picture each, and writes
``[{"pk": ..., "seconds": ..., "error": ...}, ...]`` to ``--out``. It reads its database and
broker from the environment that ``bench/serve_bench.py`` gives it (the broker through a TCP
proxy the benchmark can cut). No torch: it is a web-tier process.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import random
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Colour photos shipped with scikit-image.
SOURCES = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
)


@functools.cache
def _source(name: str):
    import skimage
    from PIL import Image

    with Image.open(Path(skimage.__file__).parent / "data" / name) as img:
        return img.convert("RGB")


def picture_png(seed: int, size: int) -> bytes:
    """A real photo (a random crop of a scikit-image sample, ``size`` square) as PNG bytes."""
    from PIL import Image, ImageOps

    rng = random.Random(seed)
    source = _source(SOURCES[seed % len(SOURCES)])
    side = rng.randint(min(source.size) // 3, min(source.size))
    left = rng.randint(0, source.width - side)
    top = rng.randint(0, source.height - side)
    crop = source.crop((left, top, left + side, top + side))
    picture = crop.resize((size, size), Image.Resampling.LANCZOS)
    if rng.random() < 0.5:
        picture = ImageOps.mirror(picture)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def upload(wave: str, proc: int, count: int, size: int, interval: float) -> list[dict]:
    """Save ``count`` photos titled ``<wave>-<proc>-<i>``, ``interval`` seconds apart."""
    from project.models import Photo

    seeds = [zlib.crc32(f"{wave}-{proc}-{i}".encode()) for i in range(count)]
    pictures = [picture_png(seed, size) for seed in seeds]
    saved = []
    for i, data in enumerate(pictures):
        started = time.perf_counter()
        try:
            photo = Photo.objects.create(title=f"{wave}-{proc}-{i}", image=data)
            saved.append({"pk": photo.pk, "seconds": time.perf_counter() - started, "error": ""})
        except Exception as exc:  # reported, never hidden: a save that raised saved nothing
            saved.append({"pk": None, "seconds": time.perf_counter() - started, "error": repr(exc)})
        time.sleep(interval)
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wave", required=True)
    parser.add_argument("--proc", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--interval", type=float, default=0.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.serve_settings")
    import django

    django.setup()
    saved = upload(args.wave, args.proc, args.count, args.size, args.interval)
    Path(args.out).write_text(json.dumps(saved))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The REST field against a plain CharField: serializing 5,000 ready rows, side by side.

    python bench/drf_bench.py [--rows 5000] [--repeat 7] [--width 1600 --height 1067]
                              [--sizes 1] [--sqlite]

Builds a throwaway database (PostgreSQL on 127.0.0.1 when reachable, else SQLite) holding
``--rows`` ready photos (latents packed with the codec, no model), lists them once without
their blobs, and serializes the list ``--repeat`` times with two serializers that differ in one
field: ``latentstore.rest_framework.LatentImageField`` (state, size, ``url``, an AVIF and a WebP
``srcset`` at the default widths, ``preview_url``: 12 URLs for a 1600 px photo, sharing one
signed token) and a plain ``CharField`` in its place. Every listing signs every row (nothing
is memoised between listings). It prints the medians and their ratio, and checks that
serializing ran no query (so no per-row query and no blob read) and loaded no torch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import reachable, sd_blob  # noqa: E402  (after the path insert)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1067)
    parser.add_argument(
        "--sizes", type=int, default=1, help="Distinct picture sizes among the rows."
    )
    parser.add_argument(
        "--sqlite", action="store_true", help="Use SQLite even if PostgreSQL is up."
    )
    args = parser.parse_args()

    var = tempfile.mkdtemp(prefix="lsbench-drf-")
    os.environ["LATENTSTORE_VAR_DIR"] = var
    os.environ["CELERY_BROKER_URL"] = "memory://"
    os.environ["DJANGO_DEBUG"] = "0"  # as in production: no SQL logging
    os.environ["DJANGO_ALLOWED_HOSTS"] = "testserver"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    use_pg = reachable(5432) and not args.sqlite
    if use_pg:
        os.environ["DATABASE_URL"] = "postgresql://postgres@127.0.0.1:5432/postgres"
    else:
        os.environ["DATABASE_URL"] = f"sqlite:///{var}/bench.sqlite3"

    import django

    django.setup()
    from django.db import connection

    test_name = f"lsbench_{uuid.uuid4().hex[:8]}"
    connection.settings_dict["TEST"]["NAME"] = test_name if use_pg else f"{var}/t.sqlite3"
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        run(args, use_pg)
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)


def make_ready_rows(count: int, width: int, height: int, sizes: int = 1) -> None:
    """``count`` ready photos of ``width`` x ``height`` in a few statements: latents of that
    size packed with the codec (int4, from no model; the bench never reads them), shared by all.
    With ``sizes`` > 1 widths and heights differ (``width + pk % sizes``, ``height + 7 pk %
    sizes``): that many distinct sizes."""
    import numpy as np
    from django.db.models import F
    from django.db.models.functions import Mod

    from latentstore.latents import blob_digest
    from project.models import Photo

    grid = (4, -(-height // 8), -(-width // 8))
    z = np.random.default_rng(0).normal(scale=5.0, size=grid).astype("float32")
    blob = sd_blob(z, width, height, dtype="int4")
    Photo.objects.bulk_create([Photo(title=f"photo {i}") for i in range(count)], batch_size=1000)
    Photo.objects.update(
        image=blob,
        image_state="ready",
        image_digest=blob_digest(blob),
        image_width=width,
        image_height=height,
        image_autoencoder="default",
    )
    if sizes > 1:
        Photo.objects.update(
            image_width=width + Mod(F("pk"), sizes), image_height=height + Mod(F("pk") * 7, sizes)
        )


def run(args: argparse.Namespace, use_pg: bool) -> None:
    from django.db import connection
    from django.test import RequestFactory
    from django.test.utils import CaptureQueriesContext
    from rest_framework import serializers
    from rest_framework.request import Request

    from latentstore.queries import without_blobs
    from latentstore.rest_framework import LatentImageField
    from project.models import Photo

    class WithField(serializers.ModelSerializer):
        image = LatentImageField(read_only=True)

        class Meta:
            model = Photo
            fields = ["id", "title", "image"]

    class WithCharField(serializers.ModelSerializer):
        image = serializers.CharField(read_only=True)

        class Meta:
            model = Photo
            fields = ["id", "title", "image"]

    start = time.perf_counter()
    make_ready_rows(args.rows, args.width, args.height, args.sizes)
    made = time.perf_counter() - start
    rows = list(without_blobs(Photo.objects.order_by("pk")))
    request = Request(RequestFactory().get("/api/photos/"))
    context = {"request": request}

    def serialize(cls: type) -> tuple[float, list]:
        begin = time.perf_counter()
        data = cls(rows, many=True, context=context).data
        return time.perf_counter() - begin, data

    serialize(WithField)  # imports, decoder fingerprints, URL prefix
    serialize(WithCharField)
    ours, plain = [], []
    for _ in range(args.repeat):  # alternating, so both see the same machine
        ours.append(serialize(WithField)[0])
        plain.append(serialize(WithCharField)[0])
    with CaptureQueriesContext(connection) as queries:
        _seconds, data = serialize(WithField)
    first = data[0]["image"]
    urls = len(first["srcset"]["avif"].split(", ")) + len(first["srcset"]["webp"].split(", ")) + 2

    db = "PostgreSQL" if use_pg else "SQLite"
    print(
        f"{time.strftime('%Y-%m-%d')}  {os.cpu_count()} CPUs  Python {sys.version.split()[0]}  {db}"
    )
    print(
        f"{args.rows} ready rows of {args.width}x{args.height} ({args.sizes} distinct sizes, "
        f"made in {made:.1f} s), serialized {args.repeat} times each; "
        f"{urls} URLs per row with the field, sharing one signed token:"
    )
    for label, values in (("LatentImageField", ours), ("CharField", plain)):
        median = statistics.median(values)
        print(
            f"  {label:17s} median {median * 1000:7.1f} ms  ({median / args.rows * 1e6:5.1f} µs "
            f"a row)   min {min(values) * 1000:7.1f} ms"
        )
    ratio = statistics.median(ours) / statistics.median(plain)
    print(f"  ratio of medians {ratio:.2f}x; {len(queries)} queries while serializing")
    print(f"torch imported: {'torch' in sys.modules}")
    assert not queries.captured_queries and "torch" not in sys.modules


if __name__ == "__main__":
    main()

"""latents_import: staging rate against a bare read-and-UPDATE loop, and peak memory vs rows.

    python bench/import_bench.py [--jpegs 2000] [--small 2000 20000] [--rounds 2]

Needs PostgreSQL on 127.0.0.1:5432 (a throw-away database is created and dropped) and Redis on
6379 (the encode messages go there under a throw-away prefix, deleted at the end; no worker
runs: the encode is not part of what is measured).

1. **Staging rate.** ``--jpegs`` JPEG files of about 100 KB in a FileSystemStorage, one per row
   of ``tests.testapp.Legacy`` (an ImageField ``old`` beside the LatentImageField ``image``).
   Side by side, ``--rounds`` times each: a bare loop that reads each file and UPDATEs a bytea
   column (pages of 100 rows, one transaction each), and ``latents_import`` itself (the command,
   in this process, default options: header check, pixel check, sha256, staging, import
   records, batch messages). Prints rows/s of each and the ratio (best round of each).
2. **Memory.** ``--small`` row counts of small PNG files; each import runs in a fresh process
   (``call_command("latents_import", ...)``) that resets its peak RSS once Django is set up and
   reports the import's high-water mark (``VmHWM``) over that baseline.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import reachable  # noqa: E402  (after the path insert)


def _environment(media: str, db: str | None, prefix: str) -> dict[str, str]:
    env = {
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DJANGO_DEBUG": "0",  # as in production: no query log
        "LATENTSTORE_TEST_MEDIA": media,
        "LATENTSTORE_TEST_KEYPREFIX": prefix,
        "LATENTSTORE_TEST_CONFIG": json.dumps({}),
    }
    if db:
        env["LATENTSTORE_TEST_DB_NAME"] = db
    return env


def _status_mib(key: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in MiB (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def child(args: argparse.Namespace) -> None:
    """Run one import in this fresh process; print its memory figures as JSON.

    The peak is reset once Django is set up (``/proc/self/clear_refs``), so ``peak`` is the
    import's own high-water mark. (``ru_maxrss`` would not do: Linux carries the parent's peak
    over fork and exec into it, so a child reports at least its parent's peak.)
    """
    import django

    django.setup()
    from django.core.management import call_command

    from latentstore import importing  # noqa: F401  (loaded before the baseline)

    setup_peak = _status_mib("VmHWM")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    baseline = _status_mib("VmRSS")
    start = time.perf_counter()
    out = io.StringIO()
    call_command(
        "latents_import",
        "testapp.Legacy.image",
        "--from",
        "old",
        "--limit",
        str(args.child),
        stdout=out,
    )
    seconds = time.perf_counter() - start
    result = {
        "baseline": baseline,
        "peak": _status_mib("VmHWM"),
        "setup_peak": setup_peak,
        "seconds": seconds,
        "out": out.getvalue(),
    }
    print(json.dumps(result))


def photo_jpeg(seed: int) -> bytes:
    """A ~100 KB JPEG: an 800x600 synthetic picture with sensor-like noise, quality 90."""
    import numpy as np
    from PIL import Image

    from tests.tiny import make_test_image

    base = np.asarray(make_test_image(800, 600, seed=seed)).astype("int16")
    noise = np.random.default_rng(seed).integers(-10, 11, base.shape)
    img = Image.fromarray((base + noise).clip(0, 255).astype("uint8"))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def small_png(seed: int) -> bytes:
    from tests.tiny import image_bytes, make_test_image

    return image_bytes(make_test_image(32, 24, seed=seed), "PNG")


def make_rows(media: Path, count: int, prefix: str, make, distinct: int = 64) -> None:
    """``count`` Legacy rows, each with its own file (``distinct`` different contents)."""
    from tests.testapp.models import Legacy

    contents = [make(i) for i in range(distinct)]
    folder = media / "legacy"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        name = f"legacy/{prefix}{i:06d}.{'jpg' if make is photo_jpeg else 'png'}"
        (media / name).write_bytes(contents[i % distinct])
        rows.append(Legacy(title=name, old=name))
    Legacy.objects.bulk_create(rows, batch_size=2000)


def reset_rows() -> None:
    from latentstore.models import ImportRecord
    from tests.testapp.models import Legacy

    Legacy.objects.update(
        image=None,
        image_state="empty",
        image_token=None,
        image_staged=None,
        image_width=None,
        image_height=None,
    )
    ImportRecord.objects.all().delete()


def bare_loop(batch: int = 100) -> float:
    """Read each file and UPDATE a bytea column, pages of ``batch`` rows per transaction."""
    from django.core.files.storage import default_storage
    from django.db import connection, transaction

    from tests.testapp.models import Legacy

    rows = list(Legacy.objects.order_by("pk").values_list("pk", "old"))
    start = time.perf_counter()
    for first in range(0, len(rows), batch):
        with transaction.atomic(), connection.cursor() as cursor:
            for pk, name in rows[first : first + batch]:
                with default_storage.open(name, "rb") as fh:
                    data = fh.read()
                cursor.execute(
                    "UPDATE testapp_legacy SET image_staged = %s WHERE id = %s", [data, pk]
                )
    return time.perf_counter() - start


def ours() -> float:
    from django.core.management import call_command

    start = time.perf_counter()
    call_command("latents_import", "testapp.Legacy.image", "--from", "old", stdout=io.StringIO())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jpegs", type=int, default=2000, help="rows for the staging rate")
    parser.add_argument("--small", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if not (reachable(5432) and reachable(6379)):
        sys.exit("needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379")

    media = Path(tempfile.mkdtemp(prefix="lsbench-import-"))
    prefix = f"lsbench-{uuid.uuid4().hex[:8]}:"
    os.environ.update(_environment(str(media), None, prefix))
    import django

    django.setup()
    from django.db import connection

    db = f"lsbench_import_{uuid.uuid4().hex[:8]}"
    connection.settings_dict["TEST"]["NAME"] = db
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        run(args, media, db, prefix)
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
        shutil.rmtree(media, ignore_errors=True)
        _drop_messages(prefix)


def run(args: argparse.Namespace, media: Path, db: str, prefix: str) -> None:
    from tests.testapp.models import Legacy

    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, PostgreSQL on 127.0.0.1")
    if args.jpegs:
        make_rows(media, args.jpegs, "j", photo_jpeg)
        sizes = [p.stat().st_size for p in (media / "legacy").iterdir()]
        mean_kb = sum(sizes) / len(sizes) / 1024
        print(
            f"\n1. Staging {args.jpegs} JPEG files (mean {mean_kb:.0f} KB) from FileSystemStorage"
        )
        bare_times, our_times = [], []
        for _ in range(args.rounds):
            bare_times.append(bare_loop())
            reset_rows()
            our_times.append(ours())
            assert Legacy.objects.filter(image_state="pending").count() == args.jpegs
            reset_rows()
        bare_rate = args.jpegs / min(bare_times)
        our_rate = args.jpegs / min(our_times)
        print(f"   bare read + UPDATE loop: {bare_rate:8.0f} rows/s")
        print(f"   latents_import:          {our_rate:8.0f} rows/s")
        print(f"   ratio (import / bare):   {our_rate / bare_rate:8.2f}  (target >= 0.5)")
        Legacy.objects.all().delete()
        shutil.rmtree(media / "legacy")

    if args.small:
        print("\n2. Peak RSS of the import (fresh process each, small PNG files)")
        make_rows(media, max(args.small), "s", small_png)
        env = {**os.environ, **_environment(str(media), db, prefix)}
        for count in sorted(args.small):
            reset_rows()
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(count)],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            if proc.returncode:
                sys.exit(proc.stdout + proc.stderr)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            assert f"imported {count}," in result["out"], result["out"]
            print(
                f"   {count:6d} rows: import peak RSS {result['peak']:6.1f} MiB "
                f"(+{result['peak'] - result['baseline']:5.1f} MiB over {result['baseline']:.1f} "
                f"after setup, whose own peak was {result['setup_peak']:.1f}), "
                f"{count / result['seconds']:.0f} rows/s"
            )


def _drop_messages(prefix: str) -> None:
    try:
        import redis

        client = redis.Redis.from_url("redis://127.0.0.1:6379/13")
        keys = list(client.scan_iter(f"{prefix}*"))
        if keys:
            client.delete(*keys)
    except Exception as exc:  # the benchmark's figures are printed already
        print(f"(could not delete the benchmark's messages under {prefix}: {exc})")


if __name__ == "__main__":
    main()

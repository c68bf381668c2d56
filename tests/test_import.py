"""latents_import: existing ImageField/FileField files into a LatentImageField.

Real PostgreSQL (the rows, the import records), Redis (the encode messages), a real worker where
rows must become ready, a real S3 HTTP server (moto's server mode) behind django-storages, and a
command process killed with SIGKILL.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from latentstore.importing import import_in_migration
from latentstore.models import ImportRecord
from tests.conftest import encode_pointers, latentstore_config, requires_postgres
from tests.corpus import BY_NAME
from tests.faults import WorkerProcess, wait_until
from tests.test_field import encode_now
from tests.testapp.models import Legacy, LegacyS3
from tests.tiny import image_bytes, make_test_image

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
TARGET = "testapp.Legacy.image"


def picture(seed: int, size: tuple[int, int] = (40, 24), fmt: str = "PNG") -> bytes:
    kwargs = {"quality": 90} if fmt == "JPEG" else {}
    return image_bytes(make_test_image(*size, seed=seed), fmt, **kwargs)


def put(name: str, data: bytes, storage=default_storage) -> str:
    """Save ``data`` under exactly ``name`` (replacing a file there)."""
    if storage.exists(name):
        storage.delete(name)
    saved = storage.save(name, ContentFile(data))
    assert saved == name
    return saved


def legacy(name: str = "", data: bytes | None = None, **fields) -> Legacy:
    """A Legacy row whose old field names ``name`` (a file with ``data`` when given)."""
    if data is not None:
        put(name, data)
    row = Legacy.objects.create(title=name, **fields)
    Legacy.objects.filter(pk=row.pk).update(old=name)
    row.refresh_from_db()
    return row


def run_import(*args: str) -> str:
    out = io.StringIO()
    call_command("latents_import", TARGET, "--from", "old", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def failing_import(*args: str) -> tuple[str, CommandError]:
    out = io.StringIO()
    with pytest.raises(CommandError) as info:
        call_command(
            "latents_import", TARGET, "--from", "old", *args, stdout=out, stderr=io.StringIO()
        )
    assert info.value.returncode == 1
    return out.getvalue(), info.value


def columns(pk) -> dict:
    return Legacy.objects.values(
        "old", "image_state", "image_token", "image_staged", "image_width", "image_height"
    ).get(pk=pk)


def untouched(pk) -> bool:
    row = columns(pk)
    return row["image_state"] == "empty" and row["image_token"] is None and not row["image_staged"]


def record(pk) -> ImportRecord:
    return ImportRecord.objects.get(model="testapp.Legacy", object_pk=str(pk), field="image")


# --- the mixed import -------------------------------------------------------------------------


@requires_postgres
def test_mixed_import_stages_good_files_and_lists_every_bad_one(
    settings, tiny_vae_dir, broker, worker_env, tmp_path
):
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, MAX_UPLOAD_BYTES=60_000)
    good = {
        legacy("legacy/a.png", picture(1)).pk: (40, 24),
        legacy("legacy/b.jpg", picture(2, (48, 32), "JPEG")).pk: (48, 32),
        legacy("legacy/rotated.jpg", BY_NAME["exif-rotated-jpeg"].data).pk: (32, 48),
    }
    default_storage.save("legacy/a-directory/x.png", ContentFile(picture(3)))
    bad = {
        legacy("legacy/gone.png").pk: "missing file",
        legacy("legacy/zero.png", b"").pk: "empty",
        legacy("legacy/text.jpg", BY_NAME["text-named-jpg"].data).pk: "not_an_image",
        legacy("legacy/cut.jpg", BY_NAME["truncated-jpeg"].data).pk: "truncated or corrupt",
        legacy("legacy/cut.png", BY_NAME["truncated-png"].data).pk: "truncated or corrupt",
        legacy("legacy/lying.png", BY_NAME["lying-png"].data).pk: "truncated or corrupt",
        legacy("legacy/bomb.png", BY_NAME["png-bomb"].data).pk: "too_large_pixels",
        legacy("legacy/big.bmp", image_bytes(make_test_image(160, 160), "BMP")).pk: "too large",
        legacy("legacy/a-directory").pk: "storage error: IsADirectoryError",
        legacy("../../outside.png").pk: "storage error: SuspiciousFileOperation",
    }
    no_source = legacy("").pk
    taken = Legacy.objects.create(title="uploaded through the new field", image=picture(9))
    Legacy.objects.filter(pk=taken.pk).update(old="legacy/a.png")  # shares a file, too
    report = tmp_path / "report.csv"

    out, error = failing_import("--report", str(report), "--batch-size", "4")

    assert f"imported {len(good)}" in out
    assert f"failed {len(bad)}" in out
    assert "skipped 1 (no source file)" in out
    assert "skipped 1 (holds another image (--replace imports over it))" in out
    assert f"{len(bad)} rows could not be imported" in str(error)
    with open(report, newline="") as fh:
        lines = list(csv.reader(fh))
    assert lines[0] == ["pk", "source", "reason"]
    listed = {int(pk): (source, reason) for pk, source, reason in lines[1:]}
    assert set(listed) == set(bad)
    for pk, why in bad.items():
        assert why in listed[pk][1], (pk, listed[pk])
        assert f"pk={pk} " in out  # in the summary too
        assert untouched(pk), pk  # the row is left as it was
    assert untouched(no_source)
    assert Legacy.objects.get(pk=taken.pk).image_token == taken.image_token
    assert not ImportRecord.objects.filter(object_pk__in=[str(p) for p in [*bad, taken.pk]])

    # The good rows were staged with a record each, and the real worker encodes them.
    for pk in good:
        row = columns(pk)
        assert record(pk).token == row["image_token"]
        assert bytes(row["image_staged"] or b"") in (b"", default_storage.open(row["old"]).read())
    with WorkerProcess(worker_env(), "import"):  # a real worker process encodes them
        wait_until(
            lambda: all(Legacy.objects.get(pk=pk).image.state == "ready" for pk in good),
            timeout=120,
            what="the worker to encode the imported rows",
        )
    for pk, size in good.items():
        image = Legacy.objects.get(pk=pk).image
        assert (image.width, image.height) == size
        assert image.decode().size == size
        assert default_storage.exists(Legacy.objects.get(pk=pk).old.name)  # never deleted


# --- reruns, dry runs -------------------------------------------------------------------------


def test_a_rerun_does_nothing(broker):
    pks = [legacy(f"legacy/r{i}.png", picture(i)).pk for i in range(5)]
    first = run_import("--batch-size", "2")
    assert "imported 5, failed 0" in first
    sent = encode_pointers(broker("latents.encode"))
    assert sorted(p[1] for p in sent) == sorted(pks)
    tokens = {pk: columns(pk)["image_token"] for pk in pks}
    assert {str(p[3]) for p in sent} == {str(t) for t in tokens.values()}
    encode_now(Legacy.objects.get(pk=pks[0]))  # one row ready meanwhile, the others pending

    again = run_import()

    assert "imported 0, skipped 5 (already imported), failed 0" in again
    assert broker("latents.encode") == []  # nothing sent
    assert {pk: columns(pk)["image_token"] for pk in pks} == tokens  # nothing staged again
    assert ImportRecord.objects.count() == 5


def test_a_changed_source_or_another_image_is_replaced_only_when_asked(broker):
    row = legacy("legacy/c.png", picture(1))
    other = Legacy.objects.create(title="new upload", image=picture(2))
    Legacy.objects.filter(pk=other.pk).update(old="legacy/c.png")
    run_import()
    token = columns(row.pk)["image_token"]
    put("legacy/c.png", picture(3, (56, 40)))  # the site changed the old file since

    out = run_import()
    assert "skipped 1 (holds another image (--replace imports over it))" in out
    assert "skipped 1 (source changed since it was imported" in out
    assert columns(row.pk)["image_token"] == token

    out = run_import("--replace")
    assert "imported 2" in out
    assert columns(row.pk)["image_token"] != token
    assert (columns(row.pk)["image_width"], columns(row.pk)["image_height"]) == (56, 40)
    assert columns(other.pk)["image_width"] == 56
    assert record(other.pk).token == columns(other.pk)["image_token"]


def test_a_failed_import_is_imported_again_by_a_rerun(broker):
    row = legacy("legacy/f.png", picture(1))
    run_import()
    token = columns(row.pk)["image_token"]
    Legacy.objects.filter(pk=row.pk).update(image_state="failed", image_error="worker died")
    out = run_import()
    assert "imported 1" in out
    assert columns(row.pk)["image_state"] == "pending"
    assert columns(row.pk)["image_token"] != token


def test_dry_run_reports_and_changes_nothing(broker, tmp_path):
    good = [legacy(f"legacy/d{i}.png", picture(i)).pk for i in range(3)]
    gone = legacy("legacy/nothing-here.png").pk
    report = tmp_path / "dry.csv"

    out, _error = failing_import("--dry-run", "--report", str(report))

    assert "would import 3" in out and "failed 1" in out
    assert f"pk={gone} legacy/nothing-here.png: missing file" in out
    assert report.read_text().splitlines()[1] == f"{gone},legacy/nothing-here.png,missing file"
    assert all(untouched(pk) for pk in [*good, gone])
    assert not ImportRecord.objects.exists()
    assert broker("latents.encode") == []


def test_limit_ids_and_after(broker):
    pks = [legacy(f"legacy/l{i}.png", picture(i)).pk for i in range(6)]
    assert "imported 2" in run_import("--limit", "2", "--batch-size", "1")
    assert [untouched(pk) for pk in pks] == [False, False, True, True, True, True]
    assert "imported 1," in run_import("--ids", str(pks[5]))
    assert "imported 1," in run_import("--after", str(pks[2]), "--limit", "1")
    assert [untouched(pk) for pk in pks] == [False, False, True, False, True, False]
    out = run_import()
    assert "imported 2, skipped 4 (already imported)" in out


def test_arguments_are_checked():
    with pytest.raises(CommandError, match="no field 'nope'"):
        call_command("latents_import", TARGET, "--from", "nope", stdout=io.StringIO())
    with pytest.raises(CommandError, match="is not an ImageField or FileField"):
        call_command("latents_import", TARGET, "--from", "title", stdout=io.StringIO())
    with pytest.raises(CommandError, match="is not a LatentImageField"):
        call_command("latents_import", "testapp.Legacy.old", "--from", "old", stdout=io.StringIO())
    with pytest.raises(CommandError, match="app_label.Model.field"):
        call_command("latents_import", "--from", "old", stdout=io.StringIO())
    out = io.StringIO()
    call_command(
        "latents_import", "--model", "testapp.Legacy", "--from", "old", "--dry-run", stdout=out
    )
    assert "would import 0" in out.getvalue()


# --- a killed run -----------------------------------------------------------------------------


@requires_postgres
def test_a_killed_run_resumes_with_every_row_imported_exactly_once(broker, worker_env):
    data = picture(7, (64, 48), "JPEG")
    count = 1000
    for i in range(count):
        put(f"legacy/k{i}.jpg", data)
    Legacy.objects.bulk_create(
        [Legacy(title=f"k{i}", old=f"legacy/k{i}.jpg") for i in range(count)]
    )
    cmd = [
        sys.executable,
        "manage.py",
        "latents_import",
        TARGET,
        "--from",
        "old",
        "--batch-size",
        "5",
        "--threads",
        "1",
    ]
    env = worker_env(LATENTSTORE_TEST_MEDIA=default_storage.location)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_until(
            lambda: ImportRecord.objects.count() >= 20 or proc.poll() is not None,
            timeout=120,
            interval=0.005,
            what="the import to get going",
        )
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    done = ImportRecord.objects.count()
    assert 0 < done < count
    # Each committed page staged its rows and wrote their records in one transaction.
    pending = Legacy.objects.filter(image_state="pending")
    assert pending.count() == done
    first_tokens = dict(pending.values_list("pk", "image_token"))
    assert first_tokens == {int(r.object_pk): r.token for r in ImportRecord.objects.all()}

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)

    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"imported {count - done}, skipped {done} (already imported), failed 0" in rerun.stdout
    assert ImportRecord.objects.count() == count
    rows = dict(Legacy.objects.values_list("pk", "image_token"))
    records = {int(r.object_pk): r.token for r in ImportRecord.objects.all()}
    assert rows == records  # every row staged, and by exactly one import
    assert all(rows[pk] == token for pk, token in first_tokens.items())  # none staged twice
    # The encodes of the rerun's rows were sent; the killed run's may be lost with it (the
    # sweeper re-sends those: they are pending in the database).
    sent = {p[1] for p in encode_pointers(broker("latents.encode", timeout=2))}
    assert set(rows) - set(first_tokens) <= sent


# --- deleting sources -------------------------------------------------------------------------


def test_delete_source_only_after_ready_and_never_a_shared_file(broker):
    alone = legacy("legacy/alone.png", picture(1))
    twin_a = legacy("legacy/twin.png", picture(2))
    twin_b = legacy("legacy/twin.png")
    attached = legacy("legacy/attached.png", picture(3))
    legacy("", attachment="legacy/attached.png")  # another field of another row holds it
    changed = legacy("legacy/changed.png", picture(4))
    run_import()

    out = run_import("--delete-source", "--no-import")
    assert "deleted 0 source files, kept 5 (not ready yet)" in out
    for name in ("alone", "twin", "attached", "changed"):
        assert default_storage.exists(f"legacy/{name}.png")

    for row in (alone, twin_a, twin_b, attached, changed):
        encode_now(Legacy.objects.get(pk=row.pk))  # (the task fills its batch with the others)
        assert Legacy.objects.get(pk=row.pk).image.state == "ready"
    late = legacy("legacy/late.png", picture(5))
    assert "imported 1," in run_import()
    put("legacy/changed.png", picture(6))
    dry = run_import("--delete-source", "--no-import", "--dry-run")
    assert "would delete 1 source files" in dry
    assert default_storage.exists("legacy/alone.png")

    out = run_import("--delete-source", "--no-import")

    assert "deleted 1 source files" in out
    assert "kept 3 (shared with another row)" in out
    assert "kept 1 (source changed since it was imported)" in out
    assert "kept 1 (not ready yet)" in out
    assert not default_storage.exists("legacy/alone.png")
    assert Legacy.objects.get(pk=alone.pk).old.name == ""  # no row points at a deleted file
    for name in ("twin", "attached", "changed", "late"):
        assert default_storage.exists(f"legacy/{name}.png"), name
    assert Legacy.objects.get(pk=late.pk).old.name == "legacy/late.png"
    # A re-encode or a new upload since the import: its source is not the row's picture any more.
    encode_now(Legacy.objects.get(pk=late.pk))
    Legacy.objects.filter(pk=late.pk).update(image_token=None)
    out = run_import("--delete-source", "--no-import")
    assert "deleted 0" in out and "kept 1 (staged again since the import" in out
    assert default_storage.exists("legacy/late.png")


def test_delete_source_waits_for_the_quality_gate(settings, tiny_vae_dir, broker):
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, QUALITY_CHECK=True, MIN_PSNR=99.0)
    row = legacy("legacy/q.png", picture(1))
    out = run_import("--delete-source")  # import and delete in one run: nothing ready yet
    assert "imported 1" in out and "kept 1 (not ready yet)" in out
    encode_now(Legacy.objects.get(pk=row.pk))
    image = Legacy.objects.get(pk=row.pk).image
    assert image.state == "ready" and image.psnr is not None and image.psnr < 99

    out = run_import("--delete-source", "--no-import")
    assert "kept 1 (below the quality gate)" in out
    assert default_storage.exists("legacy/q.png")

    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, QUALITY_CHECK=True, MIN_PSNR=1.0)
    out = run_import("--delete-source", "--no-import")
    assert "deleted 1 source files" in out
    assert not default_storage.exists("legacy/q.png")


# --- S3 ---------------------------------------------------------------------------------------


def test_s3_round_trip(settings, tiny_vae_dir, s3_server, broker, tmp_path):
    """Import from S3, keep the originals on S3, export both kinds to S3, delete the sources."""
    from django.core.files.storage import storages

    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, ORIGINALS_STORAGE="s3")
    bucket = settings.STORAGES["s3"]["OPTIONS"]["bucket_name"]
    s3 = storages["s3"]
    pictures = {f"legacy/s3-{i}.png": picture(20 + i, (40 + 8 * i, 24)) for i in range(3)}
    rows = {}
    for name, data in pictures.items():
        put(name, data, storage=s3)
        row = LegacyS3.objects.create()
        LegacyS3.objects.filter(pk=row.pk).update(old=name)
        rows[row.pk] = name
    missing = LegacyS3.objects.create()
    LegacyS3.objects.filter(pk=missing.pk).update(old="legacy/not-on-s3.png")

    out = io.StringIO()
    with pytest.raises(CommandError):
        call_command("latents_import", "testapp.LegacyS3.image", "--from", "old", stdout=out)
    assert "imported 3" in out.getvalue()
    assert f"pk={missing.pk} legacy/not-on-s3.png: missing file" in out.getvalue()
    for pk, name in rows.items():
        encode_now(LegacyS3.objects.get(pk=pk))
        image = LegacyS3.objects.get(pk=pk).image
        assert image.state == "ready" and image.has_original
        assert image.original_bytes() == pictures[name]  # read back from S3
        key = LegacyS3.objects.values_list("image_original", flat=True).get(pk=pk)
        assert s3_server.head_object(Bucket=bucket, Key=key)["ContentLength"] == len(pictures[name])

    for kind in ("original", "decoded"):
        out = io.StringIO()
        call_command(
            "latents_export_images",
            "testapp.LegacyS3.image",
            "--to",
            "s3",
            "--kind",
            kind,
            stdout=out,
        )
        assert "exported 3 " in out.getvalue()
    manifest = s3_server.get_object(Bucket=bucket, Key="testapp.legacys3/image/manifest.csv")
    lines = list(csv.DictReader(io.StringIO(manifest["Body"].read().decode())))
    assert len(lines) == 6
    from PIL import Image

    for line in lines:
        body = s3_server.get_object(Bucket=bucket, Key=line["path"])["Body"].read()
        pk = int(line["pk"])
        if line["kind"] == "original":
            assert body == pictures[rows[pk]]
        else:
            with Image.open(io.BytesIO(body)) as img:
                assert img.format == "PNG"
                assert img.size == (int(line["width"]), int(line["height"]))
                assert img.size == Image.open(io.BytesIO(pictures[rows[pk]])).size

    out = io.StringIO()
    call_command(
        "latents_import",
        "testapp.LegacyS3.image",
        "--from",
        "old",
        "--delete-source",
        "--no-import",
        stdout=out,
    )
    assert "deleted 3 source files" in out.getvalue()
    for name in pictures:
        assert not s3.exists(name)


# --- inside a migration -----------------------------------------------------------------------


def test_import_in_migration_uses_the_historical_models(broker):
    rows = [legacy(f"legacy/m{i}.png", picture(i)).pk for i in range(3)]
    gone = legacy("legacy/m-gone.png").pk
    executor = MigrationExecutor(connection)
    state = executor.loader.project_state(
        [("testapp", "0003_legacy"), ("latentstore", "0001_initial")]
    )
    forwards = import_in_migration("testapp", "Legacy", "image", source="old")
    with connection.schema_editor() as editor:
        forwards(state.apps, editor)
    assert all(columns(pk)["image_state"] == "pending" for pk in rows)
    assert untouched(gone)
    assert {p[1] for p in encode_pointers(broker("latents.encode"))} == set(rows)
    assert ImportRecord.objects.count() == 3

    strict = import_in_migration("testapp", "Legacy", "image", source="old", strict=True)
    with pytest.raises(RuntimeError, match=f"pk={gone} legacy/m-gone.png: missing file"):
        with connection.schema_editor() as editor:
            strict(state.apps, editor)


@requires_postgres
def test_the_progress_bar_and_summary_on_a_terminal(broker, worker_env):
    """On a terminal the command draws a tqdm bar (shared with the other commands)."""
    import pty
    import select

    for i in range(3):
        legacy(f"legacy/t{i}.png", picture(i))
    env = worker_env(LATENTSTORE_TEST_MEDIA=default_storage.location)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "latents_import", TARGET, "--from", "old"],
        cwd=ROOT,
        env=env,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(leader)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "3/3" in text and "testapp.Legacy.image <- old" in text
    assert "imported 3, failed 0" in text

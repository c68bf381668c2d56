"""latents_export_images: kept originals or decoded pictures out, with a manifest; resumable."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from PIL import Image

from tests.conftest import latentstore_config
from tests.test_field import encode_now
from tests.testapp.models import Legacy
from tests.tiny import image_bytes, make_test_image

pytestmark = pytest.mark.django_db(transaction=True)

TARGET = "testapp.Legacy.image"


def export(*args: str) -> str:
    out = io.StringIO()
    call_command("latents_export_images", TARGET, *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def failing_export(*args: str) -> tuple[str, CommandError]:
    out = io.StringIO()
    with pytest.raises(CommandError) as info:
        call_command("latents_export_images", TARGET, *args, stdout=out, stderr=io.StringIO())
    assert info.value.returncode == 1
    return out.getvalue(), info.value


def manifest(root: Path) -> list[dict]:
    with open(root / "testapp.legacy" / "image" / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def keep_originals(settings, tiny_vae_dir):
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, KEEP_ORIGINAL=True)


def ready_rows(count: int, fmt: str = "JPEG") -> dict[int, bytes]:
    """``count`` encoded rows; pk -> the uploaded file."""
    made = {}
    for i in range(count):
        kwargs = {"quality": 90} if fmt == "JPEG" else {}
        data = image_bytes(make_test_image(40 + 8 * i, 24, seed=i), fmt, **kwargs)
        row = Legacy.objects.create(title=f"e{i}", image=data)
        encode_now(row)
        assert row.image.state == "ready", row.image.error
        made[row.pk] = data
    return made


def test_export_originals_byte_for_byte_with_a_manifest(keep_originals, broker, tmp_path):
    rows = ready_rows(3)
    pending = Legacy.objects.create(title="not encoded yet", image=next(iter(rows.values())))
    Legacy.objects.filter(pk=pending.pk).update(image_state="pending")

    out = export("--to", str(tmp_path), "--kind", "original")

    assert f"exported 3 kept originals of {TARGET} to {tmp_path}" in out
    lines = manifest(tmp_path)
    assert [line["pk"] for line in lines] == [str(pk) for pk in rows]
    for line in lines:
        pk = int(line["pk"])
        row = Legacy.objects.get(pk=pk)
        assert line["kind"] == "original"
        assert line["path"] == f"testapp.legacy/image/original/{pk}.jpg"
        assert (tmp_path / line["path"]).read_bytes() == rows[pk]
        assert (int(line["width"]), int(line["height"])) == (row.image.width, row.image.height)
        assert line["digest"] == row.image.digest and len(line["digest"]) > 10


def test_export_decoded_in_each_format_and_resume(broker, tmp_path):
    rows = ready_rows(4, fmt="PNG")

    out = export("--to", str(tmp_path), "--limit", "2", "--batch-size", "1")
    assert "exported 2 decoded pictures (png)" in out
    assert len(manifest(tmp_path)) == 2

    out = export("--to", str(tmp_path))  # resumes: the first two are in the manifest
    assert "exported 2 decoded pictures (png)" in out and "skipped 2 (already exported)" in out
    lines = manifest(tmp_path)
    assert sorted(int(line["pk"]) for line in lines) == sorted(rows)
    for line in lines:
        row = Legacy.objects.get(pk=int(line["pk"]))
        with Image.open(tmp_path / line["path"]) as img:
            assert img.format == "PNG"
            assert img.size == (row.image.width, row.image.height)
            # The file is the field's own decode, byte for byte.
            assert (tmp_path / line["path"]).read_bytes() == row.image.decoded_bytes()

    assert "exported 0" in export("--to", str(tmp_path))  # nothing left

    # A row encoded again has new latents: exported again, its manifest line replaced.
    first = next(iter(rows))
    row = Legacy.objects.get(pk=first)
    row.image = image_bytes(make_test_image(64, 64, seed=99), "PNG")
    row.save()
    encode_now(row)
    out = export("--to", str(tmp_path))
    assert "exported 1 " in out and "skipped 3 (already exported)" in out
    lines = manifest(tmp_path)
    assert len(lines) == 4  # compacted: one line per row and kind
    line = next(x for x in lines if int(x["pk"]) == first)
    assert (line["width"], line["height"]) == ("64", "64")
    assert line["digest"] == Legacy.objects.get(pk=first).image.digest

    for fmt, pil in (("webp", "WEBP"), ("jpeg", "JPEG")):
        other = tmp_path / fmt
        out = export("--to", str(other), "--format", fmt, "--size", "16")
        assert f"exported 4 decoded pictures ({fmt})" in out
        for line in manifest(other):
            with Image.open(other / line["path"]) as img:
                assert img.format == pil
                assert max(img.size) == 16
                assert img.size == (int(line["width"]), int(line["height"]))


def test_both_kinds_share_one_manifest_and_rows_without_originals_are_reported(
    settings, tiny_vae_dir, broker, tmp_path
):
    with_original = ready_rows(1)  # KEEP_ORIGINAL is off: none kept
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, KEEP_ORIGINAL=True)
    kept = ready_rows(1)

    out, error = failing_export("--to", str(tmp_path), "--kind", "original")
    assert "exported 1 kept originals" in out and "skipped 1 (no kept original)" in out
    assert "1 rows have no kept original (export them with --kind decoded)" in str(error)
    export("--to", str(tmp_path), "--kind", "decoded", "--format", "webp")
    lines = manifest(tmp_path)
    assert sorted((line["pk"], line["kind"]) for line in lines) == sorted(
        [(str(pk), "decoded") for pk in [*with_original, *kept]] + [(str(*kept), "original")]
    )


def test_dry_run_writes_nothing_and_arguments_are_checked(keep_originals, broker, tmp_path):
    ready_rows(2)
    out = export("--to", str(tmp_path / "dry"), "--dry-run")
    assert "would export 2 decoded pictures (png)" in out
    assert not list((tmp_path / "dry").iterdir())
    with pytest.raises(CommandError, match="for --kind decoded"):
        export("--to", str(tmp_path), "--kind", "original", "--format", "png")
    with pytest.raises(CommandError, match="Unsupported format"):
        export("--to", str(tmp_path), "--format", "gif")
    with pytest.raises(CommandError, match="is not a LatentImageField"):
        call_command("latents_export_images", "testapp.Legacy.old", "--to", str(tmp_path))


def test_a_lost_kept_original_is_listed_and_the_others_exported(keep_originals, broker, tmp_path):
    from latentstore.staging import originals_storage

    rows = ready_rows(3)
    lost = list(rows)[1]
    originals_storage().delete(Legacy.objects.get(pk=lost).image_original)

    out, error = failing_export("--to", str(tmp_path), "--kind", "original")

    assert "exported 2 kept originals" in out and "failed 1" in out
    assert f"pk={lost}: FileNotFoundError" in out
    assert "1 rows could not be exported" in str(error)
    assert sorted(int(line["pk"]) for line in manifest(tmp_path)) == sorted(set(rows) - {lost})
    # A rerun exports nothing again, and still reports the lost one.
    out, _error = failing_export("--to", str(tmp_path), "--kind", "original")
    assert "exported 0" in out and "skipped 2 (already exported)" in out and "failed 1" in out

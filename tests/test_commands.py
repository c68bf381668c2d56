"""The latents_* management commands, run against real rows, a real broker and real workers."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from latentstore.decoders import decoders
from latentstore.decoding import get_cache, key_for
from project.models import Photo
from tests.conftest import broker_unreachable, encode_pointers, latentstore_config
from tests.rows import make_rows
from tests.test_field import encode_now
from tests.test_protocol import wait_for
from tests.testapp.models import Item
from tests.tiny import image_bytes, make_test_image

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def fails(*args: str) -> tuple[str, CommandError]:
    out = io.StringIO()
    with pytest.raises(CommandError) as info:
        call_command(*args, stdout=out, stderr=io.StringIO())
    assert info.value.returncode == 1
    return out.getvalue(), info.value


def encode_args(broker) -> list[list]:
    return encode_pointers(broker("latents.encode"))


@pytest.fixture
def two_autoencoders(settings, tiny_vae_dir, other_vae_dir):
    config = latentstore_config(tiny_vae_dir, KEEP_ORIGINAL=True)
    config["AUTOENCODERS"]["other"] = {**config["AUTOENCODERS"]["default"]}
    config["AUTOENCODERS"]["other"]["PRETRAINED"] = str(other_vae_dir)
    settings.LATENTSTORE = config
    return config


def photos(count: int, seed: int = 0) -> list[Photo]:
    made = []
    for i in range(count):
        photo = Photo.objects.create(
            title=f"c{i}", image=image_bytes(make_test_image(40, 24, seed=seed + i), "PNG")
        )
        encode_now(photo)
        assert photo.image.state == "ready", photo.image.error
        made.append(photo)
    return made


# --- --model / --field ---------------------------------------------------------------------------


def test_model_and_field_are_checked():
    with pytest.raises(CommandError, match="Unknown model 'demo.Nope'"):
        call_command("latents_status", "--model", "demo.Nope", "--no-queues", stdout=io.StringIO())
    with pytest.raises(CommandError, match="has no field 'title2'"):
        call_command("latents_retry", "--model", "demo.Photo", "--field", "title2")
    with pytest.raises(CommandError, match="is not a LatentImageField"):
        call_command("latents_retry", "--model", "demo.Photo", "--field", "title")


# --- latents_status ---


def test_status_counts_rows_oldest_pending_and_queue_depth(broker):
    make_rows(3)
    pending = make_rows(2, "pending", start=3)
    make_rows(1, "failed", start=5)
    Photo.objects.filter(pk=pending[0]).update(image_changed=timezone.now() - timedelta(hours=2))
    broker("latents.encode")
    Item.objects.create(name="i", picture=image_bytes(make_test_image(16, 16), "PNG"))
    from latentstore.encoding import enqueue_encode_batch

    enqueue_encode_batch(
        "demo.Photo", "image", [(pk, "00000000-0000-0000-0000-000000000000") for pk in pending]
    )

    report = json.loads(run("latents_status", "--json"))
    rows = {
        (r["model"], r["field"], r["state"], r["autoencoder"]): r["rows"] for r in report["rows"]
    }
    assert rows[("demo.Photo", "image", "ready", "default")] == 3
    assert rows[("demo.Photo", "image", "pending", "-")] == 2
    assert rows[("demo.Photo", "image", "failed", "-")] == 1
    assert rows[("testapp.Item", "picture", "pending", "default")] == 1
    oldest = {(o["model"], o["field"]): o for o in report["oldest_pending"]}
    assert oldest[("demo.Photo", "image")]["pk"] == pending[0]
    assert oldest[("demo.Photo", "image")]["age_seconds"] >= 7200
    depths = {q["queue"]: q["messages"] for q in report["queues"]}
    assert depths["latents.encode"] == 2  # one batch message from here, one from the Item's save

    text = run("latents_status", "--model", "demo.Photo")
    assert "demo.Photo  image  ready    default" in text
    assert (
        f"oldest pending: demo.Photo.image pk={pending[0]} (pending, 0 attempts) waiting 2 h"
        in text
    )
    assert "queue latents.encode: 2 messages waiting" in text
    assert "testapp.Item" not in text


def test_status_exits_non_zero_when_the_broker_cannot_be_asked():
    make_rows(1)
    with broker_unreachable():
        out, error = fails("latents_status")
    assert "demo.Photo" in out and "queue latents.encode: unknown" in out
    assert "Queue depth unknown" in str(error)


# --- latents_reencode ---


def test_reencode_with_another_autoencoder_from_kept_originals(two_autoencoders, broker):
    kept = photos(3)
    (lost,) = make_rows(1)  # encoded long ago, without a kept original
    broker("latents.encode")
    originals = {p.pk: p.image.original_bytes() for p in kept}

    dry, _error = fails(
        "latents_reencode", "--model", "demo.Photo", "--autoencoder", "other", "--dry-run"
    )
    assert "would queue 3 rows for re-encoding (3 from kept originals)" in dry
    assert encode_args(broker) == []
    assert set(Photo.objects.values_list("image_state", flat=True)) == {"ready"}

    out, error = fails("latents_reencode", "--model", "demo.Photo", "--autoencoder", "other")
    assert "queued 3 rows for re-encoding (3 from kept originals)" in out
    assert "skipped 1 (no original kept)" in out
    assert "1 rows have no kept original; re-run with --from-decoded" in str(error)
    sent = encode_args(broker)
    assert len(sent) == 3
    for photo in kept:
        photo.refresh_from_db()
        assert photo.image.state == "pending" and photo.image_autoencoder == "other"
        assert bytes(photo.image_staged) == originals[photo.pk]
        assert ["demo.Photo", photo.pk, "image", str(photo.image_token)] in sent
    for photo in kept:  # one encode may fill its batch with the other pending rows
        encode_now(photo)
        assert photo.image.origin["autoencoder"] == "other"
        assert photo.image.original_bytes() == originals[photo.pk]
    assert Photo.objects.get(pk=lost).image.state == "ready"

    again, _error = fails("latents_reencode", "--model", "demo.Photo", "--autoencoder", "other")
    assert "queued 0 rows for re-encoding" in again, (
        "resumable: the rows done are not selected again"
    )
    assert encode_args(broker) == []


def test_reencode_rows_whose_weights_were_updated(
    two_autoencoders, broker, settings, other_vae_dir
):
    old = photos(2)
    config = {**two_autoencoders}
    config["AUTOENCODERS"] = {**config["AUTOENCODERS"]}
    config["AUTOENCODERS"]["default"] = {
        **config["AUTOENCODERS"]["default"],
        "PRETRAINED": str(other_vae_dir),  # the same alias, new weights
    }
    settings.LATENTSTORE = config
    (fresh,) = photos(1, seed=10)
    broker("latents.encode")
    out = run("latents_reencode", "--origin-mismatch", "-v", "2")
    assert "queued 2 rows for re-encoding (2 from kept originals)" in out
    assert {p.pk for p in old} == set(
        Photo.objects.filter(image_state="pending").values_list("pk", flat=True)
    )
    assert Photo.objects.get(pk=fresh.pk).image.state == "ready"
    assert len(encode_args(broker)) == 2
    assert f"demo.Photo.image pk={old[0].pk}: staged (original)" in out


def test_reencode_failed_rows_and_ids(two_autoencoders, broker):
    a, b = photos(2)
    (failed,) = make_rows(1, "failed")
    broker("latents.encode")
    out = run("latents_reencode", "--failed")
    assert "queued 1 rows for re-encoding (1 from staged uploads)" in out
    assert Photo.objects.get(pk=failed).image.state == "pending"
    with pytest.raises(CommandError, match="need one --model"):
        call_command("latents_reencode", "--ids", str(b.pk), stdout=io.StringIO())
    out = run("latents_reencode", "--model", "demo.Photo", "--ids", str(b.pk))
    assert "queued 1 rows for re-encoding" in out
    assert Photo.objects.get(pk=a.pk).image.state == "ready"
    assert Photo.objects.get(pk=b.pk).image.state == "pending"
    assert len(encode_args(broker)) == 2
    with pytest.raises(CommandError, match="Say which rows"):
        call_command("latents_reencode", stdout=io.StringIO())
    with pytest.raises(CommandError, match="No autoencoder 'nope'"):
        call_command("latents_reencode", "--autoencoder", "nope", stdout=io.StringIO())


def test_reencode_from_decoded_pixels_prints_the_psnr(
    settings, tiny_vae_dir, other_vae_dir, celery_worker
):
    config = latentstore_config(tiny_vae_dir)
    config["AUTOENCODERS"]["other"] = {
        **config["AUTOENCODERS"]["default"],
        "PRETRAINED": str(other_vae_dir),
    }
    settings.LATENTSTORE = config
    made = []
    for i in range(2):
        photo = Photo.objects.create(
            title=f"d{i}", image=image_bytes(make_test_image(40, 24, seed=i), "PNG")
        )
        assert wait_for(photo).state == "ready"
        made.append(photo)
    before = {p.pk: p.image.decoded_bytes(format="PNG") for p in made}

    out, error = fails("latents_reencode", "--all", "--autoencoder", "other")
    assert "2 rows have no kept original" in str(error)

    out = run("latents_reencode", "--all", "--autoencoder", "other", "--from-decoded")
    assert "queued 2 rows for re-encoding (2 from decoded pixels)" in out
    assert "PSNR decode → re-encode → decode over 2 rows: mean" in out
    for photo in made:
        image = photo.image.refresh()
        assert image.state == "ready" and image.origin["autoencoder"] == "other"
    from latentstore.maintenance import psnr

    mean = sum(psnr(before[p.pk], p.image.decoded_bytes(format="PNG")) for p in made) / 2
    assert f"mean {mean:.2f} dB" in out


# --- latents_retry ---


def test_retry_queues_failed_rows_again(broker):
    failed = make_rows(2, "failed")
    (ready,) = make_rows(1)
    (lost,) = make_rows(1, "failed")
    Photo.objects.filter(pk=lost).update(image_staged=None)
    broker("latents.encode")

    dry, _error = fails("latents_retry", "--dry-run")
    assert "would queue 2 failed rows again" in dry
    assert Photo.objects.filter(image_state="failed").count() == 3 and encode_args(broker) == []

    out, error = fails("latents_retry")
    assert "queued 2 failed rows again" in out
    assert "1 rows have no original to encode from" in str(error)
    sent = encode_args(broker)
    for pk in failed:
        row = Photo.objects.get(pk=pk)
        assert row.image.state == "pending" and row.image_attempts == 0 and row.image_error == ""
        assert ["demo.Photo", pk, "image", str(row.image_token)] in sent
    assert len(sent) == 2
    assert Photo.objects.get(pk=lost).image.state == "failed"
    assert Photo.objects.get(pk=ready).image.state == "ready"


def test_after_and_ids_resume_and_limit_a_run_in_pages(broker):
    failed = make_rows(5, "failed")
    broker("latents.encode")
    out = run(
        "latents_retry", "--model", "demo.Photo", "--after", str(failed[1]), "--batch-size", "2"
    )
    assert "queued 3 failed rows again" in out
    states = dict(Photo.objects.values_list("pk", "image_state"))
    assert [states[pk] for pk in failed] == ["failed", "failed", "pending", "pending", "pending"]
    assert sorted(pk for _l, pk, _f, _t in encode_args(broker)) == failed[2:]

    out = run("latents_retry", "--model", "demo.Photo", "--ids", f"{failed[0]},{failed[3]}")
    assert "queued 1 failed rows again" in out  # failed[3] is pending already
    assert Photo.objects.get(pk=failed[0]).image.state == "pending"


def test_retry_with_a_real_worker_makes_failed_rows_ready(celery_worker, png_bytes):
    photo = Photo.objects.create(title="f", image=png_bytes)
    assert wait_for(photo).state == "ready"
    Photo.objects.filter(pk=photo.pk).update(
        image_state="failed", image_staged=png_bytes, image_error="x"
    )
    run("latents_retry", "--model", "demo.Photo", "--ids", str(photo.pk))
    assert wait_for(photo).state == "ready"


# --- latents_sweep ---


def test_sweep_requeues_stuck_rows_and_fails_those_past_the_cap(broker):
    stuck = make_rows(2, "pending")
    (hopeless,) = make_rows(1, "pending", start=2)
    (recent,) = make_rows(1, "pending", start=3)
    long_ago = timezone.now() - timedelta(hours=1)
    Photo.objects.filter(pk__in=[*stuck, hopeless]).update(image_changed=long_ago)
    Photo.objects.filter(pk=recent).update(image_changed=timezone.now())
    Photo.objects.filter(pk=hopeless).update(image_attempts=3)
    Photo.objects.update(image_token="11111111-1111-1111-1111-111111111111")
    broker("latents.encode")

    dry = run("latents_sweep", "--dry-run")
    assert "would re-enqueue 2 stuck rows and mark 1 failed" in dry
    assert encode_args(broker) == [] and Photo.objects.filter(image_state="failed").count() == 0

    out = run("latents_sweep", "--model", "demo.Photo")
    assert "re-enqueued 2 stuck rows, marked 1 failed" in out
    assert sorted(args[1] for args in encode_args(broker)) == sorted(stuck)
    assert Photo.objects.get(pk=hopeless).image.state == "failed"
    again = run("latents_sweep")
    assert again.startswith("re-enqueued 0 stuck rows"), "each requeue renews the lease"
    assert encode_args(broker) == []


def test_sweep_exits_non_zero_when_messages_cannot_be_sent():
    (pk,) = make_rows(1, "pending")
    Photo.objects.filter(pk=pk).update(image_changed=timezone.now() - timedelta(hours=1))
    with broker_unreachable():
        out, error = fails("latents_sweep")
    assert "re-enqueued 1 stuck rows" in out
    assert "1 of 1 rows could not be sent to the broker" in str(error)
    assert Photo.objects.get(pk=pk).image.state == "pending"


# --- latents_warm ---


def test_warm_decodes_into_the_cache_and_skips_what_is_there(png_bytes):
    a, b = photos(2)
    (corrupt,) = make_rows(1)
    Photo.objects.filter(pk=corrupt).update(image=Photo.objects.get(pk=a.pk).image.blob[:-5])

    dry = run("latents_warm", "--size", "32", "--dry-run")
    assert "3 would warm" in dry
    key, _ = key_for(a.image, "default", 32, "WEBP")
    assert get_cache().get(key) is None

    out, error = fails("latents_warm", "--size", "32", "--size", "16")
    assert "4 warmed" in out and "2 failed" in out
    assert f"demo.Photo pk={corrupt} size=32" in str(error) and "LatentFormatError" in str(error)
    for photo in (a, b):
        for size in (32, 16):
            key, _ = key_for(photo.image, "default", size, "WEBP")
            assert get_cache().get(key) == photo.image.decoded_bytes(size=size, format="webp")

    again = run("latents_warm", "--size", "32", "--model", "demo.Photo", "--ids", f"{a.pk},{b.pk}")
    assert "2 cached" in again and "warmed" not in again


def test_warm_decodes_a_chunk_in_one_batched_call(monkeypatch):
    good = photos(3)
    (corrupt,) = make_rows(1)
    Photo.objects.filter(pk=corrupt).update(image=good[0].image.blob[:-5])
    backend_class = type(decoders["default"])
    real = backend_class.decode_batch
    batches = []

    def spy(self, items):  # the backend's own batched decode, counted
        batches.append(len(items))
        return real(self, items)

    monkeypatch.setattr(backend_class, "decode_batch", spy)
    out, error = fails("latents_warm", "--size", "32", "--verbosity", "2")
    assert batches == [3]  # one call for the chunk, not one decode per picture
    assert "3 warmed" in out and "1 failed" in out
    assert f"demo.Photo.image pk={corrupt} size=32: failed" in out
    assert f"demo.Photo.image pk={good[1].pk} size=32: warmed" in out
    assert f"demo.Photo pk={corrupt} size=32: LatentFormatError" in str(error)
    for photo in good:
        key, _ = key_for(photo.image, "default", 32, "WEBP")
        assert get_cache().get(key) == photo.image.decoded_bytes(size=32, format="webp")


def test_warm_enqueue_sends_decode_tasks_once(broker):
    make_rows(2, distinct=True)
    broker("latents.decode")
    out = run("latents_warm", "--decoder", "rgb", "--size", "64", "--enqueue")
    assert "2 scheduled" in out
    assert len([a for n, a, _m in broker("latents.decode")]) == 2
    out = run("latents_warm", "--decoder", "rgb", "--size", "64", "--enqueue")
    assert "2 already scheduled" in out
    assert broker("latents.decode") == []


# --- progress ---


def test_plain_progress_lines_when_not_a_terminal():
    make_rows(20, "failed")
    out = run("latents_retry", "--dry-run")
    lines = [line for line in out.splitlines() if line.startswith("demo.Photo.image:")]
    assert lines[0] == "demo.Photo.image: 2/20 rows (10%)"
    assert lines[-1] == "demo.Photo.image: 20/20 rows (100%)"
    assert len(lines) == 10


def test_a_progress_bar_on_a_terminal(tmp_path):
    script = """
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from tests.rows import make_rows
make_rows(30, "failed")
call_command("latents_retry", "--dry-run")
"""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "LATENTSTORE_VAR_DIR": str(tmp_path),
        "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3",
        "CELERY_BROKER_URL": "memory://",
        "COLUMNS": "100",
    }
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, env=env, stdout=follower, stderr=follower
    )
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 120)
        if not ready:
            break
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(leader)
    output = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, output[-2000:]
    assert "demo.Photo.image: 100%|" in output and "30/30" in output, output[-2000:]
    assert "demo.Photo.image: 3/30 rows (10%)" not in output
    assert "would queue 30 failed rows again." in output


def test_encode_batches_collect_rows_and_send_them_together(broker):
    from latentstore.maintenance import EncodeBatch

    failed = make_rows(5, "failed")
    broker("latents.encode")
    with EncodeBatch("demo.Photo", "image", size=2, max_wait=3600) as batch:
        batch.add(failed[0], "t0")
        assert encode_args(broker) == [], "nothing is sent before the batch is full"
        batch.add(failed[1], "t1")
        assert len(encode_args(broker)) == 2
        batch.add(failed[2], "t2")
    assert encode_args(broker) == [["demo.Photo", failed[2], "image", "t2"]], "the rest on exit"
    assert batch.sent == 3


def test_status_reports_the_measured_round_trip(settings):
    settings.LATENTSTORE = {**settings.LATENTSTORE, "MIN_PSNR": 22.0}
    pks = make_rows(4, distinct=True)
    for pk, value in zip(pks, [18.0, 24.0, 27.0], strict=False):
        Photo.objects.filter(pk=pk).update(image_psnr=value)
    Item.objects.create(name="i", picture=image_bytes(make_test_image(16, 16), "PNG"))

    report = json.loads(run("latents_status", "--json", "--no-queues"))
    quality = {(q["model"], q["field"]): q for q in report["quality"]}
    assert quality[("demo.Photo", "image")] == {
        "model": "demo.Photo",
        "field": "image",
        "ready": 4,
        "measured": 3,
        "mean_psnr": 23.0,
        "worst_psnr": 18.0,
        "min_psnr": 22.0,
        "low_fidelity": 1,
    }
    assert quality[("testapp.Item", "picture")]["measured"] == 0

    text = run("latents_status", "--no-queues")
    assert (
        "quality demo.Photo.image: 3 of 4 ready rows measured, mean 23.00 dB, worst 18.00 dB, "
        "1 low fidelity (< 22 dB)" in text
    )
    assert "quality testapp.Item.picture: not measured" in text


def test_warm_reads_blobs_per_page_not_per_row():
    """The rows come without their blobs; the misses' blobs are read in one query per page, so
    warming three times as many rows costs no more queries."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    pks = make_rows(8, distinct=True)

    def queries(rows: list[int]) -> int:
        ids = ",".join(map(str, rows))
        with CaptureQueriesContext(connection) as captured:
            out = run(
                "latents_warm",
                "--model",
                "demo.Photo",
                "--decoder",
                "rgb",
                "--size",
                "16",
                "--ids",
                ids,
            )
        assert f"{len(rows)} warmed" in out, out
        return len(captured.captured_queries)

    assert queries(pks[:2]) == queries(pks[2:])

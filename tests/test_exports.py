"""latents_export: training sets straight from the table, read back with the real readers.

Real PostgreSQL (the suite's database), the real ``datasets`` and ``webdataset`` packages, the
tiny real autoencoder for the picture that is encoded and decoded, and a command process killed
with SIGKILL for the resume test.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from latentstore.decoders import decoders
from latentstore.exports import CARD_JSON, PROGRESS_FILE
from latentstore.latents import LatentHeader, unpack
from project.models import Photo
from tests.conftest import requires_postgres
from tests.rows import latent_blob, run_web_tier, store_ready
from tests.test_field import encode_now
from tests.testapp.models import Poster
from tests.tiny import image_bytes, make_test_image

datasets = pytest.importorskip("datasets")
wds = pytest.importorskip("webdataset")

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
# float16's spacing is 2**-10 of a value's binade: a value cast to it is within 2**-11 relative.
F16 = {"rtol": 2**-11, "atol": 1e-7}
SD3 = {"family": "sd3", "scaling_factor": 1.5305, "shift_factor": 0.0609, "channels": 16}


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("latents_export", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def posters(*sizes: tuple[int, int], start: int = 0, **origin) -> list[int]:
    """Ready Posters with seeded latents of pictures of ``sizes`` (caption "c<seed>")."""
    pks = []
    for i, (width, height) in enumerate(sizes, start=start):
        pk = Poster.objects.create(caption=f"c{i}").pk
        store_ready(Poster, pk, latent_blob(width, height, seed=i, **origin))
        pks.append(pk)
    return pks


def read_hf(out: Path, cache: Path) -> dict:
    ds = datasets.load_dataset("parquet", data_dir=str(out), split="train", cache_dir=str(cache))
    rows = {}
    for row in ds.with_format("numpy"):
        assert row["pk"] not in rows, f"pk {row['pk']} twice"
        rows[int(row["pk"])] = row
    return rows


def read_wds(out: Path) -> dict:
    shards = sorted(str(p) for p in (out / "data").glob("train-*.tar"))
    rows = {}
    for sample in wds.WebDataset(shards, shardshuffle=False).decode():
        meta = sample["json"]
        assert meta["pk"] not in rows, f"pk {meta['pk']} twice"
        rows[meta["pk"]] = (sample["npy"], meta)
    return rows


def card(out: Path) -> dict:
    return json.loads((out / CARD_JSON).read_text())


# --- round trips with each format's own reader --------------------------------------------------


def test_hf_export_reads_back_with_datasets_equal_to_the_fields_latents(tmp_path, monkeypatch):
    pks = posters((40, 24), (64, 48), (203, 157), (64, 48), (96, 32))
    int8 = posters((48, 40), start=10, dtype="int8")[0]  # another storage dtype, same space
    Poster.objects.create(caption="no picture")  # state empty: not exported
    out = tmp_path / "hf"

    printed = run("testapp.Poster.image", "--out", str(out), "--columns", "caption",
                  "--shard-size", "2KB", "--batch-size", "2")  # fmt: skip

    assert "Exported 6 rows" in printed
    rows = read_hf(out, tmp_path / "cache")
    assert sorted(rows) == sorted([*pks, int8])
    for pk, row in rows.items():
        image = Poster.objects.get(pk=pk).image
        header = image.header
        assert row["latents"].shape == header.shape
        if pk == int8:  # dequantised int8 in float16: float16's tolerance
            np.testing.assert_allclose(row["latents"], image.latents, **F16)
        else:  # float16 as stored: exactly
            assert np.array_equal(row["latents"], image.latents)
        assert (row["width"], row["height"]) == (image.width, image.height)
        assert (row["pad_right"], row["pad_bottom"]) == (header.pad_right, header.pad_bottom)
        assert list(row["crop"]) == [0, 0, image.width, image.height]
        assert row["digest"] == image.digest
        assert row["caption"] == Poster.objects.get(pk=pk).caption

    shards = sorted((out / "data").glob("train-*.parquet"))
    assert len(shards) > 1  # 2 KB shards
    meta = card(out)
    assert meta["count"] == 6 and meta["format"] == "hf" and meta["dtype"] == "float16"
    assert meta["autoencoder"] == {
        "alias": "default",
        "family": "sd",
        "fingerprint": "0" * 16,
        "scaling_factor": 0.18215,
        "shift_factor": 0.0,
        "downsample": 8,
    }
    assert meta["latents"]["space"] == "raw" and meta["latents"]["scaling_applied"] is False
    assert meta["latents"]["what"] == "mean"
    assert meta["latents"]["storage_dtypes"] == {"float16": 5, "int8": 1}
    assert [c["name"] for c in meta["columns"]] == [
        "pk", "latents", "width", "height", "pad_right", "pad_bottom", "crop", "digest", "caption"
    ]  # fmt: skip
    assert [s["path"] for s in meta["shards"]] == [f"data/{p.name}" for p in shards]
    assert sum(s["rows"] for s in meta["shards"]) == 6

    # The card's own snippet runs, and the README's front matter lets datasets load the folder.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache2"))
    readme = (out / "README.md").read_text()
    assert meta["read"]["datasets"] in readme and "0000000000000000" in readme
    scope: dict = {}
    exec(meta["read"]["datasets"], scope)
    assert scope["latents"].shape == rows[int(scope["ds"][0]["pk"])]["latents"].shape
    folder = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache3"))
    assert sorted(folder["pk"]) == sorted(rows)


def test_webdataset_export_reads_back_with_webdataset(tmp_path):
    pks = posters((40, 24), (203, 157), (64, 64), (64, 64))
    out = tmp_path / "wds"

    run("testapp.Poster.image", "--out", str(out), "--format", "webdataset",
        "--columns", "caption", "--shard-size", "9KB", "--dtype", "float32")  # fmt: skip

    rows = read_wds(out)
    assert sorted(rows) == pks
    for pk, (latents, meta) in rows.items():
        image = Poster.objects.get(pk=pk).image
        assert latents.dtype == np.float32
        assert np.array_equal(latents, image.latents)
        assert meta == {
            "pk": pk,
            "width": image.width,
            "height": image.height,
            "pad_right": image.header.pad_right,
            "pad_bottom": image.header.pad_bottom,
            "crop": [0, 0, image.width, image.height],
            "digest": image.digest,
            "caption": Poster.objects.get(pk=pk).caption,
        }
    meta = card(out)
    assert meta["count"] == 4 and len(meta["shards"]) > 1
    # The card's snippet (a brace pattern over every shard) reads the first sample.
    scope: dict = {}
    exec(meta["read"]["webdataset"], scope)
    assert scope["sample"]["json"]["pk"] == pks[0]
    assert sorted(sample["json"]["pk"] for sample in scope["ds"]) == pks
    # Members are plain .npy (no pickle) and .json, keyed by the primary key.
    import tarfile

    with tarfile.open(out / "data" / "train-00000.tar") as tar:
        names = tar.getnames()
    assert names[:2] == [f"{pks[0]}.npy", f"{pks[0]}.json"]


def test_model_space_applies_the_blobs_scaling_and_shift(tmp_path):
    (pk,) = posters((64, 40), **SD3)
    raw = Poster.objects.get(pk=pk).image.latents
    expected = (raw - np.float32(0.0609)) * np.float32(1.5305)

    run("testapp.Poster.image", "--out", str(tmp_path / "raw"), "--dtype", "float32")
    run("testapp.Poster.image", "--out", str(tmp_path / "m32"), "--dtype", "float32",
        "--model-space")  # fmt: skip
    run("testapp.Poster.image", "--out", str(tmp_path / "m16"), "--model-space")

    cache = tmp_path / "cache"
    assert np.array_equal(read_hf(tmp_path / "raw", cache)[pk]["latents"], raw)
    np.testing.assert_allclose(read_hf(tmp_path / "m32", cache)[pk]["latents"], expected, 1e-6)
    np.testing.assert_allclose(read_hf(tmp_path / "m16", cache)[pk]["latents"], expected, **F16)
    assert not np.allclose(raw, expected, atol=0.05)  # the two spaces differ visibly
    raw_card, model_card = card(tmp_path / "raw"), card(tmp_path / "m16")
    assert raw_card["latents"]["space"] == "raw"
    assert raw_card["latents"]["to_model_space"] == "(latents - shift_factor) * scaling_factor"
    assert model_card["latents"]["space"] == "model"
    assert model_card["latents"]["scaling_applied"] is model_card["latents"]["shift_applied"]
    assert model_card["latents"]["shift_applied"] is True
    assert model_card["autoencoder"]["family"] == "sd3"
    readme = (tmp_path / "m16" / "README.md").read_text()
    assert "| scaling factor | 1.5305 (applied) |" in readme
    assert "| shift factor | 0.0609 (applied) |" in readme
    assert "| shift factor | 0.0609 (not applied) |" in (tmp_path / "raw" / "README.md").read_text()


# --- origins ------------------------------------------------------------------------------------


def test_mixed_origins_are_refused_and_allow_mixed_records_the_origin_per_row(tmp_path):
    ours = posters((40, 24), (40, 24))
    theirs = posters((40, 24), start=5, fingerprint="f" * 16)
    sd3 = posters((40, 24), start=7, autoencoder="sd3", fingerprint="3" * 16, **SD3)
    out = tmp_path / "mixed"

    with pytest.raises(CommandError) as info:
        run("testapp.Poster.image", "--out", str(out))
    message = str(info.value)
    assert "3 latent spaces" in message and "--allow-mixed" in message
    assert "0" * 16 in message and "f" * 16 in message and "3" * 16 in message
    assert f"pk={theirs[0]}" in message
    assert not (out / "data").exists() and not (out / PROGRESS_FILE).exists()
    # One latent space selected with --filter is fine.
    run("testapp.Poster.image", "--out", str(tmp_path / "one"),
        "--filter", json.dumps({"pk__in": ours}))  # fmt: skip
    assert card(tmp_path / "one")["count"] == 2

    run("testapp.Poster.image", "--out", str(out), "--allow-mixed", "--model-space",
        "--dtype", "float32", "--format", "webdataset")  # fmt: skip
    rows = read_wds(out)
    assert sorted(rows) == sorted(ours + theirs + sd3)
    for pk, (latents, meta) in rows.items():
        header, raw = unpack(Poster.objects.get(pk=pk).image.blob)
        assert {k: meta[k] for k in ("autoencoder", "family", "fingerprint")} == (header.origin)
        assert (meta["scaling_factor"], meta["shift_factor"]) == (
            header.scaling_factor,
            header.shift_factor,
        )
        # Each row in its own model space.
        expected = (raw - np.float32(header.shift_factor)) * np.float32(header.scaling_factor)
        np.testing.assert_allclose(latents, expected, rtol=1e-6)
    meta = card(out)
    assert meta["mixed_origins"] is True and meta["autoencoder"] is None
    assert sorted((o["fingerprint"], o["rows"]) for o in meta["origins"]) == [
        ("0" * 16, 2),
        ("3" * 16, 1),
        ("f" * 16, 1),
    ]
    assert "## Origins" in (out / "README.md").read_text()


# --- the padding box, and decoding an exported latent -------------------------------------------


@pytest.fixture
def encoded_203x157(png_bytes):
    """A 203x157 picture encoded by the tiny real autoencoder (the worker's encode task)."""
    photo = Photo.objects.create(
        title="odd", image=image_bytes(make_test_image(203, 157, seed=4), "PNG")
    )
    encode_now(photo)
    assert photo.image.state == "ready", photo.image.error
    return photo


def test_the_padding_box_of_a_203x157_picture(tmp_path, encoded_203x157):
    photo = encoded_203x157
    assert photo.image.header.shape == (4, 20, 26)  # 208 x 160 pixels encoded
    run("demo.Photo.image", "--out", str(tmp_path / "hf"), "--columns", "title")
    run("demo.Photo.image", "--out", str(tmp_path / "wds"), "--format", "webdataset")

    row = read_hf(tmp_path / "hf", tmp_path / "cache")[photo.pk]
    latents, meta = read_wds(tmp_path / "wds")[photo.pk]
    for sample in (row, meta):
        assert (sample["width"], sample["height"]) == (203, 157)
        assert (sample["pad_right"], sample["pad_bottom"]) == (5, 3)
        assert list(sample["crop"]) == [0, 0, 203, 157]
    assert row["latents"].shape == latents.shape == (4, 20, 26)
    assert row["title"] == "odd"
    assert "then crop to `crop`" in (tmp_path / "hf" / "README.md").read_text()


def test_an_exported_latent_decodes_to_the_fields_own_picture(tmp_path, encoded_203x157):
    photo = encoded_203x157
    out = tmp_path / "wds"
    run("demo.Photo.image", "--out", str(out), "--format", "webdataset", "--model-space",
        "--dtype", "float32")  # fmt: skip
    latents, meta = read_wds(out)[photo.pk]
    ae = card(out)["autoencoder"]

    # Only what the export says: back to raw latents, a header from the card and the sample.
    raw = latents / np.float32(ae["scaling_factor"]) + np.float32(ae["shift_factor"])
    header = LatentHeader(
        version=1,
        autoencoder=ae["alias"],
        family=ae["family"],
        fingerprint=ae["fingerprint"],
        scaling_factor=ae["scaling_factor"],
        shift_factor=ae["shift_factor"],
        shape=tuple(latents.shape),
        dtype="float16",
        width=meta["width"],
        height=meta["height"],
        downsample=ae["downsample"],
        pad_right=meta["pad_right"],
        pad_bottom=meta["pad_bottom"],
    )
    decoder = decoders[photo.image.field.decoder]
    decoder.check(header)  # the field's autoencoder accepts the exported origin
    ours = np.asarray(decoder.decode(header, raw).convert("RGB"), dtype=np.int16)
    theirs = np.asarray(photo.image.decode().convert("RGB"), dtype=np.int16)
    assert ours.shape == theirs.shape == (157, 203, 3)
    # Model space and back in float32 moves a latent by ~1e-7: at most one level of 255.
    assert np.abs(ours - theirs).max() <= 1
    # Raw float16 as stored decodes to exactly the same picture.
    run("demo.Photo.image", "--out", str(tmp_path / "raw"), "--format", "webdataset")
    exact, _meta = read_wds(tmp_path / "raw")[photo.pk]
    same = decoder.decode(header, exact.astype(np.float32)).convert("RGB")
    assert np.array_equal(np.asarray(same), np.asarray(photo.image.decode().convert("RGB")))


# --- resuming -----------------------------------------------------------------------------------


def shard_hashes(out: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((out / "data").glob("train-*.parquet"))
    }


@requires_postgres
def test_an_export_killed_midway_resumes_and_every_row_is_there_once(tmp_path, worker_env):
    # 4x64x64 latents (512x512 pictures), one row per shard: each shard is its own file,
    # fsync and progress update, so the export is still running when it is killed.
    pks = []
    for i in range(300):
        pk = Photo.objects.create(title=f"p{i}").pk
        store_ready(Photo, pk, latent_blob(512, 512, seed=i))
        pks.append(pk)
    out = tmp_path / "killed"
    progress = out / PROGRESS_FILE
    command = [sys.executable, "manage.py", "latents_export", "demo.Photo.image",
               "--out", str(out), "--shard-size", "1", "--columns", "title"]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        state: dict = {}
        while time.monotonic() < deadline and process.poll() is None:
            try:
                state = json.loads(progress.read_text())
            except (FileNotFoundError, ValueError):  # not there yet / being replaced
                state = {}
            if len(state.get("shards", [])) >= 5:
                break
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        _stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, stderr.decode()
    state = json.loads(progress.read_text())
    assert not state["complete"], "the export finished before it was killed"
    done = len(state["shards"])
    assert 5 <= done < 300
    before = shard_hashes(out)
    assert len(before) == done  # listed shards; a partial one is under a .tmp name, if any

    printed = run("demo.Photo.image", "--out", str(out), "--shard-size", "1",
                  "--columns", "title")  # fmt: skip

    assert f"Resuming after pk={state['last_pk']}: {done} shards done" in printed
    after = shard_hashes(out)
    assert {name: after[name] for name in before} == before  # the finished shards untouched
    assert len(after) == 300
    assert not [p for p in (out / "data").iterdir() if p.name.endswith(".tmp")]
    rows = read_hf(out, tmp_path / "cache")  # read_hf fails on a pk seen twice
    assert sorted(rows) == pks
    assert all(rows[pk]["title"] == f"p{i}" for i, pk in enumerate(pks))
    assert card(out)["count"] == 300


def test_a_rerun_appends_new_rows_and_refuses_other_options(tmp_path):
    first = posters((40, 24), (40, 24))
    out = tmp_path / "again"
    run("testapp.Poster.image", "--out", str(out), "--format", "webdataset")
    later = posters((40, 24), start=5)

    printed = run("testapp.Poster.image", "--out", str(out), "--format", "webdataset")
    assert f"Resuming after pk={first[-1]}" in printed and "Exported 1 rows" in printed
    assert sorted(read_wds(out)) == first + later
    assert card(out)["count"] == 3

    with pytest.raises(CommandError, match="made with other options.*dtype='float16'"):
        run("testapp.Poster.image", "--out", str(out), "--format", "webdataset",
            "--dtype", "float32")  # fmt: skip
    run("testapp.Poster.image", "--out", str(out), "--format", "webdataset",
        "--dtype", "float32", "--overwrite")  # fmt: skip
    assert card(out)["dtype"] == "float32" and card(out)["count"] == 3
    assert all(latents.dtype == np.float32 for latents, _meta in read_wds(out).values())

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(CommandError, match="not empty and holds no latentstore export"):
        run("testapp.Poster.image", "--out", str(stranger))


# --- selecting rows ---------------------------------------------------------------------------


def test_only_ready_rows_matching_ids_after_and_filter_go_out(tmp_path):
    pks = posters(*[(40, 24)] * 6)
    Poster.objects.filter(pk=pks[1]).update(image_state="pending")
    Poster.objects.filter(pk=pks[2]).update(image_state="failed")
    Poster.objects.filter(pk=pks[3]).update(caption="keep")
    Poster.objects.filter(pk=pks[5]).update(caption="keep")

    def exported(name: str, *args: str) -> list[int]:
        run("testapp.Poster.image", "--out", str(tmp_path / name), "--format", "webdataset",
            *args)  # fmt: skip
        return sorted(read_wds(tmp_path / name))

    assert exported("all") == [pks[0], pks[3], pks[4], pks[5]]
    assert exported("ids", "--ids", f"{pks[0]},{pks[1]},{pks[4]}") == [pks[0], pks[4]]
    assert exported("after", "--after", str(pks[3])) == [pks[4], pks[5]]
    assert exported("filter", "--filter", '{"caption": "keep"}') == [pks[3], pks[5]]
    assert card(tmp_path / "filter")["source"]["filter"] == {"caption": "keep"}

    with pytest.raises(CommandError, match="--filter: Cannot resolve keyword 'nope'"):
        run("testapp.Poster.image", "--out", str(tmp_path / "bad"), "--filter", '{"nope": 1}')
    with pytest.raises(CommandError, match="--filter takes a JSON object"):
        run("testapp.Poster.image", "--out", str(tmp_path / "bad"), "--filter", "[1]")
    with pytest.raises(CommandError, match="belongs to a LatentImageField"):
        run("testapp.Poster.image", "--out", str(tmp_path / "bad"), "--columns", "image_state")
    with pytest.raises(CommandError, match="has no field 'nope'"):
        run("testapp.Poster.image", "--out", str(tmp_path / "bad"), "--columns", "nope")
    with pytest.raises(CommandError, match="No ready rows"):
        run("testapp.Poster.image", "--out", str(tmp_path / "none"), "--ids", str(pks[1]))


def test_dry_run_writes_nothing(tmp_path):
    posters((40, 24), (40, 24))
    out = tmp_path / "dry"
    printed = run("testapp.Poster.image", "--out", str(out), "--dry-run")
    assert "Would export 2 rows (hf, float16, raw)" in printed
    assert not out.exists()


def test_unreadable_latents_are_left_out_and_reported(tmp_path):
    pks = posters((40, 24), (40, 24), (40, 24))
    blob = bytearray(Poster.objects.get(pk=pks[1]).image.blob)
    blob[-20] ^= 0xFF  # a payload byte: the checksum no longer matches
    Poster.objects.filter(pk=pks[1]).update(image=bytes(blob))
    out = tmp_path / "corrupt"

    with pytest.raises(CommandError) as info:
        run("testapp.Poster.image", "--out", str(out), "--format", "webdataset")

    assert info.value.returncode == 1
    assert f"pk={pks[1]}: latent blob is corrupt: checksum mismatch" in str(info.value)
    assert sorted(read_wds(out)) == [pks[0], pks[2]]
    assert list(card(out)["skipped"]) == [str(pks[1])]


# --- the web tier stays torch-free ------------------------------------------------------------


def test_exporting_imports_no_torch(tmp_path):
    script = """
import sys, django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from project.models import Photo
from tests.rows import latent_blob, store_ready
pk = Photo.objects.create(title="x").pk
store_ready(Photo, pk, latent_blob(64, 40))
call_command("latents_export", "demo.Photo.image", "--out", OUT, "--format", "webdataset")
call_command("latents_export", "demo.Photo.image", "--out", OUT + "-hf", "--columns", "title")
assert "torch" not in sys.modules and "diffusers" not in sys.modules, "torch was imported"
# pyarrow.array() would import pandas (a second, ~150 MB): the export builds from buffers.
assert "pandas" not in sys.modules, "pandas was imported"
print("NO-TORCH-OK")
""".replace("OUT", repr(str(tmp_path / "out")))
    result = run_web_tier(script, tmp_path, timeout=120)
    assert "NO-TORCH-OK" in result.stdout, result.stderr
    assert os.path.exists(tmp_path / "out" / CARD_JSON)
    assert os.path.exists(tmp_path / "out-hf" / CARD_JSON)


# --- the export's own fast paths agree with the codec and tarfile ------------------------------


def test_read_latents_matches_unpack_and_refuses_what_unpack_refuses():
    from latentstore.latents import LatentFormatError
    from latentstore.samples import read_latents

    blob = latent_blob(203, 157, seed=9)
    header, values = read_latents(blob)
    assert values.dtype == np.float16 and header == unpack(blob)[0]
    assert np.array_equal(values.astype(np.float32), unpack(blob)[1])
    int8 = latent_blob(40, 24, dtype="int8")
    assert np.array_equal(read_latents(int8)[1], unpack(int8)[1])
    # An infinity with a valid checksum (a forged blob): refused, as unpack refuses it.
    forged = bytearray(blob[:-16])
    forged[-2:] = np.array([np.inf], dtype="<f2").tobytes()
    forged += hashlib.blake2b(bytes(forged), digest_size=16).digest()
    with pytest.raises(LatentFormatError, match="NaN or infinite"):
        read_latents(bytes(forged))
    with pytest.raises(LatentFormatError, match="checksum mismatch"):
        read_latents(blob[:-17] + bytes([blob[-17] ^ 1]) + blob[-16:])


@pytest.mark.parametrize("name, size", [("1.npy", 0), ("a-b_C.json", 123456789), ("x" * 100, 5)])
def test_tar_headers_are_the_ones_tarfile_writes(name, size):
    import tarfile

    from latentstore.shards import tar_header

    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    assert tar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


@pytest.mark.parametrize(
    "values, kind",
    [
        (["a", None, "é", ""], "string"),
        ([1, None, 2**40], "int64"),
        ([7, 8], "int32"),
        ([1.5, None, -0.0], "float64"),
        ([True, None, False, True], "bool"),
        ([], "string"),
    ],
)
def test_arrow_arrays_built_from_buffers_equal_pyarrows_own(values, kind):
    import pyarrow as pa

    from latentstore.shards import arrow_array

    arrow_type = {"string": pa.string(), "int64": pa.int64(), "int32": pa.int32(),
                  "float64": pa.float64(), "bool": pa.bool_()}[kind]  # fmt: skip
    built = arrow_array(values, arrow_type)
    built.validate(full=True)
    assert built.equals(pa.array(values, type=arrow_type))


@requires_postgres
@pytest.mark.parametrize("model_name", ["Poster", "Item"])
def test_blob_pages_read_the_blob_in_binary_and_match_the_orm(model_name):
    """keyset_pages(blob=...) reads the bytea by a second, binary query per page (an int and
    a UUID primary key); what it gives equals what the ORM gives, page by page."""
    from django.db import connection

    from latentstore.samples import keyset_pages
    from tests.testapp.models import Item

    model = {"Poster": Poster, "Item": Item}[model_name]
    field = "image" if model is Poster else "picture"
    pks = [model.objects.create().pk for _ in range(7)]
    for i, pk in enumerate(pks):
        store_ready(model, pk, latent_blob(40, 24, seed=i), field=field)
    rows = model.objects.all()
    expected = [
        (pk, bytes(blob), state)
        for pk, blob, state in rows.order_by("pk").values_list("pk", field, f"{field}_state")
    ]
    pages = list(keyset_pages(rows, ("pk", field, f"{field}_state"), 3, blob=field))
    assert [len(page) for page in pages] == [3, 3, 1]
    got = [row for page in pages for row in page]
    assert got == expected and all(type(row[1]) is bytes for row in got)
    assert connection.vendor == "postgresql"


@requires_postgres
def test_a_row_deleted_between_the_two_queries_of_a_page_is_skipped_not_lost(tmp_path, monkeypatch):
    from latentstore import samples

    pks = posters((40, 24), (40, 24), (40, 24))
    real = samples._binary_blobs

    def delete_then_read(rows, attname, page_pks):
        Poster.objects.filter(pk=pks[1]).delete()  # gone after the page's first query
        return real(rows, attname, page_pks)

    monkeypatch.setattr(samples, "_binary_blobs", delete_then_read)
    out = tmp_path / "o"
    with pytest.raises(CommandError) as info:
        run("testapp.Poster.image", "--out", str(out), "--format", "webdataset")
    assert f"pk={pks[1]}: no latents (the row changed since the scan)" in str(info.value)
    assert sorted(read_wds(out)) == [pks[0], pks[2]]
    assert list(card(out)["skipped"]) == [str(pks[1])]

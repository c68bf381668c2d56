"""The field, its companion columns and the staging half of the protocol (no worker running)."""

from __future__ import annotations

import io
import json
import uuid

import pytest
from django.core.exceptions import ValidationError
from django.core.files.base import File
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.db import connection, transaction
from django.forms import modelform_factory
from django.test.utils import CaptureQueriesContext

from latentstore.fields import LatentsNotReady
from latentstore.queries import without_blobs
from latentstore_workers import tasks as worker_tasks
from project.models import Photo
from tests.testapp.models import Item, Poster
from tests.tiny import image_bytes, make_test_image

pytestmark = pytest.mark.django_db(transaction=True)


def encode_now(obj, field="image"):
    """Run the real encode task in this process for a saved row."""
    token = getattr(obj, f"{field}_token")
    result = worker_tasks.encode.apply(args=[obj._meta.label, obj.pk, field, str(token)])
    getattr(obj, field).refresh()
    return result.get()


def test_save_stages_the_upload_and_sends_only_pointers_on_commit(broker, png_bytes):
    photo = Photo(title="cat")
    photo.image = SimpleUploadedFile("cat.png", png_bytes, content_type="image/png")
    assert photo.image.state == "pending"
    assert (photo.image.width, photo.image.height) == (40, 24)
    photo.save()

    row = Photo.objects.values(
        "image", "image_state", "image_staged", "image_token", "image_width", "image_height"
    ).get(pk=photo.pk)
    assert row["image_state"] == "pending"
    assert bytes(row["image_staged"]) == png_bytes
    assert not row["image"]  # no latents yet
    assert isinstance(row["image_token"], uuid.UUID)
    assert (row["image_width"], row["image_height"]) == (40, 24)

    messages = broker("latents.encode")
    assert [(name, args) for name, args, _ in messages] == [
        ("latentstore.encode", ["demo.Photo", photo.pk, "image", str(row["image_token"])])
    ]
    # Nothing of the image travels through the broker.
    assert len(messages[0][2].body) < 300


def test_rollback_sends_no_task_and_leaves_no_row(broker, png_bytes):
    with pytest.raises(RuntimeError), transaction.atomic():
        Photo.objects.create(title="gone", image=png_bytes)
        raise RuntimeError("rolled back")
    assert not Photo.objects.exists()
    assert broker("latents.encode") == []


def test_task_is_sent_only_after_commit(broker, png_bytes):
    with transaction.atomic():
        Photo.objects.create(title="later", image=png_bytes)
        assert broker("latents.encode", timeout=0.2) == []
    assert len(broker("latents.encode")) == 1


@pytest.mark.parametrize("kind", ["uploaded", "file", "path", "bytes", "pil"])
def test_assignment_accepts_every_documented_kind(kind, tmp_path, png_bytes):
    picture = make_test_image(40, 24, seed=3)
    if kind == "uploaded":
        value = SimpleUploadedFile("a.png", png_bytes)
    elif kind == "file":
        value = File(io.BytesIO(png_bytes), name="a.png")
    elif kind == "path":
        path = tmp_path / "a.png"
        path.write_bytes(png_bytes)
        value = str(path)
    elif kind == "bytes":
        value = png_bytes
    else:
        value = picture
    photo = Photo.objects.create(title=kind, image=value)
    photo.refresh_from_db()
    assert photo.image.state == "pending"
    assert (photo.image.width, photo.image.height) == (40, 24)
    assert photo.image.original_bytes()


def test_assigning_something_else_is_a_type_error():
    with pytest.raises(TypeError, match="Cannot assign 'int'"):
        Photo(title="x").image = 42


def test_assignment_rejects_non_images_before_anything_is_stored():
    with pytest.raises(ValidationError):
        Photo(title="x", image=b"<html>not an image</html>")
    assert not Photo.objects.exists()


def test_model_form_accepts_an_image_and_rejects_a_non_image_and_a_bomb(png_bytes):
    PhotoForm = modelform_factory(Photo, fields=["title", "image"])
    good = PhotoForm({"title": "ok"}, {"image": SimpleUploadedFile("a.png", png_bytes)})
    assert good.is_valid(), good.errors
    photo = good.save()
    assert photo.image.state == "pending"

    text = PhotoForm({"title": "t"}, {"image": SimpleUploadedFile("a.jpg", b"hello world")})
    assert not text.is_valid()
    assert "image" in text.errors

    bomb = PhotoForm({"title": "b"}, {"image": SimpleUploadedFile("b.png", _bomb_png())})
    assert not bomb.is_valid()
    assert "pixels" in bomb.errors["image"][0]
    assert Photo.objects.count() == 1


def _bomb_png(width=100_000, height=100_000) -> bytes:
    """A small PNG whose header claims a huge size (a decompression bomb)."""
    import struct
    import zlib

    data = bytearray(image_bytes(make_test_image(8, 8), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def test_model_form_without_a_new_file_keeps_the_image(png_bytes):
    photo = Photo.objects.create(title="keep", image=png_bytes)
    token = photo.image_token
    PhotoForm = modelform_factory(Photo, fields=["title", "image"])
    form = PhotoForm({"title": "renamed"}, {}, instance=photo)
    assert form.is_valid(), form.errors
    form.save()
    photo.refresh_from_db()
    assert photo.title == "renamed"
    assert photo.image_token == token
    assert photo.image.state == "pending"


def test_worker_result_survives_a_save_of_an_object_loaded_before_it(png_bytes):
    photo = Photo.objects.create(title="race", image=png_bytes)
    stale = Photo.objects.get(pk=photo.pk)  # loaded while pending
    encode_now(photo)
    assert photo.image.state == "ready"

    stale.title = "edited"
    stale.save()  # must not write the stale pending state and NULL latents back

    fresh = Photo.objects.get(pk=photo.pk)
    assert fresh.title == "edited"
    assert fresh.image.state == "ready"
    assert fresh.image.nbytes > 0


def test_update_fields_without_companions_is_refused(png_bytes):
    photo = Photo.objects.create(title="u", image=png_bytes)
    photo.image = png_bytes
    with pytest.raises(ValueError, match="companion columns"):
        photo.save(update_fields=["image"])
    photo.save(update_fields=["image", *Photo.image.field.companion_names])
    assert Photo.objects.get(pk=photo.pk).image_token == photo.image_token


def test_clearing_the_image_empties_every_column(png_bytes):
    photo = Photo.objects.create(title="c", image=png_bytes)
    encode_now(photo)
    photo.image = None
    photo.save()
    fresh = Photo.objects.get(pk=photo.pk)
    assert fresh.image.state == "empty"
    assert not fresh.image
    assert fresh.image.blob is None and fresh.image_staged is None and fresh.image_token is None
    with pytest.raises(LatentsNotReady, match="state 'empty'"):
        _ = fresh.image.latents


def test_listing_without_blobs_loads_no_blob_until_asked(png_bytes):
    for i in range(3):
        encode_now(Photo.objects.create(title=f"p{i}", image=png_bytes))
    with CaptureQueriesContext(connection) as listing:
        rows = list(without_blobs(Photo.objects.all()))
        summary = [(p.image.state, p.image.width, p.image.height, p.image.digest) for p in rows]
    assert len(listing) == 1
    sql = listing[0]["sql"]
    assert '"image"' not in sql and '"image_staged"' not in sql
    assert all(s[0] == "ready" and s[3] for s in summary)

    with CaptureQueriesContext(connection) as fetch:
        latents = rows[0].image.latents
        _ = rows[0].image.latents  # memoised: no second query
    assert len(fetch) == 1
    assert latents.shape == (4, 3, 5)
    # A later save of the listed object does not send the blob back.
    with CaptureQueriesContext(connection) as save:
        rows[0].title = "renamed"
        rows[0].save()
    assert all('"image" =' not in q["sql"] for q in save.captured_queries)


def test_dumpdata_loaddata_round_trips_a_ready_row(tmp_path, png_bytes):
    photo = Photo.objects.create(title="dump", image=png_bytes)
    encode_now(photo)
    before = (photo.image.blob, photo.image.digest, photo.image.width, photo.image.height)
    out = tmp_path / "photos.json"
    call_command("dumpdata", "demo.Photo", output=str(out))
    assert json.loads(out.read_text())[0]["fields"]["image_state"] == "ready"
    Photo.objects.all().delete()
    call_command("loaddata", str(out), verbosity=0)
    loaded = Photo.objects.get(pk=photo.pk)
    assert (
        loaded.image.blob,
        loaded.image.digest,
        loaded.image.width,
        loaded.image.height,
    ) == before
    assert loaded.image.state == "ready"
    assert loaded.image.latents.shape == (4, 3, 5)


def test_makemigrations_sees_no_changes_for_models_with_the_field():
    # The demo and test apps' migrations were made by makemigrations: the companion columns
    # round-trip through deconstruct() and rendering models from migration state.
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)


def test_migration_state_renders_each_companion_once():
    from django.db.migrations.executor import MigrationExecutor

    state = MigrationExecutor(connection).loader.project_state()
    for label in ("demo.photo", "testapp.item", "testapp.poster"):
        model = state.apps.get_model(label)
        names = [f.name for f in model._meta.local_fields]
        assert len(names) == len(set(names)), names


def test_abstract_inheritance_and_uuid_pk(png_bytes):
    poster = Poster.objects.create(caption="p", image=png_bytes)
    item = Item.objects.create(name="i", picture=png_bytes)
    assert Poster.objects.get(pk=poster.pk).image.state == "pending"
    encode_now(item, "picture")
    assert item.picture.state == "ready"
    assert item.picture.header.dtype == "int8"


def test_encoded_row_exposes_latents_origin_and_size(png_bytes):
    photo = Photo.objects.create(title="r", image=png_bytes)
    encode_now(photo)
    fresh = Photo.objects.get(pk=photo.pk)
    image = fresh.image
    assert image.state == "ready" and image.error == ""
    assert image.latents.dtype.name == "float32"
    assert image.latents.shape == (4, 3, 5)  # ceil(24/8), ceil(40/8)
    assert image.origin["autoencoder"] == "default"
    assert image.origin["family"] == "sd"
    assert len(image.origin["fingerprint"]) == 16
    assert image.nbytes == len(image.blob) > 4 * 3 * 5 * 2
    assert fresh.image_staged is None  # the staged original is cleared once encoded
    assert image.original_bytes() is None


def test_latent_dtype_setting_is_stamped_in_the_blob(settings, tiny_vae_dir, png_bytes):
    from tests.conftest import latentstore_config

    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, LATENT_DTYPE="int8")
    photo = Photo.objects.create(title="q", image=png_bytes)
    encode_now(photo)
    assert photo.image.header.dtype == "int8"


def test_assigning_a_cmyk_pil_image_applies_the_rgb_policy():
    # Regression: PNG cannot hold CMYK; assignment used to raise OSError.
    picture = make_test_image(16, 16, seed=4).convert("CMYK")
    photo = Photo.objects.create(title="cmyk", image=picture)
    assert photo.image.state == "pending"
    encode_now(photo)
    assert photo.image.state == "ready", photo.image.error


def test_reassigning_an_object_listed_without_blobs_stages_the_new_image(png_bytes):
    # Regression: without_blobs() defers the staged column; Django then saved only the loaded
    # columns and save() refused (or would have lost) the new upload.
    photo = Photo.objects.create(title="a", image=png_bytes)
    row = without_blobs(Photo.objects.filter(pk=photo.pk)).get()
    new = image_bytes(make_test_image(64, 48, seed=2), "PNG")
    row.image = new
    assert row.image.original_bytes() == new  # before save: the assigned bytes
    row.save()
    fresh = Photo.objects.get(pk=photo.pk)
    assert (fresh.image.width, fresh.image.height) == (64, 48)
    assert fresh.image.state == "pending" and fresh.image_token != photo.image_token
    assert bytes(fresh.image_staged) == new


def test_clearing_an_object_listed_without_blobs_clears_the_staged_original(png_bytes):
    photo = Photo.objects.create(title="a", image=png_bytes)
    row = without_blobs(Photo.objects.filter(pk=photo.pk)).get()
    row.image = None
    row.save()
    fresh = Photo.objects.get(pk=photo.pk)
    assert fresh.image.state == "empty" and fresh.image_staged is None

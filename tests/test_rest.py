"""``latentstore.rest_framework.LatentImageField`` through DRF's ``APIClient``: list and detail,
multipart upload, null to clear, DRF's error format, the OpenAPI schema, and no blob reads."""

from __future__ import annotations

import base64
import io

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext
from PIL import Image
from rest_framework.test import APIClient

from latentstore.rest_framework import openapi_schema
from project.models import Photo
from tests.conftest import encode_pointers, latentstore_config
from tests.rows import make_rows
from tests.test_field import encode_now
from tests.tiny import image_bytes, make_test_image

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.rest_api")]

HOST = "http://testserver"
PIL_FORMATS = {"avif": "AVIF", "webp": "WEBP", "jpg": "JPEG"}


@pytest.fixture
def api():
    return APIClient()


def upload(name="up.png", width=200, height=120, seed=4):
    data = image_bytes(make_test_image(width, height, seed=seed), "PNG")
    return SimpleUploadedFile(name, data, content_type="image/png")


def blob_queries(queries) -> list[str]:
    return [
        q["sql"]
        for q in queries.captured_queries
        if '"demo_photo"."image",' in q["sql"] or '"image_staged"' in q["sql"]
    ]


def test_list_and_detail_give_state_size_and_signed_urls(api):
    ready = Photo.objects.create(title="ready", image=upload().read())
    encode_now(ready)
    pending = Photo.objects.create(title="pending", image=upload(seed=5).read())
    (failed_pk,) = make_rows(1, "failed")

    listing = api.get("/api/photos/")
    assert listing.status_code == 200
    by_title = {row["title"]: row["image"] for row in listing.json()}
    image = by_title["ready"]
    assert api.get(f"/api/photos/{ready.pk}/").json()["image"] == image
    assert set(image) == {"state", "width", "height", "url", "srcset", "preview_url", "error"}
    assert (image["state"], image["width"], image["height"], image["error"]) == (
        "ready",
        200,
        120,
        None,
    )
    assert set(image["srcset"]) == {"avif", "webp"}
    fetched = [(image["url"], 200), (image["preview_url"], 64)]
    for fmt, value in image["srcset"].items():
        items = [item.split() for item in value.split(", ")]
        assert [w for _u, w in items] == ["64w", "128w", "200w"]
        for url, descriptor in items:
            assert url.startswith(f"{HOST}/latents/p/") and url.endswith(f".{fmt}")
            fetched.append((url, int(descriptor[:-1])))
    for url, width in fetched:  # every URL serves its format at its width
        response = api.get(url.removeprefix(HOST))
        assert response.status_code == 200, url
        picture = Image.open(io.BytesIO(response.content))
        assert picture.format == PIL_FORMATS[url.rsplit(".", 1)[1]]
        assert picture.width == width, url

    assert by_title["pending"] == {
        "state": "pending",
        "width": 200,
        "height": 120,
        "url": None,
        "srcset": {},
        "preview_url": None,
        "error": None,
    }
    assert pending.image.state == "pending"
    failed = api.get(f"/api/photos/{failed_pk}/").json()["image"]
    assert failed["state"] == "failed" and failed["url"] is None
    assert failed["error"] == "The image could not be read: broken"


@pytest.mark.parametrize("rows", [5, 40])
def test_a_listing_runs_one_query_whatever_its_length_and_reads_no_blob(api, rows):
    make_rows(rows, distinct=True)
    with CaptureQueriesContext(connection) as queries:
        response = api.get("/api/photos/")
    assert response.status_code == 200 and len(response.json()) == rows
    assert {row["image"]["state"] for row in response.json()} == {"ready"}
    assert len(queries) == 1, [q["sql"] for q in queries.captured_queries]
    assert blob_queries(queries) == []


def test_include_latents_gives_shape_and_origin_and_the_blob_only_when_asked(api):
    pks = make_rows(6, distinct=True)
    with CaptureQueriesContext(connection) as queries:
        rows = api.get("/api/photo-latents/").json()
    # The listing, then every blob at once: not a query per row.
    assert len(queries) == 2, [q["sql"] for q in queries.captured_queries]
    first = rows[0]["image"]
    photo = Photo.objects.get(pk=pks[0])
    assert first["latents"] == {
        "shape": [4, 3, 5],
        "dtype": photo.image.header.dtype,
        "origin": photo.image.origin,
        "nbytes": photo.image.nbytes,
    }
    assert first["latents"]["dtype"] in {"float16", "int8", "int4"}
    assert "blob" not in first["latents"]
    assert set(first["srcset"]) == {"webp"}
    with_blobs = api.get("/api/photo-latents/?blobs=1").json()
    assert base64.b64decode(with_blobs[0]["image"]["latents"]["blob"]) == photo.image.blob


def test_multipart_upload_creates_a_pending_row_and_encodes_on_commit(
    api, broker, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = api.post("/api/photos/", {"title": "new", "image": upload()}, format="multipart")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["image"]["state"] == "pending" and body["image"]["width"] == 200
    photo = Photo.objects.get(pk=body["id"])
    assert photo.image.state == "pending" and photo.image.original_bytes()
    assert len(callbacks) == 1
    assert encode_pointers(broker("latents.encode")) == [
        ["demo.Photo", photo.pk, "image", str(photo.image_token)]
    ]

    encode_now(photo)
    assert api.get(f"/api/photos/{photo.pk}/").json()["image"]["state"] == "ready"
    with django_capture_on_commit_callbacks(execute=True):
        replaced = api.patch(
            f"/api/photos/{photo.pk}/", {"image": upload(seed=9)}, format="multipart"
        )
    assert replaced.status_code == 200 and replaced.json()["image"]["state"] == "pending"
    photo.refresh_from_db()
    assert encode_pointers(broker("latents.encode")) == [
        ["demo.Photo", photo.pk, "image", str(photo.image_token)]
    ]


def test_null_clears_and_bad_files_get_drf_errors(api, settings, tiny_vae_dir):
    photo = Photo.objects.create(title="x", image=upload().read())
    encode_now(photo)
    cleared = api.patch(f"/api/photos/{photo.pk}/", {"image": None}, format="json")
    assert cleared.status_code == 200
    assert cleared.json()["image"]["state"] == "empty"
    photo.refresh_from_db()
    assert photo.image.state == "empty" and photo.image.blob is None

    text = SimpleUploadedFile("notes.png", b"this is not an image", content_type="image/png")
    bad = api.post("/api/photos/", {"title": "bad", "image": text}, format="multipart")
    assert bad.status_code == 400
    (message,) = bad.json()["image"]
    assert message.startswith("Upload a valid image file: ")
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, MAX_PIXELS=1000)
    big = upload(width=300, height=300)
    too_big = api.post("/api/photos/", {"title": "big", "image": big}, format="multipart")
    assert too_big.status_code == 400 and "pixels" in too_big.json()["image"][0]
    not_a_file = api.post("/api/photos/", {"title": "s", "image": "abc"}, format="json")
    assert not_a_file.status_code == 400
    assert not_a_file.json() == {"image": ["Upload a file (multipart/form-data), not str."]}
    assert not Photo.objects.filter(title__in=["bad", "big", "s"]).exists()


def test_the_openapi_schema_describes_the_field():
    from drf_spectacular.generators import SchemaGenerator
    from drf_spectacular.settings import patched_settings

    with patched_settings({"COMPONENT_SPLIT_REQUEST": True}):
        schema = SchemaGenerator().get_schema(request=None, public=True)
    components = schema["components"]["schemas"]
    for name, expected in (
        ("LatentImage", openapi_schema()),
        ("LatentImageWithLatents", openapi_schema(include_latents=True)),
    ):
        found = components[name]
        # drf-spectacular moves enums into components of their own (StateEnum).
        state = found["properties"].pop("state")
        expected["properties"].pop("state")
        assert found == expected
        (ref,) = state["allOf"]
        enum = components[ref["$ref"].rsplit("/", 1)[1]]
        assert enum["enum"] == ["empty", "pending", "encoding", "ready", "failed"]
    image = components["Photo"]["properties"]["image"]
    assert "#/components/schemas/LatentImage" in str(image)
    request = components["PhotoRequest"]["properties"]["image"]
    assert request["type"] == "string" and request["format"] == "binary"
    assert request.get("nullable") is True  # null clears
    create = schema["paths"]["/api/photos/"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in create


def test_a_listing_served_again_signs_nothing_until_the_row_or_the_settings_change(
    api, monkeypatch, settings, tiny_vae_dir
):
    from latentstore import rest_framework

    photo = Photo.objects.create(title="m", image=upload().read())
    encode_now(photo)
    signed = []
    real = rest_framework.sign_set

    def counted(*args, **kwargs):
        signed.append(args[0].digest)
        return real(*args, **kwargs)

    monkeypatch.setattr(rest_framework, "sign_set", counted)
    rest_framework.forget_links()
    first = api.get("/api/photos/").json()[0]["image"]
    again = api.get("/api/photos/").json()[0]["image"]
    assert again == first and len(signed) == 1, "the second listing came from the memo"

    photo.image = upload(seed=9).read()  # re-uploaded: new latents, new digest, new links
    photo.save()
    encode_now(photo)
    fresh = api.get("/api/photos/").json()[0]["image"]
    assert fresh["url"] != first["url"] and len(signed) == 2

    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, URL_SALT="revoked")
    revoked = api.get("/api/photos/").json()[0]["image"]
    assert revoked["url"] != fresh["url"] and len(signed) == 3, "a setting change empties it"
    assert api.get(fresh["url"].removeprefix(HOST)).status_code == 403
    assert api.get(revoked["url"].removeprefix(HOST)).status_code == 200

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


def token_of(url: str) -> str:
    """The set token of one of a row's links: ``…/latents/p/<token>/<index>.<ext>``."""
    return url.removeprefix(f"{HOST}/latents/p/").split("/")[0]


def test_a_row_signs_one_token_for_all_its_links_until_the_row_or_the_settings_change(
    api, monkeypatch, settings, tiny_vae_dir
):
    from latentstore import signing

    photos = [Photo.objects.create(title=f"m{i}", image=upload(seed=i).read()) for i in (1, 2)]
    for photo in photos:
        encode_now(photo)
    macs = []
    real = signing.SetSigner.sign_row

    def counted(self, template, pk, digest):
        macs.append(pk)
        return real(self, template, pk, digest)

    monkeypatch.setattr(signing.SetSigner, "sign_row", counted)
    listing = [row["image"] for row in api.get("/api/photos/").json()]
    assert len(macs) == 2, "one signature a row: srcsets, url and preview share it"
    for image in listing:
        urls = [image["url"], image["preview_url"]]
        urls += [item.split()[0] for v in image["srcset"].values() for item in v.split(", ")]
        assert len(urls) == 8 and {token_of(url) for url in urls} == {token_of(image["url"])}
        assert image["preview_url"].endswith("/p.webp")
    assert token_of(listing[0]["url"]) != token_of(listing[1]["url"])
    first = listing[0]
    assert api.get("/api/photos/").json()[0]["image"] == first, "deterministic links"

    photo = photos[0]
    photo.image = upload(seed=9).read()  # re-uploaded: new latents, new digest, new links
    photo.save()
    encode_now(photo)
    fresh = api.get("/api/photos/").json()[0]["image"]
    assert fresh["url"] != first["url"]
    assert api.get(first["url"].removeprefix(HOST)).status_code == 404  # not the row's latents
    assert api.get(first["preview_url"].removeprefix(HOST)).status_code == 404

    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, URL_SALT="revoked")
    revoked = api.get("/api/photos/").json()[0]["image"]
    assert revoked["url"] != fresh["url"], "the next request signs with the new salt"
    assert api.get(fresh["url"].removeprefix(HOST)).status_code == 403
    assert api.get(fresh["preview_url"].removeprefix(HOST)).status_code == 403
    assert api.get(revoked["url"].removeprefix(HOST)).status_code == 200


def test_without_a_preview_the_token_lists_none(api):
    from latentstore import signing
    from latentstore.rest_framework import LatentImageField

    photo = Photo.objects.create(title="np", image=upload().read())
    encode_now(photo)
    field = LatentImageField(preview_size=None, formats="webp", widths="64 400")
    field.bind("image", None)  # no request in the context: paths, not absolute URLs
    image = field.to_representation(photo.image)
    base = image["url"].removesuffix("1.webp")
    assert image["preview_url"] is None
    assert image["srcset"] == {"webp": f"{base}0.webp 64w, {base}1.webp 200w"}
    token = base.removeprefix("/latents/p/").rstrip("/")
    with pytest.raises(LookupError):
        signing.read_set(token, signing.PREVIEW_INDEX, "webp")
    assert api.get(f"{base}p.webp").status_code == 404
    assert api.get(f"{base}0.webp").status_code == 200


@pytest.mark.parametrize("upscale", [False, True])
def test_every_srcset_follows_the_candidate_rule_for_any_size(settings, tiny_vae_dir, upscale):
    """The field's per-row shortcut gives what picture_candidates gives, for wide, narrow,
    tall and tiny pictures, with and without URL_MAX_SIZE binding (a 300 px limit)."""
    from latentstore import signing
    from latentstore.html import picture_candidates
    from latentstore.rest_framework import LatentImageField

    sizes = [(1600, 1067), (200, 120), (320, 5000), (640, 640), (5, 3), (4000, 3000), (321, 90)]
    (pk,) = make_rows(1)
    row = Photo.objects.get(pk=pk)
    for limit in (2048, 300):
        settings.LATENTSTORE = latentstore_config(tiny_vae_dir, URL_MAX_SIZE=limit)
        field = LatentImageField(widths="64 320 640 960", formats="avif jpeg", upscale=upscale)
        field.bind("image", None)
        for width, height in sizes:
            row.image_width, row.image_height = width, height
            image = field.to_representation(row.image)
            expected = picture_candidates(row.image, "64 320 640 960", upscale=upscale)
            assert bool(image["url"]) == bool(expected), (width, height, limit)
            if not expected:
                continue
            for fmt, ext in (("avif", "avif"), ("jpeg", "jpg")):
                items = [item.rsplit(" ", 1) for item in image["srcset"][fmt].split(", ")]
                assert [int(w[:-1]) for _url, w in items] == [w for w, _box in expected]
                token = items[0][0].removeprefix("/latents/p/").split("/")[0]
                for index, (_url, _w) in enumerate(items):
                    ref = signing.read_set(token, index, ext)
                    box = expected[index][1]
                    # A width alone, the view makes the box from the row's size.
                    assert ref.size == (None if box is None else (box[0], 0))
            assert image["url"].endswith(f"/{len(expected) - 1}.webp")


def test_a_width_only_link_serves_its_width_and_respects_a_lowered_limit(
    api, settings, tiny_vae_dir
):
    photo = Photo.objects.create(title="w", image=upload(width=200, height=120).read())
    encode_now(photo)
    image = api.get(f"/api/photos/{photo.pk}/").json()["image"]
    first = image["srcset"]["webp"].split(", ")[0].split()[0]  # 64w: 200x120 at 64 px wide
    response = api.get(first.removeprefix(HOST))
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.content)).size == (64, 38)
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, URL_MAX_SIZE=32)
    assert api.get(first.removeprefix(HOST)).status_code == 404  # the limit was lowered since

"""Signed picture URLs, the view behind them and the template tags."""

from __future__ import annotations

import io
import time

import pytest
from django.db import connection
from django.template import Context, Template
from django.test.utils import CaptureQueriesContext
from PIL import Image

from latentstore import signing
from latentstore.decoding import fit_size, get_cache, key_for, picture_bytes
from latentstore.fields import LatentsNotReady
from project.models import Photo
from tests.conftest import latentstore_config
from tests.test_field import encode_now
from tests.testapp.models import Item
from tests.tiny import image_bytes, make_test_image

pytestmark = pytest.mark.django_db


@pytest.fixture
def ready_photo(png_bytes):
    photo = Photo.objects.create(title="r", image=png_bytes)
    encode_now(photo)
    assert photo.image.state == "ready", photo.image.error
    return photo


def decode_messages(broker):
    return [args for name, args, _m in broker("latents.decode") if name == "latentstore.decode"]


def test_cached_decode_is_served_with_etag_and_long_cache_control(client, ready_photo):
    cached = ready_photo.image.decoded_bytes(size=32, format="webp")
    url = ready_photo.image.url(size=32)
    assert url.startswith("/latents/p/") and url.endswith(".webp")
    response = client.get(url)
    assert response.status_code == 200
    assert response["Content-Type"] == "image/webp"
    assert response.content == cached
    cache_control = response["Cache-Control"]
    assert "public" in cache_control and "immutable" in cache_control
    assert "max-age=31536000" in cache_control
    etag = response["ETag"]
    assert etag.startswith('"' + ready_photo.image.digest) and "32x19-webp" in etag

    again = client.get(url, headers={"if-none-match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again["ETag"] == etag
    other = client.get(url, headers={"if-none-match": '"something-else"'})
    assert other.status_code == 200


def test_cold_cache_serves_the_preview_and_schedules_one_warm_up(client, broker, ready_photo):
    broker("latents.decode")
    url = ready_photo.image.url(size=32)
    response = client.get(url)
    assert response.status_code == 200
    assert "no-cache" in response["Cache-Control"] and "immutable" not in response["Cache-Control"]
    assert response["ETag"].startswith('W/"')
    target = fit_size((40, 24), 32)
    expected = picture_bytes(ready_photo.image.preview(target), "WEBP")
    assert response.content == expected

    again = client.get(url)  # still cold: the same preview, no second decode task
    assert again.content == expected
    # The warm-up decodes the size's lossless master, which every format of the size shares.
    key, _ = key_for(ready_photo.image, "default", (32, 32), "PNG")
    assert decode_messages(broker) == [
        ["demo.Photo", ready_photo.pk, "image", "default", list(target), "PNG", key]
    ]
    revalidated = client.get(url, headers={"if-none-match": response["ETag"]})
    assert revalidated.status_code == 304


def test_the_warm_up_decode_makes_the_next_view_sharp(client, celery_worker, ready_photo):
    url = ready_photo.image.url(size=32)
    preview = client.get(url)
    assert preview["ETag"].startswith('W/"')
    key, _ = key_for(ready_photo.image, "default", (32, 32), "PNG")  # the size's master
    deadline = time.monotonic() + 60
    while get_cache().get(key) is None:
        assert time.monotonic() < deadline, "the warm-up decode never reached the cache"
        time.sleep(0.05)
    sharp = client.get(url)
    assert sharp.status_code == 200 and not sharp["ETag"].startswith("W/")
    assert sharp.content == ready_photo.image.decoded_bytes(size=32, format="webp")
    assert sharp.content != preview.content


def test_instant_decoder_is_rendered_and_cached_without_a_warm_up(client, broker, ready_photo):
    broker("latents.decode")
    url = ready_photo.image.url(decoder="rgb", size=(30, 30), format="png")
    response = client.get(url)
    assert response.status_code == 200 and response["Content-Type"] == "image/png"
    assert "immutable" in response["Cache-Control"]
    assert Image.open(io.BytesIO(response.content)).size == (30, 18)
    assert decode_messages(broker) == []
    key, _ = key_for(ready_photo.image, "rgb", (30, 30), "PNG")
    assert get_cache().get(key) == response.content


def test_tampered_unsigned_and_foreign_tokens_are_refused_without_a_query(client, ready_photo):
    url = ready_photo.image.url(size=32)
    token = url.removeprefix("/latents/p/").removesuffix(".webp")
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    with CaptureQueriesContext(connection) as queries:
        assert client.get(f"/latents/p/{flipped}.webp").status_code == 403
        assert client.get("/latents/p/garbage.webp").status_code == 403
        forged = signing.signing.Signer(salt="another-salt").sign_object(["x"])
        assert client.get(f"/latents/p/{forged}.webp").status_code == 403
    assert len(queries) == 0, "a bad signature must not reach the database"
    assert client.get(f"/latents/p/{token}.png").status_code == 404  # format is signed too


def test_sizes_are_bounded(client, settings, tiny_vae_dir, ready_photo):
    with pytest.raises(ValueError, match="URL_MAX_SIZE"):
        ready_photo.image.url(size=5000)
    with pytest.raises(ValueError):
        ready_photo.image.url(size=0)
    url = ready_photo.image.url(size=1024)
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, URL_MAX_SIZE=512)
    assert client.get(url).status_code == 404, "a limit lowered later applies to old URLs"


def test_expired_urls_are_refused(client, settings, tiny_vae_dir, ready_photo):
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, URL_EXPIRES=600)
    ready_photo.image.decoded_bytes(decoder="rgb", size=32, format="webp")
    old = signing.url_for(ready_photo.image, "rgb", 32, now=time.time() - 10_000)
    response = client.get(old)
    assert response.status_code == 403 and b"expired" in response.content
    fresh = ready_photo.image.url(decoder="rgb", size=32)
    assert fresh == ready_photo.image.url(decoder="rgb", size=32), "URLs are stable"
    response = client.get(fresh)
    assert response.status_code == 200
    max_age = int(response["Cache-Control"].split("max-age=")[1].split(",")[0])
    assert 0 < max_age <= 600 + 600 // 8


def test_rows_that_changed_or_vanished_are_404(client, ready_photo):
    url = ready_photo.image.url(size=32)
    ready_photo.image = image_bytes(make_test_image(40, 24, seed=5), "PNG")
    ready_photo.save()
    assert client.get(url).status_code == 404  # pending now
    encode_now(ready_photo)
    assert client.get(url).status_code == 404  # other latents now
    fresh = ready_photo.image.url(size=32)
    assert client.get(fresh).status_code == 200
    ready_photo.delete()
    assert client.get(fresh).status_code == 404


def test_corrupt_latents_get_an_error_picture_not_a_crash(client, ready_photo):
    blob = bytearray(ready_photo.image.blob)
    blob[-40] ^= 0xFF  # a payload byte: the checksum no longer matches
    Photo.objects.filter(pk=ready_photo.pk).update(image=bytes(blob))
    response = client.get(ready_photo.image.url(size=32))
    assert response.status_code == 200  # an error badge in the page, not a server error
    assert response["Content-Type"] == "image/svg+xml"
    assert response["X-Latentstore-Error"] == "unreadable latents: LatentFormatError"
    assert b"unreadable latents" in response.content and b"checksum" in response.content
    assert "no-store" in response["Cache-Control"]


def test_a_changed_decoder_serves_the_current_picture_uncached(
    client, settings, tiny_vae_dir, ready_photo
):
    url = ready_photo.image.url(decoder="rgb", size=32)
    settings.LATENTSTORE = latentstore_config(
        tiny_vae_dir,
        DECODERS={"rgb": {"BACKEND": "latentstore.decoders.LatentRGBDecoder", "OPTIONS": {"v": 2}}},
    )
    response = client.get(url)
    assert response.status_code == 200
    assert "no-cache" in response["Cache-Control"]


def test_url_needs_a_ready_image_and_works_with_uuid_keys(png_bytes):
    photo = Photo.objects.create(title="p", image=png_bytes)
    with pytest.raises(LatentsNotReady):
        photo.image.url()
    item = Item.objects.create(name="u", picture=png_bytes)
    encode_now(item, "picture")
    assert item.picture.url(decoder="rgb", size=16).endswith(".webp")


def test_uuid_rows_are_served(client, png_bytes):
    item = Item.objects.create(name="u", picture=png_bytes)
    encode_now(item, "picture")
    response = client.get(item.picture.url(decoder="rgb", size=16, format="jpeg"))
    assert response.status_code == 200 and response["Content-Type"] == "image/jpeg"


def render(template: str, **context) -> str:
    return Template("{% load latentstore %}" + template).render(Context(context))


def test_template_tag_renders_a_sized_img(ready_photo):
    html = render(
        '{% latent_img photo.image size=32 alt="a cat" class="thumb" %}', photo=ready_photo
    )
    src = ready_photo.image.url(size=32)
    assert f'src="{src}"' in html
    assert 'width="32"' in html and 'height="19"' in html
    assert 'alt="a cat"' in html and 'class="latent-img latent-img-ready thumb"' in html
    assert 'loading="lazy"' in html
    hidpi = render("{% latent_img photo.image size=32 density=2 %}", photo=ready_photo)
    assert ready_photo.image.url(size=64) in hidpi and 'width="32"' in hidpi
    assert render("{% latent_url photo.image size=32 %}", photo=ready_photo) == src
    small = render("{% latent_img photo.image size=256 upscale=False %}", photo=ready_photo)
    assert ready_photo.image.url() in small and 'width="40"' in small


def test_template_tag_placeholders_for_pending_failed_and_empty(png_bytes):
    pending = Photo.objects.create(title="p", image=png_bytes)
    html = render("{% latent_img photo.image %}", photo=pending)
    assert "latentstore/pending.svg" in html and 'width="40"' in html and 'height="24"' in html
    assert 'data-latent-state="pending"' in html
    assert render("{% latent_url photo.image %}", photo=pending) == ""

    failed = Photo.objects.create(title="f", image=png_bytes)
    Photo.objects.filter(pk=failed.pk).update(image_state="failed", image_error="broken <file>")
    failed.image.refresh()
    html = render("{% latent_img photo.image size=20 %}", photo=failed)
    assert "latentstore/failed.svg" in html and 'title="broken &lt;file&gt;"' in html

    empty = Photo.objects.create(title="e")
    assert render("{% latent_img photo.image %}", photo=empty) == ""
    assert render("{% latent_img nothing %}") == ""


def test_missing_urls_are_a_check_warning_and_a_clear_error(settings, ready_photo):
    from django.core.exceptions import ImproperlyConfigured

    from latentstore.checks import check_urls

    assert check_urls() == []
    settings.ROOT_URLCONF = "tests.urls_without_latentstore"
    (warning,) = check_urls()
    assert warning.id == "latentstore.W001"
    with pytest.raises(ImproperlyConfigured, match=r"include\('latentstore.urls'\)"):
        ready_photo.image.url()

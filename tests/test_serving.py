"""What a deployment trial broke in the picture view, each fixed: formats that cannot hold a
size, tokens signed before expiry was required, revoking every URL, malformed tokens, and large
previews rendered again on every request."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from latentstore import decoding, signing
from latentstore.pictures import FORMAT_LIMITS, fitting_format, picture_bytes, sniff_format
from project.models import Photo
from tests.conftest import latentstore_config
from tests.test_field import encode_now
from tests.tiny import image_bytes, make_test_image

pytestmark = pytest.mark.django_db


def ready(width: int, height: int, seed: int = 0) -> Photo:
    photo = Photo.objects.create(
        title="p", image=image_bytes(make_test_image(width, height, seed=seed), "PNG")
    )
    encode_now(photo)
    assert photo.image.state == "ready", photo.image.error
    return photo


def test_each_format_falls_back_to_one_that_holds_the_size():
    assert fitting_format("WEBP", (16383, 1)) == "WEBP"
    assert fitting_format("WEBP", (16384, 1)) == "JPEG"
    assert fitting_format("AVIF", (70000, 2)) == "PNG"
    assert fitting_format("JPEG", (65501, 1)) == "PNG"
    assert FORMAT_LIMITS["PNG"] is None
    wide = Image.new("RGB", (20000, 1), (200, 10, 10))
    data = picture_bytes(wide, "WEBP")  # Pillow alone: "Image size exceeds WebP limit"
    assert sniff_format(data) == "JPEG" and Image.open(io.BytesIO(data)).size == (20000, 1)
    assert sniff_format(picture_bytes(Image.new("RGB", (70000, 1)), "AVIF")) == "PNG"
    for fmt in ("PNG", "WEBP", "JPEG", "AVIF"):
        assert sniff_format(picture_bytes(Image.new("RGB", (8, 8)), fmt)) == fmt


@pytest.mark.parametrize(("width", "served"), [(50000, "JPEG"), (70000, "PNG")])
def test_a_picture_wider_than_webp_holds_is_served_in_a_format_that_holds_it(client, width, served):
    photo = ready(width, 1)
    response = client.get(photo.image.url(decoder="rgb"))  # full size, WebP asked for
    assert response.status_code == 200
    assert response["Content-Type"] == f"image/{served.lower()}"
    assert response["X-Latentstore-Format"] == f"{served}; WEBP cannot hold this size"
    assert Image.open(io.BytesIO(response.content)).size == (width, 1)
    # The default decoder too, through the cache (decoded once, in PNG, then converted).
    data = photo.image.decoded_bytes(format="webp")
    assert sniff_format(data) == served and Image.open(io.BytesIO(data)).size == (width, 1)


def test_a_server_that_requires_expiry_refuses_urls_signed_without_one(
    client, settings, tiny_vae_dir
):
    photo = ready(40, 24)
    forever = photo.image.url(size=32, decoder="rgb")
    assert client.get(forever).status_code == 200
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, URL_EXPIRES=60)
    refused = client.get(forever)
    assert refused.status_code == 403 and b"expir" in refused.content
    assert client.get(photo.image.url(size=32, decoder="rgb")).status_code == 200


def test_changing_the_url_salt_revokes_every_url(client, settings, tiny_vae_dir):
    photo = ready(40, 24)
    before = photo.image.url(size=32, decoder="rgb")
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, URL_SALT="2026-12-07")
    assert client.get(before).status_code == 403
    after = photo.image.url(size=32, decoder="rgb")
    assert after != before and client.get(after).status_code == 200


def _payload(photo: Photo, **changes) -> list:
    """A well-formed token payload of ``photo`` (as sign() writes it), with ``changes``."""
    fields = {
        "version": signing.TOKEN_VERSION,
        "label": "demo.photo",
        "pk": photo.pk,
        "field": "image",
        "decoder": "rgb",
        "box": [32, 32],
        "format": "WEBP",
        "digest": photo.image.digest,
        "fingerprint": decoding.decoder_fingerprint("rgb", photo.image.autoencoder),
        "expires": None,
        **changes,
    }
    return list(fields.values())


@pytest.mark.parametrize(
    "changes",
    [
        {"expires": "soon"},
        {"expires": True},
        {"expires": [1]},
        {"pk": [1]},
        {"pk": True},
        {"box": ["32", 32]},
        {"box": [0, 32]},
        {"box": [32]},
        {"box": {"w": 32}},
        {"version": "1"},
        {"label": 5},
        {"field": None},
        {"decoder": ["rgb"]},
        {"format": 7},
        {"digest": 1.5},
        {"fingerprint": {}},
    ],
    ids=lambda c: ",".join(f"{k}={v!r}" for k, v in c.items()),
)
def test_a_validly_signed_malformed_token_is_refused_never_a_500(client, changes):
    photo = ready(40, 24)
    assert client.get(signing.url_prefix() + signing._sign_object(_payload(photo)) + ".webp")
    token = signing._sign_object(_payload(photo, **changes))
    response = client.get(f"{signing.url_prefix()}{token}.webp")
    assert response.status_code in (403, 404), response.status_code
    # The same in a picture-set token, whose boxes and formats are lists.
    names = ["version", "label", "pk", "field", "decoder", "box", "format", "digest",
             "fingerprint", "expires"]  # fmt: skip
    bad_set = _payload(photo, version=signing.SET_VERSION, box=[[32, 32]], format=["WEBP"])
    for name, value in changes.items():
        bad_set[names.index(name)] = [value] if name in ("box", "format") else value
    set_token = signing._sign_object(bad_set)
    response = client.get(f"{signing.url_prefix()}{set_token}/0.webp")
    assert response.status_code in (403, 404), response.status_code


def test_a_well_formed_token_still_reads():
    photo = ready(40, 24)
    ref = signing.read(signing._sign_object(_payload(photo, expires=4102444800.5)))
    assert ref.size == (32, 32) and ref.expires == 4102444800.5


def test_a_large_preview_is_bounded_and_rendered_once(client, monkeypatch, settings, tiny_vae_dir):
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, URL_MAX_SIZE=4096)
    photo = ready(1600, 1200)
    renders = []
    real = decoding.preview_picture

    def counted(header, latents, size):
        renders.append(size)
        return real(header, latents, size)

    monkeypatch.setattr(decoding, "preview_picture", counted)
    url = photo.image.url(size=1500)  # default decoder, not decoded yet: the preview
    first = client.get(url)
    assert first.status_code == 200 and first["ETag"].startswith('W/"')
    assert max(Image.open(io.BytesIO(first.content)).size) == 512, "PREVIEW_MAX_SIDE"
    for _ in range(5):
        again = client.get(url)
        assert again.content == first.content
    assert renders == [(512, 384)], "rendered once, then from the cache"


def test_tokens_of_djangos_own_signer_read_and_fallback_keys_count(settings):
    from django.core.signing import BadSignature, Signer

    photo = ready(40, 24)
    payload = _payload(photo)
    django_token = Signer(salt=signing.SALT).sign_object(payload)
    assert django_token == signing._sign_object(payload)
    assert signing.read(django_token).pk == photo.pk
    old_key = settings.SECRET_KEY
    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = "a-new-key-" + "x" * 40, [old_key]
    assert signing.read(django_token).pk == photo.pk, "signed with a fallback key"
    settings.SECRET_KEY_FALLBACKS = []
    with pytest.raises(BadSignature):
        signing.read(django_token)
    with pytest.raises(BadSignature):
        signing.read(django_token[:-2] + "xx")


def test_a_warm_picture_of_a_row_verified_a_moment_ago_needs_no_query(
    client, settings, tiny_vae_dir, django_assert_num_queries
):
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, URL_ROW_CHECK_SECONDS=1)
    photo = ready(40, 24)
    url = photo.image.url(size=32, decoder="rgb")
    assert client.get(url).status_code == 200  # verified in a query, rendered, cached
    with django_assert_num_queries(0):
        assert client.get(url).status_code == 200
    Photo.objects.filter(pk=photo.pk).delete()
    assert client.get(url).status_code == 200, "within the documented bound"
    time.sleep(1.1)
    assert client.get(url).status_code == 404, "past it, the row is asked for again"


def test_without_the_row_check_every_request_queries(
    client, settings, tiny_vae_dir, django_assert_num_queries
):
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, URL_ROW_CHECK_SECONDS=0)
    photo = ready(40, 24)
    url = photo.image.url(size=32, decoder="rgb")
    assert client.get(url).status_code == 200
    with django_assert_num_queries(1):
        assert client.get(url).status_code == 200
    Photo.objects.filter(pk=photo.pk).delete()
    assert client.get(url).status_code == 404

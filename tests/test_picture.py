"""``{% latent_picture %}``: responsive ``<picture>`` markup, parsed with a real HTML parser, every
URL in it fetched; AVIF, WebP and JPEG from one decode per size; a page of 100 pictures."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import uuid
from html.parser import HTMLParser

import pytest
from django.db import connection
from django.template import Context, Template
from django.test.utils import CaptureQueriesContext
from PIL import Image

from latentstore.html import picture_candidates
from latentstore.queries import without_blobs
from latentstore_workers import tasks as worker_tasks
from latentstore_workers.decoders import VAEDecoder
from project.models import Photo
from tests.conftest import latentstore_config
from tests.rows import make_rows
from tests.test_field import encode_now
from tests.tiny import image_bytes, make_test_image

pytestmark = pytest.mark.django_db

PIL_FORMATS = {"image/avif": "AVIF", "image/webp": "WEBP", "image/jpeg": "JPEG"}


class CountingVAEDecoder(VAEDecoder):
    """The real VAE decoder, counting the pictures it decodes (in this process)."""

    calls: list[tuple[int, int]] = []

    def decode(self, header, latents):
        CountingVAEDecoder.calls.append((header.width, header.height))
        return super().decode(header, latents)

    def decode_batch(self, items):
        CountingVAEDecoder.calls.extend((header.width, header.height) for header, _z in items)
        return super().decode_batch(items)


class Markup(HTMLParser):
    """The elements of a fragment, as ``(tag, attributes)`` in document order."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.closed: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        self.closed.append(tag)

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for name, attrs in self.elements if name == tag]

    def one(self, tag: str) -> dict[str, str | None]:
        (found,) = self.all(tag)
        return found


def render(template: str, **context) -> str:
    return Template("{% load latentstore %}" + template).render(Context(context))


def candidates(srcset: str) -> list[tuple[str, int]]:
    """``"u1 64w, u2 128w"`` -> ``[("u1", 64), ("u2", 128)]``."""
    out = []
    for item in srcset.split(","):
        url, descriptor = item.split()
        assert descriptor.endswith("w"), descriptor
        out.append((url, int(descriptor[:-1])))
    return out


def fetch(client, url: str):
    response = client.get(url)
    assert response.status_code == 200, (url, response.status_code)
    picture = Image.open(io.BytesIO(response.content))
    return response, picture


@pytest.fixture
def photo():
    photo = Photo.objects.create(
        title="r", image=image_bytes(make_test_image(200, 120, seed=5), "PNG")
    )
    encode_now(photo)
    assert photo.image.state == "ready", photo.image.error
    return photo


def test_picture_has_a_source_per_format_and_a_jpeg_fallback(client, photo):
    html = render(
        '{% latent_picture photo.image widths="64 128 400" sizes="(min-width: 800px) 50vw, 100vw"'
        ' formats="avif webp" alt="a cat" class="hero" loading="eager" %}',
        photo=photo,
    )
    markup = Markup(html)
    assert [tag for tag, _a in markup.elements] == ["picture", "source", "source", "img"]
    assert markup.closed == ["picture"]
    assert markup.one("picture")["data-latent-state"] == "ready"
    sources = markup.all("source")
    assert [s["type"] for s in sources] == ["image/avif", "image/webp"]
    for source in sources:
        assert source["sizes"] == "(min-width: 800px) 50vw, 100vw"
        # 400 is above the picture's own 200 px: left out, the picture's own width instead.
        assert [w for _u, w in candidates(source["srcset"])] == [64, 128, 200]
    img = markup.one("img")
    assert img["src"].endswith(".jpg")
    assert (img["width"], img["height"]) == ("128", "77")  # the middle width, aspect kept
    assert img["alt"] == "a cat" and img["loading"] == "eager" and img["decoding"] == "async"
    assert img["class"].split() == ["latent-img", "latent-img-ready", "hero"]

    # Every URL in the markup serves its format at its width (the instant preview while cold).
    for source in sources:
        for url, width in candidates(source["srcset"]):
            response, picture = fetch(client, url)
            assert response["Content-Type"] == source["type"]
            assert picture.format == PIL_FORMATS[source["type"]]
            assert picture.size == (width, round(120 * width / 200)), url
    response, picture = fetch(client, img["src"])
    assert response["Content-Type"] == "image/jpeg" and picture.format == "JPEG"
    assert picture.size == (128, 77)


def test_every_format_comes_from_one_decode_per_size(client, broker, settings, tiny_vae_dir):
    settings.LATENTSTORE = latentstore_config(
        tiny_vae_dir,
        DECODERS={
            "counting": {
                "BACKEND": "tests.test_picture.CountingVAEDecoder",
                "OPTIONS": {"autoencoder": "default"},
            }
        },
    )
    photo = Photo.objects.create(
        title="c", image=image_bytes(make_test_image(200, 120, seed=6), "PNG")
    )
    encode_now(photo)
    CountingVAEDecoder.calls.clear()
    broker("latents.decode")
    html = render(
        '{% latent_picture photo.image widths="64 128 400" formats="avif webp"'
        ' decoder="counting" %}',
        photo=photo,
    )
    markup = Markup(html)
    urls = [
        (url, width, source["type"])
        for source in markup.all("source")
        for url, width in candidates(source["srcset"])
    ]
    urls.append((markup.one("img")["src"], 128, "image/jpeg"))
    assert len(urls) == 7  # 3 widths (64, 128, the own 200) x (AVIF, WebP) + the JPEG

    for url, _width, _type in urls:  # cold: previews, and warm-ups
        assert client.get(url)["ETag"].startswith('W/"')
    messages = [args for name, args, _m in broker("latents.decode") if name == "latentstore.decode"]
    # One warm-up per size (3 sizes), each for the lossless master: not one per format.
    assert sorted(tuple(args[4]) for args in messages) == [(64, 38), (128, 77), (200, 120)]
    assert {args[5] for args in messages} == {"PNG"}
    for args in messages:  # what a worker does with them, here
        assert worker_tasks.decode.apply(args=args).get() == "ok"
    assert len(CountingVAEDecoder.calls) == 3

    for url, width, content_type in urls:  # warm: sharp, each format made from its size's master
        response, picture = fetch(client, url)
        assert not response["ETag"].startswith("W/"), url
        assert "immutable" in response["Cache-Control"]
        assert response["Content-Type"] == content_type
        assert picture.format == PIL_FORMATS[content_type]
        assert picture.width == width
    assert len(CountingVAEDecoder.calls) == 3, "a format was decoded on its own"

    # decoded_bytes() shares the master the same way: four formats of a new size, one decode.
    for fmt in ("avif", "webp", "jpeg", "png"):
        data = photo.image.decoded_bytes(decoder="counting", size=50, format=fmt)
        assert Image.open(io.BytesIO(data)).size == (50, 30)
    assert len(CountingVAEDecoder.calls) == 4
    # ... and the derived file is the very file a decode straight to that format gives.
    master = photo.image.decoded_bytes(decoder="counting", size=50, format="png")
    from latentstore.decoding import picture_bytes

    assert photo.image.decoded_bytes(decoder="counting", size=50, format="webp") == picture_bytes(
        Image.open(io.BytesIO(master)), "WEBP"
    )


def test_pending_and_ready_share_the_markup_and_the_aspect_ratio(photo):
    pending = Photo.objects.create(
        title="p", image=image_bytes(make_test_image(200, 120, seed=5), "PNG")
    )
    template = '{% latent_picture photo.image widths="64 128" alt="soon" class="x" %}'
    before = Markup(render(template, photo=pending))
    assert [tag for tag, _a in before.elements] == ["picture", "img"]
    assert before.one("picture")["data-latent-state"] == "pending"
    img = before.one("img")
    assert img["src"].endswith("latentstore/pending.svg") and img["alt"] == "soon"
    assert (img["width"], img["height"]) == ("128", "77")

    encode_now(pending)
    after = Markup(render(template, photo=pending))
    assert [tag for tag, _a in after.elements] == ["picture", "source", "source", "img"]
    ready_img = after.one("img")
    assert (ready_img["width"], ready_img["height"]) == (img["width"], img["height"])
    assert ready_img["class"].split()[-1] == img["class"].split()[-1] == "x"


def test_failed_empty_and_broken_pictures_never_raise(settings, tiny_vae_dir, photo, caplog):
    (failed_pk,) = make_rows(1, "failed")
    failed = Photo.objects.get(pk=failed_pk)
    markup = Markup(render('{% latent_picture photo.image alt="A cat" %}', photo=failed))
    img = markup.one("img")
    assert img["src"].endswith("latentstore/failed.svg") and img["alt"] == "A cat"
    assert img["title"] == "The image could not be read: broken"
    assert (img["width"], img["height"]) == ("40", "24")
    assert markup.one("picture")["data-latent-state"] == "failed"

    settings.LATENTSTORE = latentstore_config(
        tiny_vae_dir, PICTURE_PLACEHOLDER="img/missing-photo.png"
    )
    img = Markup(render("{% latent_picture photo.image %}", photo=failed)).one("img")
    assert img["src"].endswith("img/missing-photo.png")
    assert img["alt"] == "The image could not be read: broken"  # no alt given: the error

    empty = Photo.objects.create(title="e")
    assert render("{% latent_picture photo.image %}", photo=empty) == ""
    assert render("{% latent_picture nothing %}") == ""

    # A decoder alias that no longer exists, URLs not included: logged, shown as failed.
    with caplog.at_level(logging.WARNING, logger="latentstore.html"):
        img = Markup(render('{% latent_picture p.image decoder="gone" %}', p=photo)).one("img")
    assert img["data-latent-state"] == "failed" and "gone" in img["title"]
    assert "Cannot link the picture" in caplog.text
    settings.ROOT_URLCONF = "tests.urls_without_latentstore"
    img = Markup(render("{% latent_picture p.image %}", p=photo)).one("img")
    assert img["data-latent-state"] == "failed" and "latentstore.urls" in img["title"]


def test_defaults_come_from_settings(settings, tiny_vae_dir, photo):
    settings.LATENTSTORE = latentstore_config(
        tiny_vae_dir, PICTURE_WIDTHS=(48, 96), PICTURE_FORMATS=("webp",), PICTURE_SIZES="33vw"
    )
    markup = Markup(render("{% latent_picture photo.image %}", photo=photo))
    source = markup.one("source")
    assert source["type"] == "image/webp" and source["sizes"] == "33vw"
    assert [w for _u, w in candidates(source["srcset"])] == [48, 96]  # both below 200: no own
    assert markup.one("img")["width"] == "96"
    upscaled = Markup(
        render('{% latent_picture photo.image widths="100 300" upscale=True %}', photo=photo)
    )
    assert [w for _u, w in candidates(upscaled.one("source")["srcset"])] == [100, 300]

    with pytest.raises(ValueError, match="Unsupported format"):
        render('{% latent_picture photo.image formats="gif" %}', photo=photo)
    with pytest.raises(ValueError, match="whole numbers"):
        render('{% latent_picture photo.image widths="wide" %}', photo=photo)


def test_candidates_leave_out_boxes_above_the_url_limit(settings, tiny_vae_dir):
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, URL_MAX_SIZE=500)
    tall = Photo(title="t")
    tall.image_width, tall.image_height, tall.image_state = 100, 1000, "ready"
    # 40 px wide is 400 high (in the limit); 80 px is 800 (not); the own width is unbounded.
    assert picture_candidates(tall.image, [40, 80, 200]) == [(40, (40, 400)), (100, None)]
    assert picture_candidates(tall.image, [80], upscale=True) == []
    unsized = Photo(title="u")
    assert picture_candidates(unsized.image) == []


def test_a_page_of_100_pictures_reads_no_blob_and_runs_one_query():
    make_rows(100, distinct=True)
    template = Template(
        '{% load latentstore %}{% for p in photos %}{% latent_picture p.image widths="16 32" %}'
        "{% endfor %}"
    )
    with CaptureQueriesContext(connection) as queries:
        photos = without_blobs(Photo.objects.order_by("pk"))
        html = template.render(Context({"photos": photos}))
    assert len(queries) == 1, [q["sql"] for q in queries.captured_queries]
    (sql,) = [q["sql"] for q in queries.captured_queries]
    assert '"demo_photo"."image",' not in sql and '"image_staged"' not in sql
    markup = Markup(html)
    assert len(markup.all("picture")) == 100
    assert {p["data-latent-state"] for p in markup.all("picture")} == {"ready"}
    assert len(markup.all("source")) == 200


def test_set_tokens_name_only_what_they_list(client, photo):
    from django.core import signing as django_signing

    from latentstore import signing

    payload = [2, "demo.photo", photo.pk, "image", "default", [[64, 39], None], ["AVIF"], "ab"]
    # The fast signer writes exactly what Django's Signer writes (and so reads back).
    assert signing._sign_object(payload) == signing._signer().sign_object(payload)
    base = signing.set_base(photo.image, "default", [(64, 39), None], ["avif", "jpeg"])
    token = base.removeprefix("/latents/p/").rstrip("/")
    assert signing.read_set(token, 1, "jpg").size is None
    assert signing.read_set(token, 0, "avif").size == (64, 39)
    assert client.get(f"{base}0.avif").status_code == 200
    assert client.get(f"{base}1.jpg").status_code == 200
    assert client.get(f"{base}2.avif").status_code == 404  # not in the list of sizes
    assert client.get(f"{base}0.webp").status_code == 404  # not in the list of formats
    assert client.get(f"{base[:-3]}x/0.avif").status_code == 403  # tampered
    with pytest.raises(django_signing.BadSignature):  # a set token is not a picture token
        signing.read(token)


def test_set_tokens_pack_any_primary_key_and_digest_under_a_keyed_mac(photo, settings):
    from latentstore import signing

    signer = signing.SetSigner("default", ["avif", "jpeg"], preview=("rgb", 64, "webp"))
    boxes = ((64, 39), None)
    uuid_pk = uuid.UUID("12345678-1234-5678-1234-567812345678")
    keys = [photo.pk, 'a-slug "quoted" é', 2**70, "x" * 300, uuid_pk]
    digests = ["914321846061550ad61e31834422a34f", "ab12", "NOT-HEX", "AB12", ""]
    for pk, digest in zip(keys, digests, strict=True):
        token = signer.sign("demo.photo", pk, "image", digest, "default", boxes)
        value, mac = token.split(":")
        packed = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        # The MAC is keyed BLAKE2b-128 of the bytes, keyed as Django's Signer keys its HMAC.
        key = hashlib.sha256(f"{signing._salt()}signer{settings.SECRET_KEY}".encode()).digest()
        expected = hashlib.blake2b(packed, key=key, digest_size=16).digest()
        assert mac == base64.urlsafe_b64encode(expected).decode().rstrip("=")
        ref = signing.read_set(token, 0, "avif")
        want_pk = str(pk) if isinstance(pk, uuid.UUID) else pk
        assert (ref.label, ref.pk, ref.field, ref.decoder) == (
            "demo.photo",
            want_pk,
            "image",
            "default",
        )
        assert (ref.size, ref.format, ref.digest, ref.expires) == ((64, 39), "AVIF", digest, None)
        assert ref.fingerprint == signing.decoder_fingerprint("default", "default")
        assert signing.read_set(token, 1, "jpg").size is None
        preview = signing.read_set(token, signing.PREVIEW_INDEX, "webp")
        assert (preview.decoder, preview.size, preview.format) == ("rgb", (64, 64), "WEBP")
        assert preview.fingerprint == signing.decoder_fingerprint("rgb", "default")
    short = signer.sign("demo.photo", 7, "image", digests[0], "default", ((320, 214),) * 5)
    assert len(short) < 170, "a five-size set with a preview stays short"


def test_a_set_token_carries_its_expiry(photo, settings, tiny_vae_dir):
    from django.core import signing as django_signing

    from latentstore import signing

    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, URL_EXPIRES=800)
    token = signing.sign_set(photo.image, "default", [None], ["webp"], now=1_000_000)
    assert signing.read_set(token, 0, "webp", now=1_000_000).expires == 1_000_800
    with pytest.raises(signing.URLExpired):
        signing.read_set(token, 0, "webp", now=1_000_800)
    for cut in (token[:-1], token.replace(":", ":A", 1), token[:10] + token[12:]):
        with pytest.raises(django_signing.BadSignature):
            signing.read_set(cut, 0, "webp", now=1_000_000)


def test_a_set_token_serves_its_preview_and_old_tokens_still_read(client, photo, settings):
    from django.core import signing as django_signing

    from latentstore import signing

    base = signing.set_base(photo.image, "default", [None], ["webp"], preview=("rgb", 32, "webp"))
    token = base.removeprefix("/latents/p/").rstrip("/")
    preview = signing.read_set(token, signing.PREVIEW_INDEX, "webp")
    assert (preview.decoder, preview.size, preview.format) == ("rgb", (32, 32), "WEBP")
    assert preview.fingerprint == signing.decoder_fingerprint("rgb", photo.image.autoencoder)
    response = client.get(f"{base}p.webp")
    assert response.status_code == 200
    assert max(Image.open(io.BytesIO(response.content)).size) == 32
    assert client.get(f"{base}p.jpg").status_code == 404  # the preview's format only
    with pytest.raises(LookupError):
        signing.read_set(token, signing.PREVIEW_INDEX, "jpg")

    # A version-2 token (before the preview entry) is still read; it has no preview.
    image = photo.image
    old = [2, "demo.photo", photo.pk, "image", "default", [None], ["WEBP"], image.digest,
           signing.decoder_fingerprint("default", image.autoencoder), None]  # fmt: skip
    old_token = signing._sign_object(old)
    assert client.get(f"/latents/p/{old_token}/0.webp").status_code == 200
    assert client.get(f"/latents/p/{old_token}/p.webp").status_code == 404

    # Signed by us but malformed: refused as a bad token (403), never a 500.
    def packed_token(raw: bytes) -> str:
        key = signing._mac_key(signing._salt(), settings.SECRET_KEY)
        mac = hashlib.blake2b(raw, key=key, digest_size=16).digest()
        return f"{signing._b64(raw).decode()}:{signing._b64(mac).decode()}"

    good = signing._unsign_packed(token)
    assert packed_token(good) == token
    bad_tokens = [packed_token(raw) for raw in (
        good[:-1],  # truncated
        good + b"\x00",  # trailing bytes
        b"\x09" + good[1:],  # an unknown version
        good.replace(b"\x01\x02", b"\x01\x09", 1),  # a format code we do not serve
        b"",
    )]  # fmt: skip
    bad_tokens += [signing._sign_object(bad) for bad in (
        [3, *old[1:]],  # JSON is version 2 only
        [2, *old[1:], None],  # eleven fields
    )]  # fmt: skip
    for bad in bad_tokens:
        with pytest.raises(django_signing.BadSignature):
            signing.read_set(bad, 0, "webp")
        assert client.get(f"/latents/p/{bad}/p.webp").status_code == 403, bad


def test_a_set_token_survives_a_key_rotation_through_the_fallbacks(photo, settings):
    from django.core import signing as django_signing

    from latentstore import signing

    token = signing.sign_set(photo.image, "default", [None], ["webp"])
    old_key = settings.SECRET_KEY
    settings.SECRET_KEY = "a-new-key-" + "x" * 50
    with pytest.raises(django_signing.BadSignature):
        signing.read_set(token, 0, "webp")
    settings.SECRET_KEY_FALLBACKS = [old_key]
    assert signing.read_set(token, 0, "webp").digest == photo.image.digest

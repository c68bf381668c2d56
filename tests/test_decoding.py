"""Decoders, the content-addressed decode cache, refusals and system checks."""

from __future__ import annotations

import pytest
from django.core import checks
from django.core.cache import caches
from django.db import connection
from django.test.utils import CaptureQueriesContext

from latentstore.decoders import BaseDecoder, IncompatibleLatents, InvalidDecoderError, decoders
from latentstore.decoding import fit_size
from latentstore.latents import LatentFormatError
from latentstore_workers import autoencoders
from project.models import Photo
from tests.conftest import latentstore_config, requires_redis
from tests.test_field import encode_now
from tests.test_protocol import wait_for
from tests.tiny import image_bytes, make_test_image

pytestmark = pytest.mark.django_db(transaction=True)


class CountingDecoder(BaseDecoder):
    """A third-party backend registered from settings: flat grey, counting its calls."""

    calls = 0

    def decode(self, header, latents):
        from PIL import Image

        CountingDecoder.calls += 1
        return Image.new("RGB", (header.width, header.height), (self.options["level"],) * 3)


@pytest.fixture
def ready_photo(png_bytes):
    photo = Photo.objects.create(title="r", image=png_bytes)
    encode_now(photo)
    assert photo.image.state == "ready"
    return photo


def test_default_decoder_returns_the_original_size(ready_photo):
    picture = ready_photo.image.decode()
    assert picture.size == (40, 24) and picture.mode == "RGB"
    assert ready_photo.image.decode(size=20).size == (20, 12)
    assert ready_photo.image.decode(decoder="rgb").size == (40, 24)


def test_cache_hit_loads_no_model_and_reads_no_blob(ready_photo):
    first = ready_photo.image.decode()
    autoencoders.clear_cache()
    listed = Photo.objects.defer("image", "image_staged").get(pk=ready_photo.pk)
    with CaptureQueriesContext(connection) as queries:
        again = listed.image.decode()
    assert again.tobytes() == first.tobytes()
    assert autoencoders._cache == {}, "a cache hit must not load the autoencoder"
    assert len(queries) == 0, "a cache hit must not read the blob"


def test_custom_backend_from_settings_is_cached_per_key(settings, tiny_vae_dir, ready_photo):
    settings.LATENTSTORE = latentstore_config(
        tiny_vae_dir,
        DECODERS={
            "grey": {"BACKEND": "tests.test_decoding.CountingDecoder", "OPTIONS": {"level": 99}},
        },
    )
    CountingDecoder.calls = 0
    assert ready_photo.image.decode(decoder="grey").getpixel((0, 0)) == (99, 99, 99)
    ready_photo.image.decode(decoder="grey")
    assert CountingDecoder.calls == 1
    ready_photo.image.decode(decoder="grey", size=10)  # another size is another key
    assert CountingDecoder.calls == 2
    assert decoders.aliases() == ["default", "rgb", "grey"]


def test_reencoded_row_is_never_served_the_old_picture(settings, tiny_vae_dir, ready_photo):
    settings.LATENTSTORE = latentstore_config(
        tiny_vae_dir,
        DECODERS={
            "grey": {"BACKEND": "tests.test_decoding.CountingDecoder", "OPTIONS": {"level": 7}},
        },
    )
    CountingDecoder.calls = 0
    ready_photo.image.decode(decoder="grey")
    ready_photo.image = image_bytes(make_test_image(40, 24, seed=9), "PNG")
    ready_photo.save()
    encode_now(ready_photo)
    ready_photo.image.decode(decoder="grey")
    assert CountingDecoder.calls == 2


def test_vae_decoder_refuses_latents_of_other_weights(settings, other_vae_dir, ready_photo):
    settings.LATENTSTORE = latentstore_config(other_vae_dir)
    with pytest.raises(IncompatibleLatents) as info:
        Photo.objects.get(pk=ready_photo.pk).image.decode()
    message = str(info.value)
    assert ready_photo.image.origin["fingerprint"] in message
    assert "rgb" in message


def test_rgb_decoder_refuses_a_family_it_cannot_read(ready_photo):
    from latentstore.latents import blob_digest, pack

    blob = pack(
        ready_photo.image.latents[:3],
        autoencoder="default",
        family="sd",
        fingerprint="f" * 16,
        scaling_factor=0.18215,
        shift_factor=0.0,
        width=40,
        height=24,
    )
    Photo.objects.filter(pk=ready_photo.pk).update(image=blob, image_digest=blob_digest(blob))
    with pytest.raises(IncompatibleLatents, match="4 channels but these latents have 3"):
        Photo.objects.get(pk=ready_photo.pk).image.decode(decoder="rgb")


def test_unknown_decoder_alias_names_the_configured_ones(ready_photo):
    with pytest.raises(InvalidDecoderError, match="configured: default, rgb"):
        ready_photo.image.decode(decoder="nope")


def test_corrupt_blob_raises_a_clear_error(ready_photo):
    blob = bytearray(ready_photo.image.blob)
    blob[len(blob) // 2] ^= 0xFF
    Photo.objects.filter(pk=ready_photo.pk).update(image=bytes(blob))
    broken = Photo.objects.get(pk=ready_photo.pk)
    assert broken.image.state == "ready" and broken.image.width == 40  # the row still lists
    with pytest.raises(LatentFormatError):
        _ = broken.image.latents
    with pytest.raises(LatentFormatError):
        broken.image.decode(decoder="rgb", size=17)


def test_preview_needs_no_model(ready_photo):
    autoencoders.clear_cache()
    assert ready_photo.image.preview().size == (40, 24)
    assert ready_photo.image.preview(size=(10, 10)).size == (10, 6)
    assert autoencoders._cache == {}


@requires_redis
def test_worker_side_decode_goes_through_the_shared_cache(
    settings, tiny_vae_dir, celery_worker, png_bytes
):
    settings.LATENTSTORE = latentstore_config(
        tiny_vae_dir,
        CACHE="redis",
        DECODERS={
            "default": {
                "BACKEND": "latentstore_workers.decoders.VAEDecoder",
                "OPTIONS": {"RUN": "worker"},
            }
        },
    )
    photo = Photo.objects.create(title="w", image=png_bytes)
    assert wait_for(photo).state == "ready"
    picture = photo.image.decode(size=20)
    assert picture.size == (20, 12)
    keys = [k for k in caches["redis"]._cache.get_client().keys("*") if b":default:" in k]
    assert keys, "the worker should have written the decode into the shared cache"
    caches["redis"].clear()


def test_fit_size():
    assert fit_size((400, 200), None) == (400, 200)
    assert fit_size((400, 200), 100) == (100, 50)
    assert fit_size((200, 400), (100, 100)) == (50, 100)
    with pytest.raises(ValueError):
        fit_size((10, 10), 0)


def _errors(ids):
    from latentstore.checks import check_settings

    return [e for e in check_settings() if e.id in ids]


def test_check_flags_a_decoder_for_a_missing_autoencoder(settings, tiny_vae_dir):
    settings.LATENTSTORE = latentstore_config(
        tiny_vae_dir,
        DECODERS={
            "sdxl": {
                "BACKEND": "latentstore_workers.decoders.VAEDecoder",
                "OPTIONS": {"autoencoder": "sdxl"},
            },
        },
    )
    (error,) = _errors({"latentstore.E008"})
    assert "'sdxl'" in error.msg and isinstance(error, checks.Error)


def test_check_flags_bad_family_dtype_and_cache(settings, tiny_vae_dir):
    config = latentstore_config(tiny_vae_dir, CACHE="missing")
    config["AUTOENCODERS"]["default"].update(FAMILY="sd9", DTYPE="int4")
    settings.LATENTSTORE = config
    assert {
        e.id for e in _errors({"latentstore.E004", "latentstore.E006", "latentstore.E014"})
    } == {"latentstore.E004", "latentstore.E006", "latentstore.E014"}


def test_check_refuses_pickle(monkeypatch):
    from project.celery import app

    monkeypatch.setitem(app.conf, "accept_content", ["json", "pickle"])
    assert _errors({"latentstore.E005"})


def test_the_project_passes_its_own_checks():
    from latentstore.checks import check_settings

    assert check_settings() == []


def test_preview_of_a_padded_image_lines_up_with_the_decoded_picture(png_bytes):
    # Regression: preview() stretched the whole latent grid, encode-time padding included, onto
    # the picture's size, shifting it by up to a cell; the rgb decoder crops the padding off.
    import numpy as np

    from latentstore.latents import blob_digest, pack

    latents = np.random.default_rng(0).normal(0, 8, size=(4, 3, 5)).astype(np.float32)
    blob = pack(
        latents,
        autoencoder="default",
        family="sd",
        fingerprint="0" * 16,
        scaling_factor=0.18215,
        shift_factor=0.0,
        width=37,
        height=21,
    )
    photo = Photo.objects.create(title="odd", image=png_bytes)
    Photo.objects.filter(pk=photo.pk).update(
        image=blob,
        image_state="ready",
        image_digest=blob_digest(blob),
        image_staged=None,
        image_width=37,
        image_height=21,
    )
    photo = Photo.objects.get(pk=photo.pk)
    assert (photo.image.header.pad_right, photo.image.header.pad_bottom) == (3, 3)
    preview = np.asarray(photo.image.preview(), dtype=np.int16)
    decoded = np.asarray(photo.image.decode(decoder="rgb"), dtype=np.int16)
    assert preview.shape == decoded.shape == (21, 37, 3)
    assert np.abs(preview - decoded).mean() < 1.5

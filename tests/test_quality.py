"""The encode-time quality gate: round-trip PSNR in the row, low-fidelity rows, kept originals.

The gate's measurement runs on the shipped ``ls-small`` model (real reconstructions, so a PSNR
means something); the plumbing that does not depend on the picture runs on the tiny model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from django.core import checks
from django.core.files.base import ContentFile
from PIL import Image

from latentstore import encoding
from latentstore.checks import check_settings
from latentstore.fields import LatentImageField
from latentstore.quality import MAX_PSNR, QualityPolicy, psnr
from latentstore.queries import low_fidelity
from latentstore.staging import original_name
from latentstore_workers import tasks as worker_tasks
from project.models import Photo
from tests.conftest import latentstore_config, shipped_config
from tests.test_field import encode_now
from tests.tiny import image_bytes, make_test_image

pytestmark = pytest.mark.django_db(transaction=True)


def natural_png(width=96, height=64) -> bytes:
    """A crop of a held-out photo (ls-small never trained on it)."""
    from latentstore_workers.training.data import load_image

    photo = load_image("skimage:chelsea.png")
    return image_bytes(photo.crop((150, 80, 150 + width, 80 + height)), "PNG")


def noise_png(size=64, seed=0) -> bytes:
    """Dense, independent per-pixel noise: no autoencoder at 8x can keep it."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return image_bytes(Image.fromarray(pixels), "PNG")


# --- psnr -------------------------------------------------------------------------------------


def test_psnr_of_known_errors():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255  # MSE = 255^2 / 48
    assert psnr(a, b) == pytest.approx(10 * math.log10(48))
    assert psnr(a, a) == MAX_PSNR  # identical: capped, finite
    assert psnr(Image.fromarray(a), Image.fromarray(b)) == psnr(a, b)
    c = np.full_like(a, 255)
    assert psnr(a, c) == pytest.approx(0.0)


def test_psnr_refuses_different_shapes():
    with pytest.raises(ValueError, match="shapes"):
        psnr(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        psnr(np.zeros((0, 4), np.uint8), np.zeros((0, 4), np.uint8))


# --- policy -----------------------------------------------------------------------------------


def test_policy_comes_from_the_field_then_the_settings(settings, tiny_vae_dir):
    settings.LATENTSTORE = latentstore_config(
        tiny_vae_dir, QUALITY_CHECK=True, MIN_PSNR=25.0, KEEP_ORIGINAL=True
    )
    assert QualityPolicy.for_field(LatentImageField()) == QualityPolicy(True, 25.0, True)
    field = LatentImageField(quality_check=False, min_psnr=18, keep_original=False)
    assert QualityPolicy.for_field(field) == QualityPolicy(False, 18.0, False)


def test_keeping_low_fidelity_originals_turns_the_check_on(settings, tiny_vae_dir):
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir)  # QUALITY_CHECK off by default
    policy = QualityPolicy.for_field(LatentImageField(keep_original="low_fidelity", min_psnr=20))
    assert policy.check is True
    assert policy.keeps_original(19.9) and not policy.keeps_original(20.0)
    assert policy.keeps_original(None)  # not measured: nothing shows it is faithful
    always = QualityPolicy(check=False, min_psnr=20.0, keep_original=True)
    assert always.keeps_original(None) and always.keeps_original(35.0)
    never = QualityPolicy(check=True, min_psnr=20.0, keep_original=False)
    assert not never.keeps_original(3.0) and never.is_low_fidelity(3.0)


def test_bad_field_options_are_system_check_errors():
    def errors(**options):
        field = LatentImageField(**options)
        field.set_attributes_from_name("image")
        field.model = Photo  # what contribute_to_class would set; check() names the model
        return {e.id for e in field.check()}

    assert errors(keep_original="sometimes") == {"latentstore.E030"}
    assert errors(quality_check="yes") == {"latentstore.E031"}
    assert errors(quality_check=False, keep_original="low_fidelity") == {"latentstore.E032"}
    assert errors(min_psnr="high") == {"latentstore.E033"}
    assert errors(min_psnr=float("nan")) == {"latentstore.E033"}
    assert errors(latent_dtype="int2") == {"latentstore.E011"}
    assert errors(latent_dtype="int4", quality_check=True, min_psnr=21, keep_original=True) == set()


def test_bad_quality_settings_are_system_check_errors(settings, tiny_vae_dir):
    settings.LATENTSTORE = latentstore_config(
        tiny_vae_dir, KEEP_ORIGINAL="maybe", QUALITY_CHECK=1.5, MIN_PSNR="20", LATENT_DTYPE="int2"
    )
    found = {e.id for e in check_settings() if isinstance(e, checks.Error)}
    assert {"latentstore.E034", "latentstore.E035", "latentstore.E036"} <= found
    assert "latentstore.E015" in found
    settings.LATENTSTORE = latentstore_config(
        tiny_vae_dir, KEEP_ORIGINAL="low_fidelity", QUALITY_CHECK=True, MIN_PSNR=22
    )
    assert check_settings() == []


def test_field_options_and_settings_share_the_rules_with_their_own_wording(settings, tiny_vae_dir):
    """One rule set, two wordings: ``name=value`` for a field's options, ``NAME value`` for the
    settings; None is "not set" for a field (it falls back to the settings) but not a setting."""
    field = LatentImageField(keep_original="sometimes", quality_check="yes", min_psnr=True)
    field.set_attributes_from_name("image")
    field.model = Photo
    assert [(e.id, e.msg) for e in field.check()] == [
        ("latentstore.E030", "keep_original='sometimes' is not True, False or 'low_fidelity'."),
        ("latentstore.E031", "quality_check='yes' is not True or False."),
        ("latentstore.E033", "min_psnr=True is not a number of decibels."),
    ]
    settings.LATENTSTORE = latentstore_config(
        tiny_vae_dir, KEEP_ORIGINAL=None, QUALITY_CHECK=None, MIN_PSNR=float("inf")
    )
    found = [(e.id, e.msg, e.hint) for e in check_settings() if e.id in QUALITY_SETTING_IDS]
    assert found == [
        ("latentstore.E034", "KEEP_ORIGINAL None is not True, False or 'low_fidelity'.", None),
        ("latentstore.E035", "QUALITY_CHECK None is not True or False.", None),
        (
            "latentstore.E036",
            "MIN_PSNR inf is not a number of decibels.",
            "A PSNR threshold such as 20.0.",
        ),
    ]


QUALITY_SETTING_IDS = {"latentstore.E034", "latentstore.E035", "latentstore.E036"}


def test_low_fidelity_q_is_the_filter_every_caller_uses(settings, tiny_vae_dir):
    from latentstore.quality import low_fidelity_q

    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, MIN_PSNR=20.0)
    field = Photo._meta.get_field("image")
    pks = [Photo.objects.create(title=f"q{i}").pk for i in range(3)]
    for pk, value in zip(pks, [12.5, 31.0, None], strict=True):
        Photo.objects.filter(pk=pk).update(image_psnr=value)
    assert list(Photo.objects.filter(low_fidelity_q(field)).values_list("pk", flat=True)) == [
        pks[0]
    ]
    above = Photo.objects.filter(low_fidelity_q(field, min_psnr=40.0)).order_by("pk")
    assert list(above.values_list("pk", flat=True)) == pks[:2]  # never measured: never low


def test_new_options_survive_deconstruct():
    field = LatentImageField(keep_original="low_fidelity", quality_check=True, min_psnr=21.5)
    _name, _path, _args, kwargs = field.deconstruct()
    assert kwargs == {"keep_original": "low_fidelity", "quality_check": True, "min_psnr": 21.5}
    assert LatentImageField(**kwargs).deconstruct()[3] == kwargs
    assert "quality_check" not in LatentImageField().deconstruct()[3]


# --- the gate on the tiny model: plumbing -----------------------------------------------------


def test_gate_off_stores_no_psnr(png_bytes):
    photo = Photo.objects.create(title="off", image=png_bytes)
    assert encode_now(photo) == "ready"
    assert photo.image_psnr is None
    assert photo.image.psnr is None and photo.image.low_fidelity is False


def test_gate_that_cannot_decode_records_zero_db(settings, tmp_path, png_bytes):
    """A decoder that overflows to NaN is the worst fidelity there is, not a crash."""
    import torch
    from diffusers import AutoencoderKL

    from tests.tiny import save_tiny_autoencoder

    path = save_tiny_autoencoder(tmp_path / "nan-decoder", seed=0)
    model = AutoencoderKL.from_pretrained(path)
    with torch.no_grad():
        model.decoder.conv_out.bias.fill_(float("nan"))
    model.save_pretrained(path, safe_serialization=True)
    settings.LATENTSTORE = latentstore_config(path, KEEP_ORIGINAL="low_fidelity")
    photo = Photo.objects.create(title="nan", image=png_bytes)
    assert encode_now(photo) == "ready"  # the latents themselves are fine
    assert photo.image.psnr == 0.0 and photo.image.low_fidelity
    assert photo.image.original_bytes() == png_bytes


def test_new_upload_forgets_the_old_measurement(settings, tiny_vae_dir, png_bytes):
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, QUALITY_CHECK=True)
    photo = Photo.objects.create(title="again", image=png_bytes)
    encode_now(photo)
    assert photo.image.psnr is not None
    photo.image = image_bytes(make_test_image(32, 32, seed=9), "PNG")
    assert photo.image.psnr is None  # assigned, not saved: no measurement of this picture yet
    photo.save()
    assert Photo.objects.get(pk=photo.pk).image_psnr is None


def test_stale_low_fidelity_result_removes_the_kept_original(settings, png_bytes):
    """A result dropped as stale must not leave its kept original behind in the storage."""
    settings.LATENTSTORE = shipped_config(KEEP_ORIGINAL="low_fidelity")
    photo = Photo.objects.create(title="stale", image=noise_png())
    claim = encoding.claim(photo._meta.label, photo.pk, "image", str(photo.image_token))
    photo.image = png_bytes  # re-uploaded meanwhile: a new token
    photo.save()
    storage = encoding.originals_storage()
    name = original_name(claim.label, claim.field_name, claim.pk, claim.token)
    assert encoding.write_back(claim, b"LTNT-not-written", "d" * 32, psnr=5.0) is False
    assert not storage.exists(name)
    assert Photo.objects.get(pk=photo.pk).image_psnr is None


# --- the gate on the shipped model: what it measures ------------------------------------------


def test_gate_measures_the_stored_round_trip(settings):
    settings.LATENTSTORE = shipped_config(QUALITY_CHECK=True, MIN_PSNR=20.0)
    upload = natural_png()
    photo = Photo.objects.create(title="cat", image=upload)
    assert encode_now(photo) == "ready"
    stored = Photo.objects.get(pk=photo.pk)
    # The number in the row is the PSNR of what a reader gets back: decode() of the stored blob.
    original = Image.open(ContentFile(upload)).convert("RGB")
    assert stored.image.psnr == pytest.approx(psnr(original, stored.image.decode()), abs=1e-6)
    assert stored.image.psnr > 20.0 and not stored.image.low_fidelity
    assert stored.image_original == ""  # the gate alone keeps nothing


def test_gate_measures_each_row_of_a_batch(settings, broker):
    """One batched round-trip decode gives every row its own number (mixed sizes, noise too)."""
    settings.LATENTSTORE = shipped_config(QUALITY_CHECK=True, MIN_PSNR=20.0)
    uploads = [natural_png(), natural_png(80, 48), noise_png()]
    with encoding.batched_enqueue():  # one batch message, taken off the queue and run here
        photos = [Photo.objects.create(title=f"b{i}", image=u) for i, u in enumerate(uploads)]
    broker("latents.encode")
    items = [[p.pk, str(p.image_token)] for p in photos]
    worker_tasks.encode_batch.apply(args=["demo.Photo", "image", items]).get()
    for photo, upload in zip(photos, uploads, strict=True):
        stored = Photo.objects.get(pk=photo.pk)
        original = Image.open(ContentFile(upload)).convert("RGB")
        assert stored.image.psnr == pytest.approx(psnr(original, stored.image.decode()), abs=1e-6)
    assert [Photo.objects.get(pk=p.pk).image.low_fidelity for p in photos] == [False, False, True]


def test_gate_flags_dense_noise_and_keeps_its_original(settings):
    settings.LATENTSTORE = shipped_config(KEEP_ORIGINAL="low_fidelity", MIN_PSNR=20.0)
    good = Photo.objects.create(title="good", image=natural_png())
    assert encode_now(good) == "ready"
    upload = noise_png()
    # Saved after: on PostgreSQL the first encode would otherwise fill its batch with it.
    bad = Photo.objects.create(title="noise", image=upload)
    assert encode_now(bad) == "ready"

    assert bad.image.psnr < 12.0, bad.image.psnr  # per-pixel noise: nothing of it survives 8x
    assert bad.image.low_fidelity
    assert bad.image_original.startswith("latentstore/originals/demo.photo/image/")
    assert bad.image.original_bytes() == upload  # nothing lost
    assert bad.image_staged is None

    assert good.image.psnr > 20.0 and not good.image.low_fidelity
    assert good.image_original == "" and good.image.original_bytes() is None

    # Finding the rows to look at: the helper and the plain filter agree.
    assert list(low_fidelity(Photo.objects.all())) == [bad]
    assert list(Photo.objects.filter(image_psnr__lt=20.0)) == [bad]
    assert list(low_fidelity(Photo.objects.all(), "image", min_psnr=99.0).order_by("pk")) == [
        good,
        bad,
    ]


def test_gate_flags_without_keeping_when_originals_are_not_kept(settings):
    settings.LATENTSTORE = shipped_config(QUALITY_CHECK=True, KEEP_ORIGINAL=False)
    bad = Photo.objects.create(title="noise", image=noise_png(seed=1))
    encode_now(bad)
    assert bad.image.low_fidelity
    assert bad.image_original == "" and bad.image.original_bytes() is None


def test_threshold_is_read_when_asked(settings):
    """low_fidelity compares the stored number with the field's current threshold."""
    settings.LATENTSTORE = shipped_config(QUALITY_CHECK=True, MIN_PSNR=20.0)
    photo = Photo.objects.create(title="cat", image=natural_png())
    encode_now(photo)
    assert not photo.image.low_fidelity
    settings.LATENTSTORE = shipped_config(QUALITY_CHECK=True, MIN_PSNR=photo.image.psnr + 0.01)
    assert photo.image.low_fidelity
    assert list(low_fidelity(Photo.objects.all())) == [photo]


def test_low_fidelity_helper_needs_one_field():
    with pytest.raises(ValueError, match="candidates: image"):
        low_fidelity(Photo.objects.all(), "picture")


def test_real_worker_stores_the_psnr(settings, celery_worker):
    from tests.test_protocol import wait_for

    settings.LATENTSTORE = shipped_config(QUALITY_CHECK=True, KEEP_ORIGINAL="low_fidelity")
    bad = Photo.objects.create(title="noise", image=noise_png(seed=2))
    image = wait_for(bad)
    assert image.state == "ready", image.error
    assert image.low_fidelity and bad.image_original


def test_gate_counts_the_storage_dtype(settings):
    """The gate decodes what is stored: int4's coarser steps show up in the measurement."""
    measured = {}
    for dtype in ("int8", "int4"):
        settings.LATENTSTORE = shipped_config(QUALITY_CHECK=True, LATENT_DTYPE=dtype)
        photo = Photo.objects.create(title=dtype, image=natural_png())
        assert encode_now(photo) == "ready"
        assert photo.image.header.dtype == dtype
        measured[dtype] = photo.image.psnr
    assert measured["int4"] < measured["int8"] - 0.1, measured

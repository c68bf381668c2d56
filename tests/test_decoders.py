"""One latent, many decoders: VAE, TAESD and the consistency decoder over the four families.

Every model is a tiny *real* diffusers class (``AutoencoderKL`` with 4 and 16 channels,
``AutoencoderTiny``, ``ConsistencyDecoderVAE`` with its UNet), built from a seed, saved with
safetensors and loaded back through the production ``pretrained`` path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from django.core.exceptions import ImproperlyConfigured
from django.db import models
from django.test.utils import isolate_apps

from latentstore.checks import check_fields, check_settings
from latentstore.decoders import (
    BaseDecoder,
    DecoderConfigError,
    IncompatibleLatents,
    decoders,
)
from latentstore.families import FAMILIES, family_of_taesd
from latentstore.fields import LatentImageField
from latentstore_workers.decoders import (
    OpenAIConsistencyDecoder,
    TAESDDecoder,
    latent_seed,
    seeded_global_rng,
)
from project.models import Photo
from tests.test_field import encode_now
from tests.tiny import (
    image_bytes,
    make_test_image,
    save_tiny_autoencoder,
    save_tiny_consistency_decoder,
    save_tiny_taesd,
)

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = pathlib.Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 37, 21  # odd on purpose: 5x3 latent cells, 3 and 3 pixels of padding

SIXTEEN = {"latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
FAMILY_VAES = {
    "sd": {"scaling_factor": 0.18215},
    "sdxl": {"scaling_factor": 0.13025},
    "sd3": {**SIXTEEN, "scaling_factor": 1.5305, "shift_factor": 0.0609},
    "flux": {**SIXTEEN, "scaling_factor": 0.3611, "shift_factor": 0.1159},
}


@pytest.fixture(scope="session")
def family_vaes(tmp_path_factory, tiny_vae_dir):
    """A tiny AutoencoderKL per family, with that family's channels, scaling and shift."""
    dirs = {"sd": tiny_vae_dir}
    for family, config in FAMILY_VAES.items():
        if family not in dirs:
            dirs[family] = save_tiny_autoencoder(tmp_path_factory.mktemp(f"vae-{family}"), **config)
    return dirs


@pytest.fixture(scope="session")
def taesd_dirs(tmp_path_factory):
    """Tiny AutoencoderTiny models: 4 channels (SD/SDXL) and 16 channels (SD3/FLUX)."""
    return {
        4: save_tiny_taesd(tmp_path_factory.mktemp("taesd-4"), latent_channels=4),
        16: save_tiny_taesd(tmp_path_factory.mktemp("taesd-16"), seed=1, latent_channels=16),
    }


@pytest.fixture(scope="session")
def consistency_dir(tmp_path_factory):
    return save_tiny_consistency_decoder(tmp_path_factory.mktemp("consistency"))


def configure(settings, vae_dir, family="sd", decoders=None, **autoencoders):
    """LATENTSTORE: ``default`` is the tiny VAE at ``vae_dir``; more aliases and decoders."""
    entry = {"DTYPE": "float32", "DEVICE": "cpu"}
    settings.LATENTSTORE = {
        "AUTOENCODERS": {
            "default": {"PRETRAINED": str(vae_dir), "FAMILY": family, **entry},
            **{
                alias: {"PRETRAINED": str(path), "FAMILY": fam, **entry}
                for alias, (path, fam) in autoencoders.items()
            },
        },
        "DECODERS": decoders or {},
    }


def taesd(path, **options):
    return {
        "BACKEND": "latentstore_workers.decoders.TAESDDecoder",
        "OPTIONS": {"pretrained": str(path), **options},
    }


def consistency(path, **options):
    return {
        "BACKEND": "latentstore_workers.decoders.ConsistencyDecoder",
        "OPTIONS": {"pretrained": str(path), **options},
    }


def ready_photo(seed=3, size=(WIDTH, HEIGHT)):
    photo = Photo.objects.create(title="p", image=image_bytes(make_test_image(*size, seed=seed)))
    encode_now(photo)
    assert photo.image.state == "ready", photo.image.error
    return Photo.objects.get(pk=photo.pk)


def pixels(sample: torch.Tensor, width=WIDTH, height=HEIGHT) -> np.ndarray:
    """A (1, 3, H, W) model output in [-1, 1] as uint8 HxWx3, top-left crop: computed by hand."""
    x = sample[0].detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).numpy()[:height, :width]


# --- families: stamped parameters, VAE, TAESD and rgb for each -----------------------------------


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_each_family_is_stamped_and_decodes_to_the_original_size(
    settings, family_vaes, taesd_dirs, family
):
    known = FAMILIES[family]
    configure(
        settings,
        family_vaes[family],
        family,
        decoders={"taesd": taesd(taesd_dirs[known.channels], family=family)},
    )
    photo = ready_photo()
    header = photo.image.header
    assert (header.family, header.shape) == (family, (known.channels, 3, 5))
    assert header.scaling_factor == pytest.approx(known.scaling_factor)
    assert header.shift_factor == pytest.approx(known.shift_factor)
    for alias in ("default", "taesd", "rgb"):
        picture = photo.image.decode(decoder=alias)
        assert (picture.size, picture.mode) == ((WIDTH, HEIGHT), "RGB"), alias
    assert photo.image.decode(decoder="taesd", size=20).size == (20, 11)


@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_taesd_is_fed_model_space_latents_with_the_stamped_parameters(
    settings, family_vaes, taesd_dirs, family
):
    from diffusers import AutoencoderTiny

    channels = FAMILIES[family].channels
    configure(
        settings,
        family_vaes[family],
        family,
        decoders={"t": taesd(taesd_dirs[channels], family=family)},
    )
    header, raw = ready_photo().image.unpack()
    got = np.asarray(decoders["t"].decode(header, raw))

    # By hand, with a separately loaded copy of the model: (raw - shift) * scaling -> decoder.
    model = AutoencoderTiny.from_pretrained(taesd_dirs[channels], use_safetensors=True).eval()
    known = FAMILIES[family]
    with torch.no_grad():
        shift, scaling = np.float32(known.shift_factor), np.float32(known.scaling_factor)
        model_space = torch.from_numpy((raw - shift) * scaling)
        expected = pixels(model.decoder(model_space[None]))
        as_raw = pixels(model.decoder(torch.from_numpy(raw.copy())[None]))
    assert got.shape == (HEIGHT, WIDTH, 3)
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, as_raw), "feeding raw latents must give another picture"


def test_taesd_reads_every_fingerprint_of_its_family_and_the_vae_only_its_own(
    settings, tiny_vae_dir, other_vae_dir, taesd_dirs
):
    decoders_ = {"taesd": taesd(taesd_dirs[4], family="sd")}
    configure(settings, tiny_vae_dir, decoders=decoders_)
    first = ready_photo()
    configure(settings, other_vae_dir, decoders=decoders_)  # same family, other weights
    second = ready_photo()
    assert first.image.origin["fingerprint"] != second.image.origin["fingerprint"]
    for photo in (first, second):
        assert photo.image.decode(decoder="taesd").size == (WIDTH, HEIGHT)
    assert second.image.decode().size == (WIDTH, HEIGHT)
    with pytest.raises(IncompatibleLatents) as refused:
        first.image.decode()
    message = str(refused.value)
    assert first.image.origin["fingerprint"] in message
    assert second.image.origin["fingerprint"] in message
    assert refused.value.able == ["rgb", "taesd"]
    assert "decoders that can read them: rgb, taesd" in message


def test_taesd_refuses_latents_of_another_family_naming_both(settings, tiny_vae_dir, taesd_dirs):
    configure(
        settings,
        tiny_vae_dir,
        decoders={
            "taesd3": taesd(taesd_dirs[16], family="sd3"),
            "taesd": taesd(taesd_dirs[4], family="sd"),
        },
    )
    photo = ready_photo()
    with pytest.raises(IncompatibleLatents) as refused:
        photo.image.decode(decoder="taesd3")
    message = str(refused.value)
    assert "Decoder 'taesd3' reads 'sd3' latents" in message
    assert "these are 'sd' latents" in message and "autoencoder 'default'" in message
    assert photo.image.origin["fingerprint"] in message
    assert refused.value.able == ["default", "rgb", "taesd"]


def test_taesd_family_comes_from_the_option_the_autoencoder_or_the_hub_id(settings, tiny_vae_dir):
    configure(settings, tiny_vae_dir, sdxl=(tiny_vae_dir, "sdxl"))
    assert TAESDDecoder("t", pretrained="madebyollin/taesdxl").family == "sdxl"
    assert TAESDDecoder("t", pretrained="/models/taef1/").family == "flux"
    assert TAESDDecoder("t", family="sd3").pretrained == "madebyollin/taesd3"
    assert TAESDDecoder("t", autoencoder="sdxl").pretrained == "madebyollin/taesdxl"
    assert TAESDDecoder("t", family="sd", pretrained="/my/own/tiny").family == "sd"
    with_taesd = {name for name, f in FAMILIES.items() if f.taesd}
    assert with_taesd >= {"sd", "sdxl", "sd3", "flux"}  # ls-small has none (no distilled TAESD)
    assert {family_of_taesd(FAMILIES[name].taesd) for name in with_taesd} == with_taesd

    def refused(**options):
        with pytest.raises(DecoderConfigError) as info:
            TAESDDecoder("t", **options)
        return info.value

    assert refused(pretrained="/my/own/tiny").check_id == "latentstore.E021"
    assert refused(family="sd9").check_id == "latentstore.E021"
    contradiction = refused(family="sd", pretrained="madebyollin/taesdxl")
    assert "'sdxl'" in str(contradiction) and "'sd'" in str(contradiction)
    assert refused(autoencoder="nope").check_id == "latentstore.E008"
    assert refused(family="sd", devcie="cpu").check_id == "latentstore.E020"
    assert refused(family="sd", dtype="fp16").check_id == "latentstore.E020"
    assert refused(family="sd", RUN="elsewhere").check_id == "latentstore.E009"


def test_taesd_refuses_a_model_whose_channels_are_not_the_familys(
    settings, tiny_vae_dir, taesd_dirs
):
    configure(settings, tiny_vae_dir, decoders={"wrong": taesd(taesd_dirs[16], family="sd")})
    with pytest.raises(ImproperlyConfigured, match="reads 16-channel latents"):
        ready_photo().image.decode(decoder="wrong")


def test_rgb_decoder_crops_the_padding_like_the_model_decoders(settings, tiny_vae_dir):
    from latentstore.preview import latents_to_rgb

    configure(settings, tiny_vae_dir)
    header, raw = ready_photo().image.unpack()
    picture = decoders["rgb"].decode(header, raw)
    grid = latents_to_rgb(raw, "sd", header.scaling_factor, header.shift_factor, size=(40, 24))
    assert picture.size == (WIDTH, HEIGHT)
    assert picture.tobytes() == grid.crop((0, 0, WIDTH, HEIGHT)).tobytes()


def test_decoder_models_load_once_per_process(taesd_dirs, consistency_dir, monkeypatch):
    from latentstore_workers import decoder_models

    taesd_model = decoder_models.load_tiny_autoencoder(str(taesd_dirs[4]), device="cpu")
    assert decoder_models.load_tiny_autoencoder(str(taesd_dirs[4]), device="cpu") is taesd_model
    assert taesd_model.dtype == torch.float32 and not taesd_model.model.training
    cd = decoder_models.load_consistency_decoder(str(consistency_dir), device="cpu")
    assert decoder_models.load_consistency_decoder(str(consistency_dir), device="cpu") is cd
    real_pid = os.getpid()
    with monkeypatch.context() as patch:  # what a forked child sees: the dict, another pid
        patch.setattr(decoder_models.os, "getpid", lambda: real_pid + 1)
        child = decoder_models.load_tiny_autoencoder(str(taesd_dirs[4]), device="cpu")
        assert child is not taesd_model and child.model is not taesd_model.model
    decoder_models.clear_cache()
    assert decoder_models.load_tiny_autoencoder(str(taesd_dirs[4]), device="cpu") is not taesd_model


# --- the consistency decoder ---------------------------------------------------------------------


def test_consistency_decoder_is_repeatable_and_seeded_by_the_latents(
    settings, tiny_vae_dir, consistency_dir
):
    from diffusers import ConsistencyDecoderVAE

    configure(
        settings,
        tiny_vae_dir,
        decoders={
            "consistency": consistency(consistency_dir),
            "salted": consistency(consistency_dir, seed=1),
        },
    )
    photo, other = ready_photo(seed=3), ready_photo(seed=4)
    header, raw = photo.image.unpack()
    backend = decoders["consistency"]

    torch.manual_seed(123)
    first = np.asarray(backend.decode(header, raw))
    torch.manual_seed(456)  # the global RNG must not matter
    torch.rand(17)
    second = np.asarray(backend.decode(header, raw))
    assert first.shape == (HEIGHT, WIDTH, 3)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, np.asarray(backend.decode(*other.image.unpack())))
    assert not np.array_equal(first, np.asarray(decoders["salted"].decode(header, raw)))

    # By hand: raw latents in (the model scales them itself), noise from the content seed.
    model = ConsistencyDecoderVAE.from_pretrained(consistency_dir, use_safetensors=True).eval()
    generator = torch.Generator("cpu").manual_seed(latent_seed(raw))
    with torch.no_grad():
        sample = model.decode(
            torch.from_numpy(raw.copy())[None], generator=generator, num_inference_steps=2
        ).sample
    assert np.array_equal(first, pixels(sample))

    # Through the cached path, resized after decoding.
    assert photo.image.decode(decoder="consistency").tobytes() == first.tobytes()
    assert photo.image.decode(decoder="consistency", size=20).size == (20, 11)


def test_consistency_decoder_gives_the_same_picture_in_another_process(
    settings, tiny_vae_dir, consistency_dir, tmp_path
):
    configure(settings, tiny_vae_dir, decoders={"consistency": consistency(consistency_dir)})
    photo = ready_photo()
    here = decoders["consistency"].decode(*photo.image.unpack())
    blob = tmp_path / "latents.bin"
    blob.write_bytes(photo.image.blob)
    script = f"""
import hashlib, os, random, django
os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
django.setup()
import torch
torch.manual_seed(random.randrange(1 << 30))  # another global RNG state than the parent's
from latentstore.latents import unpack
from latentstore_workers.decoders import ConsistencyDecoder
header, raw = unpack(open({str(blob)!r}, "rb").read())
picture = ConsistencyDecoder("c", pretrained={str(consistency_dir)!r}).decode(header, raw)
print("SHA", hashlib.sha256(picture.tobytes()).hexdigest())
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "random"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert f"SHA {hashlib.sha256(here.tobytes()).hexdigest()}" in out.stdout, out.stderr


def test_consistency_decoder_reads_any_sd_weights_but_no_other_family(
    settings, tiny_vae_dir, other_vae_dir, family_vaes, consistency_dir
):
    decoders_ = {"consistency": consistency(consistency_dir)}
    configure(settings, other_vae_dir, decoders=decoders_)  # an SD fine-tune: other weights
    assert ready_photo().image.decode(decoder="consistency").size == (WIDTH, HEIGHT)
    for family in ("sdxl", "sd3"):
        configure(settings, family_vaes[family], family, decoders=decoders_)
        photo = ready_photo()
        with pytest.raises(IncompatibleLatents) as refused:
            photo.image.decode(decoder="consistency")
        message = str(refused.value)
        assert "Decoder 'consistency' reads 'sd' latents" in message
        assert f"these are {family!r} latents" in message
        assert refused.value.able == ["default", "rgb"]


def test_a_vae_of_another_family_refuses_naming_both(settings, tiny_vae_dir, family_vaes):
    configure(
        settings,
        tiny_vae_dir,
        decoders={
            "sd3-vae": {
                "BACKEND": "latentstore_workers.decoders.VAEDecoder",
                "OPTIONS": {"autoencoder": "sd3"},
            }
        },
        sd3=(family_vaes["sd3"], "sd3"),
    )
    photo = ready_photo()
    with pytest.raises(IncompatibleLatents) as refused:
        photo.image.decode(decoder="sd3-vae")
    message = str(refused.value)
    assert "uses autoencoder 'sd3' (family 'sd3'" in message
    assert "these are 'sd' latents" in message
    assert refused.value.able == ["default", "rgb"]


# --- third-party backends ------------------------------------------------------------------------


class SDXLOnlyDecoder(BaseDecoder):
    """A third-party backend that reads only SDXL latents: their mean colour, flat."""

    families = ("sdxl",)

    def decode(self, header, latents):
        from PIL import Image

        level = int(np.clip((latents.mean() + 1) * 127.5, 0, 255))
        return Image.new("RGB", (header.width, header.height), (level,) * 3)


def test_a_custom_backend_declares_its_families_and_is_refused_others(
    settings, tiny_vae_dir, family_vaes
):
    custom = {"BACKEND": "tests.test_decoders.SDXLOnlyDecoder"}
    configure(settings, family_vaes["sdxl"], "sdxl", decoders={"xl": custom})
    assert ready_photo().image.decode(decoder="xl").size == (WIDTH, HEIGHT)
    configure(settings, tiny_vae_dir, decoders={"xl": custom})
    with pytest.raises(IncompatibleLatents, match="Decoder 'xl' reads 'sdxl' latents, but these"):
        ready_photo().image.decode(decoder="xl")


# --- OpenAI's package: opt-in, and a clear error where it is missing -----------------------------


def test_openai_backend_is_refused_without_the_torchscript_opt_in(settings, tiny_vae_dir):
    backend = {"BACKEND": "latentstore_workers.decoders.OpenAIConsistencyDecoder"}
    configure(settings, tiny_vae_dir, decoders={"openai": backend})
    (error,) = [e for e in check_settings() if e.id == "latentstore.E023"]
    assert "TorchScript (pickle-based)" in error.msg and "allow_torchscript" in error.hint
    photo = ready_photo()
    with pytest.raises(ImproperlyConfigured, match="TorchScript"):
        photo.image.decode(decoder="openai")


@pytest.mark.skipif(
    importlib.util.find_spec("consistencydecoder") is not None,
    reason="OpenAI's consistencydecoder package is installed here",
)
def test_openai_backend_without_its_package_is_a_configuration_error(settings, tiny_vae_dir):
    backend = {
        "BACKEND": "latentstore_workers.decoders.OpenAIConsistencyDecoder",
        "OPTIONS": {"allow_torchscript": True},
    }
    configure(settings, tiny_vae_dir, decoders={"openai": backend})
    (error,) = [e for e in check_settings() if e.id == "latentstore.E024"]
    assert "consistencydecoder package, which is not installed" in error.msg
    assert "pip install git+https://github.com/openai/consistencydecoder.git" in error.hint
    with pytest.raises(ImproperlyConfigured, match="not installed"):
        ready_photo().image.decode(decoder="openai")
    # Other decoders keep working, and a refusal elsewhere does not trip over the broken alias.
    assert ready_photo().image.decode(decoder="rgb").size == (WIDTH, HEIGHT)
    with pytest.raises(DecoderConfigError):
        OpenAIConsistencyDecoder("o", allow_torchscript=True)


def test_seeded_global_rng_repeats_and_restores_the_global_state():
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with seeded_global_rng(42, torch.device("cpu")):
        first = torch.randn(5)
    assert torch.equal(torch.get_rng_state(), before)
    with seeded_global_rng(42, torch.device("cpu")):
        second = torch.randn(5)
    with seeded_global_rng(43, torch.device("cpu")):
        third = torch.randn(5)
    assert torch.equal(first, second) and not torch.equal(first, third)


def test_latent_seed_depends_on_content_and_salt_only():
    z = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)
    assert latent_seed(z) == latent_seed(z.copy()) == latent_seed(z.astype(np.float64))
    assert 0 <= latent_seed(z) < 2**63
    changed = z.copy()
    changed[0, 0, 0] += 1e-3
    assert latent_seed(changed) != latent_seed(z)
    assert latent_seed(z, salt=1) != latent_seed(z)
    assert latent_seed(z.reshape(4, 5, 3)) != latent_seed(z)


# --- system checks -------------------------------------------------------------------------------


def ids(errors):
    return sorted(e.id for e in errors)


def test_check_flags_a_decoder_for_an_autoencoder_of_a_family_it_cannot_read(
    settings, tiny_vae_dir, family_vaes
):
    configure(
        settings,
        tiny_vae_dir,
        decoders={
            "cd": {
                "BACKEND": "latentstore_workers.decoders.ConsistencyDecoder",
                "OPTIONS": {"autoencoder": "xl"},
            },
            "t": {
                "BACKEND": "latentstore_workers.decoders.TAESDDecoder",
                "OPTIONS": {"family": "sd3", "autoencoder": "default"},
            },
            "t-ok": {
                "BACKEND": "latentstore_workers.decoders.TAESDDecoder",
                "OPTIONS": {"autoencoder": "xl"},
            },
            "vae-xl": {
                "BACKEND": "latentstore_workers.decoders.VAEDecoder",
                "OPTIONS": {"autoencoder": "xl"},
            },
        },
        xl=(family_vaes["sdxl"], "sdxl"),
    )
    errors = [e for e in check_settings() if e.id == "latentstore.E022"]
    assert len(errors) == 2
    assert "Decoder 'cd' is configured for autoencoder 'xl', whose 'sdxl' latents" in errors[0].msg
    assert "Decoder 't' is configured for autoencoder 'default', whose 'sd'" in errors[1].msg


def test_check_flags_a_field_whose_decoder_cannot_read_its_autoencoder(
    settings, tiny_vae_dir, taesd_dirs
):
    configure(settings, tiny_vae_dir, decoders={"default": taesd(taesd_dirs[16], family="sd3")})
    errors = [e for e in check_fields() if e.id == "latentstore.E022"]
    fields = {e.obj for e in errors}
    assert Photo._meta.get_field("image") in fields
    assert "decoder='default' reads 'sd3' latents" in errors[0].msg


def test_check_flags_a_field_naming_unknown_aliases():
    with isolate_apps("tests.testapp") as apps:

        class Gallery(models.Model):
            cover = LatentImageField(autoencoder="nope", decoder="nada")

            class Meta:
                app_label = "testapp"

        errors = check_fields(app_configs=[apps.get_app_config("testapp")])
    assert ids(errors) == ["latentstore.E025", "latentstore.E026"]
    assert all(e.obj is Gallery._meta.get_field("cover") for e in errors)


def test_check_flags_unknown_options_and_an_unknown_seed(settings, tiny_vae_dir):
    configure(
        settings,
        tiny_vae_dir,
        decoders={
            "typo": {
                "BACKEND": "latentstore_workers.decoders.ConsistencyDecoder",
                "OPTIONS": {"devcie": 1},
            },
            "seed": {
                "BACKEND": "latentstore_workers.decoders.ConsistencyDecoder",
                "OPTIONS": {"seed": "1"},
            },
            "vague": {"BACKEND": "latentstore_workers.decoders.TAESDDecoder"},
            "lost": {
                "BACKEND": "latentstore_workers.decoders.TAESDDecoder",
                "OPTIONS": {"autoencoder": "x"},
            },
            "where": {
                "BACKEND": "latentstore_workers.decoders.TAESDDecoder",
                "OPTIONS": {"RUN": "gpu", "family": "sd"},
            },
        },
    )
    errors = check_settings()
    assert ids(errors) == [
        "latentstore.E008",  # once: the generic check and the backend say the same
        "latentstore.E009",
        "latentstore.E020",
        "latentstore.E020",
        "latentstore.E021",
    ]
    assert any("unknown OPTIONS: devcie" in e.msg for e in errors)


README_DECODERS = {
    "default": {"BACKEND": "latentstore_workers.decoders.VAEDecoder", "OPTIONS": {"RUN": "worker"}},
    "consistency": {
        "BACKEND": "latentstore_workers.decoders.ConsistencyDecoder",
        "OPTIONS": {"pretrained": "openai/consistency-decoder", "RUN": "worker"},
    },
    "taesd": {
        "BACKEND": "latentstore_workers.decoders.TAESDDecoder",
        "OPTIONS": {"pretrained": "madebyollin/taesd", "device": "cpu"},
    },
    "rgb": {"BACKEND": "latentstore.decoders.LatentRGBDecoder"},
}


def test_the_readme_decoders_example_passes_the_checks(settings, tiny_vae_dir):
    configure(settings, tiny_vae_dir, decoders=README_DECODERS)
    settings.CACHES = {
        **settings.CACHES,
        "shared": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"},
    }
    settings.LATENTSTORE = {**settings.LATENTSTORE, "CACHE": "shared"}
    readme = (ROOT / "README.md").read_text()
    for alias, cfg in README_DECODERS.items():
        assert f'"{alias}": {{' in readme and cfg["BACKEND"] in readme
    assert check_settings() == [] and check_fields() == []
    assert {alias: type(decoders[alias]).__name__ for alias in README_DECODERS} == {
        "default": "VAEDecoder",
        "consistency": "ConsistencyDecoder",
        "taesd": "TAESDDecoder",
        "rgb": "LatentRGBDecoder",
    }

"""The autoencoder that ships with latentstore (workers/pretrained/ls-small): real quality.

Measured through the production path (``load_autoencoder`` -> ``from_pretrained``, padding,
``latent_dist.mean``, the blob codec, decode) on photos the model never saw in training.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from latentstore.decoders import IncompatibleLatents, decoders
from latentstore.families import get_family
from latentstore.latents import read_header, unpack
from latentstore.preview import latents_to_rgb
from latentstore.quality import psnr
from latentstore_workers.autoencoders import load_autoencoder
from latentstore_workers.pretrained import LS_SMALL, LS_SMALL_FAMILY
from latentstore_workers.quality import measure_round_trip
from latentstore_workers.training.data import HELD_OUT, TRAIN_IMAGES, load_image
from tests.conftest import ls_small_entry, shipped_config
from tests.tiny import save_tiny_autoencoder

CARD = json.loads((LS_SMALL / "training.json").read_text())


@pytest.fixture
def shipped(settings):
    settings.LATENTSTORE = shipped_config()
    return load_autoencoder("default")


@pytest.fixture(scope="module")
def held_out():
    return [(name, load_image(name)) for name in HELD_OUT]


def test_weights_are_small_safetensors_with_a_model_card():
    files = {p.name: p.stat().st_size for p in LS_SMALL.iterdir()}
    assert set(files) == {
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "README.md",
        "training.json",
    }
    assert files["diffusion_pytorch_model.safetensors"] < 4 * 1024 * 1024  # a few MB at most
    card = (LS_SMALL / "README.md").read_text()
    for needle in ("## Data", "## Training", "Wall time", "held-out", "int8 PSNR"):
        assert needle in card


def test_held_out_photos_are_never_trained_on():
    assert not set(HELD_OUT) & set(TRAIN_IMAGES)
    assert CARD["recipe"]["seed"] == 0


def test_loads_through_from_pretrained_with_its_own_family(shipped):
    config = json.loads((LS_SMALL / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL"
    assert len(config["block_out_channels"]) == 4 and config["latent_channels"] == 4
    assert shipped.downsample == 8 and shipped.latent_channels == 4
    assert shipped.family == LS_SMALL_FAMILY == "ls-small"
    assert shipped.model.dtype.is_floating_point and str(shipped.model.dtype) == "torch.float32"
    # The fitted statistics are in the config, the family table and the training log alike.
    family = get_family("ls-small")
    stats = CARD["latent_statistics"]
    assert shipped.scaling_factor == config["scaling_factor"] == family.scaling_factor
    assert shipped.shift_factor == config["shift_factor"] == family.shift_factor
    assert stats["scaling_factor"] == family.scaling_factor
    assert [list(row) for row in family.rgb_factors] == stats["rgb_factors"]
    assert list(family.rgb_bias) == stats["rgb_bias"]


def test_blob_is_stamped_with_the_family(shipped, held_out):
    _name, picture = held_out[0]
    trip = measure_round_trip(shipped, picture, dtype="int8")
    header = read_header(trip.blob)
    assert header.family == "ls-small" and header.fingerprint == shipped.fingerprint
    assert header.scaling_factor == get_family("ls-small").scaling_factor
    # Model-space latents are about unit-variance: the scaling factor is 1/std.
    _, latents = unpack(trip.blob)
    model_space = (latents - header.shift_factor) * header.scaling_factor
    assert 0.5 < float(model_space.std()) < 2.0


def test_held_out_quality_matches_the_model_card(shipped, held_out):
    """The card's numbers are reproducible, and the model clears the 22 dB bar."""
    card = {row["image"]: row for row in CARD["evaluation"]["images"]}
    measured = []
    for name, picture in held_out:
        value = measure_round_trip(shipped, picture, dtype="int8").psnr
        assert value == pytest.approx(card[name]["int8"]["psnr"], abs=0.05), name
        measured.append(value)
    assert float(np.mean(measured)) >= 22.0, measured


def test_int8_is_within_a_tenth_of_a_db_of_float16(shipped, held_out):
    for name, picture in held_out:
        f16 = measure_round_trip(shipped, picture, dtype="float16")
        i8 = measure_round_trip(shipped, picture, dtype="int8")
        assert abs(f16.psnr - i8.psnr) <= 0.1, (name, f16.psnr, i8.psnr)
        assert i8.nbytes < 0.55 * f16.nbytes


def test_int4_is_a_real_but_lossy_storage_form(shipped, held_out):
    name, picture = held_out[1]
    i8 = measure_round_trip(shipped, picture, dtype="int8")
    i4 = measure_round_trip(shipped, picture, dtype="int4")
    assert i4.nbytes < 0.55 * i8.nbytes
    assert i4.psnr < i8.psnr - 0.1  # measurably worse: not near-lossless (see the report)
    assert i4.psnr > i8.psnr - 6.0  # ... but still a picture of the same thing


def test_trained_model_beats_its_untrained_self_by_a_wide_margin(settings, tmp_path, held_out):
    from latentstore_workers.training.train import Recipe, initial_model

    untrained_dir = tmp_path / "untrained"
    recipe = Recipe(**CARD["recipe"])  # the shipped architecture, at its seeded initial weights
    initial_model(recipe).save_pretrained(untrained_dir, safe_serialization=True)
    settings.LATENTSTORE = {
        "AUTOENCODERS": {"trained": ls_small_entry(), "untrained": ls_small_entry(untrained_dir)}
    }
    trained, untrained = load_autoencoder("trained"), load_autoencoder("untrained")
    assert trained.fingerprint != untrained.fingerprint
    for name, picture in held_out:
        good = measure_round_trip(trained, picture).psnr
        bad = measure_round_trip(untrained, picture).psnr
        assert good > bad + 8.0, (name, good, bad)


def test_preview_uses_the_fitted_projection(shipped, held_out):
    """The instant preview shows the photo's real colours: close to the 8x8 cell means."""
    for name, picture in held_out:
        header, latents = unpack(measure_round_trip(shipped, picture).blob)
        _, h, w = latents.shape
        # Cells past the picture's edge hold padding; compare the whole cells only.
        w, h = picture.width // 8, picture.height // 8
        latents = latents[:, :h, :w]
        cells = np.asarray(picture.crop((0, 0, w * 8, h * 8)).resize((w, h), Image.Resampling.BOX))
        fitted = latents_to_rgb(
            latents, "ls-small", header.scaling_factor, header.shift_factor, (w, h)
        )
        # The SD table on the same latents is what "no family of its own" would give.
        borrowed = latents_to_rgb(latents, "sd", header.scaling_factor, header.shift_factor, (w, h))
        assert psnr(cells, fitted) > 18.0, name
        assert psnr(cells, fitted) > psnr(cells, borrowed) + 3.0, name


def test_sd_decoder_refuses_ls_small_latents(settings, tmp_path, held_out):
    sd_dir = save_tiny_autoencoder(tmp_path / "sd", seed=0)
    settings.LATENTSTORE = {
        "AUTOENCODERS": {
            "default": {"PRETRAINED": str(LS_SMALL), "FAMILY": "ls-small", "DEVICE": "cpu"},
            "sd": {"PRETRAINED": str(sd_dir), "FAMILY": "sd", "DEVICE": "cpu"},
        },
        "DECODERS": {
            "sd": {
                "BACKEND": "latentstore_workers.decoders.VAEDecoder",
                "OPTIONS": {"autoencoder": "sd"},
            },
        },
    }
    header = read_header(measure_round_trip(load_autoencoder("default"), held_out[0][1]).blob)
    with pytest.raises(IncompatibleLatents, match="family 'sd'.*'ls-small' latents"):
        decoders["sd"].check(header)
    decoders["default"].check(header)  # its own decoder reads them


def test_naming_the_shipped_weights_imports_no_torch():
    code = (
        "import sys; from latentstore_workers.pretrained import LS_SMALL; "
        "assert LS_SMALL.is_dir(); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

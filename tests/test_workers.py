"""The worker side: tiny real autoencoders loaded from disk, fingerprints, encode/decode."""

from __future__ import annotations

import logging
import math
import os
import pathlib
import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from django.test import override_settings

from latentstore.latents import read_header
from latentstore_workers import autoencoders
from latentstore_workers.autoencoders import clear_cache, fingerprint_state_dict, load_autoencoder
from latentstore_workers.codec import NonFiniteLatents, decode_latents, encode_images
from latentstore_workers.images import to_pil, to_tensor
from latentstore_workers.quality import measure_round_trip
from tests.conftest import GPU_PLAN
from tests.tiny import make_test_image, save_tiny_autoencoder, tiny_autoencoder_config

SD3 = {
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
}


def latentstore(path: pathlib.Path, **options) -> dict:
    entry = {"PRETRAINED": str(path), "FAMILY": "sd", "DTYPE": "float32", "DEVICE": "cpu"}
    return {"AUTOENCODERS": {"default": {**entry, **options}}, **GPU_PLAN}


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory) -> pathlib.Path:
    return save_tiny_autoencoder(tmp_path_factory.mktemp("workers-sd"), seed=0)


@pytest.fixture(scope="session")
def sd_dir_seed1(tmp_path_factory) -> pathlib.Path:
    return save_tiny_autoencoder(tmp_path_factory.mktemp("workers-sd-seed1"), seed=1)


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory) -> pathlib.Path:
    return save_tiny_autoencoder(tmp_path_factory.mktemp("workers-sd3"), seed=0, **SD3)


@pytest.fixture
def ae(sd_dir):
    with override_settings(LATENTSTORE=latentstore(sd_dir)):
        yield load_autoencoder("default")
    clear_cache()  # some tests damage the model in place


# --- loading -------------------------------------------------------------------------------------


def test_load_reports_what_gets_stamped_into_latents(ae):
    assert ae.alias == "default"
    assert ae.family == "sd"
    assert ae.scaling_factor == pytest.approx(0.18215)
    assert ae.shift_factor == 0.0  # the config says None
    assert ae.downsample == 8  # four blocks: three 2x downsamplings
    assert ae.latent_channels == 4
    assert ae.device == torch.device("cpu") and ae.dtype == torch.float32
    assert re.fullmatch(r"[0-9a-f]{16}", ae.fingerprint)
    assert not ae.model.training
    assert not any(p.requires_grad for p in ae.model.parameters())


def test_saved_model_is_safetensors_only(sd_dir):
    names = sorted(p.name for p in sd_dir.iterdir())
    assert names == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_fingerprint_is_stable_across_loads_and_names_the_weights(sd_dir, sd_dir_seed1):
    with override_settings(LATENTSTORE=latentstore(sd_dir)):
        first = load_autoencoder("default")
        clear_cache()
        second = load_autoencoder("default")
    assert second is not first
    assert second.fingerprint == first.fingerprint
    with override_settings(LATENTSTORE=latentstore(sd_dir_seed1)):
        other = load_autoencoder("default")
    assert other.fingerprint != first.fingerprint
    # The same weights built in memory (never saved) hash the same: it is about the weights.
    torch.manual_seed(0)
    fresh = AutoencoderKL(**tiny_autoencoder_config())
    assert fingerprint_state_dict(fresh) == first.fingerprint


def test_fingerprint_sees_a_single_changed_weight(sd_dir):
    torch.manual_seed(0)
    model = AutoencoderKL(**tiny_autoencoder_config())
    before = fingerprint_state_dict(model)
    with torch.no_grad():
        model.decoder.conv_out.bias[0] += 1e-3
    assert fingerprint_state_dict(model) != before


def test_cache_returns_the_same_object_in_one_process(sd_dir):
    with override_settings(LATENTSTORE=latentstore(sd_dir)):
        assert load_autoencoder("default") is load_autoencoder("default")


def test_cache_is_per_process(sd_dir, monkeypatch):
    with override_settings(LATENTSTORE=latentstore(sd_dir)):
        parent = load_autoencoder("default")
        real_pid = os.getpid()
        # What a forked child sees: the parent's cache dict, but another pid.
        with monkeypatch.context() as patch:
            patch.setattr(autoencoders.os, "getpid", lambda: real_pid + 1)
            child = load_autoencoder("default")
            assert child is not parent
            assert child.model is not parent.model
            assert load_autoencoder("default") is child
        assert load_autoencoder("default") is parent
        assert child.fingerprint == parent.fingerprint


def test_changed_setting_loads_the_new_model(sd_dir, sd_dir_seed1):
    with override_settings(LATENTSTORE=latentstore(sd_dir)):
        first = load_autoencoder("default")
    with override_settings(LATENTSTORE=latentstore(sd_dir_seed1)):
        second = load_autoencoder("default")
    assert second.fingerprint != first.fingerprint


def test_half_precision_on_cpu_falls_back_to_float32(sd_dir, caplog):
    with override_settings(LATENTSTORE=latentstore(sd_dir)):
        reference = load_autoencoder("default").fingerprint
    for dtype in ("float16", "bfloat16"):
        clear_cache()
        with caplog.at_level(logging.DEBUG, logger="latentstore_workers.autoencoders"):
            with override_settings(LATENTSTORE=latentstore(sd_dir, DTYPE=dtype)):
                ae = load_autoencoder("default")
        assert ae.dtype == torch.float32
        assert next(ae.model.parameters()).dtype == torch.float32
        assert ae.fingerprint == reference
        assert any(dtype in r.getMessage() and "float32" in r.getMessage() for r in caplog.records)


def test_bad_configuration_is_reported(sd_dir, sd3_dir):
    with override_settings(LATENTSTORE=latentstore(sd_dir)):
        with pytest.raises(KeyError, match="default"):
            load_autoencoder("missing")
    with override_settings(LATENTSTORE=latentstore(sd_dir, DTYPE="float8")):
        with pytest.raises(ValueError, match="float8"):
            load_autoencoder("default")
    with override_settings(LATENTSTORE=latentstore(sd_dir, DEVICE="not-a-device")):
        with pytest.raises(ValueError, match="not-a-device"):
            load_autoencoder("default")
    # A 16-channel model declared as the 4-channel "sd" family: previews would be nonsense.
    with override_settings(LATENTSTORE=latentstore(sd3_dir, FAMILY="sd")):
        with pytest.raises(ValueError, match="4 latent channels.*writes 16"):
            load_autoencoder("default")


def test_unknown_family_loads_with_a_warning(sd_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="latentstore_workers.autoencoders"):
        with override_settings(LATENTSTORE=latentstore(sd_dir, FAMILY="my-own")):
            assert load_autoencoder("default").family == "my-own"
    assert any("my-own" in r.getMessage() for r in caplog.records)


# --- images <-> tensors ------------------------------------------------------------------------


def test_to_tensor_pads_by_replicating_edges():
    img = make_test_image(37, 21)
    x, pad_right, pad_bottom = to_tensor(img, 8)
    assert (pad_right, pad_bottom) == (3, 3)
    assert x.shape == (1, 3, 24, 40) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[0, :, :21, 37:], x[0, :, :21, 36:37].expand(-1, -1, 3))
    assert torch.equal(x[0, :, 21:, :], x[0, :, 20:21, :].expand(-1, 3, -1))
    assert to_tensor(make_test_image(16, 8), 8)[1:] == (0, 0)


def test_to_tensor_and_to_pil_round_trip_exactly():
    img = make_test_image(37, 21)
    x, _, _ = to_tensor(img, 8)
    assert x[0, :, 0, 0].tolist() == pytest.approx([v / 127.5 - 1 for v in img.getpixel((0, 0))])
    back = to_pil(x[0], 37, 21)
    assert back.mode == "RGB" and back.size == (37, 21)
    assert back.tobytes() == img.tobytes()


def test_to_tensor_refuses_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        to_tensor(make_test_image(8, 8, mode="RGBA"), 8)


def host_formula(x: torch.Tensor, width: int, height: int) -> np.ndarray:
    """What to_pil computed before it quantised on the tensor's device: float32 on the host."""
    x = x[:, :height, :width].detach().to("cpu", torch.float32)
    pixels = x.clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).contiguous().numpy()


def exact_halves() -> torch.Tensor:
    """float32 values whose pixel value lands exactly on k + 0.5, where rounding is to even."""
    guesses = (torch.arange(256, dtype=torch.float32) + 0.5) / 127.5 - 1
    up = down = guesses
    near = [guesses]
    for _ in range(3):  # a few ulps either side, where the product may round onto the half
        up, down = up.nextafter(torch.tensor(2.0)), down.nextafter(torch.tensor(-2.0))
        near += [up, down]
    pool = torch.cat(near)
    scaled = pool.add(1.0).mul(127.5)
    halves = pool[scaled - scaled.floor() == 0.5]
    floors = halves.add(1.0).mul(127.5).floor()
    assert (floors % 2 == 0).any() and (floors % 2 == 1).any()  # both ways of rounding to even
    return halves


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # gpu: skipped without CUDA


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_to_pil_quantises_exactly_as_on_the_host(device, dtype):
    generator = torch.Generator().manual_seed(0)
    special = torch.tensor([-1.0, 1.0, 0.0, -1.0001, 1.0001, -7.0, 7.0, -math.inf, math.inf])
    fixed = torch.cat([exact_halves(), special])
    noise = torch.randn(3 * 40 * 56 - len(fixed), generator=generator) * 1.5  # past [-1, 1] too
    values = torch.cat([fixed, noise])
    x = values[torch.randperm(len(values), generator=generator)].reshape(3, 40, 56)
    x = x.to(dtype)
    for width, height in ((56, 40), (37, 21), (1, 1)):
        picture = to_pil(x.to(device), width, height)
        assert picture.size == (width, height)
        assert np.array_equal(np.asarray(picture), host_formula(x, width, height))


def test_to_pil_copies_uint8_pixels_to_the_host(monkeypatch):
    """The float32 -> uint8 quantisation happens before the copy, not after it."""
    copied = []
    real = torch.Tensor.to

    def spy(self, *args, **kwargs):
        if any(isinstance(a, (str, torch.device)) for a in (*args, *kwargs.values())):
            copied.append(self.dtype)  # a move to a device: what gets transferred
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    to_pil(torch.rand(3, 24, 40) * 2 - 1, 37, 21)
    assert copied == [torch.uint8]


# --- encode --------------------------------------------------------------------------------------


# A 1x1 latent grid is out of reach of the *tiny* model only: with one channel per GroupNorm group
# it has a single value to normalise (the real SD VAE has 16 channels per group).
@pytest.mark.parametrize("size", [(37, 21), (64, 64), (9, 8), (1, 16), (65, 9), (100, 3)])
def test_latent_shape_rounds_up_to_the_grid(ae, size):
    width, height = size
    (latents,) = encode_images(ae, [make_test_image(width, height)])
    assert latents.shape == (4, math.ceil(height / 8), math.ceil(width / 8))
    assert latents.dtype == np.float32 and latents.flags.c_contiguous
    assert np.isfinite(latents).all()


def test_encode_is_deterministic(ae):
    img = make_test_image(37, 21)
    (a,) = encode_images(ae, [img])
    (b,) = encode_images(ae, [img])
    assert np.array_equal(a, b)


def test_latents_depend_on_the_picture(ae):
    a, b = encode_images(ae, [make_test_image(32, 32, seed=0), make_test_image(32, 32, seed=1)])
    assert not np.allclose(a, b, atol=1e-3)


def test_latents_are_raw_not_scaled(ae):
    img = make_test_image(32, 32)
    (latents,) = encode_images(ae, [img])
    x, _, _ = to_tensor(img, 8)
    with torch.no_grad():
        mean = ae.model.encode(x).latent_dist.mean[0].numpy()
    np.testing.assert_allclose(latents, mean, rtol=1e-5, atol=1e-6)


def test_same_size_images_share_one_batch_and_keep_their_order(ae, monkeypatch):
    images = [
        make_test_image(64, 48, seed=0),
        make_test_image(37, 21, seed=1),
        make_test_image(64, 48, seed=2),
        make_test_image(37, 21, seed=3),
        make_test_image(64, 48, seed=4),
    ]
    singles = [encode_images(ae, [img])[0] for img in images]

    batches = []
    original = ae.model.encode

    def spy(x, *args, **kwargs):
        batches.append(tuple(x.shape))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(ae.model, "encode", spy)
    together = encode_images(ae, images)
    assert sorted(batches) == [(2, 3, 24, 40), (3, 3, 48, 64)]
    for one, batched in zip(singles, together, strict=True):
        np.testing.assert_allclose(batched, one, rtol=1e-5, atol=1e-5)

    batches.clear()
    limited = encode_images(ae, images, max_batch=2)
    assert sorted(b[0] for b in batches) == [1, 2, 2]
    for one, batched in zip(singles, limited, strict=True):
        np.testing.assert_allclose(batched, one, rtol=1e-5, atol=1e-5)


def test_encode_of_nothing_is_nothing(ae):
    assert encode_images(ae, []) == []


def test_nan_weights_raise_non_finite_latents(ae):
    with torch.no_grad():
        ae.model.encoder.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLatents) as info:
        encode_images(ae, [make_test_image(16, 16), make_test_image(16, 16, seed=1)])
    assert isinstance(info.value, ValueError)
    assert info.value.indices == [0, 1]
    assert "images 0, 1" in str(info.value)


def test_non_finite_latents_name_the_bad_item_and_keep_the_rest(ae, monkeypatch):
    original = ae.model.encode

    def poisoned(x, *args, **kwargs):
        out = original(x, *args, **kwargs)
        out.latent_dist.mean[1, 2, 0, 0] = float("inf")
        return out

    monkeypatch.setattr(ae.model, "encode", poisoned)
    images = [make_test_image(16, 16, seed=s) for s in range(3)]
    with pytest.raises(NonFiniteLatents, match=r"image 1 of 3") as info:
        encode_images(ae, images)
    assert info.value.indices == [1]
    good = info.value.results
    assert good[1] is None and good[0].shape == good[2].shape == (4, 2, 2)


# --- decode --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(37, 21), (64, 64), (1, 16), (65, 9)])
def test_decode_returns_the_original_size(ae, size):
    (latents,) = encode_images(ae, [make_test_image(*size)])
    img = decode_latents(ae, latents, *size)
    assert img.mode == "RGB" and img.size == size


def test_decode_crops_the_padding_instead_of_resizing(ae):
    (latents,) = encode_images(ae, [make_test_image(37, 21)])
    full = decode_latents(ae, latents, 40, 24)  # the whole padded grid
    cropped = decode_latents(ae, latents, 37, 21)
    assert cropped.tobytes() == full.crop((0, 0, 37, 21)).tobytes()


def test_decode_is_deterministic_and_depends_on_latents(ae):
    a, b = encode_images(ae, [make_test_image(32, 32, seed=0), make_test_image(32, 32, seed=1)])
    assert decode_latents(ae, a, 32, 32).tobytes() == decode_latents(ae, a, 32, 32).tobytes()
    assert decode_latents(ae, a, 32, 32).tobytes() != decode_latents(ae, b, 32, 32).tobytes()


def test_decode_refuses_latents_it_cannot_read(ae):
    (latents,) = encode_images(ae, [make_test_image(37, 21)])
    with pytest.raises(ValueError, match="16 channels"):
        decode_latents(ae, np.zeros((16, 3, 5), np.float32), 37, 21)
    with pytest.raises(ValueError, match="41x21"):
        decode_latents(ae, latents, 41, 21)
    with pytest.raises(ValueError, match=r"\(C, h, w\)"):
        decode_latents(ae, latents[0], 37, 21)
    bad = latents.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        decode_latents(ae, bad, 37, 21)


def test_decode_accepts_float16_latents(ae):
    (latents,) = encode_images(ae, [make_test_image(37, 21)])
    img = decode_latents(ae, latents.astype(np.float16), 37, 21)
    assert img.size == (37, 21)


# --- SD3-style 16-channel model ------------------------------------------------------------------


def test_sd3_style_model_round_trips(sd3_dir):
    with override_settings(LATENTSTORE=latentstore(sd3_dir, FAMILY="sd3")):
        ae = load_autoencoder("default")
        assert ae.family == "sd3"
        assert ae.latent_channels == 16
        assert ae.scaling_factor == pytest.approx(1.5305)
        assert ae.shift_factor == pytest.approx(0.0609)
        assert ae.downsample == 8
        assert ae.model.quant_conv is None and ae.model.post_quant_conv is None
        (latents,) = encode_images(ae, [make_test_image(37, 21)])
        assert latents.shape == (16, 3, 5)
        img = decode_latents(ae, latents, 37, 21)
        assert img.mode == "RGB" and img.size == (37, 21)


# --- measuring a bare model --------------------------------------------------------------------


@pytest.fixture
def fingerprint_calls(monkeypatch) -> list:
    """Every model fingerprint_state_dict hashes; the real function still runs."""
    calls = []
    real = autoencoders.fingerprint_state_dict

    def spy(model):
        calls.append(model)
        return real(model)

    monkeypatch.setattr(autoencoders, "fingerprint_state_dict", spy)
    return calls


def test_measuring_a_model_again_does_not_hash_its_weights_again(fingerprint_calls):
    # The training script's evaluation measures one model three times per held-out picture.
    torch.manual_seed(0)
    model = AutoencoderKL(**tiny_autoencoder_config())
    picture = make_test_image(24, 16)
    blobs = [measure_round_trip(model, picture, dtype=d).blob for d in ("float16", "int8") * 2]
    assert len(fingerprint_calls) == 1
    assert {read_header(blob).fingerprint for blob in blobs} == {fingerprint_state_dict(model)}


def test_a_changed_weight_is_hashed_again_when_measured(fingerprint_calls):
    torch.manual_seed(0)
    model = AutoencoderKL(**tiny_autoencoder_config())
    picture = make_test_image(24, 16)
    before = read_header(measure_round_trip(model, picture).blob).fingerprint
    with torch.no_grad():
        model.decoder.conv_out.bias[0] += 1e-3
    after = read_header(measure_round_trip(model, picture).blob).fingerprint
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    replaced = read_header(measure_round_trip(model, picture).blob).fingerprint
    assert len(fingerprint_calls) == 3
    assert before != after == replaced == fingerprint_state_dict(model)


def test_a_model_made_in_inference_mode_is_measured_every_time(fingerprint_calls):
    # Its tensors keep no version counter: nothing would tell a changed weight.
    with torch.inference_mode():
        torch.manual_seed(0)
        model = AutoencoderKL(**tiny_autoencoder_config())
    picture = make_test_image(24, 16)
    first = measure_round_trip(model, picture).blob
    second = measure_round_trip(model, picture).blob
    assert len(fingerprint_calls) == 2
    assert read_header(first).fingerprint == read_header(second).fingerprint


# --- invariants ----------------------------------------------------------------------------------


def test_worker_code_never_unpickles():
    root = pathlib.Path(__file__).resolve().parent.parent / "workers"
    for path in root.glob("*.py"):
        source = path.read_text()
        assert "torch.load(" not in source, path
        assert not re.search(r"^\s*(import|from) (c?pickle|dill)\b", source, re.M), path

"""Latent families and the instant latent -> RGB preview."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from latentstore.families import FAMILIES, Family, UnknownFamily, get_family
from latentstore.preview import latents_to_rgb

SD = {"family": "sd", "scaling_factor": 0.18215, "shift_factor": 0.0}


def raw_latents(family="sd", h=8, w=8, seed=0):
    """Raw latents whose model-space values have unit spread, as a VAE's would."""
    fam = get_family(family)
    z = np.random.default_rng(seed).normal(0.0, 1.0, (fam.channels, h, w))
    return (z / fam.scaling_factor + fam.shift_factor).astype(np.float32)


def reference_rgb(latents, family, scaling_factor, shift_factor):
    """The preview at latent resolution, spelled out in float64 as ComfyUI computes it."""
    fam = get_family(family)
    model = (latents.astype(np.float64) - shift_factor) * scaling_factor
    rgb = np.einsum("chw,ck->hwk", model, np.array(fam.rgb_factors)) + np.array(fam.rgb_bias)
    return np.round((np.clip(rgb, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def pixels(image):
    return np.asarray(image).astype(np.int16)


# ---------------------------------------------------------------------------------------------
# families


def test_family_table_matches_comfyui():
    # ls-small is latentstore's own (fitted, tests/test_pretrained.py); the rest are ComfyUI's.
    assert set(FAMILIES) == {"sd", "sdxl", "sd3", "flux", "ls-small"}
    expected = {
        "sd": (4, 0.18215, 0.0),
        "sdxl": (4, 0.13025, 0.0),
        "sd3": (16, 1.5305, 0.0609),
        "flux": (16, 0.3611, 0.1159),
    }
    for name, (channels, scaling, shift) in expected.items():
        fam = get_family(name)
        assert fam.name == name
        assert (fam.channels, fam.scaling_factor, fam.shift_factor) == (channels, scaling, shift)
        assert len(fam.rgb_factors) == channels
        assert all(len(row) == 3 for row in fam.rgb_factors) and len(fam.rgb_bias) == 3
    # Spot checks against comfy/latent_formats.py.
    assert get_family("sd").rgb_factors[3] == (-0.2120, -0.2616, -0.7177)
    assert get_family("sd").rgb_bias == (0.0, 0.0, 0.0)
    assert get_family("sdxl").rgb_bias == (0.1084, -0.0175, -0.0011)
    assert get_family("sd3").rgb_factors[15] == (-0.1448, -0.1463, -0.1189)
    assert get_family("sd3").rgb_bias == (0.2394, 0.2135, 0.1925)
    assert get_family("flux").rgb_factors[0] == (-0.0346, 0.0244, 0.0681)
    assert get_family("flux").rgb_bias == (-0.0329, -0.0718, -0.0851)


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(UnknownFamily) as info:
        get_family("sd4")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "'sd4'" in message
    for name in ("flux", "sd", "sd3", "sdxl"):
        assert name in message
    with pytest.raises(UnknownFamily):
        get_family(["sd"])  # unhashable: still the clear error, not a TypeError


def test_families_are_read_only():
    with pytest.raises(TypeError):
        FAMILIES["mine"] = get_family("sd")  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_family("sd").channels = 8  # type: ignore[misc]


def test_family_rejects_a_malformed_table():
    with pytest.raises(ValueError, match="rows"):
        Family("x", 4, 1.0, 0.0, ((1.0, 0.0, 0.0),) * 3, (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="3 values"):
        Family("x", 1, 1.0, 0.0, ((1.0, 0.0),), (0.0, 0.0, 0.0))


# ---------------------------------------------------------------------------------------------
# preview: what it computes


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_projection_at_latent_resolution_matches_reference(family):
    fam = get_family(family)
    x = raw_latents(family, 12, 10, seed=1)
    image = latents_to_rgb(x, family, fam.scaling_factor, fam.shift_factor, (10, 12))
    assert image.mode == "RGB" and image.size == (10, 12)
    expected = reference_rgb(x, family, fam.scaling_factor, fam.shift_factor)
    diff = np.abs(pixels(image) - expected)
    assert diff.max() <= 1  # float32 vs float64 at .5 rounding boundaries
    assert (diff == 0).mean() > 0.98


def test_known_values_sd():
    # sd has no bias and no shift: raw zeros project to mid grey (127.5 rounds to 128).
    image = latents_to_rgb(np.zeros((4, 2, 3), np.float32), **SD, size=(3, 2))
    assert (pixels(image) == 128).all()
    # One channel at +1 in model space gives 127.5 * (1 + factors[0]) per colour.
    x = np.zeros((4, 1, 1), np.float32)
    x[0] = 1.0 / 0.18215
    expected = np.round(127.5 * (1 + np.array(get_family("sd").rgb_factors[0])))
    assert pixels(latents_to_rgb(x, **SD, size=(1, 1)))[0, 0].tolist() == expected.tolist()


def test_shift_and_scaling_are_applied():
    # flux: raw == shift is model-space zero, so the image is the bias alone.
    fam = get_family("flux")
    x = np.full((16, 2, 2), fam.shift_factor, np.float32)
    image = latents_to_rgb(x, "flux", fam.scaling_factor, fam.shift_factor, (2, 2))
    expected = np.round((np.array(fam.rgb_bias) + 1) * 127.5)
    assert (pixels(image) == expected).all()
    # The recorded factors are used, not the family defaults.
    other = latents_to_rgb(x, "flux", fam.scaling_factor, 0.0, (2, 2))
    assert not np.array_equal(pixels(other), pixels(image))


def test_out_of_range_values_clip_instead_of_wrapping():
    fam = get_family("sd")
    x = np.zeros((4, 1, 2), np.float32)
    x[:, 0, 0] = 1000.0 * np.sign(np.array(fam.rgb_factors)[:, 0])  # R far above +1
    x[:, 0, 1] = -1000.0 * np.sign(np.array(fam.rgb_factors)[:, 0])  # R far below -1
    image = pixels(latents_to_rgb(x, **SD, size=(2, 1)))
    assert image[0, 0, 0] == 255 and image[0, 1, 0] == 0
    expected = reference_rgb(x, **SD)
    assert (image == expected).all()


@pytest.mark.parametrize(
    "grid, size",
    [
        ((64, 64), (256, 256)),  # x4: bit-identical to Pillow
        ((64, 64), (512, 512)),  # x8
        ((32, 48), (64, 96)),  # x2
        ((5, 7), (35, 21)),  # x7, x3: not powers of two, so within 2 levels
    ],
)
def test_integer_upscale_matches_pillow_bilinear(grid, size):
    w, h = grid
    x = raw_latents("sd", h, w, seed=2)
    small = latents_to_rgb(x, **SD, size=grid)
    image = latents_to_rgb(x, **SD, size=size)
    assert image.mode == "RGB" and image.size == size
    expected = pixels(small.resize(size, Image.Resampling.BILINEAR))
    diff = np.abs(pixels(image) - expected)
    if all(n / m in (2, 4, 8) for n, m in zip(size, grid, strict=True)):
        assert diff.max() == 0
    else:
        assert diff.max() <= 2


@pytest.mark.parametrize("grid, size", [((64, 48), (200, 150)), ((37, 23), (300, 211))])
def test_non_integer_upscale_is_mostly_identical_to_pillow(grid, size):
    # 8-bit weights instead of Pillow's 22-bit ones: off by at most 2 levels, and rarely.
    w, h = grid
    x = raw_latents("sd", h, w, seed=5)
    small = latents_to_rgb(x, **SD, size=grid)
    diff = pixels(latents_to_rgb(x, **SD, size=size)) - pixels(
        small.resize(size, Image.Resampling.BILINEAR)
    )
    assert np.abs(diff).max() <= 2
    assert (diff != 0).mean() < 0.2
    assert abs(diff.mean()) < 0.05  # no bias


@pytest.mark.parametrize(
    "grid, size",
    [
        ((64, 48), (200, 150)),  # non-integer upscale (numpy path)
        ((64, 64), (48, 48)),  # downscale (Pillow path, antialiased)
        ((64, 64), (65, 40)),  # up in x, down in y (Pillow path)
        ((3, 2), (1, 1)),
        ((1, 1), (9, 4)),
    ],
)
def test_any_size_is_close_to_pillow_bilinear(grid, size):
    w, h = grid
    x = raw_latents("sd", h, w, seed=3)
    small = latents_to_rgb(x, **SD, size=grid)
    image = latents_to_rgb(x, **SD, size=size)
    assert image.mode == "RGB" and image.size == size
    expected = pixels(small.resize(size, Image.Resampling.BILINEAR))
    assert np.abs(pixels(image) - expected).max() <= 2


def test_inputs_of_other_layouts_and_dtypes():
    x = raw_latents("sd", 16, 16, seed=4)
    expected = pixels(latents_to_rgb(x, **SD, size=(32, 32)))
    for variant in (x.astype(np.float64), np.asfortranarray(x)):
        assert (pixels(latents_to_rgb(variant, **SD, size=(32, 32))) == expected).all()
    flipped = x[:, ::-1, :]  # non-contiguous view
    assert (
        pixels(latents_to_rgb(flipped, **SD, size=(32, 32)))
        == pixels(latents_to_rgb(flipped.copy(), **SD, size=(32, 32)))
    ).all()
    half = latents_to_rgb(x.astype(np.float16), **SD, size=(32, 32))
    assert np.abs(pixels(half) - expected).max() <= 2


def test_image_is_independent_of_the_input_and_writable():
    x = raw_latents("sd", 8, 8)
    for size in ((8, 8), (32, 32), (4, 4)):
        image = latents_to_rgb(x, **SD, size=size)
        before = pixels(image).copy()
        x += 100.0
        assert (pixels(image) == before).all()
        image.putpixel((0, 0), (1, 2, 3))  # not a read-only mapped buffer
        assert image.getpixel((0, 0)) == (1, 2, 3)


# ---------------------------------------------------------------------------------------------
# preview: errors


def test_channel_mismatch_is_a_clear_error():
    x16 = raw_latents("flux", 8, 8)
    with pytest.raises(ValueError, match=r"16 channels but family 'sd' has 4"):
        latents_to_rgb(x16, **SD, size=(8, 8))
    with pytest.raises(ValueError, match=r"4 channels but family 'sd3' has 16"):
        latents_to_rgb(raw_latents("sd"), "sd3", 1.5305, 0.0609, (8, 8))


def test_unknown_family_in_preview():
    with pytest.raises(UnknownFamily, match="known families: flux, ls-small, sd, sd3, sdxl"):
        latents_to_rgb(raw_latents("sd"), "kandinsky", 1.0, 0.0, (8, 8))


@pytest.mark.parametrize(
    "latents",
    [
        np.zeros((4, 8), np.float32),
        np.zeros((1, 4, 8, 8), np.float32),
        np.zeros((4, 8, 8), np.int16),
        np.zeros((4, 0, 8), np.float32),
    ],
)
def test_bad_latent_arrays(latents):
    with pytest.raises(ValueError):
        latents_to_rgb(latents, **SD, size=(8, 8))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e300])
def test_non_finite_latents(bad):
    x = raw_latents("sd").astype(np.float64)
    x[2, 3, 4] = bad
    with pytest.raises(ValueError, match="NaN or infinity"):
        latents_to_rgb(x, **SD, size=(8, 8))


@pytest.mark.parametrize(
    "size", [(0, 8), (8, -1), (8.0, 8), (True, 8), (8, 8, 8), 8, None, "88", (10**6, 10**6)]
)
def test_bad_sizes(size):
    with pytest.raises(ValueError, match="size"):
        latents_to_rgb(raw_latents("sd"), **SD, size=size)


def test_numpy_integer_sizes_are_fine():
    image = latents_to_rgb(raw_latents("sd"), **SD, size=(np.int64(16), np.int32(24)))
    assert image.size == (16, 24)


# ---------------------------------------------------------------------------------------------
# property


@settings(max_examples=60, deadline=None)
@given(
    family=st.sampled_from(sorted(FAMILIES)),
    h=st.integers(1, 24),
    w=st.integers(1, 24),
    out_w=st.integers(1, 160),
    out_h=st.integers(1, 160),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_size_mode_and_closeness_to_pillow(family, h, w, out_w, out_h, seed):
    fam = get_family(family)
    x = raw_latents(family, h, w, seed=seed)
    small = latents_to_rgb(x, family, fam.scaling_factor, fam.shift_factor, (w, h))
    image = latents_to_rgb(x, family, fam.scaling_factor, fam.shift_factor, (out_w, out_h))
    assert image.mode == "RGB" and image.size == (out_w, out_h)
    expected = pixels(small.resize((out_w, out_h), Image.Resampling.BILINEAR))
    assert np.abs(pixels(image) - expected).max() <= 2

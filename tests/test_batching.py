"""The worker's batched encode/decode: batching, memory bounds, OOM splits, NaN re-runs, tiling.

Everything runs the real tiny diffusers models loaded from disk. Faults are injected *around*
the real model with forward pre-hooks on its encoder/decoder (the hook raises what a GPU would
raise at that call); the model itself is never replaced.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from latentstore_workers.autoencoders import clear_cache, load_autoencoder
from latentstore_workers.batching import NonFinite, OutOfMemory
from latentstore_workers.codec import (
    NonFiniteImage,
    NonFiniteLatents,
    decode_latents,
    decode_outcomes,
    encode_images,
    encode_many,
    iter_encode,
    iter_encode_stream,
)
from latentstore_workers.memory import activation_bytes, is_out_of_memory
from tests.conftest import latentstore_config
from tests.tiny import make_test_image, save_overflowing_autoencoder, save_tiny_autoencoder


def configure(settings, vae_dir: pathlib.Path, top: dict | None = None, **options) -> None:
    """Point LATENTSTORE at ``vae_dir`` with autoencoder ``options`` and top-level ``top``."""
    config = latentstore_config(vae_dir, **(top or {}))
    config["AUTOENCODERS"]["default"].update(options)
    settings.LATENTSTORE = config


@pytest.fixture(autouse=True)
def _fresh_models():
    clear_cache()
    yield
    clear_cache()  # tests damage models and register hooks


@pytest.fixture(scope="module")
def overflow_dir(tmp_path_factory) -> pathlib.Path:
    return save_overflowing_autoencoder(tmp_path_factory.mktemp("overflow-vae"))


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory) -> pathlib.Path:
    """Two levels (2x downsampling) and no mid-block attention: every output is local."""
    return save_tiny_autoencoder(
        tmp_path_factory.mktemp("local-vae"),
        seed=0,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        mid_block_add_attention=False,
    )


@contextlib.contextmanager
def watch(module: torch.nn.Module, fault=None):
    """Record the input shape of every call of ``module``; ``fault(x)`` may raise first."""
    shapes: list[tuple[int, ...]] = []

    def hook(_module, args):
        x = args[0]
        shapes.append(tuple(x.shape))
        if fault is not None:
            fault(x)

    handle = module.register_forward_pre_hook(hook)
    try:
        yield shapes
    finally:
        handle.remove()


def pictures(sizes, seed=0) -> list[Image.Image]:
    return [make_test_image(w, h, seed=seed + i) for i, (w, h) in enumerate(sizes)]


MIXED = [(64, 48), (37, 21), (64, 48), (37, 21), (64, 48), (64, 48), (16, 16)]


def one_by_one(ae, images):
    return [encode_images(ae, [img], max_batch=1)[0] for img in images]


# --- batching ------------------------------------------------------------------------------------


def test_batched_encode_equals_one_by_one():
    ae = load_autoencoder("default")
    images = pictures(MIXED)
    singles = one_by_one(ae, images)
    with watch(ae.model.encoder) as shapes:
        outcomes = encode_many(ae, images)
    # Grouped by size: three forward passes for three sizes, results in input order.
    assert sorted(s[0] for s in shapes) == [1, 2, 4]
    for single, outcome in zip(singles, outcomes, strict=True):
        assert outcome.ok and not outcome.float32_rerun and not outcome.tiled
        np.testing.assert_allclose(outcome.value, single, rtol=1e-4, atol=1e-5)


def test_batched_decode_equals_one_by_one():
    ae = load_autoencoder("default")
    images = pictures(MIXED)
    latents = encode_images(ae, images)
    items = [(z, img.width, img.height) for z, img in zip(latents, images, strict=True)]
    singles = [decode_latents(ae, *item) for item in items]
    with watch(ae.model.decoder) as shapes:
        outcomes = decode_outcomes(ae, items)
    assert sorted(s[0] for s in shapes) == [1, 2, 4]
    for single, outcome in zip(singles, outcomes, strict=True):
        assert outcome.value.size == single.size
        diff = np.abs(np.asarray(outcome.value, int) - np.asarray(single, int))
        assert diff.max() <= 1  # rounding to 8 bits only


def test_batch_size_bounds_each_forward_pass():
    ae = load_autoencoder("default")
    images = pictures([(32, 32)] * 7)
    with watch(ae.model.encoder) as shapes:
        outcomes = encode_many(ae, images, max_batch=3)
    assert [s[0] for s in shapes] == [3, 3, 1]
    assert all(o.ok for o in outcomes)


def test_memory_budget_bounds_the_batch(settings, tiny_vae_dir):
    per_image = activation_bytes(8, torch.float32, 32 * 32, "encode")
    configure(settings, tiny_vae_dir, top={"MEMORY_BUDGET": 2 * per_image + 1})
    ae = load_autoencoder("default")
    assert ae.memory_budget == 2 * per_image + 1
    images = pictures([(32, 32)] * 5)
    with watch(ae.model.encoder) as shapes:
        outcomes = encode_many(ae, images, max_batch=16)
    assert [s[0] for s in shapes] == [2, 2, 1]
    np.testing.assert_allclose(
        np.stack([o.value for o in outcomes]), np.stack(one_by_one(ae, images)), atol=1e-5
    )


def test_the_next_batch_is_launched_before_the_previous_is_handed_back():
    """Each batch is handed back as it is done, and the device never waits for the consumer:
    pass N+1 is queued before N's results go out (the default on an asynchronous device, a GPU;
    asked for here, on the CPU)."""
    ae = load_autoencoder("default")
    events: list[str] = []
    with watch(ae.model.encoder, fault=lambda x: events.append(f"launch {x.shape[0]}")):
        for done in iter_encode(ae, pictures([(32, 32)] * 5), max_batch=2, lookahead=True):
            events.append(f"results {[i for i, _o in done]}")
    assert events == [
        "launch 2",
        "launch 2",
        "results [0, 1]",
        "launch 1",
        "results [2, 3]",
        "results [4]",
    ]


def test_a_stream_pulls_its_next_chunk_while_the_device_is_busy():
    """Chunks arriving over time (claimed rows) share one stream: the next one is pulled after
    the current pass is launched, and its first pass is launched before the previous results
    are handed back."""
    ae = load_autoencoder("default")
    events: list[str] = []
    images = pictures([(32, 32)] * 4)

    def chunks():
        for start in (0, 2):
            events.append(f"chunk {start}")
            yield images[start : start + 2], [(32, 32)] * 2, 2

    with watch(ae.model.encoder, fault=lambda x: events.append("launch")):
        outcomes = {}
        for done in iter_encode_stream(ae, chunks(), lookahead=True):  # as on a GPU
            events.append(f"results {[i for i, _o in done]}")
            outcomes.update(done)
    assert events == ["chunk 0", "launch", "chunk 2", "launch", "results [0, 1]", "results [2, 3]"]
    expected = one_by_one(ae, images)
    for index, value in enumerate(expected):
        np.testing.assert_allclose(outcomes[index].value, value, rtol=1e-4, atol=1e-5)


def test_a_stream_lets_go_of_finished_pictures():
    """A worker drains a backlog for a minute: pictures it has encoded must not pile up."""
    import gc
    import weakref

    ae = load_autoencoder("default")
    alive: list[weakref.ref] = []

    def chunks():
        for seed in range(3):
            images = pictures([(32, 32)] * 2, seed=10 * seed)
            alive.extend(weakref.ref(img) for img in images)
            yield images, None, 2

    seen = []
    for _done in iter_encode_stream(ae, chunks()):
        gc.collect()
        seen.append(sum(ref() is not None for ref in alive))
    # At most the batch in flight and the one being stacked are held, never all of them.
    assert max(seen) <= 4 and seen[-1] <= 2


def test_a_compiled_model_runs_short_batches_padded_to_its_batch_size(settings, tiny_vae_dir):
    """One graph per shape: a short batch is padded (copies of its last input), not recompiled,
    and the padding changes no result."""
    images = pictures([(32, 32)] * 3)
    expected = encode_images(load_autoencoder("default"), images)
    clear_cache()
    configure(settings, tiny_vae_dir, COMPILE={"backend": "aot_eager"})
    ae = load_autoencoder("default")
    seen = []
    original = ae.model.encode

    def spy(x, *args, **kwargs):
        seen.append(x.shape[0])
        return original(x, *args, **kwargs)

    ae.model.encode = spy
    outcomes = encode_many(ae, images, max_batch=2)
    assert seen == [2, 2]  # 2, then 1 padded to 2
    for outcome, value in zip(outcomes, expected, strict=True):
        assert outcome.ok and outcome.value.shape == value.shape
        np.testing.assert_allclose(outcome.value, value, rtol=1e-4, atol=1e-5)
    clear_cache()
    configure(settings, tiny_vae_dir)
    eager = load_autoencoder("default")
    with watch(eager.model.encoder) as shapes:
        encode_many(eager, images, max_batch=2)
    assert [s[0] for s in shapes] == [2, 1]  # an eager model pays nothing for odd sizes


def test_pictures_may_be_futures_and_a_broken_one_fails_alone():
    from concurrent.futures import Future

    ae = load_autoencoder("default")
    images = pictures([(32, 32)] * 3)
    sources = []
    for i, img in enumerate(images):
        future = Future()
        if i == 1:
            future.set_exception(OSError("truncated file"))
        else:
            future.set_result(img)
        sources.append(future)
    outcomes = encode_many(ae, sources, sizes=[(32, 32)] * 3)
    assert outcomes[0].ok and outcomes[2].ok
    assert "truncated file" in str(outcomes[1].error)
    np.testing.assert_allclose(outcomes[2].value, one_by_one(ae, [images[2]])[0], atol=1e-5)


def test_a_wrongly_declared_size_runs_on_its_own():
    ae = load_autoencoder("default")
    images = pictures([(32, 32), (48, 40), (32, 32)])
    outcomes = encode_many(ae, images, sizes=[(32, 32)] * 3)  # the middle one is not 32x32
    assert [o.value.shape for o in outcomes] == [(4, 4, 4), (4, 5, 6), (4, 4, 4)]


# --- out of memory -------------------------------------------------------------------------------


def oom_above(limit: int):
    def fault(x):
        if x.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (batch of {x.shape[0]})"
            )

    return fault


def test_out_of_memory_splits_the_batch_in_halves_and_loses_nothing(caplog):
    ae = load_autoencoder("default")
    images = pictures([(32, 32)] * 8)
    expected = one_by_one(ae, images)
    with caplog.at_level(logging.WARNING, logger="latentstore_workers.batching"):
        with watch(ae.model.encoder, fault=oom_above(2)) as shapes:
            outcomes = encode_many(ae, images, max_batch=8)
    # 8 fails, 4 fails, then 2 + 2; the other 4 fail once more, then 2 + 2.
    assert [s[0] for s in shapes] == [8, 4, 2, 2, 4, 2, 2]
    for outcome, value in zip(outcomes, expected, strict=True):
        assert outcome.ok
        np.testing.assert_allclose(outcome.value, value, rtol=1e-4, atol=1e-5)
    assert any("ran out of memory" in r.getMessage() for r in caplog.records)
    # The size that fitted is remembered for this shape: the next batch starts there.
    with watch(ae.model.encoder, fault=oom_above(2)) as shapes:
        assert all(o.ok for o in encode_many(ae, images, max_batch=8))
    assert [s[0] for s in shapes] == [2, 2, 2, 2]


def test_out_of_memory_splits_decode_batches_too():
    ae = load_autoencoder("default")
    images = pictures([(32, 32)] * 4)
    items = [(z, 32, 32) for z in encode_images(ae, images)]
    expected = [np.asarray(decode_latents(ae, *item)) for item in items]
    with watch(ae.model.decoder, fault=oom_above(1)) as shapes:
        outcomes = decode_outcomes(ae, items, max_batch=4)
    assert [s[0] for s in shapes] == [4, 2, 1, 1, 2, 1, 1]
    for outcome, value in zip(outcomes, expected, strict=True):
        assert np.array_equal(np.asarray(outcome.value), value)


def test_a_single_item_out_of_memory_is_retried_tiled(settings, tiny_vae_dir):
    configure(settings, tiny_vae_dir, TILE_ABOVE_PIXELS=None, TILE_SIZE=32)

    def fault(x):  # only a whole 64x64 picture is too big; 32x32 tiles fit
        if x.shape[-1] > 32:
            raise torch.OutOfMemoryError("CUDA out of memory.")

    ae = load_autoencoder("default")
    with watch(ae.model.encoder, fault=fault) as shapes:
        (outcome,) = encode_many(ae, [make_test_image(64, 64)])
    assert outcome.ok and outcome.tiled
    assert shapes[0][-2:] == (64, 64) and all(s[-1] <= 32 for s in shapes[1:])
    assert outcome.value.shape == (4, 8, 8)


def all_black(x: torch.Tensor) -> bool:
    """Whether any sample of the batch is an all-black picture (every input value -1)."""
    return bool((x.flatten(1) == -1).all(dim=1).any())


def test_an_item_that_never_fits_is_reported_and_the_others_land(settings, tiny_vae_dir):
    configure(settings, tiny_vae_dir, TILE_SIZE=32)

    def fault(x):  # the black picture is hopeless: whole, halved or tiled
        if all_black(x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    ae = load_autoencoder("default")
    images = pictures([(64, 48)] * 3)
    images[1] = Image.new("RGB", (64, 48), (0, 0, 0))
    with watch(ae.model.encoder, fault=fault) as shapes:
        outcomes = encode_many(ae, images)
    assert outcomes[0].ok and outcomes[2].ok
    assert isinstance(outcomes[1].error, OutOfMemory) and outcomes[1].tiled
    assert "64x48" in str(outcomes[1].error) and "even alone and tiled" in str(outcomes[1].error)
    assert isinstance(outcomes[1].error.__cause__, torch.OutOfMemoryError)
    assert any(s[-1] <= 32 for s in shapes)  # the tiled attempt was made


def test_cpu_allocation_failures_count_as_out_of_memory():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: 1 TB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


# --- poison items --------------------------------------------------------------------------------


def test_a_poison_item_is_bisected_out_and_the_others_land(caplog):
    ae = load_autoencoder("default")
    images = pictures([(32, 32)] * 6)
    images[4] = Image.new("RGB", (32, 32), (0, 0, 0))  # the poison: all black
    expected = one_by_one(ae, [img for i, img in enumerate(images) if i != 4])

    def fault(x):
        if all_black(x):
            raise RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")

    with caplog.at_level(logging.WARNING, logger="latentstore_workers.batching"):
        with watch(ae.model.encoder, fault=fault):
            outcomes = encode_many(ae, images)
    assert isinstance(outcomes[4].error, RuntimeError)
    assert "CUDNN_STATUS_EXECUTION_FAILED" in str(outcomes[4].error)
    good = [o.value for i, o in enumerate(outcomes) if i != 4]
    np.testing.assert_allclose(np.stack(good), np.stack(expected), rtol=1e-4, atol=1e-5)
    assert any("bisecting" in r.getMessage() for r in caplog.records)


# --- precision -----------------------------------------------------------------------------------


def test_reduced_precision_runs_when_asked_on_cpu(settings, tiny_vae_dir):
    images = pictures(MIXED)
    reference = encode_images(load_autoencoder("default"), images)
    configure(settings, tiny_vae_dir, CPU_DTYPE="float16")
    ae = load_autoencoder("default")
    assert ae.dtype == torch.float16
    assert next(ae.model.parameters()).dtype == torch.float16
    with watch(ae.model.encoder) as shapes_dtypes:
        outcomes = encode_many(ae, images)
    assert len(shapes_dtypes) == 3
    for outcome, value in zip(outcomes, reference, strict=True):
        assert outcome.ok and not outcome.float32_rerun
        assert outcome.value.dtype == np.float32
        np.testing.assert_allclose(outcome.value, value, atol=0.02)  # float16 rounding only
    # Batched still equals one-by-one in float16.
    singles = one_by_one(ae, images)
    for outcome, single in zip(outcomes, singles, strict=True):
        np.testing.assert_allclose(outcome.value, single, atol=5e-3)


def test_float16_overflow_is_re_run_in_float32_and_logged(settings, overflow_dir, caplog):
    images = pictures([(32, 32), (32, 32), (40, 24)])
    configure(settings, overflow_dir)
    exact = encode_images(load_autoencoder("default"), images)  # float32 is finite
    clear_cache()
    configure(settings, overflow_dir, CPU_DTYPE="float16")
    ae = load_autoencoder("default")
    assert ae.dtype == torch.float16
    with ae.tiling(False), torch.inference_mode():  # the half model really overflows
        x = torch.ones(1, 3, 32, 32, dtype=torch.float16)
        assert not torch.isfinite(ae.model.encode(x).latent_dist.mean).all()
    with caplog.at_level(logging.WARNING, logger="latentstore_workers.batching"):
        outcomes = encode_many(ae, images)
    for outcome, value in zip(outcomes, exact, strict=True):
        assert outcome.ok and outcome.float32_rerun
        np.testing.assert_allclose(outcome.value, value, rtol=1e-4, atol=1e-5)
    reruns = [r.getMessage() for r in caplog.records if "float32" in r.getMessage()]
    # One line per batch (the two sizes batch apart): 2 + 1 items.
    assert sorted(reruns) == [
        f"Autoencoder 'default': encode in float16 gave NaN/Inf for {n} item(s) (overflow); "
        "re-running them in float32"
        for n in (1, 2)
    ]
    twin = ae.float32()
    assert twin.dtype == torch.float32 and twin.fingerprint == ae.fingerprint
    assert ae.float32() is twin  # loaded once
    assert next(ae.model.parameters()).dtype == torch.float16  # the fast model stays half


def test_float16_decode_overflow_is_re_run_in_float32(settings, overflow_dir):
    configure(settings, overflow_dir)
    exact_ae = load_autoencoder("default")
    (z,) = encode_images(exact_ae, [make_test_image(40, 24)])
    exact = np.asarray(decode_latents(exact_ae, z, 40, 24))
    clear_cache()
    configure(settings, overflow_dir, CPU_DTYPE="float16")
    ae = load_autoencoder("default")
    (outcome,) = decode_outcomes(ae, [(z, 40, 24)])
    assert outcome.ok and outcome.float32_rerun
    assert np.array_equal(np.asarray(outcome.value), exact)


def test_non_finite_in_float32_too_fails_the_item(settings, tmp_path):
    import torch as t
    from diffusers import AutoencoderKL

    from tests.tiny import tiny_autoencoder_config

    t.manual_seed(0)
    model = AutoencoderKL(**tiny_autoencoder_config())
    with t.no_grad():
        model.encoder.conv_out.bias[0] = float("nan")
        model.decoder.conv_out.bias[0] = float("nan")
    model.save_pretrained(tmp_path, safe_serialization=True)
    configure(settings, tmp_path, CPU_DTYPE="bfloat16")
    ae = load_autoencoder("default")
    (outcome,) = encode_many(ae, [make_test_image(32, 32)])
    assert isinstance(outcome.error, NonFinite) and outcome.float32_rerun
    assert "float32 too" in str(outcome.error)
    with pytest.raises(NonFiniteLatents, match="image 0 of 1"):
        encode_images(ae, [make_test_image(32, 32)])
    with pytest.raises(NonFiniteImage, match="NaN"):
        decode_latents(ae, np.zeros((4, 4, 4), np.float32), 32, 32)


# --- layout and compilation ----------------------------------------------------------------------


def test_channels_last_is_auto_on_a_cpu_and_changes_nothing_but_speed(settings, tiny_vae_dir):
    from latentstore_workers.autoencoders import channels_last_for

    ae = load_autoencoder("default")  # the default, "auto": on for a CPU
    assert ae.channels_last and ae.device.type == "cpu"
    assert ae.model.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    images = pictures(MIXED)
    fast = encode_images(ae, images)
    clear_cache()
    configure(settings, tiny_vae_dir, CHANNELS_LAST=False)
    plain = load_autoencoder("default")
    assert not plain.channels_last
    assert not plain.model.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    reference = encode_images(plain, images)
    for a, b in zip(fast, reference, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # "auto" is off for a GPU, where eager GroupNorm is slow in channels_last.
    assert channels_last_for("auto", torch.device("cuda")) is False
    assert channels_last_for("AUTO", torch.device("cpu")) is True
    assert channels_last_for(True, torch.device("cuda")) is True
    with pytest.raises(ValueError, match="CHANNELS_LAST"):
        channels_last_for("yes", torch.device("cpu"))


def test_compile_setting_compiles_encoder_and_decoder(settings, tiny_vae_dir):
    images = pictures([(32, 32), (32, 32)])
    eager = load_autoencoder("default")
    assert not eager.compiled
    expected = encode_images(eager, images)
    clear_cache()
    # aot_eager traces the real model through dynamo and AOTAutograd without a C++ build.
    configure(settings, tiny_vae_dir, COMPILE={"backend": "aot_eager"})
    ae = load_autoencoder("default")
    assert ae.compiled
    assert ae.model.encoder._compiled_call_impl is not None
    assert ae.model.decoder._compiled_call_impl is not None
    for a, b in zip(encode_images(ae, images), expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.heavy
def test_compile_with_inductor(settings, tiny_vae_dir):
    images = pictures([(32, 32), (32, 32)])
    expected = encode_images(load_autoencoder("default"), images)
    clear_cache()
    configure(settings, tiny_vae_dir, COMPILE=True)
    ae = load_autoencoder("default")
    for a, b in zip(encode_images(ae, images), expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_bad_run_settings_are_refused(settings, tiny_vae_dir):
    for options, message in (
        ({"TILE_SIZE": 20}, "multiple of 8"),
        ({"TILE_OVERLAP": 1.5}, "TILE_OVERLAP"),
        ({"COMPILE": "fast"}, "COMPILE"),
        ({"CPU_DTYPE": "float8"}, "CPU_DTYPE"),
    ):
        clear_cache()
        configure(settings, tiny_vae_dir, **options)
        with pytest.raises(ValueError, match=message):
            load_autoencoder("default")


# --- tiling --------------------------------------------------------------------------------------


def periodic(size: int, period: int, seed: int) -> Image.Image:
    """A picture repeating one ``period``-pixel patch: every tile has the same statistics."""
    patch = np.asarray(make_test_image(period, period, seed=seed))
    reps = -(-size // period)
    return Image.fromarray(np.tile(patch, (reps, reps, 1))[:size, :size].copy())


def test_tiling_threshold_decides_the_path(settings, tiny_vae_dir):
    configure(settings, tiny_vae_dir, TILE_ABOVE_PIXELS=64 * 64, TILE_SIZE=32)
    ae = load_autoencoder("default")
    with watch(ae.model.encoder) as shapes:
        (small,) = encode_many(ae, [make_test_image(64, 64)])  # 4096 pixels: not above
    assert not small.tiled and shapes == [(1, 3, 64, 64)]
    with watch(ae.model.encoder) as shapes:
        (large,) = encode_many(ae, [make_test_image(72, 72)])  # 5184 pixels: tiled
    assert large.tiled and large.value.shape == (4, 9, 9)
    assert len(shapes) > 1 and all(s[-1] <= 32 and s[-2] <= 32 for s in shapes)
    z = large.value
    with watch(ae.model.decoder) as shapes:
        (picture,) = decode_outcomes(ae, [(z, 72, 72)])
    assert picture.tiled and picture.value.size == (72, 72)
    assert len(shapes) > 1 and all(s[-1] <= 4 for s in shapes)  # 32-pixel tiles: 4 latents
    assert not ae.model.use_tiling  # switched on for the call only


def test_tiled_result_is_close_to_untiled(settings, local_dir):
    # With random weights, GroupNorm statistics per tile and zero padding at tile borders make
    # tiles disagree unless every tile sees the same statistics and a local receptive field:
    # a periodic picture and a model without global attention, as trained VAEs on natural
    # pictures at 512-pixel tiles effectively are.
    images = [periodic(256, 32, seed=1)]
    configure(settings, local_dir, TILE_ABOVE_PIXELS=None)
    whole_ae = load_autoencoder("default")
    whole = encode_images(whole_ae, images)
    whole_pictures = [np.asarray(decode_latents(whole_ae, z, 256, 256), float) for z in whole]
    clear_cache()
    configure(settings, local_dir, TILE_ABOVE_PIXELS=128 * 128, TILE_SIZE=128)
    ae = load_autoencoder("default")
    tiled = encode_many(ae, images)
    decoded = decode_outcomes(ae, [(z, 256, 256) for z in whole])
    for a, b, p, q in zip(whole, tiled, whole_pictures, decoded, strict=True):
        assert b.tiled and q.tiled
        assert np.corrcoef(a.ravel(), b.value.ravel())[0, 1] > 0.99
        assert np.abs(a - b.value).mean() < 0.1 * a.std()
        psnr = 10 * np.log10(255**2 / np.mean((p - np.asarray(q.value, float)) ** 2))
        assert psnr > 25


# --- on a GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_half_precision_matches_cpu_float32(settings, tiny_vae_dir):
    images = pictures(MIXED)
    reference = encode_images(load_autoencoder("default"), images)
    clear_cache()
    configure(settings, tiny_vae_dir, DEVICE="cuda", DTYPE="float16")
    ae = load_autoencoder("default")
    assert ae.device.type == "cuda" and ae.dtype == torch.float16
    for a, b in zip(encode_images(ae, images), reference, strict=True):
        np.testing.assert_allclose(a, b, atol=0.02)
    pictures_back = decode_outcomes(
        ae, [(z, img.width, img.height) for z, img in zip(reference, images, strict=True)]
    )
    assert all(o.ok for o in pictures_back)


@pytest.mark.gpu
def test_gpu_pipelined_batches_equal_one_at_a_time(settings, tiny_vae_dir):
    """On a GPU the stream launches pass N+1 before reading N back (through pinned memory and
    an event): every batch must still read back its own rows, complete."""
    configure(settings, tiny_vae_dir, DEVICE="cuda", DTYPE="float16")
    ae = load_autoencoder("default")
    images = pictures([(48, 32)] * 9)
    batched = encode_many(ae, images, max_batch=2)
    single = [encode_many(ae, [img], max_batch=1)[0] for img in images]
    for a, b in zip(batched, single, strict=True):
        np.testing.assert_allclose(a.value, b.value, atol=0.01)
    items = [(o.value, 48, 32) for o in single]
    back = decode_outcomes(ae, items, max_batch=2)
    alone = [decode_outcomes(ae, [item], max_batch=1)[0] for item in items]
    for a, b in zip(back, alone, strict=True):
        diff = np.abs(np.asarray(a.value, np.int16) - np.asarray(b.value, np.int16))
        assert diff.max() <= 2


@pytest.mark.gpu
def test_gpu_tiled_2048_decode_of_the_full_sd_vae_stays_under_8_gib(tmp_path, settings):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    ).save_pretrained(tmp_path, safe_serialization=True)
    configure(settings, tmp_path, DEVICE="cuda", DTYPE="float16")
    ae = load_autoencoder("default")
    z = np.random.default_rng(0).normal(size=(4, 256, 256)).astype(np.float32)
    torch.cuda.reset_peak_memory_stats()
    (outcome,) = decode_outcomes(ae, [(z, 2048, 2048)])
    assert outcome.ok and outcome.tiled and outcome.value.size == (2048, 2048)
    assert torch.cuda.max_memory_allocated() < 8 * 2**30


def test_resolve_dtype_keeps_its_signature_for_other_loaders():
    from latentstore_workers.autoencoders import _resolve_dtype

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert _resolve_dtype("x", "float16", cpu) == torch.float32  # CPU_DTYPE defaults to float32
    assert _resolve_dtype("x", "float16", cpu, "bfloat16") == torch.bfloat16
    assert _resolve_dtype("x", "bfloat16", gpu) == torch.bfloat16

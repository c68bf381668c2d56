"""System checks for the worker settings (batching, memory, precision, tiling, compile)."""

from __future__ import annotations

from django.core import checks

from tests.conftest import latentstore_config


def ids(settings, tiny_vae_dir, top=None, **autoencoder) -> set[str]:
    config = latentstore_config(tiny_vae_dir, **(top or {}))
    config["AUTOENCODERS"]["default"].update(autoencoder)
    settings.LATENTSTORE = config
    return {m.id for m in checks.run_checks(tags=["latentstore"])}


def test_the_defaults_pass(settings, tiny_vae_dir):
    assert not {i for i in ids(settings, tiny_vae_dir) if i.startswith("latentstore.E05")}


def test_bad_worker_settings_are_flagged(settings, tiny_vae_dir):
    assert "latentstore.E050" in ids(settings, tiny_vae_dir, {"ENCODE_BATCH_SIZE": 0})
    assert "latentstore.E050" in ids(settings, tiny_vae_dir, {"PIXEL_THREADS": "4"})
    assert "latentstore.E051" in ids(settings, tiny_vae_dir, {"MEMORY_BUDGET": "8GB"})
    assert "latentstore.E056" in ids(settings, tiny_vae_dir, {"RETRY_DELAYS": (1, -2)})
    assert "latentstore.E057" in ids(settings, tiny_vae_dir, {"DRAIN_SECONDS": None})
    assert "latentstore.E052" in ids(settings, tiny_vae_dir, CPU_DTYPE="half")
    assert "latentstore.E053" in ids(settings, tiny_vae_dir, TILE_SIZE=500)
    assert "latentstore.E054" in ids(settings, tiny_vae_dir, TILE_OVERLAP=1.0)
    assert "latentstore.E054" in ids(settings, tiny_vae_dir, TILE_ABOVE_PIXELS=-1)
    assert "latentstore.E055" in ids(settings, tiny_vae_dir, COMPILE="max-autotune")
    assert "latentstore.E059" in ids(settings, tiny_vae_dir, CHANNELS_LAST="yes")
    assert "latentstore.E059" not in ids(settings, tiny_vae_dir, CHANNELS_LAST=False)
    found = ids(settings, tiny_vae_dir, {"MEMORY_BUDGET": 2**30}, TILE_ABOVE_PIXELS=None)
    assert not {i for i in found if i.startswith("latentstore.E05")}

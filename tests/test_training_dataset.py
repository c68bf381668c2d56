"""LatentDataset: ready rows from the database as a torch IterableDataset (no export).

Real PostgreSQL, real torch DataLoaders with worker processes (forked, each with its own
database connection).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from latentstore.samples import MixedOrigins
from latentstore.training import LatentDataset
from project.models import Photo
from tests.rows import latent_blob, store_ready
from tests.testapp.models import Poster

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
SD3 = {"family": "sd3", "scaling_factor": 1.5305, "shift_factor": 0.0609, "channels": 16}


def photos(*sizes: tuple[int, int], start: int = 0, **origin) -> list[int]:
    pks = []
    for i, (width, height) in enumerate(sizes, start=start):
        pk = Photo.objects.create(title=f"t{i}").pk
        store_ready(Photo, pk, latent_blob(width, height, seed=i, **origin))
        pks.append(pk)
    return pks


def pks_of(loader) -> list[int]:
    seen = []
    for batch in loader:
        pk = batch["pk"]
        seen += pk.tolist() if isinstance(pk, torch.Tensor) else list(pk)
    return seen


def test_a_dataloader_with_two_workers_sees_every_row_exactly_once():
    pks = photos(*[(64, 48)] * 37)
    Photo.objects.filter(pk=pks[0]).update(image_state="pending")  # not ready: left out
    ready = pks[1:]
    ds = LatentDataset("demo.Photo.image", shuffle=True, seed=3, columns=["title"])
    assert ds.num_rows == 36

    loader = DataLoader(ds, batch_size=4, num_workers=2)
    seen = []
    for batch in loader:
        assert batch["latents"].shape[1:] == (4, 6, 8)
        assert batch["latents"].dtype == torch.float32
        for pk, latents, title in zip(
            batch["pk"].tolist(), batch["latents"], batch["title"], strict=True
        ):
            photo = Photo.objects.get(pk=pk)
            header, raw = photo.image.unpack()
            expected = (raw - np.float32(header.shift_factor)) * np.float32(header.scaling_factor)
            assert np.array_equal(latents.numpy(), expected)
            assert title == photo.title
        seen += batch["pk"].tolist()

    assert Counter(seen) == Counter(ready)  # each once
    assert seen != sorted(seen)  # shuffled
    # The same seed and epoch give the same order; set_epoch reshuffles.
    assert pks_of(DataLoader(ds, batch_size=4, num_workers=2)) == seen
    ds.set_epoch(1)
    again = pks_of(DataLoader(ds, batch_size=4, num_workers=2))
    assert Counter(again) == Counter(ready) and again != seen


def test_two_simulated_ranks_are_disjoint_and_complete():
    pks = photos(*[(40, 24)] * 29)
    parts = []
    for rank in (0, 1):
        ds = LatentDataset(Photo, shuffle=True, seed=7, rank=rank, world_size=2)
        parts.append(pks_of(DataLoader(ds, batch_size=5, num_workers=2)))
    first, second = parts
    assert not set(first) & set(second)
    assert sorted(first + second) == pks
    assert abs(len(first) - len(second)) <= 1
    # Without workers, one rank's part is the same set.
    ds = LatentDataset(Photo, shuffle=True, seed=7, rank=1, world_size=2)
    assert sorted(s["pk"] for s in ds) == sorted(second)


def test_raw_and_model_space_tensors_in_the_dtype_asked_for():
    (pk,) = photos((64, 40), **SD3)
    raw = Photo.objects.get(pk=pk).image.latents
    expected = (raw - np.float32(0.0609)) * np.float32(1.5305)

    (sample,) = LatentDataset(Photo, model_space=False)
    assert sample["latents"].dtype == torch.float32
    assert np.array_equal(sample["latents"].numpy(), raw)
    (sample,) = LatentDataset(Photo)  # model space is the default
    np.testing.assert_allclose(sample["latents"].numpy(), expected, rtol=1e-6)
    (sample,) = LatentDataset(Photo, dtype=torch.bfloat16)
    assert sample["latents"].dtype == torch.bfloat16
    np.testing.assert_allclose(sample["latents"].float().numpy(), expected, rtol=2**-8)
    assert sample["width"] == 64 and sample["height"] == 40
    assert (sample["pad_right"], sample["pad_bottom"]) == (0, 0)
    assert sample["digest"] == Photo.objects.get(pk=pk).image.digest


def test_bucketing_yields_batches_whose_latents_share_a_shape():
    sizes = [(64, 48)] * 7 + [(48, 64)] * 5 + [(32, 32)] * 4
    pks = photos(*sizes)
    ds = LatentDataset(Photo, shuffle=True, seed=1, bucket_size=3)
    seen, shapes = [], Counter()
    for batch in DataLoader(ds, batch_size=None, num_workers=2):
        latents = batch["latents"]
        assert latents.ndim == 4 and 1 <= latents.shape[0] <= 3
        assert len(batch["pk"]) == latents.shape[0] == len(batch["width"])
        shapes[tuple(latents.shape[1:])] += latents.shape[0]
        for pk, width in zip(batch["pk"], batch["width"].tolist(), strict=True):
            assert (width, Photo.objects.get(pk=pk).image.height) in sizes
        seen += batch["pk"]
    assert sorted(seen) == pks
    assert shapes == {(4, 6, 8): 7, (4, 8, 6): 5, (4, 4, 4): 4}

    dropped = LatentDataset(Photo, bucket_size=3, drop_last=True)
    batches = list(DataLoader(dropped, batch_size=None))
    assert [b["latents"].shape[0] for b in batches] == [3] * len(batches)
    assert len(batches) == 7 // 3 + 5 // 3 + 4 // 3


def test_mixed_origins_are_refused_unless_allowed():
    ours = photos((40, 24), (40, 24))
    theirs = photos((40, 24), start=4, fingerprint="f" * 16)
    with pytest.raises(MixedOrigins, match="2 latent spaces.*allow_mixed=True"):
        LatentDataset(Photo)
    samples = {s["pk"]: s for s in LatentDataset(Photo, allow_mixed=True)}
    assert sorted(samples) == ours + theirs
    assert samples[theirs[0]]["fingerprint"] == "f" * 16
    assert samples[ours[0]]["fingerprint"] == "0" * 16
    # A queryset selects one space.
    only = LatentDataset(Photo.objects.filter(pk__in=ours))
    assert sorted(s["pk"] for s in only) == ours


def test_a_queryset_source_with_columns():
    for i, caption in enumerate(["apple", "avocado", "banana"]):
        pk = Poster.objects.create(caption=caption).pk
        store_ready(Poster, pk, latent_blob(40, 24, seed=i))
    ds = LatentDataset(Poster.objects.filter(caption__startswith="a"), columns=["caption"])
    assert sorted(s["caption"] for s in ds) == ["apple", "avocado"]
    with pytest.raises(ValueError, match="columns: 'image_digest' belongs to a LatentImageField"):
        LatentDataset(Poster, columns=["image_digest"])
    with pytest.raises(ValueError, match="give both rank and world_size"):
        LatentDataset(Poster, rank=0)


def test_without_torch_the_import_error_says_what_to_install():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "try:\n"
        "    import latentstore.training\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert "pip install 'latentstore[worker]'" in result.stdout, result.stderr


def test_nothing_in_latentstore_imports_the_training_module():
    # latentstore.training imports torch: the web tier must never reach it.
    for path in (ROOT / "latentstore").rglob("*.py"):
        if path.name == "training.py" and path.parent.name == "latentstore":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            assert "latentstore.training" not in names, f"{path} imports latentstore.training"

"""bench/quality_report.py end to end on small pictures: table, verdict and plot are written."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def load_report():
    spec = importlib.util.spec_from_file_location(
        "quality_report", ROOT / "bench" / "quality_report.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report():
    return load_report()


def test_budget_search_finds_the_best_quality_that_fits(report):
    from latentstore_workers.training.data import load_image

    picture = load_image("skimage:chelsea.png")
    for fmt in ("JPEG", "WEBP"):
        quality, data = report.match_budget(picture, fmt, 6000)
        assert len(data) <= 6000
        # One step better no longer fits: the search did not stop early.
        assert len(report.encode_classic(picture, fmt, quality + 1)) > 6000
        assert Image.open(io.BytesIO(data)).format == fmt
    assert report.match_budget(picture, "JPEG", 50) is None  # nothing is that small


def test_report_writes_table_verdict_and_plot(report, tmp_path, capsys):
    assert report.main(["--out", str(tmp_path), "--max-side", "96"]) == 0
    text = (tmp_path / "quality_report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    # 5 pictures x (float16, int8, int4) x (plain, zstd), plus the header row.
    assert len(rows) == 1 + 5 * 6, text
    for form in ("float16", "int8", "int4", "float16+zstd", "int8+zstd", "int4+zstd"):
        assert f"| {form} |" in text
        assert f"- {form}: mean" in text  # the verdict names each form
    assert "vs JPEG" in text and "vs WebP" in text
    plot = Image.open(tmp_path / "quality_report.png")
    assert plot.width > 500 and plot.height > 200
    assert "Wrote" in capsys.readouterr().out

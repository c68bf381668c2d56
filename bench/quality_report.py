"""Quality report: latent blobs against JPEG and WebP at the same number of bytes.

For each picture (the held-out photos of ``workers/training/data.py`` and a rendered text page)
it stores the autoencoder's latents as float16, int8 and int4 blobs (the real codec,
``latentstore.latents``), each also compressed with zstd, decodes them, and compares with JPEG
and WebP files binary-searched to the largest quality that fits in the same number of bytes.
It prints a table (bytes, PSNR, SSIM) and a verdict per storage form, and writes a plot PNG and
the table as Markdown.

    python bench/quality_report.py                      # the shipped ls-small model
    python bench/quality_report.py --pretrained DIR --family sd   # any save_pretrained VAE

Needs the ``train`` extra (scikit-image, scikit-learn, matplotlib, zstandard).
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from latentstore.quality import psnr  # noqa: E402

LATENT_FORMS = ("float16", "int8", "int4")
ZSTD_LEVEL = 19


@dataclass
class Row:
    image: str
    size: str
    form: str  # e.g. "int8+zstd"
    nbytes: int
    psnr: float
    ssim: float
    jpeg: tuple[int, int, float, float]  # quality, bytes, PSNR, SSIM (quality -1: none fits)
    webp: tuple[int, int, float, float]


def text_page(seed: int = 12345) -> Image.Image:
    """A 512x384 page of text at four sizes (a picture of the training kind, never trained on)."""
    from latentstore_workers.training.data import render_text

    rng = random.Random(seed)
    page = Image.new("RGB", (512, 384), (250, 250, 246))
    for top, size in zip((0, 96, 192, 288), (9, 13, 18, 26), strict=True):
        band = render_text(512, 96, rng, sizes=(size,))
        page.paste(band, (0, top))
    return page


def encode_classic(picture: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        picture.save(buf, format="JPEG", quality=quality, optimize=True)
    else:
        picture.save(buf, format="WEBP", quality=quality, method=6)
    return buf.getvalue()


Encoder = Callable[[Image.Image, str, int], bytes]


def memoised(encode: Encoder = encode_classic) -> Encoder:
    """``encode`` remembering its files: the budget searches of one picture (6 budgets, 2 forms
    each) and its curve probe the same qualities again and again, and WebP at method 6 is slow.
    One per picture: the cache holds the picture's files only."""
    files: dict[tuple[int, str, int], bytes] = {}

    def cached(picture: Image.Image, fmt: str, quality: int) -> bytes:
        key = (id(picture), fmt, quality)
        if key not in files:
            files[key] = encode(picture, fmt, quality)
        return files[key]

    return cached


def match_budget(
    picture: Image.Image, fmt: str, budget: int, encode: Encoder = encode_classic
) -> tuple[int, bytes] | None:
    """The highest quality (1..100) whose file fits in ``budget`` bytes (binary search)."""
    lo, hi, best = 1, 100 if fmt == "WEBP" else 95, None
    while lo <= hi:
        mid = (lo + hi) // 2
        data = encode(picture, fmt, mid)
        if len(data) <= budget:
            best, lo = (mid, data), mid + 1
        else:
            hi = mid - 1
    return best


def classic_point(
    picture: Image.Image, fmt: str, budget: int, ssim_fn, encode: Encoder = encode_classic
) -> tuple[int, int, float, float]:
    found = match_budget(picture, fmt, budget, encode)
    if found is None:
        return (-1, 0, float("nan"), float("nan"))
    quality, data = found
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    return (quality, len(data), psnr(picture, decoded), ssim_fn(picture, decoded))


def classic_curve(
    picture: Image.Image, fmt: str, encode: Encoder = encode_classic
) -> list[tuple[int, float]]:
    points = []
    for quality in (5, 10, 20, 30, 40, 50, 60, 70, 80, 90):
        data = encode(picture, fmt, quality)
        decoded = Image.open(io.BytesIO(data)).convert("RGB")
        points.append((len(data), psnr(picture, decoded)))
    return points


def run(args: argparse.Namespace) -> tuple[list[Row], dict]:
    import torch
    import zstandard
    from diffusers import AutoencoderKL

    from latentstore_workers.autoencoders import load_pretrained
    from latentstore_workers.quality import measure_round_trips, structural_similarity, wrap
    from latentstore_workers.training.data import held_out_images

    torch.set_num_threads(args.threads)
    model, _ = load_pretrained(
        AutoencoderKL, args.pretrained, device=torch.device("cpu"), dtype=torch.float32
    )
    ae = wrap(model, family=args.family, alias="report")
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    decompressor = zstandard.ZstdDecompressor()

    pictures = held_out_images()
    pictures.append(("text page (rendered, seed 12345)", text_page()))
    if args.max_side:
        for _, picture in pictures:
            picture.thumbnail((args.max_side, args.max_side), Image.Resampling.LANCZOS)

    rows: list[Row] = []
    curves: dict = {}
    for name, picture in pictures:
        started = time.perf_counter()
        encode = memoised()
        curves[name] = {fmt: classic_curve(picture, fmt, encode) for fmt in ("JPEG", "WEBP")}
        # One encode per picture: the storage forms differ only in how the latents are packed.
        for form, trip in measure_round_trips(ae, picture, LATENT_FORMS, ssim=True).items():
            ssim = trip.ssim
            packed = compressor.compress(trip.blob)
            # zstd is lossless: the compressed blob is the very same blob, so it decodes to
            # trip.decoded (the decoder is deterministic).
            assert decompressor.decompress(packed) == trip.blob
            for label, nbytes in ((form, trip.nbytes), (f"{form}+zstd", len(packed))):
                rows.append(
                    Row(
                        image=name,
                        size=f"{picture.width}x{picture.height}",
                        form=label,
                        nbytes=nbytes,
                        psnr=trip.psnr,
                        ssim=ssim,
                        jpeg=classic_point(picture, "JPEG", nbytes, structural_similarity, encode),
                        webp=classic_point(picture, "WEBP", nbytes, structural_similarity, encode),
                    )
                )
        print(f"  {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return rows, curves


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| image | size | latent form | bytes | PSNR | SSIM | JPEG q | JPEG B | JPEG PSNR | "
        "JPEG SSIM | WebP q | WebP B | WebP PSNR | WebP SSIM |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for r in rows:
        cells = [r.image, r.size, r.form, str(r.nbytes), f"{r.psnr:.2f}", f"{r.ssim:.4f}"]
        for q, b, p, s in (r.jpeg, r.webp):
            cells += ["-", "-", "-", "-"] if q < 0 else [str(q), str(b), f"{p:.2f}", f"{s:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def verdicts(rows: list[Row]) -> list[str]:
    """Per latent form: mean PSNR/SSIM margin over JPEG and WebP at equal bytes, and wins."""
    lines = []
    forms = list(dict.fromkeys(r.form for r in rows))
    for form in forms:
        mine = [r for r in rows if r.form == form]
        parts = [f"{form}: mean {np.mean([r.nbytes for r in mine]):.0f} B,"]
        for codec, pick in (("JPEG", lambda r: r.jpeg), ("WebP", lambda r: r.webp)):
            fits = [r for r in mine if pick(r)[0] >= 0]
            if not fits:
                parts.append(f"{codec} cannot go that small;")
                continue
            dpsnr = np.mean([r.psnr - pick(r)[2] for r in fits])
            dssim = np.mean([r.ssim - pick(r)[3] for r in fits])
            wins = sum(r.psnr > pick(r)[2] for r in fits)
            parts.append(
                f"vs {codec} {dpsnr:+.2f} dB PSNR, {dssim:+.4f} SSIM "
                f"(latents better on {wins}/{len(fits)} by PSNR);"
            )
        lines.append(" ".join(parts).rstrip(";"))
    return lines


def plot(rows: list[Row], curves: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    names = list(dict.fromkeys(r.image for r in rows))
    cols = 3
    nrows = -(-(len(names) + 1) // cols)  # one spare panel holds the legend
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.8 * nrows), squeeze=False)
    flat = list(axes.flat)
    markers = {"float16": "o", "int8": "s", "int4": "^"}
    for ax, name in zip(flat, names, strict=False):
        for fmt, colour in (("JPEG", "tab:orange"), ("WEBP", "tab:green")):
            xs, ys = zip(*curves[name][fmt], strict=True)
            ax.plot(np.array(xs) / 1024, ys, "-", color=colour, label=fmt.title(), alpha=0.8)
        for r in rows:
            if r.image != name:
                continue
            base = r.form.split("+")[0]
            ax.plot(
                r.nbytes / 1024,
                r.psnr,
                markers[base],
                color="tab:blue",
                markerfacecolor="tab:blue" if "+zstd" in r.form else "white",
                label=f"latents {r.form}",
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("KiB (log scale)")
        ax.set_ylabel("PSNR dB")
        ax.set_title(f"{name.split(':')[-1]} ({next(r.size for r in rows if r.image == name)})")
        ax.grid(True, alpha=0.3)
    handles, labels = flat[0].get_legend_handles_labels()
    for ax in flat[len(names) :]:
        ax.axis("off")
    flat[-1].legend(handles, labels, loc="center", fontsize=10, title="filled: +zstd")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from latentstore_workers.pretrained import LS_SMALL, LS_SMALL_FAMILY

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", default=str(LS_SMALL), help="save_pretrained directory")
    parser.add_argument("--family", default=LS_SMALL_FAMILY)
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "quality")
    parser.add_argument(
        "--max-side", type=int, default=0, help="shrink pictures to fit (0: native size)"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    rows, curves = run(args)
    title = f"{Path(args.pretrained).name} latents vs JPEG/WebP at equal bytes"
    lines = [f"# {title}", "", *table(rows), "", "Verdict (latents minus classic codec):", ""]
    lines += [f"- {v}" for v in verdicts(rows)]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality_report.md").write_text(text)
    plot(rows, curves, args.out / "quality_report.png", title)
    print(
        f"Wrote {args.out / 'quality_report.md'} and {args.out / 'quality_report.png'} "
        f"in {time.perf_counter() - started:.0f} s."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train the small ``AutoencoderKL`` that ships as ``workers/pretrained/ls-small``.

Run (needs the ``train`` extra: ``pip install -e '.[train]'``)::

    python -m latentstore_workers.training.train --out workers/pretrained/ls-small

Everything is seeded (the model's initial weights, the crops, the text, the KL samples); on the
same torch build and thread count two runs give the same weights up to float rounding in the
threaded convolutions. The defaults are the shipped model's recipe; the script writes the
diffusers ``save_pretrained`` directory (``config.json``, ``diffusion_pytorch_model.safetensors``)
and a model card ``README.md`` with the data, the loss curve, the wall time, the fitted latent
statistics and projection, and PSNR/SSIM on the held-out photos.
"""

# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch is imported)
from __future__ import annotations

import os

# Sleep rather than spin while waiting for the other OpenMP thread: on a shared 2-core machine a
# spinning thread burns the quantum its partner needs (measured: median step 1.9 s spinning vs
# 0.57 s passive under a load of 5). Must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from latentstore_workers.training.data import HELD_OUT, TRAIN_IMAGES, CropSampler, load_image

__all__ = ["Recipe", "build_model", "main", "train"]


@dataclass
class Recipe:
    """Architecture and optimisation settings (the defaults are the shipped model's).

    Phase 1 trains from the seed on small crops (cheap steps, many of them). Phase 2 fine-tunes
    on large crops: GroupNorm normalises over the whole picture, so a model that only ever saw
    64x64 crops meets other statistics on a 640x427 photo and shifts its colours (measured on
    the held-out photos: up to 17 levels in a channel's mean). Phase 2 also weighs the error of
    each 8x8 cell's mean colour (``lowfreq_weight``), which is what those shifts are.
    """

    seed: int = 0
    block_out_channels: tuple[int, ...] = (16, 32, 64, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    mid_block_attention: bool = False
    steps: int = 6000
    batch: int = 8
    crop: int = 64
    lr: float = 1.5e-3
    warmup: int = 200
    min_lr_ratio: float = 0.02
    l1_weight: float = 0.2  # L1 helps early on; MSE is what PSNR measures
    mse_weight: float = 1.0
    kl_weight: float = 1e-5  # per latent element, against per-pixel reconstruction terms
    # Initial posterior log-variance. diffusers initialises it near 0 (std 1), which buries the
    # small initial latent means in noise: the decoder learns nothing until the encoder has
    # pushed it down, a large part of a 30-minute budget. Starting at std ~0.05 keeps a real
    # (sampled) VAE that learns from the first step.
    init_logvar: float = -6.0
    text_fraction: float = 0.15
    # Phase 2: fine-tuning on large crops, lr decaying from finetune_lr to 0 (cosine).
    finetune_steps: int = 400
    finetune_batch: int = 2
    finetune_crop: int = 256
    finetune_lr: float = 3e-4
    lowfreq_weight: float = 2.0  # MSE of the 8x8 cell means, phase 2 only
    threads: int = 2
    weights_dtype: str = "float16"  # how the safetensors file stores the weights
    log_every: int = 100

    def phase1(self) -> dict:
        """The settings phase 1 depends on (a resumed run must match them)."""
        keys = (
            "seed block_out_channels layers_per_block norm_num_groups mid_block_attention steps "
            "batch crop lr warmup min_lr_ratio l1_weight mse_weight kl_weight init_logvar "
            "text_fraction"
        ).split()
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k in keys
        }


@dataclass
class Trained:
    model: AutoencoderKL
    recipe: Recipe
    curve: list[dict[str, float]] = field(default_factory=list)
    wall_s: float = 0.0  # both phases
    phase1_wall_s: float = 0.0


def build_model(recipe: Recipe, seed: int | None = None) -> AutoencoderKL:
    """The architecture: diffusers' AutoencoderKL, 4 blocks (8x downsampling), 4 latent channels."""
    torch.manual_seed(recipe.seed if seed is None else seed)
    n = len(recipe.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(recipe.block_out_channels),
        layers_per_block=recipe.layers_per_block,
        norm_num_groups=recipe.norm_num_groups,
        sample_size=recipe.crop,
        mid_block_add_attention=recipe.mid_block_attention,
    )


def initial_model(recipe: Recipe) -> AutoencoderKL:
    """The model training starts from: the seeded architecture with a low initial log-variance."""
    model = build_model(recipe)
    if model.quant_conv is not None:
        with torch.no_grad():  # quant_conv's second half of outputs is the log-variance
            model.quant_conv.bias[model.config.latent_channels :] += recipe.init_logvar
    return model


def _lr_at(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return recipe.lr * (recipe.min_lr_ratio + (1.0 - recipe.min_lr_ratio) * cosine)


def _finetune_lr_at(step: int, recipe: Recipe) -> float:
    return recipe.finetune_lr * 0.5 * (1.0 + math.cos(math.pi * step / recipe.finetune_steps))


def _to_input(batch: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    return x.to(torch.float32).div_(127.5).sub_(1.0)


@dataclass
class _Phase:
    number: int
    steps: int
    batch: int
    sampler: CropSampler
    lr_at: Callable[[int], float]
    lowfreq_weight: float
    log_every: int


def _run_phase(
    model: AutoencoderKL,
    phase: _Phase,
    recipe: Recipe,
    validation: torch.Tensor,
    curve: list[dict],
    log: bool,
    elapsed: float = 0.0,
) -> float:
    """One training phase; appends to ``curve``, returns its wall time in seconds."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=phase.lr_at(0), betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(recipe.seed + phase.number - 1)
    started = time.perf_counter()
    offset = sum(p["step"] for p in curve[-1:])  # steps are counted across phases
    window: list[tuple[float, float, float]] = []
    for step in range(phase.steps):
        for group in optimizer.param_groups:
            group["lr"] = phase.lr_at(step)
        x = _to_input(phase.sampler.batch(phase.batch))
        posterior = model.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        y = model.decode(z).sample
        mse = torch.mean((y - x) ** 2)
        l1 = torch.mean(torch.abs(y - x))
        kl = torch.mean(
            0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar)
        )  # per latent element
        loss = recipe.mse_weight * mse + recipe.l1_weight * l1 + recipe.kl_weight * kl
        if phase.lowfreq_weight:
            cells = torch.nn.functional.avg_pool2d(y - x, 8)
            loss = loss + phase.lowfreq_weight * torch.mean(cells**2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window.append((mse.item(), l1.item(), kl.item()))
        if (step + 1) % phase.log_every == 0 or step + 1 == phase.steps:
            val = _validate(model, validation)
            mse_w, l1_w, kl_w = (float(np.mean(v)) for v in zip(*window, strict=True))
            point = {
                "phase": phase.number,
                "step": offset + step + 1,
                "seconds": round(elapsed + time.perf_counter() - started, 1),
                "lr": phase.lr_at(step),
                "train_mse": mse_w,
                "train_l1": l1_w,
                "train_kl": kl_w,
                "train_psnr": _psnr_from_mse(mse_w),
                "val_psnr": val,
                "load": round(os.getloadavg()[0], 2),
            }
            curve.append(point)
            window.clear()
            if log:
                print(
                    f"phase {phase.number} step {point['step']:>5}  {point['seconds']:>7.0f} s  "
                    f"lr {point['lr']:.2e}  mse {mse_w:.5f}  l1 {l1_w:.4f}  kl {kl_w:.2f}  "
                    f"train {point['train_psnr']:.2f} dB  val {val:.2f} dB",
                    flush=True,
                )
    return time.perf_counter() - started


def train(recipe: Recipe, log: bool = True, resume: Path | None = None) -> Trained:
    """Train from the seed (or resume after phase 1 from a saved model); returns the model.

    Between the phases the weights are rounded to float16, exactly as a saved phase-1 model is,
    so resuming from the output of a ``--finetune-steps 0`` run (phase 1 only) computes the
    same thing as one full run.
    """
    torch.set_num_threads(recipe.threads)
    random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    # A fixed validation batch drawn from the training distribution (another seed): the curve
    # says how well the model fits, the held-out photos say how well it generalises.
    validation = _to_input(
        CropSampler(recipe.crop, seed=recipe.seed + 1, text_fraction=recipe.text_fraction).batch(32)
    )
    if resume is None:
        model = initial_model(recipe)
        result = Trained(model=model, recipe=recipe)
        sampler = CropSampler(recipe.crop, seed=recipe.seed, text_fraction=recipe.text_fraction)
        phase1 = _Phase(
            1,
            recipe.steps,
            recipe.batch,
            sampler,
            lambda s: _lr_at(s, recipe),
            0.0,
            recipe.log_every,
        )
        result.phase1_wall_s = _run_phase(model, phase1, recipe, validation, result.curve, log)
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(torch.float16).to(torch.float32))
    else:
        record = json.loads((resume / "training.json").read_text())
        if Recipe(**record["recipe"]).phase1() != recipe.phase1():
            raise ValueError(f"{resume} was trained with another phase-1 recipe")
        model = AutoencoderKL.from_pretrained(
            resume, use_safetensors=True, torch_dtype=torch.float32
        )
        curve = [p for p in record["curve"] if p.get("phase", 1) == 1]
        for point in curve:
            point.setdefault("phase", 1)
        result = Trained(model=model, recipe=recipe, curve=curve)
        result.phase1_wall_s = record.get("phase1_wall_s", record["wall_s"])
    if recipe.finetune_steps:
        sampler = CropSampler(
            recipe.finetune_crop, seed=recipe.seed + 2, text_fraction=recipe.text_fraction
        )
        phase2 = _Phase(
            2,
            recipe.finetune_steps,
            recipe.finetune_batch,
            sampler,
            lambda s: _finetune_lr_at(s, recipe),
            recipe.lowfreq_weight,
            max(1, recipe.log_every // 2),
        )
        phase2_wall_s = _run_phase(
            model, phase2, recipe, validation, result.curve, log, elapsed=result.phase1_wall_s
        )
    else:
        phase2_wall_s = 0.0
    result.wall_s = result.phase1_wall_s + phase2_wall_s
    model.eval()
    model.requires_grad_(False)
    return result


def _psnr_from_mse(mse: float) -> float:
    # Tensors live in [-1, 1]: the peak-to-peak range is 2.
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def _validate(model: AutoencoderKL, x: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    y = model.decode(model.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    # Quantise to 8 bits as a stored picture would be.
    y = torch.round((y + 1) * 127.5)
    ref = torch.round((x + 1) * 127.5)
    mse = float(torch.mean((y - ref) ** 2))
    model.train(was_training)
    return 10.0 * math.log10(255.0**2 / max(mse, 1e-12))


# --- latent statistics and the preview projection --------------------------------------------


@torch.no_grad()
def latent_statistics(model: AutoencoderKL, names: tuple[str, ...] = TRAIN_IMAGES) -> dict:
    """Scaling/shift (1/std and mean of the raw latents) and the least-squares RGB projection.

    Fitted on the *training* pictures only. The projection maps model-space latents
    ``(raw - shift) * scale`` plus a bias to the picture averaged over each 8x8 cell, in
    [-1, 1] -- what :mod:`latentstore.preview` applies.
    """
    from latentstore_workers.images import to_tensor

    d = 2 ** (len(model.config.block_out_channels) - 1)
    raws, targets = [], []
    for name in names:
        picture = load_image(name)
        picture.thumbnail((512, 512))
        # Crop to whole cells so the box average matches the latent grid exactly.
        w, h = picture.width // d * d, picture.height // d * d
        picture = picture.crop((0, 0, w, h))
        x, _, _ = to_tensor(picture, d)
        raw = model.encode(x).latent_dist.mean[0]  # (C, h, w)
        cells = torch.nn.functional.avg_pool2d(x, d)[0]  # (3, h, w)
        raws.append(raw.flatten(1).T.numpy())
        targets.append(cells.flatten(1).T.numpy())
    raw = np.concatenate(raws).astype(np.float64)
    target = np.concatenate(targets).astype(np.float64)
    shift = float(raw.mean())
    scale = float(1.0 / raw.std())
    model_space = (raw - shift) * scale
    design = np.concatenate([model_space, np.ones((len(model_space), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    fitted = design @ coef
    residual = float(np.sqrt(np.mean((fitted - target) ** 2)))
    return {
        "scaling_factor": round(scale, 5),
        "shift_factor": round(shift, 5),
        "channel_std": [round(float(s), 4) for s in raw.std(axis=0)],
        "channel_mean": [round(float(m), 4) for m in raw.mean(axis=0)],
        "rgb_factors": [[round(float(v), 4) for v in row] for row in coef[:-1]],
        "rgb_bias": [round(float(v), 4) for v in coef[-1]],
        "projection_rms": round(residual, 4),
        "cells": len(raw),
    }


# --- saving, evaluation and the model card -----------------------------------------------------


def save_model(trained: Trained, out: Path, stats: dict) -> None:
    """``save_pretrained`` (safetensors) with the fitted scaling/shift, and the training log.

    The log (``training.json``) holds the recipe, the loss curve, the wall time and the latent
    statistics; :func:`evaluate_dir` adds the held-out measurements and writes the model card.
    """
    model = trained.model
    model.register_to_config(
        scaling_factor=stats["scaling_factor"], shift_factor=stats["shift_factor"]
    )
    out.mkdir(parents=True, exist_ok=True)
    dtype = {"float16": torch.float16, "float32": torch.float32}[trained.recipe.weights_dtype]
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    record = {
        "recipe": asdict(trained.recipe),
        "parameters": sum(p.numel() for p in model.parameters()),
        "wall_s": round(trained.wall_s, 1),
        "phase1_wall_s": round(trained.phase1_wall_s, 1),
        "curve": trained.curve,
        "latent_statistics": stats,
        "machine": _machine(),
    }
    _write_record(out, record)


def _write_record(out: Path, record: dict) -> None:
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def evaluate_dir(out: Path) -> dict:
    """Measure the *saved* weights on the held-out photos; update the log and the model card."""
    record = json.loads((out / "training.json").read_text())
    recipe = Recipe(**record["recipe"])
    from latentstore_workers.autoencoders import load_pretrained

    model, _ = load_pretrained(
        AutoencoderKL, str(out), device=torch.device("cpu"), dtype=torch.float32
    )
    untrained = initial_model(recipe)  # the trained model's starting point
    untrained.eval().requires_grad_(False)
    record["evaluation"] = evaluate(model, untrained)
    _write_record(out, record)
    (out / "README.md").write_text(model_card(out, record))
    return record


def _machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def _load_line(curve: list[dict]) -> str:
    loads = [p["load"] for p in curve if "load" in p]
    if not loads:
        return ""
    return (
        f" The 1-minute load average during the run (sampled at each log point) was median "
        f"{np.median(loads):.1f}, range {min(loads):.1f}-{max(loads):.1f}, on "
        f"{os.cpu_count()} cores: above {os.cpu_count()} this run was waiting for a core."
    )


def model_card(out: Path, record: dict) -> str:
    """The model card (``README.md``) from the training log."""
    r = Recipe(**record["recipe"])
    stats, evaluation, curve = record["latent_statistics"], record["evaluation"], record["curve"]
    weights_kb = (out / "diffusion_pytorch_model.safetensors").stat().st_size / 1024
    curve_rows = "\n".join(
        f"| {p.get('phase', 1)} | {p['step']} | {p['seconds']:.0f} | {p['lr']:.2e} | "
        f"{p['train_mse']:.5f} | "
        f"{p['train_l1']:.4f} | {p['train_kl']:.2f} | {p['val_psnr']:.2f} |"
        for p in _thin([p for p in curve if p.get("phase", 1) == 1], 11)
        + [p for p in curve if p.get("phase", 1) == 2][1::2]
    )
    eval_rows = "\n".join(
        f"| `{row['image']}` | {row['size']} | {row['float16']['psnr']:.2f} | "
        f"{row['float16']['ssim']:.4f} | {row['int8']['psnr']:.2f} | {row['int8']['ssim']:.4f} | "
        f"{row['untrained_psnr']:.2f} | {row['baseline_psnr']:.2f} |"
        for row in evaluation["images"]
    )
    mean = evaluation["mean"]
    mean_row = (
        f"| **mean** | | **{mean['float16']['psnr']:.2f}** | **{mean['float16']['ssim']:.4f}** "
        f"| **{mean['int8']['psnr']:.2f}** | **{mean['int8']['ssim']:.4f}** "
        f"| {mean['untrained_psnr']:.2f} | {mean['baseline_psnr']:.2f} |"
    )
    minutes = record["wall_s"] / 60
    machine = record["machine"]
    phase1_min = record.get("phase1_wall_s", record["wall_s"]) / 60
    values = {
        "params_m": f"{record['parameters'] / 1e6:.2f}",
        "weights_kb": f"{weights_kb:.0f}",
        "weights_dtype": r.weights_dtype,
        "text_fraction": f"{r.text_fraction:.0%}",
        "train_images": ", ".join(f"`{n}`" for n in TRAIN_IMAGES),
        "held_out": ", ".join(f"`{n}`" for n in HELD_OUT),
        "block_out_channels": str(tuple(r.block_out_channels)),
        "layers_per_block": r.layers_per_block,
        "norm_num_groups": r.norm_num_groups,
        "attention": "on" if r.mid_block_attention else "off",
        "init_logvar": f"{r.init_logvar:g}",
        "init_std": f"{math.exp(r.init_logvar / 2):.2f}",
        "steps": r.steps,
        "batch": r.batch,
        "crop": r.crop,
        "crops": r.steps * r.batch,
        "lr": f"{r.lr:g}",
        "warmup": r.warmup,
        "min_lr_ratio": f"{r.min_lr_ratio:g}",
        "seed": r.seed,
        "finetune_steps": r.finetune_steps,
        "finetune_batch": r.finetune_batch,
        "finetune_crop": r.finetune_crop,
        "finetune_lr": f"{r.finetune_lr:g}",
        "lowfreq_weight": f"{r.lowfreq_weight:g}",
        "mse_weight": f"{r.mse_weight:g}",
        "l1_weight": f"{r.l1_weight:g}",
        "kl_weight": f"{r.kl_weight:g}",
        "minutes": f"{minutes:.1f}",
        "minutes_round": f"{minutes:.0f}",
        "phase1_min": f"{phase1_min:.1f}",
        "phase2_min": f"{minutes - phase1_min:.1f}",
        "threads": r.threads,
        "platform": machine["platform"],
        "torch": machine["torch"],
        "load_line": _load_line(curve),
        "curve_rows": curve_rows,
        "scaling_factor": stats["scaling_factor"],
        "shift_factor": stats["shift_factor"],
        "channel_std": stats["channel_std"],
        "channel_mean": stats["channel_mean"],
        "cells": stats["cells"],
        "projection_rms": stats["projection_rms"],
        "rgb_factors": stats["rgb_factors"],
        "rgb_bias": stats["rgb_bias"],
        "table_head": TABLE_HEAD,
        "eval_rows": eval_rows,
        "mean_row": mean_row,
        "smaller": f"{83.7e6 / record['parameters']:.0f}",
        "verdict": _verdict(evaluation),
    }
    return (Path(__file__).with_name("model_card.md")).read_text().format(**values)


def _verdict(evaluation: dict) -> str:
    rows, mean = evaluation["images"], evaluation["mean"]
    short = {row["image"]: row["image"].split(":")[-1] for row in rows}
    better = [short[r["image"]] for r in rows if r["float16"]["psnr"] > r["baseline_psnr"]]
    worse = [short[r["image"]] for r in rows if r["float16"]["psnr"] <= r["baseline_psnr"]]
    margin = mean["float16"]["psnr"] - mean["baseline_psnr"]
    return (
        f"int8 storage moves the mean PSNR by {mean['int8']['psnr'] - mean['float16']['psnr']:+.3f}"
        f" dB; training took the model {mean['float16']['psnr'] - mean['untrained_psnr']:.1f} dB"
        f" above its untrained self; against the box+bicubic floor it is {margin:+.2f} dB on"
        f" average -- better on {', '.join(better) or 'none'}, worse on"
        f" {', '.join(worse) or 'none'}."
    )


TABLE_HEAD = (
    "| image | size | float16 PSNR | float16 SSIM | int8 PSNR | int8 SSIM | untrained PSNR "
    "| box+bicubic PSNR |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def _thin(curve: list[dict], n: int) -> list[dict]:
    if len(curve) <= n:
        return curve
    idx = sorted({round(i * (len(curve) - 1) / (n - 1)) for i in range(n)})
    return [curve[i] for i in idx]


def baseline_psnr(picture: Image.Image, cell: int = 8) -> float:
    """PSNR of the picture's cell means (box filter) upscaled again with bicubic filtering."""
    from latentstore.quality import psnr

    small = picture.resize(
        (-(-picture.width // cell), -(-picture.height // cell)), Image.Resampling.BOX
    )
    return psnr(picture, small.resize(picture.size, Image.Resampling.BICUBIC))


def evaluate(model: AutoencoderKL, untrained: AutoencoderKL) -> dict:
    """PSNR/SSIM of the held-out photos through the production path, float16 and int8 blobs."""
    from latentstore_workers.quality import measure_round_trip, measure_round_trips

    rows = []
    for name in HELD_OUT:
        picture = load_image(name)
        row: dict = {"image": name, "size": f"{picture.width}x{picture.height}"}
        trips = measure_round_trips(model, picture, ("float16", "int8"), ssim=True)
        for dtype, result in trips.items():
            row[dtype] = {"psnr": round(result.psnr, 3), "ssim": round(result.ssim, 4)}
        row["untrained_psnr"] = round(measure_round_trip(untrained, picture).psnr, 3)
        row["baseline_psnr"] = round(baseline_psnr(picture), 3)
        rows.append(row)
    mean: dict = {
        dtype: {k: round(float(np.mean([r[dtype][k] for r in rows])), 4) for k in ("psnr", "ssim")}
        for dtype in ("float16", "int8")
    }
    for key in ("untrained_psnr", "baseline_psnr"):
        mean[key] = round(float(np.mean([r[key] for r in rows])), 3)
    return {"images": rows, "mean": mean}


def main(argv: list[str] | None = None) -> None:
    defaults = Recipe()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("workers/pretrained/ls-small"))
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="skip phase 1: start phase 2 from this saved phase-1 model (a --finetune-steps 0 run)",
    )
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="measure the weights already in --out and rewrite its model card; no training",
    )
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"))
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=lambda s: tuple(int(v) for v in s.split(",")))
        else:
            parser.add_argument(flag, type=type(value))
    args = parser.parse_args(argv)
    if not args.evaluate_only:
        skip = ("out", "evaluate_only", "resume")
        overrides = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
        recipe = Recipe(**{**asdict(defaults), **overrides})
        print(f"Recipe: {asdict(recipe)}", flush=True)
        trained = train(recipe, resume=args.resume)
        print(f"Trained in {trained.wall_s / 60:.1f} min.", flush=True)
        save_model(trained, args.out, latent_statistics(trained.model))
    torch.set_num_threads(Recipe().threads)
    record = evaluate_dir(args.out)
    print(json.dumps({k: record[k] for k in ("latent_statistics", "evaluation")}, indent=1))
    print(f"Saved to {args.out}")


if __name__ == "__main__":
    main()

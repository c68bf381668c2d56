#!/usr/bin/env python
"""Encode/decode throughput of the SD VAE: the seed path, our worker functions, end to end.

One run, one device, one model (the full SD VAE architecture — ``AutoencoderKL`` with
block_out_channels (128, 256, 512, 512), layers_per_block 2, 4 latent channels — with random
weights from a seed, saved as safetensors and loaded through the production ``PRETRAINED``
path; compute does not depend on the weights' values). For each size it measures, side by side:

1. **seed** — a plain diffusers loop, one image at a time, float32, default memory layout;
2. **ours** — ``latentstore_workers.codec.encode_many`` / ``decode_outcomes``: batched, ``--dtype``,
   ``--channels-last`` and ``torch.compile`` (``--compile``) when asked; beside it **forward**,
   the same model's bare forward passes on inputs already on the device, so the table shows
   what the pipeline around the model costs (ours / forward);
3. **e2e** — the whole path (``bench/endtoend.py``): rows saved by this process playing the web
   process, one by one (a message each, as a site's uploads) and in bulk (``batched_enqueue``,
   as an import), encoded by a real Celery worker process (Redis, PostgreSQL: claim, Pillow
   decode, encode, write-back) until every row is ready, compared with (1) and (2) — encode
   only; beside it the first picture on an idle worker, the cost of a message whose row is
   already done, and the host stages per picture.

and prints images/s, the ratios (2)/(1) and (3)/(1), peak memory, and achieved TFLOP/s (FLOPs of
one forward pass counted by ``torch.utils.flop_counter.FlopCounterMode``) as a fraction of the
device's peak — the datasheet's dense figure when the GPU is in the table below, else a large
matmul measured here (the table says which). Finally it decodes one ``--large`` picture tiled
and untiled and reports the peak memory of each.

Examples::

    python bench/gpu_bench.py --device auto --sizes 512 1024 --out table.md   # a GPU
    python bench/gpu_bench.py --device cpu                                      # 128², 256²
    python bench/gpu_bench.py --device cpu --ops encode --sizes 128 192 --count 12 --large 0

End to end needs PostgreSQL and Redis (``--database-url``, ``--broker-url``); without them that
part is skipped, saying so. Nothing here is a test: no assertion, only measurements.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# Dense tensor-core peaks from the datasheets, TFLOP/s: (fp16/bf16, tf32, fp32 without tensor
# cores). Matched against torch.cuda.get_device_name(), first hit wins.
PEAKS: list[tuple[tuple[str, ...], str, tuple[float, float, float]]] = [
    (("H200",), "H200 (SXM)", (989.0, 494.0, 67.0)),
    (("H100", "PCIE"), "H100 PCIe", (756.0, 378.0, 51.0)),
    (("H100", "NVL"), "H100 NVL", (835.0, 418.0, 60.0)),
    (("H100",), "H100 SXM", (989.0, 494.0, 67.0)),
    (("A100",), "A100", (312.0, 156.0, 19.5)),
    (("L40S",), "L40S", (362.0, 183.0, 91.6)),
    (("L4",), "L4", (121.0, 60.0, 30.3)),
    (("A10",), "A10", (125.0, 62.5, 31.2)),
    (("4090",), "RTX 4090", (165.0, 82.6, 82.6)),
]


@dataclass
class Row:
    op: str  # encode / decode
    size: int
    path: str  # seed / ours / e2e / tiled / untiled
    batch: int | str
    dtype: str
    images: int
    seconds: float
    peak: int | None = None
    flops: float | None = None  # per image
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ips(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--sizes", type=int, nargs="+", help="square sizes (GPU 512 1024; CPU 128 256)")
    p.add_argument("--dtype", help="ours/e2e precision (GPU float16; CPU float32)")
    p.add_argument(
        "--batch",
        type=int,
        help="images per forward pass (GPU 16; CPU: the worker's CPU plan, bare passes of 1)",
    )
    p.add_argument(
        "--cpu-batch", default="auto", help="the CPU_BATCH_SIZE setting: auto, none or a number"
    )
    p.add_argument("--ops", nargs="+", default=["encode", "decode"], help="encode and/or decode")
    p.add_argument("--count", type=int, help="images per measurement (GPU 64; CPU 2)")
    p.add_argument(
        "--e2e-count", type=int, help="rows for end to end (GPU 1024; CPU --count, at least 12)"
    )
    p.add_argument("--first-runs", type=int, default=2, help="first-picture tries; best counts")
    p.add_argument(
        "--rounds", type=int, default=2, help="e2e rounds, each beside a seed loop; best counts"
    )
    p.add_argument("--stale-messages", type=int, default=100, help="done-row messages sent")
    p.add_argument("--stage-rows", type=int, default=4, help="rows timed stage by stage")
    p.add_argument(
        "--compile",
        nargs="?",
        const="true",
        help="torch.compile ours and the worker; optionally the COMPILE setting as JSON, e.g. "
        """'{"mode": "max-autotune-no-cudagraphs"}'""",
    )
    p.add_argument("--seed-runs", type=int, default=3, help="seed path runs; the fastest counts")
    p.add_argument(
        "--channels-last",
        choices=["auto", "on", "off"],
        default="auto",
        help="channels_last layout for ours and the worker (default: the setting's 'auto': on "
        "for a CPU, off for a GPU)",
    )
    p.add_argument("--large", type=int, help="tiled decode peak memory size (GPU 2048; CPU 256)")
    p.add_argument(
        "--tile-size", type=int, help="TILE_SIZE for the large decode (GPU 512; CPU 128)"
    )
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end measurement")
    p.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--broker-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the table (Markdown) to this file")
    p.add_argument("--json", help="also write the raw measurements (JSON) to this file")
    return p.parse_args()


# --- set-up ------------------------------------------------------------------------------------


def fill_defaults(args: argparse.Namespace, device) -> None:
    gpu = device.type == "cuda"
    args.sizes = args.sizes or ([512, 1024] if gpu else [128, 256])
    args.dtype = args.dtype or ("float16" if gpu else "float32")
    args.device_type = device.type
    args.explicit_batch = args.batch is not None
    args.batch = args.batch or (16 if gpu else 1)
    args.count = args.count or (64 if gpu else 2)
    # Whole batches only: a remainder would be another shape (another cuDNN plan, a recompile).
    args.count = max(args.batch, args.count // args.batch * args.batch)
    # End to end runs longer so its fixed costs (the first batch's pixels, the last write-back,
    # noticing the end) weigh as they would on a busy worker, not as in a 0.1 s sprint.
    args.e2e_count = args.e2e_count or (1024 if gpu else max(12, args.count))
    args.e2e_count = max(args.batch, args.e2e_count // args.batch * args.batch)
    args.large = args.large if args.large is not None else (2048 if gpu else 256)
    args.tile_size = args.tile_size or (512 if gpu else 128)


def build_model(directory: Path, seed: int) -> Path:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(**SD_VAE).save_pretrained(directory, safe_serialization=True)
    return directory


def latentstore_config(model_dir: Path, args: argparse.Namespace, device) -> dict[str, Any]:
    entry = {
        "PRETRAINED": str(model_dir),
        "FAMILY": "sd",
        "DTYPE": args.dtype,
        "CPU_DTYPE": args.dtype if device.type == "cpu" else "float32",
        "DEVICE": str(device),
        "CHANNELS_LAST": {"auto": "auto", "on": True, "off": False}[args.channels_last],
        "COMPILE": compile_setting(args.compile),
    }
    config: dict[str, Any] = {"AUTOENCODERS": {"default": entry}}
    if device.type == "cuda" or args.explicit_batch:
        config["ENCODE_BATCH_SIZE"] = config["DECODE_BATCH_SIZE"] = args.batch
    cpu_batch = str(args.cpu_batch).lower()
    config["CPU_BATCH_SIZE"] = {"auto": "auto", "none": None}.get(cpu_batch) or int(cpu_batch)
    return config


def compile_setting(value: str | None) -> bool | dict[str, Any]:
    """``--compile``'s value as the COMPILE setting: off, on, or torch.compile options."""
    if value is None:
        return False
    if value.strip().lower() in ("true", "1", "yes", ""):
        return True
    options = json.loads(value)
    if not isinstance(options, dict):
        raise SystemExit(f"--compile takes a JSON object of torch.compile options, not {value!r}")
    return options


def pictures(size: int, count: int, seed: int):
    """Smooth random pictures (upsampled noise): natural-ish statistics, cheap to make."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        small = rng.integers(0, 256, size=(max(2, size // 32),) * 2 + (3,), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))
    return out


# --- measuring ---------------------------------------------------------------------------------


def timed(device, fn) -> float:
    from latentstore_workers.memory import synchronize

    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def measure(device, fn) -> tuple[float, int]:
    """Seconds and peak memory of ``fn()``; on CPU the peak is RSS above the level before."""
    from latentstore_workers.memory import peak_bytes, reset_peak

    reset_peak(device)
    base, _kind = peak_bytes(device)
    seconds = timed(device, fn)
    peak, _kind = peak_bytes(device)
    return seconds, (peak if device.type == "cuda" else max(0, peak - base))


def count_flops(size: int) -> tuple[float, float]:
    """FLOPs of one encode and one decode of a ``size``² picture.

    Counted by ``FlopCounterMode`` on one forward pass of the same architecture on the ``meta``
    device: the counter needs only shapes, so this costs no compute at any size.
    """
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = AutoencoderKL(**SD_VAE).eval()
        x = torch.empty(1, 3, size, size)
        z = torch.empty(1, 4, size // 8, size // 8)
    counts = []
    for run in (lambda: model.encode(x).latent_dist.mean, lambda: model.decode(z).sample):
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            run()
        counts.append(float(counter.get_total_flops()))
    return counts[0], counts[1]


def peak_tflops(device, dtype: str) -> tuple[float, str]:
    """The device's dense peak for ``dtype``: datasheet when known, else a measured matmul."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).upper()
        for needles, label, (half, tf32, fp32) in PEAKS:
            if all(n in name for n in needles):
                if dtype in ("float16", "bfloat16"):
                    return half, f"{label} datasheet, dense {dtype}"
                if torch.backends.cudnn.allow_tf32:
                    return tf32, f"{label} datasheet, dense TF32 (cuDNN convolutions use TF32)"
                return fp32, f"{label} datasheet, fp32"
    return measured_matmul_tflops(device, dtype), f"measured {dtype} matmul"


def measured_matmul_tflops(device, dtype: str) -> float:
    import torch

    n = 8192 if device.type == "cuda" else 2048
    torch_dtype = getattr(torch, dtype)
    if device.type == "cpu" and torch_dtype != torch.float32:
        torch_dtype = torch.float32  # CPU half matmuls are emulated: not a peak
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    for _ in range(3):
        a @ b
    reps = 20 if device.type == "cuda" else 3
    best = min(timed(device, lambda: [a @ b for _ in range(reps)]) for _ in range(3))
    return 2 * n**3 * reps / best / 1e12


# --- the three paths ---------------------------------------------------------------------------


def seed_encode(model, images, device) -> list:
    """The seed: one image at a time, float32, plain diffusers."""
    import torch

    from latentstore_workers.images import to_tensor

    out = []
    with torch.no_grad():
        for img in images:
            x, _r, _b = to_tensor(img, 8)
            out.append(model.encode(x.to(device)).latent_dist.mean.cpu())
    return out


def seed_decode(model, latents, device, size: int) -> list:
    import torch

    from latentstore_workers.images import to_pil

    out = []
    with torch.no_grad():
        for z in latents:
            z = torch.from_numpy(z).unsqueeze(0).to(device)
            out.append(to_pil(model.decode(z).sample[0], size, size))
    return out


def services_available(args) -> str | None:
    import socket
    from urllib.parse import urlparse

    for url in (args.database_url, args.broker_url):
        parts = urlparse(url)
        try:
            with socket.create_connection((parts.hostname, parts.port), timeout=1):
                pass
        except OSError:
            return f"{parts.scheme} at {parts.hostname}:{parts.port} is not reachable"
    return None


# --- the table ---------------------------------------------------------------------------------


def gib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**30:.2f} GiB"


def table(rows: list[Row], peak: dict[str, tuple[float, str]], header: list[str]) -> str:
    lines = [*header, ""]
    lines.append(
        "| op | size | path | batch | dtype | images/s | ratio | peak memory | TFLOP/s | of peak |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    by_key = {(r.op, r.size, r.path): r for r in rows}
    for r in rows:
        ratio = ""
        if r.path in ("ours", "forward") and (r.op, r.size, "seed") in by_key:
            ratio = f"{r.ips / by_key[(r.op, r.size, 'seed')].ips:.2f}× seed"
            if r.path == "ours" and (r.op, r.size, "forward") in by_key:
                ratio += f", {r.ips / by_key[(r.op, r.size, 'forward')].ips:.2f}× forward"
        elif r.path.startswith("e2e") and (r.op, r.size, "ours") in by_key:
            ratio = f"{r.ips / by_key[(r.op, r.size, 'ours')].ips:.2f}× ours"
            beside = (r.op, r.size, "seed, interleaved with e2e")
            if beside in by_key:
                ratio = f"**{r.ips / by_key[beside].ips:.2f}× seed**, " + ratio
        achieved = fraction = "—"
        if r.flops:
            tflops = r.flops * r.ips / 1e12
            achieved = f"{tflops:.2f}"
            top, _source = peak[r.dtype]
            fraction = f"{100 * tflops / top:.1f} %"
        ips = "—" if r.path in ("tiled", "untiled") else f"{r.ips:.2f}"
        label = r.path + (f" ({r.note})" if r.note else "")
        lines.append(
            f"| {r.op} | {r.size}² | {label} | {r.batch} | {r.dtype} | {ips} | {ratio} | "
            f"{gib(r.peak)} | {achieved} | {fraction} |"
        )
    lines.append("")
    for dtype, (top, source) in peak.items():
        lines.append(f"- peak {dtype}: {top:.3g} TFLOP/s ({source})")
    return "\n".join(lines) + "\n"


# --- main ----------------------------------------------------------------------------------------


def main() -> int:
    args = parse_args()
    import torch

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine", file=sys.stderr)
        return 2
    fill_defaults(args, device)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="latentstore-bench-"))
    model_dir = build_model(workdir / "sd-vae", args.seed)
    config = latentstore_config(model_dir, args, device)
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "bench.settings",
            "LATENTSTORE_BENCH": json.dumps(config),
            "LATENTSTORE_VAR_DIR": str(workdir / "var"),
            "DATABASE_URL": args.database_url,
            "CELERY_BROKER_URL": args.broker_url,
            "CELERY_BROKER_KEYPREFIX": f"lsbench-{uuid.uuid4().hex[:8]}:",
            "LATENTSTORE_BENCH_DB": f"latentstore_bench_{os.getpid()}",
        }
    )
    import django

    django.setup()
    import diffusers
    from diffusers import AutoencoderKL

    from latentstore_workers.autoencoders import load_autoencoder

    ours = load_autoencoder("default")
    import importlib.util

    seed_model = AutoencoderKL.from_pretrained(
        model_dir,
        use_safetensors=True,
        low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
    )
    seed_model = seed_model.to(device).eval()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    name = name or platform.machine()
    log(
        f"device {device} ({name}); ours: {ours.dtype}, batch {args.batch}, compile "
        f"{args.compile}, channels_last {ours.channels_last}"
    )
    load_before = os.getloadavg()[0]

    peak = {"float32": peak_tflops(device, "float32")}
    peak[args.dtype] = peak_tflops(device, args.dtype)
    rows: list[Row] = []
    for size in args.sizes:
        rows += bench_size(size, args, device, ours, seed_model, log)

    def seed_loop(size: int, count: int) -> float:
        images = pictures(size, count, args.seed + size)
        return timed(device, lambda: seed_encode(seed_model, images, device))

    e2e_note, e2e_text = end_to_end(args, rows, log, seed_loop)

    if args.large:
        rows += large_decode(args, device, ours, log)

    header = [
        f"# latentstore GPU benchmark — {datetime.date.today().isoformat()}",
        "",
        f"- command: `python bench/gpu_bench.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- device: {device} — {name}; torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}",
        f"- model: full SD VAE architecture, random weights (seed {args.seed}); ours: "
        f"{args.dtype}, channels_last={ours.channels_last} ({args.channels_last}), "
        f"compile={args.compile}; "
        "seed: float32, one at a time",
        f"- load average (1 min) {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the "
        f"end; CPU_BATCH_SIZE {config.get('CPU_BATCH_SIZE')!r} (CPU only)",
        f"- images per measurement: {args.count}; peak memory: "
        + (
            "torch.cuda.max_memory_allocated"
            if device.type == "cuda"
            else "peak RSS above the level before the measurement (VmHWM)"
        ),
    ]
    if e2e_note:
        header.append(f"- end to end: {e2e_note}")
    text = table(rows, peak, header) + e2e_text
    print()
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(
            json.dumps([{**r.__dict__, "ips": r.ips} for r in rows], indent=2, default=str)
        )
    log("done")
    return 0


def end_to_end(args, rows: list[Row], log, seed_loop) -> tuple[str | None, str]:
    """Run ``bench/endtoend.py``; add its rows to ``rows``; its note and extra tables."""
    from bench import endtoend

    note = "skipped (--no-e2e)" if args.no_e2e else services_available(args)
    if note is None and "encode" not in args.ops:
        note = "skipped (encode not in --ops)"
    if note is not None:
        log(f"  end to end: {note}")
        return note, ""
    try:
        results = endtoend.run(args, args.sizes, pictures, seed_loop, log)
    except Exception as exc:  # report, and still print the rest
        log(f"  end to end failed: {type(exc).__name__}: {exc}")
        return f"failed: {type(exc).__name__}: {exc}", ""
    firsts = [
        "| size | the model's time for one picture (the seed loop, beside each try) | "
        "first picture, end to end | ratio |"
    ]
    firsts.append("|---|---|---|---|")
    stale = []
    for result in results:
        at = next(
            i
            for i, r in enumerate(rows)
            if (r.op, r.size, r.path) == ("encode", result.size, "ours")
        )
        paths = (
            ("seed, interleaved with e2e", result.seed),
            ("e2e one by one", result.one_by_one),
            ("e2e bulk", result.bulk),
        )
        for path, seconds in paths:
            batch = 1 if path.startswith("seed") else rows[at].batch
            row = Row("encode", result.size, path, batch, args.dtype, result.rows, seconds)
            row.flops = rows[at].flops
            row.note = f"{result.rows} rows, fastest of {args.rounds} rounds"
            at += 1
            rows.insert(at, row)
        one = result.seed_one
        firsts.append(
            f"| {result.size}² | {one:.3f} s | {result.first:.3f} s "
            f"(best of {args.first_runs} each) | {result.first / one:.2f}× |"
        )
        stale.append(
            f"- {result.size}²: {result.stale_ms:.1f} ms per message through Celery and Redis, "
            f"sending included ({args.stale_messages} sent at once); the worker process's CPU "
            f"{result.stale_cpu_ms:.1f} ms per message; the worker function alone (the claim "
            f"transaction: no model, no thread, no blob) {result.stale_claim_ms:.1f} ms"
        )
    text = "\n## First picture on an idle worker\n\n" + "\n".join(firsts) + "\n"
    text += "\n## Messages whose row is already done\n\n" + "\n".join(stale) + "\n"
    text += "\n## Host stages per picture (ms; encode_rows in this process)\n\n"
    return None, text + endtoend.stage_table(results)


def bench_size(size: int, args, device, ours, seed_model, log) -> list[Row]:
    """Seed and ours, encode (and decode, when in ``--ops``), at one size."""

    from latentstore_workers.codec import encode_many

    images = pictures(size, args.count, args.seed + size)
    enc_flops = count_flops(size)[0]
    # Warm-ups at full size where they matter (cuDNN plans, compilation); a token one on CPU.
    warm = images if device.type == "cuda" or args.compile else pictures(64, args.batch, 1)
    rows = []

    seed_encode(seed_model, warm[:1], device)  # warm-ups
    encode_many(ours, warm[: args.batch])
    result: dict[str, Any] = {}
    # Interleaved, the fastest run of each: on a shared machine both see the same load, and a
    # slow run flatters neither.
    seed_runs, ours_runs = [], []
    for _ in range(max(1, args.seed_runs)):
        seed_runs.append(measure(device, lambda: seed_encode(seed_model, images, device)))
        ours_runs.append(measure(device, lambda: result.update(o=encode_many(ours, images))))
    seconds, mem = min(seed_runs)
    rows.append(Row("encode", size, "seed", 1, "float32", args.count, seconds, mem, enc_flops))
    rows[-1].note = seed_note(args)
    log(f"  seed encode {size}²: {args.count / seconds:.2f} images/s")

    seconds, mem = min(ours_runs)
    batch = planned_batch(args, ours, "encode", size)
    rows.append(Row("encode", size, "ours", batch, args.dtype, args.count, seconds, mem))
    rows[-1].flops = enc_flops
    rows[-1].note = _note(result["o"])
    log(f"  ours encode {size}²: {args.count / seconds:.2f} images/s {rows[-1].note}")
    latents = [o.value for o in result["o"] if o.ok]
    rows.insert(-1, bare_forward("encode", size, args, device, ours, enc_flops))
    log(f"  bare forward encode {size}²: {rows[-2].ips:.2f} images/s")
    if "decode" in args.ops:
        rows += bench_decode(size, args, device, ours, seed_model, warm, latents, log)
    return rows


def planned_batch(args, ae, op: str, size: int) -> int | str:
    """The batch size the run used: on a CPU under CPU_BATCH_SIZE "auto", the sizes it ran."""
    if args.device_type == "cuda" or args.explicit_batch or args.cpu_batch.lower() != "auto":
        return args.batch
    runs = ae.pass_times.get((op, (size, size)), {})
    return "auto: " + "/".join(str(b) for b in sorted(runs)) if runs else "auto"


def bench_decode(size: int, args, device, ours, seed_model, warm, latents, log) -> list[Row]:
    """Seed and ours, decode, at one size."""
    from latentstore_workers.codec import decode_outcomes, encode_many

    dec_flops = count_flops(size)[1]
    rows: list[Row] = []
    result: dict[str, Any] = {}
    warm_latents = [o.value for o in encode_many(ours, warm[: args.batch])]
    warm_size = warm[0].width
    seed_decode(seed_model, warm_latents[:1], device, warm_size)  # warm-up
    seconds, mem = fastest(args, device, lambda: seed_decode(seed_model, latents, device, size))
    rows.append(Row("decode", size, "seed", 1, "float32", len(latents), seconds, mem, dec_flops))
    rows[-1].note = seed_note(args)
    log(f"  seed decode {size}²: {len(latents) / seconds:.2f} images/s")

    items = [(z, size, size) for z in latents]
    decode_outcomes(ours, [(z, warm_size, warm_size) for z in warm_latents])  # warm-up
    seconds, mem = measure(device, lambda: result.update(d=decode_outcomes(ours, items)))
    batch = planned_batch(args, ours, "decode", size)
    rows.append(Row("decode", size, "ours", batch, args.dtype, len(items), seconds, mem))
    rows[-1].flops = dec_flops
    rows[-1].note = _note(result["d"])
    log(f"  ours decode {size}²: {len(items) / seconds:.2f} images/s {rows[-1].note}")
    rows.insert(-1, bare_forward("decode", size, args, device, ours, dec_flops))
    log(f"  bare forward decode {size}²: {rows[-2].ips:.2f} images/s")
    return rows


def bare_forward(op: str, size: int, args, device, ae, flops: float) -> Row:
    """The model alone: ``--count`` images in full batches already on the device, in ours'
    dtype and layout, nothing copied back. What "ours" loses to it is the pipeline's cost."""
    import torch

    layout = torch.channels_last if ae.channels_last else torch.contiguous_format
    shape = (args.batch, 3, size, size) if op == "encode" else (args.batch, 4, size // 8, size // 8)
    x = torch.randn(shape, device=device).to(ae.dtype).contiguous(memory_format=layout)
    passes = args.count // args.batch

    def forward():
        if op == "encode":
            return ae.model.encode(x).latent_dist.mean
        return ae.model.decode(x).sample

    def run() -> None:
        with torch.inference_mode():
            for _ in range(passes):
                forward()

    run()  # warm-up (a compiled model has seen this shape already)
    seconds, mem = measure(device, run)
    row = Row(op, size, "forward", args.batch, args.dtype, passes * args.batch, seconds, mem)
    row.flops = flops
    row.note = "bare model, inputs on the device"
    return row


def fastest(args, device, fn) -> tuple[float, int]:
    """The seed path's best of ``--seed-runs`` (its speed varies on a shared device): the
    ratios are then against the seed at its fastest, never flattered by a slow run."""
    runs = [measure(device, fn) for _ in range(max(1, args.seed_runs))]
    return min(r[0] for r in runs), max(r[1] for r in runs)


def seed_note(args) -> str:
    return f"fastest of {args.seed_runs} runs" if args.seed_runs > 1 else ""


def _note(outcomes) -> str:
    reruns = sum(o.float32_rerun for o in outcomes)
    failed = sum(not o.ok for o in outcomes)
    parts = [f"{reruns} float32 re-runs"] if reruns else []
    parts += [f"{failed} failed"] if failed else []
    return ", ".join(parts)


def _large_once(device, ae, z, size: int, path: str, tile: int) -> Row:
    from latentstore_workers.codec import decode_outcomes

    outcome: dict[str, Any] = {}
    seconds, mem = measure(device, lambda: outcome.update(o=decode_outcomes(ae, [(z, size, size)])))
    (result,) = outcome["o"]
    note = f"tile {tile}" if path == "tiled" else ""
    if path == "untiled" and result.tiled:
        note = "ran out of memory untiled; retried tiled"
    if not result.ok:
        note = f"failed: {result.error}"
    dtype = str(ae.dtype).removeprefix("torch.")
    return Row("decode", size, path, 1, dtype, 1, seconds, mem, note=note)


def large_decode(args, device, ae, log) -> list[Row]:
    """Peak memory of one ``--large`` decode, tiled (``--tile-size``) and untiled."""
    import numpy as np

    size = args.large
    z = np.random.default_rng(args.seed).normal(size=(4, size // 8, size // 8)).astype(np.float32)
    saved = (ae.tile_above_pixels, ae.tile_size, ae.model.tile_sample_min_size)
    rows = []
    try:
        ae.tile_size = ae.model.tile_sample_min_size = args.tile_size
        ae.model.tile_latent_min_size = args.tile_size // ae.downsample
        for path, threshold in (("tiled", 0), ("untiled", None)):
            ae.tile_above_pixels = threshold
            rows.append(_large_once(device, ae, z, size, path, args.tile_size))
            log(f"  {path} decode {size}²: peak {gib(rows[-1].peak)} {rows[-1].note}")
    finally:
        ae.tile_above_pixels, ae.tile_size, ae.model.tile_sample_min_size = saved
        ae.model.tile_latent_min_size = saved[2] // ae.downsample
    return rows


if __name__ == "__main__":
    sys.exit(main())

"""``manage.py latents_demo``: store sample photos, let a real worker encode them, decode them.

On the embedded default it needs no server: SQLite, kombu's filesystem broker and a Celery
worker process that this command starts and stops. With ``DATABASE_URL`` and
``CELERY_BROKER_URL`` set it runs the same on PostgreSQL and Redis.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.test.utils import override_settings

from latentstore_workers.pretrained import LS_SMALL, LS_SMALL_FAMILY  # paths only, no torch
from latentstore_workers.training.data import (
    HELD_OUT as TRAINING_HELD_OUT,  # numpy and Pillow, no torch
)

SAMPLES = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "page.png",
)
SD_VAE = "stabilityai/sd-vae-ft-mse"
# The scikit-image photos the shipped ls-small model never saw in training.
HELD_OUT = frozenset(
    name.removeprefix("skimage:") for name in TRAINING_HELD_OUT if name.startswith("skimage:")
)


class Command(BaseCommand):
    help = (
        "Store sample photos as latents through a real Celery worker, decode them, write a "
        "contact sheet (original | decoded | preview) and print sizes and timings."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--size", type=int, default=256, help="Longest side of the sample images (default 256)."
        )
        parser.add_argument(
            "--count",
            type=int,
            default=len(SAMPLES),
            help=f"How many sample images (at most {len(SAMPLES)}).",
        )
        parser.add_argument(
            "--pretrained",
            default=None,
            help="Hub id or local save_pretrained directory of an SD VAE "
            "(default: LATENTSTORE_PRETRAINED, else sd-vae-ft-mse if it is "
            "in the local Hugging Face cache, else latentstore's own ls-small model).",
        )
        parser.add_argument(
            "--output",
            default=None,
            help="Where to write the contact sheet PNG (default var/demo/).",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=600,
            help="Seconds to wait for the worker (default 600).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        out_dir = Path(settings.VAR_DIR) / "demo"
        out_dir.mkdir(parents=True, exist_ok=True)
        pretrained, family, note = self.find_weights(options["pretrained"])
        self.stdout.write(note)
        # The held-out mark is about ls-small's training set; other models saw other data.
        self.held_out = HELD_OUT if family == LS_SMALL_FAMILY else frozenset()

        config = dict(settings.LATENTSTORE)
        config["AUTOENCODERS"] = {
            "default": {
                **config["AUTOENCODERS"]["default"],
                "PRETRAINED": pretrained,
                "FAMILY": family,
            }
        }
        env = {
            **os.environ,
            "LATENTSTORE_PRETRAINED": pretrained,
            "LATENTSTORE_FAMILY": family,
            "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE", "project.settings"),
        }
        with override_settings(LATENTSTORE=config):
            self.prepare_transport()
            call_command("migrate", verbosity=0)
            worker = self.start_worker(env)
            try:
                rows = self.run_demo(options, out_dir)
            finally:
                self.stop_worker(worker)
        self.report(rows, options, out_dir)

    # --- set-up ---------------------------------------------------------------------------
    def find_weights(self, requested: str | None) -> tuple[str, str, str]:
        requested = requested or os.environ.get("LATENTSTORE_PRETRAINED")
        if requested:
            if Path(requested).is_dir() or _in_hf_cache(requested):
                return (
                    requested,
                    os.environ.get("LATENTSTORE_FAMILY", "sd"),
                    (f"Autoencoder: {requested}"),
                )
            raise CommandError(
                f"{requested!r} is neither a local directory nor in the local "
                "Hugging Face cache (this machine cannot download weights)."
            )
        if _in_hf_cache(SD_VAE):
            os.environ["HF_HUB_OFFLINE"] = "1"
            return SD_VAE, "sd", f"Autoencoder: {SD_VAE} (from the local Hugging Face cache)"
        return (
            str(LS_SMALL),
            LS_SMALL_FAMILY,
            (
                f"No pretrained SD VAE weights on disk ({SD_VAE} is not in the local Hugging Face "
                "cache, and this machine cannot download it).\nUsing latentstore's own small "
                f"autoencoder {LS_SMALL_FAMILY!r} ({LS_SMALL}): a 4-channel AutoencoderKL trained "
                "on a CPU, so the reconstructions are real but softer than the SD VAE's (see its "
                "README.md). Point LATENTSTORE_PRETRAINED at SD VAE weights to use those."
            ),
        )

    def prepare_transport(self) -> None:
        options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}) or {}
        for key in ("data_folder_in", "data_folder_out", "processed_folder"):
            if options.get(key):
                Path(options[key]).mkdir(parents=True, exist_ok=True)

    def start_worker(self, env: dict[str, str]) -> subprocess.Popen:
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "project",
            "worker",
            "-P",
            "solo",
            "-Q",
            "latents.encode,latents.decode",
            "--loglevel=WARNING",
            "--without-heartbeat",
            "--without-mingle",
            "--without-gossip",
            "-n",
            f"demo-{os.getpid()}@%h",
        ]
        self.stdout.write(f"Starting a Celery worker: {' '.join(cmd[1:])}")
        return subprocess.Popen(cmd, env=env, cwd=settings.BASE_DIR)

    def stop_worker(self, worker: subprocess.Popen) -> None:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()

    # --- the run --------------------------------------------------------------------------
    def run_demo(self, options: dict[str, Any], out_dir: Path) -> list[dict[str, Any]]:
        from PIL import Image

        from project.models import Photo

        Photo.objects.filter(title__startswith="sample:").delete()
        samples = _load_samples(options["count"], options["size"])
        self.warm_up(Photo, samples[0][1], options["timeout"])
        rows = []
        # One photo at a time, so "encode s" is one image's save-to-ready time on an idle worker
        # (broker delivery, claim, encode, write-back), not its wait behind the others.
        for name, picture in samples:
            buf = io.BytesIO()
            picture.save(buf, format="PNG")
            started = time.time()
            photo = Photo.objects.create(title=f"sample:{name}", image=buf.getvalue())
            image = self.wait_ready(photo, options["timeout"])
            row = {
                "name": name,
                "photo": photo,
                "original": picture,
                "png": len(buf.getvalue()),
                "jpeg": _jpeg_size(picture),
                "encode_s": photo.image_changed.timestamp() - started,
            }
            rows.append(row)
            self.stdout.write(
                f"  {name}: {image.state} ({row['encode_s']:.2f} s after save)"
                + (f": {image.error}" if image.error else "")
            )

        from latentstore.decoding import render
        from latentstore.quality import psnr

        ready = [r["photo"].image for r in rows if r["photo"].image.state == "ready"]
        if ready:  # load the decoder's model once, outside the timings
            started = time.perf_counter()
            render(ready[0], ready[0].field.decoder, (8, 8), "PNG")
            self.stdout.write(f"Decoder loaded in {time.perf_counter() - started:.1f} s.")
        for row in rows:
            image = row["photo"].image
            if image.state != "ready":
                continue
            size = (image.width, image.height)
            # The model's own time, without the cache (a second run would otherwise hit it) ...
            started = time.perf_counter()
            render(image, image.field.decoder, size, "PNG")
            row["decode_s"] = time.perf_counter() - started
            # ... then the user's path: decode() fills the cache, and a repeat is a cache hit.
            row["decoded"] = image.decode()
            started = time.perf_counter()
            image.decode()
            row["cached_ms"] = (time.perf_counter() - started) * 1000
            image.preview()  # the first call builds the projection tables
            started = time.perf_counter()
            row["preview"] = image.preview()
            row["preview_ms"] = (time.perf_counter() - started) * 1000
            row["psnr"] = psnr(row["original"], row["decoded"])
            row["latent"] = image.nbytes
            row["shape"] = "x".join(map(str, image.header.shape))
            row["dtype"] = image.header.dtype
        sheet = _contact_sheet(rows, Image)
        path = Path(options["output"]) if options["output"] else out_dir / "contact_sheet.png"
        sheet.save(path)
        self.sheet_path = path
        return rows

    def wait_ready(self, photo: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while (image := photo.image.refresh()).state not in ("ready", "failed"):
            if time.monotonic() > deadline:
                raise CommandError(
                    f"The worker did not encode {photo.title!r} within {timeout} s "
                    f"(state {image.state!r})."
                )
            time.sleep(0.02)
        return image

    def warm_up(self, Photo: Any, picture: Any, timeout: float) -> None:
        """One throw-away photo, so the timings below exclude the worker's start and model load."""
        started = time.monotonic()
        photo = Photo.objects.create(title="sample:warm-up", image=picture.resize((64, 64)))
        self.wait_ready(photo, timeout)
        self.stdout.write(f"Worker up and model loaded after {time.monotonic() - started:.1f} s.")
        photo.delete()

    def report(self, rows: list[dict[str, Any]], options: dict[str, Any], out_dir: Path) -> None:
        header = (
            f"{'image':<22}{'size':>10}{'latents':>18}{'blob B':>9}{'PNG B':>9}"
            f"{'JPEG90 B':>10}{'PSNR dB':>9}{'encode s':>10}{'decode s':>10}{'cached ms':>11}"
            f"{'preview ms':>12}"
        )
        self.stdout.write("")
        self.stdout.write(header)
        self.stdout.write("-" * len(header))
        for row in rows:
            if "latent" not in row:
                self.stdout.write(f"{row['name']:<22} failed: {row['photo'].image.error}")
                continue
            w, h = row["original"].size
            name = row["name"] + ("*" if row["name"] in self.held_out else "")
            self.stdout.write(
                f"{name:<22}{f'{w}x{h}':>10}{row['shape'] + ' ' + row['dtype']:>18}"
                f"{row['latent']:>9}{row['png']:>9}{row['jpeg']:>10}{row['psnr']:>9.2f}"
                f"{row['encode_s']:>10.2f}{row['decode_s']:>10.2f}{row['cached_ms']:>11.2f}"
                f"{row['preview_ms']:>12.2f}"
            )
        done = [r for r in rows if "latent" in r]
        if done:
            total = {k: sum(r[k] for r in done) for k in ("latent", "png", "jpeg")}
            self.stdout.write("-" * len(header))
            self.stdout.write(
                f"{'total':<22}{'':>10}{'':>18}{total['latent']:>9}{total['png']:>9}"
                f"{total['jpeg']:>10}"
            )
        db = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
        self.stdout.write(
            f"\nDatabase: {db}; broker: {settings.CELERY_BROKER_URL.split('://')[0]}. "
            "PSNR dB: the default decoder's picture against the original; encode s: save() "
            "until the worker's write-back, one photo at a time; decode s: the default decoder "
            "run in this process, uncached; cached ms: decode() again, a cache hit; preview ms: "
            "the model-free latent->RGB preview."
        )
        if any(r["name"] in self.held_out for r in done):
            self.stdout.write("* held out from ls-small's training (the others were trained on).")
        self.stdout.write(f"Contact sheet (original | decoded | preview): {self.sheet_path}")
        failed = len(rows) - len(done)
        if failed:
            raise CommandError(f"{failed} of {len(rows)} photos failed to encode.")


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for name in ("diffusion_pytorch_model.safetensors", "config.json"):
        found = try_to_load_from_cache(repo_id, name)
        if not isinstance(found, str):
            return False
    return True


def _load_samples(count: int, size: int) -> list[tuple[str, Any]]:
    from PIL import Image

    try:
        import skimage
    except ImportError as exc:
        raise CommandError(
            "The demo's sample photos come from scikit-image: pip install scikit-image"
        ) from exc
    data_dir = Path(skimage.__file__).parent / "data"
    samples = []
    for name in SAMPLES[:count]:
        with Image.open(data_dir / name) as img:
            picture = img.convert("RGB")
        picture.thumbnail((size, size), Image.Resampling.LANCZOS)
        samples.append((name, picture))
    return samples


def _jpeg_size(picture: Any) -> int:
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=90)
    return len(buf.getvalue())


def _contact_sheet(rows: list[dict[str, Any]], Image: Any) -> Any:
    from PIL import ImageDraw

    gap, label_h = 8, 16
    col_w = max(r["original"].width for r in rows)
    heights = [r["original"].height for r in rows]
    total_h = label_h + gap + sum(h + label_h + gap for h in heights)
    sheet = Image.new("RGB", (3 * col_w + 4 * gap, total_h), (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    for col, title in enumerate(("original", "decoded (default decoder)", "preview (latent->RGB)")):
        draw.text((gap + col * (col_w + gap), 4), title, fill=(0, 0, 0))
    top = label_h + gap
    for row, height in zip(rows, heights, strict=True):
        draw.text((gap, top), row["name"], fill=(60, 60, 60))
        for col, key in enumerate(("original", "decoded", "preview")):
            picture = row.get(key)
            if picture is not None:
                sheet.paste(picture, (gap + col * (col_w + gap), top + label_h))
        top += height + label_h + gap
    return sheet

"""Batched encode (RGB images -> raw latents) and decode (raw latents -> RGB images).

Latents here are *raw*: the autoencoder's ``latent_dist.mean`` (deterministic, no sampling),
not multiplied by ``scaling_factor`` nor shifted. That is what the decoder takes back, and the
blob header records scaling/shift for anyone who needs model-space latents.

:func:`iter_encode` and :func:`iter_decode` are the worker's fast paths: pixels travel to the
device as uint8 (a quarter of float32's bytes) and are scaled there, batches run in the
autoencoder's dtype and memory layout, and ``latentstore_workers.batching`` bounds batches by
memory, splits them on out-of-memory, bisects poison items and re-runs overflowed items in float32.
:func:`encode_images` and :func:`decode_latents` are the all-or-nothing conveniences on top.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from latentstore import conf
from latentstore_workers import batching
from latentstore_workers.autoencoders import LoadedAutoencoder
from latentstore_workers.batching import NonFinite, Outcome
from latentstore_workers.images import padding_for, to_uint8

__all__ = [
    "NonFiniteImage",
    "NonFiniteLatents",
    "UnreadablePicture",
    "decode_latents",
    "decode_outcomes",
    "encode_images",
    "encode_many",
    "iter_decode",
    "iter_encode",
    "iter_encode_stream",
]

#: An image to encode: a PIL image, or a future of one (decoded by a thread pool meanwhile).
Picture = Image.Image | Future

#: Told the seconds each host stage of an encode took: ``timer("stack", 0.002)``.
Timer = Callable[[str, float], None]


class NonFiniteLatents(ValueError):
    """The encoder produced NaN or infinity for some images (``indices`` says which).

    ``results`` holds the finite latents of the other images (``None`` at the bad indices), so a
    caller can keep the good part of a batch. A reduced-precision model has already re-run those
    images in float32 by the time this is raised.
    """

    def __init__(self, indices: Sequence[int], results: list[np.ndarray | None]) -> None:
        self.indices = list(indices)
        self.results = results
        which = ", ".join(str(i) for i in self.indices)
        noun = "image" if len(self.indices) == 1 else "images"
        super().__init__(
            f"The autoencoder produced non-finite latents (NaN or inf) for {noun} {which} "
            f"of {len(results)}, in float32 too; the weights or the picture are broken."
        )


class UnreadablePicture(ValueError):
    """A picture to encode could not be decoded (its source raised); the cause is chained."""


class NonFiniteImage(ValueError):
    """The decoder produced NaN or infinity (in float32 too, for a reduced-precision model)."""


def _layout(ae: LoadedAutoencoder) -> torch.memory_format:
    return torch.channels_last if ae.channels_last else torch.contiguous_format


def _timed(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` reporting its seconds to ``self.timer`` (a method of a job), when one is set."""

    def method(self: Any, *args: Any) -> Any:
        if self.timer is None:
            return fn(self, *args)
        start = time.perf_counter()
        try:
            return fn(self, *args)
        finally:
            self.timer(stage, time.perf_counter() - start)

    return method


class _EncodeJob:
    operation = "encode"

    def __init__(self, downsample: int, timer: Timer | None = None) -> None:
        self.sources: list[Picture | None] = []  # grows with add(); None once forgotten
        self.sizes: list[tuple[int, int] | None] = []
        self.downsample = downsample
        self.loaded: dict[int, Image.Image] = {}
        self.timer = timer

    def add(self, pictures: Sequence[Picture], sizes: Sequence[tuple[int, int]] | None) -> range:
        """Append pictures (a stream grows as rows are claimed); return their indices."""
        start = len(self.sources)
        self.sources += pictures
        self.sizes += list(sizes) if sizes else [None] * len(pictures)
        return range(start, len(self.sources))

    def forget(self, indices: Iterable[int]) -> None:
        """Drop finished pictures: a worker's stream would otherwise hold every one it saw."""
        for index in indices:
            self.sources[index] = None
            self.loaded.pop(index, None)

    def picture(self, index: int) -> Image.Image:
        if index not in self.loaded:
            source = self.sources[index]
            self.loaded[index] = source.result() if isinstance(source, Future) else source
        return self.loaded[index]

    def padded(self, width: int, height: int) -> tuple[int, int]:
        right, bottom = padding_for(width, height, self.downsample)
        return height + bottom, width + right

    def shape(self, index: int) -> tuple[int, int]:
        size = self.sizes[index]
        if size is None:
            try:
                size = self.picture(index).size
            except Exception:  # reported by stack(); any shape groups it
                return (0, 0)
        return self.padded(*size)

    def stack(
        self, indices: Sequence[int], ae: LoadedAutoencoder
    ) -> tuple[torch.Tensor | None, dict[int, BaseException], dict[int, tuple[int, int]]]:
        failed: dict[int, BaseException] = {}
        moved: dict[int, tuple[int, int]] = {}
        kept: list[Image.Image] = []
        size = (0, 0)
        for index in indices:
            try:
                picture = self.picture(index)
            except Exception as exc:
                failed[index] = UnreadablePicture(str(exc))
                failed[index].__cause__ = exc
                continue
            if picture.mode != "RGB":
                failed[index] = ValueError(
                    f"expected an RGB image, got mode {picture.mode!r} "
                    "(use latentstore.images.to_rgb)"
                )
                continue
            real = self.padded(*picture.size)
            if real != self.shape(index):  # the declared size was wrong: batch it on its own
                self.sizes[index] = picture.size
                moved[index] = real
                continue
            size = picture.size
            kept.append(picture)
        if not kept:
            return None, failed, moved
        # Each picture's pixels are copied once, straight into the (pinned) staging batch.
        width, height = size
        cuda = ae.device.type == "cuda"
        x = torch.empty((len(kept), height, width, 3), dtype=torch.uint8, pin_memory=cuda)
        staged = x.numpy()
        for row, picture in enumerate(kept):
            staged[row] = np.asarray(picture, dtype=np.uint8)
        # uint8 over the bus, scaled on the device; NHWC permuted is already channels-last.
        x = x.to(ae.device, non_blocking=True).permute(0, 3, 1, 2)
        x = x.to(torch.float32).div_(127.5).sub_(1.0)  # same arithmetic as images.to_tensor
        right, bottom = padding_for(size[0], size[1], self.downsample)
        if right or bottom:
            x = F.pad(x, (0, right, 0, bottom), mode="replicate")
        return x.to(ae.dtype).contiguous(memory_format=_layout(ae)), failed, moved

    def forward(self, ae: LoadedAutoencoder, x: torch.Tensor) -> torch.Tensor:
        return ae.model.encode(x).latent_dist.mean

    def download(self, output: torch.Tensor) -> torch.Tensor:
        # From a GPU, a non-blocking copy lands in pinned memory; the caller waits on an event.
        return output.to(torch.float32).contiguous().to("cpu", non_blocking=output.is_cuda)

    def unpack(
        self, host: torch.Tensor, rows: Sequence[int], indices: Sequence[int]
    ) -> list[np.ndarray]:
        batch = host.numpy()
        return [batch[row].copy() for row in rows]  # own memory, not a view of the pinned page

    # Host stages, timed when a timer is set. "stack" includes waiting for pictures still being
    # decoded; on a GPU "forward" is the launch (the computation is waited for in "unpack").
    stack = _timed("stack", stack)
    forward = _timed("forward", forward)
    unpack = _timed("unpack", unpack)


class _DecodeJob:
    operation = "decode"

    def __init__(self, items: Sequence[tuple[np.ndarray, int, int]], downsample: int) -> None:
        self.items = items
        self.downsample = downsample

    def shape(self, index: int) -> tuple[int, int]:
        _channels, h, w = self.items[index][0].shape
        return h * self.downsample, w * self.downsample

    def stack(
        self, indices: Sequence[int], ae: LoadedAutoencoder
    ) -> tuple[torch.Tensor, dict[int, BaseException], dict[int, tuple[int, int]]]:
        z = torch.from_numpy(np.stack([np.asarray(self.items[i][0], np.float32) for i in indices]))
        if ae.device.type == "cuda":
            z = z.pin_memory()
        z = z.to(ae.device, non_blocking=True).to(ae.dtype)
        return z.contiguous(memory_format=_layout(ae)), {}, {}

    def forward(self, ae: LoadedAutoencoder, z: torch.Tensor) -> torch.Tensor:
        return ae.model.decode(z).sample

    def download(self, output: torch.Tensor) -> torch.Tensor:
        pixels = to_uint8(output).permute(0, 2, 3, 1).contiguous()  # on the device
        return pixels.to("cpu", non_blocking=pixels.is_cuda)

    def unpack(
        self, host: torch.Tensor, rows: Sequence[int], indices: Sequence[int]
    ) -> list[Image.Image]:
        batch = host.numpy()
        pictures = []
        for row, index in zip(rows, indices, strict=True):
            _latents, width, height = self.items[index]
            # Crop the padding added at encode time (not resize it away).
            pictures.append(Image.fromarray(np.ascontiguousarray(batch[row, :height, :width])))
        return pictures


def _max_batch(max_batch: int | None, setting: str) -> int:
    if max_batch is None:
        return int(conf.get_settings()[setting])
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, not {max_batch}")
    return max_batch


def iter_encode(
    ae: LoadedAutoencoder,
    pictures: Sequence[Picture],
    *,
    sizes: Sequence[tuple[int, int]] | None = None,
    max_batch: int | None = None,
    lookahead: bool | None = None,
) -> Iterator[list[tuple[int, Outcome]]]:
    """Encode pictures batch by batch; yield ``[(index, Outcome), ...]`` as each batch is done.

    ``pictures`` are RGB PIL images or futures of them (a thread pool may still be decoding
    them: a batch waits only for its own). ``sizes`` (``(width, height)`` each) lets batches be
    planned before the pixels exist; a picture whose real size differs runs in a batch of its
    own. An outcome's value is float32 latents ``(C, ceil(H/d), ceil(W/d))``. ``lookahead``:
    see :func:`latentstore_workers.batching.stream` (default: the device decides).
    """
    yield from iter_encode_stream(ae, [(pictures, sizes, max_batch)], lookahead=lookahead)


def iter_encode_stream(
    ae: LoadedAutoencoder,
    chunks: Iterable[tuple[Sequence[Picture], Sequence[tuple[int, int]] | None, int | None]],
    *,
    lookahead: bool | None = None,
    timer: Timer | None = None,
) -> Iterator[list[tuple[int, Outcome]]]:
    """:func:`iter_encode` over chunks ``(pictures, sizes, max_batch)`` that arrive over time.

    Indices count across chunks in arrival order. On a GPU a chunk is pulled only when the
    device is busy with the batch before it, so ``chunks`` may be a generator that waits for the
    next claimed rows: one stream keeps the device fed across them. ``timer`` is told the
    seconds of each host stage (``"stack"``, ``"forward"``, ``"unpack"``).
    """
    job = _EncodeJob(ae.downsample, timer)

    def batches() -> Iterator[batching.Batch]:
        for pictures, sizes, max_batch in chunks:
            limit = _max_batch(max_batch, "ENCODE_BATCH_SIZE")
            yield from batching.plan(ae, job, job.add(pictures, sizes), max_batch=limit)

    for done in batching.stream(ae, job, batches(), lookahead=lookahead):
        yield done
        job.forget(index for index, _outcome in done)


def encode_many(
    ae: LoadedAutoencoder,
    pictures: Sequence[Picture],
    *,
    sizes: Sequence[tuple[int, int]] | None = None,
    max_batch: int | None = None,
) -> list[Outcome]:
    """:func:`iter_encode` collected: one ``Outcome`` per picture."""
    outcomes: list[Outcome | None] = [None] * len(pictures)
    for done in iter_encode(ae, pictures, sizes=sizes, max_batch=max_batch):
        for index, outcome in done:
            outcomes[index] = outcome
    return outcomes  # type: ignore[return-value]  # every index is yielded exactly once


def encode_images(
    ae: LoadedAutoencoder, images: Sequence[Image.Image], *, max_batch: int | None = None
) -> list[np.ndarray]:
    """Encode RGB images to raw latents: one float32 ``(C, ceil(H/d), ceil(W/d))`` array each.

    Images of the same size share forward passes of at most ``max_batch`` (default
    ``ENCODE_BATCH_SIZE``, fewer when the memory budget says so). Results come back in input
    order. Deterministic: the distribution's mean, under ``torch.inference_mode``.

    Raises :class:`NonFiniteLatents` naming the input indices whose latents are not finite (in
    float32 too), ``ValueError`` for a non-RGB image, and the first other per-image error.
    """
    outcomes = encode_many(ae, images, max_batch=max_batch)
    bad = [i for i, o in enumerate(outcomes) if isinstance(o.error, NonFinite)]
    if bad:
        raise NonFiniteLatents(bad, [o.value for o in outcomes])
    for outcome in outcomes:
        if outcome.error is not None:
            raise outcome.error
    return [o.value for o in outcomes]


def _check_latents(
    ae: LoadedAutoencoder, latents: Any, width: int, height: int
) -> tuple[np.ndarray, int, int]:
    arr = np.asarray(latents)
    if arr.ndim != 3:
        raise ValueError(f"expected latents of shape (C, h, w), got {arr.shape}")
    channels, h, w = arr.shape
    if channels != ae.latent_channels:
        raise ValueError(
            f"latents have {channels} channels; autoencoder {ae.alias!r} expects "
            f"{ae.latent_channels}"
        )
    d = ae.downsample
    if not (1 <= width <= w * d and 1 <= height <= h * d):
        raise ValueError(
            f"cannot decode a {width}x{height} image from a {w}x{h} latent grid "
            f"(at most {w * d}x{h * d} pixels)"
        )
    if not np.isfinite(arr).all():
        raise ValueError("latents contain NaN or infinity")
    return arr, int(width), int(height)


def iter_decode(
    ae: LoadedAutoencoder,
    items: Sequence[tuple[np.ndarray, int, int]],
    *,
    max_batch: int | None = None,
) -> Iterator[list[tuple[int, Outcome]]]:
    """Decode ``(latents, width, height)`` items batch by batch, yielding outcomes per batch.

    An outcome's value is an RGB image of exactly ``width x height`` (the encode-time padding
    cropped off); an item that cannot be decoded (wrong shape, NaN input) gets a ValueError.
    """
    limit = _max_batch(max_batch, "DECODE_BATCH_SIZE")
    valid: list[tuple[np.ndarray, int, int]] = []
    where: list[int] = []
    refused: list[tuple[int, Outcome]] = []
    for index, (latents, width, height) in enumerate(items):
        try:
            valid.append(_check_latents(ae, latents, width, height))
            where.append(index)
        except ValueError as exc:
            refused.append((index, Outcome(error=exc)))
    if refused:
        yield refused
    job = _DecodeJob(valid, ae.downsample)
    for done in batching.run(ae, job, len(valid), max_batch=limit):
        yield [(where[i], outcome) for i, outcome in done]


def decode_outcomes(
    ae: LoadedAutoencoder,
    items: Sequence[tuple[np.ndarray, int, int]],
    *,
    max_batch: int | None = None,
) -> list[Outcome]:
    """:func:`iter_decode` collected: one ``Outcome`` per item."""
    outcomes: list[Outcome | None] = [None] * len(items)
    for done in iter_decode(ae, items, max_batch=max_batch):
        for index, outcome in done:
            outcomes[index] = outcome
    return outcomes  # type: ignore[return-value]


def decode_latents(
    ae: LoadedAutoencoder, latents: np.ndarray, width: int, height: int
) -> Image.Image:
    """Decode raw latents ``(C, h, w)`` to an RGB image of exactly ``width x height``.

    The decoder returns the padded grid (``w * d`` by ``h * d`` pixels); the right/bottom padding
    added at encode time is cropped off. Raises ``ValueError`` for latents of the wrong shape or
    with non-finite values, and :class:`NonFiniteImage` if the decoder's output is not finite
    (in float32 too).
    """
    (outcome,) = decode_outcomes(ae, [(latents, width, height)])
    if isinstance(outcome.error, NonFinite):
        raise NonFiniteImage(
            f"Autoencoder {ae.alias!r} decoded to NaN or infinity: {outcome.error}"
        ) from outcome.error
    if outcome.error is not None:
        raise outcome.error
    return outcome.value

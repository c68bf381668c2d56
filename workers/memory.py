"""Device memory: what a forward pass may use, what it did use, and what running out looks like.

The batch size of a forward pass is bounded by ``MEMORY_BUDGET`` through an estimate of the
activations per pixel (:func:`activation_bytes`); the estimate only has to be in the right
range, because a pass that still runs out of memory is split in halves and retried
(``latentstore_workers.batching``). The same helpers measure peak memory for the benchmark, on CUDA
from the caching allocator and on CPU from the process's resident-set high-water mark.
"""

from __future__ import annotations

import gc
import os

import torch

__all__ = [
    "activation_bytes",
    "default_budget",
    "is_out_of_memory",
    "peak_bytes",
    "release",
    "reset_peak",
    "synchronize",
]

# Full-resolution activations alive at once in the SD VAE's widest blocks, counted in tensors of
# ``block_out_channels[0]`` channels: a ResNet block holds its input, the GroupNorm and SiLU
# outputs, the convolution output and the residual sum; the decoder's up-sampling doubles that.
# Measured on CPU in float32 with the full SD architecture (128² and 256², batch 1 and 4):
# encode 2.6-4.0 kB and decode 4.7-5.8 kB per pixel, i.e. 5-8 and 9-11 such tensors.
_LIVE_TENSORS = {"encode": 8, "decode": 12}


def activation_bytes(block_width: int, dtype: torch.dtype, pixels: int, operation: str) -> int:
    """Estimated peak activation bytes of one image of ``pixels`` pixels in one forward pass."""
    element = torch.finfo(dtype).bits // 8
    return pixels * block_width * element * _LIVE_TENSORS[operation]


def default_budget(device: torch.device) -> int:
    """The ``MEMORY_BUDGET`` when none is set: 80 % of the GPU's free memory, a quarter of RAM."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a small machine
        ram = 8 * 2**30
    return ram // 4


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's ``OutOfMemoryError`` and the CPU allocator's equivalent RuntimeError."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    message = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in message.lower() or "can't allocate memory" in message
    )


def release(device: torch.device) -> None:
    """Give memory back after an out-of-memory error, before the retry with a smaller batch."""
    gc.collect()  # tensors of the failed pass may still be referenced by its traceback frames
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (timings are meaningless without it); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory measurement for :func:`peak_bytes`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    gc.collect()
    _trim_heap()
    try:
        # Linux: writing 5 resets the resident-set high-water mark (VmHWM) to the current RSS.
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so the RSS measures what is in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the RSS then includes freed memory
        pass


def peak_bytes(device: torch.device) -> tuple[int, str]:
    """Peak memory since :func:`reset_peak` and what was measured.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors, not the allocator's cache). CPU: the
    process's peak resident set (VmHWM), which includes the weights and everything else.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "peak RSS (VmHWM)"
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS (ru_maxrss)"

"""What several benchmarks need: is a service up on the loopback, and a ready-made SD blob."""

from __future__ import annotations

import socket
from typing import Any


def reachable(port: int, timeout: float = 0.5) -> bool:
    """Whether something listens on ``127.0.0.1:port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def sd_blob(latents: Any, width: int, height: int, dtype: str = "float16") -> bytes:
    """``latents`` packed as the SD VAE's would be (a fixed fingerprint: no model loaded)."""
    from latentstore.latents import pack

    return pack(
        latents,
        autoencoder="default",
        family="sd",
        fingerprint="0" * 16,
        scaling_factor=0.18215,
        shift_factor=0.0,
        width=width,
        height=height,
        dtype=dtype,
    )

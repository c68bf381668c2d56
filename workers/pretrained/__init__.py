"""Autoencoder weights that ship with latentstore, as diffusers ``save_pretrained`` directories.

Only paths here (no torch): settings point ``PRETRAINED`` at them, and the workers load them
with ``from_pretrained`` like any other local directory.

- :data:`LS_SMALL` -- ``ls-small``, a 4-channel ``AutoencoderKL`` (8x downsampling) trained on
  a CPU by ``python -m latentstore_workers.training.train``; its latents are family ``"ls-small"``.
  See its model card, ``workers/pretrained/ls-small/README.md``.
"""

from pathlib import Path

__all__ = ["LS_SMALL", "LS_SMALL_FAMILY"]

LS_SMALL = Path(__file__).resolve().parent / "ls-small"
LS_SMALL_FAMILY = "ls-small"

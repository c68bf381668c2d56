"""A real ``celery worker`` process with one injected fault, for the fault tests.

``python -m tests.fault_worker worker -P solo ...`` takes the same arguments as
``celery -A project worker``. ``LATENTSTORE_FAULT`` picks the fault, injected into the real
diffusers ``AutoencoderKL.encode`` before the worker starts:

- ``slow:<seconds>`` — every encode pass sleeps first: a long GPU batch, so a test can kill the
  process, cut its database or re-upload a row while the batch is on the "device";
- ``poison`` — a pass whose batch holds an all-magenta picture raises, as a kernel crash on one
  bad item would; the other pictures of a batch still encode once the batch is bisected.
"""

from __future__ import annotations

import os
import sys
import time

POISON_MESSAGE = "simulated crash: the encoder cannot digest this picture"


def install(spec: str) -> None:
    from diffusers import AutoencoderKL

    kind, _, argument = spec.partition(":")
    original = AutoencoderKL.encode

    def encode(self, x, *args, **kwargs):
        if kind == "slow":
            time.sleep(float(argument))
        elif kind == "poison":
            # Magenta in the model's [-1, 1] range: red and blue at the top, green at the bottom.
            magenta = (x[:, 0] > 0.98) & (x[:, 1] < -0.98) & (x[:, 2] > 0.98)
            if bool((magenta.flatten(1).float().mean(dim=1) > 0.99).any()):
                raise RuntimeError(POISON_MESSAGE)
        else:
            raise ValueError(f"unknown LATENTSTORE_FAULT {spec!r}")
        return original(self, x, *args, **kwargs)

    AutoencoderKL.encode = encode


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    spec = os.environ.get("LATENTSTORE_FAULT", "")
    if spec:
        install(spec)
    from project.celery import app

    app.worker_main(argv=sys.argv[1:])


if __name__ == "__main__":
    main()

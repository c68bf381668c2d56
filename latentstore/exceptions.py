"""The exceptions a caller of latentstore may want to catch, in one place.

Each is raised by a module further up the package; they live here, at the bottom, so that any
module can raise them without importing the module that defines the concept.
"""

from __future__ import annotations


class LatentsNotReady(Exception):
    """The row has no latents yet (pending/encoding), never had (empty), or failed.

    ``state`` is the row's state; for a failed row the message includes its error.
    """

    def __init__(self, message: str, state: str) -> None:
        super().__init__(message)
        self.state = state


class DecodeFailed(RuntimeError):
    """A worker-side decode failed; the message is the worker's."""


class DecodeTimeout(TimeoutError):
    """A worker-side decode did not arrive in the cache within ``DECODE_TIMEOUT`` seconds."""


class DecoderUnavailable(RuntimeError):
    """A decoder cannot run in this process: its backend, or torch, is not installed here.

    The message names the decoder and both fixes: let the workers decode (``RUN: "worker"``) or
    install the worker extra in this process.
    """

    def __init__(self, alias: str, missing: str) -> None:
        super().__init__(
            f"Decoder {alias!r} runs in this process (RUN 'local'), but {missing} is not "
            f"installed here. Set LATENTSTORE['DECODERS'][{alias!r}]['OPTIONS']['RUN'] = "
            "'worker' so the workers decode, or install the worker extra in this process: "
            "pip install 'latentstore[worker]'."
        )
        self.alias = alias
        self.missing = missing

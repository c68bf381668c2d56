"""Where an autoencoder's weights come from, checked before a worker takes any work.

``PRETRAINED`` is a local directory written by ``save_pretrained`` or a Hugging Face hub id. A
hub id that is neither in the local Hugging Face cache nor downloadable (``HF_HUB_OFFLINE`` set,
or the hub unreachable) would make every encode spend ~23 s per attempt in the hub client's
retries and fail the row minutes later. The worker refuses to start instead, saying which
setting to change (:func:`check_at_start`); and weights that are cached while the hub cannot be
reached load from the cache alone (:func:`local_files_only`), without the retries.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from latentstore import conf

logger = logging.getLogger("latentstore_workers.weights")

_TRUE = {"1", "on", "yes", "true"}
_PROBE_SECONDS = 3.0
_PROBE_MEMO_SECONDS = 60.0
_probes: dict[str, tuple[float, bool]] = {}


class WeightsUnavailable(RuntimeError):
    """An autoencoder's weights can be neither found locally nor downloaded."""


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads in this process."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = _PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the hub's endpoint opens within ``timeout`` (remembered for
    a minute: one probe per worker start, not one per load)."""
    endpoint = hub_endpoint()
    now = time.monotonic()
    memo = _probes.get(endpoint)
    if memo is not None and memo[0] > now:
        return memo[1]
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            reachable = True
    except OSError:
        reachable = False
    _probes[endpoint] = (now + _PROBE_MEMO_SECONDS, reachable)
    return reachable


def is_local(pretrained: str) -> bool:
    return os.path.isdir(pretrained)


def cached(pretrained: str, subfolder: str | None = None, revision: str | None = None) -> bool:
    """Whether the hub id's ``config.json`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    filename = f"{subfolder}/config.json" if subfolder else "config.json"
    try:
        found = try_to_load_from_cache(pretrained, filename, revision=revision or None)
    except ValueError:  # a string that is no valid repo id: not in the cache either
        return False
    return isinstance(found, str)


def local_files_only(
    pretrained: str, subfolder: str | None = None, revision: str | None = None
) -> bool:
    """Whether to load a hub id from the cache alone: it is cached and cannot be refreshed."""
    if is_local(pretrained) or not cached(pretrained, subfolder, revision):
        return False
    return hub_offline() or not hub_reachable()


def problem(alias: str, cfg: dict[str, Any]) -> str | None:
    """Why autoencoder ``alias`` cannot be loaded in this process, or None if it can."""
    pretrained = str(cfg.get("PRETRAINED") or "")
    if is_local(pretrained):
        return None
    if pretrained.startswith(("/", "./", "../", "~")) or os.sep + os.sep in pretrained:
        return (
            f"Autoencoder {alias!r}: PRETRAINED {pretrained!r} is not a directory. Point it at "
            "a directory written by save_pretrained."
        )
    if cached(pretrained, cfg.get("SUBFOLDER"), cfg.get("REVISION")):
        return None
    if hub_offline():
        why = "HF_HUB_OFFLINE is set"
    elif not hub_reachable():
        why = f"the hub ({hub_endpoint()}) cannot be reached"
    else:
        return None  # from_pretrained will download it
    return (
        f"Autoencoder {alias!r}: weights {pretrained!r} are not a local directory nor in the "
        f"local Hugging Face cache, and {why}. Set LATENTSTORE['AUTOENCODERS'][{alias!r}]"
        "['PRETRAINED'] to a directory written by save_pretrained, or allow downloads "
        "(unset HF_HUB_OFFLINE, open the network to the hub) so the worker can fetch them."
    )


def problems() -> list[str]:
    """:func:`problem` for every configured autoencoder."""
    found = []
    for alias, cfg in conf.get_settings()["AUTOENCODERS"].items():
        message = problem(alias, cfg)
        if message:
            found.append(message)
    return found


def check_at_start(**kwargs: Any) -> None:
    """Celery ``worker_init`` receiver: refuse to start a worker whose weights are missing.

    Exits the worker (``SystemExit``, which Celery's signal dispatch does not swallow) with one
    message per autoencoder, instead of failing every row minutes later.
    """
    found = problems()
    if found:
        for message in found:
            logger.critical(message)
        raise SystemExit("latentstore: the worker cannot start.\n" + "\n".join(found))

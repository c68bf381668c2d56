"""The lease heartbeat: a worker renews the leases of the rows it holds while it works on them.

A claim leases its rows for ``LEASE_SECONDS``; the sweeper hands rows whose lease ran out to
other workers. A short lease brings a dead worker's rows back soon (within the lease plus one
sweep), and the heartbeat keeps a healthy worker's long batch from being taken: it renews every
third of the lease from its own thread, whatever the model thread is doing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from django.db import connection

from latentstore import conf, encoding
from latentstore.encoding import Claim

logger = logging.getLogger("latentstore_workers.leases")

#: The heartbeat renews this many times per lease: two beats may be missed before it runs out.
BEATS_PER_LEASE = 3


class Heartbeat:
    """Renews, every ``LEASE_SECONDS / 3`` from its own thread, the leases of the claims that
    ``source()`` says are still being worked on.

    Use it as a context manager around the work. Renewing touches only rows that are still
    ``encoding`` under the claim's token, so a late beat never revives a finished, failed or
    handed-back row.
    """

    def __init__(self, source: Callable[[], Sequence[Claim]], every: float | None = None) -> None:
        lease = float(conf.get_settings()["LEASE_SECONDS"])
        self.source = source
        self.every = every if every is not None else max(0.1, lease / BEATS_PER_LEASE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0

    def __enter__(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.every):
                self.beat()
        finally:
            connection.close()  # this thread's own database connection

    def beat(self) -> int:
        """Renew the leases of the claims in work now; the number of rows renewed."""
        renewed = 0
        for group in _by_field(self.source()):
            try:
                renewed += encoding.renew(group)
            except Exception:  # the database may be down for a moment: the next beat retries
                logger.warning("Could not renew %d leases", len(group), exc_info=True)
        self.beats += 1
        return renewed


def _by_field(claims: Sequence[Claim]) -> list[list[Claim]]:
    groups: dict[tuple[str, str], list[Claim]] = {}
    for claim in claims:
        groups.setdefault((claim.label, claim.field_name), []).append(claim)
    return list(groups.values())

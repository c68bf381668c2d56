"""Two cache tiers for decoded pictures: a bounded per-process LRU in front of the shared cache.

* :class:`LocalLRU` keeps recently served pictures in this process, bounded by their total
  bytes (``LOCAL_CACHE_BYTES``). A hit is a dictionary lookup: no network, no (de)serialising.
* :class:`TieredCache` puts that LRU in front of the shared Django cache named by
  ``LATENTSTORE["CACHE"]``; :func:`get_cache` returns the configured one.
* :class:`RedisCache` is a drop-in ``CACHES`` backend for the shared tier. Django's own
  ``RedisCache`` builds a ``redis.Redis`` client on every call and pickles every value; this one
  keeps one client (one connection pool) per process and server, and stores bytes as they are
  (no pickle, anywhere).

Only *content-addressed* keys (:func:`picture_key` writes them, :func:`is_content_key` tells
them apart: blob digest + decoder alias + decoder fingerprint + size + format) ever enter
the LRU. Their value can never change — a re-encoded row has a new digest, a changed decoder a
new fingerprint — so a process-local copy is never stale, and no invalidation across processes
is needed. Everything else (error notes, locks) goes straight to the shared cache. The LRU is
emptied when the ``LATENTSTORE`` or ``CACHES`` setting changes.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from typing import Any

from django.core.cache import caches
from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache
from django.core.cache.backends.redis import RedisCache as DjangoRedisCache
from django.core.cache.backends.redis import RedisCacheClient
from django.core.signals import setting_changed
from django.dispatch import receiver

from latentstore import conf

__all__ = [
    "LocalLRU",
    "RedisCache",
    "TieredCache",
    "is_content_key",
    "picture_key",
    "get_cache",
    "local_cache",
    "reset",
    "tiered",
]

KEY_VERSION = "v1"

# latentstore:<version>:<digest>:<decoder alias>:<decoder fingerprint>:<W>x<H>:<FORMAT>
_CONTENT_KEY = re.compile(
    r"latentstore:v\d+:[0-9a-f]{16,}:[^\s:]+:[0-9a-f]{8,}:\d+x\d+:(?:PNG|WEBP|JPEG|AVIF)"
)


def picture_key(
    digest: str, alias: str, fingerprint: str, size: tuple[int, int], format: str
) -> str:
    """The content-addressed cache key of one decoded picture (see :func:`is_content_key`)."""
    return f"latentstore:{KEY_VERSION}:{digest}:{alias}:{fingerprint}:{size[0]}x{size[1]}:{format}"


def is_content_key(key: str) -> bool:
    """True for a picture's content-addressed key (its value can never change)."""
    return isinstance(key, str) and _CONTENT_KEY.fullmatch(key) is not None


class LocalLRU:
    """A thread-safe least-recently-used map of ``key -> bytes``, bounded by total bytes.

    A value larger than ``max_item_bytes`` (default: an eighth of the budget) is not kept, so
    one huge picture cannot flush everything else.
    """

    def __init__(self, max_bytes: int, max_item_bytes: int | None = None) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.max_item_bytes = max_bytes // 8 if max_item_bytes is None else max_item_bytes
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def set(self, key: str, value: bytes) -> bool:
        """Keep ``value``; False when it is too big for this LRU (nothing is stored)."""
        size = len(value)
        if size > self.max_item_bytes or size > self.max_bytes:
            self.delete(key)
            return False
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._nbytes -= len(old)
            self._data[key] = value
            self._nbytes += size
            while self._nbytes > self.max_bytes:
                _, evicted = self._data.popitem(last=False)
                self._nbytes -= len(evicted)
        return True

    def delete(self, key: str) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._nbytes -= len(old)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._nbytes = 0

    @property
    def nbytes(self) -> int:
        """Total bytes of the values held now."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def _after_fork(self) -> None:
        # A lock held by another thread at fork time would stay locked in the child. The data
        # is content-addressed, so the child may keep it.
        self._lock = threading.Lock()


_local: LocalLRU | None = None
_local_lock = threading.Lock()


def local_cache() -> LocalLRU:
    """This process's LRU, sized by ``LATENTSTORE["LOCAL_CACHE_BYTES"]`` (0 disables it)."""
    global _local
    lru = _local
    if lru is None:
        with _local_lock:
            lru = _local
            if lru is None:
                lru = _local = LocalLRU(int(conf.get_settings()["LOCAL_CACHE_BYTES"]))
    return lru


class VerifiedRows:
    """Rows this process found ready with a given digest, remembered for a few seconds.

    A warm picture request whose row was verified within ``URL_ROW_CHECK_SECONDS`` is served
    from the cache without asking the database: a deleted or re-uploaded row's picture stays
    servable at most that long, by a process that served it just before. Bounded in entries;
    plain dict operations, atomic under the GIL.
    """

    MAX_ENTRIES = 50_000

    def __init__(self) -> None:
        self._rows: dict[tuple[Any, ...], tuple[float, Any]] = {}

    def get(self, key: tuple[Any, ...], now: float) -> Any | None:
        """What :meth:`add` remembered for ``key``, unless its time has passed."""
        hit = self._rows.get(key)
        if hit is None or hit[0] <= now:
            return None
        return hit[1]

    def add(self, key: tuple[Any, ...], facts: Any, until: float) -> None:
        if len(self._rows) >= self.MAX_ENTRIES:
            self._rows.clear()  # cheaper than an LRU, and the rows are re-verified in a query
        self._rows[key] = (until, facts)

    def clear(self) -> None:
        self._rows.clear()


#: This process's :class:`VerifiedRows` (the picture view's).
verified_rows = VerifiedRows()


def reset() -> None:
    """Drop this process's LRU (it is rebuilt, empty, from the current settings on next use)
    and its verified rows."""
    global _local
    with _local_lock:
        if _local is not None:
            _local.clear()
        _local = None
    verified_rows.clear()


@receiver(setting_changed)
def _reset_on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting in ("LATENTSTORE", "CACHES"):
        reset()


def _reinit_after_fork() -> None:
    global _local_lock
    _local_lock = threading.Lock()
    if _local is not None:
        _local._after_fork()


os.register_at_fork(after_in_child=_reinit_after_fork)


class TieredCache:
    """The per-process LRU in front of a shared Django cache, with the Django cache API.

    Content-addressed keys are looked up in the LRU first and copied into it on a shared hit;
    every other key, and every other method, goes to the shared cache unchanged.
    """

    def __init__(self, shared: BaseCache, local: LocalLRU) -> None:
        self.shared = shared
        self.local = local

    def get(self, key: str, default: Any = None, version: int | None = None) -> Any:
        if version is None and is_content_key(key):
            value = self.local.get(key)
            if value is not None:
                return value
            value = self.shared.get(key, default)
            if isinstance(value, bytes):
                self.local.set(key, value)
            return value
        return self.shared.get(key, default, version=version)

    def set(
        self, key: str, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> None:
        self.shared.set(key, value, timeout, version=version)
        if version is None and isinstance(value, bytes) and is_content_key(key):
            self.local.set(key, value)

    def get_many(self, keys: Any, version: int | None = None) -> dict[str, Any]:
        keys = list(keys)
        found: dict[str, Any] = {}
        if version is None:
            for key in keys:
                if is_content_key(key):
                    value = self.local.get(key)
                    if value is not None:
                        found[key] = value
        missing = [k for k in keys if k not in found]
        if missing:
            fetched = self.shared.get_many(missing, version=version)
            if version is None:
                for key, value in fetched.items():
                    if isinstance(value, bytes) and is_content_key(key):
                        self.local.set(key, value)
            found.update(fetched)
        return found

    def delete(self, key: str, version: int | None = None) -> bool:
        self.local.delete(key)
        return self.shared.delete(key, version=version)

    def delete_many(self, keys: Any, version: int | None = None) -> None:
        keys = list(keys)
        for key in keys:
            self.local.delete(key)
        self.shared.delete_many(keys, version=version)

    def clear(self) -> None:
        self.local.clear()
        self.shared.clear()

    def __getattr__(self, name: str) -> Any:
        # add, touch, incr, has_key, set_many, the async variants, ...: the shared tier's.
        return getattr(self.shared, name)

    def __repr__(self) -> str:
        return f"<TieredCache local={len(self.local)} items/{self.local.nbytes} B {self.shared!r}>"


def tiered(alias: str) -> TieredCache:
    """The LRU in front of ``caches[alias]``."""
    return TieredCache(caches[alias], local_cache())


def get_cache() -> TieredCache:
    """The decode cache: this process's LRU in front of the shared cache named by ``CACHE``."""
    return tiered(conf.get_settings()["CACHE"])


# --- the shared tier on Redis ---------------------------------------------------------------


class BytesSerializer:
    """Redis values without pickle: bytes as they are (tagged), str, int, and JSON for the rest.

    Integers are stored as plain digits, like Django's serializer, so ``incr`` works. Any other
    value must be JSON-serialisable; pickling is refused on purpose (loading a pickle from a
    shared cache is code execution for whoever can write to it).
    """

    _BYTES, _STR, _JSON = b"\x00b", b"\x00s", b"\x00j"

    def dumps(self, value: Any) -> bytes | int:
        if type(value) is int:
            return value
        if isinstance(value, bytes):
            return self._BYTES + value
        if isinstance(value, str):
            return self._STR + value.encode("utf-8")
        try:
            return self._JSON + json.dumps(value, separators=(",", ":")).encode("utf-8")
        except TypeError:
            raise TypeError(
                f"latentstore.cache.RedisCache stores bytes, str, int and JSON values, not "
                f"{type(value).__name__} (it never pickles)"
            ) from None

    def loads(self, data: bytes) -> Any:
        tag = data[:2]
        if tag == self._BYTES:
            return data[2:]
        if tag == self._STR:
            return data[2:].decode("utf-8")
        if tag == self._JSON:
            return json.loads(data[2:])
        return int(data)


# (pid, server url, options) -> redis.Redis. One client per process and server: redis-py's
# clients are thread-safe and share a connection pool.
_clients: dict[tuple[int, str, str], Any] = {}
_clients_lock = threading.Lock()


class PersistentRedisCacheClient(RedisCacheClient):
    """Django's client, but reusing one ``redis.Redis`` per process and server."""

    def __init__(self, servers: list[str], **options: Any) -> None:
        options.setdefault("serializer", BytesSerializer)
        super().__init__(servers, **options)
        self._options_key = repr(sorted((k, repr(v)) for k, v in options.items()))

    def get_client(self, key: Any = None, *, write: bool = False) -> Any:
        index = self._get_connection_pool_index(write)
        ident = (os.getpid(), self._servers[index], self._options_key)
        client = _clients.get(ident)
        if client is None:
            with _clients_lock:
                client = _clients.get(ident)
                if client is None:
                    pool = self._pool_class.from_url(self._servers[index], **self._pool_options)
                    client = _clients[ident] = self._client(connection_pool=pool)
        return client


class RedisCache(DjangoRedisCache):
    """A Redis ``CACHES`` backend for decoded pictures: persistent clients, no pickle.

    Use it like Django's::

        CACHES = {"default": {"BACKEND": "latentstore.cache.RedisCache",
                              "LOCATION": "redis://127.0.0.1:6379/1",
                              "KEY_PREFIX": "mysite"}}

    Differences from ``django.core.cache.backends.redis.RedisCache``: one client and connection
    pool per process and server (not a new client per call); values are bytes, str, int or JSON
    (see :class:`BytesSerializer`), never pickle; keys are not checked for memcached
    compatibility (Redis takes any key); and ``clear()`` with a ``KEY_PREFIX`` deletes only this
    cache's keys instead of flushing the whole Redis database.
    """

    def __init__(self, server: Any, params: dict[str, Any]) -> None:
        super().__init__(server, params)
        self._class = PersistentRedisCacheClient

    def validate_key(self, key: str) -> None:
        # Memcached's key rules (250 characters, no spaces) do not apply to Redis.
        return None

    def clear(self) -> bool:
        if not self.key_prefix:
            return self._cache.clear()
        client = self._cache.get_client(None, write=True)
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.key_prefix) + ":*"
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
        return True

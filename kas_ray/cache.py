"""TTL + LRU cache for unwrapped shares, public keys and JWKS.

Cache keys for shares are SHA-256 digests of (kid, key version, the full wrapped key and the
ephemeral key), never a prefix, so two different wrapped keys can never share an entry.
Policy binding and ABAC are still evaluated on every request: a hit only saves the HSM call.
"""

from __future__ import annotations

import abc
import hashlib
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from enum import StrEnum

from pydantic import BaseModel, Field


class CacheKind(StrEnum):
    SHARE = "share"
    PUBLIC_KEY = "public_key"
    JWKS = "jwks"


class CacheConfig(BaseModel):
    max_entries: int = Field(default=100_000, gt=0)
    ttl_seconds: dict[CacheKind, float] = Field(
        default_factory=lambda: {CacheKind.SHARE: 60.0, CacheKind.PUBLIC_KEY: 3600.0, CacheKind.JWKS: 3600.0}
    )
    #: Each entry lives between (1 - ttl_jitter) x and 1 x its TTL (a fixed fraction per key), so entries
    #: stored together do not all expire together (a burst of HSM unwraps). Never longer than the TTL.
    ttl_jitter: float = Field(default=0.2, ge=0.0, lt=1.0)


class CacheStats(BaseModel):
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    expirations: int = 0
    entries: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


_KINDS = frozenset(k.value for k in CacheKind)


def kind_of(key: str) -> str:
    """The :class:`CacheKind` value a cache key starts with (``share:...``), else ``"other"``."""
    head = key.split(":", 1)[0]
    return head if head in _KINDS else "other"


def share_cache_key(nation: str, kid: str, key_version: str, wrapped_key: bytes, ephemeral_pem: str | None) -> str:
    """Digest naming one unwrapped share; length-prefixed fields so no two inputs collide."""
    h = hashlib.sha256()
    for part in (nation.encode(), kid.encode(), key_version.encode(), wrapped_key, (ephemeral_pem or "").encode()):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return f"{CacheKind.SHARE.value}:{h.hexdigest()}"


class ShareCache(abc.ABC):
    """What the rewrap path needs from a cache; implementations may be remote and must fail open."""

    @abc.abstractmethod
    async def aget(self, key: str) -> object | None: ...

    @abc.abstractmethod
    async def aput(self, key: str, value: object, kind: CacheKind) -> None: ...

    @abc.abstractmethod
    def snapshot(self) -> CacheStats: ...


class MemoryCache(ShareCache):
    """In-process TTL + LRU map; not thread-safe by design (one event loop or one actor owns it)."""

    def __init__(self, config: CacheConfig | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or CacheConfig()
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, object]] = OrderedDict()
        self.stats = CacheStats()

    def get(self, key: str) -> object | None:
        entry = self._data.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        expires, value = entry
        if expires <= self._clock():
            del self._data[key]
            self.stats.expirations += 1
            self.stats.misses += 1
            return None
        self._data.move_to_end(key)
        self.stats.hits += 1
        return value

    def put(self, key: str, value: object, kind: CacheKind, ttl: float | None = None) -> None:
        ttl = self.config.ttl_seconds.get(kind, 60.0) if ttl is None else ttl
        if ttl <= 0:
            return
        if self.config.ttl_jitter:
            ttl *= 1.0 - self.config.ttl_jitter * (zlib.crc32(key.encode()) / 0x1_0000_0000)
        self._data[key] = (self._clock() + ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self.config.max_entries:
            self._data.popitem(last=False)
            self.stats.evictions += 1

    async def aget(self, key: str) -> object | None:
        return self.get(key)

    async def aput(self, key: str, value: object, kind: CacheKind) -> None:
        self.put(key, value, kind)

    def invalidate_prefix(self, prefix: str) -> int:
        doomed = [k for k in self._data if k.startswith(prefix)]
        for k in doomed:
            del self._data[k]
        return len(doomed)

    def snapshot(self) -> CacheStats:
        return self.stats.model_copy(update={"entries": len(self._data)})

"""The nation's share cache on Redis: sealed entries, digest names, TTLs per kind, fail-open.

Sealing: every value is encrypted with AES-256-GCM before it leaves the replica. The key is derived
with HKDF-SHA256 from the nation's cache secret (see :func:`kas_ray.shared.link.load_seal_secret`),
with the nation in the HKDF ``info``, so the key exists only in that nation's processes and differs
per nation. The associated data is the Redis key name, so an entry copied under another name does
not open. Redis therefore only holds ``version | nonce | ciphertext+tag``.

Names: ``{key_prefix}{NATION}:{kind}:{HMAC-SHA256(name key, logical key)}``. The logical key of a share
is already a SHA-256 digest of the wrapped key; keying the name digest with a second HKDF output also
hides *which* TDF was opened from anyone who can list Redis but holds the TDF.

Failure: Redis down, slow, refusing or holding a value that does not open is a miss (counted, with a
throttled warning), never an error to the client. :class:`TwoTierShareCache` puts the replica's
short-lived :class:`~kas_ray.cache.MemoryCache` in front.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kas_ray.cache import CacheConfig, CacheKind, CacheStats, MemoryCache, ShareCache, kind_of
from kas_ray.shared.link import RedisLink, RedisUnavailable, ThrottledLog, logger

if TYPE_CHECKING:
    from kas_ray.serve.metrics import KasMetrics

SEAL_FORMAT = b"\x01"
_NONCE = 12
_BYTES, _JSON = b"b", b"j"
_GLOB = re.compile(r"([*?\[\]\\])")


class SharedCacheStats(CacheStats):
    """Cache counters with the shared tier's: where hits came from and how Redis behaved."""

    local_hits: int = 0
    shared_hits: int = 0
    #: Redis was down, slow or refused: counted as misses too.
    errors: int = 0
    #: Entries that did not open (wrong secret, tampered, other format): counted as misses too.
    unsealable: int = 0
    redis_available: bool = True


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"kas-ray/cache/v1", info=info).derive(secret)


class CacheSealer:
    """AES-256-GCM sealing and keyed digest names under one nation's cache secret."""

    def __init__(self, secret: bytes, nation: str) -> None:
        nation_b = nation.upper().encode()
        self._aead = AESGCM(_hkdf(secret, b"seal|" + nation_b))
        self._name_key = _hkdf(secret, b"name|" + nation_b)

    def digest(self, logical_key: str) -> str:
        return hmac.new(self._name_key, logical_key.encode(), hashlib.sha256).hexdigest()

    def seal(self, name: str, value: object) -> bytes | None:
        """The sealed form of ``value`` (bytes, or anything JSON can carry); None if it cannot be cached."""
        if isinstance(value, bytes | bytearray):
            plain = _BYTES + bytes(value)
        else:
            try:
                plain = _JSON + json.dumps(value, separators=(",", ":")).encode()
            except (TypeError, ValueError):
                return None
        nonce = os.urandom(_NONCE)
        return SEAL_FORMAT + nonce + self._aead.encrypt(nonce, plain, name.encode())

    def open(self, name: str, blob: bytes) -> object:
        """The value sealed under ``name``; ValueError if it is not an entry this nation sealed there."""
        if len(blob) < 1 + _NONCE + 16 + 1 or blob[:1] != SEAL_FORMAT:
            raise ValueError("not a sealed cache entry")
        try:
            plain = self._aead.decrypt(blob[1:1 + _NONCE], blob[1 + _NONCE:], name.encode())
        except InvalidTag:
            raise ValueError("cache entry does not open under this nation's key") from None
        kind, body = plain[:1], plain[1:]
        if kind == _BYTES:
            return body
        if kind == _JSON:
            return json.loads(body)
        raise ValueError("unknown cache entry type")


class RedisShareCache(ShareCache):
    """One nation's cache in Redis: sealed values, keyed digest names, per-kind TTLs, fail-open."""

    def __init__(self, link: RedisLink, sealer: CacheSealer, config: CacheConfig | None = None) -> None:
        self.link = link
        self.sealer = sealer
        self.config = config or CacheConfig()
        self.stats = SharedCacheStats()
        self._warn = ThrottledLog(logger)

    def name(self, logical_key: str) -> str:
        return f"{self.link.prefix}{kind_of(logical_key)}:{self.sealer.digest(logical_key)}"

    def kind_prefix(self, kind: CacheKind | None = None) -> str:
        """Prefix of every name of ``kind`` (None: every cache entry of this nation)."""
        return f"{self.link.prefix}{kind.value}:" if kind is not None else self.link.prefix

    async def aget(self, key: str) -> object | None:
        name = self.name(key)
        try:
            blob = await self.link.run("cache get", lambda r: r.get(name))
        except RedisUnavailable:
            self.stats.errors += 1
            self.stats.misses += 1
            return None
        if not isinstance(blob, bytes):  # None: not there (the client never decodes responses)
            self.stats.misses += 1
            return None
        try:
            value = self.sealer.open(name, blob)
        except ValueError:
            self.stats.unsealable += 1
            self.stats.misses += 1
            self._warn.warning("kas-ray %s: a cache entry did not open (other secret or tampered); ignored",
                               self.link.nation)
            return None
        self.stats.hits += 1
        return value

    async def aput(self, key: str, value: object, kind: CacheKind) -> None:
        ttl = self.config.ttl_seconds.get(kind, 60.0)
        name = self.name(key)
        blob = self.sealer.seal(name, value)
        if ttl <= 0 or blob is None:
            return
        try:
            await self.link.run("cache put", lambda r: r.set(name, blob, px=max(1, int(ttl * 1000))))
        except RedisUnavailable:
            self.stats.errors += 1

    async def ainvalidate(self, kind: CacheKind | None = None, *, batch: int = 500) -> int:
        """Delete this nation's entries (of one kind) with SCAN + UNLINK, never KEYS.

        Raises RedisUnavailable if Redis does not answer: an operator wants to know it did not happen.
        Replicas' local tiers still serve what they hold for at most their local TTL.
        """
        pattern = _GLOB.sub(r"\\\1", self.kind_prefix(kind)) + "*"
        cursor, removed = 0, 0
        while True:
            async def scan(r: Any, at: int = cursor) -> tuple[int, list[bytes]]:
                return await r.scan(cursor=at, match=pattern, count=batch)  # type: ignore[no-any-return]

            cursor, names = await self.link.run("cache scan", scan)
            if names:
                async def unlink(r: Any, doomed: list[bytes] = names) -> int:
                    return int(await r.unlink(*doomed))

                removed += await self.link.run("cache unlink", unlink)
            if cursor == 0:
                return removed

    def snapshot(self) -> CacheStats:
        return self.stats.model_copy(update={"redis_available": self.link.available and not self.link.is_down()})


class TwoTierShareCache(ShareCache):
    """The replica's short-lived memory cache in front of the nation's Redis cache.

    A hit in either tier is a hit; only a miss in both costs a key-backend unwrap. The local TTL is
    short so an invalidation in Redis reaches every replica within it.
    """

    def __init__(self, shared: RedisShareCache, local: MemoryCache | None = None, *, local_ttl: float = 15.0,
                 metrics: KasMetrics | None = None) -> None:
        self.shared = shared
        self.local = local or MemoryCache(CacheConfig(max_entries=10_000))
        self.local_ttl = local_ttl
        self.stats = SharedCacheStats()
        self.metrics = metrics

    def _local_ttl(self, kind: CacheKind) -> float:
        return min(self.local_ttl, self.shared.config.ttl_seconds.get(kind, 60.0))

    async def aget(self, key: str) -> object | None:
        value = self.local.get(key)
        if value is not None:
            self.stats.hits += 1
            self.stats.local_hits += 1
            if self.metrics is not None:
                self.metrics.share_lookup("hit_replica")
            return value
        value = await self.shared.aget(key)
        if self.metrics is not None:
            self.metrics.share_lookup("miss" if value is None else "hit_shared")
        if value is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.stats.shared_hits += 1
        kind = kind_of(key)
        ttl = self._local_ttl(CacheKind(kind)) if kind != "other" else self.local_ttl
        self.local.put(key, value, CacheKind.SHARE, ttl=ttl)
        return value

    async def aput(self, key: str, value: object, kind: CacheKind) -> None:
        self.local.put(key, value, kind, ttl=self._local_ttl(kind))
        await self.shared.aput(key, value, kind)

    async def ainvalidate(self, kind: CacheKind | None = None) -> int:
        self.local.invalidate_prefix(f"{kind.value}:" if kind is not None else "")
        return await self.shared.ainvalidate(kind)

    def snapshot(self) -> CacheStats:
        shared = self.shared.snapshot()
        assert isinstance(shared, SharedCacheStats)
        return self.stats.model_copy(update={
            "entries": self.local.snapshot().entries,
            "evictions": self.local.stats.evictions, "expirations": self.local.stats.expirations,
            "errors": shared.errors, "unsealable": shared.unsealable, "redis_available": shared.redis_available,
        })

    async def shared_stats(self) -> CacheStats:
        """The Redis tier's own counters in this replica (hits there are this replica's local misses)."""
        return self.shared.snapshot()


def stats_dict(stats: CacheStats) -> dict[str, Any]:
    return {**stats.model_dump(), "hit_rate": round(stats.hit_rate, 4)}

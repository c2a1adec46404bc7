"""Replay store on Redis: a DPoP ``jti`` or forward nonce used once on any replica is refused on all.

``SET {prefix}{NATION}:replay:{sha256(key)} 1 NX PX ttl``: the first use creates the key, any later
use finds it. When Redis does not answer, ``on_redis_down`` decides:

* ``strict`` (default): :class:`ReplayStoreUnavailable`, answered 503 with Retry-After. A replay
  check that cannot be made is not passed (fail closed: this is a security control).
* ``local``: the replica's own :class:`~kas_ray.trust.replay.MemoryReplayStore` decides. Every key
  Redis accepted is mirrored there too, so during an outage each replica still refuses what it saw;
  a value can at worst be accepted once per replica. Keys accepted locally are written to Redis
  (``SET NX``) when it answers again.

Async only: the sync :meth:`check_and_store` refuses, since it would block the replica's event loop.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from typing import Any

from kas_ray.errors import ReplayStoreUnavailable
from kas_ray.shared.link import RedisLink, RedisUnavailable
from kas_ray.trust.replay import MemoryReplayStore, ReplayStore


class RedisReplayStore(ReplayStore):
    """First-use checks in Redis (``SET NX PX``), strict or with a per-replica fallback."""

    def __init__(self, link: RedisLink, *, on_redis_down: str = "strict", max_local_entries: int = 100_000) -> None:
        if on_redis_down not in ("strict", "local"):
            raise ValueError("on_redis_down must be strict or local")
        self.link = link
        self.on_redis_down = on_redis_down
        self.local = MemoryReplayStore(max_local_entries) if on_redis_down == "local" else None
        #: Accepted locally while Redis was down: name → (wall-clock expiry); written back when it returns.
        #: Bounded like the local store: a long outage must not grow it without end.
        self._pending: dict[str, float] = {}
        self._max_pending = max_local_entries
        self.counters: Counter[str] = Counter()

    def name(self, key: str) -> str:
        return f"{self.link.prefix}replay:{hashlib.sha256(key.encode()).hexdigest()}"

    def check_and_store(self, key: str, ttl_seconds: float) -> bool:
        raise TypeError("RedisReplayStore is async only: use acheck_and_store")

    async def acheck_and_store(self, key: str, ttl_seconds: float) -> bool:
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        name = self.name(key)
        ttl_ms = max(1, math.ceil(ttl_seconds * 1000))
        try:
            created = await self.link.run("replay check", lambda r: r.set(name, b"1", nx=True, px=ttl_ms))
        except RedisUnavailable:
            if self.local is None:
                self.counters["refused_redis_down"] += 1
                raise ReplayStoreUnavailable("the replay store is unreachable; retry later",
                                             retry_after=self.link.retry_after) from None
            first = self.local.check_and_store(key, ttl_seconds)
            self.counters["local_accepted" if first else "replays"] += 1
            if first:
                self._remember(name, time.time() + ttl_seconds)
            return first
        first = bool(created)
        if self.local is not None:
            # Mirror into the fallback; it also refuses what this replica accepted during an outage.
            first = self.local.check_and_store(key, ttl_seconds) and first
            if self._pending:
                await self._write_back()
        self.counters["accepted" if first else "replays"] += 1
        return first

    def _remember(self, name: str, expiry: float) -> None:
        self._pending[name] = expiry
        if len(self._pending) <= self._max_pending:
            return
        # Over the bound: drop what expired, then what expires first (down to 90 %, so this runs rarely).
        # A dropped name is still refused here while the local store holds it, as without Redis at all.
        now = time.time()
        live = sorted(((e, n) for n, e in self._pending.items() if e > now), reverse=True)
        keep = live[: int(self._max_pending * 0.9) or 1]
        self.counters["pending_dropped"] += len(self._pending) - len(keep)
        self._pending = {n: e for e, n in keep}

    async def _write_back(self) -> None:
        pending, self._pending = self._pending, {}
        now = time.time()
        live = {name: expiry for name, expiry in pending.items() if expiry > now}

        async def op(r: Any) -> None:
            async with r.pipeline(transaction=False) as pipe:
                for name, expiry in live.items():
                    pipe.set(name, b"1", nx=True, px=max(1, math.ceil((expiry - now) * 1000)))
                await pipe.execute()

        try:
            if live:
                await self.link.run("replay write-back", op)
                self.counters["written_back"] += len(live)
        except RedisUnavailable:
            self._pending.update(live)

    def status(self) -> dict[str, Any]:
        return {"backend": "redis", "on_redis_down": self.on_redis_down, **self.counters}

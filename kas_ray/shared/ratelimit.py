"""Sliding-window rate limits per subject and per client address, per endpoint class.

A window is the log of the accepted requests of one identity during the last ``window_seconds``; a
request is accepted while the log holds fewer than the limit. A refused request is not logged, and
its Retry-After is when the oldest logged request leaves the window.

With Redis the log is a sorted set per identity, updated by one Lua script (atomic, timed by the
Redis server's clock so replicas on skewed nodes agree): the limit holds across every replica.
Names are ``{prefix}{NATION}:rl:{sha256(endpoint|dimension|identity)}``, so Redis sees no subject or
address. Without Redis, or while it does not answer, each replica keeps its own windows in memory:
rate limiting protects availability, so it must not make Redis a single point of failure.

Subjects are the verified token's issuer and ``sub`` (never an unverified claim, or anyone could
exhaust someone else's budget). The client address is the TCP peer; ``X-Forwarded-For`` counts only
when that peer is a configured trusted proxy.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from redis.exceptions import NoScriptError

from kas_ray.config import RateLimitConfig
from kas_ray.errors import RateLimited
from kas_ray.shared.link import RedisLink, RedisUnavailable

if TYPE_CHECKING:
    from kas_ray.serve.metrics import KasMetrics

Endpoint = Literal["rewrap", "public_key"]
Dimension = Literal["subject", "client"]

_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return {1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, math.max(1, tonumber(oldest[2]) + window - now)}
"""
_SCRIPT_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()  # noqa: S324 - the script's Redis name, not security


class MemoryWindows:
    """Sliding-window logs in this process, bounded to ``max_tracked`` identities (least recent dropped)."""

    def __init__(self, max_tracked: int = 100_000, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._max = max_tracked
        self._clock = clock
        self._logs: OrderedDict[str, deque[float]] = OrderedDict()

    def hit(self, key: str, limit: int, window: float) -> float:
        """0 when accepted (and logged), else the seconds until a request would be accepted."""
        now = self._clock()
        log = self._logs.get(key)
        if log is None:
            log = self._logs[key] = deque()
        self._logs.move_to_end(key)
        while log and log[0] <= now - window:
            log.popleft()
        if len(log) >= limit:
            return max(log[0] + window - now, 0.001)
        log.append(now)
        while len(self._logs) > self._max:
            self._logs.popitem(last=False)
        return 0.0

    def __len__(self) -> int:
        return len(self._logs)


def client_address(scope: Mapping[str, Any], trusted: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
                   ) -> str | None:
    """The client's address: the TCP peer, or (peer is a trusted proxy) the nearest untrusted
    address in X-Forwarded-For, read from the right."""
    client = scope.get("client")
    peer = client[0] if client else None
    networks = list(trusted)
    if peer is None or not networks or not _in(peer, networks):
        return peer
    chain: list[str] = []
    for name, value in scope.get("headers") or []:
        if name.lower() == b"x-forwarded-for":
            chain += [part.strip() for part in value.decode("latin-1").split(",") if part.strip()]
    for address in reversed(chain):
        try:
            ipaddress.ip_address(address)
        except ValueError:
            return peer  # a malformed hop: trust nothing to its left
        if not _in(address, networks):
            return address
        peer = address
    return peer


def _in(address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


class RateLimiter:
    """The nation's limits: shared through Redis when a link is given, else this replica's memory."""

    def __init__(self, config: RateLimitConfig, nation: str, link: RedisLink | None = None, *,
                 clock: Callable[[], float] = time.monotonic, metrics: KasMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.nation = nation.upper()
        self.link = link
        self.memory = MemoryWindows(config.max_tracked, clock=clock)
        self.trusted = [ipaddress.ip_network(p, strict=False) for p in config.trusted_proxies]
        self.counters: Counter[str] = Counter()

    def limit(self, endpoint: Endpoint, dimension: Dimension) -> int | None:
        limits = self.config.rewrap if endpoint == "rewrap" else self.config.public_key
        return limits.per_subject if dimension == "subject" else limits.per_client

    async def check_client(self, endpoint: Endpoint, scope: Mapping[str, Any]) -> None:
        """Count one request of this client address; RateLimited (429) over the limit."""
        address = client_address(scope, self.trusted)
        if address is not None:
            await self._hit(endpoint, "client", address)

    async def check_subject(self, endpoint: Endpoint, issuer: str, subject: str) -> None:
        """Count one request of this verified subject; RateLimited (429) over the limit."""
        await self._hit(endpoint, "subject", f"{issuer}\n{subject}")

    async def _hit(self, endpoint: Endpoint, dimension: Dimension, identity: str) -> None:
        limit = self.limit(endpoint, dimension)
        if not self.config.enabled or limit is None:
            return
        digest = hashlib.sha256(f"{endpoint}\n{dimension}\n{identity}".encode()).hexdigest()[:40]
        window = self.config.window_seconds
        wait = None
        if self.link is not None:
            try:
                wait = await self._redis_hit(f"{self.link.prefix}rl:{digest}", limit, window)
            except RedisUnavailable:
                self.counters["local_fallback"] += 1
        if wait is None:
            wait = self.memory.hit(digest, limit, window)
        if wait > 0:
            self.counters[f"limited_{endpoint}_{dimension}"] += 1
            if self.metrics is not None:
                self.metrics.rate_limited(endpoint, dimension)
            raise RateLimited(f"too many {endpoint.replace('_', ' ')} requests from this {dimension}; "
                              f"limit {limit} per {window:g}s", retry_after=wait)
        self.counters[f"accepted_{endpoint}_{dimension}"] += 1

    async def _redis_hit(self, name: str, limit: int, window: float) -> float:
        args = (max(1, int(window * 1000)), limit, secrets.token_hex(8))

        async def op(r: Any) -> Any:
            try:
                return await r.evalsha(_SCRIPT_SHA, 1, name, *args)
            except NoScriptError:
                return await r.eval(_SCRIPT, 1, name, *args)

        allowed, wait_ms = await self.link.run("rate limit", op)  # type: ignore[union-attr]
        return 0.0 if int(allowed) == 1 else int(wait_ms) / 1000.0

    def status(self) -> dict[str, Any]:
        return {"enabled": self.config.enabled, "shared": self.link is not None,
                "window_seconds": self.config.window_seconds, **self.counters}


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))

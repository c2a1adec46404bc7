"""What a replica of one nation builds from its settings: replay store, shared cache, rate limiter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kas_ray.cache import CacheConfig, MemoryCache, ShareCache
from kas_ray.config import NationSettings
from kas_ray.shared.cache import CacheSealer, RedisShareCache, TwoTierShareCache
from kas_ray.shared.link import RedisLink, load_seal_secret
from kas_ray.shared.ratelimit import RateLimiter
from kas_ray.shared.replay import RedisReplayStore
from kas_ray.trust.replay import MemoryReplayStore, ReplayStore

if TYPE_CHECKING:
    from kas_ray.serve.metrics import KasMetrics


@dataclass
class SharedState:
    link: RedisLink | None
    replay: ReplayStore
    #: None: no Redis; the caller keeps its own cache tiers (the nation's cache actor).
    cache: ShareCache | None
    rate_limiter: RateLimiter | None

    def status(self) -> dict[str, Any]:
        replay = self.replay.status() if isinstance(self.replay, RedisReplayStore) else {
            "backend": "memory", "evictions": getattr(self.replay, "evictions", 0)}
        return {"redis": self.link.status() if self.link else None, "replay": replay,
                "rate_limit": self.rate_limiter.status() if self.rate_limiter else {"enabled": False}}


def build_shared_state(settings: NationSettings, *, cache_config: CacheConfig | None = None,
                       metrics: KasMetrics | None = None) -> SharedState:
    """Shared state of one replica: Redis-backed where ``settings.redis`` is set, in memory otherwise.

    ``metrics`` (the replica's) counts share lookups of the Redis tiers and rate-limit refusals.
    """
    link = RedisLink(settings.redis, settings.nation) if settings.redis is not None else None
    replay: ReplayStore
    if link is not None and settings.replay.backend in ("auto", "redis"):
        replay = RedisReplayStore(link, on_redis_down=settings.replay.on_redis_down,
                                  max_local_entries=settings.replay.max_entries)
    else:
        replay = MemoryReplayStore(settings.replay.max_entries)
    cache: ShareCache | None = None
    if link is not None and settings.redis is not None:
        secret = load_seal_secret(settings.redis, settings.nation, settings.state_dir, settings.profile)
        shared = RedisShareCache(link, CacheSealer(secret, settings.nation), cache_config)
        cache = TwoTierShareCache(shared, MemoryCache(CacheConfig(max_entries=10_000)), metrics=metrics)
    limiter = None
    if settings.rate_limit.enabled:
        shared_windows = link is not None and settings.rate_limit.backend in ("auto", "redis")
        limiter = RateLimiter(settings.rate_limit, settings.nation, link if shared_windows else None,
                              metrics=metrics)
    return SharedState(link=link, replay=replay, cache=cache, rate_limiter=limiter)

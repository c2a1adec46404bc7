"""State the replicas of one nation share through Redis: share cache, replay store, rate-limit windows.

One module per concern: :mod:`.link` (client, timeouts, secrets), :mod:`.cache` (sealed share cache),
:mod:`.replay` (``SET NX`` replay store), :mod:`.ratelimit` (sliding windows), :mod:`.wiring` (what a
replica builds from its :class:`~kas_ray.config.NationSettings`). See docs/redis.md.
"""

from kas_ray.shared.cache import CacheSealer, RedisShareCache, SharedCacheStats, TwoTierShareCache
from kas_ray.shared.link import RedisLink, RedisUnavailable
from kas_ray.shared.ratelimit import RateLimited, RateLimiter
from kas_ray.shared.replay import RedisReplayStore, ReplayStoreUnavailable
from kas_ray.shared.wiring import SharedState, build_shared_state

__all__ = [
    "CacheSealer",
    "RateLimited",
    "RateLimiter",
    "RedisLink",
    "RedisReplayStore",
    "RedisShareCache",
    "RedisUnavailable",
    "ReplayStoreUnavailable",
    "SharedCacheStats",
    "SharedState",
    "TwoTierShareCache",
    "build_shared_state",
]

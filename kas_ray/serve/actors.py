"""The per-nation HSM actor and cache actor, and the replica-side proxies that call them.

The HSM actor is the only process of a nation that holds (or talks to) its private keys; replicas
reach it through :class:`ActorKeyBackend`, which implements :class:`KeyBackend` so the rewrap path
does not know whether keys are local or behind an actor. Both actors are named per nation in an
explicit namespace, created idempotently, and restart when they die.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, TaskCancelledError

from kas_ray.cache import CacheConfig, CacheKind, CacheStats, MemoryCache, ShareCache, kind_of
from kas_ray.config import KeyBackendConfig, Profile
from kas_ray.errors import KasRayError, KeyBackendUnavailable
from kas_ray.keys.base import Health, KeyBackend, KeyInfo
from kas_ray.serve.metrics import CACHE_ACTOR_LOOKUPS, ray_metrics

if TYPE_CHECKING:
    from kas_ray.serve.metrics import CacheResult, KasMetrics

NAMESPACE = "kas-ray"
_ACTOR_FAILURES = (RayActorError, ActorDiedError, ActorUnavailableError, GetTimeoutError)


def hsm_actor_name(nation: str) -> str:
    return f"kas-hsm-{nation.lower()}"


def cache_actor_name(nation: str) -> str:
    return f"kas-cache-{nation.lower()}"


def build_backend(spec: dict[str, Any], nation: str) -> KeyBackend:
    """The nation's key backend from ``spec``: a KeyBackendConfig dump plus ``state_dir`` and ``profile``."""
    config = KeyBackendConfig.model_validate({k: v for k, v in spec.items() if k not in ("state_dir", "profile")})
    if config.kind == "gcp-kms":
        from kas_ray.keys.gcp_kms import GcpKmsBackend

        assert config.gcp is not None
        return GcpKmsBackend(config.gcp, nation)
    if config.kind == "pkcs11":
        from kas_ray.keys.pkcs11 import Pkcs11Backend

        assert config.pkcs11 is not None
        return Pkcs11Backend(config.pkcs11, nation)
    from kas_ray.keys.software import SoftwareKeystore

    profile: Profile = spec.get("profile", "dev")
    return SoftwareKeystore(spec["state_dir"], nation, profile=profile)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=16)
class HsmActor:
    """Holds one nation's key backend; answers public-key queries and unwrap calls."""

    def __init__(self, nation: str, spec: dict[str, Any]) -> None:
        self.nation = nation
        self.backend = build_backend(spec, nation)

    async def keys(self) -> list[KeyInfo]:
        return await self.backend.keys()

    async def unwrap(self, kid: str, wrapped: bytes, ephemeral_public_key_pem: str | None) -> bytes:
        return await self.backend.unwrap(kid, wrapped, ephemeral_public_key_pem)

    async def health(self) -> Health:
        return await self.backend.health()

    def pid(self) -> int:
        return os.getpid()


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class CacheActor:
    """One nation's shared cache of unwrapped shares, public keys and JWKS (TTL + LRU)."""

    def __init__(self, config: CacheConfig | None = None, nation: str = "") -> None:
        self.cache = MemoryCache(config)
        self.nation = nation
        self.lookups = CACHE_ACTOR_LOOKUPS.create(ray_metrics())

    def get(self, key: str) -> object | None:
        value = self.cache.get(key)
        self.lookups.inc(1, tags={"nation": self.nation, "kind": kind_of(key),
                                  "result": "miss" if value is None else "hit"})
        return value

    def put(self, key: str, value: object, kind: CacheKind, ttl: float | None = None) -> None:
        self.cache.put(key, value, kind, ttl)

    def invalidate_prefix(self, prefix: str) -> int:
        return self.cache.invalidate_prefix(prefix)

    def stats(self) -> CacheStats:
        return self.cache.snapshot()


def get_or_create_actors(nation: str, backend_spec: dict[str, Any], cache_config: CacheConfig | None = None,
                         *, resources: dict[str, float] | None = None) -> tuple[Any, Any]:
    """The nation's (hsm, cache) actor handles, created on first call (idempotent across replicas).

    ``resources`` pin both actors to the nation's nodes: the cache actor holds unwrapped shares too.
    """
    options: dict[str, Any] = {"namespace": NAMESPACE, "lifetime": "detached", "get_if_exists": True}
    if resources:
        options["resources"] = resources
    hsm = HsmActor.options(name=hsm_actor_name(nation), **options).remote(nation, backend_spec)
    cache = CacheActor.options(name=cache_actor_name(nation), **options).remote(cache_config, nation)
    return hsm, cache


def kill_actors(nations: list[str]) -> None:
    """Remove the named actors of ``nations`` (on shutdown of the embedded default)."""
    for nation in nations:
        for name in (hsm_actor_name(nation), cache_actor_name(nation)):
            try:
                ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            except ValueError:
                pass


class ActorKeyBackend(KeyBackend):
    """A :class:`KeyBackend` whose private-key operations run in the nation's HSM actor.

    Public key facts are cached twice: briefly in the replica, and for an hour in the nation's cache
    actor (shared by replicas; cheap for KMS backends whose GetPublicKey is a network call). Every
    call has a deadline and an actor failure becomes :class:`KeyBackendUnavailable` (503), never a
    hang or a 500.
    """

    def __init__(self, hsm: Any, nation: str, *, cache: Any = None, timeout: float = 10.0,
                 info_ttl: float = 30.0, reconnect: Callable[[], Any] | None = None,
                 metrics: KasMetrics | None = None) -> None:
        self._hsm = hsm
        self._metrics = metrics
        #: Looks the named HSM actor up again (re-creating it) when it died for good.
        self._reconnect = reconnect
        self._cache = cache
        self._cache_key = public_keys_cache_key(nation)
        self._timeout = timeout
        self._info_ttl = info_ttl
        self._infos: list[KeyInfo] | None = None
        self._infos_at = 0.0

    async def _call(self, method: str, *args: Any) -> Any:
        started = time.perf_counter()
        failure: str | None = "internal"  # what the metrics call it; None once the actor answered
        try:
            result = await asyncio.wait_for(getattr(self._hsm, method).remote(*args), self._timeout)
            failure = None
            return result
        except TimeoutError:
            failure = "timeout"
            raise KeyBackendUnavailable("the HSM actor did not answer in time") from None
        except ActorDiedError:
            failure = "actor_died"
            # Ray restarts a crashed actor by itself; one killed for good needs a new instance.
            if self._reconnect is not None:
                self._hsm = await asyncio.to_thread(self._reconnect)
            raise KeyBackendUnavailable("the HSM actor is unavailable (restarting)") from None
        except _ACTOR_FAILURES:
            failure = "actor_unavailable"
            raise KeyBackendUnavailable("the HSM actor is unavailable (restarting)") from None
        except KasRayError as exc:  # raised by the key backend (unknown kid, unwrap failed, KMS down)
            failure = exc.code
            raise
        except (asyncio.CancelledError, TaskCancelledError):  # the request went away (client gone): no HSM fault
            failure = "cancelled"
            raise
        finally:
            if self._metrics is not None and failure != "cancelled":
                self._metrics.hsm_call(method, time.perf_counter() - started, failure)

    async def keys(self) -> list[KeyInfo]:
        now = asyncio.get_running_loop().time()
        if self._infos is None or now - self._infos_at > self._info_ttl:
            infos = await _best_effort(self._cache.get.remote(self._cache_key)) if self._cache else None
            if not isinstance(infos, list):
                infos = await self._call("keys")
                if self._cache is not None:
                    await _best_effort(self._cache.put.remote(self._cache_key, infos, CacheKind.PUBLIC_KEY))
            self._infos, self._infos_at = infos, now
        return list(self._infos)

    def invalidate(self) -> None:
        self._infos = None

    async def unwrap(self, kid: str, wrapped: bytes, ephemeral_public_key_pem: str | None = None) -> bytes:
        return await self._call("unwrap", kid, wrapped, ephemeral_public_key_pem)

    async def health(self) -> Health:
        return await self._call("health")


def public_keys_cache_key(nation: str) -> str:
    return f"{CacheKind.PUBLIC_KEY.value}:{nation.lower()}"


async def _best_effort(ref: Any, timeout: float = 1.0) -> Any:
    """Await a cache-actor call; a slow or dead cache is a miss, never an error."""
    try:
        return await asyncio.wait_for(ref, timeout)
    except (TimeoutError, *_ACTOR_FAILURES):
        return None


class ActorDocuments:
    """JWKS documents shared through the nation's cache actor (TTL of the JWKS kind).

    Called by the token verifier from its worker thread (``averify`` runs in ``asyncio.to_thread``),
    never from the event loop, so the bounded ``ray.get`` here blocks no request handling.
    """

    def __init__(self, actor: Any, *, timeout: float = 1.0) -> None:
        self._actor = actor
        self._timeout = timeout

    def get(self, key: str) -> bytes | None:
        try:
            value = ray.get(self._actor.get.remote(key), timeout=self._timeout)
        except _ACTOR_FAILURES:
            return None
        return value if isinstance(value, bytes) else None

    def put(self, key: str, document: bytes) -> None:
        self._actor.put.remote(key, document, CacheKind.JWKS)  # fire and forget: best effort


class TieredShareCache(ShareCache):
    """A small per-replica cache in front of the nation's cache actor (saves an actor hop on hits).

    The cache actor is best effort: if it is slow or gone the request goes on as a miss.
    """

    def __init__(self, actor: Any, local: MemoryCache | None = None, *, timeout: float = 1.0,
                 local_ttl: float = 15.0, metrics: KasMetrics | None = None) -> None:
        self._actor = actor
        self._metrics = metrics
        self.local = local or MemoryCache(CacheConfig(max_entries=10_000))
        self._timeout = timeout
        #: Short, so an invalidation in the cache actor reaches every replica quickly.
        self._local_ttl = local_ttl

    async def aget(self, key: str) -> object | None:
        value = self.local.get(key)
        if value is not None:
            self._count("hit_replica")
            return value
        value = await _best_effort(self._actor.get.remote(key), self._timeout)
        if value is not None:
            self.local.put(key, value, CacheKind.SHARE, ttl=self._local_ttl)
        self._count("miss" if value is None else "hit_shared")
        return value

    def _count(self, result: CacheResult) -> None:
        if self._metrics is not None:
            self._metrics.share_lookup(result)

    async def aput(self, key: str, value: object, kind: CacheKind) -> None:
        self.local.put(key, value, kind, ttl=self._local_ttl)
        await _best_effort(self._actor.put.remote(key, value, kind), self._timeout)

    def snapshot(self) -> CacheStats:
        return self.local.snapshot()

    async def shared_stats(self) -> CacheStats | None:
        stats = await _best_effort(self._actor.stats.remote(), self._timeout)
        return stats if isinstance(stats, CacheStats) else None

"""The per-nation HSM actor and cache actor, and the replica-side proxies that call them.

The HSM actor is the only process of a nation that holds (or talks to) its private keys; replicas
reach it through :class:`ActorKeyBackend`, which implements :class:`KeyBackend` so the rewrap path
does not know whether keys are local or behind an actor. It also remembers the shares it unwrapped
(the nation's shared share tier): a replica's cache miss is then one actor call, not three (cache
get, unwrap, cache put), and no other process of the nation holds unwrapped shares but the replicas'
short-lived caches. The cache actor holds public data: public keys and JWKS documents.
Both actors are named per nation in an explicit namespace, created idempotently, and restart when
they die.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, TaskCancelledError

from kas_ray.cache import CacheConfig, CacheKind, CacheStats, MemoryCache, ShareCache, kind_of, share_cache_key
from kas_ray.config import KeyBackendConfig, Profile
from kas_ray.errors import KasRayError, KeyBackendUnavailable
from kas_ray.keys.base import Health, KeyBackend, KeyInfo
from kas_ray.serve.metrics import CACHE_ACTOR_LOOKUPS, ray_metrics

if TYPE_CHECKING:
    from kas_ray.serve.metrics import KasMetrics

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
    """Holds one nation's key backend; answers public-key queries and unwrap calls.

    ``unwrap_share`` remembers what it unwrapped (TTL + LRU, ``CacheConfig``): the same wrapped key
    asked again, by any replica, costs no second private-key operation, and concurrent asks of one
    wrapped key share one. The memory is keyed by this actor's own digest of (kid, key version,
    wrapped key, ephemeral key), never by a caller's name for it, and the kid is looked up on every
    call, so a key the backend disabled stops answering from memory too.
    """

    def __init__(self, nation: str, spec: dict[str, Any], cache_config: CacheConfig | None = None) -> None:
        self.nation = nation
        self.backend = build_backend(spec, nation)
        self.shares = MemoryCache(cache_config)
        self._unwrapping: dict[str, asyncio.Task[bytes]] = {}

    async def keys(self) -> list[KeyInfo]:
        return await self.backend.keys()

    async def unwrap_share(self, kid: str, wrapped: bytes,
                           ephemeral_public_key_pem: str | None) -> tuple[bytes, bool]:
        """The share of ``wrapped`` and whether it came from memory (no private-key operation)."""
        info = await self.backend.key_info(kid)
        key = share_cache_key(self.nation, info.kid, info.version, wrapped, ephemeral_public_key_pem)
        share = self.shares.get(key)
        if isinstance(share, bytes):
            return share, True
        task = self._unwrapping.get(key)
        joined = task is not None
        if task is None:  # one unwrap per key at a time; a caller that goes away does not cancel it
            task = asyncio.create_task(self._unwrap_and_remember(key, kid, wrapped, ephemeral_public_key_pem))
            task.add_done_callback(_retrieve)  # its failure reaches every caller; none left is no warning
            self._unwrapping[key] = task
        return await asyncio.shield(task), joined

    async def _unwrap_and_remember(self, key: str, kid: str, wrapped: bytes, ephemeral: str | None) -> bytes:
        try:
            share = await self.backend.unwrap(kid, wrapped, ephemeral)
            self.shares.put(key, share, CacheKind.SHARE)
            return share
        finally:
            self._unwrapping.pop(key, None)

    def share_stats(self) -> CacheStats:
        return self.shares.snapshot()

    async def health(self) -> Health:
        return await self.backend.health()

    def pid(self) -> int:
        return os.getpid()


def _retrieve(task: asyncio.Task[bytes]) -> None:
    if not task.cancelled():
        task.exception()


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class CacheActor:
    """One nation's shared cache of public data: public keys and JWKS documents (TTL + LRU)."""

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

    ``resources`` pin both actors to the nation's nodes (the HSM actor remembers unwrapped shares).
    """
    options: dict[str, Any] = {"namespace": NAMESPACE, "lifetime": "detached", "get_if_exists": True}
    if resources:
        options["resources"] = resources
    hsm = HsmActor.options(name=hsm_actor_name(nation), **options).remote(nation, backend_spec, cache_config)
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
                 metrics: KasMetrics | None = None, count_share_lookups: bool = True) -> None:
        self._hsm = hsm
        self._metrics = metrics
        #: False when another shared tier (Redis) counts the replica's misses already.
        self._count_share_lookups = count_share_lookups
        #: Looks the named HSM actor up again (re-creating it) when it died for good.
        self._reconnect = reconnect
        self._cache = cache
        self._cache_key = public_keys_cache_key(nation)
        self._timeout = timeout
        self._info_ttl = info_ttl
        self._infos: list[KeyInfo] | None = None
        self._infos_at = 0.0

    async def _call(self, method: str, *args: Any, label: str | None = None) -> Any:
        """``method`` of the HSM actor with a deadline; ``label`` names it in the metrics."""
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
                self._metrics.hsm_call(label or method, time.perf_counter() - started, failure)

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
        """One actor call: the HSM actor answers from its share memory or unwraps (and remembers)."""
        remembered = False
        try:
            share, remembered = await self._call("unwrap_share", kid, wrapped, ephemeral_public_key_pem,
                                                 label="unwrap")
        finally:  # a failed unwrap was a miss too
            if self._metrics is not None and self._count_share_lookups:
                self._metrics.share_lookup("hit_shared" if remembered else "miss")
        return bytes(share)

    async def share_stats(self) -> CacheStats | None:
        """The HSM actor's share memory counters; None if it does not answer quickly."""
        stats = await _best_effort(self._hsm.share_stats.remote())
        return stats if isinstance(stats, CacheStats) else None

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


class ReplicaShareCache(ShareCache):
    """The replica's own short-lived share cache, in front of the HSM actor's share memory.

    A miss here goes to :meth:`ActorKeyBackend.unwrap`, where the HSM actor answers from its
    memory or unwraps: one actor call. The local TTL is short, so that a key the HSM actor stops
    honouring (disabled, rotated out) stops being served by replicas within it too.
    """

    def __init__(self, keys: ActorKeyBackend, local: MemoryCache | None = None, *, local_ttl: float = 15.0,
                 metrics: KasMetrics | None = None) -> None:
        self._keys = keys
        self._metrics = metrics
        self.local = local or MemoryCache(CacheConfig(max_entries=10_000))
        self._local_ttl = local_ttl

    async def aget(self, key: str) -> object | None:
        value = self.local.get(key)
        if value is not None and self._metrics is not None:
            self._metrics.share_lookup("hit_replica")  # misses are counted where the HSM actor answers
        return value

    async def aput(self, key: str, value: object, kind: CacheKind) -> None:
        self.local.put(key, value, kind, ttl=self._local_ttl)

    def snapshot(self) -> CacheStats:
        return self.local.snapshot()

    async def shared_stats(self) -> CacheStats | None:
        return await self._keys.share_stats()

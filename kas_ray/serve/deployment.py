"""The nation KAS as a Ray Serve deployment (FastAPI ingress), and its application builder.

One Serve application per nation, at route prefix ``/{nation}``: the Serve proxy routes straight
to the nation's replicas (no extra hop). Replicas hold no private key: unwraps go to the nation's
HSM actor (which also remembers the shares it unwrapped), behind a small per-replica share cache.

    serve run deployments/local.yaml          # per-nation args come from the file
    kas-ray serve                             # the embedded default, all nations
"""


import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve

from kas_ray.audit import JsonLinesAuditSink
from kas_ray.cache import CacheStats
from kas_ray.config import AbacConfig, FederationConfig, NationSettings, PeerConfig, TrustRegistry, load_yaml
from kas_ray.errors import ConfigError, FormatError, KasRayError
from kas_ray.federation.broker import Federation
from kas_ray.federation.envelope import FederationKey
from kas_ray.federation.peers import MAX_FORWARD_BATCH
from kas_ray.kas.service import RewrapCall, RewrapService
from kas_ray.policy import PolicyEngine
from kas_ray.serve import openapi as docs
from kas_ray.serve.actors import ActorDocuments, ActorKeyBackend, ReplicaShareCache, get_or_create_actors
from kas_ray.serve.http import KasHttpApi
from kas_ray.serve.metrics import KasMetrics, MetricsAuditSink
from kas_ray.shared.wiring import SharedState, build_shared_state
from kas_ray.trust import ReplayStore, TokenVerifier, dev_trust_registry

app = FastAPI(
    title="kas-ray nation KAS",
    description="OpenTDF-compatible Key Access Service of one nation (NATO ACP-240).",
    version="0.1.0",
)
docs.install(app)


def load_trust(settings: NationSettings) -> TrustRegistry:
    if settings.trust_registry:
        registry = load_yaml(settings.trust_registry, TrustRegistry)
        if registry.profile != settings.profile:
            raise ConfigError(f"trust registry profile {registry.profile} differs from the KAS profile "
                              f"{settings.profile}")
        return registry
    if settings.profile != "dev":
        raise ConfigError("the prod profile needs a trust_registry file (dev identity providers are refused)")
    return dev_trust_registry(settings.state_dir, settings.coalition)


def dev_federation_config(settings: NationSettings, **overrides: Any) -> FederationConfig:
    """Dev profile: the other coalition nations of this cluster, reached through Serve handles.

    Every nation's federation key lives in the one shared state directory (created here if missing),
    which is only acceptable when all nations run on one operator's machine.
    """
    root = settings.public_url.rstrip("/").rsplit("/", 1)[0]
    peers = []
    for nation in settings.coalition:
        if nation.upper() == settings.nation:
            continue
        key = FederationKey(FederationKey.default_path(settings.state_dir, nation), nation)
        peers.append(PeerConfig(nation=nation, url=f"{root}/{nation.lower()}", signing_jwk=key.public_jwk))
    return FederationConfig(peers=peers, **overrides)


def federation_config(settings: NationSettings) -> FederationConfig | None:
    """The nation's KAS registry: from its settings, or (dev profile) the other coalition nations here."""
    if settings.federation is not None:
        return settings.federation
    return dev_federation_config(settings) if settings.profile == "dev" else None


def build_federation(settings: NationSettings, replay: ReplayStore) -> Federation | None:
    config = federation_config(settings)
    if config is None:
        return None
    key_path = config.signing_key_file or FederationKey.default_path(settings.state_dir, settings.nation)
    return Federation(settings.nation, config, FederationKey(key_path, settings.nation), replay=replay)


def build_service(settings: NationSettings, shared: SharedState | None = None,
                  metrics: KasMetrics | None = None) -> RewrapService:
    """Everything a replica needs, wired to the nation's actors (and Redis, when ``settings.redis`` is set).

    With Redis, the share cache is this replica's memory cache in front of the nation's sealed Redis
    cache, replacing the cache actor for shares (docs/redis.md); the actor still caches public keys.
    """
    backend_spec = {**settings.key_backend.model_dump(), "state_dir": settings.state_dir, "profile": settings.profile}
    resources = settings.hsm_resources or None
    hsm, cache = get_or_create_actors(settings.nation, backend_spec, resources=resources)

    def reconnect() -> Any:
        return get_or_create_actors(settings.nation, backend_spec, resources=resources)[0]

    abac = load_yaml(settings.abac_config, AbacConfig) if settings.abac_config else AbacConfig()
    shared = shared or build_shared_state(settings, metrics=metrics)
    replay = shared.replay
    trust = load_trust(settings)
    audit = MetricsAuditSink(
        JsonLinesAuditSink(settings.audit_file(), max_bytes=settings.audit_max_bytes, nation=settings.nation),
        settings.nation,
    )
    federation = build_federation(settings, replay)
    for peer in federation.peers if federation else ():
        audit.set_breaker(peer, "closed")
    keys = ActorKeyBackend(hsm, settings.nation, cache=cache, timeout=settings.hsm_timeout_seconds,
                           reconnect=reconnect, metrics=metrics, count_share_lookups=shared.cache is None)
    return RewrapService(
        settings.nation,
        keys=keys,
        trust=trust,
        verifier=TokenVerifier(trust, shared_jwks=ActorDocuments(cache)),
        policy=PolicyEngine(abac),
        replay=replay,
        audit=audit,
        federation=federation,
        cache=shared.cache or ReplicaShareCache(keys, metrics=metrics),
        public_urls=[settings.public_url],
        limits=settings.limits,
        rate_limiter=shared.rate_limiter,
    )


def _stats(stats: CacheStats) -> dict[str, Any]:
    return {**stats.model_dump(), "hit_rate": round(stats.hit_rate, 4)}


async def handle_envelope(handler: Callable[..., Awaitable[Any]], *args: Any) -> dict[str, Any]:
    try:
        return {"ok": await handler(*args)}
    except KasRayError as exc:
        return {"error": {"code": exc.code, "message": exc.public_message}}


# Serve serializes the class when it is decorated: everything it uses must be defined above it.
# Serve's per-request access log is off: the audit log records every key decision and kas_http_requests_total
# every answer, and the access log line cost ~3 % of a replica's CPU per request (and per forward).
# A Serve config turns it back on per deployment: ``logging_config: {enable_access_log: true}``.
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64, health_check_period_s=10,
                  logging_config={"enable_access_log": False})
@serve.ingress(app)
class NationKAS:
    """HTTP routes of one nation's KAS; each route delegates to :class:`KasHttpApi`."""

    def __init__(self, settings: dict[str, Any] | NationSettings) -> None:
        self.settings = NationSettings.model_validate(settings)
        self.metrics = KasMetrics(self.settings.nation)
        self.shared = build_shared_state(self.settings, metrics=self.metrics)
        self.service = build_service(self.settings, self.shared, self.metrics)
        self.api = KasHttpApi(self.service, metrics=self.metrics)

    async def check_health(self) -> None:
        """Serve calls this every ``health_check_period_s`` (10 s): it keeps the breaker gauges alive,
        which Ray drops when nobody sets them for two metrics report intervals (20 s by default)."""
        if isinstance(self.service.audit, MetricsAuditSink):
            self.service.audit.refresh()

    # OpenTDF Connect (unary; JSON or proto)
    @app.post("/kas.AccessService/PublicKey", summary="Public key (Connect)", openapi_extra=docs.CONNECT_PUBLIC_KEY)
    async def connect_public_key(self, request: Request) -> Response:
        return await self.api.guarded(self.api.connect_public_key, request)

    @app.post("/kas.AccessService/LegacyPublicKey", summary="Legacy public key PEM (Connect)",
              openapi_extra=docs.CONNECT_LEGACY_PUBLIC_KEY)
    async def connect_legacy_public_key(self, request: Request) -> Response:
        return await self.api.guarded(self.api.connect_legacy_public_key, request)

    @app.post("/kas.AccessService/Rewrap", summary="Rewrap (Connect)", openapi_extra=docs.CONNECT_REWRAP)
    async def connect_rewrap(self, request: Request) -> Response:
        return await self.api.guarded(self.api.connect_rewrap, request)

    # OpenTDF legacy REST (under /kas, as older clients address it)
    @app.get("/kas/kas_public_key", summary="Legacy public key PEM (REST)", openapi_extra=docs.REST_PUBLIC_KEY)
    async def rest_public_key(self, request: Request) -> Response:
        return await self.api.guarded(self.api.rest_public_key, request, False)

    @app.get("/kas/v2/kas_public_key", summary="Public key and kid (REST)", openapi_extra=docs.REST_PUBLIC_KEY_V2)
    async def rest_public_key_v2(self, request: Request) -> Response:
        return await self.api.guarded(self.api.rest_public_key, request, True)

    @app.post("/kas/v2/rewrap", summary="Rewrap (REST)", openapi_extra=docs.REST_REWRAP)
    async def rest_rewrap(self, request: Request) -> Response:
        return await self.api.guarded(self.api.rest_rewrap, request)

    # ACP-240 form: clientPublicKey + requests[], or the same inside a signedRequestToken
    @app.post("/rewrap", summary="Rewrap (ACP-240 form)", openapi_extra=docs.ACP240_REWRAP)
    async def acp240_rewrap(self, request: Request) -> Response:
        return await self.api.guarded(self.api.rest_rewrap, request)

    @app.get("/healthz", summary="Liveness", openapi_extra=docs.HEALTHZ)
    async def healthz(self) -> Response:
        return await self.api.healthz()

    @app.get("/readyz", summary="Readiness: keys loaded, HSM actor answering, trust loaded", openapi_extra=docs.READYZ)
    async def readyz(self) -> Response:
        return await self.api.readyz()

    @app.get("/federation/status", summary="Peers, circuit breakers and federation counters",
             openapi_extra=docs.FEDERATION_STATUS)
    async def federation_status(self) -> Response:
        federation = self.service.federation
        if federation is None:
            return JSONResponse({"nation": self.settings.nation, "federation": "disabled"})
        return JSONResponse(federation.status())

    @app.get("/stats", summary="Cache counters (this replica's, the nation's shared tier), replay and rate limits",
             openapi_extra=docs.STATS)
    async def stats(self) -> Response:
        cache = self.service.cache
        shared_stats = getattr(cache, "shared_stats", None)  # ReplicaShareCache or TwoTierShareCache
        shared = await shared_stats() if shared_stats is not None else None
        return JSONResponse({"nation": self.settings.nation, "replica_cache": _stats(cache.snapshot()),
                             "shared_cache": _stats(shared) if shared else None,
                             "replica": serve.get_replica_context().replica_id.unique_id,
                             **self.shared.status()})

    # Python clients (deployment handles) call these directly: same checks, no HTTP. Errors come back
    # as {"error": {"code", "message"}} envelopes rather than exceptions pickled across processes.
    async def rewrap(self, call: dict[str, Any]) -> dict[str, Any]:
        return await handle_envelope(self._rewrap, call)

    async def public_key(self, algorithm: str = "rsa:2048") -> dict[str, Any]:
        return await handle_envelope(self.api.public_key, algorithm)

    async def forward(self, message: dict[str, Any]) -> dict[str, Any]:
        """A peer's signed forward (in-cluster handle, or relayed by this nation's federation gateway)."""
        tls_peer = message.pop("_tls_peer", None) if isinstance(message, dict) else None
        return await handle_envelope(self.service.handle_forward, message, tls_peer)

    async def forward_batch(self, messages: Any) -> list[dict[str, Any]]:
        """Several forwards of one home KAS in one handle call (allOf forwards it batched): each is
        verified, decided, audited and answered on its own, and the answers come back in order."""
        if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_FORWARD_BATCH:
            return [{"error": {"code": "bad_format", "message": "a forward batch is a list of 1 to "
                                                                 f"{MAX_FORWARD_BATCH} messages"}}]
        return list(await asyncio.gather(*(self.forward(message) for message in messages)))

    async def _rewrap(self, call: dict[str, Any]) -> dict[str, Any]:
        try:
            parsed = RewrapCall.model_validate(call)
        except ValidationError:
            raise FormatError("malformed rewrap call") from None
        return (await self.service.rewrap(parsed)).to_wire()


def build_nation(args: dict[str, Any]) -> serve.Application:
    """Application builder for ``serve run`` / Serve config files: ``args`` are :class:`NationSettings`."""
    return nation_app(NationSettings.model_validate(args))


def nation_app(settings: NationSettings, **deployment_options: Any) -> serve.Application:
    """One nation's application; ``deployment_options`` are what a Serve config file sets per deployment
    (``autoscaling_config``, ``max_ongoing_requests``, ...). Serve app builders take one argument, so
    Python callers that need options (``runner.deploy``) come here."""
    return NationKAS.options(name=f"kas-{settings.nation.lower()}", **deployment_options).bind(settings.model_dump())

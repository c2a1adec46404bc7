"""Configuration models: every tunable of kas-ray lives here, validated by pydantic.

Attribute definitions, clearance equivalences and the trust registry come from configuration
files (YAML or JSON), never from code paths; :func:`load_yaml` reads any of these models.
"""

from __future__ import annotations

import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kas_ray.errors import ConfigError

#: NATO levels, lowest first. National names map onto these through ``clearance_equivalence``.
NATO_LEVELS = ["UNCLASSIFIED", "RESTRICTED", "CONFIDENTIAL", "SECRET", "TOP_SECRET"]
DEFAULT_NATIONS = ["USA", "FRA", "GBR"]
#: Where `kas-ray serve` listens by default; nation KAS URLs are ``{DEFAULT_BASE_URL}/{nation}``.
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
DEFAULT_BASE_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
DEFAULT_AUDIENCE = "kas-ray"
STATE_DIR_ENV = "KAS_RAY_STATE_DIR"

Profile = Literal["dev", "prod"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def normalize_label(value: str) -> str:
    """Canonical form of a label or clearance name: upper case, runs of space/-/_ as one ``_``."""
    return re.sub(r"[\s_\-]+", "_", value.strip()).upper()


# --- ABAC -------------------------------------------------------------------------------------------
class RuleType(StrEnum):
    """OpenTDF attribute rule types."""

    HIERARCHY = "hierarchy"
    ANY_OF = "anyOf"
    ALL_OF = "allOf"


SubjectField = Literal["clearance", "nationality", "coi"]


class AttributeDefinition(_Model):
    """One attribute of the ACP-240 label set.

    ``values`` are the allowed values: for ``hierarchy`` ordered **lowest first** and required;
    for ``anyOf``/``allOf`` an empty list means any value is allowed (open set, e.g. nation codes).
    ``subject`` names the subject attribute the rule compares against.
    """

    rule: RuleType
    subject: SubjectField
    values: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _hierarchy_needs_values(self) -> AttributeDefinition:
        if self.rule is RuleType.HIERARCHY and not self.values:
            raise ValueError("a hierarchy attribute needs its ordered values")
        return self


def _default_attributes() -> dict[str, AttributeDefinition]:
    return {
        "classification": AttributeDefinition(rule=RuleType.HIERARCHY, subject="clearance", values=NATO_LEVELS),
        "releasable-to": AttributeDefinition(rule=RuleType.ANY_OF, subject="nationality"),
        "coi": AttributeDefinition(rule=RuleType.ALL_OF, subject="coi"),
    }


def _default_clearance_equivalence() -> dict[str, dict[str, str]]:
    # National marking -> NATO level. Names are compared after normalize_label().
    return {
        "NATO": {level: level for level in NATO_LEVELS} | {"NATO_UNCLASSIFIED": "UNCLASSIFIED",
                 "NATO_RESTRICTED": "RESTRICTED", "NATO_CONFIDENTIAL": "CONFIDENTIAL",
                 "NATO_SECRET": "SECRET", "COSMIC_TOP_SECRET": "TOP_SECRET"},
        "USA": {"UNCLASSIFIED": "UNCLASSIFIED", "CONFIDENTIAL": "CONFIDENTIAL", "SECRET": "SECRET",
                "TOP_SECRET": "TOP_SECRET"},
        "FRA": {"NON_PROTEGE": "UNCLASSIFIED", "DIFFUSION_RESTREINTE": "RESTRICTED",
                "CONFIDENTIEL_DEFENSE": "CONFIDENTIAL", "SECRET_DEFENSE": "SECRET", "SECRET": "SECRET",
                "TRES_SECRET_DEFENSE": "TOP_SECRET", "TRES_SECRET": "TOP_SECRET"},
        "GBR": {"OFFICIAL": "UNCLASSIFIED", "OFFICIAL_SENSITIVE": "RESTRICTED", "RESTRICTED": "RESTRICTED",
                "CONFIDENTIAL": "CONFIDENTIAL", "SECRET": "SECRET", "TOP_SECRET": "TOP_SECRET",
                "UK_SECRET": "SECRET", "UK_TOP_SECRET": "TOP_SECRET"},
    }


class AbacConfig(_Model):
    """ACP-240 labels as OpenTDF attribute FQNs: ``https://{namespace}/attr/{name}/value/{value}``."""

    namespace: str = "acp240.nato.int"
    attributes: dict[str, AttributeDefinition] = Field(default_factory=_default_attributes)
    #: Name of the embargo attribute; its value is an ISO-8601 UTC time before which access is denied.
    embargo_attribute: str = "embargo"
    #: Attributes every object must carry; an object without them is denied (fail closed).
    required: list[str] = Field(default_factory=lambda: ["classification", "releasable-to"])
    #: nation (or "NATO") -> national clearance name -> NATO level.
    clearance_equivalence: dict[str, dict[str, str]] = Field(default_factory=_default_clearance_equivalence)

    @field_validator("clearance_equivalence")
    @classmethod
    def _levels_known(cls, table: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for nation, names in table.items():
            out[nation.upper()] = {normalize_label(k): normalize_label(v) for k, v in names.items()}
        return out

    @model_validator(mode="after")
    def _consistent(self) -> AbacConfig:
        label = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
        if not re.fullmatch(rf"{label}(?:\.{label})*(?::\d{{1,5}})?", self.namespace.strip().lower()):
            raise ValueError(f"namespace {self.namespace!r} must be a DNS name like acp240.nato.int")
        # Attribute names are case-insensitive in FQNs (kas_ray.policy compares them lower-cased).
        names = [n.strip().lower() for n in [*self.attributes, self.embargo_attribute]]
        for name in names:
            if not re.fullmatch(r"[a-z0-9](?:[a-z0-9_-]*[a-z0-9])?", name):
                raise ValueError(f"attribute name {name!r} is not a valid FQN segment (a-z 0-9 - _)")
        if len(set(names)) != len(names):
            raise ValueError("attribute names (and embargo_attribute) must be distinct, ignoring case")
        for name in self.required:
            if name not in self.attributes:
                raise ValueError(f"required attribute {name!r} has no definition")
        clearance_defs = [d for d in self.attributes.values() if d.subject == "clearance"]
        for definition in clearance_defs:
            levels = {normalize_label(v) for v in definition.values}
            for nation, table in self.clearance_equivalence.items():
                unknown = set(table.values()) - levels
                if unknown:
                    raise ValueError(f"clearance table {nation} maps to unknown levels {sorted(unknown)}")
        return self


# --- trust ------------------------------------------------------------------------------------------
ALLOWED_TOKEN_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)


class JwksSource(_Model):
    """Where an issuer's signing keys come from: a local JWKS file or a URL pinned here."""

    file: Path | None = None
    url: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> JwksSource:
        if (self.file is None) == (self.url is None):
            raise ValueError("give exactly one of jwks.file or jwks.url")
        if self.url is not None and not _https_or_loopback(self.url):
            raise ValueError("a JWKS URL must be https (plain http only on loopback), without user info")
        return self


def _https_or_loopback(url: str) -> bool:
    """https, or http to the loopback host itself (not ``127.0.0.1@evil``, ``localhost.evil``, ``127.0.0.1.nip.io``)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    if not host or parts.username is not None or parts.password is not None:
        return False
    return parts.scheme == "https" or (parts.scheme == "http" and host in ("127.0.0.1", "localhost", "::1"))


class ClaimNames(_Model):
    """Token claim names that carry the subject attributes, per issuer."""

    clearance: str = "clearance"
    nationality: str = "countryOfAffiliation"
    coi: str = "acpCOI"


class IssuerConfig(_Model):
    issuer: str = Field(description="exact `iss` value")
    audiences: list[str] = Field(default_factory=lambda: [DEFAULT_AUDIENCE], min_length=1)
    nations: list[str] = Field(min_length=1, description="nations this issuer may assert (ISO 3166 alpha-3)")
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "PS256", "ES256"], min_length=1)
    jwks: JwksSource
    claims: ClaimNames = Field(default_factory=ClaimNames)
    #: Clearance table used for this issuer's clearance names (defaults to the first nation).
    clearance_system: str | None = None
    #: A dev identity provider: trusted only under the ``dev`` profile.
    dev: bool = False

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, algorithms: list[str]) -> list[str]:
        bad = [a for a in algorithms if a not in ALLOWED_TOKEN_ALGORITHMS]
        if bad:
            raise ValueError(f"algorithms {bad} are not allowed (asymmetric RS/PS/ES only; never none or HS*)")
        return algorithms

    @field_validator("nations")
    @classmethod
    def _upper(cls, nations: list[str]) -> list[str]:
        return [n.upper() for n in nations]


class DPoPConfig(_Model):
    #: Require a DPoP proof on every rewrap (a token with ``cnf.jkt`` always requires one).
    required: bool = False
    #: Accepted age of a proof's ``iat`` (seconds, each side of now).
    max_age_seconds: int = Field(default=300, gt=0, le=3600)
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "PS256", "ES256", "ES384"])

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, algorithms: list[str]) -> list[str]:
        return IssuerConfig._asymmetric_only(algorithms)


class TrustRegistry(_Model):
    """Which token issuers a nation's KAS trusts, and how tokens are checked."""

    profile: Profile = "dev"
    issuers: list[IssuerConfig] = Field(default_factory=list)
    leeway_seconds: int = Field(default=30, ge=0, le=300)
    #: Minimum seconds between two JWKS refreshes of one issuer (unknown kid).
    jwks_refresh_interval: float = Field(default=60.0, ge=0)
    jwks_fetch_timeout: float = Field(default=5.0, gt=0, le=60)
    dpop: DPoPConfig = Field(default_factory=DPoPConfig)
    #: Accepted age of a signed request token (seconds).
    signed_request_max_age_seconds: int = Field(default=300, gt=0, le=3600)
    #: A verified access token is remembered (by its SHA-256) this long, so a client reusing its token
    #: does not cost a signature check per request; times are re-checked on every use. It bounds how long
    #: a token signed by a key since removed from the issuer's JWKS is still honoured. 0 = no cache.
    verified_token_cache_seconds: float = Field(default=60.0, ge=0, le=600)

    @model_validator(mode="after")
    def _profile_rules(self) -> TrustRegistry:
        seen: set[str] = set()
        for issuer in self.issuers:
            if issuer.issuer in seen:
                raise ValueError(f"issuer {issuer.issuer!r} listed twice")
            seen.add(issuer.issuer)
            if issuer.dev and self.profile == "prod":
                raise ValueError(f"dev identity provider {issuer.issuer!r} is refused under the prod profile")
        return self


# --- the KAS service --------------------------------------------------------------------------------
class RewrapLimits(_Model):
    """Bounds on one rewrap request, so no body can cost unbounded work."""

    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    max_key_access_objects: int = Field(default=64, gt=0)
    max_policies: int = Field(default=16, gt=0)
    min_rsa_client_key_bits: int = 2048
    #: OpenSSL refuses RSA public operations above 16384 bits; no client uses more than 8192.
    max_rsa_client_key_bits: int = Field(default=8192, ge=2048, le=16384)


#: Default Cloud KMS location per nation (where its key ring lives).
DEFAULT_KMS_LOCATIONS = {"USA": "us-central1", "FRA": "europe-west1", "GBR": "europe-west2"}


class GcpKmsConfig(_Model):
    """Google Cloud KMS: the nation's asymmetric-decrypt keys (HSM protection level)."""

    project: str
    #: Default: DEFAULT_KMS_LOCATIONS[nation].
    location: str | None = None
    key_ring: str = "kas-ray"
    #: algorithm → cryptoKey id; every ENABLED version of each key is usable (its kid names the version).
    keys: dict[str, str] = Field(default_factory=lambda: {"rsa:2048": "kas-rsa-2048", "rsa:4096": "kas-rsa-4096"})
    #: Service-account JSON file; default: Application Default Credentials.
    credentials_file: str | None = None
    #: Tests only: a plaintext gRPC endpoint (host:port) instead of Google's.
    insecure_endpoint: str | None = None
    #: Budget of one KMS operation, retries included (keep it below NationSettings.hsm_timeout_seconds).
    timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    max_attempts: int = Field(default=3, ge=1, le=10)
    #: gRPC deadline of one attempt; default timeout_seconds / max_attempts.
    attempt_timeout_seconds: float | None = Field(default=None, gt=0, le=60)
    #: How long the HSM actor trusts its list of key versions before listing again (rotation shows up then).
    key_list_ttl_seconds: float = Field(default=15.0, ge=0, le=3600)

    @field_validator("insecure_endpoint")
    @classmethod
    def _loopback_only(cls, endpoint: str | None) -> str | None:
        if endpoint is not None and not re.fullmatch(r"(127\.0\.0\.1|localhost|\[::1\]):\d{1,5}", endpoint):
            raise ValueError("insecure_endpoint (plaintext gRPC, tests only) must be a loopback host:port")
        return endpoint


class Pkcs11KeyConfig(_Model):
    kid: str
    #: CKA_LABEL of the private key (and its public key); or its CKA_ID in hex. Neither: the label is the kid.
    label: str | None = None
    id_hex: str | None = None
    #: Checked against the key on the token (rsa:2048, rsa:3072, rsa:4096 or ec:secp256r1).
    algorithm: str = "rsa:4096"
    #: OAEP hash of ``wrapped`` KAOs for an RSA key (ignored for EC keys); None: what clients use for the
    #: algorithm (SHA-1 for rsa:2048, as OpenTDF clients do; SHA-256 for larger keys).
    oaep_hash: Literal["sha1", "sha256"] | None = None
    #: active: published and used; retired: still decrypts; disabled: refused. List newest keys first.
    status: Literal["active", "retired", "disabled"] = "active"


class Pkcs11Config(_Model):
    """An on-premises HSM through PKCS#11: keys found by label or id, never extractable."""

    module: str
    slot: int | None = None
    token_label: str | None = None
    #: The user PIN comes from this environment variable, or from pin_file.
    pin_env: str = "KAS_RAY_PKCS11_PIN"
    pin_file: str | None = None
    keys: list[Pkcs11KeyConfig] = Field(default_factory=list)
    #: Sessions in the pool (sized to the HSM actor's concurrency).
    sessions: int = Field(default=4, ge=1, le=64)


class KeyBackendConfig(_Model):
    """Which backend the HSM actor runs; ``software`` keys live in the state directory."""

    kind: Literal["software", "gcp-kms", "pkcs11"] = "software"
    gcp: GcpKmsConfig | None = None
    pkcs11: Pkcs11Config | None = None

    @model_validator(mode="after")
    def _settings_for_kind(self) -> KeyBackendConfig:
        if self.kind == "gcp-kms" and self.gcp is None:
            raise ValueError("key_backend.kind gcp-kms needs key_backend.gcp")
        if self.kind == "pkcs11" and self.pkcs11 is None:
            raise ValueError("key_backend.kind pkcs11 needs key_backend.pkcs11")
        return self


# --- federation -------------------------------------------------------------------------------------
class BreakerConfig(_Model):
    """Circuit breaker per peer: N failures in a window open it; M successes after a cool-down close it."""

    failure_threshold: int = Field(default=3, ge=1)
    window_seconds: float = Field(default=30.0, gt=0)
    cool_down_seconds: float = Field(default=10.0, ge=0)
    success_threshold: int = Field(default=2, ge=1)
    half_open_max_calls: int = Field(default=1, ge=1)


class TlsIdentity(_Model):
    """A TLS identity and the CA that authenticates the other side (mutual TLS between clusters)."""

    cert_file: str
    key_file: str
    ca_file: str


class AgreementConfig(_Model):
    """What a nation agreed to serve for requests brokered by one peer (checked by the serving KAS)."""

    #: Nationalities of subjects that may be served; None = any.
    nations: list[str] | None = None
    #: Highest classification (NATO level) released through this peer; None = no cap.
    max_classification: str | None = None
    #: Communities of interest an object may require; None = any.
    cois: list[str] | None = None


class PeerConfig(_Model):
    """One peer nation in the KAS registry."""

    nation: str
    #: The peer's KAS URL (``http(s)://host:port/{nation}``): KAOs naming it are routed to it.
    url: str
    #: ``handle``: Serve deployment handle (in-cluster); ``https``: the peer's gateway (mutual TLS);
    #: ``local``: a service in this process (embedded coalition, tests; needs a transport given in code).
    transport: Literal["handle", "https", "local"] = "handle"
    #: Serve application of the peer (in-cluster transport); default: the nation in lower case.
    app_name: str | None = None
    #: The peer's federation gateway (HTTPS transport), e.g. ``https://127.0.0.1:9443``.
    gateway_url: str | None = None
    #: The peer's federation signing key (public JWK); or a file holding it (JSON JWK).
    signing_jwk: dict[str, str] | None = None
    signing_jwk_file: str | None = None
    agreement: AgreementConfig = Field(default_factory=AgreementConfig)

    @field_validator("nation")
    @classmethod
    def _upper(cls, nation: str) -> str:
        return nation.upper()

    @model_validator(mode="after")
    def _complete(self) -> PeerConfig:
        if self.transport == "https" and not self.gateway_url:
            raise ValueError(f"peer {self.nation}: the https transport needs gateway_url")
        if self.signing_jwk is None and self.signing_jwk_file is None:
            raise ValueError(f"peer {self.nation}: give signing_jwk or signing_jwk_file")
        return self


class FederationConfig(_Model):
    """The KAS registry of one nation and how it brokers to peers."""

    peers: list[PeerConfig] = Field(default_factory=list)
    #: This nation's federation signing key (PKCS#8 PEM); default ``<state_dir>/federation/<nation>.key.pem``.
    signing_key_file: str | None = None
    #: Our client identity toward HTTPS peers, and the gateway's server identity.
    tls: TlsIdentity | None = None
    #: Where this nation's federation gateway listens (HTTPS with mutual TLS); None = no gateway.
    gateway_host: str = "127.0.0.1"
    gateway_port: int | None = None
    mode: Literal["parallel", "sequential"] = "parallel"
    hop_limit: int = Field(default=3, ge=1, le=10)
    forward_ttl_seconds: float = Field(default=30.0, gt=0, le=300)
    peer_timeout_seconds: float = Field(default=5.0, gt=0)
    #: Overall budget of a brokered rewrap; propagated to peers in the signed envelope.
    deadline_seconds: float = Field(default=10.0, gt=0)
    #: anyOf with a local alternative: a forward whose splits this KAS can release itself starts only
    #: when a local decision on them is not a permit, or after this many seconds without one (a hedge
    #: against a slow HSM). A local permit on a cache hit takes milliseconds, so most forwards are never
    #: sent: a peer is asked only when it can change the answer. None = forward at once, as for allOf.
    local_first_seconds: float | None = Field(default=0.05, ge=0, le=10)
    #: In-cluster forwards that only this peer can answer (allOf splits) and that start within this
    #: many seconds of each other go to the peer in one Serve handle call: a handle hop costs ~3 ms of
    #: CPU whatever it carries. Each forward stays signed, verified, audited and answered on its own.
    #: None = one call per forward. anyOf forwards are never batched: they must stay cancellable.
    forward_batch_seconds: float | None = Field(default=0.025, ge=0, le=0.1)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    #: Testing and benchmarks only: delay this KAS adds before answering a forward.
    debug_delay_seconds: float = Field(default=0.0, ge=0, le=60)


# --- shared state (Redis) ---------------------------------------------------------------------------
class RedisConfig(_Model):
    """Where a nation's replicas share cache entries, replay nonces and rate-limit windows (docs/redis.md).

    Secrets are never values here (settings travel as Serve deployment arguments): the password and the
    cache sealing secret come from an environment variable or a file that only the nation's nodes hold.
    """

    #: ``redis://host:port/db`` or ``rediss://`` (TLS). No credentials in the URL.
    url: str
    #: ACL user (Redis 6+); None = the default user.
    username: str | None = None
    #: Name of the environment variable holding the password, or a file holding it (one of them, or none).
    password_env: str | None = None
    password_file: str | None = None
    #: TLS (``rediss://`` only): CA bundle that signs the server, and our client identity for mutual TLS.
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    connect_timeout_seconds: float = Field(default=0.5, gt=0, le=30)
    command_timeout_seconds: float = Field(default=0.5, gt=0, le=30)
    #: Connections per replica (a blocking pool: a request waits at most command_timeout for one).
    max_connections: int = Field(default=32, ge=1, le=1024)
    #: Every key is ``{key_prefix}{NATION}:...``; grant a nation's ACL user ``~{key_prefix}{NATION}:*``.
    key_prefix: str = Field(default="kas-ray:", max_length=64, pattern=r"^[A-Za-z0-9:_.\-]*$")
    #: After a failure, Redis is not tried again for this long (requests go on without it meanwhile).
    retry_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    #: Secret the cache sealing keys are derived from (HKDF): an env variable name or a file. Neither:
    #: dev profile generates ``<state_dir>/secrets/cache-seal-<nation>.key`` (0600); prod refuses to start.
    seal_secret_env: str | None = None
    seal_secret_file: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RedisConfig:
        scheme = self.url.split("://", 1)[0].lower() if "://" in self.url else ""
        if scheme not in ("redis", "rediss"):
            raise ValueError("redis.url must start with redis:// or rediss://")
        rest = self.url.split("://", 1)[1]
        if "@" in rest.split("/", 1)[0] or "password=" in rest.lower():
            raise ValueError("redis.url must not carry credentials: use username and password_env/password_file")
        if self.password_env and self.password_file:
            raise ValueError("give at most one of redis.password_env and redis.password_file")
        if self.seal_secret_env and self.seal_secret_file:
            raise ValueError("give at most one of redis.seal_secret_env and redis.seal_secret_file")
        if scheme != "rediss" and (self.tls_ca_file or self.tls_cert_file or self.tls_key_file):
            raise ValueError("redis TLS files need a rediss:// URL")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("give both redis.tls_cert_file and redis.tls_key_file, or neither")
        return self


class ReplayStoreConfig(_Model):
    """Where DPoP ``jti``s and forward nonces are remembered.

    ``auto``: Redis when ``redis`` is configured, else this replica's memory. ``on_redis_down``:
    ``strict`` (the default: a security control fails closed) answers 503 + Retry-After to requests that
    need the store while Redis is unreachable; ``local`` falls back to a per-replica store, so a proof
    could be replayed once per other replica during the outage.
    """

    backend: Literal["auto", "memory", "redis"] = "auto"
    on_redis_down: Literal["strict", "local"] = "strict"
    #: Bound of the in-memory store (and of the local fallback).
    max_entries: int = Field(default=100_000, ge=1)


class EndpointRateLimit(_Model):
    """Requests allowed per window for one endpoint class; None = not limited on that dimension."""

    per_subject: int | None = Field(default=None, ge=1)
    per_client: int | None = Field(default=None, ge=1)


class RateLimitConfig(_Model):
    """Sliding-window rate limits, shared through Redis when configured (else per replica, in memory).

    ``per_subject`` counts requests of one verified token subject (issuer + sub) and applies to rewraps;
    ``per_client`` counts requests of one client address. Over the limit: 429 with Retry-After.
    """

    #: On by default with generous limits (50 rewraps/s per subject, 500 requests/s per address, per
    #: endpoint class): they stop floods, not benchmarks. Tune them per deployment.
    enabled: bool = True
    window_seconds: float = Field(default=60.0, gt=0, le=86_400)
    rewrap: EndpointRateLimit = Field(default_factory=lambda: EndpointRateLimit(per_subject=3000, per_client=30000))
    public_key: EndpointRateLimit = Field(default_factory=lambda: EndpointRateLimit(per_client=30000))
    backend: Literal["auto", "memory", "redis"] = "auto"
    #: Proxies (IPs or CIDRs) whose X-Forwarded-For is believed; empty = the TCP peer is the client.
    trusted_proxies: list[str] = Field(default_factory=list)
    #: Identities tracked by the in-memory limiter (the longest idle are dropped beyond it).
    max_tracked: int = Field(default=100_000, ge=1)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, proxies: list[str]) -> list[str]:
        import ipaddress

        for proxy in proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"trusted proxy {proxy!r} is not an IP address or CIDR") from None
        return proxies


class NationSettings(_Model):
    """One nation's KAS deployment: everything its replicas and actors are built from."""

    nation: str = Field(min_length=2, max_length=10, pattern=r"^[A-Za-z]+$")
    #: The URL clients use for this KAS (``http://HOST:PORT/{nation}``); KAOs name it.
    public_url: str
    state_dir: str = ".kas-ray"
    profile: Profile = "dev"
    #: Trust registry file; without one, the dev identity providers of ``coalition`` (dev profile only).
    trust_registry: str | None = None
    coalition: list[str] = Field(default_factory=lambda: list(DEFAULT_NATIONS))
    abac_config: str | None = None
    key_backend: KeyBackendConfig = Field(default_factory=KeyBackendConfig)
    #: Audit file (hash-chained JSON lines); default ``<state_dir>/audit/<nation>.jsonl``.
    audit_path: str | None = None
    #: Rotate the audit file once it reaches this many bytes (None: only ``kas-ray audit rotate``).
    audit_max_bytes: int | None = Field(default=None, ge=4096)
    limits: RewrapLimits = Field(default_factory=RewrapLimits)
    #: Seconds a call to the HSM actor may take before the request fails with 503.
    hsm_timeout_seconds: float = Field(default=10.0, gt=0)
    #: Ray custom resources the HSM actor requires (pins it to this nation's nodes).
    hsm_resources: dict[str, float] = Field(default_factory=dict)
    #: KAS registry and brokering; None = the other ``coalition`` nations in this cluster (dev profile).
    federation: FederationConfig | None = None
    #: Shared state (docs/redis.md): None = every replica keeps its own (the embedded default).
    redis: RedisConfig | None = None
    replay: ReplayStoreConfig = Field(default_factory=ReplayStoreConfig)
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)

    @field_validator("nation")
    @classmethod
    def _upper_nation(cls, nation: str) -> str:
        return nation.upper()

    @model_validator(mode="after")
    def _redis_for_shared_state(self) -> NationSettings:
        if self.redis is None and "redis" in (self.replay.backend, self.rate_limit.backend):
            raise ValueError("replay/rate_limit backend redis needs the redis settings")
        return self

    def audit_file(self) -> Path:
        if self.audit_path:
            return Path(self.audit_path)
        return Path(self.state_dir) / "audit" / f"{self.nation.lower()}.jsonl"


# --- helpers ----------------------------------------------------------------------------------------
M = TypeVar("M", bound=BaseModel)


def load_yaml(path: str | os.PathLike[str], model: type[M]) -> M:
    """Read a YAML/JSON file into ``model``; errors become one clear :class:`ConfigError`."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    try:
        return model.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or ".kas-ray")

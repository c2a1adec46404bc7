"""Shared state on a real redis-server, in process: replicas are RewrapService instances of one nation.

Each "replica" is built from NationSettings the way a Serve replica is (build_shared_state), on one
key backend that counts unwraps (the nation's HSM). What these prove:

* sealing: Redis holds only AES-GCM ciphertext under keyed SHA-256 names; other nations' secrets,
  other names and tampered bytes do not open; TTLs per kind; invalidation by SCAN, never KEYS;
* the hit rate is shared: a key unwrapped through one replica is a hit through the other;
* after a workload (TDF decrypts with DPoP, replay and rate limits on) no key or value holds a share
  or DEK, raw, base64 or hex;
* Redis down: the cache fails open (every rewrap succeeds, counted as misses) and recovers; the replay
  store is strict (503 + Retry-After) or local (accepted once per replica, written back) as configured;
* a DPoP proof or a forward nonce used at one replica is refused at another;
* rate limits: per subject and per client address, shared by replicas, 429 with Retry-After over HTTP,
  X-Forwarded-For believed only from trusted proxies;
* ACL users per nation, password from the environment; configuration checks.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError
from starlette.requests import Request

from kas_ray.audit import AuditAction, MemoryAuditSink
from kas_ray.cache import CacheKind, MemoryCache, share_cache_key
from kas_ray.client import REWRAP_PATH
from kas_ray.config import (
    AbacConfig,
    EndpointRateLimit,
    FederationConfig,
    NationSettings,
    PeerConfig,
    RateLimitConfig,
    RedisConfig,
    ReplayStoreConfig,
)
from kas_ray.errors import ConfigError, ReplayError
from kas_ray.federation.broker import Federation
from kas_ray.federation.envelope import FederationKey, ForwardError, sign_forward
from kas_ray.hazmat import primitives as P
from kas_ray.kas.service import RewrapCall, RewrapService
from kas_ray.keys.base import Health, KeyBackend, KeyInfo
from kas_ray.keys.software import PASSPHRASE_ENV, PASSPHRASE_FILE_ENV, SoftwareKeystore
from kas_ray.policy import PolicyEngine, attribute_fqn
from kas_ray.serve.http import KasHttpApi
from kas_ray.shared import (
    CacheSealer,
    RateLimited,
    RateLimiter,
    RedisLink,
    RedisReplayStore,
    RedisShareCache,
    ReplayStoreUnavailable,
    SharedState,
    TwoTierShareCache,
    build_shared_state,
)
from kas_ray.shared.link import load_seal_secret, seal_secret_path
from kas_ray.shared.ratelimit import client_address
from kas_ray.trust import DevIdentityProvider, MemoryReplayStore, dev_trust_registry, make_dpop_proof, sign_request
from kas_ray.ztdf import KasKey, KeyAccessObject, Policy, decrypt, encrypt, wrap_share

NATION = "USA"
URL = "http://127.0.0.1:8000/usa"
CONFIG = AbacConfig()


# --- one nation, several replicas --------------------------------------------------------------------------
class CountingBackend(KeyBackend):
    """The nation's key backend (its "HSM"): counts every unwrap that reached it."""

    def __init__(self, inner: KeyBackend) -> None:
        self.inner = inner
        self.unwraps = 0

    async def keys(self) -> list[KeyInfo]:
        return await self.inner.keys()

    async def unwrap(self, kid: str, wrapped: bytes, ephemeral_public_key_pem: str | None = None) -> bytes:
        self.unwraps += 1
        return await self.inner.unwrap(kid, wrapped, ephemeral_public_key_pem)

    async def health(self) -> Health:
        return await self.inner.health()


@dataclass
class Nation:
    state: Path
    keys: CountingBackend
    kas_key: KasKey
    audit: MemoryAuditSink = field(default_factory=MemoryAuditSink)
    #: Every share and DEK handed out: Redis must never hold any of them.
    secrets: list[bytes] = field(default_factory=list)

    def settings(self, redis_url: str | None, **overrides: Any) -> NationSettings:
        # Generous timeouts: a loaded 2-core machine must not turn a slow answer into a miss here.
        redis_cfg = {"connect_timeout_seconds": 2.0, "command_timeout_seconds": 2.0, **overrides.pop("redis", {})}
        return NationSettings(nation=NATION, public_url=URL, state_dir=str(self.state),
                              redis=RedisConfig(url=redis_url, retry_interval_seconds=0.3, **redis_cfg)
                              if redis_url else None, **overrides)

    def replica(self, settings: NationSettings) -> Replica:
        shared = build_shared_state(settings)
        service = RewrapService(NATION, keys=self.keys, trust=dev_trust_registry(self.state, [NATION]),
                                policy=PolicyEngine(CONFIG), replay=shared.replay,
                                cache=shared.cache or MemoryCache(), audit=self.audit, public_urls=[URL],
                                rate_limiter=shared.rate_limiter)
        return Replica(service, shared)

    def token(self, sub: str | None = None) -> str:
        return DevIdentityProvider(self.state, NATION).mint(sub or unique("user"), "SECRET")

    def share(self) -> bytes:
        share = os.urandom(32)
        self.secrets.append(share)
        return share

    def kao(self, share: bytes | None = None) -> tuple[KeyAccessObject, str]:
        pol = Policy.create([attribute_fqn(CONFIG, "classification", "SECRET"),
                             attribute_fqn(CONFIG, "releasable-to", NATION)]).to_base64()
        return wrap_share(self.kas_key, share or self.share(), pol), pol


@dataclass
class Replica:
    service: RewrapService
    shared: SharedState

    @property
    def cache(self) -> TwoTierShareCache:
        assert isinstance(self.service.cache, TwoTierShareCache)
        return self.service.cache


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def nation(tmp_path_factory: pytest.TempPathFactory) -> Nation:
    state = tmp_path_factory.mktemp("redis-nation")
    with pytest.MonkeyPatch.context() as mp:  # dev profile: the keystore passphrase is generated
        mp.delenv(PASSPHRASE_ENV, raising=False)
        mp.delenv(PASSPHRASE_FILE_ENV, raising=False)
        keystore = SoftwareKeystore(state, NATION)
    info = asyncio.run(keystore.key_info(None, "rsa:2048"))
    kas_key = KasKey(url=URL, public_key_pem=info.public_key_pem, kid=info.kid, algorithm="rsa:2048",
                     oaep_hash=info.oaep_hash or "sha1")
    return Nation(state=state, keys=CountingBackend(keystore), kas_key=kas_key)


@pytest.fixture()
def runner() -> Iterator[asyncio.Runner]:
    """One event loop per test (replicas' Redis clients live on it)."""
    with asyncio.Runner() as run:
        yield run


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class Client:
    """One client: its rewrap key, its DPoP key, its token."""

    token: str
    key: ec.EllipticCurvePrivateKey = field(default_factory=new_ec_key)
    dpop_key: ec.EllipticCurvePrivateKey = field(default_factory=new_ec_key)

    def proof(self) -> str:
        return make_dpop_proof(self.dpop_key, "POST", URL + REWRAP_PATH, access_token=self.token)

    def call(self, kao: KeyAccessObject, pol: str, *, dpop: bool | str = False) -> RewrapCall:
        body = {"clientPublicKey": P.public_key_pem(self.key.public_key()),
                "requests": [{"policy": {"id": "p", "body": pol}, "algorithm": "rsa:2048",
                              "keyAccessObjects": [{"keyAccessObjectId": "k0", "keyAccessObject": kao.to_wire()}]}]}
        proof = dpop if isinstance(dpop, str) else (self.proof() if dpop else None)
        if proof is not None:  # with a proof, the body is signed by its key
            body = {"signedRequestToken": sign_request(body, self.dpop_key)}
        return RewrapCall(authorization=f"Bearer {self.token}", dpop=proof, url=URL + REWRAP_PATH, body=body)

    async def rewrap(self, replica: Replica, kao: KeyAccessObject, pol: str, *, dpop: bool | str = False) -> bytes:
        """The share, or AssertionError if the KAO was not released."""
        response = await replica.service.rewrap(self.call(kao, pol, dpop=dpop))
        (result,) = response.responses[0].results
        assert result.status == "permit", result
        assert response.session_public_key and result.kas_wrapped_key
        session = P.load_public_key_pem(response.session_public_key)
        assert isinstance(session, ec.EllipticCurvePublicKey)
        return P.ec_unwrap(self.key, session, base64.b64decode(result.kas_wrapped_key))


def flush(server: Any) -> None:
    redis.Redis(port=server.port).flushall()


# === sealing, names, TTLs, invalidation ==========================================================================
def test_entries_are_sealed_under_digest_names_with_ttls(redis_server: Any, runner: asyncio.Runner) -> None:
    config = RedisConfig(url=redis_server.url)
    secret = os.urandom(32)
    raw = redis.Redis(port=redis_server.port)
    share = os.urandom(32)
    key = share_cache_key(NATION, "usa-r2048-1", "1", os.urandom(256), None)

    async def scenario() -> None:
        usa = RedisShareCache(RedisLink(config, NATION), CacheSealer(secret, NATION))
        await usa.aput(key, share, CacheKind.SHARE)
        await usa.aput("public_key:usa", [{"kid": "k1"}], CacheKind.PUBLIC_KEY)
        name = usa.name(key)
        assert name.startswith("kas-ray:USA:share:") and len(name.rsplit(":", 1)[1]) == 64
        assert key.split(":", 1)[1] not in name  # keyed digest: the logical key is not visible either
        assert await usa.aget(key) == share and await usa.aget("public_key:usa") == [{"kid": "k1"}]
        blob = raw.get(name)
        assert blob is not None and share not in blob and blob[:1] == b"\x01" and len(blob) == 1 + 12 + 1 + 32 + 16
        assert 55_000 < raw.pttl(name) <= 60_000
        assert 3_590_000 < raw.pttl(usa.name("public_key:usa")) <= 3_600_000
        # Another nation, or this nation under another secret, reads nothing; a moved or altered entry is a miss.
        fra = RedisShareCache(RedisLink(config, "FRA"), CacheSealer(secret, "FRA"))
        assert await fra.aget(key) is None and fra.snapshot().unsealable == 0
        rogue = RedisShareCache(RedisLink(config, NATION), CacheSealer(os.urandom(32), NATION))
        raw.set(rogue.name(key), blob)
        assert await rogue.aget(key) is None and rogue.snapshot().unsealable == 1
        other_key = share_cache_key(NATION, "usa-r2048-1", "1", os.urandom(256), None)
        raw.set(usa.name(other_key), blob)
        assert await usa.aget(other_key) is None
        raw.set(name, blob[:-1] + bytes([blob[-1] ^ 1]))
        assert await usa.aget(key) is None
        stats = usa.snapshot()
        assert (stats.hits, stats.misses, stats.unsealable, stats.errors) == (2, 2, 2, 0)
        assert stats.hit_rate == 0.5

    runner.run(scenario())


def test_invalidation_scans_by_prefix_never_keys(redis_server: Any, runner: asyncio.Runner) -> None:
    config = RedisConfig(url=redis_server.url, key_prefix="inv-test:")
    raw = redis.Redis(port=redis_server.port)
    raw.config_resetstat()

    async def scenario() -> None:
        usa = RedisShareCache(RedisLink(config, NATION), CacheSealer(os.urandom(32), NATION))
        fra = RedisShareCache(RedisLink(config, "FRA"), CacheSealer(os.urandom(32), "FRA"))
        for i in range(1200):
            await usa.aput(f"share:{i}", os.urandom(32), CacheKind.SHARE)
        for i in range(30):
            await usa.aput(f"public_key:{i}", [i], CacheKind.PUBLIC_KEY)
            await fra.aput(f"share:{i}", os.urandom(32), CacheKind.SHARE)
        assert await usa.ainvalidate(CacheKind.SHARE, batch=100) == 1200
        assert await usa.aget("share:1") is None and await usa.aget("public_key:1") == [1]
        assert await usa.ainvalidate() == 30
        assert await fra.aget("share:3") is not None

    runner.run(scenario())
    assert sum(1 for _ in raw.scan_iter("inv-test:USA:*")) == 0
    assert sum(1 for _ in raw.scan_iter("inv-test:FRA:*")) == 30
    commands = raw.info("commandstats")
    assert "cmdstat_scan" in commands and "cmdstat_keys" not in commands


# === hit rate shared between replicas ===============================================================================
def test_hit_rate_is_shared_between_replicas(nation: Nation, redis_server: Any, runner: asyncio.Runner) -> None:
    """Three rounds over 40 keys, alternating replicas: with Redis each key costs one unwrap in total."""
    kaos = [nation.kao() for _ in range(40)]
    client = Client(nation.token())

    async def workload(replicas: list[Replica]) -> tuple[int, float]:
        before = nation.keys.unwraps
        hits = misses = 0
        for round_ in range(3):
            for i, (kao, pol) in enumerate(kaos):
                await client.rewrap(replicas[(i + round_) % 2], kao, pol)
        for replica in replicas:
            stats = replica.service.cache.snapshot()
            hits, misses = hits + stats.hits, misses + stats.misses
        return nation.keys.unwraps - before, hits / (hits + misses)

    settings = nation.settings(redis_server.url)
    shared = [nation.replica(settings), nation.replica(settings)]
    unwraps, hit_rate = runner.run(workload(shared))
    assert unwraps == len(kaos)  # one replica unwrapped, the other hit Redis
    assert hit_rate == pytest.approx(2 / 3)
    assert sum(r.cache.snapshot().shared_hits for r in shared) == len(kaos)  # round 2: the other replica

    alone = [nation.replica(nation.settings(None)), nation.replica(nation.settings(None))]
    unwraps_alone, hit_rate_alone = runner.run(workload(alone))
    assert unwraps_alone == 2 * len(kaos)
    assert hit_rate_alone == pytest.approx(1 / 3)
    print(f"\nhit rate, 2 replicas, 40 keys x 3 rounds: shared (Redis) {hit_rate:.3f}, "
          f"per-replica only {hit_rate_alone:.3f}")


# === no plaintext in Redis ===========================================================================================
def _forms(secret: bytes) -> set[bytes]:
    forms = {secret, secret.hex().encode(), secret.hex().upper().encode()}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        forms |= {encode(secret), encode(secret).rstrip(b"=")}
    return forms


def dump_redis(port: int) -> list[tuple[bytes, bytes]]:
    """Every key of every database and its value (strings, sorted sets; anything else DUMPed)."""
    out = []
    for db in range(16):
        raw = redis.Redis(port=port, db=db)
        for name in raw.scan_iter(count=500):
            kind = raw.type(name)
            if kind == b"string":
                value = raw.get(name) or b""
            elif kind == b"zset":
                value = b" ".join(m + str(s).encode() for m, s in raw.zrange(name, 0, -1, withscores=True))
            else:
                value = raw.dump(name) or b""
            out.append((name, value))
    return out


def assert_no_secret(port: int, secrets: list[bytes]) -> int:
    entries = dump_redis(port)
    needles = set().union(*(_forms(s) for s in secrets))
    leaks = [name for name, value in entries for n in needles if n in name or n in value]
    assert not leaks, f"{len(leaks)} Redis entries hold a share or DEK"
    return len(entries)


def test_redis_holds_no_plaintext_key(nation: Nation, redis_server: Any, runner: asyncio.Runner) -> None:
    """Real TDFs (two splits, so the DEK is never a share) decrypted through two replicas with DPoP."""
    settings = nation.settings(redis_server.url, rate_limit=RateLimitConfig(
        rewrap=EndpointRateLimit(per_subject=1000, per_client=1000)))
    replicas = [nation.replica(settings), nation.replica(settings)]
    client = Client(nation.token())
    pol = Policy.create([attribute_fqn(CONFIG, "classification", "SECRET"),
                         attribute_fqn(CONFIG, "releasable-to", NATION)])
    turn = iter(range(10_000))

    def unwrap(kao: KeyAccessObject, policy_b64: str) -> bytes:
        share = runner.run(client.rewrap(replicas[next(turn) // 2 % 2], kao, policy_b64, dpop=True))
        nation.secrets.append(share)
        return share

    for i in range(12):
        data = f"object {i}".encode() * 10
        tdf = io.BytesIO()
        encrypt(io.BytesIO(data), tdf, splits=[[nation.kas_key], [nation.kas_key]], policy=pol)
        for _ in range(2):  # the second decrypt is served from the cache (local or Redis)
            out = io.BytesIO()
            before = len(nation.secrets)
            decrypt(io.BytesIO(tdf.getvalue()), out, unwrap)
            assert out.getvalue() == data
            nation.secrets.append(P.xor_bytes(*nation.secrets[before:before + 2]))
    assert sum(r.cache.snapshot().shared_hits for r in replicas) > 0
    assert sum(r.shared.replay.counters["accepted"] for r in replicas) == 48  # type: ignore[attr-defined]
    count = assert_no_secret(redis_server.port, nation.secrets)
    assert count >= 24 + 48  # cache entries and replay keys at least
    print(f"\nscanned {count} Redis entries against {len(nation.secrets)} shares and DEKs: no plaintext")


# === Redis down ======================================================================================================
def test_cache_fails_open_and_recovers(nation: Nation, redis_factory: Callable[..., Any],
                                       runner: asyncio.Runner) -> None:
    server = redis_factory()
    settings = nation.settings(server.url)
    a, b = nation.replica(settings), nation.replica(settings)
    client = Client(nation.token())

    async def load(keys: int) -> int:
        """Concurrent bearer rewraps of fresh keys, each through both replicas; every one must succeed."""
        kaos = [nation.kao() for _ in range(keys)]
        calls = [client.rewrap((a, b)[i % 2], *kaos[i // 2]) for i in range(2 * keys)]
        return len(await asyncio.gather(*calls))

    async def scenario() -> None:
        assert await load(12) == 24
        killer = asyncio.get_running_loop().run_in_executor(None, server.stop, signal.SIGKILL)
        assert await load(30) == 60  # while Redis dies
        await killer
        assert await load(12) == 24  # while it is down
        stats = a.cache.snapshot()
        assert not stats.redis_available and stats.errors > 0
        server.start()
        await asyncio.sleep(0.4)  # retry_interval 0.3 s: the next call tries Redis again
        kao, pol = nation.kao()
        await client.rewrap(a, kao, pol)
        shared_before = b.cache.snapshot().shared_hits
        await client.rewrap(b, kao, pol)  # unwrapped through a after Redis came back: a hit through b
        assert b.cache.snapshot().shared_hits == shared_before + 1
        assert a.cache.snapshot().redis_available and a.shared.link and a.shared.link.counters["recoveries"] >= 1

    runner.run(scenario())


def test_pooled_connections_are_replaced_after_redis_restarts(redis_factory: Callable[..., Any],
                                                              runner: asyncio.Runner) -> None:
    """A restart breaks every pooled connection of a replica's client: each is checked and replaced before
    use, so once Redis is back no command fails. (Under RESP3, redis-py 8 skipped that check: each dead
    connection failed one command and marked Redis down, so a DPoP request got a 503 in strict mode
    seconds after the restart; found by perf/faults.py.)"""
    server = redis_factory()
    link = RedisLink(RedisConfig(url=server.url, retry_interval_seconds=0.1), NATION)

    async def burst(n: int) -> list[Any]:  # n commands at once: n pooled connections
        return await asyncio.gather(*(link.run("test", lambda r, i=i: r.set(f"{link.prefix}t{i}", b"1", px=60_000))
                                      for i in range(n)), return_exceptions=True)

    async def scenario() -> None:
        assert await burst(8) == [True] * 8
        server.stop(signal.SIGKILL)
        server.start()
        await asyncio.sleep(0.3)  # the replica's loop sees each connection closed
        failures = link.counters["failures"]
        assert await burst(16) == [True] * 16
        assert await burst(16) == [True] * 16
        assert link.counters["failures"] == failures
        await link.aclose()

    runner.run(scenario())


def test_replay_strict_refuses_dpop_while_redis_is_down(nation: Nation, redis_factory: Callable[..., Any],
                                                        runner: asyncio.Runner) -> None:
    server = redis_factory()
    replica = nation.replica(nation.settings(server.url))
    assert isinstance(replica.shared.replay, RedisReplayStore) and replica.shared.replay.on_redis_down == "strict"
    client = Client(nation.token())
    kao, pol = nation.kao()

    async def scenario() -> None:
        await client.rewrap(replica, kao, pol, dpop=True)
        server.stop()
        with pytest.raises(ReplayStoreUnavailable) as caught:
            await client.rewrap(replica, kao, pol, dpop=True)
        assert caught.value.http_status == 503 and caught.value.retry_after >= 0.3
        await client.rewrap(replica, kao, pol)  # no DPoP: no replay check, the cache path fails open
        response = KasHttpApi(replica.service).guarded(_raise, caught.value)
        answer = await response
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert json.loads(bytes(answer.body))["error"] == "replay_store_unavailable"
        server.start()
        await asyncio.sleep(0.4)
        await client.rewrap(replica, kao, pol, dpop=True)

    runner.run(scenario())
    rejected = [e for e in nation.audit.events if e.error_code == "replay_store_unavailable"]
    assert rejected and rejected[-1].action is AuditAction.REQUEST_REJECTED


async def _raise(exc: Exception) -> Any:
    raise exc


def test_replay_local_accepts_once_per_replica_then_writes_back(nation: Nation, redis_factory: Callable[..., Any],
                                                                 runner: asyncio.Runner) -> None:
    server = redis_factory()
    settings = nation.settings(server.url, replay=ReplayStoreConfig(on_redis_down="local"))
    a, b = nation.replica(settings), nation.replica(settings)
    client = Client(nation.token())
    kao, pol = nation.kao()

    async def scenario() -> None:
        before = client.proof()
        await client.rewrap(a, kao, pol, dpop=before)  # accepted through Redis, mirrored locally
        server.stop()
        with pytest.raises(ReplayError):
            await client.rewrap(a, kao, pol, dpop=before)  # a still remembers it
        proof = client.proof()
        await client.rewrap(a, kao, pol, dpop=proof)
        with pytest.raises(ReplayError):
            await client.rewrap(a, kao, pol, dpop=proof)
        await client.rewrap(b, kao, pol, dpop=proof)  # the outage cost: once more at the other replica
        with pytest.raises(ReplayError):
            await client.rewrap(b, kao, pol, dpop=proof)
        server.start()
        await asyncio.sleep(0.4)
        await client.rewrap(a, kao, pol, dpop=True)  # Redis answers: a writes back what it accepted
        fresh = nation.replica(settings)  # a replica that never saw the proof
        with pytest.raises(ReplayError):
            await client.rewrap(fresh, kao, pol, dpop=proof)

    runner.run(scenario())
    assert isinstance(a.shared.replay, RedisReplayStore) and a.shared.replay.counters["written_back"] >= 1


# === replay across replicas ==========================================================================================
def test_same_dpop_proof_at_two_replicas_is_accepted_once(nation: Nation, redis_server: Any,
                                                          runner: asyncio.Runner) -> None:
    settings = nation.settings(redis_server.url)
    a, b = nation.replica(settings), nation.replica(settings)
    client = Client(nation.token())
    kao, pol = nation.kao()
    proof = client.proof()

    async def scenario() -> list[str]:
        outcomes = []
        for replica in (a, b, a, b):
            try:
                await client.rewrap(replica, kao, pol, dpop=proof)
                outcomes.append("accepted")
            except ReplayError:
                outcomes.append("replay")
        return outcomes

    assert runner.run(scenario()) == ["accepted", "replay", "replay", "replay"]


def test_forward_nonce_is_refused_at_another_replica(nation: Nation, redis_server: Any, tmp_path: Path,
                                                    runner: asyncio.Runner) -> None:
    fra = FederationKey(tmp_path / "fra.pem", "FRA")
    usa = FederationKey(tmp_path / "usa.pem", "USA")
    config = FederationConfig(peers=[PeerConfig(nation="FRA", url="http://127.0.0.1:8000/fra",
                                                signing_jwk=fra.public_jwk)])
    settings = nation.settings(redis_server.url)

    def replica_federation(replay: Any) -> Federation:
        return Federation("USA", config, usa, replay=replay)

    async def scenario() -> None:
        a = replica_federation(build_shared_state(settings).replay)
        b = replica_federation(build_shared_state(settings).replay)
        message = sign_forward(fra, "USA", json.dumps({"x": 1}), hops=[], ttl=30, deadline=time.time() + 10)
        await a.verify_inbound(message)
        with pytest.raises(ForwardError, match="replay"):
            await b.verify_inbound(message)
        memory = replica_federation(MemoryReplayStore())  # the in-memory (sync) store works the same way
        fresh = sign_forward(fra, "USA", json.dumps({"x": 2}), hops=[], ttl=30, deadline=time.time() + 10)
        await memory.verify_inbound(fresh)
        with pytest.raises(ForwardError, match="replay"):
            await memory.verify_inbound(fresh)

    runner.run(scenario())


# === rate limits ======================================================================================================
def test_rate_limit_per_subject_shared_by_replicas(nation: Nation, redis_server: Any, runner: asyncio.Runner) -> None:
    limits = RateLimitConfig(window_seconds=2, rewrap=EndpointRateLimit(per_subject=4))
    settings = nation.settings(redis_server.url, rate_limit=limits)
    a, b = nation.replica(settings), nation.replica(settings)
    greedy, other = Client(nation.token()), Client(nation.token())
    kao, pol = nation.kao()

    async def burst(client: Client, n: int) -> tuple[int, list[float]]:
        ok, waits = 0, []
        for i in range(n):
            try:
                await client.rewrap((a, b)[i % 2], kao, pol)
                ok += 1
            except RateLimited as exc:
                waits.append(exc.retry_after)
        return ok, waits

    async def scenario() -> None:
        ok, waits = await burst(greedy, 10)
        assert ok == 4 and len(waits) == 6 and all(0 < w <= 2 for w in waits)  # 4 across both replicas
        assert (await burst(other, 4))[0] == 4  # another subject is unaffected
        await asyncio.sleep(max(waits) + 0.05)
        assert (await burst(greedy, 1))[0] == 1  # the window slid

    runner.run(scenario())
    limited = [e for e in nation.audit.events if e.error_code == "rate_limited"]
    assert len(limited) >= 6 and all(e.action is AuditAction.REQUEST_REJECTED for e in limited)

    # Without Redis each replica counts on its own.
    memory = nation.settings(None, rate_limit=limits)
    c, d = nation.replica(memory), nation.replica(memory)
    a, b = c, d
    assert runner.run(burst(Client(nation.token()), 10))[0] == 8


def _request(path: str, client: tuple[str, int], headers: dict[str, str] | None = None, body: bytes = b"",
             method: str = "GET") -> Request:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "root_path": "", "scheme": "http",
             "query_string": b"algorithm=rsa:2048", "server": ("127.0.0.1", 8000), "client": client,
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    return Request(scope, receive)


def test_http_429_per_client_address_with_retry_after(nation: Nation, redis_server: Any,
                                                      runner: asyncio.Runner) -> None:
    limits = RateLimitConfig(window_seconds=30, public_key=EndpointRateLimit(per_client=3),
                             rewrap=EndpointRateLimit(per_subject=2, per_client=100), trusted_proxies=["10.0.0.0/8"])
    replica = nation.replica(nation.settings(redis_server.url, rate_limit=limits))
    api = KasHttpApi(replica.service)
    proxy = ("10.1.2.3", 5555)

    async def public_key(client: tuple[str, int], forwarded: str | None = None) -> Any:
        headers = {"X-Forwarded-For": forwarded} if forwarded else {}
        return await api.guarded(api.rest_public_key, _request("/kas/v2/kas_public_key", client, headers), True)

    async def scenario() -> None:
        answers = [await public_key(proxy, "203.0.113.7") for _ in range(5)]
        assert [r.status_code for r in answers] == [200, 200, 200, 429, 429]
        body = json.loads(bytes(answers[3].body))
        assert body["code"] == "resource_exhausted" and body["error"] == "rate_limited"
        assert 1 <= int(answers[3].headers["retry-after"]) <= 30
        assert (await public_key(proxy, "203.0.113.8")).status_code == 200  # another client behind the proxy
        # An untrusted peer's X-Forwarded-For is ignored: the peer itself is counted.
        spoofer = ("198.51.100.9", 1)
        codes = [(await public_key(spoofer, f"192.0.2.{i}")).status_code for i in range(4)]
        assert codes == [200, 200, 200, 429]
        # Rewraps: per subject (the verified token), through the HTTP route.
        client = Client(nation.token())
        kao, pol = nation.kao()
        raw = json.dumps(client.call(kao, pol).body).encode()
        headers = {"Authorization": f"Bearer {client.token}", "Content-Type": "application/json"}
        codes = []
        for _ in range(3):
            answer = await api.guarded(api.rest_rewrap, _request("/kas/v2/rewrap", proxy, headers, raw, "POST"))
            codes.append(answer.status_code)
        assert codes == [200, 200, 429] and "retry-after" in answer.headers

    runner.run(scenario())


def test_client_address_trusts_forwarded_for_only_from_proxies() -> None:
    import ipaddress

    trusted = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.1.1/32")]

    def scope(peer: str, *xff: str) -> dict[str, Any]:
        return {"client": (peer, 1), "headers": [(b"x-forwarded-for", v.encode()) for v in xff]}

    assert client_address(scope("203.0.113.1", "1.2.3.4"), trusted) == "203.0.113.1"
    assert client_address(scope("10.0.0.2", "1.2.3.4"), trusted) == "1.2.3.4"
    assert client_address(scope("10.0.0.2", "6.6.6.6, 1.2.3.4, 192.168.1.1"), trusted) == "1.2.3.4"
    assert client_address(scope("10.0.0.2", "6.6.6.6", "1.2.3.4"), trusted) == "1.2.3.4"
    assert client_address(scope("10.0.0.2", "not-an-ip, 10.0.0.9"), trusted) == "10.0.0.9"
    assert client_address(scope("10.0.0.2"), trusted) == "10.0.0.2"
    assert client_address(scope("10.0.0.2", "1.2.3.4"), []) == "10.0.0.2"
    assert client_address({"headers": []}, trusted) is None


# === ACL, password, configuration ================================================================================
#: The command list of docs/redis.md (one ACL user per nation, its own key prefix only).
ACL_COMMANDS = ("-@all +ping +client|setname +get +set +unlink +scan +eval +evalsha "
                "+time +zadd +zcard +zrange +zremrangebyscore +pexpire")
DOC_ACL = "user default off\n" + "".join(
    f"user kas-{n} on >{{{n}}} resetkeys ~kas-ray:{n.upper()}:* resetchannels {ACL_COMMANDS}\n" for n in ("usa", "fra"))


def test_acl_user_per_nation_with_password_from_env_or_file(redis_factory: Callable[..., Any], tmp_path: Path,
                                                            runner: asyncio.Runner,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The ACL of docs/redis.md: each nation's user reaches its own prefix only."""
    passwords = {"usa": os.urandom(16).hex(), "fra": os.urandom(16).hex()}
    acl = tmp_path / "users.acl"
    acl.write_text(DOC_ACL.format(**passwords))
    server = redis_factory("--aclfile", str(acl))
    monkeypatch.setenv("TEST_REDIS_PW_USA", passwords["usa"])
    fra_file = tmp_path / "fra.pw"
    fra_file.write_text(passwords["fra"] + "\n")
    usa_cfg = RedisConfig(url=server.url, username="kas-usa", password_env="TEST_REDIS_PW_USA")
    fra_cfg = RedisConfig(url=server.url, username="kas-fra", password_file=str(fra_file))
    limits = RateLimitConfig(window_seconds=5, rewrap=EndpointRateLimit(per_subject=1))

    async def scenario() -> None:
        secret = os.urandom(32)
        usa = RedisShareCache(RedisLink(usa_cfg, "USA"), CacheSealer(secret, "USA"))
        await usa.aput("share:1", b"s" * 32, CacheKind.SHARE)
        assert await usa.aget("share:1") == b"s" * 32
        assert await RedisReplayStore(usa.link).acheck_and_store("dpop:x", 5)
        limiter = RateLimiter(limits, "USA", usa.link)
        await limiter.check_subject("rewrap", "iss", "sub")
        with pytest.raises(RateLimited):
            await limiter.check_subject("rewrap", "iss", "sub")
        assert limiter.counters["local_fallback"] == 0  # the script ran in Redis
        assert await usa.ainvalidate() >= 1
        # FRA's credentials under USA's prefix: refused by the ACL, a miss (not an outage).
        usa_as_fra = RedisShareCache(RedisLink(fra_cfg, "USA"), CacheSealer(secret, "USA"))
        await usa.aput("share:2", b"t" * 32, CacheKind.SHARE)
        assert await usa_as_fra.aget("share:2") is None
        assert usa_as_fra.snapshot().errors == 1 and usa_as_fra.link.counters["refused"] == 1
        assert not usa_as_fra.link.is_down()
        fra = RedisShareCache(RedisLink(fra_cfg, "FRA"), CacheSealer(secret, "FRA"))
        await fra.aput("share:1", b"f" * 32, CacheKind.SHARE)
        assert await fra.aget("share:1") == b"f" * 32
        wrong = RedisShareCache(RedisLink(usa_cfg.model_copy(update={"password_env": None}), "USA"),
                                CacheSealer(secret, "USA"))
        assert await wrong.aget("share:2") is None and wrong.link.is_down()  # no AUTH: unreachable for us

    runner.run(scenario())


def test_config_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("127.0.0.1:6379", "http://x", "redis://user:pw@host:6379/0", "redis://host:6379/0?password=pw",
                "rediss://host/0?Password=pw"):
        with pytest.raises(ValidationError):
            RedisConfig(url=bad)
    with pytest.raises(ValidationError, match="rediss"):
        RedisConfig(url="redis://h:6379", tls_ca_file="ca.pem")
    with pytest.raises(ValidationError, match="at most one"):
        RedisConfig(url="redis://h", password_env="A", password_file="b")
    RedisConfig(url="rediss://h:6380/0", tls_ca_file="ca.pem", tls_cert_file="c.pem", tls_key_file="k.pem")
    with pytest.raises(ValidationError, match="needs the redis settings"):
        NationSettings(nation="USA", public_url=URL, replay=ReplayStoreConfig(backend="redis"))
    with pytest.raises(ValidationError, match="CIDR"):
        RateLimitConfig(trusted_proxies=["proxy.example"])
    assert ReplayStoreConfig().on_redis_down == "strict"  # the documented default: fail closed

    config = RedisConfig(url="redis://127.0.0.1:1/0")
    with pytest.raises(ConfigError, match="prod"):
        load_seal_secret(config, "USA", tmp_path, "prod")
    secret = load_seal_secret(config, "USA", tmp_path, "dev")
    path = seal_secret_path(tmp_path, "USA")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(secret) == 64
    assert load_seal_secret(config, "USA", tmp_path, "dev") == secret  # generated once
    assert load_seal_secret(config, "FRA", tmp_path, "dev") != secret  # per nation
    monkeypatch.setenv("TEST_SEAL", "short")
    with pytest.raises(ConfigError, match="at least"):
        load_seal_secret(config.model_copy(update={"seal_secret_env": "TEST_SEAL"}), "USA", tmp_path, "prod")
    monkeypatch.setenv("TEST_SEAL", "x" * 40)
    assert load_seal_secret(config.model_copy(update={"seal_secret_env": "TEST_SEAL"}), "USA", tmp_path,
                            "prod") == b"x" * 40
    with pytest.raises(ConfigError, match="not set"):
        RedisLink(config.model_copy(update={"password_env": "TEST_UNSET_PASSWORD"}), "USA")
    # The embedded default: no Redis, in-memory replay store and rate limits, the cache actor tier.
    shared = build_shared_state(NationSettings(nation="USA", public_url=URL, state_dir=str(tmp_path)))
    assert shared.link is None and shared.cache is None and isinstance(shared.replay, MemoryReplayStore)
    assert shared.rate_limiter is not None and shared.rate_limiter.link is None


def test_tls_with_client_certificate(redis_factory: Callable[..., Any], tmp_path: Path,
                                     runner: asyncio.Runner) -> None:
    """rediss:// with the server verified against our CA and a client certificate (mutual TLS)."""
    from kas_ray.federation.tls import issue_cert, make_ca

    ca = make_ca(tmp_path / "ca")
    server_id = issue_cert(ca, tmp_path / "server", "REDIS", usage="server")
    client_id = issue_cert(ca, tmp_path / "client", "USA", usage="client")
    other_ca = make_ca(tmp_path / "other", stem="other-ca")
    server = redis_factory("--port", "0", "--tls-port", "{port}", "--tls-cert-file", server_id.cert_file,
                           "--tls-key-file", server_id.key_file, "--tls-ca-cert-file", ca.cert_file,
                           "--tls-auth-clients", "yes")
    url = f"rediss://127.0.0.1:{server.port}/0"
    good = RedisConfig(url=url, tls_ca_file=ca.cert_file, tls_cert_file=client_id.cert_file,
                       tls_key_file=client_id.key_file)

    async def scenario() -> None:
        cache = RedisShareCache(RedisLink(good, NATION), CacheSealer(os.urandom(32), NATION))
        await cache.aput("share:tls", b"k" * 32, CacheKind.SHARE)
        assert await cache.aget("share:tls") == b"k" * 32 and cache.snapshot().errors == 0
        for bad in (good.model_copy(update={"tls_cert_file": None, "tls_key_file": None}),  # no client cert
                    good.model_copy(update={"tls_ca_file": other_ca.cert_file})):  # server not trusted
            refused = RedisShareCache(RedisLink(bad, NATION), CacheSealer(os.urandom(32), NATION))
            assert await refused.aget("share:tls") is None
            assert refused.snapshot().errors == 1 and refused.link.is_down()

    runner.run(scenario())


def test_replay_local_pending_write_backs_stay_bounded_through_a_long_outage(runner: asyncio.Runner) -> None:
    """``local`` mode remembers what it accepted while Redis was down, to write it back later: bounded like
    the local store, keeping the names that stay replayable longest."""
    link = RedisLink(RedisConfig(url="redis://127.0.0.1:1/0", retry_interval_seconds=60), NATION)  # refused
    store = RedisReplayStore(link, on_redis_down="local", max_local_entries=100)

    async def outage() -> None:
        for i in range(1000):
            assert await store.acheck_and_store(f"jti-{i}", 30 + i / 100)

    runner.run(outage())
    assert len(store._pending) <= 100 and store.counters["pending_dropped"] >= 900
    assert store.counters["local_accepted"] == 1000
    latest = {store.name(f"jti-{i}") for i in range(990, 1000)}
    assert latest <= set(store._pending)  # the longest-lived are kept

"""Shared state on Ray Serve: nation MIKE with two replicas and its own redis-server, over HTTP.

MIKE is deployed next to the session's USA/FRA/GBR (``kas_cluster``), alone in its coalition, with
``num_replicas=2``, Redis settings and a low per-subject rewrap limit (5 per 30 s; every test mints
fresh subjects unless it tests that limit). Replicas are told apart by ``/stats`` (replica id and
counters), polled until both answered. What this proves, end to end:

* a key unwrapped through one replica is a hit (from Redis) through the other: one HSM unwrap in all;
* the same DPoP proof sent to both replicas is accepted once;
* a burst over the subject limit gets 429 + Retry-After, counted across both replicas; others pass;
* Redis killed during a load of rewraps: zero 5xx, every KAO released (misses); DPoP requests get
  503 + Retry-After while it is down (strict, the default); after it returns the hit rate recovers;
* after the workload no Redis key or value holds a share or DEK (raw, base64, hex).
"""

from __future__ import annotations

import base64
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from kas_ray.client import HttpTransport, KasClient
from kas_ray.config import AbacConfig
from kas_ray.hazmat import primitives as P
from kas_ray.policy import attribute_fqn
from kas_ray.trust import DevIdentityProvider, make_dpop_proof, sign_request
from kas_ray.ztdf import KasKey, KeyAccessObject, Policy, wrap_share

MIKE = "MIKE"
SUBJECT_LIMIT = 5
WINDOW = 30
REWRAP = "/kas/v2/rewrap"
CONFIG = AbacConfig()


@dataclass
class Mike:
    url: str
    state: Path
    redis: Any  # conftest.RedisServer
    http: httpx.Client
    kas_key: KasKey
    #: Every share (= DEK: one split) handed out: Redis must hold none of them.
    secrets: list[bytes] = field(default_factory=list)

    def token(self) -> str:
        return DevIdentityProvider(self.state, MIKE).mint(f"mike-{uuid.uuid4().hex[:10]}", "SECRET")

    def kao(self) -> tuple[KeyAccessObject, str]:
        share = P.random_key()
        self.secrets.append(share)
        pol = Policy.create([attribute_fqn(CONFIG, "classification", "SECRET"),
                             attribute_fqn(CONFIG, "releasable-to", MIKE)]).to_base64()
        return wrap_share(self.kas_key, share, pol), pol

    def stats(self, timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        """``/stats`` of both replicas, by replica id (polled until both answered)."""
        seen: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(seen) < 2 and time.monotonic() < deadline:
            answer = self.http.get(f"{self.url}/stats")
            assert answer.status_code == 200, answer.text
            seen[answer.json()["replica"]] = answer.json()
        assert len(seen) == 2, f"only replicas {list(seen)} answered"
        return seen


@dataclass
class Client:
    token: str
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    dpop_key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    def proof(self, mike: Mike) -> str:
        return make_dpop_proof(self.dpop_key, "POST", mike.url + REWRAP, access_token=self.token)

    def post(self, mike: Mike, kao: KeyAccessObject, pol: str, *, dpop: str | None = None,
             http: httpx.Client | None = None) -> httpx.Response:
        body = {"clientPublicKey": P.public_key_pem(self.key.public_key()),
                "requests": [{"policy": {"id": "p", "body": pol}, "algorithm": "rsa:2048",
                              "keyAccessObjects": [{"keyAccessObjectId": "k0", "keyAccessObject": kao.to_wire()}]}]}
        headers = {"Authorization": f"Bearer {self.token}", **({"DPoP": dpop} if dpop else {})}
        # With a proof, the body is signed by its key.
        payload = {"signedRequestToken": sign_request(body, self.dpop_key)} if dpop else body
        return (http or mike.http).post(mike.url + REWRAP, json=payload, headers=headers)

    def share(self, answer: httpx.Response) -> bytes:
        """The released share, or AssertionError."""
        assert answer.status_code == 200, (answer.status_code, answer.text[:300])
        wire = answer.json()
        (result,) = wire["responses"][0]["results"]
        assert result["status"] == "permit", result
        session = P.load_public_key_pem(wire["sessionPublicKey"])
        assert isinstance(session, ec.EllipticCurvePublicKey)
        return P.ec_unwrap(self.key, session, base64.b64decode(result["kasWrappedKey"]))


@pytest.fixture(scope="module")
def mike(kas_cluster: Any, redis_factory: Any) -> Iterator[Mike]:
    from ray import serve

    from kas_ray.serve.actors import kill_actors
    from kas_ray.serve.deployment import NationKAS
    from kas_ray.serve.runner import _wait_ready, nation_settings

    server = redis_factory()
    (settings,) = nation_settings(
        kas_cluster.state_dir, [MIKE], kas_cluster.base_url,
        # Generous timeouts: a loaded 2-core machine must not turn a slow answer into a miss here.
        redis={"url": server.url, "retry_interval_seconds": 0.5, "connect_timeout_seconds": 2.0,
               "command_timeout_seconds": 2.0},
        rate_limit={"window_seconds": WINDOW, "rewrap": {"per_subject": SUBJECT_LIMIT, "per_client": 100_000},
                    "public_key": {"per_client": 100_000}},
    )
    started = time.perf_counter()
    app = NationKAS.options(name="kas-mike", num_replicas=2).bind(settings.model_dump())
    serve.run(app, name="mike", route_prefix="/mike", blocking=False)
    _wait_ready([settings.public_url])
    with httpx.Client(timeout=30.0) as http:
        kas_key = KasClient(HttpTransport()).public_key(settings.public_url, "rsa:2048")
        mike = Mike(url=settings.public_url, state=kas_cluster.state_dir, redis=server, http=http, kas_key=kas_key)
        mike.stats(timeout=120)
        print(f"\nMIKE (2 replicas, Redis) ready in {time.perf_counter() - started:.1f}s")
        try:
            yield mike
        finally:
            serve.delete("mike")
            kill_actors([MIKE])


def cache_delta(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, Counter[str]]:
    out = {}
    for replica, stats in after.items():
        now, then = stats["replica_cache"], before[replica]["replica_cache"]
        out[replica] = Counter({k: now[k] - then[k] for k in ("hits", "misses", "local_hits", "shared_hits")})
    return out


def one_key_through_both_replicas(mike: Mike) -> None:
    """Rewrap one fresh key (fresh subjects) until both replicas served it: one HSM unwrap in all,
    and the other replica's first request is a Redis hit."""
    kao, pol = mike.kao()
    before = mike.stats()
    for sent in range(1, 65):
        client = Client(mike.token())
        assert client.share(client.post(mike, kao, pol)) == mike.secrets[-1]
        if sent >= 8:
            after = mike.stats()
            delta = cache_delta(before, after)
            if all(d["hits"] + d["misses"] > 0 for d in delta.values()):
                why = {r: (dict(delta[r]), after[r]["redis"]) for r in after}
                assert sum(d["misses"] for d in delta.values()) == 1, why  # one HSM unwrap for the nation
                assert sum(d["shared_hits"] for d in delta.values()) == 1, why  # the other replica: Redis
                return
    pytest.fail("64 rewraps never reached both replicas")


# === hit rate ===============================================================================================
def test_key_unwrapped_by_one_replica_is_a_hit_at_the_other(mike: Mike) -> None:
    one_key_through_both_replicas(mike)
    # Measured: 20 keys x 4 rewraps, spread by Serve over both replicas.
    before = mike.stats()
    kaos = [mike.kao() for _ in range(20)]
    for _round in range(4):
        for kao, pol in kaos:
            client = Client(mike.token())
            client.share(client.post(mike, kao, pol))
    totals: Counter[str] = sum(cache_delta(before, mike.stats()).values(), Counter())
    hit_rate = totals["hits"] / (totals["hits"] + totals["misses"])
    assert totals["misses"] == 20 and hit_rate == pytest.approx(0.75)
    print(f"\nMIKE, 2 Serve replicas, 20 keys x 4 rewraps: hit rate {hit_rate:.3f} "
          f"(local {totals['local_hits']}, Redis {totals['shared_hits']}, misses {totals['misses']})")


# === replay =================================================================================================
def test_same_dpop_proof_at_both_replicas_is_accepted_once(mike: Mike) -> None:
    kao, pol = mike.kao()
    for _attempt in range(5):
        client = Client(mike.token())
        proof = client.proof(mike)
        before = mike.stats()

        def send(_: int, client: Client = client, proof: str = proof) -> httpx.Response:
            with httpx.Client(timeout=30.0) as http:
                return client.post(mike, kao, pol, dpop=proof, http=http)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(send, range(12)))
        codes = Counter(a.status_code for a in answers)
        assert codes == {200: 1, 401: 11}, codes
        assert all(a.json()["error"] == "replay" for a in answers if a.status_code == 401)
        after = mike.stats()
        checks = {r: sum(after[r]["replay"].get(k, 0) - before[r]["replay"].get(k, 0) for k in ("accepted", "replays"))
                  for r in after}
        assert sum(checks.values()) == 12
        if all(checks.values()):  # both replicas checked the proof: one accepted it, the other refused
            return
    pytest.fail("the proof never reached both replicas")


# === rate limit ==============================================================================================
def test_burst_over_subject_limit_gets_429_other_subjects_pass(mike: Mike) -> None:
    kao, pol = mike.kao()
    greedy = Client(mike.token())
    before = mike.stats()
    answers = [greedy.post(mike, kao, pol) for _ in range(SUBJECT_LIMIT + 6)]
    assert [a.status_code for a in answers] == [200] * SUBJECT_LIMIT + [429] * 6
    for answer in answers[SUBJECT_LIMIT:]:
        assert 1 <= int(answer.headers["retry-after"]) <= WINDOW
        assert answer.json()["code"] == "resource_exhausted" and answer.json()["error"] == "rate_limited"
        assert "kasWrappedKey" not in answer.text
    after = mike.stats()
    served = {r: after[r]["rate_limit"].get("accepted_rewrap_subject", 0)
              - before[r]["rate_limit"].get("accepted_rewrap_subject", 0) for r in after}
    assert sum(served.values()) == SUBJECT_LIMIT  # one window for the subject, whichever replica counted
    other = Client(mike.token())
    assert other.share(other.post(mike, kao, pol)) == mike.secrets[-1]


# === Redis killed under load =================================================================================
def test_redis_killed_during_rewraps(mike: Mike) -> None:
    stop = threading.Event()
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    pool_keys = [mike.kao() for _ in range(8)]

    def worker(n: int) -> None:
        with httpx.Client(timeout=30.0) as http:
            i = 0
            while not stop.is_set():
                i += 1
                kao, pol = mike.kao() if i % 2 else pool_keys[(n + i) % len(pool_keys)]
                client = Client(mike.token())
                answer = client.post(mike, kao, pol, http=http)
                with lock:
                    statuses[answer.status_code] += 1
                try:
                    client.share(answer)
                except AssertionError as exc:
                    with lock:
                        failures.append(str(exc)[:200])

    def dpop_while_down() -> list[httpx.Response]:
        kao, pol = mike.kao()
        out = []
        for _ in range(4):
            client = Client(mike.token())
            out.append(client.post(mike, kao, pol, dpop=client.proof(mike)))
        return out

    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(worker, n) for n in range(4)]
        time.sleep(1.5)
        mike.redis.stop(signal.SIGKILL)
        killed_at = sum(statuses.values())
        time.sleep(2.0)
        down = dpop_while_down()
        stats_down = mike.stats()
        during = sum(statuses.values()) - killed_at
        mike.redis.start()
        time.sleep(2.0)
        stop.set()
        for future in workers:
            future.result()
    assert during > 0, "no request ran while Redis was down"
    assert not failures, failures[:3]
    assert set(statuses) == {200}, statuses  # zero 5xx (and no 4xx) from the cache path
    for answer in down:  # strict replay store: DPoP requests refused, retry later
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"] == "replay_store_unavailable" and answer.headers["retry-after"] == "1"
    assert all(s["replica_cache"]["errors"] > 0 for s in stats_down.values())

    # Back: the hit rate recovers (one unwrap, a Redis hit at the other replica), DPoP passes again.
    for _ in range(4):  # let both replicas find Redis again
        client = Client(mike.token())
        client.share(client.post(mike, *mike.kao()))
    one_key_through_both_replicas(mike)
    client = Client(mike.token())
    client.share(client.post(mike, *mike.kao(), dpop=client.proof(mike)))
    after = mike.stats()
    assert all(s["redis"]["available"] and s["replica_cache"]["redis_available"] for s in after.values())
    print(f"\nRedis killed under load: {sum(statuses.values())} rewraps, {during} while down, all 200; "
          f"DPoP while down: {[a.status_code for a in down]}")


# === nothing in the clear ====================================================================================
def test_redis_holds_no_share_after_the_workload(mike: Mike) -> None:
    from test_redis_shared import assert_no_secret

    for _ in range(10):  # refill Redis (it lost everything when it was killed): cache, replay, windows
        kao, pol = mike.kao()
        for _ in range(2):
            client = Client(mike.token())
            client.share(client.post(mike, kao, pol, dpop=client.proof(mike)))
    count = assert_no_secret(mike.redis.port, mike.secrets)
    assert count >= 10 + 20
    print(f"\nscanned {count} Redis entries against {len(mike.secrets)} shares: no plaintext")

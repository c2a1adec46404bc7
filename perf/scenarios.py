"""KAS benchmark scenarios: the coalition under test, pre-built valid rewrap requests, cache statistics.

Three nations of the benchmark's own, ALPHA, BRAVO and CHARLIE, run as Serve applications at
``/alpha``, ``/bravo``, ``/charlie`` (software key backend, dev identity providers, dev federation
over Serve handles), next to a no-op FastAPI deployment at ``/noop`` that answers a rewrap-shaped
JSON without doing anything: the baseline of the same proxy, driven by the same generator.

Every request is a complete, valid OpenTDF rewrap as :class:`kas_ray.client.KasClient` sends it:
``Authorization: Bearer`` with a DPoP-bound access token from the home nation's dev IdP (``cnf.jkt``),
a fresh DPoP proof per request (distinct ``jti``: the KAS refuses replays), and a signed request
token (signed with the DPoP key) carrying the client's EC public key and the key access objects of
one object. Brokered shapes send all KAOs of an object to the user's home KAS (ALPHA), as
:class:`kas_ray.client.HomeKasClient` does; the home forwards the foreign KAOs to its peers.

Freshness: requests are built just before each phase (a few seconds at most), DPoP and SRT ``iat``
at build time. The KAS accepts a DPoP ``iat`` and an SRT ``iat`` within 300 s of now (dev trust
registry defaults, unchanged); the SRT's own ``exp`` is a client choice, set to 300 s here
(``SRT_TTL_S``; KasClient's default is 60 s, shorter than warm-up + a 60 s phase). So one phase,
warm-up and drain included, must end within 300 s of its build: ``bench_kas.py`` keeps phases
at 60 s + 5 s warm-up.
"""

import base64
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve

NATIONS = ["ALPHA", "BRAVO", "CHARLIE"]
HOME = "ALPHA"
REWRAP_PATH = "/kas.AccessService/Rewrap"
#: The REST route; the fault-injection load (``faults.py``) sends v1 bodies here (answered 200/4xx/503 as a whole).
V1_REWRAP_PATH = "/kas/v2/rewrap"
SRT_TTL_S = 300
USERS_PER_NATION = 16
WARM_OBJECTS = 100
NOOP_APP = "noop"

#: A rewrap-shaped answer (the generator checks it like a real one: kao-0 permitted).
NOOP_ANSWER = json.dumps({"responses": [{"policyId": "policy", "results": [
    {"keyAccessObjectId": "kao-0", "status": "permit", "kasWrappedKey": "AAAA"}]}]}).encode()

noop_api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(noop_api)
class NoopEndpoint:
    """Baseline: reads the request body and answers a constant JSON, on the same proxy as the KAS."""

    @noop_api.post(REWRAP_PATH)
    async def rewrap(self, request: Request) -> Response:
        await request.body()
        return Response(NOOP_ANSWER, media_type="application/json")

    @noop_api.get("/stats")
    async def stats(self) -> Response:
        return Response(b"{}", media_type="application/json")


# --- shapes and scenarios ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """Who asks (home nation) for objects split how: ``[[A, B]]`` anyOf, ``[[A], [B]]`` allOf."""

    home: str
    splits: tuple[tuple[str, ...], ...]

    @property
    def nations(self) -> list[str]:
        return sorted({n for split in self.splits for n in split} | {self.home})


SHAPES: dict[str, Shape] = {
    "1kas": Shape("ALPHA", (("ALPHA",),)),
    "2kas-anyof": Shape("ALPHA", (("ALPHA", "BRAVO"),)),
    "2kas-allof": Shape("ALPHA", (("ALPHA",), ("BRAVO",))),
    "3kas-anyof": Shape("ALPHA", (("ALPHA", "BRAVO", "CHARLIE"),)),
    "3kas-allof": Shape("ALPHA", (("ALPHA",), ("BRAVO",), ("CHARLIE",))),
    # both alternatives foreign: the home must broker, and the first peer to permit wins
    "2kas-anyof-foreign": Shape("ALPHA", (("BRAVO", "CHARLIE"),)),
}


@dataclass(frozen=True)
class Scenario:
    name: str
    shape: str | None  # None: the no-op endpoint
    cold: bool = False
    description: str = ""

    @property
    def is_noop(self) -> bool:
        return self.shape is None


SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("noop", None, description="no-op FastAPI deployment, same proxy and generator"),
    Scenario("1kas-warm", "1kas", description=f"one KAS, {WARM_OBJECTS} repeated objects"),
    Scenario("1kas-cold", "1kas", cold=True, description="one KAS, every object new (one HSM unwrap each)"),
    Scenario("2kas-anyof-warm", "2kas-anyof", description="home + 1 peer, anyOf, repeated objects"),
    Scenario("2kas-allof-warm", "2kas-allof", description="home + 1 peer, allOf, repeated objects"),
    Scenario("3kas-anyof-warm", "3kas-anyof", description="home + 2 peers, anyOf, repeated objects"),
    Scenario("3kas-allof-warm", "3kas-allof", description="home + 2 peers, allOf, repeated objects"),
    Scenario("anyof-foreign", "2kas-anyof-foreign",
             description="anyOf over 2 foreign peers (BRAVO, CHARLIE) through the home, no slow peer"),
    Scenario("anyof-foreign-slow", "2kas-anyof-foreign",
             description="the same with BRAVO answering forwards 300 ms late"),
]}


# --- the coalition ----------------------------------------------------------------------------------------
@dataclass
class User:
    home: str
    token: str
    dpop_key: ec.EllipticCurvePrivateKey
    client_key: ec.EllipticCurvePrivateKey
    client_pem: str


@dataclass
class Obj:
    """One object's key access: the policy, the KAO entries of a rewrap request, and the true shares."""

    policy_b64: str
    kao_entries: list[dict[str, Any]]
    splits: list[list[str]]
    shares: list[bytes]  # one per split, in split order
    algorithm: str


@dataclass
class Coalition:
    base_url: str
    state_dir: Path
    kas_key: str = "rsa:4096"
    #: The nations of this coalition (``faults.py`` uses its own, next to other tests' nations).
    nations: list[str] = field(default_factory=lambda: list(NATIONS))
    keys: dict[str, Any] = field(default_factory=dict)  # nation -> KasKey
    users: dict[str, list[User]] = field(default_factory=dict)
    _cycle: dict[str, Iterator[User]] = field(default_factory=dict)
    warm_pools: dict[str, list[Obj]] = field(default_factory=dict)
    #: Serve options of every nation's deployment (a Serve config file's); empty: the code's defaults.
    deployment_options: dict[str, Any] = field(default_factory=dict)

    def url(self, nation: str) -> str:
        return f"{self.base_url}/{nation.lower()}"

    # --- deploy -------------------------------------------------------------------------------------------
    def settings(self, delays: dict[str, float] | None = None) -> list[Any]:
        from kas_ray.serve.deployment import dev_federation_config
        from kas_ray.serve.runner import nation_settings

        delays = delays or {}
        out = []
        for s in nation_settings(self.state_dir, self.nations, self.base_url):
            config = dev_federation_config(s, debug_delay_seconds=delays.get(s.nation, 0.0))
            out.append(s.model_copy(update={"federation": config}))
        return out

    def deploy(self, nations: list[str] | None = None, delays: dict[str, float] | None = None) -> None:
        from kas_ray.serve.runner import _wait_ready, deploy

        chosen = [s for s in self.settings(delays) if nations is None or s.nation in nations]
        deploy(chosen, index=False, deployment_options=self.deployment_options)
        _wait_ready([self.url(s.nation) for s in chosen])

    def deploy_noop(self) -> None:
        # The same Serve options as the nations (replicas, autoscaling): the baseline is the same deployment
        # doing nothing, not a different shape of deployment.
        endpoint = NoopEndpoint.options(**self.deployment_options) if self.deployment_options else NoopEndpoint
        serve.run(endpoint.bind(), name=NOOP_APP, route_prefix=f"/{NOOP_APP}", blocking=False)
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base_url}/{NOOP_APP}/stats", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("the no-op endpoint did not come up")

    def add_users(self) -> None:
        from kas_ray.hazmat import primitives as P
        from kas_ray.trust import DevIdentityProvider, jwk_thumbprint
        from kas_ray.trust.jwks import public_jwk

        for nation in self.nations:
            idp = DevIdentityProvider(self.state_dir, nation)
            users = []
            for k in range(USERS_PER_NATION):
                dpop = ec.generate_private_key(ec.SECP256R1())
                client = ec.generate_private_key(ec.SECP256R1())
                token = idp.mint(f"perf-{nation.lower()}-{k}", "SECRET", ttl=6 * 3600,
                                 cnf_jkt=jwk_thumbprint(public_jwk(dpop)))
                users.append(User(nation, token, dpop, client, P.public_key_pem(client.public_key())))
            self.users[nation] = users
            self._cycle[nation] = itertools.cycle(users)

    def prepare(self) -> None:
        """Public keys of every nation, and users (DPoP-bound tokens) of every nation."""
        from kas_ray.client import HttpTransport, KasClient

        anonymous = KasClient(HttpTransport())
        for nation in self.nations:
            self.keys[nation] = anonymous.public_key(self.url(nation), self.kas_key)  # type: ignore[arg-type]
        self.add_users()

    # --- objects and requests ---------------------------------------------------------------------------------
    def policy_b64(self) -> str:
        from kas_ray.config import AbacConfig
        from kas_ray.policy import attribute_fqn
        from kas_ray.ztdf import Policy

        config = AbacConfig()
        policy = Policy.create([attribute_fqn(config, "classification", "SECRET")]
                               + [attribute_fqn(config, "releasable-to", n) for n in self.nations])
        return policy.to_base64()

    def new_object(self, shape: Shape, policy_b64: str) -> Obj:
        from kas_ray.hazmat import primitives as P
        from kas_ray.ztdf.keyaccess import wrap_share

        entries, splits, shares = [], [], []
        index = 0
        for s, alternatives in enumerate(shape.splits):
            share = P.random_key()
            shares.append(share)
            ids = []
            for nation in alternatives:
                kao = wrap_share(self.keys[nation], share, policy_b64,
                                 sid=f"s-{s}" if len(shape.splits) > 1 else None)
                kid = f"kao-{index}"
                index += 1
                entries.append({"keyAccessObjectId": kid, "keyAccessObject": kao.to_wire()})
                ids.append(kid)
            splits.append(ids)
        algorithm = "ec:secp256r1" if self.kas_key.startswith("ec:") else "rsa:2048"
        return Obj(policy_b64, entries, splits, shares, algorithm)

    def objects(self, scenario: Scenario, count: int) -> Iterator[Obj]:
        assert scenario.shape is not None
        shape = SHAPES[scenario.shape]
        policy = self.policy_b64()
        if scenario.cold:
            for _ in range(count):
                yield self.new_object(shape, policy)
            return
        pool = self.warm_pools.get(scenario.shape)
        if pool is None:
            pool = self.warm_pools[scenario.shape] = [self.new_object(shape, policy) for _ in range(WARM_OBJECTS)]
        for k in range(count):
            yield pool[k % len(pool)]

    def request(self, user: User, obj: Obj, path_nation: str, *, iat: float, v1: bool = False,
                request_id: str | None = None) -> dict[str, Any]:
        """One rewrap of ``obj`` by ``user``. ``v1``: the single-KAO body on the REST route (an HSM or
        KMS failure is then a 503 for the whole request, not a per-KAO result); ``request_id`` is sent
        as ``X-Request-ID``, which names the request's audit records."""
        from kas_ray.trust import make_dpop_proof, sign_request

        body: dict[str, Any] = {"clientPublicKey": user.client_pem}
        if v1:
            body |= {"keyAccess": obj.kao_entries[0]["keyAccessObject"], "policy": obj.policy_b64,
                     "algorithm": obj.algorithm}
        else:
            body["requests"] = [{"policy": {"id": "policy", "body": obj.policy_b64}, "algorithm": obj.algorithm,
                                 "keyAccessObjects": obj.kao_entries}]
        route = V1_REWRAP_PATH if v1 else REWRAP_PATH
        srt = sign_request(body, user.dpop_key, now=iat, ttl_seconds=SRT_TTL_S)
        dpop = make_dpop_proof(user.dpop_key, "POST", self.url(user.home) + route,
                               access_token=user.token, iat=iat)
        headers = {"Content-Type": "application/json", "Connect-Protocol-Version": "1",
                   "Authorization": f"Bearer {user.token}", "DPoP": dpop}
        if request_id is not None:
            headers["X-Request-ID"] = request_id
        return {"method": "POST", "path": f"/{path_nation.lower()}{route}", "headers": headers,
                "body": json.dumps({"signedRequestToken": srt}, separators=(",", ":")),
                "splits": [["kao-0"]] if v1 else obj.splits}

    def build(self, scenario: Scenario, count: int) -> tuple[list[dict[str, Any]], list[tuple[dict, User, Obj]]]:
        """``count`` requests for the generator, plus one more request (with its user and object) to check."""
        iat = time.time()
        if scenario.is_noop:  # same request size and shape as 1kas-warm, aimed at the no-op endpoint
            base = Scenario("noop-as-1kas", "1kas")
            reqs = []
            for obj in self.objects(base, count):
                req = self.request(next(self._cycle[HOME]), obj, NOOP_APP, iat=iat)
                req["splits"] = [["kao-0"]]
                reqs.append(req)
            return reqs, []
        home = SHAPES[scenario.shape].home  # type: ignore[index]
        reqs, checks = [], []
        for k, obj in enumerate(self.objects(scenario, count + 1)):
            user = next(self._cycle[home])
            req = self.request(user, obj, home, iat=iat)
            if k == 0:
                checks.append((req, user, obj))
            else:
                reqs.append(req)
        return reqs, checks


def prime(coalition: "Coalition", scenario: Scenario, workers: int = 4) -> float:
    """Warm scenarios: rewrap every object of the pool once (4 at a time), so the cache is warm; seconds."""
    import concurrent.futures

    import httpx

    if scenario.is_noop or scenario.cold:
        return 0.0
    started = time.perf_counter()
    reqs, checks = coalition.build(scenario, WARM_OBJECTS - 1)
    reqs += [req for req, _user, _obj in checks]  # with the check request: every object of the pool
    with httpx.Client(timeout=60) as client:
        def send(req: dict[str, Any]) -> int:
            response = client.post(coalition.base_url + req["path"], content=req["body"], headers=req["headers"])
            return response.status_code

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            statuses = list(pool.map(send, reqs))
    bad = [s for s in statuses if s != 200]
    if bad:
        raise AssertionError(f"priming {scenario.name}: {len(bad)} requests failed (status {bad[0]})")
    return time.perf_counter() - started


def verify_answer(req: dict[str, Any], user: User, obj: Obj, base_url: str) -> str:
    """Send one pre-built request (httpx) and check every split's share decrypts to the true share."""
    import httpx

    from kas_ray.hazmat import primitives as P
    from kas_ray.ztdf._wire import b64decode_strict

    response = httpx.post(base_url + req["path"], content=req["body"], headers=req["headers"], timeout=30)
    if response.status_code != 200:
        raise AssertionError(f"check request answered {response.status_code}: {response.text[:300]}")
    data = response.json()
    results = {r["keyAccessObjectId"]: r for p in data["responses"] for r in p["results"]}
    released = 0
    for split, share in zip(obj.splits, obj.shares, strict=True):
        permits = [results[k] for k in split if results.get(k, {}).get("status") == "permit"]
        if not permits:
            raise AssertionError(f"split {split} not released: {[results.get(k) for k in split]}")
        for result in permits:
            session_pem = (result.get("metadata") or {}).get("sessionPublicKey") or data.get("sessionPublicKey")
            session = P.load_public_key_pem(session_pem)
            got = P.ec_unwrap(user.client_key, session, b64decode_strict(result["kasWrappedKey"]))  # type: ignore[arg-type]
            if got != share:
                raise AssertionError("a released share differs from the object's share")
            released += 1
    return f"{released} share(s) released and decrypted to the true shares"


# --- cache statistics ---------------------------------------------------------------------------------------
def cache_delta(start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any] | None:
    """Cache counters over the measured window of one nation (its /stats before and after).

    A lookup first asks the replica's own cache; on a miss, the HSM actor, which answers from its
    share memory or unwraps. A request is a hit when either had the share, so hit rate = (replica
    hits + HSM-memory hits) / replica lookups.
    """
    try:
        r0, r1 = start["replica_cache"], end["replica_cache"]
        s0, s1 = start.get("shared_cache") or {}, end.get("shared_cache") or {}
    except (KeyError, TypeError):
        return None
    local_hits = r1["hits"] - r0["hits"]
    local_misses = r1["misses"] - r0["misses"]
    shared_hits = s1.get("hits", 0) - s0.get("hits", 0)
    shared_misses = s1.get("misses", 0) - s0.get("misses", 0)
    lookups = local_hits + local_misses
    if lookups < 0 or local_misses < 0:  # a replica restarted: counters were reset
        return {"error": "counters went backwards (replica restarted?)"}
    hits = local_hits + min(shared_hits, local_misses)
    return {"lookups": lookups, "replica_hits": local_hits, "replica_misses": local_misses,
            "actor_hits": shared_hits, "actor_misses": shared_misses,
            "hsm_unwraps_est": max(local_misses - shared_hits, 0),
            "hit_rate": round(hits / lookups, 4) if lookups else None}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- in process: what kas_ray itself costs, without Ray ------------------------------------------------------
def inprocess_cost(names: list[str], requests: int = 300, kas_key: str = "rsa:4096") -> dict[str, Any]:
    """CPU ms per rewrap of each scenario with the three nations as services in this process.

    Same requests as over HTTP (token, DPoP proof, SRT, KAOs); peers reached with the in-process
    transport (JSON copies both ways), the software keystore unwrapping directly, an in-memory share
    cache and a hash-chained, fsynced audit file per nation. Sequential, one request at a time, after
    a warm-up pass over the warm pool: no Serve, no actor hops, no HTTP.
    """
    import asyncio
    import tempfile

    from kas_ray.audit import JsonLinesAuditSink
    from kas_ray.kas.local import build_local_services
    from kas_ray.kas.service import RewrapCall
    from kas_ray.ztdf.keyaccess import KasKey

    state = Path(tempfile.mkdtemp(prefix="kas-ray-bench-inproc-"))
    base = "http://127.0.0.1:9"
    services = build_local_services(state, NATIONS, base_url=base, federate=True)
    for service in services.values():
        service.audit = JsonLinesAuditSink(state / "audit" / f"{service.nation.lower()}.jsonl", nation=service.nation)
    co = Coalition(base_url=base, state_dir=state, kas_key=kas_key)
    loop = asyncio.new_event_loop()
    for url, service in services.items():
        infos = loop.run_until_complete(service.keys.keys())
        info = next(i for i in infos if i.algorithm == kas_key and i.status == "active")
        co.keys[service.nation] = KasKey(url=url, public_key_pem=info.public_key_pem, kid=info.kid,
                                         algorithm=kas_key, oaep_hash=info.oaep_hash or "sha1")  # type: ignore[arg-type]
    co.add_users()
    by_path = {f"/{s.nation.lower()}{REWRAP_PATH}": s for s in services.values()}

    async def run(reqs: list[dict[str, Any]]) -> int:
        failures = 0
        for req in reqs:
            call = RewrapCall(authorization=req["headers"]["Authorization"], dpop=req["headers"]["DPoP"],
                              url=base + req["path"], body=json.loads(req["body"]))
            response = await by_path[req["path"]].rewrap(call)
            results = {r.key_access_object_id: r.status for p in response.responses for r in p.results}
            failures += any(all(results.get(k) != "permit" for k in split) for split in req["splits"])
        return failures

    out: dict[str, Any] = {}
    try:
        for name in names:
            scenario = SCENARIOS[name]
            if scenario.is_noop or name.endswith("-slow"):
                continue
            if not scenario.cold:
                loop.run_until_complete(run(co.build(scenario, WARM_OBJECTS)[0]))
            reqs = co.build(scenario, requests)[0]
            cpu0, t0 = time.process_time(), time.perf_counter()
            failures = loop.run_until_complete(run(reqs))
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
            out[name] = {"requests": len(reqs), "failures": failures,
                         "cpu_ms_per_request": round(cpu / len(reqs) * 1e3, 3),
                         "wall_ms_per_request": round(wall / len(reqs) * 1e3, 3)}
    finally:
        loop.close()
        import shutil

        shutil.rmtree(state, ignore_errors=True)
    return out

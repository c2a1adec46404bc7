"""Federation security at library level: brokered rewrap in process, forged forwards and results refused.

One coalition (USA, FRA, GBR) is built with ``build_local_services(..., federate=True)``: every nation
brokers to the others through :class:`LocalPeerTransport` with real federation keys, real tokens and
real KAS keys. Malicious parties are doubles of a *peer* (a transport that tampers with what the real
peer answered, or messages signed by hand); the code under test is never patched.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kas_ray.audit import AuditAction, AuditEvent, MemoryAuditSink
from kas_ray.client import REWRAP_PATH, HomeKasClient, KasClient, LocalTransport
from kas_ray.config import AbacConfig, AgreementConfig, PeerConfig
from kas_ray.errors import (
    AccessDenied,
    ConfigError,
    DPoPError,
    KasRayError,
    SignedRequestError,
    TokenError,
    UntrustedIssuerError,
    audit_id,
    showable,
    showable_url,
)
from kas_ray.federation.breaker import PeerUnavailable
from kas_ray.federation.broker import Federation
from kas_ray.federation.envelope import (
    FORWARD_TYP,
    MAX_MESSAGE_CHARS,
    RESULT_TYP,
    FederationKey,
    ForwardClaims,
    ForwardError,
    forward_nonce,
    sign_forward,
    sign_result,
    verify_forward,
    verify_result,
)
from kas_ray.federation.peers import LocalPeerTransport, PeerTransport
from kas_ray.hazmat import primitives as P
from kas_ray.kas.local import build_local_services, nation_url
from kas_ray.kas.models import OPENTDF_BAD_REQUEST, OPENTDF_FORBIDDEN, KaoResult, RewrapResponse
from kas_ray.kas.service import RewrapCall, RewrapService
from kas_ray.keys.software import PASSPHRASE_ENV, PASSPHRASE_FILE_ENV
from kas_ray.policy import attribute_fqn
from kas_ray.trust import (
    DevIdentityProvider,
    MemoryReplayStore,
    TokenVerifier,
    dev_trust_registry,
    jwk_thumbprint,
    sign_request,
)
from kas_ray.trust.jwks import public_jwk
from kas_ray.ztdf import KasKey, KeyAccessObject, Policy, decrypt, encrypt, wrap_share
from kas_ray.ztdf.keyaccess import KeyAlgorithm

NATIONS = ["USA", "FRA", "GBR"]
BASE = "http://127.0.0.1:8000"
CONFIG = AbacConfig()
ALL = ("USA", "FRA", "GBR")


# --- the federated coalition ---------------------------------------------------------------------------
@dataclass
class Coalition:
    state: Path
    services: dict[str, RewrapService]  # by nation
    by_url: dict[str, RewrapService]
    transport: LocalTransport
    audit: MemoryAuditSink
    _keys: dict[tuple[str, str], KasKey] = field(default_factory=dict)

    def url(self, nation: str) -> str:
        return nation_url(BASE, nation)

    def fed(self, nation: str) -> Federation:
        federation = self.services[nation].federation
        assert federation is not None
        return federation

    def token(self, nation: str, sub: str, clearance: str | None, coi: Iterable[str] = (), **kw: Any) -> str:
        return DevIdentityProvider(self.state, nation).mint(sub, clearance, coi=list(coi), **kw)

    def kas_key(self, nation: str, algorithm: KeyAlgorithm = "rsa:2048") -> KasKey:
        if (nation, algorithm) not in self._keys:
            owner = KasClient(self.transport, use_dpop=False)
            self._keys[nation, algorithm] = owner.public_key(self.url(nation), algorithm)
        return self._keys[nation, algorithm]

    def kao(self, nation: str, pol: Policy, share: bytes, algorithm: KeyAlgorithm = "rsa:2048") -> KeyAccessObject:
        """A KAO in a split of its own (all-of): no other KAO of a request can make it unneeded."""
        return wrap_share(self.kas_key(nation, algorithm), share, pol.to_base64(), sid=uuid.uuid4().hex[:12])

    def events(self, request_id: str, nation: str | None = None,
               action: AuditAction | None = None) -> list[AuditEvent]:
        return [e for e in self.audit.events if e.request_id == request_id
                and (nation is None or e.nation == nation) and (action is None or e.action is action)]


@pytest.fixture(scope="module")
def co(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coalition]:
    state = tmp_path_factory.mktemp("federation")
    audit = MemoryAuditSink()
    with pytest.MonkeyPatch.context() as mp:  # dev profile: the passphrase is generated in the state dir
        mp.delenv(PASSPHRASE_ENV, raising=False)
        mp.delenv(PASSPHRASE_FILE_ENV, raising=False)
        by_url = build_local_services(state, NATIONS, base_url=BASE, audit=audit, federate=True)
    transport = LocalTransport(by_url)
    yield Coalition(state=state, services={s.nation: s for s in by_url.values()}, by_url=by_url,
                    transport=transport, audit=audit)
    transport.close()


def policy(classification: str = "SECRET", rel: Iterable[str] = ALL, coi: Iterable[str] = ()) -> Policy:
    attrs = [attribute_fqn(CONFIG, "classification", classification)]
    attrs += [attribute_fqn(CONFIG, "releasable-to", n) for n in rel]
    attrs += [attribute_fqn(CONFIG, "coi", c) for c in coi]
    return Policy.create(attrs)


def share() -> bytes:
    return secrets.token_bytes(32)


@dataclass(frozen=True)
class Client:
    """The user's session key pair: peers rewrap straight to its public key."""

    key: P.PrivateKey

    @property
    def pem(self) -> str:
        return P.public_key_pem(self.key.public_key())

    def unwrap(self, response: RewrapResponse, result: KaoResult) -> bytes:
        assert result.kas_wrapped_key
        wrapped = base64.b64decode(result.kas_wrapped_key)
        if isinstance(self.key, rsa.RSAPrivateKey):
            return P.rsa_oaep_decrypt(self.key, wrapped, "sha1")
        session = P.load_public_key_pem(result.metadata.get("sessionPublicKey") or response.session_public_key or "")
        assert isinstance(session, ec.EllipticCurvePublicKey)
        return P.ec_unwrap(self.key, session, wrapped)


@cache
def client(kind: str = "ec") -> Client:
    if kind == "rsa":
        return Client(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return Client(ec.generate_private_key(ec.SECP256R1()))


def home_call(co: Coalition, home: str, token: str, pol: Policy, kaos: dict[str, KeyAccessObject],
              who: Client | None = None) -> RewrapCall:
    """A rewrap for ``kaos`` (by id) sent to the ``home`` KAS (plain ACP-240 body, no DPoP)."""
    body = {"clientPublicKey": (who or client()).pem,
            "requests": [{"policy": {"id": "p", "body": pol.to_base64()},
                          "keyAccessObjects": [{"keyAccessObjectId": i, "keyAccessObject": k.to_wire()}
                                               for i, k in kaos.items()]}]}
    return RewrapCall(authorization=f"Bearer {token}", url=co.url(home) + REWRAP_PATH, body=body)


def rewrap(service: RewrapService, call: RewrapCall) -> tuple[RewrapResponse, dict[str, KaoResult]]:
    response = asyncio.run(service.rewrap(call))
    return response, {r.key_access_object_id: r for p in response.responses for r in p.results}


def forward_body(token: str, pol: Policy, kaos: dict[str, KeyAccessObject], *, who: Client | None = None,
                 ) -> dict[str, Any]:
    """What a home KAS sends a peer (see RewrapService._forward)."""
    return {"token": token, "clientPublicKey": (who or client()).pem,
            "policy": {"id": "p", "body": pol.to_base64()},
            "keyAccessObjects": [{"keyAccessObjectId": i, "keyAccessObject": k.to_wire()} for i, k in kaos.items()],
            "dpopJwk": None, "signedRequestToken": None, "requestId": uuid.uuid4().hex}


def forward_from(co: Coalition, sender: str, target: str, body: dict[str, Any],
                 hops: Iterable[str] = ()) -> dict[str, str]:
    return sign_forward(co.fed(sender).key, target, json.dumps(body), hops=list(hops), ttl=30,
                        deadline=time.time() + 10)


def serve_forward(co: Coalition, target: str, message: dict[str, Any], tls_peer: str | None = None) -> dict[str, Any]:
    return asyncio.run(co.services[target].handle_forward(message, tls_peer))


def answer_of(co: Coalition, home: str, peer: str, message: dict[str, str], reply: dict[str, Any]) -> dict[str, Any]:
    """The peer's signed reply, verified as the home would verify it."""
    return verify_result(reply, me=home, peer=peer, nonce=forward_nonce(message), keys=co.fed(home).keys)


def forms(secret: bytes) -> set[str]:
    """Encodings a leaked share could take in JSON or logs."""
    return {base64.b64encode(secret).decode(), base64.b64encode(secret).decode().rstrip("="),
            base64.urlsafe_b64encode(secret).decode().rstrip("="), secret.hex(), secret.hex().upper()}


# === end to end: a FRA user through the FRA KAS ==========================================================
LAYOUTS: dict[str, list[list[tuple[str, KeyAlgorithm]]]] = {
    "any-of": [[("USA", "rsa:2048"), ("GBR", "ec:secp256r1"), ("FRA", "rsa:2048")]],
    "any-of-foreign": [[("USA", "ec:secp256r1"), ("GBR", "rsa:2048")]],
    "all-of": [[("USA", "ec:secp256r1")], [("GBR", "rsa:2048")], [("FRA", "ec:secp256r1")]],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("client_key_type", ["rsa", "ec"])
def test_brokered_round_trip(co: Coalition, layout: str, client_key_type: str) -> None:
    data = f"{layout} {client_key_type}".encode() * 100
    out = io.BytesIO()
    encrypt(io.BytesIO(data), out, policy=policy(),
            splits=[[co.kas_key(n, a) for n, a in alts] for alts in LAYOUTS[layout]])
    bob = HomeKasClient(co.transport, co.token("FRA", "bob", "SECRET DEFENSE"), home=co.url("FRA"),
                        client_key_type=client_key_type)
    before = len(co.audit.events)
    plain = io.BytesIO()
    decrypt(io.BytesIO(out.getvalue()), plain, bob)
    assert plain.getvalue() == data
    events = co.audit.events[before:]
    assert not [e for e in events if e.action in (AuditAction.KEY_DENIED, AuditAction.KEY_ERROR,
                                                  AuditAction.FORWARD_FAILED, AuditAction.REQUEST_REJECTED)]
    released = [e for e in events if e.action is AuditAction.KEY_RELEASED]
    assert {e.request_id for e in events} == {events[0].request_id}  # one request to the home, one id
    for event in released:  # peers served the forward: hops name the home
        assert event.hops == ([] if event.nation == "FRA" else ["FRA"])
    if layout == "all-of":
        assert sorted(e.nation for e in released) == ["FRA", "GBR", "USA"]
        routed = {e.peer for e in events if e.action is AuditAction.FORWARD_RESULT}
        assert routed == {"USA", "GBR"}
    if layout == "any-of-foreign":
        assert {e.nation for e in released} <= {"USA", "GBR"} and released


def test_dpop_bound_token_brokered_end_to_end(co: Coalition) -> None:
    """A DPoP-bound token works through the home: peers check the forwarded signed request themselves."""
    dpop_key = ec.generate_private_key(ec.SECP256R1())
    token = co.token("FRA", "bob", "SECRET DEFENSE", cnf_jkt=jwk_thumbprint(public_jwk(dpop_key.public_key())))
    out = io.BytesIO()
    encrypt(io.BytesIO(b"bound"), out, policy=policy(), splits=[[co.kas_key("USA")], [co.kas_key("GBR")]])
    plain = io.BytesIO()
    decrypt(io.BytesIO(out.getvalue()), plain,
            HomeKasClient(co.transport, token, home=co.url("FRA"), dpop_key=dpop_key))
    assert plain.getvalue() == b"bound"
    with pytest.raises(KasRayError):  # the same token with another DPoP key is refused at the home
        decrypt(io.BytesIO(out.getvalue()), io.BytesIO(), HomeKasClient(co.transport, token, home=co.url("FRA")))


def test_denial_at_a_peer_is_a_per_kao_forbidden_result(co: Coalition) -> None:
    pol = policy(rel=["USA"])  # FRA users may not read it: USA denies
    token = co.token("FRA", "bob", "SECRET DEFENSE")
    call = home_call(co, "FRA", token, pol, {"usa": co.kao("USA", pol, share())})
    _, results = rewrap(co.services["FRA"], call)
    assert results["usa"].status == "fail" and results["usa"].error == OPENTDF_FORBIDDEN
    assert results["usa"].kas_wrapped_key is None
    (denied,) = co.events(call.request_id, "USA", AuditAction.KEY_DENIED)
    assert denied.hops == ["FRA"] and any("nationality FRA is not in releasable-to" in r for r in denied.reasons)
    (routed,) = co.events(call.request_id, "FRA", AuditAction.FORWARD_RESULT)
    assert routed.peer == "USA" and routed.reasons == ["0 of 1 key access objects released by USA"]
    # Through the client, the denial is an AccessDenied for the object.
    out = io.BytesIO()
    encrypt(io.BytesIO(b"noforn"), out, splits=[[co.kas_key("USA")]], policy=pol)
    with pytest.raises(AccessDenied):
        decrypt(io.BytesIO(out.getvalue()), io.BytesIO(), HomeKasClient(co.transport, token, home=co.url("FRA")))


# --- anyOf with a local alternative: local first, peers only when they can change the answer -----------
def _alternatives(co: Coalition, pol: Policy, secret: bytes, nations: Iterable[str]) -> dict[str, KeyAccessObject]:
    """KAOs of one split (anyOf): the same share wrapped to each nation."""
    sid = uuid.uuid4().hex[:12]
    return {n.lower(): wrap_share(co.kas_key(n), secret, pol.to_base64(), sid=sid) for n in nations}


@pytest.fixture
def hedge(co: Coalition) -> Iterator[Callable[[float | None], None]]:
    """Sets FRA's local-first hedge delay for one test."""
    federation, original = co.fed("FRA"), co.fed("FRA").config

    def set_delay(seconds: float | None) -> None:
        federation.config = original.model_copy(update={"local_first_seconds": seconds})

    yield set_delay
    federation.config = original


def test_any_of_released_locally_sends_no_forward(co: Coalition, hedge: Callable[[float | None], None]) -> None:
    hedge(5.0)
    pol, secret = policy(), share()
    call = home_call(co, "FRA", co.token("FRA", "bob", "SECRET DEFENSE"), pol,
                     _alternatives(co, pol, secret, ["FRA", "USA", "GBR"]))
    started = time.perf_counter()
    _, results = rewrap(co.services["FRA"], call)
    assert time.perf_counter() - started < 2.0  # nobody waited for the 5 s hedge
    assert client().unwrap(_, results["fra"]) == secret
    assert results["usa"].status == results["gbr"].status == "fail" and "not needed" in (results["usa"].error or "")
    # The peers never saw the request: no record at USA or GBR, and FRA audited why.
    assert co.events(call.request_id, "USA") == [] and co.events(call.request_id, "GBR") == []
    held = co.events(call.request_id, "FRA", AuditAction.FORWARD_CANCELLED)
    assert sorted(e.peer for e in held) == ["GBR", "USA"]
    assert {tuple(e.reasons) for e in held} == {("not forwarded: released locally first",)}


def test_any_of_local_failure_forwards_at_once(co: Coalition, hedge: Callable[[float | None], None]) -> None:
    """The local KAO cannot be unwrapped (a corrupted wrapped key): the peer is asked without waiting."""
    hedge(5.0)
    pol, secret = policy(), share()
    kaos = _alternatives(co, pol, secret, ["FRA", "USA"])
    broken = bytearray(base64.b64decode(kaos["fra"].wrapped_key))
    broken[10] ^= 1
    kaos["fra"] = kaos["fra"].model_copy(update={"wrapped_key": base64.b64encode(bytes(broken)).decode()})
    call = home_call(co, "FRA", co.token("FRA", "bob", "SECRET DEFENSE"), pol, kaos)
    started = time.perf_counter()
    response, results = rewrap(co.services["FRA"], call)
    assert time.perf_counter() - started < 2.0
    assert results["fra"].status == "fail" and client().unwrap(response, results["usa"]) == secret
    assert [e.action for e in co.events(call.request_id, "USA")] == [AuditAction.KEY_RELEASED]


def test_any_of_without_hedge_asks_every_alternative(co: Coalition, hedge: Callable[[float | None], None]) -> None:
    """local_first_seconds None: every alternative is asked at once, the first permit wins."""
    hedge(None)
    pol, secret = policy(), share()
    call = home_call(co, "FRA", co.token("FRA", "bob", "SECRET DEFENSE"), pol,
                     _alternatives(co, pol, secret, ["FRA", "USA"]))
    response, results = rewrap(co.services["FRA"], call)
    permits = [k for k, r in results.items() if r.status == "permit"]  # the local work is never cancelled
    assert permits and all(client().unwrap(response, results[k]) == secret for k in permits)
    # Sent: one record, answered or cancelled (never both, even when its answer was on the way).
    sent = co.events(call.request_id, "FRA", AuditAction.FORWARD_CANCELLED) + \
        co.events(call.request_id, "FRA", AuditAction.FORWARD_RESULT)
    assert [e.peer for e in sent] == ["USA"]
    assert sent[0].reasons != ["not forwarded: released locally first"]


def test_local_transport_kind_needs_a_transport(co: Coalition) -> None:
    config = co.fed("FRA").config
    assert {p.transport for p in config.peers} == {"local"}
    with pytest.raises(ConfigError, match="local"):
        Federation("FRA", config, co.fed("FRA").key, replay=MemoryReplayStore())


# === envelope level ======================================================================================
@dataclass
class Kit:
    """Standalone federation keys; USA's registry lists FRA and GBR, FRA's lists USA and GBR."""

    fra: FederationKey
    usa: FederationKey
    gbr: FederationKey
    evil_fra: FederationKey  # claims to be FRA, key not in any registry
    deu: FederationKey  # a nation no registry lists

    @property
    def usa_registry(self) -> dict[str, dict[str, str]]:
        return {"FRA": self.fra.public_jwk, "GBR": self.gbr.public_jwk}

    @property
    def fra_registry(self) -> dict[str, dict[str, str]]:
        return {"USA": self.usa.public_jwk, "GBR": self.gbr.public_jwk}


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    root = tmp_path_factory.mktemp("fedkeys")
    return Kit(*(FederationKey(root / f"{name}.pem", nation) for name, nation in
                 [("fra", "FRA"), ("usa", "USA"), ("gbr", "GBR"), ("evil", "FRA"), ("deu", "DEU")]))


BODY = json.dumps({"token": "t", "keyAccessObjects": []})


def digest(text: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()


def claims(now: float, **overrides: Any) -> dict[str, Any]:
    base = {"iss": "FRA", "aud": "USA", "jti": secrets.token_urlsafe(18), "iat": now, "exp": now + 30,
            "hops": ["FRA"], "body_sha256": digest(BODY), "deadline": now + 10}
    return {k: v for k, v in {**base, **overrides}.items() if v is not ...}


def at_usa(message: Any, kit: Kit, now: float | None = None, hop_limit: int = 3) -> tuple[ForwardClaims, dict]:
    return verify_forward(message, me="USA", keys=kit.usa_registry, hop_limit=hop_limit,
                          seen=MemoryReplayStore().check_and_store, now=now)


def test_forward_round_trip(kit: Kit) -> None:
    now = time.time()
    message = sign_forward(kit.fra, "usa", BODY, hops=[], ttl=30, deadline=now + 10, now=now)
    parsed_claims, body = at_usa(message, kit)
    assert body == json.loads(BODY)
    assert (parsed_claims.iss, parsed_claims.aud, parsed_claims.hops) == ("FRA", "USA", ["FRA"])
    assert parsed_claims.jti == forward_nonce(message) and parsed_claims.exp == pytest.approx(now + 30)
    reply = sign_result(kit.usa, parsed_claims, '{"results":[]}')
    assert verify_result(reply, me="FRA", peer="USA", nonce=parsed_claims.jti, keys=kit.fra_registry) == {
        "results": []}
    # Two hops (GBR forwarded what FRA sent it) within the limit.
    relayed = sign_forward(kit.gbr, "USA", BODY, hops=["FRA"], ttl=30, deadline=now + 10)
    assert at_usa(relayed, kit)[0].hops == ["FRA", "GBR"]


Forge = Callable[[Kit, float], tuple[Any, float]]


def _signed(key: FederationKey, now: float, typ: str = FORWARD_TYP, body: str = BODY,
            **overrides: Any) -> tuple[dict[str, str], float]:
    return {"envelope": key.sign(claims(now, **overrides), typ), "body": body}, now


def _fwd(key: FederationKey, target: str = "USA", hops: Iterable[str] = (), body: str = BODY,
         sign_now: float | None = None) -> dict[str, str]:
    now = time.time() if sign_now is None else sign_now
    return sign_forward(key, target, body, hops=list(hops), ttl=30, deadline=now + 10, now=now)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(alg: str, key: bytes, now: float) -> tuple[dict[str, str], float]:
    """``alg: none``, or HS256 keyed with a public key (algorithm confusion), built by hand."""
    header = _b64(json.dumps({"alg": alg, "typ": FORWARD_TYP, "kid": "FRA"}).encode())
    payload = _b64(json.dumps(claims(now)).encode())
    signature = _b64(hmac.new(key, f"{header}.{payload}".encode(), "sha256").digest()) if key else ""
    return {"envelope": f"{header}.{payload}.{signature}", "body": BODY}, now


FORGED: dict[str, tuple[Forge, str]] = {
    "bad-signature": (lambda k, t: (_fwd(k.evil_fra), t), "signature does not verify"),
    "unknown-forwarder": (lambda k, t: (_fwd(k.deu), t), "not in the KAS registry"),
    "wrong-audience": (lambda k, t: (_fwd(k.fra, "GBR"), t), "signature does not verify: InvalidAudience"),
    "expired": (lambda k, t: (_fwd(k.fra), t + 31), "expired"),
    "issued-in-the-future": (lambda k, t: (_fwd(k.fra, sign_now=t + 120), t), "issued in the future"),
    "hop-limit": (lambda k, t: (_fwd(k.fra, hops=["DEU", "ITA", "GBR"]), t), r"hop limit exceeded \(4 > 3\)"),
    "loop-target-in-hops": (lambda k, t: (_fwd(k.fra, hops=["USA"]), t), "loop"),
    "loop-duplicate-hop": (lambda k, t: (_fwd(k.fra, hops=["GBR", "GBR"]), t), "loop"),
    "loop-forwarder-twice": (lambda k, t: (_fwd(k.fra, hops=["FRA"]), t), "loop"),
    "hops-not-ending-with-forwarder": (lambda k, t: _signed(k.fra, t, hops=["FRA", "GBR"]),
                                       "does not end with the forwarder"),
    "body-altered": (lambda k, t: ({**_fwd(k.fra), "body": BODY.replace('"t"', '"u"')}, t),
                     "body does not match its signature"),
    "body-swapped": (lambda k, t: ({**_fwd(k.fra), "body": "{}"}, t), "body does not match"),
    "typ-result": (lambda k, t: _signed(k.fra, t, typ=RESULT_TYP), "unexpected signature type"),
    "typ-jwt": (lambda k, t: _signed(k.fra, t, typ="JWT"), "unexpected signature type"),
    "alg-none": (lambda k, t: _unsigned("none", b"", t), "unexpected signature type or algorithm"),
    "alg-hs256-public-jwk": (lambda k, t: _unsigned("HS256", json.dumps(k.fra.public_jwk).encode(), t),
                             "unexpected signature type or algorithm"),
    "alg-hs256-public-pem": (lambda k, t: _unsigned("HS256", P.public_key_pem(
        k.fra._key.public_key()).encode(), t), "unexpected signature type or algorithm"),
    "oversize-body": (lambda k, t: (_fwd(k.fra, body=" " * (MAX_MESSAGE_CHARS + 1)), t), "too large"),
    "oversize-envelope": (lambda k, t: ({"envelope": "e" * (MAX_MESSAGE_CHARS + 1), "body": BODY}, t), "too large"),
    "no-envelope": (lambda k, t: ({"body": BODY}, t), "missing"),
    "no-body": (lambda k, t: ({"envelope": _fwd(k.fra)["envelope"]}, t), "missing"),
    "not-a-jws": (lambda k, t: ({"envelope": "not.a.jws", "body": BODY}, t), "well-formed"),
    "not-a-mapping": (lambda k, t: (["envelope", "body"], t), "missing"),
    "times-not-numbers": (lambda k, t: _signed(k.fra, t, exp="later"), "not numbers"),
    "exp-nan": (lambda k, t: _signed(k.fra, t, exp=float("nan")), "expired"),  # would never expire
    "iat-nan": (lambda k, t: _signed(k.fra, t, iat=float("nan")), "future"),
    "exp-missing": (lambda k, t: _signed(k.fra, t, exp=...), "does not verify"),
    "hops-empty": (lambda k, t: _signed(k.fra, t, hops=[]), "malformed"),
    "jti-missing": (lambda k, t: _signed(k.fra, t, jti=...), "malformed"),
    "body-not-json": (lambda k, t: _signed(k.fra, t, body="{x", body_sha256=digest("{x")), "not JSON"),
    "body-not-object": (lambda k, t: _signed(k.fra, t, body="[]", body_sha256=digest("[]")), "JSON object"),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_forged_forward_is_refused(kit: Kit, case: str) -> None:
    forge, match = FORGED[case]
    message, now = forge(kit, time.time())
    with pytest.raises(ForwardError, match=match):
        at_usa(message, kit, now=now)


def test_replayed_forward_is_refused(kit: Kit) -> None:
    store = MemoryReplayStore()

    def check(message: dict[str, str]) -> ForwardClaims:
        return verify_forward(message, me="USA", keys=kit.usa_registry, hop_limit=3, seen=store.check_and_store)[0]

    message = _fwd(kit.fra)
    check(message)
    with pytest.raises(ForwardError, match="replay"):
        check(message)
    with pytest.raises(ForwardError, match="replay"):  # a fresh body does not make an old nonce new
        check({**message, "body": BODY})
    check(_fwd(kit.fra))  # a new forward is fine
    # Nonces are per forwarder: GBR may use any jti without clashing with FRA's.
    same_jti = jwt.decode(message["envelope"], options={"verify_signature": False})["jti"]
    gbr = {"envelope": kit.gbr.sign(claims(time.time(), iss="GBR", hops=["GBR"], jti=same_jti), FORWARD_TYP),
           "body": BODY}
    assert check(gbr).iss == "GBR"


def test_hop_limit_is_the_receivers(kit: Kit) -> None:
    message = _fwd(kit.gbr, hops=["FRA"])  # two hops
    with pytest.raises(ForwardError, match=r"hop limit exceeded \(2 > 1\)"):
        at_usa(message, kit, hop_limit=1)
    assert at_usa(message, kit, hop_limit=2)[0].hops == ["FRA", "GBR"]


RESULT_FORGED: dict[str, tuple[Callable[[Kit, ForwardClaims], dict[str, Any]], str]] = {
    "tampered-body": (lambda k, c: {**sign_result(k.usa, c, '{"results":[]}'), "body": '{"results":[{}]}'},
                      "altered"),
    "signed-by-other-peer": (lambda k, c: sign_result(k.gbr, c, "{}"), "signed by GBR, not by the peer USA"),
    "signed-by-impostor": (lambda k, c: sign_result(FederationKey(k.usa.path.with_name("imp.pem"), "USA"), c, "{}"),
                           "does not verify"),
    "other-nonce": (lambda k, c: sign_result(k.usa, c.model_copy(update={"jti": "another"}), "{}"),
                    "answers another forward"),
    "addressed-to-other-home": (lambda k, c: sign_result(k.usa, c.model_copy(update={"iss": "GBR"}), "{}"),
                                "InvalidAudience"),
    "expired": (lambda k, c: sign_result(k.usa, c, "{}", ttl=-1), "expired"),
    "forward-typ": (lambda k, c: {"result": k.usa.sign({"iss": "USA", "aud": "FRA", "in_reply_to": c.jti,
                                                        "iat": time.time(), "exp": time.time() + 9,
                                                        "body_sha256": digest("{}")}, FORWARD_TYP), "body": "{}"},
                    "unexpected signature type"),
    "not-an-object": (lambda k, c: sign_result(k.usa, c, "[]"), "JSON object"),
}


@pytest.mark.parametrize("case", list(RESULT_FORGED))
def test_forged_result_is_refused(kit: Kit, case: str) -> None:
    forward = at_usa(_fwd(kit.fra), kit)[0]
    forge, match = RESULT_FORGED[case]
    with pytest.raises(ForwardError, match=match):
        verify_result(forge(kit, forward), me="FRA", peer="USA", nonce=forward.jti, keys=kit.fra_registry)


# === result level: a malicious peer answering the home ====================================================
class ForgingPeer(PeerTransport):
    """A double of the USA KAS: the real service answers, then ``tamper`` rewrites its signed reply."""

    def __init__(self, co: Coalition, tamper: Callable[[dict[str, str], dict[str, Any]], dict[str, Any]]) -> None:
        self.real = LocalPeerTransport(co.services)
        self.tamper = tamper
        self.replies: list[dict[str, Any]] = []

    async def forward(self, peer: PeerConfig, message: dict[str, Any], timeout: float, *,
                      batchable: bool = False) -> dict[str, Any]:
        honest = await self.real.forward(peer, message, timeout)
        self.replies.append(honest)
        return self.tamper(message, honest)


def _claims_of(message: dict[str, str]) -> ForwardClaims:
    return ForwardClaims.model_validate(jwt.decode(message["envelope"], options={"verify_signature": False}))


def _resign(co: Coalition, signer: str, message: dict[str, str], body: dict[str, Any],
            **claim_updates: Any) -> dict[str, str]:
    forward = _claims_of(message).model_copy(update=claim_updates)
    return sign_result(co.fed(signer).key, forward, json.dumps(body))


def _with_extra_result(co: Coalition, message: dict[str, str], honest: dict[str, Any]) -> dict[str, Any]:
    body = json.loads(honest["body"])
    stolen = dict(body["results"][0], keyAccessObjectId="fra-local")  # claims a KAO sent elsewhere
    return _resign(co, "USA", message, {**body, "results": [*body["results"], stolen]})


TAMPERS: dict[str, tuple[Callable[[Coalition, dict[str, str], dict[str, Any]], dict[str, Any]], str]] = {
    "result-for-kao-not-forwarded": (_with_extra_result, "answered for key access objects it was not sent"),
    "body-tampered": (lambda co, m, h: {**h, "body": h["body"].replace('"permit"', '"permit" ')}, "altered"),
    "signed-by-other-peer": (lambda co, m, h: _resign(co, "GBR", m, json.loads(h["body"])),
                             "signed by GBR, not by the peer USA"),
    "answers-other-nonce": (lambda co, m, h: _resign(co, "USA", m, json.loads(h["body"]), jti="other"),
                            "answers another forward"),
    "malformed-results": (lambda co, m, h: _resign(co, "USA", m, {"results": [{"status": "maybe"}]}),
                          "malformed results"),
    "unsigned": (lambda co, m, h: {"body": h["body"]}, "signature is missing"),
}


def forging_home(co: Coalition, transport: PeerTransport, **config: Any) -> tuple[RewrapService, MemoryAuditSink]:
    """A FRA KAS (FRA's keys, trust and federation key) whose peers are reached through ``transport``;
    ``config``: FederationConfig fields to change."""
    fra, sink = co.services["FRA"], MemoryAuditSink()
    replay = MemoryReplayStore()
    federation = Federation("FRA", co.fed("FRA").config.model_copy(update=config), co.fed("FRA").key, replay=replay,
                            transports={"local": transport})
    return RewrapService("FRA", keys=fra.keys, trust=fra.trust, policy=fra.policy, replay=replay, audit=sink,
                         public_urls=[co.url("FRA")], federation=federation), sink


@pytest.mark.parametrize("case", list(TAMPERS))
def test_tampered_peer_result_is_refused(co: Coalition, case: str) -> None:
    tamper, match = TAMPERS[case]
    peer = ForgingPeer(co, lambda m, h: tamper(co, m, h))
    home, sink = forging_home(co, peer)
    pol, token = policy(), co.token("FRA", "bob", "SECRET DEFENSE")
    usa_kao = co.kao("USA", pol, share())

    # Federation.forward refuses the answer outright.
    federation = home.federation
    assert federation is not None
    body = forward_body(token, pol, {"usa": usa_kao})
    with pytest.raises(ForwardError, match=match):
        asyncio.run(federation.forward(federation.peers["USA"], body, hops=[], deadline=time.time() + 10))
    assert json.loads(peer.replies[-1]["body"])["results"][0]["status"] == "permit"  # the real USA did answer

    # Through the service: per-KAO failures, no key, FORWARD_FAILED; the local KAO is unaffected.
    fra_share = share()
    call = home_call(co, "FRA", token, pol, {"usa": usa_kao, "fra-local": co.kao("FRA", pol, fra_share)})
    response, results = rewrap(home, call)
    assert results["usa"].status == "fail" and results["usa"].kas_wrapped_key is None
    assert results["usa"].error == OPENTDF_BAD_REQUEST
    assert results["fra-local"].status == "permit"
    assert client().unwrap(response, results["fra-local"]) == fra_share
    (failed,) = [e for e in sink.events if e.action is AuditAction.FORWARD_FAILED]
    assert failed.peer == "USA" and failed.error_code == "invalid_forward" and failed.decision == "error"
    assert failed.request_id == call.request_id
    assert not [e for e in sink.events if e.action is AuditAction.FORWARD_RESULT]
    assert [e.kao_id for e in sink.events if e.action is AuditAction.KEY_RELEASED] == ["fra-local"]
    assert json.loads(peer.replies[-1]["body"])["results"][0]["status"] == "permit"


def test_replayed_peer_result_is_refused(co: Coalition) -> None:
    """USA's genuine, correctly signed answer to one forward, replayed as the answer to the next."""

    class Replaying(ForgingPeer):
        async def forward(self, peer: PeerConfig, message: dict[str, Any], timeout: float, *,
                          batchable: bool = False) -> dict[str, Any]:
            honest = await self.real.forward(peer, message, timeout)
            self.replies.append(honest)
            return self.replies[0]

    home, sink = forging_home(co, Replaying(co, lambda m, h: h))
    pol, token = policy(), co.token("FRA", "bob", "SECRET DEFENSE")
    kaos = {"usa": co.kao("USA", pol, share())}
    _, first = rewrap(home, home_call(co, "FRA", token, pol, kaos))
    assert first["usa"].status == "permit"
    call = home_call(co, "FRA", token, pol, kaos)
    _, second = rewrap(home, call)
    assert second["usa"].status == "fail" and second["usa"].kas_wrapped_key is None
    (failed,) = [e for e in sink.events if e.action is AuditAction.FORWARD_FAILED]
    assert failed.request_id == call.request_id and "answers another forward" in failed.reasons[0]


def test_unavailable_peer_is_a_per_kao_failure(co: Coalition) -> None:
    home, sink = forging_home(co, LocalPeerTransport({}))  # USA is not in this process
    pol, token = policy(), co.token("FRA", "bob", "SECRET DEFENSE")
    call = home_call(co, "FRA", token, pol, {"usa": co.kao("USA", pol, share())})
    _, results = rewrap(home, call)
    assert results["usa"].status == "fail" and results["usa"].error.startswith("rpc error: code = Unavailable")
    (failed,) = [e for e in sink.events if e.action is AuditAction.FORWARD_FAILED]
    assert failed.error_code == PeerUnavailable.code


def _records_of(sink: MemoryAuditSink, call: RewrapCall, kao_id: str, peer: str | None = None) -> list[str]:
    """The home's records about one KAO: its decision, or (brokered) the forward's outcome."""
    return [e.action.value for e in sink.events if e.request_id == call.request_id
            and (e.kao_id == kao_id or (peer is not None and e.kao_id is None and e.peer == peer))]


def test_request_cancelled_as_its_forward_answers_records_each_kao_once(co: Coalition) -> None:
    """The client goes away just as USA's answer arrives (found by perf/faults.py under overload): the
    forward has recorded its outcome, so the home records no second, contradicting failure for it."""

    class Leaving(ForgingPeer):
        victim: asyncio.Task[Any] | None = None

        async def forward(self, peer: PeerConfig, message: dict[str, Any], timeout: float, *,
                          batchable: bool = False) -> dict[str, Any]:
            honest = await self.real.forward(peer, message, timeout)
            assert self.victim is not None
            self.victim.cancel()  # the home's request is cancelled before it sees the finished forward
            return honest

    peer = Leaving(co, lambda m, h: h)
    home, sink = forging_home(co, peer)
    pol, token = policy(), co.token("FRA", "bob", "SECRET DEFENSE")
    call = home_call(co, "FRA", token, pol, {"usa": co.kao("USA", pol, share()), "fra": co.kao("FRA", pol, share())})

    async def scenario() -> None:
        peer.victim = asyncio.ensure_future(home.rewrap(call))
        with pytest.raises(asyncio.CancelledError):
            await peer.victim

    asyncio.run(scenario())
    assert _records_of(sink, call, "usa", "USA") == ["FORWARD_RESULT"]
    assert len(_records_of(sink, call, "fra")) == 1


def test_forward_that_outlives_the_deadline_records_nothing_more(co: Coalition) -> None:
    """A forward still running at the deadline is cancelled and recorded as failed. If it goes on anyway
    (a cancellation can be lost, e.g. in Python 3.11's ``wait_for``), its late answer is not recorded."""

    class Deaf(ForgingPeer):
        answered: asyncio.Event

        async def forward(self, peer: PeerConfig, message: dict[str, Any], timeout: float, *,
                          batchable: bool = False) -> dict[str, Any]:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)
            honest = await self.real.forward(peer, message, timeout)
            self.answered.set()
            return honest

    peer = Deaf(co, lambda m, h: h)
    home, sink = forging_home(co, peer, deadline_seconds=0.3)
    pol, token = policy(), co.token("FRA", "bob", "SECRET DEFENSE")
    call = home_call(co, "FRA", token, pol, {"usa": co.kao("USA", pol, share())})

    async def scenario() -> RewrapResponse:
        peer.answered = asyncio.Event()
        response = await home.rewrap(call)
        await asyncio.wait_for(peer.answered.wait(), 10)
        for _ in range(3):
            await asyncio.sleep(0)  # the late forward finishes (and would audit its result)
        return response

    response = asyncio.run(scenario())
    (result,) = response.responses[0].results
    assert result.status == "fail" and result.error == "rpc error: code = Unavailable desc = USA: deadline exceeded"
    assert _records_of(sink, call, "usa", "USA") == ["KEY_ERROR"]


# === serving side: RewrapService.handle_forward ===========================================================
def _rejected(co: Coalition, target: str, request_id: str | None, error: str) -> AuditEvent:
    events = [e for e in co.audit.events if e.nation == target and e.action is AuditAction.REQUEST_REJECTED
              and (request_id is None or e.request_id == request_id)]
    assert events, f"no REQUEST_REJECTED at {target}"
    assert events[-1].error_code == error and events[-1].decision == "reject"
    return events[-1]


def test_valid_forward_is_served(co: Coalition) -> None:
    pol, secret = policy(), share()
    body = forward_body(co.token("FRA", "bob", "SECRET DEFENSE"), pol, {"k": co.kao("USA", pol, secret)})
    message = forward_from(co, "FRA", "USA", body)
    reply = serve_forward(co, "USA", message, tls_peer="FRA")
    answer = answer_of(co, "FRA", "USA", message, reply)
    (result,) = answer["results"]
    assert result["status"] == "permit"
    session = P.load_public_key_pem(answer["sessionPublicKey"])
    assert isinstance(session, ec.EllipticCurvePublicKey)
    assert P.ec_unwrap(client().key, session, base64.b64decode(result["kasWrappedKey"])) == secret
    (event,) = co.events(body["requestId"], "USA", AuditAction.KEY_RELEASED)
    assert event.hops == ["FRA"] and event.subject == "bob"
    assert any("within the agreement with FRA" in r for r in event.reasons)


SERVED_FORGED: dict[str, Callable[[Coalition, dict[str, Any]], dict[str, Any]]] = {
    "bad-signature": lambda co, body: sign_forward(
        FederationKey(co.state / "federation" / "impostor.key.pem", "FRA"), "USA", json.dumps(body), hops=[],
        ttl=30, deadline=time.time() + 10),
    "addressed-to-gbr": lambda co, body: forward_from(co, "FRA", "GBR", body),
    "hop-limit": lambda co, body: forward_from(co, "FRA", "USA", body, hops=["DEU", "ITA", "GBR"]),
    "loop": lambda co, body: forward_from(co, "FRA", "USA", body, hops=["USA"]),
    "body-altered": lambda co, body: {**forward_from(co, "FRA", "USA", body),
                                      "body": json.dumps({**body, "clientPublicKey": client("rsa").pem})},
}


@pytest.mark.parametrize("case", list(SERVED_FORGED))
def test_forged_forward_is_refused_and_audited(co: Coalition, case: str) -> None:
    pol = policy()
    body = forward_body(co.token("FRA", "bob", "SECRET DEFENSE"), pol, {"k": co.kao("USA", pol, share())})
    before = len(co.audit.events)
    with pytest.raises(ForwardError):
        serve_forward(co, "USA", SERVED_FORGED[case](co, body))
    (event,) = co.audit.events[before:]
    assert event.action is AuditAction.REQUEST_REJECTED and event.nation == "USA"
    assert event.error_code == "invalid_forward"


def test_replayed_forward_is_refused_by_the_service(co: Coalition) -> None:
    pol = policy()
    body = forward_body(co.token("FRA", "bob", "SECRET DEFENSE"), pol, {"k": co.kao("USA", pol, share())})
    message = forward_from(co, "FRA", "USA", body)
    assert answer_of(co, "FRA", "USA", message, serve_forward(co, "USA", message))["results"][0]["status"] == "permit"
    with pytest.raises(ForwardError, match="replay"):
        serve_forward(co, "USA", message)
    _rejected(co, "USA", None, "invalid_forward")
    assert len(co.events(body["requestId"], "USA", AuditAction.KEY_RELEASED)) == 1


def test_tls_identity_must_match_the_signed_forwarder(co: Coalition) -> None:
    pol = policy()
    body = forward_body(co.token("FRA", "bob", "SECRET DEFENSE"), pol, {"k": co.kao("USA", pol, share())})
    with pytest.raises(ForwardError, match="TLS identity GBR does not match the signed forwarder FRA"):
        serve_forward(co, "USA", forward_from(co, "FRA", "USA", body), tls_peer="GBR")
    _rejected(co, "USA", None, "invalid_forward")
    assert not co.events(body["requestId"], "USA", AuditAction.KEY_RELEASED)
    reply = serve_forward(co, "USA", forward_from(co, "FRA", "USA", body), tls_peer="fra")
    assert json.loads(reply["body"])["results"][0]["status"] == "permit"


def test_forwarded_token_is_reverified_against_the_peers_registry(co: Coalition) -> None:
    pol = policy(rel=[*ALL, "DEU"])
    hans = co.token("DEU", "hans", "SECRET")  # a dev IdP no registry of this coalition lists
    body = forward_body(hans, pol, {"k": co.kao("USA", pol, share())})
    with pytest.raises(UntrustedIssuerError):
        serve_forward(co, "USA", forward_from(co, "FRA", "USA", body))  # envelope valid, token not
    event = _rejected(co, "USA", body["requestId"], "untrusted_issuer")
    assert event.hops == ["FRA"]
    assert issubclass(UntrustedIssuerError, TokenError)


def test_home_trusting_an_issuer_does_not_make_the_peer_trust_it(co: Coalition,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fra = co.services["FRA"]
    wider = dev_trust_registry(co.state, [*NATIONS, "DEU"])
    monkeypatch.setattr(fra, "trust", wider)
    monkeypatch.setattr(fra, "verifier", TokenVerifier(wider))
    pol = policy(rel=[*ALL, "DEU"])
    fra_share = share()
    call = home_call(co, "FRA", co.token("DEU", "hans", "SECRET"), pol,
                     {"fra": co.kao("FRA", pol, fra_share), "usa": co.kao("USA", pol, share())})
    response, results = rewrap(fra, call)
    assert results["fra"].status == "permit" and client().unwrap(response, results["fra"]) == fra_share
    assert results["usa"].status == "fail" and results["usa"].kas_wrapped_key is None
    (failed,) = co.events(call.request_id, "FRA", AuditAction.FORWARD_FAILED)
    assert failed.peer == "USA" and failed.error_code == "untrusted_issuer"
    _rejected(co, "USA", call.request_id, "untrusted_issuer")


def test_dpop_bound_token_needs_the_verified_key(co: Coalition) -> None:
    """A peer rewraps to a client key only if the token's DPoP key signed it (not the forwarder's word)."""
    dpop_key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    jwk = public_jwk(dpop_key.public_key())
    token = co.token("FRA", "bob", "SECRET DEFENSE", cnf_jkt=jwk_thumbprint(jwk))
    pol, who = policy(), client()

    def body_with(key_jwk: dict[str, Any] | None, signer: Any, client_pem: str) -> dict[str, Any]:
        body = forward_body(token, pol, {"k": co.kao("USA", pol, share())}, who=who)
        body["dpopJwk"] = key_jwk
        body["signedRequestToken"] = sign_request({"clientPublicKey": client_pem}, signer) if signer else None
        return body

    forged = [
        (body_with(None, dpop_key, who.pem), DPoPError, "invalid_dpop_proof"),  # no key shown
        (body_with(public_jwk(other.public_key()), other, who.pem), DPoPError, "invalid_dpop_proof"),  # not cnf
        (body_with(jwk, None, who.pem), DPoPError, "invalid_dpop_proof"),  # no signed request
        (body_with(jwk, other, who.pem), SignedRequestError, "invalid_signed_request"),  # signed by another key
        (body_with(jwk, dpop_key, client("rsa").pem), SignedRequestError, "invalid_signed_request"),  # swapped
    ]
    for body, error, code in forged:
        with pytest.raises(error):
            serve_forward(co, "USA", forward_from(co, "FRA", "USA", body))
        _rejected(co, "USA", body["requestId"], code)
    reply = serve_forward(co, "USA", forward_from(co, "FRA", "USA", body_with(jwk, dpop_key, who.pem)))
    assert json.loads(reply["body"])["results"][0]["status"] == "permit"


CAPS: dict[str, tuple[AgreementConfig, AgreementConfig, dict[str, Any], str]] = {
    # cap that denies, cap that admits the same request, policy, reason of the denial
    "nations": (AgreementConfig(nations=["USA", "GBR"]), AgreementConfig(nations=["fra"]), {},
                "does not cover subjects of FRA"),
    "max-classification": (AgreementConfig(max_classification="CONFIDENTIAL"),
                           AgreementConfig(max_classification="SECRET"), {"classification": "SECRET"},
                           "caps classification at CONFIDENTIAL, object is SECRET"),
    "cois": (AgreementConfig(cois=["NATO"]), AgreementConfig(cois=["FVEY", "NATO"]), {"coi": ["FVEY"]},
             "does not cover COI FVEY"),
}


@pytest.mark.parametrize("cap", list(CAPS))
def test_agreement_caps(co: Coalition, monkeypatch: pytest.MonkeyPatch, cap: str) -> None:
    denying, admitting, pol_args, reason = CAPS[cap]
    usa_registry = co.fed("USA").peers
    token = co.token("FRA", "bob", "SECRET DEFENSE", ["FVEY"])
    pol = policy(**pol_args)

    def brokered(agreement: AgreementConfig | None) -> tuple[RewrapCall, KaoResult]:
        if agreement is not None:
            monkeypatch.setitem(usa_registry, "FRA", usa_registry["FRA"].model_copy(update={"agreement": agreement}))
        call = home_call(co, "FRA", token, pol, {"usa": co.kao("USA", pol, share())})
        return call, rewrap(co.services["FRA"], call)[1]["usa"]

    assert brokered(None)[1].status == "permit"  # no cap: the same request is served
    call, result = brokered(denying)
    assert result.status == "fail" and result.error == OPENTDF_FORBIDDEN and result.kas_wrapped_key is None
    (denied,) = co.events(call.request_id, "USA", AuditAction.KEY_DENIED)
    assert denied.hops == ["FRA"] and any(reason in r for r in denied.reasons), denied.reasons
    assert any("agreement" in r for r in denied.reasons)
    (routed,) = co.events(call.request_id, "FRA", AuditAction.FORWARD_RESULT)
    assert "0 of 1" in routed.reasons[0]
    call, result = brokered(admitting)
    assert result.status == "permit"
    (released,) = co.events(call.request_id, "USA", AuditAction.KEY_RELEASED)
    assert any("within the agreement with FRA" in r for r in released.reasons)
    # The cap binds what FRA brokers, not what the user asks the USA KAS directly.
    monkeypatch.setitem(usa_registry, "FRA", usa_registry["FRA"].model_copy(update={"agreement": denying}))
    direct = home_call(co, "USA", token, pol, {"usa": co.kao("USA", pol, share())})
    assert rewrap(co.services["USA"], direct)[1]["usa"].status == "permit"
    # Another forwarder's entry is untouched by FRA's cap.
    body = forward_body(token, pol, {"k": co.kao("USA", pol, share())})
    reply = serve_forward(co, "USA", forward_from(co, "GBR", "USA", body))
    assert json.loads(reply["body"])["results"][0]["status"] == "permit"


def test_forwarded_request_is_not_forwarded_again(co: Coalition) -> None:
    pol, secret = policy(), share()
    body = forward_body(co.token("FRA", "bob", "SECRET DEFENSE"), pol,
                        {"usa": co.kao("USA", pol, secret), "gbr": co.kao("GBR", pol, share())})
    sent = co.fed("USA").counters["forwards_sent"]
    gbr_received = co.fed("GBR").counters["forwards_received"]
    message = forward_from(co, "FRA", "USA", body)
    results = {r["keyAccessObjectId"]: r for r in answer_of(co, "FRA", "USA", message,
                                                            serve_forward(co, "USA", message))["results"]}
    assert results["usa"]["status"] == "permit"
    assert results["gbr"]["status"] == "fail" and results["gbr"]["error"] == OPENTDF_BAD_REQUEST
    assert not results["gbr"].get("kasWrappedKey")
    assert co.fed("USA").counters["forwards_sent"] == sent
    assert co.fed("GBR").counters["forwards_received"] == gbr_received
    (error,) = co.events(body["requestId"], "USA", AuditAction.KEY_ERROR)
    assert error.kao_id == "gbr" and "forwarded requests are not forwarded again" in error.reasons[0]
    assert not co.events(body["requestId"], "GBR")


# === no share at the home ===================================================================================
class Recording(PeerTransport):
    """A wire tap between the home and its peers (records, changes nothing)."""

    def __init__(self, inner: PeerTransport) -> None:
        self.inner = inner
        self.wire: list[str] = []

    async def forward(self, peer: PeerConfig, message: dict[str, Any], timeout: float, *,
                      batchable: bool = False) -> dict[str, Any]:
        reply = await self.inner.forward(peer, message, timeout)
        self.wire += [json.dumps(message), json.dumps(reply)]
        return reply


@pytest.mark.parametrize("client_key_type", ["rsa", "ec"])
@pytest.mark.parametrize("kas_algorithm", ["rsa:2048", "ec:secp256r1"])
def test_home_never_holds_the_peers_share(co: Coalition, client_key_type: str, kas_algorithm: KeyAlgorithm) -> None:
    tap = Recording(LocalPeerTransport(co.services))
    home, sink = forging_home(co, tap)
    who, pol, secret = client(client_key_type), policy(), share()
    call = home_call(co, "FRA", co.token("FRA", "bob", "SECRET DEFENSE"), pol,
                     {"usa": co.kao("USA", pol, secret, kas_algorithm)}, who=who)
    response, results = rewrap(home, call)
    result = results["usa"]
    assert result.status == "permit"
    assert who.unwrap(response, result) == secret  # the client's key opens it
    # Nothing the home emitted, answered or saw on the wire holds the share in any encoding.
    leaks = forms(secret)
    haystacks = [json.dumps(response.to_wire()), *(e.model_dump_json() for e in sink.events), *tap.wire]
    assert not [n for n in leaks for h in haystacks if n in h]
    assert {e.action for e in sink.events} == {AuditAction.FORWARD_RESULT}
    assert secret not in [v for _, v in home.cache._data.values()]  # type: ignore[attr-defined]
    # No key the home holds opens the peer's kasWrappedKey.
    wrapped = base64.b64decode(result.kas_wrapped_key or "")
    fra_keys = list(co.services["FRA"].keys._private.values())  # type: ignore[attr-defined]
    if client_key_type == "rsa":
        candidates = [k for k in fra_keys if isinstance(k, rsa.RSAPrivateKey)]
        assert candidates
        for private in candidates:
            for oaep in ("sha1", "sha256"):
                with pytest.raises(ValueError):  # noqa: PT011 - "Decryption failed" or a size mismatch
                    P.rsa_oaep_decrypt(private, wrapped, oaep)
    else:
        session = P.load_public_key_pem(result.metadata["sessionPublicKey"])
        assert isinstance(session, ec.EllipticCurvePublicKey)
        assert result.metadata["sessionPublicKey"] != response.session_public_key  # USA's, not the home's
        candidates = [k for k in fra_keys if isinstance(k, ec.EllipticCurvePrivateKey)]
        assert candidates
        for private in candidates:
            with pytest.raises(InvalidTag):
                P.ec_unwrap(private, session, wrapped)


# === which forwards may be batched ===========================================================================
class FlagTap(PeerTransport):
    """Records, per peer, whether the home offered a forward for batching (changes nothing)."""

    def __init__(self, inner: PeerTransport) -> None:
        self.inner = inner
        self.flags: dict[str, bool] = {}

    async def forward(self, peer: PeerConfig, message: dict[str, Any], timeout: float, *,
                      batchable: bool = False) -> dict[str, Any]:
        self.flags[peer.nation] = batchable
        return await self.inner.forward(peer, message, timeout)


@pytest.mark.parametrize(("shape", "expected"), [
    ("allOf, two peers", {"USA": True, "GBR": True}),
    ("anyOf, two peers", {"USA": False, "GBR": False}),
    ("anyOf, the home and a peer", {"USA": False}),
    ("allOf and a split both peers hold", {"USA": False, "GBR": False}),
])
def test_only_forwards_nobody_else_can_answer_are_offered_for_batching(co: Coalition, shape: str,
                                                                       expected: dict[str, bool]) -> None:
    """A batched forward cannot be cancelled at the peer, so only forwards whose splits no other KAS holds
    (allOf) are offered: an anyOf forward must stay cancellable once another KAS released its split."""
    tap = FlagTap(LocalPeerTransport(co.services))
    home, _ = forging_home(co, tap, local_first_seconds=None)
    pol, token = policy(), co.token("FRA", "bob", "SECRET DEFENSE")
    if shape == "allOf, two peers":
        kaos = {"usa": co.kao("USA", pol, share()), "gbr": co.kao("GBR", pol, share())}
    elif shape == "anyOf, two peers":
        kaos = _alternatives(co, pol, share(), ["USA", "GBR"])
    elif shape == "anyOf, the home and a peer":
        kaos = _alternatives(co, pol, share(), ["FRA", "USA"])
    else:
        both = {f"{k}-alt": v for k, v in _alternatives(co, pol, share(), ["USA", "GBR"]).items()}
        kaos = {"usa": co.kao("USA", pol, share()), "gbr": co.kao("GBR", pol, share()), **both}
    _, results = rewrap(home, home_call(co, "FRA", token, pol, kaos))
    assert any(r.status == "permit" for r in results.values())
    assert tap.flags == expected


def test_an_unroutable_kao_url_is_never_echoed_unless_it_is_an_http_url(co: Coalition) -> None:
    """A fuzzer put the policy (base64 JSON, "eyJ...") into a KAO's url: the error and the audit must not
    carry arbitrary client strings, which could as well be a token."""
    home, sink = forging_home(co, LocalPeerTransport(co.services))
    pol, token = policy(), co.token("FRA", "bob", "SECRET DEFENSE")
    junk = co.kao("USA", pol, share()).model_copy(update={"url": "://" + token})
    elsewhere = co.kao("USA", pol, share()).model_copy(update={"url": "https://kas.nowhere.example/kas"})
    _, results = rewrap(home, home_call(co, "FRA", token, pol, {"junk": junk, "elsewhere": elsewhere}))
    assert results["junk"].status == "fail" and results["elsewhere"].status == "fail"
    reasons = {e.kao_id: e.reasons[0] for e in sink.events if e.kao_id in ("junk", "elsewhere")}
    assert reasons == {"junk": "no route: the key access object's url is not an http(s) KAS URL",
                       "elsewhere": "no route to the KAS at https://kas.nowhere.example"}
    assert "eyJ" not in "".join(e.model_dump_json() for e in sink.events)


def test_an_unknown_kid_is_never_echoed_unless_it_looks_like_a_kid(co: Coalition) -> None:
    """The same fuzzer put the policy into a KAO's kid: "unknown kid" and the audit's kid field repeat a
    client's kid only when it looks like one (a typo is worth showing; a pasted token is not)."""
    home, sink = forging_home(co, LocalPeerTransport(co.services))
    pol, token = policy(), co.token("FRA", "bob", "SECRET DEFENSE")
    junk = co.kao("FRA", pol, share()).model_copy(update={"kid": token})
    typo = co.kao("FRA", pol, share()).model_copy(update={"kid": "fra-rsa-typo"})
    good = co.kao("FRA", pol, share())
    # ... and into a KAO's id and its policy binding's alg: the id is audited as a digest the client can match
    odd_id = pol.to_base64()[:200]  # "eyJ...": ids may be up to 256 characters
    odd = good.model_copy(update={"policy_binding": good.policy_binding.model_copy(update={"alg": token})})
    _, results = rewrap(home, home_call(co, "FRA", token, pol, {"junk": junk, "typo": typo, odd_id: odd}))
    assert results["junk"].status == "fail" and results["typo"].status == "fail" and results[odd_id].status == "fail"
    digest = "sha256:" + hashlib.sha256(odd_id.encode()).hexdigest()[:16]
    events = {e.kao_id: e for e in sink.events if e.kao_id in ("junk", "typo", digest)}
    assert (events["junk"].kid, events["junk"].reasons) == (
        None, ["unknown kid (not shown: it does not look like a kid)"])
    assert (events["typo"].kid, events["typo"].reasons) == ("fra-rsa-typo", ["unknown kid 'fra-rsa-typo'"])
    assert events[digest].reasons == ["unsupported policy binding algorithm (not shown: it does not look like one)"]
    assert "eyJ" not in "".join(e.model_dump_json() for e in sink.events)


@pytest.mark.parametrize(("kid", "shown"), [
    ("usa-rsa-2048-1", True), ("r1", True), ("fra-kms-main-v3", True), ("k" * 64, True),
    ("k" * 65, False), ("eyJhbGciOiJFUzI1NiJ9", False), ("a b", False), ("", False), ("é", False),
])
def test_showable(kid: str, shown: bool) -> None:
    assert showable(kid) == (kid if shown else None)
    url = f"https://kas.example/{kid}"
    assert showable_url(url) == (url if "eyJ" not in kid and url.isprintable() else None)
    assert audit_id(kid) == kid if shown else audit_id(kid).startswith("sha256:") and len(audit_id(kid)) == 23


# === found in review: ids, malformed peer answers, v1 through a broker, caps ==============================
def test_a_kao_id_reused_in_another_policy_is_still_audited(co: Coalition,
                                                            hedge: Callable[[float | None], None]) -> None:
    """KAO ids are unique within a policy only: a forward given up in one policy must not silence the
    record of a same-named KAO released in another."""
    hedge(5.0)
    token = co.token("FRA", "bob", "SECRET DEFENSE")
    pol1, pol2, secret1, secret2 = policy(), policy(), share(), share()
    alternatives = _alternatives(co, pol1, secret1, ["FRA", "USA"])  # FRA releases; the USA forward is dropped
    # Policy 1's FRA share in the cache, policy 2's not: policy 1 gives up its forward before policy 2's
    # unwrap ends, the order in which a request-wide list of given-up ids hid policy 2's release.
    rewrap(co.services["FRA"], home_call(co, "FRA", token, pol1, {"kao-0": alternatives["fra"]}))
    body = {"clientPublicKey": client().pem, "requests": [
        {"policy": {"id": "p1", "body": pol1.to_base64()},
         "keyAccessObjects": [{"keyAccessObjectId": "kao-0", "keyAccessObject": alternatives["fra"].to_wire()},
                              {"keyAccessObjectId": "kao-1", "keyAccessObject": alternatives["usa"].to_wire()}]},
        {"policy": {"id": "p2", "body": pol2.to_base64()},
         "keyAccessObjects": [{"keyAccessObjectId": "kao-1",
                               "keyAccessObject": co.kao("FRA", pol2, secret2).to_wire()}]}]}
    call = RewrapCall(authorization=f"Bearer {token}", url=co.url("FRA") + REWRAP_PATH, body=body)
    response, _ = rewrap(co.services["FRA"], call)
    by_policy = {p.policy_id: {r.key_access_object_id: r for r in p.results} for p in response.responses}
    assert client().unwrap(response, by_policy["p1"]["kao-0"]) == secret1
    assert by_policy["p1"]["kao-1"].status == "fail"
    assert client().unwrap(response, by_policy["p2"]["kao-1"]) == secret2
    released = {(e.policy_uuid, e.kao_id) for e in co.events(call.request_id, "FRA", AuditAction.KEY_RELEASED)}
    assert released == {(pol1.uuid, "kao-0"), (pol2.uuid, "kao-1")}


def test_duplicate_kao_ids_in_one_policy_are_refused(co: Coalition) -> None:
    pol = policy()
    kao = co.kao("FRA", pol, share())
    call = home_call(co, "FRA", co.token("FRA", "bob", "SECRET DEFENSE"), pol, {"k": kao})
    call.body["requests"][0]["keyAccessObjects"].append(dict(call.body["requests"][0]["keyAccessObjects"][0]))
    with pytest.raises(KasRayError, match="unique within a policy") as info:
        rewrap(co.services["FRA"], call)
    assert info.value.http_status == 400
    (rejected,) = co.events(call.request_id, "FRA", AuditAction.REQUEST_REJECTED)
    assert rejected.error_code == "bad_format"


@pytest.mark.parametrize("client_key_type", ["ec", "rsa"])
def test_v1_body_brokered_to_a_peer_opens_with_the_top_level_session_key(co: Coalition, client_key_type: str) -> None:
    """v1 (one keyAccess) answers with entityWrappedKey and one sessionPublicKey: for a share a peer
    rewrapped, that must be the peer's session key, or an EC client cannot open it."""
    pol, secret, who = policy(), share(), client(client_key_type)
    kao = co.kao("USA", pol, secret)
    body = {"clientPublicKey": who.pem, "keyAccess": kao.to_wire(), "policy": pol.to_base64()}
    call = RewrapCall(authorization=f"Bearer {co.token('FRA', 'bob', 'SECRET DEFENSE')}",
                      url=co.url("FRA") + REWRAP_PATH, body=body)
    response, results = rewrap(co.services["FRA"], call)
    assert response.entity_wrapped_key
    wrapped = base64.b64decode(response.entity_wrapped_key)
    if isinstance(who.key, rsa.RSAPrivateKey):
        assert P.rsa_oaep_decrypt(who.key, wrapped, "sha1") == secret
        return
    assert response.session_public_key == next(iter(results.values())).metadata["sessionPublicKey"]
    session = P.load_public_key_pem(response.session_public_key)
    assert isinstance(session, ec.EllipticCurvePublicKey)
    assert P.ec_unwrap(who.key, session, wrapped) == secret


MALFORMED_ANSWERS: dict[str, Callable[[Coalition, dict[str, str], dict[str, Any]], dict[str, Any]]] = {
    "results-not-a-list": lambda co, m, h: _resign(co, "USA", m, {"results": 5}),
}


@pytest.mark.parametrize("case", list(MALFORMED_ANSWERS))
def test_a_malformed_peer_answer_is_a_per_kao_failure(co: Coalition, case: str) -> None:
    tamper = MALFORMED_ANSWERS[case]
    home, sink = forging_home(co, ForgingPeer(co, lambda m, h: tamper(co, m, h)))
    pol = policy()
    fra_share = share()
    call = home_call(co, "FRA", co.token("FRA", "bob", "SECRET DEFENSE"), pol,
                     {"usa": co.kao("USA", pol, share()), "fra-local": co.kao("FRA", pol, fra_share)})
    response, results = rewrap(home, call)
    assert results["usa"].status == "fail" and results["usa"].kas_wrapped_key is None
    assert client().unwrap(response, results["fra-local"]) == fra_share
    (failed,) = [e for e in sink.events if e.action is AuditAction.FORWARD_FAILED]
    assert failed.error_code == "invalid_forward" and "malformed results" in failed.reasons[0]


@pytest.mark.parametrize("error", ["boom", ["x"], None, 3])
def test_a_peer_envelope_whose_error_is_not_an_object_is_refused_cleanly(co: Coalition, error: Any) -> None:
    from kas_ray.federation.peers import _unwrap_envelope

    peer = co.fed("FRA").peers["USA"]
    with pytest.raises(PeerUnavailable, match="malformed answer"):
        _unwrap_envelope(peer, {"error": error})
    with pytest.raises(SignedRequestError, match="peer USA: bad"):
        _unwrap_envelope(peer, {"error": {"code": "invalid_signed_request", "message": "bad"}})


@pytest.mark.parametrize("jwk", [{"kty": "EC"}, {"kty": "EC", "crv": "P-256", "x": 1, "y": 2}, {"kty": ["EC"]},
                                 {"kty": "oct", "k": "AAAA"}, "not-a-jwk"])
def test_a_forward_with_a_malformed_dpop_jwk_is_a_dpop_refusal(co: Coalition, jwk: Any) -> None:
    dpop_key = ec.generate_private_key(ec.SECP256R1())
    token = co.token("FRA", "bob", "SECRET DEFENSE", cnf_jkt=jwk_thumbprint(public_jwk(dpop_key.public_key())))
    pol = policy()
    body = forward_body(token, pol, {"k": co.kao("USA", pol, share())})
    body["dpopJwk"] = jwk
    body["signedRequestToken"] = sign_request({"clientPublicKey": client().pem}, dpop_key)
    with pytest.raises(DPoPError, match="must carry that DPoP key"):
        serve_forward(co, "USA", forward_from(co, "FRA", "USA", body))
    _rejected(co, "USA", body["requestId"], "invalid_dpop_proof")


@pytest.mark.parametrize("cap", ["NATO SECRET", "NS", "COSMIC TOP SECRET", "secret-ish"])
def test_an_agreement_cap_that_is_not_a_clearance_level_is_refused_at_start_and_denies(co: Coalition,
                                                                                      cap: str) -> None:
    from kas_ray.federation.agreement import apply_agreement, check_agreement
    from kas_ray.policy import Decision, Subject

    usa = co.services["USA"]
    agreement = AgreementConfig(max_classification=cap)
    with pytest.raises(ConfigError, match="not a clearance level"):
        check_agreement(usa.policy, agreement, "FRA")
    config = co.fed("USA").config
    peers = [p.model_copy(update={"agreement": agreement}) if p.nation == "FRA" else p for p in config.peers]
    with pytest.raises(ConfigError, match="caps classification"):
        RewrapService("USA", keys=usa.keys, trust=usa.trust, policy=usa.policy, replay=MemoryReplayStore(),
                      federation=Federation("USA", config.model_copy(update={"peers": peers}), co.fed("USA").key,
                                            replay=MemoryReplayStore(),
                                            transports={"local": LocalPeerTransport(co.services)}))
    # Should one reach a decision anyway, it denies (fail closed), whatever the object's level.
    pol = policy(classification="UNCLASSIFIED")
    decision = apply_agreement(usa.policy, Decision(allowed=True, checks=[]), agreement,
                               Subject(subject="bob", issuer="fra-idp", nationality="FRA"), pol.attributes, "FRA")
    assert not decision.allowed and "unknown level" in decision.checks[-1].reason

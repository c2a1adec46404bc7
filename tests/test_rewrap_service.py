"""The KAS rewrap path: RewrapService through KasClient + LocalTransport and with hand-built requests.

One coalition (USA, FRA, GBR) with software keystores and dev IdPs is built per module; every test
mints its own tokens, keys and objects, and reads only the audit events of its own requests.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kas_ray.audit import AuditAction, AuditEvent, MemoryAuditSink
from kas_ray.cache import share_cache_key
from kas_ray.client import REWRAP_PATH, KasClient, LocalTransport, Transport
from kas_ray.config import AbacConfig
from kas_ray.errors import (
    AccessDenied,
    DPoPError,
    FormatError,
    KasRayError,
    KasUnreachableError,
    ReplayError,
    RewrapError,
    SignedRequestError,
    TokenError,
    UntrustedIssuerError,
)
from kas_ray.hazmat import primitives as P
from kas_ray.kas.local import build_local_services, nation_url
from kas_ray.kas.models import OPENTDF_BAD_REQUEST, OPENTDF_FORBIDDEN, PublicKeyResponse, RewrapResponse
from kas_ray.kas.service import RewrapCall, RewrapService
from kas_ray.keys.software import PASSPHRASE_ENV, PASSPHRASE_FILE_ENV
from kas_ray.policy import attribute_fqn
from kas_ray.trust import DevIdentityProvider, make_dpop_proof, sign_request
from kas_ray.trust.dpop import jwk_thumbprint
from kas_ray.trust.jwks import public_jwk
from kas_ray.ztdf import KasKey, KeyAccessObject, Policy, decrypt, encrypt, read_manifest, wrap_share
from kas_ray.ztdf.keyaccess import KeyAlgorithm
from kas_ray.ztdf.policy import verify_binding

NATIONS = ["USA", "FRA", "GBR"]
BASE = "http://127.0.0.1:8000"
CONFIG = AbacConfig()
ALL = ("USA", "FRA", "GBR")


# --- the coalition ---------------------------------------------------------------------------------------
@dataclass
class Coalition:
    state: Path
    services: dict[str, RewrapService]  # by nation
    transport: LocalTransport
    audit: MemoryAuditSink
    #: Every token and share handed out in this module: the audit log must contain none of them.
    secrets: list[bytes] = field(default_factory=list)
    _keys: dict[tuple[str, str], KasKey] = field(default_factory=dict)

    def url(self, nation: str) -> str:
        return nation_url(BASE, nation)

    def rewrap_url(self, nation: str) -> str:
        return self.url(nation) + REWRAP_PATH

    def token(self, nation: str, sub: str, clearance: str | None, coi: Iterable[str] = (), **kw: Any) -> str:
        token = DevIdentityProvider(self.state, nation).mint(sub, clearance, coi=list(coi), **kw)
        self.secrets.append(token.encode())
        return token

    def kas_key(self, nation: str, algorithm: KeyAlgorithm = "rsa:2048") -> KasKey:
        if (nation, algorithm) not in self._keys:
            owner = KasClient(self.transport, use_dpop=False)
            self._keys[nation, algorithm] = owner.public_key(self.url(nation), algorithm)
        return self._keys[nation, algorithm]

    def share(self) -> bytes:
        share = os.urandom(32)
        self.secrets.append(share)
        return share

    def events(self, call: RewrapCall) -> list[AuditEvent]:
        return [e for e in self.audit.events if e.request_id == call.request_id]


@pytest.fixture(scope="module")
def co(tmp_path_factory: pytest.TempPathFactory) -> Iterable[Coalition]:
    state = tmp_path_factory.mktemp("coalition")
    audit = MemoryAuditSink()
    with pytest.MonkeyPatch.context() as mp:  # dev profile: the passphrase is generated in the state dir
        mp.delenv(PASSPHRASE_ENV, raising=False)
        mp.delenv(PASSPHRASE_FILE_ENV, raising=False)
        by_url = build_local_services(state, NATIONS, base_url=BASE, audit=audit)
    services = {svc.nation: svc for svc in by_url.values()}
    transport = LocalTransport(by_url)
    yield Coalition(state=state, services=services, transport=transport, audit=audit)
    transport.close()


def policy(classification: str = "SECRET", rel: Iterable[str] = ALL, coi: Iterable[str] = (),
           embargo: datetime | None = None) -> Policy:
    attrs = [attribute_fqn(CONFIG, "classification", classification)]
    attrs += [attribute_fqn(CONFIG, "releasable-to", n) for n in rel]
    attrs += [attribute_fqn(CONFIG, "coi", c) for c in coi]
    if embargo is not None:
        attrs.append(attribute_fqn(CONFIG, CONFIG.embargo_attribute, embargo))
    return Policy.create(attrs)


def seal(co: Coalition, pol: Policy, splits: list[list[tuple[str, KeyAlgorithm]]], data: bytes) -> bytes:
    out = io.BytesIO()
    encrypt(io.BytesIO(data), out, splits=[[co.kas_key(n, a) for n, a in alts] for alts in splits], policy=pol)
    return out.getvalue()


def open_tdf(tdf: bytes, client: KasClient) -> bytes:
    out = io.BytesIO()
    decrypt(io.BytesIO(tdf), out, client)
    return out.getvalue()


# --- hand-built requests -------------------------------------------------------------------------------
def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class Requester:
    """A client that builds rewrap requests by hand (its session key decrypts what it gets)."""

    client_key: P.PrivateKey = field(default_factory=new_ec_key)
    dpop_key: ec.EllipticCurvePrivateKey = field(default_factory=new_ec_key)
    #: The last response :func:`one` got for this requester.
    last: RewrapResponse | None = None

    @property
    def public_pem(self) -> str:
        return P.public_key_pem(self.client_key.public_key())

    def body(self, *policies: tuple[str, list[KeyAccessObject]], ids: list[str] | None = None) -> dict[str, Any]:
        requests, n = [], 0
        for index, (policy_b64, kaos) in enumerate(policies):
            items = []
            for kao in kaos:
                items.append({"keyAccessObjectId": ids[n] if ids else f"kao-{n}", "keyAccessObject": kao.to_wire()})
                n += 1
            requests.append({"policy": {"id": f"policy-{index}", "body": policy_b64}, "algorithm": "rsa:2048",
                             "keyAccessObjects": items})
        return {"clientPublicKey": self.public_pem, "requests": requests}

    def call(self, co: Coalition, nation: str, token: str | None, body: dict[str, Any], *,
             dpop: bool = True, htu: str | None = None, srt_key: P.PrivateKey | None = None,
             authorization: str | None = None) -> RewrapCall:
        url = co.rewrap_url(nation)
        proof = make_dpop_proof(self.dpop_key, "POST", htu or url, access_token=token) if dpop else None
        signed = sign_request(body, srt_key or self.dpop_key)
        auth = authorization if authorization is not None else (f"Bearer {token}" if token else None)
        return RewrapCall(authorization=auth, dpop=proof, url=url, body={"signedRequestToken": signed})

    def share(self, response: RewrapResponse, wrapped_b64: str) -> bytes:
        wrapped = base64.b64decode(wrapped_b64)
        if isinstance(self.client_key, rsa.RSAPrivateKey):
            return P.rsa_oaep_decrypt(self.client_key, wrapped, "sha1")
        assert response.session_public_key
        session = P.load_public_key_pem(response.session_public_key)
        assert isinstance(session, ec.EllipticCurvePublicKey)
        return P.ec_unwrap(self.client_key, session, wrapped)


def rewrap(co: Coalition, nation: str, call: RewrapCall) -> RewrapResponse:
    return asyncio.run(co.services[nation].rewrap(call))


def results(response: RewrapResponse) -> list[Any]:
    return [r for p in response.responses for r in p.results]


def kao_for(co: Coalition, nation: str, pol: Policy, share: bytes,
            algorithm: KeyAlgorithm = "rsa:2048") -> KeyAccessObject:
    return wrap_share(co.kas_key(nation, algorithm), share, pol.to_base64())


def one(co: Coalition, nation: str, token: str, pol: Policy, kao: KeyAccessObject,
        requester: Requester | None = None, policy_b64: str | None = None) -> tuple[RewrapCall, Any, Requester]:
    """Rewrap one KAO at ``nation``; returns the call, its single result and the requester."""
    requester = requester or Requester()
    call = requester.call(co, nation, token, requester.body((policy_b64 or pol.to_base64(), [kao])))
    response = rewrap(co, nation, call)
    (result,) = results(response)
    requester.last = response
    return call, result, requester


def fail_closed(result: Any, error: str) -> None:
    assert result.status == "fail"
    assert result.error == error
    assert result.kas_wrapped_key is None
    assert "kasWrappedKey" not in json.dumps(result.to_wire())


# === round trips through KasClient =======================================================================
@pytest.mark.parametrize("nation", NATIONS)
@pytest.mark.parametrize("kas_algorithm", ["rsa:2048", "ec:secp256r1"])
@pytest.mark.parametrize("client_key_type", ["rsa", "ec"])
def test_round_trip_each_nation(co: Coalition, nation: str, kas_algorithm: KeyAlgorithm,
                                client_key_type: str) -> None:
    data = f"for {nation} via {kas_algorithm}".encode() * 50
    tdf = seal(co, policy(rel=[nation]), [[(nation, kas_algorithm)]], data)
    kao = read_manifest(io.BytesIO(tdf)).encryption_information.key_access[0]
    assert kao.type == ("ec-wrapped" if kas_algorithm.startswith("ec") else "wrapped")
    assert kao.kid and kao.kid.startswith(nation.lower())
    client = KasClient(co.transport, co.token(nation, f"user-{nation}", "SECRET"), client_key_type=client_key_type)
    before = len(co.audit.events)
    assert open_tdf(tdf, client) == data
    (event,) = co.audit.events[before:]
    assert event.action is AuditAction.KEY_RELEASED and event.nation == nation and event.kid == kao.kid


def test_round_trip_rsa4096_kas_key(co: Coalition) -> None:
    key = co.kas_key("GBR", "rsa:4096")
    assert key.oaep_hash == "sha256" and key.kid and "r4096" in key.kid
    tdf = seal(co, policy(), [[("GBR", "rsa:4096")]], b"ACP-240 key")
    assert open_tdf(tdf, KasClient(co.transport, co.token("GBR", "g", "SECRET"))) == b"ACP-240 key"


def test_any_of_across_nations(co: Coalition) -> None:
    tdf = seal(co, policy(), [[("USA", "rsa:2048"), ("FRA", "ec:secp256r1"), ("GBR", "rsa:2048")]], b"any")
    manifest = read_manifest(io.BytesIO(tdf))
    assert len(manifest.key_access_by_split()) == 1 and len(manifest.encryption_information.key_access) == 3
    client = KasClient(co.transport, co.token("FRA", "bob", "SECRET DEFENSE"))
    before = len(co.audit.events)
    assert open_tdf(tdf, client) == b"any"
    assert [(e.action, e.nation) for e in co.audit.events[before:]] == [(AuditAction.KEY_RELEASED, "USA")]


def test_any_of_falls_back_when_first_kas_is_unreachable(co: Coalition) -> None:
    pol = policy()
    dead = co.kas_key("USA").model_copy(update={"url": nation_url(BASE, "deu")})
    out = io.BytesIO()
    encrypt(io.BytesIO(b"fallback"), out, splits=[[dead, co.kas_key("GBR")]], policy=pol)
    client = KasClient(co.transport, co.token("GBR", "carol", "TOP SECRET"))
    assert open_tdf(out.getvalue(), client) == b"fallback"
    only_dead = io.BytesIO()
    encrypt(io.BytesIO(b"x"), only_dead, splits=[[dead]], policy=pol)
    with pytest.raises(KasUnreachableError):
        open_tdf(only_dead.getvalue(), client)


def test_all_of_across_nations(co: Coalition) -> None:
    data = os.urandom(5000)
    tdf = seal(co, policy(rel=["USA", "GBR"], coi=["FVEY"]),
               [[("USA", "rsa:2048")], [("GBR", "ec:secp256r1")], [("FRA", "rsa:2048")]], data)
    assert len(read_manifest(io.BytesIO(tdf)).key_access_by_split()) == 3
    carol = KasClient(co.transport, co.token("GBR", "carol", "TOP SECRET", ["FVEY", "NATO"]), client_key_type="rsa")
    before = len(co.audit.events)
    assert open_tdf(tdf, carol) == data
    events = co.audit.events[before:]
    assert sorted(e.nation for e in events) == ["FRA", "GBR", "USA"]
    assert all(e.action is AuditAction.KEY_RELEASED for e in events)
    # One KAS denying its share is enough to keep the object closed.
    bob = KasClient(co.transport, co.token("FRA", "bob", "SECRET DEFENSE", ["FVEY"]))
    with pytest.raises(AccessDenied):
        open_tdf(tdf, bob)


def test_client_reports_denial_as_access_denied(co: Coalition) -> None:
    tdf = seal(co, policy(rel=["USA"]), [[("USA", "rsa:2048")]], b"noforn")
    with pytest.raises(AccessDenied, match="forbidden"):
        open_tdf(tdf, KasClient(co.transport, co.token("FRA", "bob", "SECRET DEFENSE")))


# === per-KAO denials ===================================================================================
FUTURE = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3)


@pytest.mark.parametrize(
    ("token_args", "pol", "reason"),
    [
        pytest.param(("GBR", "dave", "OFFICIAL"), policy("SECRET"),
                     "does not dominate classification SECRET", id="clearance"),
        pytest.param(("FRA", "bob", "SECRET DEFENSE"), policy(rel=["USA"]),
                     "nationality FRA is not in releasable-to [USA]", id="releasability"),
        pytest.param(("USA", "alice", "SECRET", ["FVEY"]), policy(coi=["NATO"]),
                     "lacks [NATO] of required coi", id="coi"),
        pytest.param(("USA", "alice", "SECRET"), policy(coi=["NATO"]),
                     "subject has no COI", id="no-coi"),
        pytest.param(("USA", "alice", "TOP SECRET"), policy(embargo=FUTURE),
                     "embargoed until", id="embargo"),
        pytest.param(("FRA", "mallory", "TRES SECRET DEFENSE", (), {"nationality": "USA"}), policy(rel=["USA"]),
                     "may not assert nationality USA", id="issuer-nation"),
        pytest.param(("USA", "nobody", None), policy("CONFIDENTIAL"),
                     "does not dominate classification CONFIDENTIAL", id="no-clearance"),
    ],
)
@pytest.mark.parametrize("kas_algorithm", ["rsa:2048", "ec:secp256r1"])
def test_denials(co: Coalition, token_args: tuple, pol: Policy, reason: str, kas_algorithm: KeyAlgorithm) -> None:
    nation, sub, clearance, *rest = token_args
    coi = rest[0] if rest else ()
    kw = rest[1] if len(rest) > 1 else {}
    token = co.token(nation, sub, clearance, coi, **kw)
    # The KAO sits at the USA KAS whatever the user's nation: the decision is about the user.
    call, result, _ = one(co, "USA", token, pol, kao_for(co, "USA", pol, co.share(), kas_algorithm))
    fail_closed(result, OPENTDF_FORBIDDEN)
    (event,) = co.events(call)
    assert event.action is AuditAction.KEY_DENIED and event.decision == "deny"
    assert any(reason in r for r in event.reasons), event.reasons
    assert event.subject == sub and event.nation == "USA" and event.policy_uuid == pol.uuid
    assert event.error_code == "forbidden"


def test_permit_audit_lists_passed_checks(co: Coalition) -> None:
    pol = policy(rel=["USA", "GBR"], coi=["FVEY"])
    share = co.share()
    call, result, requester = one(co, "USA", co.token("USA", "alice", "SECRET", ["FVEY"]), pol,
                                  kao_for(co, "USA", pol, share))
    assert result.status == "permit" and result.error is None
    assert requester.share(requester.last, result.kas_wrapped_key) == share
    (event,) = co.events(call)
    assert event.action is AuditAction.KEY_RELEASED and event.decision == "permit" and event.error_code is None
    assert any("dominates classification SECRET" in r for r in event.reasons)
    assert event.policy_digest and event.latency_ms is not None and event.latency_ms >= 0


# === tampering and malformed KAOs =====================================================================
def _bad_request(co: Coalition, call: RewrapCall, result: Any, code: str) -> None:
    fail_closed(result, OPENTDF_BAD_REQUEST)
    (event,) = co.events(call)
    assert event.action is AuditAction.KEY_ERROR and event.decision == "error"
    assert event.error_code == code, event


@pytest.mark.parametrize("kas_algorithm", ["rsa:2048", "ec:secp256r1"])
def test_tampered_binding(co: Coalition, kas_algorithm: KeyAlgorithm) -> None:
    pol = policy()
    kao = kao_for(co, "USA", pol, co.share(), kas_algorithm)
    forged = os.urandom(32)
    for tampered_hash in (
        base64.b64encode(forged.hex().encode()).decode(),  # SDK form (hex), wrong MAC
        base64.b64encode(forged).decode(),  # spec form (raw), wrong MAC
        "bm90IGEgbWFj",  # not a MAC at all
    ):
        bad = kao.model_copy(update={"policy_binding": kao.policy_binding.model_copy(update={"hash": tampered_hash})})
        call, result, _ = one(co, "USA", co.token("USA", "alice", "SECRET"), pol, bad)
        _bad_request(co, call, result, "policy_binding_mismatch")


def test_tampered_policy_same_kao(co: Coalition) -> None:
    """A relabelled policy (SECRET -> UNCLASSIFIED) with the original KAO: binding fails before ABAC."""
    original = policy("SECRET")
    kao = kao_for(co, "GBR", original, co.share())
    relabelled = Policy(uuid=original.uuid, body=policy("UNCLASSIFIED").body)
    dave = co.token("GBR", "dave", "OFFICIAL")
    call, result, _ = one(co, "GBR", dave, relabelled, kao)
    _bad_request(co, call, result, "policy_binding_mismatch")
    # Same policy JSON re-encoded differently (whitespace): the binding covers the exact string.
    reencoded = base64.b64encode(json.dumps(json.loads(original.to_json()), indent=1).encode()).decode()
    call, result, _ = one(co, "GBR", co.token("GBR", "carol", "TOP SECRET"), original, kao, policy_b64=reencoded)
    _bad_request(co, call, result, "policy_binding_mismatch")


def test_unknown_kid(co: Coalition) -> None:
    pol = policy()
    kao = kao_for(co, "USA", pol, co.share()).model_copy(update={"kid": "usa-r2048-v99"})
    call, result, _ = one(co, "USA", co.token("USA", "alice", "SECRET"), pol, kao)
    _bad_request(co, call, result, "unknown_kid")


def test_kao_for_another_nation(co: Coalition) -> None:
    pol = policy()
    fra_kao = kao_for(co, "FRA", pol, co.share())
    call, result, _ = one(co, "USA", co.token("USA", "alice", "SECRET"), pol, fra_kao)
    _bad_request(co, call, result, "bad_format")
    # USA URL but FRA's key: the USA KAS has no such kid.
    relabelled = fra_kao.model_copy(update={"url": co.url("USA")})
    call, result, _ = one(co, "USA", co.token("USA", "alice", "SECRET"), pol, relabelled)
    _bad_request(co, call, result, "unknown_kid")


@pytest.mark.parametrize(
    ("wrapped_key", "code"),
    [
        (base64.b64encode(os.urandom(256)).decode(), "key_unwrap_failed"),
        (base64.b64encode(os.urandom(17)).decode(), "key_unwrap_failed"),
        ("this is not base64!", "bad_format"),
        ("", "bad_format"),
        (base64.b64encode(os.urandom(2048)).decode(), "bad_format"),
    ],
    ids=["garbage", "short", "bad-base64", "empty", "too-long"],
)
@pytest.mark.parametrize("kas_algorithm", ["rsa:2048", "ec:secp256r1"])
def test_bad_wrapped_key(co: Coalition, wrapped_key: str, code: str, kas_algorithm: KeyAlgorithm) -> None:
    pol = policy()
    kao = kao_for(co, "FRA", pol, co.share(), kas_algorithm).model_copy(update={"wrapped_key": wrapped_key})
    call, result, _ = one(co, "FRA", co.token("FRA", "bob", "SECRET DEFENSE"), pol, kao)
    _bad_request(co, call, result, code)


def test_ec_wrapped_without_ephemeral_key(co: Coalition) -> None:
    pol = policy()
    kao = kao_for(co, "FRA", pol, co.share(), "ec:secp256r1")
    for eph in (None, "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"):
        bad = kao.model_copy(update={"ephemeral_public_key": eph})
        call, result, _ = one(co, "FRA", co.token("FRA", "bob", "SECRET DEFENSE"), pol, bad)
        _bad_request(co, call, result, "bad_format")


def test_bad_policy_is_bad_request(co: Coalition) -> None:
    pol = policy()
    kao = kao_for(co, "USA", pol, co.share())
    call, result, _ = one(co, "USA", co.token("USA", "alice", "SECRET"), pol, kao, policy_b64="bm90IGpzb24=")
    _bad_request(co, call, result, "bad_format")


# === request-level failures ===========================================================================
def _rejected(co: Coalition, nation: str, call: RewrapCall, error: type[KasRayError], match: str | None = None) -> None:
    before = len(co.audit.events)
    with pytest.raises(error, match=match) as info:
        rewrap(co, nation, call)
    events = co.audit.events[before:]
    assert len(events) == 1, events
    (event,) = events
    assert event.action is AuditAction.REQUEST_REJECTED and event.decision == "reject"
    assert event.request_id == call.request_id and event.nation == nation
    assert event.error_code == info.value.code


@pytest.fixture
def request_parts(co: Coalition) -> tuple[Requester, dict[str, Any], str]:
    pol = policy()
    requester = Requester()
    body = requester.body((pol.to_base64(), [kao_for(co, "USA", pol, co.share())]))
    return requester, body, co.token("USA", "alice", "SECRET")


def test_missing_authorization(co: Coalition, request_parts: tuple) -> None:
    requester, body, _ = request_parts
    _rejected(co, "USA", requester.call(co, "USA", None, body, dpop=False), TokenError, "missing Authorization")


@pytest.mark.parametrize("authorization", ["Bearer not-a-jwt", "Basic dXNlcjpwdw==", "Bearer", "Bearer a.b.c"])
def test_bad_token(co: Coalition, request_parts: tuple, authorization: str) -> None:
    requester, body, _ = request_parts
    call = requester.call(co, "USA", None, body, dpop=False, authorization=authorization)
    _rejected(co, "USA", call, TokenError)


def test_expired_token(co: Coalition, request_parts: tuple) -> None:
    requester, body, _ = request_parts
    token = co.token("USA", "alice", "SECRET", ttl=-120)
    _rejected(co, "USA", requester.call(co, "USA", token, body), TokenError, "expired")


def test_untrusted_issuer(co: Coalition, request_parts: tuple) -> None:
    requester, body, _ = request_parts
    token = co.token("DEU", "hans", "SECRET")  # a dev IdP the registry does not list
    _rejected(co, "USA", requester.call(co, "USA", token, body), UntrustedIssuerError)


def test_forged_token_for_trusted_issuer(co: Coalition, request_parts: tuple) -> None:
    requester, body, real = request_parts
    header = jwt.get_unverified_header(real)
    claims = jwt.decode(real, options={"verify_signature": False})
    forged = jwt.encode({**claims, "clearance": "TOP SECRET"}, new_ec_key(), algorithm="ES256", headers=header)
    _rejected(co, "USA", requester.call(co, "USA", forged, body), TokenError, "signature")


def test_dpop_replay(co: Coalition, request_parts: tuple) -> None:
    requester, body, token = request_parts
    call = requester.call(co, "USA", token, body)
    assert results(rewrap(co, "USA", call))[0].status == "permit"
    replayed = call.model_copy(update={"request_id": uuid.uuid4().hex})
    _rejected(co, "USA", replayed, ReplayError)
    assert issubclass(ReplayError, DPoPError)


def test_dpop_wrong_htu(co: Coalition, request_parts: tuple) -> None:
    requester, body, token = request_parts
    for htu in (co.rewrap_url("FRA"), "https://127.0.0.1:8000/usa" + REWRAP_PATH, co.url("USA") + "/v2/rewrap"):
        _rejected(co, "USA", requester.call(co, "USA", token, body, htu=htu), DPoPError, "htu")


def test_dpop_bound_token_needs_matching_proof(co: Coalition, request_parts: tuple) -> None:
    requester, body, _ = request_parts
    jkt = jwk_thumbprint(public_jwk(requester.dpop_key))
    bound = co.token("USA", "alice", "SECRET", cnf_jkt=jkt)
    _rejected(co, "USA", requester.call(co, "USA", bound, body, dpop=False), DPoPError, "required")
    thief = Requester()
    _rejected(co, "USA", thief.call(co, "USA", bound, body), DPoPError, "cnf.jkt")
    assert results(rewrap(co, "USA", requester.call(co, "USA", bound, body)))[0].status == "permit"


def test_srt_signed_by_another_key(co: Coalition, request_parts: tuple) -> None:
    requester, body, token = request_parts
    call = requester.call(co, "USA", token, body, srt_key=new_ec_key())
    _rejected(co, "USA", call, SignedRequestError, "DPoP key")


def test_srt_malformed(co: Coalition, request_parts: tuple) -> None:
    requester, body, token = request_parts
    call = requester.call(co, "USA", token, body)
    _rejected(co, "USA", call.model_copy(update={"body": {"signedRequestToken": "a.b.c"}}), SignedRequestError)
    call = requester.call(co, "USA", token, body)
    _rejected(co, "USA", call.model_copy(update={"body": {"signedRequestToken": 42}}), SignedRequestError)
    stale = jwt.encode({"requestBody": json.dumps(body), "iat": 1_000_000_000}, requester.dpop_key, algorithm="ES256")
    call = requester.call(co, "USA", token, body)
    _rejected(co, "USA", call.model_copy(update={"body": {"signedRequestToken": stale}}), SignedRequestError, "iat")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: {"clientPublicKey": b["clientPublicKey"]},  # neither v1 nor v2
        lambda b: {**b, "requests": "not a list"},
        lambda b: {**b, "requests": [{"policy": {"body": "x"}, "keyAccessObjects": []}]},
        lambda b: {**b, "requests": [{"keyAccessObjects": b["requests"][0]["keyAccessObjects"]}]},
        lambda b: {k: v for k, v in b.items() if k != "clientPublicKey"},
        lambda b: {**b, "requests": [{**b["requests"][0], "keyAccessObjects": [{"keyAccessObjectId": "k"}]}]},
    ],
    ids=["empty", "requests-not-list", "no-kaos", "no-policy", "no-client-key", "kao-missing"],
)
def test_srt_body_not_matching_schema(co: Coalition, request_parts: tuple, mutate: Any) -> None:
    requester, body, token = request_parts
    _rejected(co, "USA", requester.call(co, "USA", token, mutate(body)), FormatError, "invalid rewrap request")


def test_kao_limit(co: Coalition) -> None:
    pol = policy()
    share = co.share()
    kao = kao_for(co, "USA", pol, share)
    requester = Requester()
    token = co.token("USA", "alice", "SECRET")
    limit = co.services["USA"].limits.max_key_access_objects
    assert limit == 64
    too_many = requester.body((pol.to_base64(), [kao] * (limit + 1)))
    _rejected(co, "USA", requester.call(co, "USA", token, too_many), FormatError, "too many key access objects")
    # Split over several policies, the count is the same.
    half = (limit + 1) // 2 + 1
    split = requester.body((pol.to_base64(), [kao] * half), (pol.to_base64(), [kao] * half))
    _rejected(co, "USA", requester.call(co, "USA", token, split), FormatError, "too many key access objects")
    # Exactly at the limit: every KAO answered and audited once.
    call = requester.call(co, "USA", token, requester.body((pol.to_base64(), [kao] * limit)))
    response = rewrap(co, "USA", call)
    assert [r.status for r in results(response)] == ["permit"] * limit
    assert {requester.share(response, r.kas_wrapped_key) for r in results(response)} == {share}
    assert len(co.events(call)) == limit


def test_policy_limit(co: Coalition, request_parts: tuple) -> None:
    requester, body, token = request_parts
    many = {**body, "requests": body["requests"] * (co.services["USA"].limits.max_policies + 1)}
    _rejected(co, "USA", requester.call(co, "USA", token, many), FormatError, "too many policies")


@pytest.mark.parametrize(
    "client_key",
    [
        "garbage",
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        P.public_key_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()),
        P.public_key_pem(ec.generate_private_key(ec.SECP192R1()).public_key()),
        P.public_key_pem(ec.generate_private_key(ec.SECP256K1()).public_key()),
    ],
    ids=["garbage", "bad-pem", "rsa-1024", "p192", "secp256k1"],
)
def test_bad_client_public_key(co: Coalition, request_parts: tuple, client_key: str) -> None:
    requester, body, token = request_parts
    call = requester.call(co, "USA", token, {**body, "clientPublicKey": client_key})
    _rejected(co, "USA", call, FormatError, "clientPublicKey")


def test_ed25519_client_key_is_refused(co: Coalition, request_parts: tuple) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    requester, body, token = request_parts
    pem = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    _rejected(co, "USA", requester.call(co, "USA", token, {**body, "clientPublicKey": pem}), FormatError)



def _plain(requester: Requester, co: Coalition, token: str, body: dict[str, Any], *, dpop: bool) -> RewrapCall:
    """The ACP-240 body as is (no signed request token), with or without a DPoP proof."""
    url = co.rewrap_url("USA")
    proof = make_dpop_proof(requester.dpop_key, "POST", url, access_token=token) if dpop else None
    return RewrapCall(authorization=f"Bearer {token}", dpop=proof, url=url, body=body)


def test_a_dpop_proof_needs_a_signed_body(co: Coalition, request_parts: tuple) -> None:
    """A proof binds the token to a key, not the body: without the key's signature over the body, a
    captured, unused proof would let its thief name the client key the share is rewrapped to."""
    requester, body, token = request_parts
    thief = Requester()
    stolen = {**body, "clientPublicKey": thief.public_pem}
    _rejected(co, "USA", _plain(requester, co, token, stolen, dpop=True), SignedRequestError, "signedRequestToken")
    bound = co.token("USA", "alice", "SECRET", cnf_jkt=jwk_thumbprint(public_jwk(requester.dpop_key)))
    _rejected(co, "USA", _plain(requester, co, bound, stolen, dpop=True), SignedRequestError, "signedRequestToken")
    # The plain body stays the ACP-240 form for bearer tokens (no proof, nothing it could bind).
    assert results(rewrap(co, "USA", _plain(requester, co, token, body, dpop=False)))[0].status == "permit"


def _rsa_public_pem(bits: int, exponent: int = 65537) -> str:
    """An RSA public key of ``bits`` bits (an odd modulus, not a product of two primes: only its shape matters)."""
    modulus = (1 << (bits - 1)) | (1 << 5) | 1
    return P.public_key_pem(rsa.RSAPublicNumbers(exponent, modulus).public_key())


@pytest.mark.parametrize("bits", [8200, 16384, 16400])
def test_an_oversized_rsa_client_key_is_refused_before_any_unwrap(co: Coalition, request_parts: tuple,
                                                                   bits: int) -> None:
    requester, body, token = request_parts
    call = requester.call(co, "USA", token, {**body, "clientPublicKey": _rsa_public_pem(bits)})
    _rejected(co, "USA", call, FormatError, "at most 8192 bits")


def test_an_rsa_key_openssl_will_not_encrypt_to_is_a_per_kao_bad_request(co: Coalition, request_parts: tuple) -> None:
    """OpenSSL refuses a public exponent over 64 bits with a modulus over 3072 bits. Such a key is the
    client's fault: a 400 for that KAO and its audit record, not a 503 with no record."""
    requester, body, token = request_parts
    call = requester.call(co, "USA", token, {**body, "clientPublicKey": _rsa_public_pem(4096, (1 << 100) + 1)})
    (result,) = results(rewrap(co, "USA", call))
    fail_closed(result, OPENTDF_BAD_REQUEST)
    (event,) = co.events(call)
    assert event.action is AuditAction.KEY_ERROR and event.error_code == "bad_format"
    assert "RSA-OAEP" in " ".join(event.reasons)


def test_a_policy_uuid_that_is_not_id_like_is_audited_as_its_digest(co: Coalition) -> None:
    token = co.token("USA", "alice", "SECRET")
    for uuid_text, audited in [("3fa85f64-5717-4562-b3fc-2c963f66afa6", "3fa85f64-5717-4562-b3fc-2c963f66afa6"),
                               (token, None), ("x" * 5000, None)]:
        pol = policy().model_copy(update={"uuid": uuid_text})
        call, result, _ = one(co, "USA", token, pol, kao_for(co, "USA", pol, co.share()))
        assert result.status == "permit"
        (event,) = co.events(call)
        if audited is not None:
            assert event.policy_uuid == audited
        else:
            assert event.policy_uuid is not None and event.policy_uuid.startswith("sha256:")
            assert len(event.policy_uuid) == len("sha256:") + 16

@pytest.mark.parametrize("client", ["ec", "rsa"])
@pytest.mark.parametrize("legacy_binding", [False, True])
def test_v1_body(co: Coalition, client: str, legacy_binding: bool) -> None:
    pol = policy()
    share = co.share()
    kao = kao_for(co, "GBR", pol, share)
    requester = Requester(client_key=rsa.generate_private_key(public_exponent=65537, key_size=2048)
                          if client == "rsa" else new_ec_key())
    wire = kao.to_wire()
    if legacy_binding:  # old SDKs send policyBinding as a plain string
        wire["policyBinding"] = kao.policy_binding.hash
    body = {"clientPublicKey": requester.public_pem, "keyAccess": wire, "policy": pol.to_base64(),
            "algorithm": "rsa:2048"}
    call = requester.call(co, "GBR", co.token("GBR", "carol", "TOP SECRET"), body)
    response = rewrap(co, "GBR", call)
    (result,) = results(response)
    assert result.status == "permit"
    assert response.entity_wrapped_key == result.kas_wrapped_key
    assert requester.share(response, response.entity_wrapped_key) == share
    assert (response.session_public_key is None) == (client == "rsa")
    assert len(co.events(call)) == 1


def test_v2_response_has_no_entity_wrapped_key(co: Coalition, request_parts: tuple) -> None:
    requester, body, token = request_parts
    response = rewrap(co, "USA", requester.call(co, "USA", token, body))
    assert response.entity_wrapped_key is None and results(response)[0].status == "permit"


# === audit ==============================================================================================
def test_every_kao_decision_audited_once(co: Coalition) -> None:
    allowed, denied = policy(rel=["USA", "FRA"]), policy(rel=["GBR"])
    s1, s2, s3, s4 = (co.share() for _ in range(4))
    good_rsa = kao_for(co, "USA", allowed, s1)
    good_ec = kao_for(co, "USA", allowed, s2, "ec:secp256r1")
    tampered = good_rsa.model_copy(update={"policy_binding": kao_for(co, "USA", denied, s1).policy_binding})
    foreign = kao_for(co, "FRA", allowed, s3)
    no_kid = kao_for(co, "USA", allowed, s3).model_copy(update={"kid": "nope"})
    deny_a, deny_b = kao_for(co, "USA", denied, s4), kao_for(co, "USA", denied, s4, "ec:secp256r1")
    requester = Requester()
    ids = [f"id-{i}" for i in range(7)]
    body = requester.body((allowed.to_base64(), [good_rsa, good_ec, tampered, foreign, no_kid]),
                          (denied.to_base64(), [deny_a, deny_b]), ids=ids)
    call = requester.call(co, "USA", co.token("FRA", "bob", "SECRET DEFENSE"), body)
    response = rewrap(co, "USA", call)
    by_id = {r.key_access_object_id: r for r in results(response)}
    assert [p.policy_id for p in response.responses] == ["policy-0", "policy-1"]
    assert [by_id[i].status for i in ids] == ["permit", "permit", "fail", "fail", "fail", "fail", "fail"]
    assert [by_id[i].error for i in ids[2:]] == [OPENTDF_BAD_REQUEST] * 3 + [OPENTDF_FORBIDDEN] * 2
    assert requester.share(response, by_id["id-0"].kas_wrapped_key) == s1
    assert requester.share(response, by_id["id-1"].kas_wrapped_key) == s2
    events = co.events(call)
    assert sorted(e.kao_id for e in events) == ids  # exactly one event per KAO
    actions = {e.kao_id: e.action for e in events}
    assert [actions[i] for i in ids] == [AuditAction.KEY_RELEASED] * 2 + [AuditAction.KEY_ERROR] * 3 + [
        AuditAction.KEY_DENIED] * 2
    assert {e.policy_uuid for e in events} == {allowed.uuid, denied.uuid}
    assert all(e.subject == "bob" and e.issuer.endswith(".fra.dev.kas-ray.local") for e in events)

    # Across a mixed workload through KasClient: one event per rewrap the client made.
    before = len(co.audit.events)
    tdfs = [seal(co, allowed, [[("USA", "rsa:2048")], [("FRA", "ec:secp256r1")]], b"a"),
            seal(co, denied, [[("GBR", "rsa:2048"), ("USA", "rsa:2048")]], b"b"),
            seal(co, allowed, [[("FRA", "rsa:2048")]], b"c")]
    client = KasClient(co.transport, co.token("FRA", "bob", "SECRET DEFENSE"))
    outcomes = []
    for tdf in tdfs:
        try:
            outcomes.append(open_tdf(tdf, client))
        except AccessDenied:
            outcomes.append(None)
    assert outcomes == [b"a", None, b"c"]
    events = co.audit.events[before:]
    assert [e.action for e in events].count(AuditAction.KEY_RELEASED) == 3
    assert [e.action for e in events].count(AuditAction.KEY_DENIED) == 2  # both alternatives tried
    assert len(events) == 5


def _forms(secret: bytes) -> set[str]:
    out = {base64.b64encode(secret).decode(), base64.urlsafe_b64encode(secret).decode().rstrip("="),
           base64.b64encode(secret).decode().rstrip("="), secret.hex(), secret.hex().upper()}
    try:
        out.add(secret.decode("ascii"))
    except UnicodeDecodeError:
        pass
    return {f for f in out if len(f) >= 16}


def test_audit_never_holds_tokens_shares_or_private_keys(co: Coalition) -> None:
    # Make sure there is a varied workload in the log even when this test runs alone.
    pol = policy(rel=["USA"])
    share = co.share()
    kao = kao_for(co, "USA", pol, share)
    for token in (co.token("USA", "alice", "SECRET"), co.token("FRA", "bob", "SECRET DEFENSE")):
        one(co, "USA", token, pol, kao)
    one(co, "USA", co.token("USA", "alice", "SECRET"), pol,
        kao.model_copy(update={"policy_binding": kao_for(co, "USA", policy(), share).policy_binding}))
    requester = Requester()
    token = co.token("USA", "alice", "SECRET")
    with pytest.raises(TokenError):
        rewrap(co, "USA", requester.call(co, "USA", None, requester.body((pol.to_base64(), [kao])),
                                         authorization=f"Bearer {token}x"))
    tdf = seal(co, pol, [[("USA", "rsa:2048")]], b"payload")
    open_tdf(tdf, KasClient(co.transport, co.token("USA", "alice", "SECRET")))

    dump = "\n".join(e.model_dump_json() for e in co.audit.events)
    assert len(co.audit.events) >= 5
    needles: set[str] = set()
    for secret in co.secrets:
        needles |= _forms(secret)
        if secret.startswith(b"eyJ"):  # a JWT: no part of its signature either
            needles.add(secret.decode().rsplit(".", 1)[1])
    for service in co.services.values():
        for private in service.keys._private.values():  # type: ignore[attr-defined]
            der = private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
            pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()).decode()
            needles |= {line for line in pem.splitlines()[1:-1] if len(line) >= 16}
            numbers = private.private_numbers()
            secret_int = numbers.d if isinstance(private, rsa.RSAPrivateKey) else numbers.private_value
            needles |= {str(secret_int), format(secret_int, "x")} | _forms(der)
    leaks = [n for n in needles if n in dump]
    assert not leaks, f"{len(leaks)} secrets found in the audit log"
    assert "PRIVATE KEY" not in dump and "Bearer ey" not in dump and "eyJ" not in dump


# === cache ===========================================================================================
def test_second_rewrap_is_a_cache_hit_and_still_checked(co: Coalition) -> None:
    service = co.services["FRA"]
    pol = policy(rel=["FRA", "GBR"])
    share = co.share()
    kao = kao_for(co, "FRA", pol, share)
    bob = co.token("FRA", "bob", "SECRET DEFENSE")

    start = service.cache.snapshot()
    _, first, _ = one(co, "FRA", bob, pol, kao)
    assert first.status == "permit"
    after_first = service.cache.snapshot()
    assert after_first.hits == start.hits and after_first.misses == start.misses + 1

    _, second, requester = one(co, "FRA", bob, pol, kao)
    assert second.status == "permit" and requester.share(requester.last, second.kas_wrapped_key) == share
    after_second = service.cache.snapshot()
    assert after_second.hits == after_first.hits + 1 and after_second.misses == after_first.misses

    # Same wrapped key, tampered binding: a hit, and still refused.
    forged = kao.model_copy(update={"policy_binding": kao_for(co, "FRA", policy(), share).policy_binding})
    call, tampered, _ = one(co, "FRA", bob, pol, forged)
    _bad_request(co, call, tampered, "policy_binding_mismatch")
    after_tamper = service.cache.snapshot()
    assert after_tamper.hits == after_second.hits + 1

    # Same wrapped key, other policy string: a hit, and still refused.
    call, relabelled, _ = one(co, "FRA", bob, policy("UNCLASSIFIED"), kao)
    _bad_request(co, call, relabelled, "policy_binding_mismatch")

    # A user ABAC denies, right after the allowed user's hits: a hit, and denied.
    alice = co.token("USA", "alice", "TOP SECRET")
    before = service.cache.snapshot()
    call, denied, _ = one(co, "FRA", alice, pol, kao)
    fail_closed(denied, OPENTDF_FORBIDDEN)
    assert service.cache.snapshot().hits == before.hits + 1
    assert co.events(call)[0].action is AuditAction.KEY_DENIED


def test_crafted_wrapped_key_with_shared_prefix_misses(co: Coalition) -> None:
    service = co.services["USA"]
    pol = policy()
    kao = kao_for(co, "USA", pol, co.share())
    alice = co.token("USA", "alice", "SECRET")
    assert one(co, "USA", alice, pol, kao)[1].status == "permit"  # now cached
    wrapped = base64.b64decode(kao.wrapped_key)
    for crafted in (wrapped[:-1] + bytes([wrapped[-1] ^ 1]), wrapped[:-1], wrapped + b"\x00"):
        before = service.cache.snapshot()
        call, result, _ = one(co, "USA", alice, pol,
                              kao.model_copy(update={"wrapped_key": base64.b64encode(crafted).decode()}))
        after = service.cache.snapshot()
        assert after.hits == before.hits and after.misses == before.misses + 1
        _bad_request(co, call, result, "key_unwrap_failed")


def test_share_cache_keys() -> None:
    a, b = os.urandom(256), os.urandom(256)
    key_a = share_cache_key("USA", "usa-r2048-v1", "1", a, None)
    assert key_a == share_cache_key("USA", "usa-r2048-v1", "1", a, None)
    assert key_a != share_cache_key("USA", "usa-r2048-v1", "1", b, None)
    assert key_a != share_cache_key("USA", "usa-r2048-v1", "1", a[:-1] + bytes([a[-1] ^ 1]), None)
    assert key_a != share_cache_key("USA", "usa-r2048-v1", "1", a[:255], None)
    assert key_a != share_cache_key("USA", "usa-r2048-v1", "2", a, None)
    assert key_a != share_cache_key("FRA", "usa-r2048-v1", "1", a, None)
    assert key_a != share_cache_key("USA", "usa-r2048-v1", "1", a, "-----BEGIN PUBLIC KEY-----")
    # Length-prefixed fields: moving bytes between fields changes the key.
    assert share_cache_key("USA", "ab", "c", a, None) != share_cache_key("USA", "a", "bc", a, None)
    assert share_cache_key("USA", "k", "1", a[:10], a[10:20].hex()) != share_cache_key(
        "USA", "k", "1", a[:20], None)
    # The key is a digest: no wrapped-key bytes in it.
    assert a.hex()[:32] not in key_a and len(key_a) == len("share:") + 64


def test_binding_checked_by_client_too(co: Coalition) -> None:
    """Sanity: shares released by the KAS verify against the policy the client sent."""
    pol = policy()
    share = co.share()
    kao = kao_for(co, "GBR", pol, share)
    _, result, requester = one(co, "GBR", co.token("GBR", "carol", "SECRET"), pol, kao)
    released = requester.share(requester.last, result.kas_wrapped_key)
    verify_binding(released, pol.to_base64(), kao.policy_binding)
    twice = requester.last.responses[0].model_copy(update={"results": [result, result]})
    duplicated = RewrapResponse(responses=[twice])

    class Duplicating(Transport):  # a misbehaving KAS: two results for one KAO
        def public_key(self, base_url: str, algorithm: str) -> PublicKeyResponse:
            raise AssertionError("not used")

        def rewrap(self, base_url: str, headers: dict[str, str], body: dict[str, Any]) -> RewrapResponse:
            return duplicated

    with pytest.raises(RewrapError):  # a response with two results for one KAO is refused
        KasClient(Duplicating(), "t").rewrap(kao, pol.to_base64())


def test_memory_cache_ttl_jitter_spreads_expiry_and_never_exceeds_the_ttl():
    """Entries stored together expire over [0.8, 1.0] x TTL, so a burst of stores is not a burst of unwraps."""
    from kas_ray.cache import CacheConfig, CacheKind, MemoryCache

    now = [1000.0]
    cache = MemoryCache(CacheConfig(ttl_seconds={CacheKind.SHARE: 100.0}), clock=lambda: now[0])
    keys = [f"share:{i}" for i in range(200)]
    for key in keys:
        cache.put(key, b"v", CacheKind.SHARE)
    lifetimes = []
    for t in range(79, 101):
        now[0] = 1000.0 + t + 0.5
        alive = sum(cache.get(k) is not None for k in keys)
        lifetimes.append(alive)
    assert lifetimes[0] == 200  # nothing expires before 0.8 x TTL
    assert lifetimes[-1] == 0  # nothing outlives the TTL
    assert len(set(lifetimes)) > 10  # and expiry is spread across the window

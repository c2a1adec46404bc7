"""Acceptance tests of the nation KAS on a real Ray Serve cluster (USA, FRA, GBR from ``kas_cluster``).

What they prove, end to end over HTTP and through Serve deployment handles:

* SDK encrypt → rewrap at each nation → decrypt, over HTTP and the handle client;
* ABAC denials (clearance, releasability, COI, embargo, issuer/nation mismatch): v1 bodies answer
  403, v2 bodies 200 with ``OPENTDF_FORBIDDEN`` results, the handle client the same; no key ever;
* a tampered policy binding: v1 400, v2 ``OPENTDF_BAD_REQUEST``, no key;
* a sweep of bad input over every endpoint: 4xx with a JSON ``{"code", "message"}``, never 500;
* audit: one line per KAO decision, one ``REQUEST_REJECTED`` per rejected request;
* HSM actor death: 503 + Retry-After or success, never 500 or a hang, then recovery;
* redeploying a nation (and restarting ``kas-ray serve``) on the same state dir keeps its keys;
* last: no Ray log and no audit file holds a token, DPoP proof, share, DEK or private key.

Every test mints its own subjects (unique names) and request ids, so it reads only its own audit lines.
GBR is the nation whose HSM actor is killed and FRA the one that is redeployed; USA is never disturbed.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kas_ray.client import REWRAP_PATH, HandleTransport, HttpTransport, KasClient, Transport
from kas_ray.config import AbacConfig, NationSettings
from kas_ray.errors import AccessDenied, RewrapError
from kas_ray.hazmat import primitives as P
from kas_ray.kas import proto
from kas_ray.kas.models import OPENTDF_BAD_REQUEST, OPENTDF_FORBIDDEN, PublicKeyResponse, RewrapResponse
from kas_ray.policy import attribute_fqn
from kas_ray.trust import DevIdentityProvider, make_dpop_proof, sign_request
from kas_ray.ztdf import KasKey, KeyAccessObject, Policy, decrypt, encrypt, read_manifest, wrap_share
from kas_ray.ztdf.keyaccess import KeyAlgorithm
from kas_ray.ztdf.manifest import MANIFEST_ENTRY

NATIONS = ["USA", "FRA", "GBR"]
CONFIG = AbacConfig()
CLEARED = {"USA": "SECRET", "FRA": "SECRET_DEFENSE", "GBR": "SECRET"}
CONNECT_REWRAP = REWRAP_PATH  # /kas.AccessService/Rewrap
REST_REWRAP = "/kas/v2/rewrap"
ACP_REWRAP = "/rewrap"
KEY_FIELDS = ("kasWrappedKey", "entityWrappedKey")
HSM_TIMEOUT = NationSettings.model_fields["hsm_timeout_seconds"].default
MAX_BODY = 1 << 20


# --- the cluster as the tests see it --------------------------------------------------------------------
class Recording(Transport):
    """A transport that remembers the bearer tokens and DPoP proofs it sends (for the leak scan)."""

    def __init__(self, inner: Transport, secrets: list[bytes]) -> None:
        self.inner = inner
        self.secrets = secrets

    def public_key(self, base_url: str, algorithm: str) -> PublicKeyResponse:
        return self.inner.public_key(base_url, algorithm)

    def rewrap(self, base_url: str, headers: dict[str, str], body: dict[str, Any]) -> RewrapResponse:
        self.secrets += [v.removeprefix("Bearer ").encode() for v in headers.values()]
        return self.inner.rewrap(base_url, headers, body)


@dataclass
class Kas:
    cluster: Any  # conftest.KasCluster
    http: httpx.Client
    #: Every token, DPoP proof, share and DEK this module handled: no log may contain any of them.
    secrets: list[bytes] = field(default_factory=list)
    #: Further files the leak scan reads (the `kas-ray serve` subprocess logs and audit).
    extra_files: list[Path] = field(default_factory=list)
    #: The first `kas-ray serve` of the restart test, started when the module starts (see ``kas``).
    early_serve: ServeProcess | None = None
    _keys: dict[tuple[str, str], KasKey] = field(default_factory=dict)

    @property
    def state(self) -> Path:
        return self.cluster.state_dir

    def url(self, nation: str) -> str:
        return self.cluster.url(nation)

    def token(self, nation: str, sub: str, clearance: str | None, coi: Iterable[str] = (), **kw: Any) -> str:
        token = DevIdentityProvider(self.state, nation).mint(sub, clearance, coi=list(coi), **kw)
        self.secrets.append(token.encode())
        return token

    def share(self) -> bytes:
        share = os.urandom(32)
        self.secrets.append(share)
        return share

    def kas_key(self, nation: str, algorithm: KeyAlgorithm = "rsa:2048") -> KasKey:
        if (nation, algorithm) not in self._keys:
            self._keys[nation, algorithm] = KasClient(HttpTransport()).public_key(self.url(nation), algorithm)
        return self._keys[nation, algorithm]

    def client(self, transport: str, token: str, client_key_type: str = "ec") -> KasClient:
        inner = HttpTransport() if transport == "http" else HandleTransport()
        return KasClient(Recording(inner, self.secrets), token, client_key_type=client_key_type)

    def audit(self, nation: str, *, request_id: str | None = None, subject: str | None = None) -> list[dict]:
        lines = [json.loads(line) for line in self.cluster.audit_lines(nation)]
        return [e for e in lines if (request_id is None or e["request_id"] == request_id)
                and (subject is None or e["subject"] == subject)]


RESTART_TEST = "test_kas_ray_serve_restart_keeps_keys"


@pytest.fixture(scope="module")
def kas(kas_cluster: Any, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kas]:
    with httpx.Client(timeout=30.0) as http:
        kas = Kas(kas_cluster, http)
        if any(item.name == RESTART_TEST for item in request.session.items):
            # That test boots a second Ray instance (~30 s on 2 cores): start it now, while the others run.
            workdir = tmp_path_factory.mktemp("kas-ray-serve")
            kas.early_serve = ServeProcess(kas, workdir / "state", free_port(), workdir / "serve-1")
        try:
            yield kas
        finally:
            if kas.early_serve is not None:
                kas.early_serve.kill()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def policy(classification: str = "SECRET", rel: Iterable[str] = NATIONS, coi: Iterable[str] = (),
           embargo: datetime | None = None) -> Policy:
    attrs = [attribute_fqn(CONFIG, "classification", classification)]
    attrs += [attribute_fqn(CONFIG, "releasable-to", n) for n in rel]
    attrs += [attribute_fqn(CONFIG, "coi", c) for c in coi]
    if embargo is not None:
        attrs.append(attribute_fqn(CONFIG, CONFIG.embargo_attribute, embargo))
    return Policy.create(attrs)


def seal(kas: Kas, pol: Policy, splits: list[list[tuple[str, KeyAlgorithm]]], data: bytes) -> bytes:
    out = io.BytesIO()
    encrypt(io.BytesIO(data), out, splits=[[kas.kas_key(n, a) for n, a in alts] for alts in splits], policy=pol)
    return out.getvalue()


def open_tdf(kas: Kas, tdf: bytes, client: KasClient) -> bytes:
    """Decrypt with ``client``, remembering every share it obtained and the DEK they make."""
    shares: list[bytes] = []

    def unwrap(kao: KeyAccessObject, policy_b64: str) -> bytes:
        share = client(kao, policy_b64)
        shares.append(share)
        kas.secrets.append(share)
        return share

    out = io.BytesIO()
    decrypt(io.BytesIO(tdf), out, unwrap)
    dek = shares[0]
    for share in shares[1:]:
        dek = P.xor_bytes(dek, share)
    kas.secrets.append(dek)
    return out.getvalue()


def with_manifest(tdf: bytes, mutate: Callable[[dict[str, Any]], None]) -> bytes:
    """The same TDF with its manifest JSON changed by ``mutate`` (payload untouched)."""
    src = zipfile.ZipFile(io.BytesIO(tdf))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == MANIFEST_ENTRY:
                manifest = json.loads(data)
                mutate(manifest)
                data = json.dumps(manifest).encode()
            dst.writestr(info.filename, data)
    return out.getvalue()


def first_kao(tdf: bytes) -> tuple[KeyAccessObject, str]:
    manifest = read_manifest(io.BytesIO(tdf))
    return manifest.encryption_information.key_access[0], manifest.encryption_information.policy


def no_key(payload: str | dict[str, Any] | list[Any]) -> None:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    for name in KEY_FIELDS:
        assert name not in text, f"{name} in a failing answer: {text[:300]}"


def json_error(response: httpx.Response, status: int | tuple[int, ...]) -> dict[str, Any]:
    """A 4xx JSON error ``{"code", "message"}`` with no key in it."""
    allowed = status if isinstance(status, tuple) else (status,)
    assert response.status_code in allowed, (response.status_code, response.text[:300])
    assert 400 <= response.status_code < 500
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("code"), str) and isinstance(body.get("message"), str)
    assert body["code"] and body["message"]
    no_key(response.text)
    return body


def results(wire: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for p in wire.get("responses", []) for r in p["results"]]


def fail_closed(result: dict[str, Any], error: str) -> None:
    assert result["status"] == "fail" and result["error"] == error, result
    no_key(result)


# --- hand-built requests ------------------------------------------------------------------------------------
def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class Requester:
    """A client that builds rewrap requests by hand: DPoP-bound, SRT signed with the DPoP key."""

    kas: Kas
    client_key: P.PrivateKey = field(default_factory=new_ec_key)
    dpop_key: ec.EllipticCurvePrivateKey = field(default_factory=new_ec_key)

    @property
    def public_pem(self) -> str:
        return P.public_key_pem(self.client_key.public_key())

    def v2(self, *policies: tuple[str, list[KeyAccessObject]], ids: list[str] | None = None) -> dict[str, Any]:
        requests, n = [], 0
        for index, (policy_b64, kaos) in enumerate(policies):
            items = []
            for kao in kaos:
                items.append({"keyAccessObjectId": ids[n] if ids else f"kao-{n}", "keyAccessObject": kao.to_wire()})
                n += 1
            requests.append({"policy": {"id": f"policy-{index}", "body": policy_b64}, "algorithm": "rsa:2048",
                             "keyAccessObjects": items})
        return {"clientPublicKey": self.public_pem, "requests": requests}

    def v1(self, kao: KeyAccessObject, policy_b64: str) -> dict[str, Any]:
        return {"clientPublicKey": self.public_pem, "keyAccess": kao.to_wire(), "policy": policy_b64,
                "algorithm": "rsa:2048"}

    def _auth(self, token: str | None, url: str, dpop: bool) -> dict[str, str]:
        headers: dict[str, str] = {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if dpop:
            proof = make_dpop_proof(self.dpop_key, "POST", url, access_token=token)
            self.kas.secrets.append(proof.encode())
            headers["DPoP"] = proof
        return headers

    def http(self, nation: str, token: str | None, body: dict[str, Any], *, route: str = CONNECT_REWRAP,
             srt: bool = True, dpop: bool = True, htu: str | None = None,
             client: httpx.Client | None = None) -> tuple[str, httpx.Response]:
        """POST a rewrap; returns (request id, response). The request id names its audit lines."""
        url = self.kas.url(nation) + route
        rid = unique("rid")
        headers = {"Content-Type": "application/json", "X-Request-ID": rid, **self._auth(token, htu or url, dpop)}
        payload = {"signedRequestToken": sign_request(body, self.dpop_key)} if srt else body
        return rid, (client or self.kas.http).post(url, json=payload, headers=headers)

    def handle(self, nation: str, token: str | None, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The same call through the nation's Serve deployment handle; returns (request id, envelope)."""
        from ray import serve

        url = self.kas.url(nation) + REWRAP_PATH
        headers = self._auth(token, url, True)
        rid = unique("rid")
        call = {"authorization": headers.get("Authorization"), "dpop": headers.get("DPoP"), "url": url,
                "body": {"signedRequestToken": sign_request(body, self.dpop_key)}, "request_id": rid}
        return rid, serve.get_app_handle(nation.lower()).rewrap.remote(call).result(timeout_s=60)

    def open(self, wire: dict[str, Any], wrapped_b64: str) -> bytes:
        wrapped = base64.b64decode(wrapped_b64)
        if isinstance(self.client_key, rsa.RSAPrivateKey):
            share = P.rsa_oaep_decrypt(self.client_key, wrapped, "sha1")
        else:
            session = P.load_public_key_pem(wire["sessionPublicKey"])
            assert isinstance(session, ec.EllipticCurvePublicKey)
            share = P.ec_unwrap(self.client_key, session, wrapped)
        self.kas.secrets.append(share)
        return share


def kao_for(kas: Kas, nation: str, pol: Policy | str, share: bytes,
            algorithm: KeyAlgorithm = "rsa:2048") -> KeyAccessObject:
    return wrap_share(kas.kas_key(nation, algorithm), share, pol if isinstance(pol, str) else pol.to_base64())


def one_line(kas: Kas, nation: str, rid: str, action: str, error_code: str | None = None) -> dict[str, Any]:
    """Exactly one audit line for request ``rid``, with this action (and error code)."""
    lines = kas.audit(nation, request_id=rid)
    assert len(lines) == 1, lines
    (line,) = lines
    assert line["action"] == action, line
    if error_code is not None:
        assert line["error_code"] == error_code, line
    return line


# === round trips ===========================================================================================
@pytest.mark.parametrize("algorithm", ["rsa:2048", "ec:secp256r1", "rsa:4096"])
@pytest.mark.parametrize("nation", NATIONS)
def test_round_trip_each_nation(kas: Kas, nation: str, algorithm: KeyAlgorithm) -> None:
    """SDK encrypt to one nation's key → rewrap at that nation over HTTP and via handles → decrypt."""
    data = f"for {nation} under {algorithm}: ".encode() + os.urandom(3000)
    tdf = seal(kas, policy(rel=[nation]), [[(nation, algorithm)]], data)
    kao, _ = first_kao(tdf)
    assert kao.kid and kao.kid.startswith(nation.lower()) and kao.url == kas.url(nation)
    sub = unique(f"rt-{nation.lower()}")
    token = kas.token(nation, sub, CLEARED[nation])
    assert open_tdf(kas, tdf, kas.client("http", token, "ec")) == data
    assert open_tdf(kas, tdf, kas.client("handle", token, "rsa")) == data
    lines = kas.audit(nation, subject=sub)
    assert [(e["action"], e["kid"]) for e in lines] == [("KEY_RELEASED", kao.kid)] * 2


def test_all_of_three_nations(kas: Kas) -> None:
    """One share per nation (allOf): the object opens only with all three KAS, each audits once."""
    data = os.urandom(70_000)
    tdf = seal(kas, policy(rel=NATIONS, coi=["FVEY"]),
               [[("USA", "rsa:2048")], [("FRA", "ec:secp256r1")], [("GBR", "rsa:4096")]], data)
    assert len(read_manifest(io.BytesIO(tdf)).key_access_by_split()) == 3
    sub = unique("allof")
    token = kas.token("GBR", sub, "TOP_SECRET", ["FVEY", "NATO"])
    for transport in ("http", "handle"):
        assert open_tdf(kas, tdf, kas.client(transport, token)) == data
    for nation in NATIONS:
        assert [e["action"] for e in kas.audit(nation, subject=sub)] == ["KEY_RELEASED"] * 2
    # A user one KAS (any of them: same ABAC) refuses cannot open it, whichever transport.
    denied = unique("allof-denied")
    bob = kas.token("FRA", denied, "SECRET_DEFENSE")  # no FVEY
    for transport in ("http", "handle"):
        with pytest.raises(AccessDenied):
            open_tdf(kas, tdf, kas.client(transport, bob))


@pytest.mark.parametrize("client_key", ["ec", "rsa"])
def test_permit_on_every_rewrap_route(kas: Kas, client_key: str) -> None:
    """v1 and v2 bodies on Connect JSON, Connect proto, /kas/v2/rewrap and /rewrap (SRT and plain)."""
    pol = policy(rel=["FRA"])
    share = kas.share()
    kao = kao_for(kas, "FRA", pol, share)
    sub = unique("routes")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if client_key == "rsa" else new_ec_key()
    requester = Requester(kas, client_key=key)
    token = kas.token("FRA", sub, "SECRET_DEFENSE")
    v1, v2 = requester.v1(kao, pol.to_base64()), requester.v2((pol.to_base64(), [kao]))
    # A plain body goes with a bearer token alone: with a DPoP proof the KAS wants the body signed by its key.
    for route, srt in [(CONNECT_REWRAP, True), (REST_REWRAP, True), (ACP_REWRAP, True), (ACP_REWRAP, False)]:
        rid, reply = requester.http("FRA", token, v1, route=route, srt=srt, dpop=srt)
        assert reply.status_code == 200, reply.text
        wire = reply.json()
        assert requester.open(wire, wire["entityWrappedKey"]) == share
        one_line(kas, "FRA", rid, "KEY_RELEASED")
        rid, reply = requester.http("FRA", token, v2, route=route, srt=srt, dpop=srt)
        assert reply.status_code == 200, reply.text
        wire = reply.json()
        (result,) = results(wire)
        assert result["status"] == "permit" and "entityWrappedKey" not in wire
        assert requester.open(wire, result["kasWrappedKey"]) == share
        one_line(kas, "FRA", rid, "KEY_RELEASED")
    # Connect with a proto body, gzip-compressed as otdf-python sends it.
    url = kas.url("FRA") + CONNECT_REWRAP
    rid = unique("rid")
    headers = {"Content-Type": "application/proto", "Content-Encoding": "gzip", "Connect-Protocol-Version": "1",
               "X-Request-ID": rid, **requester._auth(token, url, True)}
    body = gzip.compress(proto.encode_rewrap_request(sign_request(v2, requester.dpop_key)))
    reply = kas.http.post(url, content=body, headers=headers)
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/proto"
    decoded = proto.decode_rewrap_response(reply.content).to_wire()
    (result,) = results(decoded)
    assert result["status"] == "permit" and requester.open(decoded, result["kasWrappedKey"]) == share
    one_line(kas, "FRA", rid, "KEY_RELEASED")
    assert len(kas.audit("FRA", subject=sub)) == 9


# === denials =============================================================================================
FUTURE = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3)

# KAS nation, denied user (IdP nation, clearance, coi, mint kwargs), policy, audit reason, a permitted user
DENIALS = [
    pytest.param("GBR", ("GBR", "OFFICIAL", (), {}), {"classification": "SECRET"},
                 "does not dominate classification SECRET", ("GBR", "SECRET", ()), id="clearance"),
    pytest.param("FRA", ("FRA", "TRES_SECRET_DEFENSE", (), {}), {"rel": ["USA", "GBR"]},
                 "nationality FRA is not in releasable-to", ("GBR", "SECRET", ()), id="releasability"),
    pytest.param("USA", ("USA", "TOP_SECRET", ("FVEY",), {}), {"coi": ["NATO"]},
                 "lacks [NATO] of required coi", ("USA", "SECRET", ("NATO",)), id="coi"),
    pytest.param("GBR", ("GBR", "TOP_SECRET", ("FVEY", "NATO"), {}), {"embargo": FUTURE},
                 "embargoed until", None, id="embargo"),
    pytest.param("USA", ("FRA", "TRES_SECRET_DEFENSE", (), {"nationality": "USA"}), {"rel": ["USA"]},
                 "may not assert nationality USA", ("USA", "SECRET", ()), id="issuer-nation"),
]


@pytest.mark.parametrize(("nation", "user", "pol_args", "reason", "permitted"), DENIALS)
def test_denial(kas: Kas, nation: str, user: tuple, pol_args: dict[str, Any], reason: str,
                permitted: tuple | None) -> None:
    """The same denial through every path: SDK over HTTP and handles, v1 (403) and v2 (200 + fail)."""
    pol = policy(**pol_args)
    data = b"denied " + os.urandom(64)
    tdf = seal(kas, pol, [[(nation, "rsa:2048")]], data)
    kao, policy_b64 = first_kao(tdf)
    user_nation, clearance, coi, extra = user
    sub = unique("deny")
    token = kas.token(user_nation, sub, clearance, coi, **extra)

    for transport in ("http", "handle"):
        with pytest.raises(AccessDenied, match="forbidden"):
            open_tdf(kas, tdf, kas.client(transport, token))

    requester = Requester(kas)
    rid, reply = requester.http(nation, token, requester.v1(kao, policy_b64))
    assert json_error(reply, 403)["code"] == "permission_denied"
    one_line(kas, nation, rid, "KEY_DENIED", "forbidden")

    rid, reply = requester.http(nation, token, requester.v2((policy_b64, [kao])), route=REST_REWRAP)
    assert reply.status_code == 200, reply.text
    no_key(reply.text)
    (result,) = results(reply.json())
    fail_closed(result, OPENTDF_FORBIDDEN)
    one_line(kas, nation, rid, "KEY_DENIED", "forbidden")

    rid, envelope = requester.handle(nation, token, requester.v1(kao, policy_b64))
    assert "ok" not in envelope and envelope["error"]["code"] == "forbidden", envelope
    no_key(envelope)
    one_line(kas, nation, rid, "KEY_DENIED", "forbidden")

    rid, envelope = requester.handle(nation, token, requester.v2((policy_b64, [kao])))
    no_key(envelope)
    (result,) = results(envelope["ok"])
    fail_closed(result, OPENTDF_FORBIDDEN)
    one_line(kas, nation, rid, "KEY_DENIED", "forbidden")

    lines = kas.audit(nation, subject=sub)
    assert len(lines) == 6 and {e["action"] for e in lines} == {"KEY_DENIED"}
    assert all(any(reason in r for r in e["reasons"]) for e in lines), lines[0]["reasons"]
    if permitted is not None:  # the object itself is fine: a user the policy admits opens it
        p_nation, p_clearance, p_coi = permitted
        assert open_tdf(kas, tdf, kas.client("http", kas.token(p_nation, unique("ok"), p_clearance, p_coi))) == data


# === tampering ===========================================================================================
@pytest.mark.parametrize("algorithm", ["rsa:2048", "ec:secp256r1"])
def test_tampered_binding(kas: Kas, algorithm: KeyAlgorithm) -> None:
    """A forged binding, or a relabelled policy with the original KAO: 400 / OPENTDF_BAD_REQUEST, no key."""
    pol = policy(rel=["USA"])
    share = kas.share()
    kao = kao_for(kas, "USA", pol, share, algorithm)
    forged = kao.model_copy(update={"policy_binding": kao.policy_binding.model_copy(
        update={"hash": base64.b64encode(os.urandom(32).hex().encode()).decode()})})
    relabelled = policy("UNCLASSIFIED", rel=["USA"])
    sub = unique("tamper")
    token = kas.token("USA", sub, "TOP_SECRET")  # ABAC would admit this user to either policy
    requester = Requester(kas)
    cases = [(forged, pol.to_base64()), (kao, Policy(uuid=pol.uuid, body=relabelled.body).to_base64())]
    for bad_kao, policy_b64 in cases:
        rid, reply = requester.http("USA", token, requester.v1(bad_kao, policy_b64))
        assert json_error(reply, 400)["code"] == "invalid_argument"
        one_line(kas, "USA", rid, "KEY_ERROR", "policy_binding_mismatch")
        for route in (CONNECT_REWRAP, REST_REWRAP, ACP_REWRAP):
            rid, reply = requester.http("USA", token, requester.v2((policy_b64, [bad_kao])), route=route)
            assert reply.status_code == 200, reply.text
            no_key(reply.text)
            fail_closed(results(reply.json())[0], OPENTDF_BAD_REQUEST)
            one_line(kas, "USA", rid, "KEY_ERROR", "policy_binding_mismatch")
        rid, envelope = requester.handle("USA", token, requester.v1(bad_kao, policy_b64))
        assert "ok" not in envelope and envelope["error"]["code"] == "bad_format", envelope
        one_line(kas, "USA", rid, "KEY_ERROR", "policy_binding_mismatch")
        rid, envelope = requester.handle("USA", token, requester.v2((policy_b64, [bad_kao])))
        no_key(envelope)
        fail_closed(results(envelope["ok"])[0], OPENTDF_BAD_REQUEST)
        one_line(kas, "USA", rid, "KEY_ERROR", "policy_binding_mismatch")
    # Control: the untouched KAO is released to the same user.
    rid, reply = requester.http("USA", token, requester.v2((pol.to_base64(), [kao])))
    assert requester.open(reply.json(), results(reply.json())[0]["kasWrappedKey"]) == share
    assert len(kas.audit("USA", subject=sub)) == 2 * 6 + 1


def test_tampered_tdf_through_sdk(kas: Kas) -> None:
    """An SDK-made TDF whose manifest policy was relabelled: refused (not denied), no key, via HTTP and handles."""
    pol = policy("TOP_SECRET", rel=["GBR"])
    tdf = seal(kas, pol, [[("GBR", "ec:secp256r1")]], b"relabel me")
    lower = Policy(uuid=pol.uuid, body=policy("UNCLASSIFIED", rel=NATIONS).body).to_base64()
    tampered = with_manifest(tdf, lambda m: m["encryptionInformation"].update(policy=lower))
    sub = unique("tamper-sdk")
    token = kas.token("FRA", sub, "NON_PROTEGE")  # cleared for the forged label only
    for transport in ("http", "handle"):
        with pytest.raises(RewrapError, match="bad request"):
            open_tdf(kas, tampered, kas.client(transport, token))
    lines = kas.audit("GBR", subject=sub)
    assert [(e["action"], e["error_code"]) for e in lines] == [("KEY_ERROR", "policy_binding_mismatch")] * 2


# === bad input sweep =====================================================================================
@dataclass(frozen=True)
class Bad:
    method: str
    path: str
    build: Callable[[Kas], dict[str, Any]]
    status: int | tuple[int, ...]
    #: Audit lines the request leaves: "reject" one REQUEST_REJECTED, "kao" one KEY_ERROR, None at most one.
    audit: str | None = None


JSON_CT = {"Content-Type": "application/json"}
PROTO_CT = {"Content-Type": "application/proto"}
OVERSIZED = b'{"signedRequestToken": "' + b"A" * (MAX_BODY + 16) + b'"}'
GZIP_BOMB = gzip.compress(b'{"algorithm": "' + b" " * (4 * MAX_BODY) + b'"}', 9)
DEEP = b"[" * 200_000 + b"]" * 200_000


def raw(content: bytes, headers: dict[str, str] | None = None, *, auth: bool = False) -> Callable[[Kas], dict]:
    def build(kas: Kas) -> dict[str, Any]:
        hdrs = dict(JSON_CT if headers is None else headers)
        if auth:
            hdrs["Authorization"] = f"Bearer {kas.token('USA', unique('sweep'), 'SECRET')}"
        return {"content": content, "headers": hdrs}
    return build


def as_json(make: Callable[[Kas], Any], *, auth: bool = True, srt: bool = False,
            authorization: Callable[[Kas], str] | None = None) -> Callable[[Kas], dict]:
    """A JSON body made by ``make(kas)`` (wrapped in an SRT if ``srt``), with a valid USA bearer token."""
    def build(kas: Kas) -> dict[str, Any]:
        body = make(kas)
        if srt:
            body = {"signedRequestToken": sign_request(body, new_ec_key())}
        headers = dict(JSON_CT)
        if authorization is not None:
            headers["Authorization"] = authorization(kas)
        elif auth:
            headers["Authorization"] = f"Bearer {kas.token('USA', unique('sweep'), 'SECRET')}"
        return {"content": json.dumps(body).encode(), "headers": headers}
    return build


def v1_body(mutate: dict[str, Any]) -> Callable[[Kas], dict[str, Any]]:
    def make(kas: Kas) -> dict[str, Any]:
        pol = policy(rel=["USA"])
        kao = kao_for(kas, "USA", pol, kas.share()).model_copy(update=mutate)
        return Requester(kas).v1(kao, pol.to_base64())
    return make


def v2_body(kas: Kas) -> dict[str, Any]:
    pol = policy(rel=["USA"])
    return Requester(kas).v2((pol.to_base64(), [kao_for(kas, "USA", pol, kas.share())]))


def bearer(kind: str) -> Callable[[Kas], str]:
    def make(kas: Kas) -> str:
        if kind == "expired":
            return f"Bearer {kas.token('USA', unique('sweep'), 'SECRET', ttl=-600)}"
        if kind == "audience":
            return f"Bearer {kas.token('USA', unique('sweep'), 'SECRET', audience='someone-else')}"
        if kind == "untrusted":  # a dev IdP no KAS of this coalition lists
            return f"Bearer {kas.token('DEU', unique('sweep'), 'SECRET')}"
        if kind == "forged":
            token = kas.token("USA", unique("sweep"), "SECRET")
            head, body, _ = token.split(".")
            return f"Bearer {head}.{body}.{base64.urlsafe_b64encode(os.urandom(64)).decode().rstrip('=')}"
        return {"garbage": "Bearer not-a-jwt", "basic": "Basic dXNlcjpwdw==", "empty": "Bearer",
                "none-alg": "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."}[kind]
    return make


PK, LPK, RW = "/kas.AccessService/PublicKey", "/kas.AccessService/LegacyPublicKey", CONNECT_REWRAP
SWEEP: dict[str, Bad] = {
    # --- Connect PublicKey
    "pk-malformed-json": Bad("POST", PK, raw(b'{"algorithm":'), 400),
    "pk-wrong-type": Bad("POST", PK, raw(b'{"algorithm": 5}'), 400),
    "pk-array": Bad("POST", PK, raw(b"[1, 2]"), 400),
    "pk-not-utf8": Bad("POST", PK, raw(b'{"algorithm": "\xff\xfe"}'), 400),
    "pk-lone-surrogate": Bad("POST", PK, raw(b'{"algorithm": "\\ud800"}'), 400),
    "pk-unknown-algorithm": Bad("POST", PK, raw(b'{"algorithm": "rsa:1024"}'), 400),
    "pk-bad-fmt": Bad("POST", PK, raw(b'{"fmt": "jwk"}'), 400),
    "pk-deep-json": Bad("POST", PK, raw(DEEP), 400),
    "pk-proto-garbage": Bad("POST", PK, raw(b"\xff\xff\xff\xff", PROTO_CT), 400),
    "pk-proto-wrong-wire-type": Bad("POST", PK, raw(b"\x08\x01", PROTO_CT), 400),
    "pk-proto-truncated": Bad("POST", PK, raw(b"\x0a\x20abc", PROTO_CT), 400),
    "pk-gzip-garbage": Bad("POST", PK, raw(b"not gzip at all", {**PROTO_CT, "Content-Encoding": "gzip"}), 400),
    "pk-gzip-bomb": Bad("POST", PK, raw(GZIP_BOMB, {**JSON_CT, "Content-Encoding": "gzip"}), (400, 413)),
    "pk-connect-version": Bad("POST", PK, raw(b"{}", {**JSON_CT, "Connect-Protocol-Version": "2"}), 400),
    "pk-content-type": Bad("POST", PK, raw(b"<a/>", {"Content-Type": "text/xml"}), 415),
    "pk-oversized": Bad("POST", PK, raw(OVERSIZED), 413),
    # --- Connect LegacyPublicKey
    "lpk-malformed-json": Bad("POST", LPK, raw(b"{,}"), 400),
    "lpk-wrong-type": Bad("POST", LPK, raw(b'{"algorithm": ["rsa:2048"]}'), 400),
    "lpk-unknown-algorithm": Bad("POST", LPK, raw(b'{"algorithm": "dsa:1024"}'), 400),
    "lpk-proto-garbage": Bad("POST", LPK, raw(b"\x0a\xff\xff\xff\xff\x0f", PROTO_CT), 400),
    "lpk-gzip-garbage": Bad("POST", LPK, raw(b"\x1f\x8b\x08\x00garbage", {**JSON_CT, "Content-Encoding": "gzip"}),
                            400),
    "lpk-content-type": Bad("POST", LPK, raw(b"algorithm=rsa", {"Content-Type": "application/x-www-form-urlencoded"}),
                            415),
    "lpk-oversized": Bad("POST", LPK, raw(OVERSIZED), 413),
    # --- Connect Rewrap
    "rw-malformed-json": Bad("POST", RW, raw(b'{"signedRequestToken": "a.b', auth=True), 400),
    "rw-wrong-type": Bad("POST", RW, raw(b'{"signedRequestToken": 42}', auth=True), 400),
    "rw-srt-not-jwt": Bad("POST", RW, as_json(lambda k: {"signedRequestToken": "not a jwt"}), 400, "reject"),
    "rw-srt-empty": Bad("POST", RW, as_json(lambda k: {"signedRequestToken": ""}), 400, "reject"),
    "rw-srt-none-alg": Bad("POST", RW, as_json(lambda k: {"signedRequestToken": "eyJhbGciOiJub25lIn0.e30."}), 400,
                           "reject"),
    "rw-no-token": Bad("POST", RW, as_json(v2_body, auth=False, srt=True), 401, "reject"),
    "rw-garbage-token": Bad("POST", RW, as_json(v2_body, srt=True, authorization=bearer("garbage")), 401, "reject"),
    "rw-basic-auth": Bad("POST", RW, as_json(v2_body, srt=True, authorization=bearer("basic")), 401, "reject"),
    "rw-empty-bearer": Bad("POST", RW, as_json(v2_body, srt=True, authorization=bearer("empty")), 401, "reject"),
    "rw-none-alg-token": Bad("POST", RW, as_json(v2_body, srt=True, authorization=bearer("none-alg")), 401,
                             "reject"),
    "rw-expired-token": Bad("POST", RW, as_json(v2_body, srt=True, authorization=bearer("expired")), 401, "reject"),
    "rw-wrong-audience": Bad("POST", RW, as_json(v2_body, srt=True, authorization=bearer("audience")), 401,
                             "reject"),
    "rw-untrusted-issuer": Bad("POST", RW, as_json(v2_body, srt=True, authorization=bearer("untrusted")), 401,
                               "reject"),
    "rw-forged-token": Bad("POST", RW, as_json(v2_body, srt=True, authorization=bearer("forged")), 401, "reject"),
    "rw-unknown-kid-v1": Bad("POST", RW, as_json(v1_body({"kid": "usa-r2048-v999"}), srt=True), 400, "kao"),
    "rw-bad-base64-v1": Bad("POST", RW, as_json(v1_body({"wrapped_key": "not base64 !!"}), srt=True), 400, "kao"),
    "rw-bad-client-key": Bad("POST", RW, as_json(lambda k: {**v2_body(k), "clientPublicKey": "garbage"}, srt=True),
                             400, "reject"),
    "rw-body-wrong-types": Bad("POST", RW, as_json(lambda k: {"clientPublicKey": 5, "requests": {"a": 1}}, srt=True),
                               400, "reject"),
    "rw-proto-garbage": Bad("POST", RW, raw(b"\x0a\x05ab", PROTO_CT, auth=True), 400),
    "rw-proto-bad-srt": Bad("POST", RW, raw(proto.encode_rewrap_request("x.y.z"), PROTO_CT, auth=True), 400, "reject"),
    "rw-gzip-garbage": Bad("POST", RW, raw(b"\x1f\x8b garbage", {**JSON_CT, "Content-Encoding": "gzip"}, auth=True),
                           400),
    "rw-connect-version": Bad("POST", RW, raw(b"{}", {**JSON_CT, "Connect-Protocol-Version": "0"}, auth=True), 400),
    "rw-content-type": Bad("POST", RW, raw(b"{}", {"Content-Type": "text/plain"}, auth=True), 415),
    "rw-oversized": Bad("POST", RW, raw(OVERSIZED, auth=True), 413),
    # --- legacy REST public keys
    "rest-pk-algorithm": Bad("GET", "/kas/kas_public_key?algorithm=rsa:512", lambda k: {}, 400),
    "rest-pk-fmt": Bad("GET", "/kas/kas_public_key?fmt=jwk", lambda k: {}, 400),
    "rest-pk-nul": Bad("GET", "/kas/kas_public_key?algorithm=%00", lambda k: {}, 400),
    "rest-pk2-algorithm": Bad("GET", "/kas/v2/kas_public_key?algorithm=" + "x" * 5000, lambda k: {}, 400),
    "rest-pk2-fmt": Bad("GET", "/kas/v2/kas_public_key?algorithm=ec:secp256r1&fmt=der", lambda k: {}, 400),
    # --- legacy REST rewrap
    "rest-rw-malformed-json": Bad("POST", REST_REWRAP, raw(b"{'single': 'quotes'}", auth=True), 400),
    "rest-rw-json-string": Bad("POST", REST_REWRAP, raw(b'"a string"', auth=True), 400),
    "rest-rw-deep-json": Bad("POST", REST_REWRAP, raw(DEEP, auth=True), 400),
    "rest-rw-proto": Bad("POST", REST_REWRAP, raw(b"\x0a\x00", PROTO_CT, auth=True), 415),
    "rest-rw-no-token": Bad("POST", REST_REWRAP, as_json(v2_body, auth=False, srt=True), 401, "reject"),
    "rest-rw-srt-wrong-type": Bad("POST", REST_REWRAP, as_json(lambda k: {"signedRequestToken": 42}), 400, "reject"),
    "rest-rw-unknown-kid-v1": Bad("POST", REST_REWRAP, as_json(v1_body({"kid": "nope"}), srt=True), 400, "kao"),
    "rest-rw-bad-base64-v1": Bad("POST", REST_REWRAP, as_json(v1_body({"wrapped_key": "%%%%"}), srt=True), 400,
                                 "kao"),
    "rest-rw-gzip-garbage": Bad("POST", REST_REWRAP,
                                raw(b"\x1f\x8b\x08garbage", {**JSON_CT, "Content-Encoding": "gzip"}, auth=True), 400),
    "rest-rw-oversized": Bad("POST", REST_REWRAP, raw(OVERSIZED, auth=True), 413),
    # --- ACP-240 form
    "acp-no-token": Bad("POST", ACP_REWRAP, as_json(v2_body, auth=False), 401, "reject"),
    "acp-garbage-token": Bad("POST", ACP_REWRAP, as_json(v2_body, authorization=bearer("garbage")), 401, "reject"),
    "acp-plain-wrong-types": Bad("POST", ACP_REWRAP, as_json(
        lambda k: {"clientPublicKey": ["x"], "requests": [{"policy": 1, "keyAccessObjects": "x"}]}), 400, "reject"),
    "acp-plain-no-client-key": Bad("POST", ACP_REWRAP, as_json(
        lambda k: {key: v for key, v in v2_body(k).items() if key != "clientPublicKey"}), 400, "reject"),
    "acp-plain-kao-wrong-types": Bad("POST", ACP_REWRAP, as_json(lambda k: {**v2_body(k), "requests": [
        {"policy": {"body": "e30="}, "keyAccessObjects": [{"keyAccessObjectId": 5, "keyAccessObject": "x"}]}]}),
        400, "reject"),
    "acp-plain-unknown-kid-v1": Bad("POST", ACP_REWRAP, as_json(v1_body({"kid": "usa-ec256-v7"})), 400, "kao"),
    "acp-plain-bad-base64-v1": Bad("POST", ACP_REWRAP, as_json(v1_body({"wrapped_key": "@@@"})), 400, "kao"),
    "acp-srt-garbage": Bad("POST", ACP_REWRAP, as_json(lambda k: {"signedRequestToken": "a.b.c"}), 400, "reject"),
    "acp-srt-wrong-type": Bad("POST", ACP_REWRAP, as_json(lambda k: {"signedRequestToken": {"x": 1}}), 400, "reject"),
    "acp-srt-bad-body": Bad("POST", ACP_REWRAP, as_json(lambda k: {"requests": []}, srt=True), 400, "reject"),
    "acp-content-type": Bad("POST", ACP_REWRAP, raw(b"<x/>", {"Content-Type": "application/xml"}, auth=True), 415),
    "acp-malformed-json": Bad("POST", ACP_REWRAP, raw(b"\x00\x01\x02", auth=True), 400),
    "acp-oversized": Bad("POST", ACP_REWRAP, raw(OVERSIZED, auth=True), 413),
}


@pytest.mark.parametrize("case", list(SWEEP.values()), ids=list(SWEEP))
def test_bad_input(kas: Kas, case: Bad) -> None:
    rid = unique("rid")
    kwargs = case.build(kas)
    kwargs["headers"] = {**kwargs.get("headers", {}), "X-Request-ID": rid}
    reply = kas.http.request(case.method, kas.url("USA") + case.path, **kwargs)
    json_error(reply, case.status)
    lines = kas.audit("USA", request_id=rid)
    if "ewrap" not in case.path:
        assert lines == []
    elif case.audit == "reject":
        assert [(e["action"], e["decision"]) for e in lines] == [("REQUEST_REJECTED", "reject")]
    elif case.audit == "kao":
        assert [e["action"] for e in lines] == ["KEY_ERROR"]
    else:
        assert len(lines) <= 1


def test_a_request_id_that_is_not_id_like_is_audited_as_its_digest(kas: Kas) -> None:
    """X-Request-ID is the client's: audited as sent when it looks like an id, else as a digest the
    client can match (a fuzzer's or a careless client's base64 JSON never reaches the audit)."""
    odd = "eyJ" + unique("rid").replace("-", "") + "=="
    digest = "sha256:" + hashlib.sha256(odd.encode()).hexdigest()[:16]
    for rid, audited in ((unique("rid"), None), (odd, digest)):
        reply = kas.http.post(kas.url("USA") + REST_REWRAP, json={"signedRequestToken": "x"},
                              headers={**JSON_CT, "X-Request-ID": rid})  # no token: 401, one REQUEST_REJECTED
        json_error(reply, 401)
        lines = kas.audit("USA", request_id=audited or rid)
        assert [e["action"] for e in lines] == ["REQUEST_REJECTED"], (rid, lines)
    assert kas.audit("USA", request_id=odd) == []


def test_unsupported_content_encoding(kas: Kas) -> None:
    """Connect maps an unknown Content-Encoding to `unimplemented` (501): a JSON error, not a 500."""
    for path in (PK, RW, REST_REWRAP):
        reply = kas.http.post(kas.url("USA") + path, content=b"{}", headers={**JSON_CT, "Content-Encoding": "br"})
        assert reply.status_code == 501 and reply.json()["code"] == "unimplemented", reply.text


@pytest.mark.parametrize("route", [ACP_REWRAP, REST_REWRAP, CONNECT_REWRAP])
def test_thousands_of_kaos_refused_quickly(kas: Kas, route: str) -> None:
    """5000 KAOs (2000 inside an SRT, to stay under 1 MiB) → 400 within seconds, one REQUEST_REJECTED."""
    count = 2000 if route == CONNECT_REWRAP else 5000
    tiny = {"type": "wrapped", "url": kas.url("USA"), "protocol": "kas", "wrappedKey": "AAAA",
            "policyBinding": {"alg": "HS256", "hash": "AAAA"}}
    body = {"clientPublicKey": Requester(kas).public_pem, "requests": [{
        "policy": {"id": "p", "body": policy().to_base64()},
        "keyAccessObjects": [{"keyAccessObjectId": f"k{i}", "keyAccessObject": tiny} for i in range(count)]}]}
    payload = {"signedRequestToken": sign_request(body, new_ec_key())} if route == CONNECT_REWRAP else body
    content = json.dumps(payload, separators=(",", ":")).encode()
    assert len(content) < MAX_BODY
    rid = unique("rid")
    headers = {**JSON_CT, "X-Request-ID": rid,
               "Authorization": f"Bearer {kas.token('USA', unique('many'), 'SECRET')}"}
    started = time.perf_counter()
    reply = kas.http.post(kas.url("USA") + route, content=content, headers=headers)
    elapsed = time.perf_counter() - started
    assert "too many key access objects" in json_error(reply, 400)["message"]
    assert elapsed < 5.0, f"{count} KAOs took {elapsed:.1f}s"
    one_line(kas, "USA", rid, "REQUEST_REJECTED", "bad_format")


def raw_http(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; read one HTTP/1.1 response (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines if ":" in h)}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(status_line.split()[1]), headers, body[:length]


def test_content_length_lies_and_chunked_oversize(kas: Kas) -> None:
    port = int(kas.cluster.base_url.rsplit(":", 1)[1])
    path = "/usa" + REST_REWRAP

    def request(headers: str, body: bytes) -> bytes:
        return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{headers}\r\n".encode() \
            + body

    # Declares more than the limit: refused from the header, without waiting for the body.
    started = time.perf_counter()
    status, headers, body = raw_http(port, request("Content-Length: 50000000\r\n", b"{}"))
    assert status == 413 and json.loads(body)["code"] == "resource_exhausted"
    assert time.perf_counter() - started < 5
    # Declares less than it sends: the declared bytes are the body (truncated JSON) → 400 JSON.
    status, headers, body = raw_http(port, request("Content-Length: 5\r\nConnection: close\r\n",
                                                   b'{"clientPublicKey": "x", "requests": []}'))
    assert status == 400 and json.loads(body)["code"] == "invalid_argument"
    # Not a number, negative, or twice: the proxy's HTTP parser refuses it (400, never 500).
    for bad in ("Content-Length: abc\r\n", "Content-Length: -5\r\n", "Content-Length: 2\r\nContent-Length: 3\r\n",
                "Content-Length: 2\r\nTransfer-Encoding: chunked\r\n"):
        status, _, _ = raw_http(port, request(bad, b"{}"))
        assert status == 400, bad
    # Chunked (no Content-Length), past the limit: cut off while streaming.
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b" " * 65536
    reply = kas.http.post(kas.url("USA") + REST_REWRAP, content=chunks(), headers=JSON_CT)
    json_error(reply, 413)
    assert httpx.get(kas.url("USA") + "/healthz").status_code == 200


# === audit ===============================================================================================
def test_audit_one_line_per_decision(kas: Kas) -> None:
    """A controlled batch at USA: lines for the subject == KAO decisions; each rejection one line."""
    sub = unique("audit")
    token = kas.token("FRA", sub, "SECRET_DEFENSE")
    allowed, denied = policy(rel=["USA", "FRA"]), policy(rel=["GBR"])
    s1, s2, s3, s4 = (kas.share() for _ in range(4))
    good_rsa, good_ec = kao_for(kas, "USA", allowed, s1), kao_for(kas, "USA", allowed, s2, "ec:secp256r1")
    tampered = good_rsa.model_copy(update={"policy_binding": kao_for(kas, "USA", denied, s1).policy_binding})
    unknown_kid = kao_for(kas, "USA", allowed, s3).model_copy(update={"kid": "usa-r2048-v404"})
    bad_b64 = good_ec.model_copy(update={"wrapped_key": "!!"})
    deny_a, deny_b = kao_for(kas, "USA", denied, s4), kao_for(kas, "USA", denied, s4, "ec:secp256r1")
    # (A KAO naming another nation is brokered to it by federation: covered by the federation tests.)
    ids = [f"id-{i}" for i in range(7)]
    expected = {"id-0": ("permit", None, "KEY_RELEASED"), "id-1": ("permit", None, "KEY_RELEASED"),
                "id-2": ("fail", OPENTDF_BAD_REQUEST, "KEY_ERROR"), "id-3": ("fail", OPENTDF_BAD_REQUEST, "KEY_ERROR"),
                "id-4": ("fail", OPENTDF_BAD_REQUEST, "KEY_ERROR"), "id-5": ("fail", OPENTDF_FORBIDDEN, "KEY_DENIED"),
                "id-6": ("fail", OPENTDF_FORBIDDEN, "KEY_DENIED")}
    requester = Requester(kas)
    body = requester.v2((allowed.to_base64(), [good_rsa, good_ec, tampered, unknown_kid, bad_b64]),
                        (denied.to_base64(), [deny_a, deny_b]), ids=ids)
    rid_http, reply = requester.http("USA", token, body)
    assert reply.status_code == 200
    rid_handle, envelope = requester.handle("USA", token, body)
    for rid, wire in ((rid_http, reply.json()), (rid_handle, envelope["ok"])):
        by_id = {r["keyAccessObjectId"]: r for r in results(wire)}
        assert {i: (by_id[i]["status"], by_id[i].get("error")) for i in ids} == {
            i: e[:2] for i, e in expected.items()}
        for i in ids[2:]:
            no_key(by_id[i])
        assert requester.open(wire, by_id["id-0"]["kasWrappedKey"]) == s1
        assert requester.open(wire, by_id["id-1"]["kasWrappedKey"]) == s2
        lines = kas.audit("USA", request_id=rid)
        assert sorted(e["kao_id"] for e in lines) == ids  # exactly one line per KAO
        assert {e["kao_id"]: e["action"] for e in lines} == {i: e[2] for i, e in expected.items()}
        assert all(e["subject"] == sub for e in lines)

    # SDK decrypts: one line per rewrap the client made (an anyOf tries the next KAS after a denial).
    tdfs = [seal(kas, allowed, [[("USA", "rsa:2048")]], b"a"),
            seal(kas, denied, [[("USA", "ec:secp256r1"), ("USA", "rsa:2048")]], b"b")]
    assert open_tdf(kas, tdfs[0], kas.client("http", token)) == b"a"
    with pytest.raises(AccessDenied):
        open_tdf(kas, tdfs[1], kas.client("handle", token))

    # Request-level rejections: one REQUEST_REJECTED each, and none of them a KAO decision.
    other = Requester(kas)
    rejections = [
        (lambda: other.http("USA", kas.token("FRA", sub, "SECRET_DEFENSE", ttl=-600), body), 401, "invalid_token"),
        (lambda: other.http("USA", token, body, htu=kas.url("FRA") + CONNECT_REWRAP), 401, "invalid_dpop_proof"),
        (lambda: other.http("USA", None, body, dpop=False), 401, "invalid_token"),
        (lambda: other.http("USA", token, {**body, "clientPublicKey": "x"}), 400, "bad_format"),
    ]
    for send, status, code in rejections:
        rid, reply = send()
        json_error(reply, status)
        one_line(kas, "USA", rid, "REQUEST_REJECTED", code)
    # An SRT signed by some other key than the DPoP key of the request.
    rid, url = unique("rid"), kas.url("USA") + CONNECT_REWRAP
    reply = kas.http.post(url, json={"signedRequestToken": sign_request(body, new_ec_key())},
                          headers={**other._auth(token, url, True), "X-Request-ID": rid})
    json_error(reply, 400)
    one_line(kas, "USA", rid, "REQUEST_REJECTED", "invalid_signed_request")
    # Replaying a DPoP proof: the first use is decided, the replay rejected, one line each.
    url = kas.url("USA") + CONNECT_REWRAP
    headers = other._auth(token, url, True)
    srt = {"signedRequestToken": sign_request(body, other.dpop_key)}
    first, replay = unique("rid"), unique("rid")
    assert kas.http.post(url, json=srt, headers={**headers, "X-Request-ID": first}).status_code == 200
    json_error(kas.http.post(url, json=srt, headers={**headers, "X-Request-ID": replay}), 401)
    assert len(kas.audit("USA", request_id=first)) == len(ids)
    one_line(kas, "USA", replay, "REQUEST_REJECTED", "replay")

    # Total for the subject: 3 batches of 7 KAOs, 1 + 2 SDK rewraps; rejections carry no subject.
    lines = kas.audit("USA", subject=sub)
    assert len(lines) == 3 * len(ids) + 3
    assert [e["action"] for e in lines].count("KEY_RELEASED") == 3 * 2 + 1


# === HSM actor failure (GBR) =============================================================================
#: How a v2 result says "retry later" (HSM, peer or deadline), as opposed to a refusal.
UNAVAILABLE = "rpc error: code = Unavailable desc = "


@dataclass
class Outcome:
    v1: bool
    started: float
    elapsed: float
    status: int | None
    rid: str
    wire: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    ok: bool = False
    error: str | None = None


def check_outage_answer(kas: Kas, nation: str, o: Outcome) -> None:
    """A released key, or "unavailable, retry": 503 + Retry-After (v1) or a v2 Unavailable result. Never a
    500, never a refusal that would make a client give up, never a key in a failure; one audit line."""
    assert o.error is None, o.error
    assert o.elapsed < HSM_TIMEOUT + 5, f"a request took {o.elapsed:.1f}s (HSM timeout {HSM_TIMEOUT}s)"
    assert o.wire is not None
    if o.status == 503:
        assert o.headers.get("retry-after") and o.wire["code"] == "unavailable", o
        if o.wire.get("error") == "key_backend_unavailable":  # the detail is the operators'
            assert o.wire["message"] == "the key backend is unavailable; retry later", o.wire
        no_key(o.wire)
    else:
        assert o.status == 200, (o.v1, o.status, o.wire)
        if not o.ok:
            assert not o.v1, o.wire
            (result,) = results(o.wire)
            assert result["status"] == "fail" and result["error"].startswith(UNAVAILABLE), result
            no_key(result)
    lines = kas.audit(nation, request_id=o.rid)
    assert len(lines) == 1, lines
    if o.ok:
        assert lines[0]["action"] == "KEY_RELEASED"
    else:
        assert (lines[0]["action"], lines[0]["error_code"]) == ("KEY_ERROR", "key_backend_unavailable"), lines


def rewrap_fresh(kas: Kas, nation: str, token: str, pol: Policy, *, v1: bool, http: httpx.Client) -> Outcome:
    """A rewrap of a fresh share (never a cache hit: every request needs the HSM actor)."""
    share = kas.share()
    requester = Requester(kas)
    kao = kao_for(kas, nation, pol, share)
    body = requester.v1(kao, pol.to_base64()) if v1 else requester.v2((pol.to_base64(), [kao]))
    started = time.perf_counter()
    try:
        rid, reply = requester.http(nation, token, body, route=REST_REWRAP, client=http)
    except httpx.HTTPError as exc:
        return Outcome(v1, started, time.perf_counter() - started, None, "", error=repr(exc))
    outcome = Outcome(v1, started, time.perf_counter() - started, reply.status_code, rid, headers=dict(reply.headers))
    try:
        outcome.wire = reply.json()
    except ValueError:
        outcome.error = f"{reply.status_code}: {reply.text[:200]}"
        return outcome
    if reply.status_code == 200:
        wrapped = outcome.wire.get("entityWrappedKey") if v1 else results(outcome.wire)[0].get("kasWrappedKey")
        outcome.ok = bool(wrapped) and requester.open(outcome.wire, wrapped) == share
    return outcome


def test_hsm_actor_death_gbr(kas: Kas) -> None:
    """Kill GBR's HSM actor (restartable) under load: every answer is a key or "unavailable, retry",
    none is a 500 or hangs past the HSM timeout; a rewrap succeeds again within 30 s."""
    import ray

    from kas_ray.serve.actors import NAMESPACE, hsm_actor_name

    hsm = ray.get_actor(hsm_actor_name("GBR"), namespace=NAMESPACE)
    old_pid = ray.get(hsm.pid.remote(), timeout=30)
    pol = policy(rel=["GBR"])
    token = kas.token("GBR", unique("hsm"), "SECRET")
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    with httpx.Client(timeout=HSM_TIMEOUT + 20) as warm:
        assert rewrap_fresh(kas, "GBR", token, pol, v1=False, http=warm).ok
    stop = threading.Event()

    def worker(v1: bool) -> None:
        with httpx.Client(timeout=HSM_TIMEOUT + 20) as http:
            while not stop.is_set():
                outcome = rewrap_fresh(kas, "GBR", token, pol, v1=v1, http=http)
                with lock:
                    outcomes.append(outcome)

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(worker, v1) for v1 in (False, True, False)]
        time.sleep(1.0)
        killed_at = time.perf_counter()
        ray.kill(hsm, no_restart=False)  # Ray brings it back (max_restarts=-1)
        recovered_at = None
        while time.perf_counter() < killed_at + 30 and recovered_at is None:
            time.sleep(0.2)
            with lock:
                late = [o for o in outcomes if o.started > killed_at + 0.5 and o.ok]
            recovered_at = min((o.started + o.elapsed for o in late), default=None)
        stop.set()
        for future in futures:
            future.result(timeout=HSM_TIMEOUT + 30)

    summary = sorted({(o.v1, o.status, o.ok) for o in outcomes}, key=str)
    assert recovered_at is not None, f"no rewrap succeeded within 30 s of the kill: {summary}"
    for o in outcomes:
        check_outage_answer(kas, "GBR", o)
    assert ray.get(hsm.pid.remote(), timeout=30) != old_pid
    after = sum(1 for o in outcomes if o.started + o.elapsed > killed_at)
    print(f"\nHSM kill: {len(outcomes)} requests, {after} after the kill, outcomes (v1, status, key) {summary}, "
          f"a key released again {recovered_at - killed_at:.1f}s after the kill")
    assert kas.http.get(kas.url("GBR") + "/readyz").status_code == 200
    with httpx.Client(timeout=30) as http:
        assert rewrap_fresh(kas, "GBR", token, pol, v1=True, http=http).ok


# === same state dir, same keys ==============================================================================
ALGORITHMS: list[KeyAlgorithm] = ["rsa:2048", "ec:secp256r1", "rsa:4096"]


def test_redeploy_nation_keeps_keys(kas: Kas) -> None:
    """Tear FRA down (Serve app + named actors), redeploy on the same state dir: same kids, old TDFs open."""
    import ray
    from ray import serve

    from kas_ray.serve.actors import NAMESPACE, hsm_actor_name, kill_actors
    from kas_ray.serve.runner import _wait_ready, deploy, nation_settings

    url = kas.url("FRA")

    def public_keys() -> dict[str, dict[str, str]]:
        return {a: kas.http.get(url + "/kas/v2/kas_public_key", params={"algorithm": a}).json() for a in ALGORITHMS}

    before = public_keys()
    data = {a: os.urandom(500) for a in ALGORITHMS}
    tdfs = {a: seal(kas, policy(rel=["FRA"]), [[("FRA", a)]], data[a]) for a in ALGORITHMS}
    old_pid = ray.get(ray.get_actor(hsm_actor_name("FRA"), namespace=NAMESPACE).pid.remote(), timeout=30)
    # The settings conftest deployed FRA with (same coalition: the trust registry lists every nation's IdP).
    (settings,) = [s for s in nation_settings(kas.state, NATIONS, kas.cluster.base_url) if s.nation == "FRA"]
    assert settings.public_url == url
    try:
        # Actors gone for good while the app still runs: the KAS answers "unavailable", fast, no key...
        kill_actors(["FRA"])
        token = kas.token("FRA", unique("no-hsm"), "SECRET_DEFENSE")
        pol = policy(rel=["FRA"])
        with httpx.Client(timeout=HSM_TIMEOUT + 20) as http:
            outcome = rewrap_fresh(kas, "FRA", token, pol, v1=True, http=http)
            assert not outcome.ok
            check_outage_answer(kas, "FRA", outcome)
            # ...and the replica re-creates the HSM actor by itself: the KAS recovers without a redeploy.
            deadline = time.monotonic() + 30
            while not (outcome := rewrap_fresh(kas, "FRA", token, pol, v1=False, http=http)).ok:
                check_outage_answer(kas, "FRA", outcome)
                assert time.monotonic() < deadline, "FRA did not recover after its HSM actor was killed"
                time.sleep(0.5)
        recovered = ray.get(ray.get_actor(hsm_actor_name("FRA"), namespace=NAMESPACE).pid.remote(), timeout=30)
        assert recovered != old_pid
        # Now the whole nation: Serve app and actors gone, then redeployed on the same state directory.
        serve.delete("fra")
        kill_actors(["FRA"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the name is free once the GCS has marked the actor dead
            try:
                ray.get_actor(hsm_actor_name("FRA"), namespace=NAMESPACE)
            except ValueError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the FRA HSM actor is still registered 30 s after kill_actors")
        assert kas.http.get(url + "/healthz").status_code == 404
    finally:
        deploy([settings], index=False)
        _wait_ready([url])
    assert public_keys() == before
    new_pid = ray.get(ray.get_actor(hsm_actor_name("FRA"), namespace=NAMESPACE).pid.remote(), timeout=30)
    assert new_pid != old_pid  # a new HSM actor read the keys from disk
    sub = unique("redeploy")
    token = kas.token("FRA", sub, "SECRET_DEFENSE")
    for algorithm, tdf in tdfs.items():
        assert first_kao(tdf)[0].kid == before[algorithm]["kid"]
        assert open_tdf(kas, tdf, kas.client("http", token)) == data[algorithm]
        assert open_tdf(kas, tdf, kas.client("handle", token, "rsa")) == data[algorithm]
    assert [e["action"] for e in kas.audit("FRA", subject=sub)] == ["KEY_RELEASED"] * 2 * len(ALGORITHMS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServeProcess:
    """One `kas-ray serve --nation usa` in its own session (process group), logs in files."""

    def __init__(self, kas: Kas, state: Path, port: int, logs: Path) -> None:
        self.state, self.port = state, port
        self.base = f"http://127.0.0.1:{port}/usa"
        self.out, self.err = logs.with_suffix(".out"), logs.with_suffix(".err")
        kas.extra_files += [self.out, self.err]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not ours
        env["PYTHONUNBUFFERED"] = "1"
        command = [str(Path(sys.executable).with_name("kas-ray")), "serve", "--state-dir", str(state),
                   "--port", str(port), "--nation", "usa"]
        self.started = time.monotonic()
        with self.out.open("wb") as stdout, self.err.open("wb") as stderr:
            self.proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, start_new_session=True)

    def logs(self) -> str:
        return f"\n--- stdout\n{self.out.read_text()[-3000:]}\n--- stderr\n{self.err.read_text()[-3000:]}"

    def wait_ready(self, timeout: float = 150.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"kas-ray serve exited with {self.proc.returncode}{self.logs()}"
            # The SIGTERM handler is installed right before this line is printed.
            if "Press Ctrl-C" in self.out.read_text():
                assert httpx.get(self.base + "/readyz", timeout=10).status_code == 200
                self.ready_after = time.monotonic() - self.started
                return
            time.sleep(0.5)
        pytest.fail(f"kas-ray serve not ready in {timeout:.0f} s{self.logs()}")

    def public_keys(self) -> dict[str, dict[str, str]]:
        return {a: httpx.get(self.base + "/kas/v2/kas_public_key", params={"algorithm": a}, timeout=10).json()
                for a in ALGORITHMS}

    def terminate(self, timeout: float = 60.0) -> None:
        self.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        try:
            code = self.proc.wait(timeout)
            self.exit_after = time.monotonic() - sent
        except subprocess.TimeoutExpired:
            pytest.fail(f"kas-ray serve did not exit within {timeout:.0f} s of SIGTERM{self.logs()}")
        assert code == 0, f"exit code {code}{self.logs()}"
        assert "shutting down" in self.out.read_text()

    def ray_logs(self, ray_root: Path) -> list[Path]:
        """Files of the Ray session this process started (Ray names the session dir after the driver pid)."""
        return [p for d in ray_root.glob(f"session_*_{self.proc.pid}") for p in (d / "logs").rglob("*")
                if p.is_file()]

    def kill(self) -> None:
        """Cleanup after a failure: the whole process group this test started."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def test_kas_ray_serve_restart_keeps_keys(kas: Kas, tmp_path: Path) -> None:
    """The real `kas-ray serve` (its own local Ray): SIGTERM exits 0; restarted on the same state dir,
    the kids and public keys are the same and a TDF made before the restart still opens."""
    first = kas.early_serve or ServeProcess(kas, tmp_path / "state", free_port(), tmp_path / "serve-1")
    kas.early_serve = None
    state, port = first.state, first.port
    try:
        first.wait_ready()
        keys = first.public_keys()
        assert keys["rsa:2048"]["kid"].startswith("usa-r2048")
        tdf = io.BytesIO()
        usa = KasKey(url=first.base, public_key_pem=keys["rsa:2048"]["publicKey"], kid=keys["rsa:2048"]["kid"])
        encrypt(io.BytesIO(b"before the restart"), tdf, splits=[[usa]], policy=policy(rel=["USA"]))
        first.terminate()
    finally:
        first.kill()
    with pytest.raises(httpx.HTTPError):
        httpx.get(first.base + "/healthz", timeout=2)

    second = ServeProcess(kas, state, port, first.out.with_name("serve-2"))
    try:
        second.wait_ready()
        assert second.public_keys() == keys
        sub = unique("cli")
        token = DevIdentityProvider(state, "USA").mint(sub, "SECRET")
        kas.secrets.append(token.encode())
        client = KasClient(Recording(HttpTransport(), kas.secrets), token)
        assert open_tdf(kas, tdf.getvalue(), client) == b"before the restart"
        second.terminate()
    finally:
        second.kill()
    print(f"\nkas-ray serve: ready {first.ready_after:.0f}s after start (started with the module), "
          f"exit {first.exit_after:.0f}s after SIGTERM; restart: ready {second.ready_after:.0f}s, "
          f"exit {second.exit_after:.0f}s")
    import ray

    ray_root = Path(ray._private.worker._global_node.get_session_dir_path()).parent  # noqa: SLF001
    for process in (first, second):
        logs = process.ray_logs(ray_root)
        assert logs, f"no Ray session of pid {process.proc.pid} under {ray_root}"
        kas.extra_files += logs
    audit = state / "audit" / "usa.jsonl"
    kas.extra_files.append(audit)
    assert [json.loads(line)["action"] for line in audit.read_text().splitlines()
            if json.loads(line)["subject"] == sub] == ["KEY_RELEASED"]


# === last: nothing secret in any log =====================================================================
_B64_RUNS = re.compile(rb"[A-Za-z0-9+/]{16,}")
_URLSAFE = bytes.maketrans(b"-_", b"+/")


def _forms(secret: bytes) -> set[bytes]:
    """Searchable forms of a secret in the normalised haystack (base64 without padding, hex)."""
    if secret.count(b".") == 2 and secret.startswith(b"eyJ"):  # a JWT: its signature is unique to it
        return {secret.rsplit(b".", 1)[1].translate(_URLSAFE)}
    out = {base64.b64encode(secret).rstrip(b"=")}
    out |= {secret.hex().encode()} if len(secret) >= 8 else set()
    if secret.isascii() and len(secret) >= 16:
        out.add(secret.translate(_URLSAFE))
    return {f for f in out if len(f) >= 16}


def _private_key_needles(kas: Kas) -> set[bytes]:
    """Base64 lines and private scalars of every KAS key and dev IdP key, and the keystore passphrase."""
    needles: set[bytes] = set()
    passphrase_file = kas.state / "secrets" / "keystore.passphrase"
    passphrase = (passphrase_file.read_bytes().strip() if passphrase_file.exists()
                  else os.environ["KAS_RAY_KEY_PASSPHRASE"].encode())
    needles.add(passphrase.translate(_URLSAFE))
    keys = [serialization.load_pem_private_key(p.read_bytes(), password=passphrase)
            for p in (kas.state / "keys").rglob("*.key.pem")]
    keys += [serialization.load_pem_private_key(p.read_bytes(), password=None)
             for p in (kas.state / "idp").glob("*.key.pem")]
    assert len(keys) >= 3 * len(NATIONS) + len(NATIONS)
    for private in keys:
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        # Without padding: the scanner searches runs of the base64 alphabet, which stop at "=".
        needles |= {line.rstrip(b"=") for line in pem.splitlines()[1:-1] if len(line.rstrip(b"=")) >= 16}
        numbers = private.private_numbers()  # type: ignore[union-attr]
        secret = numbers.d if isinstance(private, rsa.RSAPrivateKey) else numbers.private_value
        needles.add(format(secret, "x").encode())
    return needles


def find_leaks(files: list[Path], needles: set[bytes]) -> list[str]:
    leaks: list[str] = []
    for path in files:
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # a rotated log
            continue
        for marker in (b"PRIVATE KEY-----", b"Bearer ey", b"DPoP: ey"):
            if marker in data:
                leaks.append(f"{path}: {marker.decode()!r}")
        # Only runs of base64/hex characters can hold a secret: search those, URL-safe alphabet folded.
        runs = b"\n".join(_B64_RUNS.findall(data.translate(_URLSAFE)))
        lowered = runs.lower()
        for needle in needles:
            if needle in runs or needle.lower() in lowered:
                leaks.append(f"{path}: a secret ({len(needle)} chars) starting {needle[:6]!r}")
        if path.suffix == ".jsonl" and b"eyJ" in data:
            leaks.append(f"{path}: a JWT-like string in an audit file")
    return leaks


def test_no_secret_in_any_log(kas: Kas, tmp_path: Path) -> None:
    """Every Ray log of this session, the audit files and the `kas-ray serve` logs: no token, proof,
    share, DEK, passphrase or private key (runs last in the module, after every other test's traffic)."""
    import ray

    # A small workload of its own, so the scan means something even when this test runs alone.
    sub = unique("leak")
    token = kas.token("USA", sub, "SECRET")
    tdf = seal(kas, policy(rel=["USA"]), [[("USA", "ec:secp256r1")], [("GBR", "rsa:2048")]], b"leak check")
    for transport in ("http", "handle"):
        assert open_tdf(kas, tdf, kas.client(transport, token)) == b"leak check"
    Requester(kas).http("USA", token + "x", {"clientPublicKey": "x"})

    session = Path(ray._private.worker._global_node.get_session_dir_path())  # noqa: SLF001
    files = [p for p in (session / "logs").rglob("*") if p.is_file()]
    files += list((kas.state / "audit").glob("*.jsonl")) + [p for p in kas.extra_files if p.exists()]
    assert any(p.name.endswith(".jsonl") for p in files) and len(files) > 10

    needles: set[bytes] = set()
    for secret in kas.secrets:
        needles |= _forms(secret)
    needles |= _private_key_needles(kas)
    assert len(needles) > 100
    # The scanner finds what it looks for: a token, a share in hex and in URL-safe base64, a key line.
    share = next(s for s in reversed(kas.secrets) if len(s) == 32)
    canary = tmp_path / "canary.log"
    for planted in (token.encode(), share.hex().upper().encode(), base64.urlsafe_b64encode(share),
                    sorted(_private_key_needles(kas))[0]):
        canary.write_bytes(b"2026-01-01 INFO something [" + planted + b"] more\n")
        assert find_leaks([canary], needles), planted
    leaks = find_leaks(files, needles)
    assert not leaks, f"{len(leaks)} leaks in {len(files)} files: {leaks[:10]}"


def test_a_key_backend_failure_tells_the_client_to_retry_and_the_log_the_detail(caplog: pytest.LogCaptureFixture
                                                                                ) -> None:
    """A backend's message names KMS resources, credential and PIN file paths: operators read it in the log,
    a client only learns that the backend is unavailable."""
    from kas_ray.errors import KeyBackendUnavailable
    from kas_ray.serve.http import error_response

    detail = ("Cloud KMS refused decrypt of projects/p-usa/locations/europe-west1/keyRings/kas/cryptoKeys/k "
              "(403); credentials /etc/kas-ray/usa/sa.json")
    with caplog.at_level("WARNING", logger="kas_ray.http"):
        response = error_response(KeyBackendUnavailable(detail))
    body = json.loads(response.body)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert body == {"code": "unavailable", "message": "the key backend is unavailable; retry later",
                    "error": "key_backend_unavailable"}
    assert detail in caplog.text

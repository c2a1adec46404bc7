"""Fuzzing the running nation KAS over HTTP (USA of the session's ``kas_cluster``).

1. **schemathesis** over the OpenAPI the KAS serves (``/usa/openapi.json``: every route, its real bodies,
   headers, credentials and answers, from ``kas_ray/serve/openapi.py``), positive and negative data, JSON
   and Connect proto bodies. Checks: schemathesis's own (no 5xx, status / content type / schema of every
   answer as documented, invalid data refused, credentials enforced, undeclared methods 405), and ours:
   every 4xx is the JSON error ``{code, message, error}``; every answer comes within ``DEADLINE`` (no
   hang); no key is ever released (fuzzed credentials are never valid: a rewrap answered 200, or any
   answer holding an ``entityWrappedKey``/``kasWrappedKey``, fails).
2. **hypothesis with valid credentials**: a DPoP-bound token, a fresh proof and a signed request per call,
   over mutated rewrap bodies (``fuzz_rewrap.rewrap_bodies``) on every rewrap route and encoding: never a
   5xx, every refusal a JSON 4xx, and every released key legitimate (``fuzz_rewrap.check_release``: a
   genuine key access object and binding, wrapped to the client key the request names).
3. **Regressions** the fuzzers found: each answered 503 "internal error" (and left no audit record)
   before its fix; now 400 and audited.

``KAS_RAY_FUZZ_EXAMPLES`` replaces the CI bounds (``make fuzz``). ``KAS_RAY_FUZZ_URL`` (with
``KAS_RAY_STATE_DIR``) points the tests at an already running ``kas-ray serve`` instead of ``kas_cluster``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from cryptography.hazmat.primitives.asymmetric import ec
from fuzz_rewrap import (
    SCALE,
    UNKNOWN_ALGORITHM_PEM,
    RewrapMaterial,
    check_release,
    fuzz_settings,
    jws,
    odd_pems,
    rewrap_bodies,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve_kas import KEY_FIELDS, json_error

from kas_ray.client import HttpTransport, KasClient
from kas_ray.kas import proto
from kas_ray.serve.openapi import ErrorBody
from kas_ray.trust import DevIdentityProvider, make_dpop_proof, sign_request
from kas_ray.trust.dpop import jwk_thumbprint
from kas_ray.trust.jwks import public_jwk

#: No answer may take longer (the HSM timeout is 5 s; an honest refusal takes milliseconds).
DEADLINE = 10.0
REWRAP_PATHS = ("/kas.AccessService/Rewrap", "/kas/v2/rewrap", "/rewrap")
NATION = "USA"


@dataclass(frozen=True)
class Target:
    url: str  # the nation's KAS URL, http://HOST:PORT/usa
    state_dir: Path  # its dev identity providers and audit

    def audit(self, request_id: str) -> list[dict[str, Any]]:
        path = self.state_dir / "audit" / f"{NATION.lower()}.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [line for line in lines if line.get("request_id") == request_id]


@pytest.fixture(scope="module")
def target(request: pytest.FixtureRequest) -> Target:
    url = os.environ.get("KAS_RAY_FUZZ_URL")
    if url:
        return Target(url.rstrip("/"), Path(os.environ.get("KAS_RAY_STATE_DIR", ".kas-ray")))
    cluster = request.getfixturevalue("kas_cluster")
    return Target(cluster.url(NATION), cluster.state_dir)


# === 1. schemathesis ========================================================================================
def test_openapi_describes_every_route_body_and_refusal() -> None:
    """The description schemathesis fuzzes is complete: bodies, credentials, JSON errors (no Ray needed)."""
    document = _described()
    assert set(document["components"]["securitySchemes"]) == {"bearer", "dpop", "dpopProof"}
    operations = [(path, method, op) for path, item in document["paths"].items() for method, op in item.items()]
    assert len(operations) == 11
    for path, method, op in operations:
        if method == "post":
            assert op["requestBody"]["content"]["application/json"]["schema"], path
        if path in REWRAP_PATHS:
            assert op["security"] and {"200", "400", "401", "403", "413"} <= set(op["responses"]), path
        for status, answer in op["responses"].items():
            if status.startswith(("4", "5")) and path != "/readyz":  # readyz answers 503 with its checks
                assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}


@schemathesis.serializer("application/proto")
def _connect_proto(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    """A generated Connect message as binary proto; a field proto cannot carry as a string goes as a varint,
    which the KAS must refuse (wrong wire type) like JSON of the wrong type."""
    fields = {"PublicKey": ("algorithm", "fmt", "v"), "LegacyPublicKey": ("algorithm",),
              "Rewrap": ("signedRequestToken",)}[ctx.case.operation.path.rsplit("/", 1)[1]]
    if isinstance(value, bytes):
        return value
    if not isinstance(value, dict) or any(not isinstance(value.get(f), str | None) for f in fields):
        return b"\x08\x01"  # field 1 as a varint
    strings = {f: value.get(f) or "" for f in fields}
    if "signedRequestToken" in strings:
        return proto.encode_rewrap_request(strings["signedRequestToken"])
    if len(fields) == 1:
        return proto.encode_legacy_public_key_request(strings["algorithm"])
    return proto.encode_public_key_request(**strings)


def json_errors(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Every 4xx is ``{"code", "message", "error"}`` JSON (Connect style plus the kas-ray code)."""
    if 400 <= response.status_code < 500:
        assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.headers
        body = ErrorBody.model_validate(json.loads(response.content))
        assert body.code and body.message and body.error


def no_key_release(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Fuzzed credentials are never valid: no rewrap succeeds and no answer carries a wrapped key."""
    assert not (case.path in REWRAP_PATHS and response.status_code < 300), f"rewrap answered {response.status_code}"
    text = response.content.decode("utf-8", "replace")
    assert not any(name in text for name in KEY_FIELDS), text[:300]


def _schemathesis_config() -> schemathesis.Config:
    return schemathesis.Config.from_dict({
        "generation": {"mode": "all", "max-examples": SCALE or 25},
        "checks": {
            "max_response_time": DEADLINE,
            # a schema-valid request may still name a key this nation does not hold, or lack credentials
            "positive_data_acceptance": {"expected-statuses": ["2xx", "401", "404"]},
        },
    })


def _described() -> dict[str, Any]:
    from kas_ray.serve.deployment import app

    return app.openapi()


def test_the_kas_serves_the_description_fuzzed_here(target: Target) -> None:
    """schemathesis reads the description at collection (its lazy loader does not run on pytest 9.2); the
    running KAS must serve exactly that document (plus its route prefix as the server)."""
    served = httpx.get(f"{target.url}/openapi.json", timeout=DEADLINE).json()
    assert served.pop("servers") == [{"url": "/" + NATION.lower()}]
    assert served == json.loads(json.dumps(_described()))


schema = schemathesis.openapi.from_dict(_described(), config=_schemathesis_config())


@schema.parametrize()
@settings(max_examples=SCALE or 25, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_operations(case: schemathesis.Case, target: Target) -> None:
    response = case.call(base_url=target.url, timeout=DEADLINE)
    case.validate_response(response, additional_checks=[json_errors, no_key_release])


# === 2. valid credentials, mutated bodies =====================================================================
ROUTES = {  # name -> (path, how the body travels)
    "connect-json": ("/kas.AccessService/Rewrap", "srt"),
    "connect-proto": ("/kas.AccessService/Rewrap", "proto"),
    "rest": ("/kas/v2/rewrap", "srt"),
    "acp-srt": ("/rewrap", "srt"),
    "acp-plain": ("/rewrap", "plain"),
}


@dataclass
class Client:
    """A client holding a DPoP key and the nation's dev IdP: every call gets a fresh token and proof."""

    target: Target
    material: RewrapMaterial
    http: httpx.Client
    dpop_key: ec.EllipticCurvePrivateKey

    def headers(self, url: str, request_id: str, *, dpop: bool = True) -> dict[str, str]:
        """A fresh token bound to the DPoP key and its proof; ``dpop`` false: an unbound bearer token."""
        idp = DevIdentityProvider(self.target.state_dir, NATION)
        sub = f"fuzz-{uuid.uuid4().hex[:8]}"
        if not dpop:
            return {"Authorization": f"Bearer {idp.mint(sub, 'SECRET')}", "X-Request-ID": request_id}
        token = idp.mint(sub, "SECRET", cnf_jkt=jwk_thumbprint(public_jwk(self.dpop_key)))
        return {"Authorization": f"DPoP {token}", "X-Request-ID": request_id,
                "DPoP": make_dpop_proof(self.dpop_key, "POST", url, access_token=token)}

    def send(self, route: str, body: Any, srt: str | None = None) -> Sent:
        """POST ``body`` on ``route``: signed with the DPoP key (or as ``srt``) unless the route takes it plain.

        A plain body carries a bearer token: with a DPoP proof the KAS requires the body signed by its key.
        """
        path, how = ROUTES[route]
        url = self.target.url + path
        srt = srt or sign_request(body, self.dpop_key)
        content = (proto.encode_rewrap_request(srt) if how == "proto" else
                   json.dumps(body if how == "plain" else {"signedRequestToken": srt}).encode())
        request_id = uuid.uuid4().hex
        headers = {**self.headers(url, request_id, dpop=how != "plain"),
                   "Content-Type": "application/proto" if how == "proto" else "application/json"}
        response = self.http.post(url, content=content, headers=headers, timeout=DEADLINE)
        wire = None
        if response.status_code == 200:
            wire = proto.decode_rewrap_response(response.content).to_wire() if how == "proto" else response.json()
        return Sent(response, wire, request_id)


@dataclass(frozen=True)
class Sent:
    response: httpx.Response
    #: The rewrap response (decoded from proto where it was proto) of a 200, else None.
    wire: dict[str, Any] | None
    request_id: str


@pytest.fixture(scope="module")
def client(target: Target) -> Client:
    keys = [KasClient(HttpTransport()).public_key(target.url, alg) for alg in ("rsa:2048", "ec:secp256r1")]
    with httpx.Client() as http:
        yield Client(target, RewrapMaterial.create(target.url, keys, NATION), http,
                     ec.generate_private_key(ec.SECP256R1()))


@pytest.mark.parametrize("route", ROUTES)
def test_genuine_requests_are_released_on_every_route(client: Client, route: str) -> None:
    """Control for the fuzz below: the unmutated v2 body is released, and passes the oracle."""
    sent = client.send(route, client.material.v2())
    assert sent.wire is not None, sent.response.text
    assert check_release(client.material, client.material.v2(), sent.wire) == len(client.material.kaos)


@fuzz_settings(100)
@given(data=st.data(), route=st.sampled_from(list(ROUTES)))
def test_valid_credentials_mutated_bodies(client: Client, data: st.DataObject, route: str) -> None:
    body = data.draw(rewrap_bodies(client.material))
    sent = client.send(route, body)
    assert sent.response.status_code < 500, sent.response.text[:300]
    assert sent.response.elapsed.total_seconds() < DEADLINE
    if sent.wire is None:
        json_error(sent.response, tuple(range(400, 500)))
    else:
        check_release(client.material, body, sent.wire)


# === 3. regressions ===========================================================================================
def _srt(client: Client, header: dict[str, Any]) -> str:
    """A signed request token of the genuine body under this JOSE header (signed by the DPoP key)."""
    return jws(client.dpop_key, "ES256", header, {"requestBody": json.dumps(client.material.v2()), "iat": time.time()})


def _with_kao(client: Client, **fields: Any) -> dict[str, Any]:
    """The genuine v1 body whose (ec-wrapped) key access object has ``fields`` replaced."""
    kao = next(k for k in client.material.kaos if k.type == "ec-wrapped")
    return {**client.material.v1(kao), "keyAccess": {**kao.to_wire(), **fields}}


REGRESSIONS = {
    # verify_signed_request: `alg not in frozenset(...)` raised TypeError for a JSON object or list
    "srt-alg-is-an-object": lambda c: ("connect-json", c.material.v2(), _srt(c, {"alg": {"x": 1}, "typ": "JWT"})),
    "srt-alg-is-a-list": lambda c: ("rest", c.material.v2(), _srt(c, {"alg": ["ES256"], "typ": "JWT"})),
    # RewrapRequestBody: a v1 policy with a lone surrogate passed, then building its v2 form raised
    "v1-policy-lone-surrogate": lambda c: ("acp-plain", {**c.material.v1(c.material.kaos[0]), "policy": "\ud800"},
                                           None),
    # load_public_key_pem: an SPKI of an algorithm cryptography does not know raised UnsupportedAlgorithm
    "client-key-unknown-algorithm": lambda c: ("acp-plain", {**c.material.v2(), "clientPublicKey":
                                                             UNKNOWN_ALGORITHM_PEM}, None),
    "ephemeral-key-unknown-algorithm": lambda c: ("acp-plain", _with_kao(c, ephemeralPublicKey=UNKNOWN_ALGORITHM_PEM),
                                                  None),
}


@pytest.mark.parametrize("case", REGRESSIONS)
def test_fuzz_findings_are_refused_with_400_and_audited(client: Client, case: str) -> None:
    route, body, srt = REGRESSIONS[case](client)
    sent = client.send(route, body, srt)
    assert sent.wire is None
    assert json_error(sent.response, 400)["code"] == "invalid_argument"
    (line,) = client.target.audit(sent.request_id)
    assert line["action"] in ("REQUEST_REJECTED", "KEY_ERROR"), line


def test_odd_client_keys_are_refused(client: Client) -> None:
    """Every PEM no key may be released to (weak, foreign curve, Ed25519/X25519/DSA, unknown algorithm,
    broken) as the clientPublicKey of a genuine request: 400, no key."""
    for pem in odd_pems():
        sent = client.send("acp-plain", {**client.material.v2(), "clientPublicKey": pem})
        assert sent.wire is None and json_error(sent.response, 400)["code"] == "invalid_argument", pem

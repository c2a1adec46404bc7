"""Hypothesis against every parser a hostile client reaches, in process (no Ray, seconds).

Random and mutated input gives a result or one of the parser's own narrow kas-ray errors, never any
other exception, each call within a time bound; where a parser hands out something (a key, a verified
token), it is exactly what the genuine input holds. Mutations edit any node of a genuine document
(``fuzz_rewrap.mutated``: delete, retype, swap in a value of the request or an odd PEM, cut/flip/grow a
string, repeat a list item past the limits), so they reach the checks behind the first type check.

* the manifest parser, and the key a mutated manifest yields: the genuine payload key or a kas-ray error;
* the policy parser (and ABAC over whatever it parses) and the policy binding check;
* rewrap bodies and their key access objects (wrapped and ec-wrapped) through ``RewrapService.rewrap``
  with a valid DPoP-bound token: only 4xx kas-ray errors, and every released key legitimate;
* access tokens, DPoP proofs and signed request tokens validly signed over fuzzed headers and claims, and
  mutated genuine tokens; the Authorization header;
* JWKS documents and JWKs: ``parse_jwks``, ``public_key_from_jwk``, ``jwk_thumbprint``, and a verifier
  whose pinned JWKS file holds the fuzzed document.

Already fuzzed elsewhere: the Connect proto/JSON codec (test_proto.py), whole-TDF corruption
(test_ztdf_tamper.py), ABAC labels (test_abac.py), garbage JWT strings (test_trust_*.py).
``KAS_RAY_FUZZ_EXAMPLES`` replaces every bound below (``make fuzz``).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fuzz_rewrap import (
    RewrapMaterial,
    check_release,
    fuzz_settings,
    json_values,
    jws,
    mutated,
    odd_pems,
    pem,
    rewrap_bodies,
    string_edit,
    timed,
)
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from test_trust_tokens import AUD, ISS, NOW, Clock, claims, jwk_entry, make_registry

from kas_ray.audit import MemoryAuditSink
from kas_ray.client import REWRAP_PATH, KasClient, LocalTransport
from kas_ray.config import AbacConfig, DPoPConfig, JwksSource
from kas_ray.errors import (
    AccessDenied,
    DPoPError,
    FormatError,
    KeyNotFoundError,
    ManifestError,
    PolicyBindingError,
    PolicyFormatError,
    RewrapError,
    SignedRequestError,
    TamperError,
    TokenError,
)
from kas_ray.hazmat import primitives as P
from kas_ray.kas.local import build_local_services
from kas_ray.kas.service import RewrapCall, RewrapService
from kas_ray.keys.software import PASSPHRASE_ENV, PASSPHRASE_FILE_ENV
from kas_ray.policy import PolicyEngine, Subject, attribute_fqn
from kas_ray.trust import DevIdentityProvider, MemoryReplayStore, TokenVerifier, make_dpop_proof, sign_request
from kas_ray.trust.dpop import access_token_hash, jwk_thumbprint, verify_dpop
from kas_ray.trust.jwks import _JwksLoadError, parse_jwks, public_jwk, public_key_from_jwk
from kas_ray.trust.request_token import verify_signed_request
from kas_ray.trust.tokens import parse_authorization
from kas_ray.ztdf import KasKey, KeyAccessObject, Manifest, Policy, PrivateKeyUnwrapper, compute_binding, encrypt
from kas_ray.ztdf.policy import decode_mac, verify_binding
from kas_ray.ztdf.tdf import unwrap_payload_key

#: No parser may take this long on any input (they take microseconds to milliseconds).
BUDGET = 2.0
CONFIG = AbacConfig()
ATTRS = [attribute_fqn(CONFIG, "classification", "SECRET"), attribute_fqn(CONFIG, "releasable-to", "USA"),
         attribute_fqn(CONFIG, "coi", "NATO")]


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def refused(call: Any, *errors: type[Exception]) -> Any:
    """``call()`` within the budget: its result, or None when it raised one of ``errors`` (anything else fails)."""
    try:
        return timed(call, BUDGET)
    except errors:
        return None


# === manifest ===============================================================================================
@dataclass(frozen=True)
class Sealed:
    """A manifest (as JSON) whose one split has an RSA and an EC alternative, and the payload key."""

    manifest: dict[str, Any]
    key: bytes
    unwrapper: PrivateKeyUnwrapper


@cache
def sealed() -> Sealed:
    private = {"r1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
               "e1": ec.generate_private_key(ec.SECP256R1())}
    kas = [KasKey(url="https://usa.kas.example/kas", public_key_pem=pem(k.public_key()), kid=kid)
           for kid, k in private.items()]
    manifest = encrypt(io.BytesIO(b"fuzz"), io.BytesIO(), splits=[kas], policy=Policy.create(ATTRS))
    unwrapper = PrivateKeyUnwrapper(private)
    return Sealed(json.loads(manifest.to_json()), unwrap_payload_key(manifest, unwrapper), unwrapper)


def manifest_dictionary() -> list[Any]:
    kaos = sealed().manifest["encryptionInformation"]["keyAccess"]
    return [*kaos, *(k["wrappedKey"] for k in kaos), *(k["policyBinding"] for k in kaos), "r1", "e1", "wrapped",
            "ec-wrapped", *odd_pems(), Policy.create([]).to_base64(), "4.3.0", "", 0, -1, 2**70, None, [], {}]


@fuzz_settings(60)
@given(raw=st.binary(max_size=300) | json_values.map(json.dumps) | st.text(max_size=300))
def test_manifest_parser_on_random_input(raw: Any) -> None:
    manifest = refused(lambda: Manifest.parse(raw), ManifestError)
    assert manifest is None or isinstance(manifest, Manifest)


@fuzz_settings(250)
@given(data=st.data())
def test_mutated_manifest_yields_the_genuine_key_or_a_kas_ray_error(data: st.DataObject) -> None:
    """Parse a mutated manifest, then unwrap its KAOs with the real private keys and check the bindings."""
    doc = data.draw(mutated(sealed().manifest, manifest_dictionary()))
    manifest = refused(lambda: Manifest.parse(json.dumps(doc)), ManifestError)
    if manifest is None:
        return
    key = refused(lambda: unwrap_payload_key(manifest, sealed().unwrapper),
                  FormatError, TamperError, KeyNotFoundError, RewrapError)
    assert key is None or key == sealed().key


# === policy and binding ======================================================================================
POLICY = Policy.create(ATTRS, dissem=["alice@usa.example"])
SHARE = bytes(range(32))
BINDING = compute_binding(SHARE, POLICY.to_base64())
ENGINE = PolicyEngine(CONFIG)
SUBJECT = Subject(subject="alice", issuer=ISS, clearance="SECRET", clearance_system="USA", nationality="USA",
                  coi=["NATO"], issuer_nations=["USA"])
_policy_inputs = st.one_of(
    st.text(max_size=200), st.binary(max_size=300).map(b64), json_values.map(lambda v: b64(json.dumps(v))),
    mutated(json.loads(POLICY.to_json()), ATTRS + ["", None, 5, [], {}]).map(lambda d: b64(json.dumps(d))),
    string_edit(POLICY.to_base64()),
)


@fuzz_settings(200)
@given(encoded=_policy_inputs)
def test_policy_parser_and_abac_over_what_it_parses(encoded: str) -> None:
    policy = refused(lambda: Policy.from_base64(encoded), PolicyFormatError)
    if policy is None:
        return
    assert all(isinstance(a, str) for a in policy.attributes)
    decision = timed(lambda: ENGINE.decide(SUBJECT, policy.attributes, policy.body.dissem), BUDGET)
    assert decision.allowed == all(check.passed for check in decision.checks)


@fuzz_settings(200)
@given(binding=mutated(BINDING.to_wire(), [BINDING.hash, "HS256", "hs256", "none", b64(SHARE), ""])
       | string_edit(BINDING.hash) | st.text(max_size=100),
       policy_b64=st.just(POLICY.to_base64()) | string_edit(POLICY.to_base64()))
def test_binding_check_passes_only_for_the_genuine_mac(binding: Any, policy_b64: str) -> None:
    """A fuzzed binding (KAO field: object or legacy string) against the genuine or an edited policy."""
    try:
        parsed = KeyAccessObject.model_validate({"url": "u", "wrappedKey": "AA==", "policyBinding": binding})
    except ValidationError:
        return  # refused as a malformed key access object (FormatError at the rewrap boundary)
    try:
        timed(lambda: verify_binding(SHARE, policy_b64, parsed.policy_binding), BUDGET)
    except PolicyBindingError:
        return
    assert parsed.policy_binding.alg.upper() == "HS256" and policy_b64 == POLICY.to_base64()
    assert decode_mac(parsed.policy_binding.hash) == P.hmac_sha256(SHARE, policy_b64.encode())


# === rewrap bodies and KAOs, in process ======================================================================
@dataclass
class LocalKas:
    service: RewrapService
    url: str
    material: RewrapMaterial
    token: str
    dpop_key: ec.EllipticCurvePrivateKey
    loop: asyncio.AbstractEventLoop
    #: An unbound token of the same user, for plain bodies (with a DPoP proof the KAS wants the body signed).
    bearer: str

    def rewrap(self, body: Any, signed: bool) -> dict[str, Any]:
        """One rewrap: in an SRT with the DPoP-bound token and a fresh proof, or (only objects) plain with the
        bearer token."""
        url = self.url + REWRAP_PATH
        if signed or not isinstance(body, dict):
            call = RewrapCall(authorization=f"DPoP {self.token}", url=url,
                              body={"signedRequestToken": sign_request(body, self.dpop_key)},
                              dpop=make_dpop_proof(self.dpop_key, "POST", url, access_token=self.token))
        else:
            call = RewrapCall(authorization=f"Bearer {self.bearer}", url=url, body=body)
        return self.loop.run_until_complete(self.service.rewrap(call)).to_wire()


@pytest.fixture(scope="module")
def local_kas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKas]:
    """USA's KAS in process (software keystore, dev IdP), a genuine request for it and a DPoP-bound token."""
    state = tmp_path_factory.mktemp("fuzz-kas")
    with pytest.MonkeyPatch.context() as mp:  # dev profile: the keystore passphrase is generated
        mp.delenv(PASSPHRASE_ENV, raising=False)
        mp.delenv(PASSPHRASE_FILE_ENV, raising=False)
        services = build_local_services(state, ["USA"], audit=MemoryAuditSink())
    (url, service), = services.items()
    transport = LocalTransport(services)
    keys = [KasClient(transport, use_dpop=False).public_key(url, alg) for alg in ("rsa:2048", "ec:secp256r1",
                                                                                   "rsa:4096")]
    transport.close()
    dpop_key = ec.generate_private_key(ec.SECP256R1())
    idp = DevIdentityProvider(state, "USA")
    token = idp.mint("fuzzer", "SECRET", cnf_jkt=jwk_thumbprint(public_jwk(dpop_key)))
    loop = asyncio.new_event_loop()
    try:
        yield LocalKas(service, url, RewrapMaterial.create(url, keys, "USA"), token, dpop_key, loop,
                       bearer=idp.mint("fuzzer", "SECRET"))
    finally:
        loop.close()


@pytest.mark.parametrize("signed", [True, False])
def test_genuine_requests_release_every_share(local_kas: LocalKas, signed: bool) -> None:
    """Control for the fuzz below: the unmutated v2 and v1 bodies are answered and pass the oracle."""
    material = local_kas.material
    assert check_release(material, material.v2(), local_kas.rewrap(material.v2(), signed)) == len(material.kaos)
    for kao in material.kaos:  # v1: entityWrappedKey and its result
        assert check_release(material, material.v1(kao), local_kas.rewrap(material.v1(kao), signed)) == 2


@fuzz_settings(200)
@given(data=st.data(), signed=st.booleans())
def test_mutated_rewrap_bodies_only_refuse_or_release_legitimately(local_kas: LocalKas, data: st.DataObject,
                                                                   signed: bool) -> None:
    body = data.draw(rewrap_bodies(local_kas.material))
    try:
        wire = timed(lambda: local_kas.rewrap(body, signed), 10 * BUDGET)
    except (FormatError, SignedRequestError, AccessDenied) as exc:
        assert exc.http_status < 500, exc
        return
    check_release(local_kas.material, body, wire)


# === access tokens, DPoP proofs, signed request tokens ==========================================================
@dataclass(frozen=True)
class Signers:
    ec: ec.EllipticCurvePrivateKey
    rsa: rsa.RSAPrivateKey
    jwks: Path

    def verifier(self, path: Path | None = None) -> TokenVerifier:
        return TokenVerifier(make_registry(JwksSource(file=path or self.jwks)), clock=Clock())


@pytest.fixture(scope="module")
def signers(tmp_path_factory: pytest.TempPathFactory) -> Signers:
    path = tmp_path_factory.mktemp("jwks") / "usa.jwks.json"
    keys = Signers(ec.generate_private_key(ec.SECP256R1()),
                   rsa.generate_private_key(public_exponent=65537, key_size=2048), path)
    path.write_text(json.dumps({"keys": [jwk_entry(keys.rsa, "rsa1"), jwk_entry(keys.ec, "ec1")]}))
    return keys


HEADER = {"alg": "ES256", "typ": "JWT", "kid": "ec1"}
CLAIMS = claims(nationality="USA", clearance="SECRET", acpCOI=["NATO"])
JOSE_VALUES = [ISS, AUD, "alice", "ES256", "RS256", "none", "HS256", "ec1", "rsa1", "dpop+jwt", NOW, NOW + 1e9,
               NOW - 1e9, -1, 2**64, float("inf"), "NaN", {"jkt": "x"}, ["a", "b"], "http://attacker.example/jwks",
               {"kty": "EC"}, [], {}, None, True, ""]


@fuzz_settings(250)
@given(header=mutated(HEADER, JOSE_VALUES), payload=mutated(CLAIMS, JOSE_VALUES))
def test_access_tokens_signed_over_fuzzed_headers_and_claims(signers: Signers, header: Any, payload: Any) -> None:
    verified = refused(lambda: signers.verifier().verify(jws(signers.ec, "ES256", header, payload)), TokenError)
    if verified is None:
        return  # accepted: it says what a genuine token of the trusted issuer says
    assert header["alg"] == "ES256" and header.get("kid") in ("ec1", None)
    assert verified.issuer == payload["iss"] == ISS and verified.subject == payload["sub"] and verified.subject.strip()
    assert verified.audience == AUD and payload["exp"] > NOW - 30


@fuzz_settings(200)
@given(data=st.data(), with_rsa=st.booleans())
def test_mutated_genuine_tokens(signers: Signers, data: st.DataObject, with_rsa: bool) -> None:
    key, alg, kid = (signers.rsa, "RS256", "rsa1") if with_rsa else (signers.ec, "ES256", "ec1")
    token = jws(key, alg, {**HEADER, "alg": alg, "kid": kid}, CLAIMS)
    edited = data.draw(string_edit(token))
    verified = refused(lambda: signers.verifier().verify(edited), TokenError)
    assert verified is None or verified.claims == CLAIMS


@fuzz_settings(200)
@given(value=st.none() | st.text(max_size=80) | st.sampled_from(["Bearer", "DPoP", "bearer x", "DPoP a.b.c"]).flatmap(
    string_edit))
def test_authorization_header(value: str | None) -> None:
    parsed = refused(lambda: parse_authorization(value), TokenError)
    assert parsed is None or (parsed[0] in ("Bearer", "DPoP") and parsed[1] and " " not in parsed[1])


DPOP_URL = "https://kas.example/usa/kas.AccessService/Rewrap"
TOKEN = "header.payload.signature"


@fuzz_settings(250)
@given(data=st.data(), bound=st.booleans())
def test_dpop_proofs_signed_over_fuzzed_headers_and_claims(signers: Signers, data: st.DataObject,
                                                           bound: bool) -> None:
    jwk = public_jwk(signers.ec)
    values = [*JOSE_VALUES, jwk, public_jwk(signers.rsa), {**jwk, "d": "AA"}, DPOP_URL, DPOP_URL.upper(), "POST",
              access_token_hash(TOKEN)]
    header = data.draw(mutated({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}, values))
    payload = data.draw(mutated({"jti": "j1", "htm": "POST", "htu": DPOP_URL, "iat": NOW,
                                 "ath": access_token_hash(TOKEN)}, values))
    proof = refused(lambda: verify_dpop(
        jws(signers.ec, "ES256", header, payload), method="POST", url=DPOP_URL, access_token=TOKEN,
        config=DPoPConfig(), replay=MemoryReplayStore(), clock=Clock(),
        expected_jkt=jwk_thumbprint(jwk) if bound else None), DPoPError)
    if proof is not None:  # the signing key (PyJWT also reads non-canonical base64url members: another jkt)
        assert public_key_from_jwk(proof.jwk).public_numbers() == signers.ec.public_key().public_numbers()
        assert not bound or proof.jkt == jwk_thumbprint(jwk)
        assert proof.htm == "POST" and abs(proof.iat - NOW) <= 300


@fuzz_settings(250)
@given(data=st.data(), with_dpop=st.booleans())
def test_signed_request_tokens_over_fuzzed_headers_and_claims(signers: Signers, data: st.DataObject,
                                                              with_dpop: bool) -> None:
    genuine = {"requestBody": json.dumps({"clientPublicKey": "pem", "requests": []}), "iat": NOW, "exp": NOW + 60}
    header = data.draw(mutated({"alg": "ES256", "typ": "JWT"}, JOSE_VALUES))
    payload = data.draw(mutated(genuine, [*JOSE_VALUES, "{}", "[]", "null", '{"a": 1}']))
    body = refused(lambda: verify_signed_request(
        jws(signers.ec, "ES256", header, payload), dpop_jwk=public_jwk(signers.ec) if with_dpop else None,
        max_age_seconds=60, clock=Clock()), SignedRequestError)
    if body is not None:
        assert body == json.loads(payload["requestBody"]) and isinstance(body, dict)


@fuzz_settings(150)
@given(data=st.data())
def test_mutated_genuine_signed_request_tokens(signers: Signers, data: st.DataObject) -> None:
    request = {"clientPublicKey": "pem", "requests": []}
    srt = sign_request(request, signers.ec, now=NOW)
    edited = data.draw(string_edit(srt))
    body = refused(lambda: verify_signed_request(edited, dpop_jwk=public_jwk(signers.ec), max_age_seconds=60,
                                                 clock=Clock()), SignedRequestError)
    assert body is None or body == request


# === JWKS ======================================================================================================
@fuzz_settings(200)
@given(data=st.data())
def test_jwks_documents_and_jwks(signers: Signers, data: st.DataObject) -> None:
    """A fuzzed JWKS: parse_jwks keeps only usable public keys; the JWK helpers raise only ValueError; a
    verifier whose pinned file holds it verifies the genuine token only with the genuine key."""
    genuine = {"keys": [jwk_entry(signers.rsa, "rsa1"), jwk_entry(signers.ec, "ec1")]}
    values = [*JOSE_VALUES, "sig", "enc", "RSA", "EC", "OKP", "oct", "P-256", "P-384", "AQAB", jwk_entry(signers.ec,
              "ec1"), {**jwk_entry(signers.ec, "ec1"), "d": "AA"}, public_jwk(ec.generate_private_key(ec.SECP384R1()))]
    doc = data.draw(mutated(genuine, values) | json_values)
    entries = refused(lambda: parse_jwks(doc), _JwksLoadError)  # type: ignore[arg-type]
    for entry in entries or ():
        assert isinstance(entry.key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        assert entry.kid is None or isinstance(entry.kid, str)
    for jwk in (doc.get("keys") if isinstance(doc, dict) and isinstance(doc.get("keys"), list) else [doc]):
        refused(lambda jwk=jwk: public_key_from_jwk(jwk), ValueError)  # type: ignore[arg-type]
        if isinstance(jwk, dict):
            refused(lambda jwk=jwk: jwk_thumbprint(jwk), ValueError)  # type: ignore[arg-type]
    path = signers.jwks.with_name("fuzzed.jwks.json")
    path.write_text(json.dumps(doc))
    token = jws(signers.ec, "ES256", HEADER, CLAIMS)
    verified = refused(lambda: signers.verifier(path).verify(token), TokenError)
    if verified is not None:
        assert verified.subject == "alice"
        assert any(isinstance(e.key, ec.EllipticCurvePublicKey) and e.key.public_numbers()
                   == signers.ec.public_key().public_numbers() for e in parse_jwks(doc))

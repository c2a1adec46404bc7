"""Access-token verification against the trust registry (real keys, real JWKS files and HTTP)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kas_ray.config import ClaimNames, IssuerConfig, JwksSource, TrustRegistry
from kas_ray.errors import TokenError, UntrustedIssuerError
from kas_ray.trust import TokenVerifier, VerifiedToken, parse_authorization
from kas_ray.trust.jwks import public_jwk

NOW = 1_750_000_000.0
ISS = "https://idp.usa.example.mil"
AUD = "kas-ray"


class Clock:
    """A settable clock; the verifier and the JWKS rate limit both read it."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def b64(data: bytes | dict[str, Any]) -> str:
    raw = json.dumps(data).encode() if isinstance(data, dict) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwk_entry(key: Any, kid: str | None, alg: str | None = None) -> dict[str, Any]:
    entry = {**public_jwk(key), "use": "sig"}
    if kid is not None:
        entry["kid"] = kid
    if alg is not None:
        entry["alg"] = alg
    return entry


def claims(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"iss": ISS, "sub": "alice", "aud": AUD, "iat": int(NOW), "exp": int(NOW) + 300}
    body.update(overrides)
    return {name: value for name, value in body.items() if value is not None}


def sign(key: Any, alg: str, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """Compact JWS built by hand, so tests can sign claims pyjwt.encode would refuse to write."""
    signing_input = f"{b64({'alg': alg, 'typ': 'JWT', **header})}.{b64(payload)}"
    return f"{signing_input}.{b64(jwt.get_algorithm_by_name(alg).sign(signing_input.encode(), key))}"


def mint(key: Any, alg: str = "ES256", kid: str | None = "ec1", headers: dict | None = None, **overrides):
    header = dict(headers or {})
    if kid is not None:
        header["kid"] = kid
    return sign(key, alg, header, claims(**overrides))


# --- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ec_key2() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def jwks_file(tmp_path: Path, rsa_key, ec_key) -> Path:
    path = tmp_path / "usa.jwks.json"
    path.write_text(json.dumps({"keys": [jwk_entry(rsa_key, "rsa1"), jwk_entry(ec_key, "ec1")]}))
    return path


def make_registry(source: JwksSource, **issuer_fields: Any) -> TrustRegistry:
    fields: dict[str, Any] = {"issuer": ISS, "nations": ["usa", "GBR"], "jwks": source}
    fields.update(issuer_fields)
    return TrustRegistry(issuers=[IssuerConfig(**fields)], leeway_seconds=30, jwks_refresh_interval=60)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(jwks_file: Path, clock: Clock) -> TokenVerifier:
    with TokenVerifier(make_registry(JwksSource(file=jwks_file)), clock=clock) as verifier:
        yield verifier


class RecordingServer:
    """A real HTTP server on 127.0.0.1 that records every request and serves ``document``."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.requests: list[str] = []
        self.status = 200
        self.redirect_to: str | None = None
        #: Seconds between the bytes of the answer (a source trickling its document); 0: all at once.
        self.trickle = 0.0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.requests.append(f"{self.command} {self.path}")
                if outer.redirect_to:
                    self.send_response(302)
                    self.send_header("Location", outer.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps(outer.document).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not outer.trickle:
                    self.wfile.write(body)
                    return
                for byte in body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(outer.trickle)

            do_GET = do_POST = do_HEAD = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.url = self.base + "/jwks.json"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def server():
    running = RecordingServer()
    yield running
    running.close()


@pytest.fixture
def attacker():
    running = RecordingServer()
    yield running
    running.close()


# --- accepted tokens -------------------------------------------------------------------------------
@pytest.mark.parametrize(("alg", "kid"), [("RS256", "rsa1"), ("PS256", "rsa1"), ("ES256", "ec1")])
def test_valid_token_accepted(verifier, rsa_key, ec_key, alg, kid):
    key = ec_key if alg.startswith("ES") else rsa_key
    token = mint(key, alg=alg, kid=kid, clearance="SECRET", countryOfAffiliation="usa", acpCOI=["NATO"])
    verified = verifier.verify(token)
    assert isinstance(verified, VerifiedToken)
    assert (verified.issuer, verified.subject, verified.audience) == (ISS, "alice", AUD)
    assert verified.expiry.timestamp() == NOW + 300
    assert verified.issuer_nations == ["USA", "GBR"]
    assert verified.clearance_system == "USA"
    assert (verified.clearance, verified.nationality, verified.coi) == ("SECRET", "USA", ["NATO"])
    assert verified.cnf_jkt is None
    assert verified.claims["sub"] == "alice"
    assert verified.subject_attributes() == {"clearance": "SECRET", "nationality": "USA", "coi": ["NATO"]}


def test_verified_token_is_frozen(verifier, ec_key):
    verified = verifier.verify(mint(ec_key))
    with pytest.raises(ValidationError):
        verified.subject = "mallory"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(["A", "B"], ["A", "B"]), ("NATO", ["NATO"]), ("A, B,,A", ["A", "B"]), (None, []), ([], [])],
)
def test_coi_accepts_list_string_or_comma_separated(verifier, ec_key, value, expected):
    assert verifier.verify(mint(ec_key, acpCOI=value)).coi == expected


def test_single_valued_list_claims_and_absent_attributes(verifier, ec_key):
    verified = verifier.verify(mint(ec_key, clearance=["TOP_SECRET"]))
    assert verified.clearance == "TOP_SECRET"
    assert verified.nationality is None and verified.coi == []


@pytest.mark.parametrize("overrides", [{"clearance": 3}, {"acpCOI": [1, 2]}, {"countryOfAffiliation": ["USA", "GBR"]}])
def test_wrongly_typed_attribute_claims_refused(verifier, ec_key, overrides):
    with pytest.raises(TokenError, match="claim"):
        verifier.verify(mint(ec_key, **overrides))


def test_custom_claim_names(jwks_file, clock, ec_key):
    names = ClaimNames(clearance="sec_level", nationality="nat", coi="https://example.mil/claims/groups")
    registry = make_registry(JwksSource(file=jwks_file), claims=names, clearance_system="nato")
    token = mint(
        ec_key,
        sec_level="COSMIC_TOP_SECRET",
        nat="gbr",
        **{"https://example.mil/claims/groups": "FVEY,NATO"},
        clearance="UNCLASSIFIED",  # default names are ignored for this issuer
        countryOfAffiliation="FRA",
    )
    verified = TokenVerifier(registry, clock=clock).verify(token)
    assert (verified.clearance, verified.nationality) == ("COSMIC_TOP_SECRET", "GBR")
    assert verified.coi == ["FVEY", "NATO"]
    assert verified.clearance_system == "NATO"


def test_cnf_jkt_is_carried(verifier, ec_key):
    assert verifier.verify(mint(ec_key, cnf={"jkt": "abc"})).cnf_jkt == "abc"


@pytest.mark.parametrize("cnf", [{"x5t#S256": "abc"}, {"jkt": ""}, "abc", {"jkt": "a", "jwk": {}}])
def test_unsupported_or_garbled_confirmation_refused(verifier, ec_key, cnf):
    with pytest.raises(TokenError, match="cnf"):
        verifier.verify(mint(ec_key, cnf=cnf))


def test_audience_list_containing_ours_accepted(verifier, ec_key):
    assert verifier.verify(mint(ec_key, aud=["other", AUD])).audience == AUD


def test_token_without_kid_uses_the_only_key(tmp_path, clock, ec_key):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"keys": [jwk_entry(ec_key, None)]}))
    verifier = TokenVerifier(make_registry(JwksSource(file=path)), clock=clock)
    assert verifier.verify(mint(ec_key, kid=None)).subject == "alice"


def test_averify(verifier, ec_key):
    assert asyncio.run(verifier.averify(mint(ec_key))).issuer == ISS


# --- refused tokens --------------------------------------------------------------------------------
def test_wrong_signature(verifier, ec_key2):
    with pytest.raises(TokenError, match="signature does not verify"):
        verifier.verify(mint(ec_key2, kid="ec1"))


def test_tampered_payload(verifier, ec_key):
    header, _payload, signature = mint(ec_key).split(".")
    forged = ".".join([header, b64(claims(sub="admin")), signature])
    with pytest.raises(TokenError, match="signature does not verify"):
        verifier.verify(forged)


def test_alg_none_refused(verifier):
    token = f"{b64({'alg': 'none', 'typ': 'JWT', 'kid': 'ec1'})}.{b64(claims())}."
    with pytest.raises(TokenError, match="alg 'none' is not allowed") as caught:
        verifier.verify(token)
    assert not isinstance(caught.value, UntrustedIssuerError)


def test_hs256_with_public_key_as_secret_refused(verifier, rsa_key):
    secret = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT', 'kid': 'rsa1'})}.{b64(claims())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(TokenError, match="alg 'HS256' is not allowed"):
        verifier.verify(f"{signing_input}.{b64(mac)}")


@pytest.mark.parametrize("algorithms", [["none"], ["HS256"], ["RS256", "HS512"]])
def test_registry_refuses_symmetric_and_none_algorithms(jwks_file, algorithms):
    with pytest.raises(ValidationError, match="not allowed"):
        make_registry(JwksSource(file=jwks_file), algorithms=algorithms)


def test_alg_not_in_issuer_list_refused(jwks_file, clock, rsa_key):
    verifier = TokenVerifier(make_registry(JwksSource(file=jwks_file), algorithms=["ES256"]), clock=clock)
    with pytest.raises(TokenError, match="alg 'RS256' is not allowed"):
        verifier.verify(mint(rsa_key, alg="RS256", kid="rsa1"))


def test_key_type_must_fit_alg(verifier, rsa_key):
    # RS256 signed by an RSA key but naming the EC key's kid: never verify with a mismatched key.
    with pytest.raises(TokenError, match="does not fit"):
        verifier.verify(mint(rsa_key, alg="RS256", kid="ec1"))


def test_jwk_alg_pins_the_algorithm(tmp_path, clock, rsa_key):
    path = tmp_path / "pinned.json"
    path.write_text(json.dumps({"keys": [jwk_entry(rsa_key, "rsa1", alg="RS256")]}))
    verifier = TokenVerifier(make_registry(JwksSource(file=path)), clock=clock)
    assert verifier.verify(mint(rsa_key, alg="RS256", kid="rsa1")).subject == "alice"
    with pytest.raises(TokenError, match="the key is for RS256"):
        verifier.verify(mint(rsa_key, alg="PS256", kid="rsa1"))


@pytest.mark.parametrize("iss", ["https://evil.example", ISS + "/", ISS.upper(), "", None, 42])
def test_untrusted_issuer(verifier, ec_key, iss):
    with pytest.raises(UntrustedIssuerError, match="not in the trust registry"):
        verifier.verify(mint(ec_key, iss=iss))


@pytest.mark.parametrize("aud", ["other", ["a", "b"], None])
def test_wrong_or_missing_audience(verifier, ec_key, aud):
    with pytest.raises(TokenError, match="aud"):
        verifier.verify(mint(ec_key, aud=aud))


def test_expired(verifier, ec_key):
    with pytest.raises(TokenError, match="expired"):
        verifier.verify(mint(ec_key, exp=int(NOW) - 31))


def test_expiry_within_leeway_accepted(verifier, ec_key):
    assert verifier.verify(mint(ec_key, exp=int(NOW) - 29)).subject == "alice"


def test_exp_required(verifier, ec_key):
    with pytest.raises(TokenError, match="'exp'"):
        verifier.verify(mint(ec_key, exp=None))


@pytest.mark.parametrize("exp", ["tomorrow", True, 1e300, -5])
def test_exp_must_be_a_plausible_number(verifier, ec_key, exp):
    with pytest.raises(TokenError, match="exp"):
        verifier.verify(mint(ec_key, exp=exp))


def test_future_nbf(verifier, ec_key):
    with pytest.raises(TokenError, match="nbf"):
        verifier.verify(mint(ec_key, nbf=int(NOW) + 31))


def test_iat_in_future_beyond_leeway(verifier, ec_key):
    with pytest.raises(TokenError, match="iat"):
        verifier.verify(mint(ec_key, iat=int(NOW) + 31))
    assert verifier.verify(mint(ec_key, iat=int(NOW) + 29, nbf=int(NOW) + 29)).subject == "alice"


@pytest.mark.parametrize("sub", [None, "", "   "])
def test_subject_required(verifier, ec_key, sub):
    with pytest.raises(TokenError, match="sub"):
        verifier.verify(mint(ec_key, sub=sub))


def test_unknown_kid(verifier, ec_key):
    with pytest.raises(TokenError, match="unknown kid"):
        verifier.verify(mint(ec_key, kid="nope"))


def test_no_kid_with_several_keys_refused(verifier, ec_key):
    with pytest.raises(TokenError, match="no kid"):
        verifier.verify(mint(ec_key, kid=None))


@pytest.mark.parametrize("header", [{"crit": ["exp"]}, {"b64": False}])
def test_unsupported_header_parameters_refused(verifier, ec_key, header):
    # pyjwt or our own check refuses them: an unknown critical extension must never be ignored.
    with pytest.raises(TokenError, match="unsupported header|not a well-formed JWT"):
        verifier.verify(mint(ec_key, headers=header))


def test_error_messages_never_contain_the_token(verifier, ec_key, ec_key2):
    for token in (mint(ec_key2), mint(ec_key, aud="x"), mint(ec_key, iss="https://x"), mint(ec_key, kid="z")):
        with pytest.raises(TokenError) as caught:
            verifier.verify(token)
        for part in token.split("."):
            assert part not in str(caught.value)


# --- JWKS sources: rotation, rate limit, pinning ---------------------------------------------------
def test_file_jwks_reread_on_unknown_kid_at_bounded_rate(jwks_file, clock, ec_key, ec_key2):
    verifier = TokenVerifier(make_registry(JwksSource(file=jwks_file)), clock=clock)
    assert verifier.verify(mint(ec_key)).subject == "alice"
    jwks_file.write_text(json.dumps({"keys": [jwk_entry(ec_key, "ec1"), jwk_entry(ec_key2, "ec2")]}))
    with pytest.raises(TokenError, match="unknown kid"):  # rotated key not visible before the interval
        verifier.verify(mint(ec_key2, kid="ec2"))
    assert verifier.keys.load_count(ISS) == 1
    clock.now += 60
    assert verifier.verify(mint(ec_key2, kid="ec2", iat=int(clock.now), exp=int(clock.now) + 60))
    assert verifier.keys.load_count(ISS) == 2


def test_url_jwks_refresh_at_most_once_per_interval(server, clock, ec_key, ec_key2):
    server.document = {"keys": [jwk_entry(ec_key, "ec1")]}
    verifier = TokenVerifier(make_registry(JwksSource(url=server.url)), clock=clock)
    assert verifier.verify(mint(ec_key)).subject == "alice"
    assert server.requests == ["GET /jwks.json"]

    server.document = {"keys": [jwk_entry(ec_key, "ec1"), jwk_entry(ec_key2, "ec2")]}  # rotation
    for _ in range(5):
        with pytest.raises(TokenError, match="unknown kid"):
            verifier.verify(mint(ec_key2, kid="ec2"))
    assert len(server.requests) == 1  # an unknown-kid flood cannot hammer the IdP

    clock.now += 61
    fresh = {"iat": int(clock.now), "exp": int(clock.now) + 60}
    assert verifier.verify(mint(ec_key2, kid="ec2", **fresh)).subject == "alice"
    assert len(server.requests) == 2
    for _ in range(3):
        with pytest.raises(TokenError, match="unknown kid"):
            verifier.verify(mint(ec_key2, kid="ec3", **fresh))
    assert verifier.verify(mint(ec_key, **fresh)).subject == "alice"  # known keys need no fetch
    assert len(server.requests) == 2


class DictDocuments:
    """Stands in for the nation's cache actor: a shared document store across verifiers (replicas)."""

    def __init__(self) -> None:
        self.docs: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.docs.get(key)

    def put(self, key: str, document: bytes) -> None:
        self.docs[key] = document


def test_shared_jwks_first_load_reuses_a_replicas_fetch_but_refresh_fetches(server, clock, ec_key, ec_key2):
    server.document = {"keys": [jwk_entry(ec_key, "ec1")]}
    shared = DictDocuments()
    registry = make_registry(JwksSource(url=server.url))
    first = TokenVerifier(registry, clock=clock, shared_jwks=shared)
    assert first.verify(mint(ec_key)).subject == "alice"
    second = TokenVerifier(registry, clock=clock, shared_jwks=shared)  # another replica
    assert second.verify(mint(ec_key)).subject == "alice"
    assert len(server.requests) == 1 and len(shared.docs) == 1  # the second replica reused the document

    server.document = {"keys": [jwk_entry(ec_key, "ec1"), jwk_entry(ec_key2, "ec2")]}  # rotation at the IdP
    clock.now += 61
    fresh = {"iat": int(clock.now), "exp": int(clock.now) + 60}
    # An unknown kid is never answered from the (stale) shared copy: the pinned URL is fetched again.
    assert second.verify(mint(ec_key2, kid="ec2", **fresh)).subject == "alice"
    assert len(server.requests) == 2
    third = TokenVerifier(registry, clock=clock, shared_jwks=shared)  # a new replica gets the fresh copy
    assert third.verify(mint(ec_key2, kid="ec2", **fresh)).subject == "alice"
    assert len(server.requests) == 2


def test_concurrent_first_use_fetches_once(server, clock, ec_key):
    server.document = {"keys": [jwk_entry(ec_key, "ec1")]}
    verifier = TokenVerifier(make_registry(JwksSource(url=server.url)), clock=clock)
    token = mint(ec_key)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(verifier.verify(token).subject)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["alice"] * 8
    assert len(server.requests) == 1


def test_jwks_source_failure_fails_closed_and_keeps_last_good_keys(server, clock, ec_key):
    server.status = 500
    verifier = TokenVerifier(make_registry(JwksSource(url=server.url)), clock=clock)
    with pytest.raises(TokenError, match="unavailable"):
        verifier.verify(mint(ec_key))
    server.status = 200
    server.document = {"keys": [jwk_entry(ec_key, "ec1")]}
    with pytest.raises(TokenError):  # the failed attempt also counts against the rate limit
        verifier.verify(mint(ec_key))
    clock.now += 60
    fresh = {"iat": int(clock.now), "exp": int(clock.now) + 60}
    assert verifier.verify(mint(ec_key, **fresh)).subject == "alice"
    server.status = 500
    clock.now += 60
    fresh = {"iat": int(clock.now), "exp": int(clock.now) + 60}
    with pytest.raises(TokenError, match="unknown kid"):  # refresh failed, old keys still serve
        verifier.verify(mint(ec_key, kid="other", **fresh))
    assert verifier.verify(mint(ec_key, **fresh)).subject == "alice"
    assert len(server.requests) == 3


def test_private_and_foreign_jwks_entries_are_ignored(tmp_path, clock, ec_key, rsa_key):
    private = ec_key.private_numbers()
    leaked = {
        **jwk_entry(ec_key, "ec1"),
        "d": base64.urlsafe_b64encode(private.private_value.to_bytes(32, "big")).rstrip(b"=").decode(),
    }
    path = tmp_path / "mixed.json"
    path.write_text(
        json.dumps(
            {
                "keys": [
                    leaked,
                    {**jwk_entry(rsa_key, "rsa1"), "use": "enc"},
                    {"kty": "oct", "k": "c2VjcmV0", "kid": "hs"},
                ]
            }
        )
    )
    verifier = TokenVerifier(make_registry(JwksSource(file=path)), clock=clock)
    for token in (mint(ec_key), mint(rsa_key, alg="RS256", kid="rsa1")):
        with pytest.raises(TokenError, match="unknown kid"):
            verifier.verify(token)


def test_attacker_urls_in_token_are_never_fetched(server, attacker, clock, ec_key, ec_key2):
    server.document = {"keys": [jwk_entry(ec_key, "ec1")]}
    attacker.document = {"keys": [jwk_entry(ec_key2, "evil")]}
    verifier = TokenVerifier(make_registry(JwksSource(url=server.url)), clock=clock)
    pointers = {"jku": attacker.url, "x5u": attacker.base + "/cert.pem", "jwk": jwk_entry(ec_key2, "evil")}

    # iss names the attacker: refused as untrusted before anything is fetched.
    with pytest.raises(UntrustedIssuerError):
        verifier.verify(mint(ec_key2, kid="evil", iss=attacker.base, headers=pointers))
    # Trusted iss, but the key is only available at the attacker's jku / embedded jwk.
    with pytest.raises(TokenError, match="unknown kid"):
        verifier.verify(mint(ec_key2, kid="evil", headers=pointers))
    assert attacker.requests == []
    assert server.requests == ["GET /jwks.json"]  # only the pinned URL


def test_pinned_url_redirect_is_not_followed(server, attacker, clock, ec_key):
    attacker.document = {"keys": [jwk_entry(ec_key, "ec1")]}
    server.redirect_to = attacker.url
    verifier = TokenVerifier(make_registry(JwksSource(url=server.url)), clock=clock)
    with pytest.raises(TokenError, match="unavailable"):
        verifier.verify(mint(ec_key))
    assert attacker.requests == []


# --- Authorization header --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc.def.ghi", ("Bearer", "abc.def.ghi")),
        ("bearer abc.def.ghi", ("Bearer", "abc.def.ghi")),
        ("DPoP abc.def.ghi", ("DPoP", "abc.def.ghi")),
        ("  dpop   abc.def-_~+/=  ", ("DPoP", "abc.def-_~+/=")),
    ],
)
def test_parse_authorization(header, expected):
    assert parse_authorization(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "   ",
        "Bearer",
        "Bearer  ",
        "Basic dXNlcg==",
        "Bearer a b",
        "Bearer a\x00b",
        "Token abc",
        "Bearer =abc",
    ],
)
def test_parse_authorization_refuses_missing_or_garbled(header):
    with pytest.raises(TokenError):
        parse_authorization(header)


# --- property: garbage never escapes as anything but TokenError ------------------------------------
_segment = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=", max_size=60)
_json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_header = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(["none", "HS256", "ES256", "RS256"]) | _json_value,
        "kid": st.sampled_from(["ec1", "rsa1"]) | _json_value,
        "crit": _json_value,
    },
)
_payload = st.fixed_dictionaries(
    {},
    optional={
        "iss": st.just(ISS) | _json_value,
        "aud": st.just(AUD) | _json_value,
        "exp": _json_value,
        "sub": _json_value,
        "acpCOI": _json_value,
        "cnf": _json_value,
    },
)
_structured = st.builds(lambda header, payload, sig: f"{b64(header)}.{b64(payload)}.{sig}", _header, _payload, _segment)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(token=st.text(max_size=200) | st.lists(_segment, max_size=5).map(".".join) | _structured)
def test_garbage_tokens_only_raise_token_error(verifier, token):
    with pytest.raises(TokenError):
        verifier.verify(token)


# --- peek_jws: the fast header/claims reader must accept exactly what PyJWT accepts ----------------------

_SEGMENT = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/. é", max_size=40)


def _pyjwt_view(token: str):
    try:
        decoded = jwt.api_jwt.decode_complete(token, options={"verify_signature": False})
    except Exception:
        return None
    return decoded["header"], decoded["payload"]


def _peek_view(token: str):
    from kas_ray.errors import TokenError
    from kas_ray.trust.tokens import peek_jws

    try:
        return peek_jws(token, TokenError, "access token", 1 << 16)
    except TokenError:
        return None


def _b64(obj) -> str:
    import base64
    import json as _json

    raw = obj if isinstance(obj, bytes) else _json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@settings(max_examples=400, deadline=None)
@given(header=_SEGMENT, payload=_SEGMENT, signature=_SEGMENT, pad_h=st.sampled_from(["", "=", "==", "==="]))
def test_peek_jws_accepts_exactly_what_pyjwt_accepts_random_segments(header, payload, signature, pad_h):
    """Random segments: peek_jws reads a token exactly when PyJWT does, and the same way."""
    token = f"{header}{pad_h}.{payload}.{signature}"
    assert _peek_view(token) == _pyjwt_view(token)
    valid_signature = f"{header}{pad_h}.{payload}.{_b64(b'signature')}"  # so that the header and payload count
    assert _peek_view(valid_signature) == _pyjwt_view(valid_signature)


@settings(max_examples=300, deadline=None)
@given(
    claims=st.dictionaries(st.sampled_from(["iss", "sub", "aud", "exp", "x"]),
                           st.one_of(st.integers(), st.text(max_size=8), st.lists(st.integers(), max_size=2)),
                           max_size=4),
    mutation=st.sampled_from(["none", "pad1", "pad2", "pad3", "plus", "slash", "space", "trailing-bit",
                              "dot", "two-parts", "four-parts", "non-object"]),
)
def test_peek_jws_matches_pyjwt_on_mutated_well_formed_tokens(claims, mutation):
    """Near-valid tokens (padding, alphabet, non-canonical last character, segment count): same verdict."""
    h, p, s = _b64({"alg": "ES256", "typ": "JWT"}), _b64(claims), _b64(b"\x01" * 64)
    if mutation == "pad1":
        p += "="
    elif mutation == "pad2":
        p += "=="
    elif mutation == "pad3":
        p += "==="
    elif mutation == "plus":
        p = p[:-1] + "+"
    elif mutation == "slash":
        p = "/" + p[1:]
    elif mutation == "space":
        p = p + " "
    elif mutation == "trailing-bit" and len(p) % 4 in (2, 3):
        last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(p[-1])
        p = p[:-1] + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[last ^ 1]
    elif mutation == "dot":
        p = p + "."
    elif mutation == "non-object":
        p = _b64([1, 2])
    token = {"two-parts": f"{h}.{p}", "four-parts": f"{h}.{p}.{s}.{s}"}.get(mutation, f"{h}.{p}.{s}")
    pyjwt_view = _pyjwt_view(token)
    assert _peek_view(token) == pyjwt_view


# --- verified-token memory -----------------------------------------------------------------------------
def test_verified_token_is_remembered_for_a_bounded_time(jwks_file, clock, ec_key, ec_key2):
    """A reused token costs no second signature check, for verified_token_cache_seconds at most: a key
    removed from the issuer's JWKS stops being honoured by then, and times are re-checked on every use."""
    registry = make_registry(JwksSource(file=jwks_file)).model_copy(update={"verified_token_cache_seconds": 120})
    verifier = TokenVerifier(registry, clock=clock)
    token, short = mint(ec_key, exp=int(NOW) + 3000), mint(ec_key, sub="bob", exp=int(NOW) + 20)
    assert verifier.verify(token).subject == "alice" and verifier.verify(short).subject == "bob"
    jwks_file.write_text(json.dumps({"keys": [jwk_entry(ec_key2, "ec2")]}))  # ec1 rotated out
    clock.now += 61  # past the JWKS refresh interval: a token of the new key makes the verifier read it
    assert verifier.verify(mint(ec_key2, kid="ec2", iat=int(clock.now), exp=int(clock.now) + 300))
    assert verifier.keys.load_count(ISS) == 2
    with pytest.raises(TokenError, match="unknown kid"):  # a new ec1 token: ec1 is gone
        verifier.verify(mint(ec_key, sub="carol", iat=int(clock.now), exp=int(clock.now) + 300))
    assert verifier.verify(token).subject == "alice"  # remembered (verified 61 s ago)
    with pytest.raises(TokenError, match="expired"):  # remembered, but its exp (+ leeway 30 s) has passed
        asyncio.run(verifier.averify(short))
    tampered = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
    with pytest.raises(TokenError):  # another string is another token: verified from scratch
        verifier.verify(tampered)
    clock.now += 60  # 121 s after the first verification: forgotten, and ec1 is gone
    with pytest.raises(TokenError, match="unknown kid"):
        verifier.verify(token)


def test_verified_token_memory_can_be_disabled(jwks_file, clock, ec_key, ec_key2):
    registry = make_registry(JwksSource(file=jwks_file)).model_copy(update={"verified_token_cache_seconds": 0})
    verifier = TokenVerifier(registry, clock=clock)
    token = mint(ec_key, exp=int(NOW) + 3000)
    assert verifier.verify(token).subject == "alice"
    jwks_file.write_text(json.dumps({"keys": [jwk_entry(ec_key2, "ec2")]}))
    clock.now += 61
    assert verifier.verify(mint(ec_key2, kid="ec2", iat=int(clock.now), exp=int(clock.now) + 300))
    with pytest.raises(TokenError, match="unknown kid"):  # checked again at once
        verifier.verify(token)


@pytest.mark.parametrize("url", ["https://idp.example/jwks.json", "http://127.0.0.1:8080/jwks.json",
                                 "http://localhost/jwks.json", "http://[::1]:9000/jwks"])
def test_jwks_url_https_or_loopback_is_accepted(url: str) -> None:
    assert JwksSource(url=url).url == url


@pytest.mark.parametrize("url", [
    "http://idp.example/jwks.json",
    "http://127.0.0.1@attacker.example/jwks.json",  # user info: the host is attacker.example
    "http://localhost.attacker.example/jwks.json",
    "http://127.0.0.1.nip.io/jwks.json",
    "https://user:pass@idp.example/jwks.json",
    "ftp://127.0.0.1/jwks.json",
    "http://[::1/jwks",
])
def test_jwks_url_that_only_looks_like_loopback_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="JWKS URL must be https"):
        JwksSource(url=url)


def test_a_jwks_source_that_trickles_is_cut_at_the_fetch_timeout(server, clock, ec_key) -> None:
    """Each read comes within the timeout, but the whole document would take ~minutes: the fetch stops
    at about the timeout (the issuer's lock is held meanwhile), and the token is refused, not hung."""
    server.document = {"keys": [jwk_entry(ec_key, "ec1")]}
    server.trickle = 0.05
    registry = make_registry(JwksSource(url=server.url)).model_copy(update={"jwks_fetch_timeout": 0.5})
    verifier = TokenVerifier(registry, clock=clock)
    started = time.monotonic()
    with pytest.raises(TokenError, match="unavailable"):
        verifier.verify(mint(ec_key))
    assert time.monotonic() - started < 2.0

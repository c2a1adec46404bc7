"""DPoP proofs (RFC 9449), the replay store and signed request tokens, with real keys."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import uuid
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from kas_ray.config import DPoPConfig
from kas_ray.errors import DPoPError, ReplayError, SignedRequestError
from kas_ray.trust import (
    MemoryReplayStore,
    averify_dpop,
    jwk_thumbprint,
    make_dpop_proof,
    sign_request,
    verify_dpop,
    verify_signed_request,
)
from kas_ray.trust.dpop import access_token_hash, normalize_htu
from kas_ray.trust.jwks import public_jwk

NOW = 1_750_000_000.0
URL = "https://kas.usa.example/kas/v2/rewrap"
ACCESS_TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln"
CONFIG = DPoPConfig(max_age_seconds=300)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def b64(data: bytes | dict[str, Any]) -> str:
    raw = json.dumps(data).encode() if isinstance(data, dict) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def sign(key: Any, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """Compact JWS by hand, so tests can write headers and claims a real client never would."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    signature = jwt.get_algorithm_by_name(header["alg"]).sign(signing_input.encode(), key)
    return f"{signing_input}.{b64(signature)}"


def without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def other_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def store() -> MemoryReplayStore:
    return MemoryReplayStore()


def proof(key: Any, header: dict[str, Any] | None = None, signer: Any = None, **claims: Any) -> str:
    """An ES256 proof for POST URL with ACCESS_TOKEN; a None override removes the member."""
    full_header = without_none({"typ": "dpop+jwt", "alg": "ES256", "jwk": public_jwk(key), **(header or {})})
    body = without_none(
        {
            "jti": str(uuid.uuid4()),
            "htm": "POST",
            "htu": URL,
            "iat": int(NOW),
            "ath": access_token_hash(ACCESS_TOKEN),
            **claims,
        }
    )
    return sign(key if signer is None else signer, full_header, body)


def check(
    value: str,
    store: MemoryReplayStore,
    *,
    method: str = "POST",
    url: str = URL,
    expected_jkt: str | None = None,
    config: DPoPConfig = CONFIG,
):
    return verify_dpop(
        value,
        method=method,
        url=url,
        access_token=ACCESS_TOKEN,
        config=config,
        replay=store,
        expected_jkt=expected_jkt,
        clock=lambda: NOW,
    )


# --- thumbprints -----------------------------------------------------------------------------------
RFC7638_JWK = {
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXj"
    "BZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJ"
    "ZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBn"
    "iIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}


def test_jwk_thumbprint_rfc7638_vector():
    assert jwk_thumbprint(RFC7638_JWK) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_jwk_thumbprint_ignores_optional_members(ec_key):
    jwk = public_jwk(ec_key)
    assert jwk_thumbprint({**jwk, "kid": "x", "use": "sig"}) == jwk_thumbprint(jwk)
    assert jwk_thumbprint(jwk) != jwk_thumbprint(public_jwk(ec.generate_private_key(ec.SECP256R1())))


@pytest.mark.parametrize("jwk", [{"kty": "RSA", "e": "AQAB"}, {"kty": "XYZ"}, {}, {"kty": "EC", "crv": 1}])
def test_jwk_thumbprint_refuses_incomplete_keys(jwk):
    with pytest.raises(ValueError):
        jwk_thumbprint(jwk)


# --- valid proofs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("key_name", ["ec_key", "rsa_key"])
def test_valid_proof_from_client_helper(request, store, key_name):
    key = request.getfixturevalue(key_name)
    jkt = jwk_thumbprint(public_jwk(key))
    value = make_dpop_proof(key, "POST", URL + "?ignored=1#frag", ACCESS_TOKEN, iat=NOW)
    verified = check(value, store, expected_jkt=jkt)
    assert verified.jkt == jkt
    assert jwk_thumbprint(verified.jwk) == jkt and "d" not in verified.jwk
    assert (verified.htm, verified.htu, verified.iat) == ("POST", URL, NOW)
    assert len(store) == 1


def test_proof_jwk_verifies_signed_request(ec_key, store):
    verified = check(make_dpop_proof(ec_key, "POST", URL, ACCESS_TOKEN, iat=NOW), store)
    srt = sign_request({"requests": []}, ec_key, now=NOW)
    assert verify_signed_request(srt, dpop_jwk=verified.jwk, max_age_seconds=300, clock=lambda: NOW) == {"requests": []}


@pytest.mark.parametrize(
    "url",
    [
        URL + "?other=query",
        "HTTPS://KAS.USA.EXAMPLE/kas/v2/rewrap",
        "https://kas.usa.example:443/kas/v2/rewrap#x",
    ],
)
def test_htu_match_ignores_query_fragment_case_and_default_port(ec_key, store, url):
    assert check(proof(ec_key, htu=URL + "?a=b"), store, url=url).htu == URL + "?a=b"


def test_averify_dpop(ec_key, store):
    value = proof(ec_key)
    args = dict(
        method="POST",
        url=URL,
        access_token=ACCESS_TOKEN,
        config=CONFIG,
        replay=store,
        expected_jkt=None,
        clock=lambda: NOW,
    )
    assert asyncio.run(averify_dpop(value, **args)).htm == "POST"
    with pytest.raises(ReplayError):
        asyncio.run(averify_dpop(value, **args))


# --- each check separately -------------------------------------------------------------------------
def _jwk_with_d(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    d = key.private_numbers().private_value.to_bytes(32, "big")
    return {**public_jwk(key), "d": b64(d)}


BAD_PROOFS = {
    "typ JWT": (lambda k, o, r: proof(k, header={"typ": "JWT"}), "header 'typ'"),
    "typ missing": (lambda k, o, r: proof(k, header={"typ": None}), "header 'typ'"),
    "alg none": (lambda k, o, r: proof(k, header={"alg": "none"}, signer=b""), "header 'alg' 'none'"),
    "alg HS256": (
        lambda k, o, r: proof(k, header={"alg": "HS256"}, signer=b"secret"),
        "header 'alg' 'HS256'",
    ),
    "alg RS512 not configured": (
        lambda k, o, r: proof(r, header={"alg": "RS512", "jwk": public_jwk(r)}),
        "header 'alg' 'RS512'",
    ),
    "jwk missing": (lambda k, o, r: proof(k, header={"jwk": None}), "header 'jwk' is missing"),
    "jwk not an object": (lambda k, o, r: proof(k, header={"jwk": "key"}), "header 'jwk' is missing"),
    "jwk private": (lambda k, o, r: proof(k, header={"jwk": _jwk_with_d(k)}), "private key members"),
    "jwk symmetric": (
        lambda k, o, r: proof(k, header={"jwk": {"kty": "oct", "k": "c2VjcmV0"}}),
        "header 'jwk'",
    ),
    "jwk RSA for ES256": (
        lambda k, o, r: proof(k, header={"jwk": public_jwk(r)}),
        "header 'jwk' is unusable",
    ),
    "bad signature": (lambda k, o, r: proof(k, signer=o), "signature does not verify"),
    "htm GET": (lambda k, o, r: proof(k, htm="GET"), "claim 'htm'"),
    "htm lower case": (lambda k, o, r: proof(k, htm="post"), "claim 'htm'"),
    "htm missing": (lambda k, o, r: proof(k, htm=None), "claim 'htm'"),
    "htu other path": (lambda k, o, r: proof(k, htu="https://kas.usa.example/kas/v2/other"), "claim 'htu'"),
    "htu other host": (lambda k, o, r: proof(k, htu="https://kas.fra.example/kas/v2/rewrap"), "claim 'htu'"),
    "htu other scheme": (lambda k, o, r: proof(k, htu="http://kas.usa.example/kas/v2/rewrap"), "claim 'htu'"),
    "htu other port": (
        lambda k, o, r: proof(k, htu="https://kas.usa.example:8443/kas/v2/rewrap"),
        "claim 'htu'",
    ),
    "htu user info": (lambda k, o, r: proof(k, htu="https://u@kas.usa.example/kas/v2/rewrap"), "claim 'htu'"),
    "htu missing": (lambda k, o, r: proof(k, htu=None), "claim 'htu'"),
    "iat too old": (lambda k, o, r: proof(k, iat=int(NOW) - 301), "claim 'iat' is older than 300"),
    "iat in future": (lambda k, o, r: proof(k, iat=int(NOW) + 301), "claim 'iat' is in the future"),
    "iat missing": (lambda k, o, r: proof(k, iat=None), "claim 'iat' is required"),
    "iat not a number": (lambda k, o, r: proof(k, iat="now"), "claim 'iat' must be a number"),
    "ath wrong": (
        lambda k, o, r: proof(k, ath=access_token_hash("another token")),
        "claim 'ath' does not match",
    ),
    "ath padded": (
        lambda k, o, r: proof(k, ath=access_token_hash(ACCESS_TOKEN) + "="),
        "claim 'ath' does not",
    ),
    "ath missing": (lambda k, o, r: proof(k, ath=None), "claim 'ath' is missing"),
    "jti missing": (lambda k, o, r: proof(k, jti=None), "claim 'jti' is missing"),
    "jti empty": (lambda k, o, r: proof(k, jti=""), "claim 'jti' is missing"),
    "jti too long": (lambda k, o, r: proof(k, jti="x" * 257), "claim 'jti' is longer"),
    "not a JWT": (lambda k, o, r: "not-a-jwt", "not a well-formed JWT"),
}


@pytest.mark.parametrize("case", list(BAD_PROOFS))
def test_each_failed_check_is_a_precise_dpop_error(ec_key, other_ec_key, rsa_key, store, case):
    build, message = BAD_PROOFS[case]
    with pytest.raises(DPoPError, match=message) as caught:
        check(build(ec_key, other_ec_key, rsa_key), store)
    assert not isinstance(caught.value, ReplayError)
    assert len(store) == 0  # a refused proof burns no jti


def test_thumbprint_must_equal_cnf_jkt(ec_key, other_ec_key, store):
    with pytest.raises(DPoPError, match="cnf.jkt"):
        check(proof(ec_key), store, expected_jkt=jwk_thumbprint(public_jwk(other_ec_key)))


def test_replay_refused(ec_key, store):
    value = proof(ec_key)
    assert check(value, store).jti
    with pytest.raises(ReplayError, match="'jti' was already used"):
        check(value, store)
    assert check(proof(ec_key), store)  # a fresh jti from the same key is fine


def test_replay_window_covers_the_whole_iat_window(ec_key):
    clock = Clock()
    store = MemoryReplayStore(clock=clock)
    value = proof(ec_key, iat=int(NOW) + 300)  # still acceptable for 600 s
    check(value, store)
    clock.now += 599
    with pytest.raises(ReplayError):
        check(value, store)


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("HTTPS://Kas.Example:443/a?b#c", "https://kas.example/a"),
        ("http://kas.example:80", "http://kas.example/"),
        ("http://kas.example:8080/x", "http://kas.example:8080/x"),
        ("https://[::1]:443/x", "https://[::1]/x"),
    ],
)
def test_normalize_htu(url, normal):
    assert normalize_htu(url) == normal


@pytest.mark.parametrize(
    "url", ["ftp://kas.example/a", "kas.example/a", "https:///a", "https://h:99999/", "https://u:p@h/"]
)
def test_normalize_htu_refuses(url):
    with pytest.raises(ValueError):
        normalize_htu(url)


@settings(max_examples=100, deadline=None)
@given(value=st.text(max_size=100) | st.lists(st.text("abcXYZ012-_", max_size=30), max_size=4).map(".".join))
def test_garbage_proofs_only_raise_dpop_error(value):
    with pytest.raises(DPoPError):
        check(value, MemoryReplayStore())


# --- replay store ----------------------------------------------------------------------------------
def test_replay_store_first_use_and_expiry():
    clock = Clock(0)
    store = MemoryReplayStore(clock=clock)
    assert store.check_and_store("dpop:a", 10) is True
    assert store.check_and_store("dpop:a", 10) is False
    assert store.check_and_store("dpop:b", 10) is True
    clock.now = 10
    assert store.check_and_store("dpop:a", 10) is True  # expired, so first use again
    assert len(store) == 1


def test_replay_store_bounded_evicts_expired_first():
    clock = Clock(0)
    store = MemoryReplayStore(max_entries=3, clock=clock)
    assert store.check_and_store("short", 1) and store.check_and_store("b", 100) and store.check_and_store("c", 50)
    clock.now = 2
    assert store.check_and_store("d", 100)
    assert (len(store), store.evictions) == (3, 0)
    assert not store.check_and_store("b", 100) and not store.check_and_store("c", 100)
    assert store.check_and_store("e", 100)  # full of live entries: the one closest to expiry goes
    assert (len(store), store.evictions) == (3, 1)
    assert store.check_and_store("c", 100)  # "c" (expiring at 50) was the one evicted
    assert store.evictions == 2  # ... and storing it again evicted "b" (expiring at 100)
    assert not store.check_and_store("d", 100) and not store.check_and_store("e", 100)


def test_replay_store_is_atomic_across_threads():
    store = MemoryReplayStore()
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def race() -> None:
        barrier.wait()
        results.extend(store.check_and_store(f"k{i}", 60) for i in range(200))

    threads = [threading.Thread(target=race) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 200 and len(results) == 1600


def test_replay_store_async_twin_and_arguments():
    store = MemoryReplayStore()
    assert asyncio.run(store.acheck_and_store("x", 5)) is True
    assert asyncio.run(store.acheck_and_store("x", 5)) is False
    with pytest.raises(ValueError):
        store.check_and_store("y", 0)
    with pytest.raises(ValueError):
        MemoryReplayStore(max_entries=0)


# --- signed request tokens -------------------------------------------------------------------------
BODY = {"clientPublicKey": "-----BEGIN PUBLIC KEY-----...", "requests": [{"policy": {"id": "policy"}}]}


def srt_claims(**overrides: Any) -> dict[str, Any]:
    return without_none({"requestBody": json.dumps(BODY), "iat": int(NOW), "exp": int(NOW) + 60, **overrides})


def verify_srt(value: str, dpop_jwk: dict | None = None, **kwargs: Any) -> dict:
    return verify_signed_request(value, dpop_jwk=dpop_jwk, max_age_seconds=300, clock=lambda: NOW, **kwargs)


@pytest.mark.parametrize(("key_name", "alg"), [("ec_key", None), ("rsa_key", "RS256"), ("rsa_key", "PS256")])
def test_srt_verified_with_dpop_key(request, key_name, alg):
    key = request.getfixturevalue(key_name)
    srt = sign_request(BODY, key, alg, now=NOW)
    assert jwt.get_unverified_header(srt)["alg"] == (alg or "ES256")
    assert jwt.decode(srt, options={"verify_signature": False})["exp"] == int(NOW) + 60
    assert verify_srt(srt, public_jwk(key)) == BODY


def test_srt_wrong_dpop_key(ec_key, other_ec_key):
    with pytest.raises(SignedRequestError, match="signature does not verify with the DPoP key"):
        verify_srt(sign_request(BODY, other_ec_key, now=NOW), public_jwk(ec_key))


def test_srt_key_type_must_fit_dpop_key(ec_key, rsa_key):
    with pytest.raises(SignedRequestError, match="does not fit the DPoP key"):
        verify_srt(sign_request(BODY, rsa_key, now=NOW), public_jwk(ec_key))


def test_srt_dpop_key_must_be_public(ec_key):
    with pytest.raises(SignedRequestError, match="private key members"):
        verify_srt(sign_request(BODY, ec_key, now=NOW), _jwk_with_d(ec_key))


def test_srt_without_dpop_key_parses_unverified(other_ec_key):
    # Signed by a key the KAS never saw: accepted like the OpenTDF platform does.
    assert verify_srt(sign_request(BODY, other_ec_key, now=NOW)) == BODY


def test_srt_exp_is_optional(ec_key):
    assert verify_srt(sign(ec_key, {"alg": "ES256"}, srt_claims(exp=None)), public_jwk(ec_key)) == BODY


@pytest.mark.parametrize("with_dpop", [True, False])
def test_srt_expired(ec_key, with_dpop):
    srt = sign_request(BODY, ec_key, now=NOW - 61)
    with pytest.raises(SignedRequestError, match="expired"):
        verify_srt(srt, public_jwk(ec_key) if with_dpop else None)
    assert verify_srt(srt, leeway_seconds=30) == BODY


@pytest.mark.parametrize(
    ("iat", "message"),
    [
        (int(NOW) - 301, "'iat' is over 300"),
        (int(NOW) + 301, "'iat'"),
        (None, "'iat' is required"),
        ("yesterday", "'iat' must be"),
    ],
)
def test_srt_iat_window(ec_key, iat, message):
    with pytest.raises(SignedRequestError, match=message):
        verify_srt(sign(ec_key, {"alg": "ES256"}, srt_claims(iat=iat, exp=None)))


@pytest.mark.parametrize(
    ("request_body", "message"),
    [("{not json", "not JSON"), (None, "missing"), ("[1, 2]", "not a JSON object"), (BODY, "not a string")],
)
def test_srt_request_body_must_be_a_json_object_string(ec_key, request_body, message):
    value = sign(ec_key, {"alg": "ES256"}, srt_claims(requestBody=request_body))
    with pytest.raises(SignedRequestError, match=message):
        verify_srt(value, public_jwk(ec_key))


@pytest.mark.parametrize("with_dpop", [True, False])
@pytest.mark.parametrize(("alg", "key"), [("none", b""), ("HS256", b"secret")])
def test_srt_alg_none_and_hmac_refused(ec_key, with_dpop, alg, key):
    value = sign(key, {"alg": alg}, srt_claims())
    with pytest.raises(SignedRequestError, match=f"alg '{alg}' is not allowed"):
        verify_srt(value, public_jwk(ec_key) if with_dpop else None)


@settings(max_examples=100, deadline=None)
@given(value=st.text(max_size=100) | st.lists(st.text("abcXYZ012-_", max_size=30), max_size=4).map(".".join))
def test_garbage_srt_only_raises_signed_request_error(value):
    with pytest.raises(SignedRequestError):
        verify_srt(value)

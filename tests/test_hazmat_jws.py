"""kas_ray.hazmat.jws against PyJWT: the same verdict and claims on valid, tampered and confused tokens.

The rewrap path verifies DPoP proofs, signed requests and federation envelopes with our own JWS code
(PyJWT cost ~15 % of a replica's CPU). These tests hold it to PyJWT 2.x's rules, so that a token one
accepts and the other refuses is a test failure, not a bypass.
"""

from __future__ import annotations

import base64
import json
import warnings

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from kas_ray.hazmat import jws
from kas_ray.hazmat.jws import JwsError, JwsSignatureError

ALGS = ["ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]


@pytest.fixture(scope="module")
def keys():
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "ES384": ec.generate_private_key(ec.SECP384R1()),
        "ES512": ec.generate_private_key(ec.SECP521R1()),
        **{alg: rsa_key for alg in ALGS if not alg.startswith("ES")},
    }


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


_SIGNATURE_ONLY = {f"verify_{claim}": False for claim in ("exp", "nbf", "iat", "aud", "iss", "sub", "jti")}


def _pyjwt(token: str, key, alg: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            decoded = jwt.api_jwt.decode_complete(token, key, algorithms=[alg], options=_SIGNATURE_ONLY)
            return decoded["header"], decoded["payload"]
        except (jwt.PyJWTError, ValueError, TypeError):
            return None


def _ours(token: str, key, alg: str):
    try:
        return jws.verify(token, key, alg)
    except JwsError:
        return None


@pytest.mark.parametrize("alg", ALGS)
def test_sign_and_verify_agree_with_pyjwt(keys, alg):
    """Our signatures verify under PyJWT, PyJWT's under ours; a tampered payload or another key fails."""
    key = keys[alg]
    claims = {"sub": "alice", "n": 1, "list": [1, "x"], "nested": {"a": None}}
    ours = jws.sign(claims, key, alg, {"typ": "x+jwt", "kid": "k1"})
    theirs = jwt.encode(claims, key, algorithm=alg, headers={"kid": "k1"})
    assert jwt.decode(ours, key.public_key(), algorithms=[alg]) == claims
    for token in (ours, theirs):
        header, got = jws.verify(token, key.public_key(), alg)
        assert got == claims and header["alg"] == alg and header["kid"] == "k1"
    head, _, sig = ours.split(".")
    forged = f"{head}.{_b64(json.dumps({**claims, 'sub': 'mallory'}).encode())}.{sig}"
    with pytest.raises(JwsSignatureError):
        jws.verify(forged, key.public_key(), alg)
    other = ec.generate_private_key(key.curve) if alg.startswith("ES") else rsa.generate_private_key(65537, 2048)
    with pytest.raises(JwsSignatureError):
        jws.verify(ours, other.public_key(), alg)


@pytest.mark.parametrize(("token_alg", "expected_alg", "key_alg"), [
    ("ES256", "ES384", "ES256"),  # header alg is not the expected one
    ("RS256", "PS256", "RS256"),
    ("ES256", "ES256", "ES384"),  # key on another curve than the alg's
    ("RS256", "ES256", "RS256"),  # alg confusion: EC alg with an RSA key
    ("ES256", "RS256", "ES256"),
])
def test_algorithm_and_key_confusion_is_refused(keys, token_alg, expected_alg, key_alg):
    token = jwt.encode({"sub": "a"}, keys[token_alg], algorithm=token_alg)
    with pytest.raises(JwsError):
        jws.verify(token, keys[key_alg].public_key(), expected_alg)


@pytest.mark.parametrize("alg", ["none", "HS256", "EdDSA", "ES256K", "", "RS1"])
def test_unsupported_algorithms_fail_closed(keys, alg):
    header = _b64(json.dumps({"alg": alg}).encode())
    token = f"{header}.{_b64(b'{}')}.{_b64(b'sig')}"
    with pytest.raises(JwsError):
        jws.verify(token, keys["ES256"].public_key(), alg)
    with pytest.raises(JwsError):
        jws.sign({}, keys["ES256"], alg)


def test_sign_refuses_a_key_that_does_not_fit(keys):
    with pytest.raises(JwsError):
        jws.sign({}, keys["RS256"], "ES256")
    with pytest.raises(JwsError):
        jws.sign({}, keys["ES384"], "ES256")
    with pytest.raises(JwsError):
        jws.sign({}, keys["ES256"], "RS256")


_MUTATIONS = ["none", "flip-sig", "short-sig", "long-sig", "empty-sig", "pad-sig", "pad2-payload", "plus",
              "kid-int", "alg-list", "header-array", "payload-array", "payload-not-json", "four", "two",
              "swap-alg", "trailing-bit", "unicode"]


@settings(max_examples=300, deadline=None)
@given(alg=st.sampled_from(ALGS), mutation=st.sampled_from(_MUTATIONS),
       claims=st.dictionaries(st.sampled_from(["sub", "iat", "x"]),
                              st.one_of(st.integers(), st.text(max_size=6)), max_size=3))
def test_verdicts_match_pyjwt_on_mutated_tokens(keys, alg, mutation, claims):
    key = keys[alg]
    h_obj: dict = {"alg": alg, "typ": "JWT"}
    if mutation == "kid-int":
        h_obj["kid"] = 7
    if mutation == "alg-list":
        h_obj["alg"] = [alg]
    if mutation == "swap-alg":
        h_obj["alg"] = "ES256" if alg != "ES256" else "ES384"
    h = _b64(json.dumps([1]).encode()) if mutation == "header-array" else _b64(json.dumps(h_obj).encode())
    p = _b64(json.dumps([1]).encode() if mutation == "payload-array" else
             b"{not json" if mutation == "payload-not-json" else json.dumps(claims).encode())
    signing_input = f"{h}.{p}".encode()
    raw = jws.sign(claims, key, alg).split(".")[2]  # a signature shape of the right size
    if mutation not in ("kid-int", "alg-list", "swap-alg", "header-array", "payload-array", "payload-not-json"):
        raw = jws.sign(claims, key, alg, {"typ": "JWT"}).split(".")[2]
        h, p = jws.sign(claims, key, alg, {"typ": "JWT"}).split(".")[:2]
    else:  # sign the odd header/payload as they are, so that only the oddity can fail
        der_sig = _raw_signature(key, alg, signing_input)
        raw = _b64(der_sig)
    s = raw
    if mutation == "flip-sig":
        s = ("B" if raw[0] == "A" else "A") + raw[1:]
    elif mutation == "short-sig":
        s = _b64(base64.urlsafe_b64decode(raw + "==")[:-1])
    elif mutation == "long-sig":
        s = _b64(base64.urlsafe_b64decode(raw + "==") + b"\x00")
    elif mutation == "empty-sig":
        s = ""
    elif mutation == "pad-sig" and len(raw) % 4:
        s = raw + "=" * (-len(raw) % 4)
    elif mutation == "pad2-payload":
        p = p + "=="
    elif mutation == "plus":
        s = raw.replace("-", "+").replace("_", "/")
    elif mutation == "trailing-bit" and len(raw) % 4 in (2, 3):
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        s = raw[:-1] + alphabet[alphabet.index(raw[-1]) ^ 1]
    elif mutation == "unicode":
        s = raw + "é"
    token = {"four": f"{h}.{p}.{s}.{s}", "two": f"{h}.{p}"}.get(mutation, f"{h}.{p}.{s}")
    expected = _pyjwt(token, key.public_key(), alg)
    assert _ours(token, key.public_key(), alg) == expected
    if mutation == "none":
        assert expected is not None  # the unmutated token is valid, so the comparison means something


def _raw_signature(key, alg: str, signing_input: bytes) -> bytes:
    """A valid JOSE signature over ``signing_input`` (PyJWT's algorithm objects, not ours)."""
    algorithm = jwt.get_algorithm_by_name(alg)
    return algorithm.sign(signing_input, key)


@settings(max_examples=300, deadline=None)
@given(token=st.text(max_size=120) | st.lists(st.text(alphabet="AB-_=.+/ e", max_size=12), max_size=4).map(".".join))
def test_garbage_raises_only_jws_error(keys, token):
    for alg in ("ES256", "RS256"):
        with pytest.raises(JwsError):
            jws.verify(token, keys[alg].public_key(), alg)
    try:
        jws.parse(token)
    except JwsError:
        pass

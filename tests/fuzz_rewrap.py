"""Fuzzing material shared by tests/test_fuzz_parsers.py (in process) and tests/test_fuzz_http.py (over HTTP).

* :func:`fuzz_settings`: hypothesis settings; ``KAS_RAY_FUZZ_EXAMPLES`` replaces every CI bound (``make fuzz``).
* :class:`RewrapMaterial`: a genuine rewrap request for one nation (RSA and EC key access objects under a
  policy the user passes), the client keys it may name, and a dictionary of values worth trying.
* :func:`mutated`: a hypothesis strategy that edits any node of a JSON document (delete, retype, replace by
  a dictionary value or random JSON, cut, flip or grow a string, repeat a list item).
* :func:`check_release`: the oracle for any answer to a mutated request: a key comes back only for a key
  access object whose wrapped key and policy binding are genuine, and only wrapped to the client key the
  request names (the test holds every private key it lets a request name).
"""

from __future__ import annotations

import base64
import copy
import datetime
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa, x25519
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from kas_ray.errors import KasRayError
from kas_ray.hazmat import primitives as P
from kas_ray.policy import attribute_fqn
from kas_ray.ztdf import KasKey, KeyAccessObject, Policy, verify_binding, wrap_share
from kas_ray.ztdf._wire import b64decode_strict

#: ``make fuzz`` sets it (thousands); unset, each test runs its own small CI bound.
SCALE = int(os.environ.get("KAS_RAY_FUZZ_EXAMPLES", "0")) or None


def fuzz_settings(ci_examples: int) -> settings:
    """``ci_examples`` in CI, ``KAS_RAY_FUZZ_EXAMPLES`` in a long run; time is bounded by the tests, not by
    hypothesis' deadline (a shared 2-core runner makes per-example deadlines flaky)."""
    return settings(max_examples=SCALE or ci_examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


# --- keys a mutation may put where a PEM belongs ------------------------------------------------------
def pem(key: Any) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _certificate_pem(key: ec.EllipticCurvePrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _spki_pem(der: bytes) -> str:
    return "-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(der).decode() + "\n-----END PUBLIC KEY-----\n"


@cache
def _client_keys() -> tuple[list[str], dict[str, P.PrivateKey]]:
    p256 = ec.generate_private_key(ec.SECP256R1())
    keys: list[P.PrivateKey] = [p256, ec.generate_private_key(ec.SECP384R1()),
                                rsa.generate_private_key(public_exponent=65537, key_size=2048)]
    pems = [pem(k.public_key()) for k in keys] + [_certificate_pem(p256)]  # a certificate PEM names its key
    return pems, {P.public_key_fingerprint(k.public_key()): k for k in keys}


def client_pems() -> list[str]:
    """Every client key PEM (SPKI or certificate) a fuzzed request may legitimately name."""
    return _client_keys()[0]


def client_private_key(pem_text: Any) -> P.PrivateKey | None:
    """The private key of the client key a request names, if the test holds it (whatever the PEM's layout)."""
    try:
        key = P.load_public_key_pem(pem_text) if isinstance(pem_text, str) else None
    except (ValueError, UnsupportedAlgorithm):
        return None
    return _client_keys()[1].get(P.public_key_fingerprint(key)) if key is not None else None


#: An SPKI whose algorithm (OID 1.2.3.4) cryptography does not know.
UNKNOWN_ALGORITHM_PEM = _spki_pem(bytes.fromhex("300c300506032a03040303000102"))


@cache
def odd_pems() -> list[str]:
    """PEMs no request may be answered with: weak, foreign-curve, non-RSA/EC, unknown-algorithm, broken."""
    truncated = pem(ec.generate_private_key(ec.SECP256R1()).public_key())
    return [
        pem(rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()),
        pem(ec.generate_private_key(ec.SECP256K1()).public_key()),
        pem(ec.generate_private_key(ec.BrainpoolP256R1()).public_key()),
        pem(ed25519.Ed25519PrivateKey.generate().public_key()),
        pem(x25519.X25519PrivateKey.generate().public_key()),
        pem(dsa.generate_private_key(key_size=1024).public_key()),
        UNKNOWN_ALGORITHM_PEM,
        _spki_pem(b"\x30\x03\x02\x01\x00"),
        truncated[: len(truncated) // 2],
        truncated.replace("PUBLIC KEY", "CERTIFICATE"),
        "-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n",
    ]


# --- the genuine request -----------------------------------------------------------------------------------
@dataclass
class RewrapMaterial:
    """A genuine rewrap for the KAS at ``url``: one KAO per key in ``kas_keys``, under a policy ``admits``."""

    url: str
    kas_keys: list[KasKey]
    policy: Policy
    kaos: list[KeyAccessObject] = field(default_factory=list)
    #: Raw wrapped key -> the share it wraps (a released key must be one of these shares).
    shares: dict[bytes, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kas in self.kas_keys:
            share = os.urandom(32)
            kao = wrap_share(kas, share, self.policy_b64)
            self.kaos.append(kao)
            self.shares[b64decode_strict(kao.wrapped_key)] = share

    @classmethod
    def create(cls, url: str, kas_keys: list[KasKey], nation: str) -> RewrapMaterial:
        """KAOs for ``kas_keys`` under SECRET, releasable to ``nation`` (a SECRET user of it passes ABAC)."""
        from kas_ray.config import AbacConfig

        config = AbacConfig()
        attrs = [attribute_fqn(config, "classification", "SECRET"), attribute_fqn(config, "releasable-to", nation)]
        return cls(url, kas_keys, Policy.create(attrs))

    @property
    def policy_b64(self) -> str:
        return self.policy.to_base64()

    @property
    def client_pem(self) -> str:
        return client_pems()[0]

    def v2(self) -> dict[str, Any]:
        items = [{"keyAccessObjectId": f"kao-{i}", "keyAccessObject": kao.to_wire()} for i, kao in enumerate(self.kaos)]
        request = {"policy": {"id": "policy-0", "body": self.policy_b64}, "algorithm": "rsa:2048",
                   "keyAccessObjects": items}
        return {"clientPublicKey": self.client_pem, "requests": [request]}

    def v1(self, kao: KeyAccessObject) -> dict[str, Any]:
        return {"clientPublicKey": self.client_pem, "keyAccess": kao.to_wire(), "policy": self.policy_b64,
                "algorithm": "rsa:2048"}

    def dictionary(self) -> list[Any]:
        """Values a mutation may drop anywhere: the request's own pieces swapped around, and edge cases."""
        wrapped = [kao.wrapped_key for kao in self.kaos]
        url = self.url.rstrip("/")
        values: list[Any] = [
            *wrapped, *(w.replace("+", "-").replace("/", "_").rstrip("=") for w in wrapped),
            *(kao.to_wire() for kao in self.kaos), *(kao.policy_binding.hash for kao in self.kaos),
            *(k.kid for k in self.kas_keys), "usa-r2048-v999", "wrapped", "ec-wrapped", "remote",
            url, url + "/kas", url + "/", url.rsplit("/", 1)[0] + "/fra", "http://attacker.example/usa",
            self.policy_b64, Policy.create([]).to_base64(), base64.b64encode(b"{}").decode(),
            *client_pems(), *odd_pems(), "HS256", "hs256", "none",
            "", " ", "\x00", "\ud800", "é" * 3, "A" * 70_000, 0, -1, 2**63, 1e308, True, None, [], {},
        ]
        return values


# --- mutation --------------------------------------------------------------------------------------------
Path = tuple[Any, ...]


def _paths(value: Any, prefix: Path = ()) -> Iterator[Path]:
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*prefix, index))


def _get(value: Any, path: Path) -> Any:
    for step in path:
        value = value[step]
    return value


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def string_edit(draw: st.DrawFn, text: str) -> str:
    """``text`` cut, with a character replaced or inserted, repeated, case-swapped or padded."""
    kind = draw(st.sampled_from(["cut", "flip", "insert", "repeat", "case", "pad"]))
    at = draw(st.integers(0, len(text)))
    if kind == "cut":
        return text[:at]
    if kind == "flip" and text:
        at = min(at, len(text) - 1)
        return text[:at] + draw(st.characters(codec="utf-8")) + text[at + 1:]
    if kind == "insert":
        return text[:at] + draw(st.text(max_size=8)) + text[at:]
    if kind == "repeat":
        return text * draw(st.integers(2, 4))
    if kind == "case":
        return text.swapcase()
    return draw(st.sampled_from([" ", "\n", "=", "=="])) + text + draw(st.sampled_from(["", " ", "=", "\n"]))


@st.composite
def _edit(draw: st.DrawFn, doc: Any, dictionary: list[Any]) -> Any:
    path = draw(st.sampled_from(list(_paths(doc))))
    node = _get(doc, path)
    ops = ["json", "dictionary"]
    if path:
        ops.append("delete")
    if isinstance(node, str):
        ops += ["string"] * 3
    if isinstance(node, dict):
        ops.append("add")
    if isinstance(node, list) and node:
        ops += ["repeat"]
    op = draw(st.sampled_from(ops))
    if op == "delete":
        parent = _get(doc, path[:-1])
        del parent[path[-1]]
        return doc
    if op == "add":
        node[draw(st.text(max_size=12) | st.sampled_from(["signedRequestToken", "kid", "requests"]))] = copy.deepcopy(
            draw(json_values | st.sampled_from(dictionary)))
        return doc
    if op == "repeat":  # up to past the per-request KAO limit
        node.extend(copy.deepcopy(node[draw(st.integers(0, len(node) - 1))]) for _ in range(draw(st.sampled_from(
            [1, 2, 70]))))
        return doc
    new = (draw(string_edit(node)) if op == "string" else
           draw(st.sampled_from(dictionary)) if op == "dictionary" else draw(json_values))
    if not path:
        return copy.deepcopy(new)
    _get(doc, path[:-1])[path[-1]] = copy.deepcopy(new)
    return doc


@st.composite
def mutated(draw: st.DrawFn, doc: Any, dictionary: list[Any], max_edits: int = 3) -> Any:
    """``doc`` after 0..``max_edits`` edits (0 keeps it genuine, so permits are exercised and checked too)."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(0, max_edits))):
        doc = draw(_edit(doc, dictionary))
    return doc


@st.composite
def rewrap_bodies(draw: st.DrawFn, material: RewrapMaterial) -> Any:
    """A genuine v2 or v1 rewrap body of ``material``, mutated."""
    base = draw(st.sampled_from(["v2", *range(len(material.kaos))]))
    body = material.v2() if base == "v2" else material.v1(material.kaos[base])
    return draw(mutated(body, material.dictionary()))


# --- the oracle --------------------------------------------------------------------------------------------
def open_share(private: P.PrivateKey, wrapped_b64: str, session_pem: str | None) -> bytes:
    """What the client recovers from a released key: RSA-OAEP-SHA1, or ECDH with the session key."""
    wrapped = base64.b64decode(wrapped_b64)
    if isinstance(private, rsa.RSAPrivateKey):
        return P.rsa_oaep_decrypt(private, wrapped, "sha1")
    assert session_pem is not None, "an EC release without a sessionPublicKey"
    session = P.load_public_key_pem(session_pem)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(session, ec.EllipticCurvePublicKey)
    return P.ec_unwrap(private, session, wrapped)


def _releases(wire: dict[str, Any]) -> list[tuple[str | None, str, str | None]]:
    """(KAO id or None for v1, released key, session key) of every permit; no key outside a permit."""
    out: list[tuple[str | None, str, str | None]] = []
    if wire.get("entityWrappedKey"):
        out.append((None, wire["entityWrappedKey"], wire.get("sessionPublicKey")))
    for policy in wire.get("responses") or []:
        for result in policy["results"]:
            if result["status"] != "permit":
                assert not result.get("kasWrappedKey"), result
                continue
            session = (result.get("metadata") or {}).get("sessionPublicKey") or wire.get("sessionPublicKey")
            out.append((result["keyAccessObjectId"], result["kasWrappedKey"], session))
    return out


def _candidates(body: dict[str, Any], kao_id: str | None) -> Iterator[tuple[Any, Any]]:
    """(KAO, policy body) pairs of the request that a release with this id may answer."""
    if kao_id is None or not body.get("requests"):
        yield body.get("keyAccess"), body.get("policy")
    for request in body.get("requests") or []:
        for item in request.get("keyAccessObjects") or []:
            if isinstance(item, dict) and item.get("keyAccessObjectId") == kao_id:
                yield item.get("keyAccessObject"), (request.get("policy") or {}).get("body")


def _genuine_share(material: RewrapMaterial, kao: Any, policy_b64: Any) -> bytes | None:
    """The share of a KAO whose wrapped key is one of ours and whose binding verifies for this policy."""
    try:
        parsed = KeyAccessObject.model_validate(kao)
        share = material.shares.get(b64decode_strict(parsed.wrapped_key))
        if share is None or not isinstance(policy_b64, str):
            return None
        verify_binding(share, policy_b64, parsed.policy_binding)
        return share
    except (ValueError, KasRayError):
        return None


def check_release(material: RewrapMaterial, body: Any, wire: dict[str, Any]) -> int:
    """Assert every key in ``wire`` (the answer to ``body``) is a legitimate release; return how many."""
    releases = _releases(wire)
    for kao_id, wrapped, session in releases:
        assert isinstance(body, dict), f"a key released for a non-object body {body!r:.200}"
        private = client_private_key(body.get("clientPublicKey"))
        assert private is not None, f"a key released to a client key the test does not hold: {body!r:.300}"
        share = open_share(private, wrapped, session)
        genuine = {_genuine_share(material, kao, pol) for kao, pol in _candidates(body, kao_id)} - {None}
        assert share in genuine, f"released share matches no genuine KAO {kao_id!r} of {body!r:.500}"
    return len(releases)


def jws(key: P.PrivateKey, alg: str, header: Any, payload: Any) -> str:
    """A compact JWS with a valid ``alg`` signature over any JSON header and payload (PyJWT would refuse many)."""
    def b64url(value: Any) -> str:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing_input = f"{b64url(header)}.{b64url(payload)}"
    return f"{signing_input}.{b64url(jwt.get_algorithm_by_name(alg).sign(signing_input.encode(), key))}"


def timed(fn: Callable[[], Any], budget: float) -> Any:
    """``fn()``, asserting it returned (or raised) within ``budget`` seconds: no parser may hang."""
    started = time.perf_counter()
    try:
        return fn()
    finally:
        elapsed = time.perf_counter() - started
        assert elapsed < budget, f"took {elapsed:.2f}s (budget {budget}s)"

"""Signed forwarding between nation KAS.

A forward is ``{"envelope": JWS, "body": JSON text}``: the JWS (ES256, by the forwarder's federation
key) covers the SHA-256 of the exact body text, origin and target, the hop chain, expiry and a nonce.
A peer result is ``{"result": JWS, "body": JSON text}`` signed by the peer, naming the nonce it answers.
Either side verifies against the keys in its own KAS registry; nothing in a message picks the key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kas_ray.errors import KasRayError
from kas_ray.hazmat import jws
from kas_ray.hazmat.jws import JwsSignatureError
from kas_ray.trust.jwks import public_jwk, public_key_from_jwk
from kas_ray.trust.tokens import peek_jws

FORWARD_TYP = "kas-forward+jwt"
RESULT_TYP = "kas-result+jwt"
_ALG = "ES256"
MAX_MESSAGE_CHARS = 1024 * 1024


class ForwardError(KasRayError):
    """A forward or a peer result failed verification."""

    code = "invalid_forward"
    http_status = 401


def _digest(text: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()


class FederationKey:
    """A nation's federation signing key (EC P-256), created on first use in the state directory."""

    def __init__(self, path: str | os.PathLike[str], nation: str) -> None:
        self.nation = nation.upper()
        self.path = Path(path)
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            tmp = self.path.with_suffix(f".{secrets.token_hex(4)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
            try:
                os.link(tmp, self.path)  # first writer wins; others load its key
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        key = serialization.load_pem_private_key(self.path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KasRayError(f"federation key {self.path} is not an EC key")
        self._key = key
        jwk_path = self.path.with_suffix(".jwk.json")
        self.public_jwk = {**public_jwk(key.public_key()), "kid": self.nation, "use": "sig", "alg": _ALG}
        if not jwk_path.exists():
            jwk_path.write_text(json.dumps(self.public_jwk))

    @staticmethod
    def default_path(state_dir: str | os.PathLike[str], nation: str) -> Path:
        return Path(state_dir) / "federation" / f"{nation.lower()}.key.pem"

    def sign(self, claims: dict[str, Any], typ: str) -> str:
        return jws.sign(claims, self._key, _ALG, {"typ": typ, "kid": self.nation})


class ForwardClaims(BaseModel):
    model_config = ConfigDict(frozen=True)

    iss: str  # the forwarder (last hop)
    aud: str  # the target nation
    jti: str
    iat: float
    exp: float
    hops: list[str] = Field(min_length=1)
    body_sha256: str
    deadline: float


class ResultClaims(BaseModel):
    model_config = ConfigDict(frozen=True)

    iss: str
    aud: str
    in_reply_to: str
    iat: float
    exp: float
    body_sha256: str


_C = TypeVar("_C", ForwardClaims, ResultClaims)


def _verify(token: str, keys: Mapping[str, dict[str, str]], typ: str, audience: str, now: float) -> dict[str, Any]:
    if not isinstance(token, str) or len(token) > MAX_MESSAGE_CHARS:
        raise ForwardError("signature is missing or too large")
    try:  # read to pick the signer's key; jws.verify below checks the whole JWS
        header, unverified = peek_jws(token, ForwardError, "signature", MAX_MESSAGE_CHARS)
    except ForwardError:
        raise ForwardError("signature is not a well-formed JWS") from None
    if header.get("typ") != typ or header.get("alg") != _ALG:
        raise ForwardError(f"unexpected signature type or algorithm (want {typ}, {_ALG})")
    issuer = unverified.get("iss")
    jwk = keys.get(issuer) if isinstance(issuer, str) else None
    if jwk is None:
        raise ForwardError(f"signer {str(issuer)[:32]!r} is not in the KAS registry")
    try:
        claims = jws.verify(token, public_key_from_jwk(jwk), _ALG)[1]
    except JwsSignatureError:
        raise ForwardError("signature does not verify: InvalidSignature") from None
    except ValueError as exc:  # JwsError, or a registry JWK that is not a usable key
        raise ForwardError(f"signature does not verify: {exc}") from None
    missing = [name for name in ("iss", "aud", "exp", "iat") if claims.get(name) is None]
    if missing:
        raise ForwardError(f"signature does not verify: MissingClaim {missing[0]!r}")
    if claims["aud"] != audience:
        raise ForwardError(f"signature does not verify: InvalidAudience (not for {audience})")
    try:
        expires, issued = float(claims["exp"]), float(claims["iat"])
    except (TypeError, ValueError):
        raise ForwardError("message times are not numbers") from None
    if not expires >= now:  # also refuses NaN
        raise ForwardError("message expired")
    if not issued <= now + 30:
        raise ForwardError("message issued in the future")
    return claims


def _claims(model: type[_C], claims: dict[str, Any]) -> _C:
    try:
        return model.model_validate(claims)
    except ValidationError:
        raise ForwardError("signed claims are malformed") from None


def sign_forward(key: FederationKey, target: str, body: str, *, hops: list[str], ttl: float, deadline: float,
                 now: float | None = None) -> dict[str, str]:
    now = time.time() if now is None else now
    claims = {"iss": key.nation, "aud": target.upper(), "jti": secrets.token_urlsafe(18), "iat": now,
              "exp": now + ttl, "hops": [*hops, key.nation], "body_sha256": _digest(body), "deadline": deadline}
    return {"envelope": key.sign(claims, FORWARD_TYP), "body": body}


def verify_forward(
    message: Mapping[str, Any], *, me: str, keys: Mapping[str, dict[str, str]], hop_limit: int,
    seen: Callable[[str, float], bool], now: float | None = None,
) -> tuple[ForwardClaims, dict[str, Any]]:
    """Check a forward addressed to ``me``; ``seen(nonce, ttl)`` is True the first time (replay store)."""
    now = time.time() if now is None else now
    body = message.get("body") if isinstance(message, Mapping) else None
    if not isinstance(body, str) or len(body) > MAX_MESSAGE_CHARS:
        raise ForwardError("forward body is missing or too large")
    claims = _claims(ForwardClaims, _verify(message.get("envelope"), keys, FORWARD_TYP, me.upper(), now))
    if claims.body_sha256 != _digest(body):
        raise ForwardError("forward body does not match its signature")
    if claims.hops[-1] != claims.iss:
        raise ForwardError("hop chain does not end with the forwarder")
    if len(claims.hops) > hop_limit:
        raise ForwardError(f"hop limit exceeded ({len(claims.hops)} > {hop_limit})")
    if me.upper() in claims.hops or len(set(claims.hops)) != len(claims.hops):
        raise ForwardError("forwarding loop detected")
    if not seen(f"forward:{claims.iss}:{claims.jti}", max(claims.exp - now, 1.0)):
        raise ForwardError("forward nonce was already used (replay)")
    try:
        parsed = json.loads(body)
    except ValueError:
        raise ForwardError("forward body is not JSON") from None
    if not isinstance(parsed, dict):
        raise ForwardError("forward body must be a JSON object")
    return claims, parsed


def sign_result(key: FederationKey, forward: ForwardClaims, body: str, *, ttl: float = 60.0,
                now: float | None = None) -> dict[str, str]:
    now = time.time() if now is None else now
    claims = {"iss": key.nation, "aud": forward.iss, "in_reply_to": forward.jti, "iat": now, "exp": now + ttl,
              "body_sha256": _digest(body)}
    return {"result": key.sign(claims, RESULT_TYP), "body": body}


def verify_result(message: Mapping[str, Any], *, me: str, peer: str, nonce: str,
                  keys: Mapping[str, dict[str, str]], now: float | None = None) -> dict[str, Any]:
    """Check a peer's answer to our forward ``nonce``; returns the parsed result body."""
    now = time.time() if now is None else now
    body = message.get("body") if isinstance(message, Mapping) else None
    if not isinstance(body, str) or len(body) > MAX_MESSAGE_CHARS:
        raise ForwardError("peer result body is missing or too large")
    claims = _claims(ResultClaims, _verify(message.get("result"), keys, RESULT_TYP, me.upper(), now))
    if claims.iss != peer.upper():
        raise ForwardError(f"result signed by {claims.iss}, not by the peer {peer.upper()}")
    if claims.in_reply_to != nonce:
        raise ForwardError("result answers another forward")
    if claims.body_sha256 != _digest(body):
        raise ForwardError("peer result was altered")
    try:
        parsed = json.loads(body)
    except ValueError:
        raise ForwardError("peer result body is not JSON") from None
    if not isinstance(parsed, dict):
        raise ForwardError("peer result body must be a JSON object")
    return parsed


def forward_nonce(message: Mapping[str, str]) -> str:
    """The nonce of a forward we signed (read back without verification: it is our own)."""
    return str(peek_jws(message["envelope"], ForwardError, "forward", MAX_MESSAGE_CHARS)[1]["jti"])

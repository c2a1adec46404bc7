"""Compact JWS (RFC 7515): strict parsing and signature verification, asymmetric algorithms only.

Why not PyJWT on the rewrap path: it decodes every segment with a per-character Python loop and
re-derives the key for every call, which was ~15 % of a replica's CPU per rewrap (each request
carries a DPoP proof and a signed request; a forwarded one also a federation envelope). The rules
here are PyJWT 2.x's, and ``tests/test_hazmat_jws.py`` fuzzes both against each other:

* exactly three segments; each strict base64url (URL-safe alphabet, at most two ``=`` and only on a
  length that is a multiple of 4, canonical last character);
* header and payload are JSON objects; a ``kid`` header must be a string;
* the header ``alg`` must be the one the caller expects, and the key must fit it (RSA for RS/PS,
  the matching curve for ES): no algorithm confusion, no ``none``, no HMAC;
* ES signatures are raw ``r || s`` of exactly twice the curve's byte length (RFC 7518 §3.4).

Claims are not checked here (times, audience, issuer): callers do that with their own clock.
Errors are :class:`JwsError` (malformed, wrong alg or key) and :class:`JwsSignatureError`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

__all__ = ["JwsError", "JwsSignatureError", "b64url_decode", "b64url_encode", "parse", "sign", "verify"]

_B64URL = re.compile(rb"[A-Za-z0-9_-]*")
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_CURVES: dict[str, type[ec.EllipticCurve]] = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}


class JwsError(ValueError):
    """The JWS is malformed, or its algorithm or key is not the expected one."""


class JwsSignatureError(JwsError):
    """The signature does not verify with the given key."""


def b64url_decode(segment: bytes) -> bytes:
    """One JWS segment under PyJWT's strict base64url rules; :class:`JwsError` otherwise.

    One regex and the C decoder instead of a Python loop over every character.
    """
    stripped = segment.rstrip(b"=")
    padding_chars = len(segment) - len(stripped)
    if padding_chars > 2 or (padding_chars and len(segment) % 4) or len(stripped) % 4 == 1 \
            or not _B64URL.fullmatch(stripped):
        raise JwsError("invalid base64url segment")
    try:
        decoded = base64.urlsafe_b64decode(stripped + b"=" * (-len(stripped) % 4))
    except binascii.Error:
        raise JwsError("invalid base64url segment") from None
    if base64.urlsafe_b64encode(decoded).rstrip(b"=") != stripped:
        raise JwsError("non-canonical base64url segment")
    return decoded


def b64url_encode(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _hash_of(alg: str) -> type[hashes.HashAlgorithm]:
    digest = _HASHES.get(alg[2:]) if isinstance(alg, str) and len(alg) == 5 else None
    if digest is None or alg[:2] not in ("RS", "PS", "ES"):
        raise JwsError(f"algorithm {str(alg)[:20]!r} is not supported")
    return digest


def _padding(alg: str, digest: type[hashes.HashAlgorithm]) -> padding.AsymmetricPadding:
    if alg[:2] == "RS":
        return padding.PKCS1v15()
    return padding.PSS(mgf=padding.MGF1(digest()), salt_length=digest().digest_size)


def _curve_size(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey, alg: str) -> int:
    if not isinstance(key.curve, _CURVES[alg]):
        raise JwsError(f"{alg} needs an EC key on {_CURVES[alg].name}")
    return (key.curve.key_size + 7) // 8


def sign(claims: dict[str, Any], key: object, alg: str, header: dict[str, Any] | None = None) -> str:
    """A compact JWS of ``claims`` signed with a private key under ``alg`` (RS*, PS*, ES*)."""
    digest = _hash_of(alg)
    head = b64url_encode(json.dumps({**(header or {}), "alg": alg}, separators=(",", ":")).encode())
    body = b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = head + b"." + body
    if alg[:2] == "ES":
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise JwsError(f"{alg} needs an EC private key")
        size = _curve_size(key, alg)
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(digest())))
        signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    elif isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(signing_input, _padding(alg, digest), digest())
    else:
        raise JwsError(f"{alg} needs an RSA private key")
    return (signing_input + b"." + b64url_encode(signature)).decode("ascii")


def _segments(token: str) -> list[bytes]:
    if not isinstance(token, str):
        raise JwsError("not a string")
    try:
        parts = token.encode("utf-8").split(b".")
    except UnicodeError:
        raise JwsError("not UTF-8") from None
    if len(parts) != 3:
        raise JwsError("not three segments")
    return parts


def _json_object(segment: bytes, name: str) -> dict[str, Any]:
    try:
        value = json.loads(b64url_decode(segment))
    except (ValueError, RecursionError):  # JwsError is a ValueError too
        raise JwsError(f"{name} is not base64url JSON") from None
    if not isinstance(value, dict):
        raise JwsError(f"{name} is not a JSON object")
    return value


def parse(token: str, *, claims: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims (``{}`` if ``claims`` is false) of a compact JWS; the signature is not checked.

    Only to choose how to verify a token (issuer, ``kid``, ``alg``) or for a token whose signature
    cannot mean anything. Every segment must be well-formed, as :func:`verify` requires.
    """
    parts = _segments(token)
    header = _json_object(parts[0], "header")
    payload = _json_object(parts[1], "payload") if claims else {}
    b64url_decode(parts[2])
    return header, payload


def verify(token: str, key: object, alg: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a compact JWS whose signature verifies with ``key`` under ``alg``."""
    parts = _segments(token)
    header = _json_object(parts[0], "header")
    if header.get("alg") != alg:
        raise JwsError(f"header 'alg' is not {alg}")
    if "kid" in header and not isinstance(header["kid"], str):
        raise JwsError("header 'kid' must be a string")
    claims = _json_object(parts[1], "payload")
    signature = b64url_decode(parts[2])
    _verify_signature(key, alg, parts[0] + b"." + parts[1], signature)
    return header, claims


def _verify_signature(key: object, alg: str, signing_input: bytes, signature: bytes) -> None:
    """Check a JWS signature (RS*, PS*, ES*); JwsSignatureError if it does not verify."""
    digest = _hash_of(alg)
    try:
        if alg[:2] == "ES":
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise JwsError(f"{alg} needs an EC public key")
            size = _curve_size(key, alg)
            if len(signature) != 2 * size:
                raise JwsSignatureError("signature has the wrong length")
            der = encode_dss_signature(int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big"))
            key.verify(der, signing_input, ec.ECDSA(digest()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signing_input, _padding(alg, digest), digest())
        else:
            raise JwsError(f"{alg} needs an RSA public key")
    except InvalidSignature:
        raise JwsSignatureError("signature does not verify") from None

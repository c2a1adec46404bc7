"""DPoP (RFC 9449): proof-of-possession of the key a token is bound to.

A bearer token alone lets whoever steals it unwrap keys; a DPoP proof is a fresh JWT signed by the
client's private key over this exact request (method, URL, access token hash, one-time ``jti``),
and a token carrying ``cnf.jkt`` is only honoured with a proof from that key. The client helpers
(:func:`make_dpop_proof`, :func:`jwk_thumbprint`) live here too so both sides share one definition.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jwt
from pydantic import BaseModel, ConfigDict

from kas_ray.config import DPoPConfig
from kas_ray.errors import DPoPError, ReplayError
from kas_ray.trust.jwks import (
    PrivateKey,
    b64url,
    check_key_for_alg,
    default_alg,
    public_jwk,
    public_key_from_jwk,
)
from kas_ray.trust.replay import ReplayStore
from kas_ray.trust.tokens import numeric_date, peek_header, verified_payload

DPOP_TYP = "dpop+jwt"
#: A proof is a small JWT with one public key; anything bigger is abuse.
MAX_PROOF_CHARS = 8_192
MAX_JTI_CHARS = 256
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Members of each key type that enter the RFC 7638 thumbprint, in lexicographic order.
_THUMBPRINT_MEMBERS = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "oct": ("k", "kty"),
}


class DPoPProof(BaseModel):
    """A verified proof: the client's public key, its thumbprint and the claims it signed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    jwk: dict[str, Any]
    jkt: str
    jti: str
    htm: str
    htu: str
    iat: float


# --- helpers shared by client and server ----------------------------------------------------------
def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint (base64url) over the required members of the JWK."""
    kty = jwk.get("kty")
    members = _THUMBPRINT_MEMBERS.get(kty) if isinstance(kty, str) else None  # a JSON object is unhashable
    if members is None:
        raise ValueError(f"cannot take the thumbprint of a JWK with kty {jwk.get('kty')!r}")
    if not all(isinstance(jwk.get(name), str) for name in members):
        raise ValueError(f"a {jwk['kty']} JWK needs string members {list(members)}")
    canonical = json.dumps({name: jwk[name] for name in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def jwk_has_thumbprint(jwk: object, jkt: str) -> bool:
    """Whether ``jwk`` is a JWK whose RFC 7638 thumbprint is ``jkt`` (constant time; False for a non-JWK)."""
    try:
        return isinstance(jwk, dict) and hmac.compare_digest(jwk_thumbprint(jwk).encode(), jkt.encode())
    except ValueError:  # not a JWK we can take the thumbprint of
        return False


def access_token_hash(access_token: str) -> str:
    """The ``ath`` claim: base64url(SHA-256(ASCII access token)), unpadded.

    Encoded as UTF-8 (identical for the ASCII tokens RFC 9449 expects) so odd input cannot raise.
    """
    return b64url(hashlib.sha256(access_token.encode("utf-8")).digest())


def normalize_htu(url: str) -> str:
    """``scheme://host[:port]/path`` for comparison: case-folded scheme/host, default port,
    no query or fragment (RFC 9449 section 4.3). ``ValueError`` for anything but an http(s) URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("not an http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("URL carries user info")
    host = parts.hostname  # lower-cased, brackets of an IPv6 literal removed
    if not host:
        raise ValueError("URL has no host")
    port = parts.port  # ValueError for a non-numeric or out-of-range port
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc = f"{netloc}:{port}"
    return urlunsplit((scheme, netloc, parts.path or "/", "", ""))


# --- server side ----------------------------------------------------------------------------------
def _check_proof(
    proof: str,
    *,
    method: str,
    url: str,
    access_token: str,
    config: DPoPConfig,
    expected_jkt: str | None,
    now: float,
) -> DPoPProof:
    """Every check of a proof except the replay check, which needs the (sync or async) store."""
    header = peek_header(proof, DPoPError, "DPoP proof", MAX_PROOF_CHARS)  # verified_payload parses it all
    if header.get("typ") != DPOP_TYP:
        raise DPoPError(f"DPoP proof header 'typ' must be {DPOP_TYP!r}")
    alg = header.get("alg")
    if alg not in config.algorithms:
        raise DPoPError(f"DPoP proof header 'alg' {str(alg)[:20]!r} is not allowed (use {config.algorithms})")
    jwk = header.get("jwk")
    if not isinstance(jwk, dict):
        raise DPoPError("DPoP proof header 'jwk' is missing or not an object")
    try:
        key = public_key_from_jwk(jwk)
        check_key_for_alg(key, alg)
        jkt = jwk_thumbprint(jwk)
    except ValueError as exc:
        raise DPoPError(f"DPoP proof header 'jwk' is unusable: {exc}") from None
    claims = verified_payload(proof, key, alg, DPoPError, "DPoP proof", "its header 'jwk'")

    htm = claims.get("htm")
    if not isinstance(htm, str) or htm != method:
        raise DPoPError("DPoP proof claim 'htm' does not match the request method")
    htu = claims.get("htu")
    if not isinstance(htu, str) or not _same_target(htu, url):
        raise DPoPError("DPoP proof claim 'htu' does not match the request URL")
    iat = numeric_date(claims, "iat", DPoPError, required=True)
    if iat < now - config.max_age_seconds:
        raise DPoPError(f"DPoP proof claim 'iat' is older than {config.max_age_seconds} seconds")
    if iat > now + config.max_age_seconds:
        raise DPoPError("DPoP proof claim 'iat' is in the future")
    ath = claims.get("ath")
    if not isinstance(ath, str) or not ath:
        raise DPoPError("DPoP proof claim 'ath' is missing")
    if not hmac.compare_digest(ath.encode(), access_token_hash(access_token).encode()):
        raise DPoPError("DPoP proof claim 'ath' does not match the access token")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti:
        raise DPoPError("DPoP proof claim 'jti' is missing")
    if len(jti) > MAX_JTI_CHARS:
        raise DPoPError(f"DPoP proof claim 'jti' is longer than {MAX_JTI_CHARS} characters")
    if expected_jkt is not None and not hmac.compare_digest(jkt.encode(), expected_jkt.encode()):
        raise DPoPError("DPoP proof key thumbprint does not match the token's 'cnf.jkt'")
    # Exactly the members the thumbprint covers: a clean public JWK, free of sender extras.
    public = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    return DPoPProof(jwk=public, jkt=jkt, jti=jti, htm=htm, htu=htu, iat=iat)


def _same_target(htu: str, url: str) -> bool:
    try:
        return normalize_htu(htu) == normalize_htu(url)
    except ValueError:
        return False


def _replay_key(proof: DPoPProof) -> str:
    return f"dpop:{proof.jkt}:{proof.jti}"


def verify_dpop(
    proof: str,
    *,
    method: str,
    url: str,
    access_token: str,
    config: DPoPConfig,
    replay: ReplayStore,
    expected_jkt: str | None,
    clock: Callable[[], float] = time.time,
) -> DPoPProof:
    """Verify a DPoP proof for this request; DPoPError naming the failed field, ReplayError on reuse.

    ``url`` is the request URL as the client addressed it (scheme, host, port, path); the query and
    fragment are ignored. ``expected_jkt`` is the access token's ``cnf.jkt`` when it has one.
    The ``jti`` is recorded only once every other check passed, so a bad proof burns nothing.
    """
    checked = _check_proof(
        proof,
        method=method,
        url=url,
        access_token=access_token,
        config=config,
        expected_jkt=expected_jkt,
        now=clock(),
    )
    if not replay.check_and_store(_replay_key(checked), 2 * config.max_age_seconds):
        raise ReplayError("DPoP proof 'jti' was already used")
    return checked


async def averify_dpop(
    proof: str,
    *,
    method: str,
    url: str,
    access_token: str,
    config: DPoPConfig,
    replay: ReplayStore,
    expected_jkt: str | None,
    clock: Callable[[], float] = time.time,
) -> DPoPProof:
    """:func:`verify_dpop` with the replay store's async twin (for a networked store)."""
    checked = _check_proof(
        proof,
        method=method,
        url=url,
        access_token=access_token,
        config=config,
        expected_jkt=expected_jkt,
        now=clock(),
    )
    if not await replay.acheck_and_store(_replay_key(checked), 2 * config.max_age_seconds):
        raise ReplayError("DPoP proof 'jti' was already used")
    return checked


# --- client side ----------------------------------------------------------------------------------
def make_dpop_proof(
    private_key: PrivateKey,
    method: str,
    url: str,
    access_token: str | None = None,
    nonce: str | None = None,
    *,
    alg: str | None = None,
    iat: float | None = None,
) -> str:
    """A fresh DPoP proof for one request (client side); ``alg`` defaults from the key type."""
    alg = alg or default_alg(private_key)
    check_key_for_alg(private_key.public_key(), alg)
    scheme, netloc, path, _query, _fragment = urlsplit(url)
    claims: dict[str, Any] = {
        "jti": secrets.token_urlsafe(18),
        "htm": method,
        "htu": urlunsplit((scheme, netloc, path, "", "")),
        "iat": int(time.time() if iat is None else iat),
    }
    if access_token is not None:
        claims["ath"] = access_token_hash(access_token)
    if nonce is not None:
        claims["nonce"] = nonce
    headers = {"typ": DPOP_TYP, "jwk": public_jwk(private_key)}
    return jwt.encode(claims, private_key, algorithm=alg, headers=headers)

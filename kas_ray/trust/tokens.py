"""Access-token verification against the trust registry.

Order matters: the issuer is found by exact ``iss`` and the header ``alg`` is checked against that
issuer's allowed list *before* any key is touched, so ``alg: none`` and HS256-with-the-public-key
tricks never reach a verifier. Claim times use the injected clock and the registry's bounded leeway.
Subject attributes are only *read* here: clearance normalisation and nation checks belong to ABAC,
which receives ``issuer_nations`` to decide whether the issuer may assert a nationality.
Error messages never contain the token.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, overload

import httpx
import jwt
from jwt.exceptions import (
    InvalidAudienceError,
    InvalidSignatureError,
    MissingRequiredClaimError,
    PyJWTError,
)
from pydantic import BaseModel, ConfigDict, Field

from kas_ray.config import IssuerConfig, TrustRegistry
from kas_ray.errors import KasRayError, TokenError, UntrustedIssuerError
from kas_ray.hazmat import jws
from kas_ray.hazmat.jws import JwsError, JwsSignatureError
from kas_ray.trust.jwks import JwksCache, SharedDocuments

#: Longest access token accepted; real ones are a few KiB, anything bigger is abuse.
MAX_TOKEN_CHARS = 16_384
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
#: 9999-12-31T23:59:59Z: later times cannot be represented as datetimes.
MAX_NUMERIC_DATE = 253_402_300_799
_SCHEMES = {"bearer": "Bearer", "dpop": "DPoP"}
#: JWS header parameters we do not implement; RFC 7515 says refuse rather than ignore them.
_UNSUPPORTED_HEADERS = frozenset({"crit", "b64", "zip"})


# --- shared helpers (also used by DPoP and signed-request checks) ---------------------------------
@overload
def numeric_date(
    claims: Mapping[str, Any], name: str, error: type[KasRayError], *, required: Literal[True]
) -> float: ...
@overload
def numeric_date(claims: Mapping[str, Any], name: str, error: type[KasRayError], *, required: bool) -> float | None: ...
def numeric_date(claims: Mapping[str, Any], name: str, error: type[KasRayError], *, required: bool) -> float | None:
    """A NumericDate claim as float; ``error`` when required and absent or not a plausible time."""
    value = claims.get(name)
    if value is None:
        if required:
            raise error(f"claim {name!r} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise error(f"claim {name!r} must be a number (seconds since the epoch)")
    if not 0 <= value <= MAX_NUMERIC_DATE:
        raise error(f"claim {name!r} is out of range")
    return float(value)


#: Bound of TokenVerifier's verified-token memory (distinct live tokens of one replica).
_VERIFIED_TOKENS_MAX = 10_000


def _peek(token: object, error: type[KasRayError], what: str, max_chars: int,
          payload: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    if not isinstance(token, str) or not token:
        raise error(f"no {what}")
    if len(token) > max_chars:
        raise error(f"{what} is longer than {max_chars} characters")
    try:
        header, claims = jws.parse(token, claims=payload)
    except JwsError:
        raise error(f"{what} is not a well-formed JWT") from None
    unsupported = sorted(_UNSUPPORTED_HEADERS & set(header))
    if unsupported:
        raise error(f"{what} uses unsupported header parameters {unsupported}")
    return header, claims


def peek_header(token: object, error: type[KasRayError], what: str, max_chars: int) -> dict[str, Any]:
    """The header of a compact JWS, read to choose how to verify it; see :func:`peek_jws`."""
    return _peek(token, error, what, max_chars, False)[0]


def peek_jws(token: object, error: type[KasRayError], what: str,
             max_chars: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a compact JWS, its signature not checked (:func:`kas_ray.hazmat.jws.parse`).

    To choose how to verify a token, or for one whose signature cannot mean anything. Every segment
    must be strict base64url, header and claims JSON objects, no unsupported header parameters;
    ``error`` otherwise (the message never contains the token).
    """
    return _peek(token, error, what, max_chars, True)


def verified_payload(
    token: str, key: Any, alg: str, error: type[KasRayError], what: str, key_name: str
) -> dict[str, Any]:
    """Claims of a JWS whose signature verifies with ``key`` under ``alg``; no claim is checked."""
    try:
        return jws.verify(token, key, alg)[1]
    except JwsSignatureError:
        raise error(f"{what} signature does not verify with {key_name}") from None
    except JwsError as exc:
        raise error(f"{what} rejected: {exc}") from None


def _show(value: object) -> str:
    """Short printable form of an attacker-controlled value for an error message."""
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


# --- Authorization header ------------------------------------------------------------------------
def parse_authorization(header_value: str | None) -> tuple[str, str]:
    """Split ``Authorization: Bearer|DPoP <token>``; returns the canonical scheme and the token."""
    if not header_value or not header_value.strip():
        raise TokenError("missing Authorization header")
    parts = header_value.strip().split(None, 1)
    scheme = _SCHEMES.get(parts[0].lower())
    if scheme is None:
        # The scheme is not echoed: a client that forgot it would see its token in the message.
        raise TokenError("unsupported authorization scheme (use Bearer or DPoP)")
    if len(parts) != 2 or not _TOKEN68.fullmatch(parts[1].strip()):
        raise TokenError(f"{scheme} authorization header has no well-formed token")
    return scheme, parts[1].strip()


# --- verified token ------------------------------------------------------------------------------
class VerifiedToken(BaseModel):
    """What the KAS knows about a caller once its token verified; subject attributes as asserted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    issuer: str
    subject: str
    #: The registry audience the token was accepted for.
    audience: str
    expiry: datetime
    #: Nations the issuer may assert (from the trust registry, not from the token).
    issuer_nations: list[str] = Field(min_length=1)
    #: Clearance table for ``clearance``: the issuer's ``clearance_system`` or its first nation.
    clearance_system: str
    clearance: str | None = None
    nationality: str | None = None
    coi: list[str] = Field(default_factory=list)
    #: JWK SHA-256 thumbprint the token is bound to (RFC 9449 ``cnf.jkt``); requires a DPoP proof.
    cnf_jkt: str | None = None
    claims: dict[str, Any] = Field(default_factory=dict, repr=False)

    def subject_attributes(self) -> dict[str, Any]:
        """Subject attributes keyed like ``AttributeDefinition.subject``."""
        return {"clearance": self.clearance, "nationality": self.nationality, "coi": list(self.coi)}


def _single_string(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if isinstance(value, list) and len(value) == 1:  # multi-valued IdP attributes with one value
        value = value[0]
    if value is None:
        return None
    if not isinstance(value, str):
        raise TokenError(f"claim {name!r} must be a string")
    return value.strip() or None


def _string_list(claims: Mapping[str, Any], name: str) -> list[str]:
    value = claims.get(name)
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise TokenError(f"claim {name!r} must be a string or a list of strings")
    return list(dict.fromkeys(item.strip() for item in items if item.strip()))


def _confirmation_jkt(claims: Mapping[str, Any]) -> str | None:
    cnf = claims.get("cnf")
    if cnf is None:
        return None
    if not isinstance(cnf, dict):
        raise TokenError("claim 'cnf' must be an object")
    # A binding we cannot check (mTLS x5t#S256, ...) must not degrade the token to a bearer token.
    unsupported = sorted(set(cnf) - {"jkt"})
    if unsupported:
        raise TokenError(f"unsupported confirmation methods {unsupported} in claim 'cnf'")
    jkt = cnf.get("jkt")
    if not isinstance(jkt, str) or not jkt:
        raise TokenError("claim 'cnf.jkt' must be a non-empty string")
    return jkt


# --- verifier ------------------------------------------------------------------------------------
class TokenVerifier:
    """Verifies access tokens of the issuers in a :class:`TrustRegistry` (thread-safe)."""

    def __init__(
        self,
        registry: TrustRegistry,
        *,
        clock: Callable[[], float] = time.time,
        http_client: httpx.Client | None = None,
        shared_jwks: SharedDocuments | None = None,
    ) -> None:
        self.registry = registry
        self._clock = clock
        self._issuers = {issuer.issuer: issuer for issuer in registry.issuers}
        self.keys = JwksCache(registry, clock=clock, http_client=http_client, shared=shared_jwks)
        #: SHA-256 of a token → (when it was verified, its claims, the result); see TrustRegistry.
        self._verified_tokens: dict[bytes, tuple[float, dict[str, Any], VerifiedToken]] = {}
        self._verified_lock = threading.Lock()

    def close(self) -> None:
        self.keys.close()

    def __enter__(self) -> TokenVerifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def averify(self, token: str) -> VerifiedToken:
        """:meth:`verify`, on the event loop; only loading the issuer's keys (blocking HTTP or a cache-actor
        call, when the key is not loaded yet) runs in a worker thread."""
        digest = self._digest(token)
        if (known := self._remembered(digest)) is not None:
            return known
        issuer, kid, alg = self._route(token)
        key = self.keys.cached_key(issuer, kid, alg)
        if key is None:
            key = await asyncio.to_thread(self.keys.key_for, issuer, kid, alg)
        return self._finish(token, key, alg, issuer, digest)

    def verify(self, token: str) -> VerifiedToken:
        """Verify signature, issuer, audience and times; TokenError (or UntrustedIssuerError) if not."""
        digest = self._digest(token)
        if (known := self._remembered(digest)) is not None:
            return known
        issuer, kid, alg = self._route(token)
        return self._finish(token, self.keys.key_for(issuer, kid, alg), alg, issuer, digest)

    def _digest(self, token: str) -> bytes | None:
        """The key of ``token`` in the verified-token memory; None when there is no memory or it never holds it."""
        if not self.registry.verified_token_cache_seconds or not isinstance(token, str) \
                or len(token) > MAX_TOKEN_CHARS:
            return None
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()

    def _remembered(self, digest: bytes | None) -> VerifiedToken | None:
        """The result of an earlier verification of exactly this token, its times checked again now."""
        entry = self._verified_tokens.get(digest) if digest is not None else None
        if entry is None or digest is None:
            return None
        verified_at, claims, result = entry
        if self._clock() - verified_at > self.registry.verified_token_cache_seconds:
            with self._verified_lock:
                self._verified_tokens.pop(digest, None)
            return None
        self._check_times(claims)  # an expired token stays expired, whatever the cache holds
        return result

    def _remember(self, digest: bytes | None, claims: dict[str, Any], result: VerifiedToken) -> None:
        if digest is None:
            return
        with self._verified_lock:
            if len(self._verified_tokens) >= _VERIFIED_TOKENS_MAX:
                self._verified_tokens.clear()  # rare (that many live tokens): start over, stay bounded
            self._verified_tokens[digest] = (self._clock(), claims, result)

    def _route(self, token: str) -> tuple[IssuerConfig, str | None, str]:
        """The trusted issuer, ``kid`` and ``alg`` of a token, from its unverified header and ``iss``."""
        header, payload = peek_jws(token, TokenError, "access token", MAX_TOKEN_CHARS)
        iss = payload.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise UntrustedIssuerError(f"issuer {_show(iss)} is not in the trust registry")
        alg = header.get("alg")
        if alg not in issuer.algorithms:
            raise TokenError(f"token alg {_show(alg)} is not allowed for issuer {issuer.issuer!r}")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenError("token header 'kid' must be a string")
        return issuer, kid, alg

    def _finish(self, token: str, key: Any, alg: str, issuer: IssuerConfig, digest: bytes | None) -> VerifiedToken:
        claims = self._decode(token, key, alg, issuer)
        self._check_times(claims)
        result = self._verified(claims, issuer)
        self._remember(digest, claims, result)
        return result

    def _decode(self, token: str, key: Any, alg: str, issuer: IssuerConfig) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=issuer.audiences,
                issuer=issuer.issuer,
                # Times are checked by _check_times with the injected clock.
                options={
                    "require": ["exp", "iss", "aud", "sub"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except InvalidSignatureError:
            raise TokenError("token signature does not verify") from None
        except InvalidAudienceError:
            raise TokenError(f"token audience is not one of {issuer.audiences}") from None
        except MissingRequiredClaimError as exc:
            raise TokenError(f"token lacks required claim {exc.claim!r}") from None
        except PyJWTError as exc:
            raise TokenError(f"token rejected: {exc}") from None

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now = self._clock()
        leeway = self.registry.leeway_seconds
        exp = numeric_date(claims, "exp", TokenError, required=True)
        if now >= exp + leeway:
            raise TokenError("token expired (exp)")
        nbf = numeric_date(claims, "nbf", TokenError, required=False)
        if nbf is not None and nbf > now + leeway:
            raise TokenError("token not valid yet (nbf)")
        iat = numeric_date(claims, "iat", TokenError, required=False)
        if iat is not None and iat > now + leeway:
            raise TokenError("token issued in the future (iat)")

    def _verified(self, claims: dict[str, Any], issuer: IssuerConfig) -> VerifiedToken:
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject.strip():
            raise TokenError("claim 'sub' must be a non-empty string")
        token_aud = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        audience = next(aud for aud in issuer.audiences if aud in token_aud)
        names = issuer.claims
        nationality = _single_string(claims, names.nationality)
        return VerifiedToken(
            issuer=issuer.issuer,
            subject=subject,
            audience=audience,
            expiry=datetime.fromtimestamp(float(claims["exp"]), tz=UTC),
            issuer_nations=list(issuer.nations),
            clearance_system=(issuer.clearance_system or issuer.nations[0]).upper(),
            clearance=_single_string(claims, names.clearance),
            nationality=nationality.upper() if nationality else None,
            coi=_string_list(claims, names.coi),
            cnf_jkt=_confirmation_jkt(claims),
            claims=claims,
        )

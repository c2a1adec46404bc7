"""Signed request tokens (SRT): the JWT wrapping an OpenTDF rewrap request.

The claim ``requestBody`` carries the rewrap request as a JSON string; ``iat``/``exp`` bound its life.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jwt

from kas_ray.config import ALLOWED_TOKEN_ALGORITHMS
from kas_ray.errors import SignedRequestError
from kas_ray.trust.jwks import PrivateKey, check_key_for_alg, default_alg, public_key_from_jwk
from kas_ray.trust.tokens import numeric_date, peek_header, peek_jws, verified_payload

#: A rewrap request with many key access objects stays far below this.
MAX_SRT_CHARS = 1 << 20
DEFAULT_SRT_TTL_SECONDS = 60


def verify_signed_request(
    srt: str,
    *,
    dpop_jwk: dict[str, Any] | None,
    max_age_seconds: int,
    clock: Callable[[], float] = time.time,
    leeway_seconds: float = 0,
) -> dict[str, Any]:
    """The parsed ``requestBody`` of a signed request token; SignedRequestError if it is unfit.

    With a DPoP key (from a proof already verified for this request) the SRT signature must verify
    with that key, which ties the request body to the key holder.

    Without one, the signature is *not* verified, like the OpenTDF platform: clients sign the SRT
    with an ephemeral key the KAS has no way to know or trust, so checking it against a key taken
    from the same message would prove nothing. Authenticity then rests on the access token; we still
    enforce the JWT shape, an asymmetric ``alg`` (so ``none`` and HS* fail closed), the ``iat``
    window and ``exp``, so a captured SRT ages out.

    ``iat`` must lie within ``max_age_seconds`` of now (either side); ``exp``, when present, must
    not have passed (``leeway_seconds`` tolerates client clock skew).
    """
    if dpop_jwk is None:
        header, claims = peek_jws(srt, SignedRequestError, "signed request token", MAX_SRT_CHARS)
    else:  # the header picks the check; _verified_claims parses (and checks) the whole token once
        header = peek_header(srt, SignedRequestError, "signed request token", MAX_SRT_CHARS)
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_TOKEN_ALGORITHMS:  # a JSON object or list is unhashable
        raise SignedRequestError(f"signed request token alg {str(alg)[:20]!r} is not allowed")
    if dpop_jwk is not None:
        claims = _verified_claims(srt, alg, dpop_jwk)

    now = clock()
    iat = numeric_date(claims, "iat", SignedRequestError, required=True)
    if abs(now - iat) > max_age_seconds:
        raise SignedRequestError(f"signed request token 'iat' is over {max_age_seconds} seconds from now")
    exp = numeric_date(claims, "exp", SignedRequestError, required=False)
    if exp is not None and now >= exp + leeway_seconds:
        raise SignedRequestError("signed request token expired (exp)")
    return _request_body(claims)


def _verified_claims(srt: str, alg: str, dpop_jwk: dict[str, Any]) -> dict[str, Any]:
    try:
        key = public_key_from_jwk(dpop_jwk)
        check_key_for_alg(key, alg)
    except ValueError as exc:
        raise SignedRequestError(f"signed request token does not fit the DPoP key: {exc}") from None
    return verified_payload(srt, key, alg, SignedRequestError, "signed request token", "the DPoP key")


def _request_body(claims: dict[str, Any]) -> dict[str, Any]:
    raw = claims.get("requestBody")
    if not isinstance(raw, str):
        raise SignedRequestError("signed request token claim 'requestBody' is missing or not a string")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise SignedRequestError("signed request token claim 'requestBody' is not JSON") from None
    if not isinstance(body, dict):
        raise SignedRequestError("signed request token claim 'requestBody' is not a JSON object")
    return body


def sign_request(
    body: dict[str, Any],
    private_key: PrivateKey,
    alg: str | None = None,
    *,
    now: float | None = None,
    ttl_seconds: int = DEFAULT_SRT_TTL_SECONDS,
) -> str:
    """Client side: an SRT over ``body`` (``requestBody`` JSON string, ``iat``, ``exp = iat + ttl``).

    ``alg`` defaults from the key type (RS256 for RSA, ES256/384/512 by curve). Sign with the DPoP
    key when the request carries a DPoP proof, so the KAS can bind the body to it.
    """
    alg = alg or default_alg(private_key)
    check_key_for_alg(private_key.public_key(), alg)
    issued = int(time.time() if now is None else now)
    claims = {
        "requestBody": json.dumps(body, separators=(",", ":")),
        "iat": issued,
        "exp": issued + ttl_seconds,
    }
    return jwt.encode(claims, private_key, algorithm=alg)

"""Issuer signing keys: JWK helpers and a per-issuer JWKS cache.

Keys are looked up by (issuer, kid) only from the JWKS source pinned in the trust registry: a file,
or a URL written in configuration. Nothing a token says (``jku``, ``x5u``, ``iss``) is ever fetched,
so a token cannot point the KAS at keys of its own choosing. An unknown kid reloads that issuer's
source at most once per ``jwks_refresh_interval`` so key rotation works without letting a flood of
made-up kids hammer the identity provider.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.exceptions import InvalidKeyError

from kas_ray.config import ALLOWED_TOKEN_ALGORITHMS, IssuerConfig, TrustRegistry
from kas_ray.errors import TokenError

_log = logging.getLogger(__name__)

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

#: JWK members that only a private (or symmetric) key has.
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
#: Below this an RSA signature key is refused (NIST SP 800-131A).
MIN_RSA_BITS = 2048
#: Caps on what a JWKS source may hand us; a bigger document is a misconfiguration or an attack.
MAX_JWKS_BYTES = 1 << 20
MAX_JWKS_KEYS = 100

_EC_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}
_CURVE_ALGS: dict[str, str] = {curve().name: alg for alg, curve in _EC_CURVES.items()}


# --- JWK helpers ------------------------------------------------------------------------------------
def b64url(data: bytes) -> str:
    """Unpadded base64url, as JOSE uses everywhere."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


#: Parsed keys of recently seen JWKs (DPoP keys, the federation registry): a client signs many
#: requests with one key, and building the key object was ~4 % of a rewrap's CPU. Public data only.
_PARSED_JWKS: dict[tuple[tuple[str, str], ...], PublicKey] = {}
_PARSED_JWKS_MAX = 4096


def public_key_from_jwk(jwk: Mapping[str, Any]) -> PublicKey:
    """Public RSA or EC key of a JWK; ``ValueError`` for private, symmetric or garbled keys."""
    if not isinstance(jwk, Mapping):
        raise ValueError("JWK is not a JSON object")
    # The whole JWK is the cache key, so a hit is exactly what parsing it again would return.
    ident = tuple(sorted(jwk.items())) if all(type(k) is str and type(v) is str for k, v in jwk.items()) \
        and sum(len(v) for v in jwk.values()) <= 8192 else None
    if ident is not None and (known := _PARSED_JWKS.get(ident)) is not None:
        return known
    key = _parse_jwk(jwk)
    if ident is not None:
        if len(_PARSED_JWKS) >= _PARSED_JWKS_MAX:
            _PARSED_JWKS.clear()  # rare: stay bounded, start over
        _PARSED_JWKS[ident] = key
    return key


def _parse_jwk(jwk: Mapping[str, Any]) -> PublicKey:
    private = sorted(PRIVATE_JWK_MEMBERS & set(jwk))
    if private:
        raise ValueError(f"JWK contains private key members {private}")
    kty = jwk.get("kty")
    parsers: dict[str, type[RSAAlgorithm] | type[ECAlgorithm]] = {"RSA": RSAAlgorithm, "EC": ECAlgorithm}
    parser = parsers.get(kty) if isinstance(kty, str) else None
    if parser is None:
        raise ValueError(f"JWK kty {kty!r} is not RSA or EC")
    try:
        key = parser.from_jwk(dict(jwk))
    except (InvalidKeyError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"JWK is not a valid {kty} public key") from exc
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ValueError("JWK is not a public key")
    return key


def public_jwk(key: PublicKey | PrivateKey) -> dict[str, Any]:
    """Public JWK of a key; a private key is reduced to its public half first."""
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        key = key.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return dict(RSAAlgorithm.to_jwk(key, as_dict=True))
    if isinstance(key, ec.EllipticCurvePublicKey):
        return dict(ECAlgorithm.to_jwk(key, as_dict=True))
    raise TypeError("only RSA and EC keys are supported")


def check_key_for_alg(key: PublicKey, alg: str) -> None:
    """Refuse a key whose type (RSA size, EC curve) does not fit ``alg``: no algorithm confusion."""
    if not isinstance(alg, str) or alg not in ALLOWED_TOKEN_ALGORITHMS:
        raise ValueError(f"algorithm {alg!r} is not an allowed asymmetric algorithm")
    if alg.startswith(("RS", "PS")):
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError(f"algorithm {alg} needs an RSA key")
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits is too short (minimum {MIN_RSA_BITS})")
        return
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _EC_CURVES[alg]):
        raise ValueError(f"algorithm {alg} needs an EC key on {_EC_CURVES[alg].name}")


def default_alg(key: PublicKey | PrivateKey) -> str:
    """The algorithm a client signs with for this key: RS256 for RSA, ES256/384/512 by curve."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        alg = _CURVE_ALGS.get(key.curve.name)
        if alg is not None:
            return alg
    raise TypeError("only RSA and EC (P-256, P-384, P-521) keys are supported")


# --- JWKS cache -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    kid: str | None
    alg: str | None
    key: PublicKey


class _JwksLoadError(Exception):
    """Internal: a JWKS source could not be read; never leaves this module."""


class _IssuerKeys:
    def __init__(self) -> None:
        self.entries: tuple[_Entry, ...] = ()  # replaced whole, so readers need no lock
        self.last_load: float | None = None
        self.loads = 0
        self.lock = threading.Lock()


def parse_jwks(document: Any) -> tuple[_Entry, ...]:
    """Signature keys of a JWKS document; entries we cannot or must not use are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise _JwksLoadError("not a JWKS document (no 'keys' list)")
    entries: list[_Entry] = []
    for position, jwk in enumerate(document["keys"][:MAX_JWKS_KEYS]):
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        alg = jwk.get("alg")
        kid = jwk.get("kid")
        if (alg is not None and (not isinstance(alg, str) or alg not in ALLOWED_TOKEN_ALGORITHMS)) or not isinstance(
                kid, str | None):
            continue
        try:
            key = public_key_from_jwk(jwk)
        except ValueError as exc:
            _log.warning("JWKS key #%d skipped: %s", position, exc)
            continue
        entries.append(_Entry(kid=kid, alg=alg, key=key))
    return tuple(entries)


class SharedDocuments(Protocol):
    """Where replicas share fetched JWKS documents (the nation's cache actor); best effort, may be slow."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, document: bytes) -> None: ...


class JwksCache:
    """Thread-safe cache of each trusted issuer's keys, loaded lazily from its pinned source.

    With ``shared`` documents, a replica's *first* load of a URL source takes a document another
    replica already fetched; a refresh for an unknown kid always fetches the pinned URL again (and
    shares the result), so a rotation is never hidden by a shared copy.
    """

    def __init__(
        self,
        registry: TrustRegistry,
        *,
        clock: Callable[[], float] = time.time,
        http_client: httpx.Client | None = None,
        shared: SharedDocuments | None = None,
    ) -> None:
        self._shared = shared
        self._registry = registry
        self._clock = clock
        self._http = http_client
        self._owns_http = http_client is None
        self._http_lock = threading.Lock()
        self._issuers = {issuer.issuer: _IssuerKeys() for issuer in registry.issuers}

    def close(self) -> None:
        """Close the HTTP client if this cache created it."""
        if self._owns_http and self._http is not None:
            self._http.close()
            self._http = None

    def load_count(self, issuer: str) -> int:
        """How many times the issuer's source was read (observability and tests)."""
        return self._issuers[issuer].loads

    def cached_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PublicKey | None:
        """The key :meth:`key_for` would return when it is already loaded (None: it may need a load).

        Never loads, never blocks; TokenError, as :meth:`key_for`, for a key present but unfit for ``alg``.
        """
        return entry.key if (entry := _select(self._issuers[issuer.issuer].entries, kid, alg)) else None

    def key_for(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PublicKey:
        """The issuer's key for ``kid`` usable with ``alg``; TokenError when there is none."""
        state = self._issuers[issuer.issuer]
        entry = _select(state.entries, kid, alg)
        if entry is None:
            with state.lock:
                entry = _select(state.entries, kid, alg)  # another thread may have just refreshed
                if entry is None and self._may_reload(state):
                    self._reload(issuer, state)
                    entry = _select(state.entries, kid, alg)
        if entry is None:
            if kid is None:
                raise TokenError(f"token has no kid and issuer {issuer.issuer!r} does not have exactly one key")
            raise TokenError(f"unknown kid for issuer {issuer.issuer!r}")
        return entry.key

    def _may_reload(self, state: _IssuerKeys) -> bool:
        if state.last_load is None:
            return True
        now = self._clock()
        # A clock that went backwards must not freeze refreshes until it catches up.
        return now < state.last_load or now - state.last_load >= self._registry.jwks_refresh_interval

    def _reload(self, issuer: IssuerConfig, state: _IssuerKeys) -> None:
        first = state.last_load is None
        # Stamped before the attempt: a failing source is retried at the same bounded rate.
        state.last_load = self._clock()
        state.loads += 1
        try:
            state.entries = parse_jwks(self._read_source(issuer, prefer_shared=first))
        except _JwksLoadError as exc:
            _log.warning("JWKS of issuer %r could not be loaded: %s", issuer.issuer, exc)
            if not state.entries:
                raise TokenError(f"signing keys of issuer {issuer.issuer!r} are unavailable") from None

    def _read_source(self, issuer: IssuerConfig, *, prefer_shared: bool = False) -> Any:
        source = issuer.jwks
        if source.url is not None and self._shared is not None:
            key = "jwks:" + hashlib.sha256(source.url.encode()).hexdigest()
            raw = self._shared.get(key) if prefer_shared else None
            if raw is None:
                raw = self._fetch(source.url)
                self._shared.put(key, raw)
            return _json_document(raw)
        if source.file is not None:
            try:
                with source.file.open("rb") as handle:
                    raw = handle.read(MAX_JWKS_BYTES + 1)
            except OSError as exc:
                raise _JwksLoadError(f"cannot read {source.file}: {exc.strerror}") from exc
        elif source.url is not None:
            raw = self._fetch(source.url)
        else:  # JwksSource guarantees one of file/url; fail closed all the same
            raise _JwksLoadError("no JWKS source configured")
        return _json_document(raw)

    def _fetch(self, url: str) -> bytes:
        """GET the pinned URL: no redirects (they would un-pin it), bounded time and size.

        The timeout bounds each read; the whole fetch is bounded too (a source trickling bytes holds the
        issuer's lock, and every token with an unknown kid waits on it), checked as each chunk arrives.
        """
        client = self._client()
        deadline = time.monotonic() + self._registry.jwks_fetch_timeout
        try:
            with client.stream(
                "GET",
                url,
                timeout=self._registry.jwks_fetch_timeout,
                follow_redirects=False,
                headers={"Accept": "application/jwk-set+json, application/json"},
            ) as response:
                if response.status_code != 200:
                    raise _JwksLoadError(f"GET {url} answered HTTP {response.status_code}")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise _JwksLoadError("JWKS document too large")
                    if time.monotonic() > deadline:
                        raise _JwksLoadError(f"GET {url} took longer than {self._registry.jwks_fetch_timeout:g} s")
                return bytes(body)
        except httpx.HTTPError as exc:
            raise _JwksLoadError(f"GET {url} failed: {type(exc).__name__}") from exc

    def _client(self) -> httpx.Client:
        with self._http_lock:
            if self._http is None:
                self._http = httpx.Client(timeout=self._registry.jwks_fetch_timeout, follow_redirects=False)
            return self._http


def _json_document(raw: bytes) -> Any:
    if len(raw) > MAX_JWKS_BYTES:
        raise _JwksLoadError("JWKS document too large")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise _JwksLoadError("JWKS document is not JSON") from exc


def _select(entries: tuple[_Entry, ...], kid: str | None, alg: str) -> _Entry | None:
    """Entry for ``kid`` usable with ``alg``; None when absent, TokenError when present but unfit."""
    if kid is None:
        candidates = list(entries) if len(entries) == 1 else []
    else:
        candidates = [entry for entry in entries if entry.kid == kid]
    if not candidates:
        return None
    reasons = []
    for entry in candidates:
        if entry.alg is not None and entry.alg != alg:
            reasons.append(f"the key is for {entry.alg}")
            continue
        try:
            check_key_for_alg(entry.key, alg)
        except ValueError as exc:
            reasons.append(str(exc))
            continue
        return entry
    raise TokenError(f"token alg {alg} does not fit the issuer key: {'; '.join(reasons)}")

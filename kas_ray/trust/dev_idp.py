"""Development identity providers: one local token issuer per nation, for the ``dev`` profile only.

Each nation's IdP has issuer :func:`dev_issuer` (``https://idp.<nation lower>.dev.kas-ray.local``;
the ``.local`` name never resolves, it only has to be an exact ``iss``), an ES256 signing key in
``<state_dir>/idp/<NATION>.key.pem`` and its public JWKS in ``<state_dir>/idp/<NATION>.jwks.json``,
which the trust registry reads as a pinned *file* source. ES256 because key generation and
signing are fast. The private key is stored **unencrypted** (PKCS#8, mode 0600 in a 0700
directory): acceptable for throwaway development keys, which is why the trust registry refuses
dev issuers under the ``prod`` profile and :func:`dev_trust_registry` refuses that profile.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from kas_ray.config import DEFAULT_AUDIENCE, ClaimNames, IssuerConfig, JwksSource, Profile, TrustRegistry
from kas_ray.errors import ConfigError
from kas_ray.trust.dpop import jwk_thumbprint
from kas_ray.trust.jwks import public_jwk

_log = logging.getLogger(__name__)

DEV_ALG = "ES256"
DEV_ISSUER_FORMAT = "https://idp.{nation}.dev.kas-ray.local"
_NATION = re.compile(r"[A-Z]{2,10}")


def _nation_code(nation: str) -> str:
    code = nation.strip().upper()
    if not _NATION.fullmatch(code):  # also keeps the code safe to use as a file name
        raise ConfigError(f"nation {nation!r} is not a 2-10 letter code (ISO 3166 alpha-3 or NATO)")
    return code


def dev_issuer(nation: str) -> str:
    """The ``iss`` of a nation's dev IdP: ``https://idp.<nation lower>.dev.kas-ray.local``."""
    return DEV_ISSUER_FORMAT.format(nation=_nation_code(nation).lower())


class DevIdentityProvider:
    """A nation's dev IdP; the key is created on first use and reused by every later instance."""

    def __init__(
        self, state_dir: str | os.PathLike[str], nation: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.nation = _nation_code(nation)
        self.issuer = dev_issuer(self.nation)
        self._clock = clock
        directory = Path(state_dir) / "idp"
        _ensure_private_dir(directory)
        self.key_path = directory / f"{self.nation}.key.pem"
        self.jwks_path = directory / f"{self.nation}.jwks.json"
        self._key = _load_or_create_key(self.key_path)
        jwk = public_jwk(self._key)
        self.kid = jwk_thumbprint(jwk)
        self._jwk = {**jwk, "kid": self.kid, "alg": DEV_ALG, "use": "sig"}
        _publish(self.jwks_path, self.jwks())

    def jwks(self) -> dict[str, Any]:
        """The public JWKS (one key) as published in :attr:`jwks_path`."""
        return {"keys": [dict(self._jwk)]}

    def issuer_config(self) -> IssuerConfig:
        return IssuerConfig(
            issuer=self.issuer,
            nations=[self.nation],
            algorithms=[DEV_ALG],
            jwks=JwksSource(file=self.jwks_path),
            dev=True,
        )

    def mint(
        self,
        sub: str,
        clearance: str | None,
        coi: Sequence[str] = (),
        ttl: int = 3600,
        nationality: str | None = None,
        audience: str = DEFAULT_AUDIENCE,
        cnf_jkt: str | None = None,
        extra_claims: dict[str, Any] | None = None,
    ) -> str:
        """An access token for ``sub`` with the default claim names.

        ``nationality`` defaults to the IdP's nation; ``cnf_jkt`` binds the token to a DPoP key.
        ``extra_claims`` add claims but never replace the standard ones (``iss``, times, ...).
        A negative ``ttl`` mints an already expired token (useful in tests).
        """
        names = ClaimNames()
        now = int(self._clock())
        claims: dict[str, Any] = dict(extra_claims or {})
        claims.update(
            {
                "iss": self.issuer,
                "sub": sub,
                "aud": audience,
                "iat": now,
                "exp": now + ttl,
                "jti": str(uuid.uuid4()),
                names.nationality: nationality or self.nation,
                names.coi: [coi] if isinstance(coi, str) else list(coi),
            }
        )
        if clearance is not None:
            claims[names.clearance] = clearance
        if cnf_jkt is not None:
            claims["cnf"] = {"jkt": cnf_jkt}
        return jwt.encode(claims, self._key, algorithm=DEV_ALG, headers={"kid": self.kid, "typ": "JWT"})


def dev_issuer_configs(state_dir: str | os.PathLike[str], nations: Iterable[str]) -> list[IssuerConfig]:
    """Issuer entries of the dev IdPs of ``nations`` (keys created on first use)."""
    codes = dict.fromkeys(_nation_code(nation) for nation in nations)
    return [DevIdentityProvider(state_dir, nation).issuer_config() for nation in codes]


def dev_trust_registry(
    state_dir: str | os.PathLike[str],
    nations: Iterable[str],
    profile: Profile = "dev",
    **settings: Any,
) -> TrustRegistry:
    """A trust registry of the dev IdPs only; ``settings`` are further TrustRegistry fields.

    Refuses any profile but ``dev`` before touching a key: dev IdP keys are unprotected files.
    """
    if profile != "dev":
        raise ConfigError(
            f"dev identity providers are refused under the {profile!r} profile: "
            "configure real issuers with pinned JWKS in the trust registry"
        )
    try:
        return TrustRegistry(profile=profile, issuers=dev_issuer_configs(state_dir, nations), **settings)
    except ValidationError as exc:
        raise ConfigError(f"invalid dev trust registry: {exc}") from exc


# --- files ----------------------------------------------------------------------------------------
def _ensure_private_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(directory.stat().st_mode) & 0o077:
        os.chmod(directory, 0o700)


def _load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load the key, or create it so that concurrent first users all end up with the same one."""
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        _write_exclusive(temporary, pem, 0o600)
        try:
            # link() publishes the complete file atomically and, unlike rename(), never replaces a
            # key another process published first: the first creator wins, the others load it.
            os.link(temporary, path)
        except FileExistsError:
            pass
        finally:
            temporary.unlink(missing_ok=True)
    return _read_key(path)


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        _log.warning("tightening permissions of dev IdP key %s to 0600", path)
        os.chmod(path, 0o600)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"dev IdP key {path} cannot be loaded: {type(exc).__name__}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"dev IdP key {path} is not an EC P-256 key")
    return key


def _write_exclusive(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we want (public JWKS)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(path: Path, document: dict[str, Any]) -> None:
    """Write the public JWKS atomically, only when it changed (readers never see a partial file)."""
    data = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
    try:
        if path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    _write_exclusive(temporary, data, 0o644)
    try:
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)

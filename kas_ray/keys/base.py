"""The interface every key backend implements (software keystore, Cloud KMS, PKCS#11).

A backend is the only place a private key is used. It answers with public keys and with
unwrapped shares; it never returns private key material, and it knows nothing about policy.
"""

from __future__ import annotations

import abc
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from kas_ray.hazmat.primitives import OaepHash
from kas_ray.ztdf.keyaccess import KeyAlgorithm

KeyStatus = Literal["active", "retired", "disabled"]


class KeyInfo(BaseModel):
    """Public facts about one key version: safe to log, cache and publish."""

    model_config = ConfigDict(frozen=True)

    kid: str
    algorithm: KeyAlgorithm
    #: OAEP hash a ``wrapped`` KAO for this RSA key uses (SHA-1 for OpenTDF clients).
    oaep_hash: OaepHash | None = None
    status: KeyStatus = "active"
    created: datetime | None = None
    public_key_pem: str
    #: Backend-specific version label (e.g. a KMS cryptoKeyVersion name); part of cache keys.
    version: str = "1"


class Health(BaseModel):
    ok: bool
    detail: str = ""
    keys: int = 0


class KeyBackend(abc.ABC):
    """Private-key operations for one nation. Implementations must be safe for concurrent calls."""

    @abc.abstractmethod
    async def keys(self) -> list[KeyInfo]:
        """Every key version this backend can decrypt with, newest first per algorithm."""

    async def key_info(self, kid: str | None, algorithm: KeyAlgorithm | None = None) -> KeyInfo:
        """The key a KAO names by kid; without kid, the active key of ``algorithm`` (default rsa:2048)."""
        from kas_ray.errors import KeyNotFoundError

        infos = await self.keys()
        if kid is not None:
            for info in infos:
                if info.kid == kid and info.status != "disabled":
                    return info
            raise KeyNotFoundError.unknown(kid)
        wanted = algorithm or "rsa:2048"
        for info in infos:
            if info.algorithm == wanted and info.status == "active":
                return info
        raise KeyNotFoundError(f"no active {wanted} key")

    @abc.abstractmethod
    async def unwrap(self, kid: str, wrapped: bytes, ephemeral_public_key_pem: str | None = None) -> bytes:
        """Decrypt a wrapped share with key ``kid``; raise KeyUnwrapError / KeyNotFoundError."""

    @abc.abstractmethod
    async def health(self) -> Health:
        """Cheap liveness of the backend, for readiness probes."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and sessions."""

"""Wrapping key shares to KAS public keys, and unwrapping them with a private key.

Wrapping is always local public-key encryption (also for KMS/HSM keys). Unwrapping with a private
key happens only inside a key backend (the HSM actor) or in library-level tools and tests.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import BaseModel, ConfigDict, model_validator

from kas_ray.errors import FormatError, KeyNotFoundError, KeyUnwrapError
from kas_ray.hazmat import primitives as P
from kas_ray.ztdf._wire import b64decode_strict
from kas_ray.ztdf.manifest import KeyAccessObject
from kas_ray.ztdf.policy import compute_binding, verify_binding

KeyAlgorithm = Literal["rsa:2048", "rsa:3072", "rsa:4096", "ec:secp256r1"]


class KasKey(BaseModel):
    """A KAS public key as a data owner needs it to wrap a share."""

    model_config = ConfigDict(frozen=True)

    url: str
    public_key_pem: str
    kid: str | None = None
    algorithm: KeyAlgorithm | None = None
    oaep_hash: P.OaepHash = "sha1"

    @model_validator(mode="after")
    def _check_key(self) -> KasKey:
        try:
            key = P.load_public_key_pem(self.public_key_pem)
        except ValueError as exc:
            raise ValueError(f"KAS public key for {self.url} is not a valid PEM: {exc}") from None
        actual = key_algorithm(key)
        if self.algorithm is None:
            object.__setattr__(self, "algorithm", actual)
        elif self.algorithm != actual:
            raise ValueError(f"KAS key for {self.url} is {actual}, not {self.algorithm}")
        return self

    def public_key(self) -> P.PublicKey:
        return P.load_public_key_pem(self.public_key_pem)


def key_algorithm(key: P.PublicKey | P.PrivateKey) -> KeyAlgorithm:
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size not in (2048, 3072, 4096):
            raise ValueError(f"unsupported RSA key size {key.key_size}")
        return f"rsa:{key.key_size}"  # type: ignore[return-value]
    if key.curve.name != "secp256r1":
        raise ValueError(f"unsupported EC curve {key.curve.name}")
    return "ec:secp256r1"


def wrap_share(kas: KasKey, share: bytes, policy_b64: str, sid: str | None = None) -> KeyAccessObject:
    """Wrap one share to one KAS and bind the policy to it."""
    key = kas.public_key()
    ephemeral_pem: str | None = None
    if isinstance(key, rsa.RSAPublicKey):
        wrapped, kao_type = P.rsa_oaep_encrypt(key, share, kas.oaep_hash), "wrapped"
    else:
        wrapped, ephemeral = P.ec_wrap(key, share)
        kao_type, ephemeral_pem = "ec-wrapped", P.public_key_pem(ephemeral)
    return KeyAccessObject(
        type=kao_type,  # type: ignore[arg-type]
        url=kas.url,
        protocol="kas",
        wrapped_key=base64.b64encode(wrapped).decode(),
        policy_binding=compute_binding(share, policy_b64),
        kid=kas.kid,
        sid=sid,
        ephemeral_public_key=ephemeral_pem,
    )


def decode_wrapped_key(kao: KeyAccessObject) -> tuple[bytes, P.PublicKey | None]:
    """The raw wrapped bytes and, for ``ec-wrapped``, the ephemeral public key; FormatError if garbled."""
    try:
        wrapped = b64decode_strict(kao.wrapped_key)
    except (binascii.Error, ValueError):
        raise FormatError("wrappedKey is not base64") from None
    if not wrapped or len(wrapped) > 1024:
        raise FormatError("wrappedKey has an impossible length")
    if kao.type != "ec-wrapped":
        return wrapped, None
    if not kao.ephemeral_public_key:
        raise FormatError("ec-wrapped key access object has no ephemeralPublicKey")
    try:
        ephemeral = P.load_public_key_pem(kao.ephemeral_public_key)
    except ValueError:
        raise FormatError("ephemeralPublicKey is not a valid PEM public key") from None
    if not isinstance(ephemeral, ec.EllipticCurvePublicKey):
        raise FormatError("ephemeralPublicKey is not an EC key")
    return wrapped, ephemeral


def unwrap_with_private_key(
    private_key: P.PrivateKey, wrapped: bytes, ephemeral: P.PublicKey | None, oaep_hash: P.OaepHash
) -> bytes:
    """Recover a share; any failure is a :class:`KeyUnwrapError` that says nothing about the key."""
    try:
        if isinstance(private_key, rsa.RSAPrivateKey):
            if ephemeral is not None:
                raise KeyUnwrapError("an RSA key cannot unwrap an ec-wrapped key access object")
            share = P.rsa_oaep_decrypt(private_key, wrapped, oaep_hash)
        else:
            if not isinstance(ephemeral, ec.EllipticCurvePublicKey):
                raise KeyUnwrapError("an EC key can only unwrap ec-wrapped key access objects")
            share = P.ec_unwrap(private_key, ephemeral, wrapped)
    except (ValueError, InvalidTag):
        raise KeyUnwrapError("the wrapped key could not be unwrapped") from None
    if len(share) != P.KEY_SIZE:
        raise KeyUnwrapError("the unwrapped key has the wrong length")
    return share


class PrivateKeyUnwrapper:
    """Library-level unwrap of KAOs with private keys held in this process (tools and tests only).

    ``keys`` maps kid → private key; the key under ``None`` serves KAOs without a kid.
    Callable as ``unwrap(kao, policy_b64) -> share`` for :func:`kas_ray.ztdf.decrypt`.
    """

    def __init__(self, keys: Mapping[str | None, P.PrivateKey], oaep_hash: P.OaepHash = "sha1") -> None:
        self._keys = dict(keys)
        self._oaep_hash = oaep_hash

    def __call__(self, kao: KeyAccessObject, policy_b64: str) -> bytes:
        key = self._keys.get(kao.kid) or (self._keys.get(None) if kao.kid is None else None)
        if key is None:
            raise KeyNotFoundError(f"no private key for kid {kao.kid!r}")
        wrapped, ephemeral = decode_wrapped_key(kao)
        share = unwrap_with_private_key(key, wrapped, ephemeral, self._oaep_hash)
        verify_binding(share, policy_b64, kao.policy_binding)
        return share

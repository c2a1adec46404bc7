"""Low-level cryptographic primitives used by the ZTDF format and the KAS.

Everything here handles raw key material: keep it behind the ``hazmat`` fence and call it
only from the format, key-backend and rewrap modules. Failures raise
:class:`cryptography.exceptions.InvalidTag` or :class:`ValueError`; callers translate them
into kas-ray errors with context.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
#: HKDF salt for ECDH key agreement in TDF3 (`ec-wrapped` KAOs and EC client keys).
TDF_HKDF_SALT = hashlib.sha256(b"TDF").digest()

OaepHash = Literal["sha1", "sha256"]
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

_OAEP_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"sha1": hashes.SHA1, "sha256": hashes.SHA256}


def random_key(size: int = KEY_SIZE) -> bytes:
    return os.urandom(size)


def xor_bytes(a: bytes, b: bytes) -> bytes:
    if len(a) != len(b):
        raise ValueError("xor of unequal lengths")
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


# --- symmetric ----------------------------------------------------------------------------------------
def aes_gcm_encrypt(key: bytes, plaintext: bytes, nonce: bytes | None = None) -> bytes:
    """AES-256-GCM; returns ``nonce(12) || ciphertext || tag(16)`` as TDF3 stores it."""
    nonce = nonce or os.urandom(NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, None)


def aes_gcm_decrypt(key: bytes, blob: bytes) -> bytes:
    """Inverse of :func:`aes_gcm_encrypt`; raises ``InvalidTag`` on any alteration."""
    if len(blob) < NONCE_SIZE + TAG_SIZE:
        raise ValueError("ciphertext too short")
    return AESGCM(key).decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], None)


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


# --- RSA ---------------------------------------------------------------------------------------------
def oaep_hash_for(algorithm: str | None) -> OaepHash:
    """The OAEP hash clients wrap with for an RSA KAS key of ``algorithm`` when nothing says otherwise:
    SHA-1 for rsa:2048 (what OpenTDF clients use), SHA-256 for larger keys."""
    return "sha1" if algorithm == "rsa:2048" else "sha256"


def _oaep(hash_name: OaepHash) -> padding.OAEP:
    try:
        algorithm = _OAEP_HASHES[hash_name]()
    except KeyError:
        raise ValueError(f"unsupported OAEP hash {hash_name!r}") from None
    return padding.OAEP(mgf=padding.MGF1(algorithm=algorithm), algorithm=algorithm, label=None)


def rsa_oaep_encrypt(public_key: rsa.RSAPublicKey, data: bytes, hash_name: OaepHash) -> bytes:
    return public_key.encrypt(data, _oaep(hash_name))


def rsa_oaep_decrypt(private_key: rsa.RSAPrivateKey, data: bytes, hash_name: OaepHash) -> bytes:
    return private_key.decrypt(data, _oaep(hash_name))


# --- EC (ECDH P-256 + HKDF-SHA256 + AES-256-GCM) ------------------------------------------------------
def ecdh_derive_key(private_key: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey) -> bytes:
    """Shared secret → 32-byte wrapping key with HKDF-SHA256(salt=SHA-256("TDF"), info=b"")."""
    if private_key.curve.name != peer.curve.name:
        raise ValueError("EC keys are on different curves")
    shared = private_key.exchange(ec.ECDH(), peer)
    return hkdf_wrap_key(shared)


def hkdf_wrap_key(shared_secret: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=TDF_HKDF_SALT, info=b"").derive(shared_secret)


def ec_wrap(recipient: ec.EllipticCurvePublicKey, data: bytes) -> tuple[bytes, ec.EllipticCurvePublicKey]:
    """Wrap ``data`` to ``recipient`` with a fresh ephemeral key; returns (wrapped, ephemeral public)."""
    ephemeral = ec.generate_private_key(recipient.curve)
    wrapped = aes_gcm_encrypt(ecdh_derive_key(ephemeral, recipient), data)
    return wrapped, ephemeral.public_key()


def ec_unwrap(private_key: ec.EllipticCurvePrivateKey, ephemeral: ec.EllipticCurvePublicKey, wrapped: bytes) -> bytes:
    return aes_gcm_decrypt(ecdh_derive_key(private_key, ephemeral), wrapped)


# --- key encoding ------------------------------------------------------------------------------------
#: Recently parsed client public keys (a client rewraps many objects with one key); public data only.
_PARSED_PEMS: dict[str | bytes, PublicKey] = {}
_PARSED_PEMS_MAX = 4096
_CACHED_PEM_MAX_CHARS = 8192  # an RSA-16384 SPKI PEM is ~2.8 KB: bounds the cache's memory


def load_public_key_pem(pem: str | bytes) -> PublicKey:
    """Parse an SPKI PEM (or an X.509 certificate PEM) into an RSA or EC public key; ValueError otherwise."""
    cacheable = isinstance(pem, str | bytes) and len(pem) <= _CACHED_PEM_MAX_CHARS
    if cacheable and (known := _PARSED_PEMS.get(pem)) is not None:
        return known
    key = _load_public_key_pem(pem)
    if not cacheable:
        return key
    if len(_PARSED_PEMS) >= _PARSED_PEMS_MAX:
        _PARSED_PEMS.clear()  # rare: stay bounded, start over
    _PARSED_PEMS[pem] = key
    return key


def _load_public_key_pem(pem: str | bytes) -> PublicKey:
    data = pem.encode() if isinstance(pem, str) else pem
    key: PublicKeyTypes
    try:
        if b"BEGIN CERTIFICATE" in data:
            from cryptography import x509

            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except UnsupportedAlgorithm:  # a key type cryptography does not know (not a ValueError)
        raise ValueError("unsupported public key algorithm") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ValueError("only RSA and EC public keys are supported")
    return key


def public_key_pem(key: PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def public_key_fingerprint(key: PublicKey) -> str:
    """SHA-256 of the DER SPKI, hex: a stable identifier that reveals nothing secret."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()

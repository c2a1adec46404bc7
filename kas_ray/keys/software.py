"""Software keystore: private keys in files, encrypted at rest, for the embedded default.

Layout under ``<state_dir>/keys/<nation>/``: ``index.json`` (public facts) and one
``<kid>.key.pem`` per key (PKCS#8 encrypted with the keystore passphrase, mode 0600).
Keys are generated on first start; adding a key never removes an old one, so old files keep
decrypting. The passphrase comes from ``KAS_RAY_KEY_PASSPHRASE`` or the file named by
``KAS_RAY_KEY_PASSPHRASE_FILE``; under the dev profile only, a random one is generated into
``<state_dir>/secrets/keystore.passphrase`` when neither is set.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kas_ray.config import Profile
from kas_ray.errors import ConfigError, KeyNotFoundError, KeyUnwrapError
from kas_ray.hazmat import primitives as P
from kas_ray.keys.base import Health, KeyBackend, KeyInfo
from kas_ray.ztdf.keyaccess import KeyAlgorithm, key_algorithm, unwrap_with_private_key

PASSPHRASE_ENV = "KAS_RAY_KEY_PASSPHRASE"  # noqa: S105 - variable names, not secrets
PASSPHRASE_FILE_ENV = "KAS_RAY_KEY_PASSPHRASE_FILE"  # noqa: S105

#: Keys a nation gets on first start: (algorithm, OAEP hash).
DEFAULT_KEY_SPECS: tuple[tuple[KeyAlgorithm, P.OaepHash | None], ...] = (
    ("rsa:2048", "sha1"),  # the OpenTDF default (legacy public key, OAEP-SHA1)
    ("rsa:4096", "sha256"),  # ACP-240 / KMS-compatible
    ("ec:secp256r1", None),
)
_KID_TAG = {"rsa:2048": "r2048", "rsa:3072": "r3072", "rsa:4096": "r4096", "ec:secp256r1": "ec256"}


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 atomically (never world-readable, even briefly)."""
    tmp = path.with_suffix(path.suffix + f".{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_passphrase(state_dir: Path, profile: Profile) -> bytes:
    """The keystore passphrase from the environment or a secret file (dev: generated once)."""
    if value := os.environ.get(PASSPHRASE_ENV):
        return value.encode()
    if file := os.environ.get(PASSPHRASE_FILE_ENV):
        try:
            value = Path(file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {PASSPHRASE_FILE_ENV}={file}: {exc.strerror}") from None
        if not value:
            raise ConfigError(f"{PASSPHRASE_FILE_ENV}={file} is empty")
        return value.encode()
    if profile != "dev":
        raise ConfigError(
            f"set {PASSPHRASE_ENV} or {PASSPHRASE_FILE_ENV}: the prod profile needs a keystore passphrase"
        )
    path = state_dir / "secrets" / "keystore.passphrase"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        _write_private_exclusive(path, secrets.token_urlsafe(32).encode())
    except FileExistsError:
        pass
    return path.read_bytes().strip()


def _write_private_exclusive(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _generate(algorithm: KeyAlgorithm) -> P.PrivateKey:
    if algorithm.startswith("rsa:"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(algorithm.split(":")[1]))
    return ec.generate_private_key(ec.SECP256R1())


class SoftwareKeystore(KeyBackend):
    """File-backed keys for one nation; private keys are decrypted into this process only."""

    def __init__(self, state_dir: str | os.PathLike[str], nation: str, *, profile: Profile = "dev",
                 passphrase: bytes | None = None) -> None:
        self.nation = nation.upper()
        self.dir = Path(state_dir) / "keys" / self.nation.lower()
        self._state_dir = Path(state_dir)
        self._passphrase = passphrase if passphrase is not None else load_passphrase(self._state_dir, profile)
        self._infos: list[KeyInfo] = []
        self._private: dict[str, P.PrivateKey] = {}
        self._load_or_create()

    # --- lifecycle ------------------------------------------------------------------------------------
    @property
    def _index(self) -> Path:
        return self.dir / "index.json"

    def _load_or_create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = self.dir / ".lock"
        import fcntl

        with os.fdopen(os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600), "a") as fh:  # serialise first start
            fcntl.flock(fh, fcntl.LOCK_EX)
            infos = self._read_index()
            present = {i.algorithm for i in infos}
            for algorithm, oaep in DEFAULT_KEY_SPECS:
                if algorithm not in present:
                    infos.insert(0, self._create_key(algorithm, oaep, infos))
            self._write_index(infos)
        for info in infos:
            self._private[info.kid] = self._load_private(info.kid)
        self._infos = infos

    def _read_index(self) -> list[KeyInfo]:
        if not self._index.exists():
            return []
        try:
            return [KeyInfo.model_validate(item) for item in json.loads(self._index.read_text())["keys"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"keystore index {self._index} is corrupt: {exc}") from None

    def _write_index(self, infos: list[KeyInfo]) -> None:
        body = json.dumps({"nation": self.nation, "keys": [i.model_dump(mode="json") for i in infos]}, indent=2)
        _write_private(self._index, body.encode())

    def _create_key(self, algorithm: KeyAlgorithm, oaep: P.OaepHash | None, existing: list[KeyInfo]) -> KeyInfo:
        n = 1 + sum(1 for i in existing if i.algorithm == algorithm)
        kid = f"{self.nation.lower()}-{_KID_TAG[algorithm]}-v{n}"
        key = _generate(algorithm)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(self._passphrase),
        )
        _write_private(self.dir / f"{kid}.key.pem", pem)
        return KeyInfo(kid=kid, algorithm=algorithm, oaep_hash=oaep, created=datetime.now(UTC),
                       public_key_pem=P.public_key_pem(key.public_key()), version=str(n))

    def _load_private(self, kid: str) -> P.PrivateKey:
        path = self.dir / f"{kid}.key.pem"
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=self._passphrase)
        except FileNotFoundError:
            raise ConfigError(f"keystore file for {kid} is missing") from None
        except (ValueError, TypeError):
            raise ConfigError(f"cannot decrypt keystore file for {kid}: wrong passphrase?") from None
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ConfigError(f"keystore file for {kid} holds an unsupported key type")
        return key

    def add_key(self, algorithm: KeyAlgorithm, oaep_hash: P.OaepHash | None = None) -> KeyInfo:
        """Rotate: a new active key of ``algorithm``; the previous one is retired but still decrypts."""
        if algorithm.startswith("rsa:") and oaep_hash is None:
            oaep_hash = P.oaep_hash_for(algorithm)  # what clients use (KasClient.public_key)
        infos = [i.model_copy(update={"status": "retired"}) if i.algorithm == algorithm and i.status == "active"
                 else i for i in self._infos]
        info = self._create_key(algorithm, oaep_hash, infos)
        infos.insert(0, info)
        self._write_index(infos)
        self._private[info.kid] = self._load_private(info.kid)
        self._infos = infos
        return info

    # --- KeyBackend -------------------------------------------------------------------------------------
    async def keys(self) -> list[KeyInfo]:
        return list(self._infos)

    def _info(self, kid: str) -> KeyInfo:
        for info in self._infos:
            if info.kid == kid:
                return info
        raise KeyNotFoundError.unknown(kid)

    def unwrap_sync(self, kid: str, wrapped: bytes, ephemeral_public_key_pem: str | None = None) -> bytes:
        info = self._info(kid)
        try:
            ephemeral = P.load_public_key_pem(ephemeral_public_key_pem) if ephemeral_public_key_pem else None
        except ValueError:
            raise KeyUnwrapError("ephemeral public key is not a valid PEM") from None
        return unwrap_with_private_key(self._private[kid], wrapped, ephemeral, info.oaep_hash or "sha1")

    async def unwrap(self, kid: str, wrapped: bytes, ephemeral_public_key_pem: str | None = None) -> bytes:
        # RSA private operations release the GIL: a thread keeps the event loop answering.
        return await asyncio.to_thread(self.unwrap_sync, kid, wrapped, ephemeral_public_key_pem)

    async def health(self) -> Health:
        ok = all(key_algorithm(self._private[i.kid]) == i.algorithm for i in self._infos)
        return Health(ok=ok and bool(self._infos), detail="software keystore", keys=len(self._infos))

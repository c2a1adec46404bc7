"""PKCS#11 key backend: a nation's private keys stay in an HSM (or a software token in dev/CI).

Only the HSM actor uses it. Wrapping is always local with the public key, which is read from the token;
the token is asked for two things only:

* ``wrapped`` (RSA) KAOs: ``CKM_RSA_PKCS_OAEP`` decrypt with SHA-256/MGF1-SHA256 or SHA-1/MGF1-SHA1
  (per key, ``oaep_hash``);
* ``ec-wrapped`` KAOs: ``CKM_ECDH1_DERIVE`` (P-256, ``CKD_NULL``) of the shared secret with the KAO's
  ephemeral public key. The secret comes back as a short-lived session object (extractable, never on
  the token); HKDF-SHA256 and AES-GCM run here, as in :func:`kas_ray.hazmat.primitives.ec_unwrap`.

Keys are found by ``CKA_LABEL`` or ``CKA_ID`` (``key_backend.pkcs11.keys``; without a list, every RSA/EC
private key on the token, kid = its label). On every connect each key is self-tested: a random share is
wrapped locally to the public key read from the token and unwrapped by the token, so a public key that
does not belong to its private key, or an OAEP hash / mechanism the token cannot do, fails at start with
a :class:`ConfigError` naming the key, never later as a "tampered" KAO.

Sessions: a pool of ``sessions`` sessions (the HSM actor's concurrency), one application login (PKCS#11
login state is per process and token, not per session). Blocking calls run in threads
(:func:`asyncio.to_thread`) behind a semaphore of the pool's size, so the actor's event loop keeps
answering. A session, login or device error closes the pool and is retried once on a new one; then
:class:`KeyBackendUnavailable` (503). A PIN the token rejected is never tried again (tokens lock the
user PIN after a few failures): fix the PIN source and the next call re-reads it.

Error mapping: a ciphertext or ephemeral key the token refuses is :class:`KeyUnwrapError` when the
session still works afterwards (a token may report bad OAEP padding as ``CKR_FUNCTION_FAILED`` or even
``CKR_GENERAL_ERROR``); token, session, login and PIN problems are :class:`KeyBackendUnavailable`.

Dev/CI helpers: :func:`provision_token` (initialise a token and its user PIN) and :func:`generate_key`
(non-extractable, sensitive private keys). ``scripts/setup-opencryptoki.sh`` sets up an opencryptoki
software token. Needs the ``pkcs11`` extra: ``pip install 'kas-ray[pkcs11]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import queue
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kas_ray.config import Pkcs11Config, Pkcs11KeyConfig
from kas_ray.errors import ConfigError, KasRayError, KeyBackendUnavailable, KeyNotFoundError, KeyUnwrapError
from kas_ray.hazmat import primitives as P
from kas_ray.keys.base import Health, KeyBackend, KeyInfo
from kas_ray.ztdf.keyaccess import KeyAlgorithm

logger = logging.getLogger("kas_ray.keys.pkcs11")

INSTALL_HINT = "pip install 'kas-ray[pkcs11]'"
#: Debian/Ubuntu opencryptoki (dev/CI software token: ``scripts/setup-opencryptoki.sh``).
OPENCRYPTOKI_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/libopencryptoki.so"
#: opencryptoki's factory SO PIN and the dev/CI defaults of the setup script (never for production).
OPENCRYPTOKI_FACTORY_SO_PIN = "87654321"  # noqa: S105 - a published factory default, dev only
DEV_USER_PIN = "12345678"  # noqa: S105 - dev/CI token only
DEV_TOKEN_LABEL = "kas-ray-dev"  # noqa: S105 - a token label, not a secret

ALGORITHMS: tuple[KeyAlgorithm, ...] = ("rsa:2048", "rsa:3072", "rsa:4096", "ec:secp256r1")
P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")  # DER OID 1.2.840.10045.3.1.7 (namedCurve)

# Token flags python-pkcs11's TokenFlag does not name.
_CKF_USER_PIN_LOCKED = 0x00040000
_CKF_USER_PIN_TO_BE_CHANGED = 0x00080000
_CKF_TOKEN_INITIALIZED = 0x00000400
_CKF_USER_PIN_INITIALIZED = 0x00000008
_CKU_SO, _CKU_USER = 0, 1
_CKR_NAMES = {
    0x00: "CKR_OK", 0x05: "CKR_GENERAL_ERROR", 0x06: "CKR_FUNCTION_FAILED", 0x30: "CKR_DEVICE_ERROR",
    0x32: "CKR_DEVICE_REMOVED", 0xA0: "CKR_PIN_INCORRECT", 0xA1: "CKR_PIN_INVALID", 0xA2: "CKR_PIN_LEN_RANGE",
    0xA3: "CKR_PIN_EXPIRED", 0xA4: "CKR_PIN_LOCKED", 0xB0: "CKR_SESSION_CLOSED",
    0xB3: "CKR_SESSION_HANDLE_INVALID", 0xB5: "CKR_SESSION_READ_ONLY", 0xB6: "CKR_SESSION_EXISTS",
    0xB7: "CKR_SESSION_READ_ONLY_EXISTS", 0xE0: "CKR_TOKEN_NOT_PRESENT", 0xE1: "CKR_TOKEN_NOT_RECOGNIZED",
    0x100: "CKR_USER_ALREADY_LOGGED_IN", 0x101: "CKR_USER_NOT_LOGGED_IN", 0x102: "CKR_USER_PIN_NOT_INITIALIZED",
    0x103: "CKR_USER_TYPE_INVALID", 0x104: "CKR_USER_ANOTHER_ALREADY_LOGGED_IN", 0x190: "CKR_CRYPTOKI_NOT_INITIALIZED",
}
_CKR_OK, _CKR_PIN_INCORRECT, _CKR_PIN_LOCKED, _CKR_USER_ALREADY_LOGGED_IN = 0x00, 0xA0, 0xA4, 0x100

#: python-pkcs11 exceptions that mean the session, login or device is gone (never the data).
_SESSION_ERRORS = frozenset({
    "SessionClosed", "SessionHandleInvalid", "SessionCount", "UserNotLoggedIn", "DeviceError", "DeviceMemory",
    "DeviceRemoved", "TokenNotPresent", "TokenNotRecognised", "SlotIDInvalid", "HostMemory", "FunctionCancelled",
    "PinExpired", "PinLocked", "ObjectHandleInvalid", "KeyHandleInvalid", "OperationActive",
})

T = TypeVar("T")


def _require() -> ModuleType:
    """python-pkcs11, or an ImportError that says how to install it."""
    try:
        import pkcs11
    except ImportError as exc:
        raise ImportError(f"the pkcs11 key backend needs the pkcs11 extra: {INSTALL_HINT} ({exc})") from exc
    return pkcs11


def _ckr(exc: BaseException) -> str:
    """``CKR_PIN_INCORRECT`` for python-pkcs11's ``PinIncorrect`` (best effort, for messages)."""
    name = type(exc).__name__
    if name == "PKCS11Error":
        return str(exc) or name
    return "CKR_" + re.sub(r"(?<=[a-z])(?=[A-Z])", "_", name).upper()


def _ckr_code(rv: int) -> str:
    return _CKR_NAMES.get(rv, f"CKR 0x{rv:x}")


def _module_hint(module: str) -> str:
    if "opencryptoki" in module:
        return " (opencryptoki: is pkcsslotd running? see scripts/setup-opencryptoki.sh)"
    return ""


# --- raw Cryptoki: the calls python-pkcs11 does not wrap (C_InitToken, C_Login, C_Logout) ---------------
_FUNCTIONS = ("C_Initialize", "C_Finalize", "C_GetInfo", "C_GetFunctionList", "C_GetSlotList", "C_GetSlotInfo",
              "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo", "C_InitToken", "C_InitPIN",
              "C_SetPIN", "C_OpenSession", "C_CloseSession", "C_CloseAllSessions", "C_GetSessionInfo",
              "C_GetOperationState", "C_SetOperationState", "C_Login", "C_Logout")


class _FunctionList(ctypes.Structure):
    """The head of CK_FUNCTION_LIST (version, then function pointers in the order of the standard)."""

    _fields_ = [("version", ctypes.c_ubyte * 2)] + [(name, ctypes.c_void_p) for name in _FUNCTIONS]


_UL = ctypes.c_ulong


class _Cryptoki:
    """C_InitToken / C_Login / C_Logout of a module already loaded (and initialised) by python-pkcs11.

    ``dlopen`` of the same path returns the same library instance, so sessions opened by python-pkcs11
    are valid here. Logging in through this (not ``Token.open(user_pin=...)``) keeps python-pkcs11 from
    calling C_Logout when one session closes, which would log out every session of the process.
    """

    _cache: dict[str, _Cryptoki] = {}
    _cache_lock = threading.Lock()

    def __init__(self, module: str) -> None:
        dll = ctypes.CDLL(module)
        get_list = dll.C_GetFunctionList
        get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionList))]
        get_list.restype = _UL
        ptr = ctypes.POINTER(_FunctionList)()
        rv = get_list(ctypes.byref(ptr))
        if rv != _CKR_OK:
            raise KeyBackendUnavailable(f"C_GetFunctionList of {module} failed: {_ckr_code(rv)}")
        table = ptr.contents
        self._dll = dll  # keeps the library mapped
        self.init_token = ctypes.CFUNCTYPE(_UL, _UL, ctypes.c_char_p, _UL, ctypes.c_char_p)(table.C_InitToken)
        self.login = ctypes.CFUNCTYPE(_UL, _UL, _UL, ctypes.c_char_p, _UL)(table.C_Login)
        self.logout = ctypes.CFUNCTYPE(_UL, _UL)(table.C_Logout)

    @classmethod
    def of(cls, module: str) -> _Cryptoki:
        with cls._cache_lock:
            if module not in cls._cache:
                cls._cache[module] = cls(module)
            return cls._cache[module]


def _login(module: str, session: Any, pin: str, user_type: int = _CKU_USER) -> int:
    """C_Login on ``session``; returns the CKR code (CKR_USER_ALREADY_LOGGED_IN counts as success)."""
    data = pin.encode()
    return int(_Cryptoki.of(module).login(_handle(session), user_type, data, len(data)))


def _handle(session: Any) -> int:
    """The CK_SESSION_HANDLE of a python-pkcs11 session (``handle`` since 0.8, ``_handle`` before)."""
    handle = getattr(session, "handle", None)
    return int(handle if handle is not None else session._handle)


def _load_lib(pkcs11: ModuleType, module: str) -> Any:
    if not os.path.exists(module):
        raise ConfigError(f"PKCS#11 module {module} does not exist")
    try:
        return pkcs11.lib(module)
    except pkcs11.PKCS11Error as exc:
        raise KeyBackendUnavailable(f"cannot initialise PKCS#11 module {module}: {_ckr(exc)}"
                                    f"{_module_hint(module)}") from None


def _label(token_or_text: Any) -> str:
    text = token_or_text if isinstance(token_or_text, str) else token_or_text.label
    return text.strip(" \x00")


def _find_slot(lib: Any, slot: int | None, token_label: str | None) -> Any:
    """The slot holding the configured token (by slot id, token label, or the only token present)."""
    slots = lib.get_slots(token_present=True)
    found = []
    for candidate in slots:
        if slot is not None and candidate.slot_id != slot:
            continue
        if token_label is not None and _label(candidate.get_token()) != token_label:
            continue
        found.append(candidate)
    wanted = " ".join(filter(None, [f"slot {slot}" if slot is not None else "",
                                    f"label {token_label!r}" if token_label is not None else ""])) or "any"
    if not found:
        present = ", ".join(f"{s.slot_id}:{_label(s.get_token())!r}" for s in slots) or "none"
        raise KeyBackendUnavailable(f"no PKCS#11 token matches {wanted} (tokens present: {present})")
    if len(found) > 1:
        raise ConfigError(f"{len(found)} PKCS#11 tokens match {wanted}: set key_backend.pkcs11.slot or token_label")
    return found[0]


# --- key material on the token ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _KeySpec:
    """Where a configured key is on the token, and how it is used."""

    kid: str
    label: str | None
    id: bytes | None
    algorithm: KeyAlgorithm | None
    oaep_hash: P.OaepHash | None
    status: str = "active"

    def where(self) -> str:
        parts = [f"label {self.label!r}" if self.label is not None else "",
                 f"id {self.id.hex()}" if self.id is not None else ""]
        return " and ".join(p for p in parts if p)

    def template(self, pkcs11: ModuleType, object_class: Any) -> dict[Any, Any]:
        attrs: dict[Any, Any] = {pkcs11.Attribute.CLASS: object_class}
        if self.label is not None:
            attrs[pkcs11.Attribute.LABEL] = self.label
        if self.id is not None:
            attrs[pkcs11.Attribute.ID] = self.id
        return attrs


def _spec_from_config(cfg: Pkcs11KeyConfig) -> _KeySpec:
    if cfg.algorithm not in ALGORITHMS:
        raise ConfigError(f"pkcs11 key {cfg.kid}: unsupported algorithm {cfg.algorithm!r} "
                          f"(one of {', '.join(ALGORITHMS)})")
    try:
        key_id = bytes.fromhex(cfg.id_hex) if cfg.id_hex else None
    except ValueError:
        raise ConfigError(f"pkcs11 key {cfg.kid}: id_hex is not hex") from None
    label = cfg.label if cfg.label is not None else (None if key_id is not None else cfg.kid)
    oaep = None if cfg.algorithm.startswith("ec:") else (cfg.oaep_hash or P.oaep_hash_for(cfg.algorithm))
    return _KeySpec(kid=cfg.kid, label=label, id=key_id, algorithm=cfg.algorithm,  # type: ignore[arg-type]
                    oaep_hash=oaep, status=cfg.status)


def _find_one(session: Any, pkcs11: ModuleType, spec: _KeySpec, object_class: Any) -> Any | None:
    objects = list(session.get_objects(spec.template(pkcs11, object_class)))
    if len(objects) > 1:
        raise ConfigError(f"pkcs11 key {spec.kid}: {len(objects)} objects of class {object_class.name} have "
                          f"{spec.where()}: make labels/ids unique")
    return objects[0] if objects else None


def _discover(pkcs11: ModuleType, session: Any) -> list[_KeySpec]:
    """Every RSA/EC private key on the token with a label (kid = label) or an id (kid = id hex)."""
    A = pkcs11.Attribute
    specs = []
    for private in session.get_objects({A.CLASS: pkcs11.ObjectClass.PRIVATE_KEY}):
        if private[A.KEY_TYPE] not in (pkcs11.KeyType.RSA, pkcs11.KeyType.EC):
            continue
        label, key_id = _label(private[A.LABEL] or ""), bytes(private[A.ID] or b"")
        if not label and not key_id:
            continue
        specs.append(_KeySpec(kid=label or key_id.hex(), label=label or None, id=key_id or None,
                              algorithm=None, oaep_hash=None))
    return specs


def _ec_point(raw: bytes) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING of the point; some tokens return the bare point."""
    if len(raw) == 67 and raw[:2] == b"\x04\x41":
        return raw[2:]
    return raw


def _public_key(pkcs11: ModuleType, spec: _KeySpec, private: Any, public: Any | None) -> P.PublicKey:
    """The public key of a key pair: from its public object, or (RSA) the private key's public attributes."""
    A = pkcs11.Attribute
    key_type = private[A.KEY_TYPE]
    if key_type == pkcs11.KeyType.RSA:
        source = public if public is not None else private
        n = int.from_bytes(source[A.MODULUS], "big")
        e = int.from_bytes(source[A.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    if key_type == pkcs11.KeyType.EC:
        if public is None:
            raise ConfigError(f"pkcs11 key {spec.kid}: no public key object with {spec.where()} (EC keys need one)")
        if bytes(public[A.EC_PARAMS]) != P256_PARAMS:
            raise ConfigError(f"pkcs11 key {spec.kid}: only the P-256 curve (secp256r1) is supported")
        try:
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), _ec_point(bytes(public[A.EC_POINT])))
        except ValueError:
            raise ConfigError(f"pkcs11 key {spec.kid}: CKA_EC_POINT is not a P-256 point") from None
    raise ConfigError(f"pkcs11 key {spec.kid}: key type {key_type!r} is not RSA or EC")


def _algorithm_of(spec: _KeySpec, key: P.PublicKey) -> KeyAlgorithm:
    if isinstance(key, rsa.RSAPublicKey):
        algorithm = f"rsa:{key.key_size}"
    else:
        algorithm = "ec:secp256r1"
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"pkcs11 key {spec.kid}: unsupported key {algorithm}")
    if spec.algorithm is not None and spec.algorithm != algorithm:
        raise ConfigError(f"pkcs11 key {spec.kid} is {algorithm} on the token, configured as {spec.algorithm}")
    return algorithm  # type: ignore[return-value]


def _oaep_param(pkcs11: ModuleType, oaep_hash: P.OaepHash) -> tuple[Any, Any, None]:
    if oaep_hash == "sha256":
        return (pkcs11.Mechanism.SHA256, pkcs11.MGF.SHA256, None)
    return (pkcs11.Mechanism.SHA_1, pkcs11.MGF.SHA1, None)


def _rsa_decrypt(pkcs11: ModuleType, private: Any, wrapped: bytes, oaep_hash: P.OaepHash) -> bytes:
    return bytes(private.decrypt(wrapped, mechanism=pkcs11.Mechanism.RSA_PKCS_OAEP,
                                 mechanism_param=_oaep_param(pkcs11, oaep_hash)))


def _ecdh(pkcs11: ModuleType, private: Any, peer: ec.EllipticCurvePublicKey) -> bytes:
    """The raw ECDH shared secret (x coordinate), derived inside the token."""
    A = pkcs11.Attribute
    point = peer.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    secret = private.derive_key(
        pkcs11.KeyType.GENERIC_SECRET, 256, mechanism=pkcs11.Mechanism.ECDH1_DERIVE,
        mechanism_param=(pkcs11.KDF.NULL, None, point),
        template={A.TOKEN: False, A.EXTRACTABLE: True, A.SENSITIVE: False, A.PRIVATE: True},
    )
    try:
        return bytes(secret[A.VALUE])
    finally:
        secret.destroy()


# --- the session pool ---------------------------------------------------------------------------------------
@dataclass(eq=False)
class _PooledSession:
    session: Any
    #: kid → private key object, found once per session.
    keys: dict[str, Any] = field(default_factory=dict)


class _Connection:
    """One token connection: ``size`` open sessions (logged in once) and the private keys found in them."""

    def __init__(self, token: Any, sessions: list[_PooledSession]) -> None:
        self.token = token
        self.sessions = sessions
        self.idle: queue.Queue[_PooledSession] = queue.Queue()
        for pooled in sessions:
            self.idle.put(pooled)
        self.closed = False

    def acquire(self, timeout: float) -> _PooledSession:
        try:
            return self.idle.get(timeout=timeout)
        except queue.Empty:
            raise KeyBackendUnavailable(f"no free PKCS#11 session within {timeout:.0f}s") from None

    def release(self, pooled: _PooledSession) -> None:
        if self.closed:
            _close_quietly(pooled.session)
        else:
            self.idle.put(pooled)

    def close(self) -> None:
        """Close the idle sessions now; sessions in use are closed when released."""
        self.closed = True
        while True:
            try:
                _close_quietly(self.idle.get_nowait().session)
            except queue.Empty:
                return


def _close_quietly(session: Any) -> None:
    with contextlib.suppress(Exception):
        session.close()


class Pkcs11Backend(KeyBackend):
    """One nation's keys in a PKCS#11 token; safe for concurrent calls (a pool of ``sessions`` sessions).

    The constructor only validates the configuration; the token is opened on first use, so a token that is
    down at start makes calls fail with 503 (and health report it) until it is back. ``pin`` overrides the
    configured PIN source (tools and tests).
    """

    #: Seconds a failed connect is remembered before the token is tried again.
    retry_after_seconds = 1.0
    #: Seconds a call waits for a free session before 503.
    acquire_timeout_seconds = 30.0

    def __init__(self, config: Pkcs11Config, nation: str, *, pin: str | None = None) -> None:
        self._p11 = _require()
        self.config = config
        self.nation = nation.upper()
        self._pin = pin
        kids = [k.kid for k in config.keys]
        if len(set(kids)) != len(kids):
            raise ConfigError("key_backend.pkcs11.keys lists a kid twice")
        self._configured = [_spec_from_config(k) for k in config.keys]
        self._specs: dict[str, _KeySpec] = {}
        self._infos: list[KeyInfo] = []
        self._loaded = False
        self._conn: _Connection | None = None
        self._lock = threading.Lock()
        self._failed_at = 0.0
        self._failure: KasRayError | None = None
        self._rejected_pin: bytes | None = None
        self._sem: asyncio.Semaphore | None = None
        self._sem_loop: asyncio.AbstractEventLoop | None = None

    # --- connection -------------------------------------------------------------------------------------------
    def _read_pin(self) -> str:
        if self._pin is not None:
            return self._pin
        if self.config.pin_file:
            try:
                pin = Path(self.config.pin_file).read_text().strip()
            except OSError as exc:
                raise KeyBackendUnavailable(f"cannot read the PKCS#11 PIN file {self.config.pin_file}: "
                                            f"{exc.strerror}") from None
            if not pin:
                raise KeyBackendUnavailable(f"the PKCS#11 PIN file {self.config.pin_file} is empty")
            return pin
        pin = os.environ.get(self.config.pin_env, "")
        if not pin:
            raise KeyBackendUnavailable(f"no PKCS#11 user PIN: set {self.config.pin_env} "
                                        "or key_backend.pkcs11.pin_file")
        return pin

    def _connect(self) -> _Connection:
        conn = self._conn
        if conn is not None:
            return conn
        with self._lock:
            if self._conn is not None:
                return self._conn
            if self._failure is not None and time.monotonic() - self._failed_at < self.retry_after_seconds:
                raise type(self._failure)(self._failure.message)  # a fresh exception per caller
            try:
                self._conn = self._open()
            except KasRayError as exc:
                self._failure, self._failed_at = exc, time.monotonic()
                raise
            self._failure = None
            return self._conn

    def _open(self) -> _Connection:
        p11, cfg = self._p11, self.config
        pin = self._read_pin()
        digest = hashlib.sha256(pin.encode()).digest()
        if digest == self._rejected_pin:
            raise KeyBackendUnavailable("the PKCS#11 token rejected this user PIN (CKR_PIN_INCORRECT); it is not "
                                        "tried again so the token does not lock: fix the PIN "
                                        f"({cfg.pin_file or cfg.pin_env})")
        lib = _load_lib(p11, cfg.module)
        sessions: list[_PooledSession] = []
        try:
            slot = _find_slot(lib, cfg.slot, cfg.token_label)
            token = slot.get_token()
            if int(token.flags) & _CKF_USER_PIN_LOCKED:
                raise KeyBackendUnavailable(f"the user PIN of PKCS#11 token {_label(token)!r} is locked "
                                            "(too many wrong PINs): the security officer must reset it")
            for _ in range(cfg.sessions):
                sessions.append(_PooledSession(token.open()))
            rv = _login(cfg.module, sessions[0].session, pin)
            if rv == _CKR_PIN_INCORRECT:
                self._rejected_pin = digest
                raise KeyBackendUnavailable(f"PKCS#11 login to token {_label(token)!r} failed: wrong user PIN "
                                            f"(CKR_PIN_INCORRECT; from {cfg.pin_file or cfg.pin_env})")
            if rv not in (_CKR_OK, _CKR_USER_ALREADY_LOGGED_IN):
                raise KeyBackendUnavailable(f"PKCS#11 login to token {_label(token)!r} failed: {_ckr_code(rv)}")
            self._load_keys(sessions[0])
        except p11.PKCS11Error as exc:
            for pooled in sessions:
                _close_quietly(pooled.session)
            raise KeyBackendUnavailable(f"PKCS#11 token unavailable: {_ckr(exc)}{_module_hint(cfg.module)}") from None
        except BaseException:
            for pooled in sessions:
                _close_quietly(pooled.session)
            raise
        logger.info("pkcs11 %s: token %r in slot %s, %d keys, %d sessions", self.nation, _label(token),
                    slot.slot_id, len(self._infos), len(sessions))
        return _Connection(token, sessions)

    def _load_keys(self, pooled: _PooledSession) -> None:
        """Find every key, read its public key, self-test it; publish the KeyInfos."""
        p11 = self._p11
        discovered = not self._configured
        specs = _discover(p11, pooled.session) if discovered else self._configured
        infos, by_kid = [], {}
        for spec in specs:
            private = _find_one(pooled.session, p11, spec, p11.ObjectClass.PRIVATE_KEY)
            if private is None:
                raise ConfigError(f"pkcs11 key {spec.kid}: no private key with {spec.where()} on the token")
            public = _find_one(pooled.session, p11, spec, p11.ObjectClass.PUBLIC_KEY)
            public_key = _public_key(p11, spec, private, public)
            algorithm = _algorithm_of(spec, public_key)
            oaep = spec.oaep_hash
            if discovered and algorithm.startswith("rsa:"):
                oaep = P.oaep_hash_for(algorithm)  # what KasClient uses by algorithm
            spec = _KeySpec(kid=spec.kid, label=spec.label, id=spec.id, algorithm=algorithm, oaep_hash=oaep,
                            status=spec.status)
            self._self_test(spec, private, public_key)
            pooled.keys[spec.kid] = private
            by_kid[spec.kid] = spec
            infos.append(KeyInfo(kid=spec.kid, algorithm=algorithm, oaep_hash=oaep, status=spec.status,  # type: ignore[arg-type]
                                 public_key_pem=P.public_key_pem(public_key),
                                 version=P.public_key_fingerprint(public_key)[:16]))
        self._specs, self._infos, self._loaded = by_kid, infos, True

    def _self_test(self, spec: _KeySpec, private: Any, public_key: P.PublicKey) -> None:
        """Wrap a random share locally, unwrap it in the token: proves the pair and the mechanism."""
        probe = P.random_key()
        p11 = self._p11
        try:
            if isinstance(public_key, rsa.RSAPublicKey):
                assert spec.oaep_hash is not None
                what = f"RSA-OAEP-{spec.oaep_hash.upper()} decrypt"
                got = _rsa_decrypt(p11, private, P.rsa_oaep_encrypt(public_key, probe, spec.oaep_hash), spec.oaep_hash)
            else:
                what = "ECDH1_DERIVE"
                ephemeral = ec.generate_private_key(ec.SECP256R1())
                probe = ephemeral.exchange(ec.ECDH(), public_key)
                got = _ecdh(p11, private, ephemeral.public_key())
        except p11.PKCS11Error as exc:
            if type(exc).__name__ in _SESSION_ERRORS:
                raise
            hint = ""
            if spec.oaep_hash == "sha256" and type(exc).__name__ in ("ArgumentsBad", "MechanismParamInvalid"):
                hint = " (SoftHSM2 2.6 does RSA-OAEP with SHA-1 only)"
            raise ConfigError(f"pkcs11 key {spec.kid}: the token cannot do {what} with this key: "
                              f"{_ckr(exc)}{hint}") from None
        if got != probe:
            raise ConfigError(f"pkcs11 key {spec.kid}: the public key on the token does not match its private key")

    def _invalidate(self, conn: _Connection) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None
        conn.close()

    def _with_session(self, kid: str | None, fn: Callable[[_PooledSession, Any], T]) -> T:
        """Run ``fn(pooled, private_key_of_kid)``; session/device errors: new pool, one retry, then 503."""
        p11 = self._p11
        for attempt in (1, 2):
            conn = self._connect()
            pooled = conn.acquire(self.acquire_timeout_seconds)
            private = None
            try:
                private = self._private(pooled, kid) if kid is not None else None
                return fn(pooled, private)
            except p11.PKCS11Error as exc:
                if type(exc).__name__ not in _SESSION_ERRORS and _session_alive(p11, pooled, private):
                    raise _DataRejected(exc) from None
                logger.warning("pkcs11 %s: session error %s, reconnecting", self.nation, _ckr(exc))
                self._invalidate(conn)
                if attempt == 2:
                    raise KeyBackendUnavailable(f"PKCS#11 token error: {_ckr(exc)}") from None
            finally:
                conn.release(pooled)
        raise AssertionError("unreachable")

    def _private(self, pooled: _PooledSession, kid: str) -> Any:
        private = pooled.keys.get(kid)
        if private is None:
            spec = self._specs[kid]
            private = _find_one(pooled.session, self._p11, spec, self._p11.ObjectClass.PRIVATE_KEY)
            if private is None:
                raise KeyBackendUnavailable(f"pkcs11 key {kid} ({spec.where()}) is no longer on the token")
            pooled.keys[kid] = private
        return private

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a thread; at most ``sessions`` threads per event loop wait on the token."""
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is not loop:
            self._sem, self._sem_loop = asyncio.Semaphore(self.config.sessions), loop
        async with self._sem:
            return await asyncio.to_thread(fn, *args)

    # --- KeyBackend -------------------------------------------------------------------------------------------
    def keys_sync(self) -> list[KeyInfo]:
        if not self._loaded:
            self._connect()
        return list(self._infos)

    async def keys(self) -> list[KeyInfo]:
        if self._loaded:  # public facts stay answerable while the token is down
            return list(self._infos)
        return await self._run(self.keys_sync)

    def unwrap_sync(self, kid: str, wrapped: bytes, ephemeral_public_key_pem: str | None = None) -> bytes:
        if not self._loaded:
            self._connect()
        spec = self._specs.get(kid)
        if spec is None or spec.status == "disabled":
            raise KeyNotFoundError.unknown(kid)
        p11 = self._p11
        try:
            if spec.algorithm is not None and spec.algorithm.startswith("rsa:"):
                if ephemeral_public_key_pem:
                    raise KeyUnwrapError("an RSA key cannot unwrap an ec-wrapped key access object")
                assert spec.oaep_hash is not None
                oaep = spec.oaep_hash
                share = self._with_session(kid, lambda _s, key: _rsa_decrypt(p11, key, wrapped, oaep))
            else:
                peer = _ephemeral(ephemeral_public_key_pem)
                secret = self._with_session(kid, lambda _s, key: _ecdh(p11, key, peer))
                share = P.aes_gcm_decrypt(P.hkdf_wrap_key(secret), wrapped)
        except _DataRejected:
            raise KeyUnwrapError("the wrapped key could not be unwrapped") from None
        except (ValueError, InvalidTag):
            raise KeyUnwrapError("the wrapped key could not be unwrapped") from None
        if len(share) != P.KEY_SIZE:
            raise KeyUnwrapError("the unwrapped key has the wrong length")
        return share

    async def unwrap(self, kid: str, wrapped: bytes, ephemeral_public_key_pem: str | None = None) -> bytes:
        return await self._run(self.unwrap_sync, kid, wrapped, ephemeral_public_key_pem)

    def health_sync(self) -> Health:
        try:
            conn = self._connect()

            def probe(pooled: _PooledSession, _key: Any) -> None:
                for kid in self._specs:  # a private object's attribute: session and login are alive
                    self._private(pooled, kid)[self._p11.Attribute.KEY_TYPE]

            self._with_session(None, probe)
        except _DataRejected as exc:
            return Health(ok=False, detail=f"pkcs11: {_ckr(exc.error)}", keys=len(self._infos))
        except KasRayError as exc:
            return Health(ok=False, detail=f"pkcs11: {exc.message}", keys=len(self._infos))
        ok = bool(self._infos)
        detail = (f"pkcs11 token {_label(conn.token)!r}, {len(conn.sessions)} sessions"
                  + ("" if ok else ", no keys"))
        return Health(ok=ok, detail=detail, keys=len(self._infos))

    async def health(self) -> Health:
        return await self._run(self.health_sync)

    def close_sync(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def close(self) -> None:
        await asyncio.to_thread(self.close_sync)


class _DataRejected(Exception):
    """The token refused the input while the session kept working (→ KeyUnwrapError)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(_ckr(error))
        self.error = error


def _session_alive(pkcs11: ModuleType, pooled: _PooledSession, private: Any) -> bool:
    """After an ambiguous error (e.g. CKR_GENERAL_ERROR): does the session still read the key?"""
    try:
        if private is not None:
            private[pkcs11.Attribute.KEY_TYPE]
        else:
            next(iter(pooled.session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY})), None)
        return True
    except pkcs11.PKCS11Error:
        return False


def _ephemeral(pem: str | None) -> ec.EllipticCurvePublicKey:
    if not pem:
        raise KeyUnwrapError("an EC key can only unwrap ec-wrapped key access objects")
    try:
        key = P.load_public_key_pem(pem)  # also checks the point is on the curve
    except ValueError:
        raise KeyUnwrapError("ephemeral public key is not a valid PEM") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise KeyUnwrapError("ephemeral public key is not a P-256 key")
    return key


# --- dev/CI provisioning ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _provision_lock(module: str, slot: int) -> Iterator[None]:
    """Serialise provisioning of one slot across processes (parallel test runs on one machine)."""
    name = hashlib.sha256(f"{module}:{slot}".encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"kas-ray-pkcs11-{name}.lock")
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _slot(lib: Any, slot: int) -> Any:
    for candidate in lib.get_slots(token_present=True):
        if candidate.slot_id == slot:
            return candidate
    present = ", ".join(str(s.slot_id) for s in lib.get_slots(token_present=True)) or "none"
    raise KeyBackendUnavailable(f"no PKCS#11 token in slot {slot} (slots with a token: {present})")


@contextlib.contextmanager
def _user_session(module: str, slot: int, user_pin: str, *, rw: bool = False) -> Iterator[Any]:
    """A session logged in as the user (C_Login directly: closing it does not log out other sessions)."""
    pkcs11 = _require()
    token = _slot(_load_lib(pkcs11, module), slot).get_token()
    session = token.open(rw=rw)
    try:
        rv = _login(module, session, user_pin)
        if rv not in (_CKR_OK, _CKR_USER_ALREADY_LOGGED_IN):
            raise KeyBackendUnavailable(f"PKCS#11 user login to slot {slot} failed: {_ckr_code(rv)}")
        yield session
    finally:
        _close_quietly(session)


def _init_user_pin(module: str, token: Any, so_pin: str, user_pin: str) -> None:
    session = token.open(rw=True)
    try:
        rv = _login(module, session, so_pin, _CKU_SO)
        if rv != _CKR_OK:
            raise KeyBackendUnavailable(f"PKCS#11 security officer login failed: {_ckr_code(rv)}")
        try:
            session.init_pin(user_pin)
        finally:
            _Cryptoki.of(module).logout(_handle(session))
    finally:
        _close_quietly(session)


def provision_token(module: str, slot: int, so_pin: str, user_pin: str, label: str) -> str:
    """Dev/CI: make the token in ``slot`` usable with ``user_pin``; idempotent, never wipes a used token.

    Uninitialised token: C_InitToken with ``so_pin`` (for opencryptoki, the factory SO PIN) and ``label``,
    then the user PIN. Initialised token with this label: the user PIN is set if it was never set or
    is locked; otherwise nothing changes. A token initialised with another label is refused (ConfigError).
    Returns what was done: ``"initialised"``, ``"user-pin-set"`` or ``"unchanged"``.
    """
    pkcs11 = _require()
    if len(label.encode()) > 32:
        raise ConfigError("a PKCS#11 token label has at most 32 bytes")
    with _provision_lock(module, slot):
        lib = _load_lib(pkcs11, module)
        token = _slot(lib, slot).get_token()
        flags = int(token.flags)
        if flags & _CKF_TOKEN_INITIALIZED:
            if _label(token) != label:
                raise ConfigError(f"slot {slot} holds token {_label(token)!r}, not {label!r}: not re-initialising it")
            if flags & _CKF_USER_PIN_INITIALIZED and not flags & _CKF_USER_PIN_LOCKED:
                return "unchanged"
            _init_user_pin(module, token, so_pin, user_pin)
            return "user-pin-set"
        pin = so_pin.encode()
        rv = _Cryptoki.of(module).init_token(slot, pin, len(pin), label.encode().ljust(32, b" "))
        if rv != _CKR_OK:
            raise KeyBackendUnavailable(f"C_InitToken on slot {slot} failed: {_ckr_code(rv)}")
        _init_user_pin(module, _slot(lib, slot).get_token(), so_pin, user_pin)
        return "initialised"


@dataclass(frozen=True)
class TokenKey:
    """A key pair on a token: what ``key_backend.pkcs11.keys`` needs, and its public key."""

    kid: str
    label: str | None
    id_hex: str | None
    algorithm: KeyAlgorithm
    oaep_hash: P.OaepHash | None
    public_key_pem: str
    extractable: bool = False
    sensitive: bool = True

    def key_config(self) -> Pkcs11KeyConfig:
        return Pkcs11KeyConfig(kid=self.kid, label=self.label, id_hex=self.id_hex, algorithm=self.algorithm,
                               oaep_hash=self.oaep_hash)


def _token_key(pkcs11: ModuleType, session: Any, spec: _KeySpec) -> TokenKey | None:
    A = pkcs11.Attribute
    private = _find_one(session, pkcs11, spec, pkcs11.ObjectClass.PRIVATE_KEY)
    if private is None:
        return None
    public_key = _public_key(pkcs11, spec, private, _find_one(session, pkcs11, spec, pkcs11.ObjectClass.PUBLIC_KEY))
    algorithm = _algorithm_of(spec, public_key)
    oaep = spec.oaep_hash or (None if algorithm.startswith("ec:") else P.oaep_hash_for(algorithm))
    key_id = bytes(private[A.ID] or b"")
    return TokenKey(kid=spec.kid, label=_label(private[A.LABEL] or "") or None, id_hex=key_id.hex() or None,
                    algorithm=algorithm, oaep_hash=oaep, public_key_pem=P.public_key_pem(public_key),
                    extractable=bool(private[A.EXTRACTABLE]), sensitive=bool(private[A.SENSITIVE]))


def generate_key(module: str, slot: int, user_pin: str, label: str, algorithm: KeyAlgorithm = "rsa:4096", *,
                 kid: str | None = None, id_hex: str | None = None, oaep_hash: P.OaepHash | None = None,
                 exist_ok: bool = False) -> TokenKey:
    """Generate a key pair on the token: private key non-extractable and sensitive, public key readable.

    RSA keys may only decrypt (public exponent 65537), EC keys (P-256) may only derive. ``id_hex``
    defaults to the first 8 bytes of SHA-256(label). An existing key with this label is an error unless
    ``exist_ok`` (then it is returned as found). ``oaep_hash`` default: SHA-1 for rsa:2048 (what OpenTDF
    clients use), SHA-256 otherwise. Generating rsa:4096 in a software token takes seconds to a minute.
    """
    pkcs11 = _require()
    A, M = pkcs11.Attribute, pkcs11.Mechanism
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"unsupported algorithm {algorithm!r} (one of {', '.join(ALGORITHMS)})")
    key_id = bytes.fromhex(id_hex) if id_hex else hashlib.sha256(label.encode()).digest()[:8]
    is_ec = algorithm.startswith("ec:")
    oaep = None if is_ec else (oaep_hash or P.oaep_hash_for(algorithm))
    spec = _KeySpec(kid=kid or label, label=label, id=None, algorithm=algorithm, oaep_hash=oaep)
    with _provision_lock(module, slot), _user_session(module, slot, user_pin, rw=True) as session:
        existing = _token_key(pkcs11, session, spec)
        if existing is not None:
            if exist_ok:
                return existing
            raise ConfigError(f"a key labelled {label!r} already exists on the token")
        mechanisms = _slot(_load_lib(pkcs11, module), slot).get_mechanisms()
        needed = M.EC_KEY_PAIR_GEN if is_ec else M.RSA_PKCS_KEY_PAIR_GEN
        if needed not in mechanisms:
            raise ConfigError(f"the token in slot {slot} cannot generate {algorithm} keys ({needed.name} missing)")
        private_template = {A.TOKEN: True, A.PRIVATE: True, A.SENSITIVE: True, A.EXTRACTABLE: False}
        public_template = {A.TOKEN: True, A.PRIVATE: False}
        try:
            if is_ec:
                from pkcs11.util.ec import encode_named_curve_parameters

                params = session.create_domain_parameters(
                    pkcs11.KeyType.EC, {A.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
                public, private = params.generate_keypair(
                    store=True, label=label, id=key_id, capabilities=pkcs11.MechanismFlag.DERIVE,
                    public_template=public_template, private_template=private_template)
            else:
                public, private = session.generate_keypair(
                    pkcs11.KeyType.RSA, int(algorithm.split(":")[1]), store=True, label=label, id=key_id,
                    capabilities=pkcs11.MechanismFlag.ENCRYPT | pkcs11.MechanismFlag.DECRYPT,
                    public_template={**public_template, A.PUBLIC_EXPONENT: b"\x01\x00\x01"},
                    private_template=private_template)
        except pkcs11.PKCS11Error as exc:
            raise ConfigError(f"generating a {algorithm} key on slot {slot} failed: {_ckr(exc)}") from None
        if private[A.EXTRACTABLE] or not private[A.SENSITIVE]:
            for obj in (private, public):
                obj.destroy()
            raise ConfigError("the token did not honour CKA_EXTRACTABLE=false / CKA_SENSITIVE=true")
        found = _token_key(pkcs11, session, spec)
        assert found is not None
        return found


def list_token_keys(module: str, slot: int, user_pin: str) -> list[TokenKey]:
    """Every RSA/EC key pair on the token with a label or id (for ``kas-ray keys`` and checks)."""
    pkcs11 = _require()
    with _user_session(module, slot, user_pin) as session:
        keys = []
        for spec in _discover(pkcs11, session):
            found = _token_key(pkcs11, session, spec)
            if found is not None:
                keys.append(found)
        return keys


def destroy_key(module: str, slot: int, user_pin: str, label: str) -> int:
    """Dev/CI: destroy the key pair labelled ``label``; returns how many objects were destroyed."""
    pkcs11 = _require()
    with _provision_lock(module, slot), _user_session(module, slot, user_pin, rw=True) as session:
        objects = list(session.get_objects({pkcs11.Attribute.LABEL: label}))
        for obj in objects:
            obj.destroy()
        return len(objects)

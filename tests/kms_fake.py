"""An in-process Cloud KMS for tests: the real ``google.cloud.kms.v1.KeyManagementService`` gRPC API.

The real ``google-cloud-kms`` clients (sync and asyncio) talk to it over plaintext loopback gRPC, so the
code under test runs unchanged. What it implements, as the real service does:

* GetPublicKey, AsymmetricDecrypt, CreateCryptoKeyVersion, GetCryptoKeyVersion, ListCryptoKeyVersions
  (paged, ``next_page_token``) on ``projects/P/locations/L/keyRings/R/cryptoKeys/K[/cryptoKeyVersions/N]``;
* a real RSA key per version, real OAEP (SHA-1 / SHA-256 by the version algorithm), real CRC32C
  (``google_crc32c``) on ``pem_crc32c``, ``ciphertext_crc32c`` → ``verified_ciphertext_crc32c`` and
  ``plaintext_crc32c``;
* new versions are ``PENDING_GENERATION`` for ``pending_seconds``, then ``ENABLED``; a version that is not
  enabled answers FAILED_PRECONDITION; an unknown name NOT_FOUND; a bad ciphertext INVALID_ARGUMENT.

Stricter than Google (so tests can assert the client does it right): AsymmetricDecrypt without a
``ciphertext_crc32c`` is refused (``require_ciphertext_crc``), and a wrong one is INVALID_ARGUMENT.

Fault injection (:meth:`FakeKms.inject`): ``unavailable`` (UNAVAILABLE), ``deadline`` (the handler sleeps
past the client's deadline), ``bad_crc`` (a response whose checksum does not match: plaintext_crc32c /
pem_crc32c off by one, or ``verified_ciphertext_crc32c`` false), each for ``times`` calls or persistently.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import google_crc32c
import grpc
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.cloud import kms_v1

SERVICE = "google.cloud.kms.v1.KeyManagementService"
Algorithm = kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm
State = kms_v1.CryptoKeyVersion.CryptoKeyVersionState
#: (key size, OAEP hash) per supported version algorithm.
RSA_DECRYPT = {
    "RSA_DECRYPT_OAEP_2048_SHA256": (2048, hashes.SHA256),
    "RSA_DECRYPT_OAEP_3072_SHA256": (3072, hashes.SHA256),
    "RSA_DECRYPT_OAEP_4096_SHA256": (4096, hashes.SHA256),
    "RSA_DECRYPT_OAEP_2048_SHA1": (2048, hashes.SHA1),
    "RSA_DECRYPT_OAEP_3072_SHA1": (3072, hashes.SHA1),
    "RSA_DECRYPT_OAEP_4096_SHA1": (4096, hashes.SHA1),
}
METHODS = ("GetPublicKey", "AsymmetricDecrypt", "CreateCryptoKeyVersion", "GetCryptoKeyVersion",
           "ListCryptoKeyVersions")

#: Generated RSA keys by size, reused across fakes of one test session (4096-bit generation is slow).
_KEY_POOL: dict[int, list[rsa.RSAPrivateKey]] = {}
_POOL_LOCK = threading.Lock()


def _new_private_key(bits: int, index: int) -> rsa.RSAPrivateKey:
    """The ``index``-th key of this size in this process: distinct per version, generated once."""
    with _POOL_LOCK:
        pool = _KEY_POOL.setdefault(bits, [])
        while len(pool) <= index:
            pool.append(rsa.generate_private_key(public_exponent=65537, key_size=bits))
        return pool[index]


def crc32c(data: bytes) -> int:
    return int(google_crc32c.value(data))


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Fault:
    kind: str  # "unavailable" | "deadline" | "bad_crc"
    #: Calls left to fail; None = every call until cleared.
    remaining: int | None
    methods: frozenset[str]
    #: For "deadline": how long the handler sleeps.
    delay: float = 3.0
    #: For "bad_crc" on AsymmetricDecrypt: "plaintext" (plaintext_crc32c off) or "unverified".
    crc: str = "plaintext"


@dataclass
class FakeVersion:
    name: str
    algorithm: str
    created: datetime
    enabled_at: float
    #: Set once generated (in the background for a new version, as the real service does).
    key_ready: threading.Event = field(default_factory=threading.Event)
    _private_key: rsa.RSAPrivateKey | None = None
    #: Explicit state (DISABLED, DESTROYED); None = PENDING_GENERATION until generated and enabled_at.
    forced_state: str | None = None

    @property
    def number(self) -> int:
        return int(self.name.rsplit("/", 1)[1])

    @property
    def private_key(self) -> rsa.RSAPrivateKey:
        self.key_ready.wait(60)
        assert self._private_key is not None
        return self._private_key

    def state(self) -> str:
        if self.forced_state is not None:
            return self.forced_state
        ready = self.key_ready.is_set() and time.monotonic() >= self.enabled_at
        return "ENABLED" if ready else "PENDING_GENERATION"

    def proto(self) -> kms_v1.CryptoKeyVersion:
        state = self.state()
        return kms_v1.CryptoKeyVersion(
            name=self.name, state=State[state], algorithm=Algorithm[self.algorithm],
            protection_level=kms_v1.ProtectionLevel.HSM, create_time=self.created,
            generate_time=self.created if state != "PENDING_GENERATION" else None,
        )


@dataclass
class FakeKey:
    name: str
    algorithm: str
    versions: list[FakeVersion] = field(default_factory=list)


class FakeKms:
    """The fake service; :meth:`start` serves it on ``127.0.0.1:<free port>`` (``address``)."""

    def __init__(self, *, pending_seconds: float = 0.3, page_size: int = 2,
                 require_ciphertext_crc: bool = True) -> None:
        self.pending_seconds = pending_seconds
        self.page_size = page_size
        self.require_ciphertext_crc = require_ciphertext_crc
        self.keys: dict[str, FakeKey] = {}
        self.calls: Counter[str] = Counter()
        #: Every AsymmetricDecrypt request as received (name, ciphertext_crc32c).
        self.decrypt_requests: list[tuple[str, int | None]] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: grpc.Server | None = None
        self.address = ""

    # --- setup ------------------------------------------------------------------------------------------
    def add_key(self, project: str, location: str, key_ring: str, key_id: str,
                algorithm: str = "RSA_DECRYPT_OAEP_4096_SHA256", versions: int = 1) -> str:
        """A CryptoKey with ``versions`` ENABLED versions; returns its resource name."""
        if algorithm not in RSA_DECRYPT:
            raise ValueError(f"the fake supports only {sorted(RSA_DECRYPT)}")
        name = f"projects/{project}/locations/{location}/keyRings/{key_ring}/cryptoKeys/{key_id}"
        with self._lock:
            self.keys[name] = FakeKey(name=name, algorithm=algorithm)
        for _ in range(versions):
            self._new_version(name, pending=False)
        return name

    def _new_version(self, key_name: str, *, pending: bool) -> FakeVersion:
        key = self.keys[key_name]
        bits = RSA_DECRYPT[key.algorithm][0]
        with self._lock:
            number = len(key.versions) + 1
            index = sum(len(k.versions) for k in self.keys.values() if RSA_DECRYPT[k.algorithm][0] == bits)
            version = FakeVersion(name=f"{key_name}/cryptoKeyVersions/{number}", algorithm=key.algorithm,
                                  created=datetime.now(UTC),
                                  enabled_at=time.monotonic() + (self.pending_seconds if pending else 0.0))
            key.versions.append(version)

        def generate() -> None:
            version._private_key = _new_private_key(bits, index)
            version.key_ready.set()

        if pending:  # CreateCryptoKeyVersion answers at once; the key is generated meanwhile
            threading.Thread(target=generate, name=f"fake-kms-keygen-{number}", daemon=True).start()
        else:
            generate()
        return version

    def version(self, name: str) -> FakeVersion:
        key_name = name.split("/cryptoKeyVersions/", 1)[0]
        key = self.keys.get(key_name)
        for version in key.versions if key else []:
            if version.name == name:
                return version
        raise _Abort(grpc.StatusCode.NOT_FOUND, f"CryptoKeyVersion {name} not found.")

    def set_state(self, name: str, state: str | None) -> None:
        """Force a version's state (``DISABLED``, ``DESTROYED``); None = back to its natural state."""
        self.version(name).forced_state = state

    def private_key(self, name: str) -> rsa.RSAPrivateKey:
        return self.version(name).private_key

    # --- faults -----------------------------------------------------------------------------------------
    def inject(self, kind: str, times: int | None = 1, methods: tuple[str, ...] | None = None, *,
               delay: float = 3.0, crc: str = "plaintext") -> None:
        if kind not in ("unavailable", "deadline", "bad_crc"):
            raise ValueError(kind)
        with self._lock:
            self._faults.append(Fault(kind, times, frozenset(methods or METHODS), delay, crc))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if method in fault.methods and (fault.remaining is None or fault.remaining > 0):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    return fault
        return None

    # --- handlers -----------------------------------------------------------------------------------------
    def _get_public_key(self, request: kms_v1.GetPublicKeyRequest, fault: Fault | None) -> kms_v1.PublicKey:
        version = self._enabled(request.name)
        pem = version.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        checksum = crc32c(pem.encode())
        if fault is not None and fault.kind == "bad_crc":
            checksum = (checksum + 1) % (1 << 32)
        return kms_v1.PublicKey(pem=pem, pem_crc32c=checksum, algorithm=Algorithm[version.algorithm],
                                name=version.name, protection_level=kms_v1.ProtectionLevel.HSM)

    def _asymmetric_decrypt(self, request: kms_v1.AsymmetricDecryptRequest,
                            fault: Fault | None) -> kms_v1.AsymmetricDecryptResponse:
        sent_crc = request.ciphertext_crc32c
        self.decrypt_requests.append((request.name, sent_crc))
        if sent_crc is None and self.require_ciphertext_crc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "test fake: ciphertext_crc32c is required")
        if sent_crc is not None and sent_crc != crc32c(request.ciphertext):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         "The checksum in field ciphertext_crc32c did not match the data in field ciphertext.")
        version = self._enabled(request.name)
        hash_cls = RSA_DECRYPT[version.algorithm][1]
        oaep = padding.OAEP(mgf=padding.MGF1(algorithm=hash_cls()), algorithm=hash_cls(), label=None)
        try:
            plaintext = version.private_key.decrypt(request.ciphertext, oaep)
        except ValueError:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         "Decryption failed: the ciphertext is invalid.") from None
        checksum, verified = crc32c(plaintext), sent_crc is not None
        if fault is not None and fault.kind == "bad_crc":
            if fault.crc == "unverified":
                verified = False
            else:
                checksum = (checksum + 1) % (1 << 32)
        return kms_v1.AsymmetricDecryptResponse(plaintext=plaintext, plaintext_crc32c=checksum,
                                                verified_ciphertext_crc32c=verified,
                                                protection_level=kms_v1.ProtectionLevel.HSM)

    def _create_crypto_key_version(self, request: kms_v1.CreateCryptoKeyVersionRequest,
                                   fault: Fault | None) -> kms_v1.CryptoKeyVersion:
        if request.parent not in self.keys:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"CryptoKey {request.parent} not found.")
        return self._new_version(request.parent, pending=True).proto()

    def _get_crypto_key_version(self, request: kms_v1.GetCryptoKeyVersionRequest,
                                fault: Fault | None) -> kms_v1.CryptoKeyVersion:
        return self.version(request.name).proto()

    def _list_crypto_key_versions(self, request: kms_v1.ListCryptoKeyVersionsRequest,
                                  fault: Fault | None) -> kms_v1.ListCryptoKeyVersionsResponse:
        key = self.keys.get(request.parent)
        if key is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"CryptoKey {request.parent} not found.")
        with self._lock:
            versions = list(key.versions)
        start = int(request.page_token or 0)
        size = request.page_size or self.page_size
        page = versions[start:start + size]
        token = str(start + size) if start + size < len(versions) else ""
        return kms_v1.ListCryptoKeyVersionsResponse(crypto_key_versions=[v.proto() for v in page],
                                                    next_page_token=token, total_size=len(versions))

    def _enabled(self, name: str) -> FakeVersion:
        version = self.version(name)
        state = version.state()
        if state != "ENABLED":
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"The request cannot be fulfilled. Resource {name} has value {state} in field "
                         "crypto_key_version.state.")
        return version

    # --- gRPC plumbing ------------------------------------------------------------------------------------
    def _handler(self, method: str, impl: Any) -> Any:
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            self.calls[method] += 1
            fault = self._take_fault(method)
            if fault is not None and fault.kind == "unavailable":
                context.abort(grpc.StatusCode.UNAVAILABLE, "test fake: the service is unavailable")
            if fault is not None and fault.kind == "deadline":
                self._stopping.wait(fault.delay)  # past the client's deadline; server stop ends it early
                if not context.is_active():
                    return None
            try:
                return impl(request, fault)
            except _Abort as exc:
                context.abort(exc.code, exc.message)

        return handle

    def start(self) -> str:
        types = {
            "GetPublicKey": (kms_v1.GetPublicKeyRequest, kms_v1.PublicKey, self._get_public_key),
            "AsymmetricDecrypt": (kms_v1.AsymmetricDecryptRequest, kms_v1.AsymmetricDecryptResponse,
                                  self._asymmetric_decrypt),
            "CreateCryptoKeyVersion": (kms_v1.CreateCryptoKeyVersionRequest, kms_v1.CryptoKeyVersion,
                                       self._create_crypto_key_version),
            "GetCryptoKeyVersion": (kms_v1.GetCryptoKeyVersionRequest, kms_v1.CryptoKeyVersion,
                                    self._get_crypto_key_version),
            "ListCryptoKeyVersions": (kms_v1.ListCryptoKeyVersionsRequest, kms_v1.ListCryptoKeyVersionsResponse,
                                      self._list_crypto_key_versions),
        }
        handlers = {
            method: grpc.unary_unary_rpc_method_handler(
                self._handler(method, impl), request_deserializer=req.deserialize,
                response_serializer=resp.serialize)
            for method, (req, resp, impl) in types.items()
        }
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        self.address = f"127.0.0.1:{port}"
        return self.address

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.stop(grace=0).wait(5)
            self._server = None

    def __enter__(self) -> FakeKms:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

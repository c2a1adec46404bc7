"""Google Cloud KMS key backend: a nation's RSA-OAEP decrypt keys stay in Cloud KMS (HSM protection).

Only the HSM actor uses it. Wrapping is always local with the public key (clients fetch it from the
KAS); Cloud KMS is called for three things only: listing key versions, reading a version's public key
and ``AsymmetricDecrypt`` of a wrapped share.

Resources, per nation (``key_backend.gcp`` of its settings)::

    projects/{project}/locations/{location}/keyRings/{key_ring}/cryptoKeys/{key id}/cryptoKeyVersions/{N}

``keys`` maps a KAS algorithm to a CryptoKey id (``rsa:2048`` → ``kas-rsa-2048``); every ENABLED version of
each key is usable. Kid of a version: ``{nation}-kms-{key id}-v{N}`` (e.g. ``fra-kms-kas-rsa-4096-v3``);
``KeyInfo.version`` is the full version resource name (part of share cache keys). The newest ENABLED
version of a key is ``active`` (published), older ENABLED ones ``retired`` (still decrypt); versions in any
other state are not listed, so their kids are unknown.

Every call has a deadline: at most ``max_attempts`` attempts of at most ``attempt_timeout_seconds`` each,
with jittered exponential backoff, all within ``timeout_seconds``; transient failures (UNAVAILABLE,
DEADLINE_EXCEEDED, INTERNAL, RESOURCE_EXHAUSTED, ABORTED, a checksum mismatch) are retried, then become
:class:`KeyBackendUnavailable` (503 + Retry-After). The library's own retries are switched off (its
defaults retry UNAVAILABLE for 60 s). CRC32C guards every payload: ``ciphertext_crc32c`` on the request,
``verified_ciphertext_crc32c`` and ``plaintext_crc32c`` on the response, ``pem_crc32c`` on public keys.

Needs the ``gcp`` extra: ``pip install 'kas-ray[gcp]'``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import ModuleType
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import rsa

from kas_ray.config import DEFAULT_KMS_LOCATIONS, GcpKmsConfig
from kas_ray.errors import ConfigError, KasRayError, KeyBackendUnavailable, KeyNotFoundError, KeyUnwrapError
from kas_ray.hazmat import primitives as P
from kas_ray.keys.base import Health, KeyBackend, KeyInfo, KeyStatus
from kas_ray.ztdf.keyaccess import KeyAlgorithm

logger = logging.getLogger("kas_ray.keys.gcp_kms")

INSTALL_HINT = "pip install 'kas-ray[gcp]'"
KMS_SCOPE = "https://www.googleapis.com/auth/cloudkms"

#: Cloud KMS version algorithm → (KAS algorithm, OAEP hash). RSA_DECRYPT_OAEP_4096_SHA512 is not supported
#: (no TDF client wraps with OAEP-SHA512).
KMS_ALGORITHMS: dict[str, tuple[KeyAlgorithm, P.OaepHash]] = {
    "RSA_DECRYPT_OAEP_2048_SHA256": ("rsa:2048", "sha256"),
    "RSA_DECRYPT_OAEP_3072_SHA256": ("rsa:3072", "sha256"),
    "RSA_DECRYPT_OAEP_4096_SHA256": ("rsa:4096", "sha256"),
    "RSA_DECRYPT_OAEP_2048_SHA1": ("rsa:2048", "sha1"),
    "RSA_DECRYPT_OAEP_3072_SHA1": ("rsa:3072", "sha1"),
    "RSA_DECRYPT_OAEP_4096_SHA1": ("rsa:4096", "sha1"),
}

_VERSION_NAME = re.compile(
    r"^projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/keyRings/(?P<ring>[^/]+)"
    r"/cryptoKeys/(?P<key>[^/]+)/cryptoKeyVersions/(?P<n>[1-9][0-9]*)$"
)
#: Backoff between attempts: first pause, growth factor, cap (seconds; full jitter).
_BACKOFF_INITIAL, _BACKOFF_FACTOR, _BACKOFF_MAX = 0.1, 2.0, 1.0
#: An attempt with less time than this left is not started.
_MIN_ATTEMPT = 0.05
#: Slack on top of the gRPC deadline before an attempt is abandoned locally (a hung channel never hangs us).
_GUARD = 0.25
#: Minimum seconds between forced re-listings (unknown kid, disabled version).
_FORCED_REFRESH_INTERVAL = 1.0
#: After a failed listing, the next attempt waits at least this long (keys() serves the last good list).
_FAILED_REFRESH_BACKOFF = 5.0
_KEY_SIZE = P.KEY_SIZE

T = TypeVar("T")


# --- the optional dependency ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Kms:
    kms_v1: ModuleType
    crc32c: ModuleType
    exceptions: ModuleType


def _require() -> _Kms:
    """The Cloud KMS client modules, or an ImportError that says how to install them."""
    try:
        import google_crc32c
        from google.api_core import exceptions
        from google.cloud import kms_v1
    except ImportError as exc:
        raise ImportError(f"the gcp-kms key backend needs the gcp extra: {INSTALL_HINT} ({exc})") from exc
    return _Kms(kms_v1=kms_v1, crc32c=google_crc32c, exceptions=exceptions)


def crc32c(data: bytes) -> int:
    import google_crc32c

    return int(google_crc32c.value(data))


# --- names and kids ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KmsLayout:
    """Where one nation's keys live, and how version names map to kids."""

    nation: str
    project: str
    location: str
    key_ring: str
    #: KAS algorithm → CryptoKey id, in configuration order.
    keys: tuple[tuple[str, str], ...]

    @classmethod
    def from_config(cls, config: GcpKmsConfig, nation: str) -> KmsLayout:
        nation = nation.upper()
        location = config.location or DEFAULT_KMS_LOCATIONS.get(nation)
        if not location:
            raise ConfigError(f"{nation}: set key_backend.gcp.location (no default Cloud KMS location for "
                              f"this nation; defaults exist for {', '.join(sorted(DEFAULT_KMS_LOCATIONS))})")
        if not config.keys:
            raise ConfigError(f"{nation}: key_backend.gcp.keys names no CryptoKey")
        for algorithm in config.keys:
            if algorithm not in ("rsa:2048", "rsa:3072", "rsa:4096"):
                raise ConfigError(f"{nation}: Cloud KMS keys are RSA decrypt keys; {algorithm!r} is not supported")
        return cls(nation=nation, project=config.project, location=location, key_ring=config.key_ring,
                   keys=tuple(config.keys.items()))

    @property
    def key_ring_name(self) -> str:
        return f"projects/{self.project}/locations/{self.location}/keyRings/{self.key_ring}"

    def key_name(self, key_id: str) -> str:
        return f"{self.key_ring_name}/cryptoKeys/{key_id}"

    def key_id_for(self, algorithm: str) -> str:
        for configured, key_id in self.keys:
            if configured == algorithm:
                return key_id
        raise ConfigError(f"{self.nation}: no Cloud KMS key configured for {algorithm} "
                          f"(key_backend.gcp.keys has {', '.join(a for a, _ in self.keys)})")

    def kid(self, version_name: str) -> str:
        match = _VERSION_NAME.match(version_name)
        if match is None or not version_name.startswith(self.key_ring_name + "/"):
            raise ValueError(f"not a key version of {self.key_ring_name}: {version_name!r}")
        return f"{self.nation.lower()}-kms-{match['key']}-v{match['n']}"

    def version_name(self, kid: str) -> str | None:
        """The version a kid of this nation names, or None if it is not one of ours."""
        prefix = f"{self.nation.lower()}-kms-"
        if not kid.startswith(prefix) or "-v" not in kid:
            return None
        key_id, _, number = kid[len(prefix):].rpartition("-v")
        if not number.isdigit() or number.startswith("0") or key_id not in {k for _, k in self.keys}:
            return None
        return f"{self.key_name(key_id)}/cryptoKeyVersions/{number}"


def version_number(version_name: str) -> int:
    return int(version_name.rsplit("/", 1)[1])


@dataclass(frozen=True)
class VersionRow:
    """One key version as ``kas-ray keys list`` shows it (any state)."""

    kid: str
    name: str
    state: str
    algorithm: str
    created: datetime | None


# --- retries, deadlines and error mapping ------------------------------------------------------------------
class _IntegrityError(Exception):
    """A response failed its CRC32C check (retried: corruption in transit)."""


@dataclass(frozen=True)
class RetryPolicy:
    """At most ``attempts`` attempts of at most ``attempt_timeout`` s each, all within ``deadline`` s."""

    deadline: float
    attempts: int
    attempt_timeout: float

    @classmethod
    def from_config(cls, config: GcpKmsConfig) -> RetryPolicy:
        attempt = config.attempt_timeout_seconds or config.timeout_seconds / config.max_attempts
        return cls(deadline=config.timeout_seconds, attempts=config.max_attempts,
                   attempt_timeout=min(attempt, config.timeout_seconds))

    def backoff(self, attempt: int) -> float:
        ceiling = min(_BACKOFF_MAX, _BACKOFF_INITIAL * _BACKOFF_FACTOR ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not a secret


def _retryable(kms: _Kms) -> tuple[type[BaseException], ...]:
    e = kms.exceptions
    from google.auth import exceptions as auth_exceptions

    return (e.ServiceUnavailable, e.DeadlineExceeded, e.InternalServerError, e.TooManyRequests, e.Aborted,
            e.Unknown, auth_exceptions.TransportError, _IntegrityError, TimeoutError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, _IntegrityError | TimeoutError):
        return str(exc) or "timed out"
    message = getattr(exc, "message", None) or str(exc)
    code = getattr(exc, "grpc_status_code", None)
    label = getattr(code, "name", None) or type(exc).__name__
    return f"{label}: {' '.join(str(message).split())[:200]}"


def _final_error(kms: _Kms, exc: BaseException, what: str, *, decrypt: bool = False) -> KasRayError:
    """A non-retryable failure as the kas-ray error the KAS answers with."""
    e = kms.exceptions
    from google.auth import exceptions as auth_exceptions

    if isinstance(exc, KasRayError):
        return exc
    if isinstance(exc, e.NotFound):
        return KeyNotFoundError(f"{what}: not found in Cloud KMS")
    if isinstance(exc, e.FailedPrecondition):
        return KeyNotFoundError(f"{what}: the key version is not enabled ({_describe(exc)})")
    if isinstance(exc, e.InvalidArgument) and decrypt:
        return KeyUnwrapError("the wrapped key could not be unwrapped")
    if isinstance(exc, e.Forbidden | e.Unauthorized):
        return KeyBackendUnavailable(f"Cloud KMS refused {what} ({_describe(exc)}); check the KAS service "
                                     "account's roles (cloudkms.cryptoKeyDecrypter, cloudkms.publicKeyViewer)")
    if isinstance(exc, auth_exceptions.GoogleAuthError):
        return KeyBackendUnavailable(f"no usable Google credentials for Cloud KMS: {exc}")
    return KeyBackendUnavailable(f"Cloud KMS failed {what}: {_describe(exc)}")


def _exhausted(what: str, attempts: int, started: float, now: float,
               last: BaseException | None) -> KeyBackendUnavailable:
    detail = _describe(last) if last is not None else "no time left"
    return KeyBackendUnavailable(f"Cloud KMS did not complete {what} after {attempts} attempt(s) in "
                                 f"{now - started:.1f}s: {detail}")


async def _call_async(kms: _Kms, policy: RetryPolicy, what: str, attempt: Callable[[float], Awaitable[T]], *,
                      decrypt: bool = False, retry_on: tuple[type[BaseException], ...] | None = None) -> T:
    """Run ``attempt(timeout)`` under ``policy``; every failure ends as a kas-ray error, in bounded time."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + policy.deadline
    retry_on = retry_on if retry_on is not None else _retryable(kms)
    last: BaseException | None = None
    made = 0
    for number in range(1, policy.attempts + 1):
        remaining = deadline - loop.time()
        if remaining < _MIN_ATTEMPT:
            break
        timeout = min(policy.attempt_timeout, remaining)
        made = number
        try:
            async with asyncio.timeout(timeout + _GUARD):
                return await attempt(timeout)
        except retry_on as exc:
            last = exc
            logger.info("Cloud KMS %s attempt %d/%d failed: %s", what, number, policy.attempts, _describe(exc))
        except Exception as exc:  # noqa: BLE001 - mapped to a kas-ray error, never leaked as a 500
            raise _final_error(kms, exc, what, decrypt=decrypt) from None
        if number < policy.attempts:
            pause = min(policy.backoff(number), deadline - loop.time() - _MIN_ATTEMPT)
            if pause <= 0:
                break
            await asyncio.sleep(pause)
    raise _exhausted(what, made, started, loop.time(), last)


def _call_sync(kms: _Kms, policy: RetryPolicy, what: str, attempt: Callable[[float], T], *,
               retry_on: tuple[type[BaseException], ...] | None = None) -> T:
    """The blocking twin of :func:`_call_async` (command line tools)."""
    started = time.monotonic()
    deadline = started + policy.deadline
    retry_on = retry_on if retry_on is not None else _retryable(kms)
    last: BaseException | None = None
    made = 0
    for number in range(1, policy.attempts + 1):
        remaining = deadline - time.monotonic()
        if remaining < _MIN_ATTEMPT:
            break
        made = number
        try:
            return attempt(min(policy.attempt_timeout, remaining))
        except retry_on as exc:
            last = exc
        except Exception as exc:  # noqa: BLE001
            raise _final_error(kms, exc, what) from None
        if number < policy.attempts:
            pause = min(policy.backoff(number), deadline - time.monotonic() - _MIN_ATTEMPT)
            if pause <= 0:
                break
            time.sleep(pause)
    raise _exhausted(what, made, started, time.monotonic(), last)


# --- clients ----------------------------------------------------------------------------------------------
def _credentials(config: GcpKmsConfig) -> Any:
    """Credentials from the service-account file, or None for Application Default Credentials."""
    if not config.credentials_file:
        return None
    from google.oauth2 import service_account

    try:
        return service_account.Credentials.from_service_account_file(config.credentials_file, scopes=[KMS_SCOPE])
    except (OSError, ValueError) as exc:
        raise KeyBackendUnavailable(f"cannot load the Cloud KMS service account file "
                                    f"{config.credentials_file}: {exc}") from None


def _adc() -> Any:
    import google.auth
    from google.auth import exceptions as auth_exceptions

    try:
        credentials, _ = google.auth.default(scopes=[KMS_SCOPE])
    except auth_exceptions.DefaultCredentialsError as exc:
        raise KeyBackendUnavailable(f"no Application Default Credentials for Cloud KMS: {exc}") from None
    return credentials


def sync_client(config: GcpKmsConfig) -> Any:
    """A blocking ``KeyManagementServiceClient`` for ``config`` (plaintext gRPC only for insecure_endpoint)."""
    kms = _require()
    if config.insecure_endpoint:
        import grpc
        from google.cloud.kms_v1.services.key_management_service.transports import KeyManagementServiceGrpcTransport

        channel = grpc.insecure_channel(config.insecure_endpoint)
        return kms.kms_v1.KeyManagementServiceClient(transport=KeyManagementServiceGrpcTransport(channel=channel))
    credentials = _credentials(config) or _adc()
    return kms.kms_v1.KeyManagementServiceClient(credentials=credentials)


async def async_client(config: GcpKmsConfig) -> Any:
    """A ``KeyManagementServiceAsyncClient`` bound to the running event loop."""
    kms = _require()
    if config.insecure_endpoint:
        import grpc
        from google.cloud.kms_v1.services.key_management_service.transports import (
            KeyManagementServiceGrpcAsyncIOTransport,
        )

        channel = grpc.aio.insecure_channel(config.insecure_endpoint)
        transport = KeyManagementServiceGrpcAsyncIOTransport(channel=channel)
        return kms.kms_v1.KeyManagementServiceAsyncClient(transport=transport)
    # Finding ADC may probe the metadata server: keep it off the event loop.
    credentials = _credentials(config) or await asyncio.to_thread(_adc)
    return kms.kms_v1.KeyManagementServiceAsyncClient(credentials=credentials)


def _checked_pem(kms: _Kms, response: Any, name: str) -> tuple[str, str]:
    """(PEM, KMS algorithm) of a GetPublicKey response, after its name and CRC32C checks."""
    if response.name and response.name != name:
        raise _IntegrityError(f"GetPublicKey answered for {response.name}, not {name}")
    pem = response.pem
    if response.pem_crc32c is None or int(response.pem_crc32c) != crc32c(pem.encode()):
        raise _IntegrityError("the public key failed its pem_crc32c check")
    return pem, kms.kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm(response.algorithm).name


def _created(version: Any) -> datetime | None:
    """A version's create_time as a plain UTC datetime (proto-plus gives a subclass)."""
    value = version.create_time
    return datetime.fromtimestamp(value.timestamp(), tz=UTC) if isinstance(value, datetime) else None


def _key_info(layout: KmsLayout, name: str, algorithm_name: str, pem: str, created: datetime | None,
              status: KeyStatus) -> KeyInfo:
    algorithm, oaep = KMS_ALGORITHMS[algorithm_name]
    key = P.load_public_key_pem(pem)
    if not isinstance(key, rsa.RSAPublicKey) or f"rsa:{key.key_size}" != algorithm:
        raise KeyBackendUnavailable(f"Cloud KMS returned a public key for {name} that is not {algorithm}")
    return KeyInfo(kid=layout.kid(name), algorithm=algorithm, oaep_hash=oaep, status=status, created=created,
                   public_key_pem=pem, version=name)


# --- the backend -------------------------------------------------------------------------------------------
class GcpKmsBackend(KeyBackend):
    """One nation's keys in Cloud KMS; the async client is created lazily inside the running event loop."""

    def __init__(self, config: GcpKmsConfig, nation: str) -> None:
        self._kms = _require()
        self.config = config
        self.nation = nation.upper()
        self.layout = KmsLayout.from_config(config, self.nation)
        self.policy = RetryPolicy.from_config(config)
        self.ttl = config.key_list_ttl_seconds
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._client_lock = asyncio.Lock()
        self._infos: list[KeyInfo] = []
        self._by_kid: dict[str, KeyInfo] = {}
        #: Public keys by version name: immutable for a version, so cached for the life of the backend.
        self._pems: dict[str, tuple[str, str]] = {}
        self._listed_at: float | None = None  # monotonic time of the last good listing
        self._refresh_not_before = 0.0
        self._forced_at = float("-inf")  # last re-listing for an unknown kid (rate limited)
        self._probed_at = float("-inf")  # last readiness probe after a failure (rate limited)
        self._last_error: str | None = None

    # --- client and loop -----------------------------------------------------------------------------------
    async def _get_client(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # First use, or a new event loop: a client (and a lock) belongs to the loop it was made in.
            self._client, self._loop = None, loop
            self._lock, self._client_lock = asyncio.Lock(), asyncio.Lock()
        if self._client is None:
            async with self._client_lock:  # one client, however many calls arrive first
                if self._client is None:
                    self._client = await async_client(self.config)
        return self._client

    def _refresh_lock(self) -> asyncio.Lock:
        assert self._lock is not None
        return self._lock

    async def _call(self, what: str, attempt: Callable[[Any, float], Awaitable[T]], *, decrypt: bool = False) -> T:
        client = await self._get_client()
        try:
            result = await _call_async(self._kms, self.policy, what, lambda timeout: attempt(client, timeout),
                                       decrypt=decrypt)
        except KeyBackendUnavailable as exc:
            self._last_error = exc.message
            raise
        self._last_error = None
        return result

    # --- listing --------------------------------------------------------------------------------------------
    def _fresh(self) -> bool:
        return self._listed_at is not None and time.monotonic() - self._listed_at < self.ttl

    async def keys(self) -> list[KeyInfo]:
        if not self._fresh():
            await self._refresh(force=False)
        return list(self._infos)

    async def refresh(self) -> list[KeyInfo]:
        """List the key versions now (after a rotation); returns the usable keys."""
        await self._refresh(force=True)
        return list(self._infos)

    async def _refresh(self, *, force: bool) -> None:
        await self._get_client()
        requested = time.monotonic()
        async with self._refresh_lock():
            if self._listed_at is not None and self._listed_at >= requested:
                return  # another caller listed while we waited (single flight)
            if not force and self._fresh():
                return
            if time.monotonic() < self._refresh_not_before:  # the last listing failed moments ago
                if self._infos:
                    return  # serve the previous list
                raise KeyBackendUnavailable(f"Cloud KMS listing failed recently: {self._last_error}")
            try:
                infos = await self._list_usable()
            except KasRayError as exc:
                self._refresh_not_before = time.monotonic() + min(self.ttl, _FAILED_REFRESH_BACKOFF)
                if self._infos and isinstance(exc, KeyBackendUnavailable):
                    logger.warning("%s: Cloud KMS listing failed, serving the previous key list: %s",
                                   self.nation, exc.message)
                    return
                raise
            self._infos, self._by_kid = infos, {i.kid: i for i in infos}
            self._listed_at = time.monotonic()

    async def _list_usable(self) -> list[KeyInfo]:
        infos: list[KeyInfo] = []
        for configured, key_id in self.layout.keys:
            versions = await self._versions(self.layout.key_name(key_id))
            enabled = sorted((v for v in versions if v.state.name == "ENABLED"),
                             key=lambda v: version_number(v.name), reverse=True)
            active_seen = False
            for version in enabled:
                algorithm_name = version.algorithm.name
                if algorithm_name not in KMS_ALGORITHMS:
                    logger.warning("%s: skipping %s: %s is not an RSA-OAEP algorithm kas-ray supports",
                                   self.nation, version.name, algorithm_name)
                    continue
                try:
                    pem, _ = await self._public_key(version.name)
                except KeyNotFoundError:  # disabled between the listing and this call
                    continue
                status: KeyStatus = "retired"
                if not active_seen and KMS_ALGORITHMS[algorithm_name][0] == configured:
                    status, active_seen = "active", True
                infos.append(_key_info(self.layout, version.name, algorithm_name, pem, _created(version), status))
            if not active_seen:
                logger.warning("%s: Cloud KMS key %s has no ENABLED %s version", self.nation, key_id, configured)
        return infos

    async def _versions(self, key_name: str) -> list[Any]:
        async def attempt(client: Any, timeout: float) -> list[Any]:
            pager = await client.list_crypto_key_versions(request={"parent": key_name}, retry=None,
                                                          timeout=timeout)
            versions = []
            async for version in pager:  # further pages: same budget (the pager reuses retry/timeout)
                versions.append(version)
            return versions

        try:
            return await self._call(f"ListCryptoKeyVersions {key_name}", attempt)
        except KeyNotFoundError:
            raise KeyBackendUnavailable(f"Cloud KMS key {key_name} does not exist (check key_backend.gcp)") from None

    async def _public_key(self, name: str) -> tuple[str, str]:
        cached = self._pems.get(name)
        if cached is not None:
            return cached

        async def attempt(client: Any, timeout: float) -> tuple[str, str]:
            response = await client.get_public_key(request={"name": name}, retry=None, timeout=timeout)
            return _checked_pem(self._kms, response, name)

        result = await self._call(f"GetPublicKey {name}", attempt)
        self._pems[name] = result
        return result

    async def _info(self, kid: str) -> KeyInfo:
        info = self._by_kid.get(kid)
        if info is None and self.layout.version_name(kid) is not None:
            # A kid of ours we have not seen: maybe a version created since the last listing.
            if time.monotonic() - self._forced_at >= _FORCED_REFRESH_INTERVAL:
                self._forced_at = time.monotonic()
                await self._refresh(force=True)
            info = self._by_kid.get(kid)
            if info is None and self._last_error is not None:  # could not look: not the kid's fault
                raise KeyBackendUnavailable(f"Cloud KMS could not be asked about {kid!r}: {self._last_error}")
        if info is None:
            raise KeyNotFoundError.unknown(kid)
        return info

    # --- KeyBackend ----------------------------------------------------------------------------------------
    async def unwrap(self, kid: str, wrapped: bytes, ephemeral_public_key_pem: str | None = None) -> bytes:
        if ephemeral_public_key_pem:
            raise KeyUnwrapError("Cloud KMS keys are RSA: they cannot unwrap an ec-wrapped key access object")
        if not wrapped or len(wrapped) > 1024:
            raise KeyUnwrapError("the wrapped key has an impossible length")
        info = await self._info(kid)
        checksum = crc32c(wrapped)
        request = {"name": info.version, "ciphertext": wrapped, "ciphertext_crc32c": checksum}

        async def attempt(client: Any, timeout: float) -> bytes:
            response = await client.asymmetric_decrypt(request=request, retry=None, timeout=timeout)
            if not response.verified_ciphertext_crc32c:
                raise _IntegrityError("Cloud KMS did not verify ciphertext_crc32c")
            plaintext = bytes(response.plaintext)
            if response.plaintext_crc32c is None or int(response.plaintext_crc32c) != crc32c(plaintext):
                raise _IntegrityError("the decrypted share failed its plaintext_crc32c check")
            return plaintext

        try:
            share = await self._call(f"AsymmetricDecrypt {info.version}", attempt, decrypt=True)
        except KeyNotFoundError:
            # Disabled or destroyed since the last listing: list again on next use, refuse this one.
            self._listed_at = None
            raise KeyNotFoundError(f"kid {kid!r} names a Cloud KMS key version that is not enabled") from None
        if len(share) != _KEY_SIZE:
            raise KeyUnwrapError("the unwrapped key has the wrong length")
        return share

    async def health(self) -> Health:
        """Readiness: a recent good listing with keys, and no Cloud KMS failure since the last success."""
        try:
            if self._last_error is not None:
                # After a failure, probe again (at most every few seconds): readiness must come back.
                now = time.monotonic()
                if now - self._probed_at >= min(self.ttl, _FAILED_REFRESH_BACKOFF):
                    self._probed_at = now
                    await self._refresh(force=True)
            elif not self._fresh():
                await self._refresh(force=False)
        except KasRayError as exc:
            return Health(ok=False, detail=f"Cloud KMS: {exc.message}", keys=len(self._infos))
        if self._last_error is not None:
            return Health(ok=False, detail=f"Cloud KMS: {self._last_error}", keys=len(self._infos))
        detail = f"Cloud KMS {self.layout.key_ring_name}"
        return Health(ok=bool(self._infos), detail=detail, keys=len(self._infos))

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.transport.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                logger.debug("closing the Cloud KMS client failed", exc_info=True)


# --- administration (command line) -------------------------------------------------------------------------
class GcpKmsAdmin:
    """Blocking key administration for ``kas-ray keys``: list every version, rotate (create a version)."""

    def __init__(self, config: GcpKmsConfig, nation: str, *, client: Any = None) -> None:
        self._kms = _require()
        self.config = config
        self.layout = KmsLayout.from_config(config, nation)
        self.policy = RetryPolicy.from_config(config)
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = sync_client(self.config)
        return self._client

    def versions(self) -> list[VersionRow]:
        """Every version of every configured key (all states), newest first per key."""
        rows: list[VersionRow] = []
        for _, key_id in self.layout.keys:
            parent = self.layout.key_name(key_id)

            def attempt(timeout: float, parent: str = parent) -> list[Any]:
                return list(self.client.list_crypto_key_versions(request={"parent": parent}, retry=None,
                                                                 timeout=timeout))

            versions = _call_sync(self._kms, self.policy, f"ListCryptoKeyVersions {parent}", attempt)
            for version in sorted(versions, key=lambda v: version_number(v.name), reverse=True):
                rows.append(VersionRow(kid=self.layout.kid(version.name), name=version.name,
                                       state=version.state.name, algorithm=version.algorithm.name,
                                       created=_created(version)))
        return rows

    def rotate(self, algorithm: str, *, wait_seconds: float = 120.0, poll_seconds: float = 0.5) -> KeyInfo:
        """Create a version of ``algorithm``'s key, wait until it is ENABLED, return its public facts."""
        parent = self.layout.key_name(self.layout.key_id_for(algorithm))
        e = self._kms.exceptions

        def create(timeout: float) -> Any:
            return self.client.create_crypto_key_version(
                request={"parent": parent, "crypto_key_version": {}}, retry=None, timeout=timeout)

        # Not idempotent: one attempt may use the whole budget, and is retried only when the service
        # said it did not take the call (UNAVAILABLE).
        once = RetryPolicy(deadline=self.policy.deadline, attempts=self.policy.attempts,
                           attempt_timeout=self.policy.deadline)
        version = _call_sync(self._kms, once, f"CreateCryptoKeyVersion {parent}", create,
                             retry_on=(e.ServiceUnavailable,))
        name = version.name
        deadline = time.monotonic() + wait_seconds
        while version.state.name == "PENDING_GENERATION":
            if time.monotonic() >= deadline:
                raise KeyBackendUnavailable(f"{name} is still PENDING_GENERATION after {wait_seconds:.0f}s; "
                                            "it is published once ENABLED (kas-ray keys list shows its state)")
            time.sleep(min(poll_seconds, max(0.0, deadline - time.monotonic())))

            def get(timeout: float) -> Any:
                return self.client.get_crypto_key_version(request={"name": name}, retry=None, timeout=timeout)

            version = _call_sync(self._kms, self.policy, f"GetCryptoKeyVersion {name}", get)
        if version.state.name != "ENABLED":
            raise KeyBackendUnavailable(f"{name} ended in state {version.state.name}, not ENABLED")

        def public_key(timeout: float) -> tuple[str, str]:
            response = self.client.get_public_key(request={"name": name}, retry=None, timeout=timeout)
            return _checked_pem(self._kms, response, name)

        pem, algorithm_name = _call_sync(self._kms, self.policy, f"GetPublicKey {name}", public_key)
        if algorithm_name not in KMS_ALGORITHMS:
            raise KeyBackendUnavailable(f"{name} is {algorithm_name}, not an RSA-OAEP algorithm kas-ray supports")
        return _key_info(self.layout, name, algorithm_name, pem, _created(version), "active")

    def close(self) -> None:
        if self._client is not None:
            self._client.transport.close()
            self._client = None

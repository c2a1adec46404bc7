"""Client SDK: fetch KAS public keys and rewrap key access objects, over HTTP or in process.

One :class:`KasClient` speaks the OpenTDF rewrap protocol (signed request token, DPoP proof,
bearer token) through a :class:`Transport`: :class:`HttpTransport` for a KAS behind its HTTP
ingress, :class:`LocalTransport` for :class:`~kas_ray.kas.service.RewrapService` objects in this
process (the library-level demo and tests). A KasClient is the ``unwrap`` callable that
:func:`kas_ray.ztdf.decrypt` needs.
"""

from __future__ import annotations

import abc
import asyncio
import binascii
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import httpx
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError

from kas_ray.errors import (
    AccessDenied,
    KasNotAllowed,
    KasRayError,
    KasUnreachableError,
    KeyUnwrapError,
    RewrapError,
    TokenError,
    showable_url,
)
from kas_ray.hazmat import primitives as P
from kas_ray.kas.models import OPENTDF_FORBIDDEN, KaoResult, PublicKeyResponse, RewrapResponse
from kas_ray.trust import make_dpop_proof, sign_request
from kas_ray.ztdf._wire import b64decode_strict
from kas_ray.ztdf.keyaccess import KasKey, KeyAlgorithm
from kas_ray.ztdf.manifest import KeyAccessObject

if TYPE_CHECKING:
    from kas_ray.kas.service import RewrapService

REWRAP_PATH = "/kas.AccessService/Rewrap"
PUBLIC_KEY_PATH = "/kas.AccessService/PublicKey"


def kas_base_url(url: str) -> str:
    from kas_ray.kas.service import kas_base_url as _base

    return _base(url)


class Transport(abc.ABC):
    """How a request reaches a KAS: returns parsed wire models or raises a kas-ray error."""

    @abc.abstractmethod
    def public_key(self, base_url: str, algorithm: str) -> PublicKeyResponse: ...

    @abc.abstractmethod
    def rewrap(self, base_url: str, headers: dict[str, str], body: dict[str, Any]) -> RewrapResponse: ...


_STATUS_ERRORS: dict[int, type[KasRayError]] = {401: TokenError, 403: AccessDenied}


class HttpTransport(Transport):
    """OpenTDF Connect (JSON) over HTTP(S) with httpx."""

    def __init__(self, *, timeout: float = 10.0, client: httpx.Client | None = None) -> None:
        self._http = client or httpx.Client(timeout=timeout)

    def _post(self, url: str, headers: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Connect-Protocol-Version": "1", **headers}
        try:
            response = self._http.post(url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise KasUnreachableError(f"KAS {url} is unreachable: {exc.__class__.__name__}") from None
        try:
            data = response.json()
        except ValueError:
            data = {}
        if response.status_code != 200:
            fields = data if isinstance(data, dict) else {}  # a proxy's error page may be anything
            message = fields.get("message") or fields.get("error") or response.reason_phrase
            error = _STATUS_ERRORS.get(response.status_code, RewrapError)
            if response.status_code >= 500:
                error = KasUnreachableError
            raise error(f"KAS {url} answered {response.status_code}: {message}")
        if not isinstance(data, dict):
            raise RewrapError(f"KAS {url} answered with a body that is not a JSON object")
        return data

    def public_key(self, base_url: str, algorithm: str) -> PublicKeyResponse:
        data = self._post(base_url + PUBLIC_KEY_PATH, {}, {"algorithm": algorithm})
        try:
            return PublicKeyResponse.model_validate(data)
        except ValidationError:
            raise RewrapError(f"KAS {base_url} sent a malformed public key response") from None

    def rewrap(self, base_url: str, headers: dict[str, str], body: dict[str, Any]) -> RewrapResponse:
        data = self._post(base_url + REWRAP_PATH, headers, body)
        try:
            return RewrapResponse.model_validate(data)
        except ValidationError:
            raise RewrapError(f"KAS {base_url} sent a malformed rewrap response") from None


class LocalTransport(Transport):
    """Calls :class:`RewrapService` objects of this process, keyed by their base URL."""

    def __init__(self, services: Mapping[str, RewrapService]) -> None:
        self._services = {kas_base_url(url): svc for url, svc in services.items()}
        self._loop = asyncio.new_event_loop()

    def _service(self, base_url: str) -> RewrapService:
        try:
            return self._services[base_url]
        except KeyError:
            raise KasUnreachableError(f"no KAS at {base_url}") from None

    def public_key(self, base_url: str, algorithm: str) -> PublicKeyResponse:
        service = self._service(base_url)
        info = self._loop.run_until_complete(service.keys.key_info(None, algorithm))  # type: ignore[arg-type]
        return PublicKeyResponse(public_key=info.public_key_pem, kid=info.kid)

    def rewrap(self, base_url: str, headers: dict[str, str], body: dict[str, Any]) -> RewrapResponse:
        from kas_ray.kas.service import RewrapCall

        call = RewrapCall(authorization=headers.get("Authorization"), dpop=headers.get("DPoP"),
                          url=base_url + REWRAP_PATH, body=body)
        return self._loop.run_until_complete(self._service(base_url).rewrap(call))

    def close(self) -> None:
        self._loop.close()


class HandleTransport(Transport):
    """In-cluster: calls nation deployments through Ray Serve deployment handles (no HTTP).

    ``apps`` maps a KAS URL to its Serve application name; by default the application is named
    after the last path segment of the URL (``http://host:8000/usa`` → ``usa``), as
    ``kas-ray serve`` and ``deployments/local.yaml`` deploy it. Synchronous: for drivers and jobs,
    not for code already running in an event loop.
    """

    def __init__(self, apps: Mapping[str, str] | None = None, *, timeout: float = 30.0) -> None:
        self._apps = {kas_base_url(url): name for url, name in (apps or {}).items()}
        self._timeout = timeout
        self._handles: dict[str, Any] = {}

    def _handle(self, base_url: str) -> Any:
        from ray import serve

        name = self._apps.get(base_url) or base_url.rstrip("/").rsplit("/", 1)[-1].lower()
        if name not in self._handles:
            try:
                self._handles[name] = serve.get_app_handle(name)
            except Exception:  # Serve raises several types for a missing app  # noqa: BLE001
                raise KasUnreachableError(f"no Serve application {name!r} for {base_url}") from None
        return self._handles[name]

    def _call(self, base_url: str, method: str, *args: Any) -> Any:
        from kas_ray.errors import error_from_code

        try:
            envelope = getattr(self._handle(base_url), method).remote(*args).result(timeout_s=self._timeout)
        except KasRayError:
            raise
        except Exception as exc:  # handle timeouts and dead replicas  # noqa: BLE001
            raise KasUnreachableError(f"KAS {base_url} did not answer: {exc.__class__.__name__}") from None
        if "error" in envelope:
            raise error_from_code(envelope["error"]["code"], envelope["error"]["message"])
        return envelope["ok"]

    def public_key(self, base_url: str, algorithm: str) -> PublicKeyResponse:
        return PublicKeyResponse.model_validate(self._call(base_url, "public_key", algorithm))

    def rewrap(self, base_url: str, headers: dict[str, str], body: dict[str, Any]) -> RewrapResponse:
        call = {"authorization": headers.get("Authorization"), "dpop": headers.get("DPoP"),
                "url": base_url + REWRAP_PATH, "body": body}
        return RewrapResponse.model_validate(self._call(base_url, "rewrap", call))


class KasClient:
    """Rewraps KAOs for one user (access token) with a fresh DPoP key and session key pair."""

    def __init__(self, transport: Transport, token: str | None = None, *, client_key_type: str = "ec",
                 use_dpop: bool = True, dpop_key: P.PrivateKey | None = None,
                 allowed_kas: Iterable[str] | None = None) -> None:
        self.transport = transport
        self.token = token
        #: The KAS (base URLs) this client sends its token to; None: any. A TDF names its KAS itself, so a
        #: client opening files it did not make should set it (the CLI does), or a crafted file's KAS URL
        #: collects the token. The OpenTDF SDKs' KAS allowlist, for the same reason.
        self.allowed_kas = None if allowed_kas is None else frozenset(kas_base_url(u) for u in allowed_kas)
        #: Pass the key a DPoP-bound token (``cnf.jkt``) names; otherwise a fresh one per client.
        self._dpop_key = dpop_key or (ec.generate_private_key(ec.SECP256R1()) if use_dpop else None)
        self._client_key: P.PrivateKey = (
            ec.generate_private_key(ec.SECP256R1()) if client_key_type == "ec"
            else rsa.generate_private_key(public_exponent=65537, key_size=2048)
        )

    def public_key(self, kas_url: str, algorithm: KeyAlgorithm = "rsa:2048") -> KasKey:
        """The KAS's current public key for ``algorithm`` (OAEP-SHA1 for rsa:2048, as OpenTDF expects)."""
        response = self.transport.public_key(kas_base_url(kas_url), algorithm)
        oaep = P.oaep_hash_for(algorithm)
        return KasKey(url=kas_url, public_key_pem=response.public_key, kid=response.kid or None,
                      algorithm=algorithm, oaep_hash=oaep)

    def __call__(self, kao: KeyAccessObject, policy_b64: str) -> bytes:
        return self.rewrap(kao, policy_b64)

    def rewrap(self, kao: KeyAccessObject, policy_b64: str) -> bytes:
        """Ask the KAO's KAS to release its share to this client; returns the share."""
        outcome = self._rewrap_many(kas_base_url(kao.url), [kao], policy_b64)[0]
        if isinstance(outcome, KasRayError):
            raise outcome
        return outcome

    def _rewrap_many(self, base: str, kaos: list[KeyAccessObject], policy_b64: str) -> list[bytes | KasRayError]:
        """One rewrap request to ``base`` for ``kaos``; the share or the error for each, in order."""
        if not self.token:
            raise TokenError("an access token is needed to rewrap")
        if self.allowed_kas is not None and base not in self.allowed_kas:
            raise KasNotAllowed(f"the KAS at {showable_url(base) or '(a URL not shown)'} is not an allowed KAS: "
                                "its key access object was not sent, nor the token")
        body = {
            "clientPublicKey": P.public_key_pem(self._client_key.public_key()),
            "requests": [{
                "policy": {"id": "policy", "body": policy_b64},
                "algorithm": "ec:secp256r1" if kaos[0].type == "ec-wrapped" else "rsa:2048",
                "keyAccessObjects": [{"keyAccessObjectId": f"kao-{i}", "keyAccessObject": kao.to_wire()}
                                     for i, kao in enumerate(kaos)],
            }],
        }
        headers = {"Authorization": f"Bearer {self.token}"}
        signing_key: P.PrivateKey = self._dpop_key or self._client_key
        if self._dpop_key is not None:
            headers["DPoP"] = make_dpop_proof(self._dpop_key, "POST", base + REWRAP_PATH, access_token=self.token)
        response = self.transport.rewrap(base, headers, {"signedRequestToken": sign_request(body, signing_key)})
        results = [r for policy in response.responses for r in policy.results]
        by_id = {r.key_access_object_id: r for r in results}
        if len(by_id) != len(results) or set(by_id) - {f"kao-{i}" for i in range(len(kaos))}:
            raise RewrapError(f"KAS {base} answered with duplicate or unknown key access object ids")
        return [self._share_from(response, by_id.get(f"kao-{i}"), base) for i in range(len(kaos))]

    def _share_from(self, response: RewrapResponse, result: KaoResult | None, base: str) -> bytes | KasRayError:
        if result is None:
            return RewrapError(f"KAS {base} returned no result for a key access object")
        if result.status != "permit" or not result.kas_wrapped_key:
            error = AccessDenied if result.error == OPENTDF_FORBIDDEN else RewrapError
            return error(f"KAS {base} refused: {result.error or 'no reason given'}")
        try:
            wrapped = b64decode_strict(result.kas_wrapped_key)
            if isinstance(self._client_key, rsa.RSAPrivateKey):
                return P.rsa_oaep_decrypt(self._client_key, wrapped, "sha1")
            # A brokered answer carries each peer's EC session key with its results.
            session_pem = result.metadata.get("sessionPublicKey") or response.session_public_key
            if not session_pem:
                return KeyUnwrapError(f"KAS {base} sent no sessionPublicKey for an EC client key")
            session = P.load_public_key_pem(session_pem)
            if not isinstance(session, ec.EllipticCurvePublicKey):
                return KeyUnwrapError(f"KAS {base} sent a sessionPublicKey that is not EC")
            return P.ec_unwrap(self._client_key, session, wrapped)
        except (ValueError, binascii.Error, InvalidTag):
            return KeyUnwrapError(f"the key released by {base} could not be decrypted")


class HomeKasClient(KasClient):
    """Sends every KAO of an object to the user's home KAS, which brokers foreign KAOs to its peers.

    One request per object whatever the number of nations; peers rewrap straight to this client's key,
    so the home KAS never sees their shares.
    """

    def __init__(self, transport: Transport, token: str | None, home: str, **options: Any) -> None:
        super().__init__(transport, token, **options)
        self.home = kas_base_url(home)

    def unwrap_batch(self, kaos: list[KeyAccessObject], policy_b64: str) -> list[bytes | KasRayError]:
        return self._rewrap_many(self.home, kaos, policy_b64)


__all__ = ["HandleTransport", "HomeKasClient", "HttpTransport", "KasClient", "LocalTransport", "Transport"]

"""HTTP surface of one nation's KAS: OpenTDF Connect, OpenTDF legacy REST and the ACP-240 form.

:class:`KasHttpApi` turns HTTP requests into :class:`RewrapService` calls and every failure into
a 4xx/503 JSON error (``{"code", "message"}``, Connect style); it never answers 500 for bad input.
The Serve deployment binds these handlers to routes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from kas_ray.errors import (
    AccessDenied,
    FormatError,
    KasRayError,
    KeyBackendUnavailable,
    KeyNotFoundError,
    TokenError,
    audit_id,
)
from kas_ray.kas import proto
from kas_ray.kas.service import RewrapCall, RewrapService

if TYPE_CHECKING:
    from kas_ray.serve.metrics import KasMetrics
    from kas_ray.shared.ratelimit import RateLimiter

logger = logging.getLogger("kas_ray.http")

JSON = "application/json"
PROTO = "application/proto"

#: kas-ray error → Connect error code (the HTTP status comes from the error class).
_CONNECT_CODES: list[tuple[type[KasRayError], str]] = [
    (TokenError, "unauthenticated"),
    (AccessDenied, "permission_denied"),
    (KeyNotFoundError, "not_found"),
    (KeyBackendUnavailable, "unavailable"),
]
_STATUS_CODES = {400: "invalid_argument", 401: "unauthenticated", 403: "permission_denied", 404: "not_found",
                 413: "resource_exhausted", 415: "invalid_argument", 429: "resource_exhausted",
                 501: "unimplemented", 503: "unavailable"}


_PROTO_DECODERS = {
    "PublicKey": proto.decode_public_key_request,
    "LegacyPublicKey": proto.decode_legacy_public_key_request,
    "Rewrap": proto.decode_rewrap_request,
}
_JSON_DECODERS = {
    "PublicKey": proto.public_key_request_from_json,
    "LegacyPublicKey": proto.legacy_public_key_request_from_json,
    "Rewrap": proto.rewrap_request_from_json,
}


class PayloadTooLarge(FormatError):
    """The request body is larger than this KAS accepts."""

    code = "payload_too_large"
    http_status = 413


class UnsupportedMediaType(FormatError):
    """The request content type is not JSON (or proto on Connect routes)."""

    code = "unsupported_media_type"
    http_status = 415


def error_response(exc: KasRayError, headers: dict[str, str] | None = None) -> JSONResponse:
    code = next((c for kind, c in _CONNECT_CODES if isinstance(exc, kind)), None)
    status = exc.http_status if 400 <= exc.http_status < 600 and exc.http_status != 500 else 503
    code = code or _STATUS_CODES.get(status, "invalid_argument")
    if status == 503:  # HSM, peer or internal failure: always worth a retry
        headers = {"Retry-After": "1", **(headers or {})}
    retry_after = getattr(exc, "retry_after", None)  # rate limited (429), shared store down (503)
    if isinstance(retry_after, int | float):
        headers = {**(headers or {}), "Retry-After": str(max(1, math.ceil(retry_after)))}
    if exc.public_message != exc.message:
        logger.warning("%s answered as %d: %s", exc.code, status, exc.message)
    return JSONResponse({"code": code, "message": exc.public_message, "error": exc.code}, status_code=status,
                        headers=headers)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", JSON).split(";", 1)[0].strip().lower() or JSON


#: Route handler → endpoint class of the rate limits (docs/redis.md); other handlers are not limited.
RATE_LIMITED = {"connect_rewrap": "rewrap", "rest_rewrap": "rewrap", "connect_public_key": "public_key",
                "connect_legacy_public_key": "public_key", "rest_public_key": "public_key"}


class KasHttpApi:
    """Request/response handling shared by every route of one nation's KAS."""

    def __init__(self, service: RewrapService, *, max_body_bytes: int | None = None,
                 limiter: RateLimiter | None = None, metrics: KasMetrics | None = None) -> None:
        self.service = service
        self.max_body_bytes = max_body_bytes or service.limits.max_body_bytes
        #: Per-client-address limits (the service counts per-subject ones once the token is verified).
        self.limiter = limiter if limiter is not None else service.rate_limiter
        #: Counts every answer of :meth:`guarded`, refusals before the rewrap service included.
        self.metrics = metrics

    # --- body handling ----------------------------------------------------------------------------------
    async def read_body(self, request: Request) -> bytes:
        """The raw body, refused with 413 as soon as it passes the limit (never buffered past it)."""
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_body_bytes:
                    raise PayloadTooLarge(f"request body exceeds {self.max_body_bytes} bytes")
            except ValueError:
                raise FormatError("Content-Length is not a number") from None
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise PayloadTooLarge(f"request body exceeds {self.max_body_bytes} bytes")
            chunks.append(chunk)
        # Connect clients (otdf-python) gzip request bodies; inflate with the same bound.
        return proto.decode_content_encoding(b"".join(chunks), request.headers.get("content-encoding"),
                                             self.max_body_bytes)

    async def read_json(self, request: Request) -> dict[str, Any]:
        media = _media_type(request)
        if media not in (JSON, "application/connect+json", "text/plain"):
            raise UnsupportedMediaType(f"content type {media!r} is not supported here (use {JSON})")
        raw = await self.read_body(request)
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise FormatError("request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise FormatError("request body must be a JSON object")
        return data

    async def read_connect(self, request: Request, method: str) -> tuple[dict[str, Any], bool]:
        """A Connect unary body (``method`` of kas.AccessService) as a dict, and whether it was proto."""
        version = request.headers.get("connect-protocol-version")
        if version is not None and version != proto.CONNECT_PROTOCOL_VERSION:
            raise FormatError(f"unsupported Connect-Protocol-Version {version!r}")
        media = _media_type(request)
        if media == PROTO:
            return _PROTO_DECODERS[method](await self.read_body(request)), True
        if media != JSON:
            raise UnsupportedMediaType(f"content type {media!r} is not supported (use {JSON} or {PROTO})")
        return _JSON_DECODERS[method](await self.read_body(request)), False

    # --- public keys --------------------------------------------------------------------------------------
    async def public_key(self, algorithm: str | None, fmt: str | None = None) -> dict[str, str]:
        algorithm = (algorithm or "rsa:2048").lower()
        if algorithm not in ("rsa:2048", "rsa:3072", "rsa:4096", "ec:secp256r1"):
            raise FormatError(f"unsupported algorithm {algorithm!r}")
        if fmt not in (None, "", "pkcs8", "pem"):
            raise FormatError(f"unsupported public key format {fmt!r} (pkcs8 only)")
        info = await self.service.keys.key_info(None, algorithm)  # type: ignore[arg-type]
        return {"publicKey": info.public_key_pem, "kid": info.kid}

    # --- rewrap -------------------------------------------------------------------------------------------
    def request_url(self, request: Request) -> str:
        """The URL a DPoP proof must name: this KAS's configured public URL plus the route's path.

        Built from configuration, not from the Host header, so a proof made for another KAS (or
        another host name) never verifies here.
        """
        if self.service.public_url is None:
            return str(request.url.replace(query=""))
        root = request.scope.get("root_path", "")
        path = request.url.path
        return self.service.public_url + (path[len(root):] if root and path.startswith(root) else path)

    def call(self, request: Request, body: dict[str, Any]) -> RewrapCall:
        fields: dict[str, Any] = {
            "authorization": request.headers.get("authorization"),
            "dpop": request.headers.get("dpop"),
            "method": request.method,
            "url": self.request_url(request),
            "body": body,
        }
        request_id = request.headers.get("x-request-id")
        if request_id and len(request_id) <= 128:
            fields["request_id"] = audit_id(request_id)  # the client's id, or its digest if it is not id-like
        return RewrapCall(**fields)

    async def rewrap(self, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        return (await self.service.rewrap(self.call(request, body))).to_wire()

    async def guarded(self, handler: Any, *args: Any) -> Response:
        """Run a handler; kas-ray errors become JSON 4xx/503, anything unexpected a logged 503."""
        started = time.perf_counter()
        request = args[0] if args and isinstance(args[0], Request) else None
        error_code = ""
        try:
            endpoint = RATE_LIMITED.get(getattr(handler, "__name__", ""))
            if self.limiter is not None and endpoint is not None and request is not None:
                await self.limiter.check_client(endpoint, request.scope)  # type: ignore[arg-type]
            response = await handler(*args)
        except KasRayError as exc:
            response, error_code = error_response(exc), exc.code
        except Exception:  # a bug must not leak details, nor look like a permit
            logger.exception("unexpected error in KAS handler")
            response, error_code = error_response(KeyBackendUnavailable("internal error; the request was not "
                                                                        "processed")), "internal"
        if self.metrics is not None:
            self.metrics.http_answer(_route(request, handler), response.status_code, error_code,
                                     time.perf_counter() - started)
        return response

    # --- route bodies -----------------------------------------------------------------------------------
    async def connect_public_key(self, request: Request) -> Response:
        body, is_proto = await self.read_connect(request, "PublicKey")
        result = await self.public_key(body.get("algorithm"), body.get("fmt"))
        if is_proto:
            return Response(proto.encode_public_key_response(result["publicKey"], result["kid"]), media_type=PROTO)
        return JSONResponse(result)

    async def connect_legacy_public_key(self, request: Request) -> Response:
        body, is_proto = await self.read_connect(request, "LegacyPublicKey")
        result = await self.public_key(body.get("algorithm"))
        if is_proto:
            return Response(proto.encode_string_value(result["publicKey"]), media_type=PROTO)
        return JSONResponse(result["publicKey"])

    async def connect_rewrap(self, request: Request) -> Response:
        body, is_proto = await self.read_connect(request, "Rewrap")
        response = await self.service.rewrap(self.call(request, body))
        if is_proto:
            return Response(proto.encode_rewrap_response(response), media_type=PROTO)
        return JSONResponse(response.to_wire())

    async def rest_public_key(self, request: Request, v2: bool) -> Response:
        result = await self.public_key(request.query_params.get("algorithm"), request.query_params.get("fmt"))
        return JSONResponse(result) if v2 else JSONResponse(result["publicKey"])

    async def rest_rewrap(self, request: Request) -> Response:
        return JSONResponse(await self.rewrap(request, await self.read_json(request)))

    async def healthz(self) -> Response:
        return JSONResponse({"status": "alive", "nation": self.service.nation})

    async def readyz(self) -> Response:
        checks: dict[str, Any] = {}
        try:
            health = await self.service.keys.health()
            checks["hsm"] = health.ok
            checks["keys"] = health.keys
        except KasRayError as exc:
            logger.warning("readiness: key backend check failed: %s", exc.message)
            checks["hsm"], checks["hsm_error"] = False, exc.public_message
        checks["trust"] = bool(self.service.trust.issuers)
        ready = bool(checks.get("hsm")) and checks.get("keys", 0) > 0 and checks["trust"]
        return JSONResponse({"status": "ready" if ready else "not ready", "nation": self.service.nation,
                             "checks": checks}, status_code=200 if ready else 503)


def _route(request: Request | None, handler: Any) -> str:
    """The matched route's template (e.g. ``/kas/v2/rewrap``): a bounded metric tag, unlike the raw path."""
    route = request.scope.get("route") if request is not None else None
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else getattr(handler, "__name__", "other")


def plain_text(text: str, status: int = 200) -> PlainTextResponse:
    return PlainTextResponse(text, status_code=status)

"""The OpenAPI description of a nation KAS: the bodies, headers and answers its routes really take.

The route handlers read raw bodies themselves (JSON, Connect proto, gzip, size limits), so FastAPI
cannot infer a request model from their signatures. Each route gets its description here, built
from the pydantic models the service validates with (``kas_ray.kas.models``), as ``openapi_extra``;
:func:`install` adds the shared components and answers FastAPI's own refusals (unknown route,
wrong method) with the same JSON error as every other refusal. Clients, ``/{nation}/docs`` and the
schemathesis fuzz tests (``tests/test_fuzz_http.py``) all read this one description.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from kas_ray.kas.models import PublicKeyResponse, RewrapRequestBody, RewrapResponse
from kas_ray.trust.request_token import MAX_SRT_CHARS

JSON = "application/json"
PROTO = "application/proto"
#: What :meth:`KasHttpApi.public_key` accepts (case-insensitive; empty means rsa:2048).
ALGORITHM_PATTERN = r"^(|[Rr][Ss][Aa]:(2048|3072|4096)|[Ee][Cc]:[Ss][Ee][Cc][Pp]256[Rr]1)$"


# --- bodies -------------------------------------------------------------------------------------------
class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")  # like protojson readers here: unknown fields are ignored


class PublicKeyRequest(_Wire):
    """``kas.PublicKeyRequest`` (protojson, or the same message as binary proto)."""

    algorithm: str | None = Field(None, pattern=ALGORITHM_PATTERN, description="rsa:2048 (default), rsa:3072, "
                                  "rsa:4096 or ec:secp256r1, any case")
    fmt: Literal["", "pkcs8", "pem"] | None = Field(None, description="public key format: PEM (pkcs8) only")
    v: str | None = Field(None, description="client protocol version (ignored)")


class LegacyPublicKeyRequest(_Wire):
    """``kas.LegacyPublicKeyRequest``."""

    algorithm: str | None = Field(None, pattern=ALGORITHM_PATTERN)


class SignedRewrapRequest(_Wire):
    """``kas.RewrapRequest``: the rewrap body inside a signed request token (a JWT whose ``requestBody``
    claim is the :class:`RewrapRequestBody` as a JSON string, signed by the client's DPoP key)."""

    signed_request_token: str = Field(alias="signedRequestToken", min_length=1, max_length=MAX_SRT_CHARS)


class ErrorBody(BaseModel):
    """Every refusal: a Connect error (``code``, ``message``) plus the kas-ray error code."""

    code: str = Field(description="Connect code: invalid_argument, unauthenticated, permission_denied, ...")
    message: str
    error: str = Field(description="kas-ray error code (kas_ray.errors), e.g. invalid_token, bad_format")


class Liveness(BaseModel):
    status: Literal["alive"]
    nation: str


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    nation: str
    checks: dict[str, Any]


_REQUESTS: list[type[BaseModel]] = [PublicKeyRequest, LegacyPublicKeyRequest, SignedRewrapRequest, RewrapRequestBody]
_RESPONSES: list[type[BaseModel]] = [PublicKeyResponse, RewrapResponse, ErrorBody, Liveness, Readiness]


def _components() -> tuple[dict[tuple[Any, str], dict[str, Any]], dict[str, Any]]:
    """``$ref`` of each (model, mode), and the component schemas they point to."""
    models: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        *((m, "validation") for m in _REQUESTS), *((m, "serialization") for m in _RESPONSES)]
    refs, schemas = models_json_schema(models, ref_template="#/components/schemas/{model}")
    return {key: value for key, value in refs.items()}, dict(schemas.get("$defs", {}))


_REFS, _SCHEMAS = _components()


def _ref(model: type[BaseModel], mode: str = "validation") -> dict[str, Any]:
    return dict(_REFS[model, mode])  # a copy: FastAPI merges openapi_extra into its own dicts


# --- operation pieces ----------------------------------------------------------------------------------
_AUTH: list[dict[str, list[str]]] = [{"bearer": [], "dpopProof": []}, {"dpop": [], "dpopProof": []}, {"bearer": []}]
_SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
               "description": "An access token of an issuer in this nation's trust registry"},
    "dpop": {"type": "http", "scheme": "DPoP", "bearerFormat": "JWT",
             "description": "A DPoP-bound access token (RFC 9449), with its proof in the DPoP header"},
    "dpopProof": {"type": "apiKey", "in": "header", "name": "DPoP",
                  "description": "DPoP proof for this method and URL; required for tokens with cnf.jkt"},
}
_REQUEST_ID = {"name": "X-Request-ID", "in": "header", "required": False,
               "description": "Correlates the audit records of this request (ignored beyond 128 characters)",
               "schema": {"type": "string", "maxLength": 128}}
_CONNECT_VERSION = {"name": "Connect-Protocol-Version", "in": "header", "required": False,
                    "schema": {"type": "string", "enum": ["1"]}}
_ERRORS = {
    400: "malformed body, wrong types, bad base64, policy, client key or signed request",
    401: "missing or invalid access token, DPoP proof or replay",
    403: "a v1 rewrap denied by the policy",
    404: "no active key of the requested algorithm",
    413: "body over the size limit (before or after gzip)",
    415: "unsupported content type",
    429: "rate limited (Retry-After)",
    501: "unsupported Content-Encoding",
    503: "key backend (HSM actor) unavailable or timed out (Retry-After)",
}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": _ERRORS[s], "content": {JSON: {"schema": _ref(ErrorBody, "serialization")}}}
            for s in statuses}


def _body(model: type[BaseModel] | dict[str, Any], *, proto: bool) -> dict[str, Any]:
    schema = _ref(model) if isinstance(model, type) else model
    content = {JSON: {"schema": schema}}
    if proto:  # the same Connect message, binary protobuf
        content[PROTO] = {"schema": dict(schema)}
    return {"required": True, "content": content}


def _ok(schema: dict[str, Any], *, proto: bool = False) -> dict[str, Any]:
    content: dict[str, Any] = {JSON: {"schema": schema}}
    if proto:
        content[PROTO] = {"schema": {"type": "string", "format": "binary"}}
    return {"200": {"description": "OK", "content": content}}


def _operation(body: dict[str, Any] | None, ok: dict[str, Any], errors: tuple[int, ...], *,
               connect: bool = False, auth: bool = False,
               query: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    parameters = list(query or []) + ([_CONNECT_VERSION] if connect else [])
    if auth:
        parameters.append(_REQUEST_ID)
    operation: dict[str, Any] = {"responses": {**ok, **_errors(*errors)}}
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = body
    if auth:
        operation["security"] = _AUTH
    return operation


_BODY_ERRORS = (400, 413, 415, 429, 501, 503)
_REWRAP_ERRORS = (400, 401, 403, 413, 415, 429, 501, 503)
_QUERY = [
    {"name": "algorithm", "in": "query", "required": False, "schema": {"type": "string", "pattern": ALGORITHM_PATTERN}},
    {"name": "fmt", "in": "query", "required": False, "schema": {"type": "string", "enum": ["", "pkcs8", "pem"]}},
]
_PEM = {"type": "string", "description": "SPKI PEM public key"}

CONNECT_PUBLIC_KEY = _operation(_body(PublicKeyRequest, proto=True),
                                _ok(_ref(PublicKeyResponse, "serialization"), proto=True),
                                (*_BODY_ERRORS, 404), connect=True)
CONNECT_LEGACY_PUBLIC_KEY = _operation(_body(LegacyPublicKeyRequest, proto=True), _ok(_PEM, proto=True),
                                       (*_BODY_ERRORS, 404), connect=True)
CONNECT_REWRAP = _operation(_body(SignedRewrapRequest, proto=True),
                            _ok(_ref(RewrapResponse, "serialization"), proto=True), _REWRAP_ERRORS,
                            connect=True, auth=True)
REST_PUBLIC_KEY = _operation(None, _ok(_PEM), (400, 404, 429, 503), query=_QUERY)
REST_PUBLIC_KEY_V2 = _operation(None, _ok(_ref(PublicKeyResponse, "serialization")), (400, 404, 429, 503),
                                query=_QUERY)
REST_REWRAP = _operation(_body(SignedRewrapRequest, proto=False), _ok(_ref(RewrapResponse, "serialization")),
                         _REWRAP_ERRORS, auth=True)
#: The plain ACP-240 body, or the same inside a signed request token.
ACP240_REWRAP = _operation(_body({"anyOf": [_ref(SignedRewrapRequest), _ref(RewrapRequestBody)]}, proto=False),
                           _ok(_ref(RewrapResponse, "serialization")), _REWRAP_ERRORS, auth=True)
HEALTHZ = _operation(None, _ok(_ref(Liveness, "serialization")), ())
_NOT_READY = {"503": {"description": "not ready", "content": {JSON: {"schema": _ref(Readiness, "serialization")}}}}
READYZ = _operation(None, {**_ok(_ref(Readiness, "serialization")), **_NOT_READY}, ())
_OBJECT = {"type": "object", "required": ["nation"], "properties": {"nation": {"type": "string"}}}
STATS = _operation(None, _ok(_OBJECT), ())
FEDERATION_STATUS = _operation(None, _ok({"type": "object"}), ())


# --- the app -----------------------------------------------------------------------------------------------
_ROUTE_CODES = {404: ("not_found", "route_not_found"), 405: ("unimplemented", "method_not_allowed")}


async def _route_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own refusals (unknown path, wrong method) in the shape of every other KAS error."""
    assert isinstance(exc, StarletteHTTPException)
    code, error = _ROUTE_CODES.get(exc.status_code, ("invalid_argument", "bad_request"))
    return JSONResponse({"code": code, "message": str(exc.detail), "error": error}, status_code=exc.status_code,
                        headers=exc.headers)


def install(app: FastAPI) -> None:
    """Add the shared schemas and security schemes to ``app``'s OpenAPI; JSON errors for unknown routes."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {})
            components.setdefault("schemas", {}).update(_SCHEMAS)
            components["securitySchemes"] = _SECURITY_SCHEMES
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_exception_handler(StarletteHTTPException, _route_error)

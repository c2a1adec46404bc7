"""The federation gateway: inbound HTTPS with REQUIRED client certificates, from peer KAS in other Ray clusters.

Ray Serve's proxy can terminate TLS but cannot require a client certificate, so each nation runs this
small gateway next to its Serve application: a detached Ray actor (``kas-fedgw-<nation>``, namespace
``kas-ray``, restarted when it dies) serving uvicorn in its own event loop, the way Serve's proxy does.

Routes:

* ``POST /{nation}/federation/forward``: the JSON body goes to the nation deployment's
  ``forward(envelope)`` through a Serve handle, with ``envelope["_tls_peer"]`` set to the nation of
  the verified client certificate (any ``_tls_peer`` the peer sent is overwritten); the deployment's
  dict comes back as JSON. An ``{"error": {"code", ...}}`` answer takes the HTTP status of that
  kas-ray error code (or its ``http_status``), anything else is 200.
* ``GET /healthz``.

How the client certificate reaches the handler: uvicorn does not put TLS details in the ASGI scope,
so the gateway's HTTP protocol (a subclass of uvicorn's h11 protocol) reads the verified peer
certificate from the TLS transport when the connection is made (asyncio calls ``connection_made``
only after a successful handshake) and adds the ASGI TLS extension to every scope of that
connection: ``scope["extensions"]["tls"]`` with ``client_cert_chain``/``client_cert_name`` per the
ASGI spec, plus ``peer_nation`` and ``client_cert_sha256``.

Bounds: bodies over ``max_body_bytes`` (1 MiB) → 413, malformed JSON → 400, a request head must
arrive within ``head_timeout_seconds``, body + forward within ``request_timeout_seconds`` (408 / 504),
at most ``limit_concurrency`` connections (then 503). Errors are ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import ray
from pydantic import BaseModel, ConfigDict, Field
from uvicorn.protocols.http.h11_impl import H11Protocol

from kas_ray.federation.tls import TlsFiles, TlsIdentity, load_certificate, peer_nation_from_cert, server_ssl_context

logger = logging.getLogger(__name__)

NAMESPACE = "kas-ray"  # same as kas_ray.serve.actors.NAMESPACE
MAX_BODY_BYTES = 1024 * 1024
FORWARD_PATH = re.compile(r"/([A-Za-z]{2,10})/federation/forward/?")
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Forward = Callable[[dict[str, Any]], Awaitable[Any]]


def gateway_actor_name(nation: str) -> str:
    return f"kas-fedgw-{nation.lower()}"


class GatewaySettings(BaseModel):
    """Everything a gateway actor is built from (no key material: only file paths)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nation: str = Field(pattern=r"^[A-Z]{2,10}$")
    host: str
    port: int = Field(ge=0, le=65535)
    identity: TlsIdentity
    #: Serve application of the nation (default: the nation in lower case) and the handle method called.
    app_name: str
    method: str = "forward"
    max_body_bytes: int = Field(default=MAX_BODY_BYTES, gt=0)
    #: Reading the body plus the deployment's answer.
    request_timeout_seconds: float = Field(default=30.0, gt=0)
    #: A connection must deliver a complete request head this soon after the handshake / the last response.
    head_timeout_seconds: float = Field(default=10.0, gt=0)
    limit_concurrency: int = Field(default=128, gt=0)


# --- errors -----------------------------------------------------------------------------------------
class GatewayHttpError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or []


def _error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _status_of_error(error: dict[str, Any]) -> int:
    """HTTP status of a deployment's ``{"error": {...}}`` answer: its ``http_status``, else its code's."""
    status = error.get("http_status")
    if isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599:
        return status
    from kas_ray.errors import error_from_code

    with contextlib.suppress(ImportError):  # registers the federation error codes
        import kas_ray.federation.envelope  # noqa: F401
    status = error_from_code(str(error.get("code")), "").http_status
    return status if 400 <= status <= 599 else 400


# --- the TLS extension of the ASGI scope ------------------------------------------------------------
def tls_scope_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The ASGI TLS extension of a connection (None without TLS or without a client certificate)."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    cert = load_certificate(der)
    pem = ssl.DER_cert_to_PEM_cert(der)
    return {
        "server_cert": None,
        "client_cert_chain": [pem],
        "client_cert_name": cert.subject.rfc4514_string(),
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
        # kas-ray additions
        "peer_nation": peer_nation_from_cert(cert),
        "client_cert_sha256": hashlib.sha256(der).hexdigest(),
    }


def mtls_protocol(head_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol plus: the TLS extension in every scope, and a deadline on request heads."""

    class MtlsH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            try:
                tls = tls_scope_extension(transport)
            except ValueError:  # an unparsable certificate (cannot pass CERT_REQUIRED, but be safe)
                tls = None
            if tls is None:  # unreachable with CERT_REQUIRED: never serve a connection without a client cert
                transport.close()
                return
            inner = self.app

            async def app(scope: Scope, receive: Receive, send: Send) -> None:
                scope.setdefault("extensions", {})["tls"] = tls
                await inner(scope, receive, send)

            self.app = app
            self._arm_head_deadline()

        def _arm_head_deadline(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(head_timeout, self._head_deadline, self.cycle)

        def _head_deadline(self, armed_cycle: object) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self.cycle is not armed_cycle:
                return  # a new request head arrived since
            if armed_cycle is None or armed_cycle.response_complete:  # type: ignore[attr-defined]
                self.transport.close()  # no complete request head in time (slow or idle peer)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

    return MtlsH11Protocol


# --- the ASGI application ---------------------------------------------------------------------------
class FederationApp:
    """``POST /{nation}/federation/forward`` and ``GET /healthz``; ``forward`` delivers the envelope."""

    def __init__(self, settings: GatewaySettings, forward: Forward) -> None:
        self.settings = settings
        self.forward = forward

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            status, body, headers = await self._route(scope, receive)
        except GatewayHttpError as exc:
            status, body, headers = exc.status, _error_body(exc.code, exc.message), exc.headers
        except _ClientGone:
            return
        except Exception:  # a bug, never the peer's input
            logger.exception("federation gateway %s: internal error", self.settings.nation)
            status, body, headers = 500, _error_body("internal", "internal gateway error"), []
        await _send_json(send, status, body, headers)

    async def _route(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]:
        path, method = scope["path"], scope["method"]
        if path == "/healthz":
            if method not in ("GET", "HEAD"):
                raise GatewayHttpError(405, "method_not_allowed", "use GET", [(b"allow", b"GET")])
            return 200, {"status": "ok", "nation": self.settings.nation}, []
        match = FORWARD_PATH.fullmatch(path)
        if not match or match.group(1).upper() != self.settings.nation:
            raise GatewayHttpError(404, "not_found", f"this gateway serves /{self.settings.nation.lower()}"
                                                     "/federation/forward")
        if method != "POST":
            raise GatewayHttpError(405, "method_not_allowed", "use POST", [(b"allow", b"POST")])
        tls = scope.get("extensions", {}).get("tls") or {}
        peer = tls.get("peer_nation")
        if not peer:
            raise GatewayHttpError(403, "unknown_peer", "the client certificate names no nation")
        deadline = time.monotonic() + self.settings.request_timeout_seconds
        raw = await self._read_body(scope, receive, deadline)
        envelope = _parse_json(raw)
        envelope["_tls_peer"] = peer  # from the verified certificate, never from the body
        return await self._forward(envelope, receive, deadline)

    async def _read_body(self, scope: Scope, receive: Receive, deadline: float) -> bytes:
        limit = self.settings.max_body_bytes
        declared = _content_length(scope)
        too_large = GatewayHttpError(413, "payload_too_large", f"the body exceeds {limit} bytes",
                                     [(b"connection", b"close")])
        if declared is not None and declared > 4 * limit:
            raise too_large  # not worth draining: answer now and close
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGone
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size <= limit:
                        chunks.append(chunk)
                    elif size > 4 * limit:
                        raise too_large
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise GatewayHttpError(408, "request_timeout", "the request body did not arrive in time",
                                   [(b"connection", b"close")]) from None
        if size > limit:  # drained (so the peer reads our answer rather than a reset), then refused
            raise too_large
        return b"".join(chunks)

    async def _forward(self, envelope: dict[str, Any], receive: Receive,
                       deadline: float) -> tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]:
        call = asyncio.ensure_future(self.forward(envelope))
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({call, gone}, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (call, gone):
                if not task.done():
                    task.cancel()  # cancelling the call cancels the Serve request at the deployment
        if call not in done:
            if gone in done:
                raise _ClientGone
            raise GatewayHttpError(504, "upstream_timeout", "the KAS did not answer in time")
        result = call.result()  # GatewayHttpError from the forward callable propagates
        if not isinstance(result, dict):
            raise GatewayHttpError(502, "upstream_error", "the KAS answered with a non-object")
        error = result.get("error")
        return (_status_of_error(error) if isinstance(error, dict) else 200), result, []


class _ClientGone(Exception):
    """The peer closed the connection: nothing to answer."""


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 already refuses a malformed Content-Length
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise GatewayHttpError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise GatewayHttpError(400, "invalid_json", "the body must be a JSON object")
    return value


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
    try:
        data = json.dumps(body, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError):
        status = 502
        data = json.dumps(_error_body("upstream_error", "the KAS answer is not JSON")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"cache-control", b"no-store"), *headers]})
    await send({"type": "http.response.body", "body": data})


# --- the actor ---------------------------------------------------------------------------------------
def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"federation gateway cannot bind {host}:{port}: {exc.strerror}") from None
    return sock


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class FederationGateway:
    """One nation's mTLS gateway: uvicorn in the actor's event loop, forwarding to the nation's Serve app."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import uvicorn
        from ray._common.utils import get_or_create_event_loop

        self.settings = GatewaySettings.model_validate(settings)
        self._handle: Any = None
        context = server_ssl_context(self.settings.identity)  # fails here (dead actor) on bad files
        self._sock = _bind(self.settings.host, self.settings.port)
        self.port = int(self._sock.getsockname()[1])
        config = uvicorn.Config(
            FederationApp(self.settings, self._call_deployment),
            host=self.settings.host,
            port=self.port,
            http=mtls_protocol(self.settings.head_timeout_seconds),
            ws="none",
            lifespan="off",
            access_log=False,
            log_level=None,
            log_config=None,
            proxy_headers=False,
            server_header=False,
            limit_concurrency=self.settings.limit_concurrency,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=5,
            h11_max_incomplete_event_size=16 * 1024,
            ssl_context_factory=lambda _config, _default: context,
        )
        self._server = uvicorn.Server(config)
        # Not the main thread's signals: Ray owns them (as Serve's proxy does).
        self._server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self._task = get_or_create_event_loop().create_task(self._server.serve(sockets=[self._sock]))

    async def _get_handle(self) -> Any:
        if self._handle is None:
            from ray import serve

            try:  # talks to the Serve controller synchronously: keep it off the event loop
                self._handle = await asyncio.to_thread(serve.get_app_handle, self.settings.app_name)
            except Exception:  # noqa: BLE001 - Serve raises several types for a missing app
                raise GatewayHttpError(503, "upstream_unavailable",
                                       f"no Serve application {self.settings.app_name!r}") from None
        return self._handle

    async def _call_deployment(self, envelope: dict[str, Any]) -> Any:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        from kas_ray.errors import KasRayError

        handle = await self._get_handle()
        response = getattr(handle, self.settings.method).remote(envelope)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()  # the peer went away or the gateway timed out: stop the call at the deployment
            raise
        except KasRayError as exc:  # raised by the deployment (arrives as a RayTaskError of that class)
            raise GatewayHttpError(exc.http_status if 400 <= exc.http_status <= 599 else 502, exc.code,
                                   exc.message) from None
        except (BackPressureError, DeploymentUnavailableError, RayActorError) as exc:
            self._handle = None
            raise GatewayHttpError(503, "upstream_unavailable", f"the KAS is unavailable ({type(exc).__name__})",
                                   [(b"retry-after", b"1")]) from None
        except Exception as exc:  # noqa: BLE001 - any other failure of the call
            self._handle = None
            logger.warning("federation gateway %s: forward failed: %s", self.settings.nation, type(exc).__name__)
            raise GatewayHttpError(502, "upstream_error", f"the KAS failed ({type(exc).__name__})") from None

    async def ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the server listens; raise what stopped it otherwise."""
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if self._task.done():
                exc = self._task.exception() if not self._task.cancelled() else None
                raise RuntimeError(f"federation gateway {self.settings.nation} stopped: {exc!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"federation gateway {self.settings.nation} not listening after {timeout}s")
            await asyncio.sleep(0.02)
        return self.info()

    def info(self) -> dict[str, Any]:
        return {"nation": self.settings.nation, "host": self.settings.host, "port": self.port,
                "settings": self.settings.model_dump(mode="json"), "listening": bool(self._server.started)
                and not self._task.done(), "connections": len(self._server.server_state.connections)}

    async def shutdown(self) -> None:
        """Stop accepting, let running requests finish (bounded), close."""
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._task), timeout=10)


# --- driver-side API ---------------------------------------------------------------------------------
def _as_identity(identity: TlsFiles) -> TlsIdentity:
    return TlsIdentity(cert_file=str(identity.cert_file), key_file=str(identity.key_file),
                       ca_file=str(identity.ca_file))


def start_gateway(nation: str, host: str, port: int, identity: TlsFiles, app_name: str | None = None, *,
                  timeout: float = 60.0, actor_options: dict[str, Any] | None = None,
                  **limits: Any) -> Any:
    """Start (or find) the nation's gateway actor and wait until it listens. Idempotent.

    A running gateway with the same settings is returned as is; one with different settings is
    stopped and replaced. ``limits`` are further :class:`GatewaySettings` fields (``max_body_bytes``,
    ``request_timeout_seconds``, ``head_timeout_seconds``, ``limit_concurrency``, ``method``).
    ``actor_options`` are extra Ray actor options (e.g. a node-affinity scheduling strategy: the
    certificate files must exist, and ``host`` must be an address, on the node the actor runs on).
    Port 0 picks a free port (see ``ray.get(handle.info.remote())["port"]``); a restarted actor may
    then listen elsewhere. Raises ``RuntimeError`` when the gateway cannot start.
    """
    settings = GatewaySettings(nation=nation.upper(), host=host, port=port, identity=_as_identity(identity),
                               app_name=app_name or nation.lower(), **limits)
    wanted = settings.model_dump(mode="json")
    name = gateway_actor_name(settings.nation)
    try:
        existing = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        existing = None
    if existing is not None:
        try:
            info = ray.get(existing.ready.remote(timeout), timeout=timeout)
        except Exception:  # noqa: BLE001 - a dead or broken gateway is replaced
            info = None
        if info is not None and info["settings"] == {**wanted, "port": info["settings"]["port"]} and (
                port in (0, info["port"])):
            return existing
        stop_gateway(settings.nation)
    options: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "lifetime": "detached", "get_if_exists": True,
                               **(actor_options or {})}
    actor = FederationGateway.options(**options).remote(wanted)
    try:
        ray.get(actor.ready.remote(timeout), timeout=timeout)
    except Exception as exc:
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
        raise RuntimeError(f"federation gateway {settings.nation} did not start on {host}:{port}: "
                           f"{_root_cause(exc)}") from None
    return actor


def _root_cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc.__cause__ or exc
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__


def stop_gateway(nation: str, timeout: float = 15.0) -> bool:
    """Stop the nation's gateway (graceful, then killed for good). False when none was running."""
    name = gateway_actor_name(nation)
    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    with contextlib.suppress(Exception):
        ray.get(actor.shutdown.remote(), timeout=timeout)
    with contextlib.suppress(Exception):
        ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # the name is free once the GCS has marked the actor dead
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return True
        time.sleep(0.1)
    return True

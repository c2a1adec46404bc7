"""How a home KAS reaches a peer: Serve deployment handles in-cluster, HTTPS with mutual TLS across clusters,
and direct calls to services of this process (embedded coalition, demo, tests).

Every transport carries the same signed forward message and returns the peer's signed result; a
cancelled call is stopped at the peer (``DeploymentResponse.cancel()``, the HTTP request closed, or
the in-process coroutine cancelled).
"""

from __future__ import annotations

import abc
import asyncio
import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from kas_ray.config import PeerConfig, TlsIdentity
from kas_ray.errors import KasRayError, error_from_code
from kas_ray.federation.breaker import PeerUnavailable

if TYPE_CHECKING:
    from kas_ray.kas.service import RewrapService


#: Most forwards one batched handle call carries (the peer refuses a longer list).
MAX_FORWARD_BATCH = 32


class PeerTransport(abc.ABC):
    @abc.abstractmethod
    async def forward(self, peer: PeerConfig, message: dict[str, Any], timeout: float, *,
                      batchable: bool = False) -> dict[str, Any]:
        """Deliver a signed forward; return the peer's signed result message.

        ``batchable``: the caller will not cancel this forward before its deadline (allOf), so a
        transport may send it together with others to the same peer.
        """

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def _unwrap_envelope(peer: PeerConfig, envelope: Any) -> dict[str, Any]:
    if not isinstance(envelope, dict):
        raise PeerUnavailable(f"peer {peer.nation} sent a malformed answer")
    if "error" in envelope:
        error = envelope["error"]
        if not isinstance(error, dict):
            raise PeerUnavailable(f"peer {peer.nation} sent a malformed answer")
        raise error_from_code(str(error.get("code")), f"peer {peer.nation}: {error.get('message')}")
    result = envelope.get("ok")
    if not isinstance(result, dict):
        raise PeerUnavailable(f"peer {peer.nation} sent a malformed answer")
    return result


@dataclass
class _Queued:
    message: dict[str, Any]
    timeout: float
    answer: asyncio.Future[dict[str, Any]]


class HandlePeerTransport(PeerTransport):
    """In-cluster: the peer nation's deployment ``forward`` method through a Serve handle.

    With a ``batch_window``, batchable forwards to one peer that start within the window share one
    call of the peer's ``forward_batch``: the hop (router, gRPC, the peer replica's request path) is
    paid once. A forward cancelled before its batch leaves is never sent.
    """

    def __init__(self, batch_window: float | None = None) -> None:
        self._handles: dict[str, Any] = {}
        self._window = batch_window
        self._queues: dict[str, list[_Queued]] = {}
        self._flushing: set[asyncio.Task[None]] = set()
        #: Batched handle calls sent, and the forwards they carried.
        self.batches = 0
        self.batched_forwards = 0

    async def _handle(self, peer: PeerConfig) -> Any:
        name = peer.app_name or peer.nation.lower()
        if name not in self._handles:
            from ray import serve

            try:  # may talk to the controller synchronously: keep it off the event loop
                self._handles[name] = await asyncio.to_thread(serve.get_app_handle, name)
            except Exception:  # noqa: BLE001 - Serve raises several types for a missing app
                raise PeerUnavailable(f"peer {peer.nation} has no Serve application {name!r}") from None
        return self._handles[name]

    async def forward(self, peer: PeerConfig, message: dict[str, Any], timeout: float, *,
                      batchable: bool = False) -> dict[str, Any]:
        if batchable and self._window:
            return await self._forward_batched(peer, message, timeout)
        handle = await self._handle(peer)
        return _unwrap_envelope(peer, await self._call(peer, handle.forward.remote(message), timeout))

    async def _call(self, peer: PeerConfig, response: Any, timeout: float) -> Any:
        try:
            return await asyncio.wait_for(response, timeout)
        except asyncio.CancelledError:
            response.cancel()  # stop the call at the peer, not just our wait for it
            raise
        except TimeoutError:
            response.cancel()
            raise PeerUnavailable(f"peer {peer.nation} timed out after {timeout:.1f}s") from None
        except KasRayError:
            raise
        except Exception as exc:  # noqa: BLE001 - dead replica, actor errors
            raise PeerUnavailable(f"peer {peer.nation} failed: {exc.__class__.__name__}") from None

    async def _forward_batched(self, peer: PeerConfig, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        queued = _Queued(message, timeout, loop.create_future())
        queue = self._queues.setdefault(peer.nation, [])
        queue.append(queued)
        if len(queue) == 1:
            loop.call_later(self._window or 0.0, self._start_flush, peer)
        elif len(queue) >= MAX_FORWARD_BATCH:
            self._start_flush(peer)
        try:
            return await asyncio.wait_for(queued.answer, timeout)
        except TimeoutError:
            raise PeerUnavailable(f"peer {peer.nation} timed out after {timeout:.1f}s") from None

    def _start_flush(self, peer: PeerConfig) -> None:
        batch = [q for q in self._queues.pop(peer.nation, []) if not q.answer.done()]  # cancelled: not sent
        if batch:
            task = asyncio.ensure_future(self._flush(peer, batch))
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)

    async def _flush(self, peer: PeerConfig, batch: list[_Queued]) -> None:
        timeout = max(q.timeout for q in batch)
        try:
            handle = await self._handle(peer)
            if len(batch) == 1:
                envelopes = [await self._call(peer, handle.forward.remote(batch[0].message), timeout)]
            else:
                self.batches += 1
                self.batched_forwards += len(batch)
                envelopes = await self._call(peer, handle.forward_batch.remote([q.message for q in batch]), timeout)
            if not isinstance(envelopes, list) or len(envelopes) != len(batch):
                raise PeerUnavailable(f"peer {peer.nation} sent a malformed answer")
        except Exception as exc:  # noqa: BLE001 - every forward of the batch fails the same way
            failure = exc if isinstance(exc, KasRayError) else PeerUnavailable(
                f"peer {peer.nation} failed: {exc.__class__.__name__}")
            for q in batch:
                if not q.answer.done():  # one instance each: raised in several tasks, tracebacks would chain
                    q.answer.set_exception(copy.copy(failure))
            return
        for q, envelope in zip(batch, envelopes, strict=True):
            if q.answer.done():  # the caller gave up meanwhile
                continue
            try:
                q.answer.set_result(_unwrap_envelope(peer, envelope))
            except KasRayError as exc:
                q.answer.set_exception(exc)


class HttpsPeerTransport(PeerTransport):
    """Across clusters: POST to the peer's federation gateway over HTTPS with mutual TLS."""

    def __init__(self, identity: TlsIdentity | None) -> None:
        if identity is None:
            self._client = httpx.AsyncClient()
        else:
            from kas_ray.federation.tls import client_ssl_context

            self._client = httpx.AsyncClient(verify=client_ssl_context(identity))

    async def forward(self, peer: PeerConfig, message: dict[str, Any], timeout: float, *,
                      batchable: bool = False) -> dict[str, Any]:
        assert peer.gateway_url is not None
        url = f"{peer.gateway_url.rstrip('/')}/{peer.nation.lower()}/federation/forward"
        try:
            response = await self._client.post(url, json=message, timeout=timeout)
        except httpx.TimeoutException:
            raise PeerUnavailable(f"peer {peer.nation} timed out after {timeout:.1f}s") from None
        except httpx.HTTPError as exc:
            raise PeerUnavailable(f"peer {peer.nation} unreachable: {exc.__class__.__name__}") from None
        if response.status_code >= 500:
            raise PeerUnavailable(f"peer {peer.nation} answered {response.status_code}")
        try:
            envelope = response.json()
        except ValueError:
            raise PeerUnavailable(f"peer {peer.nation} sent a body that is not JSON") from None
        if response.status_code != 200 and isinstance(envelope, dict) and "error" not in envelope:
            envelope = {"error": {"code": envelope.get("error", "invalid_forward"),
                                  "message": envelope.get("message", response.reason_phrase)}}
        return _unwrap_envelope(peer, envelope)

    async def close(self) -> None:
        await self._client.aclose()


class LocalPeerTransport(PeerTransport):
    """In process: the peer nation's :meth:`RewrapService.handle_forward`, called directly.

    ``services`` maps a nation to its service and is read at call time, so it may be filled after
    the federations using this transport are built. Messages are copied through JSON both ways, as
    on a wire: the peer gets no object of ours and we get none of the peer's.
    """

    def __init__(self, services: Mapping[str, RewrapService]) -> None:
        self._services = services

    async def forward(self, peer: PeerConfig, message: dict[str, Any], timeout: float, *,
                      batchable: bool = False) -> dict[str, Any]:
        service = self._services.get(peer.nation)
        if service is None:
            raise PeerUnavailable(f"peer {peer.nation} is not in this process")
        try:
            reply = await asyncio.wait_for(service.handle_forward(json.loads(json.dumps(message))), timeout)
        except TimeoutError:
            raise PeerUnavailable(f"peer {peer.nation} timed out after {timeout:.1f}s") from None
        except KasRayError as exc:  # as it would arrive over a handle: code and message only
            raise error_from_code(exc.code, f"peer {peer.nation}: {exc.message}") from None
        except Exception as exc:  # noqa: BLE001 - a failing peer is unavailable, as over the other transports
            raise PeerUnavailable(f"peer {peer.nation} failed: {exc.__class__.__name__}") from None
        return _unwrap_envelope(peer, {"ok": json.loads(json.dumps(reply))})

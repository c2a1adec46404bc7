"""The KAS registry at work: route foreign KAOs to peers, sign forwards, verify peer results.

:class:`Federation` is what a :class:`~kas_ray.kas.service.RewrapService` consults for every KAO that is
not its own. The scheduling of local and forwarded work (parallel first-permit, sequential) lives in
the service's rewrap path; this module knows peers, keys, breakers and the wire.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from kas_ray.config import AgreementConfig, FederationConfig, PeerConfig
from kas_ray.errors import ConfigError, KasRayError
from kas_ray.federation.breaker import BreakerBoard, BreakerState
from kas_ray.federation.envelope import (
    FederationKey,
    ForwardClaims,
    ForwardError,
    forward_nonce,
    sign_forward,
    sign_result,
    verify_forward,
    verify_result,
)
from kas_ray.federation.peers import HandlePeerTransport, HttpsPeerTransport, PeerTransport
from kas_ray.kas.models import KaoResult
from kas_ray.trust import ReplayStore

#: A peer's per-KAO results: a list of results, or the answer is malformed (ValidationError is a ValueError).
_RESULTS = TypeAdapter(list[KaoResult])


def _base(url: str) -> str:
    from kas_ray.kas.service import kas_base_url

    return kas_base_url(url)


def load_peer_jwk(peer: PeerConfig) -> dict[str, str]:
    if peer.signing_jwk is not None:
        return dict(peer.signing_jwk)
    assert peer.signing_jwk_file is not None
    try:
        data = json.loads(Path(peer.signing_jwk_file).read_text())
    except (OSError, ValueError) as exc:
        raise KasRayError(f"cannot read the signing key of peer {peer.nation}: {exc}") from None
    return dict(data)


class PeerAnswer:
    """A verified peer result: per-KAO results and the peer's EC session key, if any."""

    def __init__(self, results: list[KaoResult], session_public_key: str | None) -> None:
        self.results = results
        self.session_public_key = session_public_key


class Federation:
    """One nation's view of the coalition: peers, their keys and breakers, and our signing key."""

    def __init__(self, nation: str, config: FederationConfig, key: FederationKey, *, replay: ReplayStore,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.time,
                 transports: Mapping[str, PeerTransport] | None = None) -> None:
        self.nation = nation.upper()
        self.config = config
        self.key = key
        self.peers = {p.nation: p for p in config.peers}
        self._by_url = {_base(p.url): p for p in config.peers}
        self.keys: dict[str, dict[str, str]] = {p.nation: load_peer_jwk(p) for p in config.peers}
        self._replay = replay
        self._clock = clock
        #: Called with ("breaker", {...}) on breaker transitions (the service audits them).
        self.listener = on_event or (lambda kind, fields: None)
        self.breakers = BreakerBoard(config.breaker, list(self.peers), on_transition=self._transition)
        #: By transport kind; ``transports`` adds or replaces kinds (``local`` exists only when given).
        self._handles = HandlePeerTransport(batch_window=config.forward_batch_seconds)
        self._transports: dict[str, PeerTransport] = {"handle": self._handles, **(transports or {})}
        if "https" not in self._transports and any(p.transport == "https" for p in config.peers):
            self._transports["https"] = HttpsPeerTransport(config.tls)
        missing = sorted({p.transport for p in config.peers} - set(self._transports))
        if missing:
            raise ConfigError(f"{self.nation}: no peer transport of kind {', '.join(missing)} was given")
        self.counters: Counter[str] = Counter()

    # --- routing ---------------------------------------------------------------------------------------
    def route(self, kao_url: str) -> PeerConfig | None:
        """The peer a KAO names by its KAS URL (with or without a trailing ``/kas``), or None."""
        return self._by_url.get(_base(kao_url))

    def agreement(self, forwarder: str) -> AgreementConfig:
        peer = self.peers.get(forwarder.upper())
        return peer.agreement if peer else AgreementConfig(nations=[])

    # --- outbound ----------------------------------------------------------------------------------------
    async def forward(self, peer: PeerConfig, body: dict[str, Any], *, hops: list[str],
                      deadline: float, batchable: bool = False) -> PeerAnswer:
        """Send ``body`` to ``peer`` under its breaker; verify and return its signed answer.

        ``batchable``: only this peer can answer these KAOs (allOf), so the forward will not be cancelled
        before the deadline and may share a handle call with others (``forward_batch_seconds``).
        """
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise ForwardError("deadline passed before the forward was sent")
        text = json.dumps(body, separators=(",", ":"), sort_keys=True)
        message = sign_forward(self.key, peer.nation, text, hops=hops, ttl=self.config.forward_ttl_seconds,
                               deadline=deadline, now=self._clock())
        nonce = forward_nonce(message)
        timeout = min(self.config.peer_timeout_seconds, remaining)
        self.counters["forwards_sent"] += 1
        async with self.breakers.get(peer.nation).guard():
            reply = await self._transports[peer.transport].forward(peer, message, timeout, batchable=batchable)
        answer = verify_result(reply, me=self.nation, peer=peer.nation, nonce=nonce, keys=self.keys,
                               now=self._clock())
        sent = {item["keyAccessObjectId"] for item in body["keyAccessObjects"]}
        try:
            results = _RESULTS.validate_python(answer.get("results", []))
        except ValueError:
            raise ForwardError(f"peer {peer.nation} sent malformed results") from None
        foreign = {r.key_access_object_id for r in results} - sent
        if foreign:
            raise ForwardError(f"peer {peer.nation} answered for key access objects it was not sent")
        session = answer.get("sessionPublicKey")
        self.counters["forward_results"] += 1
        return PeerAnswer(results, session if isinstance(session, str) else None)

    # --- inbound -----------------------------------------------------------------------------------------
    async def verify_inbound(self, message: Mapping[str, Any], tls_peer: str | None = None
                             ) -> tuple[ForwardClaims, dict]:
        nonces: list[tuple[str, float]] = []

        def later(nonce: str, ttl: float) -> bool:  # recorded below, with the store's async call
            nonces.append((nonce, ttl))
            return True

        claims, body = verify_forward(message, me=self.nation, keys=self.keys, hop_limit=self.config.hop_limit,
                                      seen=later, now=self._clock())
        for nonce, ttl in nonces:
            if not await self._replay.acheck_and_store(nonce, ttl):
                raise ForwardError("forward nonce was already used (replay)")
        if claims.exp - claims.iat > self.config.forward_ttl_seconds + 1:
            raise ForwardError("forward lifetime is longer than this KAS accepts")
        if tls_peer is not None and tls_peer.upper() != claims.iss:
            raise ForwardError(f"TLS identity {tls_peer} does not match the signed forwarder {claims.iss}")
        self.counters["forwards_received"] += 1
        return claims, body

    def sign_answer(self, claims: ForwardClaims, body: dict[str, Any]) -> dict[str, str]:
        return sign_result(self.key, claims, json.dumps(body, separators=(",", ":")), now=self._clock())

    # --- status -------------------------------------------------------------------------------------------
    def _transition(self, peer: str, old: BreakerState, new: BreakerState) -> None:
        self.counters[f"breaker_{new.value}"] += 1
        self.listener("breaker", {"peer": peer, "from": old.value, "to": new.value})

    def status(self) -> dict[str, Any]:
        return {
            "nation": self.nation,
            "mode": self.config.mode,
            "peers": {n: {"url": p.url, "transport": p.transport, "breaker": self.breakers.get(n).snapshot()}
                      for n, p in self.peers.items()},
            "counters": {**self.counters, "handle_batches_sent": self._handles.batches,
                         "forwards_sent_in_batches": self._handles.batched_forwards},
        }

    async def close(self) -> None:
        for transport in self._transports.values():
            await transport.close()

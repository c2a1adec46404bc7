"""The rewrap path: one nation's KAS decision logic, independent of transport.

HTTP routes (Ray Serve / FastAPI) and in-process clients both call :meth:`RewrapService.rewrap`.
Order of checks, as the OpenTDF platform does it and ACP-240 requires:

  validate → verify access token → DPoP → signed request token →
  per KAO: key by kid → unwrap (cache, then key backend) → verify binding → ABAC → rewrap to client.

A KAO is released only after every step passed; every KAO decision is audited.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import inspect
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import BaseModel, Field, ValidationError

from kas_ray.audit import AuditAction, AuditEvent, AuditSink, MemoryAuditSink
from kas_ray.cache import CacheKind, MemoryCache, ShareCache, share_cache_key
from kas_ray.config import AgreementConfig, RewrapLimits, TrustRegistry
from kas_ray.errors import (
    AccessDenied,
    DPoPError,
    FormatError,
    KasRayError,
    SignedRequestError,
    TokenError,
    audit_id,
    showable,
    showable_url,
)
from kas_ray.federation.agreement import apply_agreement, check_agreement
from kas_ray.federation.envelope import ForwardError
from kas_ray.hazmat import primitives as P
from kas_ray.kas.models import (
    OPENTDF_BAD_REQUEST,
    OPENTDF_FORBIDDEN,
    KaoRequest,
    KaoResult,
    PolicyRequest,
    PolicyResult,
    RewrapRequestBody,
    RewrapResponse,
)
from kas_ray.keys.base import KeyBackend, KeyInfo
from kas_ray.policy import Decision, PolicyEngine, Subject
from kas_ray.trust import (
    DPoPProof,
    ReplayStore,
    TokenVerifier,
    VerifiedToken,
    averify_dpop,
    parse_authorization,
    verify_signed_request,
)
from kas_ray.trust.dpop import jwk_has_thumbprint
from kas_ray.ztdf.keyaccess import decode_wrapped_key
from kas_ray.ztdf.manifest import KeyAccessObject
from kas_ray.ztdf.policy import Policy, verify_binding

_T = TypeVar("_T")
#: Why a forward was cancelled (FORWARD_CANCELLED reasons).
_RELEASED_ELSEWHERE = "another KAS released these splits first"
_NOT_SENT = "not forwarded: released locally first"

if TYPE_CHECKING:
    from kas_ray.federation.broker import Federation
    from kas_ray.shared.ratelimit import RateLimiter


class RewrapCall(BaseModel):
    """One incoming rewrap, as any transport hands it over (headers, the URL the client used, body)."""

    authorization: str | None = None
    dpop: str | None = None
    method: str = "POST"
    url: str
    body: dict[str, Any]
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    #: Federation hops the request already made (origin first); empty for a direct client call.
    hops: list[str] = Field(default_factory=list)


def kas_base_url(url: str) -> str:
    """Normalise a KAS URL: no trailing slash, no trailing ``/kas`` (OpenTDF clients append it)."""
    url = url.rstrip("/")
    if url.endswith("/kas"):
        url = url[: -len("/kas")]
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


class _Session:
    """Per-request material for rewrapping shares to the client's public key."""

    def __init__(self, client_key: P.PublicKey) -> None:
        self.client_key = client_key
        self.session_public_pem: str | None = None
        self._wrap_key: bytes | None = None
        if isinstance(client_key, ec.EllipticCurvePublicKey):
            ephemeral = ec.generate_private_key(client_key.curve)
            self._wrap_key = P.ecdh_derive_key(ephemeral, client_key)
            self.session_public_pem = P.public_key_pem(ephemeral.public_key())

    def wrap(self, share: bytes) -> str:
        if self._wrap_key is not None:
            return base64.b64encode(P.aes_gcm_encrypt(self._wrap_key, share)).decode()
        assert isinstance(self.client_key, rsa.RSAPublicKey)
        # OpenTDF clients expect RSA-OAEP with SHA-1 for the rewrapped key.
        try:
            return base64.b64encode(P.rsa_oaep_encrypt(self.client_key, share, "sha1")).decode()
        except ValueError:  # a key OpenSSL will not encrypt to: the client's fault, and audited as such
            raise FormatError("clientPublicKey cannot be used for RSA-OAEP") from None


class KasUnavailable(KasRayError):
    """A KAS needed for a key access object did not answer in time."""

    code = "kas_unavailable"
    http_status = 503


@dataclass
class _Request:
    """What one authenticated rewrap carries through the per-policy and per-KAO steps."""

    call: RewrapCall
    token: str
    verified: VerifiedToken
    subject: Subject
    session: _Session
    client_public_key: str
    #: The verified DPoP key and the client's signed request: a peer re-checks that the client key
    #: it rewraps to was signed by the key the user's token is bound to.
    dpop_jwk: dict[str, Any] | None
    signed_request: str | None
    deadline: float
    #: Set when the request was forwarded by a peer: its agreement caps apply, nothing is forwarded again.
    agreement: AgreementConfig | None = None


@dataclass
class _PolicyWork:
    policy_b64: str
    policy: Policy | None
    decision: Decision | None
    #: KAO ids of this policy the broker gave up on (deadline, or the request was cancelled) after recording
    #: their failure: a task that still finishes (a cancellation can be swallowed, e.g. by 3.11's wait_for)
    #: records nothing. Per policy: KAO ids are unique within a policy, not across a request's policies.
    abandoned: set[str] = field(default_factory=set)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.policy_b64.encode()).hexdigest()

    @property
    def audit_uuid(self) -> str | None:
        """The policy's client-chosen uuid as the audit records it (:func:`audit_id`)."""
        return audit_id(self.policy.uuid) if self.policy else None


class RewrapService:
    """One nation's KAS: token trust, ABAC, and key release through a :class:`KeyBackend`."""

    def __init__(
        self,
        nation: str,
        *,
        keys: KeyBackend,
        trust: TrustRegistry,
        policy: PolicyEngine,
        replay: ReplayStore,
        audit: AuditSink | None = None,
        cache: ShareCache | None = None,
        public_urls: list[str] | None = None,
        limits: RewrapLimits | None = None,
        verifier: TokenVerifier | None = None,
        federation: Federation | None = None,
        clock: Callable[[], float] = time.time,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self.nation = nation.upper()
        self.keys = keys
        self.trust = trust
        self.policy = policy
        self.replay = replay
        self.audit = audit or MemoryAuditSink()
        self.cache = cache if cache is not None else MemoryCache()
        self.limits = limits or RewrapLimits()
        self.verifier = verifier or TokenVerifier(trust, clock=clock)
        self._public_urls = {kas_base_url(u) for u in public_urls or []}
        #: The canonical URL of this KAS: DPoP proofs must name it (``htu``), whatever Host header came in.
        self.public_url = kas_base_url(public_urls[0]) if public_urls else None
        self.federation = federation
        #: Per-subject rewrap limits, counted once the token is verified (the HTTP layer adds per-client ones).
        self.rate_limiter = rate_limiter
        if federation is not None:
            federation.listener = self._on_federation_event
            for peer in federation.peers.values():
                check_agreement(policy, peer.agreement, peer.nation)
        self._clock = clock

    # --- routing -------------------------------------------------------------------------------------
    def is_local(self, kao_url: str) -> bool:
        """Whether a KAO names this KAS: one of its public URLs, else a path ending in ``/{nation}``."""
        base = kas_base_url(kao_url)
        if self._public_urls:
            return base in self._public_urls
        return urlsplit(base).path.rsplit("/", 1)[-1].upper() == self.nation

    # --- request level ---------------------------------------------------------------------------------
    async def authenticate(self, call: RewrapCall) -> tuple[VerifiedToken, DPoPProof | None]:
        """Access token, then DPoP: TokenError/DPoPError (401) on any failure."""
        _scheme, token = parse_authorization(call.authorization)
        verified = await self.verifier.averify(token)
        proof: DPoPProof | None = None
        if call.dpop or verified.cnf_jkt or self.trust.dpop.required:
            if not call.dpop:
                raise DPoPError("a DPoP proof is required (token is DPoP-bound or DPoP is mandatory)")
            proof = await averify_dpop(
                call.dpop, method=call.method, url=call.url, access_token=token, config=self.trust.dpop,
                replay=self.replay, expected_jkt=verified.cnf_jkt, clock=self._clock,
            )
        return verified, proof

    def parse_body(self, body: dict[str, Any], proof: DPoPProof | None) -> RewrapRequestBody:
        """The rewrap body from a signed request token (or a plain ACP-240 body); 400 on any defect."""
        if "signedRequestToken" in body:
            srt = body["signedRequestToken"]
            if not isinstance(srt, str) or not srt:
                raise SignedRequestError("signedRequestToken must be a non-empty string")
            raw = verify_signed_request(
                srt, dpop_jwk=proof.jwk if proof else None,
                max_age_seconds=self.trust.signed_request_max_age_seconds, clock=self._clock,
                leeway_seconds=self.trust.leeway_seconds,
            )
        elif proof is not None:
            # The proof binds the token to a key but not the body to anything: only the key's signature over
            # the body binds the client key the share is rewrapped to (a captured proof must not be usable
            # with a client key of the thief's choosing).
            raise SignedRequestError("with a DPoP proof the body must be a signedRequestToken signed by the DPoP key")
        else:
            raw = body
        try:
            request = RewrapRequestBody.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "body"
            raise FormatError(f"invalid rewrap request: {where}: {err['msg']}") from None
        policies = request.policy_requests()
        if len(policies) > self.limits.max_policies:
            raise FormatError(f"too many policies (limit {self.limits.max_policies})")
        count = sum(len(p.key_access_objects) for p in policies)
        if count > self.limits.max_key_access_objects:
            raise FormatError(f"too many key access objects: {count} (limit {self.limits.max_key_access_objects})")
        return request

    def client_key(self, pem: str) -> P.PublicKey:
        try:
            key = P.load_public_key_pem(pem)
        except ValueError:
            raise FormatError("clientPublicKey is not a PEM public key") from None
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < self.limits.min_rsa_client_key_bits:
            raise FormatError(f"clientPublicKey RSA keys need at least {self.limits.min_rsa_client_key_bits} bits")
        if isinstance(key, rsa.RSAPublicKey) and key.key_size > self.limits.max_rsa_client_key_bits:
            raise FormatError(f"clientPublicKey RSA keys may have at most {self.limits.max_rsa_client_key_bits} bits")
        if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise FormatError("clientPublicKey uses an unsupported curve")
        return key

    async def rewrap(self, call: RewrapCall) -> RewrapResponse:
        """Handle one rewrap. Request-level failures raise (401/400); per-KAO failures are results."""
        return await self._audited(self._rewrap(call))

    async def handle_forward(self, message: dict[str, Any], tls_peer: str | None = None) -> dict[str, Any]:
        """Serve KAOs another nation forwarded: verify the envelope, re-verify the user's token
        against our own trust registry, apply our ABAC and the agreement caps, sign the answer."""
        return await self._audited(self._handle_forward(message, tls_peer))

    async def _audited(self, work: Awaitable[_T]) -> _T:
        """``work``'s answer, once its audit records are on disk (the sink's flush: one fsync for all)."""
        try:
            answer = await work
        except BaseException:
            with contextlib.suppress(Exception):  # the refusal stands whatever the disk says
                await self.audit.flush()
            raise
        await self.audit.flush()  # raises if the records are not on disk: then no key leaves
        return answer

    async def _rewrap(self, call: RewrapCall) -> RewrapResponse:
        try:
            verified, proof = await self.authenticate(call)
            if self.rate_limiter is not None:
                await self.rate_limiter.check_subject("rewrap", verified.issuer, verified.subject)
            request = self.parse_body(call.body, proof)
            session = _Session(self.client_key(request.client_public_key))
        except KasRayError as exc:
            self._audit_rejection(call, exc)
            raise
        deadline = self._clock() + (self.federation.config.deadline_seconds if self.federation else 30.0)
        ctx = _Request(call=call, token=parse_authorization(call.authorization)[1], verified=verified,
                       subject=_subject(verified), session=session, client_public_key=request.client_public_key,
                       dpop_jwk=proof.jwk if proof else None, signed_request=_srt(call.body), deadline=deadline)
        tasks = [asyncio.ensure_future(self._policy(ctx, req)) for req in request.policy_requests()]
        try:
            responses = await asyncio.gather(*tasks)
        except BaseException:  # one policy failed the request: the others must not go on releasing keys
            for task in tasks:
                task.cancel()
            raise
        response = RewrapResponse(session_public_key=session.session_public_pem, responses=list(responses))
        if request.is_v1:
            # v1 (one keyAccess) answers with a status, as the platform does: 400/403 carry no key.
            first = responses[0].results[0]
            if first.status != "permit":
                if (first.error or "").startswith("rpc error: code = Unavailable"):  # HSM/peer down: 503, retry
                    raise KasUnavailable(first.error or "")
                raise (AccessDenied if first.error == OPENTDF_FORBIDDEN else FormatError)(first.error or "")
            response.entity_wrapped_key = first.kas_wrapped_key
            # A peer rewrapped it under its own session key (EC clients): v1 has only the top-level one.
            peer_session = first.metadata.get("sessionPublicKey")
            if isinstance(peer_session, str):
                response.session_public_key = peer_session
        return response

    # --- per policy: local work and brokered work --------------------------------------------------------
    async def _policy(self, ctx: _Request, req: PolicyRequest) -> PolicyResult:
        policy_b64 = req.policy.body
        try:
            policy: Policy | None = Policy.from_base64(policy_b64)
        except KasRayError:
            policy = None
        decision = self.policy.decide(ctx.subject, policy.attributes, policy.body.dissem) if policy else None
        if decision is not None and policy is not None and ctx.agreement is not None:
            decision = apply_agreement(self.policy, decision, ctx.agreement, ctx.subject, policy.attributes,
                                       ctx.call.hops[-1] if ctx.call.hops else "?")
        work = _PolicyWork(policy_b64, policy, decision)
        local: list[KaoRequest] = []
        groups: dict[str, list[KaoRequest]] = {}
        results: dict[str, KaoResult] = {}
        for item in req.key_access_objects:
            url = item.key_access_object.url
            peer = None if ctx.agreement is not None or self.federation is None else self.federation.route(url)
            if self.is_local(url):
                local.append(item)
            elif peer is not None:
                groups.setdefault(peer.nation, []).append(item)
            else:
                results[item.key_access_object_id] = self._no_route(ctx, work, item)
        if groups:
            results.update(await self._broker(ctx, req, work, local, groups))
        else:
            for result in await asyncio.gather(*(self._kao(ctx, work, item) for item in local)):
                results[result.key_access_object_id] = result
        return PolicyResult(policy_id=req.policy.id,
                            results=[results[item.key_access_object_id] for item in req.key_access_objects])

    async def _broker(self, ctx: _Request, req: PolicyRequest, work: _PolicyWork, local: list[KaoRequest],
                      groups: dict[str, list[KaoRequest]]) -> dict[str, KaoResult]:
        """Local KAOs and one forward per peer, in parallel: the first permit per split wins.

        A forward whose splits are all released elsewhere is cancelled at the peer; whatever has not
        answered by the deadline fails with a per-KAO error. Sequential mode (benchmarks only) runs
        the local work, then each peer in turn, and stops asking once every split is released.
        """
        assert self.federation is not None
        split = {item.key_access_object_id: item.key_access_object.split_id for item in req.key_access_objects}
        results: dict[str, KaoResult] = {}
        released: set[str] = set()

        def absorb(batch: list[KaoResult]) -> None:
            for result in batch:
                results[result.key_access_object_id] = result
                if result.status == "permit":
                    released.add(split[result.key_access_object_id])

        def needed(items: list[KaoRequest]) -> bool:
            return not {split[i.key_access_object_id] for i in items} <= released

        if self.federation.config.mode == "sequential":
            absorb(list(await asyncio.gather(*(self._kao(ctx, work, item) for item in local))))
            for nation, items in groups.items():
                absorb(await self._forward(ctx, req, work, nation, items) if needed(items)
                       else self._unneeded(ctx, work, nation, items))
            return results

        pending: dict[asyncio.Task[list[KaoResult]], tuple[str, list[KaoRequest]]] = {}
        for item in local:
            pending[asyncio.ensure_future(self._kao_batch(ctx, work, item))] = (self.nation, [item])
        # Local first: a forward that only duplicates splits we hold waits until we fail one of them
        # (or for the hedge delay); the others start at once.
        local_splits = {split[i.key_access_object_id] for i in local}
        hedge = self.federation.config.local_first_seconds
        local_failed = asyncio.Event()
        held: set[str] = set()  # forwards not sent (yet)
        # Who can release each split (the home, each peer): a forward is cancelled only when another holder
        # released all its splits (anyOf), so one whose splits nobody else holds (allOf) may be batched.
        holders = Counter(s for its in (local, *groups.values()) for s in {split[i.key_access_object_id] for i in its})
        for nation, items in groups.items():
            splits = {split[i.key_access_object_id] for i in items}
            covered = hedge is not None and splits <= local_splits
            forward = self._forward(ctx, req, work, nation, items, batchable=all(holders[s] == 1 for s in splits))
            if covered:
                held.add(nation)
                forward = _after(local_failed, hedge, forward, on_start=functools.partial(held.discard, nation))
            pending[asyncio.ensure_future(forward)] = (nation, items)
        try:
            while pending:
                timeout = ctx.deadline - self._clock()
                done = (await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED))[0] \
                    if timeout > 0 else set()
                if not done:
                    break
                for task in done:
                    nation, _items = pending.pop(task)
                    batch = task.result()
                    absorb(batch)
                    if nation == self.nation and any(r.status != "permit" for r in batch):
                        local_failed.set()
                for task, (nation, items) in list(pending.items()):
                    if nation != self.nation and not needed(items):
                        pending.pop(task)
                        if task.done():  # answered meanwhile (audited by _forward): its keys are not needed
                            absorb(self._unneeded(ctx, work, nation, items, audit=None))
                            continue
                        reason = _NOT_SENT if nation in held else _RELEASED_ELSEWHERE
                        task.cancel()  # the transport cancels the call at the peer
                        absorb(self._unneeded(ctx, work, nation, items, audit=reason))
                        # Should the cancellation be swallowed (3.11 wait_for), the forward records nothing more.
                        work.abandoned.update(item.key_access_object_id for item in items)
        finally:
            for task, (nation, items) in pending.items():  # deadline passed (or we were cancelled)
                if task.done() and not task.cancelled() and task.exception() is None:
                    absorb(task.result())  # finished as we were cancelled: it audited its own decisions
                    continue
                task.cancel()
                absorb([self._fail(ctx, work, item, KasUnavailable(f"{nation}: deadline exceeded"))
                        for item in items])
                work.abandoned.update(item.key_access_object_id for item in items)
        return results

    async def _kao_batch(self, ctx: _Request, work: _PolicyWork, item: KaoRequest) -> list[KaoResult]:
        return [await self._kao(ctx, work, item)]

    async def _forward(self, ctx: _Request, req: PolicyRequest, work: _PolicyWork, nation: str,
                       items: list[KaoRequest], *, batchable: bool = False) -> list[KaoResult]:
        assert self.federation is not None
        peer = self.federation.peers[nation]
        body = {
            "token": ctx.token,
            "clientPublicKey": ctx.client_public_key,
            "policy": req.policy.to_wire(),
            "keyAccessObjects": [item.to_wire() for item in items],
            "dpopJwk": ctx.dpop_jwk,
            "signedRequestToken": ctx.signed_request,
            "requestId": ctx.call.request_id,
        }
        started = time.perf_counter()
        try:
            answer = await self.federation.forward(peer, body, hops=ctx.call.hops, deadline=ctx.deadline,
                                                   batchable=batchable)
        except KasRayError as exc:
            if not work.abandoned.issuperset(i.key_access_object_id for i in items):
                self._audit_federation(ctx, work, AuditAction.FORWARD_FAILED, nation, [exc.message], started, exc)
            return [self._fail(ctx, work, item, exc, audit=False) for item in items]
        by_id = {r.key_access_object_id: r for r in answer.results}
        permits = sum(1 for r in answer.results if r.status == "permit")
        if not work.abandoned.issuperset(i.key_access_object_id for i in items):
            self._audit_federation(ctx, work, AuditAction.FORWARD_RESULT, nation,
                                   [f"{permits} of {len(items)} key access objects released by {nation}"], started)
        out: list[KaoResult] = []
        for item in items:
            result = by_id.get(item.key_access_object_id)
            if result is None:
                out.append(self._fail(ctx, work, item, KasUnavailable(f"{nation} gave no result"), audit=False))
                continue
            if result.status == "permit" and answer.session_public_key:
                result.metadata["sessionPublicKey"] = answer.session_public_key
            out.append(result)
        return out

    def _unneeded(self, ctx: _Request, work: _PolicyWork, nation: str, items: list[KaoRequest], *,
                  audit: str | None = _RELEASED_ELSEWHERE) -> list[KaoResult]:
        """Per-KAO results for a forward whose splits were released elsewhere (``audit``: why it was cancelled)."""
        if audit is not None:
            self._audit_federation(ctx, work, AuditAction.FORWARD_CANCELLED, nation, [audit], time.perf_counter())
        return [KaoResult(key_access_object_id=i.key_access_object_id, status="fail",
                          error=f"not needed: another KAS released split {i.key_access_object.split_id or '0'}")
                for i in items]

    def _no_route(self, ctx: _Request, work: _PolicyWork, item: KaoRequest) -> KaoResult:
        url = showable_url(kas_base_url(item.key_access_object.url))
        if url is None:  # never echo an arbitrary client string into the answer and the audit
            reason = "no route: the key access object's url is not an http(s) KAS URL"
        elif ctx.agreement is not None:
            reason = f"key access object is for {url}: forwarded requests are not forwarded again"
        else:
            reason = f"no route to the KAS at {url}"
        return self._fail(ctx, work, item, FormatError(reason))

    def _fail(self, ctx: _Request, work: _PolicyWork, item: KaoRequest, exc: KasRayError, *,
              audit: bool = True) -> KaoResult:
        if audit:
            self._audit_kao(ctx, item, None, work, exc, time.perf_counter())
        if isinstance(exc, AccessDenied):
            error = OPENTDF_FORBIDDEN
        elif exc.http_status >= 500:  # HSM, peer or deadline: worth a retry, unlike a refusal
            error = f"rpc error: code = Unavailable desc = {exc.public_message}"
        else:
            error = OPENTDF_BAD_REQUEST
        return KaoResult(key_access_object_id=item.key_access_object_id, status="fail", error=error)

    # --- per KAO (this nation's keys) ------------------------------------------------------------------------
    async def _unwrap(self, info: KeyInfo, kao: KeyAccessObject, wrapped: bytes) -> bytes:
        key = share_cache_key(self.nation, info.kid, info.version, wrapped, kao.ephemeral_public_key)
        cached = await self.cache.aget(key)
        if isinstance(cached, bytes):
            return cached
        share = await self.keys.unwrap(info.kid, wrapped, kao.ephemeral_public_key)
        await self.cache.aput(key, share, CacheKind.SHARE)
        return share

    async def _kao(self, ctx: _Request, work: _PolicyWork, item: KaoRequest) -> KaoResult:
        started = time.perf_counter()
        kao = item.key_access_object
        info: KeyInfo | None = None
        try:
            if work.policy is None or work.decision is None:
                raise FormatError("policy is not base64 JSON of the policy schema")
            wrapped, _ = decode_wrapped_key(kao)
            info = await self.keys.key_info(kao.kid, "ec:secp256r1" if kao.type == "ec-wrapped" else "rsa:2048")
            share = await self._unwrap(info, kao, wrapped)
            verify_binding(share, work.policy_b64, kao.policy_binding)
            if not work.decision.allowed:
                raise AccessDenied("; ".join(work.decision.reasons) or "access denied")
            result = KaoResult(key_access_object_id=item.key_access_object_id, status="permit",
                               kas_wrapped_key=ctx.session.wrap(share))
            self._audit_kao(ctx, item, info, work, None, started)
            return result
        except KasRayError as exc:
            self._audit_kao(ctx, item, info, work, exc, started)
            return self._fail(ctx, work, item, exc, audit=False)

    # --- federation: the serving side ------------------------------------------------------------------------
    async def _handle_forward(self, message: dict[str, Any], tls_peer: str | None = None) -> dict[str, Any]:
        if self.federation is None:
            raise ForwardError("this KAS does not federate")
        federation = self.federation
        call = RewrapCall(url=self.public_url or "", body={}, request_id=uuid.uuid4().hex)
        try:
            claims, body = await federation.verify_inbound(message, tls_peer)
            request_id = str(body.get("requestId") or claims.jti)[:128]
            call = call.model_copy(update={"hops": claims.hops, "request_id": request_id})
            if federation.config.debug_delay_seconds:
                await asyncio.sleep(federation.config.debug_delay_seconds)
            token = body.get("token")
            if not isinstance(token, str):
                raise TokenError("forward carries no user token")
            verified = await self.verifier.averify(token)
            client_pem = body.get("clientPublicKey")
            if not isinstance(client_pem, str):
                raise FormatError("forward carries no clientPublicKey")
            if verified.cnf_jkt:
                self._check_bound_client_key(verified.cnf_jkt, body, client_pem)
            session = _Session(self.client_key(client_pem))
            try:
                req = PolicyRequest.model_validate({"policy": body.get("policy"),
                                                    "keyAccessObjects": body.get("keyAccessObjects")})
            except ValidationError:
                raise FormatError("forward body does not match the rewrap schema") from None
            if len(req.key_access_objects) > self.limits.max_key_access_objects:
                raise FormatError("too many key access objects in the forward")
        except asyncio.CancelledError:
            federation.counters["forwards_cancelled"] += 1
            raise
        except KasRayError as exc:
            self._audit_rejection(call, exc)
            raise
        ctx = _Request(call=call, token=token, verified=verified, subject=_subject(verified), session=session,
                       client_public_key=client_pem, dpop_jwk=body.get("dpopJwk"),
                       signed_request=body.get("signedRequestToken"),
                       deadline=min(claims.deadline, self._clock() + federation.config.deadline_seconds),
                       agreement=federation.agreement(claims.iss))
        try:
            result = await self._policy(ctx, req)
        except asyncio.CancelledError:
            federation.counters["forwards_cancelled"] += 1
            raise
        answer = {"sessionPublicKey": session.session_public_pem,
                  "results": [r.to_wire() for r in result.results]}
        return federation.sign_answer(claims, answer)

    def _check_bound_client_key(self, jkt: str, body: dict[str, Any], client_pem: str) -> None:
        """For a DPoP-bound token, the forwarder must show that the token's key signed the client key.

        Otherwise any KAS holding a user's token could have a peer rewrap shares to a key of its own.
        """
        jwk = body.get("dpopJwk")
        if not jwk_has_thumbprint(jwk, jkt):
            raise DPoPError("the user's token is DPoP-bound: the forward must carry that DPoP key")
        srt = body.get("signedRequestToken")
        if not isinstance(srt, str):
            raise DPoPError("the user's token is DPoP-bound: the forward must carry the signed request")
        signed = verify_signed_request(srt, dpop_jwk=jwk, max_age_seconds=self.trust.signed_request_max_age_seconds,
                                       clock=self._clock, leeway_seconds=self.trust.leeway_seconds)
        if signed.get("clientPublicKey") != client_pem:
            raise SignedRequestError("the forwarded client key is not the one the user signed")

    # --- audit ------------------------------------------------------------------------------------------
    def _audit_kao(self, ctx: _Request, item: KaoRequest, info: KeyInfo | None, work: _PolicyWork,
                   error: KasRayError | None, started: float) -> None:
        if item.key_access_object_id in work.abandoned:
            return  # the broker recorded this KAO's failure already; its answer never reaches the client
        decision = work.decision
        if error is None:
            reasons = [c.reason for c in decision.checks] if decision else []
            action, outcome = AuditAction.KEY_RELEASED, "permit"
        elif isinstance(error, AccessDenied):
            action, outcome, reasons = AuditAction.KEY_DENIED, "deny", decision.reasons if decision else [error.message]
        else:
            action, outcome, reasons = AuditAction.KEY_ERROR, "error", [error.message]
        self.audit.emit(AuditEvent(
            action=action, request_id=ctx.call.request_id, nation=self.nation, subject=ctx.verified.subject,
            issuer=ctx.verified.issuer, kid=info.kid if info else showable(item.key_access_object.kid),
            kao_id=audit_id(item.key_access_object_id), policy_uuid=work.audit_uuid,
            policy_digest=work.digest, decision=outcome, reasons=reasons,
            error_code=error.code if error else None, latency_ms=round((time.perf_counter() - started) * 1e3, 3),
            hops=ctx.call.hops,
        ))

    def _audit_federation(self, ctx: _Request, work: _PolicyWork, action: AuditAction, peer: str,
                          reasons: list[str], started: float, error: KasRayError | None = None) -> None:
        self.audit.emit(AuditEvent(
            action=action, request_id=ctx.call.request_id, nation=self.nation, subject=ctx.verified.subject,
            issuer=ctx.verified.issuer, peer=peer, policy_uuid=work.audit_uuid,
            policy_digest=work.digest, decision="error" if error else "routed", reasons=reasons,
            error_code=error.code if error else None, latency_ms=round((time.perf_counter() - started) * 1e3, 3),
            hops=ctx.call.hops,
        ))

    def _on_federation_event(self, kind: str, fields: dict[str, Any]) -> None:
        if kind == "breaker":
            self.audit.emit(AuditEvent(
                action=AuditAction.BREAKER_TRANSITION, request_id=uuid.uuid4().hex, nation=self.nation,
                peer=fields["peer"], decision=fields["to"], reasons=[f"breaker {fields['from']} -> {fields['to']}"],
            ))

    def _audit_rejection(self, call: RewrapCall, error: KasRayError) -> None:
        self.audit.emit(AuditEvent(
            action=AuditAction.REQUEST_REJECTED, request_id=call.request_id, nation=self.nation,
            decision="reject", reasons=[error.message], error_code=error.code, hops=call.hops,
        ))


def _srt(body: dict[str, Any]) -> str | None:
    srt = body.get("signedRequestToken")
    return srt if isinstance(srt, str) else None


def _subject(verified: VerifiedToken) -> Subject:
    return Subject(subject=verified.subject, issuer=verified.issuer, clearance=verified.clearance,
                   clearance_system=verified.clearance_system, nationality=verified.nationality,
                   coi=verified.coi, issuer_nations=verified.issuer_nations)


async def _after(event: asyncio.Event, delay: float | None, work: Awaitable[_T], on_start: Callable[[], None]) -> _T:
    """Run ``work`` once ``event`` is set or ``delay`` seconds passed (a hedged request).

    Cancelled before it starts, ``work`` never runs (its coroutine is closed, so nothing is sent)."""
    try:
        await asyncio.wait_for(event.wait(), delay)
    except TimeoutError:
        pass
    except BaseException:
        if inspect.iscoroutine(work):
            work.close()
        raise
    task = asyncio.current_task()
    if task is not None and task.cancelling():  # cancelled as the wait ended: still nothing is sent
        if inspect.iscoroutine(work):
            work.close()
        raise asyncio.CancelledError
    on_start()
    return await work

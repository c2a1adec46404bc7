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
import hashlib
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import BaseModel, Field, ValidationError

from kas_ray.audit import AuditAction, AuditEvent, AuditSink, MemoryAuditSink
from kas_ray.cache import CacheKind, MemoryCache, ShareCache, share_cache_key
from kas_ray.config import RewrapLimits, TrustRegistry
from kas_ray.errors import (
    AccessDenied,
    DPoPError,
    FormatError,
    KasRayError,
    SignedRequestError,
)
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
from kas_ray.ztdf.keyaccess import decode_wrapped_key
from kas_ray.ztdf.manifest import KeyAccessObject
from kas_ray.ztdf.policy import Policy, verify_binding


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
        return base64.b64encode(P.rsa_oaep_encrypt(self.client_key, share, "sha1")).decode()


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
        clock: Callable[[], float] = time.time,
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
        if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise FormatError("clientPublicKey uses an unsupported curve")
        return key

    async def rewrap(self, call: RewrapCall) -> RewrapResponse:
        """Handle one rewrap. Request-level failures raise (401/400); per-KAO failures are results."""
        try:
            verified, proof = await self.authenticate(call)
            request = self.parse_body(call.body, proof)
            session = _Session(self.client_key(request.client_public_key))
        except KasRayError as exc:
            self._audit_rejection(call, exc)
            raise
        subject = Subject(
            subject=verified.subject, issuer=verified.issuer, clearance=verified.clearance,
            clearance_system=verified.clearance_system, nationality=verified.nationality,
            coi=verified.coi, issuer_nations=verified.issuer_nations,
        )
        responses = await asyncio.gather(
            *(self._policy(call, verified, subject, session, req) for req in request.policy_requests())
        )
        response = RewrapResponse(session_public_key=session.session_public_pem, responses=list(responses))
        if request.is_v1:
            # v1 (one keyAccess) answers with a status, as the platform does: 400/403 carry no key.
            first = responses[0].results[0]
            if first.status != "permit":
                raise (AccessDenied if first.error == OPENTDF_FORBIDDEN else FormatError)(first.error or "")
            response.entity_wrapped_key = first.kas_wrapped_key
        return response

    # --- per policy / per KAO ----------------------------------------------------------------------------
    async def _policy(
        self, call: RewrapCall, verified: VerifiedToken, subject: Subject, session: _Session, req: PolicyRequest
    ) -> PolicyResult:
        policy_b64 = req.policy.body
        try:
            policy: Policy | None = Policy.from_base64(policy_b64)
        except KasRayError:
            policy = None
        decision = (
            self.policy.decide(subject, policy.attributes, policy.body.dissem) if policy is not None else None
        )
        results = await asyncio.gather(
            *(self._kao(call, verified, session, policy_b64, policy, decision, k) for k in req.key_access_objects)
        )
        return PolicyResult(policy_id=req.policy.id, results=list(results))

    async def _unwrap(self, info: KeyInfo, kao: KeyAccessObject, wrapped: bytes) -> bytes:
        key = share_cache_key(self.nation, info.kid, info.version, wrapped, kao.ephemeral_public_key)
        cached = await self.cache.aget(key)
        if isinstance(cached, bytes):
            return cached
        share = await self.keys.unwrap(info.kid, wrapped, kao.ephemeral_public_key)
        await self.cache.aput(key, share, CacheKind.SHARE)
        return share

    async def _kao(
        self,
        call: RewrapCall,
        verified: VerifiedToken,
        session: _Session,
        policy_b64: str,
        policy: Policy | None,
        decision: Decision | None,
        item: KaoRequest,
    ) -> KaoResult:
        started = time.perf_counter()
        kao = item.key_access_object
        info: KeyInfo | None = None
        try:
            if not self.is_local(kao.url):
                raise FormatError(f"key access object is for {kas_base_url(kao.url)}, not this KAS ({self.nation})")
            if policy is None or decision is None:
                raise FormatError("policy is not base64 JSON of the policy schema")
            wrapped, _ = decode_wrapped_key(kao)
            info = await self.keys.key_info(kao.kid, "ec:secp256r1" if kao.type == "ec-wrapped" else "rsa:2048")
            share = await self._unwrap(info, kao, wrapped)
            verify_binding(share, policy_b64, kao.policy_binding)
            if not decision.allowed:
                raise AccessDenied("; ".join(decision.reasons) or "access denied")
            result = KaoResult(key_access_object_id=item.key_access_object_id, status="permit",
                               kas_wrapped_key=session.wrap(share))
            self._audit_kao(call, verified, item, info, policy_b64, policy, decision, None, started)
            return result
        except KasRayError as exc:
            self._audit_kao(call, verified, item, info, policy_b64, policy, decision, exc, started)
            error = OPENTDF_FORBIDDEN if isinstance(exc, AccessDenied) else OPENTDF_BAD_REQUEST
            return KaoResult(key_access_object_id=item.key_access_object_id, status="fail", error=error)

    # --- audit ------------------------------------------------------------------------------------------
    def _audit_kao(
        self,
        call: RewrapCall,
        verified: VerifiedToken,
        item: KaoRequest,
        info: KeyInfo | None,
        policy_b64: str,
        policy: Policy | None,
        decision: Decision | None,
        error: KasRayError | None,
        started: float,
    ) -> None:
        if error is None:
            reasons = [c.reason for c in decision.checks] if decision else []
            action, outcome = AuditAction.KEY_RELEASED, "permit"
        elif isinstance(error, AccessDenied):
            action, outcome, reasons = AuditAction.KEY_DENIED, "deny", decision.reasons if decision else [error.message]
        else:
            action, outcome, reasons = AuditAction.KEY_ERROR, "error", [error.message]
        self.audit.emit(AuditEvent(
            action=action, request_id=call.request_id, nation=self.nation, subject=verified.subject,
            issuer=verified.issuer, kid=info.kid if info else item.key_access_object.kid,
            kao_id=item.key_access_object_id, policy_uuid=policy.uuid if policy else None,
            policy_digest=hashlib.sha256(policy_b64.encode()).hexdigest(), decision=outcome, reasons=reasons,
            error_code=error.code if error else None, latency_ms=round((time.perf_counter() - started) * 1e3, 3),
            hops=call.hops,
        ))

    def _audit_rejection(self, call: RewrapCall, error: KasRayError) -> None:
        self.audit.emit(AuditEvent(
            action=AuditAction.REQUEST_REJECTED, request_id=call.request_id, nation=self.nation,
            decision="reject", reasons=[error.message], error_code=error.code, hops=call.hops,
        ))

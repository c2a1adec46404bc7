"""Token trust: who may call the KAS and with which subject attributes.

Access tokens are verified against issuers pinned in the trust registry (:class:`TokenVerifier`),
optionally bound to a client key by DPoP (:func:`verify_dpop`); the rewrap request itself arrives
as a signed request token (:func:`verify_signed_request`). Dev identity providers mint tokens for
local use under the ``dev`` profile only.
"""

from kas_ray.trust.dev_idp import DevIdentityProvider, dev_issuer, dev_issuer_configs, dev_trust_registry
from kas_ray.trust.dpop import DPoPProof, averify_dpop, jwk_thumbprint, make_dpop_proof, verify_dpop
from kas_ray.trust.replay import MemoryReplayStore, ReplayStore
from kas_ray.trust.request_token import sign_request, verify_signed_request
from kas_ray.trust.tokens import TokenVerifier, VerifiedToken, parse_authorization

__all__ = [
    "DPoPProof",
    "DevIdentityProvider",
    "MemoryReplayStore",
    "ReplayStore",
    "TokenVerifier",
    "VerifiedToken",
    "averify_dpop",
    "dev_issuer",
    "dev_issuer_configs",
    "dev_trust_registry",
    "jwk_thumbprint",
    "make_dpop_proof",
    "parse_authorization",
    "sign_request",
    "verify_dpop",
    "verify_signed_request",
]

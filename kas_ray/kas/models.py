"""Wire models of the rewrap protocol (OpenTDF KAS v2 request/response, v1 fallback)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kas_ray.ztdf._wire import WireModel
from kas_ray.ztdf.manifest import KeyAccessObject

#: OpenTDF SDKs classify failures by these exact strings.
OPENTDF_BAD_REQUEST = "rpc error: code = InvalidArgument desc = bad request"
OPENTDF_FORBIDDEN = "rpc error: code = PermissionDenied desc = forbidden"


#: Longest policy body accepted (v1 or v2); the same bound as the policy parser's.
MAX_POLICY_CHARS = 64 * 1024


class PolicyRef(WireModel):
    id: str = "policy"
    body: str = Field(max_length=MAX_POLICY_CHARS)


class KaoRequest(WireModel):
    key_access_object_id: str = Field(max_length=256)
    key_access_object: KeyAccessObject


class PolicyRequest(WireModel):
    policy: PolicyRef
    algorithm: str | None = None
    key_access_objects: list[KaoRequest] = Field(min_length=1)

    @field_validator("key_access_objects")
    @classmethod
    def _unique_ids(cls, value: list[KaoRequest]) -> list[KaoRequest]:
        # Results, audit records and the broker's bookkeeping are keyed by KAO id within a policy.
        if len({k.key_access_object_id for k in value}) != len(value):
            raise ValueError("keyAccessObjectId values must be unique within a policy")
        return value


class RewrapRequestBody(WireModel):
    """The ``requestBody`` of a signed request token (v2), or a v1 body (one ``keyAccess``)."""

    client_public_key: str = Field(min_length=1, max_length=16 * 1024)
    requests: list[PolicyRequest] = Field(default_factory=list)
    # v1 (deprecated, still sent by older SDKs)
    key_access: KeyAccessObject | None = None
    #: Validated like PolicyRef.body, so building the v2 form in policy_requests() cannot fail.
    policy: str | None = Field(default=None, max_length=MAX_POLICY_CHARS)
    algorithm: str | None = None

    @field_validator("requests", mode="before")
    @classmethod
    def _null_is_empty(cls, value: object) -> object:
        return [] if value is None else value

    @model_validator(mode="after")
    def _v1_or_v2(self) -> RewrapRequestBody:
        if not self.requests and (self.key_access is None or not self.policy):
            raise ValueError("request has neither `requests` (v2) nor `keyAccess` and `policy` (v1)")
        return self

    @property
    def is_v1(self) -> bool:
        return not self.requests

    def policy_requests(self) -> list[PolicyRequest]:
        """v2 requests as sent, or the v1 body as one equivalent v2 request."""
        if self.requests:
            return self.requests
        assert self.key_access is not None and self.policy is not None
        kao = KaoRequest(key_access_object_id="kao-0", key_access_object=self.key_access)
        return [PolicyRequest(policy=PolicyRef(body=self.policy), algorithm=self.algorithm, key_access_objects=[kao])]


class KaoResult(WireModel):
    key_access_object_id: str
    status: Literal["permit", "fail"]
    kas_wrapped_key: str | None = None
    error: str | None = None
    #: Free-form per-result metadata (the platform sends obligations here; brokered EC results their
    #: ``sessionPublicKey``).
    metadata: dict[str, Any] = Field(default_factory=dict)


class PolicyResult(WireModel):
    policy_id: str
    results: list[KaoResult]


class RewrapResponse(WireModel):
    session_public_key: str | None = None
    entity_wrapped_key: str | None = None
    responses: list[PolicyResult] = Field(default_factory=list)


class PublicKeyResponse(WireModel):
    public_key: str
    kid: str

"""The TDF policy object and its cryptographic binding to each key share.

The policy travels as the exact base64 string found in the manifest; the binding is an HMAC over
that string, so the KAS must hash the string it was sent, never a re-serialisation of it.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid as uuidlib

from pydantic import Field, ValidationError, field_validator

from kas_ray.errors import PolicyBindingError, PolicyFormatError, quoted
from kas_ray.hazmat.primitives import constant_time_equal, hmac_sha256
from kas_ray.ztdf._wire import WireModel, b64decode_strict

BINDING_ALG = "HS256"
#: Upper bound on an encoded policy; a real ACP-240 label set is a few hundred bytes.
MAX_POLICY_BYTES = 64 * 1024


class AttributeRef(WireModel):
    attribute: str


class PolicyBody(WireModel):
    data_attributes: list[AttributeRef] = Field(default_factory=list)
    dissem: list[str] = Field(default_factory=list)

    @field_validator("data_attributes", "dissem", mode="before")
    @classmethod
    def _null_is_empty(cls, value: object) -> object:
        return [] if value is None else value  # the Go SDK writes `null` for empty lists


class Policy(WireModel):
    uuid: str
    body: PolicyBody = Field(default_factory=PolicyBody)

    @classmethod
    def create(cls, attributes: list[str], dissem: list[str] | None = None) -> Policy:
        body = PolicyBody(data_attributes=[AttributeRef(attribute=a) for a in attributes], dissem=dissem or [])
        return cls(uuid=str(uuidlib.uuid4()), body=body)

    @property
    def attributes(self) -> list[str]:
        return [ref.attribute for ref in self.body.data_attributes]

    def to_base64(self) -> str:
        return base64.b64encode(self.to_json().encode()).decode()

    @classmethod
    def from_base64(cls, encoded: str) -> Policy:
        if len(encoded) > MAX_POLICY_BYTES:
            raise PolicyFormatError("policy is too large")
        try:
            raw = b64decode_strict(encoded)
            return cls.model_validate(json.loads(raw))
        except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError) as exc:
            reason = "does not match the policy schema" if isinstance(exc, ValidationError) else "is not base64 JSON"
            raise PolicyFormatError(f"policy {reason}") from None


class PolicyBinding(WireModel):
    alg: str = BINDING_ALG
    hash: str


def compute_binding(share: bytes, policy_b64: str) -> PolicyBinding:
    """Binding as the OpenTDF SDKs write it: base64(hex(HMAC-SHA256(share, policy_b64)))."""
    mac = hmac_sha256(share, policy_b64.encode())
    return PolicyBinding(hash=base64.b64encode(mac.hex().encode()).decode())


def decode_mac(encoded: str, size: int = 32) -> bytes:
    """Decode a base64 MAC written either raw (the spec) or as hex text (the SDKs, legacy TDFs)."""
    raw = b64decode_strict(encoded)
    if len(raw) == 2 * size:
        return bytes.fromhex(raw.decode("ascii"))
    if len(raw) == size:
        return raw
    raise ValueError("MAC has the wrong length")


def verify_binding(share: bytes, policy_b64: str, binding: PolicyBinding | str) -> None:
    """Constant-time check that ``binding`` ties ``policy_b64`` to ``share``."""
    if isinstance(binding, PolicyBinding):
        if binding.alg.upper() != BINDING_ALG:
            raise PolicyBindingError(f"unsupported policy binding algorithm {quoted(binding.alg, 'one')}")
        encoded = binding.hash
    else:
        encoded = binding
    try:
        expected = decode_mac(encoded)
    except (binascii.Error, ValueError):
        raise PolicyBindingError("policy binding is malformed") from None
    if not constant_time_equal(hmac_sha256(share, policy_b64.encode()), expected):
        raise PolicyBindingError("policy binding does not match the policy")

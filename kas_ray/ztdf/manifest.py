"""Pydantic models of the ZTDF / TDF3 manifest (``0.manifest.json``) and its key access objects."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from kas_ray.errors import ManifestError
from kas_ray.ztdf._wire import WireModel
from kas_ray.ztdf.policy import PolicyBinding

SCHEMA_VERSION = "4.3.0"
PAYLOAD_ENTRY = "0.payload"
MANIFEST_ENTRY = "0.manifest.json"
KaoType = Literal["wrapped", "ec-wrapped"]


class KeyAccessObject(WireModel):
    """One wrapped key (or share) for one KAS; the unit a KAS decides on."""

    type: KaoType = "wrapped"
    url: str
    protocol: str = "kas"
    wrapped_key: str
    policy_binding: PolicyBinding
    kid: str | None = None
    sid: str | None = None
    encrypted_metadata: str | None = None
    ephemeral_public_key: str | None = None

    @field_validator("policy_binding", mode="before")
    @classmethod
    def _legacy_string_binding(cls, value: object) -> object:
        return {"alg": "HS256", "hash": value} if isinstance(value, str) else value

    @field_validator("kid", "sid", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def split_id(self) -> str:
        """KAOs with the same split id are alternatives (anyOf); no sid means the single split."""
        return self.sid or ""


class Payload(WireModel):
    type: str = "reference"
    url: str = PAYLOAD_ENTRY
    protocol: str = "zip"
    mime_type: str = "application/octet-stream"
    is_encrypted: bool = True


class Method(WireModel):
    algorithm: str = "AES-256-GCM"
    is_streamable: bool = True
    iv: str = ""


class RootSignature(WireModel):
    alg: str = "HS256"
    sig: str


class Segment(WireModel):
    hash: str
    segment_size: int | None = Field(default=None, ge=0)
    encrypted_segment_size: int | None = Field(default=None, ge=28)


class IntegrityInformation(WireModel):
    root_signature: RootSignature
    segment_hash_alg: str = "GMAC"
    segment_size_default: int = Field(gt=0)
    encrypted_segment_size_default: int = Field(gt=28)
    segments: list[Segment] = Field(default_factory=list)


class EncryptionInformation(WireModel):
    type: str = "split"
    key_access: list[KeyAccessObject] = Field(min_length=1)
    method: Method = Field(default_factory=Method)
    integrity_information: IntegrityInformation
    policy: str


class Manifest(WireModel):
    schema_version: str | None = None
    payload: Payload = Field(default_factory=Payload)
    encryption_information: EncryptionInformation
    assertions: list[dict[str, object]] | None = None

    @property
    def is_legacy(self) -> bool:
        """3.x manifests have no schemaVersion and hex-encode their MACs."""
        return not self.schema_version

    @classmethod
    def parse(cls, raw: bytes | str) -> Manifest:
        try:
            return cls.model_validate(json.loads(raw))
        except (ValueError, ValidationError, RecursionError) as exc:  # RecursionError: nested too deeply
            detail = _first_error(exc) if isinstance(exc, ValidationError) else "not valid JSON"
            raise ManifestError(f"manifest is invalid: {detail}") from None

    def key_access_by_split(self) -> dict[str, list[KeyAccessObject]]:
        """Group KAOs by split id, keeping manifest order (alternatives tried in order)."""
        groups: dict[str, list[KeyAccessObject]] = {}
        for kao in self.encryption_information.key_access:
            groups.setdefault(kao.split_id, []).append(kao)
        return groups


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "manifest"
    return f"{where}: {err['msg']}"

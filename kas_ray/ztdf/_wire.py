"""Shared base for the camelCase JSON models of the TDF wire format."""

from __future__ import annotations

import base64
import binascii
import re

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

_B64 = re.compile(rb"^[A-Za-z0-9+/]*={0,2}$")
_B64URL = re.compile(rb"^[A-Za-z0-9_\-]*={0,2}$")


class WireModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are ignored (forward compatible)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)

    def to_wire(self) -> dict[str, object]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def b64decode_strict(value: str | bytes) -> bytes:
    """Decode standard or URL-safe base64 (padding optional); raise ``binascii.Error`` on anything else."""
    data = value.encode("ascii", "strict") if isinstance(value, str) else value
    data = data.strip()
    if _B64.match(data):
        alphabet_fixed = data
    elif _B64URL.match(data):
        alphabet_fixed = data.replace(b"-", b"+").replace(b"_", b"/")
    else:
        raise binascii.Error("not base64")
    padded = alphabet_fixed.rstrip(b"=")
    padded += b"=" * (-len(padded) % 4)
    return base64.b64decode(padded, validate=True)

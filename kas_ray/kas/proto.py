"""Protobuf binary codec for the OpenTDF KAS Connect API (``kas.AccessService``), dependency-free.

Scope: exactly the messages of ``/kas.AccessService/{PublicKey,LegacyPublicKey,Rewrap}`` as defined in
opentdf/platform ``service/kas/kas.proto`` (package ``kas``, proto3), plus the well-known types they use
(``google.protobuf.StringValue``, ``Value``, ``Struct``, ``ListValue``). Server side: decode the requests,
encode the responses. Client side (tests, our own client): the inverses.

Approach: a hand-written minimal protobuf wire codec
-----------------------------------------------------
Chosen over building message classes at runtime with ``descriptor_pb2`` + ``message_factory`` because:

* the attack surface is the decoder, and here every rule is ours and explicit: malformed input always raises
  :class:`ProtoDecodeError` (a :class:`~kas_ray.errors.FormatError`, so the HTTP layer answers 400) and never
  anything else; sizes, nesting depth and field counts are bounded; a known field number arriving with the
  wrong wire type is rejected (the reference runtimes silently keep it as an unknown field);
* no coupling to the protobuf runtime that Ray happens to pin: the runtime-descriptor API differs between
  protobuf 3.x / 4.x / 5+ (``GetPrototype`` vs ``GetMessageClass``) and the upb / C++ / pure-Python backends
  differ in UTF-8 validation and error types; none of that can change under us here;
* the schema is tiny and frozen (string, bytes, repeated messages, one oneof, ``map<string, Value>``), so
  the codec is small and is tested field by field against the generated classes of ``otdf-python``
  (dev dependency only; it is never imported at runtime);
* the messages are a few KB; the rewrap cost is dominated by RSA/EC operations, so the speed of upb buys
  nothing measurable.

Decoding rules (proto3 semantics): unknown fields of every wire type are skipped, including (nested) groups,
fixed32 and fixed64; for singular fields the last occurrence wins; repeated messages append; map entries
with a repeated key keep the last; within a oneof the last member set wins (same-kind message members
merge, as protobuf defines); unknown fields inside a map entry are skipped and the entry is kept (as
protobuf-go, the platform's runtime, does; upb instead moves such an entry to the unknown fields). Missing
scalar fields decode to their proto3 default (``""`` / ``b""``), so an empty string means "not set".
``RewrapRequest`` field 2 (``bearer``) was removed upstream (``reserved 2; reserved "bearer";``): old
clients that still send it are accepted and the field is skipped.
Rejected with :class:`ProtoDecodeError`: input larger than :data:`MAX_MESSAGE_SIZE`; truncated varints or
fixed fields; varints longer than 10 bytes or above 2**64-1; tags above 2**32-1; field number 0; wire types 6
and 7; a length past the end of its enclosing message; unbalanced or mismatched groups; nesting deeper than
:data:`MAX_DEPTH`; more than :data:`MAX_FIELDS` fields in one message tree; strings (including map keys)
that are not valid UTF-8; a known field with the wrong wire type.

Encoding is deterministic: fields in field-number order, proto3 defaults omitted (implicit presence), oneof
members and map-entry keys/values always written when set, map entries in insertion order.

Field table (``kas.proto`` at opentdf/platform 053f7e5; (d) = deprecated upstream)
-----------------------------------------------------------------------------------
::

    message                      #  field (JSON name)                           type
    kas.PublicKeyRequest         1  algorithm                                   string
                                 2  fmt                                         string
                                 3  v                                           string
    kas.PublicKeyResponse        1  public_key (publicKey)                      string
                                 2  kid                                         string
    kas.LegacyPublicKeyRequest   1  algorithm                                   string
    google.protobuf.StringValue  1  value                                       string  (LegacyPublicKey response)
    kas.RewrapRequest            1  signed_request_token (signedRequestToken)   string
                                 2  reserved "bearer" (removed)                 skipped if sent
    kas.RewrapResponse           1  metadata (d)                                map<string, google.protobuf.Value>
                                 2  entity_wrapped_key (entityWrappedKey) (d)   bytes
                                 3  session_public_key (sessionPublicKey)       string
                                 4  schema_version (schemaVersion) (d)          string
                                 5  responses                                   repeated kas.PolicyRewrapResult
    kas.PolicyRewrapResult       1  policy_id (policyId)                        string
                                 2  results                                     repeated kas.KeyAccessRewrapResult
    kas.KeyAccessRewrapResult    1  metadata                                    map<string, google.protobuf.Value>
                                 2  key_access_object_id (keyAccessObjectId)    string
                                 3  status                                      string ("permit" / "fail")
                                 4  kas_wrapped_key (kasWrappedKey)             bytes,  oneof result
                                 5  error                                       string, oneof result
    google.protobuf.Value        1  null_value (nullValue)                      enum NullValue (varint), oneof kind
                                 2  number_value (numberValue)                  double (fixed64),        oneof kind
                                 3  string_value (stringValue)                  string,                  oneof kind
                                 4  bool_value (boolValue)                      bool (varint),           oneof kind
                                 5  struct_value (structValue)                  google.protobuf.Struct,  oneof kind
                                 6  list_value (listValue)                      google.protobuf.ListValue, oneof kind
    google.protobuf.Struct       1  fields                                      map<string, Value>
    google.protobuf.ListValue    1  values                                      repeated Value

A ``map<K, V>`` field is on the wire a repeated message ``{K key = 1; V value = 2;}``.

JSON form (``application/json``, protojson)
--------------------------------------------
Field names are lowerCamelCase on output (the JSON names above); on input both the proto name and the
JSON name are accepted (both in one object is an error), unknown keys are ignored (connect-go discards
unknown fields) and ``null`` means "default". ``bytes`` fields are base64 strings: standard alphabet with
padding on output; standard or URL-safe, padded or not, on input. ``google.protobuf.Value`` is the JSON
value itself; ``StringValue`` is a bare JSON string (``"-----BEGIN PUBLIC KEY-----..."``). In our pydantic
models (:mod:`kas_ray.kas.models`) ``kasWrappedKey`` / ``entityWrappedKey`` are already those base64 strings,
so ``model.to_wire()`` is the JSON body and this module converts them to/from raw bytes for proto.
:func:`public_key_request_from_json`, :func:`legacy_public_key_request_from_json` and
:func:`rewrap_request_from_json` give the JSON path the same dict as the proto decoders.

Connect unary conventions the HTTP layer must follow (connectrpc.com/docs/protocol)
-------------------------------------------------------------------------------------
* ``POST /kas.AccessService/<Method>`` with ``Content-Type: application/proto`` (binary, this module) or
  ``application/json`` (protojson); parameters such as ``; charset=utf-8`` may follow. Any other codec:
  HTTP 415. The success response (HTTP 200) uses the request's content type.
* ``Connect-Protocol-Version: 1``: clients send it; a server may answer 400 when it is missing (connect-go and
  connect-python accept requests without it), but must answer ``invalid_argument`` when it is not ``1``.
* ``Content-Encoding`` (request) / ``Accept-Encoding`` (response): absent means ``identity``. **otdf-python
  (connect-python 0.9) gzips every request body by default** and sends ``Accept-Encoding: gzip``: the server
  must gunzip, with a bound on the inflated size (:func:`decode_content_encoding`); it may always answer
  ``identity``. An unsupported encoding is ``unimplemented`` (501). A zero-length body is never decompressed.
* ``Connect-Timeout-Ms``: optional, at most 10 digits.
* PublicKey and LegacyPublicKey are ``NO_SIDE_EFFECTS``, so Connect also allows
  ``GET ...?connect=v1&encoding=proto|json&message=<percent-encoded or URL-safe base64>&base64=1
  [&compression=gzip]``.
* Errors: a non-200 status, ``Content-Type: application/json`` **even for proto requests**, body
  ``{"code": "<code>", "message": "<text>"}`` (``details`` optional), status per :data:`CONNECT_HTTP_STATUS`:
  invalid_argument / failed_precondition / out_of_range 400, unauthenticated 401, permission_denied 403,
  not_found 404, already_exists / aborted 409, resource_exhausted 429, canceled 499, unknown / internal /
  data_loss 500, unimplemented 501, unavailable 503, deadline_exceeded 504.
* Per-KAO failures inside a rewrap are not RPC errors: the RPC returns 200 and the KeyAccessRewrapResult has
  ``status: "fail"`` and ``error`` (the OpenTDF SDKs match the texts in :mod:`kas_ray.kas.models`).
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kas_ray.errors import FormatError
from kas_ray.kas.models import KaoResult, PolicyResult, PublicKeyResponse, RewrapResponse
from kas_ray.ztdf._wire import b64decode_strict

__all__ = [
    "CONNECT_HTTP_STATUS",
    "CONNECT_PROTOCOL_VERSION",
    "CONTENT_TYPE_JSON",
    "CONTENT_TYPE_PROTO",
    "MAX_DEPTH",
    "MAX_FIELDS",
    "MAX_MESSAGE_SIZE",
    "ProtoDecodeError",
    "UnsupportedEncodingError",
    "decode_content_encoding",
    "decode_legacy_public_key_request",
    "decode_public_key_request",
    "decode_public_key_response",
    "decode_rewrap_request",
    "decode_rewrap_response",
    "decode_rewrap_response_raw",
    "decode_string_value",
    "encode_legacy_public_key_request",
    "encode_public_key_request",
    "encode_public_key_response",
    "encode_rewrap_request",
    "encode_rewrap_response",
    "encode_string_value",
    "legacy_public_key_request_from_json",
    "public_key_request_from_json",
    "rewrap_request_from_json",
]

#: Largest message (after decompression) accepted by the decoders.
MAX_MESSAGE_SIZE = 1 << 20
#: Deepest nesting of messages and groups accepted (protobuf's own default recursion limit).
MAX_DEPTH = 100
#: Most fields (known or unknown, at every level) decoded from one message: bounds the work per request.
MAX_FIELDS = 1 << 16

CONTENT_TYPE_PROTO = "application/proto"
CONTENT_TYPE_JSON = "application/json"
CONNECT_PROTOCOL_VERSION = "1"
#: Connect error code -> HTTP status (connectrpc.com/docs/protocol#error-codes).
CONNECT_HTTP_STATUS: Mapping[str, int] = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}


class ProtoDecodeError(FormatError):
    """The body is not a well-formed protobuf (or protojson) message of the expected type."""

    code = "bad_proto"


class UnsupportedEncodingError(ProtoDecodeError):
    """The request uses a Content-Encoding this service does not support (Connect: unimplemented)."""

    code = "unsupported_encoding"
    http_status = 501


# --- wire primitives ---------------------------------------------------------------------------------
_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_WIRE_NAMES = {_VARINT: "varint", _I64: "fixed64", _LEN: "length-delimited", _I32: "fixed32"}
_DOUBLE = struct.Struct("<d")


class _Budget:
    __slots__ = ("fields",)

    def __init__(self) -> None:
        self.fields = MAX_FIELDS


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise ProtoDecodeError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if shift >= 70:
            raise ProtoDecodeError("varint longer than 10 bytes")
    if result >> 64:
        raise ProtoDecodeError("varint overflows 64 bits")
    return result, pos


def _read_field(buf: bytes, pos: int, end: int, budget: _Budget, depth: int) -> tuple[int, int, int, int, int]:
    """Read one field at ``pos``: ``(number, wire_type, a, b, next_pos)``.

    varint: ``a`` is the value; length-delimited / fixed: ``buf[a:b]`` is the payload; a start group is
    skipped up to its matching end group; an end group is returned as is for the caller to match.
    """
    budget.fields -= 1
    if budget.fields < 0:
        raise ProtoDecodeError("too many fields")
    key, pos = _read_varint(buf, pos, end)
    if key > 0xFFFFFFFF:
        raise ProtoDecodeError("tag out of range")
    number, wire_type = key >> 3, key & 7
    if number == 0:
        raise ProtoDecodeError("field number 0")
    if wire_type == _VARINT:
        value, pos = _read_varint(buf, pos, end)
        return number, wire_type, value, pos, pos
    if wire_type == _LEN:
        length, pos = _read_varint(buf, pos, end)
        if length > end - pos:
            raise ProtoDecodeError("length past the end of the message")
        return number, wire_type, pos, pos + length, pos + length
    if wire_type == _I64 or wire_type == _I32:
        size = 8 if wire_type == _I64 else 4
        if size > end - pos:
            raise ProtoDecodeError("truncated fixed-size field")
        return number, wire_type, pos, pos + size, pos + size
    if wire_type == _SGROUP:
        if depth >= MAX_DEPTH:
            raise ProtoDecodeError("message nested too deeply")
        while pos < end:
            inner, inner_type, _, _, pos = _read_field(buf, pos, end, budget, depth + 1)
            if inner_type == _EGROUP:
                if inner != number:
                    raise ProtoDecodeError("mismatched end group")
                return number, wire_type, -1, -1, pos
        raise ProtoDecodeError("unterminated group")
    if wire_type == _EGROUP:
        return number, wire_type, -1, -1, pos
    raise ProtoDecodeError(f"invalid wire type {wire_type}")


def _fields(buf: bytes, start: int, end: int, budget: _Budget, depth: int) -> Iterator[tuple[int, int, int, int]]:
    """Iterate the fields of one message; unknown fields must be ignored by the caller."""
    if depth > MAX_DEPTH:
        raise ProtoDecodeError("message nested too deeply")
    pos = start
    while pos < end:
        number, wire_type, a, b, pos = _read_field(buf, pos, end, budget, depth)
        if wire_type == _EGROUP:
            raise ProtoDecodeError("end group without start group")
        yield number, wire_type, a, b


def _expect(number: int, wire_type: int, expected: int) -> None:
    if wire_type != expected:
        raise ProtoDecodeError(f"field {number}: expected {_WIRE_NAMES[expected]}, got wire type {wire_type}")


def _utf8(buf: bytes, a: int, b: int) -> str:
    try:
        return buf[a:b].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtoDecodeError("string field is not valid UTF-8") from None


def _check_size(data: bytes | bytearray | memoryview) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("protobuf input must be bytes")
    if len(data) > MAX_MESSAGE_SIZE:
        raise ProtoDecodeError(f"message larger than {MAX_MESSAGE_SIZE} bytes")
    return bytes(data)


def _put_varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _put_len(out: bytearray, number: int, payload: bytes) -> None:
    _put_varint(out, (number << 3) | _LEN)
    _put_varint(out, len(payload))
    out += payload


def _put_str(out: bytearray, number: int, value: str, *, always: bool = False) -> None:
    if value or always:
        _put_len(out, number, value.encode("utf-8"))


def _put_bytes(out: bytearray, number: int, value: bytes, *, always: bool = False) -> None:
    if value or always:
        _put_len(out, number, bytes(value))


# --- schema of the flat string messages ----------------------------------------------------------------
@dataclass(frozen=True)
class _Flat:
    """A message whose fields are all implicit-presence ``string`` fields: (number, proto name, JSON name)."""

    name: str
    fields: tuple[tuple[int, str, str], ...]

    def decode(self, data: bytes | bytearray | memoryview) -> dict[str, str]:
        buf = _check_size(data)
        by_number = {number: json_name for number, _, json_name in self.fields}
        out = {json_name: "" for _, _, json_name in self.fields}
        for number, wire_type, a, b in _fields(buf, 0, len(buf), _Budget(), 0):
            json_name = by_number.get(number)
            if json_name is not None:
                _expect(number, wire_type, _LEN)
                out[json_name] = _utf8(buf, a, b)
        return out

    def encode(self, values: Mapping[str, str]) -> bytes:
        out = bytearray()
        for number, _, json_name in self.fields:
            value = values.get(json_name) or ""
            if not isinstance(value, str):
                raise TypeError(f"{self.name}.{json_name} must be a string")
            _put_str(out, number, value)
        return bytes(out)

    def from_json(self, body: bytes | str | Mapping[str, Any]) -> dict[str, str]:
        obj = _json_object(body)
        out = {json_name: "" for _, _, json_name in self.fields}
        seen: set[str] = set()
        for _, proto_name, json_name in self.fields:
            for key in {proto_name, json_name}:
                if key not in obj:
                    continue
                if json_name in seen:
                    raise ProtoDecodeError(f"{self.name}: field {json_name!r} given twice")
                seen.add(json_name)
                value = obj[key]
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise ProtoDecodeError(f"{self.name}.{json_name} must be a string")
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
                    raise ProtoDecodeError(f"{self.name}.{json_name} is not valid UTF-8") from None
                out[json_name] = value
        return out


def _json_object(body: bytes | str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(body, Mapping):
        return body
    if len(body) > MAX_MESSAGE_SIZE:
        raise ProtoDecodeError(f"message larger than {MAX_MESSAGE_SIZE} bytes")
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ProtoDecodeError("body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtoDecodeError("body is not a JSON object")
    return obj


_PUBLIC_KEY_REQUEST = _Flat("PublicKeyRequest", ((1, "algorithm", "algorithm"), (2, "fmt", "fmt"), (3, "v", "v")))
_PUBLIC_KEY_RESPONSE = _Flat("PublicKeyResponse", ((1, "public_key", "publicKey"), (2, "kid", "kid")))
_LEGACY_PUBLIC_KEY_REQUEST = _Flat("LegacyPublicKeyRequest", ((1, "algorithm", "algorithm"),))
_STRING_VALUE = _Flat("StringValue", ((1, "value", "value"),))
_REWRAP_REQUEST = _Flat("RewrapRequest", ((1, "signed_request_token", "signedRequestToken"),))


# --- public API: public keys --------------------------------------------------------------------------
def decode_public_key_request(data: bytes) -> dict[str, str]:
    """``kas.PublicKeyRequest`` -> ``{"algorithm", "fmt", "v"}`` (``""`` when not set)."""
    return _PUBLIC_KEY_REQUEST.decode(data)


def public_key_request_from_json(body: bytes | str | Mapping[str, Any]) -> dict[str, str]:
    """The protojson form of ``kas.PublicKeyRequest`` -> the same dict as :func:`decode_public_key_request`."""
    return _PUBLIC_KEY_REQUEST.from_json(body)


def encode_public_key_request(algorithm: str = "", fmt: str = "", v: str = "") -> bytes:
    return _PUBLIC_KEY_REQUEST.encode({"algorithm": algorithm, "fmt": fmt, "v": v})


def encode_public_key_response(public_key: str, kid: str) -> bytes:
    return _PUBLIC_KEY_RESPONSE.encode({"publicKey": public_key, "kid": kid})


def decode_public_key_response(data: bytes) -> PublicKeyResponse:
    values = _PUBLIC_KEY_RESPONSE.decode(data)
    return PublicKeyResponse(public_key=values["publicKey"], kid=values["kid"])


def decode_legacy_public_key_request(data: bytes) -> dict[str, str]:
    """``kas.LegacyPublicKeyRequest`` -> ``{"algorithm"}``."""
    return _LEGACY_PUBLIC_KEY_REQUEST.decode(data)


def legacy_public_key_request_from_json(body: bytes | str | Mapping[str, Any]) -> dict[str, str]:
    return _LEGACY_PUBLIC_KEY_REQUEST.from_json(body)


def encode_legacy_public_key_request(algorithm: str = "") -> bytes:
    return _LEGACY_PUBLIC_KEY_REQUEST.encode({"algorithm": algorithm})


def encode_string_value(value: str) -> bytes:
    """``google.protobuf.StringValue`` (the LegacyPublicKey response; its JSON form is the bare string)."""
    return _STRING_VALUE.encode({"value": value})


def decode_string_value(data: bytes) -> str:
    return _STRING_VALUE.decode(data)["value"]


# --- public API: rewrap request -------------------------------------------------------------------------
def decode_rewrap_request(data: bytes) -> dict[str, str]:
    """``kas.RewrapRequest`` -> ``{"signedRequestToken"}``; the removed ``bearer`` field (2) is skipped."""
    return _REWRAP_REQUEST.decode(data)


def rewrap_request_from_json(body: bytes | str | Mapping[str, Any]) -> dict[str, str]:
    return _REWRAP_REQUEST.from_json(body)


def encode_rewrap_request(signed_request_token: str) -> bytes:
    return _REWRAP_REQUEST.encode({"signedRequestToken": signed_request_token})


# --- google.protobuf.Value / Struct / ListValue <-> JSON values -----------------------------------------------
def _decode_value(buf: bytes, start: int, end: int, budget: _Budget, depth: int) -> Any:
    kind = 0
    result: Any = None
    for number, wire_type, a, b in _fields(buf, start, end, budget, depth):
        if number == 1:  # null_value (enum NullValue)
            _expect(number, wire_type, _VARINT)
            result = None
        elif number == 2:  # number_value
            _expect(number, wire_type, _I64)
            result = _DOUBLE.unpack_from(buf, a)[0]
        elif number == 3:  # string_value
            _expect(number, wire_type, _LEN)
            result = _utf8(buf, a, b)
        elif number == 4:  # bool_value
            _expect(number, wire_type, _VARINT)
            result = a != 0
        elif number == 5:  # struct_value: a second occurrence merges (map entries replace by key)
            _expect(number, wire_type, _LEN)
            fields = _decode_value_map(buf, a, b, budget, depth + 1)
            result = {**result, **fields} if kind == 5 else fields
        elif number == 6:  # list_value: a second occurrence merges (repeated fields append)
            _expect(number, wire_type, _LEN)
            values = _decode_list(buf, a, b, budget, depth + 1)
            result = result + values if kind == 6 else values
        else:
            continue
        kind = number
    return result


def _decode_list(buf: bytes, start: int, end: int, budget: _Budget, depth: int) -> list[Any]:
    values = []
    for number, wire_type, a, b in _fields(buf, start, end, budget, depth):
        if number == 1:
            _expect(number, wire_type, _LEN)
            values.append(_decode_value(buf, a, b, budget, depth + 1))
    return values


def _decode_value_map(buf: bytes, start: int, end: int, budget: _Budget, depth: int) -> dict[str, Any]:
    """A message whose only known field (1) is ``map<string, google.protobuf.Value>``: Struct."""
    out: dict[str, Any] = {}
    for number, wire_type, a, b in _fields(buf, start, end, budget, depth):
        if number == 1:
            _expect(number, wire_type, _LEN)
            key, value = _decode_map_entry(buf, a, b, budget, depth + 1)
            out[key] = value
    return out


def _decode_map_entry(buf: bytes, start: int, end: int, budget: _Budget, depth: int) -> tuple[str, Any]:
    key = ""
    value_parts: list[bytes] = []
    for number, wire_type, a, b in _fields(buf, start, end, budget, depth):
        if number == 1:
            _expect(number, wire_type, _LEN)
            key = _utf8(buf, a, b)
        elif number == 2:
            _expect(number, wire_type, _LEN)
            value_parts.append(buf[a:b])
    # A repeated embedded message merges: decoding the concatenation is, by definition, that merge.
    joined = b"".join(value_parts)
    return key, _decode_value(joined, 0, len(joined), budget, depth + 1)


def _encode_value(value: Any, depth: int = 0) -> bytes:
    if depth > MAX_DEPTH:
        raise ValueError("JSON value nested too deeply")
    out = bytearray()
    if value is None:
        out += b"\x08\x00"
    elif isinstance(value, bool):
        out += b"\x20\x01" if value else b"\x20\x00"
    elif isinstance(value, (int, float)):
        out.append((2 << 3) | _I64)
        out += _DOUBLE.pack(float(value))
    elif isinstance(value, str):
        _put_str(out, 3, value, always=True)
    elif isinstance(value, Mapping):
        _put_len(out, 5, _encode_value_map(value, 1, depth + 1))
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        listing = bytearray()
        for item in value:
            _put_len(listing, 1, _encode_value(item, depth + 2))
        _put_len(out, 6, bytes(listing))
    else:
        raise TypeError(f"not a JSON value: {type(value).__name__}")
    return bytes(out)


def _encode_value_map(values: Mapping[str, Any], number: int, depth: int) -> bytes:
    out = bytearray()
    for key, value in values.items():
        if not isinstance(key, str):
            raise TypeError("map keys must be strings")
        entry = bytearray()
        _put_str(entry, 1, key, always=True)
        _put_len(entry, 2, _encode_value(value, depth + 2))
        _put_len(out, number, bytes(entry))
    return bytes(out)


# --- rewrap response -------------------------------------------------------------------------------------
def _decode_kao_result(buf: bytes, start: int, end: int, budget: _Budget, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {"metadata": {}, "keyAccessObjectId": "", "status": ""}
    for number, wire_type, a, b in _fields(buf, start, end, budget, depth):
        if number == 1:
            _expect(number, wire_type, _LEN)
            key, value = _decode_map_entry(buf, a, b, budget, depth + 1)
            out["metadata"][key] = value
        elif number == 2:
            _expect(number, wire_type, _LEN)
            out["keyAccessObjectId"] = _utf8(buf, a, b)
        elif number == 3:
            _expect(number, wire_type, _LEN)
            out["status"] = _utf8(buf, a, b)
        elif number == 4:  # oneof result
            _expect(number, wire_type, _LEN)
            out.pop("error", None)
            out["kasWrappedKey"] = buf[a:b]
        elif number == 5:  # oneof result
            _expect(number, wire_type, _LEN)
            out.pop("kasWrappedKey", None)
            out["error"] = _utf8(buf, a, b)
    return out


def _decode_policy_result(buf: bytes, start: int, end: int, budget: _Budget, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {"policyId": "", "results": []}
    for number, wire_type, a, b in _fields(buf, start, end, budget, depth):
        if number == 1:
            _expect(number, wire_type, _LEN)
            out["policyId"] = _utf8(buf, a, b)
        elif number == 2:
            _expect(number, wire_type, _LEN)
            out["results"].append(_decode_kao_result(buf, a, b, budget, depth + 1))
    return out


def decode_rewrap_response_raw(data: bytes) -> dict[str, Any]:
    """Every field of ``kas.RewrapResponse``, deprecated ones included, keyed by JSON name.

    ``bytes`` fields are raw ``bytes``; metadata values are JSON values (``None``, ``bool``, ``float``,
    ``str``, ``list``, ``dict``); ``kasWrappedKey`` / ``error`` are present only when set (oneof).
    """
    buf = _check_size(data)
    budget = _Budget()
    out: dict[str, Any] = {
        "metadata": {},
        "entityWrappedKey": b"",
        "sessionPublicKey": "",
        "schemaVersion": "",
        "responses": [],
    }
    for number, wire_type, a, b in _fields(buf, 0, len(buf), budget, 0):
        if number == 1:
            _expect(number, wire_type, _LEN)
            key, value = _decode_map_entry(buf, a, b, budget, 1)
            out["metadata"][key] = value
        elif number == 2:
            _expect(number, wire_type, _LEN)
            out["entityWrappedKey"] = buf[a:b]
        elif number == 3:
            _expect(number, wire_type, _LEN)
            out["sessionPublicKey"] = _utf8(buf, a, b)
        elif number == 4:
            _expect(number, wire_type, _LEN)
            out["schemaVersion"] = _utf8(buf, a, b)
        elif number == 5:
            _expect(number, wire_type, _LEN)
            out["responses"].append(_decode_policy_result(buf, a, b, budget, 1))
    return out


def _metadata_text(value: Any) -> str:
    """Our model holds ``dict[str, str]``: strings pass, other JSON values become compact JSON text."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=True)


def decode_rewrap_response(data: bytes) -> RewrapResponse:
    """``kas.RewrapResponse`` -> our model (bytes -> standard base64; deprecated metadata/schemaVersion dropped).

    The platform sends KAO metadata such as ``{"X-Required-Obligations": ["https://..."]}``; our model keeps
    metadata as ``dict[str, str]``, so non-string values arrive as compact JSON text. Use
    :func:`decode_rewrap_response_raw` for the structured values.
    """
    raw = decode_rewrap_response_raw(data)
    try:
        return RewrapResponse(
            session_public_key=raw["sessionPublicKey"] or None,
            entity_wrapped_key=base64.b64encode(raw["entityWrappedKey"]).decode("ascii")
            if raw["entityWrappedKey"]
            else None,
            responses=[
                PolicyResult(
                    policy_id=policy["policyId"],
                    results=[
                        KaoResult(
                            key_access_object_id=result["keyAccessObjectId"],
                            status=result["status"],
                            kas_wrapped_key=base64.b64encode(result["kasWrappedKey"]).decode("ascii")
                            if "kasWrappedKey" in result
                            else None,
                            error=result.get("error"),
                            metadata={k: _metadata_text(v) for k, v in result["metadata"].items()},
                        )
                        for result in policy["results"]
                    ],
                )
                for policy in raw["responses"]
            ],
        )
    except ValidationError as exc:
        raise ProtoDecodeError(f"RewrapResponse does not match the model: {exc.error_count()} error(s)") from None


def _b64_field(value: str, name: str) -> bytes:
    try:
        return b64decode_strict(value)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name} is not base64") from None


def _encode_kao_result(result: KaoResult) -> bytes:
    if result.kas_wrapped_key is not None and result.error is not None:
        raise ValueError("KaoResult has both kasWrappedKey and error (a proto oneof)")
    out = bytearray()
    if result.metadata:
        out += _encode_value_map(result.metadata, 1, 3)
    _put_str(out, 2, result.key_access_object_id)
    _put_str(out, 3, result.status)
    if result.kas_wrapped_key is not None:
        _put_bytes(out, 4, _b64_field(result.kas_wrapped_key, "kasWrappedKey"), always=True)
    if result.error is not None:
        _put_str(out, 5, result.error, always=True)
    return bytes(out)


def encode_rewrap_response(resp: RewrapResponse) -> bytes:
    """Our model -> ``kas.RewrapResponse`` (base64 ``kasWrappedKey`` / ``entityWrappedKey`` -> raw bytes).

    Raises ``ValueError`` when the model cannot be represented (invalid base64, or a result carrying both
    members of the ``result`` oneof): a server bug, not a client error.
    """
    out = bytearray()
    if resp.entity_wrapped_key is not None:
        _put_bytes(out, 2, _b64_field(resp.entity_wrapped_key, "entityWrappedKey"))
    _put_str(out, 3, resp.session_public_key or "")
    for policy in resp.responses:
        body = bytearray()
        _put_str(body, 1, policy.policy_id)
        for result in policy.results:
            _put_len(body, 2, _encode_kao_result(result))
        _put_len(out, 5, bytes(body))
    return bytes(out)


# --- Content-Encoding ------------------------------------------------------------------------------------
def decode_content_encoding(body: bytes, encoding: str | None, max_size: int = MAX_MESSAGE_SIZE) -> bytes:
    """Undo a Connect unary ``Content-Encoding`` (``identity`` or ``gzip``), refusing to inflate past ``max_size``.

    An empty body is returned as is (Connect: never decompress zero-length content). Unknown encodings raise
    :class:`UnsupportedEncodingError` (Connect ``unimplemented``); a corrupt or oversize stream raises
    :class:`ProtoDecodeError`.
    """
    name = (encoding or "identity").strip().lower()
    if not body or name == "identity":
        if len(body) > max_size:
            raise ProtoDecodeError(f"message larger than {max_size} bytes")
        return bytes(body)
    if name != "gzip":
        raise UnsupportedEncodingError(f"unsupported Content-Encoding {name!r}; supported: gzip, identity")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip container only
    try:
        out = inflater.decompress(body, max_size + 1)
        if len(out) > max_size or inflater.unconsumed_tail:
            raise ProtoDecodeError(f"message larger than {max_size} bytes")
        out += inflater.flush()
    except zlib.error:
        raise ProtoDecodeError("body is not valid gzip") from None
    if len(out) > max_size:
        raise ProtoDecodeError(f"message larger than {max_size} bytes")
    if not inflater.eof or inflater.unused_data:
        raise ProtoDecodeError("body is not a single complete gzip member")
    return out

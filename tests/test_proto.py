"""kas_ray.kas.proto against the reference: the generated classes shipped in otdf-python (otdf_python_proto).

Both directions for every message (our encode -> their ParseFromString; their SerializeToString -> our
decode), unknown fields at every level, protobuf merge semantics (concatenated messages), hypothesis
round trips and differential fuzzing, malformed input (only ProtoDecodeError), the protojson request
helpers, Content-Encoding handling and the Connect status table.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

kas_pb2 = pytest.importorskip("otdf_python_proto.kas.kas_pb2", reason="otdf-python (dev extra) is not installed")

from google.protobuf import json_format, struct_pb2, unknown_fields, wrappers_pb2  # noqa: E402
from google.protobuf.message import DecodeError  # noqa: E402

from kas_ray.errors import FormatError  # noqa: E402
from kas_ray.kas import proto  # noqa: E402
from kas_ray.kas.models import KaoResult, PolicyResult, PublicKeyResponse, RewrapResponse  # noqa: E402
from kas_ray.kas.proto import ProtoDecodeError  # noqa: E402

#: KAS_RAY_PROTO_EXAMPLES scales the hypothesis runs (e.g. 20000 for a long fuzzing session).
_SCALE = int(os.environ.get("KAS_RAY_PROTO_EXAMPLES", "0")) or None
FAST = settings(max_examples=_SCALE or 60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=_SCALE or 300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- test-local wire helpers (independent of the module under test) ----------------------------------------
def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def ld(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


def group(number: int, inner: bytes) -> bytes:
    return tag(number, 3) + inner + tag(number, 4)


#: Unknown fields of every wire type, including nested groups.
UNKNOWN_BLOB = (
    tag(20, 0)
    + varint(2**64 - 1)
    + tag(21, 1)
    + b"\x01" * 8
    + ld(22, b"\xff\x00garbage, not UTF-8")
    + tag(23, 5)
    + b"\x02" * 4
    + group(24, tag(1, 0) + varint(7) + ld(2, b"x") + group(3, tag(4, 5) + b"abcd") + tag(5, 1) + b"12345678")
    + group(25, b"")
)


# --- reference <-> plain data ---------------------------------------------------------------------------
def value_to_py(v: struct_pb2.Value):
    kind = v.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    if kind == "struct_value":
        return {k: value_to_py(x) for k, x in v.struct_value.fields.items()}
    if kind == "list_value":
        return [value_to_py(x) for x in v.list_value.values]
    return getattr(v, kind)


def py_to_value(obj, v: struct_pb2.Value) -> None:
    if obj is None:
        v.null_value = struct_pb2.NULL_VALUE
    elif isinstance(obj, bool):
        v.bool_value = obj
    elif isinstance(obj, (int, float)):
        v.number_value = obj
    elif isinstance(obj, str):
        v.string_value = obj
    elif isinstance(obj, dict):
        v.struct_value.SetInParent()
        for k, x in obj.items():
            py_to_value(x, v.struct_value.fields[k])
    else:
        v.list_value.SetInParent()
        for x in obj:
            py_to_value(x, v.list_value.values.add())


def ref_to_raw(m) -> dict:
    def kao(r) -> dict:
        d = {
            "metadata": {k: value_to_py(v) for k, v in r.metadata.items()},
            "keyAccessObjectId": r.key_access_object_id,
            "status": r.status,
        }
        which = r.WhichOneof("result")
        if which == "kas_wrapped_key":
            d["kasWrappedKey"] = r.kas_wrapped_key
        elif which == "error":
            d["error"] = r.error
        return d

    return {
        "metadata": {k: value_to_py(v) for k, v in m.metadata.items()},
        "entityWrappedKey": m.entity_wrapped_key,
        "sessionPublicKey": m.session_public_key,
        "schemaVersion": m.schema_version,
        "responses": [{"policyId": p.policy_id, "results": [kao(r) for r in p.results]} for p in m.responses],
    }


def raw_to_ref(d: dict, unknown: bytes = b""):
    m = kas_pb2.RewrapResponse(
        entity_wrapped_key=d["entityWrappedKey"],
        session_public_key=d["sessionPublicKey"],
        schema_version=d["schemaVersion"],
    )
    for k, v in d["metadata"].items():
        py_to_value(v, m.metadata[k])
    for p in d["responses"]:
        pm = m.responses.add(policy_id=p["policyId"])
        for r in p["results"]:
            rm = pm.results.add(key_access_object_id=r["keyAccessObjectId"], status=r["status"])
            for k, v in r["metadata"].items():
                py_to_value(v, rm.metadata[k])
                if unknown:
                    rm.metadata[k].MergeFromString(unknown)
            if "kasWrappedKey" in r:
                rm.kas_wrapped_key = r["kasWrappedKey"]
            if "error" in r:
                rm.error = r["error"]
            if unknown:
                rm.MergeFromString(unknown)
        if unknown:
            pm.MergeFromString(unknown)
    if unknown:
        m.MergeFromString(unknown)
    return m


def model_to_raw(resp: RewrapResponse) -> dict:
    def kao(r: KaoResult) -> dict:
        d: dict = {"metadata": dict(r.metadata), "keyAccessObjectId": r.key_access_object_id, "status": r.status}
        if r.kas_wrapped_key is not None:
            d["kasWrappedKey"] = base64.b64decode(r.kas_wrapped_key)
        if r.error is not None:
            d["error"] = r.error
        return d

    return {
        "metadata": {},
        "entityWrappedKey": base64.b64decode(resp.entity_wrapped_key or ""),
        "sessionPublicKey": resp.session_public_key or "",
        "schemaVersion": "",
        "responses": [{"policyId": p.policy_id, "results": [kao(r) for r in p.results]} for p in resp.responses],
    }


def canon(obj) -> str:
    """Order-insensitive comparison form that also equates NaN with NaN."""
    return json.dumps(obj, sort_keys=True, default=repr)


def upb_moved_map_entries(ref) -> bool:
    """upb (unlike protobuf-go, the platform's runtime) moves a map entry that has unknown fields into the
    parent's unknown fields instead of inserting it; we keep the entry, as Go does."""

    def moved(msg) -> bool:
        return any(f.field_number == 1 for f in unknown_fields.UnknownFieldSet(msg))

    def in_value(v) -> bool:
        kind = v.WhichOneof("kind")
        if kind == "struct_value":
            return moved(v.struct_value) or any(in_value(x) for x in v.struct_value.fields.values())
        if kind == "list_value":
            return any(in_value(x) for x in v.list_value.values)
        return False

    holders = [ref] + [r for p in ref.responses for r in p.results]
    return any(moved(h) or any(in_value(v) for v in h.metadata.values()) for h in holders)


def without_metadata(raw: dict) -> dict:
    out = {**raw, "metadata": {}, "responses": []}
    for p in raw["responses"]:
        out["responses"].append({**p, "results": [{**r, "metadata": {}} for r in p["results"]]})
    return out


def assert_same_as_reference(ours: dict, ref) -> None:
    if upb_moved_map_entries(ref):
        assert canon(without_metadata(ours)) == canon(without_metadata(ref_to_raw(ref)))
    else:
        assert canon(ours) == canon(ref_to_raw(ref))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- strategies --------------------------------------------------------------------------------------------
text = st.text(alphabet=st.characters(codec="utf-8"), max_size=24)
json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
kao_raw = st.builds(
    lambda meta, kid, status, result: {"metadata": meta, "keyAccessObjectId": kid, "status": status, **result},
    st.dictionaries(text, json_values, max_size=3),
    text,
    st.sampled_from(["permit", "fail", ""]) | text,
    st.one_of(
        st.just({}),
        st.binary(max_size=64).map(lambda b: {"kasWrappedKey": b}),
        text.map(lambda e: {"error": e}),
    ),
)
response_raw = st.fixed_dictionaries(
    {
        "metadata": st.dictionaries(text, json_values, max_size=2),
        "entityWrappedKey": st.binary(max_size=48),
        "sessionPublicKey": text,
        "schemaVersion": text,
        "responses": st.lists(
            st.fixed_dictionaries({"policyId": text, "results": st.lists(kao_raw, max_size=3)}), max_size=3
        ),
    }
)
kao_model = st.builds(
    lambda kid, status, result, meta: KaoResult(key_access_object_id=kid, status=status, metadata=meta, **result),
    text,
    st.sampled_from(["permit", "fail"]),
    st.one_of(
        st.just({}),
        st.binary(max_size=300).map(lambda b: {"kas_wrapped_key": b64(b)}),
        text.map(lambda e: {"error": e}),
    ),
    st.dictionaries(text, text, max_size=3),
)
response_model = st.builds(
    RewrapResponse,
    session_public_key=st.none() | text.filter(bool),
    entity_wrapped_key=st.none() | st.binary(min_size=1, max_size=64).map(b64),
    responses=st.lists(st.builds(PolicyResult, policy_id=text, results=st.lists(kao_model, max_size=3)), max_size=3),
)

PEM = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n-----END PUBLIC KEY-----\n"


# --- flat messages ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"algorithm": "rsa:2048"},
        {"algorithm": "ec:secp256r1", "fmt": "jwk", "v": "2"},
        {"fmt": "pkcs8", "v": "é🔑"},
    ],
)
def test_public_key_request_both_directions(fields):
    expected = {"algorithm": "", "fmt": "", "v": "", **fields}
    ours = proto.encode_public_key_request(**fields)
    ref = kas_pb2.PublicKeyRequest()
    ref.ParseFromString(ours)
    assert {k: getattr(ref, k) for k in expected} == expected
    assert ours == kas_pb2.PublicKeyRequest(**fields).SerializeToString()
    assert proto.decode_public_key_request(kas_pb2.PublicKeyRequest(**fields).SerializeToString()) == expected
    assert proto.decode_public_key_request(ours + UNKNOWN_BLOB) == expected


@pytest.mark.parametrize(("public_key", "kid"), [(PEM, "r1"), ("", ""), ('{"kty":"EC"}', "ключ-1")])
def test_public_key_response_both_directions(public_key, kid):
    ours = proto.encode_public_key_response(public_key, kid)
    ref = kas_pb2.PublicKeyResponse()
    ref.ParseFromString(ours)
    assert (ref.public_key, ref.kid) == (public_key, kid)
    theirs = kas_pb2.PublicKeyResponse(public_key=public_key, kid=kid).SerializeToString()
    assert proto.decode_public_key_response(theirs) == PublicKeyResponse(public_key=public_key, kid=kid)
    assert proto.decode_public_key_response(UNKNOWN_BLOB + theirs).kid == kid


@pytest.mark.parametrize("algorithm", ["", "rsa:2048", "ec:secp256r1"])
def test_legacy_public_key_and_string_value(algorithm):
    ours = proto.encode_legacy_public_key_request(algorithm)
    ref = kas_pb2.LegacyPublicKeyRequest()
    ref.ParseFromString(ours)
    assert ref.algorithm == algorithm
    theirs = kas_pb2.LegacyPublicKeyRequest(algorithm=algorithm).SerializeToString()
    assert proto.decode_legacy_public_key_request(theirs) == {"algorithm": algorithm}

    sv = wrappers_pb2.StringValue()
    sv.ParseFromString(proto.encode_string_value(PEM))
    assert sv.value == PEM
    assert proto.decode_string_value(wrappers_pb2.StringValue(value=PEM).SerializeToString()) == PEM
    assert proto.encode_string_value("") == b""


@pytest.mark.parametrize("token", ["", "eyJhbGciOiJFUzI1NiJ9.e30.sig", "x" * 300_000, "ü" * 10])
def test_rewrap_request_both_directions(token):
    ours = proto.encode_rewrap_request(token)
    ref = kas_pb2.RewrapRequest()
    ref.ParseFromString(ours)
    assert ref.signed_request_token == token
    theirs = kas_pb2.RewrapRequest(signed_request_token=token).SerializeToString()
    assert proto.decode_rewrap_request(theirs) == {"signedRequestToken": token}


def test_rewrap_request_removed_bearer_field_is_skipped():
    # Old clients sent `string bearer = 2`; it is `reserved 2` now.
    old = ld(2, b"Bearer abc") + ld(1, b"srt") + ld(2, b"again")
    assert proto.decode_rewrap_request(old) == {"signedRequestToken": "srt"}
    ref = kas_pb2.RewrapRequest()
    ref.ParseFromString(old)
    assert ref.signed_request_token == "srt"


def test_last_occurrence_of_a_scalar_wins_like_the_reference():
    data = ld(1, b"first") + ld(3, b"v1") + ld(1, b"second")
    ref = kas_pb2.PublicKeyRequest()
    ref.ParseFromString(data)
    assert proto.decode_public_key_request(data) == {"algorithm": ref.algorithm, "fmt": "", "v": ref.v}
    assert ref.algorithm == "second"


# --- rewrap response: fixed cases -----------------------------------------------------------------------------
BIG_KEY = bytes(range(256)) * 1024  # 256 KiB

CASES = {
    "empty": RewrapResponse(),
    "permit_and_fail": RewrapResponse(
        session_public_key=PEM,
        responses=[
            PolicyResult(
                policy_id="policy",
                results=[
                    KaoResult(key_access_object_id="kao-0", status="permit", kas_wrapped_key=b64(b"\x01" * 256)),
                    KaoResult(
                        key_access_object_id="kao-1",
                        status="fail",
                        error="rpc error: code = PermissionDenied desc = forbidden",
                    ),
                ],
            )
        ],
    ),
    "multiple_policies_unicode_metadata": RewrapResponse(
        responses=[
            PolicyResult(
                policy_id=f"политика-{i}",
                results=[
                    KaoResult(
                        key_access_object_id=f"kao-{i}-{j}",
                        status="permit",
                        kas_wrapped_key=b64(bytes([i, j]) * 20),
                        metadata={"X-Note": "ü🔐", "empty": ""},
                    )
                    for j in range(3)
                ],
            )
            for i in range(4)
        ]
    ),
    "large_key_and_v1_entity_key": RewrapResponse(
        entity_wrapped_key=b64(b"\xaa" * 512),
        responses=[
            PolicyResult(
                policy_id="p",
                results=[KaoResult(key_access_object_id="k", status="permit", kas_wrapped_key=b64(BIG_KEY))],
            )
        ],
    ),
    "empty_wrapped_key_is_still_set": RewrapResponse(
        responses=[
            PolicyResult(
                policy_id="", results=[KaoResult(key_access_object_id="", status="permit", kas_wrapped_key="")]
            )
        ]
    ),
    "fail_without_error_and_empty_policy": RewrapResponse(
        responses=[
            PolicyResult(policy_id="p", results=[KaoResult(key_access_object_id="k", status="fail", error="")]),
            PolicyResult(policy_id="q", results=[]),
        ]
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rewrap_response_ours_to_reference(name):
    resp = CASES[name]
    ref = kas_pb2.RewrapResponse()
    ref.ParseFromString(proto.encode_rewrap_response(resp))
    assert ref_to_raw(ref) == model_to_raw(resp)
    # the oneof is set exactly when the model has the field, even when empty
    for policy, ref_policy in zip(resp.responses, ref.responses, strict=True):
        for result, ref_result in zip(policy.results, ref_policy.results, strict=True):
            expected = "kas_wrapped_key" if result.kas_wrapped_key is not None else None
            expected = "error" if result.error is not None else expected
            assert ref_result.WhichOneof("result") == expected


@pytest.mark.parametrize("name", list(CASES))
def test_rewrap_response_reference_to_ours(name):
    resp = CASES[name]
    theirs = raw_to_ref(model_to_raw(resp)).SerializeToString()
    assert proto.decode_rewrap_response(theirs) == resp
    assert proto.decode_rewrap_response(raw_to_ref(model_to_raw(resp), UNKNOWN_BLOB).SerializeToString()) == resp


def test_rewrap_response_platform_obligations_and_deprecated_fields():
    raw = {
        "metadata": {"legacy": {"a": [1.0, True, None]}},
        "entityWrappedKey": b"",
        "sessionPublicKey": "",
        "schemaVersion": "1.0.0",
        "responses": [
            {
                "policyId": "policy",
                "results": [
                    {
                        "metadata": {"X-Required-Obligations": ["https://example.com/obl/drm/value/watermark"]},
                        "keyAccessObjectId": "kao-0",
                        "status": "permit",
                        "kasWrappedKey": b"\x00\x01",
                    }
                ],
            }
        ],
    }
    data = raw_to_ref(raw).SerializeToString()
    assert proto.decode_rewrap_response_raw(data) == raw
    model = proto.decode_rewrap_response(data)
    result = model.responses[0].results[0]
    assert result.metadata == {"X-Required-Obligations": '["https://example.com/obl/drm/value/watermark"]'}
    assert result.kas_wrapped_key == "AAE="
    assert model.entity_wrapped_key is None and model.session_public_key is None


def test_rewrap_response_value_kinds_both_directions():
    values = {"s": "x", "n": -2.5, "inf": float("inf"), "t": True, "f": False, "null": None, "l": [], "o": {}}
    m = kas_pb2.KeyAccessRewrapResult()
    m.ParseFromString(proto._encode_value_map(values, 1, 0))
    assert {k: value_to_py(v) for k, v in m.metadata.items()} == values
    ref = raw_to_ref({**model_to_raw(RewrapResponse()), "metadata": values})
    assert proto.decode_rewrap_response_raw(ref.SerializeToString())["metadata"] == values


def test_value_merge_and_oneof_semantics_match_reference():
    sv = lambda v: ld(5, ld(1, ld(1, v[0].encode()) + ld(2, ld(3, v[1].encode()))))  # noqa: E731
    lv = lambda s: ld(6, ld(1, ld(3, s.encode())))  # noqa: E731
    cases = [
        sv(("a", "1")) + sv(("b", "2")),  # struct merges
        sv(("a", "1")) + sv(("a", "2")),  # same key: replaced
        lv("x") + lv("y"),  # list appends
        sv(("a", "1")) + ld(3, b"s") + sv(("b", "2")),  # other member in between: starts afresh
        ld(3, b"s") + tag(4, 0) + b"\x01",  # last member wins
        b"",  # unset value
    ]
    for value in cases:
        # the same Value twice inside one map entry: merges as well
        for entry in (ld(1, b"k") + ld(2, value), ld(1, b"k") + ld(2, sv(("pre", "0"))) + ld(2, value)):
            data = ld(5, ld(2, ld(1, entry)))
            ref = kas_pb2.RewrapResponse()
            ref.ParseFromString(data)
            assert proto.decode_rewrap_response_raw(data) == ref_to_raw(ref)


def test_oneof_last_member_wins_like_reference():
    for kao in (ld(4, b"key") + ld(5, b"err"), ld(5, b"err") + ld(4, b"key"), ld(4, b"a") + ld(4, b"b")):
        data = ld(5, ld(2, kao))
        ref = kas_pb2.RewrapResponse()
        ref.ParseFromString(data)
        assert proto.decode_rewrap_response_raw(data) == ref_to_raw(ref)


def test_moderate_nesting_is_accepted():
    nested: object = "leaf"
    for i in range(30):
        nested = [nested] if i % 2 else {"k": nested}
    raw = {**model_to_raw(RewrapResponse()), "metadata": {"deep": nested}}
    assert proto.decode_rewrap_response_raw(raw_to_ref(raw).SerializeToString()) == raw


def test_encode_rejects_what_proto_cannot_carry():
    both = RewrapResponse(
        responses=[
            PolicyResult(
                policy_id="p",
                results=[KaoResult(key_access_object_id="k", status="fail", kas_wrapped_key="", error="x")],
            )
        ]
    )
    with pytest.raises(ValueError, match="oneof"):
        proto.encode_rewrap_response(both)
    with pytest.raises(ValueError, match="base64"):
        proto.encode_rewrap_response(RewrapResponse(entity_wrapped_key="not base64!"))


def test_url_safe_unpadded_base64_in_model_is_accepted():
    key = b"\xfb\xff\xfe" * 5 + b"\x01"
    resp = RewrapResponse(
        responses=[
            PolicyResult(
                policy_id="p",
                results=[
                    KaoResult(
                        key_access_object_id="k",
                        status="permit",
                        kas_wrapped_key=base64.urlsafe_b64encode(key).decode().rstrip("="),
                    )
                ],
            )
        ]
    )
    ref = kas_pb2.RewrapResponse()
    ref.ParseFromString(proto.encode_rewrap_response(resp))
    assert ref.responses[0].results[0].kas_wrapped_key == key


def test_decoded_model_rejects_unknown_status():
    data = ld(5, ld(2, ld(3, b"maybe")))
    with pytest.raises(ProtoDecodeError):
        proto.decode_rewrap_response(data)
    assert proto.decode_rewrap_response_raw(data)["responses"][0]["results"][0]["status"] == "maybe"


# --- hypothesis round trips ---------------------------------------------------------------------------------
@FAST
@given(response_model)
def test_hypothesis_model_round_trip(resp):
    ours = proto.encode_rewrap_response(resp)
    ref = kas_pb2.RewrapResponse()
    ref.ParseFromString(ours)
    assert ref_to_raw(ref) == model_to_raw(resp)
    assert proto.decode_rewrap_response(ref.SerializeToString()) == resp
    assert proto.decode_rewrap_response(ours) == resp


@FAST
@given(response_raw, st.booleans())
def test_hypothesis_reference_to_ours(raw, with_unknown):
    ref = raw_to_ref(raw, UNKNOWN_BLOB if with_unknown else b"")
    assert proto.decode_rewrap_response_raw(ref.SerializeToString()) == raw


@FAST
@given(response_raw, response_raw)
def test_hypothesis_concatenation_merges_like_reference(a, b):
    data = raw_to_ref(a).SerializeToString() + raw_to_ref(b).SerializeToString()
    ref = kas_pb2.RewrapResponse()
    ref.ParseFromString(data)
    assert proto.decode_rewrap_response_raw(data) == ref_to_raw(ref)


@FAST
@given(text, text, text)
def test_hypothesis_flat_messages(a, b, c):
    assert proto.decode_public_key_request(kas_pb2.PublicKeyRequest(algorithm=a, fmt=b, v=c).SerializeToString()) == {
        "algorithm": a,
        "fmt": b,
        "v": c,
    }
    ref = kas_pb2.PublicKeyResponse()
    ref.ParseFromString(proto.encode_public_key_response(a, b))
    assert (ref.public_key, ref.kid) == (a, b)
    rr = kas_pb2.RewrapRequest()
    rr.ParseFromString(proto.encode_rewrap_request(c))
    assert proto.decode_rewrap_request(rr.SerializeToString()) == {"signedRequestToken": c}


# --- malformed input -------------------------------------------------------------------------------------------
DECODERS = [
    proto.decode_public_key_request,
    proto.decode_legacy_public_key_request,
    proto.decode_rewrap_request,
    proto.decode_public_key_response,
    proto.decode_string_value,
    proto.decode_rewrap_response,
    proto.decode_rewrap_response_raw,
]


def nest_list_values(depth: int) -> bytes:
    value = tag(1, 0) + b"\x00"
    for _ in range(depth):
        value = ld(6, ld(1, value))
    return value


MALFORMED = {
    "truncated_tag": b"\x80",
    "truncated_varint": ld(1, b"ok") + tag(30, 0) + b"\xff\xff",
    "truncated_length": b"\x0a\x80",
    "length_past_end": b"\x0a\x05ab",
    "length_past_end_huge": b"\x0a" + varint(2**63),
    "truncated_fixed64": tag(30, 1) + b"1234567",
    "truncated_fixed32": tag(30, 5) + b"123",
    "varint_11_bytes": tag(30, 0) + b"\xff" * 10 + b"\x01",
    "varint_over_64_bits": tag(30, 0) + b"\xff" * 9 + b"\x7f",
    "field_number_zero": b"\x02\x00",
    "wire_type_6": tag(30, 6),
    "wire_type_7": tag(30, 7),
    "tag_over_32_bits": varint((1 << 32) | 2) + b"\x00",
    "end_group_without_start": tag(30, 4),
    "unterminated_group": tag(30, 3) + tag(1, 0) + b"\x01",
    "mismatched_group": tag(30, 3) + tag(31, 4),
    "groups_too_deep": tag(30, 3) * 150 + tag(30, 4) * 150,
    "invalid_utf8": ld(1, b"\xff\xfe"),
    "utf8_surrogate": ld(1, b"\xed\xa0\x80"),
    "utf8_overlong": ld(1, b"\xc0\xaf"),
    "wrong_wire_type_varint": tag(1, 0) + b"\x01",
    "wrong_wire_type_fixed32": tag(1, 5) + b"abcd",
    "wrong_wire_type_group": group(1, b""),
    "too_many_fields": (tag(30, 0) + b"\x00") * (proto.MAX_FIELDS + 1),
    "oversize": ld(30, b"\x00" * proto.MAX_MESSAGE_SIZE),
}


@pytest.mark.parametrize("name", list(MALFORMED))
@pytest.mark.parametrize("decode", DECODERS, ids=lambda f: f.__name__)
def test_malformed_raises_proto_decode_error_only(name, decode):
    with pytest.raises(ProtoDecodeError) as info:
        decode(MALFORMED[name])
    assert isinstance(info.value, FormatError) and info.value.http_status == 400


NESTED_MALFORMED = {
    "value_number_as_varint": ld(5, ld(2, ld(1, ld(1, b"k") + ld(2, tag(2, 0) + b"\x01")))),
    "value_string_not_utf8": ld(5, ld(2, ld(1, ld(1, b"k") + ld(2, ld(3, b"\x80"))))),
    "map_key_not_utf8": ld(1, ld(1, b"\xff") + ld(2, b"")),
    "kas_wrapped_key_as_varint": ld(5, ld(2, tag(4, 0) + b"\x05")),
    "error_not_utf8": ld(5, ld(2, ld(5, b"\xc3"))),
    "policy_id_as_fixed64": ld(5, tag(1, 1) + b"12345678"),
    "results_as_varint": ld(5, tag(2, 0) + b"\x00"),
    "inner_length_past_its_message": ld(5, b"\x0a\x09abc") + b"xxxxxx",
    "group_across_message_boundary": ld(5, tag(30, 3)) + tag(30, 4),
    "values_too_deep": ld(1, ld(1, b"k") + ld(2, nest_list_values(200))),
    "entity_key_as_fixed32": tag(2, 5) + b"abcd",
}


@pytest.mark.parametrize("name", list(NESTED_MALFORMED))
def test_malformed_nested_rewrap_response(name):
    with pytest.raises(ProtoDecodeError):
        proto.decode_rewrap_response_raw(NESTED_MALFORMED[name])


def test_size_limit_is_inclusive():
    data = ld(30, b"\x00" * (proto.MAX_MESSAGE_SIZE - 5))
    assert len(data) == proto.MAX_MESSAGE_SIZE
    assert proto.decode_rewrap_request(data) == {"signedRequestToken": ""}


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    ref = kas_pb2.RewrapResponse()
    try:
        ref.ParseFromString(data)
    except DecodeError:
        ref = None
    try:
        ours = proto.decode_rewrap_response_raw(data)
    except ProtoDecodeError:
        return
    assert ref is not None, "the reference rejects what we accept"
    assert_same_as_reference(ours, ref)
    for decode in DECODERS[:5]:
        try:
            decode(data)
        except ProtoDecodeError:
            pass


@FUZZ
@given(
    response_raw, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4), st.data()
)
def test_fuzz_mutated_messages(raw, edits, data):
    buf = bytearray(raw_to_ref(raw).SerializeToString())
    if buf:
        for position, byte in edits:
            buf[position % len(buf)] = byte
    cut = data.draw(st.integers(0, len(buf)))
    for candidate in (bytes(buf), bytes(buf[:cut])):
        ref = kas_pb2.RewrapResponse()
        try:
            ref.ParseFromString(candidate)
        except DecodeError:
            ref = None
        try:
            ours = proto.decode_rewrap_response_raw(candidate)
        except ProtoDecodeError:
            continue
        assert ref is not None, "the reference rejects what we accept"
        assert_same_as_reference(ours, ref)


# --- protojson request helpers ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("helper", "message", "body"),
    [
        (proto.public_key_request_from_json, kas_pb2.PublicKeyRequest, {"algorithm": "ec:secp256r1", "fmt": "jwk"}),
        (proto.public_key_request_from_json, kas_pb2.PublicKeyRequest, {"v": "2", "extra": [1, 2]}),
        (proto.public_key_request_from_json, kas_pb2.PublicKeyRequest, {"algorithm": None}),
        (proto.legacy_public_key_request_from_json, kas_pb2.LegacyPublicKeyRequest, {"algorithm": "rsa:2048"}),
        (proto.rewrap_request_from_json, kas_pb2.RewrapRequest, {"signedRequestToken": "a.b.c"}),
        (proto.rewrap_request_from_json, kas_pb2.RewrapRequest, {"signed_request_token": "a.b.c"}),
        (proto.rewrap_request_from_json, kas_pb2.RewrapRequest, {"signedRequestToken": "t", "bearer": "old"}),
        (proto.rewrap_request_from_json, kas_pb2.RewrapRequest, {}),
    ],
)
def test_json_helpers_match_protojson_and_proto(helper, message, body):
    ref = json_format.Parse(json.dumps(body), message(), ignore_unknown_fields=True)
    expected = json_format.MessageToDict(ref, always_print_fields_with_no_presence=True)
    for form in (body, json.dumps(body), json.dumps(body).encode()):
        assert helper(form) == expected
    decoder = {
        kas_pb2.PublicKeyRequest: proto.decode_public_key_request,
        kas_pb2.LegacyPublicKeyRequest: proto.decode_legacy_public_key_request,
        kas_pb2.RewrapRequest: proto.decode_rewrap_request,
    }[message]
    assert decoder(ref.SerializeToString()) == expected


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'"x"',
        b'{"signedRequestToken": 5}',
        b'{"signedRequestToken": ["a"]}',
        b'{"signedRequestToken": "a", "signed_request_token": "b"}',
        b'{"signedRequestToken": "\\ud800"}',
        b"[" * 100_000,
        b'{"signedRequestToken": "' + b"a" * proto.MAX_MESSAGE_SIZE + b'"}',
    ],
)
def test_json_helpers_reject_bad_bodies(body):
    with pytest.raises(ProtoDecodeError):
        proto.rewrap_request_from_json(body)


# --- Content-Encoding, Connect conventions -------------------------------------------------------------------
def test_gzip_bodies_as_sent_by_connect_python():
    gzip_compression = pytest.importorskip("connectrpc.compression.gzip")
    body = proto.encode_rewrap_request("header.payload.signature")
    sent = gzip_compression.GzipCompression().compress(body)
    assert proto.decode_content_encoding(sent, "gzip") == body
    assert proto.decode_content_encoding(sent, " GZIP ") == body
    assert proto.decode_content_encoding(body, None) == body
    assert proto.decode_content_encoding(body, "identity") == body
    assert proto.decode_content_encoding(b"", "gzip") == b""


@pytest.mark.parametrize(
    "body",
    [
        gzip.compress(b"\x00" * (proto.MAX_MESSAGE_SIZE + 1)),  # a bomb: ~1 KiB inflating past the limit
        b"\x1f\x8b not gzip",
        gzip.compress(b"ok")[:-3],  # truncated
        gzip.compress(b"ok") + b"trailing",
        gzip.compress(b"a") + gzip.compress(b"b"),  # two members
    ],
)
def test_gzip_rejects_bad_or_oversize_bodies(body):
    with pytest.raises(ProtoDecodeError):
        proto.decode_content_encoding(body, "gzip")


def test_gzip_limit_and_unsupported_encoding():
    exact = b"\x01" * 1000
    assert proto.decode_content_encoding(gzip.compress(exact), "gzip", max_size=1000) == exact
    with pytest.raises(ProtoDecodeError):
        proto.decode_content_encoding(gzip.compress(exact), "gzip", max_size=999)
    with pytest.raises(ProtoDecodeError):
        proto.decode_content_encoding(exact, "identity", max_size=999)
    with pytest.raises(proto.UnsupportedEncodingError) as info:
        proto.decode_content_encoding(b"x", "br")
    assert info.value.http_status == 501


def test_connect_status_table_matches_connect_python():
    connect_protocol = pytest.importorskip("connectrpc._protocol")
    table = {code.value: status.code for code, status in connect_protocol._error_to_http_status.items()}
    assert dict(proto.CONNECT_HTTP_STATUS) == table
    assert len(table) == 16


def test_module_needs_neither_protobuf_nor_otdf_python_at_runtime():
    code = (
        "import sys, kas_ray.kas.proto; "
        "print(sorted(m for m in sys.modules if m.startswith(('google.protobuf', 'otdf_python'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_map_entry_with_unknown_fields_is_kept_as_protobuf_go_does():
    # protobuf-go (the platform) skips unknown fields inside a map entry and inserts the entry; upb instead
    # moves the whole entry into the parent's unknown fields. We follow Go.
    data = ld(1, ld(1, b"k") + tag(30, 0) + b"\x01" + ld(2, ld(3, b"v")))
    assert proto.decode_rewrap_response_raw(data)["metadata"] == {"k": "v"}
    ref = kas_pb2.RewrapResponse()
    ref.ParseFromString(data)
    assert dict(ref.metadata) == {} and upb_moved_map_entries(ref)

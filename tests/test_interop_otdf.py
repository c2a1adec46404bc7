"""Interoperability of kas_ray's ZTDF/TDF3 format with the OpenTDF Python SDK (otdf-python), offline.

a) otdf-python writes -> kas_ray reads and decrypts (with PrivateKeyUnwrapper).
b) kas_ray writes (RSA-OAEP-SHA1 KAO) -> otdf-python parses it and decrypts it, both with its local
   test hook and through its own KAS extension point (SDK.Services.kas().unwrap) backed by kas_ray.
c) a tampered otdf-python TDF fails kas_ray decrypt with a specific integrity error.
d) the encodings kas_ray writes match otdf-python's field by field (its parser is strict, and the Go SDK
   compares the root signature as an exact string).

Findings behind these tests: docs/interop-otdf-python.md.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import zipfile

import pytest

otdf_python = pytest.importorskip(
    "otdf_python", reason="otdf-python is not installed (the dev extra pins otdf-python==0.11.0)"
)

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from otdf_python.config import KASInfo, TDFConfig  # noqa: E402
from otdf_python.manifest import Manifest as OtdfManifest  # noqa: E402
from otdf_python.policy_object import AttributeObject, PolicyBody, PolicyObject  # noqa: E402
from otdf_python.sdk import SDK  # noqa: E402
from otdf_python.tdf import TDF, TDFReaderConfig  # noqa: E402
from otdf_python.tdf_reader import TDFReader  # noqa: E402

from kas_ray import ztdf  # noqa: E402
from kas_ray.errors import PayloadIntegrityError, SegmentHashError  # noqa: E402
from kas_ray.ztdf import (  # noqa: E402
    AttributeRef,
    KasKey,
    KeyAccessObject,
    Policy,
    PrivateKeyUnwrapper,
    decrypt,
    encrypt,
    read_manifest,
)

pytestmark = pytest.mark.interop

KAS_URL = "https://kas.example.org/kas"
KAS2_URL = "https://kas2.example.org/kas"
ATTRS = [
    "https://example.com/attr/classification/value/secret",
    "https://example.com/attr/releasable/value/usa",
]
SEG = 16  # small segments so a few dozen bytes make several of them


# --- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Everything here must work offline: any socket connect is a test failure."""

    def refuse(*_a, **_k):
        raise AssertionError("interop test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pub_pem(key) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _priv_pem(key) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture(scope="module")
def kas_key():
    return _rsa_key()


@pytest.fixture(scope="module")
def kas2_key():
    return _rsa_key()


def _plaintext(n: int) -> bytes:
    return bytes((i * 7 + 3) % 256 for i in range(n))


def _segments(n: int, seg: int) -> int:
    return -(-n // seg)


# --- otdf-python helpers ----------------------------------------------------------------------------------
def otdf_encrypt(
    data: bytes,
    kas: list[tuple[str, object, str | None]],
    *,
    segment_size: int = SEG,
    attributes: list[str] = ATTRS,
    policy_object=None,
    mime_type: str | None = None,
) -> bytes:
    """otdf-python writes a TDF with pre-filled KAS public keys: no SDK, no services, no network."""
    cfg = TDFConfig(
        kas_info_list=[KASInfo(url=url, public_key=_pub_pem(key), kid=kid) for url, key, kid in kas],
        attributes=list(attributes),
        default_segment_size=segment_size,
        policy_object=policy_object,
    )
    if mime_type:
        cfg.mime_type = mime_type
    out = io.BytesIO()
    TDF().create_tdf(data, cfg, out)
    return out.getvalue()


class _KasRayBackedKas:
    """otdf-python's KAS client interface (``unwrap``) answered locally by kas_ray's unwrapper."""

    def __init__(self, unwrapper):
        self.unwrapper = unwrapper
        self.calls = 0

    def unwrap(self, key_access, policy_json: str, session_key_type) -> bytes:
        self.calls += 1
        # otdf-python passes the *decoded* policy; the binding covers the manifest's base64 string,
        # which is this re-encoding whenever the manifest holds canonical padded base64.
        policy_b64 = base64.b64encode(policy_json.encode()).decode()
        kao = KeyAccessObject.model_validate({k: v for k, v in vars(key_access).items() if v is not None})
        return self.unwrapper(kao, policy_b64)


class _LocalServices(SDK.Services):
    def __init__(self, kas):
        self._kas = kas

    def kas(self):
        return self._kas


def kas_key_of(key, kid: str | None = "r1", oaep_hash: str = "sha1") -> KasKey:
    return KasKey(url=KAS_URL, public_key_pem=_pub_pem(key), kid=kid, oaep_hash=oaep_hash)


def kr_encrypt(data: bytes, keys: list[KasKey], *, segment_size: int = SEG) -> tuple[bytes, Policy]:
    policy = Policy(
        uuid="6f1c2a0e-2d4b-4c8e-9b1a-3e5f7a9c0d12",
        body=ztdf.PolicyBody(data_attributes=[AttributeRef(attribute=a) for a in ATTRS], dissem=[]),
    )
    out = io.BytesIO()
    encrypt(io.BytesIO(data), out, splits=[keys], policy=policy, segment_size=segment_size)
    return out.getvalue(), policy


def kr_decrypt(tdf: bytes, unwrapper) -> bytes:
    out = io.BytesIO()
    decrypt(io.BytesIO(tdf), out, unwrapper)
    return out.getvalue()


def _rezip(tdf: bytes, replace: dict[str, bytes]) -> bytes:
    """Rewrite the zip (same entry order, valid CRCs) with some entries replaced: a realistic tamper."""
    src = zipfile.ZipFile(io.BytesIO(tdf))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, replace.get(info.filename, src.read(info)))
    return out.getvalue()


# --- a) otdf-python writes, kas_ray reads -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "segment_size"),
    [(0, SEG), (1, SEG), (SEG, SEG), (SEG + 1, SEG), (5 * SEG + 3, SEG), (3000, 2 * 1024 * 1024)],
    ids=["empty", "1B", "exactly-1-seg", "1-seg-plus-1B", "6-segs", "default-2MiB-seg"],
)
def test_otdf_written_tdf_decrypts_in_kas_ray(kas_key, size, segment_size):
    data = _plaintext(size)
    tdf = otdf_encrypt(data, [(KAS_URL, kas_key, "r1")], segment_size=segment_size)

    manifest = read_manifest(io.BytesIO(tdf))
    ei = manifest.encryption_information
    assert manifest.schema_version == "4.3.0"
    assert len(ei.key_access) == 1
    kao = ei.key_access[0]
    assert (kao.type, kao.url, kao.kid, kao.sid) == ("wrapped", KAS_URL, "r1", None)
    assert len(ei.integrity_information.segments) == _segments(size, segment_size)
    assert ei.integrity_information.segment_size_default == segment_size
    assert Policy.from_base64(ei.policy).attributes == ATTRS

    assert kr_decrypt(tdf, PrivateKeyUnwrapper({"r1": kas_key}, oaep_hash="sha1")) == data


def test_otdf_policy_object_uuid_dissem_and_mime_read_back(kas_key):
    po = PolicyObject(
        uuid="3b2b8a4e-8b4f-4d0c-9a53-2f3d3c8f9e11",
        body=PolicyBody(data_attributes=[AttributeObject(attribute=a) for a in ATTRS], dissem=["a@x.org"]),
    )
    data = _plaintext(40)
    tdf = otdf_encrypt(data, [(KAS_URL, kas_key, "r1")], policy_object=po, mime_type="text/plain")
    manifest = read_manifest(io.BytesIO(tdf))
    policy = Policy.from_base64(manifest.encryption_information.policy)
    assert policy.uuid == po.uuid
    assert policy.attributes == ATTRS
    assert policy.body.dissem == ["a@x.org"]
    assert manifest.payload.mime_type == "text/plain"
    assert kr_decrypt(tdf, PrivateKeyUnwrapper({"r1": kas_key})) == data


def test_otdf_empty_policy_nulls_are_accepted(kas_key):
    """otdf-python writes `"dataAttributes": null, "dissem": null` for an attribute-free policy."""
    tdf = otdf_encrypt(b"no attributes", [(KAS_URL, kas_key, None)], attributes=[])
    policy_b64 = read_manifest(io.BytesIO(tdf)).encryption_information.policy
    assert json.loads(base64.b64decode(policy_b64))["body"] == {"dataAttributes": None, "dissem": None}
    policy = Policy.from_base64(policy_b64)
    assert policy.attributes == [] and policy.body.dissem == []
    assert kr_decrypt(tdf, PrivateKeyUnwrapper({None: kas_key})) == b"no attributes"


def test_otdf_multi_kas_kaos_are_alternatives(kas_key, kas2_key):
    """otdf-python wraps the same full key to every KAS without a sid: any one KAO must suffice."""
    data = _plaintext(50)
    tdf = otdf_encrypt(data, [(KAS_URL, kas_key, "r1"), (KAS2_URL, kas2_key, "r2")])
    kaos = read_manifest(io.BytesIO(tdf)).encryption_information.key_access
    assert [(k.url, k.sid) for k in kaos] == [(KAS_URL, None), (KAS2_URL, None)]
    assert kr_decrypt(tdf, PrivateKeyUnwrapper({"r1": kas_key})) == data
    assert kr_decrypt(tdf, PrivateKeyUnwrapper({"r2": kas2_key})) == data


# --- b) kas_ray writes, otdf-python reads -----------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 5 * SEG + 3], ids=["empty", "1B", "6-segs"])
def test_kas_ray_sha1_tdf_accepted_and_decrypted_by_otdf(kas_key, size):
    data = _plaintext(size)
    tdf, policy = kr_encrypt(data, [kas_key_of(kas_key, oaep_hash="sha1")])

    # zip + manifest parse (the deepest parse-only entry points)
    assert SDK.is_tdf(tdf)
    reader = TDFReader(io.BytesIO(tdf))
    m = OtdfManifest.from_json(reader.manifest())  # raises TypeError on unknown/missing dataclass fields
    assert m.schemaVersion == "4.3.0"
    assert m.payload.url == "0.payload" and m.payload.isEncrypted is True
    assert m.encryptionInformation.method.algorithm == "AES-256-GCM"
    assert m.encryptionInformation.integrityInformation.segmentHashAlg == "GMAC"
    assert len(m.encryptionInformation.keyAccess) == 1
    kao = m.encryptionInformation.keyAccess[0]
    assert (kao.type, kao.url, kao.protocol, kao.kid) == ("wrapped", KAS_URL, "kas", "r1")
    assert kao.wrappedKey and kao.policyBinding["alg"] == "HS256" and kao.policyBinding["hash"]
    assert Policy.from_base64(m.encryptionInformation.policy) == policy
    po = reader.read_policy_object()
    assert po.uuid == policy.uuid
    assert [a.attribute for a in po.body.data_attributes] == ATTRS

    # otdf-python's local test hook: RSA-OAEP-SHA1 unwrap with the private key, AES-GCM per segment
    assert TDF().load_tdf(tdf, TDFReaderConfig(kas_private_key=_priv_pem(kas_key))).payload == data
    # read_payload additionally compares every segment hash with base64(GCM tag)
    out = io.BytesIO()
    TDF().read_payload(tdf, {"kas_private_key": _priv_pem(kas_key)}, out)
    assert out.getvalue() == data


@pytest.mark.parametrize("oaep_hash", ["sha1", "sha256"])
def test_otdf_decrypts_kas_ray_tdf_via_its_kas_extension_point(kas_key, oaep_hash):
    """SDK.Services.kas().unwrap is otdf-python's KAS seam; kas_ray's unwrapper (binding checked) fills it."""
    data = _plaintext(3 * SEG + 5)
    tdf, _ = kr_encrypt(data, [kas_key_of(kas_key, oaep_hash=oaep_hash)])
    kas = _KasRayBackedKas(PrivateKeyUnwrapper({"r1": kas_key}, oaep_hash=oaep_hash))
    assert SDK(services=_LocalServices(kas)).load_tdf(tdf).payload == data
    assert kas.calls == 1


def test_otdf_round_trip_via_extension_point(kas_key):
    """otdf-python encrypts and decrypts with kas_ray as its KAS; otdf-python's policy binding verifies."""
    data = _plaintext(40)
    tdf = otdf_encrypt(data, [(KAS_URL, kas_key, "r1")])
    kas = _KasRayBackedKas(PrivateKeyUnwrapper({"r1": kas_key}))
    assert SDK(services=_LocalServices(kas)).load_tdf(tdf).payload == data


# --- c) tampering -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("where", "error"),
    [("ciphertext", PayloadIntegrityError), ("nonce", PayloadIntegrityError), ("tag", SegmentHashError)],
)
def test_tampered_otdf_tdf_fails_kas_ray_decrypt(kas_key, where, error):
    """A payload byte flipped in the 2nd segment; the zip is rebuilt with valid CRCs (a deliberate tamper)."""
    data = _plaintext(3 * SEG)
    tdf = otdf_encrypt(data, [(KAS_URL, kas_key, "r1")])
    payload = bytearray(zipfile.ZipFile(io.BytesIO(tdf)).read("0.payload"))
    seg_len = 12 + SEG + 16
    offset = seg_len + {"nonce": 3, "ciphertext": 12 + 5, "tag": seg_len - 4}[where]
    payload[offset] ^= 0x01
    tampered = _rezip(tdf, {"0.payload": bytes(payload)})

    with pytest.raises(error):
        kr_decrypt(tampered, PrivateKeyUnwrapper({"r1": kas_key}))


def test_flipped_byte_in_otdf_zip_fails_kas_ray_decrypt(kas_key):
    """A byte flipped in place (stale zip CRC) is still reported as a payload integrity failure."""
    data = _plaintext(3 * SEG)
    tdf = bytearray(otdf_encrypt(data, [(KAS_URL, kas_key, "r1")]))
    info = zipfile.ZipFile(io.BytesIO(bytes(tdf))).getinfo("0.payload")
    data_start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    tdf[data_start + 12 + 32 + 5] ^= 0x80  # ciphertext of the 2nd segment
    with pytest.raises((PayloadIntegrityError, SegmentHashError)):
        kr_decrypt(bytes(tdf), PrivateKeyUnwrapper({"r1": kas_key}))


# --- d) encodings kas_ray writes match what OpenTDF SDKs write ------------------------------------------
_OTDF_KAO_KEYS = {
    "type",
    "url",
    "protocol",
    "wrappedKey",
    "policyBinding",
    "encryptedMetadata",
    "kid",
    "sid",
    "schemaVersion",
    "ephemeralPublicKey",
}


def _manifest_json(tdf: bytes) -> dict:
    return json.loads(zipfile.ZipFile(io.BytesIO(tdf)).read("0.manifest.json"))


def test_kas_ray_manifest_encodings_match_otdf_python(kas_key):
    """Field by field, kas_ray's manifest uses the encodings otdf-python writes (and its parser demands).

    With ``schemaVersion`` present, OpenTDF readers (Go SDK ``validateRootSignature``) require
    rootSignature.sig == base64(raw HMAC) and segment hash == base64(raw 16-byte tag); only the policy
    binding is base64(hex(HMAC)).
    """
    data = _plaintext(2 * SEG + 1)
    ours = _manifest_json(kr_encrypt(data, [kas_key_of(kas_key)])[0])
    theirs = _manifest_json(otdf_encrypt(data, [(KAS_URL, kas_key, "r1")]))

    for who, m in (("otdf-python", theirs), ("kas_ray", ours)):
        ei = m["encryptionInformation"]
        ii = ei["integrityInformation"]
        assert m["schemaVersion"] == "4.3.0"
        assert set(ei["keyAccess"][0]) <= _OTDF_KAO_KEYS
        assert len(base64.b64decode(ei["keyAccess"][0]["policyBinding"]["hash"])) == 64  # base64(hex)
        sig = base64.b64decode(ii["rootSignature"]["sig"])
        assert len(sig) == 32, f"{who}: rootSignature.sig must be base64(raw HMAC), got {len(sig)} bytes"
        assert all(len(base64.b64decode(s["hash"])) == 16 for s in ii["segments"])
        assert all({"hash", "segmentSize", "encryptedSegmentSize"} == set(s) for s in ii["segments"])
        assert ii["rootSignature"]["alg"] == "HS256" and ii["segmentHashAlg"] == "GMAC"
        assert ii["encryptedSegmentSizeDefault"] == ii["segmentSizeDefault"] + 28
        assert {"algorithm", "iv"} <= set(ei["method"]) and ei["method"]["algorithm"] == "AES-256-GCM"
        assert set(m["payload"]) == {"type", "url", "protocol", "mimeType", "isEncrypted"}
    ours_zip = kr_encrypt(b"x", [kas_key_of(kas_key)])[0]
    entries = [i.filename for i in zipfile.ZipFile(io.BytesIO(ours_zip)).infolist()]
    assert entries == ["0.payload", "0.manifest.json"]

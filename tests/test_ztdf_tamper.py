"""ZTDF tampering and malformed input: every alteration fails with its own specific kas-ray error.

Each case rebuilds a *consistent* zip (fresh CRCs and sizes) around the altered entry with
:func:`rewrite`, so what is exercised is the TDF integrity layer, not zipfile's CRC check. Accepted
encodings (legacy 3.x hex MACs, spec-form bindings, string bindings, HS256 segment hashes) are here too.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kas_ray.errors import (
    FormatError,
    KasRayError,
    KeyNotFoundError,
    KeyUnwrapError,
    ManifestError,
    PayloadIntegrityError,
    PolicyBindingError,
    PolicyFormatError,
    RootSignatureError,
    SegmentHashError,
)
from kas_ray.hazmat import primitives as P
from kas_ray.ztdf import KasKey, KeyAccessObject, Manifest, Policy, PrivateKeyUnwrapper, decrypt, encrypt
from kas_ray.ztdf.keyaccess import wrap_share
from kas_ray.ztdf.tdf import unwrap_payload_key

SEG = 32
PLAINTEXT = bytes(range(256))[: 3 * SEG + 5]  # 3 full segments + a short one
ATTRS = ["https://nato.int/attr/classification/value/secret"]


@dataclass(frozen=True)
class Fixture:
    tdf: bytes
    private: P.PrivateKey
    kas: KasKey
    key: bytes  # the payload key (single split: the share itself)

    @property
    def payload(self) -> bytes:
        return zipfile.ZipFile(io.BytesIO(self.tdf)).read("0.payload")

    @property
    def manifest(self) -> dict:
        return json.loads(zipfile.ZipFile(io.BytesIO(self.tdf)).read("0.manifest.json"))

    def unwrapper(self) -> PrivateKeyUnwrapper:
        return PrivateKeyUnwrapper({self.kas.kid: self.private})


def _make(kid: str, private: P.PrivateKey, plaintext: bytes = PLAINTEXT) -> Fixture:
    kas = KasKey(url=f"https://{kid}.kas.example/kas", public_key_pem=P.public_key_pem(private.public_key()), kid=kid)
    out = io.BytesIO()
    manifest = encrypt(io.BytesIO(plaintext), out, splits=[[kas]], policy=Policy.create(ATTRS), segment_size=SEG)
    key = unwrap_payload_key(manifest, PrivateKeyUnwrapper({kid: private}))
    return Fixture(out.getvalue(), private, kas, key)


@cache
def rsa_fixture() -> Fixture:
    return _make("r1", rsa.generate_private_key(public_exponent=65537, key_size=2048))


@cache
def ec_fixture() -> Fixture:
    return _make("e1", ec.generate_private_key(ec.SECP256R1()))


# --- helpers -----------------------------------------------------------------------------------------
def rewrite(
    tdf: bytes, *, payload: bytes | None = None, manifest: dict | str | bytes | None = None, drop: tuple[str, ...] = ()
) -> bytes:
    """A new, consistent zip with ``0.payload`` and/or ``0.manifest.json`` replaced (or dropped)."""
    src = zipfile.ZipFile(io.BytesIO(tdf))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for info in src.infolist():
            if info.filename in drop:
                continue
            data = src.read(info)
            if info.filename == "0.payload" and payload is not None:
                data = payload
            if info.filename == "0.manifest.json" and manifest is not None:
                data = json.dumps(manifest).encode() if isinstance(manifest, dict) else manifest
            zf.writestr(info.filename, data)
    return out.getvalue()


def run(tdf: bytes, unwrap) -> bytes:
    out = io.BytesIO()
    decrypt(io.BytesIO(tdf), out, unwrap)
    return out.getvalue()


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[index] ^= mask
    return bytes(b)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def segments_of(payload: bytes, manifest: dict) -> list[bytes]:
    blobs, pos = [], 0
    for seg in manifest["encryptionInformation"]["integrityInformation"]["segments"]:
        blobs.append(payload[pos : pos + seg["encryptedSegmentSize"]])
        pos += seg["encryptedSegmentSize"]
    return blobs


def integrity(manifest: dict) -> dict:
    return manifest["encryptionInformation"]["integrityInformation"]


def kao0(manifest: dict) -> dict:
    return manifest["encryptionInformation"]["keyAccess"][0]


def resign(manifest: dict, key: bytes, blobs: list[bytes], *, legacy: bool = False, hs256: bool = False) -> dict:
    """Rewrite segment hashes and the root signature as a writer holding ``key`` would."""
    ii = integrity(manifest)
    ii["segments"] = ii["segments"][: len(blobs)] + [{} for _ in range(len(blobs) - len(ii["segments"]))]
    macs = [P.hmac_sha256(key, blob) if hs256 else blob[-16:] for blob in blobs]
    stored = [mac.hex().encode() if legacy else mac for mac in macs]
    for seg, blob, mac in zip(ii["segments"], blobs, stored, strict=True):
        seg["hash"] = b64(mac)
        seg["segmentSize"], seg["encryptedSegmentSize"] = len(blob) - 28, len(blob)
    root = P.hmac_sha256(key, b"".join(stored))
    ii["rootSignature"]["sig"] = b64(root.hex().encode() if legacy else root)
    ii["segmentHashAlg"] = "HS256" if hs256 else "GMAC"
    if legacy:
        manifest.pop("schemaVersion", None)
    return manifest


# --- the tamper matrix -------------------------------------------------------------------------------
# Each case: fixture -> (tampered tdf bytes). Expected: exact exception class and a message fragment;
# ``pre_payload`` = the failure must come before any plaintext is written.
Mutation = Callable[[Fixture], bytes]


def _payload_ct_byte(f: Fixture) -> bytes:
    return rewrite(f.tdf, payload=flip(f.payload, (SEG + 28) + 12 + 5))  # segment 1, ciphertext


def _payload_nonce_byte(f: Fixture) -> bytes:
    return rewrite(f.tdf, payload=flip(f.payload, 3))  # segment 0, nonce


def _payload_tag_byte(f: Fixture) -> bytes:
    return rewrite(f.tdf, payload=flip(f.payload, 3 * (SEG + 28) - 1))  # segment 2, last tag byte


def _payload_last_byte(f: Fixture) -> bytes:
    return rewrite(f.tdf, payload=flip(f.payload, len(f.payload) - 1, 0x80))


def _segment_hash(f: Fixture) -> bytes:
    m = f.manifest
    seg = integrity(m)["segments"][1]
    seg["hash"] = b64(flip(base64.b64decode(seg["hash"]), 0))
    return rewrite(f.tdf, manifest=m)


def _segment_hash_and_tag(f: Fixture) -> bytes:
    """Alter a tag and make the manifest hash match it: only the root signature can notice."""
    payload = flip(f.payload, 2 * (SEG + 28) - 1)
    m = f.manifest
    integrity(m)["segments"][1]["hash"] = b64(segments_of(payload, m)[1][-16:])
    return rewrite(f.tdf, payload=payload, manifest=m)


def _segment_hash_garbage(f: Fixture) -> bytes:
    m = f.manifest
    integrity(m)["segments"][0]["hash"] = "%%% not base64 %%%"
    return rewrite(f.tdf, manifest=m)


def _root_signature(f: Fixture) -> bytes:
    m = f.manifest
    ii = integrity(m)
    ii["rootSignature"]["sig"] = b64(flip(base64.b64decode(ii["rootSignature"]["sig"]), 31))
    return rewrite(f.tdf, manifest=m)


def _root_signature_hex_form_wrong(f: Fixture) -> bytes:
    m = f.manifest
    integrity(m)["rootSignature"]["sig"] = b64(b"00" * 32)
    return rewrite(f.tdf, manifest=m)


def _root_signature_garbage(f: Fixture) -> bytes:
    m = f.manifest
    integrity(m)["rootSignature"]["sig"] = b64(b"short")
    return rewrite(f.tdf, manifest=m)


def _policy_attribute(f: Fixture) -> bytes:
    m = f.manifest
    policy = json.loads(base64.b64decode(m["encryptionInformation"]["policy"]))
    policy["body"]["dataAttributes"][0]["attribute"] = "https://nato.int/attr/classification/value/unclassified"
    m["encryptionInformation"]["policy"] = b64(json.dumps(policy).encode())
    return rewrite(f.tdf, manifest=m)


def _policy_dissem(f: Fixture) -> bytes:
    m = f.manifest
    policy = json.loads(base64.b64decode(m["encryptionInformation"]["policy"]))
    policy["body"]["dissem"] = ["everyone@example.org"]
    m["encryptionInformation"]["policy"] = b64(json.dumps(policy).encode())
    return rewrite(f.tdf, manifest=m)


def _policy_reserialised(f: Fixture) -> bytes:
    """Same policy content, different bytes (re-serialised): the binding is over the exact string."""
    m = f.manifest
    policy = json.loads(base64.b64decode(m["encryptionInformation"]["policy"]))
    m["encryptionInformation"]["policy"] = b64(json.dumps(policy, indent=1).encode())
    return rewrite(f.tdf, manifest=m)


def _binding_hash(f: Fixture) -> bytes:
    m = f.manifest
    hex_mac = base64.b64decode(kao0(m)["policyBinding"]["hash"]).decode()
    kao0(m)["policyBinding"]["hash"] = b64(("0" if hex_mac[0] != "0" else "1").encode() + hex_mac[1:].encode())
    return rewrite(f.tdf, manifest=m)


def _binding_legacy_string_wrong(f: Fixture) -> bytes:
    m = f.manifest
    kao0(m)["policyBinding"] = b64(bytes(32))
    return rewrite(f.tdf, manifest=m)


def _binding_alg(f: Fixture) -> bytes:
    m = f.manifest
    kao0(m)["policyBinding"]["alg"] = "HS512"
    return rewrite(f.tdf, manifest=m)


def _binding_garbage(f: Fixture) -> bytes:
    m = f.manifest
    kao0(m)["policyBinding"]["hash"] = b64(b"not a mac")
    return rewrite(f.tdf, manifest=m)


def _wrapped_key_byte(f: Fixture) -> bytes:
    m = f.manifest
    kao0(m)["wrappedKey"] = b64(flip(base64.b64decode(kao0(m)["wrappedKey"]), 20))
    return rewrite(f.tdf, manifest=m)


def _wrapped_key_other_share(f: Fixture) -> bytes:
    """A validly wrapped but different share, with the original binding: the binding catches it."""
    m = f.manifest
    policy = m["encryptionInformation"]["policy"]
    other = wrap_share(f.kas, P.random_key(), policy)
    kao0(m)["wrappedKey"] = other.wrapped_key
    if other.ephemeral_public_key:
        kao0(m)["ephemeralPublicKey"] = other.ephemeral_public_key
    return rewrite(f.tdf, manifest=m)


def _kao_replaced(f: Fixture) -> bytes:
    """An attacker rewraps a key of their own to the (public) KAS key and binds it properly."""
    m = f.manifest
    forged = wrap_share(f.kas, P.random_key(), m["encryptionInformation"]["policy"]).to_wire()
    m["encryptionInformation"]["keyAccess"][0] = forged
    return rewrite(f.tdf, manifest=m)


def _kao_replaced_and_policy(f: Fixture) -> bytes:
    """Attacker's own key *and* a relaxed policy: binding verifies, the root signature does not."""
    m = f.manifest
    policy = Policy.create(["https://nato.int/attr/classification/value/unclassified"]).to_base64()
    m["encryptionInformation"]["policy"] = policy
    m["encryptionInformation"]["keyAccess"][0] = wrap_share(f.kas, P.random_key(), policy).to_wire()
    return rewrite(f.tdf, manifest=m)


def _wrapped_key_garbage(f: Fixture) -> bytes:
    m = f.manifest
    kao0(m)["wrappedKey"] = "*** not base64 ***"
    return rewrite(f.tdf, manifest=m)


def _wrapped_key_empty(f: Fixture) -> bytes:
    m = f.manifest
    kao0(m)["wrappedKey"] = ""
    return rewrite(f.tdf, manifest=m)


def _unknown_kid(f: Fixture) -> bytes:
    m = f.manifest
    kao0(m)["kid"] = "nobody"
    return rewrite(f.tdf, manifest=m)


def _truncate_payload(f: Fixture) -> bytes:
    return rewrite(f.tdf, payload=f.payload[:-1])


def _extend_payload(f: Fixture) -> bytes:
    return rewrite(f.tdf, payload=f.payload + b"\x00")


def _remove_segment(f: Fixture) -> bytes:
    blobs = segments_of(f.payload, f.manifest)
    return rewrite(f.tdf, payload=b"".join(blobs[:1] + blobs[2:]))


def _remove_segment_and_entry(f: Fixture) -> bytes:
    m = f.manifest
    blobs = segments_of(f.payload, m)
    del integrity(m)["segments"][1]
    return rewrite(f.tdf, payload=b"".join(blobs[:1] + blobs[2:]), manifest=m)


def _remove_last_segment_and_entry(f: Fixture) -> bytes:
    m = f.manifest
    blobs = segments_of(f.payload, m)
    del integrity(m)["segments"][-1]
    return rewrite(f.tdf, payload=b"".join(blobs[:-1]), manifest=m)


def _duplicate_segment(f: Fixture) -> bytes:
    blobs = segments_of(f.payload, f.manifest)
    return rewrite(f.tdf, payload=b"".join(blobs[:2] + blobs[1:]))


def _duplicate_segment_and_entry(f: Fixture) -> bytes:
    m = f.manifest
    blobs = segments_of(f.payload, m)
    segs = integrity(m)["segments"]
    integrity(m)["segments"] = segs[:2] + segs[1:]
    return rewrite(f.tdf, payload=b"".join(blobs[:2] + blobs[1:]), manifest=m)


def _reorder_segments(f: Fixture) -> bytes:
    blobs = segments_of(f.payload, f.manifest)
    return rewrite(f.tdf, payload=b"".join([blobs[1], blobs[0], *blobs[2:]]))


def _reorder_segments_and_entries(f: Fixture) -> bytes:
    m = f.manifest
    blobs = segments_of(f.payload, m)
    segs = integrity(m)["segments"]
    segs[0], segs[1] = segs[1], segs[0]
    return rewrite(f.tdf, payload=b"".join([blobs[1], blobs[0], *blobs[2:]]), manifest=m)


def _shift_segment_boundary(f: Fixture) -> bytes:
    """Sizes stay consistent and add up, but a boundary moves: the first segment's tag is wrong."""
    m = f.manifest
    segs = integrity(m)["segments"]
    segs[0]["segmentSize"] -= 1
    segs[0]["encryptedSegmentSize"] -= 1
    segs[1]["segmentSize"] += 1
    segs[1]["encryptedSegmentSize"] += 1
    return rewrite(f.tdf, manifest=m)


def _inconsistent_sizes(f: Fixture) -> bytes:
    m = f.manifest
    integrity(m)["segments"][0]["segmentSize"] += 1
    return rewrite(f.tdf, manifest=m)


def _short_last_segment(f: Fixture) -> bytes:
    m = f.manifest
    segs = integrity(m)["segments"]
    segs[-1]["segmentSize"], segs[-1]["encryptedSegmentSize"] = 0, 28
    return rewrite(f.tdf, manifest=m)


def _last_segment_cut_consistently(f: Fixture) -> bytes:
    """The last segment cut to 28 bytes in the payload and the manifest sizes: its tag is gone."""
    m = f.manifest
    segs = integrity(m)["segments"]
    segs[-1]["segmentSize"], segs[-1]["encryptedSegmentSize"] = 0, 28
    return rewrite(f.tdf, payload=b"".join(segments_of(f.payload, m)), manifest=m)


def _manifest_edit(path: tuple, value) -> Mutation:
    def mutate(f: Fixture) -> bytes:
        m = f.manifest
        node = m
        for part in path[:-1]:
            node = node[part]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return rewrite(f.tdf, manifest=m)

    return mutate


_DELETE = object()
EI = "encryptionInformation"
II = (EI, "integrityInformation")

CASES = [
    # payload
    pytest.param(
        _payload_ct_byte, PayloadIntegrityError, "segment 1 failed authentication", False, id="payload-ciphertext-byte"
    ),
    pytest.param(
        _payload_nonce_byte, PayloadIntegrityError, "segment 0 failed authentication", False, id="payload-nonce-byte"
    ),
    pytest.param(
        _payload_tag_byte, SegmentHashError, "segment 2 does not match its hash", False, id="payload-tag-byte"
    ),
    pytest.param(
        _payload_last_byte, SegmentHashError, "segment 3 does not match its hash", False, id="payload-last-byte"
    ),
    pytest.param(
        _segment_hash, RootSignatureError, "does not match the segment hashes", True, id="manifest-segment-hash"
    ),
    pytest.param(
        _segment_hash_and_tag, RootSignatureError, "does not match the segment hashes", True, id="segment-hash-and-tag"
    ),
    pytest.param(_segment_hash_garbage, RootSignatureError, "malformed", True, id="segment-hash-not-base64"),
    pytest.param(_root_signature, RootSignatureError, "does not match the segment hashes", True, id="root-signature"),
    pytest.param(_root_signature_hex_form_wrong, RootSignatureError, "does not match", True, id="root-signature-hex"),
    pytest.param(_root_signature_garbage, RootSignatureError, "malformed", True, id="root-signature-malformed"),
    # policy and binding
    pytest.param(_policy_attribute, PolicyBindingError, "does not match the policy", True, id="policy-attribute"),
    pytest.param(_policy_dissem, PolicyBindingError, "does not match the policy", True, id="policy-dissem"),
    pytest.param(_policy_reserialised, PolicyBindingError, "does not match the policy", True, id="policy-reserialised"),
    pytest.param(_binding_hash, PolicyBindingError, "does not match the policy", True, id="binding-hash"),
    pytest.param(_binding_legacy_string_wrong, PolicyBindingError, "does not match", True, id="binding-string-wrong"),
    pytest.param(_binding_alg, PolicyBindingError, "unsupported policy binding algorithm", True, id="binding-alg"),
    pytest.param(_binding_garbage, PolicyBindingError, "malformed", True, id="binding-malformed"),
    pytest.param(
        _manifest_edit((EI, "policy"), "!!!"), PolicyFormatError, "not base64 JSON", True, id="policy-not-base64"
    ),
    pytest.param(
        _manifest_edit((EI, "policy"), b64(b'{"body": {}}')), PolicyFormatError, "schema", True, id="policy-no-uuid"
    ),
    # key access objects
    pytest.param(_wrapped_key_byte, KeyUnwrapError, "could not be unwrapped", True, id="wrapped-key-byte"),
    pytest.param(
        _wrapped_key_other_share, PolicyBindingError, "does not match the policy", True, id="wrapped-key-swapped"
    ),
    pytest.param(_kao_replaced, RootSignatureError, "does not match the segment hashes", True, id="kao-replaced"),
    pytest.param(_kao_replaced_and_policy, RootSignatureError, "does not match", True, id="kao-and-policy-replaced"),
    pytest.param(_wrapped_key_garbage, FormatError, "wrappedKey is not base64", True, id="wrapped-key-not-base64"),
    pytest.param(_wrapped_key_empty, FormatError, "impossible length", True, id="wrapped-key-empty"),
    pytest.param(_unknown_kid, KeyNotFoundError, "nobody", True, id="unknown-kid"),
    pytest.param(_manifest_edit((EI, "keyAccess", 0, "type"), "remote"), ManifestError, "type", True, id="kao-type"),
    pytest.param(
        _manifest_edit((EI, "keyAccess", 0, "wrappedKey"), _DELETE),
        ManifestError,
        "wrappedKey",
        True,
        id="kao-no-wrapped-key",
    ),
    # segments and sizes
    pytest.param(_truncate_payload, ManifestError, "do not add up", True, id="payload-truncated"),
    pytest.param(_extend_payload, ManifestError, "do not add up", True, id="payload-extended"),
    pytest.param(_remove_segment, ManifestError, "do not add up", True, id="segment-removed"),
    pytest.param(_remove_segment_and_entry, RootSignatureError, "does not match", True, id="segment-and-entry-removed"),
    pytest.param(
        _remove_last_segment_and_entry, RootSignatureError, "does not match", True, id="last-segment-and-entry-removed"
    ),
    pytest.param(_duplicate_segment, ManifestError, "do not add up", True, id="segment-duplicated"),
    pytest.param(
        _duplicate_segment_and_entry, RootSignatureError, "does not match", True, id="segment-and-entry-duplicated"
    ),
    pytest.param(
        _reorder_segments, SegmentHashError, "segment 0 does not match its hash", True, id="segments-reordered"
    ),
    pytest.param(
        _reorder_segments_and_entries, RootSignatureError, "does not match", True, id="segments-and-entries-reordered"
    ),
    pytest.param(
        _shift_segment_boundary,
        SegmentHashError,
        "segment 0 does not match its hash",
        True,
        id="segment-boundary-shifted",
    ),
    pytest.param(_inconsistent_sizes, ManifestError, "segment 0 has inconsistent sizes", True, id="sizes-inconsistent"),
    pytest.param(_short_last_segment, ManifestError, "do not add up", True, id="last-segment-size"),
    pytest.param(
        _last_segment_cut_consistently,
        SegmentHashError,
        "segment 3 does not match its hash",
        False,
        id="last-segment-cut",
    ),
    pytest.param(
        _manifest_edit((*II, "segments", 0, "encryptedSegmentSize"), 10),
        ManifestError,
        "segments.0",
        True,
        id="segment-size-below-overhead",
    ),
    pytest.param(
        _manifest_edit((*II, "segments", 0, "segmentSize"), -1),
        ManifestError,
        "segments.0",
        True,
        id="segment-size-negative",
    ),
    pytest.param(
        _manifest_edit((*II, "segmentSizeDefault"), 0),
        ManifestError,
        "segmentSizeDefault",
        True,
        id="segment-size-default-zero",
    ),
    # algorithms and required fields
    pytest.param(
        _manifest_edit((EI, "method", "algorithm"), "AES-128-CBC"),
        ManifestError,
        "unsupported payload algorithm",
        True,
        id="method-algorithm",
    ),
    pytest.param(
        _manifest_edit((*II, "rootSignature", "alg"), "RS256"),
        ManifestError,
        "unsupported root signature algorithm",
        True,
        id="root-signature-alg",
    ),
    pytest.param(
        _manifest_edit((*II, "segmentHashAlg"), "SHA1"),
        ManifestError,
        "unsupported segment hash algorithm",
        True,
        id="segment-hash-alg",
    ),
    pytest.param(_manifest_edit((EI, "policy"), _DELETE), ManifestError, "policy", True, id="no-policy"),
    pytest.param(_manifest_edit((EI, "keyAccess"), []), ManifestError, "keyAccess", True, id="no-kaos"),
    pytest.param(_manifest_edit((EI, "keyAccess"), _DELETE), ManifestError, "keyAccess", True, id="no-key-access"),
    pytest.param(
        _manifest_edit((*II, "rootSignature"), _DELETE), ManifestError, "rootSignature", True, id="no-root-signature"
    ),
    pytest.param(
        _manifest_edit((*II, "segments", 0, "hash"), _DELETE), ManifestError, "hash", True, id="segment-no-hash"
    ),
    pytest.param(
        _manifest_edit((EI,), _DELETE), ManifestError, "encryptionInformation", True, id="no-encryption-information"
    ),
    pytest.param(
        _manifest_edit((EI, "keyAccess"), {"not": "a list"}), ManifestError, "keyAccess", True, id="key-access-not-list"
    ),
]


@pytest.mark.parametrize("fixture", ["rsa", "ec"])
@pytest.mark.parametrize(("mutate", "error", "fragment", "pre_payload"), CASES)
def test_tamper(fixture, mutate, error, fragment, pre_payload):
    f = rsa_fixture() if fixture == "rsa" else ec_fixture()
    tampered = mutate(f)
    out = io.BytesIO()
    with pytest.raises(KasRayError) as excinfo:
        decrypt(io.BytesIO(tampered), out, f.unwrapper())
    assert excinfo.type is error, f"{excinfo.type.__name__}: {excinfo.value}"
    assert fragment in str(excinfo.value)
    if pre_payload:
        assert out.getvalue() == b"", "no plaintext may be released before the integrity checks"
    else:
        assert PLAINTEXT.startswith(out.getvalue())  # only authenticated segments were written


# --- container level ---------------------------------------------------------------------------------
def _zip(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return out.getvalue()


CONTAINER_CASES = [
    pytest.param(lambda f: b"", FormatError, "not a TDF zip container", id="empty-input"),
    pytest.param(lambda f: b"not a zip at all" * 10, FormatError, "not a TDF zip container", id="not-zip"),
    pytest.param(lambda f: f.tdf[: len(f.tdf) // 2], FormatError, "not a TDF zip container", id="zip-truncated"),
    pytest.param(lambda f: _zip({"hello.txt": b"hi"}), ManifestError, "0.manifest.json is missing", id="no-manifest"),
    pytest.param(
        lambda f: rewrite(f.tdf, drop=("0.manifest.json",)),
        ManifestError,
        "0.manifest.json is missing",
        id="manifest-dropped",
    ),
    pytest.param(
        lambda f: rewrite(f.tdf, drop=("0.payload",)), FormatError, "0.payload is missing", id="payload-dropped"
    ),
    pytest.param(
        lambda f: rewrite(f.tdf, manifest=b"{not json"), ManifestError, "not valid JSON", id="manifest-not-json"
    ),
    pytest.param(
        lambda f: rewrite(f.tdf, manifest=b"\xff\xfe\x00\x01"),
        ManifestError,
        "manifest is invalid",
        id="manifest-not-utf8",
    ),
    pytest.param(lambda f: rewrite(f.tdf, manifest=b""), ManifestError, "manifest is invalid", id="manifest-empty"),
    pytest.param(lambda f: rewrite(f.tdf, manifest=b"[]"), ManifestError, "manifest is invalid", id="manifest-array"),
    pytest.param(lambda f: rewrite(f.tdf, manifest=b"null"), ManifestError, "manifest is invalid", id="manifest-null"),
    pytest.param(
        lambda f: rewrite(f.tdf, manifest=b"[" * 100_000),
        ManifestError,
        "manifest is invalid",
        id="manifest-deeply-nested",
    ),
]


@pytest.mark.parametrize(("make", "error", "fragment"), CONTAINER_CASES)
def test_container(make, error, fragment):
    f = ec_fixture()
    with pytest.raises(KasRayError) as excinfo:
        run(make(f), f.unwrapper())
    assert excinfo.type is error, f"{excinfo.type.__name__}: {excinfo.value}"
    assert fragment in str(excinfo.value)


def _central_entry(tdf: bytes, name: str) -> int:
    zf = zipfile.ZipFile(io.BytesIO(tdf))
    pos = zf.start_dir
    while tdf[pos : pos + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack("<HHH", tdf[pos + 28 : pos + 34])
        if tdf[pos + 46 : pos + 46 + name_len].decode() == name:
            return pos
        pos += 46 + name_len + extra_len + comment_len
    raise AssertionError(name)


def _set_central(tdf: bytes, name: str, offset: int, fmt: str, value: int, *, orr: bool = False) -> bytes:
    pos = _central_entry(tdf, name) + offset
    b = bytearray(tdf)
    (old,) = struct.unpack_from(fmt, b, pos)
    struct.pack_into(fmt, b, pos, (old | value) if orr else value)
    return bytes(b)


UNSUPPORTED = "zip-encrypted or uses an unsupported compression method"


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "orr", "payload_error", "fragment"),
    [
        pytest.param(10, "<H", 8, False, PayloadIntegrityError, "payload entry is corrupt", id="deflated"),
        pytest.param(10, "<H", 12, False, FormatError, UNSUPPORTED, id="bzip2"),
        pytest.param(10, "<H", 14, False, FormatError, UNSUPPORTED, id="lzma"),
        pytest.param(10, "<H", 99, False, FormatError, UNSUPPORTED, id="unknown-compression"),
        pytest.param(8, "<H", 0x1, True, FormatError, UNSUPPORTED, id="encrypted-flag"),
        pytest.param(8, "<H", 0x20, True, FormatError, UNSUPPORTED, id="patched-data-flag"),
        pytest.param(8, "<H", 0x40, True, FormatError, UNSUPPORTED, id="strong-encryption-flag"),
        pytest.param(16, "<I", 0xDEADBEEF, False, PayloadIntegrityError, "Bad CRC-32", id="crc"),
        pytest.param(42, "<I", 7, False, PayloadIntegrityError, "payload entry is corrupt", id="header-offset"),
        pytest.param(6, "<H", 84, False, FormatError, "zip file version", id="extract-version"),
    ],
)
@pytest.mark.parametrize("entry", ["0.payload", "0.manifest.json"])
def test_zip_entry_header_corruption(entry, offset, fmt, value, orr, payload_error, fragment):
    """Corrupt zip metadata (not covered by the TDF MACs) still surfaces as a specific kas-ray error."""
    f = ec_fixture()
    tampered = _set_central(f.tdf, entry, offset, fmt, value, orr=orr)
    out = io.BytesIO()
    with pytest.raises(KasRayError) as excinfo:
        decrypt(io.BytesIO(tampered), out, f.unwrapper())
    if fragment == "zip file version":  # the whole container is refused when it is opened
        expected = FormatError
    else:
        expected = ManifestError if entry == "0.manifest.json" else payload_error
    assert excinfo.type is expected, f"{excinfo.type.__name__}: {excinfo.value}"
    assert fragment in str(excinfo.value) or (entry == "0.manifest.json" and "manifest" in str(excinfo.value))
    assert PLAINTEXT.startswith(out.getvalue())


def test_deflated_entries_are_read():
    """Stored is what every SDK writes, but a deflated manifest or payload is still a valid zip."""
    f = rsa_fixture()
    src = zipfile.ZipFile(io.BytesIO(f.tdf))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for info in src.infolist():
            zf.writestr(info.filename, src.read(info))
    assert run(out.getvalue(), f.unwrapper()) == PLAINTEXT


# --- accepted encodings -------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["rsa", "ec"])
def test_binding_spec_form_base64_raw_hmac_accepted(fixture):
    f = rsa_fixture() if fixture == "rsa" else ec_fixture()
    m = f.manifest
    kao0(m)["policyBinding"]["hash"] = b64(P.hmac_sha256(f.key, m[EI]["policy"].encode()))
    assert run(rewrite(f.tdf, manifest=m), f.unwrapper()) == PLAINTEXT


def test_binding_sdk_form_base64_hex_accepted():
    f = ec_fixture()
    m = f.manifest
    assert len(base64.b64decode(kao0(m)["policyBinding"]["hash"])) == 64  # what encrypt writes
    kao0(m)["policyBinding"]["hash"] = b64(P.hmac_sha256(f.key, m[EI]["policy"].encode()).hex().encode())
    assert run(rewrite(f.tdf, manifest=m), f.unwrapper()) == PLAINTEXT


@pytest.mark.parametrize("form", ["hex", "raw"])
def test_binding_legacy_string_accepted(form):
    f = rsa_fixture()
    m = f.manifest
    mac = P.hmac_sha256(f.key, m[EI]["policy"].encode())
    kao0(m)["policyBinding"] = b64(mac.hex().encode() if form == "hex" else mac)
    assert run(rewrite(f.tdf, manifest=m), f.unwrapper()) == PLAINTEXT


@pytest.mark.parametrize("fixture", ["rsa", "ec"])
def test_legacy_3x_manifest_decrypts(fixture):
    """No schemaVersion; segment hashes base64(hex(tag)); aggregate = the hex strings; sig base64(hex)."""
    f = rsa_fixture() if fixture == "rsa" else ec_fixture()
    m = f.manifest
    blobs = segments_of(f.payload, m)
    resign(m, f.key, blobs, legacy=True)
    assert "schemaVersion" not in m
    assert len(base64.b64decode(integrity(m)["segments"][0]["hash"])) == 32
    assert len(base64.b64decode(integrity(m)["rootSignature"]["sig"])) == 64
    legacy = rewrite(f.tdf, manifest=m)
    out = io.BytesIO()
    manifest = decrypt(io.BytesIO(legacy), out, f.unwrapper())
    assert out.getvalue() == PLAINTEXT and manifest.is_legacy
    # and tampering is still caught in the legacy encoding
    with pytest.raises(SegmentHashError):
        run(rewrite(legacy, payload=flip(f.payload, len(f.payload) - 1)), f.unwrapper())
    integrity(m)["segments"][0]["hash"] = b64(b"0" * 32)
    with pytest.raises(RootSignatureError):
        run(rewrite(legacy, manifest=m), f.unwrapper())


def test_root_signature_hex_form_accepted_with_schema_version():
    """Earlier kas-ray wrote base64(hex) root signatures into 4.3.0 manifests; they still read."""
    f = ec_fixture()
    m = f.manifest
    tags = b"".join(base64.b64decode(s["hash"]) for s in integrity(m)["segments"])
    integrity(m)["rootSignature"]["sig"] = b64(P.hmac_sha256(f.key, tags).hex().encode())
    assert run(rewrite(f.tdf, manifest=m), f.unwrapper()) == PLAINTEXT


def test_hs256_segment_hashes_accepted_and_checked():
    f = ec_fixture()
    m = resign(f.manifest, f.key, segments_of(f.payload, f.manifest), hs256=True)
    assert run(rewrite(f.tdf, manifest=m), f.unwrapper()) == PLAINTEXT
    with pytest.raises(SegmentHashError, match="segment 1 does not match"):
        run(rewrite(f.tdf, manifest=m, payload=flip(f.payload, SEG + 28 + 14)), f.unwrapper())


def test_go_sdk_style_empty_payload_with_one_empty_segment():
    """The Go SDK writes one 28-byte segment for an empty plaintext; kas-ray writes none. Both read."""
    f = ec_fixture()
    blob = P.aes_gcm_encrypt(f.key, b"")
    m = resign(f.manifest, f.key, [blob])
    assert integrity(m)["segments"][0]["segmentSize"] == 0
    assert run(rewrite(f.tdf, payload=blob, manifest=m), f.unwrapper()) == b""
    empty = resign(f.manifest, f.key, [])
    assert run(rewrite(f.tdf, payload=b"", manifest=empty), f.unwrapper()) == b""


def test_unknown_fields_and_sdk_extras_ignored():
    f = rsa_fixture()
    m = f.manifest
    m["future"] = {"x": [1, 2]}
    kao0(m)["encryptedMetadata"] = b64(b"{}")
    kao0(m)["schemaVersion"] = "1.0"
    kao0(m)["sid"] = ""
    kao0(m)["somethingNew"] = True
    m[EI]["method"]["iv"] = ""
    integrity(m)["segments"][0]["extra"] = 1
    m["assertions"] = [{"id": "a", "type": "handling", "scope": "tdo", "statement": {}}]
    assert run(rewrite(f.tdf, manifest=m), f.unwrapper()) == PLAINTEXT


def test_segment_sizes_from_defaults():
    """Segments may omit their sizes; the defaults apply (the last one must then be explicit)."""
    f = rsa_fixture()
    m = f.manifest
    for seg in integrity(m)["segments"][:-1]:
        del seg["segmentSize"], seg["encryptedSegmentSize"]
    assert run(rewrite(f.tdf, manifest=m), f.unwrapper()) == PLAINTEXT


def test_client_side_binding_check_not_bypassed_by_lenient_unwrapper():
    """An unwrapper (e.g. a KAS) that returns the share without checking the binding must not let an
    altered policy through: decrypt checks every binding itself."""
    f = rsa_fixture()
    tampered = _policy_attribute(f)
    inner = f.unwrapper()

    def lenient(kao: KeyAccessObject, policy_b64: str) -> bytes:
        return inner(
            kao,
            Manifest.parse(zipfile.ZipFile(io.BytesIO(f.tdf)).read("0.manifest.json")).encryption_information.policy,
        )  # unwraps against the original policy

    with pytest.raises(PolicyBindingError, match="does not match the policy"):
        run(tampered, lenient)


def test_ec_ephemeral_key_problems():
    f = ec_fixture()
    other_curve = P.public_key_pem(ec.generate_private_key(ec.SECP384R1()).public_key())
    rsa_pem = P.public_key_pem(rsa_fixture().private.public_key())
    for value, error in [
        (_DELETE, FormatError),
        ("not a pem", FormatError),
        (rsa_pem, FormatError),
        (other_curve, KeyUnwrapError),
    ]:
        m = f.manifest
        if value is _DELETE:
            del kao0(m)["ephemeralPublicKey"]
        else:
            kao0(m)["ephemeralPublicKey"] = value
        with pytest.raises(KasRayError) as excinfo:
            run(rewrite(f.tdf, manifest=m), f.unwrapper())
        assert excinfo.type is error, (value, excinfo.value)


# --- random corruption: only kas-ray errors, or the exact plaintext ----------------------------------
@cache
def _fuzz_target() -> tuple[bytes, list[int]]:
    tdf = ec_fixture().tdf
    zf = zipfile.ZipFile(io.BytesIO(tdf))
    hot: list[int] = []  # zip structure bytes: local headers, central directory, end record
    for info in zf.infolist():
        name_len, extra_len = struct.unpack("<HH", tdf[info.header_offset + 26 : info.header_offset + 30])
        hot.extend(range(info.header_offset, info.header_offset + 30 + name_len + extra_len))
    hot.extend(range(zf.start_dir, len(tdf)))
    return tdf, hot


@st.composite
def corruptions(draw):
    tdf, hot = _fuzz_target()
    position = st.one_of(st.integers(0, len(tdf) - 1), st.sampled_from(hot))
    return draw(st.lists(st.tuples(position, st.integers(1, 255)), min_size=1, max_size=3))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=corruptions())
def test_random_corruption_is_a_kas_ray_error_or_harmless(edits):
    tdf, _ = _fuzz_target()
    data = bytearray(tdf)
    for pos, mask in edits:
        data[pos] ^= mask
    out = io.BytesIO()
    try:
        decrypt(io.BytesIO(bytes(data)), out, ec_fixture().unwrapper())
    except KasRayError:
        assert PLAINTEXT.startswith(out.getvalue())
        return
    assert out.getvalue() == PLAINTEXT  # only fields nothing depends on (times, comments, ...) changed


def test_fixture_sanity():
    for f in (rsa_fixture(), ec_fixture()):
        assert run(f.tdf, f.unwrapper()) == PLAINTEXT
        assert len(segments_of(f.payload, f.manifest)) == 4
        assert f.manifest["schemaVersion"] == "4.3.0"

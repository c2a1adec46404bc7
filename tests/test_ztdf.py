"""ZTDF / TDF3 format: round trips, manifest shape, split semantics, policy model, streaming.

Tampering and malformed input live in ``test_ztdf_tamper.py``.
"""

from __future__ import annotations

import base64
import io
import math
import os
import random
import threading
import zipfile
from dataclasses import dataclass
from functools import cache

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kas_ray.errors import (
    KeyNotFoundError,
    KeyUnwrapError,
    PolicyFormatError,
    RewrapError,
)
from kas_ray.hazmat import primitives as P
from kas_ray.ztdf import (
    DEFAULT_SEGMENT_SIZE,
    SCHEMA_VERSION,
    KasKey,
    KeyAccessObject,
    Policy,
    PrivateKeyUnwrapper,
    decrypt,
    encrypt,
    read_manifest,
)
from kas_ray.ztdf.policy import MAX_POLICY_BYTES

ATTRS = [
    "https://nato.int/attr/classification/value/secret",
    "https://nato.int/attr/releasable/value/usa",
]


# --- keys (generated once per module) ---------------------------------------------------------------
@dataclass(frozen=True)
class Kas:
    kid: str
    private: P.PrivateKey
    oaep_hash: P.OaepHash
    key: KasKey


def _kas(kid: str, private: P.PrivateKey, oaep_hash: P.OaepHash = "sha1") -> Kas:
    pem = P.public_key_pem(private.public_key())
    key = KasKey(url=f"https://{kid}.kas.example/kas", public_key_pem=pem, kid=kid, oaep_hash=oaep_hash)
    return Kas(kid, private, oaep_hash, key)


@cache
def pool() -> dict[str, Kas]:
    def rsa_key(bits: int) -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)

    kases = [
        _kas("rsa2048-sha1", rsa_key(2048), "sha1"),
        _kas("rsa2048-sha256", rsa_key(2048), "sha256"),
        _kas("rsa4096-sha256", rsa_key(4096), "sha256"),
        _kas("ec-a", ec.generate_private_key(ec.SECP256R1())),
        _kas("ec-b", ec.generate_private_key(ec.SECP256R1())),
    ]
    return {k.kid: k for k in kases}


KIDS = ["rsa2048-sha1", "rsa2048-sha256", "rsa4096-sha256", "ec-a", "ec-b"]


class KidUnwrapper:
    """Routes each KAO by kid to a PrivateKeyUnwrapper holding that one key with its own OAEP hash.

    (PrivateKeyUnwrapper takes a single OAEP hash for all its keys, so mixed SHA-1/SHA-256 sets are
    grouped here, one unwrapper per key.)
    """

    def __init__(self, kids: list[str]) -> None:
        self.calls: list[str | None] = []
        self._by_kid = {
            kid: PrivateKeyUnwrapper({kid: pool()[kid].private}, oaep_hash=pool()[kid].oaep_hash) for kid in kids
        }

    def __call__(self, kao: KeyAccessObject, policy_b64: str) -> bytes:
        self.calls.append(kao.kid)
        inner = self._by_kid.get(kao.kid or "")
        if inner is None:
            raise KeyNotFoundError(f"no private key for kid {kao.kid!r}")
        return inner(kao, policy_b64)


def tdf_encrypt(plaintext: bytes, splits: list[list[str]], segment_size: int, **kw):
    out = io.BytesIO()
    manifest = encrypt(
        io.BytesIO(plaintext),
        out,
        splits=[[pool()[kid].key for kid in group] for group in splits],
        policy=Policy.create(ATTRS),
        segment_size=segment_size,
        **kw,
    )
    return out.getvalue(), manifest


def tdf_decrypt(tdf: bytes, unwrap) -> bytes:
    out = io.BytesIO()
    decrypt(io.BytesIO(tdf), out, unwrap)
    return out.getvalue()


# --- hypothesis round trips ---------------------------------------------------------------------------
#: Every way to cut 1..3 KAS into splits: one split = anyOf (or single), one KAS per split = allOf, mixed.
PARTITIONS = {
    1: [[[0]]],
    2: [[[0, 1]], [[0], [1]]],
    3: [[[0, 1, 2]], [[0], [1], [2]], [[0, 1], [2]], [[0], [1, 2]]],
}


@st.composite
def tdf_cases(draw):
    segment_size = draw(st.one_of(st.integers(1, 64), st.integers(16, 4096)))
    full_segments = draw(st.integers(0, 4))
    remainder = draw(st.one_of(st.just(0), st.integers(0, segment_size - 1)))  # 0: an exact multiple
    kids = draw(st.lists(st.sampled_from(KIDS), min_size=1, max_size=3, unique=True))
    shape = draw(st.sampled_from(PARTITIONS[len(kids)]))
    splits = [[kids[i] for i in group] for group in shape]
    seed = draw(st.integers(0, 2**32 - 1))
    return segment_size, full_segments * segment_size + remainder, splits, seed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tdf_cases(), data=st.data())
@example(case=(16, 0, [["ec-a"]], 0), data=None)  # 0 bytes
@example(case=(16, 64, [["rsa2048-sha1"], ["ec-a"]], 1), data=None)  # exact multiple, allOf
@example(case=(4096, 4097, [["rsa4096-sha256", "ec-b", "rsa2048-sha1"]], 2), data=None)  # anyOf
@example(case=(1, 3, [["rsa2048-sha256", "ec-a"], ["ec-b"]], 3), data=None)  # mixed, 1-byte segments
def test_round_trip(case, data):
    segment_size, size, splits, seed = case
    plaintext = random.Random(seed).randbytes(size)
    tdf, manifest = tdf_encrypt(plaintext, splits, segment_size, mime_type="text/plain")
    all_kids = [kid for group in splits for kid in group]

    assert tdf_decrypt(tdf, KidUnwrapper(all_kids)) == plaintext

    # -- manifest properties
    assert read_manifest(io.BytesIO(tdf)) == manifest
    assert [i.filename for i in zipfile.ZipFile(io.BytesIO(tdf)).infolist()] == ["0.payload", "0.manifest.json"]
    assert manifest.schema_version == SCHEMA_VERSION and not manifest.is_legacy
    assert manifest.payload.mime_type == "text/plain"
    info = manifest.encryption_information
    kaos = info.key_access
    assert [k.kid for k in kaos] == all_kids
    assert [k.url for k in kaos] == [pool()[kid].key.url for kid in all_kids]
    sids = [k.sid for k in kaos]
    if len(splits) == 1:
        assert sids == [None] * len(kaos)  # single split: no sid
    else:
        by_group, pos = [], 0
        for group in splits:
            by_group.append(set(sids[pos : pos + len(group)]))
            pos += len(group)
        assert all(len(g) == 1 and None not in g for g in by_group)  # alternatives share the sid
        assert len(set().union(*by_group)) == len(splits)  # allOf: distinct sids
    assert list(manifest.key_access_by_split()) == list(dict.fromkeys(k.split_id for k in kaos))
    for kao in kaos:
        binding = base64.b64decode(kao.policy_binding.hash, validate=True)
        assert kao.policy_binding.alg == "HS256"
        assert len(binding) == 64 and bytes.fromhex(binding.decode("ascii"))  # base64(hex(HMAC))
        if kao.kid.startswith("ec"):
            assert kao.type == "ec-wrapped" and "BEGIN PUBLIC KEY" in kao.ephemeral_public_key
        else:
            assert kao.type == "wrapped" and kao.ephemeral_public_key is None
    assert Policy.from_base64(info.policy).attributes == ATTRS
    integrity = info.integrity_information
    assert len(base64.b64decode(integrity.root_signature.sig, validate=True)) == 32  # 4.x: base64(raw HMAC)
    assert integrity.segment_size_default == segment_size
    assert integrity.encrypted_segment_size_default == segment_size + 28
    assert len(integrity.segments) == math.ceil(size / segment_size)  # 0 bytes -> 0 segments
    assert sum(s.segment_size for s in integrity.segments) == size
    assert all(s.encrypted_segment_size == s.segment_size + 28 for s in integrity.segments)
    assert all(s.segment_size == segment_size for s in integrity.segments[:-1])
    assert all(len(base64.b64decode(s.hash, validate=True)) == 16 for s in integrity.segments)

    if data is None:
        return
    # -- any one alternative per split is enough (anyOf)
    chosen = [data.draw(st.sampled_from(group), label="alternative") for group in splits]
    unwrap = KidUnwrapper(chosen)
    assert tdf_decrypt(tdf, unwrap) == plaintext
    assert len(unwrap.calls) >= len(splits)

    # -- a split whose keys are all missing blocks decryption (allOf)
    missing = data.draw(st.integers(0, len(splits) - 1), label="missing split")
    held = [kid for i, group in enumerate(splits) if i != missing for kid in group]
    with pytest.raises(KeyNotFoundError) as excinfo:  # the same failure for every alternative keeps its class
        tdf_decrypt(tdf, KidUnwrapper(held))
    assert excinfo.type is KeyNotFoundError
    if len(splits[missing]) > 1:
        assert "no KAS released split" in excinfo.value.message
        assert all(type(e) is KeyNotFoundError for e in excinfo.value.details["errors"])


def test_all_of_needs_every_share():
    plaintext = b"two nations must agree"
    tdf, _ = tdf_encrypt(plaintext, [["rsa2048-sha1"], ["ec-a"], ["rsa2048-sha256"]], 8)
    assert tdf_decrypt(tdf, KidUnwrapper(["rsa2048-sha1", "ec-a", "rsa2048-sha256"])) == plaintext
    for dropped in ("rsa2048-sha1", "ec-a", "rsa2048-sha256"):
        held = [k for k in ("rsa2048-sha1", "ec-a", "rsa2048-sha256") if k != dropped]
        with pytest.raises(KeyNotFoundError, match=dropped):
            tdf_decrypt(tdf, KidUnwrapper(held))


def test_any_of_tries_alternatives_in_order():
    plaintext = b"either nation may open"
    tdf, _ = tdf_encrypt(plaintext, [["ec-a", "rsa2048-sha1", "ec-b"]], 8)
    unwrap = KidUnwrapper(["ec-b"])
    assert tdf_decrypt(tdf, unwrap) == plaintext
    assert unwrap.calls == ["ec-a", "rsa2048-sha1", "ec-b"]
    unwrap = KidUnwrapper(["ec-a", "ec-b"])
    assert tdf_decrypt(tdf, unwrap) == plaintext
    assert unwrap.calls == ["ec-a"]  # stops at the first success
    with pytest.raises(KeyNotFoundError, match="no KAS released split 0") as excinfo:
        tdf_decrypt(tdf, KidUnwrapper([]))
    assert len(excinfo.value.details["errors"]) == 3


def test_any_of_mixed_failures_is_rewrap_error():
    tdf, _ = tdf_encrypt(b"x", [["ec-a", "rsa2048-sha1"]], 8)
    wrong_key = PrivateKeyUnwrapper({"ec-a": pool()["ec-b"].private})  # ec-a: unwrap fails; rsa: no key
    with pytest.raises(RewrapError, match="no KAS released split 0") as excinfo:
        tdf_decrypt(tdf, wrong_key)
    assert excinfo.type is RewrapError
    assert [type(e) for e in excinfo.value.details["errors"]] == [KeyUnwrapError, KeyNotFoundError]
    assert "https://ec-a.kas.example/kas" in excinfo.value.message


def test_kao_without_kid_uses_default_key():
    kas = pool()["rsa2048-sha1"]
    key = KasKey(url="https://nokid.kas.example/kas", public_key_pem=kas.key.public_key_pem)
    out = io.BytesIO()
    manifest = encrypt(io.BytesIO(b"no kid"), out, splits=[[key]], policy=Policy.create([]))
    assert manifest.encryption_information.key_access[0].kid is None
    assert tdf_decrypt(out.getvalue(), PrivateKeyUnwrapper({None: kas.private})) == b"no kid"
    with pytest.raises(KeyNotFoundError):
        tdf_decrypt(out.getvalue(), PrivateKeyUnwrapper({"other": kas.private}))


def test_wrong_oaep_hash_is_key_unwrap_error():
    kas = pool()["rsa2048-sha256"]
    tdf, _ = tdf_encrypt(b"sha-256 wrapped", [[kas.kid]], 64)
    with pytest.raises(KeyUnwrapError, match="could not be unwrapped"):
        tdf_decrypt(tdf, PrivateKeyUnwrapper({kas.kid: kas.private}, oaep_hash="sha1"))


@pytest.mark.parametrize(("wrapped_for", "held"), [("ec-a", "rsa2048-sha1"), ("rsa2048-sha1", "ec-a")])
def test_key_type_mismatch_is_key_unwrap_error(wrapped_for, held):
    tdf, _ = tdf_encrypt(b"x", [[wrapped_for]], 64)
    with pytest.raises(KeyUnwrapError):
        tdf_decrypt(tdf, PrivateKeyUnwrapper({wrapped_for: pool()[held].private}))


def test_key_of_another_kas_is_key_unwrap_error():
    tdf, _ = tdf_encrypt(b"x", [["ec-a"]], 64)
    with pytest.raises(KeyUnwrapError):
        tdf_decrypt(tdf, PrivateKeyUnwrapper({"ec-a": pool()["ec-b"].private}))


def test_encrypt_rejects_bad_arguments():
    key = pool()["ec-a"].key
    for splits in ([], [[]], [[key], []]):
        with pytest.raises(ValueError, match="at least one KAS"):
            encrypt(io.BytesIO(b""), io.BytesIO(), splits=splits, policy=Policy.create([]))
    for size in (0, -1, 64 * 1024 * 1024 + 1):
        with pytest.raises(ValueError, match="segment size"):
            encrypt(io.BytesIO(b""), io.BytesIO(), splits=[[key]], policy=Policy.create([]), segment_size=size)


def test_each_encryption_uses_fresh_keys_and_nonces():
    plaintext = b"same plaintext" * 10
    a, ma = tdf_encrypt(plaintext, [["ec-a"]], 32)
    b, mb = tdf_encrypt(plaintext, [["ec-a"]], 32)
    ha = [s.hash for s in ma.encryption_information.integrity_information.segments]
    hb = [s.hash for s in mb.encryption_information.integrity_information.segments]
    assert not set(ha) & set(hb)
    assert ma.encryption_information.key_access[0].wrapped_key != mb.encryption_information.key_access[0].wrapped_key
    assert zipfile.ZipFile(io.BytesIO(a)).read("0.payload") != zipfile.ZipFile(io.BytesIO(b)).read("0.payload")


# --- policy model ------------------------------------------------------------------------------------
def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    "encoded",
    [
        pytest.param("", id="empty"),
        pytest.param("!!!not base64!!!", id="not-base64"),
        pytest.param("é", id="non-ascii"),
        pytest.param(_b64(b"\xff\xfe\x00garbage"), id="not-utf8"),
        pytest.param(_b64(b"not json"), id="not-json"),
        pytest.param(_b64(b"[]"), id="json-array"),
        pytest.param(_b64(b"null"), id="json-null"),
        pytest.param(_b64(b'{"body": {}}'), id="no-uuid"),
        pytest.param(_b64(b'{"uuid": 5}'), id="uuid-not-string"),
        pytest.param(_b64(b'{"uuid": "u", "body": {"dataAttributes": "x"}}'), id="attrs-not-list"),
        pytest.param(_b64(b'{"uuid": "u", "body": {"dataAttributes": [{"name": "x"}]}}'), id="attr-no-attribute"),
        pytest.param(_b64(b'{"uuid": "u", "body": {"dissem": [1]}}'), id="dissem-not-strings"),
        pytest.param(_b64(b"[" * 20000), id="deeply-nested"),
        pytest.param("A" * (MAX_POLICY_BYTES + 4), id="too-large"),
    ],
)
def test_policy_from_base64_rejects_garbage(encoded):
    with pytest.raises(PolicyFormatError):
        Policy.from_base64(encoded)


@pytest.mark.parametrize("field", ["dataAttributes", "dissem"])
def test_policy_null_lists_are_empty(field):
    policy = Policy.from_base64(_b64(b'{"uuid": "u-1", "body": {"%s": null}}' % field.encode()))
    assert policy.uuid == "u-1" and policy.attributes == [] and policy.body.dissem == []


def test_policy_without_body_and_with_unknown_fields():
    policy = Policy.from_base64(_b64(b'{"uuid": "u-2", "future": {"x": 1}}'))
    assert policy.attributes == [] and policy.body.dissem == []


def test_policy_url_safe_and_unpadded_base64_accepted():
    raw = b'{"uuid": "u-3", "body": {"dataAttributes": [{"attribute": "https://a/attr/b/value/c?"}]}}'
    for encoded in (base64.urlsafe_b64encode(raw).decode(), _b64(raw).rstrip("=")):
        assert Policy.from_base64(encoded).attributes == ["https://a/attr/b/value/c?"]


@settings(max_examples=40, deadline=None)
@given(
    attributes=st.lists(st.text(min_size=1, max_size=40), max_size=5),
    dissem=st.lists(st.text(max_size=20), max_size=3),
)
def test_policy_round_trip(attributes, dissem):
    policy = Policy.create(attributes, dissem)
    encoded = policy.to_base64()
    base64.b64decode(encoded, validate=True)
    again = Policy.from_base64(encoded)
    assert again == policy
    assert again.attributes == attributes and again.body.dissem == dissem
    assert again.to_base64() == encoded


def test_policy_wire_shape():
    policy = Policy.create(ATTRS[:1], ["usa"])
    assert policy.to_wire() == {
        "uuid": policy.uuid,
        "body": {"dataAttributes": [{"attribute": ATTRS[0]}], "dissem": ["usa"]},
    }
    assert Policy.create([]).uuid != Policy.create([]).uuid


# --- streaming ---------------------------------------------------------------------------------------
class ReadOnly:
    """A source with only ``read`` (no seek/tell), returning at most ``max_read`` bytes per call."""

    def __init__(self, data: bytes, max_read: int | None = None) -> None:
        self._buf = io.BytesIO(data)
        self._max = max_read

    def read(self, n: int = -1) -> bytes:
        if self._max is not None and (n < 0 or n > self._max):
            n = self._max
        return self._buf.read(n)


class WriteOnly:
    """A sink with only ``write`` and ``flush``, like a pipe or a socket."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data) -> int:
        self.chunks.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def getvalue(self) -> bytes:
        return b"".join(self.chunks)


def test_streaming_through_pipes_default_segment_size():
    size = 5 * 1024 * 1024 + 123
    plaintext = random.Random(7).randbytes(size)
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with open(write_fd, "wb", buffering=0) as w:
            view = memoryview(plaintext)
            for pos in range(0, size, 65536):
                w.write(view[pos : pos + 65536])

    feeder = threading.Thread(target=feed)
    feeder.start()
    sink = WriteOnly()
    try:
        with open(read_fd, "rb", buffering=0) as src:  # a real pipe: tell/seek raise ESPIPE, short reads
            manifest = encrypt(src, sink, splits=[[pool()["ec-a"].key]], policy=Policy.create(ATTRS))
    finally:
        feeder.join()
    segments = manifest.encryption_information.integrity_information.segments
    assert [s.segment_size for s in segments] == [
        DEFAULT_SEGMENT_SIZE,
        DEFAULT_SEGMENT_SIZE,
        size - 2 * DEFAULT_SEGMENT_SIZE,
    ]
    tdf = sink.getvalue()
    assert zipfile.ZipFile(io.BytesIO(tdf)).testzip() is None  # data descriptors, zip64: a valid zip
    out = WriteOnly()
    decrypt(io.BytesIO(tdf), out, KidUnwrapper(["ec-a"]))
    assert out.getvalue() == plaintext
    assert max(len(c) for c in out.chunks) <= DEFAULT_SEGMENT_SIZE  # bounded: one segment at a time


def test_streaming_short_reads_keep_full_segments():
    plaintext = random.Random(8).randbytes(10_000)
    sink = WriteOnly()
    manifest = encrypt(
        ReadOnly(plaintext, max_read=7),
        sink,
        splits=[[pool()["ec-b"].key]],
        policy=Policy.create([]),
        segment_size=1000,
    )
    assert [s.segment_size for s in manifest.encryption_information.integrity_information.segments] == [1000] * 10
    assert tdf_decrypt(sink.getvalue(), KidUnwrapper(["ec-b"])) == plaintext


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001])
def test_unseekable_source_and_sink_small_sizes(size):
    plaintext = os.urandom(size)
    sink = WriteOnly()
    encrypt(ReadOnly(plaintext), sink, splits=[[pool()["ec-a"].key]], policy=Policy.create([]), segment_size=1000)
    assert tdf_decrypt(sink.getvalue(), KidUnwrapper(["ec-a"])) == plaintext

"""Streaming encrypt / decrypt of ZTDF (TDF3) zip containers.

Memory stays bounded by one segment (default 2 MiB) whatever the file size: the payload is
written segment by segment into the zip entry, and read back the same way. Every integrity check
that needs no payload (root signature over the manifest's segment hashes, sizes) runs before the
first plaintext byte is written; each segment is authenticated before it is written.
"""

from __future__ import annotations

import base64
import binascii
import io
import zipfile
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag

from kas_ray.errors import (
    FormatError,
    KasRayError,
    ManifestError,
    PayloadIntegrityError,
    RewrapError,
    RootSignatureError,
    SegmentHashError,
)
from kas_ray.hazmat import primitives as P
from kas_ray.ztdf._wire import b64decode_strict
from kas_ray.ztdf.keyaccess import KasKey, wrap_share
from kas_ray.ztdf.manifest import (
    MANIFEST_ENTRY,
    PAYLOAD_ENTRY,
    SCHEMA_VERSION,
    EncryptionInformation,
    IntegrityInformation,
    KeyAccessObject,
    Manifest,
    Payload,
    RootSignature,
    Segment,
)
from kas_ray.ztdf.policy import Policy, decode_mac, verify_binding

DEFAULT_SEGMENT_SIZE = 2 * 1024 * 1024
MAX_SEGMENT_SIZE = 64 * 1024 * 1024
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
SEGMENT_OVERHEAD = P.NONCE_SIZE + P.TAG_SIZE
_ZIP32_LIMIT = 0xFFFFFFFF - (1 << 20)
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_ZIP_UNSUPPORTED_FLAGS = 0x1 | 0x20 | 0x40  # encrypted, compressed patched data, strong encryption
#: What zipfile raises reading a corrupt entry: bad header (name) or CRC, garbled or short deflate stream.
_ZIP_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, UnicodeDecodeError)

#: ``unwrap(kao, policy_b64) -> share``: a KAS rewrap, or a local private key in tools and tests.
Unwrapper = Callable[[KeyAccessObject, str], bytes]


@runtime_checkable
class BatchUnwrapper(Protocol):
    """Unwraps every KAO of a manifest in one go (a home KAS brokering to its peers).

    Returns, in KAO order, the share or the error for each KAO (a KAO not needed may carry an error).
    """

    def unwrap_batch(self, kaos: list[KeyAccessObject], policy_b64: str) -> list[bytes | KasRayError]: ...


def _split_shares(splits: list[list[KasKey]]) -> tuple[bytes, list[bytes]]:
    """One random share per split; the payload key is their XOR (a single split's share is the key)."""
    shares = [P.random_key() for _ in splits]
    payload_key = shares[0]
    for share in shares[1:]:
        payload_key = P.xor_bytes(payload_key, share)
    return payload_key, shares


def _read_chunks(src: BinaryIO, size: int) -> Iterator[bytes]:
    while True:
        chunk = src.read(size)
        while chunk and len(chunk) < size:  # short reads from pipes
            more = src.read(size - len(chunk))
            if not more:
                break
            chunk += more
        if not chunk:
            return
        yield chunk


def _plaintext_size(src: BinaryIO) -> int | None:
    try:
        here = src.tell()
        end = src.seek(0, io.SEEK_END)
        src.seek(here)
        return end - here
    except (OSError, AttributeError, io.UnsupportedOperation):
        return None


def encrypt(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    splits: list[list[KasKey]],
    policy: Policy,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    mime_type: str = "application/octet-stream",
) -> Manifest:
    """Encrypt ``src`` into a ZTDF zip written to ``dst``.

    ``splits`` lists, per key share, the KAS keys it is wrapped to: ``[[usa, fra]]`` is anyOf
    (either KAS can release the key), ``[[usa], [fra]]`` is allOf (both shares are needed).
    """
    if not splits or any(not alternatives for alternatives in splits):
        raise ValueError("every split needs at least one KAS key")
    if not 0 < segment_size <= MAX_SEGMENT_SIZE:
        raise ValueError(f"segment size must be in 1..{MAX_SEGMENT_SIZE}")
    payload_key, shares = _split_shares(splits)
    policy_b64 = policy.to_base64()
    key_access = [
        wrap_share(kas, share, policy_b64, sid=f"s-{index}" if len(splits) > 1 else None)
        for index, (alternatives, share) in enumerate(zip(splits, shares, strict=True))
        for kas in alternatives
    ]

    size = _plaintext_size(src)
    need_zip64 = size is None or size + SEGMENT_OVERHEAD * (size // segment_size + 1) > _ZIP32_LIMIT
    segments: list[Segment] = []
    aggregate = bytearray()
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open(PAYLOAD_ENTRY, "w", force_zip64=need_zip64) as out:
            for chunk in _read_chunks(src, segment_size):
                sealed = P.aes_gcm_encrypt(payload_key, chunk)
                out.write(sealed)
                tag = sealed[-P.TAG_SIZE :]
                aggregate += tag
                segments.append(Segment(hash=base64.b64encode(tag).decode(), segment_size=len(chunk),
                                        encrypted_segment_size=len(sealed)))
        # 4.x: base64 of the raw HMAC (only 3.x manifests hex-encode it; the Go SDK checks this exactly).
        root = base64.b64encode(P.hmac_sha256(payload_key, bytes(aggregate))).decode()
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            payload=Payload(mime_type=mime_type),
            encryption_information=EncryptionInformation(
                key_access=key_access,
                policy=policy_b64,
                integrity_information=IntegrityInformation(
                    root_signature=RootSignature(sig=root),
                    segment_size_default=segment_size,
                    encrypted_segment_size_default=segment_size + SEGMENT_OVERHEAD,
                    segments=segments,
                ),
            ),
        )
        zf.writestr(MANIFEST_ENTRY, manifest.to_json())
    return manifest


# --- reading ------------------------------------------------------------------------------------------
def _open_zip(src: BinaryIO) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(src, "r")
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as exc:  # NotImplemented: zip version
        raise FormatError(f"not a TDF zip container: {exc}") from None


def _entry(zf: zipfile.ZipFile, name: str, error: type[FormatError]) -> zipfile.ZipInfo:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise error(f"{name} is missing") from None
    if info.compress_type not in _ZIP_METHODS or info.flag_bits & _ZIP_UNSUPPORTED_FLAGS:
        raise error(f"{name} is zip-encrypted or uses an unsupported compression method")
    return info


def _read_manifest(zf: zipfile.ZipFile) -> Manifest:
    info = _entry(zf, MANIFEST_ENTRY, ManifestError)
    if info.file_size > MAX_MANIFEST_BYTES:
        raise ManifestError("manifest is too large")
    try:
        with zf.open(info) as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
    except (*_ZIP_READ_ERRORS, OSError, ValueError) as exc:
        raise ManifestError(f"manifest cannot be read: {exc}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError("manifest is too large")
    return Manifest.parse(raw)


def read_manifest(src: BinaryIO) -> Manifest:
    """Parse and structurally check a TDF's manifest without any key."""
    with _open_zip(src) as zf:
        manifest = _read_manifest(zf)
        check_structure(manifest, _payload_size(zf))
        return manifest


def _payload_size(zf: zipfile.ZipFile) -> int:
    return _entry(zf, PAYLOAD_ENTRY, FormatError).file_size


def _segment_sizes(manifest: Manifest) -> list[tuple[int, int]]:
    integrity = manifest.encryption_information.integrity_information
    sizes = []
    for seg in integrity.segments:
        plain = integrity.segment_size_default if seg.segment_size is None else seg.segment_size
        enc = (integrity.encrypted_segment_size_default if seg.encrypted_segment_size is None
               else seg.encrypted_segment_size)
        sizes.append((plain, enc))
    return sizes


def check_structure(manifest: Manifest, payload_size: int) -> None:
    """Everything that can be checked without a key: algorithms, sizes, policy, KAO shapes."""
    info = manifest.encryption_information
    if info.method.algorithm.upper() != "AES-256-GCM":
        raise ManifestError(f"unsupported payload algorithm {info.method.algorithm!r}")
    integrity = info.integrity_information
    if integrity.root_signature.alg.upper() != "HS256":
        raise ManifestError(f"unsupported root signature algorithm {integrity.root_signature.alg!r}")
    if integrity.segment_hash_alg.upper() not in ("GMAC", "HS256"):
        raise ManifestError(f"unsupported segment hash algorithm {integrity.segment_hash_alg!r}")
    sizes = _segment_sizes(manifest)
    for index, (plain, enc) in enumerate(sizes):
        if enc != plain + SEGMENT_OVERHEAD or enc > MAX_SEGMENT_SIZE + SEGMENT_OVERHEAD:
            raise ManifestError(f"segment {index} has inconsistent sizes")
    if sum(enc for _, enc in sizes) != payload_size:
        raise ManifestError("segment sizes do not add up to the payload size")
    Policy.from_base64(info.policy)


def _verify_root_signature(manifest: Manifest, payload_key: bytes) -> None:
    integrity = manifest.encryption_information.integrity_information
    try:
        # The aggregate is the concatenation of the hashes as stored (hex text in legacy TDFs).
        aggregate = b"".join(b64decode_strict(seg.hash) for seg in integrity.segments)
        expected = decode_mac(integrity.root_signature.sig)
    except (binascii.Error, ValueError):
        raise RootSignatureError("root signature or segment hashes are malformed") from None
    if not P.constant_time_equal(P.hmac_sha256(payload_key, aggregate), expected):
        raise RootSignatureError("root signature does not match the segment hashes")


def _segment_mac(manifest: Manifest, payload_key: bytes, sealed: bytes) -> bytes:
    if manifest.encryption_information.integrity_information.segment_hash_alg.upper() == "GMAC":
        return sealed[-P.TAG_SIZE :]
    return P.hmac_sha256(payload_key, sealed)


def unwrap_payload_key(manifest: Manifest, unwrap: Unwrapper | BatchUnwrapper) -> bytes:
    """Obtain one share per split (trying alternatives in order) and XOR them into the payload key.

    A :class:`BatchUnwrapper` (a home KAS brokering every KAO at once) is asked once for all KAOs;
    a plain unwrap callable once per KAO until each split has a share. Every share's policy binding
    is checked here too, so a KAS that returned a share for another policy is caught by the client.
    """
    policy_b64 = manifest.encryption_information.policy
    batch: dict[int, bytes | KasRayError] | None = None
    if isinstance(unwrap, BatchUnwrapper):
        kaos = manifest.encryption_information.key_access
        batch = dict(enumerate(unwrap.unwrap_batch(kaos, policy_b64)))
    index = {id(kao): i for i, kao in enumerate(manifest.encryption_information.key_access)}
    payload_key: bytes | None = None
    for split_id, alternatives in manifest.key_access_by_split().items():
        errors: list[KasRayError] = []
        share: bytes | None = None
        for kao in alternatives:
            try:
                outcome = batch[index[id(kao)]] if batch is not None else unwrap(kao, policy_b64)  # type: ignore[operator]
                if isinstance(outcome, KasRayError):
                    raise outcome
                verify_binding(outcome, policy_b64, kao.policy_binding)
            except KasRayError as exc:
                errors.append(exc)
                continue
            share = outcome  # only a share whose binding verified
            break
        if share is None:
            if len(errors) == 1:
                raise errors[0]
            reasons = "; ".join(f"{kao.url}: {err.message}" for kao, err in zip(alternatives, errors, strict=True))
            # Same failure everywhere (e.g. every KAS denied): keep its class so callers can tell.
            kind = type(errors[0]) if all(type(e) is type(errors[0]) for e in errors) else RewrapError
            raise kind(f"no KAS released split {split_id or '0'}: {reasons}", errors=errors)
        payload_key = share if payload_key is None else P.xor_bytes(payload_key, share)
    assert payload_key is not None  # key_access has min_length=1
    return payload_key


def decrypt(src: BinaryIO, dst: BinaryIO, unwrap: Unwrapper | BatchUnwrapper) -> Manifest:
    """Decrypt a ZTDF from ``src`` to ``dst``; raise a specific :class:`TamperError` on any alteration."""
    with _open_zip(src) as zf:
        manifest = _read_manifest(zf)
        check_structure(manifest, _payload_size(zf))
        payload_key = unwrap_payload_key(manifest, unwrap)
        decrypt_payload(zf, manifest, payload_key, dst)
    return manifest


def decrypt_payload(zf: zipfile.ZipFile, manifest: Manifest, payload_key: bytes, dst: BinaryIO) -> None:
    _verify_root_signature(manifest, payload_key)
    segments = manifest.encryption_information.integrity_information.segments
    try:
        payload = zf.open(PAYLOAD_ENTRY)
    except _ZIP_READ_ERRORS as exc:
        raise PayloadIntegrityError(f"payload entry is corrupt: {exc}") from None
    with payload:
        for index, (segment, (_, enc_size)) in enumerate(zip(segments, _segment_sizes(manifest), strict=True)):
            try:
                sealed = payload.read(enc_size)
            except _ZIP_READ_ERRORS as exc:  # CRC mismatch of the entry: altered bytes
                raise PayloadIntegrityError(f"payload entry is corrupt: {exc}") from None
            if len(sealed) != enc_size:
                raise FormatError(f"payload is truncated at segment {index}")
            try:
                stored = decode_mac(segment.hash, P.TAG_SIZE if _is_gmac(manifest) else 32)
            except (binascii.Error, ValueError):
                raise SegmentHashError(f"segment {index} hash is malformed") from None
            if not P.constant_time_equal(_segment_mac(manifest, payload_key, sealed), stored):
                raise SegmentHashError(f"segment {index} does not match its hash")
            try:
                dst.write(P.aes_gcm_decrypt(payload_key, sealed))
            except InvalidTag:
                raise PayloadIntegrityError(f"segment {index} failed authentication") from None


def _is_gmac(manifest: Manifest) -> bool:
    return manifest.encryption_information.integrity_information.segment_hash_alg.upper() == "GMAC"

"""Narrow exceptions for every failure kas-ray reports.

Each class carries a stable machine-readable ``code`` and the HTTP status a service answers with,
so the CLI, the HTTP layer and the audit log classify failures the same way. Messages never
contain keys, DEKs or tokens.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import urlsplit

#: What an identifier a client chose (a kid, a key access object id, an algorithm name) looks like.
#: Anything else a client sends in such a field is never echoed into an error or the audit: it could be
#: a token pasted into the wrong field.
_SHOWABLE = re.compile(r"[A-Za-z0-9._:/-]{1,64}")


def showable(value: object) -> str | None:
    """``value`` if it may be repeated in errors and audit records; None if it looks like anything else.

    Base64url JSON (``eyJ...``: a JWT, or a policy in the wrong field) is never repeated, whatever its length.
    """
    if not isinstance(value, str) or not _SHOWABLE.fullmatch(value) or "eyJ" in value:
        return None
    return value


def quoted(value: object, what: str) -> str:
    """``value`` quoted for an error message when showable, else a placeholder saying why it is not."""
    shown = showable(value)
    return repr(shown) if shown else f"(not shown: it does not look like {what})"


def showable_url(url: str) -> str | None:
    """``url`` if it is a bounded, printable http(s) URL without base64 JSON in it (see :func:`showable`)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or len(url) > 200 or not url.isprintable() \
            or "eyJ" in url:
        return None
    return url


def audit_id(value: str) -> str:
    """A client-chosen id for the audit: itself when showable, else a digest the client can match."""
    return showable(value) or "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class KasRayError(Exception):
    """Base of every kas-ray error."""

    code: str = "error"
    http_status: int = 400

    def __init__(self, message: str = "", **details: object) -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.details = details

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code

    @property
    def public_message(self) -> str:
        """What a client is told; :attr:`message` goes to the log and the audit (operators)."""
        return self.message


# --- configuration --------------------------------------------------------------------------------
class ConfigError(KasRayError):
    """The configuration is invalid."""

    code = "config_error"
    http_status = 500


# --- format / integrity ---------------------------------------------------------------------------
class KasNotAllowed(ConfigError):
    """A key access object names a KAS the client is not configured to trust: its token is not sent there."""

    code = "kas_not_allowed"


class FormatError(KasRayError):
    """The input is not a well-formed ZTDF/TDF3 object."""

    code = "bad_format"


class ManifestError(FormatError):
    """The manifest is missing, not JSON, or does not match the schema."""

    code = "bad_manifest"


class PolicyFormatError(FormatError):
    """The policy is not base64 JSON of the expected shape."""

    code = "bad_policy"


class TamperError(KasRayError):
    """An integrity check failed: the object was modified or the key is wrong."""

    code = "tampered"


class PolicyBindingError(TamperError):
    """The policy binding does not match the policy and key: the policy or the KAO was altered."""

    code = "policy_binding_mismatch"


class RootSignatureError(TamperError):
    """The root signature does not match the segment hashes."""

    code = "root_signature_mismatch"


class SegmentHashError(TamperError):
    """A segment hash in the manifest does not match the encrypted segment."""

    code = "segment_hash_mismatch"


class PayloadIntegrityError(TamperError):
    """A payload segment failed AES-GCM authentication."""

    code = "payload_tampered"


class KeyUnwrapError(TamperError):
    """A wrapped key could not be unwrapped (wrong key or altered ciphertext)."""

    code = "key_unwrap_failed"


# --- keys -------------------------------------------------------------------------------------------
class KeyNotFoundError(KasRayError):
    """No key with this kid is held by this KAS."""

    code = "unknown_kid"
    http_status = 404  # Connect not_found (a KAO naming an unknown kid is a per-KAO bad request instead)

    @classmethod
    def unknown(cls, kid: str) -> KeyNotFoundError:
        """The error for a kid nobody holds; the kid is named only if it looks like one (see showable)."""
        return cls(f"unknown kid {quoted(kid, 'a kid')}")


class KeyBackendUnavailable(KasRayError):
    """The key backend (HSM, KMS) did not answer in time; retry later."""

    code = "key_backend_unavailable"
    http_status = 503

    @property
    def public_message(self) -> str:
        # The detail names KMS resources, credential and PIN file paths, token labels: for operators only.
        return "the key backend is unavailable; retry later"


# --- trust ------------------------------------------------------------------------------------------
class TokenError(KasRayError):
    """The access token is missing or invalid."""

    code = "invalid_token"
    http_status = 401


class UntrustedIssuerError(TokenError):
    """The token issuer is not in the trust registry."""

    code = "untrusted_issuer"


class DPoPError(TokenError):
    """The DPoP proof is missing or invalid."""

    code = "invalid_dpop_proof"


class ReplayError(DPoPError):
    """A proof or nonce was already used."""

    code = "replay"


class SignedRequestError(KasRayError):
    """The signed request token is malformed, expired or does not verify."""

    code = "invalid_signed_request"


class ReplayStoreUnavailable(KasRayError):
    """The shared replay store is unreachable; the request was not processed (retry later)."""

    code = "replay_store_unavailable"
    http_status = 503

    def __init__(self, message: str = "", *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(KasRayError):
    """Too many requests: slow down and retry after the given time."""

    code = "rate_limited"
    http_status = 429

    def __init__(self, message: str = "", *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- policy -----------------------------------------------------------------------------------------
class AccessDenied(KasRayError):
    """The ABAC policy denies access."""

    code = "forbidden"
    http_status = 403


# --- client side ------------------------------------------------------------------------------------
class KasUnreachableError(KasRayError):
    """A KAS could not be reached."""

    code = "kas_unreachable"
    http_status = 502


class RewrapError(KasRayError):
    """A KAS refused or failed a rewrap for every alternative of a split."""

    code = "rewrap_failed"


def _all_error_classes(cls: type[KasRayError] = KasRayError) -> list[type[KasRayError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_all_error_classes(sub))
    return found


def error_from_code(code: str, message: str) -> KasRayError:
    """Rebuild a kas-ray error from its ``code`` (e.g. across a Ray handle); unknown codes → KasRayError."""
    for cls in _all_error_classes():
        if cls.code == code:
            return cls(message)
    return KasRayError(message)

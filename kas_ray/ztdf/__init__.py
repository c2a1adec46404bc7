"""ZTDF / TDF3 format: manifest, policy, key access objects, streaming payload encryption.

Start with :func:`encrypt` and :func:`decrypt`; ``unwrap`` callables come from
:class:`kas_ray.client` (a KAS rewrap) or :class:`PrivateKeyUnwrapper` (library level).
"""

from kas_ray.ztdf.keyaccess import KasKey, PrivateKeyUnwrapper, wrap_share
from kas_ray.ztdf.manifest import SCHEMA_VERSION, KeyAccessObject, Manifest
from kas_ray.ztdf.policy import AttributeRef, Policy, PolicyBinding, PolicyBody, compute_binding, verify_binding
from kas_ray.ztdf.tdf import (
    DEFAULT_SEGMENT_SIZE,
    BatchUnwrapper,
    Unwrapper,
    decrypt,
    encrypt,
    read_manifest,
    unwrap_payload_key,
)

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "SCHEMA_VERSION",
    "AttributeRef",
    "BatchUnwrapper",
    "KasKey",
    "KeyAccessObject",
    "Manifest",
    "Policy",
    "PolicyBinding",
    "PolicyBody",
    "PrivateKeyUnwrapper",
    "Unwrapper",
    "compute_binding",
    "decrypt",
    "encrypt",
    "read_manifest",
    "unwrap_payload_key",
    "verify_binding",
    "wrap_share",
]

"""Key backends: the only code that uses private keys. Cloud KMS and PKCS#11 are optional extras."""

from kas_ray.keys.base import Health, KeyBackend, KeyInfo
from kas_ray.keys.software import SoftwareKeystore

__all__ = ["Health", "KeyBackend", "KeyInfo", "SoftwareKeystore"]

"""ABAC policy engine: ACP-240 labels as OpenTDF attribute FQNs (see docs/abac.md)."""

from kas_ray.policy.abac import Check, Decision, PolicyEngine, Subject
from kas_ray.policy.attributes import attribute_fqn, parse_fqn

__all__ = ["Check", "Decision", "PolicyEngine", "Subject", "attribute_fqn", "parse_fqn"]

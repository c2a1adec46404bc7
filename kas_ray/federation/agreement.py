"""Agreement caps: what a nation serves for requests another nation brokers to it."""

from __future__ import annotations

from kas_ray.config import AgreementConfig, normalize_label
from kas_ray.errors import ConfigError, KasRayError
from kas_ray.policy import Check, Decision, PolicyEngine, Subject
from kas_ray.policy.attributes import parse_fqn


def clearance_levels(engine: PolicyEngine) -> list[str]:
    """The clearance values of the ABAC configuration, lowest first (normalised labels)."""
    return [normalize_label(v) for d in engine.config.attributes.values() if d.subject == "clearance"
            for v in d.values]


def check_agreement(engine: PolicyEngine, agreement: AgreementConfig, peer: str) -> None:
    """Refuse, at start, a classification cap that is not a clearance level: a misspelt cap must not
    read as "no cap"."""
    cap, levels = agreement.max_classification, clearance_levels(engine)
    if cap is not None and normalize_label(cap) not in levels:
        raise ConfigError(f"the agreement with {peer} caps classification at {cap!r}, which is not a "
                          f"clearance level of the ABAC configuration ({', '.join(levels)})")


def apply_agreement(engine: PolicyEngine, decision: Decision, agreement: AgreementConfig, subject: Subject,
                    attributes: list[str], forwarder: str) -> Decision:
    """``decision`` with one more check, ``agreement``; a failed cap denies (fail closed)."""
    reasons: list[str] = []
    if agreement.nations is not None:
        allowed = {normalize_label(n) for n in agreement.nations}
        if (subject.nationality or "") not in allowed:
            reasons.append(f"the agreement with {forwarder} does not cover subjects of {subject.nationality}")
    if agreement.max_classification is not None or agreement.cois is not None:
        levels = clearance_levels(engine)
        cap = normalize_label(agreement.max_classification) if agreement.max_classification else None
        if cap is not None and cap not in levels:  # refused at start (check_agreement); fail closed anyway
            reasons.append(f"the agreement with {forwarder} caps classification at an unknown level")
        allowed_cois = {normalize_label(c) for c in agreement.cois} if agreement.cois is not None else None
        for fqn in attributes:
            try:
                name, value = parse_fqn(engine.config, fqn)
            except KasRayError:
                continue  # the ABAC decision already denies malformed attributes
            definition = engine.config.attributes.get(name)
            if definition is None:
                continue
            if definition.subject == "clearance" and cap is not None and value in levels and cap in levels \
                    and levels.index(value) > levels.index(cap):
                reasons.append(f"the agreement with {forwarder} caps classification at {cap}, object is {value}")
            if definition.subject == "coi" and allowed_cois is not None and value not in allowed_cois:
                reasons.append(f"the agreement with {forwarder} does not cover COI {value}")
    passed = not reasons
    check = Check(rule="agreement", passed=passed,
                  reason="; ".join(reasons) if reasons else f"within the agreement with {forwarder}")
    return Decision(allowed=decision.allowed and passed, checks=[*decision.checks, check])

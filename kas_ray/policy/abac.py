"""ACP-240 ABAC decisions over OpenTDF attribute FQNs.

:class:`PolicyEngine` compares a :class:`Subject` (built by the integrator from a verified token)
with the data attributes and ``dissem`` list of a ZTDF policy and returns a :class:`Decision` that
lists every check, passed or failed, so the audit log records every reason. Bad policy content
never raises: it is a denial with a reason (fail closed).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kas_ray.config import NATO_LEVELS, AbacConfig, RuleType, normalize_label
from kas_ray.errors import AccessDenied
from kas_ray.policy.attributes import (
    AttributeCatalog,
    CompiledAttribute,
    FqnProblem,
    ProblemKind,
    format_embargo,
    show_fqn,
)

__all__ = ["Check", "Decision", "PolicyEngine", "Subject"]

#: Clearance table used when the subject's clearance system has none.
FALLBACK_CLEARANCE_SYSTEM = "NATO"
#: Level a subject without a (recognised) clearance holds, if the hierarchy has it.
NO_CLEARANCE_LEVEL = NATO_LEVELS[0]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Subject(_Frozen):
    """The requesting entity's attributes, as asserted by a verified token.

    Nation codes and COI names are stored in ``normalize_label`` form; ``clearance`` keeps the raw
    national name (shown in reasons) and is normalised at decision time.
    """

    subject: str = Field(description="subject id (token `sub`)")
    issuer: str = Field(description="token issuer")
    clearance: str | None = Field(default=None, description="national clearance name, e.g. SECRET_DEFENSE")
    clearance_system: str = Field(
        default=FALLBACK_CLEARANCE_SYSTEM, description="nation whose clearance table applies"
    )
    nationality: str | None = None
    coi: list[str] = Field(default_factory=list)
    issuer_nations: list[str] = Field(default_factory=list, description="nations the issuer may assert")

    @field_validator("clearance")
    @classmethod
    def _strip(cls, value: str | None) -> str | None:
        value = value.strip() if value is not None else None
        return value or None

    @field_validator("clearance_system")
    @classmethod
    def _system(cls, value: str) -> str:
        return value.strip().upper() or FALLBACK_CLEARANCE_SYSTEM

    @field_validator("nationality")
    @classmethod
    def _nation(cls, value: str | None) -> str | None:
        return (normalize_label(value) or None) if value is not None else None

    @field_validator("coi", "issuer_nations")
    @classmethod
    def _labels(cls, values: list[str]) -> list[str]:
        return [label for label in dict.fromkeys(normalize_label(v) for v in values) if label]


class Check(_Frozen):
    """One rule evaluation: ``rule`` is the attribute name or one of ``attribute``, ``required``,
    ``embargo``, ``issuer-nation``, ``dissem``; ``reason`` is for humans and holds no secrets."""

    rule: str
    passed: bool
    reason: str


class Decision(_Frozen):
    allowed: bool
    checks: list[Check] = Field(default_factory=list)

    @model_validator(mode="after")
    def _allowed_means_all_passed(self) -> Decision:
        if self.allowed and not all(c.passed for c in self.checks):
            raise ValueError("a decision with a failed check cannot allow")
        return self

    @property
    def reasons(self) -> list[str]:
        """Reasons of the failed checks."""
        return [c.reason for c in self.checks if not c.passed]

    def raise_for_denial(self) -> None:
        """Raise :class:`AccessDenied` summarising every failed check if access is denied."""
        if self.allowed:
            return
        reasons = self.reasons or ["no access check applied to this object"]
        raise AccessDenied("access denied: " + "; ".join(reasons), reasons=reasons)


def _fold(name: str) -> str:
    """``SECRET_DÉFENSE`` -> ``SECRET_DEFENSE``: national markings are often written with accents."""
    decomposed = unicodedata.normalize("NFKD", name)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _clearance_table(names: dict[str, str]) -> dict[str, str]:
    """A table keyed by normalised names plus their accent-free forms (ambiguous forms dropped)."""
    table = dict(names)
    folded: dict[str, set[str]] = {}
    for name, level in names.items():
        folded.setdefault(_fold(name), set()).add(level)
    for name, levels in folded.items():
        if name not in table and len(levels) == 1:
            table[name] = next(iter(levels))
    return table


def _fmt(values: Iterable[object]) -> str:
    return "[" + ", ".join(sorted(str(v) for v in values)) + "]"


class PolicyEngine:
    """ABAC decisions for one :class:`AbacConfig`; lookups are compiled here, once."""

    def __init__(self, config: AbacConfig) -> None:
        self.config = config
        self.catalog = AttributeCatalog(config)
        self._tables: dict[str, dict[str, str]] = {
            nation.upper(): _clearance_table(names) for nation, names in config.clearance_equivalence.items()
        }
        self._attribute_order = {name: i for i, name in enumerate(self.catalog.attributes)}
        self._resolve_clearance = lru_cache(maxsize=1024)(self._resolve_clearance_uncached)

    # --- subject side ----------------------------------------------------------------------------
    def _resolve_clearance_uncached(self, system: str, raw: str | None) -> tuple[str | None, str]:
        """``(NATO level or None, description for reasons)``."""
        if raw is None:
            return None, "no clearance"
        name = normalize_label(raw)
        table, used = self._tables.get(system), system
        if table is None:
            table, used = self._tables.get(FALLBACK_CLEARANCE_SYSTEM), FALLBACK_CLEARANCE_SYSTEM
        level = (table.get(name) or table.get(_fold(name))) if table is not None else None
        note = "" if used == system else f"; no {system} table, {used} table used"
        if level is None:
            return None, f"no clearance ({system} clearance {name!r} is unknown to the {used} table{note})"
        return level, f"clearance {level} ({system} {name}{note})"

    def clearance_level(self, subject: Subject) -> str | None:
        """The subject's NATO level, or ``None`` when it has no clearance this KAS recognises."""
        return self._resolve_clearance(subject.clearance_system, subject.clearance)[0]

    # --- decisions -------------------------------------------------------------------------------
    def decide(
        self,
        subject: Subject,
        data_attributes: Sequence[str],
        dissem: Sequence[str] = (),
        *,
        now: datetime | None = None,
    ) -> Decision:
        """Evaluate every rule (no short-circuit) and return the decision with all checks."""
        if now is None:
            now = datetime.now(UTC)
        elif now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("now must be timezone-aware")
        checks: list[Check] = []
        fail = checks.append

        # 1. parse the policy's data attributes (malformed content -> failed "attribute" checks)
        present: dict[str, set[str]] = {}
        embargoes: list[datetime] = []
        if isinstance(data_attributes, (list, tuple)):
            items: Sequence[object] = data_attributes
        else:
            items = ()
            fail(Check(rule="attribute", passed=False, reason="policy dataAttributes is not a list"))
        parse = self.catalog.parse
        for fqn in items:
            if not isinstance(fqn, str):
                fail(Check(rule="attribute", passed=False, reason=f"malformed attribute FQN {show_fqn(fqn)}"))
                continue
            result = parse(fqn)
            if isinstance(result, FqnProblem):
                rule = "embargo" if result.kind is ProblemKind.MALFORMED_EMBARGO else "attribute"
                fail(Check(rule=rule, passed=False, reason=result.reason))
            elif result.embargo_at is not None:
                embargoes.append(result.embargo_at)
            else:
                present.setdefault(result.name, set()).add(result.value)

        # 2. the issuer may only assert the nations the trust registry allows it
        if subject.nationality is not None:
            ok = subject.nationality in subject.issuer_nations
            checks.append(Check(
                rule="issuer-nation",
                passed=ok,
                reason=(f"issuer may assert nationality {subject.nationality}" if ok else
                        f"issuer {subject.issuer!r} may not assert nationality {subject.nationality} "
                        f"(allowed: {_fmt(subject.issuer_nations) if subject.issuer_nations else 'none'})"),
            ))

        # 3. required attributes
        for name in self.catalog.required:
            if name not in present:
                nation = self.catalog.attributes[name].subject == "nationality"
                extra = " (no releasability)" if nation else ""
                fail(Check(rule="required", passed=False,
                           reason=f"required attribute {name} is missing from the policy{extra}"))

        # 4. one check per attribute the object carries, in configuration order
        for name in sorted(present, key=self._attribute_order.__getitem__):
            checks.append(self._check_attribute(self.catalog.attributes[name], present[name], subject))

        # 5. embargo: every not-before time must have passed
        if embargoes:
            until = max(embargoes)
            ok = now >= until
            checks.append(Check(
                rule="embargo",
                passed=ok,
                reason=(f"embargo until {format_embargo(until)} has passed" if ok else
                        f"embargoed until {format_embargo(until)}"),
            ))

        # 6. dissem: a non-empty list restricts access to the listed entities
        checks.extend(self._check_dissem(subject, dissem))

        allowed = all(c.passed for c in checks) and (bool(checks) or not self.catalog.required)
        return Decision(allowed=allowed, checks=checks)

    # --- rules -----------------------------------------------------------------------------------
    def _subject_values(self, field: str, subject: Subject) -> tuple[set[str], str]:
        if field == "clearance":
            level, desc = self._resolve_clearance(subject.clearance_system, subject.clearance)
            return ({level} if level else set()), desc
        if field == "nationality":
            nat = subject.nationality
            return ({nat} if nat else set()), (f"nationality {nat}" if nat else "no nationality")
        coi = set(subject.coi)
        return coi, (f"COI {_fmt(coi)}" if coi else "no COI")

    def _check_attribute(self, attr: CompiledAttribute, values: set[str], subject: Subject) -> Check:
        have, desc = self._subject_values(attr.subject, subject)
        name = attr.name
        if attr.rule is RuleType.HIERARCHY:
            ranks = attr.ranks
            needed = max(values, key=ranks.__getitem__)
            shown = needed if len(values) == 1 else f"{needed} (highest of {_fmt(values)})"
            if have:
                rank = max(ranks.get(v, -1) for v in have)
            elif attr.subject == "clearance":
                rank = ranks.get(NO_CLEARANCE_LEVEL, -1)
            else:
                rank = -1
            ok = rank >= ranks[needed]
            if ok and not have:
                return Check(rule=name, passed=True, reason=f"{desc}; {shown} requires none")
            verb = "dominates" if ok else "does not dominate"
            return Check(rule=name, passed=ok, reason=f"{desc} {verb} {name} {shown}")
        if attr.rule is RuleType.ANY_OF:
            ok = not have.isdisjoint(values)
            if not have:
                return Check(rule=name, passed=False,
                             reason=f"subject has {desc}; object is {name} {_fmt(values)}")
            verb = "is in" if ok else "is not in"
            return Check(rule=name, passed=ok, reason=f"{desc} {verb} {name} {_fmt(values)}")
        missing = values - have
        if not have:
            return Check(rule=name, passed=False,
                         reason=f"subject has {desc}; object requires all of {name} {_fmt(values)}")
        if missing:
            return Check(rule=name, passed=False,
                         reason=f"{desc} lacks {_fmt(missing)} of required {name} {_fmt(values)}")
        return Check(rule=name, passed=True, reason=f"{desc} holds all of {name} {_fmt(values)}")

    @staticmethod
    def _check_dissem(subject: Subject, dissem: object) -> list[Check]:
        if dissem is None:
            return []
        if not isinstance(dissem, (list, tuple)):
            return [Check(rule="dissem", passed=False, reason="policy dissem is not a list")]
        if not dissem:
            return []
        if not all(isinstance(entry, str) for entry in dissem):
            return [Check(rule="dissem", passed=False, reason="policy dissem holds a non-string entry")]
        listed = subject.subject in {entry.strip() for entry in dissem}
        count = f"{len(dissem)} entit{'y' if len(dissem) == 1 else 'ies'}"
        return [Check(rule="dissem", passed=listed,
                      reason=(f"subject is on the dissem list ({count})" if listed else
                              f"subject is not on the dissem list ({count})"))]

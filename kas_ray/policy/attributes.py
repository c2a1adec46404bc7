"""OpenTDF attribute FQNs for ACP-240 labels: ``https://{namespace}/attr/{name}/value/{value}``.

Parsing is case-insensitive for the scheme, the namespace (a DNS name), the literal ``attr`` and
``value`` segments and the attribute name. Values are percent-decoded once and then compared in
canonical form:

* label values (classification, releasable-to, coi, custom attributes) through
  :func:`kas_ray.config.normalize_label` (``top-secret``, ``TOP_SECRET`` and ``Top Secret`` are one
  value; nation codes become upper case);
* embargo values as an ISO-8601 time with an explicit offset (``2026-12-01T00:00:00Z``), converted
  to UTC; a time without offset is malformed.

:func:`attribute_fqn` writes what the OpenTDF platform writes: lower-case namespace, name and
label value (``.../attr/classification/value/top_secret``), every value percent-encoded (an embargo
is written ``.../attr/embargo/value/2026-12-01T00%3A00%3A00Z``).

:class:`AttributeCatalog` is the compiled form of an :class:`~kas_ray.config.AbacConfig` used on the
hot path; it reports problems as values (:class:`FqnProblem`), never by raising.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import lru_cache
from urllib.parse import quote, unquote

from kas_ray.config import AbacConfig, RuleType, SubjectField, normalize_label
from kas_ray.errors import PolicyFormatError

__all__ = [
    "AttributeCatalog",
    "CompiledAttribute",
    "FqnProblem",
    "ParsedAttribute",
    "ProblemKind",
    "attribute_fqn",
    "format_embargo",
    "parse_embargo",
    "parse_fqn",
    "show_fqn",
]

#: Longest FQN accepted (policy content is attacker-influenced; keep parsing and caches bounded).
MAX_FQN_LENGTH = 2048
_SHOW_LENGTH = 160

_FQN_RE = re.compile(
    r"(?i:https)://(?P<ns>[^/?#\s]+)/(?i:attr)/(?P<name>[^/?#\s]+)/(?i:value)/(?P<value>[^/?#\s]+)"
)
_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_NAMESPACE_RE = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*(?::\d{{1,5}})?")
_NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9_-]*[a-z0-9])?")
_BAD_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
#: A label value after normalize_label: word characters (Unicode letters, digits, ``_``) and dots.
_LABEL_RE = re.compile(r"[^\W_](?:[\w.]*[^\W_])?")


class ProblemKind(StrEnum):
    MALFORMED = "malformed"
    FOREIGN_NAMESPACE = "foreign-namespace"
    UNKNOWN_ATTRIBUTE = "unknown-attribute"
    VALUE_NOT_ALLOWED = "value-not-allowed"
    MALFORMED_EMBARGO = "malformed-embargo"


@dataclass(frozen=True, slots=True)
class FqnProblem:
    kind: ProblemKind
    reason: str


@dataclass(frozen=True, slots=True)
class ParsedAttribute:
    """A recognised FQN: canonical attribute name and value (``embargo_at`` set for the embargo)."""

    name: str
    value: str
    embargo_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class CompiledAttribute:
    """An attribute definition in lookup form: canonical values, ranks for a hierarchy."""

    name: str
    rule: RuleType
    subject: SubjectField
    values: tuple[str, ...]
    ranks: dict[str, int]
    closed: bool


def show_fqn(fqn: object) -> str:
    """Printable, bounded form of untrusted policy content for reasons and logs."""
    text = fqn if isinstance(fqn, str) else f"<{type(fqn).__name__}>"
    if len(text) > _SHOW_LENGTH:
        text = text[:_SHOW_LENGTH] + "..."
    return repr(text)


def parse_embargo(value: str) -> datetime | None:
    """An ISO-8601 time with an explicit offset, as an aware UTC datetime; ``None`` if malformed."""
    text = value.strip().upper()
    if not text or not text[0].isdigit():
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None or moment.utcoffset() is None:
        return None
    try:
        return moment.astimezone(UTC)
    except (OverflowError, OSError):  # e.g. 0001-01-01T00:00:00+14:00 lies before datetime.min in UTC
        return None


def format_embargo(moment: datetime) -> str:
    """Canonical embargo value: UTC, seconds precision dropped only when zero, ``Z`` suffix."""
    if moment.tzinfo is None:
        raise ValueError("an embargo time must be timezone-aware (UTC)")
    moment = moment.astimezone(UTC)
    spec = "seconds" if moment.microsecond == 0 else "microseconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


class AttributeCatalog:
    """Lookup tables compiled once from an :class:`AbacConfig`; :meth:`parse` is cached."""

    def __init__(self, config: AbacConfig, *, cache_size: int = 4096) -> None:
        self.config = config
        self.namespace = config.namespace.strip().lower()
        self.embargo_name = config.embargo_attribute.strip().lower()
        attributes: dict[str, CompiledAttribute] = {}
        for raw_name, definition in config.attributes.items():
            name = raw_name.strip().lower()
            values = tuple(dict.fromkeys(normalize_label(v) for v in definition.values))
            attributes[name] = CompiledAttribute(
                name=name,
                rule=definition.rule,
                subject=definition.subject,
                values=values,
                ranks={v: i for i, v in enumerate(values)},
                closed=bool(values),
            )
        self.attributes = attributes
        self.required = tuple(dict.fromkeys(r.strip().lower() for r in config.required))
        self.parse = lru_cache(maxsize=cache_size)(self._parse)

    def attribute_prefix(self, name: str) -> str:
        return f"https://{self.namespace}/attr/{name}"

    def _parse(self, fqn: str) -> ParsedAttribute | FqnProblem:
        shown = show_fqn(fqn)
        if len(fqn) > MAX_FQN_LENGTH:
            return FqnProblem(ProblemKind.MALFORMED, f"malformed attribute FQN {shown}: too long")
        match = _FQN_RE.fullmatch(fqn.strip())
        if match is None:
            return FqnProblem(
                ProblemKind.MALFORMED,
                f"malformed attribute FQN {shown}: expected https://<namespace>/attr/<name>/value/<value>",
            )
        namespace, name, raw_value = match["ns"].lower(), match["name"].lower(), match["value"]
        if not _NAMESPACE_RE.fullmatch(namespace):
            return FqnProblem(ProblemKind.MALFORMED, f"malformed attribute FQN {shown}: bad namespace")
        if namespace != self.namespace:
            return FqnProblem(
                ProblemKind.FOREIGN_NAMESPACE,
                f"attribute {shown} is in foreign namespace {namespace!r} (this KAS: {self.namespace!r})",
            )
        if not _NAME_RE.fullmatch(name):
            return FqnProblem(ProblemKind.MALFORMED, f"malformed attribute FQN {shown}: bad attribute name")
        if _BAD_PERCENT_RE.search(raw_value):
            return FqnProblem(ProblemKind.MALFORMED, f"malformed attribute FQN {shown}: bad percent-encoding")
        try:
            value = unquote(raw_value, errors="strict")
        except UnicodeDecodeError:
            return FqnProblem(ProblemKind.MALFORMED, f"malformed attribute FQN {shown}: value is not UTF-8")
        if name == self.embargo_name:
            moment = parse_embargo(value)
            if moment is None:
                return FqnProblem(
                    ProblemKind.MALFORMED_EMBARGO,
                    f"malformed embargo {shown}: expected an ISO-8601 UTC time such as 2026-12-01T00:00:00Z",
                )
            return ParsedAttribute(name=name, value=format_embargo(moment), embargo_at=moment)
        definition = self.attributes.get(name)
        if definition is None:
            return FqnProblem(ProblemKind.UNKNOWN_ATTRIBUTE, f"unknown attribute {name!r} in {shown}")
        label = normalize_label(value)
        if not _LABEL_RE.fullmatch(label):
            return FqnProblem(ProblemKind.MALFORMED, f"malformed attribute FQN {shown}: bad value")
        if definition.closed and label not in definition.ranks:
            return FqnProblem(
                ProblemKind.VALUE_NOT_ALLOWED,
                f"value {label!r} of {shown} is not one of the {name} values {list(definition.values)}",
            )
        return ParsedAttribute(name=name, value=label)

    def build(self, name: str, value: str | datetime) -> str:
        key = name.strip().lower()
        if key == self.embargo_name:
            if isinstance(value, datetime):
                text = format_embargo(value)
            else:
                moment = parse_embargo(value)
                if moment is None:
                    raise PolicyFormatError(f"embargo {value!r} is not an ISO-8601 UTC time")
                text = format_embargo(moment)
            return f"{self.attribute_prefix(key)}/value/{quote(text, safe='')}"
        definition = self.attributes.get(key)
        if definition is None:
            raise PolicyFormatError(f"unknown attribute {name!r}")
        if not isinstance(value, str):
            raise PolicyFormatError(f"attribute {key} takes a string value")
        label = normalize_label(value)
        if not _LABEL_RE.fullmatch(label):
            raise PolicyFormatError(f"bad value {value!r} for attribute {key}")
        if definition.closed and label not in definition.ranks:
            allowed = list(definition.values)
            raise PolicyFormatError(f"value {label!r} is not one of the {key} values {allowed}")
        return f"{self.attribute_prefix(key)}/value/{quote(label.lower(), safe='')}"


def attribute_fqn(config: AbacConfig, name: str, value: str | datetime) -> str:
    """The FQN for ``name``/``value`` as OpenTDF writes it (lower case, value percent-encoded).

    ``value`` is validated against the configuration (closed value lists, embargo time format);
    an embargo accepts an aware :class:`~datetime.datetime`. Raises :class:`PolicyFormatError`.
    """
    return AttributeCatalog(config, cache_size=0).build(name, value)


def parse_fqn(config: AbacConfig, fqn: str) -> tuple[str, str]:
    """``(name, value)`` of an FQN this configuration understands, both canonical.

    ``name`` is lower case; ``value`` is ``normalize_label`` form (``TOP_SECRET``, ``USA``) or, for
    the embargo attribute, the UTC time as ``YYYY-MM-DDTHH:MM:SSZ``. Raises
    :class:`PolicyFormatError` for a malformed FQN, a foreign namespace, an unknown attribute, a
    value outside a closed value list or a malformed embargo time.
    """
    if not isinstance(fqn, str):
        raise PolicyFormatError(f"attribute FQN must be a string, not {type(fqn).__name__}")
    result = AttributeCatalog(config, cache_size=0).parse(fqn)
    if isinstance(result, FqnProblem):
        raise PolicyFormatError(result.reason, kind=result.kind.value)
    return result.name, result.value

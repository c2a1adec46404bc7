"""ABAC policy engine: ACP-240 labels as OpenTDF attribute FQNs (kas_ray.policy)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kas_ray.config import NATO_LEVELS, AbacConfig, AttributeDefinition, RuleType, load_yaml
from kas_ray.errors import AccessDenied, ConfigError, PolicyFormatError
from kas_ray.policy import Check, Decision, PolicyEngine, Subject, attribute_fqn, parse_fqn

NS = "acp240.nato.int"
CFG = AbacConfig()
ENGINE = PolicyEngine(CFG)
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def fqn(name: str, value: str, ns: str = NS) -> str:
    return f"https://{ns}/attr/{name}/value/{value}"


def cls(level: str) -> str:
    return fqn("classification", level)


def rel(*nations: str) -> list[str]:
    return [fqn("releasable-to", n) for n in nations]


def coi(*communities: str) -> list[str]:
    return [fqn("coi", c) for c in communities]


def embargo(value: str) -> str:
    return fqn("embargo", value)


def subject(**overrides: object) -> Subject:
    fields: dict[str, object] = {
        "subject": "alice@defense.gouv.fr",
        "issuer": "https://idp.defense.gouv.fr",
        "clearance": "SECRET_DEFENSE",
        "clearance_system": "FRA",
        "nationality": "FRA",
        "coi": [],
        "issuer_nations": ["FRA"],
    }
    fields.update(overrides)
    return Subject(**fields)


def decide(subj: Subject, labels: list[str], dissem: list[str] | None = None,
           engine: PolicyEngine = ENGINE) -> Decision:
    return engine.decide(subj, labels, dissem or [], now=NOW)


# --- clearance equivalence --------------------------------------------------------------------------
#: Expected mapping, written out independently of config.py (nation, national name, NATO level).
EQUIVALENCES = [
    ("NATO", "UNCLASSIFIED", "UNCLASSIFIED"), ("NATO", "RESTRICTED", "RESTRICTED"),
    ("NATO", "CONFIDENTIAL", "CONFIDENTIAL"), ("NATO", "SECRET", "SECRET"),
    ("NATO", "TOP_SECRET", "TOP_SECRET"),
    ("NATO", "NATO_UNCLASSIFIED", "UNCLASSIFIED"), ("NATO", "NATO_RESTRICTED", "RESTRICTED"),
    ("NATO", "NATO_CONFIDENTIAL", "CONFIDENTIAL"), ("NATO", "NATO_SECRET", "SECRET"),
    ("NATO", "COSMIC_TOP_SECRET", "TOP_SECRET"),
    ("USA", "UNCLASSIFIED", "UNCLASSIFIED"), ("USA", "CONFIDENTIAL", "CONFIDENTIAL"),
    ("USA", "SECRET", "SECRET"), ("USA", "TOP_SECRET", "TOP_SECRET"),
    ("FRA", "NON_PROTEGE", "UNCLASSIFIED"), ("FRA", "DIFFUSION_RESTREINTE", "RESTRICTED"),
    ("FRA", "CONFIDENTIEL_DEFENSE", "CONFIDENTIAL"), ("FRA", "SECRET_DEFENSE", "SECRET"),
    ("FRA", "SECRET", "SECRET"), ("FRA", "TRES_SECRET_DEFENSE", "TOP_SECRET"),
    ("FRA", "TRES_SECRET", "TOP_SECRET"),
    ("GBR", "OFFICIAL", "UNCLASSIFIED"), ("GBR", "OFFICIAL_SENSITIVE", "RESTRICTED"),
    ("GBR", "RESTRICTED", "RESTRICTED"), ("GBR", "CONFIDENTIAL", "CONFIDENTIAL"), ("GBR", "SECRET", "SECRET"),
    ("GBR", "TOP_SECRET", "TOP_SECRET"), ("GBR", "UK_SECRET", "SECRET"),
    ("GBR", "UK_TOP_SECRET", "TOP_SECRET"),
]


def test_equivalence_table_is_fully_covered() -> None:
    table = CFG.clearance_equivalence
    configured = {(n, name, lvl) for n, names in table.items() for name, lvl in names.items()}
    assert configured == set(EQUIVALENCES)


@pytest.mark.parametrize(("nation", "name", "level"), EQUIVALENCES,
                         ids=[f"{n}-{name}->{lvl}" for n, name, lvl in EQUIVALENCES])
def test_national_clearance_maps_to_nato_level(nation: str, name: str, level: str) -> None:
    subj = subject(clearance=name, clearance_system=nation, nationality=nation, issuer_nations=[nation])
    assert ENGINE.clearance_level(subj) == level
    rank = NATO_LEVELS.index(level)
    at_level = decide(subj, [cls(level.lower()), *rel(nation)])
    assert at_level.allowed, at_level.reasons
    assert f"clearance {level} ({nation} {name})" in at_level.checks[1].reason
    if rank + 1 < len(NATO_LEVELS):
        above = decide(subj, [cls(NATO_LEVELS[rank + 1]), *rel(nation)])
        assert not above.allowed
        assert [c.rule for c in above.checks if not c.passed] == ["classification"]


@pytest.mark.parametrize(("system", "raw", "level"), [
    ("FRA", "secret défense", "SECRET"),
    ("FRA", "Très Secret Défense", "TOP_SECRET"),
    ("fra", "confidentiel-defense", "CONFIDENTIAL"),
    ("GBR", "official sensitive", "RESTRICTED"),
    ("DEU", "NATO SECRET", "SECRET"),          # no DEU table: NATO table
    ("DEU", "GEHEIM", None),                   # no DEU table and not a NATO name
    ("USA", "NATO_SECRET", None),              # NATO name unknown to the USA table
    ("FRA", "TOP_SECRET", None),               # not a French marking
    ("GBR", "", None),
], ids=["fr-accents", "fr-accents-top", "lower-hyphen", "gbr-space", "fallback-nato", "fallback-unknown",
        "usa-no-nato-names", "fra-no-us-names", "empty"])
def test_clearance_normalisation(system: str, raw: str, level: str | None) -> None:
    assert ENGINE.clearance_level(subject(clearance=raw, clearance_system=system)) == level


# --- rules --------------------------------------------------------------------------------------------
# (id, subject overrides, labels, dissem, allowed, failed rules, substring of a failed/first reason)
RULE_CASES = [
    # hierarchy
    ("hierarchy-equal", {}, [cls("secret"), *rel("FRA")], [], True, [], "dominates classification SECRET"),
    ("hierarchy-higher", {}, [cls("confidential"), *rel("FRA")], [], True, [],
     "clearance SECRET (FRA SECRET_DEFENSE) dominates classification CONFIDENTIAL"),
    ("hierarchy-lower", {}, [cls("top_secret"), *rel("FRA")], [], False, ["classification"],
     "does not dominate classification TOP_SECRET"),
    ("hierarchy-multi-highest-applies", {}, [cls("confidential"), cls("top-secret"), *rel("FRA")], [], False,
     ["classification"], "TOP_SECRET (highest of [CONFIDENTIAL, TOP_SECRET])"),
    ("hierarchy-multi-all-dominated", {}, [cls("restricted"), cls("secret"), *rel("FRA")], [], True, [],
     "SECRET (highest of"),
    ("no-clearance-classified", {"clearance": None}, [cls("restricted"), *rel("FRA")], [], False,
     ["classification"], "no clearance does not dominate"),
    ("no-clearance-unclassified", {"clearance": None}, [cls("unclassified"), *rel("FRA")], [], True, [],
     "UNCLASSIFIED requires none"),
    ("unknown-clearance-name", {"clearance": "ULTRA"}, [cls("confidential"), *rel("FRA")], [], False,
     ["classification"], "'ULTRA' is unknown to the FRA table"),
    ("foreign-name-in-table", {"clearance": "COSMIC_TOP_SECRET"}, [cls("secret"), *rel("FRA")], [], False,
     ["classification"], "unknown to the FRA table"),
    ("no-table-nato-fallback", {"clearance_system": "DEU", "clearance": "NATO_SECRET"},
     [cls("secret"), *rel("FRA")], [], True, [], "no DEU table, NATO table used"),
    # releasability
    ("rel-in", {}, [cls("secret"), *rel("USA", "FRA", "GBR")], [], True, [], "nationality FRA is in"),
    ("rel-lower-case-nation", {"nationality": "fra"}, [cls("secret"), *rel("fra")], [], True, [], ""),
    ("rel-not-in", {}, [cls("secret"), *rel("USA", "GBR")], [], False, ["releasable-to"],
     "nationality FRA is not in releasable-to [GBR, USA]"),
    ("rel-no-nationality", {"nationality": None}, [cls("secret"), *rel("FRA")], [], False, ["releasable-to"],
     "subject has no nationality"),
    # issuer may only assert its nations
    ("issuer-nation-mismatch", {"nationality": "USA"}, [cls("secret"), *rel("USA")], [], False,
     ["issuer-nation"], "may not assert nationality USA (allowed: [FRA])"),
    ("issuer-nation-none-allowed", {"issuer_nations": []}, [cls("secret"), *rel("FRA")], [], False,
     ["issuer-nation"], "(allowed: none)"),
    ("issuer-multi-nation", {"nationality": "GBR", "issuer_nations": ["fra", "gbr"]},
     [cls("secret"), *rel("GBR")], [], True, [], ""),
    # COI (ALL_OF by default)
    ("coi-all-held", {"coi": ["FVEY", "nato-eu"]}, [cls("secret"), *rel("FRA"), *coi("fvey", "NATO_EU")], [],
     True, [], "holds all of coi"),
    ("coi-one-missing", {"coi": ["FVEY"]}, [cls("secret"), *rel("FRA"), *coi("fvey", "nato-eu")], [], False,
     ["coi"], "lacks [NATO_EU]"),
    ("coi-subject-none", {}, [cls("secret"), *rel("FRA"), *coi("fvey")], [], False, ["coi"],
     "subject has no COI"),
    # embargo
    ("embargo-future", {}, [cls("secret"), *rel("FRA"), embargo("2026-12-01T00:00:00Z")], [], False,
     ["embargo"], "embargoed until 2026-12-01T00:00:00Z"),
    ("embargo-past", {}, [cls("secret"), *rel("FRA"), embargo("2026-01-01T00:00:00Z")], [], True, [],
     "has passed"),
    ("embargo-exactly-now", {}, [cls("secret"), *rel("FRA"), embargo("2026-06-01T12:00:00Z")], [], True, [],
     ""),
    ("embargo-offset", {}, [cls("secret"), *rel("FRA"), embargo("2026-06-01T13:30:00%2B02:00")], [], True, [],
     "embargo until 2026-06-01T11:30:00Z"),
    ("embargo-latest-applies", {},
     [cls("secret"), *rel("FRA"), embargo("2026-01-01T00:00:00Z"), embargo("2027-01-01T00:00:00Z")], [],
     False, ["embargo"], "until 2027-01-01"),
    ("embargo-percent-encoded", {}, [cls("secret"), *rel("FRA"), embargo("2026-12-01T00%3A00%3A00Z")], [],
     False, ["embargo"], "embargoed until 2026-12-01T00:00:00Z"),
    ("embargo-malformed", {}, [cls("secret"), *rel("FRA"), embargo("next-tuesday")], [], False, ["embargo"],
     "malformed embargo"),
    ("embargo-naive-time", {}, [cls("secret"), *rel("FRA"), embargo("2026-01-01T00:00:00")], [], False,
     ["embargo"], "malformed embargo"),
    ("embargo-date-only", {}, [cls("secret"), *rel("FRA"), embargo("2026-01-01")], [], False, ["embargo"],
     "malformed embargo"),
    # times that parse but lie outside what a UTC datetime holds: denied, never an OverflowError
    ("embargo-before-year-1-in-utc", {}, [cls("secret"), *rel("FRA"), embargo("0001-01-01T00:00:00%2B14:00")],
     [], False, ["embargo"], "malformed embargo"),
    ("embargo-after-year-9999-in-utc", {}, [cls("secret"), *rel("FRA"), embargo("9999-12-31T23:59:59-14:00")],
     [], False, ["embargo"], "malformed embargo"),
    # dissem
    ("dissem-listed", {}, [cls("secret"), *rel("FRA")], ["bob@x", "alice@defense.gouv.fr"], True, [],
     "on the dissem list (2 entities)"),
    ("dissem-not-listed", {}, [cls("secret"), *rel("FRA")], ["bob@x"], False, ["dissem"],
     "not on the dissem list (1 entity)"),
    ("dissem-non-string", {}, [cls("secret"), *rel("FRA")], ["alice@defense.gouv.fr", 7], False, ["dissem"],
     "non-string"),
    # fail closed on policy content
    ("unknown-attribute", {}, [cls("secret"), *rel("FRA"), fqn("caveat", "noforn")], [], False, ["attribute"],
     "unknown attribute 'caveat'"),
    ("foreign-namespace", {}, [cls("secret"), *rel("FRA"), fqn("classification", "secret", "evil.example")],
     [], False, ["attribute"], "foreign namespace 'evil.example'"),
    ("value-not-in-closed-list", {}, [cls("secret"), cls("cosmic"), *rel("FRA")], [], False, ["attribute"],
     "value 'COSMIC'"),
    ("malformed-no-value", {}, [cls("secret"), *rel("FRA"), f"https://{NS}/attr/coi"], [], False,
     ["attribute"], "malformed attribute FQN"),
    ("malformed-http", {}, [cls("secret"), *rel("FRA"), f"http://{NS}/attr/coi/value/x"], [], False,
     ["attribute"], "malformed attribute FQN"),
    ("malformed-query", {}, [cls("secret"), *rel("FRA"), cls("secret") + "?x=1"], [], False, ["attribute"],
     "malformed"),
    ("malformed-non-string", {}, [cls("secret"), *rel("FRA"), None], [], False, ["attribute"],
     "malformed attribute FQN '<NoneType>'"),
    # required attributes
    ("missing-classification", {}, rel("FRA"), [], False, ["required"],
     "required attribute classification is missing"),
    ("missing-releasability", {}, [cls("secret")], [], False, ["required"], "(no releasability)"),
    ("unlabelled-object", {}, [], [], False, ["required", "required"], "missing from the policy"),
    ("only-bad-classification", {}, [cls("ultra"), *rel("FRA")], [], False, ["attribute", "required"],
     "ULTRA"),
]


@pytest.mark.parametrize(("subj", "labels", "dissem", "allowed", "failed", "reason"),
                         [c[1:] for c in RULE_CASES], ids=[c[0] for c in RULE_CASES])
def test_rules(subj: dict, labels: list, dissem: list, allowed: bool, failed: list[str], reason: str) -> None:
    decision = decide(subject(**subj), labels, dissem)
    assert decision.allowed is allowed, decision.checks
    assert sorted(c.rule for c in decision.checks if not c.passed) == sorted(failed)
    texts = decision.reasons if failed else [c.reason for c in decision.checks]
    assert any(reason in t for t in texts), texts
    if allowed:
        assert decision.checks and all(c.passed for c in decision.checks)
        decision.raise_for_denial()
    else:
        with pytest.raises(AccessDenied) as info:
            decision.raise_for_denial()
        assert reason in info.value.message
        assert info.value.details["reasons"] == decision.reasons


def test_all_checks_evaluated_without_short_circuit() -> None:
    subj = subject(clearance=None, nationality="USA", coi=[])
    decision = decide(subj, [cls("secret"), *rel("GBR"), *coi("fvey"), embargo("2099-01-01T00:00:00Z"),
                             fqn("caveat", "x")], ["someone@else"])
    assert not decision.allowed
    assert sorted(c.rule for c in decision.checks if not c.passed) == sorted(
        ["attribute", "issuer-nation", "classification", "releasable-to", "coi", "embargo", "dissem"])


def test_reason_names_the_fqn_and_is_bounded() -> None:
    bad = fqn("caveat", "x" * 5000)
    decision = decide(subject(), [cls("secret"), *rel("FRA"), bad])
    (reason,) = decision.reasons
    assert reason.startswith("malformed attribute FQN 'https://acp240.nato.int/attr/caveat/value/xxx")
    assert len(reason) < 400


# --- COI ANY_OF and configuration -------------------------------------------------------------------
ANY_OF_ENGINE = PolicyEngine(AbacConfig(attributes={
    "classification": AttributeDefinition(rule=RuleType.HIERARCHY, subject="clearance", values=NATO_LEVELS),
    "releasable-to": AttributeDefinition(rule=RuleType.ANY_OF, subject="nationality"),
    "coi": AttributeDefinition(rule=RuleType.ANY_OF, subject="coi", values=["FVEY", "NATO_EU", "AUKUS"]),
}))


@pytest.mark.parametrize(("engine", "held", "allowed"), [
    (ENGINE, ["FVEY", "AUKUS"], True),
    (ENGINE, ["FVEY"], False),
    (ENGINE, [], False),
    (ANY_OF_ENGINE, ["FVEY", "AUKUS"], True),
    (ANY_OF_ENGINE, ["AUKUS"], True),
    (ANY_OF_ENGINE, ["NATO_EU"], False),
    (ANY_OF_ENGINE, [], False),
], ids=["allof-both", "allof-one", "allof-none", "anyof-both", "anyof-one", "anyof-other", "anyof-none"])
def test_coi_all_of_vs_any_of(engine: PolicyEngine, held: list[str], allowed: bool) -> None:
    decision = decide(subject(coi=held), [cls("secret"), *rel("FRA"), *coi("fvey", "aukus")], engine=engine)
    assert decision.allowed is allowed, decision.reasons


def test_any_of_coi_closed_list() -> None:
    labels = [cls("secret"), *rel("FRA"), *coi("other")]
    decision = decide(subject(coi=["OTHER"]), labels, engine=ANY_OF_ENGINE)
    assert not decision.allowed
    assert any("not one of the coi values" in r for r in decision.reasons)


def test_nothing_required_and_nothing_labelled_is_allowed() -> None:
    engine = PolicyEngine(AbacConfig(required=[]))
    free = engine.decide(subject(nationality=None), [], now=NOW)
    assert free.allowed and free.checks == []
    free.raise_for_denial()
    assert engine.decide(subject(nationality=None), [cls("secret")], now=NOW).allowed
    assert not engine.decide(subject(clearance=None), [cls("secret")], now=NOW).allowed


def test_yaml_config_custom_namespace_and_attribute(tmp_path) -> None:
    path = tmp_path / "abac.yaml"
    path.write_text("""
namespace: Labels.Example.MIL
embargo_attribute: not-before
required: [classification, releasable-to, program]
attributes:
  classification: {rule: hierarchy, subject: clearance, values: [UNCLASSIFIED, RESTRICTED, CONFIDENTIAL,
                   SECRET, TOP_SECRET]}
  releasable-to: {rule: anyOf, subject: nationality}
  coi: {rule: anyOf, subject: coi}
  program: {rule: allOf, subject: coi, values: [Blue Falcon, Red Kite]}
clearance_equivalence:
  NATO: {NATO SECRET: SECRET}
  ESP: {Secreto: SECRET, Reservado: CONFIDENTIAL, Difusion Limitada: RESTRICTED}
""")
    config = load_yaml(path, AbacConfig)
    engine = PolicyEngine(config)

    def f(name: str, value: str) -> str:
        return f"https://labels.example.mil/attr/{name}/value/{value}"

    esp = subject(clearance="secreto", clearance_system="ESP", nationality="ESP", issuer_nations=["ESP"],
                  coi=["blue-falcon"])
    labels = [f("classification", "secret"), f("releasable-to", "esp"), f("program", "blue_falcon")]
    assert engine.decide(esp, labels, now=NOW).allowed
    assert not engine.decide(esp, [*labels, f("program", "red%20kite")], now=NOW).allowed
    assert not engine.decide(esp, [*labels, f("program", "green")], now=NOW).allowed      # closed list
    assert not engine.decide(esp, labels[:2], now=NOW).allowed                              # program required
    assert not engine.decide(esp, [*labels, f("not-before", "2027-01-01T00:00:00Z")], now=NOW).allowed
    # the default namespace and embargo name are foreign / unknown here
    assert not engine.decide(esp, [*labels, cls("secret")], now=NOW).allowed
    assert not engine.decide(esp, [*labels, f("embargo", "2020-01-01T00:00:00Z")], now=NOW).allowed
    assert attribute_fqn(config, "program", "Blue Falcon") == "https://labels.example.mil/attr/program/value/blue_falcon"
    assert parse_fqn(config, f("Program", "RED-KITE")) == ("program", "RED_KITE")


@pytest.mark.parametrize("yaml_text", [
    "namespace: https://acp240.nato.int\n",
    "embargo_attribute: coi\n",
    "attributes: {Coi: {rule: allOf, subject: coi}, coi: {rule: anyOf, subject: coi}}\nrequired: []\n",
    "attributes: {'co i': {rule: allOf, subject: coi}}\nrequired: []\n",
    "required: [caveat]\n",
], ids=["namespace-with-scheme", "embargo-collides", "names-differ-by-case", "bad-name",
        "required-undefined"])
def test_bad_yaml_config_rejected(tmp_path, yaml_text: str) -> None:
    path = tmp_path / "abac.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError):
        load_yaml(path, AbacConfig)


# --- FQN parsing and building -------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    (f"https://{NS}/attr/classification/value/secret", ("classification", "SECRET")),
    ("HTTPS://ACP240.NATO.INT/ATTR/Classification/VALUE/SECRET", ("classification", "SECRET")),
    (f"https://{NS}/attr/classification/value/top-secret", ("classification", "TOP_SECRET")),
    (f"https://{NS}/attr/classification/value/TOP_SECRET", ("classification", "TOP_SECRET")),
    (f"https://{NS}/attr/classification/value/top%20secret", ("classification", "TOP_SECRET")),
    (f"https://{NS}/attr/classification/value/%74op%5Fsecret", ("classification", "TOP_SECRET")),
    (f"  https://{NS}/attr/releasable-to/value/usa  ", ("releasable-to", "USA")),
    (f"https://{NS}/attr/coi/value/Five%20Eyes", ("coi", "FIVE_EYES")),
    (f"https://{NS}/attr/embargo/value/2026-12-01T00%3A00%3A00Z", ("embargo", "2026-12-01T00:00:00Z")),
    (f"https://{NS}/attr/Embargo/value/2026-12-01t01:00:00%2b01:00", ("embargo", "2026-12-01T00:00:00Z")),
], ids=["plain", "upper-case", "hyphen", "underscore", "pct-space", "pct-everything", "whitespace-nation",
        "coi-space", "embargo-pct", "embargo-offset-lower"])
def test_parse_fqn(text: str, expected: tuple[str, str]) -> None:
    assert parse_fqn(CFG, text) == expected


@pytest.mark.parametrize(("text", "why"), [
    ("", "malformed"),
    ("secret", "malformed"),
    (f"http://{NS}/attr/classification/value/secret", "malformed"),
    (f"https://{NS}/attr/classification/secret", "malformed"),
    (f"https://{NS}/attr/classification/value/", "malformed"),
    (f"https://{NS}/attr/classification/value/secret/", "malformed"),
    (f"https://{NS}/attr/classification/value/secret/extra", "malformed"),
    (f"https://{NS}/attr//value/secret", "malformed"),
    (f"https://{NS}/attr/classification/value/secret#frag", "malformed"),
    (f"https://{NS}/attr/classi%66ication/value/secret", "bad attribute name"),
    (f"https://user@{NS}/attr/classification/value/secret", "bad namespace"),
    (f"https://{NS}/attr/classification/value/se%ZZcret", "bad percent-encoding"),
    (f"https://{NS}/attr/classification/value/%FF", "not UTF-8"),
    (f"https://{NS}/attr/coi/value/a%2Fb", "bad value"),
    (f"https://{NS}/attr/coi/value/%20", "bad value"),
    ("https://other.org/attr/classification/value/secret", "foreign namespace"),
    (f"https://{NS}.evil.org/attr/classification/value/secret", "foreign namespace"),
    (f"https://{NS}/attr/caveat/value/noforn", "unknown attribute"),
    (f"https://{NS}/attr/classification/value/cosmic", "not one of the classification values"),
    (f"https://{NS}/attr/embargo/value/2026-13-01T00:00:00Z", "malformed embargo"),
    (f"https://{NS}/attr/classification/value/" + "a" * 3000, "too long"),
], ids=["empty", "bare-word", "http", "no-value-segment", "empty-value", "trailing-slash", "extra-segment",
        "empty-name", "fragment", "encoded-name", "userinfo", "bad-percent", "non-utf8", "encoded-slash",
        "blank-value", "foreign-ns", "lookalike-ns", "unknown-attr", "closed-list", "bad-embargo",
        "too-long"])
def test_parse_fqn_rejects(text: str, why: str) -> None:
    with pytest.raises(PolicyFormatError, match=why):
        parse_fqn(CFG, text)


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("classification", "TOP_SECRET", "classification/value/top_secret"),
    ("Classification", "top secret", "classification/value/top_secret"),
    ("releasable-to", "USA", "releasable-to/value/usa"),
    ("coi", "Five Eyes", "coi/value/five_eyes"),
    ("embargo", "2026-12-01T00:00:00Z", "embargo/value/2026-12-01T00%3A00%3A00Z"),
    ("embargo", datetime(2026, 12, 1, 1, tzinfo=timezone(timedelta(hours=1))),
     "embargo/value/2026-12-01T00%3A00%3A00Z"),
], ids=["classification", "name-case", "nation", "coi", "embargo-str", "embargo-datetime"])
def test_attribute_fqn_builds_and_round_trips(name: str, value: object, expected: str) -> None:
    built = attribute_fqn(CFG, name, value)
    assert built == f"https://{NS}/attr/{expected}"
    parsed_name, _ = parse_fqn(CFG, built)
    assert parsed_name == name.lower()


@pytest.mark.parametrize(("name", "value"), [
    ("caveat", "x"), ("classification", "cosmic"), ("embargo", "soon"), ("coi", "a/b"),
    ("embargo", datetime(2026, 1, 1)),
], ids=["unknown", "closed-list", "bad-embargo", "bad-value", "naive-datetime"])
def test_attribute_fqn_rejects(name: str, value: object) -> None:
    with pytest.raises((PolicyFormatError, ValueError)):
        attribute_fqn(CFG, name, value)


# --- API contract -----------------------------------------------------------------------------------
def test_decision_is_frozen_and_consistent() -> None:
    decision = decide(subject(), [cls("secret"), *rel("FRA")])
    with pytest.raises(ValueError):
        decision.allowed = False  # type: ignore[misc]
    with pytest.raises(ValueError):
        Decision(allowed=True, checks=[Check(rule="x", passed=False, reason="no")])
    assert Decision(allowed=False).reasons == []
    with pytest.raises(AccessDenied, match="no access check"):
        Decision(allowed=False).raise_for_denial()


@pytest.mark.parametrize("labels", [None, "https://x/attr/a/value/b", 42, {"a": 1}],
                         ids=["none", "string", "int", "dict"])
def test_non_list_policy_content_is_denied_not_raised(labels: object) -> None:
    decision = ENGINE.decide(subject(), labels, now=NOW)  # type: ignore[arg-type]
    assert not decision.allowed
    assert not ENGINE.decide(subject(), [cls("secret"), *rel("FRA")], "alice", now=NOW).allowed  # type: ignore


def test_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        ENGINE.decide(subject(), [cls("secret"), *rel("FRA")], now=datetime(2026, 1, 1))


def test_default_now_is_utc_wall_clock() -> None:
    assert ENGINE.decide(subject(), [cls("secret"), *rel("FRA"), embargo("2000-01-01T00:00:00Z")]).allowed
    assert not ENGINE.decide(subject(), [cls("secret"), *rel("FRA"), embargo("2999-01-01T00:00:00Z")]).allowed


# --- properties -----------------------------------------------------------------------------------------
NATIONS = ["USA", "FRA", "GBR", "DEU"]
COIS = ["FVEY", "NATO_EU", "AUKUS"]
CLEARANCES = [None, "ULTRA", *sorted({n for names in CFG.clearance_equivalence.values() for n in names})]

label_strategy = st.one_of(
    st.sampled_from(NATO_LEVELS + ["COSMIC"]).map(lambda v: cls(v.lower())),
    st.sampled_from(NATIONS).map(lambda n: fqn("releasable-to", n)),
    st.sampled_from(COIS).map(lambda c: fqn("coi", c)),
    st.sampled_from(["2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z", "garbage"]).map(embargo),
    st.sampled_from([fqn("caveat", "x"), fqn("classification", "secret", "evil.org"), "not a uri"]),
    st.text(max_size=40),
)
subject_strategy = st.builds(
    Subject,
    subject=st.sampled_from(["alice", "bob"]),
    issuer=st.just("https://idp"),
    clearance=st.sampled_from(CLEARANCES),
    clearance_system=st.sampled_from(["NATO", "USA", "FRA", "GBR", "DEU"]),
    nationality=st.sampled_from([None, *NATIONS]),
    coi=st.lists(st.sampled_from(COIS), max_size=3),
    issuer_nations=st.lists(st.sampled_from(NATIONS), max_size=3),
)
dissem_strategy = st.lists(st.sampled_from(["alice", "bob", "carol"]), max_size=2)
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(subj=subject_strategy, labels=st.lists(label_strategy, max_size=6), dissem=dissem_strategy,
       engine=st.sampled_from([ENGINE, ANY_OF_ENGINE]))
def test_property_never_raises_and_allowed_means_all_passed(subj, labels, dissem, engine) -> None:
    decision = engine.decide(subj, labels, dissem, now=NOW)
    if decision.allowed:
        assert decision.checks and all(c.passed for c in decision.checks)
        assert decision.reasons == []
    else:
        assert decision.reasons
        with pytest.raises(AccessDenied):
            decision.raise_for_denial()


@PROPERTY_SETTINGS
@given(subj=subject_strategy, labels=st.lists(label_strategy, max_size=6), dissem=dissem_strategy,
       higher=st.sampled_from(NATO_LEVELS))
def test_property_raising_clearance_never_denies(subj, labels, dissem, higher) -> None:
    before = ENGINE.clearance_level(subj)
    if before is not None and NATO_LEVELS.index(higher) < NATO_LEVELS.index(before):
        higher = before
    raised = subj.model_copy(update={"clearance": higher, "clearance_system": "NATO"})
    assert ENGINE.clearance_level(raised) == higher
    if ENGINE.decide(subj, labels, dissem, now=NOW).allowed:
        assert ENGINE.decide(raised, labels, dissem, now=NOW).allowed

"""Metrics: what the KAS counts, and that Prometheus sees exactly that.

What these prove:

* every audited outcome is counted, and the audit is written first (in process);
* the catalog in kas_ray/serve/metrics.py is what the code registers: ``kas_`` names, ``nation`` on
  every metric, no unbounded tag (subject, token, key id, object id);
* the Redis tiers of the share cache and the shared rate limits are counted (real redis-server);
* end to end on Ray: a dedicated nation (OSCAR) takes known traffic over HTTP (3 permits on three
  routes, 2 denials, a corrupted wrapped key, a bad token, 413, 415, malformed JSON, a per-client 429);
  the Ray node's metrics endpoint, parsed with Prometheus' own text parser, shows exactly that traffic;
* a real Prometheus server scrapes that endpoint and answers every query of the Grafana dashboard;
* the dashboard and docs/metrics.md name only exported metrics, and every exported metric.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kas_ray.audit import AuditAction, AuditEvent, MemoryAuditSink
from kas_ray.cache import CacheKind, share_cache_key
from kas_ray.config import EndpointRateLimit, NationSettings, RateLimitConfig, RedisConfig
from kas_ray.errors import RateLimited
from kas_ray.serve.metrics import (
    BREAKER_GAUGE,
    CACHE_ACTOR_LOOKUPS,
    CATALOG,
    KasMetrics,
    MetricsAuditSink,
    MetricSpec,
)
from kas_ray.shared.wiring import build_shared_state

ROOT = Path(__file__).resolve().parents[1]
Tags = tuple[tuple[str, str], ...]


class Recorder:
    """An in-memory stand-in for Ray's metrics modules (same constructors and methods).

    It refuses an update whose tag keys differ from the ones the metric was created with, as Ray's
    exporter would mislabel or drop it.
    """

    def __init__(self) -> None:
        self.created: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.values: dict[str, Tally[Tags]] = {}
        self.gauges: dict[str, dict[Tags, float]] = {}
        self.observed: dict[str, list[float]] = {}

    def _metric(self, name: str, kind: str, tag_keys: tuple[str, ...] | None) -> Any:
        recorder = self
        keys = tuple(tag_keys or ())
        recorder.created[name] = (kind, keys)

        def tagged(tags: dict[str, str] | None) -> Tags:
            assert sorted(tags or {}) == sorted(keys), (name, tags, keys)
            return tuple(sorted((tags or {}).items()))

        class Metric:
            def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
                recorder.values.setdefault(name, Tally())[tagged(tags)] += value

            def set(self, value: float, tags: dict[str, str] | None = None) -> None:
                recorder.gauges.setdefault(name, {})[tagged(tags)] = value

            def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
                tagged(tags)
                recorder.observed.setdefault(name, []).append(value)

        return Metric()

    def Counter(self, name: str, description: str = "", tag_keys: Any = None) -> Any:  # noqa: N802
        return self._metric(name, "counter", tag_keys)

    def Gauge(self, name: str, description: str = "", tag_keys: Any = None) -> Any:  # noqa: N802
        return self._metric(name, "gauge", tag_keys)

    def Histogram(self, name: str, description: str = "", boundaries: Any = None, tag_keys: Any = None) -> Any:  # noqa: N802
        assert boundaries, name
        return self._metric(name, "histogram", tag_keys)


def event(action: AuditAction, **fields: Any) -> AuditEvent:
    return AuditEvent(action=action, request_id="r", nation="FRA", decision=fields.pop("decision", "x"), **fields)


def test_every_audited_outcome_is_counted_and_the_audit_comes_first() -> None:
    inner, recorder = MemoryAuditSink(), Recorder()
    sink = MetricsAuditSink(inner, "FRA", registry=recorder)
    events = [
        event(AuditAction.KEY_RELEASED, latency_ms=2.5),
        event(AuditAction.KEY_RELEASED, latency_ms=3.5),
        event(AuditAction.KEY_DENIED, error_code="forbidden", latency_ms=1.0),
        event(AuditAction.REQUEST_REJECTED, error_code="invalid_token"),
        event(AuditAction.FORWARD_RESULT, peer="USA"),
        event(AuditAction.FORWARD_CANCELLED, peer="GBR"),
        event(AuditAction.BREAKER_TRANSITION, peer="GBR", decision="open"),
    ]
    for e in events:
        sink.emit(e)
    assert inner.events == events  # the durable record is written, unchanged, for every event
    decisions = recorder.values["kas_key_decisions_total"]
    assert decisions[(("action", "KEY_RELEASED"), ("error_code", ""), ("nation", "FRA"))] == 2
    assert decisions[(("action", "KEY_DENIED"), ("error_code", "forbidden"), ("nation", "FRA"))] == 1
    assert recorder.values["kas_requests_rejected_total"] == {(("error_code", "invalid_token"), ("nation", "FRA")): 1}
    assert sorted(recorder.observed["kas_key_decision_latency_ms"]) == [1.0, 2.5, 3.5]
    forwards = recorder.values["kas_federation_forwards_total"]
    assert forwards[(("action", "FORWARD_RESULT"), ("nation", "FRA"), ("peer", "USA"))] == 1
    assert forwards[(("action", "FORWARD_CANCELLED"), ("nation", "FRA"), ("peer", "GBR"))] == 1
    gauge = recorder.gauges["kas_federation_breaker_state"]
    assert gauge == {(("nation", "FRA"), ("peer", "GBR")): BREAKER_GAUGE["open"]}


def test_a_failing_audit_updates_no_metric() -> None:
    class Broken(MemoryAuditSink):
        def emit(self, event: AuditEvent) -> None:
            raise OSError("disk full")

    recorder = Recorder()
    sink = MetricsAuditSink(Broken(), "FRA", registry=recorder)
    try:
        sink.emit(event(AuditAction.KEY_RELEASED, latency_ms=1.0))
    except OSError:
        pass
    assert recorder.values.get("kas_key_decisions_total") is None


def test_breaker_gauges_are_set_again_on_refresh() -> None:
    recorder = Recorder()
    sink = MetricsAuditSink(MemoryAuditSink(), "FRA", registry=recorder)
    sink.set_breaker("USA", "closed")  # at start, for every peer
    sink.emit(event(AuditAction.BREAKER_TRANSITION, peer="GBR", decision="open"))
    recorder.gauges.clear()  # what Ray does to a gauge nobody set for two metrics report intervals
    sink.refresh()  # NationKAS.check_health, every 10 s
    assert recorder.gauges["kas_federation_breaker_state"] == {
        (("nation", "FRA"), ("peer", "USA")): BREAKER_GAUGE["closed"],
        (("nation", "FRA"), ("peer", "GBR")): BREAKER_GAUGE["open"]}


# === the catalog ===========================================================================================
#: Tag keys whose values would be unbounded or secret: never a metric tag.
UNBOUNDED_TAGS = {"subject", "sub", "user", "token", "issuer", "kid", "key", "request_id", "object_id", "kao_id",
                  "policy", "policy_uuid", "client", "address", "ip", "path", "url", "replica_id"}


def test_catalog_is_bounded_and_is_what_the_code_registers() -> None:
    names = [spec.name for spec in CATALOG]
    assert len(set(names)) == len(names)
    for spec in CATALOG:
        assert re.fullmatch(r"kas_[a-z0-9_]+", spec.name), spec
        assert spec.tags[0] == "nation" and not UNBOUNDED_TAGS & set(spec.tags), spec
        assert spec.kind != "counter" or spec.name.endswith("_total"), spec
        assert spec.kind != "histogram" or spec.name.endswith("_ms"), spec
        assert spec.description, spec
    recorder = Recorder()
    MetricsAuditSink(MemoryAuditSink(), "FRA", registry=recorder)
    KasMetrics("FRA", registry=recorder)
    assert recorder.created == {s.name: (s.kind, s.tags) for s in CATALOG if s is not CACHE_ACTOR_LOOKUPS}
    assert CACHE_ACTOR_LOOKUPS.prometheus_names == ("ray_kas_cache_actor_lookups_total",)


def test_redis_tiers_and_shared_rate_limits_are_counted(redis_server: Any, tmp_path: Path) -> None:
    """Two replicas on one real Redis: miss, replica hit, the other replica's Redis hit; a shared 429."""
    settings = NationSettings(nation="OSCAR", public_url="http://127.0.0.1:1/oscar", state_dir=str(tmp_path),
                              redis=RedisConfig(url=redis_server.url),
                              rate_limit=RateLimitConfig(rewrap=EndpointRateLimit(per_subject=1)))
    first, second = Recorder(), Recorder()
    key = share_cache_key("OSCAR", "kid", "1", os.urandom(256), None)
    subject = f"metrics-{uuid.uuid4().hex}"

    async def scenario() -> None:
        a = build_shared_state(settings, metrics=KasMetrics("OSCAR", registry=first))
        b = build_shared_state(settings, metrics=KasMetrics("OSCAR", registry=second))
        assert a.cache is not None and b.cache is not None and a.rate_limiter and b.rate_limiter
        try:
            assert await a.cache.aget(key) is None
            await a.cache.aput(key, b"s" * 32, CacheKind.SHARE)
            for cache in (a.cache, b.cache, b.cache):
                assert await cache.aget(key) == b"s" * 32
            await a.rate_limiter.check_subject("rewrap", "iss", subject)
            with pytest.raises(RateLimited):
                await b.rate_limiter.check_subject("rewrap", "iss", subject)
        finally:
            for replica in (a, b):
                assert replica.link is not None
                await replica.link.aclose()

    asyncio.run(scenario())
    lookups = "kas_share_cache_lookups_total"
    assert first.values[lookups] == {(("nation", "OSCAR"), ("result", "miss")): 1,
                                     (("nation", "OSCAR"), ("result", "hit_replica")): 1}
    assert second.values[lookups] == {(("nation", "OSCAR"), ("result", "hit_shared")): 1,
                                      (("nation", "OSCAR"), ("result", "hit_replica")): 1}
    assert "kas_rate_limited_total" not in first.values
    assert second.values["kas_rate_limited_total"] == {
        (("dimension", "subject"), ("endpoint", "rewrap"), ("nation", "OSCAR")): 1}


# === the dashboard and the docs ============================================================================
EXPORTED: dict[str, MetricSpec] = {name: spec for spec in CATALOG for name in spec.prometheus_names}
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                 "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (strings, label matchers, ranges, groupings and calls dropped)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if not expr[match.end():].lstrip().startswith("(") and match.group().lower() not in _PROMQL_WORDS:
            names.add(match.group())
    return names


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of docs/grafana-dashboard.json."""
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_dashboard_queries_only_exported_metrics_and_all_of_them() -> None:
    assert promql_metric_names('histogram_quantile(0.95, sum by (le, nation) (rate(a_bucket{x=~"$v"}[5m]))) '
                               '/ on (nation) group_left b + 1e3 * max(c offset 5m)') == {"a_bucket", "b", "c"}
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels) and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "nation"}
    used: set[str] = set()
    for panel in (p for p in panels if p["type"] != "row"):
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = promql_metric_names(target["expr"])
            assert names and names <= EXPORTED.keys(), (panel["title"], sorted(names - EXPORTED.keys()))
            used |= names
    assert sorted({s.name for s in CATALOG} - {EXPORTED[n].name for n in used}) == []
    assert {n for n in used if n.endswith("_bucket")} == {s.prometheus_names[0] for s in CATALOG
                                                          if s.kind == "histogram"}  # p50/p95/p99 for each


def test_metrics_doc_lists_every_metric_and_the_runbook_links_it() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    rows = {name: (kind, tags.strip()) for name, kind, tags in
            re.findall(r"^\| `(ray_kas_\w+)` \| (\w+) \| ([^|]+) \|", doc, re.M)}
    assert rows == {f"ray_{s.name}": (s.kind, ", ".join(f"`{t}`" for t in s.tags)) for s in CATALOG}
    assert "(metrics.md)" in (ROOT / "docs" / "runbook.md").read_text()
    assert "grafana-dashboard.json" in doc


# === end to end: Ray Serve → Ray's metrics endpoint → Prometheus ===========================================
OSCAR = "OSCAR"


@dataclass
class Traffic:
    """What the test sent to OSCAR, as the metrics must show it."""

    endpoints: list[str]  # host:port of every Ray node's metrics endpoint
    #: (route template, status, error code) → answers.
    answers: Tally[tuple[str, str, str]]


def metrics_endpoints() -> list[str]:
    import ray

    return [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n["Alive"]]


def drive(kas: Any, http: httpx.Client) -> Tally[tuple[str, str, str]]:
    """Known traffic at OSCAR over HTTP; returns every answer by (route, status, error code)."""
    from test_serve_kas import (
        ACP_REWRAP,
        CONNECT_REWRAP,
        MAX_BODY,
        REST_REWRAP,
        Requester,
        kao_for,
        policy,
        results,
        unique,
    )

    answers: Tally[tuple[str, str, str]] = Tally()
    url = kas.url(OSCAR)

    def note(route: str, response: httpx.Response, status: int) -> dict[str, Any]:
        assert response.status_code == status, (route, response.status_code, response.text[:300])
        body = response.json()
        answers[route, str(status), body.get("error", "") if status != 200 else ""] += 1
        return body

    kas.kas_key(OSCAR)  # Connect PublicKey: the first public-key request of this client address
    answers["/kas.AccessService/PublicKey", "200", ""] += 1
    note("/kas/v2/kas_public_key", http.get(f"{url}/kas/v2/kas_public_key"), 200)
    assert note("/kas/v2/kas_public_key", http.get(f"{url}/kas/v2/kas_public_key"), 429)["error"] == "rate_limited"

    share = kas.share()
    pol = policy(rel=[OSCAR])
    kao = kao_for(kas, OSCAR, pol, share)
    corrupted = kao.model_copy(update={"wrapped_key": base64.b64encode(os.urandom(256)).decode()})
    calls: list[tuple[str, str | None, Any, str]] = [
        *((route, "SECRET", kao, "permit") for route in (CONNECT_REWRAP, REST_REWRAP, ACP_REWRAP)),
        (CONNECT_REWRAP, "CONFIDENTIAL", kao, "fail"),  # clearance too low: KEY_DENIED, a cache hit
        (CONNECT_REWRAP, "CONFIDENTIAL", kao, "fail"),
        (CONNECT_REWRAP, "SECRET", corrupted, "fail"),  # the HSM cannot unwrap it: KEY_ERROR
    ]
    for route, clearance, item, status in calls:
        requester = Requester(kas)
        token = kas.token(OSCAR, unique("metrics"), clearance)
        _, reply = requester.http(OSCAR, token, requester.v2((pol.to_base64(), [item])), route=route, client=http)
        (result,) = results(note(route, reply, 200))
        assert result["status"] == status, result
    requester = Requester(kas)
    _, reply = requester.http(OSCAR, "not-a-token", requester.v2((pol.to_base64(), [kao])), client=http)
    assert note(CONNECT_REWRAP, reply, 401)["error"] == "invalid_token"
    # Refused in the HTTP layer, before the rewrap service (nothing audited):
    rest = url + REST_REWRAP
    json_type = {"Content-Type": "application/json"}
    assert note(REST_REWRAP, http.post(rest, content=b"x" * (MAX_BODY + 1), headers=json_type),
                413)["error"] == "payload_too_large"
    assert note(REST_REWRAP, http.post(rest, content=b"<rewrap/>", headers={"Content-Type": "application/xml"}),
                415)["error"] == "unsupported_media_type"
    assert note(REST_REWRAP, http.post(rest, content=b"{not json", headers=json_type), 400)["error"] == "bad_format"
    return answers


@pytest.fixture(scope="module")
def oscar(kas_cluster: Any) -> Iterator[Traffic]:
    """OSCAR deployed next to the session's nations (USA its federation peer), after its known traffic."""
    from conftest import KasCluster
    from ray import serve
    from test_serve_kas import Kas

    from kas_ray.serve.actors import kill_actors
    from kas_ray.serve.runner import _wait_ready, deploy, nation_settings

    (settings,) = [s for s in nation_settings(kas_cluster.state_dir, [OSCAR, "USA"], kas_cluster.base_url,
                                              rate_limit={"public_key": {"per_client": 2}})
                   if s.nation == OSCAR]
    started = time.perf_counter()
    deploy([settings], index=False)
    try:
        _wait_ready([settings.public_url])
        cluster = KasCluster(kas_cluster.base_url, {OSCAR: settings.public_url}, kas_cluster.state_dir)
        with httpx.Client(timeout=30.0) as http:
            answers = drive(Kas(cluster, http), http)
        print(f"\nOSCAR deployed and {answers.total()} requests sent in {time.perf_counter() - started:.1f}s")
        yield Traffic(metrics_endpoints(), answers)
    finally:
        serve.delete(OSCAR.lower())
        kill_actors([OSCAR])


Sample = tuple[str, dict[str, str], float]


def scrape(endpoints: list[str]) -> list[Sample]:
    """Every sample of every node's metrics endpoint, read with Prometheus' own text parser."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: list[Sample] = []
    for endpoint in endpoints:
        text = httpx.get(f"http://{endpoint}/metrics", timeout=10.0).text
        for family in text_string_to_metric_families(text):
            samples += [(s.name, s.labels, s.value) for s in family.samples]
    return samples


def summed(samples: list[Sample], name: str, by: tuple[str, ...], **match: str) -> dict[tuple[str, ...], float]:
    """``sum by (by) (name{match})`` over the scraped samples (replicas, workers and nodes added up)."""
    out: Tally[tuple[str, ...]] = Tally()
    for sample_name, labels, value in samples:
        if sample_name == name and all(labels.get(k) == v for k, v in match.items()):
            out[tuple(labels.get(k, "") for k in by)] += value
    return dict(out)


def oscar_views(samples: list[Sample]) -> dict[str, dict[tuple[str, ...], float]]:
    """The scraped metrics of OSCAR, in the shape the expected traffic is written in."""
    n = {"nation": OSCAR}
    return {
        "answers": summed(samples, "ray_kas_http_requests_total", ("route", "status", "error_code"), **n),
        "answer latencies": summed(samples, "ray_kas_http_request_latency_ms_count", ("route", "status"), **n),
        "decisions": summed(samples, "ray_kas_key_decisions_total", ("action", "error_code"), **n),
        "decision latencies": summed(samples, "ray_kas_key_decision_latency_ms_count", ("action",), **n),
        "rejected by the service": summed(samples, "ray_kas_requests_rejected_total", ("error_code",), **n),
        "share lookups": summed(samples, "ray_kas_share_cache_lookups_total", ("result",), **n),
        "cache actor share lookups": summed(samples, "ray_kas_cache_actor_lookups_total", ("result",), kind="share",
                                            **n),
        "hsm unwraps": summed(samples, "ray_kas_hsm_call_latency_ms_count", (), method="unwrap", **n),
        "hsm errors": summed(samples, "ray_kas_hsm_errors_total", ("method", "kind"), **n),
        "rate limited": summed(samples, "ray_kas_rate_limited_total", ("endpoint", "dimension"), **n),
        "breakers": summed(samples, "ray_kas_federation_breaker_state", ("peer",), **n),
        "forwards": summed(samples, "ray_kas_federation_forwards_total", ("peer", "action"), **n),
    }


def wait_for(read: Callable[[], Any], expected: Any, timeout: float, what: str) -> float:
    """Poll ``read`` until it equals ``expected``; returns the seconds it took (asserts equality at the end)."""
    started = time.monotonic()
    while (actual := read()) != expected and time.monotonic() - started < timeout:
        time.sleep(1.0)
    assert actual == expected, what
    return time.monotonic() - started


def test_ray_metrics_endpoint_shows_exactly_the_traffic(oscar: Traffic) -> None:
    by_route_status: Tally[tuple[str, str]] = Tally()
    for (route, status, _code), count in oscar.answers.items():
        by_route_status[route, status] += count
    expected = {
        "answers": {key: float(count) for key, count in oscar.answers.items()},
        "answer latencies": {key: float(count) for key, count in by_route_status.items()},
        "decisions": {("KEY_RELEASED", ""): 3.0, ("KEY_DENIED", "forbidden"): 2.0,
                      ("KEY_ERROR", "key_unwrap_failed"): 1.0},
        "decision latencies": {("KEY_RELEASED",): 3.0, ("KEY_DENIED",): 2.0, ("KEY_ERROR",): 1.0},
        # Only what reached the rewrap service; the 413, 415, 400 and 429 never did.
        "rejected by the service": {("invalid_token",): 1.0},
        # One KAO rewrapped 5 times: one miss then replica hits; the corrupted KAO: one more miss.
        "share lookups": {("miss",): 2.0, ("hit_replica",): 4.0},
        "cache actor share lookups": {},  # shares live in the HSM actor's memory, never in the cache actor
        "hsm unwraps": {(): 2.0},
        "hsm errors": {("unwrap", "key_unwrap_failed"): 1.0},
        "rate limited": {("public_key", "client"): 1.0},
        "breakers": {("USA",): float(BREAKER_GAUGE["closed"])},
        "forwards": {},
    }
    waited = wait_for(lambda: oscar_views(scrape(oscar.endpoints)), expected, 60.0, "scraped OSCAR metrics")
    print(f"\nRay's metrics endpoint showed all of OSCAR's traffic {waited:.1f}s after the last request")


def prometheus_binary() -> str | None:
    """``prometheus`` on PATH, else in the venv (`make test` puts Debian's binary there)."""
    venv = Path(sys.executable).parent / "prometheus"
    return os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus") or (str(venv) if venv.exists() else None)


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    binary = prometheus_binary()
    if binary is None:
        pytest.skip("no prometheus binary (`make test` fetches it: scripts/fetch-prometheus.sh .venv/bin)")
    return binary


#: Dashboard panels with no OSCAR series by construction (OSCAR forwards nothing).
NO_OSCAR_DATA = {"Forwards/s to peers by result"}


def test_prometheus_scrapes_ray_and_answers_every_dashboard_query(prometheus_bin: str, oscar: Traffic,
                                                                  tmp_path: Path) -> None:
    from conftest import free_port

    config = tmp_path / "prometheus.yml"  # YAML is a superset of JSON
    config.write_text(json.dumps({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                                  "scrape_configs": [{"job_name": "ray",
                                                      "static_configs": [{"targets": oscar.endpoints}]}]}))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    server = subprocess.Popen([prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{base}/-/ready", timeout=2.0).status_code == 200
        except httpx.TransportError:
            return server.poll() is not None  # exited: stop waiting (the assert below reports it)

    def query(expr: str) -> list[dict[str, Any]]:
        body = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10.0).json()
        assert body["status"] == "success", (expr, body)
        return list(body["data"]["result"])

    def released() -> list[str]:
        return [r["value"][1] for r in query(f'sum(ray_kas_key_decisions_total{{nation="{OSCAR}", '
                                             f'action="KEY_RELEASED"}})')]

    try:
        started = time.monotonic()
        wait_for(ready, True, 30.0, "Prometheus ready")
        assert server.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
        wait_for(released, ["3"], 60.0, "Prometheus query of the scraped decisions")
        waited = time.monotonic() - started
        time.sleep(2.5)  # a few more scrapes: rate() needs two samples in its window
        empty = []
        for title, expr in dashboard_targets():
            concrete = expr.replace("$__rate_interval", "1m").replace("$nation", OSCAR)
            if not query(concrete):
                empty.append(title)
        assert sorted(set(empty)) == sorted(NO_OSCAR_DATA), empty
        print(f"\nPrometheus answered for OSCAR {waited:.1f}s after it started; "
              f"{len(dashboard_targets())} dashboard queries valid")
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()

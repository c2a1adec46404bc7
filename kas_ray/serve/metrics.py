"""Prometheus metrics of a nation KAS (catalog in docs/metrics.md).

Every key decision, refused request, forward and breaker transition is already an audit event;
:class:`MetricsAuditSink` counts them on their way to the audit file, so metrics and audit can
never disagree. :class:`KasMetrics` counts what the audit does not see: every HTTP answer (also
the refusals that never reach the rewrap service: 413, 415, malformed bodies, per-client 429),
share-cache lookups, HSM actor calls and rate-limit refusals.

Metrics go through Ray's metrics API (Ray Serve's in replicas, which adds the deployment, replica and
application tags); each Ray node's metrics agent exports them for Prometheus as ``ray_<name>``.
Everything is counted in the process where it happens (a few microseconds per update), never through
an extra actor call. Tag values are bounded: nations, peers, route templates, HTTP statuses, error
codes (class attributes) and fixed result names; never tokens, subjects, key ids or object ids.
Tests pass an in-memory ``registry`` with the same three constructors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from kas_ray.audit import AuditAction, AuditEvent, AuditSink

#: Gauge value per breaker state (0 healthy ... 2 peer skipped).
BREAKER_GAUGE = {"closed": 0, "half_open": 1, "open": 2}
#: Latency buckets (ms): sub-millisecond cache hits up to the HSM actor's default 10 s deadline.
LATENCY_BOUNDARIES_MS: list[float] = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]

MetricKind = Literal["counter", "gauge", "histogram"]
#: Where a share lookup was answered: this replica's memory, the nation's shared tier (cache actor or
#: Redis), or nowhere (the key backend unwraps it).
CacheResult = Literal["hit_replica", "hit_shared", "miss"]


class MetricsRegistry(Protocol):
    def Counter(self, name: str, description: str = "", tag_keys: tuple[str, ...] | None = None) -> Any: ...  # noqa: N802

    def Gauge(self, name: str, description: str = "", tag_keys: tuple[str, ...] | None = None) -> Any: ...  # noqa: N802

    def Histogram(self, name: str, description: str = "", boundaries: list[float] | None = None,  # noqa: N802
                  tag_keys: tuple[str, ...] | None = None) -> Any: ...


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric; the catalog below is what docs/metrics.md and the Grafana dashboard are checked against."""

    name: str
    kind: MetricKind
    tags: tuple[str, ...]
    description: str

    def create(self, registry: MetricsRegistry) -> Any:
        if self.kind == "counter":
            return registry.Counter(self.name, self.description, tag_keys=self.tags)
        if self.kind == "gauge":
            return registry.Gauge(self.name, self.description, tag_keys=self.tags)
        return registry.Histogram(self.name, self.description, boundaries=LATENCY_BOUNDARIES_MS, tag_keys=self.tags)

    @property
    def prometheus_names(self) -> tuple[str, ...]:
        """The series names Prometheus sees: Ray adds ``ray_``, counters end in ``_total``, histograms fan out."""
        base = f"ray_{self.name}"
        if self.kind == "histogram":
            return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
        if self.kind == "counter" and not base.endswith("_total"):
            return (f"{base}_total",)
        return (base,)


# --- from audit events (MetricsAuditSink) -------------------------------------------------------------------
KEY_DECISIONS = MetricSpec("kas_key_decisions_total", "counter", ("nation", "action", "error_code"),
                           "Key decisions per KAO, by outcome")
REQUESTS_REJECTED = MetricSpec("kas_requests_rejected_total", "counter", ("nation", "error_code"),
                               "Rewrap requests the rewrap service refused before any KAO decision")
KEY_DECISION_LATENCY = MetricSpec("kas_key_decision_latency_ms", "histogram", ("nation", "action"),
                                  "Latency of one KAO decision (ms)")
FEDERATION_FORWARDS = MetricSpec("kas_federation_forwards_total", "counter", ("nation", "peer", "action"),
                                 "Forwards to peers, by result")
BREAKER_STATE = MetricSpec("kas_federation_breaker_state", "gauge", ("nation", "peer"),
                           "Circuit breaker per peer: 0 closed, 1 half-open, 2 open")
# --- counted in the replica (KasMetrics) ------------------------------------------------------------------
HTTP_REQUESTS = MetricSpec("kas_http_requests_total", "counter", ("nation", "route", "status", "error_code"),
                           "Answers of the KAS API routes, by route template, HTTP status and error code")
HTTP_LATENCY = MetricSpec("kas_http_request_latency_ms", "histogram", ("nation", "route", "status"),
                          "Time a KAS API route took to answer, body read included (ms)")
SHARE_CACHE_LOOKUPS = MetricSpec("kas_share_cache_lookups_total", "counter", ("nation", "result"),
                                 "Unwrapped-share lookups: hit_replica, hit_shared or miss (an HSM unwrap)")
HSM_CALL_LATENCY = MetricSpec("kas_hsm_call_latency_ms", "histogram", ("nation", "method"),
                              "One call from a replica to the nation's HSM actor, actor hop included (ms)")
HSM_ERRORS = MetricSpec("kas_hsm_errors_total", "counter", ("nation", "method", "kind"),
                        "Failed HSM actor calls: timeout, actor_died, actor_unavailable or the error code")
RATE_LIMITED = MetricSpec("kas_rate_limited_total", "counter", ("nation", "endpoint", "dimension"),
                          "Requests refused with 429, by endpoint class and limit (subject or client)")
# --- counted in the nation's cache actor ------------------------------------------------------------------
CACHE_ACTOR_LOOKUPS = MetricSpec("kas_cache_actor_lookups_total", "counter", ("nation", "kind", "result"),
                                 "Lookups in the nation's cache actor by entry kind (share, public_key, jwks)")

CATALOG: tuple[MetricSpec, ...] = (
    KEY_DECISIONS, REQUESTS_REJECTED, KEY_DECISION_LATENCY, FEDERATION_FORWARDS, BREAKER_STATE,
    HTTP_REQUESTS, HTTP_LATENCY, SHARE_CACHE_LOOKUPS, HSM_CALL_LATENCY, HSM_ERRORS, RATE_LIMITED,
    CACHE_ACTOR_LOOKUPS,
)


def serve_metrics() -> Any:
    """Ray Serve's metrics module (replica processes: adds the Serve tags)."""
    from ray.serve import metrics

    return metrics


def ray_metrics() -> Any:
    """Ray's own metrics module (actors outside Serve; no Serve import in them)."""
    from ray.util import metrics

    return metrics


class MetricsAuditSink(AuditSink):
    """Forwards every event to ``inner`` (the durable audit) first, then updates the metrics."""

    def __init__(self, inner: AuditSink, nation: str, registry: MetricsRegistry | None = None) -> None:
        self.inner = inner
        self.nation = nation
        m = registry or serve_metrics()
        self.decisions = KEY_DECISIONS.create(m)
        self.rejections = REQUESTS_REJECTED.create(m)
        self.latency = KEY_DECISION_LATENCY.create(m)
        self.forwards = FEDERATION_FORWARDS.create(m)
        self.breaker = BREAKER_STATE.create(m)
        #: Last breaker gauge value per peer, for :meth:`refresh`.
        self._breakers: dict[str, int] = {}

    def emit(self, event: AuditEvent) -> None:
        self.inner.emit(event)  # the durable record first: a failing audit releases nothing
        tags = {"nation": self.nation}
        action = event.action
        if action in (AuditAction.KEY_RELEASED, AuditAction.KEY_DENIED, AuditAction.KEY_ERROR):
            self.decisions.inc(1, tags={**tags, "action": action.value, "error_code": event.error_code or ""})
            if event.latency_ms is not None:
                self.latency.observe(event.latency_ms, tags={**tags, "action": action.value})
        elif action is AuditAction.REQUEST_REJECTED:
            self.rejections.inc(1, tags={**tags, "error_code": event.error_code or ""})
        elif action is AuditAction.BREAKER_TRANSITION:
            self.set_breaker(event.peer or "", event.decision)
        elif action in (AuditAction.FORWARD_RESULT, AuditAction.FORWARD_FAILED, AuditAction.FORWARD_CANCELLED):
            self.forwards.inc(1, tags={**tags, "peer": event.peer or "", "action": action.value})

    async def flush(self) -> None:
        await self.inner.flush()

    def set_breaker(self, peer: str, state: str) -> None:
        self._breakers[peer] = BREAKER_GAUGE.get(state, 2)
        self.breaker.set(self._breakers[peer], tags={"nation": self.nation, "peer": peer})

    def refresh(self) -> None:
        """Set every breaker gauge again: Ray drops a gauge series nobody set for two metrics report
        intervals (20 s by default), and breakers move rarely."""
        for peer, value in list(self._breakers.items()):
            self.breaker.set(value, tags={"nation": self.nation, "peer": peer})

    def close(self) -> None:
        self.inner.close()


class KasMetrics:
    """The replica-side metrics of one nation: HTTP answers, share cache, HSM calls, rate limits.

    One instance per replica, handed to the components that count (HTTP layer, HSM proxy, caches,
    rate limiter); each count is one in-process update with a small tag dict.
    """

    def __init__(self, nation: str, registry: MetricsRegistry | None = None) -> None:
        self.nation = nation
        m = registry or serve_metrics()
        self.http_requests = HTTP_REQUESTS.create(m)
        self.http_latency = HTTP_LATENCY.create(m)
        self.share_lookups = SHARE_CACHE_LOOKUPS.create(m)
        self.hsm_latency = HSM_CALL_LATENCY.create(m)
        self.hsm_errors = HSM_ERRORS.create(m)
        self.limited = RATE_LIMITED.create(m)

    def http_answer(self, route: str, status: int, error_code: str, seconds: float) -> None:
        """``route`` is a route template (bounded), ``error_code`` a kas-ray error class code or ""."""
        code = str(status)
        self.http_requests.inc(1, tags={"nation": self.nation, "route": route, "status": code,
                                        "error_code": error_code})
        self.http_latency.observe(seconds * 1e3, tags={"nation": self.nation, "route": route, "status": code})

    def share_lookup(self, result: CacheResult) -> None:
        self.share_lookups.inc(1, tags={"nation": self.nation, "result": result})

    def hsm_call(self, method: str, seconds: float, error: str | None) -> None:
        """One HSM actor call; ``error`` is None on success, else its kind (bounded)."""
        self.hsm_latency.observe(seconds * 1e3, tags={"nation": self.nation, "method": method})
        if error is not None:
            self.hsm_errors.inc(1, tags={"nation": self.nation, "method": method, "kind": error})

    def rate_limited(self, endpoint: str, dimension: str) -> None:
        self.limited.inc(1, tags={"nation": self.nation, "endpoint": endpoint, "dimension": dimension})

"""Prometheus metrics of a nation KAS, derived from its audit events.

Every key decision, refused request, forward and breaker transition is already an audit event;
:class:`MetricsAuditSink` counts them on their way to the audit file, so metrics and audit can
never disagree. Metrics go through Ray Serve's metrics API (exported by Ray's metrics agent for
Prometheus); tests pass an in-memory ``registry`` with the same three constructors.
"""

from __future__ import annotations

from typing import Any, Protocol

from kas_ray.audit import AuditAction, AuditEvent, AuditSink

#: Gauge value per breaker state (0 healthy ... 2 peer skipped).
BREAKER_GAUGE = {"closed": 0, "half_open": 1, "open": 2}
LATENCY_BOUNDARIES_MS: list[float] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


class MetricsRegistry(Protocol):
    def Counter(self, name: str, description: str = "", tag_keys: tuple[str, ...] | None = None) -> Any: ...  # noqa: N802

    def Gauge(self, name: str, description: str = "", tag_keys: tuple[str, ...] | None = None) -> Any: ...  # noqa: N802

    def Histogram(self, name: str, description: str = "", boundaries: list[float] | None = None,  # noqa: N802
                  tag_keys: tuple[str, ...] | None = None) -> Any: ...


def _serve_metrics() -> Any:
    from ray.serve import metrics

    return metrics


class MetricsAuditSink(AuditSink):
    """Forwards every event to ``inner`` (the durable audit) first, then updates the metrics."""

    def __init__(self, inner: AuditSink, nation: str, registry: MetricsRegistry | None = None) -> None:
        self.inner = inner
        self.nation = nation
        m = registry or _serve_metrics()
        self.decisions = m.Counter("kas_key_decisions_total", "Key decisions per KAO, by outcome",
                                   tag_keys=("nation", "action", "error_code"))
        self.rejections = m.Counter("kas_requests_rejected_total", "Requests refused before any KAO decision",
                                    tag_keys=("nation", "error_code"))
        self.latency = m.Histogram("kas_key_decision_latency_ms", "Latency of one KAO decision (ms)",
                                   boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("nation", "action"))
        self.forwards = m.Counter("kas_federation_forwards_total", "Forwards to peers, by result",
                                  tag_keys=("nation", "peer", "action"))
        self.breaker = m.Gauge("kas_federation_breaker_state", "Circuit breaker per peer: 0 closed, "
                               "1 half-open, 2 open", tag_keys=("nation", "peer"))

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
            self.breaker.set(BREAKER_GAUGE.get(event.decision, 2), tags={**tags, "peer": event.peer or ""})
        elif action in (AuditAction.FORWARD_RESULT, AuditAction.FORWARD_FAILED, AuditAction.FORWARD_CANCELLED):
            self.forwards.inc(1, tags={**tags, "peer": event.peer or "", "action": action.value})

    def close(self) -> None:
        self.inner.close()

"""Metrics are derived from audit events: every decision, rejection, forward and breaker move counts."""

from __future__ import annotations

from collections import Counter as Tally
from typing import Any

from kas_ray.audit import AuditAction, AuditEvent, MemoryAuditSink
from kas_ray.serve.metrics import BREAKER_GAUGE, MetricsAuditSink


class Recorder:
    """An in-memory stand-in for Ray Serve's metrics module (same constructors and methods)."""

    def __init__(self) -> None:
        self.values: dict[str, Tally[tuple[tuple[str, str], ...]]] = {}
        self.gauges: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        self.observed: dict[str, list[float]] = {}

    def _metric(self, name: str) -> Any:
        recorder = self

        class Metric:
            def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
                recorder.values.setdefault(name, Tally())[tuple(sorted((tags or {}).items()))] += value

            def set(self, value: float, tags: dict[str, str] | None = None) -> None:
                recorder.gauges.setdefault(name, {})[tuple(sorted((tags or {}).items()))] = value

            def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
                recorder.observed.setdefault(name, []).append(value)

        return Metric()

    def Counter(self, name: str, description: str = "", tag_keys: Any = None) -> Any:  # noqa: N802
        return self._metric(name)

    def Gauge(self, name: str, description: str = "", tag_keys: Any = None) -> Any:  # noqa: N802
        return self._metric(name)

    def Histogram(self, name: str, description: str = "", boundaries: Any = None, tag_keys: Any = None) -> Any:  # noqa: N802
        return self._metric(name)


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

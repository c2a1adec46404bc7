"""Audit events: one per key decision, written to a sink separate from the application log.

Events name what was decided and why; they never carry a token, a key or a DEK.
"""

from __future__ import annotations

import abc
import os
import threading
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, Field


class AuditAction(StrEnum):
    KEY_RELEASED = "KEY_RELEASED"
    KEY_DENIED = "KEY_DENIED"
    KEY_ERROR = "KEY_ERROR"
    REQUEST_REJECTED = "REQUEST_REJECTED"
    FORWARD_RESULT = "FORWARD_RESULT"
    FORWARD_FAILED = "FORWARD_FAILED"
    FORWARD_CANCELLED = "FORWARD_CANCELLED"
    BREAKER_TRANSITION = "BREAKER_TRANSITION"


class AuditEvent(BaseModel):
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    action: AuditAction
    request_id: str
    nation: str
    subject: str | None = None
    issuer: str | None = None
    kid: str | None = None
    kao_id: str | None = None
    #: The peer nation of a federation event.
    peer: str | None = None
    policy_uuid: str | None = None
    policy_digest: str | None = None
    decision: str
    reasons: list[str] = Field(default_factory=list)
    error_code: str | None = None
    latency_ms: float | None = None
    hops: list[str] = Field(default_factory=list)


class AuditSink(abc.ABC):
    @abc.abstractmethod
    def emit(self, event: AuditEvent) -> None:
        """Record ``event`` durably enough for this sink's guarantees."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release resources."""


class MemoryAuditSink(AuditSink):
    """Keeps events in a list: for tests and the library-level demo."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)


class JsonLinesAuditSink(AuditSink):
    """Appends one JSON object per line, flushed per event; the file is created 0600."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._fh = os.fdopen(fd, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def emit(self, event: AuditEvent) -> None:
        line = event.model_dump_json() + "\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            self._fh.close()


class FanoutAuditSink(AuditSink):
    """Sends every event to several sinks (e.g. the audit file and an in-memory view)."""

    def __init__(self, *sinks: AuditSink) -> None:
        self.sinks = sinks

    def emit(self, event: AuditEvent) -> None:
        for sink in self.sinks:
            sink.emit(event)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

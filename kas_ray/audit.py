"""Audit events: one per key decision, written to a sink separate from the application log.

Events name what was decided and why; they never carry a token, a key or a DEK.

The file sink (:class:`JsonLinesAuditSink`) writes a **hash chain** (docs/runbook.md, "Read and verify
the audit"; the threat model in docs/security.md):

* one JSON object per line, ``\\n``-terminated; every record carries ``seq`` (0, 1, 2, ... without gaps,
  continued across rotations) and ``prev``, the lowercase hex SHA-256 of the previous line's bytes
  (without its ``\\n``); the first record of a chain has ``prev`` = 64 zeros and ``seq`` 0;
* every record is written with one ``write`` by :meth:`JsonLinesAuditSink.emit` (if the write fails,
  ``emit`` raises and no key is released), and is on disk once :meth:`AuditSink.flush` returns: the
  rewrap service awaits ``flush`` before it answers, so a key is only handed out after its decision is
  on disk. One fsync covers every record written before it (group commit): a request's several
  records, and those of concurrent requests. No window is added: a lone request pays one fsync, as
  before (about 0.2-0.3 ms on the test VM); if the fsync fails, ``flush`` raises and the request's
  keys are not answered;
* several processes (the replicas of one nation) append to one file: each append holds an exclusive
  ``flock`` on ``.<file>.lock`` (next to it) while it reads the chain head and appends;
* rotation (by size, or on demand with ``kas-ray audit rotate``) renames the file to
  ``<file>.<UTC timestamp>`` and starts a new one whose first record, ``AUDIT_ROTATED``, names the
  rotated file (``rotated_from``) and chains to its last line;
* :func:`verify_chain` (``kas-ray audit verify``) finds the first record that breaks the chain.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

log = logging.getLogger(__name__)

#: ``prev`` of the first record of a chain.
GENESIS = "0" * 64
_HEX64 = re.compile(r"[0-9a-f]{64}")


class AuditAction(StrEnum):
    KEY_RELEASED = "KEY_RELEASED"
    KEY_DENIED = "KEY_DENIED"
    KEY_ERROR = "KEY_ERROR"
    REQUEST_REJECTED = "REQUEST_REJECTED"
    FORWARD_RESULT = "FORWARD_RESULT"
    FORWARD_FAILED = "FORWARD_FAILED"
    FORWARD_CANCELLED = "FORWARD_CANCELLED"
    BREAKER_TRANSITION = "BREAKER_TRANSITION"
    #: First record of an audit file that continues a rotated one (``rotated_from``).
    AUDIT_ROTATED = "AUDIT_ROTATED"


class AuditEvent(BaseModel):
    #: Position in the hash chain (set by the file sink; None in memory).
    seq: int | None = None
    #: SHA-256 (hex) of the previous line of the chain (set by the file sink).
    prev: str | None = None
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
    #: ``AUDIT_ROTATED`` only: the file name (no directory) of the file this one continues.
    rotated_from: str | None = None


class AuditSink(abc.ABC):
    @abc.abstractmethod
    def emit(self, event: AuditEvent) -> None:
        """Record ``event``; raise if it cannot be recorded (the caller then releases nothing)."""

    async def flush(self) -> None:  # noqa: B027 - optional hook
        """Return once every event emitted so far is as durable as this sink makes it; raise if it is not."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release resources."""


class MemoryAuditSink(AuditSink):
    """Keeps events in a list: for tests and the library-level demo."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)


def line_hash(line: bytes) -> str:
    """The chain hash of one audit line: SHA-256 of its bytes without the terminating newline."""
    return hashlib.sha256(line.removesuffix(b"\n")).hexdigest()


def _chained(line: bytes) -> int | None:
    """``seq`` of a well-formed chained record, else None (a torn write, or an unchained legacy line)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    seq, prev = record.get("seq"), record.get("prev")
    if type(seq) is not int or not isinstance(prev, str) or not _HEX64.fullmatch(prev):
        return None
    return seq


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Head:
    """What this process knows of the chain: the file it has open and the last record in it."""

    ino: tuple[int, int]  # (st_dev, st_ino) of the open file
    end: int  # file size after our last read or write
    hash: str  # line_hash of the last record
    seq: int


class JsonLinesAuditSink(AuditSink):
    """Hash-chained JSON lines, fsynced by :meth:`flush`, safe for several writer processes; files are 0600.

    ``max_bytes``: rotate once the file reaches this size (None: only on demand, :meth:`rotate`).
    """

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int | None = None,
                 nation: str | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.nation = (nation or self.path.name.split(".")[0]).upper()
        #: Held (``flock``) around every append and rotation, by every process writing ``path``.
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        self._lock = threading.Lock()
        self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._fd: int | None = None
        self._head: _Head | None = None
        #: Group commit: records this process wrote, and how many of them an fsync has covered.
        self._written = 0
        self._synced = 0
        with self._lock, self._flock():
            self._open()

    # --- public -------------------------------------------------------------------------------------
    def emit(self, event: AuditEvent) -> None:
        with self._lock, self._flock():
            self._sync()
            self._append(event)
            if self.max_bytes is not None and self._head is not None and self._head.end >= self.max_bytes:
                self._rotate(f"size limit of {self.max_bytes} bytes reached")

    async def flush(self) -> None:
        self._fsync_written()

    def flush_sync(self) -> None:
        """:meth:`flush` for callers without an event loop."""
        self._fsync_written()

    def rotate(self, reason: str = "operator request") -> Path | None:
        """Rotate now; returns the rotated file (None when the file has no record yet)."""
        with self._lock, self._flock():
            self._sync()
            if self._head is None or self._head.end == 0:
                return None
            return self._rotate(reason)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.flush_sync()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    # --- group commit ---------------------------------------------------------------------------------
    def _fsync_written(self) -> None:
        """fsync once for every record written so far, unless an fsync since the last write covered them.

        Inline, not on a thread: handing each fsync to a thread and back cost ~0.2 ms more CPU than the
        fsync itself on the test VM, and records are shared anyway: those every request wrote before
        this flush (its own several, and others' written while they awaited peers) go to disk together.
        """
        with self._lock:
            upto = self._written
            if self._synced >= upto:
                return
            if self._fd is None:
                raise ValueError(f"audit sink {self.path} is closed")
            os.fsync(self._fd)
            self._synced = upto

    # --- internals (called with both locks held) -------------------------------------------------------
    @contextlib.contextmanager
    def _flock(self) -> Iterator[None]:
        if self._lock_fd < 0:
            raise ValueError(f"audit sink {self.path} is closed")
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _open(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        if created:
            _fsync_dir(self.path.parent)

    def _identity(self, st: os.stat_result) -> tuple[int, int]:
        return st.st_dev, st.st_ino

    def _sync(self) -> None:
        """Bring ``_head`` up to date with the file on disk (other processes append and rotate)."""
        try:
            on_disk: tuple[int, int] | None = self._identity(os.stat(self.path))
        except FileNotFoundError:
            on_disk = None
        assert self._fd is not None
        if on_disk is None or on_disk != self._identity(os.fstat(self._fd)):
            self._open()  # rotated (or removed) by someone else
        assert self._fd is not None
        st = os.fstat(self._fd)
        ident, size = self._identity(st), st.st_size
        head = self._head
        if head is not None and head.ino == ident and head.end == size:
            return  # nobody wrote since our last append: the cached head is exact
        if head is not None and head.ino == ident and size < head.end:
            # Writers only append: the file was truncated. Keep chaining to the record we wrote
            # last, so that ``verify`` shows the gap instead of the chain silently skipping it.
            log.error("audit file %s shrank from %d to %d bytes: chaining to the last known record",
                      self.path, head.end, size)
            self._terminate_partial_line(size)
            self._head = _Head(ident, os.fstat(self._fd).st_size, head.hash, head.seq)
            return
        if size == 0:
            # A new file: a fresh chain, unless this process remembers one (the file was removed
            # behind our back: the next record then shows the break).
            self._head = _Head(ident, 0, head.hash, head.seq) if head is not None else None
            return
        last = self._last_line(size)
        seq = _chained(last) if last.endswith(b"\n") else None
        if seq is None:
            # A torn write (a crash mid-record) or a file from before the chain: set it aside
            # untouched and start a file that names it, chained to its last bytes.
            self._head = _Head(ident, size, line_hash(last), head.seq if head is not None else -1)
            kind = "ends in an incomplete record" if not last.endswith(b"\n") else "is not hash-chained"
            self._rotate(f"previous file {kind}")
            return
        self._head = _Head(ident, size, line_hash(last), seq)

    def _terminate_partial_line(self, size: int) -> None:
        assert self._fd is not None
        if size and os.pread(self._fd, 1, size - 1) != b"\n":
            os.write(self._fd, b"\n")

    def _last_line(self, size: int) -> bytes:
        """The last line of the open file (with its newline, if it has one)."""
        assert self._fd is not None
        end = size - 1 if os.pread(self._fd, 1, size - 1) == b"\n" else size
        buf, pos = b"", end
        while pos > 0:
            step = min(8192, pos)
            pos -= step
            buf = os.pread(self._fd, step, pos) + buf
            cut = buf.rfind(b"\n")
            if cut >= 0:
                buf = buf[cut + 1:]
                break
        return buf + (b"\n" if end < size else b"")

    def _append(self, event: AuditEvent) -> None:
        assert self._fd is not None
        head = self._head
        prev, seq = (head.hash, head.seq + 1) if head is not None else (GENESIS, 0)
        line = event.model_copy(update={"seq": seq, "prev": prev}).model_dump_json().encode() + b"\n"
        written = os.write(self._fd, line)  # O_APPEND: one write, at the end
        if written != len(line):
            raise OSError(f"short write to the audit file {self.path} ({written} of {len(line)} bytes)")
        self._written += 1  # on disk at the next fsync (flush)
        st = os.fstat(self._fd)
        self._head = _Head(self._identity(st), st.st_size, line_hash(line), seq)

    def _rotate(self, reason: str) -> Path:
        """Rename the file aside and start a new one whose first record chains to its last line."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        rotated = self.path.with_name(f"{self.path.name}.{stamp}")
        n = 0
        while rotated.exists():
            n += 1
            rotated = self.path.with_name(f"{self.path.name}.{stamp}-{n}")
        assert self._fd is not None
        os.fsync(self._fd)
        os.rename(self.path, rotated)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        os.close(self._fd)
        self._fd = fd
        head = self._head
        if head is not None:  # keep the chain: the new file starts where the old one ended
            self._head = _Head(self._identity(os.fstat(fd)), 0, head.hash, head.seq)
        self._append(AuditEvent(action=AuditAction.AUDIT_ROTATED, request_id=uuid.uuid4().hex, nation=self.nation,
                                decision="rotated", reasons=[reason], rotated_from=rotated.name))
        _fsync_dir(self.path.parent)
        log.info("audit file %s rotated to %s (%s)", self.path, rotated.name, reason)
        return rotated


class FanoutAuditSink(AuditSink):
    """Sends every event to several sinks (e.g. the audit file and an in-memory view)."""

    def __init__(self, *sinks: AuditSink) -> None:
        self.sinks = sinks

    def emit(self, event: AuditEvent) -> None:
        for sink in self.sinks:
            sink.emit(event)

    async def flush(self) -> None:
        for sink in self.sinks:
            await sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


# --- verification -----------------------------------------------------------------------------------
def rotated_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files rotated away from the live audit file ``path``, oldest first (``<name>.<UTC timestamp>``)."""
    live = Path(path)
    pattern = re.compile(re.escape(live.name) + r"\.\d{8}T\d{12}Z(?:-\d+)?")
    found = [p for p in live.parent.iterdir() if pattern.fullmatch(p.name)]

    def order(p: Path) -> tuple[str, int]:
        stamp, _, n = p.name[len(live.name) + 1:].partition("-")
        return stamp, int(n or 0)

    return sorted(found, key=order)


@dataclass
class ChainError:
    """The first line that breaks the chain: file, 1-based line number, why, and the line itself."""

    path: str
    line_no: int
    reason: str
    line: bytes

    def __str__(self) -> str:
        return f"{self.path}:{self.line_no}: {self.reason}"


@dataclass
class ChainReport:
    files: list[str]
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    #: line_hash of the last record: record it elsewhere and pass it back as an anchor.
    head: str | None = None
    error: ChainError | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


class _Broken(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _record(line: bytes) -> dict[str, Any]:
    if not line.endswith(b"\n"):
        raise _Broken("incomplete record (no terminating newline): the file was truncated or a write was torn")
    try:
        record = json.loads(line)
    except ValueError:
        raise _Broken("not a JSON object") from None
    if not isinstance(record, dict):
        raise _Broken("not a JSON object")
    seq, prev = record.get("seq"), record.get("prev")
    if type(seq) is not int or not isinstance(prev, str) or not _HEX64.fullmatch(prev):
        raise _Broken("not a hash-chained record (seq and prev missing or malformed)")
    try:
        AuditEvent.model_validate(record)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise _Broken(f"not an audit event: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None
    return record


def _record_boundary(path: Path, fd: int) -> int:
    """The size of the open file at a moment no writer is mid-record (under a brief shared ``flock``
    when a writer's lock file is there: a live file), so a record being appended is not read half-way."""
    try:
        lock_fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDONLY)
    except OSError:
        return os.fstat(fd).st_size  # a rotated file: nobody writes it any more
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_SH)
        return os.fstat(fd).st_size
    finally:
        os.close(lock_fd)  # closing releases the lock


def verify_chain(paths: Sequence[str | os.PathLike[str]], *,
                 anchors: Sequence[tuple[int, str]] = ()) -> ChainReport:
    """Check that ``paths`` (oldest first: rotated files, then the live one) form one unbroken chain.

    Stops at the first bad line. ``anchors`` are (seq, hash) pairs recorded earlier (``head`` of a
    previous report): they also catch an edited last record or a chain rewritten from some point on.
    """
    report = ChainReport(files=[str(p) for p in paths])
    wanted = dict(anchors)
    seen: set[int] = set()
    last_hash: str | None = None
    last_seq: int | None = None
    previous: Path | None = None
    previous_records = 0
    for raw_path in paths:
        path = Path(raw_path)
        line_no = file_records = consumed = 0
        with open(path, "rb") as fh:
            limit = _record_boundary(path, fh.fileno())
            for line in fh:
                if consumed >= limit:
                    break  # appended after we started: the next verify sees it
                consumed += len(line)
                line_no += 1
                try:
                    record = _record(line)
                    seq, prev = int(record["seq"]), str(record["prev"])
                    rotation = record.get("action") == AuditAction.AUDIT_ROTATED.value
                    if line_no == 1 and previous is not None:
                        if not rotation or record.get("rotated_from") != previous.name:
                            raise _Broken(f"does not continue {previous.name}: the first record of a later file "
                                          f"must be AUDIT_ROTATED with rotated_from={previous.name!r}")
                        if previous_records == 0:
                            raise _Broken(f"continues {previous.name}, which has no record")
                        if prev != last_hash:
                            raise _Broken(f"broken rotation link: prev is not the hash of the last line of "
                                          f"{previous.name} (that line was edited or removed)")
                    elif line_no == 1:
                        if rotation:
                            report.notes.append(f"{path.name} continues {record.get('rotated_from')}, which was "
                                                "not given: that link was not checked")
                        elif prev != GENESIS or seq != 0:
                            raise _Broken("the first record neither starts a chain (seq 0, prev 000...) nor "
                                          "continues a rotated file: earlier records were removed")
                    else:
                        if rotation:
                            raise _Broken("an AUDIT_ROTATED record in the middle of a file")
                        if prev != last_hash:
                            raise _Broken(f"prev is not the hash of line {line_no - 1}: a record was edited, "
                                          "removed, inserted or reordered")
                    if last_seq is not None and seq != last_seq + 1:
                        raise _Broken(f"seq {seq} does not follow {last_seq}")
                    digest = line_hash(line)
                    if seq in wanted and wanted[seq] != digest:
                        raise _Broken(f"record seq {seq} does not match its anchor {wanted[seq][:16]}...")
                except _Broken as exc:
                    report.error = ChainError(str(path), line_no, exc.reason, line)
                    return report
                seen.add(seq)
                last_hash, last_seq = digest, seq
                if report.first_seq is None:
                    report.first_seq = seq
                report.records += 1
                file_records += 1
        if file_records == 0:
            report.notes.append(f"{path.name} has no record")
        previous, previous_records = path, file_records
    report.last_seq, report.head = last_seq, last_hash
    missing = sorted(set(wanted) - seen)
    if missing:
        where = report.files[-1] if report.files else "-"
        report.error = ChainError(where, 0, f"anchored record seq {missing[0]} is not in these files", b"")
    return report

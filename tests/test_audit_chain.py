"""Durable, tamper-evident audit: the hash chain of JsonLinesAuditSink and ``kas-ray audit verify``.

* a real workload (library level: build_local_services) leaves a chain that verifies, every record
  fsynced before the rewrap returned, and an audit write that fails releases no key;
* each kind of tampering (edit, delete, insert, swap, truncate, first line removed, rotation link broken,
  last record edited with an anchor) is found at the right line, by the library and by the CLI;
* rotation by size and on demand chains files together; a torn or unchained file is set aside;
* several threads and several processes appending to one file keep one valid chain (flock);
* on Ray (``serve`` in the name, so the non-Ray selection skips it): the cluster's audit files verify.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kas_ray import cli
from kas_ray.audit import (
    GENESIS,
    AuditAction,
    AuditEvent,
    AuditSink,
    JsonLinesAuditSink,
    line_hash,
    rotated_files,
    verify_chain,
)
from kas_ray.client import KasClient, LocalTransport
from kas_ray.config import AbacConfig
from kas_ray.errors import AccessDenied, TokenError
from kas_ray.kas.local import build_local_services, nation_url
from kas_ray.keys.software import PASSPHRASE_ENV, PASSPHRASE_FILE_ENV
from kas_ray.policy import attribute_fqn
from kas_ray.trust import DevIdentityProvider
from kas_ray.ztdf import Policy, decrypt, encrypt

NATIONS = ["USA", "FRA"]
BASE = "http://127.0.0.1:8000"
CONFIG = AbacConfig()
REPO = Path(__file__).resolve().parents[1]


def event(i: int, **kw: object) -> AuditEvent:
    fields: dict[str, object] = {"action": AuditAction.KEY_DENIED, "request_id": f"req-{i}", "nation": "USA",
                                 "subject": f"user-{i}", "decision": "deny", "reasons": [f"reason {i}"]}
    return AuditEvent.model_validate({**fields, **kw})


def write_chain(path: Path, n: int, **sink_kw: object) -> Path:
    sink = JsonLinesAuditSink(path, **sink_kw)  # type: ignore[arg-type]
    try:
        for i in range(n):
            sink.emit(event(i))
    finally:
        sink.close()
    return path


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def chain(path: Path) -> list[Path]:
    return [*rotated_files(path), path]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# --- the format ------------------------------------------------------------------------------------------
def test_record_format_and_permissions(tmp_path: Path) -> None:
    path = write_chain(tmp_path / "usa.jsonl", 3)
    raw = lines(path)
    records = [json.loads(line) for line in raw]
    assert [r["seq"] for r in records] == [0, 1, 2]
    assert records[0]["prev"] == GENESIS
    assert records[1]["prev"] == line_hash(raw[0]) and records[2]["prev"] == line_hash(raw[1])
    assert list(records[0])[:2] == ["seq", "prev"]  # the chain fields lead every line
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in raw)
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / ".usa.jsonl.lock").stat().st_mode & 0o777 == 0o600
    # a new sink on the same file continues the chain
    write_chain(path, 2)
    report = verify_chain([path])
    assert report.ok and report.records == 5 and (report.first_seq, report.last_seq) == (0, 4)
    assert report.head == line_hash(lines(path)[-1])


# --- a real workload -------------------------------------------------------------------------------------
@dataclass
class Coalition:
    state: Path
    transport: LocalTransport
    audit_file: Path
    sink: JsonLinesAuditSink

    def token(self, nation: str, sub: str, clearance: str) -> str:
        return DevIdentityProvider(self.state, nation).mint(sub, clearance)

    def seal(self, nation: str, data: bytes, rel: list[str]) -> bytes:
        key = KasClient(self.transport, use_dpop=False).public_key(nation_url(BASE, nation))
        attrs = [attribute_fqn(CONFIG, "classification", "SECRET")]
        attrs += [attribute_fqn(CONFIG, "releasable-to", n) for n in rel]
        out = io.BytesIO()
        encrypt(io.BytesIO(data), out, splits=[[key]], policy=Policy.create(attrs))
        return out.getvalue()


def open_tdf(tdf: bytes, client: KasClient) -> bytes:
    out = io.BytesIO()
    decrypt(io.BytesIO(tdf), out, client)
    return out.getvalue()


@pytest.fixture(scope="module")
def co(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coalition]:
    state = tmp_path_factory.mktemp("audit-coalition")
    audit_file = state / "audit" / "coalition.jsonl"
    sink = JsonLinesAuditSink(audit_file)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(PASSPHRASE_ENV, raising=False)
        mp.delenv(PASSPHRASE_FILE_ENV, raising=False)
        services = build_local_services(state, NATIONS, base_url=BASE, audit=sink)
    transport = LocalTransport(services)
    yield Coalition(state=state, transport=transport, audit_file=audit_file, sink=sink)
    transport.close()
    sink.close()


class FsyncSpy:
    """Wraps os.fsync: records the size of each file it syncs (so a test knows what was durable when)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.synced: list[tuple[int, int]] = []  # (inode, size at fsync)
        real = os.fsync

        def fsync(fd: int) -> None:
            real(fd)
            st = os.fstat(fd)
            self.synced.append((st.st_ino, st.st_size))

        monkeypatch.setattr(os, "fsync", fsync)

    def durable_size(self, path: Path) -> int:
        ino = path.stat().st_ino
        return max((size for i, size in self.synced if i == ino), default=0)


def test_workload_chain_verifies_and_every_record_is_fsynced_before_the_key_returns(
        co: Coalition, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    spy = FsyncSpy(monkeypatch)
    before = len(lines(co.audit_file))
    secrets: list[bytes] = []
    for nation in NATIONS:
        data = f"for {nation}".encode() * 20
        tdf = co.seal(nation, data, rel=NATIONS)
        token = co.token(nation, f"chain-{nation}", "SECRET")
        secrets.append(token.encode())
        fsyncs = len(spy.synced)
        assert open_tdf(tdf, KasClient(co.transport, token)) == data
        # the KEY_RELEASED record was on disk before the key came back
        assert len(spy.synced) == fsyncs + 1
        assert spy.durable_size(co.audit_file) == co.audit_file.stat().st_size
        assert json.loads(lines(co.audit_file)[-1])["action"] == "KEY_RELEASED"
        # denied (not releasable to GBR) and rejected (no token) requests are chained too
        gbr_only = co.seal(nation, b"x", rel=["GBR"])
        with pytest.raises(AccessDenied):
            open_tdf(gbr_only, KasClient(co.transport, token))
        with pytest.raises(TokenError):
            co.transport.rewrap(nation_url(BASE, nation), {}, {})
    new = [json.loads(line) for line in lines(co.audit_file)[before:]]
    assert [e["action"] for e in new] == ["KEY_RELEASED", "KEY_DENIED", "REQUEST_REJECTED"] * len(NATIONS)
    assert len(spy.synced) == len(new)
    report = verify_chain([co.audit_file])
    assert report.ok, report.error
    assert report.records == len(lines(co.audit_file)) and report.last_seq == report.records - 1
    text = co.audit_file.read_bytes()
    assert not [s for s in secrets if s in text]  # no token in the audit
    code, out, err = run_cli(capsys, "audit", "verify", co.audit_file)
    assert code == 0 and f"ok: {report.records} records" in out and f"head: {report.last_seq}:{report.head}" in out


class FailingSink(AuditSink):
    """An audit sink whose disk is full."""

    def __init__(self, inner: AuditSink) -> None:
        self.inner = inner

    def emit(self, event: AuditEvent) -> None:
        if event.action is AuditAction.KEY_RELEASED:
            raise OSError(28, "No space left on device")
        self.inner.emit(event)


def test_a_key_decision_that_cannot_be_audited_releases_nothing(co: Coalition) -> None:
    service = next(s for s in co.transport._services.values() if s.nation == "USA")
    tdf = co.seal("USA", b"must stay closed", rel=NATIONS)
    original = service.audit
    service.audit = FailingSink(original)
    try:
        with pytest.raises(OSError, match="No space left"):
            open_tdf(tdf, KasClient(co.transport, co.token("USA", "nospace", "SECRET")))
    finally:
        service.audit = original


def test_a_key_decision_whose_fsync_fails_releases_nothing(co: Coalition, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record is written but the disk cannot make it durable: the rewrap fails, no key comes back."""
    tdf = co.seal("USA", b"must stay closed", rel=NATIONS)
    token = co.token("USA", "eio", "SECRET")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        open_tdf(tdf, KasClient(co.transport, token))
    assert json.loads(lines(co.audit_file)[-1])["action"] == "KEY_RELEASED"  # written, never confirmed
    monkeypatch.undo()
    assert open_tdf(tdf, KasClient(co.transport, token)) == b"must stay closed"


def test_concurrent_requests_share_fsyncs_and_each_flush_returns_after_its_own_record_is_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commit: 40 requests that each write a record, await something (a peer, say) and flush need
    a few fsyncs, not 40; none of them returns before an fsync that covers its record."""
    spy = FsyncSpy(monkeypatch)
    path = tmp_path / "usa.jsonl"
    sink = JsonLinesAuditSink(path)

    async def request(i: int) -> tuple[int, int]:
        await asyncio.sleep(0.001 * (i % 3))  # requests arrive at different times
        sink.emit(event(i))
        mine = path.stat().st_size  # the file's end once my record is in
        await asyncio.sleep(0.001 * (i % 4))
        await sink.flush()
        return mine, spy.durable_size(path)

    async def main() -> list[tuple[int, int]]:
        return await asyncio.gather(*(request(i) for i in range(40)))

    answers = asyncio.run(main())
    assert all(durable >= mine for mine, durable in answers)  # nobody answered before its record was on disk
    assert 1 <= len(spy.synced) <= 8  # one per group of requests that flush together, not one per record
    sink.close()
    assert verify_chain([path]).records == 40


# --- tampering -------------------------------------------------------------------------------------------
def _edit(raw: list[bytes], i: int) -> list[bytes]:
    record = json.loads(raw[i])
    record["decision"] = "permit"  # the classic: turn a denial into a release
    raw[i] = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    return raw


def _forge(raw: list[bytes], i: int) -> list[bytes]:
    """Insert a record whose prev is computed correctly: the one after it still breaks."""
    forged = json.loads(raw[i])
    forged["prev"] = line_hash(raw[i - 1])
    forged["request_id"] = "forged"
    return [*raw[:i], json.dumps(forged, separators=(",", ":")).encode() + b"\n", *raw[i:]]


#: name -> (tamper(lines) -> lines, 1-based bad line, words in the reason); 10 records, lines 1..10
TAMPERS: dict[str, tuple[Callable[[list[bytes]], list[bytes]], int, str]] = {
    "edit a field": (lambda r: _edit(r, 3), 5, "prev is not the hash of line 4"),
    "edit the first line": (lambda r: _edit(r, 0), 2, "prev is not the hash of line 1"),
    "delete a line": (lambda r: r[:3] + r[4:], 4, "prev is not the hash of line 3"),
    "delete the first line": (lambda r: r[1:], 1, "earlier records were removed"),
    "insert a copied line": (lambda r: [*r[:4], r[1], *r[4:]], 5, "prev is not the hash of line 4"),
    "insert a forged line": (lambda r: _forge(r, 4), 6, "prev is not the hash of line 5"),
    "swap two lines": (lambda r: [*r[:3], r[4], r[3], *r[5:]], 4, "prev is not the hash of line 3"),
    "truncate the last line": (lambda r: [*r[:-1], r[-1][:40]], 10, "incomplete record"),
    "drop the last newline": (lambda r: [*r[:-1], r[-1][:-1]], 10, "incomplete record"),
    "garbage line": (lambda r: [*r[:6], b"not json\n", *r[6:]], 7, "not a JSON object"),
    "remove the chain fields": (lambda r: [*r[:2], json.dumps({k: v for k, v in json.loads(r[2]).items()
                                                              if k not in ("seq", "prev")}).encode() + b"\n",
                                           *r[3:]], 3, "not a hash-chained record"),
}


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_tampering_is_found_at_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    tamper, bad_line, reason = TAMPERS[name]
    path = write_chain(tmp_path / "usa.jsonl", 10)
    assert verify_chain([path]).ok
    tampered = tamper(lines(path))
    path.write_bytes(b"".join(tampered))
    report = verify_chain([path])
    assert report.error is not None, name
    assert report.error.line_no == bad_line and reason in report.error.reason, str(report.error)
    assert report.error.line == tampered[bad_line - 1]
    code, out, err = run_cli(capsys, "audit", "verify", path)
    assert code == cli.EXIT_TAMPERED and out == ""
    assert f"{path}:{bad_line}: " in err and reason in err
    assert f"  line {bad_line}: " in err  # the bad line itself is printed


def test_edited_last_record_needs_an_anchor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing follows the last record, and the chain carries no secret: an anchor (a head noted
    elsewhere) is what catches an edit of the last record, or a chain rewritten from some record on."""
    path = write_chain(tmp_path / "usa.jsonl", 6)
    noted = verify_chain([path])
    assert noted.ok and noted.last_seq == 5 and noted.head
    write_chain(path, 2)  # the file grows after the head was noted
    head = verify_chain([path], anchors=[(5, noted.head)])
    assert head.ok and head.last_seq == 7 and head.head
    saved = path.read_bytes()

    path.write_bytes(b"".join(_edit(lines(path), 7)))  # the last record
    assert verify_chain([path]).ok  # the limit of a bare chain
    report = verify_chain([path], anchors=[(7, head.head)])
    assert report.error is not None and report.error.line_no == 8 and "anchor" in report.error.reason

    path.write_bytes(saved)  # rewrite from record 5 on, with correct hashes
    raw = _edit(lines(path), 5)
    for i in range(6, len(raw)):
        record = json.loads(raw[i])
        record["prev"] = line_hash(raw[i - 1])
        raw[i] = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(raw))
    assert verify_chain([path]).ok
    report = verify_chain([path], anchors=[(5, noted.head)])
    assert report.error is not None and report.error.line_no == 6 and "anchor" in report.error.reason
    code, _, err = run_cli(capsys, "audit", "verify", path, "--anchor", f"5:{noted.head}")
    assert code == cli.EXIT_TAMPERED and f"{path}:6: record seq 5 does not match its anchor" in err
    # an anchor past the end (records cut off at the end)
    report = verify_chain([path], anchors=[(99, noted.head)])
    assert report.error is not None and "seq 99 is not in these files" in report.error.reason


# --- rotation --------------------------------------------------------------------------------------------
def test_rotation_by_size_and_on_demand_chains_the_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_chain(tmp_path / "fra.jsonl", 30, max_bytes=4096)
    rotated = rotated_files(path)
    assert len(rotated) >= 2 and all(p.stat().st_size >= 4096 for p in rotated)
    first = json.loads(lines(path)[0])
    assert first["action"] == "AUDIT_ROTATED" and first["rotated_from"] == rotated[-1].name
    assert first["nation"] == "FRA" and "size limit" in first["reasons"][0]
    assert first["prev"] == line_hash(lines(rotated[-1])[-1])
    report = verify_chain(chain(path))
    assert report.ok and report.records == 30 + len(rotated) and report.first_seq == 0
    # the live file alone verifies, noting the link it could not check
    alone = verify_chain([path])
    assert alone.ok and alone.notes and rotated[-1].name in alone.notes[0]
    # on demand, through the CLI, while a writer has the file open
    writer = JsonLinesAuditSink(path)
    code, out, _ = run_cli(capsys, "audit", "rotate", path, "--reason", "end of shift")
    assert code == 0 and Path(out.strip()).name == rotated_files(path)[-1].name
    writer.emit(event(99))  # the writer follows the new file
    writer.close()
    assert [json.loads(line)["action"] for line in lines(path)] == ["AUDIT_ROTATED", "KEY_DENIED"]
    assert json.loads(lines(path)[0])["reasons"] == ["end of shift"]
    code, out, err = run_cli(capsys, "audit", "verify", "--with-rotated", path)
    assert code == 0 and f"in {len(rotated) + 2} file(s), seq 0..{report.last_seq + 2}" in out, err


def _rotated_pair(tmp_path: Path) -> tuple[Path, Path]:
    path = write_chain(tmp_path / "gbr.jsonl", 5)
    sink = JsonLinesAuditSink(path)
    old = sink.rotate()
    sink.emit(event(5))
    sink.close()
    assert old is not None and verify_chain([old, path]).ok
    return old, path


def test_broken_rotation_links_are_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, path = _rotated_pair(tmp_path)
    saved_old, saved_new = old.read_bytes(), path.read_bytes()

    def check(files: list[Path], where: Path, line_no: int, reason: str) -> None:
        report = verify_chain(files)
        assert report.error is not None and (report.error.path, report.error.line_no) == (str(where), line_no)
        assert reason in report.error.reason, report.error
        code, _, err = run_cli(capsys, "audit", "verify", *files)
        assert code == cli.EXIT_TAMPERED and f"{where}:{line_no}: " in err
        old.write_bytes(saved_old)
        path.write_bytes(saved_new)

    old.write_bytes(b"".join(_edit(lines(old), 4)))  # the last line of the rotated file
    check([old, path], path, 1, "broken rotation link")
    old.write_bytes(b"".join(lines(old)[:-1]))  # ... or removed
    check([old, path], path, 1, "broken rotation link")
    path.write_bytes(b"".join(lines(path)[1:]))  # the rotation record removed
    check([old, path], path, 1, f"does not continue {old.name}")
    check([path, old], old, 1, f"does not continue {path.name}")  # wrong order
    other = write_chain(tmp_path / "usa.jsonl", 2)
    check([other, path], path, 1, f"does not continue {other.name}")  # not the file it continues
    empty = tmp_path / old.name
    old.write_bytes(b"")
    check([empty, path], path, 1, "which has no record")


def test_torn_or_unchained_file_is_set_aside(tmp_path: Path) -> None:
    path = write_chain(tmp_path / "usa.jsonl", 3)
    with open(path, "ab") as fh:
        fh.write(b'{"seq":3,"prev":"')  # a crash in the middle of a record
    write_chain(path, 2)
    (torn,) = rotated_files(path)
    assert verify_chain([torn]).error.line_no == 4  # type: ignore[union-attr]  # the evidence stays
    first = json.loads(lines(path)[0])
    assert first["rotated_from"] == torn.name and "incomplete record" in first["reasons"][0]
    assert first["prev"] == line_hash(lines(torn)[-1])
    assert verify_chain([path]).ok and verify_chain([path]).records == 3
    # a file from before the chain (legacy unchained lines) is set aside the same way
    legacy = tmp_path / "fra.jsonl"
    legacy.write_text(event(0).model_dump_json(exclude={"seq", "prev"}) + "\n")
    write_chain(legacy, 1)
    assert verify_chain([legacy]).ok
    assert "not hash-chained" in json.loads(lines(legacy)[0])["reasons"][0]


def test_a_running_writer_does_not_hide_a_truncation(tmp_path: Path) -> None:
    path = tmp_path / "usa.jsonl"
    sink = JsonLinesAuditSink(path)
    for i in range(5):
        sink.emit(event(i))
    raw = lines(path)
    path.write_bytes(b"".join(raw[:3]) + raw[3][:10])  # the last records cut off (mid-line)
    sink.emit(event(5))
    sink.close()
    report = verify_chain([path])
    assert report.error is not None and report.error.line_no == 4


# --- several writers -------------------------------------------------------------------------------------
def test_threads_and_two_sinks_in_one_process_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "usa.jsonl"
    sinks = [JsonLinesAuditSink(path, max_bytes=16384), JsonLinesAuditSink(path, max_bytes=16384)]

    def work(t: int) -> None:
        for i in range(40):
            sinks[t % 2].emit(event(t * 1000 + i))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    for sink in sinks:
        sink.close()
    report = verify_chain(chain(path))
    assert report.ok, report.error
    records = [json.loads(line) for p in chain(path) for line in lines(p)]
    ids = [r["request_id"] for r in records if r["action"] == "KEY_DENIED"]
    assert sorted(ids) == sorted(f"req-{t * 1000 + i}" for t in range(6) for i in range(40))
    assert [r["seq"] for r in records] == list(range(len(records)))


WRITER = textwrap.dedent("""
    import sys, threading
    from kas_ray.audit import AuditAction, AuditEvent, JsonLinesAuditSink
    path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sink = JsonLinesAuditSink(path, max_bytes=32768)
    def work(t):
        for i in range(n):
            sink.emit(AuditEvent(action=AuditAction.KEY_RELEASED, request_id=f"{tag}-{t}-{i}", nation="USA",
                                 decision="permit"))
    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for th in threads: th.start()
    for th in threads: th.join()
    sink.close()
""")


def test_two_processes_append_to_one_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two replica processes (two threads each) write one nation's file, rotating it by size."""
    path = tmp_path / "usa.jsonl"
    n = 150
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag, str(n)], cwd=REPO)  # noqa: S603
             for tag in ("a", "b")]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    files = chain(path)
    assert len(files) >= 3  # both processes rotated and followed each other's rotations
    report = verify_chain(files)
    assert report.ok, report.error
    records = [json.loads(line) for p in files for line in lines(p)]
    released = sorted(r["request_id"] for r in records if r["action"] == "KEY_RELEASED")
    assert released == sorted(f"{tag}-{t}-{i}" for tag in ("a", "b") for t in range(2) for i in range(n))
    assert report.records == len(records) and report.last_seq == len(records) - 1
    code, out, _ = run_cli(capsys, "audit", "verify", "--with-rotated", path)
    assert code == 0 and f"ok: {len(records)} records in {len(files)} file(s)" in out


# --- on Ray ----------------------------------------------------------------------------------------------
def test_serve_cluster_audit_files_verify(kas_cluster) -> None:  # type: ignore[no-untyped-def]
    """The replicas' audit files of the session cluster form valid chains (after a rejected request)."""
    import httpx

    response = httpx.post(kas_cluster.url("USA") + "/kas/v2/rewrap", json={}, timeout=30)
    assert response.status_code == 401
    audit_dir = kas_cluster.state_dir / "audit"
    live = sorted(audit_dir.glob("*.jsonl"))
    assert audit_dir / "usa.jsonl" in live
    for path in live:
        report = verify_chain(chain(path))
        assert report.ok, report.error
    assert any(json.loads(line)["action"] == "REQUEST_REJECTED" for line in lines(audit_dir / "usa.jsonl"))

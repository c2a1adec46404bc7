"""The coalition scenario: users of three nations read labelled documents through their KAS.

By default on Ray Serve over HTTP (the product's main job); ``--in-process`` runs the same scenario
against in-process services. Either way the full rewrap protocol runs: tokens, DPoP, signed requests,
policy binding, ABAC, audit. Prints an allow/deny matrix with the reason of every denial and
checks it against the expected outcome, so the demo doubles as a smoke test (exit 1 on mismatch).
"""

from __future__ import annotations

import io
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

from kas_ray.audit import AuditAction, AuditEvent, JsonLinesAuditSink
from kas_ray.client import HomeKasClient, HttpTransport, KasClient, LocalTransport, Transport
from kas_ray.config import DEFAULT_BASE_URL, AbacConfig
from kas_ray.errors import AccessDenied, KasRayError
from kas_ray.kas.local import build_local_services, nation_url
from kas_ray.policy import attribute_fqn
from kas_ray.trust import DevIdentityProvider
from kas_ray.ztdf import Policy, decrypt, encrypt


@dataclass(frozen=True)
class User:
    name: str
    nation: str
    clearance: str
    coi: tuple[str, ...] = ()
    claims_nationality: str | None = None  # a lie the issuer is not allowed to tell


@dataclass(frozen=True)
class Document:
    name: str
    classification: str
    releasable_to: tuple[str, ...]
    kas: tuple[str, ...]
    all_of: bool = False
    coi: tuple[str, ...] = ()
    embargo_days: int | None = None
    expect: frozenset[str] = field(default_factory=frozenset)  # users expected to read it


USERS = [
    User("alice", "USA", "SECRET", ("FVEY",)),
    User("bob", "FRA", "SECRET DEFENSE", ("NATO",)),
    User("carol", "GBR", "TOP SECRET", ("FVEY", "NATO")),
    User("dave", "GBR", "OFFICIAL"),
    User("mallory", "FRA", "TRES SECRET DEFENSE", ("FVEY",), claims_nationality="USA"),
]

DOCUMENTS = [
    Document("coalition-plan", "SECRET", ("USA", "FRA", "GBR"), ("USA", "FRA", "GBR"),
             expect=frozenset({"alice", "bob", "carol"})),
    Document("us-eyes-only", "SECRET", ("USA",), ("USA",), expect=frozenset({"alice"})),
    Document("fvey-intel", "SECRET", ("USA", "GBR"), ("USA", "GBR"), all_of=True, coi=("FVEY",),
             expect=frozenset({"alice", "carol"})),
    Document("nato-logistics", "RESTRICTED", ("USA", "FRA", "GBR"), ("FRA",), coi=("NATO",),
             expect=frozenset({"bob", "carol"})),
    Document("embargoed-brief", "CONFIDENTIAL", ("USA", "FRA", "GBR"), ("GBR",), embargo_days=7),
]


def _policy(config: AbacConfig, doc: Document) -> Policy:
    attrs = [attribute_fqn(config, "classification", doc.classification)]
    attrs += [attribute_fqn(config, "releasable-to", n) for n in doc.releasable_to]
    attrs += [attribute_fqn(config, "coi", c) for c in doc.coi]
    if doc.embargo_days is not None:
        not_before = datetime.now(UTC).replace(microsecond=0) + timedelta(days=doc.embargo_days)
        attrs.append(attribute_fqn(config, config.embargo_attribute, not_before))
    return Policy.create(attrs)


class AuditTail:
    """Reads audit events appended to ``<state_dir>/audit/*.jsonl`` since the last call."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._offsets: dict[Path, int] = {}
        self.new_events()  # start at the current end: earlier runs are not this demo's

    def new_events(self) -> list[AuditEvent]:
        events: list[AuditEvent] = []
        for path in sorted(self.directory.glob("*.jsonl")):
            with open(path, "rb") as fh:
                fh.seek(self._offsets.get(path, 0))
                data = fh.read()
            complete = data[: data.rfind(b"\n") + 1]
            self._offsets[path] = self._offsets.get(path, 0) + len(complete)
            events += [AuditEvent.model_validate_json(line) for line in complete.splitlines() if line.strip()]
        return events


def run_demo(state_dir: str | os.PathLike[str], nations: list[str] | None = None, *, in_process: bool = False,
             port: int | None = None, out: TextIO = sys.stdout) -> int:
    """Run the scenario against the Ray Serve KAS (default) or in-process services (``in_process``)."""
    started = time.perf_counter()
    nations = [n.upper() for n in (nations or ["USA", "FRA", "GBR"])]
    state = Path(state_dir)
    (state / "audit").mkdir(parents=True, exist_ok=True)
    if in_process:
        base_url = DEFAULT_BASE_URL
        sink = JsonLinesAuditSink(state / "audit" / "in-process.jsonl")
        services = build_local_services(state, nations, base_url=base_url, audit=sink, federate=True)
        transport = LocalTransport(services)
        print(f"kas-ray demo: {len(services)} nation KAS in process ({', '.join(nations)})", file=out)
        try:
            return _scenario(transport, base_url, state, nations, out, started, brokered=True)
        finally:
            sink.close()
            transport.close()
    from kas_ray.serve.runner import running_cluster

    port = port or _free_port()
    print(f"kas-ray demo: starting {len(nations)} nation KAS ({', '.join(nations)}) on Ray Serve, port {port}...",
          file=out, flush=True)
    with running_cluster(state, port=port, nations=nations) as urls:
        print(f"  ready after {time.perf_counter() - started:.1f}s: {', '.join(urls.values())}", file=out)

        def stop(nation: str) -> None:
            from ray import serve

            serve.delete(nation.lower())

        return _scenario(HttpTransport(), f"http://127.0.0.1:{port}", state, nations, out, started,
                         brokered=True, stop_nation=stop)


def _with_one_nation_stopped(transport: Transport, base_url: str, state_dir: Path, sealed: dict[str, bytes],
                             stop_nation: Callable[[str], None], out: TextIO) -> list[str]:
    """Stop GBR: the anyOf coalition document still opens for everyone (GBR's user through FRA);
    the allOf FVEY document, which needs GBR's share, fails with a clear per-KAS error."""
    stop_nation("GBR")
    print("\nWith the GBR KAS stopped (anyOf needs one KAS, allOf needs every share):", file=out)
    expected = {("alice", "coalition-plan"): True, ("bob", "coalition-plan"): True,
                ("carol", "coalition-plan"): True, ("alice", "fvey-intel"): False}
    users = {u.name: u for u in USERS}
    mismatches = []
    for (name, doc), allowed in expected.items():
        user = users[name]
        home_nation = "FRA" if user.nation == "GBR" else user.nation
        token = DevIdentityProvider(state_dir, user.nation).mint(user.name, user.clearance, coi=list(user.coi))
        client = HomeKasClient(transport, token, home=nation_url(base_url, home_nation))
        try:
            decrypt(io.BytesIO(sealed[doc]), io.BytesIO(), client)
            got, detail = True, "ALLOW"
        except KasRayError as exc:
            got, detail = False, f"refused: {exc.message}"
        via = f" (home {user.nation} is down: asked {home_nation})" if home_nation != user.nation else ""
        print(f"  {name} x {doc}{via}: {detail}", file=out)
        if got != allowed:
            mismatches.append(f"{name} x {doc} with GBR stopped: got {detail}")
    return mismatches


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scenario(transport: Transport, base_url: str, state_dir: Path, nations: list[str], out: TextIO,
              started: float, *, brokered: bool, stop_nation: Callable[[str], None] | None = None) -> int:
    config = AbacConfig()
    audit = AuditTail(state_dir / "audit")
    documents = [d for d in DOCUMENTS if set(d.kas) <= set(nations)]
    users = [u for u in USERS if u.nation in nations]

    owner = KasClient(transport, use_dpop=False)
    sealed: dict[str, bytes] = {}
    for doc in documents:
        keys = [owner.public_key(nation_url(base_url, n), "ec:secp256r1" if n == "FRA" else "rsa:2048")
                for n in doc.kas]
        buf = io.BytesIO()
        plaintext = f"{doc.name}: {doc.classification} REL TO {'/'.join(doc.releasable_to)}".encode()
        encrypt(io.BytesIO(plaintext), buf, splits=[[k] for k in keys] if doc.all_of else [keys],
                policy=_policy(config, doc))
        sealed[doc.name] = buf.getvalue()
        mode = "allOf" if doc.all_of else "anyOf"
        labels = f"{doc.classification} REL {'/'.join(doc.releasable_to)}"
        labels += f" COI {'/'.join(doc.coi)}" if doc.coi else ""
        labels += f" EMBARGO +{doc.embargo_days}d" if doc.embargo_days else ""
        print(f"  encrypted {doc.name:<16} {labels:<40} KAS {mode} {'+'.join(doc.kas)}", file=out)

    print("\nAllow/deny matrix (rows: users; columns: documents)", file=out)
    print(f"{'user':<36}" + "".join(f"{d.name:>18}" for d in documents), file=out)
    mismatches: list[str] = []
    denials: list[str] = []
    events = 0
    for user in users:
        idp = DevIdentityProvider(state_dir, user.nation)
        token = idp.mint(user.name, user.clearance, coi=list(user.coi), nationality=user.claims_nationality)
        home = nation_url(base_url, user.nation)
        # Brokered: every KAO goes to the user's home KAS, which forwards the others to its peers.
        client = HomeKasClient(transport, token, home=home) if brokered else KasClient(transport, token)
        cells = []
        for doc in documents:
            try:
                decrypt(io.BytesIO(sealed[doc.name]), io.BytesIO(), client)
                allowed, cell = True, "ALLOW"
            except AccessDenied:
                allowed, cell = False, "deny"
            except KasRayError as exc:
                allowed, cell = False, f"error:{exc.code}"
            new = audit.new_events()
            events += len(new)
            reasons = sorted({r for e in new if e.action == AuditAction.KEY_DENIED for r in e.reasons})
            if not allowed:
                denials.append(f"  {user.name} x {doc.name}: {'; '.join(reasons) or cell}")
            if allowed != (user.name in doc.expect):
                mismatches.append(f"{user.name} x {doc.name}: got {cell}")
            cells.append(cell)
        who = f"{user.name} ({user.nation} {user.clearance})"
        print(f"{who:<36}" + "".join(f"{c:>18}" for c in cells), file=out)

    print("\nWhy each denial (from the audit log):", file=out)
    print("\n".join(denials), file=out)
    if stop_nation is not None and {"USA", "FRA", "GBR"} <= set(nations):
        mismatches += _with_one_nation_stopped(transport, base_url, state_dir, sealed, stop_nation, out)
    print(f"\n{events} audit events in {state_dir / 'audit'}; took {time.perf_counter() - started:.1f}s", file=out)
    if mismatches:
        print("UNEXPECTED OUTCOMES: " + "; ".join(mismatches), file=out)
        return 1
    print("All outcomes as expected.", file=out)
    return 0

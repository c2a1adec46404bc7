"""Fault injection under a steady open-loop load: each fault's effect on clients, and how long recovery takes.

Nations of its own (``HOTEL`` with two replicas and Redis, ``INDIA`` its federation peer, ``JULIET`` on Cloud
KMS) are deployed on a real Ray Serve instance next to whatever else runs there. For each fault, a load of
complete, valid rewraps (DPoP-bound tokens, signed requests, a fresh key share per request so every request
needs the key backend; built by ``scenarios.Coalition``) is sent at a fixed arrival rate; after a quiet
baseline the fault is injected once, and the load goes on until the service is steady again:

=========  ==========================================================  ===============================
fault      what is done                                                 load
=========  ==========================================================  ===============================
hsm        ``ray.kill`` of HOTEL's HSM actor (Ray restarts it)           v1 rewraps at HOTEL
replica    ``ray.kill`` of one of HOTEL's two Serve replicas             v1 rewraps at HOTEL
redis      SIGKILL of HOTEL's redis-server, started again after a hold   v1 rewraps at HOTEL
kms        the Cloud KMS answers UNAVAILABLE to every call for a hold    v1 rewraps at JULIET
peer       ``serve.delete`` of INDIA, deployed again after a hold        v2 allOf HOTEL+INDIA via HOTEL
node       a Ray worker node lost (``ray.cluster_utils``), replaced      brokered allOf FRA+USA via FRA
=========  ==========================================================  ===============================

``node`` runs ``tests/multinode_scenario.py --load-rate`` in a subprocess (its own 4-node cluster), which
drives the same load and analysis; the others share one deployment. Per fault the script measures, over the
requests sent from the injection on and those already in flight then: requests, successes, errors by kind,
p95 and max latency (from the scheduled send, so nothing hides behind a slow generator), the first error,
the first success after it, and recovery: the first request after which ``Plan.steady_s`` seconds of
requests were all answered correctly within ``SLOW_S``, counted from the fault (self-healing faults) or from
the end of the restore (the operator-restored ones), plus, where Ray or Serve restarts something, the time
until it is back. It then checks every request against the nations' hash-chained audit files: each key a
client received has exactly one ``KEY_RELEASED`` record at its nation, each request the KAS answered has one
record per key access object (or one rejection), none has two (no request was processed twice, by a retry or
by a task outliving its request), and ``kas_ray.audit.verify_chain`` passes. The bounds (``Bounds`` of each
fault) are checked and printed; ``tests/test_faults.py`` runs the same in its quick mode and asserts them.

    python perf/faults.py                          # every fault, full windows, own local Ray (2.5-5 min)
    python perf/faults.py --quick                  # short windows, as the tests run them (about 2 min)
    python perf/faults.py --faults hsm,peer --rate 20 --no-node

Writes ``perf/results/faults.json`` (``--out``) and prints a table. Exit status 0 when every bound held,
1 when one did not, 2 when the set-up failed. Needs ``redis-server`` on PATH and the ``gcp`` extra; it borrows
two test helpers, the Cloud KMS fake (``tests/kms_fake.py``, a real gRPC server) and ``RedisServer``
(``tests/conftest.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

PERF = Path(__file__).resolve().parent
REPO_ROOT = PERF.parent
TESTS = REPO_ROOT / "tests"
DEFAULT_OUT = PERF / "results" / "faults.json"
if importlib.util.find_spec("kas_ray") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))
for _path in (PERF, TESTS):
    if str(_path) not in sys.path:
        sys.path.append(str(_path))

import loadgen  # noqa: E402
import scenarios  # noqa: E402

HOME, PEER, KMS_NATION = "HOTEL", "INDIA", "JULIET"
LAB = [HOME, PEER, KMS_NATION]
#: The lab nations' budgets (NationSettings / FederationConfig / GcpKmsConfig): shorter than the defaults,
#: so a fault shows within a short window; every answer must come within them (plus HTTP and proxy time).
HSM_TIMEOUT_S = 5.0
KMS_TIMEOUT_S = 2.0
PEER_TIMEOUT_S = 2.0
FEDERATION_DEADLINE_S = 5.0
BREAKER = {"failure_threshold": 3, "window_seconds": 30.0, "cool_down_seconds": 2.0, "success_threshold": 2}
REDIS = {"retry_interval_seconds": 0.5, "connect_timeout_seconds": 1.0, "command_timeout_seconds": 1.0}
KMS_GCP = {"project": "juliet-proj", "location": "europe-north1", "key_ring": "kas-ray",
           "keys": {"rsa:2048": "kas-rsa-2048"}, "timeout_seconds": KMS_TIMEOUT_S, "max_attempts": 3,
           "key_list_ttl_seconds": 5.0}
#: HTTP, proxy and a loaded 2-core machine on top of a server-side budget.
SLACK_S = 1.5
#: An answer slower than this is not "steady", even when it is correct.
SLOW_S = 1.0
#: The deadline of a fault with no server-side budget of its own (a replica kill: Serve queues requests
#: without one). The generator waits twice a fault's deadline, so a slower answer is measured, not cut off.
REQUEST_DEADLINE_S = 10.0


# --- the load ------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One request of the load: when it was due, when and how it was answered."""

    rid: str
    scheduled: float | None = None  # time.monotonic()
    done: float | None = None
    status: int | None = None
    #: None: a correct answer (every split released); else loadgen's error kind (``http_503:...``, ``timeout``).
    kind: str | None = None
    #: The answer came from the KAS (a rewrap response, or its ``{"code", "message"}`` JSON error), not from
    #: the Serve proxy or the network.
    kas_answer: bool = False
    permitted: list[str] = field(default_factory=list)

    @property
    def latency(self) -> float | None:
        return None if self.done is None or self.scheduled is None else self.done - self.scheduled

    def bad(self) -> bool:
        return self.kind is not None or (self.latency or 0.0) > SLOW_S


def read_answer(status: int, body: bytes) -> tuple[bool, list[str]]:
    """(whether the KAS itself answered, the key access object ids it released)."""
    try:
        data = json.loads(body)
    except ValueError:
        return False, []
    if not isinstance(data, dict):
        return False, []
    if status != 200:
        return isinstance(data.get("code"), str) and isinstance(data.get("message"), str), []
    results = [r for p in data.get("responses") or [] for r in p.get("results") or []]
    return "responses" in data, [r["keyAccessObjectId"] for r in results if r.get("status") == "permit"]


class SteadyLoad:
    """Open-loop load in a background thread: request ``i`` is sent at ``t0 + i / rate`` whatever came
    back before (``loadgen``'s keep-alive HTTP client), until the requests run out or :meth:`stop`.

    Runs a plain asyncio loop, whose clock is ``time.monotonic()``: fault times taken in the main thread
    compare directly with the samples.
    """

    def __init__(self, base_url: str, requests: list[dict[str, Any]], rate: float, timeout: float) -> None:
        self.base_url, self.requests, self.rate, self.timeout = base_url.rstrip("/"), requests, rate, timeout
        self.samples = [Sample(rid=r["rid"]) for r in requests]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="steady-load", daemon=True)

    def start(self) -> SteadyLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Send nothing more; wait (bounded by the request timeout) for the answers still due."""
        self._stop.set()
        self._thread.join(self.timeout + 10)

    def answered(self) -> list[Sample]:
        """The samples sent so far, in order, up to the first one still waiting for its answer."""
        out = []
        for sample in self.samples:
            if sample.scheduled is None or sample.done is None:
                break
            out.append(sample)
        return out

    async def _main(self) -> None:
        parts = urlsplit(self.base_url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        client = loadgen.RawClient(host, port, max_connections=512)
        payloads = [loadgen.render(r, f"{host}:{port}") for r in self.requests]
        await client.warm(4)
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        t0 = loop.time() + 0.05
        for i, payload in enumerate(payloads):
            due = t0 + i / self.rate
            while not self._stop.is_set() and loop.time() < due:
                await asyncio.sleep(min(due - loop.time(), 0.05))
            if self._stop.is_set():
                break
            self.samples[i].scheduled = due
            task = asyncio.ensure_future(self._one(client, i, payload))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=self.timeout + 5)
        await client.close()

    async def _one(self, client: loadgen.RawClient, i: int, payload: bytes) -> None:
        sample = self.samples[i]
        try:
            status, body = await client.request(payload, self.timeout)
        except loadgen.HttpError as exc:
            sample.kind = exc.kind
        except Exception as exc:  # noqa: BLE001 - counted as an error of its own kind, never fatal
            sample.kind = f"exception:{type(exc).__name__}"
        else:
            sample.status = status
            sample.kind = loadgen.check_answer(status, body, self.requests[i].get("splits"))
            sample.kas_answer, sample.permitted = read_answer(status, body)
        sample.done = asyncio.get_running_loop().time()


def build_requests(coalition: scenarios.Coalition, name: str, shape: scenarios.Shape, count: int, *,
                   v1: bool = False) -> list[dict[str, Any]]:
    """``count`` valid rewraps by ``shape.home``'s users, each of a new object (so each needs an unwrap),
    each with its own request id (``rid``, sent as X-Request-ID)."""
    iat = time.time()
    policy = coalition.policy_b64()
    users = coalition.users[shape.home]
    out = []
    for i in range(count):
        rid = f"fault-{name}-{uuid.uuid4().hex[:16]}"
        obj = coalition.new_object(shape, policy)
        request = coalition.request(users[i % len(users)], obj, shape.home, iat=iat, v1=v1, request_id=rid)
        out.append({**request, "rid": rid})
    return out


def owners(shape: scenarios.Shape) -> dict[str, str]:
    """Key access object id (as ``Coalition.new_object`` numbers them) → the nation that holds its key."""
    nations = [n for split in shape.splits for n in split]
    return {f"kao-{i}": n for i, n in enumerate(nations)}


def trailing_good_span(samples: list[Sample]) -> tuple[float, float | None]:
    """(seconds of scheduled time covered by the trailing run of good answers, scheduled time of its end)."""
    start = end = None
    for sample in reversed(samples):
        if sample.bad():
            break
        start = sample.scheduled
        end = end if end is not None else sample.scheduled
    return ((end or 0.0) - (start or 0.0), end) if start is not None else (0.0, None)


# --- analysis -------------------------------------------------------------------------------------------------
def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


def _s(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 2)


def analyse(samples: list[Sample], t_fault: float, *, t_restore: float | None = None,
            steady_s: float = 3.0) -> dict[str, Any]:
    """What the clients saw of the fault: the requests sent from the fault on, and those already in flight
    when it came (a request inside a process that is killed is part of the damage)."""
    sent = [s for s in samples if s.scheduled is not None]
    window = [s for s in sent if s.scheduled >= t_fault or s.done is None or s.done >= t_fault]
    ids = {id(s) for s in window}
    before = sorted(s.latency for s in sent if id(s) not in ids and s.kind is None and s.latency is not None)
    in_flight = [s for s in window if s.scheduled < t_fault]
    answered = [s for s in window if s.done is not None]
    failed = [s for s in window if s.kind is not None]
    errors = collections.Counter(s.kind for s in failed)
    lat = sorted(s.latency for s in answered)
    lat_ok = sorted(s.latency for s in answered if s.kind is None)
    bad = [s for s in answered if s.bad()]
    recovered_at = t_fault if not bad else None
    if bad:
        last_bad = max(s.scheduled for s in bad)
        after = [s.scheduled for s in answered if s.scheduled > last_bad]
        if after and after[-1] - after[0] >= steady_s * 0.9:
            recovered_at = after[0]
    first_error = min((max(s.scheduled, t_fault) for s in failed), default=None)
    first_ok_after = None
    if first_error is not None:
        first_ok_after = min((s.done for s in answered if s.kind is None and s.scheduled > first_error), default=None)
    timeline = collections.defaultdict(list)
    for s in window:
        timeline[int(max(s.scheduled, t_fault) - t_fault)].append(s)

    def is_500(s: Sample) -> bool:
        return s.status is not None and s.status >= 500 and s.status != 503

    return {
        "baseline": {"requests": len(before), "p95_ms": _ms(loadgen.percentile(before, 95))},
        "sent": len(window), "ok": len(window) - len(failed), "errors": len(failed),
        "errors_by_kind": dict(errors.most_common()),
        "in_flight_at_fault": len(in_flight),
        "in_flight_failed": dict(collections.Counter(s.kind for s in in_flight if s.kind is not None)),
        "unanswered": len(window) - len(answered),
        "http_500": sum(1 for s in window if is_500(s)),
        "http_500_sent_after_fault": sum(1 for s in window if is_500(s) and s.scheduled >= t_fault),
        "non_kas_errors": sum(1 for s in failed if not s.kas_answer),
        "latency_ms": {"p50": _ms(loadgen.percentile(lat, 50)), "p95": _ms(loadgen.percentile(lat, 95)),
                       "p95_ok": _ms(loadgen.percentile(lat_ok, 95)), "max": _ms(lat[-1] if lat else None)},
        "first_error_s": _s(first_error - t_fault if first_error is not None else None),
        "first_ok_after_error_s": _s(first_ok_after - t_fault if first_ok_after is not None else None),
        "recovered_s": _s(recovered_at - t_fault if recovered_at is not None else None),
        "recovered_after_restore_s": _s(max(0.0, recovered_at - t_restore)
                                        if recovered_at is not None and t_restore is not None else None),
        "timeline": [{"t": t, "sent": len(ss), "ok": sum(1 for s in ss if s.kind is None),
                      "p95_ms": _ms(loadgen.percentile(sorted(s.latency for s in ss if s.latency is not None), 95))}
                     for t, ss in sorted(timeline.items())],
    }


DECISIONS = ("KEY_RELEASED", "KEY_DENIED", "KEY_ERROR")
FORWARDS = ("FORWARD_RESULT", "FORWARD_FAILED", "FORWARD_CANCELLED")


def read_audit(path: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """A nation's audit records by request id (rotated files included), and ``verify_chain``'s verdict."""
    from kas_ray.audit import rotated_files, verify_chain

    files = [*rotated_files(path), path] if path.exists() else []
    by_rid: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for file in files:
        for line in file.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                by_rid[record.get("request_id", "")].append(record)
    report = verify_chain(files) if files else None
    verdict = {"files": len(files), "records": report.records if report else 0, "ok": bool(report and report.ok),
               "error": str(report.error) if report and report.error else None}
    return by_rid, verdict


def audit_findings(samples: list[Sample], home: str, owners: dict[str, str],
                   audits: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Check every request of a fault against the audit of its home KAS and of the nations owning its KAOs.

    * answered twice: a request id with two request-level rejections, two records for one key access
      object (two decisions at its nation, or two forward outcomes at home), or a rejection and a decision;
    * lost: a request the KAS answered without exactly one record per key access object (or one
      rejection), or a key the client received without exactly one ``KEY_RELEASED`` at its nation.
    """
    twice: list[str] = []
    lost: list[str] = []
    released_unanswered = 0
    checked = 0
    for s in samples:
        if s.scheduled is None:
            continue
        home_records = audits[home].get(s.rid, [])
        rejected = [r for r in home_records if r["action"] == "REQUEST_REJECTED"]
        per_kao: dict[str, list[dict[str, Any]]] = {}
        released_at_owner: dict[str, int] = {}
        for kao, owner in owners.items():
            at_owner = [r for r in audits[owner].get(s.rid, []) if r["action"] in DECISIONS and r["kao_id"] == kao]
            released_at_owner[kao] = sum(1 for r in at_owner if r["action"] == "KEY_RELEASED")
            if owner == home:
                per_kao[kao] = at_owner
            else:
                per_kao[kao] = [r for r in home_records if (r["action"] in FORWARDS and r.get("peer") == owner)
                                or (r["action"] == "KEY_ERROR" and r["kao_id"] == kao)]
                if len(at_owner) > 1:
                    twice.append(f"{s.rid}: {len(at_owner)} decisions on {kao} at {owner}")
        decided = [kao for kao, records in per_kao.items() if records]
        if len(rejected) > 1 or any(len(r) > 1 for r in per_kao.values()) or (rejected and decided):
            twice.append(f"{s.rid}: {[r['action'] for r in home_records]}")
        if not s.kas_answer:
            released_unanswered += any(released_at_owner.values())
            continue
        checked += 1
        if s.status != 200 and len(rejected) + len(decided) != 1:
            lost.append(f"{s.rid}: answered {s.status} with records {[r['action'] for r in home_records]}")
        if s.status == 200 and (rejected or len(decided) != len(owners)):
            lost.append(f"{s.rid}: answered 200 with records {[r['action'] for r in home_records]}")
        for kao in s.permitted:
            if released_at_owner.get(kao) != 1:
                lost.append(f"{s.rid}: {kao} released, {released_at_owner.get(kao)} KEY_RELEASED at {owners.get(kao)}")
    return {"checked": checked, "answered_twice": len(twice), "lost": len(lost),
            "released_unanswered": released_unanswered, "examples": (twice + lost)[:5]}


def measure(samples: list[Sample], t_fault: float, shape: scenarios.Shape, state_dir: Path, *,
            t_restore: float | None = None, steady_s: float = 3.0) -> dict[str, Any]:
    """:func:`analyse` plus the audit of every nation involved (``<state_dir>/audit/<nation>.jsonl``)."""
    audits, verdicts = {}, {}
    for nation in sorted({shape.home, *owners(shape).values()}):
        audits[nation], verdicts[nation] = read_audit(state_dir / "audit" / f"{nation.lower()}.jsonl")
    return {**analyse(samples, t_fault, t_restore=t_restore, steady_s=steady_s),
            "audit": audit_findings(samples, shape.home, owners(shape), audits), "audit_verify": verdicts}


# --- bounds -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bounds:
    """What a fault may cost. ``deadline_s``: no answer may take longer; ``recovery_s``: steady again within
    this many seconds of the fault (self-healing faults) or of the restore (operator-restored ones);
    ``errors``: the error kinds clients may see (prefixes); anything else (a 500, a timeout) fails;
    ``in_flight_may_fail``: the fault kills the process serving the requests in flight, whose answers are
    lost with it (Ray Serve's proxy then answers 500); every request sent after the fault must still pass."""

    deadline_s: float
    recovery_s: float
    errors: tuple[str, ...]
    in_flight_may_fail: bool = False


def check(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The bounds of one fault's result, each with its measured value and a verdict."""
    bounds = Bounds(**{**result["bounds"], "errors": tuple(result["bounds"]["errors"])})  # a list after JSON
    checks = []

    def add(what: str, ok: bool, measured: Any) -> None:
        checks.append({"check": what, "pass": bool(ok), "measured": measured})

    errors = collections.Counter(result["errors_by_kind"])
    if bounds.in_flight_may_fail:
        errors -= collections.Counter(result["in_flight_failed"])
    unexpected = {k: n for k, n in errors.items() if not k.startswith(bounds.errors)}
    add(f"errors only {' / '.join(bounds.errors) or 'none'}" + (" (in flight at the kill: any)"
        if bounds.in_flight_may_fail else ""), not unexpected, unexpected or "ok")
    if bounds.in_flight_may_fail:
        add("no 500 for requests sent after the kill", result["http_500_sent_after_fault"] == 0,
            result["http_500_sent_after_fault"])
    else:
        add("no 500", result["http_500"] == 0, result["http_500"])
    add("every request answered", result["unanswered"] == 0, result["unanswered"])
    max_ms = result["latency_ms"]["max"]
    add(f"max latency < {bounds.deadline_s:g} s", max_ms is not None and max_ms < bounds.deadline_s * 1e3, max_ms)
    recovery = result["recovered_after_restore_s"] if result.get("restored") else result["recovered_s"]
    add(f"steady within {bounds.recovery_s:g} s", recovery is not None and recovery <= bounds.recovery_s, recovery)
    if result.get("component_recovered_s", 0) is None:
        add("component back", False, None)
    audit = result.get("audit") or {}
    add("no request answered twice", audit.get("answered_twice") == 0, audit.get("answered_twice"))
    add("no audit record lost", audit.get("lost") == 0 and audit.get("checked", 0) > 0,
        f"{audit.get('lost')} of {audit.get('checked')}")
    add("audit chain verifies", all(v["ok"] for v in result.get("audit_verify", {}).values()),
        {n: v["records"] for n, v in result.get("audit_verify", {}).items()})
    return checks


# --- the lab ------------------------------------------------------------------------------------------------------
@dataclass
class Fault:
    name: str
    title: str
    #: The load: home nation of the users, key splits (``scenarios.Shape``), v1 single-KAO bodies or v2.
    shape: scenarios.Shape
    v1: bool
    bounds: Bounds
    inject: Callable[[Lab], dict[str, Any]]
    #: Undo an operator-level fault after the hold (None: Ray or Serve heals it by itself).
    restore: Callable[[Lab], None] | None = None
    #: True once the faulted component is back (given what ``inject`` returned).
    back: Callable[[Lab, dict[str, Any]], bool] | None = None


@dataclass(frozen=True)
class Plan:
    """Windows of one fault's load (seconds) and its arrival rate (req/s)."""

    rate: float = 20.0
    baseline_s: float = 5.0
    hold_s: float = 6.0
    steady_s: float = 4.0
    max_window_s: float = 60.0


FULL = Plan()
QUICK = Plan(rate=20.0, baseline_s=2.0, hold_s=2.5, steady_s=2.0, max_window_s=35.0)


@dataclass
class Lab:
    """The deployment under test: HOTEL (2 replicas, Redis), INDIA (its peer), JULIET (Cloud KMS)."""

    base_url: str
    state_dir: Path
    redis: Any  # conftest.RedisServer: .url, .start(), .stop(sig)
    kms: Any = None  # kms_fake.FakeKms
    coalition: scenarios.Coalition | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def url(self, nation: str) -> str:
        return f"{self.base_url}/{nation.lower()}"

    def deploy(self) -> float:
        """Deploy the three nations (HOTEL with two replicas) and wait until they are ready; seconds."""
        from kms_fake import FakeKms
        from ray import serve

        from kas_ray.serve.deployment import NationKAS, dev_federation_config
        from kas_ray.serve.runner import _wait_ready, deploy, nation_settings

        started = time.perf_counter()
        self.kms = FakeKms(pending_seconds=0.3)
        self.kms.start()
        self.kms.add_key(KMS_GCP["project"], KMS_GCP["location"], KMS_GCP["key_ring"], "kas-rsa-2048",
                         "RSA_DECRYPT_OAEP_2048_SHA1")
        gcp = {**KMS_GCP, "insecure_endpoint": self.kms.address}
        plain = nation_settings(self.state_dir, LAB, self.base_url, hsm_timeout_seconds=HSM_TIMEOUT_S, per_nation={
            HOME: {"redis": {"url": self.redis.url, **REDIS}},
            KMS_NATION: {"key_backend": {"kind": "gcp-kms", "gcp": gcp}}})
        self.settings = {s.nation: s for s in plain}
        home = self.settings[HOME]
        self.settings[HOME] = home.model_copy(update={"federation": dev_federation_config(
            home, peer_timeout_seconds=PEER_TIMEOUT_S, deadline_seconds=FEDERATION_DEADLINE_S, breaker=BREAKER)})
        app = NationKAS.options(name=f"kas-{HOME.lower()}", num_replicas=2).bind(self.settings[HOME].model_dump())
        serve.run(app, name=HOME.lower(), route_prefix=f"/{HOME.lower()}", blocking=False)
        deploy([self.settings[PEER], self.settings[KMS_NATION]], index=False)
        _wait_ready([self.url(n) for n in LAB], timeout=180)
        self.coalition = scenarios.Coalition(base_url=self.base_url, state_dir=self.state_dir, kas_key="rsa:2048",
                                             nations=LAB)
        self.coalition.prepare()
        return time.perf_counter() - started

    def teardown(self) -> None:
        from ray import serve

        from kas_ray.serve.actors import kill_actors

        with contextlib.suppress(Exception):  # all three at once: one wait instead of three
            serve.context._get_global_client().delete_apps([n.lower() for n in LAB], blocking=True)
        kill_actors(LAB)
        if self.kms is not None:
            self.kms.stop()

    def wait_ready(self, nations: list[str], timeout: float = 90.0) -> None:
        from kas_ray.serve.runner import _wait_ready

        _wait_ready([self.url(n) for n in nations], timeout=timeout)

    def http_ok(self, url: str) -> bool:
        import httpx

        try:
            return httpx.get(url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False


# --- the faults -----------------------------------------------------------------------------------------------
def _hsm(nation: str) -> Any:
    import ray

    from kas_ray.serve.actors import NAMESPACE, hsm_actor_name

    return ray.get_actor(hsm_actor_name(nation), namespace=NAMESPACE)


def kill_hsm(lab: Lab) -> dict[str, Any]:
    import ray

    hsm = _hsm(HOME)
    pid = ray.get(hsm.pid.remote(), timeout=30)
    ray.kill(hsm, no_restart=False)  # Ray restarts it (max_restarts=-1)
    return {"pid": pid}


def hsm_back(lab: Lab, detail: dict[str, Any]) -> bool:
    import ray

    try:
        return bool(ray.get(_hsm(HOME).pid.remote(), timeout=1.0) != detail["pid"])
    except Exception:  # noqa: BLE001 - restarting: not back yet
        return False


def _replicas(nation: str) -> list[str]:
    """Names of the nation's live Serve replica actors (GCS; no dashboard needed)."""
    import ray

    prefix = f"SERVE_REPLICA::{nation.lower()}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def kill_replica(lab: Lab) -> dict[str, Any]:
    import ray

    names = _replicas(HOME)
    victim = names[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    return {"killed": victim, "replicas_before": len(names)}


def replica_back(lab: Lab, detail: dict[str, Any]) -> bool:
    from ray import serve

    names = _replicas(HOME)
    if detail["killed"] in names or len(names) < detail["replicas_before"]:
        return False
    deployments = serve.status().applications[HOME.lower()].deployments.values()
    return all(d.replica_states.get("RUNNING", 0) >= detail["replicas_before"] for d in deployments)


def stop_redis(lab: Lab) -> dict[str, Any]:
    lab.redis.stop(signal.SIGKILL)
    return {}


def start_redis(lab: Lab) -> None:
    lab.redis.start()


def kms_down(lab: Lab) -> dict[str, Any]:
    lab.kms.inject("unavailable", None)  # every method, until cleared
    return {}


def kms_up(lab: Lab) -> None:
    lab.kms.clear_faults()


def kms_ready(lab: Lab, detail: dict[str, Any]) -> bool:
    return lab.http_ok(f"{lab.url(KMS_NATION)}/readyz")


def delete_peer(lab: Lab) -> dict[str, Any]:
    from ray import serve

    serve.delete(PEER.lower())
    return {}


def redeploy_peer(lab: Lab) -> None:
    from kas_ray.serve.runner import deploy

    deploy([lab.settings[PEER]], index=False)
    lab.wait_ready([PEER])


def peer_ready(lab: Lab, detail: dict[str, Any]) -> bool:
    return lab.http_ok(f"{lab.url(PEER)}/readyz")


_LOCAL = scenarios.Shape(HOME, ((HOME,),))
#: Recovery bounds: about 3x the slowest recovery measured on the 2-core test VM while other people's
#: tests ran (load average 5-13; docs/runbook.md, "Fault injection"), so a loaded machine passes them.
FAULTS: dict[str, Fault] = {f.name: f for f in [
    Fault("hsm", f"HSM actor killed ({HOME})", _LOCAL, True,
          Bounds(HSM_TIMEOUT_S + SLACK_S, 15.0, ("http_503:kas_unavailable",)), kill_hsm, back=hsm_back),
    Fault("replica", f"1 of 2 replicas killed ({HOME})", _LOCAL, True,
          Bounds(REQUEST_DEADLINE_S, 30.0, (), in_flight_may_fail=True), kill_replica, back=replica_back),
    Fault("redis", f"Redis stopped, restarted ({HOME})", _LOCAL, True,
          Bounds(2 * REDIS["command_timeout_seconds"] + SLACK_S, 5.0, ("http_503:replay_store_unavailable",)),
          stop_redis, restore=start_redis),
    Fault("kms", f"Cloud KMS unavailable ({KMS_NATION})", scenarios.Shape(KMS_NATION, ((KMS_NATION,),)), True,
          Bounds(KMS_TIMEOUT_S + SLACK_S, 5.0, ("http_503:kas_unavailable",)), kms_down, restore=kms_up,
          back=kms_ready),
    Fault("peer", f"peer {PEER} stopped, redeployed (allOf via {HOME})", scenarios.Shape(HOME, ((HOME,), (PEER,))),
          False, Bounds(FEDERATION_DEADLINE_S + SLACK_S, 10.0, (f"kao_fail:peer {PEER} ", f"kao_fail:{PEER}:")),
          delete_peer, restore=redeploy_peer, back=peer_ready),
]}
#: Node loss: tests/multinode_scenario.py (FRA brokers to USA, whose only node is removed, then replaced).
#: Federation defaults there: peer timeout 5 s, deadline 10 s, breaker cool-down 10 s.
NODE_BOUNDS = Bounds(10.0 + SLACK_S, 90.0, ("kao_fail:peer USA ", "kao_fail:USA:"))


def run_fault(lab: Lab, fault: Fault, plan: Plan, log: Callable[[str], None] = print) -> dict[str, Any]:
    """One fault under load: baseline, inject, (hold, restore), wait until steady; the analysis and audit."""
    nations = sorted({fault.shape.home, *owners(fault.shape).values()})
    lab.wait_ready(nations)
    count = int(math.ceil((plan.baseline_s + plan.hold_s + plan.max_window_s + 5) * plan.rate))
    built = time.perf_counter()
    assert lab.coalition is not None
    requests = build_requests(lab.coalition, fault.name, fault.shape, count, v1=fault.v1)
    build_s = time.perf_counter() - built
    load = SteadyLoad(lab.base_url, requests, plan.rate, timeout=max(2 * fault.bounds.deadline_s, 20.0)).start()
    time.sleep(plan.baseline_s)
    t_fault = time.monotonic()
    detail = fault.inject(lab)
    t_injected = time.monotonic()
    log(f"[{fault.name}] {fault.title}: injected ({t_injected - t_fault:.2f}s) {detail or ''}")
    t_restore = t_restored = None
    back_at = None
    while time.monotonic() - t_fault < plan.max_window_s:
        now = time.monotonic()
        if fault.restore is not None and t_restore is None and now >= t_fault + plan.hold_s:
            t_restore = time.monotonic()
            fault.restore(lab)
            t_restored = time.monotonic()
            log(f"[{fault.name}] restored in {t_restored - t_restore:.2f}s")
            continue
        if back_at is None and (fault.restore is None or t_restored is not None) \
                and (fault.back is None or fault.back(lab, detail)):
            back_at = time.monotonic()
        span, end = trailing_good_span(load.answered())
        settled_from = t_restored or t_injected
        if back_at is not None and end is not None and span >= plan.steady_s and end >= settled_from + plan.steady_s:
            break
        time.sleep(0.25)
    load.stop()
    time.sleep(0.5)  # records of requests the server finished after the client gave up
    result = {"fault": fault.name, "title": fault.title, "target": fault.shape.home,
              "load": ("v1 " if fault.v1 else "v2 ") + " + ".join("|".join(s) for s in fault.shape.splits),
              "rate": plan.rate, "build_s": round(build_s, 2), "inject_s": _s(t_injected - t_fault),
              "restored": fault.restore is not None, "hold_s": plan.hold_s if fault.restore else None,
              "restore_took_s": _s(t_restored - t_restore) if t_restore and t_restored else None,
              "component_recovered_s": _s(back_at - t_fault) if back_at is not None else None,
              "detail": detail, "bounds": asdict(fault.bounds)}
    result["phase_s"] = _s(time.monotonic() - t_fault + plan.baseline_s)
    result |= measure(load.samples, t_fault, fault.shape, lab.state_dir, t_restore=t_restored,
                      steady_s=plan.steady_s)
    result["checks"] = check(result)
    log(f"[{fault.name}] {summary_line(result)}")
    return result


def run_lab(base_url: str, state_dir: Path, redis: Any, plan: Plan, names: list[str] | None = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Deploy the lab on the running Serve instance at ``base_url``, run the faults, tear the lab down."""
    lab = Lab(base_url=base_url, state_dir=state_dir, redis=redis)
    out: dict[str, Any] = {"faults": {}}
    try:
        out["deploy_s"] = round(lab.deploy(), 1)
        log(f"lab: {', '.join(LAB)} deployed in {out['deploy_s']}s")
        for name in names or list(FAULTS):
            out["faults"][name] = run_fault(lab, FAULTS[name], plan, log)
    finally:
        lab.teardown()
    return out


# --- node loss (its own cluster, in a subprocess) ---------------------------------------------------------------
def node_loss(rate: float, steady_s: float, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The multinode scenario with a steady load through the node loss; its fault result."""
    import multinode_scenario

    scenario = multinode_scenario.launch(load_rate=rate, steady_s=steady_s)
    if not scenario.get("ok") or "fault" not in scenario:
        raise RuntimeError(f"node-loss scenario failed: {scenario.get('error')}\n{scenario.get('stderr_tail', '')}\n"
                           f"{scenario.get('serve_log_tail', '')}")
    result = scenario["fault"]
    result["checks"] = check(result)
    log(f"[node] {summary_line(result)}")
    return result


# --- report ---------------------------------------------------------------------------------------------------
def summary_line(r: dict[str, Any]) -> str:
    failed = [c["check"] for c in r["checks"] if not c["pass"]]
    return (f"sent {r['sent']}, ok {r['ok']}, errors {r['errors_by_kind'] or 0}, p95 {r['latency_ms']['p95']} ms, "
            f"max {r['latency_ms']['max']} ms, recovered {r['recovered_s']} s after the fault"
            + (f" ({r['recovered_after_restore_s']} s after the restore)" if r.get("restored") else "")
            + f"; audit {r['audit']['lost']} lost, {r['audit']['answered_twice']} twice"
            + (f"; FAILED: {', '.join(failed)}" if failed else "; bounds held"))


def _kinds(errors: dict[str, int]) -> str:
    return ", ".join(f"{n} {k.split(':', 2)[0] if k.startswith('kao_fail') else k}" for k, n in errors.items()) or "-"


def table(results: dict[str, dict[str, Any]]) -> str:
    """One row per fault: its effect on clients, its recovery time and the audit checks."""
    head = ["fault", "sent", "ok", "errors", "p95 ms", "max ms", "limit s", "1st ok s", "recovered s",
            "bound s", "audit", "bounds"]
    rows = []
    for r in results.values():
        recovered = r["recovered_s"]
        if r.get("restored"):
            recovered = f"{r['recovered_after_restore_s']} after restore"
        audit = r["audit"]
        rows.append([r["title"], r["sent"], r["ok"], _kinds(r["errors_by_kind"]), r["latency_ms"]["p95"],
                     r["latency_ms"]["max"], r["bounds"]["deadline_s"], r["first_ok_after_error_s"] or "-",
                     recovered, r["bounds"]["recovery_s"],
                     f"{audit['checked']} checked, {audit['lost']} lost, {audit['answered_twice']} twice",
                     "ok" if all(c["pass"] for c in r["checks"]) else "FAIL"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def own_serve() -> Any:
    """A local Ray (no dashboard) and Serve on a free port, ours alone; stopped afterwards."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from conftest import free_port
    from ray import serve

    from kas_ray.serve.actors import NAMESPACE
    from kas_ray.serve.runner import init_ray

    port = free_port()
    init_ray(address="local", num_cpus=2, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short windows (what tests/test_faults.py runs)")
    ap.add_argument("--faults", default=",".join([*FAULTS, "node"]),
                    help=f"comma-separated subset of {', '.join([*FAULTS, 'node'])}")
    ap.add_argument("--no-node", action="store_true", help="skip the node-loss scenario (its own 4-node cluster)")
    ap.add_argument("--rate", type=float, default=None, help="offered req/s (default 20)")
    ap.add_argument("--node-rate", type=float, default=10.0, help="offered req/s of the node-loss load")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="results JSON ('-': none)")
    args = ap.parse_args(argv)
    unknown = set(args.faults.split(",")) - {*FAULTS, "node"}
    if unknown:
        ap.error(f"unknown faults {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.rate:
        plan = Plan(**{**asdict(plan), "rate": args.rate})
    chosen = args.faults.split(",")
    lab_faults = [f for f in FAULTS if f in chosen]
    redis_bin = shutil.which("redis-server")
    if lab_faults and redis_bin is None:
        print("faults: redis-server is not on PATH", file=sys.stderr)
        return 2
    started = time.perf_counter()
    results: dict[str, Any] = {"benchmark": "faults", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "plan": asdict(plan), "machine": {"cpus": os.cpu_count(),
                                                                 "load_avg_start": os.getloadavg()[0]},
                               "faults": {}}
    work = Path(tempfile.mkdtemp(prefix="kas-ray-faults-"))
    setup_failed = False
    try:
        if lab_faults:
            from conftest import RedisServer

            redis = RedisServer(redis_bin, work / "redis")
            redis.start()
            try:
                with own_serve() as base_url:
                    lab = run_lab(base_url, work / "state", redis, plan, lab_faults)
            finally:
                redis.stop()
            results["deploy_s"] = lab["deploy_s"]
            results["faults"].update(lab["faults"])
        if "node" in chosen and not args.no_node:
            results["faults"]["node"] = node_loss(args.node_rate, plan.steady_s)
    except (RuntimeError, TimeoutError) as exc:  # the set-up, not a bound: report what was measured
        print(f"faults: set-up failed: {exc}", file=sys.stderr)
        results["setup_error"] = str(exc)[:4000]
        setup_failed = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    results["machine"]["load_avg_end"] = os.getloadavg()[0]
    if results["faults"]:
        print("\n" + table(results["faults"]))
    failed = [(name, c) for name, r in results["faults"].items() for c in r["checks"] if not c["pass"]]
    for name, c in failed:
        print(f"FAILED {name}: {c['check']} (measured {c['measured']})")
    if args.out != "-":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(f"results: {out} ({results['elapsed_s']:.0f} s)")
    return 2 if setup_failed else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

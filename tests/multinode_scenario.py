"""Multi-node scenario on one machine: nations placed by Ray custom resources, federation across nodes,
and the loss of a nation's worker node.

Run by ``tests/test_multinode.py`` in a subprocess (the pytest process may already hold a Ray session,
and one process cannot ``ray.init`` twice); usable by hand too::

    RAY_TMPDIR=$(mktemp -d /tmp/krmn-XXXX) .venv/bin/python tests/multinode_scenario.py --state-dir /tmp/st

It builds a ``ray.cluster_utils.Cluster`` of three nodes: a head (Serve controller and proxy, no nation
resource), node A with ``nation_usa: 1`` and node B with ``nation_fra: 1``, as ``cluster.yaml`` does on
GCP. USA and FRA are deployed from ``deployments/local.yaml`` (same builder, same autoscaling options)
through the Serve controller's config path (what ``serve run CONFIG`` does), with the nation pinned the
way ``deployments/gcp-kms.yaml`` pins it: ``hsm_resources`` for the HSM and cache actors and
``ray_actor_options.resources`` for the replicas. Then:

1. placement: every USA actor and replica is on A, every FRA one on B, none on the head (``ray.util.state``);
2. federation across nodes: a FRA user's allOf object (one FRA KAO, one USA KAO) decrypts through the FRA
   home KAS on B, which brokers the USA KAO to USA's replica and HSM actor on A;
3. node A is removed: FRA keeps working, the USA KAO fails cleanly (per-KAO ``Unavailable``), no hang;
4. a replacement node A' with ``nation_usa: 1`` joins (what the cluster launcher's ``min_workers`` does):
   the USA HSM actor, cache actor and replica are re-created on A', USA is ready again and the same object
   decrypts through FRA again (the HSM actor on A' unwraps: the cache actor and replica restarted empty).

With ``--load-rate R``, an open-loop load of R brokered allOf rewraps per second (one FRA and one USA key
access object, a new object each, DPoP-bound FRA users) runs through FRA from before step 3 until it has
been steady for ``--steady`` seconds after step 4; ``perf/faults.py`` measures it (the ``node`` row of its
table) and checks it against the audit of both nations (``result["fault"]``).

Prints one line ``RESULT {json}`` on stdout; exits 0 when the scenario ran (the JSON says what held).
Everything is bounded by ``--deadline`` and torn down in ``finally``: Serve, the named actors, the driver,
every node (``cluster.shutdown()``). :func:`launch` runs it in a subprocess.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
LOCAL_CONFIG = ROOT / "deployments" / "local.yaml"
NATIONS = ["USA", "FRA"]
DEADLINE_S = 165  # the scenario's own budget
HARD_LIMIT_S = 180  # then launch() kills its process group
LOAD_BASELINE_S = 3.0  # load before the node goes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.end = self.start + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def elapsed(self) -> float:
        return round(time.monotonic() - self.start, 2)

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise TimeoutError(f"scenario deadline passed while {what}")


def resource(nation: str) -> str:
    """The Ray custom resource of a nation's nodes (cluster.yaml: ``nation_usa: 1`` on USA workers)."""
    return f"nation_{nation.lower()}"


def serve_config(state_dir: Path, port: int) -> dict[str, Any]:
    """deployments/local.yaml for USA and FRA on this cluster: own port and state, pinned by resources."""
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    base = f"http://127.0.0.1:{port}"
    apps = []
    for app in config["applications"]:
        nation = str(app.get("args", {}).get("nation", "")).upper()
        if nation not in NATIONS:
            continue
        pin = {resource(nation): 0.01}
        app["args"] = {**app["args"], "public_url": f"{base}/{nation.lower()}", "state_dir": str(state_dir),
                       "coalition": NATIONS, "hsm_resources": pin}
        deployments = app.setdefault("deployments", [{"name": f"kas-{nation.lower()}"}])
        for deployment in deployments:
            options = deployment.get("ray_actor_options") or {"num_cpus": 0}
            deployment["ray_actor_options"] = {**options, "resources": pin}
        apps.append(app)
    # One machine: every node's proxy would bind the same host:port, so the head alone runs one.
    return {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
            "applications": apps}


def wait_http(url: str, deadline: Deadline, *, status: int = 200, budget: float = 90.0) -> float:
    """Poll ``url`` until it answers ``status``; returns the seconds it took."""
    import httpx

    started = time.monotonic()
    while True:
        try:
            if httpx.get(url, timeout=2.0).status_code == status:
                return round(time.monotonic() - started, 2)
        except httpx.HTTPError:
            pass
        if time.monotonic() - started > budget:
            raise TimeoutError(f"{url} did not answer {status} within {budget:.0f}s")
        deadline.check(f"waiting for {url}")
        time.sleep(0.3)


def placement(address: str, node_names: dict[str, str]) -> dict[str, str]:
    """Live kas-ray actors and USA/FRA replicas -> the name of the node they run on (ray.util.state).

    ``address`` is this cluster's: without it the state API picks the newest Ray instance on the machine.
    """
    from ray.util.state import list_actors

    from kas_ray.serve.actors import NAMESPACE

    where: dict[str, str] = {}
    for actor in list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=10_000,
                             raise_on_missing_output=False):
        node = node_names.get(actor.node_id, actor.node_id or "?")
        if actor.ray_namespace == NAMESPACE and actor.name and actor.name.startswith(("kas-hsm-", "kas-cache-")):
            where[actor.name] = node
        elif actor.class_name.startswith("ServeReplica:") and actor.class_name.split(":")[1] in ("usa", "fra"):
            replicas = sum(1 for key in where if key.startswith(actor.class_name))
            where[f"{actor.class_name}#{replicas}"] = node
    return where


def wait_placement(address: str, node_names: dict[str, str], want: dict[str, str], deadline: Deadline,
                   budget: float = 60.0) -> dict[str, str]:
    """Wait until every actor in ``want`` (name prefix -> node) is alive on that node; returns the placement."""
    started = time.monotonic()
    while True:
        try:
            where = placement(address, node_names)
        except Exception:  # noqa: BLE001 - the state API may be briefly unavailable
            where = {}
        if all(any(k.startswith(prefix) and v == node for k, v in where.items()) for prefix, node in want.items()):
            return where
        if time.monotonic() - started > budget:
            return where
        deadline.check("waiting for placement")
        time.sleep(0.5)


def federation_counters(url: str) -> dict[str, Any]:
    import httpx

    response = httpx.get(f"{url}/federation/status", timeout=10.0)
    response.raise_for_status()
    return dict(response.json().get("counters", {}))


class NodeLossLoad:
    """The ``--load-rate`` load (``perf/faults.py``'s generator and analysis) around the node loss."""

    def __init__(self, base: str, state_dir: Path, rate: float, seconds: float) -> None:
        sys.path.insert(0, str(ROOT / "perf"))
        import faults
        import scenarios

        self.faults, self.state_dir = faults, state_dir
        coalition = scenarios.Coalition(base_url=base, state_dir=state_dir, kas_key="rsa:2048", nations=NATIONS)
        coalition.prepare()
        self.shape = scenarios.Shape("FRA", (("FRA",), ("USA",)))
        requests = faults.build_requests(coalition, "node", self.shape, int(rate * seconds))
        self.load = faults.SteadyLoad(base, requests, rate, timeout=2 * faults.NODE_BOUNDS.deadline_s + 5)

    def start(self) -> None:
        self.load.start()
        time.sleep(LOAD_BASELINE_S)

    def wait_steady(self, steady_s: float, deadline: Deadline) -> None:
        while deadline.left() > 20:
            span, _end = self.faults.trailing_good_span(self.load.answered())
            if span >= steady_s:
                return
            time.sleep(0.25)

    def result(self, lost_at: float, steady_s: float, usa_ready_s: float | None) -> dict[str, Any]:
        from dataclasses import asdict

        self.load.stop()
        time.sleep(0.5)  # records of requests the server finished after the client gave up
        faults = self.faults
        return {"fault": "node", "title": "worker node of USA lost, replaced (allOf FRA+USA via FRA)",
                "target": "FRA", "load": "v2 FRA + USA", "rate": self.load.rate, "restored": False,
                "component_recovered_s": usa_ready_s, "bounds": asdict(faults.NODE_BOUNDS),
                **faults.measure(self.load.samples, lost_at, self.shape, self.state_dir, steady_s=steady_s)}


def run(state_dir: Path, deadline: Deadline, result: dict[str, Any], load_rate: float | None = None,
        steady_s: float = 3.0) -> None:
    """The scenario; fills ``result`` as it goes (so a failure still reports how far it got)."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.serve.schema import ServeDeploySchema

    from kas_ray.client import HomeKasClient, HttpTransport, KasClient
    from kas_ray.config import AbacConfig
    from kas_ray.errors import KasRayError
    from kas_ray.policy import attribute_fqn
    from kas_ray.serve.actors import NAMESPACE, kill_actors
    from kas_ray.trust import DevIdentityProvider
    from kas_ray.ztdf import Policy, decrypt, encrypt

    steps, checks = result.setdefault("steps", {}), result.setdefault("checks", {})
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    urls = {n: f"{base}/{n.lower()}" for n in NATIONS}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": free_port(), "dashboard_agent_listen_port": None,
    })
    steps["head_up"] = deadline.elapsed()
    connected = False
    load: NodeLossLoad | None = None
    try:
        node_a = cluster.add_node(num_cpus=1, resources={resource("USA"): 1})
        node_b = cluster.add_node(num_cpus=1, resources={resource("FRA"): 1})
        cluster.wait_for_nodes()
        names = {cluster.head_node.node_id: "head", node_a.node_id: "A", node_b.node_id: "B"}
        steps["nodes_up"] = deadline.elapsed()
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        connected = True

        config = ServeDeploySchema.model_validate(serve_config(state_dir, port))
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.context._get_global_client().deploy_apps(config)  # the path of `serve run CONFIG`
        for url in urls.values():
            wait_http(f"{url}/readyz", deadline)
        steps["deployed"] = deadline.elapsed()

        # 1. placement by resources
        want = {"kas-hsm-usa": "A", "kas-cache-usa": "A", "ServeReplica:usa:": "A",
                "kas-hsm-fra": "B", "kas-cache-fra": "B", "ServeReplica:fra:": "B"}
        result["placement_before"] = wait_placement(cluster.address, names, want, deadline)

        # 2. federation across nodes: a FRA user, home KAS FRA (node B), one KAO of FRA and one of USA (node A)
        anonymous = KasClient(HttpTransport())
        key_usa = anonymous.public_key(urls["USA"], "rsa:4096")
        key_fra = anonymous.public_key(urls["FRA"], "ec:secp256r1")
        abac = AbacConfig()
        policy = Policy.create([attribute_fqn(abac, "classification", "SECRET")]
                               + [attribute_fqn(abac, "releasable-to", n) for n in NATIONS])
        plaintext = f"multinode {uuid.uuid4().hex}".encode()
        sealed = io.BytesIO()
        manifest = encrypt(io.BytesIO(plaintext), sealed, policy=policy, splits=[[key_fra], [key_usa]])
        kaos = list(manifest.encryption_information.key_access)
        policy_b64 = manifest.encryption_information.policy
        token = DevIdentityProvider(state_dir, "FRA").mint("fra-user", "SECRET")
        home = HomeKasClient(HttpTransport(timeout=30.0), token, home=urls["FRA"], client_key_type="ec")

        def decrypt_once() -> bytes:
            out = io.BytesIO()
            decrypt(io.BytesIO(sealed.getvalue()), out, home)
            return out.getvalue()

        sent_before = int(federation_counters(urls["FRA"]).get("forwards_sent", 0))
        checks["brokered_before"] = decrypt_once() == plaintext
        latencies = []
        for _ in range(10):
            started = time.perf_counter()
            outcome = home.unwrap_batch(kaos, policy_b64)
            latencies.append(round((time.perf_counter() - started) * 1000, 1))
            assert all(isinstance(o, bytes) for o in outcome), outcome
        result["brokered_ms"] = sorted(latencies)
        checks["fra_forwarded"] = int(federation_counters(urls["FRA"]).get("forwards_sent", 0)) - sent_before
        steps["federation_checked"] = deadline.elapsed()

        if load_rate:
            load = NodeLossLoad(base, state_dir, load_rate, deadline.left())
            load.start()
            steps["load_started"] = deadline.elapsed()

        # 3. lose node A (USA's only node)
        cluster.remove_node(node_a)
        lost_at = time.monotonic()
        steps["node_a_removed"] = deadline.elapsed()
        started = time.perf_counter()
        during = home.unwrap_batch(kaos, policy_b64)
        result["outage_call_s"] = round(time.perf_counter() - started, 2)
        result["outage_outcomes"] = ["released" if isinstance(o, bytes) else
                                     (o.message if isinstance(o, KasRayError) else repr(o)) for o in during]
        checks["fra_kao_released_during_outage"] = isinstance(during[0], bytes)
        checks["usa_kao_failed_cleanly_during_outage"] = isinstance(during[1], KasRayError)
        checks["fra_ready_during_outage"] = wait_http(f"{urls['FRA']}/readyz", deadline, budget=10.0) >= 0
        result["placement_during"] = placement(cluster.address, names)

        # 4. a replacement node with the USA resource: actors and replica move there, USA recovers
        node_a2 = cluster.add_node(num_cpus=1, resources={resource("USA"): 1})
        names[node_a2.node_id] = "A2"
        steps["node_a2_added"] = deadline.elapsed()
        wait_http(f"{urls['USA']}/readyz", deadline, budget=120.0)
        result["usa_recovery_s"] = round(time.monotonic() - lost_at, 2)
        steps["usa_ready_again"] = deadline.elapsed()
        want_after = {"kas-hsm-usa": "A2", "kas-cache-usa": "A2", "ServeReplica:usa:": "A2"}
        result["placement_after"] = wait_placement(cluster.address, names, want_after, deadline)
        recovered = False
        attempts = 0
        while not recovered and deadline.left() > 15:
            attempts += 1
            try:  # FRA's breaker toward USA may still be cooling down after the outage
                recovered = decrypt_once() == plaintext
            except KasRayError as exc:
                result["last_recovery_error"] = exc.message
                time.sleep(1.0)
        checks["brokered_after_recovery"] = recovered
        result["recovery_attempts"] = attempts
        result["brokered_recovered_s"] = round(time.monotonic() - lost_at, 2)
        steps["federation_recovered"] = deadline.elapsed()
        result["nodes"] = {v: k for k, v in names.items()}
        if load is not None:
            load.wait_steady(steady_s, deadline)
            result["fault"] = load.result(lost_at, steady_s, result["usa_recovery_s"])
            steps["load_steady"] = deadline.elapsed()
    finally:
        if load is not None:
            load.load.stop()
        teardown = time.monotonic()
        if connected:
            try:
                serve.shutdown()
            except Exception:  # noqa: BLE001 - best effort teardown
                traceback.print_exc()
            try:
                kill_actors(NATIONS)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
            ray.shutdown()
        cluster.shutdown()
        result["teardown_s"] = round(time.monotonic() - teardown, 2)


def launch(*, load_rate: float | None = None, steady_s: float = 3.0, deadline: float = DEADLINE_S,
           hard_limit: float = HARD_LIMIT_S) -> dict[str, Any]:
    """Run the scenario in a subprocess and return its RESULT (plus ``runtime_s`` and ``stderr_tail``).

    A caller may already be a Ray driver (pytest's session cluster) and cannot join a second cluster. The
    subprocess gets its own Ray temp dir (so the "current cluster" file and sessions of other Ray users on
    the machine are untouched), its own ports and state dir, and tears its cluster down itself; past
    ``hard_limit`` its process group is killed (the Ray processes of that cluster die with their reaper).
    """
    # A short path: Ray's socket paths under it must stay below the 107-byte limit of AF_UNIX.
    work = Path(tempfile.mkdtemp(prefix="krmn-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env |= {"RAY_TMPDIR": str(work), "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--state-dir", str(work / "state"),
           "--deadline", str(deadline)]
    if load_rate:
        cmd += ["--load-rate", str(load_rate), "--steady", str(steady_s)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        try:
            out, err = proc.communicate(timeout=hard_limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own child's process group, by id
            out, err = proc.communicate()
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        result = json.loads(lines[-1].removeprefix("RESULT ")) if lines else {"ok": False, "error": "no RESULT"}
        result["runtime_s"] = round(time.monotonic() - started, 1)
        result["stderr_tail"] = err[-4000:]
        if not result.get("ok"):
            result["serve_log_tail"] = _serve_errors(work)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _serve_errors(work: Path, limit: int = 6000) -> str:
    """The error lines of the scenario's Serve logs (controller, replicas), for a failed run's report."""
    lines = []
    for log in sorted(work.glob("ray/session_*/logs/serve/*.log")):
        with open(log, errors="replace") as fh:
            lines += [f"{log.name}: {line.rstrip()}" for line in fh if " ERROR " in line or "WARNING" in line
                      or "Error" in line]
    return "\n".join(lines)[-limit:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--deadline", type=float, default=160.0, help="seconds for the whole scenario")
    parser.add_argument("--load-rate", type=float, default=None, help="req/s of the load through the node loss")
    parser.add_argument("--steady", type=float, default=3.0, help="seconds of good answers that end the load")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # same for this cluster and any CLI pointed at it
    args.state_dir.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(args.deadline)
    result: dict[str, Any] = {"ok": False}
    try:
        run(args.state_dir.resolve(), deadline, result, args.load_rate, args.steady)
        result["ok"] = True
    except Exception as exc:  # noqa: BLE001 - reported to the test as JSON
        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["elapsed_s"] = deadline.elapsed()
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

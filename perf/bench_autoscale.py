"""Benchmark: Serve autoscaling of one nation KAS under a stepped open-loop load (issue 7, "Scale").

The home nation is deployed with the autoscaling options of a Serve config file (default
``deployments/local.yaml``: the options of its first nation). The generator then offers the warm one-KAS
workload in steps, back to back (low, high, low by default), while a sampler records the running and
target replica counts every second. The result shows replicas rising under load and falling after,
with the latency of each second next to them:

    python perf/bench_autoscale.py                          # about 5 min; perf/results/autoscale.json + PNG
    python perf/bench_autoscale.py --steps 20:30,220:60,20:150 --config deployments/local.yaml

Runs as a Ray job as ``bench_kas.py`` does (see perf/README.md); same cluster options.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PERF = Path(__file__).resolve().parent
sys.path.insert(0, str(PERF))

import bench_kas  # noqa: E402 - after the path set-up above; it makes kas_ray importable too
import results_file  # noqa: E402

DEFAULT_OUT = PERF / "results" / "autoscale.json"
SCENARIO = "1kas-warm"


def parse_steps(text: str) -> list[tuple[float, float]]:
    """``rate:seconds,rate:seconds,...`` → [(rate, seconds), ...]."""
    steps = []
    for part in text.split(","):
        rate, seconds = part.split(":")
        steps.append((float(rate), float(seconds)))
    return steps


class ReplicaSampler(threading.Thread):
    """Every ``period`` seconds: running and target replicas of one application (from ``serve.status()``)."""

    def __init__(self, app: str, period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.app, self.period = app, period
        self.samples: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self._halt = threading.Event()

    def run(self) -> None:
        from ray import serve

        while not self._halt.wait(self.period):
            try:
                overview = serve.status().applications[self.app]
                (deployment,) = overview.deployments.values()
                running = int(deployment.replica_states.get("RUNNING", 0))
                starting = sum(int(n) for state, n in deployment.replica_states.items() if state != "RUNNING")
                target = getattr(deployment, "target_num_replicas", None)
            except Exception:  # noqa: BLE001 - a missed sample is not fatal
                continue
            self.samples.append({"t": round(time.monotonic() - self.t0, 2), "running": running,
                                 "other_states": starting, "target": target})

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def run_steps(coalition: Any, steps: list[tuple[float, float]], args: argparse.Namespace,
              sampler: ReplicaSampler) -> list[dict[str, Any]]:
    """One loadgen run per step, back to back; each result keeps its one-second timeline."""
    import scenarios

    scenario = scenarios.SCENARIOS[SCENARIO]
    work = Path(tempfile.mkdtemp(prefix="kas-ray-autoscale-"))
    files = []
    for k, (rate, seconds) in enumerate(steps):  # build every step first: no gap between steps
        reqs, _checks = coalition.build(scenario, int(rate * seconds))
        path = work / f"step{k}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps({"meta": {"phase": f"step{k}", "scenario": SCENARIO}}) + "\n")
            for req in reqs:
                fh.write(json.dumps(req, separators=(",", ":")) + "\n")
        files.append(path)
    results = []
    for k, ((rate, seconds), path) in enumerate(zip(steps, files, strict=True)):
        out = work / f"step{k}.json"
        started = time.monotonic() - sampler.t0
        print(f"  step {k + 1}/{len(steps)}: {rate:g} req/s for {seconds:g} s (t = {started:.0f} s)", flush=True)
        cmd = [sys.executable, str(bench_kas.LOADGEN), "--url", coalition.base_url, "--requests", str(path),
               "--rate", str(rate), "--warmup-s", "0", "--out", str(out), "--client", args.client,
               "--timeout", str(args.timeout), "--connections", str(max(16, int(rate * 0.05)))]
        subprocess.run(cmd, check=True, timeout=seconds * 2 + args.timeout + 120)
        result = json.loads(out.read_text())
        result.pop("snapshots", None)
        result.update({"step": k, "offered_rate": rate, "seconds": seconds, "start_s": round(started, 2)})
        lat = result["latency_ms"]
        print(f"    achieved {result['achieved_rps']} req/s, p50 {lat['p50']} / p95 {lat['p95']} ms, "
              f"errors {result['errors']}; replicas now {sampler.samples[-1]['running'] if sampler.samples else '?'}",
              flush=True)
        results.append(result)
    return results


def summarise(samples: list[dict[str, Any]], steps: list[dict[str, Any]]) -> dict[str, Any]:
    """When replicas rose and fell, relative to the step that caused it."""
    def first(pred: Any, after: float) -> float | None:
        return next((s["t"] for s in samples if s["t"] >= after and pred(s)), None)

    base = min((s["running"] for s in samples), default=0)
    peak = max((s["running"] for s in samples), default=0)
    high = max(steps, key=lambda s: s["offered_rate"])
    high_end = high["start_s"] + high["seconds"]
    up = first(lambda s: s["running"] > base, high["start_s"])
    down = first(lambda s: s["running"] <= base, high_end) if up is not None else None
    return {"replicas_min": base, "replicas_peak": peak,
            "scaled_up_after_s": round(up - high["start_s"], 1) if up is not None else None,
            "scaled_down_after_s": round(down - high_end, 1) if down is not None else None,
            "rose_and_fell": up is not None and down is not None}


def plot(results: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_l) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    samples = results["replicas"]
    ax_r.step([s["t"] for s in samples], [s["running"] for s in samples], where="post", label="running replicas")
    targets = [(s["t"], s["target"]) for s in samples if s["target"] is not None]
    if targets:
        ax_r.step(*zip(*targets, strict=True), where="post", linestyle="--", label="target replicas")
    rate_ax = ax_r.twinx()
    for step in results["steps"]:
        rate_ax.hlines(step["offered_rate"], step["start_s"], step["start_s"] + step["seconds"], colors="grey")
    rate_ax.set_ylabel("offered req/s (grey)")
    ax_r.set_ylabel("replicas")
    ax_r.legend(loc="upper left")
    for step in results["steps"]:
        tl = step.get("timeline", [])
        ax_l.plot([step["start_s"] + p["t"] for p in tl], [p["p95_ms"] for p in tl], color="tab:red",
                  linewidth=0.8)
    ax_l.set_yscale("log")
    ax_l.set_ylabel("p95 latency per second (ms)")
    ax_l.set_xlabel("seconds")
    fig.suptitle(f"Autoscaling of one KAS ({results['settings']['config']})")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=bench_kas.REPO_ROOT / "deployments" / "local.yaml",
                        help="Serve config file whose nation deployment options (autoscaling) are used")
    parser.add_argument("--steps", default="20:30,220:60,20:150",
                        help="offered load as rate:seconds,... (default: low, high, low)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--client", default="raw", choices=("raw", "httpx"))
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--address", default=None)
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--serve-mode", default="haproxy", choices=bench_kas.SERVE_MODES)
    parser.add_argument("--worker-niceness", type=int, default=0)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--state-dir", default=None)
    parser.add_argument("--kas-key", default="rsa:4096")
    parser.add_argument("--settle-max", type=float, default=150.0,
                        help="seconds to wait, before the first step, for the home to be back at min_replicas")
    args = parser.parse_args(argv)
    args.deployment_config = None  # the other nations keep the code's defaults; the home gets --config
    args.prime = True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import scenarios

    options = bench_kas.deployment_options(args.config)
    steps = parse_steps(args.steps)
    started = dt.datetime.now(dt.UTC)
    print(f"bench_autoscale: {args.config.name} options {json.dumps(options)}; steps {args.steps}", flush=True)
    with bench_kas.cluster(args) as coalition:
        from kas_ray.serve.runner import _wait_ready, deploy

        home = scenarios.HOME
        # Prime (parallel requests) before the autoscaled deployment exists, so that the priming does not
        # scale it up; the new replica finds the shares in the nation's cache actor.
        scenarios.prime(coalition, scenarios.SCENARIOS[SCENARIO])
        (settings,) = [s for s in coalition.settings() if s.nation == home]
        deploy([settings], index=False, deployment_options=options)
        _wait_ready([coalition.url(home)])
        sampler = ReplicaSampler(home.lower())
        sampler.start()
        # Priming sends requests in parallel and may have scaled the home up: start from min_replicas.
        floor = options.get("autoscaling_config", {}).get("min_replicas", 1)
        deadline = time.monotonic() + args.settle_max
        while time.monotonic() < deadline and (not sampler.samples or sampler.samples[-1]["running"] > floor):
            time.sleep(1)
        print(f"  start: {sampler.samples[-1]['running'] if sampler.samples else '?'} replica(s) "
              f"at t = {time.monotonic() - sampler.t0:.0f} s", flush=True)
        try:
            step_results = run_steps(coalition, steps, args, sampler)
        finally:
            sampler.stop()
    results = {"benchmark": "bench_autoscale", "date": started.isoformat(timespec="seconds"),
               "machine": {"cpus": os.cpu_count(), "load_avg_end": os.getloadavg()[0]},
               "settings": {"config": str(args.config.relative_to(bench_kas.REPO_ROOT))
                            if args.config.is_relative_to(bench_kas.REPO_ROOT) else str(args.config),
                            "deployment_options": options, "steps": args.steps, "scenario": SCENARIO,
                            "serve_mode": args.serve_mode},
               "steps": step_results, "replicas": sampler.samples}
    results["summary"] = summarise(sampler.samples, step_results)
    out = results_file.save(json.dumps(results, indent=1, default=str), args.out)
    print(f"summary: {json.dumps(results['summary'])}" + (f"\nresults: {out}" if out else ""), flush=True)
    if out is not None:
        try:
            plot(results, out.with_suffix(".png"))
            print(f"plot: {out.with_suffix('.png')}")
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install -e '.[perf]')")
    return 0 if results["summary"]["rose_and_fell"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Plots and tables from a ``bench_kas.py`` result: PNGs next to the JSON, tables into docs/performance.md.

    python perf/plot.py [perf/results/kas.json] [--no-docs]

``bench_kas.py`` calls :func:`report` at the end of a run, so ``python perf/bench_kas.py --all``
regenerates everything. Each results file has its own generated part of docs/performance.md, between
the markers ``<!-- bench_kas:STEM:begin -->`` and ``<!-- bench_kas:STEM:end -->`` (STEM: the JSON file
name without ``.json``; PNGs are ``STEM-*.png`` next to it); the rest of the file is left alone (a
missing section is appended, with its markers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

PERF = Path(__file__).resolve().parent
REPO_ROOT = PERF.parent
DOCS = REPO_ROOT / "docs" / "performance.md"


def markers(stem: str) -> tuple[str, str]:
    return f"<!-- bench_kas:{stem}:begin -->", f"<!-- bench_kas:{stem}:end -->"


def _fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


# --- plots ---------------------------------------------------------------------------------------------------
def plot_latency_vs_load(results: dict[str, Any], path: Path) -> bool:
    search = results.get("max_search")
    if not search:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    colours = {"noop": "tab:gray", "1kas-warm": "tab:blue"}
    for target, steps in search["steps"].items():
        xs = [s["offered_rate"] for s in steps]
        for q, style in (("p50", ":"), ("p95", "-"), ("p99", "--")):
            ys = [s["latency_ms"][q] if s["latency_ms"][q] is not None else float("nan") for s in steps]
            ax.plot(xs, ys, style, marker="o", ms=3, color=colours.get(target), label=f"{target} {q}")
        fails = [s for s in steps if not s["pass"]]
        for s in fails:
            y = s["latency_ms"]["p95"]
            if y is not None:
                ax.plot([s["offered_rate"]], [y], "x", color="red", ms=8)
    ax.axhline(200, color="red", lw=0.8, ls="-.", label="p95 limit 200 ms")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s, open loop)")
    ax.set_ylabel("latency from scheduled send (ms, successes)")
    ratio = search.get("ratio_warm_to_noop")
    title = "Latency vs offered load: warm one-KAS rewrap vs no-op Serve endpoint"
    if ratio is not None:
        title += f"\nmax throughput at p95 <= 200 ms: {search['1kas-warm']['max_rps']} vs " \
                 f"{search['noop']['max_rps']} req/s ({ratio:.2f} x)"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.text(0.01, 0.01, f"{results['date']}; red x: failing step", fontsize=6, color="gray")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_latency_at_rate(results: dict[str, Any], path: Path) -> bool:
    phases = results.get("phases") or {}
    if not phases:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from bench_kas import P95_TARGET_MS

    names = list(phases)
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    width = 0.27
    for k, (q, colour) in enumerate((("p50", "tab:green"), ("p95", "tab:blue"), ("p99", "tab:purple"))):
        ys = [phases[n]["latency_ms"][q] or 0 for n in names]
        ax.bar([i + (k - 1) * width for i in range(len(names))], ys, width, label=q, color=colour)
    for i, n in enumerate(names):
        if n in P95_TARGET_MS:
            ax.plot([i - 0.45, i + 0.45], [P95_TARGET_MS[n]] * 2, color="red", lw=1.5)
        if phases[n]["errors"]:
            ax.text(i, 1, f"{phases[n]['errors']} err", ha="center", va="bottom", fontsize=7, color="red")
    ax.plot([], [], color="red", lw=1.5, label="p95 target")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms, successes)")
    rate = results["settings"]["rate"]
    ax.set_title(f"Latency at {rate:g} req/s offered (open loop), one run of {results['date'][:10]}", fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# --- tables ----------------------------------------------------------------------------------------------------
def _hit(p: dict[str, Any]) -> str:
    parts = []
    for nation, c in (p.get("cache") or {}).items():
        if c and c.get("hit_rate") is not None:
            parts.append(f"{nation[0]} {c['hit_rate']:.1%}")
    return ", ".join(parts) or "-"


def phase_table(phases: dict[str, Any], names: list[str]) -> list[str]:
    rows = ["| scenario | offered req/s | achieved req/s | errors | p50 ms | p95 ms | p99 ms | p95 - no-op ms "
            "| p95 x no-op | cache hit rate | HSM unwraps/s | send lag p99 ms | generator CPU ms/req |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for name in names:
        p = phases.get(name)
        if p is None:
            continue
        lat, r = p["latency_ms"], p.get("ratios") or {}
        err = f"{p['errors']} / {p['measured_requests']}"
        unwraps = r.get("hsm_unwraps_per_s")
        hsm = "-" if unwraps is None else f"{unwraps:g} ({r['hsm_load_x_one_core_rsa4096']:.2f} core)"
        rows.append(f"| `{name}` | {p['offered_rate']:g} | {_fmt(p['achieved_rps'])} | {err} | {_fmt(lat['p50'])} "
                    f"| **{_fmt(lat['p95'])}** | {_fmt(lat['p99'])} | {_fmt(r.get('p95_over_noop_ms'))} "
                    f"| {_fmt(r.get('p95_x_noop'), 2)} | {_hit(p)} | {hsm} | {_fmt(p['send_lag_ms']['p99'])} "
                    f"| {_fmt(p['generator_cpu_per_request_ms'], 3)} |")
    return rows


def search_table(search: dict[str, Any]) -> list[str]:
    rows = ["| target | offered req/s | achieved req/s | p50 ms | p95 ms | p99 ms | errors | step |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]
    for target, steps in search["steps"].items():
        for s in steps:
            lat = s["latency_ms"]
            rows.append(f"| `{target}` | {s['offered_rate']:g} | {_fmt(s['achieved_rps'])} | {_fmt(lat['p50'])} "
                        f"| {_fmt(lat['p95'])} | {_fmt(lat['p99'])} | {s['errors']} "
                        f"| {'pass' if s['pass'] else 'FAIL'} |")
    return rows


def markdown(results: dict[str, Any], png_rel: dict[str, str], stem: str = "kas") -> str:
    from bench_kas import SLOW_PAIR, TARGET_PHASES

    s, m, b = results["settings"], results["machine"], results["baselines"]
    serve_env = ", ".join(f"`{k}={v}`" for k, v in sorted((s.get("serve_env") or {}).items())
                          if not k.startswith("RAY_SERVE_HAPROXY_"))  # private paths and ports of the run
    rsa_runs = ", ".join(f"{r['per_s_wall']:.0f}" for r in b["rsa4096_runs"])
    phases = results["phases"]
    begin, end = markers(stem)
    argv = " ".join(str(a) for a in s.get("argv") or [])
    lines = [begin, "",
             f"*Generated by `perf/bench_kas.py` from `perf/results/{stem}.json` ({results['date']}, "
             f"{results['elapsed_s'] / 60:.1f} min; regenerate with `python perf/bench_kas.py {argv}`).*", "",
             f"Machine: {m['cpus']} cores, {m['platform']}, Python {m['python']}, Ray {results.get('ray', '?')}; "
             f"load average {m['load_avg_start']:.1f} at the start and {m.get('load_avg_end', 0):.1f} at the end "
             f"(other engineers' test suites share the machine). Generator: `{s['client']}` client, own process. "
             f"KAS key {s['kas_key']}. Serve mode: `{s.get('serve_mode')}` "
             f"({serve_env or 'no Serve switches'}).",
             "",
             f"**Baselines of this run:** RSA-4096 OAEP-SHA256 decrypt on one core: "
             f"**{b['rsa4096_oaep_decrypts_per_s']:.0f}/s** "
             f"(runs: {rsa_runs})."]
    if b.get("noop_at_rate"):
        nl = b["noop_at_rate"]["latency_ms"]
        lines.append(f"No-op Serve endpoint at {s['rate']:g} req/s: p50 {_fmt(nl['p50'])} ms, "
                     f"p95 {_fmt(nl['p95'])} ms, p99 {_fmt(nl['p99'])} ms.")
    lines += ["", "#### Targets", "", "| target | measured | met |", "|---|---|---|"]
    for c in results.get("targets", []):
        verdict = {True: "yes", False: "**no**", None: "n/a (run shorter than the target's)"}[c["pass"]]
        lines.append(f"| {c['target']} | {c['measured']} | {verdict} |")
    main_names = [n for n in TARGET_PHASES if n in phases]
    if main_names:
        lines += ["", f"#### Scenarios at {s['rate']:g} req/s for {s['duration_s']:g} s "
                  f"(after {s['warmup_s']:g} s of warm-up at the same rate)", ""]
        lines += phase_table(phases, main_names)
    slow_names = [n for n in SLOW_PAIR if n in phases]
    if slow_names:
        lines += ["", f"#### anyOf over two foreign peers, with and without {s['slow_peer']} slowed by "
                  f"{s['slow_delay_s'] * 1e3:.0f} ms ({s.get('slow_rate', s['rate']):g} req/s, "
                  f"{s['slow_duration_s']:g} s each)", ""]
        lines += phase_table(phases, slow_names)
    if png_rel.get("rate"):
        lines += ["", f"![latency at {s['rate']:g} req/s]({png_rel['rate']})"]
    search = results.get("max_search")
    if search:
        lines += ["", f"#### Maximum throughput ({search['criterion']})", ""]
        ratio = search.get("ratio_warm_to_noop")
        lines.append(f"Warm one-KAS: **{_fmt(search['1kas-warm']['max_rps'])} req/s**; no-op endpoint: "
                     f"**{_fmt(search['noop']['max_rps'])} req/s**; ratio **{_fmt(ratio, 2)}** (target >= 0.7).")
        lines += [""] + search_table(search)
        if png_rel.get("load"):
            lines += ["", f"![latency vs offered load]({png_rel['load']})"]
    lines += ["", "Columns: *achieved* = successful answers per second over the measured window; latency is "
              "from each request's **scheduled** send time to its answer, successes only (errors are counted, "
              "not timed); *p95 - no-op* and *p95 x no-op* compare with the no-op endpoint at the same rate in "
              "this run; *cache hit rate* is per nation (first letter), from the `/stats` counters before and "
              "after the window: (replica-cache hits + cache-actor hits) / lookups; *HSM unwraps/s* are the "
              "lookups that reached neither cache, and in brackets the share of one core's RSA-4096 decrypt "
              "rate they need; *send lag* is actual minus scheduled send time in the generator.", "", end]
    return "\n".join(lines)


def update_docs(text: str, stem: str, title: str, docs: Path = DOCS) -> None:
    begin, end = markers(stem)
    current = docs.read_text(encoding="utf-8") if docs.exists() else "# Performance\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        _old, tail = rest.split(end, 1)
        new = head + text + tail
    else:
        new = current.rstrip("\n") + f"\n\n### {title}\n\n" + text + "\n"
    docs.write_text(new, encoding="utf-8")


def report(json_path: Path, *, docs: bool = True) -> None:
    if str(PERF) not in sys.path:
        sys.path.insert(0, str(PERF))
    results = json.loads(Path(json_path).read_text())
    out_dir, stem = Path(json_path).parent, Path(json_path).stem
    load_png, rate_png = out_dir / f"{stem}-latency-vs-load.png", out_dir / f"{stem}-latency-at-rate.png"
    png: dict[str, Path] = {}
    try:
        if plot_latency_vs_load(results, load_png):
            png["load"] = load_png
        if plot_latency_at_rate(results, rate_png):
            png["rate"] = rate_png
    except ImportError:
        print("plot: matplotlib is not installed (pip install -e '.[perf]'): no PNGs", file=sys.stderr)
    for path in png.values():
        print(f"plot: {path}")
    if docs:
        rel = {k: _relative(v, DOCS.parent) for k, v in png.items()}
        mode = results["settings"].get("serve_mode") or "inherit"
        update_docs(markdown(results, rel, stem), stem, f"Measured: `{stem}.json` (Serve mode `{mode}`)")
        print(f"docs: {DOCS} (section {markers(stem)[0]})")


def _relative(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", default=str(PERF / "results" / "kas.json"))
    ap.add_argument("--no-docs", action="store_true", help="only the PNGs")
    args = ap.parse_args(argv)
    report(Path(args.results), docs=not args.no_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

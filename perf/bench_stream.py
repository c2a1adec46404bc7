"""Benchmark: streaming ZTDF encrypt / decrypt of a large file, with peak RSS per phase.

Requirement checked: "Encrypt and decrypt stream: a 1 GiB file passes with peak RSS under 150 MB".

Every phase runs in a fresh child process (this script with ``--child PHASE``), so the peak RSS a
child reports is that phase's alone. The child reports on its last stdout line, as JSON, its own
``ru_maxrss`` and ``VmHWM``. Progress goes to stderr. The phases:

1. ``copy``            a plain chunked file copy: the interpreter + imports RSS baseline
2. ``aesgcm-encrypt``  raw AES-256-GCM over the file in segment-size chunks (no zip, no manifest)
3. ``aesgcm-decrypt``  the inverse of 2: the throughput baseline for decrypt
4. ``encrypt``         ``kas_ray.ztdf.encrypt`` to an RSA-2048 KAS key generated in the run
5. ``decrypt``         ``kas_ray.ztdf.decrypt`` with ``PrivateKeyUnwrapper``; SHA-256 of the output
                       must equal the input's

Every child imports the same modules (kas_ray.ztdf, cryptography) before its clock starts. So
"RSS over baseline" is what the phase's work costs, on top of the interpreter and its imports.
Throughput ratios compare with the raw AES-GCM pass in the same run. The machines are shared, so
absolute MiB/s numbers cannot be compared across runs. Wall-clock and CPU time (user + sys) are
both reported. With ``--repeat N`` (default 3) the phases run N times, interleaved; the report keeps
the fastest run of each phase and the highest peak RSS.

Files: the input, the TDF and the output stay in the page cache. Outputs overwrite files that were
prefilled (with filler, not the input) before the first phase. So the phases measure CPU and
memory traffic, not the disk. On the shared VMs, the first write into fresh page-cache memory
costs about 4 s/GiB, and how much of it a phase pays changes from run to run; that noise swamped
the ratios when every phase wrote new files. ``--fresh-files`` brings new files back.

Run locally:   python perf/bench_stream.py [--size-mib 1024] [--segment-mib 2] [--out FILE] [--keep]
As a Ray job:  ray job submit --working-dir . -- python perf/bench_stream.py --size-mib 256

Exit status: 0 PASS, 1 FAIL (peak RSS limit or a hash mismatch), 2 refused (bad arguments, not
enough disk space).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()
REPO_ROOT = SCRIPT.parent.parent
DEFAULT_OUT = SCRIPT.parent / "results" / "stream.json"

MIB = 1024 * 1024
GIB = 1024 * MIB
RSS_LIMIT_BYTES = 150 * 1000 * 1000  # "150 MB" from the issue, read strictly as decimal MB (143.05 MiB)
HEADROOM_BYTES = 1 * GIB
NONCE, TAG = 12, 16
KAS_URL = "https://kas.example.org/kas"
KID = "bench-r1"
ATTRIBUTE = "https://example.com/attr/classification/value/secret"

PHASES = ("copy", "aesgcm-encrypt", "aesgcm-decrypt", "encrypt", "decrypt")
BASELINE_FOR = {"encrypt": "aesgcm-encrypt", "decrypt": "aesgcm-decrypt"}
CHECKED = ("encrypt", "decrypt")

if importlib.util.find_spec("kas_ray") is None:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))
if str(Path(__file__).resolve().parent) not in sys.path:  # perf/ helpers, also when imported
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # noqa: E402


# --- child side -----------------------------------------------------------------------------------------
class _Progress:
    """Prints ``phase: NN%`` to stderr every ~10% of ``total`` bytes."""

    def __init__(self, phase: str, total: int) -> None:
        self.phase, self.total, self.done, self.next_pct = phase, max(total, 1), 0, 10
        self.start = time.perf_counter()

    def add(self, n: int) -> None:
        self.done += n
        pct = self.done * 100 // self.total
        if pct >= self.next_pct:
            elapsed = time.perf_counter() - self.start
            print(f"    {self.phase}: {min(pct, 100):3d}% ({self.done / MIB:.0f}/{self.total / MIB:.0f} MiB, "
                  f"{elapsed:.1f} s)", file=sys.stderr, flush=True)
            self.next_pct = (pct // 10 + 1) * 10


class _CountingReader:
    """Seekable read-side wrapper (``encrypt`` sizes the input with tell/seek) that reports progress."""

    def __init__(self, raw, progress: _Progress) -> None:
        self._raw, self._progress = raw, progress

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._progress.add(len(data))
        return data

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)


class _CountingWriter:
    def __init__(self, raw, progress: _Progress) -> None:
        self._raw, self._progress = raw, progress

    def write(self, data) -> int:
        n = self._raw.write(data)
        self._progress.add(len(data))
        return n

    def flush(self) -> None:
        self._raw.flush()


def _vm_hwm_kib() -> int | None:
    """Peak RSS of this process's address space (not inherited across exec, unlike ru_maxrss)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_kib() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB on Linux


def _open_dst(dst: Path):
    """Overwrite ``dst`` in place when it exists (see "Files" in the module docstring), else create it."""
    return open(dst, "r+b") if dst.exists() else open(dst, "wb")


def _run_child(args: argparse.Namespace) -> int:
    # The same imports in every phase, before measuring anything, so baselines are comparable.
    import cryptography
    from cryptography.hazmat.backends.openssl import backend
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from kas_ray.ztdf import KasKey, Policy, PrivateKeyUnwrapper, decrypt, encrypt

    phase, src, dst, seg = args.child, Path(args.src), Path(args.dst), args.segment_mib * MIB
    key_file = Path(args.key_file)
    rss_start = _vm_hwm_kib() or _maxrss_kib()
    extra: dict[str, object] = {}

    # Untimed set-up: keys, policy, progress reporting.
    if phase == "aesgcm-encrypt":
        aes_key = os.urandom(32)
        key_file.with_suffix(".aes").write_bytes(aes_key)
    elif phase == "aesgcm-decrypt":
        aes_key = key_file.with_suffix(".aes").read_bytes()
    elif phase == "encrypt":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_file.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        kas = KasKey(url=KAS_URL, public_key_pem=public_pem, kid=KID)
        policy = Policy.create([ATTRIBUTE])
    elif phase == "decrypt":
        unwrap = PrivateKeyUnwrapper({KID: serialization.load_pem_private_key(key_file.read_bytes(), None)})
    progress = _Progress(phase, args.plain_size or src.stat().st_size)

    cpu0, t0 = os.times(), time.perf_counter()
    with open(src, "rb") as fin, _open_dst(dst) as fout:
        if phase == "copy":
            while chunk := fin.read(seg):
                fout.write(chunk)
                progress.add(len(chunk))
        elif phase == "aesgcm-encrypt":
            aead = AESGCM(aes_key)
            while chunk := fin.read(seg):
                nonce = os.urandom(NONCE)
                fout.write(nonce)
                fout.write(aead.encrypt(nonce, chunk, None))
                progress.add(len(chunk))
        elif phase == "aesgcm-decrypt":
            aead = AESGCM(aes_key)
            while sealed := fin.read(seg + NONCE + TAG):
                plain = aead.decrypt(sealed[:NONCE], sealed[NONCE:], None)
                fout.write(plain)
                progress.add(len(plain))
        elif phase == "encrypt":
            manifest = encrypt(_CountingReader(fin, progress), fout, splits=[[kas]], policy=policy,
                               segment_size=seg)
            extra["segments"] = len(manifest.encryption_information.integrity_information.segments)
        elif phase == "decrypt":
            decrypt(fin, _CountingWriter(fout, progress), unwrap)
        fout.truncate()  # drop the tail of a longer previous content
    seconds, cpu1 = time.perf_counter() - t0, os.times()

    report = {
        "phase": phase,
        "seconds": seconds,
        "cpu_user_s": cpu1.user - cpu0.user,
        "cpu_sys_s": cpu1.system - cpu0.system,
        "bytes_in": src.stat().st_size,
        "bytes_out": dst.stat().st_size,
        "rss_after_imports_kib": rss_start,
        "peak_rss_kib": _maxrss_kib(),
        "vm_hwm_kib": _vm_hwm_kib(),
        "cryptography": cryptography.__version__,
        "openssl": backend.openssl_version_text(),
        **extra,
    }
    print(json.dumps(report), flush=True)
    return 0


# --- parent side ----------------------------------------------------------------------------------------
def _make_input(path: Path, size: int, prefill: list[Path], extra: int) -> str:
    """Random bytes, 1 MiB of os.urandom at a time; returns the SHA-256 computed while writing.

    The ``prefill`` files get ``size + extra`` filler bytes: the phases overwrite them in place,
    so that every phase writes into page-cache pages that are already resident.
    """
    digest = hashlib.sha256()
    left = size
    with open(path, "wb") as fh:
        while left:
            chunk = os.urandom(min(MIB, left))
            fh.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    for target in prefill:
        _scribble(target, size + extra)
    return digest.hexdigest()


_FILLER = os.urandom(MIB)


def _scribble(path: Path, length: int | None = None) -> None:
    """Overwrite ``path`` in place with filler (not the input), so a stale copy cannot pass the hash check."""
    length = path.stat().st_size if length is None else length
    with open(path, "r+b" if path.exists() else "wb") as fh:
        while length > 0:
            fh.write(_FILLER[: min(MIB, length)])
            length -= MIB


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _sync() -> None:
    """Flush the previous phase's dirty pages so their writeback is not billed to the next phase."""
    if hasattr(os, "sync"):
        os.sync()


def _run_phase(phase: str, src: Path, dst: Path, args: argparse.Namespace, key_file: Path,
               plain_size: int) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--child", phase, "--src", str(src), "--dst", str(dst),
           "--key-file", str(key_file), "--segment-mib", str(args.segment_mib),
           "--plain-size", str(plain_size)]
    # The child is this script again: it finds kas_ray the same way (sys.path fallback at the top).
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=args.timeout,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"phase {phase} failed with exit status {proc.returncode}: {proc.stdout[-2000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1])


def _ray_job_submission_id() -> str | None:
    """The submission id when running as a Ray job entrypoint (the supervisor passes it in its job config)."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", ""))
        return config["metadata"]["job_submission_id"]
    except (ValueError, KeyError, TypeError):
        return None


def _fmt_mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def _print_table(results: dict) -> None:
    phases = results["phases"]
    print()
    print(f"{'phase':<16}{'wall s':>8}{'MiB/s':>8}{'x base':>8}{'CPU s':>7}{'x base':>8}"
          f"{'peak RSS MiB':>14}{'over copy':>11}")
    for name in PHASES:
        p = phases[name]
        wall_r, cpu_r = (("-" if r is None else f"{r:.2f}") for r in (p["throughput_ratio"], p["cpu_ratio"]))
        print(f"{name:<16}{p['seconds']:>8.2f}{p['mib_per_s']:>8.1f}{wall_r:>8}{p['cpu_s']:>7.2f}{cpu_r:>8}"
              f"{_fmt_mib(p['peak_rss_kib']):>14}{_fmt_mib(p['rss_over_baseline_kib']):>11}")
    print("  x base: encrypt vs aesgcm-encrypt, decrypt vs aesgcm-decrypt: wall-clock throughput ratio, then")
    print("          CPU-time ratio (baseline CPU s / phase CPU s); 1.00 = no overhead over raw AES-GCM.")
    print("  over copy: peak RSS minus the copy phase's (the interpreter + the same imports).")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="input size in MiB (default 1024 = 1 GiB)")
    ap.add_argument("--segment-mib", type=int, default=2, help="TDF segment / AES-GCM chunk size in MiB")
    ap.add_argument("--out", default=str(DEFAULT_OUT),
                    help="JSON results file (default: results/stream.json next to this script; "
                         "'-' for stdout only)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary input/tdf/output files")
    ap.add_argument("--tmp-dir", default=None,
                    help="where to put the temporary files (default: the system temp dir)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="run every phase N times; report the fastest run and the highest RSS (default 3)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per phase")
    ap.add_argument("--fresh-files", action="store_true",
                    help="write every output to a new file instead of overwriting a prefilled one "
                         "(adds page-cache allocation, which is slow and erratic on the shared VMs)")
    # internal: one phase in a fresh process
    ap.add_argument("--child", choices=PHASES, help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--dst", help=argparse.SUPPRESS)
    ap.add_argument("--key-file", help=argparse.SUPPRESS)
    ap.add_argument("--plain-size", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.size_mib < 1 or args.segment_mib < 1 or args.segment_mib > 64 or args.repeat < 1:
        ap.error("--size-mib and --repeat must be >= 1, --segment-mib in 1..64")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.child:
        return _run_child(args)

    size = args.size_mib * MIB
    tmp_parent = Path(args.tmp_dir or tempfile.gettempdir())
    need = 3 * size + HEADROOM_BYTES  # input + tdf + decrypted output, never more than three at once
    free = shutil.disk_usage(tmp_parent).free
    if free < need:
        print(f"refusing to run: {free / GIB:.1f} GiB free in {tmp_parent}, need {need / GIB:.1f} GiB "
              f"(input + tdf + output of {args.size_mib} MiB each, plus 1 GiB headroom). "
              "Use --tmp-dir on a larger disk or a smaller --size-mib.", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="kas-ray-bench-stream-", dir=tmp_parent))
    started = dt.datetime.now(dt.UTC)
    load_start = os.getloadavg()[0]
    print(f"bench_stream: {args.size_mib} MiB, segment {args.segment_mib} MiB, {os.cpu_count()} CPUs, "
          f"load avg {load_start:.2f}, temp dir {work}", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in PHASES}
    hashes_ok = True
    try:
        src, tdf, out = work / "input.bin", work / "output.tdf", work / "output.bin"
        key_file = work / "kas-private.pem"
        t0 = time.perf_counter()
        segments = -(-size // (args.segment_mib * MIB))
        input_sha = _make_input(src, size, [] if args.fresh_files else [tdf, out],
                                extra=segments * (NONCE + TAG) + MIB)
        print(f"[0/5] input: {args.size_mib} MiB random written in {time.perf_counter() - t0:.1f} s, "
              f"sha256 {input_sha[:16]}...", flush=True)

        steps = [  # (phase, source, destination, hash-check the destination)
            ("copy", src, out, False),
            ("aesgcm-encrypt", src, tdf, False),
            ("aesgcm-decrypt", tdf, out, True),
            ("encrypt", src, tdf, False),
            ("decrypt", tdf, out, True),
        ]
        for rep in range(args.repeat):
            for index, (phase, p_src, p_dst, check) in enumerate(steps, start=1):
                if args.fresh_files:
                    p_dst.unlink(missing_ok=True)  # also keeps at most three files of `size` on disk
                elif check:
                    _scribble(p_dst)
                _sync()
                label = f"[{index}/5] {phase}"
                if args.repeat > 1:
                    label += f" (run {rep + 1}/{args.repeat})"
                print(f"{label} ...", flush=True)
                result = _run_phase(phase, p_src, p_dst, args, key_file, size)
                result["cpu_s"] = result["cpu_user_s"] + result["cpu_sys_s"]
                hash_s = ""
                if check:
                    result["sha256_ok"] = _sha256_file(p_dst) == input_sha
                    hashes_ok &= result["sha256_ok"]
                    hash_s = ", sha256 OK" if result["sha256_ok"] else ", SHA-256 MISMATCH"
                runs[phase].append(result)
                print(f"{label}: {result['seconds']:.2f} s, {size / MIB / result['seconds']:.1f} MiB/s, "
                      f"CPU {result['cpu_user_s']:.2f} s user + {result['cpu_sys_s']:.2f} s sys, "
                      f"peak RSS {_fmt_mib(result['peak_rss_kib'])} MiB{hash_s}", flush=True)
    finally:
        if args.keep:
            print(f"kept temporary files in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    phases: dict[str, dict] = {}
    for name, reps in runs.items():
        best = min(reps, key=lambda r: r["seconds"])
        phases[name] = {
            **best,
            "runs_seconds": [r["seconds"] for r in reps],
            "cpu_s": min(r["cpu_s"] for r in reps),
            "peak_rss_kib": max(r["peak_rss_kib"] for r in reps),
            "vm_hwm_kib": max((r["vm_hwm_kib"] or 0) for r in reps) or None,
            "mib_per_s": size / MIB / best["seconds"],
        }
        if any("sha256_ok" in r for r in reps):
            phases[name]["sha256_ok"] = all(r.get("sha256_ok", False) for r in reps)
    base_rss = phases["copy"]["peak_rss_kib"]
    for name, p in phases.items():
        p["rss_over_baseline_kib"] = p["peak_rss_kib"] - base_rss
        base = BASELINE_FOR.get(name)
        p["throughput_ratio"] = p["mib_per_s"] / phases[base]["mib_per_s"] if base else None
        p["cpu_ratio"] = phases[base]["cpu_s"] / p["cpu_s"] if base and p["cpu_s"] > 0 else None
        p["throughput_ratio_to_copy"] = p["mib_per_s"] / phases["copy"]["mib_per_s"]

    ray_job = _ray_job_submission_id()
    rss_ok = all(phases[n]["peak_rss_kib"] * 1024 < RSS_LIMIT_BYTES for n in CHECKED)
    passed = rss_ok and hashes_ok
    results = {
        "benchmark": "bench_stream",
        "date": started.isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "cryptography": phases["copy"]["cryptography"],
                    "openssl": phases["copy"]["openssl"], "load_avg_start": load_start,
                    "load_avg_end": os.getloadavg()[0]},
        "python_executable": sys.executable,
        "ray_job_submission_id": ray_job,
        "size_mib": args.size_mib,
        "segment_mib": args.segment_mib,
        "repeat": args.repeat,
        "fresh_files": args.fresh_files,
        "rss_limit_bytes": RSS_LIMIT_BYTES,
        "driver_peak_rss_kib": _maxrss_kib(),
        "phases": phases,
        "pass": passed,
    }
    _print_table(results)

    worst = max(CHECKED, key=lambda n: phases[n]["peak_rss_kib"])
    worst_mb = phases[worst]["peak_rss_kib"] * 1024 / 1e6
    verdict = "PASS" if passed else "FAIL"
    print(f"\n{verdict}: peak RSS encrypt {phases['encrypt']['peak_rss_kib'] * 1024 / 1e6:.1f} MB, "
          f"decrypt {phases['decrypt']['peak_rss_kib'] * 1024 / 1e6:.1f} MB (max {worst_mb:.1f} MB, "
          f"limit {'<' if rss_ok else 'EXCEEDED:'} 150 MB) on a {args.size_mib} MiB file; "
          f"decrypted SHA-256 {'matches the input' if hashes_ok else 'DIFFERS from the input'}")

    text = json.dumps(results, indent=2)
    out_path = results_file.save(text, args.out)
    if out_path is not None:
        print(f"results: {out_path}")
        if ray_job:  # a Ray job's working dir is a temporary copy: put the JSON in the job logs too
            print(text)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

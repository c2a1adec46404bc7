"""Open-loop load generator: pre-built HTTP requests sent at a fixed arrival rate, whatever the answers.

Request ``i`` is due at ``t0 + i / rate``. It is sent at that time even when earlier requests have not
been answered (open loop: a slow server gets more requests in flight, not fewer requests). Latency
is measured from the *scheduled* time to the last byte of the answer, so a generator that falls
behind cannot hide server slowness (no coordinated omission); the lag between the scheduled and the
actual send is reported separately, to show the generator kept its schedule.

The generator knows nothing about KAS: it reads a request file that ``bench_kas.py`` (or anyone)
wrote, renders every request to raw HTTP/1.1 bytes before the clock starts, and checks answers only
as the file tells it (status 200 and, for rewraps, one ``permit`` per key split). Run it in its own
process, away from the driver of the cluster under test.

Request file (JSON lines): the first line ``{"meta": {...}}`` (free form, copied into the result), then
one request per line::

    {"method": "POST", "path": "/alpha/kas.AccessService/Rewrap", "headers": {...}, "body": "...",
     "splits": [["kao-0", "kao-1"], ["kao-2"]]}

``splits`` (optional): the answer must be a rewrap response in which every listed split has at least
one of its key access object ids with ``status: permit``.

Two HTTP clients: ``raw`` (default), a minimal HTTP/1.1 keep-alive pool on asyncio protocols (about
0.1 ms of CPU per request), and ``httpx`` (``httpx.AsyncClient``, several times that), to compare.

    python perf/loadgen.py --url http://127.0.0.1:8000 --requests reqs.jsonl --rate 100 \
        --warmup-s 5 --out result.json [--snapshot-url http://127.0.0.1:8000/alpha/stats]

Output: one JSON document (``--out`` or stdout) with latency percentiles of successful requests,
errors by kind, achieved throughput, send lag, the generator's own CPU time, and the
``--snapshot-url`` documents fetched at the start and the end of the measured window.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import resource
import socket
import sys
from typing import Any
from urllib.parse import urlsplit

PROGRESS_EVERY_S = 5.0


# --- statistics -------------------------------------------------------------------------------------------
def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary_ms(values: list[float]) -> dict[str, float | None]:
    values = sorted(values)
    out: dict[str, float | None] = {}
    for name, q in (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99), ("p999", 99.9)):
        v = percentile(values, q)
        out[name] = None if v is None else round(v * 1e3, 3)
    out["max"] = round(values[-1] * 1e3, 3) if values else None
    out["mean"] = round(sum(values) / len(values) * 1e3, 3) if values else None
    return out


# --- a minimal HTTP/1.1 client -------------------------------------------------------------------------------
class HttpError(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class _Conn(asyncio.Protocol):
    """One keep-alive connection; one request at a time. Parses Content-Length and chunked answers."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False
        self.keep_alive = True
        self._head: tuple[int, int, int, bool] | None = None  # (status, body start, length or -1, chunked)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HttpError("connection_closed"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None:
            self._parse()

    def send(self, raw: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self.buf.clear()
        self._head = None
        self.waiter = self.loop.create_future()
        self.transport.write(raw)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _parse(self) -> None:
        buf = self.buf
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(buf[:end]).split(b"\r\n")
            try:
                status = int(lines[0].split(b" ", 2)[1])
            except (IndexError, ValueError):
                self._fail("bad_response")
                return
            length, chunked = -1, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value.strip())
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif name == b"connection" and b"close" in value.lower():
                    self.keep_alive = False
            self._head = (status, end + 4, length, chunked)
        status, start, length, chunked = self._head
        if chunked:
            body = self._dechunk(start)
            if body is None:
                return
        elif length >= 0:
            if len(buf) - start < length:
                return
            body = bytes(buf[start:start + length])
        else:
            return  # read-until-close bodies are not used by Serve; wait for connection_lost
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((status, body))

    def _dechunk(self, pos: int) -> bytes | None:
        buf, parts = self.buf, []
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
            if size == 0:
                if buf.find(b"\r\n", eol + 2) < 0:
                    return None
                return b"".join(parts)
            if len(buf) < eol + 2 + size + 2:
                return None
            parts.append(bytes(buf[eol + 2:eol + 2 + size]))
            pos = eol + 2 + size + 2

    def _fail(self, kind: str) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(HttpError(kind))
        self.close()


class RawClient:
    """A pool of keep-alive connections to one host:port; opens a new one whenever all are busy."""

    def __init__(self, host: str, port: int, max_connections: int) -> None:
        self.host, self.port, self.max = host, port, max_connections
        self.idle: collections.deque[_Conn] = collections.deque()
        self.count = 0
        self.opened = 0
        self.waiters: collections.deque[asyncio.Future[_Conn]] = collections.deque()

    async def _open(self) -> _Conn:
        loop = asyncio.get_running_loop()
        self.count += 1
        self.opened += 1
        try:
            _transport, conn = await loop.create_connection(lambda: _Conn(loop), self.host, self.port)
        except OSError:
            self.count -= 1
            raise HttpError("connect") from None
        return conn

    async def warm(self, n: int) -> None:
        conns = await asyncio.gather(*(self._open() for _ in range(min(n, self.max))))
        self.idle.extend(conns)

    async def acquire(self) -> _Conn:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
            self.count -= 1
        if self.count < self.max:
            return await self._open()
        waiter: asyncio.Future[_Conn] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        return await waiter

    def release(self, conn: _Conn, reusable: bool) -> None:
        if not reusable or conn.closed or not conn.keep_alive:
            conn.close()
            self.count -= 1
            if self.waiters:  # someone waits for a slot: open a connection for them
                waiter = self.waiters.popleft()
                task = asyncio.ensure_future(self._open())
                task.add_done_callback(lambda t: waiter.set_exception(t.exception()) if t.exception()
                                       else waiter.set_result(t.result()))
            return
        if self.waiters:
            self.waiters.popleft().set_result(conn)
        else:
            self.idle.append(conn)

    async def request(self, raw: bytes, timeout: float, on_sent: Any = None) -> tuple[int, bytes]:
        conn = await self.acquire()
        if on_sent is not None:
            on_sent()
        future = conn.send(raw)
        handle = asyncio.get_running_loop().call_later(timeout, _expire, future)
        try:
            result = await future
        except HttpError:
            self.release(conn, False)
            raise
        finally:
            handle.cancel()
        self.release(conn, True)
        return result

    async def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(HttpError("timeout"))


class HttpxClient:
    """The same interface on ``httpx.AsyncClient`` (for comparing the generator's own cost)."""

    def __init__(self, base: str, max_connections: int) -> None:
        import httpx

        self._httpx = httpx
        self.client = httpx.AsyncClient(base_url=base, limits=httpx.Limits(max_connections=max_connections,
                                                                          max_keepalive_connections=max_connections))
        self.opened = 0

    async def warm(self, n: int) -> None:
        return None

    async def request(self, req: dict[str, Any], timeout: float, on_sent: Any = None) -> tuple[int, bytes]:
        if on_sent is not None:
            on_sent()
        try:
            response = await self.client.request(req["method"], req["path"], headers=req["headers"],
                                                 content=req["body_bytes"], timeout=timeout)
        except self._httpx.TimeoutException:
            raise HttpError("timeout") from None
        except self._httpx.HTTPError as exc:
            raise HttpError(type(exc).__name__) from None
        return response.status_code, response.content

    async def close(self) -> None:
        await self.client.aclose()


def render(req: dict[str, Any], host_header: str) -> bytes:
    body = req.get("body", "")
    body_bytes = body.encode() if isinstance(body, str) else bytes(body)
    lines = [f"{req.get('method', 'POST')} {req['path']} HTTP/1.1", f"Host: {host_header}"]
    for name, value in req.get("headers", {}).items():
        lines.append(f"{name}: {value}")
    lines.append(f"Content-Length: {len(body_bytes)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body_bytes


def check_answer(status: int, body: bytes, splits: list[list[str]] | None) -> str | None:
    """None when the answer is a success, else the error kind."""
    if status != 200:
        try:
            code = json.loads(body).get("error") or json.loads(body).get("code")
        except (ValueError, AttributeError):
            code = None
        return f"http_{status}" + (f":{code}" if code else "")
    if not splits:
        return None
    try:
        data = json.loads(body)
        results = {r["keyAccessObjectId"]: r for resp in data["responses"] for r in resp["results"]}
    except (ValueError, KeyError, TypeError):
        return "bad_rewrap_response"
    for split in splits:
        if not any(results.get(kid, {}).get("status") == "permit" for kid in split):
            errors = [str(results.get(kid, {}).get("error") or "missing") for kid in split]
            return "kao_fail:" + _short(errors[0])
    return None


def _short(message: str) -> str:
    if "desc = " in message:
        message = message.split("desc = ", 1)[1]
    return message[:60]


# --- the run --------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, args: argparse.Namespace, requests: list[dict[str, Any]], meta: dict[str, Any]) -> None:
        self.args = args
        self.requests = requests
        self.meta = meta
        n = len(requests)
        self.scheduled = [0.0] * n
        self.sent = [math.nan] * n
        self.done = [math.nan] * n
        self.error: list[str | None] = [None] * n
        self.completed = 0
        self.issued = 0
        self.snapshots: dict[str, Any] = {"start": {}, "end": {}}

    async def _one(self, client: Any, i: int, payload: Any) -> None:
        req = self.requests[i]
        loop_time = self.loop.time

        def on_sent() -> None:
            self.sent[i] = loop_time()

        try:
            status, body = await client.request(payload, self.args.timeout, on_sent)
            self.done[i] = loop_time()
            self.error[i] = check_answer(status, body, req.get("splits"))
        except HttpError as exc:
            self.done[i] = loop_time()
            self.error[i] = exc.kind
        except Exception as exc:  # noqa: BLE001 - counted, never fatal
            self.done[i] = loop_time()
            self.error[i] = f"exception:{type(exc).__name__}"
        self.completed += 1

    async def _snapshot(self, which: str) -> None:
        import urllib.request

        def fetch(url: str) -> Any:
            try:
                with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - our own cluster
                    return json.loads(response.read())
            except Exception as exc:  # noqa: BLE001
                return {"error": f"{type(exc).__name__}: {exc}"}

        results = await asyncio.gather(*(asyncio.to_thread(fetch, u) for u in self.args.snapshot_url))
        self.snapshots[which] = dict(zip(self.args.snapshot_url, results, strict=True))
        self.snapshots[which + "_at"] = self.loop.time()

    async def main(self) -> dict[str, Any]:
        args = self.args
        self.loop = loop = asyncio.get_running_loop()
        parts = urlsplit(args.url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        prefix = parts.path.rstrip("/")
        for req in self.requests:
            req["path"] = prefix + req["path"]
        if args.client == "raw":
            client: Any = RawClient(host, port, args.max_connections)
            payloads: list[Any] = [render(r, f"{host}:{port}") for r in self.requests]
        else:
            client = HttpxClient(f"{parts.scheme}://{host}:{port}", args.max_connections)
            for r in self.requests:
                body = r.get("body", "")
                r["body_bytes"] = body.encode() if isinstance(body, str) else bytes(body)
            payloads = self.requests
        n = len(self.requests)
        rate = args.rate
        warm_n = min(n, int(round(args.warmup_s * rate)))
        await client.warm(args.connections)
        interval = 1.0 / rate
        tasks: set[asyncio.Task[None]] = set()
        t0 = loop.time() + 0.1
        for i in range(n):
            self.scheduled[i] = t0 + i * interval
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        wall0 = loop.time()
        cpu_mark: resource.struct_rusage | None = None
        mark_wall = wall0
        next_progress = t0 + PROGRESS_EVERY_S
        i = 0
        snapshot_task: asyncio.Task[None] | None = None
        if warm_n == 0 and args.snapshot_url:
            await self._snapshot("start")
        while i < n:
            now = loop.time()
            due = self.scheduled[i]
            if due > now:
                await asyncio.sleep(due - now)
                continue
            while i < n and self.scheduled[i] <= now:
                if i == warm_n and i > 0:
                    cpu_mark, mark_wall = resource.getrusage(resource.RUSAGE_SELF), now
                    if args.snapshot_url:
                        snapshot_task = asyncio.ensure_future(self._snapshot("start"))
                task = asyncio.ensure_future(self._one(client, i, payloads[i]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
                self.issued = i
            if now >= next_progress and not args.quiet:
                self._progress(now - t0)
                next_progress += PROGRESS_EVERY_S
        schedule_end = loop.time()
        if tasks:
            await asyncio.wait(tasks, timeout=args.timeout + 5)
        drain_end = loop.time()
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        if snapshot_task is not None:
            await snapshot_task
        if args.snapshot_url:
            await self._snapshot("end")
        await client.close()
        if cpu_mark is None:
            cpu_mark, mark_wall = cpu0, wall0
        return self._report(warm_n, t0, schedule_end, drain_end, cpu_mark, cpu1, mark_wall,
                            getattr(client, "opened", None))

    def _progress(self, elapsed: float) -> None:
        n_err = sum(1 for e in self.error[:self.issued] if e)
        recent = [self.done[k] - self.scheduled[k] for k in range(max(0, self.issued - int(self.args.rate * 5)),
                                                                  self.issued)
                  if not math.isnan(self.done[k]) and self.error[k] is None]
        p95 = percentile(sorted(recent), 95)
        p95s = f"{p95 * 1e3:.1f} ms" if p95 is not None else "-"
        print(f"    [{self.meta.get('phase', 'load')}] t={elapsed:5.1f}s sent {self.issued}/{len(self.requests)} "
              f"answered {self.completed} errors {n_err} in flight {self.issued - self.completed} "
              f"p95(last 5 s) {p95s}", file=sys.stderr, flush=True)

    def _report(self, warm_n: int, t0: float, schedule_end: float, drain_end: float,
                cpu_a: resource.struct_rusage, cpu_b: resource.struct_rusage, mark_wall: float,
                opened: int | None) -> dict[str, Any]:
        idx = range(warm_n, len(self.requests))
        ok_lat, ok_service, lags, errors = [], [], [], collections.Counter()
        unanswered = 0
        first_sched = self.scheduled[warm_n] if warm_n < len(self.requests) else t0
        last_done = first_sched
        for k in idx:
            if math.isnan(self.done[k]):
                unanswered += 1
                errors["no_answer"] += 1
                continue
            last_done = max(last_done, self.done[k])
            if not math.isnan(self.sent[k]):
                lags.append(self.sent[k] - self.scheduled[k])
            if self.error[k] is None:
                ok_lat.append(self.done[k] - self.scheduled[k])
                ok_service.append(self.done[k] - self.sent[k])
            else:
                errors[self.error[k]] += 1
        measured = len(idx)
        offered_window = (len(idx) / self.args.rate) if measured else 0.0
        window = max(last_done - first_sched, 1e-9)
        cpu_s = (cpu_b.ru_utime - cpu_a.ru_utime) + (cpu_b.ru_stime - cpu_a.ru_stime)
        wall = max(drain_end - mark_wall, 1e-9)
        # one-second buckets (by scheduled time) for plots of a run
        timeline = []
        if measured:
            buckets: dict[int, list[int]] = collections.defaultdict(list)
            for k in idx:
                buckets[int(self.scheduled[k] - first_sched)].append(k)
            for second in sorted(buckets):
                ks = buckets[second]
                lat = sorted(self.done[k] - self.scheduled[k] for k in ks
                             if self.error[k] is None and not math.isnan(self.done[k]))
                timeline.append({"t": second, "sent": len(ks), "ok": len(lat),
                                 "p50_ms": round((percentile(lat, 50) or 0) * 1e3, 2),
                                 "p95_ms": round((percentile(lat, 95) or 0) * 1e3, 2)})
        return {
            "meta": self.meta,
            "client": self.args.client,
            "event_loop": type(self.loop).__module__ + "." + type(self.loop).__name__,
            "offered_rate": self.args.rate,
            "requests_total": len(self.requests),
            "warmup_requests": warm_n,
            "measured_requests": measured,
            "measured_offered_window_s": round(offered_window, 3),
            "ok": len(ok_lat),
            "errors": sum(errors.values()),
            "error_rate": round(sum(errors.values()) / measured, 6) if measured else None,
            "errors_by_kind": dict(errors.most_common()),
            "achieved_rps": round(len(ok_lat) / window, 2) if measured else None,
            "latency_ms": summary_ms(ok_lat),
            "service_latency_ms": summary_ms(ok_service),
            "send_lag_ms": summary_ms(lags),
            "schedule_overrun_s": round(schedule_end - self.scheduled[-1], 4) if self.requests else None,
            "drain_s": round(drain_end - schedule_end, 3),
            "generator_cpu_s": round(cpu_s, 3),
            "generator_cpu_per_request_ms": round(cpu_s / measured * 1e3, 4) if measured else None,
            "generator_cpu_utilisation": round(cpu_s / wall, 4),
            "connections_opened": opened,
            "snapshots": {k: v for k, v in self.snapshots.items() if not k.endswith("_at")},
            "snapshot_window_s": (round(self.snapshots["end_at"] - self.snapshots["start_at"], 3)
                                  if "start_at" in self.snapshots and "end_at" in self.snapshots else None),
            "timeline": timeline,
        }


def load_requests(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    meta: dict[str, Any] = {}
    requests = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            item = json.loads(line)
            if "meta" in item and "path" not in item:
                meta = item["meta"]
            else:
                requests.append(item)
    return meta, requests


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="base URL (scheme://host:port[/prefix]) the request paths go under")
    ap.add_argument("--requests", required=True, help="request file (JSON lines, see the module docstring)")
    ap.add_argument("--rate", type=float, required=True, help="arrival rate, requests per second")
    ap.add_argument("--warmup-s", type=float, default=0.0,
                    help="the first SECONDS of the schedule are sent but not measured")
    ap.add_argument("--timeout", type=float, default=10.0, help="per-request timeout (s)")
    ap.add_argument("--connections", type=int, default=16, help="connections opened before the clock starts")
    ap.add_argument("--max-connections", type=int, default=1024)
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw")
    ap.add_argument("--snapshot-url", action="append", default=[],
                    help="GET this URL (JSON) at the start and the end of the measured window; repeatable")
    ap.add_argument("--out", default="-", help="result JSON file ('-': stdout)")
    ap.add_argument("--no-uvloop", action="store_true", help="use the default asyncio event loop")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    if args.rate <= 0:
        ap.error("--rate must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta, requests = load_requests(args.requests)
    if not requests:
        print("no requests in the file", file=sys.stderr)
        return 2
    run = Run(args, requests, meta)
    runner: Any = asyncio.run
    if not args.no_uvloop:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            pass
    report = runner(run.main())
    report["pid"] = os.getpid()
    text = json.dumps(report, indent=1)
    if args.out == "-":
        print(text)
    else:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

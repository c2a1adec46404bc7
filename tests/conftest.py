"""Shared fixtures: one real Ray cluster per test session, and the nation KAS deployed on it.

Tests that need neither import nothing from here and start no Ray (the fixtures are lazy).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

NATIONS = ["USA", "FRA", "GBR"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class KasCluster:
    """The running deployment: base URL of the Serve proxy, nation → KAS URL, and its state dir."""

    base_url: str
    urls: dict[str, str]
    state_dir: Path

    def url(self, nation: str) -> str:
        return self.urls[nation.upper()]

    def audit_lines(self, nation: str) -> list[str]:
        path = self.state_dir / "audit" / f"{nation.lower()}.jsonl"
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray cluster (no dashboard) shared by every test that needs one."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from kas_ray.serve.actors import NAMESPACE
    from kas_ray.serve.runner import init_ray

    init_ray(address="local", num_cpus=2, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
    try:
        yield
    finally:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def kas_cluster(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> KasCluster:
    """USA, FRA and GBR KAS on Ray Serve, on a free port, with a fresh state directory."""
    from ray import serve

    from kas_ray.serve.runner import _wait_ready, deploy, nation_settings

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    state = tmp_path_factory.mktemp("kas-state")
    base = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    urls = deploy(nation_settings(state, NATIONS, base))
    _wait_ready(list(urls.values()))
    print(f"\nkas cluster ready in {time.perf_counter() - started:.1f}s at {base}")
    return KasCluster(base_url=base, urls=urls, state_dir=state)


# --- Redis (tests/test_redis_*.py) ------------------------------------------------------------------
class RedisServer:
    """A real ``redis-server`` on a free loopback port, no persistence; it can be killed and restarted.

    Extra arguments may name the port as ``{port}`` (e.g. ``--port 0 --tls-port {port}`` for TLS only).
    """

    def __init__(self, binary: str, workdir: Path, *args: str) -> None:
        self.binary, self.dir, self.args = binary, workdir, args
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
               *(a.replace("{port}", str(self.port)) for a in self.args)]
        tls = "--tls-port" in self.args
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    if tls:  # listening is enough: a plain PING would not be answered
                        return
                    sock.sendall(b"PING\r\n")
                    reply = sock.recv(64)
                if reply.startswith((b"+PONG", b"-NOAUTH", b"-ERR")):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"redis-server on port {self.port} did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop (SIGKILL: crash) the server; the port stays reserved for :meth:`start`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture(scope="session")
def redis_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisServer]]:
    """Starts real redis-server processes (extra arguments allowed); all are stopped at the end."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (`make test` installs it: apt-get install redis-server)")
    servers: list[RedisServer] = []

    def start(*args: str) -> RedisServer:
        server = RedisServer(binary, tmp_path_factory.mktemp("redis"), *args)
        server.start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    """One shared redis-server for the session (tests use their own key prefixes or nations)."""
    return redis_factory()

"""Shared fixtures: one real Ray cluster per test session, and the nation KAS deployed on it.

Tests that need neither import nothing from here and start no Ray (the fixtures are lazy).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
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

    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
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

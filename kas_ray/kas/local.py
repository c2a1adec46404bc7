"""Assemble in-process nation KAS services from a state directory (embedded default, demo, tests).

Every nation gets its software keystore, the dev identity providers of all coalition nations in
its trust registry (dev profile only), the shared ABAC configuration and its own replay store.
"""

from __future__ import annotations

import os
from pathlib import Path

from kas_ray.audit import AuditSink, JsonLinesAuditSink
from kas_ray.config import DEFAULT_NATIONS, AbacConfig, Profile
from kas_ray.kas.service import RewrapService
from kas_ray.keys.software import SoftwareKeystore
from kas_ray.policy import PolicyEngine
from kas_ray.trust import MemoryReplayStore, dev_trust_registry


def nation_url(base_url: str, nation: str) -> str:
    """A nation's KAS URL: ``http://HOST:PORT/{nation}``."""
    return f"{base_url.rstrip('/')}/{nation.lower()}"


def build_local_services(
    state_dir: str | os.PathLike[str],
    nations: list[str] | None = None,
    *,
    base_url: str = "http://127.0.0.1:8000",
    profile: Profile = "dev",
    abac: AbacConfig | None = None,
    audit: AuditSink | None = None,
) -> dict[str, RewrapService]:
    """Nation KAS services keyed by their URL; audit goes to ``<state_dir>/audit.jsonl`` by default."""
    nations = [n.upper() for n in (nations or DEFAULT_NATIONS)]
    registry = dev_trust_registry(state_dir, nations, profile)
    engine = PolicyEngine(abac or AbacConfig())
    sink = audit or JsonLinesAuditSink(Path(state_dir) / "audit.jsonl")
    services: dict[str, RewrapService] = {}
    for nation in nations:
        url = nation_url(base_url, nation)
        services[url] = RewrapService(
            nation,
            keys=SoftwareKeystore(state_dir, nation, profile=profile),
            trust=registry,
            policy=engine,
            replay=MemoryReplayStore(),
            audit=sink,
            public_urls=[url],
        )
    return services

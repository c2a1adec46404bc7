"""Assemble in-process nation KAS services from a state directory (embedded default, demo, tests).

Every nation gets its software keystore, the dev identity providers of all coalition nations in
its trust registry (dev profile only), the shared ABAC configuration and its own replay store.
With ``federate=True`` each nation also gets a :class:`~kas_ray.federation.broker.Federation` whose
peers are the other nations, reached in process; federation keys live in ``<state_dir>/federation``.
"""

from __future__ import annotations

import os
from pathlib import Path

from kas_ray.audit import AuditSink, JsonLinesAuditSink
from kas_ray.config import DEFAULT_BASE_URL, DEFAULT_NATIONS, AbacConfig, FederationConfig, PeerConfig, Profile
from kas_ray.federation.broker import Federation
from kas_ray.federation.envelope import FederationKey
from kas_ray.federation.peers import LocalPeerTransport
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
    base_url: str = DEFAULT_BASE_URL,
    profile: Profile = "dev",
    abac: AbacConfig | None = None,
    audit: AuditSink | None = None,
    federate: bool = False,
) -> dict[str, RewrapService]:
    """Nation KAS services keyed by their URL; audit goes to ``<state_dir>/audit.jsonl`` by default.

    ``federate``: every nation brokers KAOs of the others (in-process :class:`LocalPeerTransport`).
    """
    nations = [n.upper() for n in (nations or DEFAULT_NATIONS)]
    registry = dev_trust_registry(state_dir, nations, profile)
    engine = PolicyEngine(abac or AbacConfig())
    sink = audit or JsonLinesAuditSink(Path(state_dir) / "audit.jsonl")
    by_nation: dict[str, RewrapService] = {}
    transport = LocalPeerTransport(by_nation)  # filled below, read at call time
    fed_keys = {n: FederationKey(FederationKey.default_path(state_dir, n), n) for n in nations} if federate else {}
    services: dict[str, RewrapService] = {}
    for nation in nations:
        url = nation_url(base_url, nation)
        replay = MemoryReplayStore()
        federation = None
        if federate:
            peers = [PeerConfig(nation=peer, url=nation_url(base_url, peer), transport="local",
                                signing_jwk=fed_keys[peer].public_jwk) for peer in nations if peer != nation]
            federation = Federation(nation, FederationConfig(peers=peers), fed_keys[nation], replay=replay,
                                    transports={"local": transport})
        services[url] = by_nation[nation] = RewrapService(
            nation,
            keys=SoftwareKeystore(state_dir, nation, profile=profile),
            trust=registry,
            policy=engine,
            replay=replay,
            audit=sink,
            public_urls=[url],
            federation=federation,
        )
    return services

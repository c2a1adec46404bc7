"""Start and stop the embedded default: local Ray, every nation's KAS, an index at ``/``."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kas_ray.config import DEFAULT_HOST, DEFAULT_NATIONS, DEFAULT_PORT, NationSettings, Profile
from kas_ray.errors import ConfigError

#: Same auth mode for the cluster we start and any `ray`/`serve` CLI the operator runs next to it.
AUTH_MODE_ENV = "RAY_AUTH_MODE"


def nation_settings(state_dir: str | os.PathLike[str], nations: list[str], public_base: str, *,
                    profile: Profile = "dev", per_nation: dict[str, dict[str, Any]] | None = None,
                    **overrides: Any) -> list[NationSettings]:
    """Settings of each nation served at ``public_base``; ``per_nation`` adds fields for one nation."""
    state = str(Path(state_dir).resolve())
    extra = {k.upper(): v for k, v in (per_nation or {}).items()}
    return [NationSettings(**{"nation": n, "public_url": f"{public_base.rstrip('/')}/{n.lower()}",
                              "state_dir": state, "profile": profile, "coalition": nations,
                              **overrides, **extra.get(n.upper(), {})}) for n in nations]


def load_nation_overrides(path: str | os.PathLike[str] | None) -> dict[str, dict[str, Any]]:
    """``--nation-config FILE``: YAML mapping a nation to NationSettings fields (e.g. its federation)."""
    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{path} must map nation codes to settings")
    return {str(k).upper(): v for k, v in data.items()}


def deploy(settings: list[NationSettings], *, index: bool = True,
           deployment_options: dict[str, Any] | None = None) -> dict[str, str]:
    """Deploy one Serve application per nation at ``/{nation}``; returns nation → URL.

    ``deployment_options`` apply to every nation's deployment (see :func:`~kas_ray.serve.deployment.nation_app`).
    """
    from ray import serve

    from kas_ray.serve.deployment import nation_app
    from kas_ray.serve.index import build_index

    urls: dict[str, str] = {}
    for nation in settings:
        serve.run(nation_app(nation, **(deployment_options or {})), name=nation.nation.lower(),
                  route_prefix=f"/{nation.nation.lower()}", blocking=False)
        urls[nation.nation] = nation.public_url
        federation = nation.federation
        if federation is not None and federation.gateway_port is not None:
            if federation.tls is None:
                raise ConfigError(f"{nation.nation}: a federation gateway needs federation.tls (mutual TLS)")
            from kas_ray.federation.gateway import start_gateway

            start_gateway(nation.nation, federation.gateway_host, federation.gateway_port, federation.tls,
                          app_name=nation.nation.lower())
    if index:
        serve.run(build_index({"urls": urls}), name="index", route_prefix="/", blocking=False)
    return urls


def start_ray(*, profile: Profile = "dev", num_cpus: int | None = None) -> None:
    """Join ``$RAY_ADDRESS`` or start a local node. Ray's token authentication stays on under the prod
    profile: whoever can call a nation's HSM actor gets shares without a token or a policy check."""
    from kas_ray.serve.actors import NAMESPACE

    if profile == "prod":
        if os.environ.get(AUTH_MODE_ENV, "token") != "token":
            raise ConfigError(f"the prod profile runs Ray with token authentication: unset {AUTH_MODE_ENV} or set "
                              "it to token (docs/security.md)")
        os.environ[AUTH_MODE_ENV] = "token"
    else:
        os.environ.setdefault(AUTH_MODE_ENV, "disabled")  # dev: local tools and the CLI need no Ray token
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # our own lines say what is up
    address = os.environ.get("RAY_ADDRESS") or "local"
    init_ray(address=address, namespace=NAMESPACE, include_dashboard=False, num_cpus=num_cpus,
             log_to_driver=False, ignore_reinit_error=True)


def init_ray(attempts: int = 3, **options: Any) -> None:
    """``ray.init`` that tries again when a new local node misses Ray's fixed 30 s startup window.

    On a busy 2-core machine the raylet can take longer than that to register; a second try then
    usually succeeds. Any other failure is raised at once.
    """
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(**options)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            logging.getLogger(__name__).warning("Ray node start timed out (attempt %d); retrying", attempt)
            ray.shutdown()


def try_it(urls: dict[str, str], state_dir: str) -> str:
    first_nation, first_url = next(iter(urls.items()))
    other = [u for n, u in urls.items() if n != first_nation][:1]
    kas = " ".join(f"--kas {u}" for u in [first_url, *other])
    return (
        "Try it:\n"
        f"  export KAS_RAY_STATE_DIR={state_dir}\n"
        f"  export KAS_RAY_ALLOWED_KAS={','.join(urls.values())}  # the KAS decrypt may send your token to\n"
        "  echo 'attack at dawn' > plan.txt\n"
        f"  kas-ray encrypt plan.txt -o plan.tdf {kas} --classification SECRET "
        f"--releasable-to {first_nation} --releasable-to FRA\n"
        f"  kas-ray token --nation {first_nation.lower()} --sub alice --clearance SECRET > alice.jwt\n"
        "  kas-ray decrypt plan.tdf -o plan.out --token-file alice.jwt && cat plan.out\n"
    )


@contextlib.contextmanager
def running_cluster(state_dir: str | os.PathLike[str], *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                    nations: list[str] | None = None, profile: Profile = "dev",
                    per_nation: dict[str, dict[str, Any]] | None = None) -> Iterator[dict[str, str]]:
    """Local Ray + every nation's KAS, ready; yields nation → URL and tears everything down after."""
    import ray
    from ray import serve

    from kas_ray.serve.actors import kill_actors

    nations = [n.upper() for n in (nations or DEFAULT_NATIONS)]
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    public = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"  # noqa: S104
    settings = nation_settings(state_dir, nations, public, profile=profile, per_nation=per_nation)
    if profile == "prod":  # what a replica would refuse at start, said here in one line (not a Serve timeout)
        from kas_ray.serve.deployment import load_trust

        for nation in settings:
            load_trust(nation)
    start_ray(profile=profile)
    try:
        serve.start(http_options={"host": host, "port": port})
        urls = deploy(settings)
        _wait_ready(list(urls.values()))
        try:
            yield urls
        finally:
            serve.shutdown()
            kill_actors(nations)
            _stop_gateways(nations)
    finally:
        ray.shutdown()


def _stop_gateways(nations: list[str]) -> None:
    from kas_ray.federation.gateway import stop_gateway

    for nation in nations:
        stop_gateway(nation)


def serve_forever(state_dir: str | os.PathLike[str], *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                  nations: list[str] | None = None, profile: Profile = "dev",
                  per_nation: dict[str, dict[str, Any]] | None = None,
                  out: Callable[[str], None] = print, stop: threading.Event | None = None) -> int:
    """``kas-ray serve``: start everything, print URLs, block until Ctrl-C/SIGTERM, shut down cleanly."""
    stop = stop or threading.Event()
    started = time.perf_counter()
    with running_cluster(state_dir, host=host, port=port, nations=nations, profile=profile,
                         per_nation=per_nation) as urls:
        out(f"kas-ray: {len(urls)} nation KAS ready in {time.perf_counter() - started:.1f}s "
            f"(profile {profile}, state {Path(state_dir).resolve()})")
        for nation, url in urls.items():
            out(f"  {nation}: {url}   (OpenAPI {url}/docs)")
        out(try_it(urls, str(Path(state_dir).resolve())))
        out("Press Ctrl-C to stop.")
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if _main_thread() else None
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        out("kas-ray: shutting down")
    return 0


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _wait_ready(urls: list[str], timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending and time.monotonic() < deadline:
        for url in list(pending):
            try:
                if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                    pending.remove(url)
            except httpx.HTTPError:
                pass
        if pending:
            time.sleep(0.3)
    if pending:
        raise TimeoutError(f"KAS not ready after {timeout:.0f}s: {', '.join(pending)}")

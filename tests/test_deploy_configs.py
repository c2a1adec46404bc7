"""Offline validation of ``cluster.yaml`` and every Serve config in ``deployments/``: no Ray cluster, no network.

How each file is checked, with Ray's own code:

* ``cluster.yaml``: ``ray up`` runs ``prepare_config`` (merges the GCP provider's defaults.yaml, the setup
  commands and the per-type worker counts), then ``validate_config`` (ray-schema.json through jsonschema,
  plus the head/min_workers rules), then the provider's ``bootstrap_config``. The first two are pure and
  we run them; GCP's bootstrap is not: it calls the Cloud Resource Manager, IAM and Compute APIs (and
  ``ray.autoscaler._private.gcp`` needs ``googleapiclient`` just to import). Of the bootstrap we run its
  first, offline step (``check_legacy_fields``) and assert the fact that keeps its subnet step from
  choosing a default subnet with public addresses: every node type names its ``networkInterfaces``.
  The autoscaler's own bin-packing (``get_nodes_for``) then decides, from the file's node types, which node
  type it would launch for each nation's replicas and HSM actor.
* Serve configs: ``ServeDeploySchema.model_validate`` (what ``serve deploy``/``serve run`` do first), the
  nation args through ``NationSettings.model_validate``, then what the Serve controller does after its
  build task: the application builder is called and built (``build_app``), and the config's per-deployment
  options are applied with the controller's ``override_deployment_info``. That catches a deployment name
  that does not exist and yields each replica's effective options and resource demand.

``test_validation_is_offline`` runs all of it again in a fresh interpreter whose sockets refuse to connect.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from functools import cache, partial
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster.yaml"
SERVE_CONFIGS = sorted((ROOT / "deployments").glob("*.yaml"))
GCP_CONFIG = ROOT / "deployments" / "gcp-kms.yaml"
NATION_BUILDER = "kas_ray.serve.deployment:build_nation"
#: Options every nation deployment sets explicitly (docs/operations.md, "Sizing and scaling").
AUTOSCALING_KEYS = {"min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"}


def nation_resource(nation: str) -> str:
    """The Ray custom resource carried by a nation's nodes (``nation_usa``)."""
    return f"nation_{nation.lower()}"


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a mapping"
    return data


# --- cluster.yaml -----------------------------------------------------------------------------------------
@cache
def prepared_cluster() -> dict[str, Any]:
    """cluster.yaml as ``ray up`` sees it before the provider bootstrap, validated by Ray's schema."""
    from ray.autoscaler._private.util import check_legacy_fields, prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(load(CLUSTER)))
    validate_config(prepared)
    check_legacy_fields(prepared)  # first step of the GCP bootstrap; the rest calls Google APIs
    return prepared


def worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def node_type_nation(node_type: dict[str, Any]) -> str | None:
    nations = [k.removeprefix("nation_").upper() for k in node_type["resources"] if k.startswith("nation_")]
    assert len(nations) <= 1, f"a node type belongs to one nation at most: {nations}"
    return nations[0] if nations else None


def effective_setup(config: dict[str, Any], name: str) -> list[str]:
    """The setup commands a node of type ``name`` runs (a type's own list replaces the global ones)."""
    if name == config["head_node_type"]:
        return list(config["head_setup_commands"])
    return list(config["available_node_types"][name].get("worker_setup_commands", config["worker_setup_commands"]))


def check_cluster_schema() -> None:
    raw, config = load(CLUSTER), prepared_cluster()
    provider = config["provider"]
    assert provider["type"] == "gcp"
    assert provider["availability_zone"].startswith(provider["region"] + "-")
    assert re.fullmatch(r"my-[a-z0-9-]+", provider["project_id"]), "project_id must stay a placeholder"
    assert raw["head_node_type"] in raw["available_node_types"]
    # Every node type names its network: the GCP bootstrap then keeps it (no default subnet, no public IP).
    for name, node_type in config["available_node_types"].items():
        interfaces = node_type["node_config"].get("networkInterfaces")
        assert interfaces, f"{name}: networkInterfaces missing (the bootstrap would add one with a public IP)"
        assert all("accessConfigs" not in i for i in interfaces), f"{name}: nodes get no public address"
    assert provider.get("use_internal_ips") is True


@cache
def check_cluster_nations() -> dict[str, str]:
    """Each nation has its own worker type (resource ``nation_x: 1``, its own service account); returns them."""
    config = prepared_cluster()
    head = config["available_node_types"][config["head_node_type"]]
    assert node_type_nation(head) is None and head["resources"].get("CPU") == 0, "nothing of a nation on the head"
    types: dict[str, str] = {}
    for name, node_type in worker_types(config).items():
        nation = node_type_nation(node_type)
        assert nation is not None, f"{name} carries no nation resource"
        assert nation not in types, f"{nation} has two node types"
        types[nation] = name
        assert node_type["resources"][nation_resource(nation)] == 1
        assert node_type["min_workers"] >= 2, f"{name}: a nation must survive the loss of one node"
        accounts = [a["email"] for a in node_type["node_config"]["serviceAccounts"]]
        assert accounts == [f"kas-{nation.lower()}@{config['provider']['project_id']}.iam.gserviceaccount.com"]
        setup = " ".join(effective_setup(config, name))
        assert f"kas-ray-{nation.lower()}-federation-key" in setup
        for other in types.keys() | {"USA", "FRA", "GBR"}:
            if other != nation:
                assert f"kas-ray-{other.lower()}-federation-key" not in setup, f"{name} fetches {other}'s key"
    assert set(types) >= {"USA", "FRA", "GBR"}
    return types


def check_cluster_commands() -> None:
    import ray

    config, text = prepared_cluster(), CLUSTER.read_text()
    modes = set(re.findall(r"RAY_AUTH_MODE=(\w+)", text))
    assert modes == {"token"}, f"one RAY_AUTH_MODE for the cluster and its CLI, not {modes}"
    for command in config["head_start_ray_commands"][-1:] + config["worker_start_ray_commands"][-1:]:
        assert "export RAY_AUTH_MODE=token;" in command and "ray start" in command
    head_start = config["head_start_ray_commands"][-1]
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard (REST API for serve deploy) stays on loopback"
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    for name in config["available_node_types"]:
        setup = effective_setup(config, name)
        joined = "\n".join(setup)
        assert "export RAY_AUTH_MODE=token" in joined, f"{name}: the CLI on the node uses the cluster's mode"
        assert "~/.ray/auth_token" in joined, f"{name}: every node needs the cluster's token"
        pins = re.findall(r"ray\[[a-z,]+\]==([0-9.]+)", joined)
        assert pins == [ray.__version__], f"{name}: Ray on the nodes must be the launcher's {ray.__version__}: {pins}"
        assert "[gcp]" in joined, f"{name}: kas-ray with the gcp extra (Cloud KMS client)"
    assert "google-api-python-client" in " ".join(config["head_setup_commands"])
    assert set(config["file_mounts"].values()) == {"./dist", "./deployments"}


# --- Serve configs ------------------------------------------------------------------------------------------
def serve_schema(path: Path) -> Any:
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(load(path))


def effective_deployments(app: Any) -> dict[str, Any]:
    """The app's deployments as the controller deploys them: built from code, then the config's overrides."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.application_state import override_deployment_info
    from ray.serve._private.build_app import build_app
    from ray.serve._private.deployment_info import DeploymentInfo

    built = build_app(call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args),
                      name=app.name, default_runtime_env={})
    built.validate_single_fastapi_ingress()
    infos = {d.name: DeploymentInfo(deployment_config=d._deployment_config, replica_config=d._replica_config,
                                    start_time_ms=0, deployer_job_id="offline",
                                    ingress=d.name == built.ingress_deployment_name)
             for d in built.deployments}
    return override_deployment_info(infos, app)


@cache
def nation_apps(path: Path) -> dict[str, Any]:
    """nation -> (application schema, NationSettings) of every nation application in the config."""
    from kas_ray.config import NationSettings

    out: dict[str, Any] = {}
    for app in serve_schema(path).applications:
        if app.import_path == NATION_BUILDER:
            settings = NationSettings.model_validate(app.args)
            assert settings.nation not in out, f"{settings.nation} deployed twice"
            out[settings.nation] = (app, settings)
    return out


@cache
def check_serve_config(path: Path) -> dict[str, dict[str, Any]]:
    """Schema, nation args, and the effective deployment options; returns nation -> summary."""
    schema = serve_schema(path)
    nations = nation_apps(path)
    assert nations, f"{path.name} deploys no nation"
    summary: dict[str, dict[str, Any]] = {}
    for nation, (app, settings) in nations.items():
        assert app.name == nation.lower() and app.route_prefix == f"/{nation.lower()}"
        assert settings.public_url.rstrip("/").endswith(f"/{nation.lower()}")
        deployments = effective_deployments(app)
        assert list(deployments) == [f"kas-{nation.lower()}"]
        raw = {d["name"]: d for d in load(path)["applications"][schema.applications.index(app)].get("deployments", [])}
        options = raw.get(f"kas-{nation.lower()}", {})
        missing = AUTOSCALING_KEYS - set(options.get("autoscaling_config") or {})
        assert not missing and "max_ongoing_requests" in options, f"{path.name} {nation}: set {sorted(missing)}"
        info = deployments[f"kas-{nation.lower()}"]
        scaling = info.deployment_config.autoscaling_config
        # Serve scales on ongoing requests per replica; at the cap a replica takes no more, so the target
        # must sit well below it or the deployment stops scaling up.
        assert scaling.target_ongoing_requests * 2 <= info.deployment_config.max_ongoing_requests
        initial = scaling.initial_replicas if scaling.initial_replicas is not None else scaling.min_replicas
        assert 1 <= scaling.min_replicas <= initial <= scaling.max_replicas
        assert scaling.upscale_delay_s < scaling.downscale_delay_s, "quick up, slow down"
        summary[nation] = {"app": app, "settings": settings, "info": info,
                           "demand": dict(info.replica_config.resource_dict)}
    for app in schema.applications:
        if app.import_path == "kas_ray.serve.index:build_index":
            effective_deployments(app)
            urls = {k.upper(): v for k, v in app.args["urls"].items()}
            assert urls == {n: s["settings"].public_url for n, s in summary.items()}
    return summary


@cache
def check_gcp_config() -> dict[str, dict[str, Any]]:
    """deployments/gcp-kms.yaml: Cloud KMS per nation, prod profile, pinned by resources."""
    summary = check_serve_config(GCP_CONFIG)
    assert set(summary) == {"USA", "FRA", "GBR"}
    for nation, item in summary.items():
        settings = item["settings"]
        assert settings.profile == "prod" and settings.trust_registry
        backend = settings.key_backend
        assert backend.kind == "gcp-kms" and backend.gcp is not None
        gcp = backend.gcp
        assert gcp.project == f"my-{nation.lower()}-project", "placeholder project ids only"
        assert gcp.location and gcp.key_ring, "location and key ring explicit per nation"
        assert gcp.insecure_endpoint is None and gcp.credentials_file is None, "ADC from the node's service account"
        assert gcp.timeout_seconds < settings.hsm_timeout_seconds
        pin = {nation_resource(nation): pytest.approx(0.01)}
        assert settings.hsm_resources == pin
        assert item["info"].replica_config.ray_actor_options["resources"] == pin
        assert item["demand"] == {"CPU": 1.0, nation_resource(nation): pytest.approx(0.01)}
        assert settings.federation is not None
        assert {p.nation for p in settings.federation.peers} == set(summary) - {nation}
        assert all(p.transport == "handle" and p.signing_jwk_file for p in settings.federation.peers)
    return summary


def check_gcp_fits_cluster() -> dict[str, dict[str, Any]]:
    """Ray's autoscaler launches the nation's own node type for its replicas and HSM actor, and the node
    type's worker counts hold the nation's min and max replicas."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    config, types, summary = prepared_cluster(), check_cluster_nations(), check_gcp_config()
    node_types = config["available_node_types"]
    scorer = partial(_default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary({}))
    chosen: dict[str, dict[str, Any]] = {}
    for nation, item in summary.items():
        hsm_demand = dict(item["settings"].hsm_resources)
        picks = {}
        for what, demand in (("replica", item["demand"]), ("hsm_actor", hsm_demand)):
            to_add, unfulfilled = get_nodes_for(node_types, {}, config["head_node_type"], 10, [demand], scorer)
            assert not unfulfilled and dict(to_add) == {types[nation]: 1}, (nation, what, dict(to_add))
            picks[what] = types[nation]
        node_type = node_types[types[nation]]
        scaling = item["info"].deployment_config.autoscaling_config
        cpus = item["demand"]["CPU"]
        per_node = int(node_type["resources"]["CPU"] // cpus)
        assert node_type["min_workers"] * per_node >= scaling.min_replicas, f"{nation}: min replicas need nodes"
        assert node_type["max_workers"] * per_node >= scaling.max_replicas, f"{nation}: max replicas cannot fit"
        chosen[nation] = picks
    return chosen


def check_no_secrets() -> None:
    suspicious = [r"-----BEGIN", r"PRIVATE KEY", r'"type":\s*"service_account"', r"private_key",
                  r"AIza[0-9A-Za-z_-]{20,}", r"ya29\.", r"(?i)(password|passphrase|secret_key|api_key)\s*[:=]\s*\S+"]
    for path in [CLUSTER, *SERVE_CONFIGS]:
        text = path.read_text()
        for pattern in suspicious:
            assert not re.search(pattern, text), f"{path.name} matches {pattern}"


def check_all() -> dict[str, Any]:
    """Every check above; used in a fresh, socket-less interpreter by test_validation_is_offline."""
    check_cluster_schema()
    check_cluster_commands()
    check_no_secrets()
    configs = {p.name: sorted(check_serve_config(p)) for p in SERVE_CONFIGS}
    return {"cluster_types": check_cluster_nations(), "serve_configs": configs, "placement": check_gcp_fits_cluster()}


# --- tests ----------------------------------------------------------------------------------------------------
def test_cluster_yaml_passes_ray_validation() -> None:
    check_cluster_schema()


def test_cluster_yaml_gives_each_nation_its_own_nodes() -> None:
    assert check_cluster_nations() == {"USA": "usa_worker", "FRA": "fra_worker", "GBR": "gbr_worker"}


def test_cluster_yaml_auth_mode_dashboard_and_install() -> None:
    check_cluster_commands()


def test_cluster_yaml_schema_rejects_mistakes() -> None:
    """The validation has teeth: Ray's schema refuses an unknown field and a bad resource type."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(load(CLUSTER))
    broken["available_node_types"]["usa_worker"]["resource"] = {"nation_usa": 1}  # typo: resources
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
    fractional = copy.deepcopy(load(CLUSTER))
    fractional["available_node_types"]["usa_worker"]["resources"]["nation_usa"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(fractional))


def test_no_secrets_in_deploy_configs() -> None:
    check_no_secrets()


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=[p.name for p in SERVE_CONFIGS])
def test_serve_config_is_valid(path: Path) -> None:
    summary = check_serve_config(path)
    assert set(summary) == {"USA", "FRA", "GBR"}


def test_serve_override_of_unknown_deployment_is_refused() -> None:
    """A misspelt deployment name in a config fails here, as it would fail in the controller."""
    from ray.serve.schema import ServeApplicationSchema

    app, _ = nation_apps(GCP_CONFIG)["USA"]
    data = app.model_dump(exclude_unset=True)
    data["deployments"][0]["name"] = "kas-usa-typo"
    with pytest.raises(ValueError, match="does not exist"):
        effective_deployments(ServeApplicationSchema.model_validate(data))


def test_local_config_autoscaling_values() -> None:
    """deployments/local.yaml: sized for 2 cores (docs/operations.md, "Sizing and scaling")."""
    for nation, item in check_serve_config(ROOT / "deployments" / "local.yaml").items():
        config = item["info"].deployment_config
        scaling = config.autoscaling_config
        assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 2, 1), nation
        assert (scaling.upscale_delay_s, scaling.downscale_delay_s, config.max_ongoing_requests) == (10, 60, 32)
        assert item["demand"] == {"CPU": 0.0}, "on 2 cores no replica may wait for a CPU"


def test_gcp_kms_config() -> None:
    check_gcp_config()


def test_gcp_kms_config_lands_on_the_nations_nodes() -> None:
    assert check_gcp_fits_cluster() == {n: {"replica": f"{n.lower()}_worker", "hsm_actor": f"{n.lower()}_worker"}
                                        for n in ("USA", "FRA", "GBR")}


OFFLINE = """
import json, socket, sys
def refuse(*args, **kwargs):
    raise OSError("network disabled in this check")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
sys.path.insert(0, sys.argv[1])
import test_deploy_configs as checks
summary = checks.check_all()
import ray
print("SUMMARY " + json.dumps({"summary": summary, "ray_initialized": ray.is_initialized()}))
"""


def test_validation_is_offline() -> None:
    """All validation runs in a fresh interpreter with no network and without starting or joining Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", OFFLINE, str(Path(__file__).parent)], capture_output=True,
                          text=True, timeout=240, cwd=ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SUMMARY ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("SUMMARY "))
    assert result["ray_initialized"] is False
    assert result["summary"]["serve_configs"] == {p.name: ["FRA", "GBR", "USA"] for p in SERVE_CONFIGS}

"""Multi-node Ray on one machine: nations placed by custom resources, federation across nodes, node loss.

The scenario (``tests/multinode_scenario.py``, see its docstring) runs in a subprocess: this pytest process
may already be a Ray driver (the session fixture in conftest.py) and cannot join a second cluster. The
subprocess gets its own Ray temp dir (so the "current cluster" file and sessions of other Ray users on the
machine are untouched), its own ports (GCS, dashboard, Serve proxy: all free ports) and its own state dir,
and tears its cluster down itself. It must finish within 3 minutes; past that the test kills its process
group (the Ray processes of that cluster die with their reaper).

One scenario, several assertions: starting a 3-node cluster and deploying two nations costs most of the
time, so every property is checked on the same run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SCENARIO = Path(__file__).with_name("multinode_scenario.py")
DEADLINE_S = 165  # the scenario's own budget
HARD_LIMIT_S = 180  # then the subprocess is killed


@pytest.fixture(scope="module")
def scenario() -> Iterator[dict[str, Any]]:
    # A short path: Ray's socket paths under it must stay below the 107-byte limit of AF_UNIX.
    work = Path(tempfile.mkdtemp(prefix="krmn-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env |= {"RAY_TMPDIR": str(work), "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(SCENARIO), "--state-dir", str(work / "state"),
                             "--deadline", str(DEADLINE_S)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=SCENARIO.parent.parent, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=HARD_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own child's process group, by id
        out, err = proc.communicate()
    runtime = time.monotonic() - started
    try:
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        result = json.loads(lines[-1].removeprefix("RESULT ")) if lines else {"ok": False, "error": "no RESULT"}
        result["runtime_s"] = round(runtime, 1)
        result["stderr_tail"] = err[-4000:]
        print(f"\nmultinode scenario: {json.dumps({k: v for k, v in result.items() if k != 'stderr_tail'})}")
        yield result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _ok(result: dict[str, Any]) -> None:
    assert result.get("ok"), f"{result.get('error')}\n{result.get('stderr_tail')}"


def test_scenario_runs_within_three_minutes(scenario: dict[str, Any]) -> None:
    _ok(scenario)
    assert scenario["runtime_s"] < HARD_LIMIT_S
    assert scenario["teardown_s"] < 60


def test_nations_are_placed_by_their_resources(scenario: dict[str, Any]) -> None:
    """Every USA actor and replica on node A (nation_usa), every FRA one on B (nation_fra), none on the head."""
    _ok(scenario)
    where = scenario["placement_before"]
    for name, node in where.items():
        nation_node = "A" if "usa" in name else "B"
        assert node == nation_node, where
    for name in ("kas-hsm-usa", "kas-cache-usa", "kas-hsm-fra", "kas-cache-fra"):
        assert name in where, where
    assert any(k.startswith("ServeReplica:usa:kas-usa") for k in where)
    assert any(k.startswith("ServeReplica:fra:kas-fra") for k in where)
    assert len(set(scenario["nodes"].values())) == len(scenario["nodes"]) == 4  # head, A, B, then A2


def test_federation_brokers_across_nodes(scenario: dict[str, Any]) -> None:
    """A FRA user's allOf object (FRA KAO + USA KAO) decrypts through FRA's home KAS on node B, which
    forwards the USA KAO to USA's replica and HSM actor on node A."""
    _ok(scenario)
    checks = scenario["checks"]
    assert checks["brokered_before"] is True
    assert checks["fra_forwarded"] >= 11  # one decrypt and ten timed batches, one forward each
    assert len(scenario["brokered_ms"]) == 10


def test_losing_a_nation_node_degrades_only_that_nation(scenario: dict[str, Any]) -> None:
    """Node A gone: FRA stays ready and releases its KAO; the USA KAO fails with a clean per-KAO error."""
    _ok(scenario)
    checks = scenario["checks"]
    assert checks["fra_ready_during_outage"] and checks["fra_kao_released_during_outage"]
    assert checks["usa_kao_failed_cleanly_during_outage"]
    released, usa_error = scenario["outage_outcomes"]
    assert released == "released" and "Unavailable" in usa_error, scenario["outage_outcomes"]
    assert scenario["outage_call_s"] < 15  # bounded by FRA's peer timeout (5 s), not a hang
    during = scenario["placement_during"]
    assert not any("usa" in name for name in during), during


def test_actors_and_replicas_move_to_a_replacement_node(scenario: dict[str, Any]) -> None:
    """A new node with nation_usa: the HSM actor, cache actor and replica are re-created there, USA is ready
    again and the brokered rewrap works again (through the restarted HSM actor)."""
    _ok(scenario)
    after = scenario["placement_after"]
    usa = {k: v for k, v in after.items() if "usa" in k}
    assert usa and set(usa.values()) == {"A2"}, after
    assert {"kas-hsm-usa", "kas-cache-usa"} <= usa.keys()
    assert any(k.startswith("ServeReplica:usa:kas-usa") for k in usa)
    assert {v for k, v in after.items() if "fra" in k} == {"B"}, "FRA did not move"
    assert scenario["checks"]["brokered_after_recovery"] is True
    assert scenario["usa_recovery_s"] < 120

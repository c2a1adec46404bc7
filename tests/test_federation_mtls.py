"""Federation between two separate ``kas-ray serve`` processes (two Ray clusters) over HTTPS with mutual TLS.

Setup (all generated here, nothing checked in): a coalition dev CA and one certificate per nation
(``usage="both"``: the gateway's server identity and the KAS's client identity toward its peer),
each nation's federation signing key pre-created in its own state directory, one trust registry per
process trusting both nations' dev IdPs (the JWKS files in each state directory), and one
``--nation-config`` YAML per process naming the other nation as an ``https`` peer.

* process A: ``kas-ray serve --nation usa`` (state dir A, its own local Ray, gateway gwA);
* process B: ``kas-ray serve --nation fra`` (state dir B, its own local Ray, gateway gwB).

What the tests prove: a user's home KAS brokers the peer's key access objects to the other cluster
through the peer's federation gateway (mutual TLS), both directions, for allOf and anyOf objects;
the audit files and ``/federation/status`` counters of both processes show the hop; the gateway
refuses a connection without a client certificate or with a certificate of another CA at the TLS
layer, and answers a malformed or unsigned forward on a valid connection with a JSON 4xx. Teardown
sends SIGTERM to both `kas-ray serve` processes at once, expects exit code 0 from each, then SIGKILLs
whatever is left of the two process groups this module started (and nothing else).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kas_ray.client import HomeKasClient, HttpTransport, KasClient
from kas_ray.config import AbacConfig, TlsIdentity, TrustRegistry
from kas_ray.federation.envelope import FederationKey, sign_forward
from kas_ray.federation.tls import CertFiles, client_ssl_context, issue_cert, make_ca
from kas_ray.policy import attribute_fqn
from kas_ray.trust import DevIdentityProvider
from kas_ray.trust.dev_idp import dev_issuer_configs
from kas_ray.ztdf import KasKey, Policy, decrypt, encrypt


def _kas_ray_script() -> str | None:
    beside = Path(sys.executable).with_name("kas-ray")
    if beside.exists():
        return str(beside)
    return shutil.which("kas-ray")


KAS_RAY = _kas_ray_script()
pytestmark = pytest.mark.skipif(KAS_RAY is None, reason="the kas-ray console script is not installed "
                                                        "(pip install -e . puts it next to the Python)")

READY_TIMEOUT = 180.0
STOP_TIMEOUT = 60.0
CLEARANCE = {"USA": "SECRET", "FRA": "SECRET_DEFENSE"}
CONFIG = AbacConfig()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- one `kas-ray serve` process -----------------------------------------------------------------------
@dataclass
class Node:
    """One nation's `kas-ray serve` in its own session (process group) and its own local Ray."""

    nation: str
    state: Path
    port: int
    gateway_port: int
    tls: CertFiles
    config: Path
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    out: Path = field(init=False)
    err: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out = self.state.parent / f"serve-{self.nation.lower()}.out"
        self.err = self.state.parent / f"serve-{self.nation.lower()}.err"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{self.nation.lower()}"

    @property
    def gateway(self) -> str:
        return f"https://127.0.0.1:{self.gateway_port}"

    @property
    def forward_url(self) -> str:
        return f"{self.gateway}/{self.nation.lower()}/federation/forward"

    def start(self) -> None:
        assert KAS_RAY is not None
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray cluster
        env.update(RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
        command = [KAS_RAY, "serve", "--state-dir", str(self.state), "--host", "127.0.0.1",
                   "--port", str(self.port), "--nation", self.nation.lower(), "--nation-config", str(self.config)]
        self.started = time.monotonic()
        with self.out.open("ab") as stdout, self.err.open("ab") as stderr:  # append: a retry keeps the first log
            self.proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, start_new_session=True)

    def launch(self, deadline: float, attempts: int = 2) -> None:
        """Start, and wait until its local Ray is up (Ray start is the heaviest part: one node at a time).

        Ray gives its raylet a fixed 30 s to register; on a box loaded by other Ray tests that can run
        out, and ``ray.init`` fails. That (and only that) failure is retried once.
        """
        for attempt in range(1, attempts + 1):
            self.start()
            assert self.proc is not None
            while time.monotonic() < deadline and self.proc.poll() is None:
                if "Started a local Ray instance" in self.err.read_text(errors="replace"):
                    return
                time.sleep(0.5)
            if self.proc.poll() is None:
                return  # out of time: wait_ready reports it
            if attempt == attempts or "timed out during startup" not in self.err.read_text(errors="replace"):
                return  # wait_ready reports the exit with the logs
            print(f"\n{self.nation}: Ray did not start in time (attempt {attempt}), retrying")
            self.kill_group()

    def logs(self) -> str:
        def tail(path: Path) -> str:
            return path.read_text(errors="replace")[-4000:] if path.exists() else ""

        return f"\n--- {self.nation} stdout\n{tail(self.out)}\n--- {self.nation} stderr\n{tail(self.err)}"

    def wait_ready(self, deadline: float) -> float:
        """Seconds from start until ``/readyz`` answers 200 after the process said it is up."""
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"kas-ray serve ({self.nation}) exited with {self.proc.returncode}"
                                     f"{self.logs()}")
            # The SIGTERM handler is installed right before "Press Ctrl-C" is printed.
            if "Press Ctrl-C" in self.out.read_text(errors="replace"):
                try:
                    if httpx.get(f"{self.url}/readyz", timeout=10).status_code == 200:
                        return time.monotonic() - self.started
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        raise AssertionError(f"kas-ray serve ({self.nation}) not ready in {READY_TIMEOUT:.0f} s{self.logs()}")

    def terminate(self) -> int | None:
        """SIGTERM `kas-ray serve` (it stops Serve, its actors and its Ray itself); the exit code, or None
        if it did not exit in time. Then SIGKILL whatever is left of its process group.

        Only the leader gets the SIGTERM: signalling the whole group would kill the Ray processes under
        the driver while it is still shutting Serve down, and its shutdown would then hang.
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        self.kill_group()
        return code

    def kill_group(self) -> None:
        """SIGKILL whatever is left of the process group this test started (Ray workers included)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass

    # --- views of the running KAS ---
    def audit(self, subject: str) -> list[dict[str, Any]]:
        path = self.state / "audit" / f"{self.nation.lower()}.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [e for e in map(json.loads, lines) if e.get("subject") == subject]

    def status(self) -> dict[str, Any]:
        reply = httpx.get(f"{self.url}/federation/status", timeout=10)
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    def counter(self, name: str) -> int:
        return int(self.status()["counters"].get(name, 0))

    def token(self, sub: str) -> str:
        return DevIdentityProvider(self.state, self.nation).mint(sub, CLEARANCE[self.nation])


@dataclass
class Pair:
    usa: Node
    fra: Node
    ca_dir: Path
    ready_after: dict[str, float]
    keys: dict[str, KasKey] = field(default_factory=dict)

    def node(self, nation: str) -> Node:
        return {"USA": self.usa, "FRA": self.fra}[nation]

    def kas_key(self, nation: str) -> KasKey:
        if nation not in self.keys:
            self.keys[nation] = KasClient(HttpTransport(timeout=30)).public_key(self.node(nation).url)
        return self.keys[nation]


def _write_configs(usa: Node, fra: Node) -> None:
    """The trust registry and --nation-config YAML of each process (each names the other as https peer)."""
    issuers = [*dev_issuer_configs(usa.state, ["USA"]), *dev_issuer_configs(fra.state, ["FRA"])]
    trust = TrustRegistry(profile="dev", issuers=issuers).model_dump(mode="json")
    jwks = {n.nation: FederationKey(FederationKey.default_path(n.state, n.nation), n.nation).public_jwk
            for n in (usa, fra)}
    for me, peer in ((usa, fra), (fra, usa)):
        trust_file = me.state.parent / f"trust-{me.nation.lower()}.yaml"
        trust_file.write_text(yaml.safe_dump(trust))
        settings = {
            "trust_registry": str(trust_file),
            "federation": {
                "tls": me.tls.identity().model_dump(),
                "gateway_host": "127.0.0.1",
                "gateway_port": me.gateway_port,
                "peer_timeout_seconds": 15.0,
                "deadline_seconds": 30.0,
                "peers": [{"nation": peer.nation, "url": peer.url, "transport": "https",
                           "gateway_url": peer.gateway, "signing_jwk": jwks[peer.nation]}],
            },
        }
        me.config.write_text(yaml.safe_dump({me.nation: settings}))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("fed-mtls")
    ca = make_ca(root / "pki")
    nodes = []
    for nation in ("USA", "FRA"):
        state = root / nation.lower() / "state"
        state.mkdir(parents=True)
        cert = issue_cert(ca, root / "pki", nation, usage="both")
        nodes.append(Node(nation, state, _free_port(), _free_port(), cert, root / nation.lower() / "nations.yaml"))
    usa, fra = nodes
    _write_configs(usa, fra)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        for node in nodes:
            node.launch(deadline)
        ready_after = {node.nation: node.wait_ready(deadline) for node in nodes}
        print(f"\ntwo kas-ray serve processes ready: {ready_after}")
        yield Pair(usa, fra, root / "pki", ready_after)
    except BaseException:
        for node in nodes:
            node.kill_group()
        raise
    # Graceful stop of both at once, then the exit codes.
    with ThreadPoolExecutor(2) as pool:
        codes = dict(zip(("USA", "FRA"), pool.map(Node.terminate, nodes), strict=True))
    for node in nodes:
        assert codes[node.nation] == 0, f"{node.nation}: exit code {codes[node.nation]} after SIGTERM{node.logs()}"
        assert "shutting down" in node.out.read_text(errors="replace")


# --- objects and reading --------------------------------------------------------------------------------
def _policy() -> Policy:
    attrs = [attribute_fqn(CONFIG, "classification", "SECRET")]
    attrs += [attribute_fqn(CONFIG, "releasable-to", n) for n in ("USA", "FRA")]
    return Policy.create(attrs)


def _seal(pair: Pair, data: bytes, *, all_of: bool) -> bytes:
    keys = [pair.kas_key("USA"), pair.kas_key("FRA")]
    splits = [[k] for k in keys] if all_of else [keys]
    out = io.BytesIO()
    encrypt(io.BytesIO(data), out, splits=splits, policy=_policy())
    return out.getvalue()


def _read_home(home: Node, token: str, tdf: bytes) -> bytes:
    out = io.BytesIO()
    client = HomeKasClient(HttpTransport(timeout=60), token, home=home.url)
    decrypt(io.BytesIO(tdf), out, client)
    return out.getvalue()


def _wait_for(check: Any, timeout: float = 10.0) -> Any:
    """Audit lines are flushed per event but may trail the HTTP answer by a moment."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def _brokered_read(pair: Pair, home: Node, peer: Node) -> None:
    sub = f"{home.nation.lower()}-user-{uuid.uuid4().hex[:10]}"
    token = home.token(sub)
    sent_before, received_before = home.counter("forwards_sent"), peer.counter("forwards_received")
    all_of = _seal(pair, b"allOf: both nations must release", all_of=True)
    any_of = _seal(pair, b"anyOf: either nation may release", all_of=False)

    assert _read_home(home, token, all_of) == b"allOf: both nations must release"
    # The peer's share came over the mTLS gateway from the other process: released there, one hop.
    released = _wait_for(lambda: [e for e in peer.audit(sub) if e["action"] == "KEY_RELEASED"])
    assert released, f"no KEY_RELEASED in {peer.nation}'s audit for {sub}: {peer.audit(sub)}"
    assert {tuple(e["hops"]) for e in released} == {(home.nation,)}
    assert all(e["nation"] == peer.nation and e["decision"] == "permit" for e in released)
    routed = _wait_for(lambda: [e for e in home.audit(sub) if e["action"] == "FORWARD_RESULT"])
    assert routed and {e["peer"] for e in routed} == {peer.nation}, home.audit(sub)
    assert any(f"1 of 1 key access objects released by {peer.nation}" in r for e in routed for r in e["reasons"])
    local = [e for e in home.audit(sub) if e["action"] == "KEY_RELEASED"]
    assert local and all(e["hops"] == [] for e in local)  # the home's own share: no hop

    assert _read_home(home, token, any_of) == b"anyOf: either nation may release"

    assert home.counter("forwards_sent") >= sent_before + 1
    assert peer.counter("forwards_received") >= received_before + 1
    status = home.status()
    assert status["peers"][peer.nation]["transport"] == "https"
    assert status["peers"][peer.nation]["breaker"]["state"] == "closed"
    # Nothing was refused along the way.
    assert not [e for e in peer.audit(sub) if e["action"] in ("KEY_DENIED", "KEY_ERROR", "REQUEST_REJECTED")]
    assert not [e for e in home.audit(sub) if e["action"] == "FORWARD_FAILED"]


def test_usa_user_reads_allof_and_anyof_through_usa_home(pair: Pair) -> None:
    _brokered_read(pair, pair.usa, pair.fra)


def test_fra_user_reads_through_fra_home(pair: Pair) -> None:
    _brokered_read(pair, pair.fra, pair.usa)


# --- the gateway really requires mutual TLS --------------------------------------------------------------
def _no_http_answer(verify: ssl.SSLContext, url: str) -> None:
    """Default TLS (1.3): the client's side of the handshake completes before the server checks the client
    certificate; the server then drops the connection, so no HTTP status ever comes back."""
    with pytest.raises(httpx.TransportError):
        with httpx.Client(verify=verify, timeout=15) as http:
            http.post(url, json={"envelope": "x", "body": "{}"})


def _tls12_handshake(port: int, ctx: ssl.SSLContext) -> BaseException | None:
    """A bare TLS 1.2 handshake (no HTTP): the client certificate is checked *inside* the handshake, so a
    refused certificate makes the handshake itself fail. None when it succeeds."""
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", port), timeout=15) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                return None
        except (ssl.SSLError, OSError) as exc:
            return exc


def test_gateway_refuses_a_connection_without_client_certificate(pair: Pair) -> None:
    def no_cert() -> ssl.SSLContext:  # trusts the gateway's CA, presents no certificate
        return ssl.create_default_context(cafile=pair.fra.tls.ca_file)

    _no_http_answer(no_cert(), pair.fra.forward_url)
    assert _tls12_handshake(pair.fra.gateway_port, no_cert()) is not None, "TLS 1.2 handshake without a cert"
    # Control: the same handshake with USA's genuine certificate succeeds.
    assert _tls12_handshake(pair.fra.gateway_port, client_ssl_context(pair.usa.tls.identity())) is None


def test_gateway_refuses_a_certificate_from_another_ca(pair: Pair, tmp_path: Path) -> None:
    rogue_ca = make_ca(tmp_path, "rogue CA", stem="rogue-ca")
    rogue = issue_cert(rogue_ca, tmp_path, "USA", usage="both")  # names USA, but not our coalition's CA
    identity = TlsIdentity(cert_file=rogue.cert_file, key_file=rogue.key_file, ca_file=pair.fra.tls.ca_file)
    _no_http_answer(client_ssl_context(identity), pair.fra.forward_url)
    assert _tls12_handshake(pair.fra.gateway_port, client_ssl_context(identity)) is not None, "rogue CA accepted"
    # Control: the genuine USA identity reaches the gateway over the same path.
    with httpx.Client(verify=client_ssl_context(pair.usa.tls.identity()), timeout=15) as http:
        assert http.get(f"{pair.fra.gateway}/healthz").json() == {"status": "ok", "nation": "FRA"}


def test_gateway_answers_bad_forwards_with_json_4xx(pair: Pair) -> None:
    fra, usa = pair.fra, pair.usa
    received = fra.counter("forwards_received")
    usa_key = FederationKey(FederationKey.default_path(usa.state, "USA"), "USA")
    bogus_signer = FederationKey(Path(pair.ca_dir) / "bogus" / "usa.key.pem", "USA")  # USA's name, not its key
    now = time.time()
    signed_garbage = sign_forward(usa_key, "FRA", json.dumps({"token": "not a token"}), hops=[], ttl=30,
                                  deadline=now + 30)
    bodies: list[tuple[str, bytes]] = [
        ("not JSON", b"{not json"),
        ("not an object", b"[1, 2, 3]"),
        ("unsigned", json.dumps({"body": "{}"}).encode()),
        ("garbage signature", json.dumps({"envelope": "a.b.c", "body": "{}"}).encode()),
        ("signed by an unknown key",
         json.dumps(sign_forward(bogus_signer, "FRA", "{}", hops=[], ttl=30, deadline=now + 30)).encode()),
        ("for another nation",
         json.dumps(sign_forward(usa_key, "GBR", "{}", hops=[], ttl=30, deadline=now + 30)).encode()),
        ("validly signed, garbage inside", json.dumps(signed_garbage).encode()),
        ("replayed", json.dumps(signed_garbage).encode()),
    ]
    with httpx.Client(verify=client_ssl_context(usa.tls.identity()), timeout=30) as http:
        for what, body in bodies:
            reply = http.post(fra.forward_url, content=body, headers={"content-type": "application/json"})
            assert 400 <= reply.status_code < 500, f"{what}: {reply.status_code} {reply.text}"
            error = reply.json()["error"]
            assert error["code"] and error["message"], what
        # Wrong path and method on a valid connection: JSON 4xx as well.
        assert http.get(fra.forward_url).status_code == 405
        assert http.post(f"{fra.gateway}/usa/federation/forward", json={}).status_code == 404

    # A forward validly signed by USA's federation key but sent over FRA's own TLS identity:
    # the certificate's nation must be the signer.
    mismatched = sign_forward(usa_key, "FRA", "{}", hops=[], ttl=30, deadline=time.time() + 30)
    with httpx.Client(verify=client_ssl_context(fra.tls.identity()), timeout=30) as http:
        reply = http.post(fra.forward_url, json=mismatched)
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_forward", reply.text
    assert "TLS identity" in reply.json()["error"]["message"]

    # Only the one validly signed forward got past the envelope check (then failed on its token).
    assert fra.counter("forwards_received") == received + 1
    assert httpx.get(f"{fra.url}/readyz", timeout=10).status_code == 200

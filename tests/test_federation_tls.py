"""Mutual TLS for cross-cluster federation: the dev coalition PKI and the federation gateway actor.

The PKI tests need no Ray. The gateway tests run the real gateway actor on the session Ray cluster
(``ray_session``) in front of a tiny Serve test deployment whose ``forward(envelope)`` echoes what it
got; every certificate and key is generated at test time in a temporary directory.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import socket
import ssl
import stat
import string
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kas_ray.federation.tls import (
    CaFiles,
    CertFiles,
    TlsIdentity,
    client_ssl_context,
    issue_cert,
    make_ca,
    peer_nation_from_cert,
    server_ssl_context,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _load(path: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


@dataclass
class Pki:
    ca: CaFiles
    server: CertFiles  # the gateway's nation
    fra: CertFiles
    gbr: CertFiles
    rogue_ca: CaFiles
    rogue: TlsIdentity  # FRA-named client cert from another CA (trusting the real CA for the server)
    expired: CertFiles
    server_only: CertFiles  # serverAuth EKU only, used as a client cert
    nation: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("coalition-pki")
    nation = "TST" + "".join(secrets.choice(string.ascii_uppercase) for _ in range(4))  # no clash with other tests
    ca = make_ca(base / "ca")
    rogue_ca = make_ca(base / "rogue")  # an impostor: same CA name, another key
    rogue = issue_cert(rogue_ca, base / "rogue", "FRA", usage="client")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    return Pki(
        ca=ca,
        server=issue_cert(ca, base / "server", nation, usage="server"),
        fra=issue_cert(ca, base / "fra", "FRA", usage="client"),
        gbr=issue_cert(ca, base / "gbr", "gbr", usage="both"),
        rogue_ca=rogue_ca,
        rogue=TlsIdentity(cert_file=rogue.cert_file, key_file=rogue.key_file, ca_file=ca.cert_file),
        expired=issue_cert(ca, base / "expired", "FRA", usage="client", not_before=past, days=1),
        server_only=issue_cert(ca, base / "fra", "FRA", usage="server"),
        nation=nation,
    )


# === dev PKI (no Ray) ==============================================================================
def test_dev_pki_certificates(pki: Pki) -> None:
    ca = _load(pki.ca.cert_file)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    fra = _load(pki.fra.cert_file)
    assert fra.issuer == ca.subject
    assert fra.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "kas-fra"
    assert fra.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "FRA"
    san = fra.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert list(fra.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    assert set(_load(pki.gbr.cert_file).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    lifetime = fra.not_valid_after_utc - fra.not_valid_before_utc
    assert dt.timedelta(hours=23) < lifetime <= dt.timedelta(days=1)
    assert _load(pki.expired.cert_file).not_valid_after_utc < dt.datetime.now(dt.UTC)
    for key in (pki.ca.key_file, pki.fra.key_file, pki.server.key_file):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert pki.fra.ca_file == pki.ca.cert_file and isinstance(pki.fra, TlsIdentity)
    with pytest.raises(ValueError):
        issue_cert(pki.ca, Path(pki.fra.cert_file).parent, "F1", usage="client")
    # both contexts load the files and are strict
    assert server_ssl_context(pki.server).verify_mode == ssl.CERT_REQUIRED
    client = client_ssl_context(pki.fra)
    assert client.check_hostname and client.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_peer_nation_from_cert(pki: Pki) -> None:
    pem = Path(pki.gbr.cert_file).read_bytes()
    der = _load(pki.gbr.cert_file).public_bytes(Encoding.DER)
    assert peer_nation_from_cert(der) == "GBR"
    assert peer_nation_from_cert(pem) == "GBR"
    assert peer_nation_from_cert(pem.decode()) == "GBR"

    def subject(*pairs: tuple[str, str]) -> dict[str, Any]:
        return {"subject": tuple(((name, value),) for name, value in pairs)}

    assert peer_nation_from_cert(subject(("organizationName", "FRA"), ("commonName", "kas-fra"))) == "FRA"
    assert peer_nation_from_cert(subject(("commonName", "kas-usa"))) == "USA"
    assert peer_nation_from_cert(subject(("organizationName", "usa"))) == "USA"
    # disagreeing or ambiguous subjects name no nation
    assert peer_nation_from_cert(subject(("organizationName", "USA"), ("commonName", "kas-fra"))) is None
    assert peer_nation_from_cert(subject(("organizationName", "USA"), ("organizationName", "FRA"))) is None
    assert peer_nation_from_cert(subject(("commonName", "www.example.org"))) is None
    assert peer_nation_from_cert(_load(pki.ca.cert_file)) is None
    assert peer_nation_from_cert(b"not a certificate") is None
    assert peer_nation_from_cert(None) is None
    assert peer_nation_from_cert({}) is None


# === the gateway on Ray ============================================================================
@dataclass
class Gateway:
    url: str
    port: int
    pki: Pki
    app_name: str
    handle: Any  # the test deployment

    def client(self, identity: Any, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=client_ssl_context(identity), timeout=20, **kwargs)

    @property
    def forward_path(self) -> str:
        return f"/{self.pki.nation.lower()}/federation/forward"

    def calls(self) -> int:
        return int(self.handle.calls.remote().result(timeout_s=30))

    def cancellations(self) -> int:
        return int(self.handle.cancellations.remote().result(timeout_s=30))


def _serve_running() -> bool:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


@pytest.fixture(scope="module")
def gateway(ray_session: None, pki: Pki) -> Iterator[Gateway]:
    import asyncio

    from ray import serve

    from kas_ray.errors import AccessDenied
    from kas_ray.federation.gateway import start_gateway, stop_gateway

    # Defined here, not at module level, so Serve ships the class by value to its replica.
    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32)
    class EchoForward:
        def __init__(self) -> None:
            self.count = 0
            self.cancelled = 0

        async def forward(self, envelope: dict[str, Any]) -> dict[str, Any]:
            self.count += 1
            if envelope.get("sleep"):
                try:
                    await asyncio.sleep(float(envelope["sleep"]))
                except asyncio.CancelledError:
                    self.cancelled += 1
                    raise
            if envelope.get("raise"):
                raise AccessDenied("denied by the test deployment")
            if envelope.get("error"):
                return {"error": {"code": envelope["error"], "message": "refused by the test deployment"}}
            return {"ok": True, "tls_peer": envelope["_tls_peer"], "envelope": envelope}

        def calls(self) -> int:
            return self.count

        def cancellations(self) -> int:
            return self.cancelled

    # Serve must not be started here with options a later fixture (kas_cluster) would need: without a
    # running Serve, start one with no proxy and shut it down afterwards.
    started_serve = not _serve_running()
    if started_serve:
        serve.start(proxy_location="Disabled")
    app_name = f"fedgw-test-{secrets.token_hex(4)}"
    handle = serve.run(EchoForward.bind(), name=app_name, route_prefix=f"/{app_name}")
    port = _free_port()
    began = time.perf_counter()
    try:
        start_gateway(pki.nation, "127.0.0.1", port, pki.server, app_name=app_name, request_timeout_seconds=6.0,
                      head_timeout_seconds=2.0)
        print(f"\nfederation gateway up in {time.perf_counter() - began:.1f}s on 127.0.0.1:{port}")
        yield Gateway(url=f"https://127.0.0.1:{port}", port=port, pki=pki, app_name=app_name, handle=handle)
    finally:
        stop_gateway(pki.nation)
        serve.delete(app_name)
        if started_serve:
            serve.shutdown()


def test_forward_with_a_valid_client_certificate(gateway: Gateway) -> None:
    with gateway.client(gateway.pki.fra) as fra, gateway.client(gateway.pki.gbr) as gbr:
        assert fra.get("/healthz").json() == {"status": "ok", "nation": gateway.pki.nation}
        reply = fra.post(gateway.forward_path, json={"kao": "x", "_tls_peer": gateway.pki.nation})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        # the peer identity comes from the verified certificate; a claimed _tls_peer is overwritten
        assert body["ok"] is True and body["tls_peer"] == "FRA"
        assert body["envelope"] == {"kao": "x", "_tls_peer": "FRA"}
        assert gbr.post(f"/{gateway.pki.nation}/federation/forward", json={}).json()["tls_peer"] == "GBR"
        # keep-alive: several requests on one connection
        for i in range(3):
            assert fra.post(gateway.forward_path, json={"i": i}).json()["envelope"]["i"] == i


def _raw_tls12_handshake(gateway: Gateway, context: ssl.SSLContext) -> None:
    """A TLS 1.2 handshake fails at once when the server refuses the client certificate."""
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        tls.recv(100)


def test_handshake_refuses_missing_foreign_expired_and_wrong_usage_certificates(gateway: Gateway) -> None:
    before = gateway.calls()
    refused: dict[str, Callable[[], ssl.SSLContext]] = {
        # verifies the server, shows no certificate
        "no client certificate": lambda: ssl.create_default_context(cafile=gateway.pki.ca.cert_file),
        "certificate from another CA": lambda: client_ssl_context(gateway.pki.rogue),
        "expired certificate": lambda: client_ssl_context(gateway.pki.expired),
        "serverAuth-only certificate": lambda: client_ssl_context(gateway.pki.server_only),
    }
    for label, context in refused.items():
        # TLS 1.3: the client finishes its side first, then the server drops the connection unanswered
        with pytest.raises(httpx.TransportError), httpx.Client(verify=context(), timeout=10) as client:
            client.post(gateway.url + gateway.forward_path, json={"case": label})
            pytest.fail(f"{label}: the gateway answered")
        with pytest.raises((ssl.SSLError, ConnectionError)):  # TLS 1.2: the handshake itself fails
            _raw_tls12_handshake(gateway, context())
    # plain HTTP on the TLS port
    with pytest.raises(httpx.TransportError):
        httpx.post(f"http://127.0.0.1:{gateway.port}{gateway.forward_path}", json={}, timeout=10)
    # a client that does not trust the gateway's CA refuses the server too
    with pytest.raises(httpx.ConnectError):
        httpx.get(gateway.url + "/healthz", verify=client_ssl_context(
            TlsIdentity(cert_file=gateway.pki.fra.cert_file, key_file=gateway.pki.fra.key_file,
                        ca_file=gateway.pki.rogue_ca.cert_file)), timeout=10)
    assert gateway.calls() == before, "a refused connection reached the deployment"
    # the gateway still serves good peers
    with gateway.client(gateway.pki.fra) as fra:
        assert fra.post(gateway.forward_path, json={}).status_code == 200


def test_bad_input_is_refused_with_json_errors(gateway: Gateway) -> None:
    before = gateway.calls()
    with gateway.client(gateway.pki.fra) as fra:
        cases: list[tuple[httpx.Response, int, str]] = [
            (fra.post(gateway.forward_path, content=b"{" + b" " * (1024 * 1024) + b"}"), 413, "payload_too_large"),
            (fra.post(gateway.forward_path, content=b'{"kao": '), 400, "invalid_json"),
            (fra.post(gateway.forward_path, content=b"\xff\xfe{}"), 400, "invalid_json"),
            (fra.post(gateway.forward_path, content=b"[1, 2]"), 400, "invalid_json"),
            (fra.post(gateway.forward_path, content=b'{"a": NaN}'), 400, "invalid_json"),
            (fra.post(gateway.forward_path, content=b"[" * 100_000), 400, "invalid_json"),
            (fra.post("/fra/federation/forward", json={}), 404, "not_found"),
            (fra.post("/nope", json={}), 404, "not_found"),
            (fra.get(gateway.forward_path), 405, "method_not_allowed"),
        ]
    for reply, status, code in cases:
        assert reply.status_code == status, (reply.request.url, reply.text[:200])
        assert reply.headers["content-type"] == "application/json"
        assert reply.json()["error"]["code"] == code
    assert gateway.calls() == before, "bad input reached the deployment"


def _wait_for(predicate: Callable[[], bool], seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_deployment_errors_timeouts_and_cancellation(gateway: Gateway) -> None:
    cancelled = gateway.cancellations()
    with gateway.client(gateway.pki.fra) as fra:
        answered = fra.post(gateway.forward_path, json={"error": "forbidden"})
        assert answered.status_code == 403 and answered.json()["error"]["code"] == "forbidden"
        unknown = fra.post(gateway.forward_path, json={"error": "something_else"})
        assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "something_else"
        raised = fra.post(gateway.forward_path, json={"raise": True})
        assert raised.status_code == 403
        assert raised.json()["error"] == {"code": "forbidden", "message": "denied by the test deployment"}
        began = time.monotonic()
        slow = fra.post(gateway.forward_path, json={"sleep": 30})
        assert slow.status_code == 504 and slow.json()["error"]["code"] == "upstream_timeout"
        assert time.monotonic() - began < 15
        # the timed-out call is cancelled at the deployment, not left running
        assert _wait_for(lambda: gateway.cancellations() == cancelled + 1)
        # a peer that hangs up mid-call cancels the call at the deployment too
        with pytest.raises(httpx.ReadTimeout):
            fra.post(gateway.forward_path, json={"sleep": 30}, timeout=1.0)
        assert _wait_for(lambda: gateway.cancellations() == cancelled + 2)
        assert fra.post(gateway.forward_path, json={}).status_code == 200


def test_slow_request_heads_are_cut(gateway: Gateway) -> None:
    context = client_ssl_context(gateway.pki.fra)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        began = time.monotonic()
        tls.sendall(b"POST " + gateway.forward_path.encode())  # never completes the head
        assert tls.recv(100) == b""  # closed by the gateway
        assert time.monotonic() - began < 8


def test_start_is_idempotent_restarts_and_stops(gateway: Gateway) -> None:
    import ray

    from kas_ray.federation.gateway import gateway_actor_name, start_gateway, stop_gateway

    pki = gateway.pki
    kwargs: dict[str, Any] = {"app_name": gateway.app_name, "request_timeout_seconds": 6.0,
                              "head_timeout_seconds": 2.0}
    actor = start_gateway(pki.nation, "127.0.0.1", gateway.port, pki.server, **kwargs)
    again = start_gateway(pki.nation, "127.0.0.1", gateway.port, pki.server.identity(), **kwargs)
    assert actor._actor_id == again._actor_id
    assert ray.get_actor(gateway_actor_name(pki.nation), namespace="kas-ray")._actor_id == actor._actor_id
    # a port already taken: a clear error, no gateway left behind
    other = "TSX" + pki.nation[3:]
    with pytest.raises(RuntimeError, match="bind"):
        start_gateway(other, "127.0.0.1", gateway.port, pki.server, app_name=gateway.app_name, timeout=30)
    assert not stop_gateway(other)
    # the actor dies: Ray restarts it and it listens again on its port by itself
    ray.kill(actor, no_restart=False)
    deadline = time.monotonic() + 60
    with gateway.client(pki.fra) as fra:
        while True:
            try:
                if fra.post(gateway.forward_path, json={"after": "restart"}).json().get("tls_peer") == "FRA":
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the gateway did not come back after its actor died"
            time.sleep(0.3)
    assert stop_gateway(pki.nation)
    with pytest.raises(httpx.ConnectError):
        httpx.get(gateway.url + "/healthz", verify=client_ssl_context(pki.fra), timeout=5)

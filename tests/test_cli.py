"""The ``kas-ray`` command line, run in process through :func:`kas_ray.cli.main`.

TDFs the CLI writes offline (``--kas-key``) are opened at library level through in-process KAS
services on the same state directory. Every failure must print exactly one line on stderr.
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kas_ray import cli
from kas_ray.audit import MemoryAuditSink
from kas_ray.client import KasClient, LocalTransport, Transport
from kas_ray.config import AbacConfig
from kas_ray.errors import (
    AccessDenied,
    KasNotAllowed,
    KasUnreachableError,
    PayloadIntegrityError,
    RewrapError,
    RootSignatureError,
)
from kas_ray.kas.local import build_local_services, nation_url
from kas_ray.kas.models import PublicKeyResponse, RewrapResponse
from kas_ray.keys.software import PASSPHRASE_ENV, PASSPHRASE_FILE_ENV
from kas_ray.policy import parse_fqn
from kas_ray.trust import DevIdentityProvider, TokenVerifier, dev_issuer, dev_trust_registry
from kas_ray.ztdf import KeyAccessObject, Policy, decrypt, read_manifest, wrap_share
from kas_ray.ztdf.manifest import MANIFEST_ENTRY, PAYLOAD_ENTRY

NATIONS = ["USA", "FRA", "GBR"]
BASE = "http://127.0.0.1:8000"
ENV_VARS = [cli.PROFILE_ENV, cli.TOKEN_ENV, PASSPHRASE_ENV, PASSPHRASE_FILE_ENV, "KAS_RAY_STATE_DIR"]


@dataclass
class Coalition:
    state: Path
    transport: LocalTransport
    keys: Path  # <nation>.<alg>.pem and <nation>.<alg>.json public key files

    def url(self, nation: str) -> str:
        return nation_url(BASE, nation)

    def key_file(self, nation: str, algorithm: str = "rsa:2048", form: str = "pem") -> str:
        return str(self.keys / f"{nation.lower()}.{algorithm.replace(':', '-')}.{form}")

    def client(self, nation: str, sub: str, clearance: str, coi: Iterable[str] = ()) -> KasClient:
        token = DevIdentityProvider(self.state, nation).mint(sub, clearance, coi=list(coi))
        return KasClient(self.transport, token)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def co(tmp_path_factory: pytest.TempPathFactory) -> Iterable[Coalition]:
    state = tmp_path_factory.mktemp("cli-state")
    with pytest.MonkeyPatch.context() as mp:
        for name in ENV_VARS:
            mp.delenv(name, raising=False)
        services = build_local_services(state, NATIONS, base_url=BASE, audit=MemoryAuditSink())
    transport = LocalTransport(services)
    keys = tmp_path_factory.mktemp("kas-keys")
    owner = KasClient(transport, use_dpop=False)
    for nation in NATIONS:
        for algorithm in ("rsa:2048", "ec:secp256r1"):
            key = owner.public_key(nation_url(BASE, nation), algorithm)  # type: ignore[arg-type]
            stem = f"{nation.lower()}.{algorithm.replace(':', '-')}"
            (keys / f"{stem}.pem").write_text(key.public_key_pem)
            (keys / f"{stem}.json").write_text(json.dumps({"publicKey": key.public_key_pem, "kid": key.kid}))
    yield Coalition(state=state, transport=transport, keys=keys)
    transport.close()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def failed(result: tuple[int, str, str], code: int, contains: str = "") -> str:
    """Assert a failure with ``code`` and exactly one stderr line; returns that line."""
    got, out, err = result
    assert got == code, (got, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kas-ray"), lines[0]
    assert contains in lines[0], lines[0]
    assert "Traceback" not in err and out == ""
    return lines[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def encrypt_args(src: Path, dst: Path, kas: list[tuple[str, str]], *extra: str,
                 classification: str = "SECRET", rel: Iterable[str] = NATIONS) -> list[str]:
    argv = ["encrypt", str(src), "-o", str(dst), "--classification", classification]
    for nation in rel:
        argv += ["--releasable-to", nation]
    for url, key in kas:
        argv += ["--kas", url]
        if key:
            argv += ["--kas-key", key]
    return argv + list(extra)


def open_tdf(path: Path, client: KasClient) -> bytes:
    out = io.BytesIO()
    with open(path, "rb") as fh:
        decrypt(fh, out, client)
    return out.getvalue()


# === token ============================================================================================
def test_token_verifies_with_dev_trust_registry(co: Coalition, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "token", "--state-dir", co.state, "--nation", "FRA", "--sub", "bob",
                         "--clearance", "SECRET_DEFENSE", "--coi", "NATO", "--coi", "FVEY", "--ttl", "600")
    assert code == 0 and err == ""
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].count(".") == 2
    with TokenVerifier(dev_trust_registry(co.state, NATIONS)) as verifier:
        verified = verifier.verify(lines[0])
    assert verified.issuer == dev_issuer("FRA") and verified.subject == "bob"
    assert verified.clearance == "SECRET_DEFENSE"
    assert verified.nationality == "FRA" and verified.coi == ["NATO", "FVEY"]
    assert verified.claims["countryOfAffiliation"] == "FRA"
    assert verified.claims["acpCOI"] == ["NATO", "FVEY"]
    assert verified.claims["clearance"] == "SECRET_DEFENSE"
    assert verified.claims["exp"] - verified.claims["iat"] == 600


def test_token_nationality_claim(co: Coalition, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "token", "--state-dir", co.state, "--nation", "GBR", "--sub", "dave",
                       "--clearance", "OFFICIAL", "--nationality", "USA")
    assert code == 0
    with TokenVerifier(dev_trust_registry(co.state, NATIONS)) as verifier:
        verified = verifier.verify(out.strip())
    assert verified.nationality == "USA" and verified.coi == [] and verified.issuer_nations == ["GBR"]


def test_token_refused_under_prod(co: Coalition, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["token", "--state-dir", co.state, "--nation", "USA", "--sub", "a", "--clearance", "SECRET"]
    failed(run(capsys, *args, "--profile", "prod"), 2, "dev profile")
    monkeypatch.setenv(cli.PROFILE_ENV, "prod")
    failed(run(capsys, *args), 2, "dev profile")


# === encrypt offline, decrypt at library level ===========================================================
@pytest.mark.parametrize("form", ["pem", "json"])
@pytest.mark.parametrize(
    ("kas", "all_of"),
    [
        pytest.param([("USA", "rsa:2048")], False, id="one-kas"),
        pytest.param([("USA", "rsa:2048"), ("FRA", "ec:secp256r1")], False, id="any-of"),
        pytest.param([("GBR", "ec:secp256r1"), ("USA", "rsa:2048")], True, id="all-of"),
    ],
)
def test_encrypt_offline_then_decrypt(co: Coalition, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                      form: str, kas: list[tuple[str, str]], all_of: bool) -> None:
    data = os.urandom(3000) + b"coalition plan"
    src, dst = tmp_path / "plan.bin", tmp_path / "plan.tdf"
    src.write_bytes(data)
    pairs = [(co.url(n), co.key_file(n, a, form)) for n, a in kas]
    extra = ["--all-of"] if all_of else []
    code, out, err = run(capsys, *encrypt_args(src, dst, pairs, "--coi", "NATO", "--segment-size", "1024", *extra))
    assert code == 0, err
    assert out == "" and len(err.strip().splitlines()) == 1
    assert ("allOf" if all_of else "anyOf") in err
    assert not list(tmp_path.glob("*.partial"))

    manifest = read_manifest(io.BytesIO(dst.read_bytes()))
    kaos = manifest.encryption_information.key_access
    assert [k.url for k in kaos] == [co.url(n) for n, _ in kas]
    assert [k.type for k in kaos] == ["ec-wrapped" if a.startswith("ec") else "wrapped" for _, a in kas]
    assert len(manifest.key_access_by_split()) == (len(kas) if all_of else 1)
    if form == "json":
        assert all(k.kid and k.kid.startswith(n.lower()) for k, (n, _) in zip(kaos, kas, strict=True))
    else:
        assert all(k.kid is None for k in kaos)
    assert len(manifest.encryption_information.integrity_information.segments) == 3
    policy = Policy.from_base64(manifest.encryption_information.policy)
    assert sorted(parse_fqn(AbacConfig(), a) for a in policy.attributes) == sorted(
        [("classification", "SECRET"), ("coi", "NATO"), *(("releasable-to", n) for n in NATIONS)])

    assert open_tdf(dst, co.client("FRA", "bob", "SECRET DEFENSE", ["NATO"])) == data
    with pytest.raises(AccessDenied):
        open_tdf(dst, co.client("USA", "alice", "SECRET", ["FVEY"]))


def test_encrypt_labels_and_embargo(co: Coalition, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src, dst = tmp_path / "brief.txt", tmp_path / "brief.tdf"
    src.write_bytes(b"embargoed")
    argv = encrypt_args(src, dst, [(co.url("GBR"), co.key_file("GBR"))], "--embargo", "2999-01-01T00:00:00Z",
                        classification="confidential", rel=["GBR", "usa"])
    assert run(capsys, *argv)[0] == 0
    policy = Policy.from_base64(read_manifest(io.BytesIO(dst.read_bytes())).encryption_information.policy)
    assert ("embargo", "2999-01-01T00:00:00Z") in [parse_fqn(AbacConfig(), a) for a in policy.attributes]
    with pytest.raises(AccessDenied):
        open_tdf(dst, co.client("GBR", "carol", "TOP SECRET"))


# === inspect ============================================================================================
def test_inspect(co: Coalition, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src, dst = tmp_path / "in.txt", tmp_path / "in.tdf"
    src.write_bytes(b"x" * 100)
    kas = [(co.url("USA"), co.key_file("USA", form="json")), (co.url("FRA"), co.key_file("FRA", "ec:secp256r1"))]
    assert run(capsys, *encrypt_args(src, dst, kas, "--all-of", rel=["USA", "FRA"]))[0] == 0
    code, out, err = run(capsys, "inspect", dst)
    assert code == 0 and err == ""
    summary = json.loads(out)
    assert summary["schemaVersion"] == "4.3.0" and summary["structure"] == "ok"
    assert summary["splits"] == 2 and summary["segments"] == 1
    assert [(k["url"], k["type"]) for k in summary["keyAccess"]] == [
        (co.url("USA"), "wrapped"), (co.url("FRA"), "ec-wrapped")]
    assert summary["keyAccess"][0]["kid"].startswith("usa-") and summary["keyAccess"][1].get("kid") is None
    assert len({k["sid"] for k in summary["keyAccess"]}) == 2
    attributes = [a["attribute"] for a in summary["policy"]["body"]["dataAttributes"]]
    assert sorted(parse_fqn(AbacConfig(), a) for a in attributes) == [
        ("classification", "SECRET"), ("releasable-to", "FRA"), ("releasable-to", "USA")]
    code, out, _ = run(capsys, "inspect", "--full", dst)
    full = json.loads(out)
    assert code == 0 and full["summary"] == summary
    assert full["manifest"]["encryptionInformation"]["keyAccess"][0]["wrappedKey"]


@pytest.mark.parametrize("content", [b"just text\n", b"", b"PK\x03\x04 not really a zip"])
def test_inspect_non_tdf(capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "plain.txt"
    path.write_bytes(content)
    failed(run(capsys, "inspect", path), 2, "bad_format")


def test_inspect_zip_without_manifest(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("hello.txt", "hi")
    failed(run(capsys, "inspect", path), 2, "0.manifest.json")


# === tampering (library-level decrypt of a CLI-written TDF) ===============================================
def _rewrite(path: Path, manifest: dict | None = None, payload: bytes | None = None) -> None:
    with zipfile.ZipFile(path) as zf:
        old_manifest = json.loads(zf.read(MANIFEST_ENTRY))
        old_payload = zf.read(PAYLOAD_ENTRY)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(PAYLOAD_ENTRY, old_payload if payload is None else payload)
        zf.writestr(MANIFEST_ENTRY, json.dumps(old_manifest if manifest is None else manifest))


@pytest.fixture
def cli_tdf(co: Coalition, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Path:
    src, dst = tmp_path / "orig.txt", tmp_path / "orig.tdf"
    src.write_bytes(b"original secret content" * 10)
    assert run(capsys, *encrypt_args(src, dst, [(co.url("USA"), co.key_file("USA"))], classification="SECRET"))[0] == 0
    return dst


def test_tampered_payload(co: Coalition, cli_tdf: Path) -> None:
    with zipfile.ZipFile(cli_tdf) as zf:
        payload = bytearray(zf.read(PAYLOAD_ENTRY))
    payload[20] ^= 0x01  # inside the ciphertext, not the GMAC tag
    _rewrite(cli_tdf, payload=bytes(payload))
    with pytest.raises(PayloadIntegrityError):
        open_tdf(cli_tdf, co.client("USA", "alice", "SECRET"))


def test_tampered_root_signature(co: Coalition, cli_tdf: Path) -> None:
    with zipfile.ZipFile(cli_tdf) as zf:
        manifest = json.loads(zf.read(MANIFEST_ENTRY))
    root = manifest["encryptionInformation"]["integrityInformation"]["rootSignature"]
    root["sig"] = "A" + root["sig"][1:] if root["sig"][0] != "A" else "B" + root["sig"][1:]
    _rewrite(cli_tdf, manifest=manifest)
    with pytest.raises(RootSignatureError):
        open_tdf(cli_tdf, co.client("USA", "alice", "SECRET"))


def test_tampered_policy_downgrade(co: Coalition, cli_tdf: Path) -> None:
    """Relabel SECRET -> UNCLASSIFIED in the manifest: the KAS refuses (bad request), nothing decrypts."""
    with zipfile.ZipFile(cli_tdf) as zf:
        manifest = json.loads(zf.read(MANIFEST_ENTRY))
    info = manifest["encryptionInformation"]
    policy = Policy.from_base64(info["policy"])
    lowered = [a.replace("/classification/value/secret", "/classification/value/unclassified")
               for a in policy.attributes]
    assert lowered != policy.attributes
    info["policy"] = Policy.create(lowered).model_copy(update={"uuid": policy.uuid}).to_base64()
    _rewrite(cli_tdf, manifest=manifest)
    with pytest.raises(RewrapError, match="bad request"):
        open_tdf(cli_tdf, co.client("GBR", "dave", "OFFICIAL"))


# === bad inputs: exit codes and one-line errors =================================================================
def test_unknown_classification(co: Coalition, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_text("a")
    dst = tmp_path / "a.tdf"
    line = failed(run(capsys, *encrypt_args(src, dst, [(co.url("USA"), co.key_file("USA"))],
                                            classification="ULTRA")), 2, "bad label")
    assert "ULTRA" in line
    failed(run(capsys, *encrypt_args(src, dst, [(co.url("USA"), co.key_file("USA"))], "--coi", "a/b")), 2,
           "bad label")
    failed(run(capsys, *encrypt_args(src, dst, [(co.url("USA"), co.key_file("USA"))], "--embargo", "tomorrow")),
           2, "bad label")
    assert not dst.exists()


def test_missing_input_file(co: Coalition, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    dst = tmp_path / "out.tdf"
    failed(run(capsys, *encrypt_args(tmp_path / "absent.txt", dst, [(co.url("USA"), co.key_file("USA"))])), 2,
           "cannot read")
    assert not dst.exists() and not list(tmp_path.glob("*.partial"))
    failed(run(capsys, "inspect", tmp_path / "absent.tdf"), 2, "cannot read")
    failed(run(capsys, "decrypt", tmp_path / "absent.tdf", "-o", tmp_path / "x", "--token", "t"), 2, "cannot read")
    assert not (tmp_path / "x").exists()


def test_kas_key_count_mismatch(co: Coalition, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_text("a")
    argv = encrypt_args(src, tmp_path / "a.tdf", [(co.url("USA"), co.key_file("USA")), (co.url("FRA"), "")])
    failed(run(capsys, *argv), 2, "--kas-key")


@pytest.mark.parametrize(
    ("content", "contains"),
    [
        ("not a key", "not a valid PEM"),
        ('{"kid": "usa-r2048-v1"}', "neither a PEM"),
        ('{"publicKey": "garbage", "kid": "k"}', "not a valid PEM"),
    ],
    ids=["garbage-pem", "json-without-key", "json-bad-key"],
)
def test_bad_kas_key_file(co: Coalition, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                          content: str, contains: str) -> None:
    src, key = tmp_path / "a.txt", tmp_path / "key.pem"
    src.write_text("a")
    key.write_text(content)
    failed(run(capsys, *encrypt_args(src, tmp_path / "a.tdf", [(co.url("USA"), str(key))])), 2, contains)
    failed(run(capsys, *encrypt_args(src, tmp_path / "a.tdf", [(co.url("USA"), str(tmp_path / "none.pem"))])), 2,
           "cannot read KAS key")


def test_bad_abac_config_and_segment_size(co: Coalition, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src, abac = tmp_path / "a.txt", tmp_path / "abac.yaml"
    src.write_text("a")
    abac.write_text("namespace: 3\nattributes: {}\n")
    kas = [(co.url("USA"), co.key_file("USA"))]
    failed(run(capsys, *encrypt_args(src, tmp_path / "a.tdf", kas, "--abac-config", abac)), 2, "config_error")
    abac.write_text("namespace: [unclosed\n")
    failed(run(capsys, *encrypt_args(src, tmp_path / "a.tdf", kas, "--abac-config", abac)), 2, "not valid YAML")
    for size in ("0", "-5", str(10**9)):
        failed(run(capsys, *encrypt_args(src, tmp_path / "a.tdf", kas, "--segment-size", size)), 2, "segment-size")
    assert not (tmp_path / "a.tdf").exists()


def test_unwritable_output(co: Coalition, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_text("a")
    argv = encrypt_args(src, tmp_path / "no" / "such" / "dir.tdf", [(co.url("USA"), co.key_file("USA"))])
    failed(run(capsys, *argv), 2, "cannot write")


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    failed(run_exit(capsys, "encrypt", tmp_path / "a"), 2, "required")
    failed(run_exit(capsys, "frobnicate"), 2, "invalid choice")
    failed(run_exit(capsys), 2, "required")
    failed(run_exit(capsys, "encrypt", "a", "-o", "b", "--kas", "u", "--classification", "S", "--releasable-to",
                    "USA", "--key-algorithm", "rsa:1024"), 2, "invalid choice")


def run_exit(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """Like :func:`run` for argparse failures, which exit instead of returning."""
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out, captured.err


def test_decrypt_without_token(co: Coalition, capsys: pytest.CaptureFixture[str], cli_tdf: Path,
                               tmp_path: Path) -> None:
    out = tmp_path / "plain.out"
    failed(run(capsys, "decrypt", cli_tdf, "-o", out), 2, cli.TOKEN_ENV)
    failed(run(capsys, "decrypt", cli_tdf, "-o", out, "--token-file", tmp_path / "no-token"), 2, "cannot read")
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_decrypt_unreachable_kas(co: Coalition, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    dead = f"http://127.0.0.1:{port}/usa"
    src, tdf, out = tmp_path / "a.txt", tmp_path / "a.tdf", tmp_path / "a.out"
    src.write_text("unreachable")
    assert run(capsys, *encrypt_args(src, tdf, [(dead, co.key_file("USA"))]))[0] == 0
    token = DevIdentityProvider(co.state, "USA").mint("alice", "SECRET")
    line = failed(run(capsys, "decrypt", tdf, "-o", out, "--token", token, "--timeout", "5", "--allow-kas", dead),
                  5, "kas_unreachable")
    assert f"127.0.0.1:{port}" in line and token not in line
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    # The token from the environment and from a file is used the same way (the allowed KAS from the environment).
    monkeypatch.setenv(cli.ALLOWED_KAS_ENV, f"http://127.0.0.1:1/usa, {dead}")
    monkeypatch.setenv(cli.TOKEN_ENV, token)
    failed(run(capsys, "decrypt", tdf, "-o", out), 5, "kas_unreachable")
    monkeypatch.delenv(cli.TOKEN_ENV)
    (tmp_path / "token").write_text(token + "\n")
    failed(run(capsys, "decrypt", tdf, "-o", out, "--token-file", tmp_path / "token"), 5, "kas_unreachable")
    # Fetching the KAS key (no --kas-key) fails the same way.
    failed(run(capsys, *encrypt_args(src, tmp_path / "b.tdf", [(dead, "")])), 5, "kas_unreachable")
    assert not (tmp_path / "b.tdf").exists()


class _Recording(Transport):
    """The network as the client sees it: records where a token would have been sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, str]]] = []

    def public_key(self, base_url: str, algorithm: str) -> PublicKeyResponse:
        raise AssertionError("not used")

    def rewrap(self, base_url: str, headers: dict[str, str], body: dict[str, Any]) -> RewrapResponse:
        self.sent.append((base_url, headers))
        raise KasUnreachableError(f"KAS {base_url} is unreachable")


def test_a_tdf_naming_a_kas_that_is_not_allowed_never_gets_the_token(co: Coalition, capsys: pytest.CaptureFixture[str],
                                                                     tmp_path: Path) -> None:
    """A TDF names its own KAS: a crafted one naming a collector must not receive the reader's token."""
    src, tdf, out = tmp_path / "a.txt", tmp_path / "a.tdf", tmp_path / "a.out"
    src.write_text("bait")
    attacker = "http://127.0.0.1:9/usa"  # nothing listens on the discard port: a token sent would show as unreachable
    assert run(capsys, *encrypt_args(src, tdf, [(attacker, co.key_file("USA"))]))[0] == 0
    token = DevIdentityProvider(co.state, "USA").mint("alice", "SECRET")
    line = failed(run(capsys, "decrypt", tdf, "-o", out, "--token", token), 2, "kas_not_allowed")
    assert "not an allowed KAS" in line and token not in line and not out.exists()
    # The SDK: refused before the transport is called, and an allowed alternative is still used.
    recording = _Recording()
    client = KasClient(recording, token, allowed_kas=[co.url("USA")])
    with pytest.raises(KasNotAllowed):
        client.rewrap(KeyAccessObject.model_validate({**_kao_wire(co), "url": "http://attacker.example/kas"}), "e30=")
    assert recording.sent == []
    with pytest.raises(KasUnreachableError):
        client.rewrap(KeyAccessObject.model_validate(_kao_wire(co)), "e30=")
    assert [url for url, _ in recording.sent] == [co.url("USA")]


def _kao_wire(co: Coalition) -> dict[str, Any]:
    pol = Policy.create([])
    return wrap_share(KasClient(co.transport, use_dpop=False).public_key(co.url("USA")), b"\0" * 32,
                      pol.to_base64()).to_wire()


# === demo and the installed script =========================================================================
def test_demo(co: Coalition, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "demo", "--in-process", "--state-dir", co.state)
    assert code == 0, out + err
    assert "All outcomes as expected." in out
    assert "UNEXPECTED" not in out
    assert (co.state / "audit" / "in-process.jsonl").stat().st_size > 0


def test_console_script_smoke() -> None:
    script = Path(sys.executable).parent / "kas-ray"
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "kas_ray.cli"]
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    proc = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    for command in ("token", "encrypt", "decrypt", "inspect", "demo"):
        assert command in proc.stdout


def test_outputs_are_private_and_never_written_through_a_planted_link(co: Coalition,
                                                                       capsys: pytest.CaptureFixture[str],
                                                                       tmp_path: Path) -> None:
    """A decrypted document is 0600 whatever the umask, and a link planted where the output or its old
    fixed ``.partial`` name would go is replaced, never written through."""
    src, dst = tmp_path / "doc.txt", tmp_path / "doc.tdf"
    src.write_text("for the owner only")
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (tmp_path / "doc.tdf.partial").symlink_to(victim)
    old = os.umask(0o022)
    try:
        assert run(capsys, *encrypt_args(src, dst, [(co.url("USA"), co.key_file("USA"))]))[0] == 0
    finally:
        os.umask(old)
    assert victim.read_text() == "untouched"
    assert dst.is_file() and not dst.is_symlink() and stat.S_IMODE(dst.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.glob("doc.tdf.*.partial")]
    out = tmp_path / "doc.out"
    out.symlink_to(victim)
    cli._write_atomically(str(out), lambda fh: fh.write(b"plaintext"))
    assert victim.read_text() == "untouched" and not out.is_symlink() and out.read_bytes() == b"plaintext"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_the_prod_profile_never_starts_ray_without_token_authentication(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever reaches a Ray cluster without authentication can call a nation's HSM actor for shares."""
    from kas_ray.errors import ConfigError
    from kas_ray.serve.runner import AUTH_MODE_ENV, start_ray

    monkeypatch.setenv(AUTH_MODE_ENV, "disabled")
    with pytest.raises(ConfigError, match="token authentication"):
        start_ray(profile="prod")
    assert os.environ[AUTH_MODE_ENV] == "disabled"  # refused before anything was changed or started


def test_serve_under_prod_without_a_trust_registry_says_so_in_one_line(capsys: pytest.CaptureFixture[str],
                                                                          tmp_path: Path) -> None:
    """A replica would refuse it at start and Serve would report a timeout two minutes later: the CLI says
    why at once, before starting Ray."""
    started = time.monotonic()
    code = cli.main(["serve", "--profile", "prod", "--state-dir", str(tmp_path), "--port", str(free_port())])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "needs a trust_registry" in err, err
    assert time.monotonic() - started < 10

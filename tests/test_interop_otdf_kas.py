"""The real OpenTDF Python SDK (otdf-python, PyPI) against our nation KAS on Ray Serve, over loopback HTTP.

otdf-python is configured only through its public builder:

    SDKBuilder.new_builder()
        .set_platform_endpoint("http://127.0.0.1:PORT/usa")   # the nation KAS base URL
        .use_insecure_plaintext_connection(True)                # http:// on loopback
        .bearer_token(<token printed by `kas-ray token`>)       # static bearer token
        .build()

``SDK.new_tdf_config()`` then names the KAS ``http://127.0.0.1:PORT/usa/kas``; the SDK's Connect client
strips the trailing ``/kas`` and posts binary proto (gzip-compressed) to
``http://127.0.0.1:PORT/usa/kas.AccessService/PublicKey`` (encrypt) and ``.../Rewrap`` (decrypt), with
``Authorization: Bearer <token>`` and an SRT signed by its own throwaway key, no DPoP. The SDK's default
KAS allowlist is the platform endpoint's origin, which covers every nation on the same Serve proxy.
``use_insecure_plaintext_connection(True)`` is required: without it the SDK rewrites every KAS URL to
https. ``SDKBuilder`` keeps the last platform endpoint in a class variable, so builders are not
independent (harmless here: every test builds for the same endpoint, one at a time).

1. otdf-python encrypts (public key fetched over Connect) with ACP-240 attributes and decrypts through
   our Rewrap, single and multi segment, with both KAS URL spellings (``.../usa/kas`` and ``.../usa``).
2. A user without the needed attributes (CONFIDENTIAL clearance, or a FRA user on REL USA) is refused:
   the SDK raises, no plaintext; our audit file records KEY_DENIED for that subject. No token: rejected.
3. A TDF written by kas_ray (``wrapped`` RSA and ``ec-wrapped`` KAOs) is decrypted by otdf-python
   through our KAS.
4. The ``kas-ray`` CLI end to end over HTTP: encrypt (keys fetched), token, decrypt; a CONFIDENTIAL
   token exits 3 with one stderr line.

Python sockets are limited to loopback. otdf-python's HTTP client (pyqwest) is native code that this
guard cannot see, but every URL it is given (and its KAS allowlist) is 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import socket
import uuid
import zipfile

import pytest

otdf_python = pytest.importorskip(
    "otdf_python", reason="otdf-python is not installed (the dev extra pins otdf-python==0.11.0)"
)

from otdf_python.config import KASInfo  # noqa: E402
from otdf_python.sdk import SDK  # noqa: E402
from otdf_python.sdk_builder import SDKBuilder  # noqa: E402

from kas_ray import cli  # noqa: E402
from kas_ray.client import HttpTransport, KasClient  # noqa: E402
from kas_ray.config import AbacConfig  # noqa: E402
from kas_ray.policy import attribute_fqn  # noqa: E402
from kas_ray.trust import DevIdentityProvider  # noqa: E402
from kas_ray.ztdf import Policy, encrypt  # noqa: E402

pytestmark = pytest.mark.interop

ABAC = AbacConfig()
SECRET_REL_USA = [
    attribute_fqn(ABAC, "classification", "SECRET"),
    attribute_fqn(ABAC, "releasable-to", "USA"),
]
PLAINTEXT = b"ACP-240 interop: otdf-python <-> kas-ray. " * 120  # 5,160 bytes
SEGMENT = 1024  # -> 6 segments


# --- fixtures and helpers -------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """Python-level sockets may only reach loopback (no DNS, no outside network)."""
    real_connect = socket.socket.connect

    def connect(sock, address):
        host = address[0] if isinstance(address, tuple) else None
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"interop test tried to reach {address!r}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def _token(kas_cluster, nation: str, sub: str, clearance: str) -> str:
    """What `kas-ray token --state-dir DIR --nation NATION --sub SUB --clearance CLEARANCE` prints."""
    return DevIdentityProvider(kas_cluster.state_dir, nation).mint(sub, clearance)


def _sdk(kas_cluster, token: str | None = None) -> SDK:
    """otdf-python pointed at the USA KAS through its public builder (bearer token optional)."""
    builder = (
        SDKBuilder.new_builder()
        .set_platform_endpoint(kas_cluster.url("USA"))
        .use_insecure_plaintext_connection(True)
    )
    if token is not None:
        builder = builder.bearer_token(token)
    return builder.build()


def _otdf_encrypt(kas_cluster, data: bytes, *, kas_url: str | None = None, segment_size: int = SEGMENT) -> bytes:
    """otdf-python writes a TDF for USA; the KAS public key comes from our Connect PublicKey route."""
    with _sdk(kas_cluster) as sdk:
        kas_info = None if kas_url is None else [KASInfo(url=kas_url)]
        config = sdk.new_tdf_config(attributes=SECRET_REL_USA, kas_info_list=kas_info,
                                    default_segment_size=segment_size, mime_type="text/plain")
        _manifest, _size, out = sdk.create_tdf(data, config)
    return out.getvalue()


def _otdf_decrypt(kas_cluster, tdf: bytes, token: str | None) -> bytes:
    with _sdk(kas_cluster, token) as sdk:
        return sdk.load_tdf(tdf).payload


def _manifest(tdf: bytes) -> dict:
    with zipfile.ZipFile(io.BytesIO(tdf)) as zf:
        return json.loads(zf.read("0.manifest.json"))


def _audit(kas_cluster, nation: str, subject: str) -> list[dict]:
    events = [json.loads(line) for line in kas_cluster.audit_lines(nation)]
    return [e for e in events if e.get("subject") == subject]


def _sub(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- 1. otdf-python encrypts, decrypts through our Rewrap ---------------------------------------------
@pytest.mark.parametrize(
    ("kas_path", "size"),
    [("/kas", len(PLAINTEXT)), ("", 40)],
    ids=["url-with-kas-multi-segment", "url-without-kas-one-segment"],
)
def test_otdf_python_encrypts_and_decrypts_through_our_kas(kas_cluster, kas_path, size):
    data = PLAINTEXT[:size]
    usa = kas_cluster.url("USA")
    kas_url = None if kas_path == "/kas" else usa  # None: the SDK's default, platform endpoint + "/kas"
    tdf = _otdf_encrypt(kas_cluster, data, kas_url=kas_url)

    manifest = _manifest(tdf)
    info = manifest["encryptionInformation"]
    [kao] = info["keyAccess"]
    assert kao["url"] == usa + kas_path
    published = KasClient(HttpTransport()).public_key(usa)
    assert kao["kid"] == published.kid  # the key the SDK fetched over Connect is our rsa:2048 key
    segments = info["integrityInformation"]["segments"]
    assert len(segments) == -(-size // SEGMENT)
    policy = Policy.from_base64(info["policy"])
    assert sorted(policy.attributes) == sorted(SECRET_REL_USA)

    alice = _sub("alice")
    plain = _otdf_decrypt(kas_cluster, tdf, _token(kas_cluster, "USA", alice, "SECRET"))
    assert plain == data
    [event] = _audit(kas_cluster, "USA", alice)
    assert event["action"] == "KEY_RELEASED" and event["kid"] == published.kid


# --- 2. users without the needed attributes are refused ------------------------------------------------
@pytest.fixture(scope="module")
def otdf_tdf(kas_cluster) -> bytes:
    """One otdf-python TDF, SECRET REL USA, shared by the refusal tests."""
    return _otdf_encrypt(kas_cluster, PLAINTEXT)


@pytest.mark.parametrize(
    ("nation", "clearance", "reason"),
    [("USA", "CONFIDENTIAL", "does not dominate classification SECRET"),
     ("FRA", "SECRET_DEFENSE", "nationality FRA is not in releasable-to")],
    ids=["usa-confidential", "fra-not-releasable"],
)
def test_user_without_attributes_is_refused(kas_cluster, otdf_tdf, nation, clearance, reason):
    sub = _sub("mallory")
    token = _token(kas_cluster, nation, sub, clearance)
    plain = None
    with pytest.raises(ValueError, match="Unable to unwrap the key"):
        plain = _otdf_decrypt(kas_cluster, otdf_tdf, token)
    assert plain is None
    events = _audit(kas_cluster, "USA", sub)
    assert [e["action"] for e in events] == ["KEY_DENIED"]
    assert events[0]["decision"] == "deny" and events[0]["error_code"] == "forbidden"
    assert any(reason in r for r in events[0]["reasons"])


def test_request_without_token_is_rejected(kas_cluster, otdf_tdf):
    before = len(kas_cluster.audit_lines("USA"))
    with pytest.raises(ValueError, match="Unable to unwrap the key"):
        _otdf_decrypt(kas_cluster, otdf_tdf, None)
    new = [json.loads(line) for line in kas_cluster.audit_lines("USA")[before:]]
    assert "KEY_RELEASED" not in {e["action"] for e in new}
    assert any(e["action"] == "REQUEST_REJECTED" and e["error_code"] == "invalid_token" for e in new)


# --- 3. kas_ray writes, otdf-python reads through our KAS -----------------------------------------
@pytest.mark.parametrize("algorithm", ["rsa:2048", "ec:secp256r1"])
def test_kas_ray_tdf_decrypted_by_otdf_python(kas_cluster, algorithm):
    """RSA-OAEP ``wrapped`` and ECDH ``ec-wrapped`` KAOs (otdf-python sends an RSA client key for both)."""
    key = KasClient(HttpTransport()).public_key(kas_cluster.url("USA"), algorithm)
    out = io.BytesIO()
    encrypt(io.BytesIO(PLAINTEXT), out, splits=[[key]], policy=Policy.create(SECRET_REL_USA),
            segment_size=SEGMENT)
    assert _manifest(out.getvalue())["encryptionInformation"]["keyAccess"][0]["type"] == (
        "wrapped" if algorithm.startswith("rsa") else "ec-wrapped")
    bob = _sub("bob")
    assert _otdf_decrypt(kas_cluster, out.getvalue(), _token(kas_cluster, "USA", bob, "SECRET")) == PLAINTEXT
    assert [e["action"] for e in _audit(kas_cluster, "USA", bob)] == ["KEY_RELEASED"]


# --- 4. the kas-ray CLI end to end over HTTP ----------------------------------------------------------
def test_cli_end_to_end_over_http(kas_cluster, tmp_path, capsys):
    src, tdf, plain = tmp_path / "in.txt", tmp_path / "out.tdf", tmp_path / "plain.txt"
    src.write_bytes(PLAINTEXT)
    usa = kas_cluster.url("USA")
    assert cli.main(["encrypt", str(src), "-o", str(tdf), "--kas", usa, "--classification", "SECRET",
                     "--releasable-to", "USA", "--segment-size", str(SEGMENT)]) == 0
    capsys.readouterr()

    def token_file(sub: str, clearance: str):
        assert cli.main(["token", "--state-dir", str(kas_cluster.state_dir), "--nation", "usa", "--sub", sub,
                         "--clearance", clearance]) == 0
        path = tmp_path / f"{sub}.jwt"
        path.write_text(capsys.readouterr().out)
        return path

    alice = _sub("alice")
    assert cli.main(["decrypt", str(tdf), "-o", str(plain), "--token-file", str(token_file(alice, "SECRET")),
                     "--allow-kas", usa]) == 0
    assert plain.read_bytes() == PLAINTEXT

    # The CLI's TDF is readable by otdf-python through the same KAS, too.
    assert _otdf_decrypt(kas_cluster, tdf.read_bytes(), _token(kas_cluster, "USA", alice, "SECRET")) == PLAINTEXT

    carol = _sub("carol")
    denied = tmp_path / "denied.txt"
    capsys.readouterr()
    code = cli.main(["decrypt", str(tdf), "-o", str(denied), "--token-file",
                     str(token_file(carol, "CONFIDENTIAL")), "--allow-kas", usa])
    err = capsys.readouterr().err
    assert code == 3
    assert len(err.splitlines()) == 1 and err.startswith("kas-ray: ")
    assert not denied.exists() and not (tmp_path / "denied.txt.partial").exists()
    assert [e["action"] for e in _audit(kas_cluster, "USA", carol)] == ["KEY_DENIED"]

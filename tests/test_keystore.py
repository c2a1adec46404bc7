"""SoftwareKeystore: first-start generation, files at rest, passphrases, restarts and rotation.

RSA-4096 generation and loading are slow (about 2 s and 0.5 s), so one keystore is generated per
module and tests that change it work on a copy of its state directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kas_ray.client import KasClient, LocalTransport
from kas_ray.errors import ConfigError, KeyNotFoundError, KeyUnwrapError
from kas_ray.hazmat import primitives as P
from kas_ray.keys import software
from kas_ray.keys.software import PASSPHRASE_ENV, PASSPHRASE_FILE_ENV, SoftwareKeystore
from kas_ray.ztdf import KasKey, Policy, wrap_share
from kas_ray.ztdf.keyaccess import decode_wrapped_key

NATION = "USA"
URL = "http://127.0.0.1:8000/usa"
PASSPHRASE = "correct horse battery staple"
POLICY_B64 = Policy.create(["https://acp240.nato.int/attr/classification/value/secret"]).to_base64()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    monkeypatch.delenv(PASSPHRASE_FILE_ENV, raising=False)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory whose USA keystore was created with PASSPHRASE from the environment."""
    state = tmp_path_factory.mktemp("keystore")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(PASSPHRASE_FILE_ENV, raising=False)
        mp.setenv(PASSPHRASE_ENV, PASSPHRASE)
        SoftwareKeystore(state, NATION)
    return state


@pytest.fixture(scope="module")
def store(store_dir: Path) -> SoftwareKeystore:
    return SoftwareKeystore(store_dir, NATION, passphrase=PASSPHRASE.encode())


@pytest.fixture
def copy_dir(store_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the module keystore, for tests that add keys."""
    target = tmp_path / "state"
    shutil.copytree(store_dir, target)
    return target


@pytest.fixture
def ec_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast first start (EC key only) for tests about passphrases, not about which keys exist."""
    monkeypatch.setattr(software, "DEFAULT_KEY_SPECS", (("ec:secp256r1", None),))


def kas_key(info, url: str = URL) -> KasKey:  # type: ignore[no-untyped-def]
    return KasKey(url=url, public_key_pem=info.public_key_pem, kid=info.kid, algorithm=info.algorithm,
                  oaep_hash=info.oaep_hash or "sha1")


def wrap_and_unwrap(store: SoftwareKeystore, info) -> None:  # type: ignore[no-untyped-def]
    """Wrap a share to ``info`` the way a data owner does, then unwrap it in ``store``."""
    share = os.urandom(32)
    kao = wrap_share(kas_key(info), share, POLICY_B64)
    wrapped, _ = decode_wrapped_key(kao)
    assert run(store.unwrap(kao.kid, wrapped, kao.ephemeral_public_key)) == share


# --- first start --------------------------------------------------------------------------------------
async def _infos(store: SoftwareKeystore):  # type: ignore[no-untyped-def]
    return await store.keys()


def test_first_start_generates_default_keys(store: SoftwareKeystore) -> None:
    infos = {i.algorithm: i for i in run(_infos(store))}
    assert set(infos) == {"rsa:2048", "rsa:4096", "ec:secp256r1"}
    assert infos["rsa:2048"].oaep_hash == "sha1"
    assert infos["rsa:4096"].oaep_hash == "sha256"
    assert infos["ec:secp256r1"].oaep_hash is None
    assert all(i.status == "active" for i in infos.values())
    assert len({i.kid for i in infos.values()}) == 3
    assert all(i.kid.startswith("usa-") for i in infos.values())
    rsa2048 = P.load_public_key_pem(infos["rsa:2048"].public_key_pem)
    rsa4096 = P.load_public_key_pem(infos["rsa:4096"].public_key_pem)
    ecpub = P.load_public_key_pem(infos["ec:secp256r1"].public_key_pem)
    assert isinstance(rsa2048, rsa.RSAPublicKey) and rsa2048.key_size == 2048
    assert isinstance(rsa4096, rsa.RSAPublicKey) and rsa4096.key_size == 4096
    assert isinstance(ecpub, ec.EllipticCurvePublicKey) and ecpub.curve.name == "secp256r1"


def test_every_default_key_unwraps(store: SoftwareKeystore) -> None:
    for info in run(_infos(store)):
        wrap_and_unwrap(store, info)


def test_files_are_private(store: SoftwareKeystore, store_dir: Path) -> None:
    key_dir = store_dir / "keys" / "usa"
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    files = [p for p in key_dir.iterdir() if p.is_file()]
    assert {p.name for p in files} >= {"index.json", *(f"{i.kid}.key.pem" for i in run(_infos(store)))}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    assert not [p for p in files if p.name.endswith(".tmp")]


def test_private_keys_are_encrypted_pkcs8(store: SoftwareKeystore, store_dir: Path) -> None:
    for info in run(_infos(store)):
        pem = (store_dir / "keys" / "usa" / f"{info.kid}.key.pem").read_bytes()
        assert pem.startswith(b"-----BEGIN ENCRYPTED " + b"PRIVATE KEY-----")  # split: no key-like literal
        with pytest.raises(TypeError):  # "Password was not given but private key is encrypted"
            serialization.load_pem_private_key(pem, password=None)
        key = serialization.load_pem_private_key(pem, password=PASSPHRASE.encode())
        assert P.public_key_pem(key.public_key()) == info.public_key_pem  # type: ignore[arg-type]


def test_index_holds_public_facts_only(store_dir: Path) -> None:
    text = (store_dir / "keys" / "usa" / "index.json").read_text()
    index = json.loads(text)
    assert index["nation"] == "USA"
    assert len(index["keys"]) == 3
    assert "PRIVATE" not in text
    assert PASSPHRASE not in text


# --- passphrases ----------------------------------------------------------------------------------------
def test_passphrase_from_env(store: SoftwareKeystore, store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, PASSPHRASE)
    reopened = SoftwareKeystore(store_dir, NATION)
    assert run(reopened.keys()) == run(store.keys())


def test_passphrase_from_file(
    store: SoftwareKeystore, store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "passphrase"
    secret.write_text(PASSPHRASE + "\n")  # trailing newline of `echo` is stripped
    monkeypatch.setenv(PASSPHRASE_FILE_ENV, str(secret))
    reopened = SoftwareKeystore(store_dir, NATION, profile="prod")
    assert run(reopened.keys()) == run(store.keys())


def test_env_passphrase_wins_over_file(store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "wrong").write_text("not the passphrase")
    monkeypatch.setenv(PASSPHRASE_FILE_ENV, str(tmp_path / "wrong"))
    monkeypatch.setenv(PASSPHRASE_ENV, PASSPHRASE)
    assert software.load_passphrase(store_dir, "prod") == PASSPHRASE.encode()


def test_passphrase_file_missing_or_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_FILE_ENV, str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=PASSPHRASE_FILE_ENV):
        SoftwareKeystore(tmp_path / "state", NATION)
    (tmp_path / "empty").write_text("  \n")
    monkeypatch.setenv(PASSPHRASE_FILE_ENV, str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="empty"):
        SoftwareKeystore(tmp_path / "state", NATION)
    assert not (tmp_path / "state" / "keys").exists()


def test_prod_without_passphrase_refuses(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=PASSPHRASE_ENV) as info:
        SoftwareKeystore(tmp_path, NATION, profile="prod")
    assert "prod" in info.value.message
    assert not (tmp_path / "keys").exists()  # refused before generating anything
    assert not (tmp_path / "secrets").exists()


def test_wrong_passphrase_is_a_clear_config_error(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "not the passphrase")
    with pytest.raises(ConfigError) as info:
        SoftwareKeystore(store_dir, NATION)
    message = info.value.message
    assert "cannot decrypt keystore file" in message and "wrong passphrase" in message
    assert "not the passphrase" not in message
    with pytest.raises(ConfigError, match="wrong passphrase"):
        SoftwareKeystore(store_dir, NATION, passphrase=b"")


def test_dev_profile_generates_a_private_passphrase_once(tmp_path: Path, ec_only: None) -> None:
    first = SoftwareKeystore(tmp_path, NATION)
    secret = tmp_path / "secrets" / "keystore.passphrase"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
    assert len(secret.read_text().strip()) >= 32
    again = SoftwareKeystore(tmp_path, NATION)  # same generated passphrase decrypts the key
    assert run(again.keys()) == run(first.keys())


# --- restarts and rotation ----------------------------------------------------------------------------
def test_restart_keeps_kids_and_old_tdfs_decrypt(store: SoftwareKeystore, store_dir: Path) -> None:
    before = run(store.keys())
    share = os.urandom(32)
    kaos = [wrap_share(kas_key(run(store.key_info(None, alg))), share, POLICY_B64)
            for alg in ("rsa:2048", "rsa:4096", "ec:secp256r1")]
    reopened = SoftwareKeystore(store_dir, NATION, passphrase=PASSPHRASE.encode())
    after = run(reopened.keys())
    assert [(i.kid, i.public_key_pem, i.algorithm, i.oaep_hash) for i in after] == [
        (i.kid, i.public_key_pem, i.algorithm, i.oaep_hash) for i in before
    ]
    for kao in kaos:
        wrapped, _ = decode_wrapped_key(kao)
        assert run(reopened.unwrap(kao.kid, wrapped, kao.ephemeral_public_key)) == share


@pytest.mark.parametrize("algorithm", ["rsa:2048", "ec:secp256r1"])
def test_rotation_retires_but_keeps_old_key(copy_dir: Path, algorithm: str) -> None:
    ks = SoftwareKeystore(copy_dir, NATION, passphrase=PASSPHRASE.encode())
    old = run(ks.key_info(None, algorithm))  # type: ignore[arg-type]
    share = os.urandom(32)
    old_kao = wrap_share(kas_key(old), share, POLICY_B64)

    new = ks.add_key(algorithm)  # type: ignore[arg-type]
    assert new.kid != old.kid and new.kid.endswith("-v2") and new.status == "active"
    assert run(ks.key_info(None, algorithm)) == new  # type: ignore[arg-type]
    retired = run(ks.key_info(old.kid))
    assert retired.status == "retired" and retired.public_key_pem == old.public_key_pem
    # A rotated key keeps the OAEP hash clients use for its algorithm (SHA-1 for OpenTDF rsa:2048).
    assert new.oaep_hash == old.oaep_hash
    wrapped, _ = decode_wrapped_key(old_kao)
    assert run(ks.unwrap(old.kid, wrapped, old_kao.ephemeral_public_key)) == share
    wrap_and_unwrap(ks, new)
    # New TDFs: the data owner fetches the active key the way KasClient does and wraps to it.
    transport = LocalTransport({URL: SimpleNamespace(keys=ks)})  # type: ignore[dict-item]
    try:
        fetched = KasClient(transport, use_dpop=False).public_key(URL, algorithm)  # type: ignore[arg-type]
    finally:
        transport.close()
    assert fetched.kid == new.kid
    new_share = os.urandom(32)
    new_kao = wrap_share(fetched, new_share, POLICY_B64)
    assert run(ks.unwrap(new.kid, decode_wrapped_key(new_kao)[0], new_kao.ephemeral_public_key)) == new_share
    assert stat.S_IMODE((copy_dir / "keys" / "usa" / f"{new.kid}.key.pem").stat().st_mode) == 0o600

    # The rotation survives a restart: same active key, old key still retired and usable.
    reopened = SoftwareKeystore(copy_dir, NATION, passphrase=PASSPHRASE.encode())
    assert run(reopened.key_info(None, algorithm)).kid == new.kid  # type: ignore[arg-type]
    assert run(reopened.key_info(old.kid)).status == "retired"
    assert run(reopened.unwrap(old.kid, wrapped, old_kao.ephemeral_public_key)) == share
    assert len(run(reopened.keys())) == 4
    assert run(reopened.health()).ok


def test_key_info_defaults_to_active_legacy_key(store: SoftwareKeystore) -> None:
    legacy = run(store.key_info(None, "rsa:2048"))
    assert legacy.algorithm == "rsa:2048" and legacy.status == "active" and legacy.oaep_hash == "sha1"
    assert run(store.key_info(None)) == legacy
    assert run(store.key_info(legacy.kid)) == legacy
    assert run(store.key_info(None, "ec:secp256r1")).algorithm == "ec:secp256r1"


def test_unknown_kid(store: SoftwareKeystore) -> None:
    with pytest.raises(KeyNotFoundError):
        run(store.key_info("usa-r2048-v99"))
    with pytest.raises(KeyNotFoundError):
        run(store.unwrap("usa-r2048-v99", os.urandom(256)))
    with pytest.raises(KeyNotFoundError):
        run(store.key_info(None, "rsa:3072"))
    with pytest.raises(KeyNotFoundError):  # another nation's kid is unknown here
        run(store.key_info("fra-r2048-v1"))


def test_garbage_unwrap(store: SoftwareKeystore) -> None:
    infos = {i.algorithm: i for i in run(_infos(store))}
    rsa_kid, ec_kid = infos["rsa:2048"].kid, infos["ec:secp256r1"].kid
    ephemeral = P.public_key_pem(ec.generate_private_key(ec.SECP256R1()).public_key())
    for kid, wrapped, eph in [
        (rsa_kid, os.urandom(256), None),
        (rsa_kid, b"short", None),
        (infos["rsa:4096"].kid, os.urandom(512), None),
        (rsa_kid, os.urandom(256), ephemeral),  # an RSA key cannot unwrap an ec-wrapped KAO
        (ec_kid, os.urandom(60), ephemeral),
        (ec_kid, os.urandom(60), None),  # ec-wrapped needs an ephemeral key
        (ec_kid, os.urandom(60), "-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n"),
    ]:
        with pytest.raises(KeyUnwrapError):
            run(store.unwrap(kid, wrapped, eph))


def test_wrong_oaep_hash_does_not_unwrap(store: SoftwareKeystore) -> None:
    info = run(store.key_info(None, "rsa:2048"))
    kao = wrap_share(kas_key(info).model_copy(update={"oaep_hash": "sha256"}), os.urandom(32), POLICY_B64)
    with pytest.raises(KeyUnwrapError):
        run(store.unwrap(info.kid, decode_wrapped_key(kao)[0]))


def test_health(store: SoftwareKeystore) -> None:
    health = run(store.health())
    assert health.ok and health.keys == 3


def test_nations_are_separate(copy_dir: Path, ec_only: None) -> None:
    fra = SoftwareKeystore(copy_dir, "fra", passphrase=PASSPHRASE.encode())
    assert fra.nation == "FRA"
    kids = [i.kid for i in run(fra.keys())]
    assert kids == ["fra-ec256-v1"]
    assert (copy_dir / "keys" / "fra").is_dir()

"""The PKCS#11 key backend against real software tokens.

* opencryptoki (Debian's software token, slot 3, ``scripts/setup-opencryptoki.sh``): RSA-OAEP with
  SHA-256 and SHA-1. Its test keys (``kas-ray-test-r4096``/``-r2048``) are generated once and kept on the
  token, so later runs start in seconds; the token is shared by every run on the machine, so these tests
  never wipe it and only destroy keys they created under unique labels.
* SoftHSM2 (a private token in a temporary directory): EC P-256 through ``CKM_ECDH1_DERIVE``, which
  Debian 12's opencryptoki software token does not offer, and SoftHSM2's OAEP limits.

Without the token (not root, not Debian, setup failed) these tests skip and say why.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from kas_ray.config import AbacConfig, Pkcs11Config, Pkcs11KeyConfig
from kas_ray.errors import ConfigError, KasRayError, KeyBackendUnavailable, KeyNotFoundError, KeyUnwrapError
from kas_ray.hazmat import primitives as P
from kas_ray.keys import pkcs11 as K
from kas_ray.keys.base import KeyBackend

MODULE = os.environ.get("KAS_RAY_PKCS11_MODULE", K.OPENCRYPTOKI_MODULE)
SLOT = int(os.environ.get("KAS_RAY_PKCS11_SLOT", "3"))
PIN = os.environ.get("KAS_RAY_PKCS11_PIN", K.DEV_USER_PIN)
SO_PIN = os.environ.get("KAS_RAY_PKCS11_SO_PIN", K.OPENCRYPTOKI_FACTORY_SO_PIN)
LABEL = os.environ.get("KAS_RAY_PKCS11_TOKEN_LABEL", K.DEV_TOKEN_LABEL)
SETUP_HINT = "run `sudo bash scripts/setup-opencryptoki.sh` (make test does it as root on Debian/Ubuntu)"
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
R4096, R2048 = "kas-ray-test-r4096", "kas-ray-test-r2048"
CONFIG = AbacConfig()


@dataclass
class Token:
    module: str
    slot: int | None
    pin: str
    keys: dict[str, K.TokenKey]
    token_label: str | None = None

    def config(self, *names: str, **overrides: Any) -> Pkcs11Config:
        keys = [self.keys[n].key_config() for n in names]
        return Pkcs11Config(**{"module": self.module, "slot": self.slot, "token_label": self.token_label,
                               "keys": keys, "sessions": 4, **overrides})

    def backend(self, *names: str, **overrides: Any) -> K.Pkcs11Backend:
        return K.Pkcs11Backend(self.config(*names, **overrides), "TEST", pin=self.pin)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def wrap(info_pem: str, share: bytes, oaep: P.OaepHash | None) -> tuple[bytes, str | None]:
    """A share wrapped locally to a public key read from the token: (wrapped, ephemeral PEM or None)."""
    key = P.load_public_key_pem(info_pem)
    if isinstance(key, ec.EllipticCurvePublicKey):
        wrapped, ephemeral = P.ec_wrap(key, share)
        return wrapped, P.public_key_pem(ephemeral)
    assert oaep is not None
    return P.rsa_oaep_encrypt(key, share, oaep), None


# --- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def token() -> Token:
    """The opencryptoki software token with this suite's RSA keys (generated on first use, then kept)."""
    pytest.importorskip("pkcs11", reason=f"python-pkcs11 missing: {K.INSTALL_HINT}")
    if not os.path.exists(MODULE):
        pytest.skip(f"no PKCS#11 module {MODULE}: {SETUP_HINT}")
    try:
        K.provision_token(MODULE, SLOT, SO_PIN, PIN, LABEL)
        started = time.perf_counter()
        keys = {R4096: K.generate_key(MODULE, SLOT, PIN, R4096, "rsa:4096", exist_ok=True),
                R2048: K.generate_key(MODULE, SLOT, PIN, R2048, "rsa:2048", exist_ok=True)}
    except KasRayError as exc:
        pytest.skip(f"opencryptoki token not usable ({exc.message}): {SETUP_HINT}")
    print(f"\nopencryptoki test keys ready in {time.perf_counter() - started:.1f}s")
    return Token(module=MODULE, slot=SLOT, pin=PIN, keys=keys)


@pytest.fixture(scope="module")
def backend(token: Token, tmp_path_factory: pytest.TempPathFactory) -> Iterator[K.Pkcs11Backend]:
    """Both RSA keys, the PIN read from a file (as an HSM actor reads it)."""
    pin_file = tmp_path_factory.mktemp("pin") / "pin"
    pin_file.write_text(token.pin + "\n")
    pin_file.chmod(0o600)
    backend = K.Pkcs11Backend(token.config(R4096, R2048, pin_file=str(pin_file)), "TEST")
    yield backend
    run(backend.close())


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Token:
    """A private SoftHSM2 token (own directory) with an EC P-256 key and an RSA-2048 key."""
    pytest.importorskip("pkcs11", reason=f"python-pkcs11 missing: {K.INSTALL_HINT}")
    if not os.path.exists(SOFTHSM_MODULE):
        pytest.skip(f"SoftHSM2 not installed ({SOFTHSM_MODULE}): {SETUP_HINT}")
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # read once, when this process first loads SoftHSM2
    try:
        K.provision_token(SOFTHSM_MODULE, 0, "1234", "5678", "kas-ray-ec")
        keys = {"ec": K.generate_key(SOFTHSM_MODULE, 0, "5678", "kas-ray-test-ec", "ec:secp256r1"),
                "r2048": K.generate_key(SOFTHSM_MODULE, 0, "5678", "kas-ray-test-sh2048", "rsa:2048")}
    except KasRayError as exc:
        pytest.skip(f"SoftHSM2 token not usable: {exc.message}")
    return Token(module=SOFTHSM_MODULE, slot=None, pin="5678", keys=keys, token_label="kas-ray-ec")


# --- the extra ---------------------------------------------------------------------------------------------
def test_missing_extra_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pkcs11", None)  # import pkcs11 → ImportError
    with pytest.raises(ImportError, match=r"pip install 'kas-ray\[pkcs11\]'"):
        K.Pkcs11Backend(Pkcs11Config(module=MODULE), "TEST")
    with pytest.raises(ImportError, match="kas-ray"):
        K.provision_token(MODULE, SLOT, SO_PIN, PIN, LABEL)


# --- opencryptoki: RSA-OAEP --------------------------------------------------------------------------------
def test_published_keys_are_the_token_keys(backend: K.Pkcs11Backend, token: Token) -> None:
    infos = {i.kid: i for i in run(backend.keys())}
    assert set(infos) == {R4096, R2048}
    assert (infos[R4096].algorithm, infos[R4096].oaep_hash) == ("rsa:4096", "sha256")
    assert (infos[R2048].algorithm, infos[R2048].oaep_hash) == ("rsa:2048", "sha1")
    for kid, info in infos.items():
        assert info.public_key_pem == token.keys[kid].public_key_pem and info.status == "active"
        assert len(info.version) == 16
    assert run(backend.key_info(None, "rsa:4096")).kid == R4096
    assert run(backend.key_info(None)).kid == R2048  # the OpenTDF default algorithm


@pytest.mark.parametrize(("kid", "oaep"), [(R4096, "sha256"), (R2048, "sha1")])
def test_rsa_oaep_round_trip(backend: K.Pkcs11Backend, kid: str, oaep: P.OaepHash) -> None:
    info = run(backend.key_info(kid))
    for _ in range(3):
        share = os.urandom(32)
        wrapped, _ = wrap(info.public_key_pem, share, oaep)
        assert run(backend.unwrap(kid, wrapped)) == share


def test_private_keys_never_leave_the_token(token: Token) -> None:
    import pkcs11
    from pkcs11 import Attribute as A

    with K._user_session(token.module, SLOT, token.pin) as session:
        for label in (R4096, R2048):
            (private,) = session.get_objects({A.CLASS: pkcs11.ObjectClass.PRIVATE_KEY, A.LABEL: label})
            assert private[A.EXTRACTABLE] is False and private[A.SENSITIVE] is True
            assert private[A.NEVER_EXTRACTABLE] is True and private[A.ALWAYS_SENSITIVE] is True
            assert private[A.TOKEN] is True and private[A.PRIVATE] is True
            assert private[A.DECRYPT] is True and private[A.SIGN] is False
            for secret in (A.PRIVATE_EXPONENT, A.PRIME_1, A.PRIME_2, A.EXPONENT_1, A.COEFFICIENT):
                with pytest.raises(pkcs11.AttributeSensitive):
                    private[secret]
            with pytest.raises(pkcs11.PKCS11Error):  # no CKA_VALUE on an RSA key, and nothing readable
                private[A.VALUE]
            (public,) = session.get_objects({A.CLASS: pkcs11.ObjectClass.PUBLIC_KEY, A.LABEL: label})
            assert public[A.MODULUS] and public[A.PRIVATE] is False  # the public half is readable
    with K._user_session(token.module, SLOT, token.pin, rw=True) as session:
        (private,) = session.get_objects({A.CLASS: pkcs11.ObjectClass.PRIVATE_KEY, A.LABEL: R2048})
        with pytest.raises(pkcs11.PKCS11Error):  # CKA_EXTRACTABLE can never go back to true
            private[A.EXTRACTABLE] = True
        wrapper = session.generate_key(pkcs11.KeyType.AES, 256, store=False,
                                       capabilities=pkcs11.MechanismFlag.WRAP | pkcs11.MechanismFlag.ENCRYPT)
        with pytest.raises(pkcs11.PKCS11Error) as wrapped_out:  # nor be wrapped out under a key we hold
            wrapper.wrap_key(private, mechanism=pkcs11.Mechanism.AES_CBC_PAD, mechanism_param=bytes(16))
        assert type(wrapped_out.value).__name__ in ("KeyUnextractable", "KeyNotWrappable")


@pytest.mark.parametrize("garbage", ["zeros", "random", "short", "wrong-oaep-hash", "flipped"])
def test_garbage_ciphertext_is_an_unwrap_error(backend: K.Pkcs11Backend, garbage: str) -> None:
    info = run(backend.key_info(R4096))
    good, _ = wrap(info.public_key_pem, os.urandom(32), "sha256")
    wrapped = {
        "zeros": bytes(512),
        "random": os.urandom(512),
        "short": b"\x01\x02\x03",
        "wrong-oaep-hash": wrap(info.public_key_pem, os.urandom(32), "sha1")[0],
        "flipped": good[:-1] + bytes([good[-1] ^ 1]),
    }[garbage]
    with pytest.raises(KeyUnwrapError):
        run(backend.unwrap(R4096, wrapped))
    share = os.urandom(32)  # the session that saw the garbage keeps working
    assert run(backend.unwrap(R4096, wrap(info.public_key_pem, share, "sha256")[0])) == share


def test_wrong_kind_of_kao_and_wrong_length(backend: K.Pkcs11Backend) -> None:
    info = run(backend.key_info(R2048))
    wrapped, _ = wrap(info.public_key_pem, os.urandom(32), "sha1")
    ephemeral = P.public_key_pem(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(KeyUnwrapError, match="RSA key cannot unwrap an ec-wrapped"):
        run(backend.unwrap(R2048, wrapped, ephemeral))
    not_a_share, _ = wrap(info.public_key_pem, os.urandom(16), "sha1")
    with pytest.raises(KeyUnwrapError, match="wrong length"):
        run(backend.unwrap(R2048, not_a_share))


def test_unknown_kid(backend: K.Pkcs11Backend) -> None:
    with pytest.raises(KeyNotFoundError):
        run(backend.unwrap("usa-r2048-v1", b"\x00" * 256))
    with pytest.raises(KeyNotFoundError):
        run(backend.key_info("no-such-kid"))


def test_fifty_concurrent_unwraps_on_four_sessions(backend: K.Pkcs11Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """50 unwraps at once: all correct, at most 4 inside the token at a time, the event loop stays free."""
    infos = {i.kid: i for i in run(backend.keys())}
    inside, peak, lock = 0, 0, threading.Lock()
    real = K._rsa_decrypt

    def counting(*args: Any) -> bytes:
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
        try:
            return real(*args)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(K, "_rsa_decrypt", counting)
    jobs = []
    for n in range(50):
        kid = R4096 if n % 2 else R2048
        share = os.urandom(32)
        jobs.append((kid, share, wrap(infos[kid].public_key_pem, share, infos[kid].oaep_hash)[0]))

    async def main() -> tuple[list[bytes], float, float]:
        loop, lag, done = asyncio.get_running_loop(), 0.0, False

        async def ticker() -> None:
            nonlocal lag
            while not done:
                before = loop.time()
                await asyncio.sleep(0.005)
                lag = max(lag, loop.time() - before - 0.005)

        tick = asyncio.create_task(ticker())
        started = time.perf_counter()
        shares = await asyncio.gather(*[backend.unwrap(kid, wrapped) for kid, _, wrapped in jobs])
        elapsed = time.perf_counter() - started
        done = True
        await tick
        return shares, elapsed, lag

    shares, elapsed, lag = run(main())
    assert shares == [share for _, share, _ in jobs]
    assert 1 <= peak <= 4
    print(f"\n50 unwraps (25 RSA-4096 + 25 RSA-2048) in {elapsed:.2f}s, peak {peak} sessions busy, "
          f"event loop lag max {lag * 1000:.0f} ms")
    assert lag < 0.5


def test_health(backend: K.Pkcs11Backend) -> None:
    health = run(backend.health())
    assert health.ok and health.keys == 2
    assert "pkcs11 token" in health.detail and "4 sessions" in health.detail


def test_lost_sessions_are_reopened(token: Token) -> None:
    """Sessions closed under the backend (token reset, HSM failover): the next call reconnects once."""
    backend = token.backend(R2048, sessions=2)
    info = run(backend.key_info(R2048))
    conn = backend._conn
    assert conn is not None
    for pooled in conn.sessions:
        pooled.session.close()
    share = os.urandom(32)
    assert run(backend.unwrap(R2048, wrap(info.public_key_pem, share, "sha1")[0])) == share
    assert backend._conn is not conn and run(backend.health()).ok
    run(backend.close())


# --- opencryptoki: configuration and login ---------------------------------------------------------------
def test_keys_by_id_and_config_mistakes(token: Token) -> None:
    by_id = token.keys[R4096].key_config().model_copy(update={"kid": "by-id", "label": None})
    backend = K.Pkcs11Backend(token.config(keys=[by_id]), "TEST", pin=token.pin)
    (info,) = run(backend.keys())
    assert info.kid == "by-id" and info.public_key_pem == token.keys[R4096].public_key_pem

    mistakes = {
        "no private key with label 'nope'": Pkcs11KeyConfig(kid="k", label="nope"),
        "is rsa:2048 on the token, configured as rsa:4096": Pkcs11KeyConfig(kid="k", label=R2048),
    }
    for message, key in mistakes.items():
        broken = K.Pkcs11Backend(token.config(keys=[key]), "TEST", pin=token.pin)
        with pytest.raises(ConfigError, match=message):
            run(broken.keys())
        health = run(broken.health())
        assert not health.ok and message in health.detail
    with pytest.raises(ConfigError, match="unsupported algorithm"):
        K.Pkcs11Backend(token.config(keys=[Pkcs11KeyConfig(kid="k", algorithm="rsa:1024")]), "TEST")
    with pytest.raises(ConfigError, match="kid twice"):
        K.Pkcs11Backend(token.config(R2048, R2048), "TEST")


def test_token_missing_is_unavailable(token: Token) -> None:
    backend = K.Pkcs11Backend(token.config(R2048, slot=99), "TEST", pin=token.pin)
    with pytest.raises(KeyBackendUnavailable, match="no PKCS#11 token matches slot 99") as caught:
        run(backend.keys())
    assert caught.value.http_status == 503
    with pytest.raises(KeyBackendUnavailable):
        run(backend.unwrap(R2048, b"\x00" * 256))
    health = run(backend.health())
    assert not health.ok and "slot 99" in health.detail


def test_pin_sources(token: Token, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = "KAS_RAY_TEST_PKCS11_PIN"
    monkeypatch.delenv(env, raising=False)
    config = token.config(R2048, pin_env=env)
    with pytest.raises(KeyBackendUnavailable, match=f"no PKCS#11 user PIN: set {env}"):
        run(K.Pkcs11Backend(config, "TEST").keys())
    monkeypatch.setenv(env, token.pin)
    assert run(K.Pkcs11Backend(config, "TEST").health()).ok
    missing = token.config(R2048, pin_file=str(tmp_path / "absent"))
    with pytest.raises(KeyBackendUnavailable, match="cannot read the PKCS#11 PIN file"):
        run(K.Pkcs11Backend(missing, "TEST").keys())



def test_a_configured_key_without_oaep_hash_takes_the_algorithms_default(token: Token) -> None:
    """rsa:2048 without ``oaep_hash`` is OAEP-SHA1, what OpenTDF clients (and KasClient) wrap with; rsa:4096 SHA-256."""
    keys = [token.keys[kid].key_config().model_copy(update={"oaep_hash": None}) for kid in (R2048, R4096)]
    assert all(k.oaep_hash is None for k in keys) and Pkcs11KeyConfig(kid="k").oaep_hash is None
    backend = K.Pkcs11Backend(token.config(keys=keys), "TEST", pin=token.pin)
    try:
        infos = {i.kid: i for i in run(backend.keys())}
        assert (infos[R2048].oaep_hash, infos[R4096].oaep_hash) == ("sha1", "sha256")
        share = os.urandom(32)
        for kid, info in infos.items():
            wrapped, _ = wrap(info.public_key_pem, share, P.oaep_hash_for(info.algorithm))
            assert run(backend.unwrap(kid, wrapped)) == share
    finally:
        run(backend.close())

WRONG_PIN_SCRIPT = """
import asyncio, json, sys
from kas_ray.config import Pkcs11Config, Pkcs11KeyConfig
from kas_ray.errors import KasRayError
from kas_ray.keys.pkcs11 import Pkcs11Backend

module, slot, good, label = sys.argv[1:5]
config = Pkcs11Config(module=module, slot=int(slot), sessions=2,
                      keys=[Pkcs11KeyConfig(kid=label, label=label, algorithm="rsa:2048", oaep_hash="sha1")])
Pkcs11Backend.retry_after_seconds = 0.0
out = {}

async def main():
    bad = Pkcs11Backend(config, "TEST", pin="00000000")
    for attempt in ("first", "second"):
        try:
            await bad.keys()
            out[attempt] = None
        except KasRayError as exc:
            out[attempt] = [type(exc).__name__, exc.http_status, exc.message]
    health = await bad.health()
    out["health"] = [health.ok, health.detail]
    health = await Pkcs11Backend(config, "TEST", pin=good).health()  # a right PIN resets the failure count
    out["good"] = [health.ok, health.detail]

asyncio.run(main())
print(json.dumps(out))
"""


def test_wrong_pin_is_unavailable_and_not_retried(token: Token) -> None:
    """In a fresh process: login state is per process, and this one is already logged in."""
    done = subprocess.run([sys.executable, "-c", WRONG_PIN_SCRIPT, token.module, str(SLOT), token.pin, R2048],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    kind, status, message = out["first"]
    assert (kind, status) == ("KeyBackendUnavailable", 503)
    assert "wrong user PIN" in message and "CKR_PIN_INCORRECT" in message
    kind, status, message = out["second"]
    assert kind == "KeyBackendUnavailable" and "not tried again" in message
    assert out["health"][0] is False and "PIN" in out["health"][1]
    assert out["good"][0] is True
    import pkcs11

    flags = int(K._slot(pkcs11.lib(token.module), SLOT).get_token().flags)
    assert not flags & K._CKF_USER_PIN_LOCKED


# --- dev/CI helpers ---------------------------------------------------------------------------------------
def test_provision_token_is_idempotent(token: Token) -> None:
    assert K.provision_token(token.module, SLOT, SO_PIN, token.pin, LABEL) == "unchanged"
    with pytest.raises(ConfigError, match="not re-initialising it"):
        K.provision_token(token.module, SLOT, SO_PIN, token.pin, "some-other-label")


def test_generate_list_and_destroy_a_key(token: Token) -> None:
    label = f"kas-ray-tmp-{uuid.uuid4().hex[:8]}"
    try:
        key = K.generate_key(token.module, SLOT, token.pin, label, "rsa:2048", kid="tmp-kid")
        assert (key.kid, key.label, key.algorithm, key.oaep_hash) == ("tmp-kid", label, "rsa:2048", "sha1")
        assert key.extractable is False and key.sensitive is True and key.id_hex and len(key.id_hex) == 16
        assert key.key_config().label == label
        with pytest.raises(ConfigError, match="already exists"):
            K.generate_key(token.module, SLOT, token.pin, label, "rsa:2048")
        again = K.generate_key(token.module, SLOT, token.pin, label, "rsa:2048", exist_ok=True)
        assert again.public_key_pem == key.public_key_pem
        listed = {k.label: k for k in K.list_token_keys(token.module, SLOT, token.pin)}
        assert {label, R4096, R2048} <= set(listed)
        assert listed[R4096].algorithm == "rsa:4096" and listed[R4096].extractable is False
    finally:
        assert K.destroy_key(token.module, SLOT, token.pin, label) == 2  # private + public
    assert label not in {k.label for k in K.list_token_keys(token.module, SLOT, token.pin)}


def test_ec_on_opencryptoki(token: Token) -> None:
    """Measured: Debian 12's opencryptoki software token has no EC mechanisms at all, so EC keys
    cannot be made there (the EC path is tested on SoftHSM2 below). A newer token that has them
    runs the EC round trip here instead."""
    import pkcs11

    mechanisms = K._slot(pkcs11.lib(token.module), SLOT).get_mechanisms()
    assert pkcs11.Mechanism.RSA_PKCS_OAEP in mechanisms
    if pkcs11.Mechanism.ECDH1_DERIVE not in mechanisms or pkcs11.Mechanism.EC_KEY_PAIR_GEN not in mechanisms:
        with pytest.raises(ConfigError, match="cannot generate ec:secp256r1 keys"):
            K.generate_key(token.module, SLOT, token.pin, f"kas-ray-tmp-ec-{uuid.uuid4().hex[:8]}", "ec:secp256r1")
        return
    label = f"kas-ray-tmp-ec-{uuid.uuid4().hex[:8]}"
    try:
        key = K.generate_key(token.module, SLOT, token.pin, label, "ec:secp256r1")
        backend = K.Pkcs11Backend(token.config(keys=[key.key_config()]), "TEST", pin=token.pin)
        share = os.urandom(32)
        wrapped, ephemeral = wrap(key.public_key_pem, share, None)
        assert run(backend.unwrap(key.kid, wrapped, ephemeral)) == share
        run(backend.close())
    finally:
        K.destroy_key(token.module, SLOT, token.pin, label)


# --- SoftHSM2: EC through CKM_ECDH1_DERIVE -------------------------------------------------------------------
def test_ec_round_trip_via_ecdh1_derive(softhsm: Token) -> None:
    backend = softhsm.backend("ec")  # token chosen by label, no slot
    info = run(backend.key_info(None, "ec:secp256r1"))
    assert info.kid == "kas-ray-test-ec" and info.oaep_hash is None
    assert info.public_key_pem == softhsm.keys["ec"].public_key_pem
    for _ in range(5):
        share = os.urandom(32)
        wrapped, ephemeral = wrap(info.public_key_pem, share, None)
        assert run(backend.unwrap(info.kid, wrapped, ephemeral)) == share
    run(backend.close())


def test_ec_bad_input_is_an_unwrap_error(softhsm: Token) -> None:
    backend = softhsm.backend("ec")
    info = run(backend.key_info("kas-ray-test-ec"))
    share = os.urandom(32)
    wrapped, ephemeral = wrap(info.public_key_pem, share, None)
    other = P.public_key_pem(ec.generate_private_key(ec.SECP256R1()).public_key())
    p384 = P.public_key_pem(ec.generate_private_key(ec.SECP384R1()).public_key())
    for bad_wrapped, bad_ephemeral in [(wrapped[:-1] + bytes([wrapped[-1] ^ 1]), ephemeral), (wrapped, other),
                                       (wrapped, p384), (wrapped, "not a pem"), (wrapped, None)]:
        with pytest.raises(KeyUnwrapError):
            run(backend.unwrap(info.kid, bad_wrapped, bad_ephemeral))
    assert run(backend.unwrap(info.kid, wrapped, ephemeral)) == share
    run(backend.close())


def test_ec_key_is_not_extractable(softhsm: Token) -> None:
    import pkcs11
    from pkcs11 import Attribute as A

    key = softhsm.keys["ec"]
    assert key.extractable is False and key.sensitive is True
    lib = pkcs11.lib(softhsm.module)
    (slot,) = [s for s in lib.get_slots(token_present=True) if K._label(s.get_token()) == "kas-ray-ec"]
    with K._user_session(softhsm.module, slot.slot_id, softhsm.pin) as session:
        (private,) = session.get_objects({A.CLASS: pkcs11.ObjectClass.PRIVATE_KEY, A.LABEL: key.label})
        assert private[A.DERIVE] is True and private[A.SIGN] is False and private[A.NEVER_EXTRACTABLE] is True
        with pytest.raises(pkcs11.AttributeSensitive):
            private[A.VALUE]


def test_softhsm_oaep_sha256_is_refused_at_start(softhsm: Token) -> None:
    """SoftHSM2 2.6 cannot do OAEP-SHA256: the self-test says so at connect, not as 'tampered' later."""
    sha256 = softhsm.keys["r2048"].key_config().model_copy(update={"oaep_hash": "sha256"})
    backend = K.Pkcs11Backend(softhsm.config(keys=[sha256]), "TEST", pin=softhsm.pin)
    with pytest.raises(ConfigError, match="cannot do RSA-OAEP-SHA256 .*SoftHSM2"):
        run(backend.keys())
    sha1 = softhsm.backend("r2048")
    info = run(sha1.key_info(None))
    share = os.urandom(32)
    assert run(sha1.unwrap(info.kid, wrap(info.public_key_pem, share, "sha1")[0])) == share
    with pytest.raises(KeyUnwrapError):  # SoftHSM2 reports bad padding as CKR_GENERAL_ERROR
        run(sha1.unwrap(info.kid, os.urandom(256)))
    run(sha1.close())


def test_softhsm_discovers_keys_without_a_list(softhsm: Token) -> None:
    backend = K.Pkcs11Backend(softhsm.config(), "TEST", pin=softhsm.pin)
    infos = {i.kid: i for i in run(backend.keys())}
    assert infos["kas-ray-test-ec"].algorithm == "ec:secp256r1"
    assert (infos["kas-ray-test-sh2048"].algorithm, infos["kas-ray-test-sh2048"].oaep_hash) == ("rsa:2048", "sha1")
    run(backend.close())


# --- a whole KAS on the token (library level, no Ray) --------------------------------------------------------
def _kas_round_trip(backend: KeyBackend, algorithm: str, tmp_path: Path) -> list[Any]:
    from kas_ray.audit import MemoryAuditSink
    from kas_ray.client import KasClient, LocalTransport
    from kas_ray.kas.service import RewrapService
    from kas_ray.policy import PolicyEngine, attribute_fqn
    from kas_ray.trust import DevIdentityProvider, MemoryReplayStore, dev_trust_registry
    from kas_ray.ztdf import Policy, decrypt, encrypt

    url = "http://127.0.0.1:8000/usa"
    audit = MemoryAuditSink()
    service = RewrapService("USA", keys=backend, trust=dev_trust_registry(tmp_path, ["USA"]),
                            policy=PolicyEngine(CONFIG), replay=MemoryReplayStore(), audit=audit, public_urls=[url])
    transport = LocalTransport({url: service})
    try:
        kas_key = KasClient(transport, use_dpop=False).public_key(url, algorithm)  # type: ignore[arg-type]
        policy = Policy.create([attribute_fqn(CONFIG, "classification", "SECRET"),
                                attribute_fqn(CONFIG, "releasable-to", "USA")])
        data = os.urandom(3000)
        sealed = io.BytesIO()
        encrypt(io.BytesIO(data), sealed, splits=[[kas_key]], policy=policy)
        idp = DevIdentityProvider(tmp_path, "USA")
        for client_key_type in ("ec", "rsa"):
            client = KasClient(transport, idp.mint(f"pkcs11-{client_key_type}", "SECRET"),
                               client_key_type=client_key_type)
            out = io.BytesIO()
            decrypt(io.BytesIO(sealed.getvalue()), out, client)
            assert out.getvalue() == data
        low = KasClient(transport, idp.mint("pkcs11-low", "CONFIDENTIAL"))
        with pytest.raises(KasRayError):
            decrypt(io.BytesIO(sealed.getvalue()), io.BytesIO(), low)
        return [(e.action.name, e.kid) for e in audit.events if e.kid is not None] + [kas_key.kid]
    finally:
        transport.close()


@pytest.mark.parametrize("algorithm", ["rsa:2048", "rsa:4096"])
def test_kas_rewrap_service_on_opencryptoki(backend: K.Pkcs11Backend, algorithm: str, tmp_path: Path) -> None:
    events = _kas_round_trip(backend, algorithm, tmp_path)
    kid = R2048 if algorithm == "rsa:2048" else R4096
    assert events[-1] == kid
    assert [a for a, k in events[:-1] if k == kid].count("KEY_RELEASED") == 2


def test_kas_rewrap_service_ec_on_softhsm(softhsm: Token, tmp_path: Path) -> None:
    backend = softhsm.backend("ec", "r2048")
    events = _kas_round_trip(backend, "ec:secp256r1", tmp_path)
    assert events[-1] == "kas-ray-test-ec"
    run(backend.close())


# --- on the Ray cluster: the HSM actor of an extra nation talks to the token --------------------------------
def test_ray_hsm_actor_on_opencryptoki(kas_cluster: Any, token: Token, tmp_path: Path) -> None:
    import httpx
    import ray
    from ray import serve

    from kas_ray.client import HttpTransport, KasClient
    from kas_ray.policy import attribute_fqn
    from kas_ray.serve.actors import NAMESPACE, hsm_actor_name, kill_actors
    from kas_ray.serve.runner import _wait_ready, deploy, nation_settings
    from kas_ray.trust import DevIdentityProvider
    from kas_ray.ztdf import Policy, decrypt, encrypt

    pin_file = tmp_path / "pin"
    pin_file.write_text(token.pin)
    pin_file.chmod(0o600)
    key_backend = {"kind": "pkcs11", "pkcs11": token.config(R4096, R2048, sessions=2, pin_file=str(pin_file))
                   .model_dump()}
    state = tmp_path / "state"
    (settings,) = nation_settings(state, ["LIMA"], kas_cluster.base_url, key_backend=key_backend)
    url = settings.public_url
    started = time.perf_counter()
    try:
        deploy([settings], index=False)
        _wait_ready([url])
        print(f"\nLIMA (pkcs11) ready in {time.perf_counter() - started:.1f}s")
        ready = httpx.get(f"{url}/readyz", timeout=10).json()
        assert ready["checks"]["hsm"] is True and ready["checks"]["keys"] == 2
        hsm = ray.get_actor(hsm_actor_name("LIMA"), namespace=NAMESPACE)
        assert ray.get(hsm.pid.remote(), timeout=30) != os.getpid()
        transport = HttpTransport()
        policy = Policy.create([attribute_fqn(CONFIG, "classification", "SECRET"),
                                attribute_fqn(CONFIG, "releasable-to", "LIMA")])
        user = KasClient(transport, DevIdentityProvider(state, "LIMA").mint("lima-user", "SECRET"))
        for algorithm, kid in (("rsa:4096", R4096), ("rsa:2048", R2048)):
            kas_key = KasClient(transport).public_key(url, algorithm)  # type: ignore[arg-type]
            assert kas_key.kid == kid and kas_key.public_key_pem == token.keys[kid].public_key_pem
            data = os.urandom(2000)
            sealed = io.BytesIO()
            encrypt(io.BytesIO(data), sealed, splits=[[kas_key]], policy=policy)
            out = io.BytesIO()
            decrypt(io.BytesIO(sealed.getvalue()), out, user)
            assert out.getvalue() == data
    finally:
        try:
            serve.delete("lima")
        finally:
            kill_actors(["LIMA"])

"""Cloud KMS key backend against an in-process KeyManagementService (tests/kms_fake.py) on loopback.

The real ``google-cloud-kms`` clients (asyncio for the backend, blocking for ``kas-ray keys``) talk gRPC to
the fake, which holds real RSA keys, does real OAEP and real CRC32C. What is proven:

* round trips with OAEP-SHA1 (rsa:2048) and OAEP-SHA256 (rsa:4096) keys, wrapped locally with the public key;
* CRC32C on every request (the fake refuses a missing or wrong ``ciphertext_crc32c``) and on every response;
* each injected fault is retried a bounded number of times, then becomes KeyBackendUnavailable within the
  deadline (elapsed time asserted), never a hang; a fault that clears in time is absorbed by the retries;
* a disabled version's kid is not listed and an unwrap naming it is refused with KeyNotFoundError;
* rotation: PENDING_GENERATION is waited out, the old version keeps decrypting; ``kas-ray keys`` list/rotate;
* end to end on Ray Serve: a nation whose HSM actor uses Cloud KMS (the fake, over loopback) rewraps, and
  answers 503 + Retry-After (v1) or a per-KAO Unavailable (v2) within the deadline when KMS is down.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("google.cloud.kms_v1")
pytest.importorskip("google_crc32c")

from kms_fake import FakeKms, crc32c  # noqa: E402

from kas_ray.config import AbacConfig, GcpKmsConfig  # noqa: E402
from kas_ray.errors import (  # noqa: E402
    ConfigError,
    KeyBackendUnavailable,
    KeyNotFoundError,
    KeyUnwrapError,
    RewrapError,
)
from kas_ray.keys.base import KeyInfo  # noqa: E402
from kas_ray.keys.gcp_kms import GcpKmsAdmin, GcpKmsBackend, KmsLayout, sync_client  # noqa: E402
from kas_ray.policy import attribute_fqn  # noqa: E402
from kas_ray.ztdf import KasKey, Policy, verify_binding, wrap_share  # noqa: E402
from kas_ray.ztdf.keyaccess import decode_wrapped_key  # noqa: E402

PROJECT = "kas-test"
RING = "kas-ray"
LOCATION = "europe-west1"  # FRA's default
K2048 = f"projects/{PROJECT}/locations/{LOCATION}/keyRings/{RING}/cryptoKeys/kas-rsa-2048"
K4096 = f"projects/{PROJECT}/locations/{LOCATION}/keyRings/{RING}/cryptoKeys/kas-rsa-4096"
#: Budget of one KMS operation in these tests (and the bound every failure must respect).
DEADLINE = 1.5
ATTEMPTS = 3
SLACK = 1.0  # event loop, gRPC teardown and a loaded 2-core machine (the point: not 60 s)


@pytest.fixture
def fake() -> Iterator[FakeKms]:
    kms = FakeKms(pending_seconds=0.3)
    kms.start()
    kms.add_key(PROJECT, LOCATION, RING, "kas-rsa-2048", "RSA_DECRYPT_OAEP_2048_SHA1")
    kms.add_key(PROJECT, LOCATION, RING, "kas-rsa-4096", "RSA_DECRYPT_OAEP_4096_SHA256")
    try:
        yield kms
    finally:
        kms.stop()


def kms_config(fake: FakeKms, **overrides: Any) -> GcpKmsConfig:
    fields: dict[str, Any] = {"project": PROJECT, "insecure_endpoint": fake.address, "timeout_seconds": DEADLINE,
                              "max_attempts": ATTEMPTS, "key_list_ttl_seconds": 0.5}
    return GcpKmsConfig(**(fields | overrides))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def wrapped_for(info: KeyInfo, share: bytes, policy_b64: str = "cG9saWN5") -> tuple[bytes, Any]:
    """Wrap ``share`` locally with the version's public key, as a data owner does (never through KMS)."""
    kas = KasKey(url="http://127.0.0.1/fra", public_key_pem=info.public_key_pem, kid=info.kid,
                 oaep_hash=info.oaep_hash or "sha1")
    kao = wrap_share(kas, share, policy_b64)
    wrapped, _ = decode_wrapped_key(kao)
    return wrapped, kao


# --- round trips -----------------------------------------------------------------------------------------
def test_round_trip_sha1_and_sha256_keys(fake: FakeKms) -> None:
    async def scenario() -> None:
        backend = GcpKmsBackend(kms_config(fake), "fra")
        try:
            infos = await backend.keys()
            assert [(i.kid, i.algorithm, i.oaep_hash, i.status) for i in infos] == [
                ("fra-kms-kas-rsa-2048-v1", "rsa:2048", "sha1", "active"),
                ("fra-kms-kas-rsa-4096-v1", "rsa:4096", "sha256", "active"),
            ]
            assert [i.version for i in infos] == [f"{K2048}/cryptoKeyVersions/1", f"{K4096}/cryptoKeyVersions/1"]
            for algorithm in ("rsa:2048", "rsa:4096"):
                info = await backend.key_info(None, algorithm)  # type: ignore[arg-type]
                share = os.urandom(32)
                wrapped, kao = wrapped_for(info, share)
                assert await backend.unwrap(info.kid, wrapped) == share
                verify_binding(share, "cG9saWN5", kao.policy_binding)
            assert (await backend.health()).ok
        finally:
            await backend.close()

    run(scenario())
    # Every decrypt named a full version and carried the right checksum (the fake checked it too).
    assert [name.rsplit("/", 2)[-2:] for name, _ in fake.decrypt_requests] == [
        ["cryptoKeyVersions", "1"], ["cryptoKeyVersions", "1"]]
    assert all(crc is not None for _, crc in fake.decrypt_requests)
    assert fake.calls["GetPublicKey"] == 2  # public keys are cached per version


def test_concurrent_first_calls_share_one_client(fake: FakeKms, monkeypatch: pytest.MonkeyPatch) -> None:
    """The HSM actor's first burst: one lazily made client, every unwrap answered."""
    import kas_ray.keys.gcp_kms as gcp_kms

    made: list[Any] = []
    real = gcp_kms.async_client

    async def counting(config: GcpKmsConfig) -> Any:
        await asyncio.sleep(0.05)  # let the other calls arrive while the client is being made
        made.append(await real(config))
        return made[-1]

    monkeypatch.setattr(gcp_kms, "async_client", counting)

    async def scenario() -> None:
        backend = GcpKmsBackend(kms_config(fake), "FRA")
        assert backend._client is None  # nothing made before the first call, inside the loop
        lists = await asyncio.gather(*(backend.keys() for _ in range(5)))
        infos = lists[0]
        assert all(listed == infos for listed in lists)
        assert fake.calls["ListCryptoKeyVersions"] == 2  # single flight: one listing per key
        jobs = []
        for index in range(8):
            share = os.urandom(32)
            wrapped, _ = wrapped_for(infos[index % 2], share)
            jobs.append((share, backend.unwrap(infos[index % 2].kid, wrapped)))
        results = await asyncio.gather(*(job for _, job in jobs))
        assert results == [share for share, _ in jobs]
        await backend.close()

    run(scenario())
    assert len(made) == 1


def test_sync_client_against_the_fake_and_request_crc_is_enforced(fake: FakeKms) -> None:
    """The blocking client: pem_crc32c matches, and AsymmetricDecrypt without/with a wrong CRC is refused."""
    from google.api_core import exceptions

    client = sync_client(kms_config(fake))
    name = f"{K2048}/cryptoKeyVersions/1"
    try:
        key = client.get_public_key(request={"name": name}, retry=None, timeout=2)
        assert key.pem_crc32c == crc32c(key.pem.encode()) and key.name == name
        info = KeyInfo(kid="x", algorithm="rsa:2048", oaep_hash="sha1", public_key_pem=key.pem)
        share = os.urandom(32)
        wrapped, _ = wrapped_for(info, share)
        with pytest.raises(exceptions.InvalidArgument, match="ciphertext_crc32c is required"):
            client.asymmetric_decrypt(request={"name": name, "ciphertext": wrapped}, retry=None, timeout=2)
        with pytest.raises(exceptions.InvalidArgument, match="checksum"):
            client.asymmetric_decrypt(request={"name": name, "ciphertext": wrapped,
                                               "ciphertext_crc32c": crc32c(wrapped) ^ 1}, retry=None, timeout=2)
        answer = client.asymmetric_decrypt(request={"name": name, "ciphertext": wrapped,
                                                    "ciphertext_crc32c": crc32c(wrapped)}, retry=None, timeout=2)
        assert answer.plaintext == share and answer.verified_ciphertext_crc32c
        assert answer.plaintext_crc32c == crc32c(share)
    finally:
        client.transport.close()


def test_refusals_are_clean(fake: FakeKms) -> None:
    async def scenario() -> None:
        backend = GcpKmsBackend(kms_config(fake), "FRA")
        info = await backend.key_info(None, "rsa:2048")
        with pytest.raises(KeyUnwrapError):  # a ciphertext the key cannot decrypt: INVALID_ARGUMENT
            await backend.unwrap(info.kid, os.urandom(256))
        with pytest.raises(KeyUnwrapError, match="ec-wrapped"):
            await backend.unwrap(info.kid, os.urandom(64), "-----BEGIN PUBLIC KEY-----")
        for kid in ("fra-kms-kas-rsa-2048-v9", "usa-kms-kas-rsa-2048-v1", "fra-r2048-v1"):
            with pytest.raises(KeyNotFoundError):
                await backend.unwrap(kid, os.urandom(256))
        with pytest.raises(KeyNotFoundError):
            await backend.key_info(None, "ec:secp256r1")  # Cloud KMS keys here are RSA only
        await backend.close()

    run(scenario())


# --- faults: bounded retries, then 503 within the deadline ----------------------------------------------------
FAULTS = {
    # name: (kind, times, extra, expect success)
    "unavailable-persistent": ("unavailable", None, {}, False),
    "unavailable-twice": ("unavailable", 2, {}, True),
    "deadline-persistent": ("deadline", None, {"delay": 5.0}, False),
    "deadline-once": ("deadline", 1, {"delay": 5.0}, True),
    "bad-plaintext-crc-persistent": ("bad_crc", None, {"crc": "plaintext"}, False),
    "unverified-request-crc-persistent": ("bad_crc", None, {"crc": "unverified"}, False),
    "bad-crc-once": ("bad_crc", 1, {}, True),
}


@pytest.mark.parametrize("case", list(FAULTS))
def test_decrypt_fault_is_retried_then_unavailable_within_deadline(fake: FakeKms, case: str) -> None:
    kind, times, extra, succeeds = FAULTS[case]

    async def scenario() -> tuple[float, bytes | Exception]:
        backend = GcpKmsBackend(kms_config(fake), "FRA")
        try:
            info = await backend.key_info(None, "rsa:2048")
            share = os.urandom(32)
            wrapped, _ = wrapped_for(info, share)
            fake.inject(kind, times, ("AsymmetricDecrypt",), **extra)
            before = fake.calls["AsymmetricDecrypt"]
            started = time.monotonic()
            try:
                outcome: bytes | Exception = await backend.unwrap(info.kid, wrapped)
                assert outcome == share
            except KeyBackendUnavailable as exc:
                outcome = exc
            elapsed = time.monotonic() - started
            attempts = fake.calls["AsymmetricDecrypt"] - before
            assert 1 <= attempts <= ATTEMPTS
            if not succeeds:
                assert attempts == ATTEMPTS or kind == "deadline", attempts
            return elapsed, outcome
        finally:
            fake.clear_faults()
            await backend.close()

    elapsed, outcome = run(scenario())
    assert elapsed < DEADLINE + SLACK, f"{case}: {elapsed:.2f}s"
    if succeeds:
        assert isinstance(outcome, bytes)
    else:
        assert isinstance(outcome, KeyBackendUnavailable), outcome
        assert outcome.http_status == 503 and "Cloud KMS" in outcome.message


@pytest.mark.parametrize("kind", ["unavailable", "deadline", "bad_crc"])
def test_listing_faults_are_unavailable_within_deadline_and_health_recovers(fake: FakeKms, kind: str) -> None:
    """keys() (ListCryptoKeyVersions / GetPublicKey) with no previous list: 503; health says not ready."""
    methods = ("GetPublicKey",) if kind == "bad_crc" else ("ListCryptoKeyVersions",)

    async def scenario() -> None:
        backend = GcpKmsBackend(kms_config(fake), "FRA")
        fake.inject(kind, None, methods, delay=5.0)
        started = time.monotonic()
        with pytest.raises(KeyBackendUnavailable):
            await backend.keys()
        assert time.monotonic() - started < DEADLINE + SLACK
        started = time.monotonic()
        health = await backend.health()
        assert not health.ok and "Cloud KMS" in health.detail
        assert time.monotonic() - started < DEADLINE + SLACK
        fake.clear_faults()
        await asyncio.sleep(0.6)  # past the failed-listing backoff (min(TTL, 5 s))
        health = await backend.health()
        assert health.ok and health.keys == 2, health
        await backend.close()

    run(scenario())


def test_kms_down_after_listing_keeps_public_keys_and_fails_unwraps_fast(fake: FakeKms) -> None:
    async def scenario() -> None:
        backend = GcpKmsBackend(kms_config(fake), "FRA")
        infos = await backend.keys()
        info = infos[0]
        wrapped, _ = wrapped_for(info, os.urandom(32))
        fake.inject("unavailable", None)
        await asyncio.sleep(0.6)  # the list is stale now
        assert [i.kid for i in await backend.keys()] == [i.kid for i in infos]  # served from the last good list
        started = time.monotonic()
        with pytest.raises(KeyBackendUnavailable):
            await backend.unwrap(info.kid, wrapped)
        assert time.monotonic() - started < DEADLINE + SLACK
        assert not (await backend.health()).ok
        fake.clear_faults()
        await backend.close()

    run(scenario())


# --- disabled versions ---------------------------------------------------------------------------------------
def test_disabled_version_is_not_listed_and_refused(fake: FakeKms) -> None:
    admin = GcpKmsAdmin(kms_config(fake), "FRA")
    new = admin.rotate("rsa:2048", wait_seconds=30)
    assert new.kid == "fra-kms-kas-rsa-2048-v2"

    async def scenario() -> None:
        backend = GcpKmsBackend(kms_config(fake), "FRA")
        listed = {i.kid: i for i in await backend.keys()}
        assert listed["fra-kms-kas-rsa-2048-v2"].status == "active"
        assert listed["fra-kms-kas-rsa-2048-v1"].status == "retired"
        wrapped, _ = wrapped_for(listed["fra-kms-kas-rsa-2048-v2"], os.urandom(32))
        # Disabled after the backend listed it: KMS says FAILED_PRECONDITION → a clean KeyNotFoundError.
        fake.set_state(new.version, "DISABLED")
        with pytest.raises(KeyNotFoundError, match="not enabled"):
            await backend.unwrap(new.kid, wrapped)
        # ... and from the next listing on the kid is gone; v1 is active again.
        infos = await backend.keys()
        assert [(i.kid, i.status) for i in infos if "2048" in i.kid] == [("fra-kms-kas-rsa-2048-v1", "active")]
        with pytest.raises(KeyNotFoundError):
            await backend.key_info(new.kid)
        with pytest.raises(KeyNotFoundError, match="unknown kid"):
            await backend.unwrap(new.kid, wrapped)
        await backend.close()

    run(scenario())
    states = {row.kid: row.state for row in admin.versions()}
    assert states["fra-kms-kas-rsa-2048-v2"] == "DISABLED" and states["fra-kms-kas-rsa-2048-v1"] == "ENABLED"
    admin.close()


# --- rotation --------------------------------------------------------------------------------------------------
def test_rotation_old_and_new_versions_both_decrypt(fake: FakeKms) -> None:
    async def before() -> tuple[GcpKmsBackend, KeyInfo, bytes, bytes]:
        backend = GcpKmsBackend(kms_config(fake, key_list_ttl_seconds=3600), "FRA")
        info = await backend.key_info(None, "rsa:2048")
        share = os.urandom(32)
        wrapped, _ = wrapped_for(info, share)
        return backend, info, share, wrapped

    async def after(backend: GcpKmsBackend, old: KeyInfo, old_share: bytes, old_wrapped: bytes,
                    rotated: KeyInfo) -> None:
        # The backend listed before the rotation (TTL 1 h): an unwrap naming the new kid lists again.
        share = os.urandom(32)
        wrapped, _ = wrapped_for(rotated, share)
        assert await backend.unwrap(rotated.kid, wrapped) == share
        assert await backend.unwrap(old.kid, old_wrapped) == old_share
        assert (await backend.key_info(None, "rsa:2048")).kid == rotated.kid
        assert (await backend.key_info(old.kid)).status == "retired"
        await backend.close()

    backend, old, old_share, old_wrapped = asyncio.run(before())
    admin = GcpKmsAdmin(kms_config(fake), "FRA")
    started = time.monotonic()
    rotated = admin.rotate("rsa:2048", wait_seconds=30)
    assert time.monotonic() - started >= fake.pending_seconds  # PENDING_GENERATION was waited out
    assert rotated.kid == "fra-kms-kas-rsa-2048-v2" and rotated.version == f"{K2048}/cryptoKeyVersions/2"
    assert rotated.public_key_pem != old.public_key_pem
    admin.close()
    # A fresh loop: the backend makes a new client bound to it.
    asyncio.run(after(backend, old, old_share, old_wrapped, rotated))


def test_rotation_that_stays_pending_is_reported(fake: FakeKms) -> None:
    slow = FakeKms(pending_seconds=30)
    slow.start()
    try:
        slow.add_key(PROJECT, LOCATION, RING, "kas-rsa-2048", "RSA_DECRYPT_OAEP_2048_SHA1")
        admin = GcpKmsAdmin(kms_config(slow), "FRA")
        started = time.monotonic()
        with pytest.raises(KeyBackendUnavailable, match="PENDING_GENERATION"):
            admin.rotate("rsa:2048", wait_seconds=1.0, poll_seconds=0.2)
        assert time.monotonic() - started < 1.0 + DEADLINE + SLACK
        with pytest.raises(ConfigError, match="no Cloud KMS key configured for rsa:3072"):
            admin.rotate("rsa:3072")
        admin.close()
    finally:
        slow.stop()


# --- kas-ray keys -----------------------------------------------------------------------------------------------
def _backend_file(tmp_path: Path, fake: FakeKms) -> Path:
    import yaml

    path = tmp_path / "kms.yaml"
    path.write_text(yaml.safe_dump({"kind": "gcp-kms", "gcp": kms_config(fake).model_dump(exclude_none=True)}))
    return path


def test_cli_keys_list_and_rotate_against_kms(fake: FakeKms, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from kas_ray.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = str(_backend_file(tmp_path, fake))
    assert main(["keys", "list", "--nation", "fra", "--backend-config", config, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(k["kid"], k["state"]) for k in listed["keys"]] == [
        ("fra-kms-kas-rsa-2048-v1", "ENABLED"), ("fra-kms-kas-rsa-4096-v1", "ENABLED")]
    assert main(["keys", "rotate", "--nation", "fra", "--backend-config", config, "--algorithm", "rsa:2048"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "fra-kms-kas-rsa-2048-v2"
    assert "older versions stay ENABLED" in out.err and "caches pick the new key up as they expire" in out.err
    assert main(["keys", "list", "--nation", "fra", "--backend-config", config]) == 0
    text = capsys.readouterr().out
    assert "fra-kms-kas-rsa-2048-v2" in text and f"{K2048}/cryptoKeyVersions/2" in text
    assert text.index("fra-kms-kas-rsa-2048-v2") < text.index("fra-kms-kas-rsa-2048-v1")  # newest first
    # Cloud KMS down: a one-line error and a non-zero exit, within the deadline.
    fake.inject("unavailable", None)
    started = time.monotonic()
    assert main(["keys", "list", "--nation", "fra", "--backend-config", config]) == 1
    assert time.monotonic() - started < 2 * (DEADLINE + SLACK)
    assert "key_backend_unavailable" in capsys.readouterr().err
    assert main(["keys", "rotate", "--nation", "fra", "--backend-config", config, "--algorithm", "ec"]) == 2


def test_cli_keys_software_keystore(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from kas_ray.cli import main
    from kas_ray.keys.software import SoftwareKeystore

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("KAS_RAY_KEY_PASSPHRASE", "test-passphrase")
    state = tmp_path / "state"
    assert main(["keys", "list", "--nation", "fra", "--state-dir", str(state)]) == 2  # no keystore yet
    assert "no software keystore" in capsys.readouterr().err
    SoftwareKeystore(state, "FRA")
    assert main(["keys", "rotate", "--nation", "fra", "--state-dir", str(state), "--algorithm", "ec"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "fra-ec256-v2" and "only sees new software keys after it restarts" in out.err
    assert main(["keys", "list", "--nation", "fra", "--state-dir", str(state), "--json"]) == 0
    keys = {k["kid"]: k["state"] for k in json.loads(capsys.readouterr().out)["keys"]}
    assert keys["fra-ec256-v2"] == "active" and keys["fra-ec256-v1"] == "retired"


# --- configuration and the optional dependency ------------------------------------------------------------------
def test_layout_kids_and_config_checks() -> None:
    layout = KmsLayout.from_config(GcpKmsConfig(project="p"), "gbr")
    assert layout.location == "europe-west2"
    name = "projects/p/locations/europe-west2/keyRings/kas-ray/cryptoKeys/kas-rsa-4096/cryptoKeyVersions/12"
    assert layout.kid(name) == "gbr-kms-kas-rsa-4096-v12"
    assert layout.version_name("gbr-kms-kas-rsa-4096-v12") == name
    for foreign in ("fra-kms-kas-rsa-4096-v1", "gbr-kms-other-key-v1", "gbr-kms-kas-rsa-4096-v0", "gbr-r2048-v1"):
        assert layout.version_name(foreign) is None
    with pytest.raises(ValueError):
        layout.kid(name.replace("kas-ray", "other-ring"))
    assert KmsLayout.from_config(GcpKmsConfig(project="p"), "USA").location == "us-central1"
    assert KmsLayout.from_config(GcpKmsConfig(project="p"), "FRA").location == "europe-west1"
    with pytest.raises(ConfigError, match="location"):
        KmsLayout.from_config(GcpKmsConfig(project="p"), "KILO")
    with pytest.raises(ConfigError, match="RSA"):
        KmsLayout.from_config(GcpKmsConfig(project="p", keys={"ec:secp256r1": "k"}), "FRA")
    with pytest.raises(ValueError, match="loopback"):
        GcpKmsConfig(project="p", insecure_endpoint="kms.example.com:443")


def test_build_backend_selects_gcp_kms(fake: FakeKms) -> None:
    from kas_ray.serve.actors import build_backend

    spec = {"kind": "gcp-kms", "gcp": kms_config(fake).model_dump(), "state_dir": "/nonexistent", "profile": "prod"}
    backend = build_backend(spec, "FRA")
    assert isinstance(backend, GcpKmsBackend) and backend._client is None  # no network until first use


def test_missing_gcp_extra_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "google_crc32c", None)
    with pytest.raises(ImportError, match=r"pip install 'kas-ray\[gcp\]'"):
        GcpKmsBackend(GcpKmsConfig(project="p"), "FRA")


# --- end to end on Ray Serve --------------------------------------------------------------------------------------
KILO_GCP = {"project": "kilo-proj", "location": "europe-north1", "key_ring": RING,
            "keys": {"rsa:2048": "kas-rsa-2048"}, "timeout_seconds": 2.0, "max_attempts": 3,
            "key_list_ttl_seconds": 1.0}


def _kilo_policy() -> Policy:
    config = AbacConfig()
    return Policy.create([attribute_fqn(config, "classification", "SECRET"),
                          attribute_fqn(config, "releasable-to", "KILO")])


def _seal(key: KasKey, data: bytes) -> bytes:
    from kas_ray.ztdf import encrypt

    out = io.BytesIO()
    encrypt(io.BytesIO(data), out, splits=[[key]], policy=_kilo_policy())
    return out.getvalue()


def _open(tdf: bytes, client: Any) -> bytes:
    from kas_ray.ztdf import decrypt

    out = io.BytesIO()
    decrypt(io.BytesIO(tdf), out, client)
    return out.getvalue()


def test_ray_nation_on_cloud_kms_rewraps_and_answers_503_when_kms_is_down(kas_cluster: Any, tmp_path: Path) -> None:
    import httpx
    import ray
    import yaml
    from cryptography.hazmat.primitives.asymmetric import ec
    from ray import serve

    from kas_ray.cli import main
    from kas_ray.client import HttpTransport, KasClient
    from kas_ray.hazmat import primitives as P
    from kas_ray.serve.actors import NAMESPACE, cache_actor_name, hsm_actor_name, kill_actors, public_keys_cache_key
    from kas_ray.serve.runner import _wait_ready, deploy, nation_settings
    from kas_ray.trust import DevIdentityProvider, make_dpop_proof, sign_request
    from kas_ray.ztdf import read_manifest

    kms = FakeKms(pending_seconds=0.3)
    kms.start()  # in this process, on 127.0.0.1: the HSM actor (another process) connects over loopback
    kms.add_key("kilo-proj", "europe-north1", RING, "kas-rsa-2048", "RSA_DECRYPT_OAEP_2048_SHA1")
    gcp = {**KILO_GCP, "insecure_endpoint": kms.address}
    state = tmp_path / "kilo-state"
    (settings,) = nation_settings(state, ["KILO"], kas_cluster.base_url,
                                  per_nation={"KILO": {"key_backend": {"kind": "gcp-kms", "gcp": gcp}}})
    url = settings.public_url
    try:
        started = time.perf_counter()
        deploy([settings], index=False)
        _wait_ready([url])
        print(f"\nKILO on Cloud KMS (fake) ready in {time.perf_counter() - started:.1f}s")
        ready = httpx.get(f"{url}/readyz", timeout=10).json()
        assert ready["status"] == "ready" and ready["checks"]["keys"] == 1

        # Encrypt with the published public key (wrapped locally), rewrap over HTTP, decrypt.
        key = KasClient(HttpTransport()).public_key(url, "rsa:2048")
        assert key.kid == "kilo-kms-kas-rsa-2048-v1"
        token = DevIdentityProvider(state, "KILO").mint("kilo-user", "SECRET")
        tdf = _seal(key, b"kept in Cloud KMS")
        assert _open(tdf, KasClient(HttpTransport(), token)) == b"kept in Cloud KMS"
        assert kms.calls["AsymmetricDecrypt"] == 1
        assert all(crc is not None for _, crc in kms.decrypt_requests)

        # Rotation while serving: `kas-ray keys rotate` drops the nation's cached public keys.
        config = tmp_path / "kilo-kms.yaml"
        config.write_text(yaml.safe_dump({"kind": "gcp-kms", "gcp": gcp}))
        cache = ray.get_actor(cache_actor_name("KILO"), namespace=NAMESPACE)
        assert ray.get(cache.get.remote(public_keys_cache_key("KILO"))) is not None
        assert main(["keys", "rotate", "--nation", "kilo", "--backend-config", str(config), "--address", "auto",
                     "--no-wait"]) == 0
        assert ray.get(cache.get.remote(public_keys_cache_key("KILO"))) is None
        hsm = ray.get_actor(hsm_actor_name("KILO"), namespace=NAMESPACE)
        deadline = time.monotonic() + 10
        while True:  # the HSM actor lists versions again once its TTL (1 s) has passed
            kids = [(i.kid, i.status) for i in ray.get(hsm.keys.remote(), timeout=10)]
            if kids[0][0] == "kilo-kms-kas-rsa-2048-v2" or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert kids == [("kilo-kms-kas-rsa-2048-v2", "active"), ("kilo-kms-kas-rsa-2048-v1", "retired")]
        assert _open(_seal(key, b"old version still decrypts"), KasClient(HttpTransport(), token)) == \
            b"old version still decrypts"

        # Cloud KMS down: v1 answers 503 + Retry-After, v2 a per-KAO Unavailable, both within the deadline.
        kms.inject("unavailable", None, ("AsymmetricDecrypt",))
        failing = _seal(key, b"fresh share: no cache hit")
        manifest = read_manifest(io.BytesIO(failing))
        kao, policy_b64 = manifest.encryption_information.key_access[0], manifest.encryption_information.policy
        dpop_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        body = {"clientPublicKey": P.public_key_pem(client_key.public_key()), "keyAccess": kao.to_wire(),
                "policy": policy_b64, "algorithm": "rsa:2048"}
        rewrap_url = f"{url}/kas/v2/rewrap"
        before = kms.calls["AsymmetricDecrypt"]
        started = time.monotonic()
        reply = httpx.post(rewrap_url, json={"signedRequestToken": sign_request(body, dpop_key)}, timeout=30,
                           headers={"Authorization": f"Bearer {token}",
                                    "DPoP": make_dpop_proof(dpop_key, "POST", rewrap_url, access_token=token)})
        elapsed = time.monotonic() - started
        assert reply.status_code == 503, reply.text
        assert reply.headers.get("retry-after") and reply.json()["code"] == "unavailable"
        assert "entityWrappedKey" not in reply.text and "kasWrappedKey" not in reply.text
        assert elapsed < KILO_GCP["timeout_seconds"] + 3.0, elapsed  # well under hsm_timeout_seconds (10 s)
        assert kms.calls["AsymmetricDecrypt"] - before == KILO_GCP["max_attempts"]

        started = time.monotonic()
        with pytest.raises(RewrapError, match="Unavailable"):
            _open(failing, KasClient(HttpTransport(), token))
        assert time.monotonic() - started < KILO_GCP["timeout_seconds"] + 3.0

        kms.clear_faults()
        assert _open(failing, KasClient(HttpTransport(), token)) == b"fresh share: no cache hit"
        assert base64.b64decode(kao.wrapped_key)  # the KAO was never altered
    finally:
        kms.clear_faults()
        try:
            serve.delete("kilo")
        finally:
            kill_actors(["KILO"])
            kms.stop()

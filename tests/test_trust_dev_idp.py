"""Dev identity providers: persistent per-nation keys, tokens that verify, prod refusal."""

from __future__ import annotations

import json
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from kas_ray.config import DPoPConfig, TrustRegistry
from kas_ray.errors import ConfigError, TokenError
from kas_ray.trust import (
    DevIdentityProvider,
    MemoryReplayStore,
    TokenVerifier,
    dev_issuer,
    dev_issuer_configs,
    dev_trust_registry,
    jwk_thumbprint,
    make_dpop_proof,
    sign_request,
    verify_dpop,
    verify_signed_request,
)
from kas_ray.trust.jwks import public_jwk

#: Built from two parts so that no tracked file holds a literal private-key block marker.
PEM_PRIVATE_HEADER = b"-----BEGIN " + b"PRIVATE KEY-----"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_dev_issuer_format():
    assert dev_issuer("usa") == "https://idp.usa.dev.kas-ray.local"
    assert dev_issuer(" GBR ") == "https://idp.gbr.dev.kas-ray.local"


@pytest.mark.parametrize("nation", ["../etc", "U", "US A", "", "FRANCE-2"])
def test_nation_codes_are_checked(tmp_path, nation):
    with pytest.raises(ConfigError, match="nation"):
        DevIdentityProvider(tmp_path, nation)
    assert not list(tmp_path.rglob("*.pem"))


def test_key_files_modes_and_persistence(tmp_path):
    first = DevIdentityProvider(tmp_path, "usa")
    assert first.key_path == tmp_path / "idp" / "USA.key.pem"
    assert mode(first.key_path) == 0o600
    assert mode(tmp_path / "idp") == 0o700
    assert mode(first.jwks_path) == 0o644
    assert first.key_path.read_bytes().startswith(PEM_PRIVATE_HEADER)  # PKCS#8
    pem = first.key_path.read_bytes()

    again = DevIdentityProvider(tmp_path, "USA")
    assert again.kid == first.kid
    assert again.key_path.read_bytes() == pem
    assert DevIdentityProvider(tmp_path, "FRA").kid != first.kid


def test_published_jwks_is_public_and_keyed_by_thumbprint(tmp_path):
    idp = DevIdentityProvider(tmp_path, "GBR")
    published = json.loads(idp.jwks_path.read_text())
    assert published == idp.jwks()
    (jwk,) = published["keys"]
    assert "d" not in jwk
    assert (jwk["kid"], jwk["alg"], jwk["use"], jwk["crv"]) == (jwk_thumbprint(jwk), "ES256", "sig", "P-256")


def test_concurrent_first_use_ends_with_one_key(tmp_path):
    kids: list[str] = []
    barrier = threading.Barrier(6)

    def create() -> None:
        barrier.wait()
        kids.append(DevIdentityProvider(tmp_path, "USA").kid)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(kids) == 6 and len(set(kids)) == 1
    assert sorted(p.name for p in (tmp_path / "idp").iterdir()) == ["USA.jwks.json", "USA.key.pem"]


def test_loose_key_permissions_are_tightened(tmp_path):
    idp = DevIdentityProvider(tmp_path, "USA")
    idp.key_path.chmod(0o644)
    assert DevIdentityProvider(tmp_path, "USA").kid == idp.kid
    assert mode(idp.key_path) == 0o600


def test_corrupt_or_foreign_key_refused(tmp_path):
    idp = DevIdentityProvider(tmp_path, "USA")
    idp.key_path.write_bytes(PEM_PRIVATE_HEADER + b"\nnope\n-----END " + b"PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        DevIdentityProvider(tmp_path, "USA")


@pytest.fixture
def registry(tmp_path) -> TrustRegistry:
    return dev_trust_registry(tmp_path, ["USA", "fra", "USA"])


def test_minted_token_verifies_through_dev_registry(tmp_path, registry):
    assert [issuer.issuer for issuer in registry.issuers] == [dev_issuer("USA"), dev_issuer("FRA")]
    assert all(issuer.dev and issuer.algorithms == ["ES256"] for issuer in registry.issuers)
    token = DevIdentityProvider(tmp_path, "USA").mint("alice", "SECRET", coi=["NATO", "FVEY"])
    verified = TokenVerifier(registry).verify(token)
    assert (verified.issuer, verified.subject, verified.audience) == (dev_issuer("USA"), "alice", "kas-ray")
    assert (verified.clearance, verified.nationality, verified.coi) == ("SECRET", "USA", ["NATO", "FVEY"])
    assert (verified.issuer_nations, verified.clearance_system) == (["USA"], "USA")


def test_nation_claims_are_carried_not_judged(tmp_path, registry):
    # A FRA IdP asserting USA nationality still verifies: ABAC compares it with issuer_nations.
    token = DevIdentityProvider(tmp_path, "FRA").mint("bob", "SECRET_DEFENSE", nationality="usa")
    verified = TokenVerifier(registry).verify(token)
    assert (verified.nationality, verified.issuer_nations, verified.clearance_system) == (
        "USA",
        ["FRA"],
        "FRA",
    )


def test_mint_options(tmp_path, registry):
    idp = DevIdentityProvider(tmp_path, "USA")
    verifier = TokenVerifier(registry)
    token = idp.mint("carol", None, audience="other-kas", extra_claims={"iss": "https://evil", "team": "red"})
    with pytest.raises(TokenError, match="audience"):
        verifier.verify(token)
    verified = verifier.verify(idp.mint("carol", None, extra_claims={"iss": "https://evil", "team": "red"}))
    assert (verified.issuer, verified.claims["team"], verified.clearance) == (dev_issuer("USA"), "red", None)
    with pytest.raises(TokenError, match="expired"):
        verifier.verify(idp.mint("carol", "SECRET", ttl=-60))


def test_token_of_another_deployment_does_not_verify(tmp_path, registry):
    stranger = DevIdentityProvider(tmp_path / "elsewhere", "USA")  # same issuer name, different key
    with pytest.raises(TokenError, match="unknown kid"):
        TokenVerifier(registry).verify(stranger.mint("mallory", "TOP_SECRET"))


def test_prod_profile_refused(tmp_path):
    with pytest.raises(ConfigError, match="refused under the 'prod' profile"):
        dev_trust_registry(tmp_path, ["USA"], profile="prod")
    assert not (tmp_path / "idp").exists()  # refused before any key was created
    with pytest.raises(ValidationError, match="refused under the prod profile"):
        TrustRegistry(profile="prod", issuers=dev_issuer_configs(tmp_path, ["USA"]))


def test_registry_settings_pass_through(tmp_path):
    assert dev_trust_registry(tmp_path, ["USA"], leeway_seconds=5).leeway_seconds == 5
    with pytest.raises(ConfigError, match="leeway_seconds"):
        dev_trust_registry(tmp_path, ["USA"], leeway_seconds=-1)


def test_dpop_bound_token_end_to_end(tmp_path, registry):
    """Client key -> cnf.jkt in the token -> DPoP proof -> SRT signed with the same key."""
    client = ec.generate_private_key(ec.SECP256R1())
    jkt = jwk_thumbprint(public_jwk(client))
    url = "https://kas.usa.example/kas/v2/rewrap"
    token = DevIdentityProvider(tmp_path, "USA").mint("dave", "SECRET", cnf_jkt=jkt)
    verified = TokenVerifier(registry).verify(token)
    assert verified.cnf_jkt == jkt

    proof = verify_dpop(
        make_dpop_proof(client, "POST", url, token),
        method="POST",
        url=url,
        access_token=token,
        config=DPoPConfig(),
        replay=MemoryReplayStore(),
        expected_jkt=verified.cnf_jkt,
    )
    body = {"clientPublicKey": "PEM", "requests": []}
    assert verify_signed_request(sign_request(body, client), dpop_jwk=proof.jwk, max_age_seconds=60) == body

    intruder = ec.generate_private_key(ec.SECP256R1())  # a thief with the token but not the key
    with pytest.raises(TokenError, match="cnf.jkt"):
        verify_dpop(
            make_dpop_proof(intruder, "POST", url, token),
            method="POST",
            url=url,
            access_token=token,
            config=DPoPConfig(),
            replay=MemoryReplayStore(),
            expected_jkt=verified.cnf_jkt,
        )

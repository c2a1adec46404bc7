"""The nation KAS on a real Ray Serve cluster: an encrypt → rewrap over HTTP → decrypt round trip."""

from __future__ import annotations

import io

import httpx

from kas_ray.client import HandleTransport, HttpTransport, KasClient
from kas_ray.config import AbacConfig
from kas_ray.policy import attribute_fqn
from kas_ray.trust import DevIdentityProvider
from kas_ray.ztdf import Policy, decrypt, encrypt


def _policy(*nations: str) -> Policy:
    config = AbacConfig()
    attrs = [attribute_fqn(config, "classification", "SECRET")]
    attrs += [attribute_fqn(config, "releasable-to", n) for n in nations]
    return Policy.create(attrs)


def test_round_trip_over_http_and_handles(kas_cluster):
    keys = [KasClient(HttpTransport()).public_key(kas_cluster.url(n)) for n in ("USA", "FRA")]
    tdf = io.BytesIO()
    encrypt(io.BytesIO(b"coalition secret"), tdf, splits=[[k] for k in keys], policy=_policy("USA", "FRA"))
    token = DevIdentityProvider(kas_cluster.state_dir, "FRA").mint("bob", "SECRET_DEFENSE")
    for transport in (HttpTransport(), HandleTransport()):
        out = io.BytesIO()
        decrypt(io.BytesIO(tdf.getvalue()), out, KasClient(transport, token))
        assert out.getvalue() == b"coalition secret"
    ready = httpx.get(f"{kas_cluster.url('GBR')}/readyz").json()
    assert ready["status"] == "ready" and ready["checks"]["keys"] == 3


def test_connect_proto_and_gzip(kas_cluster):
    import gzip

    from kas_ray.kas import proto

    url = f"{kas_cluster.url('USA')}/kas.AccessService/PublicKey"
    body = gzip.compress(proto.encode_public_key_request(algorithm="ec:secp256r1"))
    reply = httpx.post(url, content=body, headers={"Content-Type": "application/proto", "Content-Encoding": "gzip",
                                                   "Connect-Protocol-Version": "1"})
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/proto"
    key = proto.decode_public_key_response(reply.content)
    assert key.kid.startswith("usa-ec256") and "BEGIN PUBLIC KEY" in key.public_key
    bad = httpx.post(url, content=b"\xff\xff\xff", headers={"Content-Type": "application/proto"})
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_argument"


def test_shared_cache_counts_hits(kas_cluster):
    key = KasClient(HttpTransport()).public_key(kas_cluster.url("GBR"), "rsa:4096")
    tdf = io.BytesIO()
    encrypt(io.BytesIO(b"cached"), tdf, splits=[[key]], policy=_policy("GBR"))
    token = DevIdentityProvider(kas_cluster.state_dir, "GBR").mint("carol", "SECRET")
    before = httpx.get(f"{kas_cluster.url('GBR')}/stats").json()
    for _ in range(3):
        decrypt(io.BytesIO(tdf.getvalue()), io.BytesIO(), KasClient(HttpTransport(), token))
    after = httpx.get(f"{kas_cluster.url('GBR')}/stats").json()
    replica_hits = after["replica_cache"]["hits"] - before["replica_cache"]["hits"]
    assert replica_hits == 2  # first rewrap unwraps through the HSM actor, the next two hit
    assert after["shared_cache"]["entries"] >= 1


def test_hsm_actor_remembers_shares_and_unwraps_each_once(kas_cluster):
    """The nation's shared share tier lives in the HSM actor: one private-key operation per wrapped key,
    however many replicas ask at once; failures and unknown keys are never answered from memory."""
    import os

    import pytest
    import ray

    from kas_ray.errors import KeyNotFoundError, KeyUnwrapError
    from kas_ray.serve.actors import NAMESPACE, hsm_actor_name
    from kas_ray.ztdf.keyaccess import KasKey, decode_wrapped_key, wrap_share

    hsm = ray.get_actor(hsm_actor_name("GBR"), namespace=NAMESPACE)
    info = next(i for i in ray.get(hsm.keys.remote(), timeout=30) if i.algorithm == "rsa:2048")
    share = os.urandom(32)
    kas_key = KasKey(url=kas_cluster.url("GBR"), public_key_pem=info.public_key_pem, kid=info.kid,
                     algorithm=info.algorithm, oaep_hash=info.oaep_hash or "sha1")
    wrapped, _ = decode_wrapped_key(wrap_share(kas_key, share, "eyJ9"))
    before = ray.get(hsm.share_stats.remote(), timeout=30)
    answers = ray.get([hsm.unwrap_share.remote(info.kid, wrapped, None) for _ in range(6)], timeout=60)
    assert [s for s, _ in answers] == [share] * 6
    assert sum(not remembered for _, remembered in answers) == 1  # one private-key operation for six asks
    assert ray.get(hsm.unwrap_share.remote(info.kid, wrapped, None), timeout=30) == (share, True)
    after = ray.get(hsm.share_stats.remote(), timeout=30)
    assert after.hits > before.hits and after.entries >= before.entries + 1

    tampered = bytes([wrapped[0] ^ 1]) + wrapped[1:]
    for _ in range(2):  # a failed unwrap is not remembered: the second ask fails the same way
        with pytest.raises(KeyUnwrapError):
            ray.get(hsm.unwrap_share.remote(info.kid, tampered, None), timeout=30)
    with pytest.raises(KeyNotFoundError):  # the memory is keyed by the actor's own digest, kid included
        ray.get(hsm.unwrap_share.remote("gbr-no-such-kid", wrapped, None), timeout=30)

"""A stranger writes to a swarm's DHT keys: real hivemind DHT processes and p2pd on
127.0.0.1, nothing mocked. The stranger is a plain ``hivemind.DHT`` (no validator, so it
keeps whatever it stores itself and serves it back); the swarm's peers are DHTs started by
``start_dht`` and heartbeat with node/transport.py's ``Transport.beat``."""

from __future__ import annotations

import asyncio

import pytest
from byteswarm.node.dhtrecords import refusals
from byteswarm.node.identity import ensure_identity, load_identity
from byteswarm.node.procs import start_dht
from byteswarm.node.settings import NodeConfig
from byteswarm.node.swarm_cli import fetch_manifest
from byteswarm.node.transport import Member, Transport
from byteswarm.protocols import manifest as M
from byteswarm.protocols import records as R
from byteswarm.protocols.signing import public_key_bytes, sign_bytes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind import DHT
from hivemind.utils.timed_storage import get_dht_time

YEARS = 10 * 365 * 86400.0
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def member(tmp_path, name: str, sid: str, initial: list[str]) -> tuple[DHT, Transport]:
    """A swarm peer as ``byteswarm node`` starts one: its DHT with our validator, and a
    Transport whose beats we call by hand."""
    path, peer_id = ensure_identity(tmp_path / f"{name}.key")
    node = NodeConfig(swarm=sid, host_maddrs=LOOPBACK, initial_peers=" ".join(initial))
    dht = start_dht(node, str(path))
    progress = {"a": 5, "b": 0}[name]

    async def nothing(*_):
        return "x"

    tr = Transport(dht, sid, peer_id, client_mode=False, frame_limit=1 << 20,
                   heartbeat_period=1.0, peer_ttl=30.0, on_frame=nothing,
                   on_members=nothing, progress=lambda: progress,
                   identity=load_identity(path))
    return dht, tr


@pytest.mark.slow
def test_a_strangers_writes_neither_hide_the_members_nor_break_a_join(tmp_path):
    creator = Ed25519PrivateKey.generate()
    m = M.parse(f'name = "t"\nalgorithm = "spsa"\n'
                f'creator = "{public_key_bytes(creator).hex()}"\n')
    signed = M.sign(m, creator)
    sid, blob = signed.swarm_id, signed.to_bytes()
    peers_key, manifest_key = R.peers_key(sid), R.manifest_key(sid)
    dhts: list[DHT] = []
    try:
        dht_a, a = member(tmp_path, "a", sid, [])
        dhts.append(dht_a)
        maddr_a = str(dht_a.get_visible_maddrs()[0])
        asyncio.run(a.beat())
        assert dht_a.store(manifest_key, blob, get_dht_time() + 60)  # as a node publishes

        stranger = DHT(initial_peers=[maddr_a], start=True, host_maddrs=[LOOPBACK])
        dhts.append(stranger)
        now = get_dht_time()
        # (b) entries under a's subkey expiring in years: unsigned, signed by the
        # stranger's own key, and a's genuine entry re-stored with a later expiration.
        found = stranger.get(peers_key, latest=True)
        genuine = found.value[a.peer_id].value
        mine = Ed25519PrivateKey.generate()
        forged = [{"progress": 10**9, "client": True, "syncing": True},
                  R.seal_entry(mine, dht_key=peers_key, body={"progress": 10**9,
                                                              "client": True},
                               expiration=now + YEARS),
                  genuine]
        for value in forged:
            stranger.store(peers_key, value, now + YEARS, subkey=a.peer_id)
        # (a) a plain value at the membership key, expiring in years.
        stranger.store(peers_key, b"junk", now + YEARS + 1)
        # (c) junk at the manifest key, then the manifest's own (public) bytes with a
        # forged signature, each expiring later than the last (the latest wins), the last
        # in years: the stranger keeps serving that one.
        bad_sig = M.SignedManifest(m, sign_bytes(mine, M.SIGN_TAG, M.canonical_bytes(m)))
        for value, expires in ((b"\xc1junk", now + 600), (bad_sig.to_bytes(), now + 601),
                               (bad_sig.to_bytes(), now + YEARS)):
            stranger.store(manifest_key, value, expires)

        # a refused every one of them on store.
        stored = refusals(dht_a, sid)
        assert stored["peers:plain_value"][0] >= 1, stored
        assert stored["peers:malformed"][0] >= 1  # the unsigned dictionary entry
        assert stored["peers:too_far_ahead"][0] >= 1  # the stranger's signed one
        assert stored["peers:expiration_mismatch"][0] >= 1  # a's own, re-dated
        for reason in ("malformed", "bad_signature", "too_far_ahead"):
            assert stored[f"manifest:{reason}"][0] >= 1, stored

        # A node started after the attack, bootstrapping through the stranger itself.
        dht_b, b = member(tmp_path, "b", sid, [str(stranger.get_visible_maddrs()[0]),
                                               maddr_a])
        dhts.append(dht_b)
        asyncio.run(b.beat())
        assert b.members.get(a.peer_id) == Member(5, False), b.members
        assert set(b.members) == {a.peer_id, b.peer_id}
        asyncio.run(a.beat())
        assert a.members.get(b.peer_id) == Member(0, False), a.members
        # b was served the stranger's plain value (which hid the forged entries in the
        # stranger's own storage) and dropped it on read.
        read = refusals(dht_b, sid)
        assert read.get("peers:plain_value", (0, ""))[0] >= 1, read
        # It fetches the real manifest, whatever the stranger serves.
        assert fetch_manifest(dht_b, sid, timeout=30) == blob
        assert refusals(dht_b, sid).get("manifest:too_far_ahead", (0, ""))[0] >= 1
    finally:
        for dht in dhts:
            dht.shutdown()


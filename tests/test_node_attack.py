"""A stranger attacks a running swarm's DHT keys, then a new node joins it: real node
processes, real hivemind, on 127.0.0.1. The stranger (a plain ``hivemind.DHT``, not a
member, no validator) stores a plain value expiring in years at the membership key, forged
entries under a member's id, and junk at a manifest key; before the validators
(protocols/records.py), every node started afterwards waited for peers forever."""

from __future__ import annotations

import re
import signal

import pytest
from byteswarm.protocols import records as R
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind import DHT
from hivemind.utils.timed_storage import get_dht_time
from test_node import by_step, launch, outer_config, spsa_config  # noqa: F401  (a fixture)

YEARS = 10 * 365 * 86400.0


def attack(maddr: str, member: str) -> DHT:
    """The stranger's writes at swarm ``t``; it stays up (and keeps serving them)."""
    stranger = DHT(initial_peers=[maddr], start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    key, now = R.peers_key("t"), get_dht_time()
    mine = Ed25519PrivateKey.generate()
    for value in ({"progress": 10**9, "client": True, "syncing": True},
                  R.seal_entry(mine, dht_key=key, body={"progress": 10**9, "client": True},
                               expiration=now + YEARS)):
        stranger.store(key, value, now + YEARS, subkey=member)
    stranger.store(key, b"junk", now + YEARS + 1)
    stranger.store(R.manifest_key("t"), b"\xc1junk", now + YEARS)
    return stranger


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["spsa", "diloco"])
def test_a_node_started_after_a_dht_attack_joins_and_catches_up(launch, tmp_path, algo):  # noqa: F811
    if algo == "spsa":
        cfg = spsa_config(tmp_path, step_timeout=3.0)
        common = ["--config", cfg, "--min-peers", "3"]
    else:
        common = ["--config", outer_config(tmp_path, "diloco", 3, 3.0)]
    common += ["--steps", "100000", "--eval-every", "1000", "--checkpoint-every", "1000"]
    a = launch("a", *common, "--shard", "0")
    maddr = a.maddr()
    b = launch("b", *common, "--shard", "1", "--initial-peers", maddr)
    c = launch("c", *common, "--shard", "2", "--initial-peers", maddr)
    # SPSA serves its first snapshot at final step 40; DiLoCo one per round (H = 5).
    a.wait_step(45 if algo == "spsa" else 15, timeout=150)
    stranger = attack(maddr, a.maddr().split("/p2p/")[1])
    try:
        at = a.step()
        d = launch("d", *common, "--shard", "3", "--initial-peers", maddr)
        m = d.wait_for(lambda: re.search(r"synced from (\d) peer\(s\) \((\d) identical, "
                                         r"[\d.]+ MB\): now at step (\d+)", d.text()),
                       120, "the catch-up")
        assert int(m.group(1)) >= 2 and int(m.group(3)) >= at  # honest donors, the live state
        synced = int(m.group(3))
        d.wait_step(synced + 15, timeout=90)
        for n in (a, b, c):  # the members kept training through the attack
            assert n.step() > at + 5
    finally:
        stranger.shutdown()
    for n in (a, b, c, d):
        n.proc.send_signal(signal.SIGTERM)
    for n in (a, b, c, d):
        assert n.wait(timeout=30) == 128 + signal.SIGTERM, n.text()[-2000:]
    s = d.summary()
    assert s["catch_ups"][0]["phase"] == "done" and s["donor_blame"] == {}
    if algo == "spsa":  # d is bit-identical with the members once its first steps are final
        rows = [by_step(n) for n in (a, b, c, d)]
        shared = [t for t in sorted(set.intersection(*map(set, rows))) if t > synced + 4]
        assert len(shared) >= 8
        for t in shared:
            assert len({r[t]["fingerprint"] for r in rows}) == 1, t
    else:  # it started at a round boundary the donors had reached
        assert synced % 5 == 0


@pytest.mark.slow
def test_a_public_swarm_is_joined_after_a_dht_attack(launch, tmp_path):  # noqa: F811
    from test_public import NODE, keygen, write_manifest

    path = write_manifest(tmp_path, keygen(tmp_path / "creator.key"))
    common = [*NODE, "--steps", "100000", "--eval-every", "1000"]
    a = launch("a", *common, "--identity", str(tmp_path / "creator.key"), "--min-peers", "2",
               command=["swarm", "create", str(path)])
    sid = a.wait_for(lambda: re.search(r"swarm id (bs1\w+)", a.text()), 60, "the id").group(1)
    maddr = a.maddr()
    join = lambda name: launch(name, *common, command=["join", sid, "--bootstrap", maddr])
    b = join("b")
    a.wait_step(45, timeout=150)
    stranger = DHT(initial_peers=[maddr], start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        now, key = get_dht_time(), R.peers_key(sid)
        stranger.store(key, b"junk", now + YEARS)
        stranger.store(key, {"progress": 10**9, "client": True}, now + YEARS,
                       subkey=a.maddr().split("/p2p/")[1])
        stranger.store(R.manifest_key(sid), b"\xc1junk", now + YEARS)
        c = join("c")
        c.wait_for(lambda: f"manifest of {sid} verified" in c.text(), 90, "the manifest")
        m = c.wait_for(lambda: re.search(r"synced from 2 peer\(s\) \(2 identical, [\d.]+ MB\)"
                                         r": now at step (\d+)", c.text()), 120, "the catch-up")
        c.wait_step(int(m.group(1)) + 20, timeout=90)
    finally:
        stranger.shutdown()
    for n in (a, b, c):
        n.proc.send_signal(signal.SIGTERM)
    for n in (a, b, c):
        assert n.wait(timeout=30) == 128 + signal.SIGTERM, n.text()[-2000:]

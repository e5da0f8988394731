"""Public swarms over real processes: create, join by id, catch up, and refusals."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import subprocess
import time

import pytest
import torch
from byteswarm.node.identity import create_identity, load_identity, public_key_bytes
from byteswarm.optim.model import ModelConfig, build_model
from byteswarm.protocols import manifest
from byteswarm.protocols.signing import sign_bytes
from hivemind import DHT
from hivemind.utils.timed_storage import get_dht_time
from test_node import CHILD_ENV, EXE, FAST, by_step, launch  # noqa: F401  (launch is a fixture)

NODE = [a for a in FAST if a not in ("--swarm", "t", "--max-bytes", "2000000",
                                     "--batch-size", "8", "--val-batches", "2")]
DATA = "[data]\nmax_bytes = 2000000\nbatch_size = 8\nval_batches = 2\n"


def keygen(path):
    create_identity(path)
    return public_key_bytes(load_identity(path)).hex()


def write_manifest(tmp_path, creator_hex, extra=""):
    path = tmp_path / "swarm.toml"
    # No spot checks here (tests/test_hostile.py has them): on 2 loaded cores a record
    # measured just before a late one came fails its check now and then, and two such
    # strikes banned an honest node in one full run (docs/security.md, issue 18).
    path.write_text(f'name = "t"\nalgorithm = "spsa"\ncreator = "{creator_hex}"\n{extra}'
                    f'{DATA}[spsa]\nstep_timeout = 2.0\n')
    return path


@pytest.mark.slow
def test_join_by_id_verifies_the_manifest_and_catches_up(launch, tmp_path):  # noqa: F811
    creator = str(tmp_path / "creator.key")
    # The swarm starts from a weights file (not the seed's init): its members need a copy,
    # checked against the manifest's hash; a joiner of the running swarm copies the state.
    weights = tmp_path / "init.pt"
    torch.save(build_model(ModelConfig(), seed=7).state_dict(), weights)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    m = write_manifest(tmp_path, keygen(tmp_path / "creator.key"),
                       f'[init]\nweights = "sha256:{sha}"\n')
    # 10-25 SPSA steps a second here (signed records, 2 cores for 3 nodes):
    # long enough for c to start while a and b train.
    common = [*NODE, "--steps", "1200", "--eval-every", "400"]
    a = launch("a", *common, "--identity", creator, "--min-peers", "2", "--weights",
               str(weights), command=["swarm", "create", str(m)])
    sid = a.wait_for(lambda: re.search(r"swarm id (bs1\w+)", a.text()), 60, "the id").group(1)
    maddr = a.maddr()
    join = lambda name, *x: launch(name, *common, *x,
                                   command=["join", sid, "--bootstrap", maddr])
    early = join("early")  # at step 0 without the file: nobody to copy from
    assert early.wait(timeout=120) == 2 and "pass --weights PATH" in early.text()
    b = join("b", "--weights", str(weights))
    a.wait_step(120, timeout=120)
    c = join("c")  # joins a running swarm, well past step 30
    for n in (a, b, c):
        assert n.wait(timeout=180) == 0, n.text()[-3000:]
    assert f"manifest of {sid} verified" in c.text()
    assert all("initial weights from" in n.text() for n in (a, b))
    synced = re.search(r"synced from 2 peer\(s\) \(2 identical, [\d.]+ MB\): "
                       r"now at step (\d+)", c.text())
    assert synced, c.text()[-3000:]
    rows = [by_step(n) for n in (a, b, c)]
    after = [s for s in sorted(rows[2]) if s > int(synced.group(1)) + 5]
    assert len(after) > 50
    for s in after:  # the joiner holds the swarm's replica, bit for bit
        assert len({r[s]["fingerprint"] for r in rows}) == 1, s
    assert len({n.summary()["fingerprint"] for n in (a, b, c)}) == 1
    # What the joiner replayed came as records sealed by their authors, each checked.
    assert c.summary()["sealing"]["log_records"] > 0
    val = [rows[0][s]["val_loss"] for s in (400, 1200)]
    assert val[1] < val[0]


def run_join(sid, maddr, out, *extra):
    return subprocess.run([EXE, "join", sid, "--bootstrap", maddr, "--out", str(out),
                           *NODE, "--steps", "5", *extra],
                          capture_output=True, text=True, timeout=120, env=CHILD_ENV)


@pytest.mark.slow
def test_join_refuses_a_tampered_or_badly_signed_manifest_and_unlisted_keys(tmp_path):
    creator = tmp_path / "creator.key"
    pub = keygen(creator)
    m = manifest.load(write_manifest(tmp_path, pub))
    key = load_identity(creator)
    sid = manifest.sign(m, key).swarm_id
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        maddr = str(dht.get_visible_maddrs()[0])
        put = lambda blob: dht.store(f"{sid}.manifest", blob, get_dht_time() + 600)

        # One field changed (even re-signed by the creator): the id no longer matches.
        assert put(manifest.sign(dataclasses.replace(m, name="evil"), key).to_bytes())
        p = run_join(sid, maddr, tmp_path / "j1")
        assert p.returncode == 2 and "the manifest was changed" in p.stderr, p.stderr

        # The right manifest, signed by someone else: the id matches, the signature not.
        other = tmp_path / "other.key"
        keygen(other)
        forged = manifest.SignedManifest(m, sign_bytes(load_identity(other), manifest.SIGN_TAG,
                                                       manifest.canonical_bytes(m)))
        time.sleep(0.01)
        assert put(forged.to_bytes())
        p = run_join(sid, maddr, tmp_path / "j2")
        assert p.returncode == 2 and "bad_signature" in p.stderr, p.stderr

        # A mistyped id never reaches the network.
        typo = sid[:-1] + ("q" if sid[-1] != "q" else "p")
        p = run_join(typo, maddr, tmp_path / "j3")
        assert p.returncode == 2 and "mistyped" in p.stderr, p.stderr

        # An allowlist swarm that does not list us.
        listed = manifest.load(write_manifest(tmp_path, pub, 'admission = "allowlist"\n'))
        lsid = manifest.sign(listed, key).swarm_id
        assert dht.store(f"{lsid}.manifest", manifest.sign(listed, key).to_bytes(),
                         get_dht_time() + 600)
        stranger = tmp_path / "j4" / "identity.key"
        keygen(stranger)
        p = run_join(lsid, maddr, tmp_path / "j4")
        assert p.returncode == 2 and "not_admitted" in p.stderr, p.stderr
    finally:
        dht.shutdown()

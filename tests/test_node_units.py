"""The node's pieces that need no network: identity files, state checks, membership
parsing and config errors (the network itself is tested with real processes in
test_node.py and test_node_faults.py)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from byteswarm.node import algos as A
from byteswarm.node.cli import main
from byteswarm.node.identity import ensure_identity
from byteswarm.node.transport import Member, parse_marks
from byteswarm.optim.config import ConfigError
from byteswarm.optim.data import DataConfig
from byteswarm.optim.files import load_checkpoint, save_checkpoint
from byteswarm.optim.model import ModelConfig
from byteswarm.optim.noloco import NoLoCoConfig
from byteswarm.optim.sansio import Rejected
from byteswarm.optim.spsa import SPSAConfig
from byteswarm.optim.workload import load_workload
from byteswarm.protocols import state as P
from byteswarm.protocols.splits import Marks, left_behind
from hivemind.p2p import P2P


@pytest.fixture(scope="module")
def workload():
    return load_workload(ModelConfig(), DataConfig(max_bytes=300_000, batch_size=4,
                                                     val_batches=1), seed=0)


# --- identity -----------------------------------------------------------------------------

def test_identity_is_created_private_and_stable(tmp_path):
    path, pid = ensure_identity(tmp_path / "sub" / "id.key")
    assert path.stat().st_mode & 0o777 == 0o600
    assert pid.startswith("12D3KooW")  # an Ed25519 libp2p peer id
    assert ensure_identity(path) == (path, pid)
    assert ensure_identity(tmp_path / "other.key")[1] != pid


def test_identity_refuses_loose_permissions_junk_and_rsa(tmp_path):
    path, _ = ensure_identity(tmp_path / "id.key")
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        ensure_identity(path)
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"\xff\x00 not a key")
    os.chmod(junk, 0o600)
    with pytest.raises(ConfigError, match="not a libp2p private key"):
        ensure_identity(junk)
    rsa = tmp_path / "rsa.key"
    P2P.generate_identity(str(rsa))  # hivemind's own kind of key file
    os.chmod(rsa, 0o600)
    with pytest.raises(ConfigError, match="Ed25519"):
        ensure_identity(rsa)


# --- membership (heartbeats are signed: tests/test_dht_records.py reads whole entries) -------

def outvoted(own: dict[int, str], members: dict[str, Member], me: str) -> list[str]:
    """protocols/splits.py's verdict from our marks and the members' published ones."""
    marks = Marks()
    for mark in sorted(own.items()):
        marks.add(mark)
    return marks.outvoted({p: m.marks for p, m in members.items()}, me)


def test_marks_are_parsed_defensively_and_outvoted_peers_found():
    good = "0123456789abcdef"
    junk = [None, [5], [5, "XYZ"], [-1, good], [1.0, good], [5, good + "0"], "5:" + good]
    assert parse_marks(junk) == {} and parse_marks("x") == {} and parse_marks(None) == {}
    assert parse_marks([[5, good], [10, good]] + junk) == {5: good, 10: good}
    assert len(parse_marks([[t, good] for t in range(100)])) == 16
    m = lambda *pairs: Member(0, False, dict(pairs))
    own = {5: "a" * 16, 10: "b" * 16}
    # At step 10 two others agree with each other, not with us: copy one of them.
    members = {"x": m((10, "c" * 16)), "y": m((5, "a" * 16), (10, "c" * 16)),
               "z": m((5, "a" * 16))}
    assert sorted(outvoted(own, members, "me")) == ["x", "y"]
    # One against one is a tie: nobody can tell who split.
    assert outvoted(own, {"x": m((10, "c" * 16))}, "me") == []
    # We are in the majority, or nobody else marked our steps: nothing to do.
    assert outvoted(own, {"x": m((10, "b" * 16)), "y": m((10, "c" * 16))}, "me") == []
    assert outvoted(own, {"x": m((15, "c" * 16)), "y": Member(3, False)}, "me") == []
    # A tie at the latest shared step (one other has marked it so far) decides nothing.
    assert sorted(outvoted(own | {15: "d" * 16}, members | {"x": m((10, "c" * 16),
                                                                   (15, "e" * 16))},
                           "me")) == ["x", "y"]
    # Only the latest decisive step counts (an old split was repaired since).
    assert outvoted(own, {"x": m((10, "b" * 16)), "y": m((5, "f" * 16)),
                          "z": m((5, "f" * 16))}, "me") == []


def test_a_peer_left_behind_by_most_members_catches_up_and_few_claims_move_it_not():
    behind = lambda step: step > 100 + 4  # at 100, following up to 4 steps ahead
    me = "me"
    # Two of three far ahead: catch up from them (not from the one still with us).
    assert sorted(left_behind({"a": 200, "b": 180, "c": 101, me: 100}, me, set(),
                              behind)) == ["a", "b"]
    # One of three claiming a far step (a liar, or one fast peer) is no majority.
    assert left_behind({"a": 10**9, "b": 102, "c": 101}, me, set(), behind) == []
    # Half is no majority; a banned member has no vote.
    assert left_behind({"a": 200, "b": 100}, me, set(), behind) == []
    assert left_behind({"a": 200, "b": 100}, me, {"b"}, behind) == ["a"]
    assert left_behind({"a": 200, "z": 10**9}, me, {"z"}, behind) == ["a"]
    # Within reach, or alone: nothing to do.
    assert left_behind({"a": 104, "b": 103}, me, set(), behind) == []
    assert left_behind({me: 100}, me, set(), behind) == []


def test_a_gap_past_finality_never_heals_and_the_one_behind_is_told_to_catch_up(workload):
    # b imported a's state and a moved on more than finality_steps before b's first
    # record (a slow sync; seen in CI): each then refuses the other's records, as too
    # late and as too far ahead, and both time out every step, the gap kept for good.
    cfg = SPSAConfig(swarm="u", finality_steps=2, max_ahead=2)
    a, b = (A.make_algorithm("spsa", cfg, p, 0, 2, workload) for p in "ab")
    for x in (a, b):
        x.on_peers(frozenset("ab"), 0.0)
    for _ in range(6):  # a alone (b syncing): every step closes at its deadline
        a.on_local_step(0.0)
        a.outbox()
        a.on_timer(1e9)
    b.import_state(wire_copy(a.export_state(), a.numel))
    for _ in range(5):  # meanwhile a went on
        a.on_local_step(0.0)
        a.outbox()
        a.on_timer(1e9)
    gap = a.position() - b.position()
    for _ in range(4):
        sends = {x.peer_id: (x.on_local_step(0.0), x.outbox())[1] for x in (a, b)}
        for x, other in ((a, "b"), (b, "a")):
            for send in sends[other]:
                x.on_message(other, send.msg, 0.0)
            x.on_timer(1e9)
    assert a.position() - b.position() == gap > cfg.finality_steps
    assert a.stats()["rejects"] == {"too_late": 4}
    assert b.stats()["rejects"] == {"too_far_ahead": 4}
    assert left_behind({"a": a.position()}, "b", set(), b.behind) == ["a"]
    assert left_behind({"b": b.position()}, "a", set(), a.behind) == []


def test_spsa_resync_keeps_the_records_the_donor_lacks(workload):
    # a and b apply the same records, except that b never got c's record of step 0.
    cfg = SPSAConfig(swarm="u", finality_steps=2)
    ids = frozenset({"a", "b", "c"})
    a, b, c = (A.make_algorithm("spsa", cfg, p, 0, 2, workload) for p in "abc")
    for x in (a, b, c):
        x.on_peers(ids, 0.0)
    for t in range(6):
        sends = {x.peer_id: (x.on_local_step(0.0), x.outbox())[1] for x in (a, b, c)}
        for x in (a, b, c):
            for sender, out in sends.items():
                if sender != x.peer_id and not (t == 0 and sender == "c" and x is b):
                    for send in out:
                        x.on_message(sender, send.msg, 0.0)
            x.on_timer(1e9)
    assert a.fingerprint() == c.fingerprint() != b.fingerprint()
    # b holds its own record of a step a has not seen yet: a resync must not lose it.
    b.on_local_step(0.0)
    (mine,) = b.outbox()
    b.import_state(wire_copy(a.export_state(), a.theta.numel()))
    assert b.fingerprint() == a.fingerprint() and not b.can_step()
    a.on_message("b", mine.msg, 0.0)
    assert a.records[mine.msg.step] == b.records[mine.msg.step]


# --- state: sync downloads are untrusted, checkpoints resume exactly --------------------------

def wire_copy(state, numel):
    """A donor's whole state as a joiner gets it: through its bytes (protocols/state.py)."""
    return P.parse_state(P.pack_state(state), numel)


def spsa(workload, peer="p0", steps=0):
    algo = A.make_algorithm("spsa", SPSAConfig(swarm="u"), peer, 0, 2, workload)
    for _ in range(steps):
        algo.on_local_step(0.0)
    return algo


def test_spsa_state_round_trips_through_bytes(workload):
    donor = spsa(workload, steps=7)
    joiner = spsa(workload, peer="p1")
    joiner.import_state(wire_copy(donor.export_state(), donor.theta.numel()))
    assert joiner.fingerprint() == donor.fingerprint()
    assert joiner.position() == donor.position() == 7


def _set(obj, name, value):
    setattr(obj, name, value)


@pytest.mark.parametrize("spoil, reason", [
    (lambda s: _set(s.snap, "theta", s.snap.theta[:-1]), "vector"),
    (lambda s: s.snap.theta.__setitem__(0, float("nan")), "not finite"),
    (lambda s: _set(s.snap, "theta", s.snap.theta.double()), "vector"),
    (lambda s: _set(s, "closed", -5), "closed"),
    (lambda s: _set(s, "closed", 10**9), "closed"),
    (lambda s: s.records.__setitem__(6, {"p0": 500}), "a record of step 6"),
    (lambda s: s.records.__setitem__(6, "junk"), "records of step"),
    (lambda s: _set(s.snap, "g2", float("inf")), "snapshot fields"),
    (lambda s: _set(s, "snap", None), "not an SPSA state"),
])
def test_spsa_sync_state_junk_is_rejected_untouched(workload, spoil, reason):
    donor = spsa(workload, steps=5)
    state = wire_copy(donor.export_state(), donor.theta.numel())
    spoil(state)
    joiner = spsa(workload, peer="p1")
    before = joiner.fingerprint()
    with pytest.raises(Rejected, match=reason) as e:
        joiner.import_state(state)
    assert e.value.reason == "bad_state"
    assert joiner.fingerprint() == before and joiner.position() == 0
    assert joiner.snap.step == -1 and joiner.records == {}


def test_state_bytes_that_would_run_code_are_refused(workload, tmp_path):
    # The wire carries msgpack that protocols/state.py reads field by field: a pickle (or a
    # torch.save file, itself a pickle in a zip) is junk there, never code to run.
    pwned = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (pwned,))

    numel = 1000
    donor = spsa(workload, steps=2)
    checkpoint_bytes = tmp_path / "c.pt"
    save_checkpoint(checkpoint_bytes, {"state": donor.state_dict(), "evil": Evil()})
    for blob in (pickle.dumps(Evil()), checkpoint_bytes.read_bytes(),
                 b"\x00 not a state"):
        for parse in (P.parse_state, P.parse_served, P.parse_snapshot, P.parse_outer):
            with pytest.raises(Rejected) as e:
                parse(blob, numel)
            assert e.value.reason == "bad_state"
    assert not pwned.exists()


def test_noloco_checkpoint_resumes_mid_round_exactly(workload, tmp_path):
    cfg = NoLoCoConfig(inner_steps=5, warmup=0)
    a = A.make_algorithm("noloco", cfg, "p0", 0, 2, workload)
    for _ in range(3):
        a.on_local_step(0.0)
    b = A.make_algorithm("noloco", cfg, "p0", 0, 2, workload)
    save_checkpoint(tmp_path / "c.pt", {"state": a.state_dict()})  # as the node does
    b.load_state_dict(load_checkpoint(tmp_path / "c.pt")["state"])
    assert b.position() == 3
    for algo in (a, b):
        algo.on_local_step(0.0)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)  # inner AdamW state and position came back too
    bad = a.export_state()
    bad.momentum = bad.momentum[:10]  # NoLoCo's δ travels as the outer momentum
    with pytest.raises(Rejected, match="momentum"):
        b.import_state(bad)
    assert b.position() == 4 and torch.equal(b.phi, a.phi)


# --- configuration errors: one line, exit status 2, before any process starts --------------

@pytest.mark.parametrize("args, text", [
    (["--swarm", "bad name!"], "swarm name"),
    (["--shard", "20", "--num-shards", "4"], "not below num_shards"),
    (["--peer-ttl", "1", "--heartbeat-period", "2"], "peer_ttl"),
])
def test_bad_node_settings_exit_2(tmp_path, capsys, args, text):
    assert main(["node", "--out", str(tmp_path / "o"), *args]) == 2
    assert text in capsys.readouterr().err


def test_config_file_errors_exit_2(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[bogus]\nx = 1\n")
    assert main(["node", "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert "unknown table [bogus]" in capsys.readouterr().err
    cfg.write_text("[node]\nswarm = 'a'\n[spsa]\nswarm = 'b'\n")
    assert main(["node", "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert "differs from the node's swarm" in capsys.readouterr().err
    cfg.write_text("[spsa]\nspot_check_rate = 0.1\n")
    assert main(["node", "--out", str(tmp_path / "o"), "--config", str(cfg),
                 "--shard", "1"]) == 2
    assert "follow from peer ids only when no --shard" in capsys.readouterr().err
    cfg.write_text("[node]\ninitial_peers = [1, 2]\n")
    assert main(["node", "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert "list of strings" in capsys.readouterr().err

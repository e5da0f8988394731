"""The SPSA state download's pure parts: snapshot bytes, indexes, the choice of donors,
and that an old marked snapshot plus the records since rebuilds the live replica."""

from __future__ import annotations

import hashlib

import msgpack
import pytest
import torch
from byteswarm.node import algos as A
from byteswarm.node import statesync as S
from byteswarm.node.transport import Member
from byteswarm.optim.data import DataConfig
from byteswarm.optim.model import ModelConfig
from byteswarm.optim.sansio import Rejected
from byteswarm.optim.spsa import Snapshot, SPSAConfig, fingerprint_of
from byteswarm.optim.workload import load_workload


@pytest.fixture(scope="module")
def workload():
    return load_workload(ModelConfig(), DataConfig(max_bytes=300_000, batch_size=4,
                                                     val_batches=1), seed=0)


def test_snapshot_bytes_are_deterministic_and_checked():
    snap = Snapshot(40, torch.randn(1000), 0.25, {41: 1.5, 45: 2.0})
    blob = S.snapshot_blob(snap)
    assert blob == S.snapshot_blob(snap.copy())  # equal snapshots, equal bytes
    back = S.parse_snapshot(blob, 1000)
    assert torch.equal(back.theta, snap.theta) and back.scales == snap.scales
    assert (back.step, back.g2) == (40, 0.25)
    bad_theta = snap.copy()
    bad_theta.theta[3] = float("nan")
    for junk in (blob[:-1], b"\x93\x01", msgpack.packb([40, -1.0, [], bytes(4000)]),
                 msgpack.packb([40, None, [[1, "x"]], bytes(4000)]),
                 S.snapshot_blob(bad_theta), S.snapshot_blob(Snapshot(4, torch.zeros(999)))):
        with pytest.raises(Rejected):
            S.parse_snapshot(junk, 1000)


def test_index_and_store():
    store = S.SnapshotStore()
    for step in (5, 40, 80, 120, 160, 200):
        store.add(Snapshot(step, torch.full((S.CHUNK // 2,), float(step))))
    assert sorted(store.blobs) == [80, 120, 160, 200]  # only served steps, the latest KEEP
    idx = S.parse_index(store.answer("index", 120, 0), 120, 1 << 24)
    chunks = [store.answer("chunk", 120, i) for i in range(len(idx["sha256"]))]
    assert len(chunks) == 3 and b"".join(chunks) == store.blobs[120]
    assert all(hashlib.sha256(c).digest() == h for c, h in zip(chunks, idx["sha256"]))
    assert store.answer("index", 40, 0) == b"" and store.answer("log", 120, 0) is None
    with pytest.raises(Rejected):
        S.parse_index(store.answer("index", 120, 0), 80, 1 << 24)  # not the step asked
    with pytest.raises(Rejected):
        S.parse_index(store.answer("index", 120, 0), 120, 1000)  # over the size limit
    for junk in (b"", msgpack.packb(["index", -1, 0]), msgpack.packb(["rm", 1, 0]), b"\xff"):
        with pytest.raises(Rejected):
            S.parse_request(junk)


def test_the_most_agreed_mark_is_chosen():
    fp = lambda c: c * 16
    m = lambda *pairs: Member(0, False, dict(pairs))
    members = {"me": m((40, fp("a"))), "x": m((40, fp("a")), (80, fp("b"))),
               "y": m((40, fp("a")), (80, fp("c"))), "z": m((35, fp("d")), (40, fp("a")))}
    # 80 is later, but nobody else vouches for either fingerprint there
    assert S.choose_mark(members, "me") == (40, fp("a"), ["x", "y", "z"])
    members["w"] = m((80, fp("c")), (120, fp("e")))
    assert S.choose_mark(members, "me") == (80, fp("c"), ["w", "y"])  # the latest with two
    assert S.choose_mark(members, "me", among={"x"}) == (80, fp("b"), ["x"])
    assert S.choose_mark({"x": m((35, fp("d")))}, "me") is None  # not a served step


def test_an_old_marked_snapshot_and_the_log_rebuild_the_live_replica(workload):
    cfg = SPSAConfig(swarm="u", finality_steps=2)
    ids = frozenset({"a", "b"})
    a, b = (A.make_algorithm("spsa", cfg, p, 0, 2, workload) for p in "ab")
    store = S.SnapshotStore()
    for x in (a, b):
        x.on_peers(ids, 0.0)
    for _ in range(S.SERVE_EVERY + 9):
        outs = {x.peer_id: (x.on_local_step(0.0), x.outbox())[1] for x in (a, b)}
        for x in (a, b):
            for sender, out in outs.items():
                if sender != x.peer_id:
                    for send in out:
                        x.on_message(sender, send.msg, 0.0)
        store.add(a.snap)
    assert sorted(store.blobs) == [S.SERVE_EVERY] and a.snap.step > S.SERVE_EVERY
    snap = S.parse_snapshot(store.blobs[S.SERVE_EVERY], a.theta.numel())
    log = S.parse_log(S.log_blob(a.closed, a.log_since(snap.step)), snap.step)
    joiner = A.make_algorithm("spsa", cfg, "c", 1, 2, workload)
    A.load_sync_state(joiner, {"snap": {"step": snap.step, "theta": snap.theta,
                                        "g2": snap.g2, "scales": snap.scales},
                               "closed": log["closed"], "records": log["records"]})
    assert joiner.fingerprint() == a.fingerprint() == b.fingerprint()
    assert joiner.final_mark() == a.final_mark()  # its snapshot caught up as well
    assert fingerprint_of(snap.theta) != a.final_mark()[1]

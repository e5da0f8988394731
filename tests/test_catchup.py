"""The catch-up machine (protocols/catchup.py), wired straight to real donors: each donor is
a real algorithm object with its store, answering through protocols/serving.py as the node
does; only the link is a direct call. The simulator runs the same machine over its virtual
network (tests/test_sim_catchup.py) and the node over hivemind (tests/test_node_faults.py)."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
import torch
from byteswarm.optim.data import DataConfig
from byteswarm.optim.model import ModelConfig
from byteswarm.optim.noloco import NoLoCoConfig
from byteswarm.optim.sansio import Rejected
from byteswarm.optim.spsa import SERVE_EVERY, SPSA, RecordLog, Snapshot, SPSAConfig
from byteswarm.optim.workload import ALGOS, load_workload
from byteswarm.protocols import catchup as C
from byteswarm.protocols import serving
from byteswarm.protocols import state as P


@pytest.fixture(scope="module")
def workload():
    return load_workload(ModelConfig(), DataConfig(max_bytes=300_000, batch_size=4,
                                                   val_batches=1), seed=0)


def lockstep(algos: dict, steps: int, stores: dict) -> None:
    """Every peer steps, then every message is delivered, ``steps`` times."""
    for _ in range(steps):
        for a in algos.values():
            if a.can_step():
                a.on_local_step(0.0)
        while True:
            sent = [(pid, s) for pid, a in algos.items() for s in a.outbox()]
            if not sent:
                break
            for pid, send in sent:
                for dst in (algos if send.to == "*" else [send.to]):
                    if dst != pid:
                        algos[dst].on_message(pid, send.msg, 0.0)
        for pid, a in algos.items():
            stores[pid].take(a)


def swarm(workload, name: str, cfg, n: int, steps: int):
    ids = [f"p{i}" for i in range(n)]
    algos = {p: ALGOS[name].make(cfg, p, i, n, ids, workload) for i, p in enumerate(ids)}
    stores = {p: serving.ServedStore() for p in ids}
    lockstep(algos, steps, stores)
    return algos, stores


def run(machine: C.CatchUp, algos: dict, stores: dict, poison=None) -> None:
    """Carry the machine's requests to the donors until it is done; ``poison(peer, op,
    reply)`` may bend a donor's replies (a hostile donor)."""
    for _ in range(10_000):
        reqs = machine.requests()
        if not reqs:
            break
        for r in reqs:
            try:
                reply = serving.serve(stores[r.peer], algos[r.peer], r.data)
            except Exception:
                reply = None
            if poison is not None and reply is not None:
                reply = poison(r.peer, P.parse_request(r.data)[0], reply)
            if reply is not None and len(reply) > r.limit:
                reply = None
            machine.on_reply(r.id, reply, 0.0)
    assert machine.done, machine.stats()


def serve_shifted(stores: dict, peer: str, tag: int, shift: float, numel: int) -> None:
    """``peer`` serves its outer state of ``tag`` with φ moved by ``shift`` (a liar, or an
    honest replica that differs a little)."""
    copy = P.parse_outer(stores[peer].blobs[tag], numel)
    copy.phi += shift
    blob = P.pack_outer(copy)
    stores[peer].put(tag, blob, P.make_index(tag, blob))


def view_of(algos: dict) -> dict[str, C.Candidate]:
    """Each donor's heartbeat: its position and the marks of what it serves."""
    out = {}
    for pid, a in algos.items():
        marks = {}
        if a.identical_replicas:
            marks = {a.snap.step: a.final_mark()[1]}
        out[pid] = C.Candidate(a.position(), marks)
    return out


def test_spsa_joiner_rebuilds_the_live_replica(workload):
    cfg = SPSAConfig(swarm="t", lr=1e-3, finality_steps=2)
    algos, stores = swarm(workload, "spsa", cfg, 3, SERVE_EVERY + 5)
    # The marks the donors published when they served step SERVE_EVERY.
    fp = {p: stores[p].blobs and P.parse_snapshot(stores[p].blobs[SERVE_EVERY],
                                                  a.theta.numel()) for p, a in algos.items()}
    marks = {p: {SERVE_EVERY: a.served_mark(fp[p])} for p, a in algos.items()}
    view = {p: C.Candidate(a.position(), marks[p]) for p, a in algos.items()}
    joiner = ALGOS["spsa"].make(cfg, "p9", 0, 3, ["p9"], workload)
    m = C.CatchUp(C.CatchUpConfig(), algo=joiner, numel=joiner.theta.numel(), seed=1)
    m.on_view(view, 0.0)
    run(m, algos, stores)
    assert m.phase == C.DONE, m.stats()
    joiner.import_state(m.result)
    donor = algos["p0"]
    assert joiner.position() == donor.position()
    assert torch.equal(joiner.theta, donor.theta)  # bit-identical after the replay
    assert m.stats()["served_by"] == 3 and m.how == "3 identical"


def test_sybils_that_vouch_for_each_other_lose_to_more_honest_donors(workload):
    cfg = SPSAConfig(swarm="t", lr=1e-3, finality_steps=2)
    algos, stores = swarm(workload, "spsa", cfg, 3, SERVE_EVERY + 3)
    numel = algos["p0"].theta.numel()
    honest = {p: {SERVE_EVERY: a.served_mark(P.parse_snapshot(stores[p].blobs[SERVE_EVERY],
                                                                numel))}
              for p, a in algos.items()}
    # k Sybils serve a poisoned snapshot at a later tag, and vouch for it with its own
    # (correct) fingerprint, so only the vote can tell them from the honest.
    good = P.parse_snapshot(stores["p0"].blobs[SERVE_EVERY], numel)
    bad = type(good)(SERVE_EVERY * 2, good.theta + 1.0, good.g2, dict(good.scales))
    bad_store = serving.ServedStore()
    blob = P.pack_snapshot(bad)
    bad_store.put(bad.step, blob, P.make_index(bad.step, blob))
    fp_bad = algos["p0"].served_mark(bad)
    for k, fooled in ((1, False), (2, False), (3, True)):
        view = {p: C.Candidate(a.position(), honest[p]) for p, a in algos.items()}
        all_algos, all_stores = dict(algos), dict(stores)
        for i in range(k):
            s = f"sybil{i}"
            view[s] = C.Candidate(10**9, {bad.step: fp_bad})
            all_algos[s], all_stores[s] = algos["p0"], bad_store
        joiner = ALGOS["spsa"].make(cfg, "j", 0, 3, ["j"], workload)
        m = C.CatchUp(C.CatchUpConfig(), algo=joiner, numel=numel, seed=k)
        m.on_view(view, 0.0)
        sybil_log = lambda peer, op, reply: (P.pack_log(RecordLog(bad.step, {}))
                                             if peer.startswith("sybil") and op == "log"
                                             else reply)
        run(m, all_algos, all_stores, poison=sybil_log)
        assert m.phase == C.DONE
        assert (m.result.snap.step == bad.step) == fooled, k  # k < 3 honest: never fooled


def test_a_lying_chunk_is_refetched_and_its_donor_blamed(workload):
    cfg = SPSAConfig(swarm="t", lr=1e-3, finality_steps=2)
    algos, stores = swarm(workload, "spsa", cfg, 3, SERVE_EVERY + 3)
    numel = algos["p0"].theta.numel()
    view = {p: C.Candidate(a.position(), {SERVE_EVERY: a.served_mark(
        P.parse_snapshot(stores[p].blobs[SERVE_EVERY], numel))}) for p, a in algos.items()}
    flip = lambda peer, op, reply: (bytes([reply[0] ^ 1]) + reply[1:]
                                    if peer == "p1" and op == "chunk" else reply)
    joiner = ALGOS["spsa"].make(cfg, "j", 0, 3, ["j"], workload)
    m = C.CatchUp(C.CatchUpConfig(), algo=joiner, numel=numel, seed=0)
    m.on_view(view, 0.0)
    run(m, algos, stores, poison=flip)
    assert m.phase == C.DONE and m.blame["p1"] >= 1 and not m.blame["p0"]
    joiner.import_state(m.result)
    assert torch.equal(joiner.theta, algos["p0"].theta)


def test_noloco_joiner_takes_one_copy_of_two_never_their_mean(workload):
    cfg = NoLoCoConfig(inner_steps=3, warmup=1)
    algos, stores = swarm(workload, "noloco", cfg, 2, 7)  # two rounds done
    # Make the two copies differ as a liar would: p1 serves φ + 100 (two honest NoLoCo
    # replicas of a pair would agree, and two alike are taken as they are).
    for tag in (1, 2):
        serve_shifted(stores, "p1", tag, 100.0, algos["p1"].numel)
    m = C.CatchUp(C.CatchUpConfig(), algo=algos["p0"], numel=algos["p0"].numel, seed=3)
    m.on_view(view_of(algos), 0.0)
    run(m, algos, stores)
    assert m.phase == C.DONE and m.result.round == 2 and m.how == "2 copies"
    copies = [P.parse_outer(stores[p].blobs[2], algos[p].numel).phi for p in ("p0", "p1")]
    assert any(torch.equal(m.result.phi, c) for c in copies)  # one of them, not a blend


def test_noloco_three_copies_are_combined_by_median(workload):
    cfg = NoLoCoConfig(inner_steps=3, warmup=1)
    algos, stores = swarm(workload, "noloco", cfg, 3, 4)  # one round done
    numel = algos["p0"].numel
    serve_shifted(stores, "p1", 1, 1e-3, numel)  # p1 differs a little
    serve_shifted(stores, "p2", 1, 1e6, numel)  # p2 lies
    joiner = ALGOS["noloco"].make(cfg, "j", 0, 3, ["j"], workload)
    m = C.CatchUp(C.CatchUpConfig(), algo=joiner, numel=numel, seed=0)
    m.on_view(view_of(algos), 0.0)
    run(m, algos, stores)
    assert m.phase == C.DONE and m.how == "3 copies"
    honest = torch.stack([P.parse_outer(stores[p].blobs[1], numel).phi for p in ("p0", "p1")])
    lo, hi = honest.min(0).values, honest.max(0).values
    assert bool(((m.result.phi >= lo) & (m.result.phi <= hi)).all())  # the liar moved nothing
    joiner.import_state(m.result)
    assert joiner.position() == 3


def test_silent_donors_time_out_and_a_young_swarm_sends_whole_states(workload):
    cfg = SPSAConfig(swarm="t", lr=1e-3, finality_steps=2)
    algos, stores = swarm(workload, "spsa", cfg, 2, 6)  # nothing served yet
    joiner = ALGOS["spsa"].make(cfg, "j", 0, 2, ["j"], workload)
    m = C.CatchUp(C.CatchUpConfig(timeout=5.0), algo=joiner, numel=joiner.theta.numel(),
                  seed=0)
    m.on_view(view_of(algos), 0.0)
    assert len(m.requests()) == 2 and m.next_deadline() == 5.0
    m.on_timer(5.0)  # nobody answered: a retry is due after retry_wait
    assert m.phase == C.WAIT and m.next_deadline() == 7.0 and m.blame == {"p0": 1, "p1": 1}
    m.on_timer(7.0)
    run(m, algos, stores)
    assert m.phase == C.DONE and m.how.startswith("whole state, 2 alike")
    joiner.import_state(m.result)
    assert torch.equal(joiner.theta, algos["p0"].theta)


def test_a_sybil_in_the_winning_group_cannot_drag_the_log(workload):
    """It copies the honest index and vouches for the honest fingerprint (both public), so
    it is in the group; then its log claims 1,000 more closed steps with records for them.
    The median closed step of the group's logs leaves them out."""
    cfg = SPSAConfig(swarm="t", lr=1e-3, finality_steps=2)
    algos, stores = swarm(workload, "spsa", cfg, 3, SERVE_EVERY + 6)
    numel = algos["p0"].theta.numel()
    fp = algos["p0"].served_mark(P.parse_snapshot(stores["p0"].blobs[SERVE_EVERY], numel))
    view = {p: C.Candidate(a.position(), {SERVE_EVERY: fp}) for p, a in algos.items()}
    view["sybil"] = C.Candidate(10**9, {SERVE_EVERY: fp})
    all_algos, all_stores = {**algos, "sybil": algos["p0"]}, {**stores, "sybil": stores["p0"]}

    def lie(peer, op, reply):
        if peer != "sybil" or op != "log":
            return reply
        log = P.parse_log(reply, SERVE_EVERY)
        for t in range(log.closed + 1, log.closed + 1000):
            log.records[t] = {"ghost": 127}
        return P.pack_log(type(log)(log.closed + 999, log.records))

    joiner = ALGOS["spsa"].make(cfg, "j", 0, 3, ["j"], workload)
    m = C.CatchUp(C.CatchUpConfig(), algo=joiner, numel=numel, seed=0)
    m.on_view(view, 0.0)
    run(m, all_algos, all_stores, poison=lie)
    assert m.phase == C.DONE and m.how == "4 identical", m.stats()
    joiner.import_state(m.result)
    assert joiner.position() == algos["p0"].position()
    assert torch.equal(joiner.theta, algos["p0"].theta)


def test_a_state_of_the_wrong_kind_is_blamed_not_a_crash(workload):
    cfg = NoLoCoConfig(inner_steps=3, warmup=1)
    algos, stores = swarm(workload, "noloco", cfg, 3, 4)
    numel = algos["p0"].numel
    # p2 serves an SPSA snapshot of the right size where an outer state belongs.
    snap = P.pack_snapshot(Snapshot(1, torch.zeros(numel)))
    stores["p2"].put(1, snap, P.make_index(1, snap))
    serve_shifted(stores, "p1", 1, 1e-3, numel)  # three distinct copies: no majority
    joiner = ALGOS["noloco"].make(cfg, "j", 0, 3, ["j"], workload)
    m = C.CatchUp(C.CatchUpConfig(), algo=joiner, numel=numel, seed=0)
    m.on_view(view_of(algos), 0.0)
    run(m, algos, stores)
    assert m.phase == C.DONE and m.blame["p2"] >= 1 and m.how == "3 copies", m.stats()
    joiner.import_state(m.result)


def test_the_served_store_keeps_the_latest_states_and_answers_for_them():
    store = serving.ServedStore()
    served_tag = lambda step: SPSA.served_tag(SimpleNamespace(snap=Snapshot(step, None)))
    for step in (5, 40, 80, 120, 160, 200):
        tag = served_tag(step)
        if store.wants(tag):
            blob = P.pack_served(Snapshot(step, torch.full((P.CHUNK // 2,), float(step))))
            store.put(tag, blob, P.make_index(tag, blob))
    assert sorted(store.blobs) == [80, 120, 160, 200]  # only served steps, the latest KEEP
    assert not store.wants(40) and not store.wants(200) and not store.wants(None)
    assert store.wants(240)  # new, and nothing older is asked for again
    store.pending.add(240)
    assert not store.wants(240)  # being serialized already
    idx = P.parse_index(store.answer("index", 120, 0), 120, 1 << 24)
    chunks = [store.answer("chunk", 120, i) for i in range(len(idx.hashes))]
    assert len(chunks) == 3 and b"".join(chunks) == store.blobs[120]
    assert [len(c) for c in chunks] == [idx.chunk_size(i) for i in range(3)]
    assert all(hashlib.sha256(c).digest() == h for c, h in zip(chunks, idx.hashes))
    assert store.answer("latest", 0, 0) == store.answer("index", 200, 0) != b""
    assert [i.tag for _, i in P.parse_indexes(store.answer("indexes", 0, 0), 1 << 24)] == \
        [80, 120, 160, 200]
    assert store.answer("index", 40, 0) == b"" and store.answer("chunk", 40, 0) == b""
    assert serving.ServedStore().answer("latest", 0, 0) == b""
    with pytest.raises(Rejected) as e:  # whole states and logs are the algorithm's
        serving.serve(store, None, P.pack_request("rm", 1))
    assert e.value.reason == "bad_request"

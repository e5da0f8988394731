"""NoLoCo and DiLoCo as state machines, wired directly (no network) — h11's pair first.

The harness below is the whole "network": after each call it hands every Send to its
receiver at once; when nobody can step it jumps the clock to the earliest deadline.
"""

import dataclasses

import pytest
import torch
from byteswarm.optim.codecs import make_codec
from byteswarm.optim.data import Corpus, DataConfig
from byteswarm.optim.diloco import DiLoCo, DiLoCoConfig, GatherPart, ReducePart, part_bounds
from byteswarm.optim.model import ModelConfig, build_model
from byteswarm.optim.noloco import NoLoCo, NoLoCoConfig, NoLoCoShare, draw_groups, group_of
from byteswarm.optim.outer import diloco_outer_step, group_mean
from byteswarm.optim.sansio import EVERYONE
from byteswarm.optim.spread import replica_spread
from byteswarm.optim.task import Job
from byteswarm.optim.workload import Workload

MICRO = ModelConfig(n_layer=1, n_embd=16, n_head=2, context=16)


@pytest.fixture(scope="module")
def corpus():
    return Corpus.load(DataConfig(max_bytes=4_000_000))


def make_swarm(cls, cfg, corpus, n, *, model_cfg=MICRO, batch_size=8):
    ids = [f"p{i}" for i in range(n)]
    seq_len = model_cfg.resolved().context
    task = Workload(model_cfg, DataConfig(batch_size=batch_size), corpus, 0, seq_len,
                    corpus.val_set(batch_size, seq_len, 4))
    return {pid: cls(cfg, pid, Job.of(task, k, n), peers=frozenset(ids))
            for k, pid in enumerate(ids)}


def run(algos, steps, *, silent=(), dt=0.01):
    """Each peer takes up to ``steps`` inner steps; peers in ``silent`` never deliver."""
    ids = list(algos)
    done = dict.fromkeys(ids, 0)
    now = 0.0
    while True:
        progressed = False
        for pid, a in algos.items():
            if a.can_step() and done[pid] < steps:
                a.on_local_step(now)
                done[pid] += 1
                progressed = True
            for send in a.outbox():
                if pid in silent:
                    continue
                progressed = True
                for q in ([p for p in ids if p != pid] if send.to == EVERYONE else [send.to]):
                    algos[q].on_message(pid, send.msg, now)
        now += dt
        if not progressed:
            deadlines = [d for a in algos.values() if (d := a.next_deadline()) is not None]
            if not deadlines:
                return now
            now = max(now, min(deadlines))
            for a in algos.values():
                a.on_timer(now)


# --- groups -----------------------------------------------------------------------------

def test_groups_are_drawn_the_same_way_by_every_member():
    for n_peers, size in [(2, 2), (5, 2), (8, 2), (9, 4), (3, 4)]:
        peers = frozenset(f"p{i}" for i in range(n_peers))
        for r in range(6):
            groups = draw_groups(r, peers, seed=3, n=size)
            assert sorted(p for g in groups for p in g) == sorted(peers)
            assert all(len(g) == size for g in groups[:-1])
            for p in peers:
                g = group_of(p, r, peers, 3, size)
                assert all(group_of(q, r, peers, 3, size) == g for q in g)
    # Partners change from round to round.
    peers = frozenset(f"p{i}" for i in range(8))
    assert len({tuple(group_of("p0", r, peers, 0, 2)) for r in range(20)}) > 3


# --- NoLoCo -------------------------------------------------------------------------------

def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_noloco_pair_exchanges_and_agrees_after_the_first_round(corpus):
    cfg = NoLoCoConfig(inner_steps=5, warmup=0)
    algos = make_swarm(NoLoCo, cfg, corpus, 2)
    a, b = algos["p0"], algos["p1"]
    for algo in (a, b):
        for _ in range(5):
            algo.on_local_step(0.0)
    assert not a.can_step() and not b.can_step()  # both wait for the other's share
    thetas = [flat(a.model), flat(b.model)]
    sa, sb = a.outbox(), b.outbox()
    assert [s.to for s in sa] == ["p1"] and [s.to for s in sb] == ["p0"]
    assert isinstance(sa[0].msg, NoLoCoShare) and sa[0].msg.round == 0
    a.on_message("p1", sb[0].msg, 0.0)
    b.on_message("p0", sa[0].msg, 0.0)
    assert a.can_step() and b.can_step()
    # Same start and no momentum yet, so φ' = φ + β·mean(θ − φ) on both, bit for bit.
    phi0 = flat(build_model(MICRO, seed=0))
    want = phi0 + 0.7 * group_mean([t - phi0 for t in thetas])
    torch.testing.assert_close(a.phi, want)
    assert torch.equal(a.phi, b.phi) and torch.equal(flat(a.model), a.phi)
    assert a.stats()["rounds_with_partner"] == 1 and b.stats()["rounds_with_partner"] == 1


def test_noloco_group_of_four_averages_all_four(corpus):
    cfg = NoLoCoConfig(inner_steps=3, warmup=0, group_size=4)
    algos = make_swarm(NoLoCo, cfg, corpus, 4)
    phi0 = algos["p0"].phi.clone()
    for a in algos.values():
        for _ in range(3):
            a.on_local_step(0.0)
    thetas = [flat(a.model) for a in algos.values()]
    run(algos, 0)
    want = phi0 + 0.7 * group_mean([t - phi0 for t in thetas])
    for a in algos.values():
        assert torch.equal(a.phi, algos["p0"].phi) and a.stats()["shares_used"] == 3
        torch.testing.assert_close(a.phi, want)


def test_replica_spread():
    x = torch.randn(1000)
    d = torch.full((1000,), 0.01)
    assert replica_spread([x, x.clone()]) == {"mean_std": 0.0, "max_rel_l2": 0.0,
                                              "replicas": 2}
    s = replica_spread([x + d, x - d, x])
    assert abs(s["mean_std"] - 0.01 * (2 / 3) ** 0.5) < 1e-6
    assert abs(s["max_rel_l2"] - float((2 * d).norm() / x.norm())) < 1e-3
    assert replica_spread([build_model(MICRO, seed=0)] * 2)["max_rel_l2"] == 0.0


def test_noloco_partner_that_never_answers_costs_one_timeout(corpus):
    cfg = NoLoCoConfig(inner_steps=5, round_timeout=2.0, warmup=0)
    algos = make_swarm(NoLoCo, cfg, corpus, 2)
    a = algos["p0"]
    for _ in range(5):
        a.on_local_step(1.0)
    assert not a.can_step() and a.next_deadline() == 3.0
    a.on_timer(2.5)  # too early: still waiting
    assert not a.can_step()
    a.on_timer(3.0)
    assert a.can_step()
    for _ in range(5):  # and it trains on into the next round
        a.on_local_step(3.0)
    a.on_timer(100.0)
    s = a.stats()
    assert s["rounds_alone"] == 2 and s["timeouts"] == 2 and s["round"] == 2
    assert s["bytes_sent"] == 2 * 2 * a.numel * 4  # φ and θ − φ, fp32, twice


def test_noloco_silent_peer_in_a_swarm_does_not_stop_the_others(corpus):
    cfg = NoLoCoConfig(inner_steps=4, round_timeout=1.0, warmup=0, seed=1)
    algos = make_swarm(NoLoCo, cfg, corpus, 4)
    run(algos, 16, silent={"p3"})
    for pid, algo in algos.items():
        s = algo.stats()
        assert s["rounds_completed"] == 4, (pid, s)
    assert sum(a.stats()["timeouts"] for a in algos.values()) > 0


def test_noloco_counts_and_drops_junk(corpus):
    cfg = NoLoCoConfig(inner_steps=3, warmup=0, max_ahead=2)
    algos = make_swarm(NoLoCo, cfg, corpus, 2)
    a, b = algos["p0"], algos["p1"]
    n = a.numel
    good = NoLoCoShare(1, b.phi_codec.compress(b.phi), b.phi_codec.compress(torch.zeros(n)))
    a.on_message("p1", "hello", 0.0)
    a.on_message("p1", dataclasses.replace(good, round=5), 0.0)
    small = b.phi_codec.compress(torch.zeros(n - 1))
    a.on_message("p1", NoLoCoShare(0, small, small), 0.0)
    a.on_message("p1", good, 0.0)
    a.on_message("p1", good, 0.0)
    assert a.stats()["rejects"] == {"duplicate": 1, "too_far_ahead": 1, "wrong_size": 1,
                                    "wrong_type": 1}
    # A share with NaNs, or far larger than our own update, is dropped when used.
    bad = b.phi_codec.compress(torch.full((n,), float("nan")))
    a.on_message("p1", NoLoCoShare(0, good.phi, bad), 0.0)
    for _ in range(3):
        a.on_local_step(0.0)
    s = a.stats()
    assert s["rejects"]["non_finite"] == 1 and s["rounds_alone"] == 1
    huge = b.phi_codec.compress(torch.full((n,), 1e6))
    for _ in range(3):
        a.on_local_step(0.0)  # round 1: the buffered good share is used
    assert a.stats()["rounds_with_partner"] == 1
    a.on_message("p1", NoLoCoShare(2, good.phi, huge), 0.0)
    for _ in range(3):
        a.on_local_step(0.0)
    assert a.stats()["rejects"]["norm_too_large"] == 1
    far = b.phi_codec.compress(10 * a.phi)
    a.on_message("p1", NoLoCoShare(3, far, good.update), 0.0)
    for _ in range(3):
        a.on_local_step(0.0)
    assert a.stats()["rejects"]["phi_too_far"] == 1 and a.stats()["rounds_alone"] == 3
    a.on_message("p1", good, 0.0)
    assert a.stats()["rejects"]["stale"] == 1


# --- DiLoCo -------------------------------------------------------------------------------

def test_part_bounds_cover_the_vector():
    for numel, n in [(10, 3), (7, 7), (100, 1), (5, 8)]:
        b = part_bounds(numel, n)
        assert b[0][0] == 0 and b[-1][1] == numel and len(b) == n
        assert all(b[i][1] == b[i + 1][0] for i in range(n - 1))
        assert max(h - lo for lo, h in b) - min(h - lo for lo, h in b) <= 1


def test_diloco_butterfly_equals_the_plain_mean(corpus):
    cfg = DiLoCoConfig(inner_steps=4, warmup=0)
    algos = make_swarm(DiLoCo, cfg, corpus, 3)
    phi0 = algos["p0"].phi.clone()
    for a in algos.values():  # train to the end of round 0, holding the messages back
        for _ in range(4):
            a.on_local_step(0.0)
    thetas = [flat(a.model) for a in algos.values()]
    run(algos, 0)  # now deliver
    want, _ = diloco_outer_step(phi0, torch.zeros_like(phi0), group_mean(
        [phi0 - t for t in thetas]), 0.7, 0.9)
    for a in algos.values():
        assert torch.equal(a.phi, want)
        s = a.stats()
        assert s["rounds_with_partner"] == 1 and s["contributions_used"] == 2
    # Each peer sends the others' parts of its g, then its own part's mean to both:
    # 2(n − 1)/n of the vector in all, fp32.
    sizes = [hi - lo for lo, hi in part_bounds(phi0.numel(), 3)]
    for i, a in enumerate(algos.values()):
        assert a.stats()["bytes_sent"] == 4 * (sum(sizes) - sizes[i]) + 4 * 2 * sizes[i]


def test_diloco_counts_and_drops_junk(corpus):
    cfg = DiLoCoConfig(inner_steps=2, warmup=0, round_timeout=1.0)
    a = make_swarm(DiLoCo, cfg, corpus, 2)["p0"]  # a owns part 0 of 2
    (lo0, hi0), (lo1, hi1) = part_bounds(a.numel, 2)
    none = make_codec("none")
    a.on_message("p1", ReducePart(0, 1, 2, none.compress(torch.zeros(hi1 - lo1))), 0.0)
    a.on_message("p1", ReducePart(0, 1, 2, none.compress(torch.zeros(hi1 - lo1))), 0.0)
    a.on_message("p1", ReducePart(9, 0, 2, none.compress(torch.zeros(hi0 - lo0))), 0.0)
    a.on_message("p1", "junk", 0.0)
    for _ in range(2):
        a.on_local_step(0.0)
    assert a.phases.phase == "gather"  # the (wrong-part) contribution was looked at
    nan = none.compress(torch.full((hi1 - lo1,), float("nan")))
    a.on_message("p1", GatherPart(0, 1, 2, 2, nan), 0.0)
    assert a.can_step()
    a.on_message("p1", ReducePart(0, 0, 2, none.compress(torch.zeros(hi0 - lo0))), 0.0)
    s = a.stats()
    assert s["rejects"] == {"bad_part": 1, "duplicate": 1, "non_finite": 1, "stale": 1,
                            "too_far_ahead": 1, "wrong_type": 1}
    assert s["parts_missing"] == 1 and s["contributions_used"] == 0


def test_diloco_drops_a_silent_peer_and_the_rest_agree(corpus):
    cfg = DiLoCoConfig(inner_steps=4, round_timeout=1.0, warmup=0)
    algos = make_swarm(DiLoCo, cfg, corpus, 3)
    run(algos, 8, silent={"p2"})
    a, b = algos["p0"], algos["p1"]
    assert a.stats()["rounds_completed"] == 2 and b.stats()["rounds_completed"] == 2
    assert a.stats()["timeouts"] >= 1
    # p2 never delivered its part's average: both fill it from their own g, so only
    # that part may differ; the parts p0 and p1 averaged are the same bits on both.
    lo, hi = part_bounds(a.numel, 3)[1]
    assert torch.equal(a.phi[:hi], b.phi[:hi]) and not torch.equal(a.phi, b.phi)
    assert a.stats()["parts_missing"] == 2


@pytest.mark.parametrize("cls,cfg", [(NoLoCo, NoLoCoConfig(inner_steps=3, warmup=0)),
                                     (DiLoCo, DiLoCoConfig(inner_steps=3, warmup=0))])
def test_a_joiner_starts_from_the_donors_state(corpus, cls, cfg):
    algos = make_swarm(cls, cfg, corpus, 2)
    run(algos, 7)  # two rounds done, one step into the third
    donor = algos["p0"]
    joiner = make_swarm(cls, cfg, corpus, 3)["p2"]
    joiner.import_state(donor.export_state())
    assert joiner.round == donor.round == 2 and torch.equal(joiner.phi, donor.phi)
    assert torch.equal(flat(joiner.model), donor.phi)
    assert joiner.state_bytes() == 8 * donor.numel
    for _ in range(3):
        joiner.on_local_step(0.0)
    assert not joiner.can_step() and joiner.outbox()  # it joined the exchange of round 2


# --- convergence on the tiny workload (4 replicas, H = 50, 500 inner steps) ----------------

TINY = ModelConfig(preset="tiny")


@pytest.fixture(scope="module")
def converged(corpus):
    out = {}

    def train(name, cls, cfg):
        if name not in out:
            # Batch 16 (32 doubles the time); measured: NoLoCo 2.034, DiLoCo 1.990,
            # NoLoCo int8 2.033 nats.
            algos = make_swarm(cls, cfg, corpus, 4, model_cfg=TINY, batch_size=16)
            run(algos, 500)
            out[name] = ([a.evaluate() for a in algos.values()],
                         replica_spread([a.model for a in algos.values()]),
                         [a.stats() for a in algos.values()])
        return out[name]
    return train


NOLOCO = NoLoCoConfig()
DILOCO = DiLoCoConfig()


@pytest.mark.slow
def test_noloco_and_diloco_converge_and_are_close(converged):
    n_loss, n_spread, n_stats = converged("noloco", NoLoCo, NOLOCO)
    d_loss, d_spread, d_stats = converged("diloco", DiLoCo, DILOCO)
    n_mean, d_mean = sum(n_loss) / 4, sum(d_loss) / 4
    print(f"noloco {n_mean:.4f} {n_loss} {n_spread}\ndiloco {d_mean:.4f} {d_loss} {d_spread}")
    assert n_mean < 2.2 and d_mean < 2.2
    assert n_mean <= 1.05 * d_mean
    assert all(s["rounds_with_partner"] == 10 and not s["rejects"] for s in n_stats + d_stats)
    assert d_spread["max_rel_l2"] == 0.0  # DiLoCo replicas are identical
    assert 0.0 < n_spread["max_rel_l2"] < 0.2  # NoLoCo's differ, but stay close


@pytest.mark.slow
def test_noloco_int8_is_as_good_as_uncompressed(converged):
    n_loss, _, _ = converged("noloco", NoLoCo, NOLOCO)
    q_loss, _, q_stats = converged("noloco-int8", NoLoCo,
                                   dataclasses.replace(NOLOCO, codec="int8"))
    n_mean, q_mean = sum(n_loss) / 4, sum(q_loss) / 4
    print(f"noloco {n_mean:.4f} int8 {q_mean:.4f}")
    assert abs(q_mean - n_mean) <= 0.02 * n_mean
    # int8 sends about a quarter of the bytes (1 byte + 4 per 256 vs 4 per element).
    n_bytes = 10 * 2 * 4 * 136_960
    assert q_stats[0]["bytes_sent"] < 0.27 * n_bytes

"""Batched inner steps (sim/batched.py): the same training as one by one, to fp32 rounding."""

import argparse

import pytest
import torch
from byteswarm.optim.data import Corpus, DataConfig
from byteswarm.optim.diloco import DiLoCoConfig
from byteswarm.optim.inner import flatten
from byteswarm.optim.model import ModelConfig
from byteswarm.optim.noloco import NoLoCoConfig
from byteswarm.optim.spsa import SPSAConfig
from byteswarm.optim.workload import ALGOS, Workload
from byteswarm.sim import cli, runner
from byteswarm.sim.batched import ReplicaBank, adamw_, clip_grad_norms_
from byteswarm.sim.engine import Simulation
from byteswarm.sim.runner import SimConfig, run_algorithm
from byteswarm.sim.scenario import load_scenario

# Max |Δ| between batched and one-by-one weights. In float64 the two are the same math to
# 1e-15, so a wrong step, mask or order shows at once. In fp32 they differ by rounding
# (batched matmuls sum in another order), which Adam amplifies where a gradient is nearly
# zero (rarely seen bytes' embedding rows): seen up to 1.3e-5 after four DiLoCo rounds.
TOL64, TOL32 = 1e-10, 5e-5
IDS = ["p0000", "p0001", "p0002"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors gain nothing from threads, and on a busy shared machine two threads
    # spin-wait on each other: 1 keeps this file under 30 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)  # models are built in float64
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="module")
def workload():
    dcfg = DataConfig(max_bytes=1_000_000, batch_size=4)
    corpus = Corpus.load(dcfg)
    return Workload(ModelConfig(), dcfg, corpus, 0, 64, corpus.val_set(4, 64, 1))


def test_functional_adamw_equals_torch_adamw():
    """Clipping and AdamW on stacked replicas equal torch's, bit for bit, given the same
    gradients (so batched runs differ from one by one only through the gradients)."""
    torch.manual_seed(0)
    shapes = [(5, 3), (7,), (2, 2, 2), (300,)]
    k, lrs, wd = 3, [1e-2, 3e-3, 5e-4], 0.1
    refs = [[torch.randn(s, requires_grad=True) for s in shapes] for _ in range(k)]
    opts = [torch.optim.AdamW(r, lr=lr, betas=(0.9, 0.95), weight_decay=wd)
            for r, lr in zip(refs, lrs)]
    stacked = [torch.stack([r[j].detach() for r in refs]) for j in range(len(shapes))]
    m = [torch.zeros_like(t) for t in stacked]
    v = [torch.zeros_like(t) for t in stacked]
    for step in range(1, 7):
        grads = [torch.randn(k, *s) * 3 for s in shapes]
        for i, (r, opt) in enumerate(zip(refs, opts)):
            for p, g in zip(r, grads):
                p.grad = g[i].clone()
            torch.nn.utils.clip_grad_norm_(r, 1.0)
            opt.step()
        clip_grad_norms_(grads, 1.0)
        adamw_(stacked, grads, m, v, lrs, [step] * k, betas=(0.9, 0.95), eps=1e-8,
               weight_decay=wd)
    for j in range(len(shapes)):
        ref = torch.stack([r[j].detach() for r in refs])
        assert torch.equal(stacked[j], ref)


def max_diff(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.model.parameters(),
                                                           b.model.parameters()))


def make_peers(workload, cfg, bank=None):
    return [ALGOS["noloco"].make(cfg, p, k, len(IDS), IDS, workload,
                                 inner=None if bank is None else bank.engine(k))
            for k, p in enumerate(IDS)]


@pytest.mark.parametrize("max_width", [8, 2])
def test_masking_peers_with_different_pending_counts(workload, float64, max_width):
    """Peers with 3, 1 and 0 pending steps: the short ones must not move at deeper levels
    (a replica stepped with a zero gradient would still move through its AdamW moments).
    With max_width 2, the first level runs in two chunks."""
    cfg = NoLoCoConfig(inner_steps=50, warmup=2, impl="reference")
    losses = {k: [] for k in range(3)}
    bank = ReplicaBank(3, on_loss=lambda k, x: losses[k].append(x), max_width=max_width)
    ref, bat = make_peers(workload, cfg), make_peers(workload, cfg, bank)
    assert bank.stats()["adopted"] == 3
    start = flatten(bat[2].model)
    ref_losses = {k: [] for k in range(3)}
    for counts in ([3, 1, 0], [1, 3, 2]):
        for k, n in enumerate(counts):
            for _ in range(n):
                ref_losses[k].append(ref[k].on_local_step(0.0)["loss"])
                assert "loss" not in bat[k].on_local_step(0.0)
        bank.flush()
        if counts[2] == 0:
            assert torch.equal(flatten(bat[2].model), start)
        for a, b in zip(ref, bat):
            assert max_diff(a, b) < TOL64
    assert bank.stats()["computations"] == (6 if max_width > 2 else 7)
    assert bank.stats()["replica_steps"] == 10
    for k in range(3):
        assert losses[k] == pytest.approx(ref_losses[k], abs=TOL64)


def test_in_flight_step_runs_early_and_is_claimed_later(workload, float64):
    cfg = NoLoCoConfig(inner_steps=50, impl="reference")
    losses = {k: [] for k in range(3)}
    busy = {1}
    bank = ReplicaBank(3, committed=lambda k: k in busy, on_loss=lambda k, x: losses[k].append(x))
    ref, bat = make_peers(workload, cfg), make_peers(workload, cfg, bank)
    for a in (ref[0], ref[0], ref[1], ref[1]):
        a.on_local_step(0.0)
    for a in (bat[0], bat[0], bat[1]):
        a.on_local_step(0.0)
    bat[1].evaluate()  # flushes: peer 1's second step is in flight, so it runs too
    assert bank.stats()["in_flight_steps"] == 1 and bank.stats()["computations"] == 2
    assert len(losses[1]) == 1
    busy.clear()
    bat[1].on_local_step(0.0)  # the step lands: its loss comes out, nothing is computed
    assert len(losses[1]) == 2 and bank.stats()["computations"] == 2
    for a, b in zip(ref, bat):
        assert max_diff(a, b) < TOL64


def run(workload, name, cfg, scenario, batched, monkeypatch, max_hours=1000.0):
    engines = []

    def capture(*args, **kwargs):
        engines.append(Simulation(*args, **kwargs))
        return engines[-1]

    monkeypatch.setattr(runner, "Simulation", capture)
    sim = SimConfig(scenario=scenario, peers=4, steps=12, eval_every=4, batched=batched,
                    max_hours=max_hours)
    res = run_algorithm(name, cfg, sim, load_scenario(scenario), workload)
    return res, engines[0]


@pytest.mark.parametrize("name,scenario,dtype,hours", [
    ("noloco", "datacenter", "float64", 1000.0),
    # Stops at 0.449 s, after one peer's third step (0.448 s), before the others' land.
    ("noloco", "datacenter", "float64", 0.449 / 3600),
    ("noloco", "global-mixed", "float64", 1000.0),
    ("diloco", "datacenter", "float64", 1000.0),
    ("diloco", "mobile-churn", "float64", 1000.0),
    ("diloco", "mobile-churn", "float32", 1000.0)])
def test_batched_run_equals_one_by_one(workload, monkeypatch, request, name, scenario, dtype,
                                       hours):
    """4 peers, 12 steps of H = 3 (4 rounds): the same weights, φ, losses and summary."""
    if dtype == "float64":
        request.getfixturevalue("float64")
    tol = TOL64 if dtype == "float64" else TOL32
    cfg = (NoLoCoConfig if name == "noloco" else DiLoCoConfig)(inner_steps=3, impl="reference")
    one, e1 = run(workload, name, cfg, scenario, False, monkeypatch, hours)
    bat, e2 = run(workload, name, cfg, scenario, True, monkeypatch, hours)
    assert set(one.summary) == set(bat.summary)
    assert one.summary["batched"] is None and bat.summary["batched"]["adopted"] >= 4
    if scenario == "datacenter":  # lock step: the others' last steps of a round run early,
        # unless they would land after the run stops
        assert (bat.summary["batched"]["in_flight_steps"] > 0) == (hours > 1)
    if scenario == "mobile-churn":
        assert bat.summary["joins"] == 1  # a peer left and came back: adopt() again
    for key, value in one.summary.items():
        if key == "final_val_loss":
            assert bat.summary[key] == pytest.approx(value, abs=tol)
        elif key != "batched":
            assert bat.summary[key] == value, key
    for p, st in e1.peers.items():
        a, b = st.algo, e2.peers[p].algo
        assert max_diff(a, b) < tol
        assert (a.phi - b.phi).abs().max() < max(tol, 1e-7)  # φ is fp32 (flatten)
        assert st.step_losses == pytest.approx(e2.peers[p].step_losses, abs=tol)
    assert [r["step"] for r in one.rows] == [r["step"] for r in bat.rows]
    for r1, r2 in zip(one.rows, bat.rows):
        assert r2["val_loss"] == pytest.approx(r1["val_loss"], abs=max(tol, 1e-6))


def test_batched_runs_are_deterministic(workload, monkeypatch):
    cfg = NoLoCoConfig(inner_steps=3, impl="reference")
    a, _ = run(workload, "noloco", cfg, "global-mixed", True, monkeypatch)
    b, _ = run(workload, "noloco", cfg, "global-mixed", True, monkeypatch)
    assert a.summary == b.summary and a.rows == b.rows


def test_spsa_is_left_one_by_one(workload):
    bank = ReplicaBank(1)
    algo = ALGOS["spsa"].make(SPSAConfig(), "p0000", 0, 1, ["p0000"], workload,
                              inner=bank.engine(0))
    assert bank.stats()["adopted"] == 0 and algo.step == 0


def test_cli_switch():
    ap = argparse.ArgumentParser()
    cli.register(ap.add_subparsers())
    for flags, want in (([], False), (["--batched"], True), (["--no-batched"], False)):
        sim, *_ = cli.load_configs(ap.parse_args(["sim", *flags]))
        assert sim.batched is want

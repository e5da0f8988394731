"""The example tasks in examples/: each loads by path, builds the same weights twice, deals
pure batches, and learns under every driver a user would point at it: the simulator with
each algorithm (batched too, for the Hugging Face model), two real node processes, and
``byteswarm train``."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from byteswarm.optim.config import ConfigError
from byteswarm.optim.diloco import DiLoCoConfig
from byteswarm.optim.files import read_metrics
from byteswarm.optim.noloco import NoLoCoConfig
from byteswarm.optim.spsa import SPSAConfig
from byteswarm.optim.task import Job, load_task
from byteswarm.sim.runner import SimConfig, run_algorithm
from byteswarm.sim.scenario import load_scenario
from test_node import EXE, by_step, launch  # noqa: F401  (launch is a fixture)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MLP = f"{EXAMPLES / 'mlp_task.py'}:task"
HF = f"{EXAMPLES / 'hf_task.py'}:task"


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def same_batch(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def initial_val_loss(task) -> float:
    return Job.of(task, 0, 1).evaluate()


def check_interface(task) -> None:
    """Identical builds; ``batch(step)`` a pure function of (k, n, step); fixed val set."""
    torch.manual_seed(1)
    first = task.build()
    torch.manual_seed(2)  # the global generator must not matter to the task...
    state = torch.random.get_rng_state()
    assert same_weights(first, task.build())
    assert torch.equal(state, torch.random.get_rng_state())  # ...nor the task to it
    mine, again, other = task.batches(0, 3), task.batches(0, 3), task.batches(1, 3)
    assert same_batch(mine.batch(7), again.batch(7))  # another object, same step
    assert same_batch(mine.batch(7), mine.batch(7))  # asked twice, out of order
    assert not same_batch(mine.batch(7), mine.batch(8))
    assert not same_batch(mine.batch(7), other.batch(7))
    assert not same_batch(mine.batch(7), task.batches(0, 2).batch(7))  # n is part of it
    val = task.val_batches()
    assert val and all(same_batch(a, b) for a, b in zip(val, task.val_batches(), strict=True))
    loss = task.loss(task.build(), mine.batch(0))
    assert loss.ndim == 0 and math.isfinite(loss.item())


# -- the MLP task ------------------------------------------------------------------------

def test_mlp_task_loads_builds_the_same_weights_and_deals_pure_batches():
    task = load_task(MLP)
    check_interface(task)
    assert load_task(f"{EXAMPLES / 'mlp_task.py'}:MLPTask") == task  # the class, called
    assert abs(initial_val_loss(task) - math.log(task.classes)) < 0.2  # guessing, at first
    # Each peer reads its own examples: peer 0's and peer 1's never overlap.
    a, b = task.batches(0, 2), task.batches(1, 2)
    assert not set(map(tuple, a.x.tolist())) & set(map(tuple, b.x.tolist()))


# SPSA is slow on purpose (one byte per peer per step): a bigger η and more steps, and a
# smaller (but clear) drop than the Adam-based algorithms show. Its first run in a process
# also compiles the perturbation kernel (~10 s).
SIM_RUNS = {
    "noloco": (NoLoCoConfig(inner_steps=10, warmup=5), 60, 0.4),
    "diloco": (DiLoCoConfig(inner_steps=10, warmup=5), 60, 0.4),
    "spsa": (SPSAConfig(lr=1e-2), 120, 0.08),
}


@pytest.mark.parametrize("algo", [
    "noloco", "diloco", pytest.param("spsa", marks=pytest.mark.slow)])
def test_mlp_task_learns_in_the_simulator(algo):
    task = load_task(MLP)
    cfg, steps, drop = SIM_RUNS[algo]
    sim = SimConfig(scenario="datacenter", algo=algo, peers=4, steps=steps,
                    eval_every=steps // 3, eval_peers=2)
    res = run_algorithm(algo, cfg, sim, load_scenario("datacenter"), task)
    before, after = initial_val_loss(task), res.summary["final_val_loss"]
    assert after < before - drop, (before, [r["val_loss"] for r in res.rows], after)
    assert res.summary["peers_alive_at_end"] == 4
    if algo == "spsa":
        assert res.summary["replicas_identical"]


@pytest.mark.slow
def test_train_cli_runs_the_mlp_task(tmp_path):
    out = tmp_path / "train"
    proc = subprocess.run([EXE, "train", "--task", MLP, "--steps", "150", "--eval-every", "50",
                           "--out", str(out), "--quiet"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    first = next(r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r)
    assert summary["task_name"] == "mlp-teacher-16x4" and summary["steps"] == 150
    assert summary["final_val_loss"] < first - 0.1, (first, summary["final_val_loss"])


# -- the Hugging Face task (importing transformers alone takes ~10 s) ---------------------

@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    return load_task(HF)


@pytest.mark.slow
def test_hf_task_loads_builds_the_same_weights_and_deals_pure_batches(hf):
    check_interface(hf)
    before = initial_val_loss(hf)
    assert abs(before - math.log(256)) < 0.5, before  # near guessing among 256 bytes


@pytest.mark.slow
def test_hf_task_weights_file_round_trips_and_a_wrong_one_is_refused(hf, tmp_path):
    ex = sys.modules[type(hf).__module__]  # the example module load_task imported
    model = hf.build()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "init.safetensors"
    ex.save_weights(model, path)
    loaded = dataclasses.replace(hf, weights=str(path)).build()
    assert same_weights(loaded, model) and not same_weights(loaded, hf.build())
    # Still one tensor for the tied output layer and input embedding after loading.
    assert loaded.lm_head.weight is loaded.transformer.wte.weight

    small = tmp_path / "small.safetensors"
    ex.save_weights(dataclasses.replace(hf, n_embd=32).build(), small)
    with pytest.raises(ConfigError, match="shape"):
        dataclasses.replace(hf, weights=str(small)).build()
    shallow = tmp_path / "shallow.safetensors"
    ex.save_weights(dataclasses.replace(hf, n_layer=1).build(), shallow)
    with pytest.raises(ConfigError, match="another model's weights"):
        dataclasses.replace(hf, weights=str(shallow)).build()
    with pytest.raises(ConfigError, match="cannot read"):
        dataclasses.replace(hf, weights=str(tmp_path / "nothing.safetensors")).build()


@functools.cache
def hf_sim(task, batched: bool):
    sim = SimConfig(scenario="datacenter", algo="noloco", peers=2, steps=20, eval_every=10,
                    eval_peers=2, batched=batched)
    return run_algorithm("noloco", NoLoCoConfig(inner_steps=5, warmup=2), sim,
                         load_scenario("datacenter"), task).summary


@pytest.mark.slow
def test_hf_task_learns_with_noloco_in_the_simulator(hf):
    before, after = initial_val_loss(hf), hf_sim(hf, batched=False)["final_val_loss"]
    assert after < before - 1.0, (before, after)


def check_batched_matches(task) -> None:
    if list(task.build().buffers()):  # transformers < 5.2 keeps GPT-2's causal mask so
        pytest.skip("this GPT-2 has buffers, which sim/batched.py runs one by one")
    one_by_one, batched = hf_sim(task, batched=False), hf_sim(task, batched=True)
    assert batched["batched"]["adopted"] == 2  # the replica bank really ran them
    # The same weights up to fp32 rounding (sim/batched.py), so the same loss.
    assert batched["final_val_loss"] == pytest.approx(one_by_one["final_val_loss"], abs=1e-3)
    assert batched["final_val_loss"] < initial_val_loss(task) - 1.0


@pytest.mark.slow
def test_hf_task_batched_simulation_matches_one_by_one(hf):
    # Untied: see the next test for GPT-2's own tied output layer.
    check_batched_matches(dataclasses.replace(hf, tie_embeddings=False))


@pytest.mark.slow
def test_hf_task_batched_simulation_with_tied_embeddings(hf):
    check_batched_matches(hf)


@pytest.mark.slow
def test_hf_task_trains_on_two_real_nodes(launch, tmp_path):  # noqa: F811
    cfg = tmp_path / "noloco.toml"
    cfg.write_text("[node]\nalgo = 'noloco'\nmin_peers = 2\nnum_shards = 2\n"
                   "[noloco]\ninner_steps = 5\nwarmup = 2\nround_timeout = 20.0\n")
    common = ["--task", HF, "--config", str(cfg), "--steps", "15", "--eval-every", "5"]
    a = launch("a", *common, "--shard", "0")
    b = launch("b", *common, "--shard", "1", "--initial-peers", a.maddr(timeout=90))
    for n in (a, b):
        assert n.wait(timeout=150) == 0, n.text()[-3000:]
    for n in (a, b):
        s, rows = n.summary(), by_step(n)
        assert s["stopped"] == "done" and s["config"]["task"] == HF
        assert s["stats"]["rounds_completed"] == 3, s["stats"]
        assert s["stats"]["rounds_with_partner"] >= 2, s["stats"]
        assert sorted(rows) == list(range(1, 16))
        assert rows[15]["val_loss"] < rows[5]["val_loss"] - 0.3, rows
        first, last = (sum(rows[k]["loss"] for k in ks) / 5 for ks in (range(1, 6),
                                                                         range(11, 16)))
        assert last < first - 0.3, (first, last)
    # A group of two ends each round on the same mean φ, and θ ← φ: after a round with its
    # partner, each node evaluates the same weights.
    rows_a, rows_b = by_step(a), by_step(b)
    if a.summary()["stats"]["rounds_with_partner"] == 3:
        for step in (5, 10, 15):
            assert rows_a[step]["val_loss"] == pytest.approx(rows_b[step]["val_loss"], abs=1e-5)

"""The simulator: same weights as a direct run, churn survived, deterministic CLI."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from byteswarm.optim.config import ConfigError
from byteswarm.optim.data import Corpus, DataConfig
from byteswarm.optim.model import ModelConfig
from byteswarm.optim.sansio import EVERYONE
from byteswarm.optim.spsa import SPSAConfig
from byteswarm.optim.workload import ALGOS, Workload
from byteswarm.sim.engine import PeerSpec, Simulation
from byteswarm.sim.network import INF, Link, Network
from byteswarm.sim.runner import SimConfig, run_algorithm, wire_size
from byteswarm.sim.scenario import load_scenario, parse_scenario, shipped
from test_node import CHILD_ENV

EXE = shutil.which("byteswarm") or str(Path(sys.executable).with_name("byteswarm"))


@pytest.fixture(scope="module")
def workload():
    dcfg = DataConfig(max_bytes=3_000_000)
    corpus = Corpus.load(dcfg)
    return Workload(ModelConfig(), dcfg, corpus, 0, 64, corpus.val_set(32, 64, 2))


def test_perfect_network_gives_the_same_weights_as_wiring_directly(workload):
    cfg = SPSAConfig(lr=0.05)
    ids = ["p0000", "p0001", "p0002"]
    direct = [ALGOS["spsa"].make(cfg, p, k, 3, ids, workload) for k, p in enumerate(ids)]
    for _ in range(15):
        sent = []
        for a in direct:
            a.on_local_step(0.0)
            sent += a.outbox()
        for a in direct:
            for s in sent:
                assert s.to == EVERYONE
                if s.msg.peer != a.peer_id:
                    a.on_message(s.msg.peer, s.msg, 0.0)

    specs = [PeerSpec(p, Link(up=INF, down=INF), step_seconds=0.1, jitter=0.5) for p in ids]
    made = {}

    def make(spec):
        made[spec.id] = ALGOS["spsa"].make(cfg, spec.id, ids.index(spec.id), 3, ids, workload)
        return made[spec.id]

    sim = Simulation(specs, make, Network(), size_of=lambda m: wire_size(m, "s"), steps=15)
    sim.run()
    assert all(sim.peers[p].steps == 15 for p in ids)
    assert {a.fingerprint() for a in direct} == {made[p].fingerprint() for p in ids}
    assert len({a.fingerprint() for a in direct}) == 1


def test_churn_scenario_finishes_and_loss_falls(workload):
    sim = SimConfig(scenario="mobile-churn", algo="spsa", peers=8, steps=60, eval_every=20,
                    eval_peers=1)
    scenario = load_scenario("mobile-churn")
    res = run_algorithm("spsa", SPSAConfig(lr=0.02), sim, scenario, workload)
    s = res.summary
    assert s["leaves"] == 2 and s["joins"] == 2  # a quarter left and came back
    assert s["peers_alive_at_end"] == 8 and s["replicas_identical"]
    losses = [r["val_loss"] for r in res.rows]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.1
    assert 0 < s["idle_fraction"] < 1 and s["virtual_seconds"] > 0


def test_shipped_scenarios_load_and_bad_ones_are_refused():
    assert set(shipped()) >= {"datacenter", "home-broadband", "global-mixed", "mobile-churn"}
    for name in shipped():
        sc = load_scenario(name)
        specs = sc.peer_specs(13, 100, 2.0)
        assert len(specs) == 13 and len({s.id for s in specs}) == 13
    with pytest.raises(ConfigError, match="add up to"):
        parse_scenario("x", {"group": [{"share": 0.5}]})
    with pytest.raises(ConfigError, match="unknown key 'up_mpbs'"):
        parse_scenario("x", {"group": [{"share": 1.0, "up_mpbs": 3}]})
    with pytest.raises(ConfigError, match="not one of"):
        load_scenario("no-such-scenario")


def sim_cli(tmp, *args):
    return subprocess.run([EXE, "sim", "--quiet", "--out", str(tmp), "--max-bytes", "2000000",
                           *args], capture_output=True, text=True, timeout=300, env=CHILD_ENV)


@pytest.mark.slow
def test_same_seed_gives_the_same_summary(tmp_path):
    args = ["--algo", "spsa", "--peers", "4", "--steps", "20", "--eval-every", "10",
            "--scenario", "home-broadband"]
    a, b = sim_cli(tmp_path / "a", *args), sim_cli(tmp_path / "b", *args)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    sa = (tmp_path / "a" / "summary.json").read_text()
    assert sa == (tmp_path / "b" / "summary.json").read_text()
    summary = json.loads(sa)["algorithms"]["spsa"]
    for key in ("final_val_loss", "virtual_seconds", "bytes_sent_per_peer", "idle_fraction",
                "sync_seconds_mean", "steps"):
        assert key in summary
    for png in ("loss_vs_time", "loss_vs_step", "bytes_per_peer", "idle_fraction"):
        assert (tmp_path / "a" / f"{png}.png").stat().st_size > 5000
    c = sim_cli(tmp_path / "c", *args[:-2], "--scenario", "home-broadband", "--seed", "1")
    assert c.returncode == 0
    assert (tmp_path / "c" / "summary.json").read_text() != sa


def test_sim_cli_rejects_bad_input(tmp_path):
    p = sim_cli(tmp_path, "--algo", "spsa,bogus")
    assert p.returncode == 2 and "unknown algorithm 'bogus'" in p.stderr
    p = sim_cli(tmp_path, "--scenario", "nowhere")
    assert p.returncode == 2 and "not one of" in p.stderr
    assert "Traceback" not in p.stderr

"""Analytic mode: real protocols at hundreds of peers, the configured model's message sizes,
the network's FIFO fast path, and the DiLoCo/NoLoCo sync-time ratio against swarm size."""

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from byteswarm.optim.codecs import make_codec
from byteswarm.optim.diloco import DiLoCoConfig, GatherPart, ReducePart, part_bounds
from byteswarm.optim.model import ModelConfig
from byteswarm.optim.noloco import NoLoCoConfig, NoLoCoShare
from byteswarm.protocols import wire
from byteswarm.sim.analytic import MessageSizer, make_stand_in, model_numels, run_analytic
from byteswarm.sim.network import Link, Network
from byteswarm.sim.runner import SimConfig
from byteswarm.sim.scenario import load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[1]
EXE = shutil.which("byteswarm") or str(Path(sys.executable).with_name("byteswarm"))
TINY = ModelConfig()  # 136,960 parameters


def bench():
    spec = importlib.util.spec_from_file_location("bench_sim", ROOT / "scripts/bench_sim.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def drain(net):
    out = []
    while (t := net.next_event_time()) < math.inf:
        out += net.advance(t)
    return out


# --- the fast path ------------------------------------------------------------------------

def test_fast_path_single_message_is_latency_plus_size_over_rate():
    net = Network(seed=0, fast_bytes=1500)
    net.add_peer("a", Link(up=1e5, down=1e6, latency=0.010))
    net.add_peer("b", Link(up=1e6, down=5e4, latency=0.020))
    net.send("a", "b", 1000, "x", now=2.0)
    (d,) = drain(net)
    # Bottleneck is b's downlink, 5e4 B/s: 20 ms, plus 30 ms of one-way latency.
    assert d.at == pytest.approx(2.0 + 0.030 + 1000 / 5e4)
    assert net.bytes_sent["a"] == 1000 == net.bytes_received["b"]


def test_fast_path_queues_a_fan_out_and_leaves_big_messages_to_flows():
    net = Network(seed=0, fast_bytes=1500)
    for p in "abcd":
        net.add_peer(p, Link(up=1e4, down=1e6, latency=0.005))
    for dst in "bcd":
        net.send("a", dst, 1000, dst, now=0.0)
    ats = sorted(d.at for d in drain(net))
    # One uplink of 1e4 B/s: 0.1 s per message, back to back, each 10 ms of latency later.
    assert ats == pytest.approx([0.11, 0.21, 0.31])
    net.send("b", "c", 5000, "big", now=1.0)
    net.send("b", "d", 5000, "big", now=1.0)
    # Above fast_bytes: two flows share b's uplink and finish together, as before.
    assert [d.at for d in drain(net)] == pytest.approx([2.01, 2.01])


def test_pairwise_exchange_is_the_same_on_both_network_models():
    # One flow per link direction: sharing never happens, so FIFO and fluid agree (no
    # jitter here: the two paths draw it in different orders).
    sc = parse_scenario("mixed", {"group": [
        {"share": 0.5, "up_mbps": 10.0, "down_mbps": 100.0, "latency_ms": 20.0},
        {"share": 0.5, "up_mbps": 500.0, "down_mbps": 50.0, "latency_ms": 3.0}]})
    b = bench()
    fluid = b.pattern_sync_times("pair", sc, 16, 100_000)
    fifo = b.pattern_sync_times("pair", sc, 16, 100_000, fast_bytes=math.inf)
    assert fluid == pytest.approx(fifo, rel=1e-12) and len(set(fluid)) > 2


# --- message sizes ------------------------------------------------------------------------

@pytest.mark.parametrize("codec", ["none", "fp16", "bf16", "int8", "topk"])
def test_message_sizes_are_those_of_the_configured_model(codec):
    numel = model_numels(TINY)[0]
    g = torch.Generator().manual_seed(0)
    real = torch.randn(numel, generator=g)
    stub = torch.randn(256, generator=g)
    opts = {"fraction": 0.01} if codec == "topk" else {}
    phi_codec = "none" if codec == "topk" else codec
    sizer = MessageSizer(numel, "swarm", topk_fraction=0.01)

    def share(x):
        return NoLoCoShare(3, make_codec(phi_codec).compress(x),
                           make_codec(codec, **opts).compress(x))

    assert sizer(share(stub)) == len(wire.encode(share(real), swarm="swarm"))
    n = 7
    real_bounds, stub_bounds = part_bounds(numel, n), part_bounds(256, n)
    for j in (0, n - 1):
        (lo, hi), (slo, shi) = real_bounds[j], stub_bounds[j]
        for cls, extra in ((ReducePart, ()), (GatherPart, (n,))):
            msg = [cls(3, j, n, *extra, make_codec(codec, **opts).compress(x))
                   for x in (stub[slo:shi], real[lo:hi])]
            assert sizer(msg[0]) == len(wire.encode(msg[1], swarm="swarm"))


def test_an_analytic_run_charges_the_configured_models_bytes():
    numel = model_numels(TINY)[0]
    real = torch.zeros(numel)
    c = make_codec("none").compress(real)
    share = len(wire.encode(NoLoCoShare(0, c, c), swarm="sim"))
    sim = SimConfig(scenario="datacenter", peers=16, steps=20)
    s = run_analytic("noloco", NoLoCoConfig(inner_steps=10), sim,
                     load_scenario("datacenter"), TINY).summary
    assert s["totals"]["rounds_with_partner"] == 32  # 16 peers, 2 rounds, all paired
    assert s["bytes_sent_per_peer"] == {"mean": 2 * share, "max": 2 * share}


# --- the real protocols at scale ----------------------------------------------------------

def test_stand_in_keeps_the_protocol_objects_real():
    ids = [f"p{k:04d}" for k in range(4)]
    algo = make_stand_in("noloco", NoLoCoConfig(inner_steps=2), ids[0], 0, ids, seed=0)
    assert type(algo).__name__ == "NoLoCo" and algo.numel == 256
    before = algo.phi.clone()
    algo.on_local_step(0.0)
    algo.on_local_step(0.1)
    assert not algo.can_step()  # waiting for its partner's share, as a trained one would
    (send,) = algo.outbox()
    assert isinstance(send.msg, NoLoCoShare) and torch.equal(algo.phi, before)


def test_noloco_at_512_peers_pairs_everyone_every_round():
    sim = SimConfig(scenario="home-broadband", peers=512, steps=20)
    s = run_analytic("noloco", NoLoCoConfig(inner_steps=10, round_timeout=1e4), sim,
                     load_scenario("home-broadband"), ModelConfig(preset="small")).summary
    t = s["totals"]
    assert t["rounds_with_partner"] == t["shares_used"] == 2 * 512
    assert t["timeouts"] == 0 and not any(k.startswith("reject") for k in t)
    assert s["distinct_replicas"] > 256  # each pair averaged with itself only
    # A 3.3M-parameter share over 5-20 Mbit/s uplinks takes 10-45 s: it shows in the wait.
    assert 10 < s["blocked_seconds_per_round"] < 60


def test_diloco_at_256_peers_all_reduces_to_one_replica():
    sim = SimConfig(scenario="datacenter", peers=256, steps=2)
    s = run_analytic("diloco", DiLoCoConfig(inner_steps=2), sim, load_scenario("datacenter"),
                     TINY, fast_bytes=math.inf).summary
    t = s["totals"]
    assert t["rounds_with_partner"] == 256 and t["parts_missing"] == 0
    assert t["contributions_used"] == 256 * 255 and t["timeouts"] == 0
    assert s["distinct_replicas"] == 1  # every peer applied the very same mean
    # Each peer sends 2 · 255 parts of 1/256 of the model: about 2 · 4 bytes a parameter.
    assert s["bytes_sent_per_peer"]["mean"] == pytest.approx(8 * 136_960 * 255 / 256,
                                                             rel=0.05)


# --- the claim ------------------------------------------------------------------------------

def test_tree_all_reduce_over_pairwise_grows_like_log2_n():
    b, sc = bench(), load_scenario("datacenter")
    numel = model_numels(ModelConfig(preset="small"))[0]
    pair = {n: sum(b.pattern_sync_times("pair", sc, n, numel)) / n for n in (8, 64, 256)}
    tree = {n: sum(b.pattern_sync_times("tree", sc, n, numel)) / n for n in (8, 64, 256)}
    ratio = {n: tree[n] / pair[n] for n in tree}
    assert ratio[8] < ratio[64] < ratio[256]
    # Bandwidth-bound links: a pair moves 2 vectors once; the tree moves 1 per hop, 2
    # hops per level (up, down), through links shared by two children: 1-2 × log2 N.
    for n, r in ratio.items():
        assert 1.0 * math.log2(n) < r < 2.0 * math.log2(n)
    # The butterfly DiLoCo really runs is bandwidth-optimal: no log2 N growth.
    fly = sum(b.pattern_sync_times("butterfly", sc, 256, numel, fast_bytes=math.inf)) / 256
    assert fly / pair[256] < 1.5


def test_sim_cli_no_train(tmp_path):
    p = subprocess.run([EXE, "sim", "--no-train", "--quiet", "--out", str(tmp_path),
                        "--algo", "noloco", "--peers", "64", "--steps", "50",
                        "--preset", "small"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    s = json.loads((tmp_path / "summary.json").read_text())["algorithms"]["noloco"]
    assert s["final_val_loss"] is None and s["model_params"] == 3_323_392
    assert s["totals"]["rounds_completed"] == 64
    assert s["bytes_sent_per_peer"]["mean"] > 2 * 4 * 3_323_392  # φ and θ − φ, fp32
    assert (tmp_path / "bytes_per_peer.png").exists()

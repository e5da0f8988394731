"""Joiners in the simulator run the catch-up machine over the virtual network
(sim/joining.py): a late joiner of a churn scenario rebuilds the swarm's exact replica, its
time and bytes come from the protocol, and hostile donors that vouch for a poisoned state
win only from as many honest donors as they are (the bound in docs/security.md)."""

from __future__ import annotations

import pytest
from byteswarm.optim.data import Corpus, DataConfig
from byteswarm.optim.model import ModelConfig, build_model, count_params
from byteswarm.optim.noloco import NoLoCoConfig
from byteswarm.optim.spsa import SERVE_EVERY, SPSAConfig
from byteswarm.optim.workload import Workload
from byteswarm.sim.runner import SimConfig, run_algorithm
from byteswarm.sim.scenario import parse_scenario


@pytest.fixture(scope="module")
def workload():
    dcfg = DataConfig(max_bytes=1_000_000, batch_size=4)
    corpus = Corpus.load(dcfg)
    return Workload(ModelConfig(), dcfg, corpus, 0, 64, corpus.val_set(4, 64, 1))


def churn(sybils: int = 0, **extra) -> dict:
    """Four peers on home links; one leaves halfway and comes back 20 s later."""
    return {"description": "test", "forward_seconds": 0.02,
            "churn": {"leave_fraction": 0.25, "leave_at_step": 0.5, "rejoin_after_s": 20.0},
            "group": [{"share": 1.0, "up_mbps": 20.0, "down_mbps": 100.0, "latency_ms": 20.0}],
            "hostile": {"sybils": sybils}, **extra}


def test_an_spsa_joiner_rebuilds_the_exact_replica_through_the_machine(workload):
    steps = 2 * SERVE_EVERY + 20
    sim = SimConfig(peers=4, steps=steps, eval_every=steps, eval_peers=1)
    res = run_algorithm("spsa", SPSAConfig(lr=3e-3, finality_steps=2), sim,
                        parse_scenario("t", churn()), workload)
    c = res.summary["catch_up"]
    assert c["joins"] == 1 and c["caught_up"] == 1 and c["poisoned"] == 0, c
    one = c["each"][0]
    assert one["how"] == "3 identical"  # every live donor voted for one snapshot
    # Bytes: θ once (its chunks spread over the donors), plus indexes, logs and headers.
    theta = 4 * count_params(build_model(ModelConfig()))
    assert theta <= one["bytes"] < 1.2 * theta and one["seconds"] > 0
    assert res.summary["replicas_identical"]  # it took part, bit-identical, to the end


@pytest.mark.parametrize("sybils,fooled", [(0, False), (2, False), (3, True)])
def test_sybils_fool_a_joiner_only_when_they_match_its_honest_donors(workload, sybils, fooled):
    # NoLoCo, H = 5: 3 honest donors stay; the fourth peer rejoins and catches up.
    sim = SimConfig(peers=4, steps=40, eval_every=40, eval_peers=1)
    cfg = NoLoCoConfig(inner_steps=5, warmup=2, round_timeout=5.0)
    res = run_algorithm("noloco", cfg, sim, parse_scenario("t", churn(sybils)), workload)
    c = res.summary["catch_up"]
    assert c["joins"] == 1 and c["caught_up"] == 1, c
    assert c["poisoned"] == int(fooled), c
    assert c["sybils"] == sybils

"""The simulator runs learned deadlines as the node does: a peer that hangs without leaving
costs a few timeouts in all, and the time lost is reported by reason."""

import pytest
from byteswarm.optim.data import Corpus, DataConfig
from byteswarm.optim.model import ModelConfig
from byteswarm.optim.noloco import NoLoCoConfig
from byteswarm.optim.spsa import SPSAConfig
from byteswarm.optim.workload import Workload
from byteswarm.sim.runner import SimConfig, run_algorithm
from byteswarm.sim.scenario import load_scenario, parse_scenario


@pytest.fixture(scope="module")
def workload():
    dcfg = DataConfig(max_bytes=1_000_000, batch_size=4)
    corpus = Corpus.load(dcfg)
    return Workload(ModelConfig(), dcfg, corpus, 0, 32, corpus.val_set(4, 32, 1))


def test_a_hung_peer_costs_spsa_a_few_timeouts_not_one_per_step(workload):
    scenario = load_scenario("faults")  # 8 peers: one hangs at step 10 of 40, listed 60 s
    sim = SimConfig(scenario="faults", algo="spsa", peers=8, steps=40, eval_every=40,
                    eval_peers=1)
    runs = {mode: run_algorithm("spsa", SPSAConfig(step_timeout=2.0, deadline=mode), sim,
                                scenario, workload).summary
            for mode in ("learned", "fixed")}
    learned, fixed = runs["learned"], runs["fixed"]
    assert learned["replicas_identical"] and fixed["replicas_identical"]
    # Fixed: every step of the 30 after the hang waits 2 s for it, until it is delisted
    # at 60 s. Learned: each peer waits for it dormant_after = 3 times, then not at all.
    assert fixed["virtual_seconds"] > 55
    assert learned["virtual_seconds"] < 3 * 2.0 + 10
    assert learned["deadlines"]["went_dormant"] == 7  # every working peer, once
    assert learned["utilisation"] > 2 * fixed["utilisation"]  # 0.40 against 0.15
    assert fixed["lost"]["timeout"] > 0.5
    total = learned["utilisation"] + sum(learned["lost"].values())
    assert total == pytest.approx(1.0, abs=0.02)  # every present second is accounted for


def test_noloco_waits_for_a_hung_partner_only_as_long_as_partners_take(workload):
    # Alike peers: a partner's share comes within a few tens of ms of our own, so once a
    # few rounds are seen a hung partner costs that (with a margin), not round_timeout.
    scenario = parse_scenario("alike", {
        "forward_seconds": 0.05,
        "group": [{"up_mbps": 100.0, "down_mbps": 100.0, "latency_ms": 10.0}],
        "churn": {"hang_fraction": 0.125, "hang_at_step": 0.25, "hang_listed_s": 600.0}})
    sim = SimConfig(scenario="alike", algo="noloco", peers=8, steps=40, eval_every=40,
                    eval_peers=1)
    runs = {mode: run_algorithm("noloco", NoLoCoConfig(inner_steps=4, round_timeout=5.0,
                                                        deadline=mode), sim, scenario,
                                workload).summary
            for mode in ("learned", "fixed")}
    learned, fixed = runs["learned"], runs["fixed"]
    assert fixed["lost"]["timeout"] > 0.3  # a partner drawn with the hung peer waits 5 s
    # (Measured: 0.18 against 0.35 of the time with the 0.5 s floor. Not less: a peer that
    # waited out the hung one is late for its next partners, who may cut it off too.)
    assert learned["lost"]["timeout"] < fixed["lost"]["timeout"] * 0.6
    assert learned["virtual_seconds"] < fixed["virtual_seconds"] * 0.8
    assert learned["deadlines"]["wait_median"] < fixed["deadlines"]["wait_median"] * 0.7  # 2.97 s

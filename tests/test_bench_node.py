"""scripts/bench_node.py's (and node_procs.py's) pure helpers: no node process is started,
nothing is timed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from byteswarm.optim import config as C
from byteswarm.optim.spsa import Record
from byteswarm.optim.workload import ALGOS
from byteswarm.protocols import wire
from byteswarm.sim.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_node", ROOT / "scripts/bench_node.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_file_gives_the_node_the_simulators_config(bench, tmp_path):
    for algo, cfg in bench.algo_configs(10).items():
        path = tmp_path / f"{algo}.toml"
        path.write_text(bench.config_toml(algo, cfg))
        file = C.load_toml(path)
        assert file["node"] == {"algo": algo}
        section = dict(file[algo])
        if algo == "spsa":  # the node fills SPSA's swarm from --swarm
            assert "swarm" not in section
            section["swarm"] = bench.SWARM
        assert C.from_mapping(ALGOS[algo].config_cls, section, where=algo) == cfg


def test_frames_follow_each_protocols_message_pattern(bench):
    assert bench.node_frames("spsa", 8, {"records_sent": 30}) == 30 * 7
    assert bench.node_frames("noloco", 8, {"rounds_completed": 2}) == 2
    assert bench.node_frames("diloco", 8, {"rounds_completed": 2}) == 2 * 2 * 7
    assert bench.node_frames("diloco", 1, {"rounds_completed": 2}) == 0


def test_steps_per_second_leaves_out_start_and_last_row(bench):
    procs = bench.sys.modules["node_procs"]  # loaded by bench_node from scripts/
    rows = [{"step": s, "seconds": 5.0 + 0.1 * s} for s in range(1, 51)]
    rows[-1]["seconds"] += 3.0  # the final evaluation
    assert procs.steps_per_second(rows) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        procs.steps_per_second(rows[:10])


def test_long_ids_keep_the_order_and_weigh_an_spsa_record_as_a_node_does(bench):
    sc = load_scenario("datacenter")
    short = [s.id for s in sc.peer_specs(4, 3, 2.0)]
    long = [s.id for s in bench.long_ids(sc).peer_specs(4, 3, 2.0)]
    assert all(len(p) == bench.PEER_ID_CHARS for p in long) and sorted(long) == long
    assert [p[:len(q)] for p, q in zip(long, short)] == short
    # 52 characters with a 2-byte msgpack str8 header against 5 with a 1-byte fixstr one.
    size = lambda peer: len(wire.encode(Record(3, peer, -5), swarm=bench.SWARM))
    assert size(long[0]) - size(short[0]) == 52 + 2 - (5 + 1)


def test_problems_flags_a_node_that_skipped_training(bench):
    def summary(**stats):
        return {"steps": 20, "sent_by_type": {"NoLoCoShare": 1}, "received_by_type": {},
                "rejects": {}, "stats": {"rounds_with_partner": 2, "timeouts": 0, **stats}}

    good = [summary(), summary()]
    assert bench.problems("noloco", 2, 20, good, inner_steps=10) == []
    synced = summary(rounds_with_partner=0)
    synced["received_by_type"]["state"] = 1_000_000
    found = bench.problems("noloco", 2, 20, [summary(), synced], inner_steps=10)
    assert found == ["n1: state download", "n1: 0 of 2 rounds with partners"]
    assert bench.problems("noloco", 3, 20, [summary(rounds_with_partner=1)] * 3,
                          inner_steps=10) == []  # an odd swarm leaves one out a round
    spsa = {"steps": 30, "sent_by_type": {}, "received_by_type": {}, "rejects": {},
            "stats": {"records_applied": 59, "steps_timed_out": 1}}
    assert bench.problems("spsa", 2, 30, [spsa]) == [
        "n0: timeouts", "n0: 59 records applied, not 60"]

"""One simulated run of one algorithm: build peers, run the engine, measure.

The driver is thin: the algorithm objects do the work; this module wires them to the
engine, evaluates validation loss at fixed step counts, and turns the engine's clocks and
the network's byte counters into the summary numbers. With ``batched``, NoLoCo's and
DiLoCo's inner steps are deferred and run all peers' together (sim/batched.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from byteswarm.optim.config import opt
from byteswarm.optim.spsa import Record
from byteswarm.optim.task import Task
from byteswarm.optim.workload import ALGOS
from byteswarm.protocols import wire

from .batched import ReplicaBank
from .engine import Simulation
from .joining import Joins
from .scenario import Scenario


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    scenario: str = opt("global-mixed", "scenario name (datacenter, home-broadband, "
                        "global-mixed, mobile-churn) or path to a TOML file")
    algo: str = opt("spsa,noloco,diloco", "algorithms to compare, comma-separated")
    peers: int = opt(8, "simulated peers", lo=1, hi=100_000)
    steps: int = opt(300, "local steps per peer", lo=1)
    eval_every: int = opt(50, "evaluate validation loss every this many local steps", lo=1)
    eval_peers: int = opt(2, "peers whose replicas are evaluated (mean is reported)", lo=1)
    seed: int = opt(0, "seed for init, data, network and compute draws", lo=0, hi=2**62)
    max_hours: float = opt(1000.0, "stop a run after this much virtual time", lo=0.0,
                           lo_open=True)
    batched: bool = opt(False, "run NoLoCo's and DiLoCo's inner steps for all peers as one "
                        "batched computation (sim/batched.py; the same weights up to fp32 "
                        "rounding); SPSA always steps one by one. Off: on CPU it is no faster")


@dataclass
class RunResult:
    algo: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


PEER_ID_CHARS = 52  # a node's libp2p peer id (12D3KooW…), which every SPSA record carries


def wire_size(msg: Any, swarm: str) -> int:
    """Encoded bytes of ``msg`` as a node would send it: the simulator's short peer ids
    (p0000) are charged at a real peer id's length, which is most of an SPSA record."""
    if isinstance(msg, Record):
        msg = Record(msg.step, msg.peer.ljust(PEER_ID_CHARS, "0"), msg.q)
    return len(wire.encode(msg, swarm=swarm))


def run_algorithm(name: str, algo_cfg: Any, sim: SimConfig, scenario: Scenario, w: Task,
                  *, device: str = "cpu", dtype: str = "fp32",
                  progress: Callable[[int], None] | None = None) -> RunResult:
    entry = ALGOS[name]
    specs = scenario.peer_specs(sim.peers, sim.steps, entry.forwards_per_step)
    ids = [s.id for s in specs]
    by_id = {s.id: k for k, s in enumerate(specs)}
    eval_ids = set(ids[: sim.eval_peers])
    result = RunResult(name)
    swarm = getattr(algo_cfg, "swarm", "sim")

    bank = None
    if sim.batched:  # slot k is peer ids[k]; losses arrive when computed (sim/batched.py)
        def on_loss(k: int, loss: float) -> None:
            engine.peers[ids[k]].step_losses.append(loss)

        bank = ReplicaBank(len(ids), committed=lambda k: engine.step_committed(ids[k]),
                           on_loss=on_loss)

    def make(spec):
        k = by_id[spec.id]
        return entry.make(algo_cfg, spec.id, k, len(ids), ids, w, device=device, dtype=dtype,
                          inner=None if bank is None else bank.engine(k))

    def on_step(engine: Simulation, peer: str, info: dict) -> None:
        st = engine.peers[peer]
        if progress is not None:
            progress(1)
        if peer in eval_ids and st.steps % sim.eval_every == 0:
            val = st.algo.evaluate()  # first: batched, it completes step_losses
            recent = st.step_losses[-sim.eval_every:]
            result.rows.append({"algo": name, "peer": peer, "step": st.steps,
                                "time": round(engine.now, 6),
                                "loss": round(statistics.fmean(recent), 6),
                                "val_loss": round(val, 6)})

    joins = Joins(hostile=scenario.hostile)
    engine = Simulation(specs, make, scenario.network(sim.seed), steps=sim.steps, seed=sim.seed,
                        size_of=lambda m: wire_size(m, swarm),
                        max_seconds=sim.max_hours * 3600, joins=joins, on_step=on_step)
    engine.run()

    alive = engine.working()
    final = [st.algo.evaluate() for st in alive if st.spec.id in eval_ids]
    if not final and alive:
        final = [alive[0].algo.evaluate()]
    sent = [engine.net.bytes_sent.get(p, 0) for p in ids]
    received = [engine.net.bytes_received.get(p, 0) for p in ids]
    present = {p: st for p, st in engine.peers.items() if st.present_seconds > 0}
    idle = {p: max(0.0, st.present_seconds - st.busy_seconds) for p, st in present.items()}
    rounds_per_step = entry.rounds_per_step(algo_cfg)
    sync = [idle[p] / max(1.0, st.steps * rounds_per_step) for p, st in present.items()]
    stats = [st.algo.stats() for st in alive]
    result.summary = {
        "final_val_loss": statistics.fmean(final) if final else None,
        "virtual_seconds": round(engine.now, 6),
        "steps": sim.steps,
        "peers": sim.peers,
        "peers_alive_at_end": len(alive),
        "bytes_sent_per_peer": {"mean": statistics.fmean(sent), "max": max(sent)},
        "bytes_received_per_peer": {"mean": statistics.fmean(received), "max": max(received)},
        "idle_fraction": statistics.fmean(idle[p] / present[p].present_seconds
                                          for p in present) if present else 0.0,
        "sync_seconds_mean": statistics.fmean(sync) if sync else 0.0,
        **engine.utilisation(),
        "deadlines": _deadlines(stats),
        "messages_delivered": engine.counts["messages"],
        "joins": engine.counts["joins"], "leaves": engine.counts["leaves"],
        "rejects": _sum_rejects(stats),
        "batched": bank.stats() if bank is not None and bank.counts["adopted"] else None,
        "catch_up": joins.summary(),
    }
    if name == "spsa":
        result.summary["replicas_identical"] = len({st.algo.fingerprint() for st in alive
                                                    if st.algo.closed == max(
                                                        a.algo.closed for a in alive)}) == 1
    return result


def _deadlines(stats: list[dict]) -> dict[str, float]:
    """The learned waits at the end (median over peers of each one's median and longest
    wait) and the deadline counters summed over peers."""
    ds = [s["deadlines"] for s in stats if "deadlines" in s]
    if not ds:
        return {}
    out: dict[str, float] = {k: statistics.median(d[k] for d in ds)
                             for k in ("wait_median", "wait_max")}
    for k in ("deadlines_missed", "went_dormant", "woke"):
        out[k] = sum(d[k] for d in ds)
    return out


def _sum_rejects(stats: list[dict]) -> dict[str, int]:
    total: dict[str, int] = {}
    for s in stats:
        for k, v in s.get("rejects", {}).items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def utilisation_line(s: dict) -> str:
    """Compute utilisation, where the rest went, and the waits learned (if any)."""
    lost = s["lost"]
    line = (f"  util {100 * s['utilisation']:4.1f}% (waiting {100 * lost['waiting']:.0f}%, "
            f"timeouts {100 * lost['timeout']:.0f}%, done {100 * lost['done']:.0f}%)")
    d = s.get("deadlines")
    if d:
        line += f"  waits {d['wait_median']:.2f}/{d['wait_max']:.2f} s"
    return line

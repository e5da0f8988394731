"""Analytic mode (``byteswarm sim --no-train``): the real protocols, timing only.

Theory of operation. Every peer still runs the real algorithm object — SPSA's records and
step closing, NoLoCo's group draw and outer step, DiLoCo's butterfly all-reduce — and the
engine still charges each local step its virtual compute time. What goes is the training:
each object gets a stand-in model of ``max(256, N)`` parameters, so a step costs
microseconds instead of a forward and backward pass (SPSA's two forward passes run on a
256-way softmax of those parameters; NoLoCo's and DiLoCo's inner phase becomes one pull
of θ toward a peer-specific target, so replicas drift apart as trained ones do and the
outer steps have something to average). The messages therefore carry stand-in tensors, but
the network is charged what the *configured* model would send: ``MessageSizer`` swaps each
tensor's encoded length for the length ``protocols.tensors.encode`` gives the same codec
on the real vector (or the real all-reduce part), and keeps SPSA records as they are
encoded. A joiner's state download is sized the same way.

Scaling. ``AnalyticSimulation`` batches the membership updates of peers that join at the
same instant (the base engine tells every member of every join: O(N²) calls at start-up),
caches the sorted list of live peers and checks for the end in amortised O(1). Messages of
at most ``fast_bytes`` (default one packet) take the network's FIFO fast path, which SPSA's
all-to-all needs; raise it to take DiLoCo's N² all-reduce flows off the fluid model too.

Limits, measured on two CPU cores: NoLoCo is O(N) per round and does 1024 peers × 100
steps in seconds. SPSA at N peers is N² records a step and the object rebuilds a set of
the step's records on each one (O(N³) a step); DiLoCo's butterfly is N² parts a round,
each checked against the member list (O(N³) a round): both are fine at a few hundred peers
and slow at a thousand (see scripts/bench_sim.py). Nothing here says anything about loss.

scripts/bench_sim.py measures one outer round's exchange alone, straight through the
network model, with ``MessageSizer``'s sizes: NoLoCo's pairwise shares against DiLoCo's
butterfly and against tree and ring all-reduce.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from byteswarm.optim.codecs import Compressed
from byteswarm.optim.diloco import GatherPart, ReducePart, part_bounds
from byteswarm.optim.flat import FlatParams
from byteswarm.optim.model import VOCAB, ModelConfig, build_model, count_params, lm_loss
from byteswarm.optim.noloco import NoLoCoShare
from byteswarm.optim.sansio import Algorithm
from byteswarm.optim.workload import ALGOS
from byteswarm.protocols import tensors, wire
from torch import nn

from .engine import Event, Simulation
from .joining import Joins
from .runner import RunResult, SimConfig, utilisation_line, wire_size
from .scenario import Scenario

PACKET = 1500  # bytes: the default fast-path limit, one Ethernet frame


# --- the stand-in workload --------------------------------------------------------------

class StandInModel(nn.Module):
    """d parameters; logits over the 256 bytes are the first 256 of them."""

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w[:VOCAB].expand(*x.shape, VOCAB)  # (B, T, 256)


class StandInTask:
    """d parameters, one fixed byte per peer: a (1, 1) batch costs nothing to make."""

    name = "stand-in"

    def __init__(self, d: int):
        self.d = d

    def build(self) -> StandInModel:
        return StandInModel(self.d)

    def loss(self, model, batch) -> torch.Tensor:
        return lm_loss(model, *batch)

    def batches(self, k: int, n: int) -> StandInBatches:
        return StandInBatches(k)

    def val_batches(self) -> list:
        return []


class StandInBatches:
    def __init__(self, k: int):
        self.x = torch.zeros(1, 1, dtype=torch.long)
        self.y = torch.full((1, 1), k % VOCAB, dtype=torch.long)

    def batch(self, step: int):
        return self.x, self.y


class StandInInner:
    """NoLoCo's/DiLoCo's inner phase replaced: θ ← θ − 0.1·(θ − target), no autograd.

    Targets sit 1% below the shared start, ±10% per peer and element, so every peer's
    outer update points the same way with a similar norm (the objects' norm checks pass)."""

    def __init__(self, model: StandInModel, k: int, seed: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        noise = torch.rand(model.w.numel(), generator=g) * 2 - 1
        self.w, self.target = model.w, model.w.detach() - 0.01 * (1 + 0.1 * noise)
        self.step_count = 0

    def step(self) -> dict[str, float]:
        with torch.no_grad():
            self.w.sub_(self.w - self.target, alpha=0.1)
        self.step_count += 1
        return {}

    def settle(self) -> None:
        pass  # every step is done when step() returns


def make_stand_in(name: str, cfg: Any, peer: str, k: int, ids: list[str],
                  seed: int) -> Algorithm:
    """The real algorithm object of ``name`` on the stand-in task, with the stand-in inner
    phase as its inner-step engine (NoLoCo, DiLoCo)."""
    return ALGOS[name].make(cfg, peer, k, len(ids), ids, StandInTask(max(VOCAB, len(ids))),
                            inner=lambda loop: StandInInner(loop.model, k, seed))


# --- what the configured model would put on the wire ------------------------------------

def _bin(n: int) -> int:
    """msgpack bytes of a bin object holding n bytes (bin 8 / 16 / 32 header)."""
    return n + (2 if n < 1 << 8 else 3 if n < 1 << 16 else 5)


def blob_bytes(c: Compressed, numel: int, topk_fraction: float) -> int:
    """len(tensors.encode(x)) for x compressed as c was, but from a numel-element vector."""
    item = c.values.element_size()
    if c.codec == "int8":
        payload = numel + 4 * -(-numel // c.block)
    elif c.codec == "topk":
        k = c.values.numel() if numel == c.numel else min(numel,
                                                           math.ceil(topk_fraction * numel))
        payload = k * (item + 4)
    else:
        payload = numel * item
    return tensors.HEADER.size + payload


class MessageSizer:
    """Encoded bytes of a message as the configured model (``numel`` parameters) sends it."""

    def __init__(self, numel: int, swarm: str, topk_fraction: float = 1.0):
        self.numel, self.swarm, self.topk_fraction = numel, swarm, topk_fraction
        self._bounds: dict[int, list[tuple[int, int]]] = {}

    def real_numel(self, msg: Any, c: Compressed) -> int:
        if isinstance(msg, NoLoCoShare):
            return self.numel
        if msg.n_parts not in self._bounds:
            self._bounds[msg.n_parts] = part_bounds(self.numel, msg.n_parts)
        lo, hi = self._bounds[msg.n_parts][msg.part]
        return hi - lo

    def __call__(self, msg: Any) -> int:
        size = len(wire.encode(msg, swarm=self.swarm))
        if isinstance(msg, NoLoCoShare):
            blobs = (msg.phi, msg.update)
        elif isinstance(msg, (ReducePart, GatherPart)):
            blobs = (msg.data,)
        else:
            return wire_size(msg, self.swarm)  # SPSA records: at a real peer id's length
        for c in blobs:
            real = blob_bytes(c, self.real_numel(msg, c), self.topk_fraction)
            size += _bin(real) - _bin(blob_bytes(c, c.numel, self.topk_fraction))
        return size


def model_numels(mcfg: ModelConfig) -> tuple[int, int]:
    """(trainable parameters, SPSA's flat buffer length with padding) of the model."""
    model = build_model(mcfg)
    n = count_params(model)
    return n, FlatParams(model).numel


# --- the engine, scaled -----------------------------------------------------------------

class AnalyticSimulation(Simulation):
    """The engine with O(N) start-up and cheap per-event bookkeeping. Peers that join
    together start stepping once all have joined, so compute draws come in another order
    than in the base engine (same distributions)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._alive: list[str] | None = None
        self._members_due = False
        self._unfinished: str | None = None
        super().__init__(*args, **kwargs)

    def alive(self) -> list[str]:
        if self._alive is None:
            self._alive = super().alive()
        return self._alive

    def _membership_changed(self) -> None:
        # Joins at one instant become one update, after all of them (ties pop in order).
        self._alive = None
        if not self._members_due:
            self._members_due = True
            self._push(self.now, Event("members", ""))

    def _on_members(self, ev: Event) -> None:
        self._members_due = False
        super()._membership_changed()

    def _finished(self) -> bool:
        if self._joins_pending or self._syncing or self._members_due or self.in_flight():
            return False
        busy = lambda st: not st.hung and (st.steps < self.target
                                           or st.algo.next_deadline() is not None)
        p = self._unfinished
        if p is not None and self.peers[p].alive and busy(self.peers[p]):
            return False
        self._unfinished = next((q for q in self.alive() if busy(self.peers[q])), None)
        return self._unfinished is None


def run_analytic(name: str, algo_cfg: Any, sim: SimConfig, scenario: Scenario,
                 mcfg: ModelConfig, *, fast_bytes: float = PACKET,
                 numels: tuple[int, int] | None = None,
                 progress: Callable[[int], None] | None = None) -> RunResult:
    """One algorithm in analytic mode; the summary has the keys of ``run_algorithm``'s
    (``final_val_loss`` is None) plus the objects' round counters and the wall time."""
    entry = ALGOS[name]
    numel, flat_numel = numels or model_numels(mcfg)
    specs = scenario.peer_specs(sim.peers, sim.steps, entry.forwards_per_step)
    ids = [s.id for s in specs]
    by_id = {s.id: k for k, s in enumerate(specs)}
    eval_ids = set(ids[: sim.eval_peers])
    result = RunResult(name)
    sizer = MessageSizer(numel, getattr(algo_cfg, "swarm", "sim"),
                         getattr(algo_cfg, "topk_fraction", 1.0))

    def on_step(engine: Simulation, peer: str, info: dict) -> None:
        st = engine.peers[peer]
        if progress is not None:
            progress(1)
        if peer in eval_ids and st.steps % sim.eval_every == 0:
            result.rows.append({"algo": name, "peer": peer, "step": st.steps,
                                "time": round(engine.now, 6)})

    net = scenario.network(sim.seed)
    net.fast_bytes = fast_bytes
    # Joiners download stand-in states; charge them at the configured model's size.
    probe = make_stand_in(name, algo_cfg, "probe", 0, ids, sim.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # stand-in tensors are tiny: threads only contend (100×)
    t0 = time.perf_counter()
    engine = AnalyticSimulation(
        specs, lambda s: make_stand_in(name, algo_cfg, s.id, by_id[s.id], ids, sim.seed),
        net, size_of=sizer, steps=sim.steps, seed=sim.seed, max_seconds=sim.max_hours * 3600,
        joins=Joins(hostile=scenario.hostile, scale=numel / probe.numel), on_step=on_step)
    try:
        engine.run()
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - t0
    result.summary = summarize(engine, ids, entry.rounds_per_step(algo_cfg), sim)
    rounds = max(1.0, sim.steps * entry.rounds_per_step(algo_cfg))
    # Time blocked by the protocol (waiting for a group, an all-reduce, a step's records),
    # not for the run's end: what "sync seconds" should mean at any length.
    result.summary["blocked_seconds_per_round"] = statistics.fmean(
        sum(engine.peers[p].lost.get(r, 0.0) for r in ("waiting", "timeout")) / rounds
        for p in ids)
    result.summary.update(model_params=numel, fast_bytes=fast_bytes, wall_seconds=round(wall, 3),
                          peer_steps_per_wall_second=round(
                              sum(st.steps for st in engine.peers.values()) / wall, 1))
    return result


def summarize(engine: Simulation, ids: list[str], rounds_per_step: float,
              sim: SimConfig) -> dict[str, Any]:
    """``run_algorithm``'s summary numbers, from the engine's clocks and counters."""
    net = engine.net
    alive = engine.working()
    sent = [net.bytes_sent.get(p, 0) for p in ids]
    received = [net.bytes_received.get(p, 0) for p in ids]
    present = {p: st for p, st in engine.peers.items() if st.present_seconds > 0}
    idle = {p: max(0.0, st.present_seconds - st.busy_seconds) for p, st in present.items()}
    sync = [idle[p] / max(1.0, st.steps * rounds_per_step) for p, st in present.items()]
    counters: dict[str, int] = {}
    for st in alive:
        for k, v in st.algo.stats().items():
            if k in ("rejects",):
                for r, n in v.items():
                    counters[f"reject_{r}"] = counters.get(f"reject_{r}", 0) + n
            elif isinstance(v, int) and k not in ("round", "closed_step", "final_step",
                                                  "bytes_sent"):  # stand-in bytes
                counters[k] = counters.get(k, 0) + v
    return {
        "final_val_loss": None, "virtual_seconds": round(engine.now, 6), "steps": sim.steps,
        "peers": sim.peers, "peers_alive_at_end": len(alive),
        "bytes_sent_per_peer": {"mean": statistics.fmean(sent), "max": max(sent)},
        "bytes_received_per_peer": {"mean": statistics.fmean(received),
                                    "max": max(received)},
        "idle_fraction": statistics.fmean(idle[p] / present[p].present_seconds
                                          for p in present) if present else 0.0,
        "sync_seconds_mean": statistics.fmean(sync) if sync else 0.0,
        **engine.utilisation(),
        "messages_delivered": engine.counts["messages"],
        "joins": engine.counts["joins"], "leaves": engine.counts["leaves"],
        "catch_up": engine.joins.summary() if engine.joins is not None else None,
        "totals": dict(sorted(counters.items())),
        # φ for NoLoCo/DiLoCo, θ for SPSA: DiLoCo and SPSA keep one, NoLoCo drifts apart.
        "distinct_replicas": len({getattr(st.algo, "phi", getattr(st.algo, "theta", None))
                                  .numpy().tobytes() for st in alive}),
    }


# --- the command line (``byteswarm sim --no-train``) ------------------------------------

def run_cli(args: Any, sim: SimConfig, mcfg: ModelConfig, algo_cfgs: dict[str, Any],
            scenario: Scenario, out: Any) -> int:
    """Run each algorithm in analytic mode; write summary.json, metrics.jsonl and the
    traffic and idle-fraction charts to ``out`` (no loss: nothing is trained)."""
    from byteswarm.optim import config as C
    from byteswarm.optim.files import MetricsLog, save_json

    from . import plots

    fast = PACKET if args.fast_bytes is None else args.fast_bytes
    numels = model_numels(mcfg)
    summary = {"scenario": scenario.name, "description": scenario.description,
               "mode": "analytic (--no-train): real protocols, stand-in training, "
                       "message sizes of the configured model",
               "config": {"sim": C.to_dict(sim), "model": C.to_dict(mcfg.resolved())},
               "algorithms": {}}
    log = MetricsLog(out / "metrics.jsonl")
    results = []
    for name, acfg in algo_cfgs.items():
        res = run_analytic(name, acfg, sim, scenario, mcfg, fast_bytes=fast, numels=numels)
        for row in res.rows:
            log.write(row)
        summary["algorithms"][name] = {**res.summary, "config": C.to_dict(acfg)}
        results.append(res)
        s = res.summary
        print(f"  {name:7s} virtual {s['virtual_seconds']:9.1f} s"
              f"  sync/round {s['sync_seconds_mean']:8.2f} s"
              f"  sent/peer {s['bytes_sent_per_peer']['mean'] / 1e6:9.3f} MB"
              + utilisation_line(s) + f"  wall {s['wall_seconds']:.1f} s",
              flush=True)
    log.close()
    save_json(out / "summary.json", summary)
    plots.plot_bars(out / "bytes_per_peer.png",
                    {r.algo: r.summary["bytes_sent_per_peer"]["mean"] for r in results},
                    ylabel="bytes sent per peer (mean)", logy=True,
                    title=f"traffic, {numels[0] / 1e6:.1f}M params — {scenario.name}")
    plots.plot_bars(out / "idle_fraction.png",
                    {r.algo: r.summary["idle_fraction"] for r in results},
                    ylabel="fraction of time waiting", title=f"idle fraction — {scenario.name}")
    print(f"{scenario.name}, {sim.peers} peers, {sim.steps} steps each, analytic -> {out}")
    return 0

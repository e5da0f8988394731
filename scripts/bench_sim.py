"""Benchmark the simulator: DiLoCo/NoLoCo synchronisation time against swarm size, and
simulated peer-steps per wall-clock second with real training.

    python scripts/bench_sim.py                # a readable table, plot in runs/bench_sim
    python scripts/bench_sim.py --json         # one JSON object
    python scripts/bench_sim.py --quick        # N up to 256, fewer steps

``sync_ratio``: one outer round's exchange alone, every peer starting at 0, straight
through the network model (``pattern_sync_times``) with the configured
model's encoded message sizes: the mean over peers of the seconds until a peer holds the
round's result, for DiLoCo's all-reduce over NoLoCo's pairwise exchange of φ and θ − φ
(one share each way, groups of 2). Three all-reduces: ``butterfly`` (what optim/diloco.py
does: reduce-scatter to part owners, all-gather back; on the network's FIFO fast path, as
the fluid model is O(N³) for N² flows — ``butterfly_fluid`` is the fluid model, N ≤ 64),
``tree`` (binary tree, reduce to the root then broadcast, whole vector per hop, not
pipelined; the collective arXiv 2506.10911 compares with) and ``ring`` (2(N − 1) steps
of 1/N of the vector). The pairwise exchange is the same on both network models (one flow
per link direction). ``engine_sync_ratio``: the same ratio from whole analytic-mode runs
(``blocked_seconds_per_round``: time a peer sits with ``can_step()`` false, so compute
jitter and stragglers count too), N ≤ 256.

``peer_steps_per_second``: real training (``run_algorithm``, tiny preset), simulated
peer-steps per wall-clock second for N = 8 and 64, after a warm-up that pays
torch.compile. ``batched_speedup``: the same NoLoCo runs (datacenter, H = 5) one by one
and with ``SimConfig.batched`` (sim/batched.py: all peers' inner steps as one
``torch.func.vmap`` computation), wall time one-by-one / batched, best of ``--repeats``,
keyed by N; ``batched_detail`` has the seconds, the widths of the batched computations
and both runs' final validation loss.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from byteswarm.optim.codecs import make_codec
from byteswarm.optim.data import Corpus, DataConfig
from byteswarm.optim.diloco import DiLoCoConfig, ReducePart
from byteswarm.optim.model import ModelConfig
from byteswarm.optim.noloco import NoLoCoConfig, NoLoCoShare, draw_groups
from byteswarm.optim.spsa import SPSAConfig
from byteswarm.optim.workload import Workload
from byteswarm.sim import plots
from byteswarm.sim.analytic import MessageSizer, model_numels, run_analytic
from byteswarm.sim.network import Network
from byteswarm.sim.runner import SimConfig, run_algorithm
from byteswarm.sim.scenario import Scenario, load_scenario

INF = math.inf


def round_message_bytes(numel: int, codec: str = "none", n_parts: int = 1,
                        part: int = 0) -> dict[str, int]:
    """Encoded bytes of a NoLoCo share and of one all-reduce part (``n_parts`` parts)."""
    stub = make_codec(codec).compress(torch.ones(8))
    sizer = MessageSizer(numel, "sim")
    return {"share": sizer(NoLoCoShare(0, stub, stub)),
            "part": sizer(ReducePart(0, part, n_parts, stub))}


def pattern_sync_times(pattern: str, scenario: Scenario, n: int, numel: int, *,
                       seed: int = 0, fast_bytes: float = 0) -> list[float]:
    """Seconds until each of n peers holds the round's result, all starting at 0.

    ``pair``: NoLoCo, one share (φ and θ − φ) each way within groups of 2 (``draw_groups``);
    ``butterfly``: DiLoCo's reduce-scatter to part owners, then all-gather from them;
    ``tree``: binary-tree reduce to peer 0, then broadcast down, whole vectors per hop;
    ``ring``: reduce-scatter then all-gather around the ring, 2(n − 1) steps of 1/n each.
    Links, latencies, jitter and loss are the scenario's; the compute before is left out."""
    ids = [s.id for s in scenario.peer_specs(n, 1, 1.0)]
    net: Network = scenario.network(seed)
    net.fast_bytes = fast_bytes
    for s in scenario.peer_specs(n, 1, 1.0):
        net.add_peer(s.id, s.link, s.region)
    whole = round_message_bytes(numel)["part"]
    part = [round_message_bytes(numel, n_parts=n, part=j)["part"] for j in range(n)] \
        if pattern in ("butterfly", "ring") else []
    done = [0.0] * n
    got: dict[tuple[int, Any], int] = {}  # (peer, kind) -> messages received so far
    send = lambda i, j, size, tag, now: net.send(ids[i], ids[j], size, (i, j, tag), now)
    if pattern == "pair":
        share = round_message_bytes(numel)["share"]
        index = {p: i for i, p in enumerate(ids)}
        for g in draw_groups(0, ids, seed, 2):
            if len(g) == 2:
                a, b = index[g[0]], index[g[1]]
                send(a, b, share, "share", 0.0)
                send(b, a, share, "share", 0.0)
    elif pattern == "butterfly":
        for i in range(n):
            for j in range(n):
                if i != j:
                    send(i, j, part[j], "reduce", 0.0)
    elif pattern == "tree":
        for i in range(n // 2, n):  # leaves
            if i:
                send(i, (i - 1) // 2, whole, "up", 0.0)
    elif pattern == "ring":
        for i in range(n):
            send(i, (i + 1) % n, part[i], 0, 0.0)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    children = lambda i: [c for c in (2 * i + 1, 2 * i + 2) if c < n]

    def arrive(src: int, dst: int, tag: Any, now: float) -> None:
        kind = (dst, tag if isinstance(tag, str) else "ring")
        got[kind] = got.get(kind, 0) + 1
        if pattern == "pair":
            done[dst] = now
        elif pattern == "butterfly" and tag == "reduce":
            if got[kind] == n - 1:  # dst's part is averaged: send it to everyone
                for j in range(n):
                    if j != dst:
                        send(dst, j, part[dst], "gather", now)
                done[dst] = max(done[dst], now)
        elif pattern == "butterfly":
            done[dst] = max(done[dst], now)
        elif pattern == "tree" and tag == "up":
            if got[kind] == len(children(dst)):
                if dst:
                    send(dst, (dst - 1) // 2, whole, "up", now)
                else:
                    arrive_down(0, now)
        elif pattern == "tree":
            arrive_down(dst, now)
        elif pattern == "ring":
            step = tag + 1  # dst got step `tag` from its left neighbour
            if step < 2 * (n - 1):
                # Step s sends chunk (rank − s) mod n: reduce-scatter for s < n − 1,
                # then all-gather of the reduced chunks.
                send(dst, (dst + 1) % n, part[(dst - step) % n], step, now)
            else:
                done[dst] = now

    def arrive_down(i: int, now: float) -> None:
        done[i] = now
        for c in children(i):
            send(i, c, whole, "down", now)

    if n > 1:
        _drain(net, arrive)
    return done


def _drain(net: Network, arrive: Callable[[int, int, Any, float], None]) -> None:
    """Deliver every message at its arrival time, letting ``arrive`` send more."""
    heap: list[tuple[float, int, Any]] = []
    seq = 0
    while True:
        t_net, t_arr = net.next_event_time(), heap[0][0] if heap else INF
        if t_net == INF and t_arr == INF:
            return
        if t_net <= t_arr:
            for d in net.advance(t_net):
                seq += 1
                heapq.heappush(heap, (d.at, seq, d))
            continue
        at, _, d = heapq.heappop(heap)
        arrive(*d.payload, at)


def sync_ratios(scenario: str, ns: list[int], numel: int, seed: int) -> tuple[dict, dict]:
    sc = load_scenario(scenario)
    ratio, seconds = {}, {}
    for n in ns:
        t = {"pair": pattern_sync_times("pair", sc, n, numel, seed=seed),
             "tree": pattern_sync_times("tree", sc, n, numel, seed=seed),
             "ring": pattern_sync_times("ring", sc, n, numel, seed=seed),
             "butterfly": pattern_sync_times("butterfly", sc, n, numel, seed=seed,
                                              fast_bytes=INF)}
        if n <= 64:
            t["butterfly_fluid"] = pattern_sync_times("butterfly", sc, n, numel, seed=seed)
        mean = {k: statistics.fmean(v) for k, v in t.items()}
        seconds[str(n)] = {k: round(v, 4) for k, v in mean.items()}
        ratio[str(n)] = {k: round(v / mean["pair"], 3) for k, v in mean.items() if k != "pair"}
    return ratio, seconds


def engine_ratios(scenario: str, ns: list[int], mcfg: ModelConfig, seed: int) -> dict:
    """DiLoCo's over NoLoCo's blocked seconds per round in analytic runs (2 rounds of
    H = 10, no round timeout: a timeout would cut the wait short)."""
    sc, numels = load_scenario(scenario), model_numels(mcfg)
    out = {}
    for n in ns:
        sim = SimConfig(scenario=scenario, peers=n, steps=20, eval_every=20, seed=seed)
        s = {name: run_analytic(name, cfg, sim, sc, mcfg, fast_bytes=INF, numels=numels)
             .summary["blocked_seconds_per_round"]
             for name, cfg in (("noloco", NoLoCoConfig(inner_steps=10, round_timeout=1e4)),
                               ("diloco", DiLoCoConfig(inner_steps=10, round_timeout=1e4)))}
        out[str(n)] = round(s["diloco"] / s["noloco"], 3)
    return out


def peer_steps(ns: list[int], steps: dict[int, int], seed: int) -> dict:
    dcfg = DataConfig(max_bytes=2_000_000)
    corpus = Corpus.load(dcfg)
    w = Workload(ModelConfig(), dcfg, corpus, seed, 64, corpus.val_set(32, 64, 2, seed=seed))
    sc = load_scenario("datacenter")
    algos = {"spsa": SPSAConfig(), "noloco": NoLoCoConfig(inner_steps=5),
             "diloco": DiLoCoConfig(inner_steps=5)}
    out: dict = {}
    for name, cfg in algos.items():
        warm = SimConfig(scenario="datacenter", peers=2, steps=2, eval_every=2, eval_peers=1)
        run_algorithm(name, cfg, warm, sc, w)  # pays torch.compile and first-call costs
        out[name] = {}
        for n in ns:
            sim = replace(warm, peers=n, steps=steps[n], eval_every=steps[n], seed=seed)
            t = time.perf_counter()
            run_algorithm(name, cfg, sim, sc, w)
            out[name][str(n)] = round(n * steps[n] / (time.perf_counter() - t), 2)
    return out


def batched_speedup(ns: list[int], steps: dict[int, int], seed: int,
                    repeats: int) -> dict:
    """Wall seconds of one NoLoCo run one by one and batched (otherwise the same run),
    alternating, best of ``repeats`` each, after a warm-up of both modes."""
    dcfg = DataConfig(max_bytes=2_000_000)
    corpus = Corpus.load(dcfg)
    w = Workload(ModelConfig(), dcfg, corpus, seed, 64, corpus.val_set(32, 64, 2, seed=seed))
    sc, cfg = load_scenario("datacenter"), NoLoCoConfig(inner_steps=5)
    warm = SimConfig(scenario="datacenter", peers=2, steps=2, eval_every=2, eval_peers=1)
    for batched in (False, True):
        run_algorithm("noloco", cfg, replace(warm, batched=batched), sc, w)
    out: dict = {}
    for n in ns:
        sim = replace(warm, peers=n, steps=steps[n], eval_every=steps[n], seed=seed)
        best, summary = {False: INF, True: INF}, {}
        for _ in range(repeats):
            for batched in (False, True):
                t = time.perf_counter()
                res = run_algorithm("noloco", cfg, replace(sim, batched=batched), sc, w)
                best[batched] = min(best[batched], time.perf_counter() - t)
                summary[batched] = res.summary
        bank = summary[True]["batched"]
        out[str(n)] = {"one_by_one_s": round(best[False], 3), "batched_s": round(best[True], 3),
                       "speedup": round(best[False] / best[True], 3),
                       "mean_width": bank["mean_width"], "max_width": bank["max_width"],
                       "computations": bank["computations"],
                       "flushes": bank["flushes"],
                       "final_val_loss": [summary[False]["final_val_loss"],
                                          summary[True]["final_val_loss"]]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--out", default="runs/bench_sim", help="folder for sync_ratio.png")
    ap.add_argument("--scenario", default="home-broadband",
                    help="scenario of the sync measurements (default: home-broadband)")
    ap.add_argument("--preset", default="small", help="model preset for message sizes")
    ap.add_argument("--quick", action="store_true", help="N ≤ 256, fewer steps")
    ap.add_argument("--skip-train", action="store_true", help="no peer_steps_per_second")
    ap.add_argument("--skip-batched", action="store_true", help="no batched_speedup")
    ap.add_argument("--repeats", type=int, default=2,
                    help="batched_speedup: best of this many runs per mode (default: 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch threads for real training "
                    "(default: torch's choice; 1 is steadier on a shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ns = [8, 16, 64, 256] + ([] if args.quick else [1024])
    mcfg = ModelConfig(preset=args.preset)
    numel = model_numels(mcfg)[0]
    t0 = time.perf_counter()
    ratio, seconds = sync_ratios(args.scenario, ns, numel, args.seed)
    result: dict = {
        "scenario": args.scenario, "model": {"preset": args.preset, "params": numel,
                                             "codec": "none",
                                             **round_message_bytes(numel)},
        "sync_ratio": ratio, "sync_seconds": seconds,
        "sync_ratio_other_scenarios": {
            s: sync_ratios(s, [8, 64, 256], numel, args.seed)[0]
            for s in ("datacenter", "global-mixed") if s != args.scenario},
        "log2_n": {str(n): round(math.log2(n), 2) for n in ns},
    }
    result["engine_sync_ratio"] = engine_ratios(args.scenario, [8, 64] if args.quick
                                                else [8, 64, 256], mcfg, args.seed)
    result["sync_wall_seconds"] = round(time.perf_counter() - t0, 1)
    if not args.skip_train:
        steps = {8: 10, 64: 5} if args.quick else {8: 20, 64: 10}
        result["peer_steps_per_second"] = peer_steps([8, 64], steps, args.seed)
        result["threads"] = torch.get_num_threads()
    if not args.skip_batched:
        steps = {8: 10, 64: 5} if args.quick else {8: 20, 64: 10}
        b = batched_speedup([8, 64], steps, args.seed, args.repeats)
        result["batched_speedup"] = {k: v["speedup"] for k, v in b.items()}
        result["batched_detail"] = b
        result["threads"] = torch.get_num_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    xs = [math.log2(int(n)) for n in ratio]
    series = {k: (xs, [ratio[n].get(k, float("nan")) for n in ratio])
              for k in ("tree", "ring", "butterfly")}
    series["log2 N"] = (xs, xs)
    plots.plot_lines(out / "sync_ratio.png", series, xlabel="log2 N (peers)",
                     ylabel="all-reduce / pairwise sync time",
                     title=f"DiLoCo / NoLoCo sync per round — {args.scenario}, "
                     f"{numel / 1e6:.1f}M params")
    result["plot"] = str(out / "sync_ratio.png")
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.scenario}, {numel} params; mean seconds to sync one round, and ratio "
          "to NoLoCo's pairwise exchange")
    for n, r in ratio.items():
        print(f"  N={n:>5s}  pair {seconds[n]['pair']:8.2f} s  " + "  ".join(
            f"{k} {seconds[n][k]:8.2f} s ({v:5.2f}x)" for k, v in r.items()))
    print("engine (analytic runs, incl. compute waits):", result["engine_sync_ratio"])
    for key in ("peer_steps_per_second", "batched_speedup"):
        if key in result:
            print(f"{key}: {result[key]}")
    print(f"plot: {result['plot']}")


if __name__ == "__main__":
    main()

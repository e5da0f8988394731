"""Benchmark the peer node: bytes on the wire per peer per step against the simulator's
prediction, and a lone node's training throughput against a bare PyTorch loop (that half
lives in scripts/node_throughput.py, with its method).

    python scripts/bench_node.py               # a readable table (6-8 minutes on 2 cores)
    python scripts/bench_node.py --json        # one JSON object
    python scripts/bench_node.py --quick       # N = 2, 4 only, shorter throughput runs

Everything runs as real ``byteswarm node`` processes on 127.0.0.1 (hivemind's DHT, p2pd
and libp2p streams; nothing mocked), each in its own process group, which is killed at the
end whatever happens. The first node of a swarm starts it; the others join with
``--initial-peers`` and all wait with ``--min-peers N``; every node uses ``--threads 1``.
``--min-peers`` is not a barrier: each node starts when *its* view of the DHT shows N
members, and one that sees the quorum a second late can find two fast NoLoCo partners a
round ahead and download their state instead of training. So the last node is launched
only once the others are up and waiting (its arrival then reaches every view within a
heartbeat), and a run is redone (``--retries``) when ``problems`` finds any node that did
not train every step with all its partners (a state download, a timeout, a reject, a
round alone, a record not applied everywhere); ``runs.*.unclean`` keeps what went wrong.

``bytes_per_step`` (per algorithm, per N): what a node sent, averaged over the N nodes, over
the steps it took (``bytes_sent_per_step`` of its summary.json): SPSA 30 steps, NoLoCo and
DiLoCo 2 rounds of H = 10, tiny preset, fp32 (codec ``none``), group size 2. This is the
application layer as the node counts it: every frame's 8-byte length header plus the wire
message (protocols/wire.py). Not counted, because the node cannot see them: the membership
heartbeats (a DHT store and get every ``--heartbeat-period`` s, several Kademlia RPCs
each), libp2p's own framing (yamux, noise) and TCP/IP.

``sim_bytes_per_step``: the simulator's prediction for the same run, from analytic mode
(``run_analytic``, datacenter scenario, same algorithm configs and step counts), which runs
the real protocol objects and charges each message ``len(wire.encode(msg))`` at the real
model's size. Two things are made to match the node first: the swarm name (it is in every
message's envelope; the simulator names its NoLoCo/DiLoCo swarm ``sim``, so the nodes'
swarm is called ``sim`` too) and the peer ids: an SPSA record carries its sender's id, 52
characters for a node's libp2p id against 5 for the simulator's ``p0000``. The prediction
gives the simulated peers ids of a node's length; ``sim_bytes_per_step_short_ids`` is the
simulator as shipped, which undercounts an SPSA record by 48 bytes. The simulator has no
frame headers, so the node's bytes are also given without them
(``bytes_per_step_no_headers``: 8 bytes off per frame, frames counted from the node's own
algorithm counters — SPSA: records sent × (N − 1); NoLoCo: rounds × (group size − 1);
DiLoCo: rounds × 2(N − 1)), next to ``sim_frames_per_step``, the messages each simulated
peer sent. ``node_over_sim`` is the ratio of the header-free node bytes to the prediction
(SPSA's sits a fraction of a percent below 1: see the next sentence).
``analytic_vs_trained`` checks the analytic mode against the simulator with real training
(``run_algorithm``, N = 2): SPSA records can differ by a byte where q falls outside
msgpack's one-byte range [−32, 127].

``tcp_over_node``: below the application layer, what each node's p2pd put on TCP
(``bytes_acked`` of its sockets, from ``ss -tinp``: our frames inside libp2p's noise and
yamux framing, plus the DHT's heartbeat RPCs, pings and everything else hivemind sends)
over the node's own count, summed over the nodes, for the same span of steps: SPSA steps
10-30; NoLoCo/DiLoCo from the middle of the last round to the end (its exchange, and no
exchange in flight when the span opens). The heartbeat part is per second, not per step,
so this ratio depends on the step rate and ``--heartbeat-period`` (0.5 s here, as in the
tests; the default is 2 s); ``runs.*.tcp_window.overhead_bytes_per_second_per_node`` is
that rate.

"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from byteswarm.optim.data import DataConfig
from byteswarm.optim.diloco import DiLoCoConfig
from byteswarm.optim.model import ModelConfig
from byteswarm.optim.noloco import NoLoCoConfig
from byteswarm.optim.spsa import SPSAConfig
from byteswarm.optim.workload import load_workload
from byteswarm.sim.analytic import model_numels, run_analytic
from byteswarm.sim.runner import PEER_ID_CHARS, SimConfig, run_algorithm
from byteswarm.sim.scenario import load_scenario

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path
from node_procs import (  # noqa: E402
    COMMON,
    SWARM,
    Node,
    WireWindow,
    config_toml,
)
from node_throughput import measure_throughput  # noqa: E402

HEADER = 8  # node/transport.py: a frame's big-endian length
SCENARIO = "datacenter"


# --- helpers (pure) ---------------------------------------------------------------------

def algo_configs(inner_steps: int) -> dict[str, Any]:
    """The configs every bytes run uses, on the nodes and in the simulator alike."""
    return {"spsa": SPSAConfig(swarm=SWARM),
            "noloco": NoLoCoConfig(inner_steps=inner_steps),
            "diloco": DiLoCoConfig(inner_steps=inner_steps)}


def node_frames(algo: str, n: int, stats: dict[str, Any], group_size: int = 2) -> int:
    """Frames a node sent, from its algorithm's counters, assuming it knew all n peers at
    every step or round (true when every node waits with --min-peers n and none leaves).
    NoLoCo assumes n is a multiple of the group size (nobody left out of a group)."""
    if n < 2:
        return 0
    if algo == "spsa":
        return stats["records_sent"] * (n - 1)
    if algo == "noloco":
        return stats["rounds_completed"] * (group_size - 1)
    if algo == "diloco":
        return stats["rounds_completed"] * 2 * (n - 1)
    raise ValueError(f"unknown algorithm {algo!r}")


def problems(algo: str, n: int, steps: int, summaries: list[dict[str, Any]],
             inner_steps: int = 0, group_size: int = 2) -> list[str]:
    """Why a swarm run does not measure the protocol's steady pattern (empty: it does):
    a node that downloaded state instead of training, a timeout, a reject, a round
    without its partners, a record not applied everywhere."""
    out = []
    rounds = steps // inner_steps if inner_steps else 0
    for k, s in enumerate(summaries):
        st, tag = s["stats"], f"n{k}"
        if s["steps"] != steps:
            out.append(f"{tag}: {s['steps']} steps")
        if "state" in s["sent_by_type"] or "state" in s["received_by_type"]:
            out.append(f"{tag}: state download")
        if s["rejects"]:
            out.append(f"{tag}: rejects {s['rejects']}")
        if st.get("timeouts", 0) or st.get("steps_timed_out", 0):
            out.append(f"{tag}: timeouts")
        if algo == "spsa" and st.get("records_applied") != steps * n:
            out.append(f"{tag}: {st.get('records_applied')} records applied, not {steps * n}")
        full = algo == "diloco" or n % group_size == 0
        if algo in ("noloco", "diloco") and full and st.get("rounds_with_partner") != rounds:
            out.append(f"{tag}: {st.get('rounds_with_partner')} of {rounds} rounds "
                       "with partners")
        if st.get("parts_missing"):
            out.append(f"{tag}: {st['parts_missing']} parts missing")
    return out


def long_ids(scenario: Any, width: int = PEER_ID_CHARS) -> Any:
    """The scenario with peer ids padded to ``width`` characters, so an SPSA record weighs
    what it does with a libp2p id (the order of the ids is kept)."""
    return _LongIds(scenario, width)


class _LongIds:
    def __init__(self, scenario: Any, width: int):
        self._scenario, self._width = scenario, width

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scenario, name)

    def peer_specs(self, n: int, steps: int, forwards_per_step: float) -> list[Any]:
        return [dataclasses.replace(s, id=s.id.ljust(self._width, "x"))
                for s in self._scenario.peer_specs(n, steps, forwards_per_step)]


# --- real node processes ----------------------------------------------------------------

def run_swarm(folder: Path, algo: str, cfg: Any, n: int, steps: int, timeout: float,
              extra: tuple[str, ...] = (), window: tuple[int, int] | None = None
              ) -> tuple[list[Node], float, list[WireWindow]]:
    """Start n nodes, wait until all exit; returns them (exited), the wall seconds and,
    with ``window``, each node's TCP sample over that span of steps. Raises RuntimeError
    if one fails or the swarm runs past ``timeout``."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "config.toml"
    cfg_path.write_text(config_toml(algo, cfg))
    args = ["--config", str(cfg_path), "--min-peers", str(n), "--steps", str(steps),
            "--eval-every", str(steps), *extra]
    nodes: list[Node] = []
    t0 = time.monotonic()
    try:
        nodes.append(Node(folder / "n0", [*COMMON, *args, "--shard", "0"]))
        maddr = nodes[0].maddr(timeout=60)
        for k in range(1, n):
            if k == n - 1:  # the last completes the quorum once the others are waiting
                for node in nodes:
                    node.wait_for("waiting for ", timeout=120)
            nodes.append(Node(folder / f"n{k}", [*COMMON, *args, "--shard", str(k),
                                                 "--initial-peers", maddr]))
        windows = [WireWindow(node, *window) for node in nodes] if window else []
        while True:
            running = [nd for nd in nodes if nd.proc.poll() is None]
            failed = [nd for nd in nodes if nd.proc.returncode not in (None, 0)]
            if failed:
                raise RuntimeError(f"{algo} N={n}: {failed[0].out.name} exited "
                                   f"{failed[0].proc.returncode}:\n{failed[0].text()[-2000:]}")
            if not running:
                return nodes, time.monotonic() - t0, windows
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"{algo} N={n}: {running[0].out.name} still running after "
                                   f"{timeout:.0f} s:\n{running[0].text()[-2000:]}")
            for w in windows:
                w.poll()
            time.sleep(0.02)
    finally:
        for node in nodes:
            node.kill_group()


# --- bytes per step ---------------------------------------------------------------------

def measure_bytes(folder: Path, algo: str, cfg: Any, n: int, steps: int, timeout: float,
                  retries: int) -> dict[str, Any]:
    """One swarm run, repeated (at most ``retries`` times) while ``problems`` finds any;
    what went wrong in the runs thrown away is kept in ``unclean``."""
    h = getattr(cfg, "inner_steps", 0)
    group = getattr(cfg, "group_size", 2)
    # The TCP window: SPSA's last two thirds; from the middle of the last round's inner
    # steps (no exchange in flight at either end) to the end, for NoLoCo and DiLoCo.
    first = steps - h // 2 if h and steps > h else steps // 3
    unclean: list[list[str]] = []
    for attempt in range(retries + 1):
        nodes, wall, windows = run_swarm(folder / f"{algo}-{n}-{attempt}", algo, cfg, n,
                                         steps, timeout, window=(first, steps))
        sums = [node.summary() for node in nodes]
        found = problems(algo, n, steps, sums, h, group)
        if not found:
            break
        unclean.append(found[:8])
    sampled = [w for w in windows if w.tcp is not None and w.steps > 0]
    tcp, app = sum(w.tcp for w in sampled), sum(w.app_bytes() for w in sampled)
    seconds = sum(w.seconds for w in sampled)
    frames = [node_frames(algo, n, s["stats"], group) for s in sums]
    kinds = sorted({k for s in sums for k in s["sent_by_type"]})
    per_step = [s["bytes_sent"] / s["steps"] for s in sums]
    return {
        "bytes_per_step": statistics.fmean(per_step),
        "bytes_per_step_min_max": [min(per_step), max(per_step)],
        "bytes_per_step_no_headers": statistics.fmean(
            (s["bytes_sent"] - HEADER * f) / s["steps"] for s, f in zip(sums, frames)),
        "frames_per_step": statistics.fmean(f / s["steps"] for s, f in zip(sums, frames)),
        "tcp_over_node": tcp / app if sampled and app else None,
        "clean": not found, "unclean": unclean,
        "sent_by_type": {k: statistics.fmean(s["sent_by_type"].get(k, 0) for s in sums)
                         for k in kinds},
        "tcp_window": {"steps": [first, steps], "nodes_sampled": len(sampled),
                       "tcp_bytes": tcp, "node_bytes": app,
                       "seconds_per_node": round(seconds / max(1, len(sampled)), 2),
                       "overhead_bytes_per_second_per_node": round((tcp - app) / seconds)
                       if seconds else None},
        "peer_id_chars": sorted({len(s["peer_id"]) for s in sums}),
        "wall_seconds": round(wall, 1),
    }


def predict_bytes(algo: str, cfg: Any, n: int, steps: int, numels: tuple[int, int],
                  *, short_ids: bool = False) -> dict[str, float]:
    """The simulator's bytes and messages per peer per step (analytic mode)."""
    sc = load_scenario(SCENARIO)
    sim = SimConfig(scenario=SCENARIO, peers=n, steps=steps, eval_every=steps)
    s = run_analytic(algo, cfg, sim, sc if short_ids else long_ids(sc), ModelConfig(),
                     numels=numels).summary
    return {"bytes": s["bytes_sent_per_peer"]["mean"] / steps,
            "frames": s["messages_delivered"] / n / steps}


def analytic_vs_trained(cfgs: dict[str, Any], steps: dict[str, int],
                        numels: tuple[int, int]) -> dict[str, Any]:
    """Bytes per peer per step at N = 2: analytic mode against real training in the
    simulator (the default short ids on both sides)."""
    dcfg = DataConfig(max_bytes=2_000_000, batch_size=8, val_batches=2)
    w = load_workload(ModelConfig(), dcfg, 0)
    sc = load_scenario(SCENARIO)
    out = {}
    for algo, cfg in cfgs.items():
        sim = SimConfig(scenario=SCENARIO, peers=2, steps=steps[algo],
                        eval_every=steps[algo], eval_peers=1)
        trained = run_algorithm(algo, cfg, sim, sc, w).summary["bytes_sent_per_peer"]["mean"]
        analytic = predict_bytes(algo, cfg, 2, steps[algo], numels, short_ids=True)["bytes"]
        out[algo] = {"trained": trained / steps[algo], "analytic": analytic}
    return out


# --- main -------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="N = 2, 4; shorter throughput runs")
    ap.add_argument("--peers", help="comma-separated swarm sizes (default 2,4,8)")
    ap.add_argument("--algos", default="spsa,noloco,diloco")
    ap.add_argument("--spsa-steps", type=int, default=30)
    ap.add_argument("--inner-steps", type=int, default=10, help="H of the bytes runs")
    ap.add_argument("--rounds", type=int, default=2, help="NoLoCo/DiLoCo rounds")
    ap.add_argument("--throughput-steps", type=int, help="timed steps per throughput run "
                    "(default 200, quick 100)")
    ap.add_argument("--repeats", type=int, default=2, help="throughput pairs per algorithm")
    ap.add_argument("--batch-size", type=int, default=32, help="throughput runs' batch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the bare "
                    "loop (the nodes always run with --threads 1)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per swarm run")
    ap.add_argument("--retries", type=int, default=2, help="rerun a swarm run whose nodes "
                    "did not all train every step with their partners, at most this often")
    ap.add_argument("--skip-bytes", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--keep", metavar="DIR", help="keep the nodes' folders here "
                    "(default: a temporary folder, removed)")
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the nodes' process groups are killed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    torch.set_num_threads(args.threads)
    if args.threads != 1:
        print("warning: the nodes run with --threads 1", file=sys.stderr)
    ns = [int(n) for n in (args.peers or ("2,4" if args.quick else "2,4,8")).split(",")]
    algos = args.algos.split(",")
    t_steps = args.throughput_steps or (100 if args.quick else 200)
    t0 = time.perf_counter()
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="bench_node-")
    folder = Path(args.keep or tmp.name)
    numels = model_numels(ModelConfig())
    cfgs = {a: c for a, c in algo_configs(args.inner_steps).items() if a in algos}
    steps = {a: args.spsa_steps if a == "spsa" else args.rounds * args.inner_steps
             for a in cfgs}
    result: dict[str, Any] = {
        "command": " ".join(["python", "scripts/bench_node.py", *sys.argv[1:]]),
        "scenario": SCENARIO, "model": {"preset": "tiny", "params": numels[0]},
        "peers": ns, "steps": steps, "inner_steps": args.inner_steps, "codec": "none",
        "node_threads": 1, "threads": torch.get_num_threads(),
        "load_average": [round(os.getloadavg()[0], 2)],
    }
    try:
        if not args.skip_bytes:
            keys = ("bytes_per_step", "bytes_per_step_no_headers", "frames_per_step",
                    "sim_bytes_per_step", "sim_frames_per_step", "sim_bytes_per_step_short_ids",
                    "node_over_sim", "tcp_over_node")
            table: dict[str, dict[str, dict[str, float]]] = {k: {} for k in keys}
            runs: dict[str, dict[str, Any]] = {}
            for algo, cfg in cfgs.items():
                runs[algo] = {}
                for k in keys:
                    table[k][algo] = {}
                for n in ns:
                    pred = predict_bytes(algo, cfg, n, steps[algo], numels)
                    short = predict_bytes(algo, cfg, n, steps[algo], numels, short_ids=True)
                    r = measure_bytes(folder, algo, cfg, n, steps[algo], args.timeout,
                                      args.retries)
                    got = {"bytes_per_step": r.pop("bytes_per_step"),
                           "bytes_per_step_no_headers": r.pop("bytes_per_step_no_headers"),
                           "frames_per_step": r.pop("frames_per_step"),
                           "sim_bytes_per_step": pred["bytes"],
                           "sim_frames_per_step": pred["frames"],
                           "sim_bytes_per_step_short_ids": short["bytes"],
                           "tcp_over_node": r.pop("tcp_over_node")}
                    got["node_over_sim"] = got["bytes_per_step_no_headers"] / pred["bytes"]
                    for k in keys:
                        v = got[k]
                        table[k][algo][str(n)] = None if v is None else round(
                            v, 4 if k == "node_over_sim" else 3 if k == "tcp_over_node" else 2)
                    runs[algo][str(n)] = r
                    print(f"  {algo} N={n}: {got['bytes_per_step']:.1f} B/step "
                          f"(sim {pred['bytes']:.1f}), TCP/node "
                          f"{got['tcp_over_node'] and round(got['tcp_over_node'], 2)}, "
                          f"{r['wall_seconds']} s" + ("" if r["clean"] else " UNCLEAN")
                          + (f", {len(r['unclean'])} run(s) redone" if r["unclean"] else ""),
                          file=sys.stderr, flush=True)
            result.update(table)
            result["runs"] = runs
            result["analytic_vs_trained"] = analytic_vs_trained(cfgs, steps, numels)
            result["bytes_wall_seconds"] = round(time.perf_counter() - t0, 1)
        if not args.skip_throughput:
            t1 = time.perf_counter()
            tp = measure_throughput(folder, t_steps, args.repeats, args.batch_size,
                                    args.timeout)
            result["throughput_ratio"] = tp.pop("throughput_ratio")
            result["throughput_cpu_ratio"] = tp.pop("cpu_ratio")
            result["throughput"] = tp
            result["throughput_wall_seconds"] = round(time.perf_counter() - t1, 1)
    finally:
        if tmp is not None:
            tmp.cleanup()
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    result["load_average"].append(round(os.getloadavg()[0], 2))
    if args.json:
        print(json.dumps(result))
        return
    print_table(result)


def print_table(r: dict[str, Any]) -> None:
    if "bytes_per_step" in r:
        print(f"bytes sent per peer per step, tiny ({r['model']['params']} params), fp32, "
              f"loopback; prediction: simulator, analytic mode, {r['scenario']}")
        print(f"  {'algo':7s} {'N':>3s} {'node':>10s} {'no hdrs':>10s} {'sim':>10s} "
              f"{'node/sim':>8s} {'frames':>7s} {'sim fr.':>7s} {'sim ids 5':>10s}")
        for algo, by_n in r["bytes_per_step"].items():
            for n, v in by_n.items():
                g = lambda k: r[k][algo][n]  # noqa: B023
                print(f"  {algo:7s} {n:>3s} {v:10.1f} {g('bytes_per_step_no_headers'):10.1f} "
                      f"{g('sim_bytes_per_step'):10.1f} {g('node_over_sim'):8.4f} "
                      f"{g('frames_per_step'):7.2f} {g('sim_frames_per_step'):7.2f} "
                      f"{g('sim_bytes_per_step_short_ids'):10.1f}")
        print("  node: as counted, 8-byte frame headers in; no hdrs: without them; sim: "
              "analytic mode with 52-character ids; sim 5-ch: with the simulator's own ids")
        print("below the application layer: TCP bytes the nodes' p2pd sent (DHT heartbeats, "
              "libp2p framing and all) over the nodes' own count, same steps")
        for algo, by_n in r["tcp_over_node"].items():
            for n, v in by_n.items():
                run = r["runs"][algo][n]
                w = run["tcp_window"]
                print(f"  {algo:7s} {n:>3s} steps {w['steps'][0]:>2d}-{w['steps'][1]:<2d} "
                      + ("n/a" if v is None else f"{v:6.2f}  ({w['tcp_bytes']} / "
                         f"{w['node_bytes']} B in {w['seconds_per_node']} s a node; "
                         f"{w['overhead_bytes_per_second_per_node']} B/s a node more)")
                      + ("" if run["clean"] else f"  UNCLEAN: {run['unclean'][-1]}"))
        print("  analytic vs trained simulator, N=2 (B/step):",
              {a: {k: round(x, 1) for k, x in v.items()}
               for a, v in r["analytic_vs_trained"].items()})
    if "throughput_ratio" in r:
        t = r["throughput"]
        print(f"throughput, one node alone over a bare AdamW loop (batch {t['batch_size']}, "
              f"{t['timed_steps']} steps, 1 thread): {r['throughput_ratio']:.3f} "
              f"(by algorithm {t['by_algo']}); in CPU time {r['throughput_cpu_ratio']:.3f} "
              f"({t['cpu_ratio_by_algo']})")
        for algo, pairs in t["pairs"].items():
            runs = [f"node {p['node']:.1f} steps/s (bare {p['bare_before']:.1f} before, "
                    f"{p['bare_after']:.1f} after), CPU {p['node_cpu_ms']} ms/step "
                    f"(bare {p['bare_cpu_ms']})" for p in pairs]
            print(f"  {algo}: " + "; ".join(runs))
    print(f"wall {r['wall_seconds']:.0f} s, load average {r['load_average']}; "
          f"command: {r['command']}")


if __name__ == "__main__":
    main()

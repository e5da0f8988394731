"""``byteswarm sim``: many peers on one machine, real training, virtual network.

Runs each chosen algorithm on the same workload and scenario, and writes to DIR:
metrics.jsonl (validation loss by algorithm, peer, step and virtual time), summary.json
(per algorithm: final_val_loss, virtual_seconds, bytes_sent_per_peer, utilisation and
the time lost by reason, idle_fraction, sync_seconds_mean, learned waits, steps, …) and
PNG plots: loss vs virtual time, loss vs step, bytes per peer and idle fraction, all
algorithms on one chart. Same seed, same summary.

With --no-train (analytic mode, sim/analytic.py) nothing is trained: the real protocol
objects run on a stand-in workload while the network carries the configured model's
message sizes, which scales timing studies to thousands of peers.

With --batched, NoLoCo's and DiLoCo's inner steps are deferred and run for all peers as
one batched computation (sim/batched.py), with the same weights to fp32 rounding; SPSA
steps one by one either way. Off by default: on 2 CPU cores it is no faster (0.5-1.0x,
batched_speedup in scripts/bench_sim.py); batching pays where one small replica cannot
fill the device, an accelerator, which the simulator does not use yet.

Algorithm settings go in a TOML file (--config) as [spsa], [noloco] and [diloco] tables;
the run itself in [sim], what to train in [task] (--task module:attr runs your own task,
optim/task.py; --device and --dtype say where and in what precision), the built-in task in
[model] and [data]. Flags override the file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from byteswarm.optim import config as C
from byteswarm.optim.data import DataConfig
from byteswarm.optim.files import MetricsLog, save_json
from byteswarm.optim.model import ModelConfig
from byteswarm.optim.task import TaskConfig
from byteswarm.optim.workload import ALGOS, make_task
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import plots
from .runner import SimConfig, run_algorithm, utilisation_line
from .scenario import load_scenario

SECTIONS = {"sim": SimConfig, "task": TaskConfig, "model": ModelConfig, "data": DataConfig}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sim", help="simulate many peers on one machine and compare algorithms",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/sim", metavar="DIR",
                   help="run folder (default: runs/sim)")
    p.add_argument("--config", metavar="FILE", help="TOML file with [sim], [task], [model], "
                   "[data], "
                   + ", ".join(f"[{a}]" for a in ALGOS) + " tables")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-train", action="store_true",
                   help="analytic mode: real protocols, stand-in training, the configured "
                   "model's message sizes; timing only, scales to 1024+ peers")
    p.add_argument("--fast-bytes", type=float, metavar="BYTES",
                   help="with --no-train: messages up to this size skip flow sharing for "
                   "per-link FIFO queues (default: 1500; 1e12 for DiLoCo at 128+ peers)")
    for name, cls in SECTIONS.items():
        C.add_arguments(p, cls, title=f"{name} options")
    p.set_defaults(func=run)


def load_configs(args: argparse.Namespace):
    file = C.load_tables(args.config, sorted(set(SECTIONS) | set(ALGOS)))
    sim, task, model, data = (C.resolve(cls, args, file.get(name), where=name)
                              for name, cls in SECTIONS.items())
    algos = [a.strip() for a in sim.algo.split(",") if a.strip()]
    for a in algos:
        if a not in ALGOS:
            raise C.ConfigError(f"algo: unknown algorithm {a!r} (known: {', '.join(ALGOS)})")
    if not algos or len(set(algos)) != len(algos):
        raise C.ConfigError("algo: give each algorithm once, e.g. spsa,noloco,diloco")
    algo_cfgs = {a: C.from_mapping(ALGOS[a].config_cls, file.get(a, {}), where=a)
                 for a in algos}
    return sim, task, model, data, algo_cfgs


def run(args: argparse.Namespace) -> int:
    sim, kcfg, mcfg, dcfg, algo_cfgs = load_configs(args)
    scenario = load_scenario(sim.scenario)
    out = Path(args.out)
    if getattr(args, "no_train", False):
        if kcfg.task:
            raise C.ConfigError("--no-train sizes messages from the built-in model's [model] "
                                "settings; it does not run --task")
        from .analytic import run_cli

        return run_cli(args, sim, mcfg, algo_cfgs, scenario, out)
    w = make_task(kcfg, mcfg, dcfg, sim.seed)
    log = MetricsLog(out / "metrics.jsonl")
    summary = {"scenario": scenario.name, "description": scenario.description,
               "task": w.name,
               "config": {"sim": C.to_dict(sim), "task": C.to_dict(kcfg),
                          "model": C.to_dict(mcfg.resolved()), "data": C.to_dict(dcfg)},
               "algorithms": {}}
    results = []
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                  TimeRemainingColumn(), disable=args.quiet) as bar:
        for name, acfg in algo_cfgs.items():
            task = bar.add_task(f"{name:7s} {scenario.name}", total=sim.peers * sim.steps)
            res = run_algorithm(name, acfg, sim, scenario, w, device=kcfg.device,
                                dtype=kcfg.dtype,
                                progress=lambda k, task=task: bar.advance(task, k))
            bar.update(task, completed=sim.peers * sim.steps)
            for row in res.rows:
                log.write(row)
            summary["algorithms"][name] = {**res.summary, "config": C.to_dict(acfg)}
            results.append(res)
    log.close()
    save_json(out / "summary.json", summary)
    plots.write_all(out, results, scenario.name)
    print(f"{scenario.name}, {sim.peers} peers, {sim.steps} steps each "
          f"({time.perf_counter() - t0:.0f} s wall) -> {out}")
    for name, s in summary["algorithms"].items():
        print(f"  {name:7s} val loss {s['final_val_loss']:.3f}"
              f"  virtual {s['virtual_seconds']:8.1f} s"
              f"  sent/peer {s['bytes_sent_per_peer']['mean'] / 1e6:9.3f} MB"
              + utilisation_line(s) + catch_up_line(s.get("catch_up")))
    return 0


def catch_up_line(c: dict | None) -> str:
    """Joiners' catch-ups, measured through the machine (sim/joining.py), if any."""
    if not c or not c["joins"]:
        return ""
    secs = "n/a" if c["seconds_mean"] is None else f"{c['seconds_mean']:.1f} s"
    mb = "n/a" if c["bytes_mean"] is None else f"{c['bytes_mean'] / 1e6:.2f} MB"
    line = f"  catch-up {c['caught_up']}/{c['joins']} in {secs}, {mb}"
    if c["sybils"]:
        line += f", poisoned {c['poisoned']} (sybils {c['sybils']}, refused {c['refused']})"
    return line

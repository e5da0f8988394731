"""One node alone against a bare PyTorch loop: the throughput half of scripts/bench_node.py.

``throughput_ratio``: local training throughput of one node alone (``--min-peers 1``,
NoLoCo and DiLoCo with their default H = 50, so a lone outer step every 50 steps counts
too) over a bare PyTorch loop on the same workload in this process (``build_model``,
AdamW with the inner loop's betas, weight decay, warm-up and clipping, the same shard's
batches, batch 32, ``torch.set_num_threads`` equal to the node's). Node steps per second
come from the ``seconds`` of its metrics rows between step 10 and the step before the last
(start-up, and the final evaluation and checkpoint, left out); the bare loop is timed over
as many steps after 10 warm-up steps. Node and bare loop are measured alternately
(bare, NoLoCo node, bare, DiLoCo node, bare, …), and each node run is divided by the mean
of the bare runs on either side of it; ``throughput_ratio`` is the median of those ratios
(target ≥ 0.9). The machine is shared, and a neighbour's load moves these wall-clock
ratios by ±20%: ``load_average`` (1-minute, at the start and the end) says how busy it was,
and every pair is in ``throughput.pairs``. ``throughput_cpu_ratio`` is steadier under such
load: the bare loop's CPU seconds per step over the node's, where the node's are those of
its whole process group (the node's threads, hivemind's DHT process and p2pd), read from
/proc when it passes step 10 and again before its last step. It counts what the node
costs, not whether it keeps the core busy: a node stalled on its own event loop would lose
wall-clock throughput but no CPU time.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from byteswarm.optim.data import DataConfig
from byteswarm.optim.diloco import DiLoCoConfig
from byteswarm.optim.model import ModelConfig, build_model, lm_loss
from byteswarm.optim.noloco import NoLoCoConfig
from byteswarm.optim.workload import load_workload
from node_procs import COMMON, Node, config_toml, group_cpu_seconds, last_step, steps_per_second


def bare_loop(cfg: Any, dcfg: DataConfig, steps: int, warmup: int = 10) -> dict[str, float]:
    """A plain AdamW loop on the node's workload: shard 0 of 16 (the node's --shard 0,
    default --num-shards), the inner loop's hyper-parameters. Steps per wall second, and
    CPU seconds per step."""
    w = load_workload(ModelConfig(), dcfg, 0)
    model = build_model(w.model, seed=w.seed)
    shard = w.corpus.shard(0, 16, non_iid=dcfg.non_iid, seed=w.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay)
    t0 = c0 = 0.0
    for t in range(warmup + steps):
        if t == warmup:
            t0, c0 = time.perf_counter(), time.process_time()
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (t + 1) / max(1, cfg.warmup))
        x, y = shard.batch(t, dcfg.batch_size, w.seq_len)
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        loss.item()
    return {"rate": steps / (time.perf_counter() - t0),
            "cpu": (time.process_time() - c0) / steps}


def run_alone(folder: Path, algo: str, cfg: Any, steps: int, batch: int, timeout: float,
              skip: int = 10) -> dict[str, float]:
    """One node alone: steps per second from its metrics rows, and its process group's
    CPU seconds per step, sampled (every 20 ms) once it is past step ``skip`` and again
    before its last step."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(config_toml(algo, cfg))
    node = Node(folder / "n0", [*COMMON, "--config", str(folder / "config.toml"),
                                "--min-peers", "1", "--steps", str(steps),
                                "--eval-every", str(steps), "--shard", "0",
                                "--batch-size", str(batch)])
    marks: list[tuple[int, float]] = []  # (step, CPU seconds)
    try:
        deadline = time.monotonic() + timeout
        while node.proc.poll() is None and time.monotonic() < deadline:
            step = last_step(node.out / "metrics.jsonl")
            if (not marks and step >= skip) or (len(marks) == 1 and step >= steps - 2):
                marks.append((step, group_cpu_seconds(node.proc.pid)))
            time.sleep(0.02)
        if node.proc.wait(max(1.0, deadline - time.monotonic())) != 0:
            raise RuntimeError(f"{algo} alone exited {node.proc.returncode}:\n"
                               f"{node.text()[-2000:]}")
        if len(marks) < 2 or marks[1][0] <= marks[0][0]:
            raise RuntimeError(f"{algo} alone: could not sample its CPU time ({marks})")
        return {"rate": steps_per_second(node.rows(), skip),
                "cpu": (marks[1][1] - marks[0][1]) / (marks[1][0] - marks[0][0])}
    finally:
        node.kill_group()


def measure_throughput(folder: Path, steps: int, repeats: int, batch: int,
                       timeout: float) -> dict[str, Any]:
    """Bare, node, bare, node, …, bare: each node run against the mean of the bare runs
    on either side of it, so a neighbour's load that comes and goes hits both."""
    cfgs = {"noloco": NoLoCoConfig(), "diloco": DiLoCoConfig()}
    dcfg = DataConfig(max_bytes=2_000_000, batch_size=batch, val_batches=2)
    node_steps = steps + 11  # rows 10 .. steps + 10 are timed; the last one is not
    pairs: dict[str, list[dict[str, float]]] = {a: [] for a in cfgs}
    bare = bare_loop(cfgs["noloco"], dcfg, steps)
    for rep in range(repeats):
        for algo, cfg in cfgs.items():
            node = run_alone(folder / f"throughput-{algo}-{rep}", algo, cfg, node_steps,
                             batch, timeout)
            after = bare_loop(cfg, dcfg, steps)
            rate, cpu = (bare["rate"] + after["rate"]) / 2, (bare["cpu"] + after["cpu"]) / 2
            pairs[algo].append({
                "bare_before": round(bare["rate"], 2), "node": round(node["rate"], 2),
                "bare_after": round(after["rate"], 2), "ratio": round(node["rate"] / rate, 3),
                "node_cpu_ms": round(1e3 * node["cpu"], 2), "bare_cpu_ms": round(1e3 * cpu, 2),
                "cpu_ratio": round(cpu / node["cpu"], 3)})
            bare = after
    med = lambda key, ps: round(statistics.median(p[key] for p in ps), 3)
    every = [p for v in pairs.values() for p in v]
    return {"throughput_ratio": med("ratio", every), "cpu_ratio": med("cpu_ratio", every),
            "by_algo": {a: med("ratio", v) for a, v in pairs.items()},
            "cpu_ratio_by_algo": {a: med("cpu_ratio", v) for a, v in pairs.items()},
            "pairs": pairs, "batch_size": batch, "timed_steps": steps}

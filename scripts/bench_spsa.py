"""Benchmark the seeded-SPSA hot loops against ``theta.add_(0.001)`` (DESIGN.md §3.1, §3.5).

Every number is a median over repeats after warm-up (compilation happens in the warm-up),
and every ratio is to an in-place add over the same number of fp32 elements measured in the
same run, so ratios compare across machines better than seconds do.

    python scripts/bench_spsa.py            # a table
    python scripts/bench_spsa.py --json     # one JSON object
    python scripts/bench_spsa.py --quick    # 1M / 4M elements instead of 10M / 100M

Each ``probe_*`` function returns a dict of entries; ``main`` merges them. Add a probe to
add a number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from byteswarm.optim.kernels import compile_fallback_reason, perturb, update_


def paired_seconds(base: Callable[[], object], op: Callable[[], object], repeats: int,
                   warmup: int = 2) -> tuple[float, float]:
    """Median seconds of ``base`` and of ``op``, timed alternately.

    Alternating means a noisy neighbour (this box is shared) slows both about equally,
    which keeps the ratio honest even when the seconds wobble.
    """
    for _ in range(warmup):
        base()
        op()
    tb, to = [], []
    for _ in range(repeats):
        for fn, times in ((base, tb), (op, to)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(tb), statistics.median(to)


def naive_perturb(params: list[torch.Tensor], seed: int, c: float) -> None:
    """MeZO's perturbation (Malladi et al. 2023, arXiv 2305.17333, Alg. 1): reseed, then
    draw a Gaussian z per tensor and add c·z in place."""
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0.0, std=1.0, size=p.shape, device=p.device, dtype=p.dtype)
        p.add_(z, alpha=c)


def probe_perturb(n: int, tag: str, repeats: int, naive: bool) -> dict[str, float]:
    theta = torch.randn(n)
    out = torch.empty_like(theta)
    add = lambda: theta.add_(0.001)
    seeds = iter(range(10**9))  # a new seed every call, as in training
    base, t = paired_seconds(add, lambda: perturb(theta, out, next(seeds), 1e-3), repeats)
    entries = {f"add_s_{tag}": base, f"perturb_s_{tag}": t, f"perturb_ratio_{tag}": t / base}
    if naive:
        # Split like a model's parameter list (tensors of about 1M elements).
        params = list(theta.split(1 << 20))
        nb, tn = paired_seconds(add, lambda: naive_perturb(params, next(seeds), 1e-3), repeats)
        entries.update({f"naive_s_{tag}": tn, f"naive_ratio_{tag}": tn / nb})
    return entries


def probe_update(n: int, tag: str, repeats: int, records: int = 8) -> dict[str, float]:
    theta = torch.randn(n)
    seeds = iter(range(10**9))

    def step() -> None:
        update_(theta, [next(seeds) for _ in range(records)], [1e-6] * records)

    base, t = paired_seconds(lambda: theta.add_(0.001), step, repeats)
    return {f"update_s_{tag}_{records}rec": t, f"update_ratio_{tag}_{records}rec": t / base}


def probe_step_small(repeats: int) -> dict[str, float]:
    """One SPSA step of a lone peer on the small preset (two perturbed forward passes, the
    byte, closing the step: an update of θ and of the final snapshot) against two plain
    forward passes of the same model on the same batch."""
    from byteswarm.optim.data import Corpus, DataConfig
    from byteswarm.optim.model import ModelConfig, build_model, lm_loss
    from byteswarm.optim.spsa import SPSAConfig
    from byteswarm.optim.workload import ALGOS, Workload

    corpus = Corpus.load(DataConfig(max_bytes=2_000_000))
    cfg = ModelConfig(preset="small")
    seq = cfg.resolved().context
    shard = corpus.shard(0, 1)
    task = Workload(cfg, DataConfig(batch_size=32), corpus, 0, seq, [])
    peer = ALGOS["spsa"].make(SPSAConfig(finality_steps=1), "p0", 0, 1, ["p0"], task)
    plain = build_model(cfg)
    x, y = shard.batch(0, 32, seq)

    def two_forwards() -> None:
        with torch.no_grad():
            lm_loss(plain, x, y)
            lm_loss(plain, x, y)

    def step() -> None:
        peer.on_local_step(0.0)
        peer.outbox()

    base, t = paired_seconds(two_forwards, step, repeats)
    return {"two_forwards_s_small": base, "step_s_small": t, "step_ratio_small": t / base,
            "params_small": peer.flat.n_params}


def probe_record_bytes() -> dict[str, int]:
    """A record as encoded for the wire, with a libp2p-length peer id (52 characters)."""
    from byteswarm.optim.spsa import Record
    from byteswarm.protocols import wire

    peer = "12D3KooW" + "x" * 44
    return {"record_bytes": len(wire.encode(Record(10**6, peer, -57), swarm="byteswarm")),
            "record_bytes_short_id": len(wire.encode(Record(10**6, "p0007", -57),
                                                     swarm="byteswarm"))}


def run(quick: bool) -> dict[str, object]:
    small, large = (1_000_000, 4_000_000) if quick else (10_000_000, 100_000_000)
    result: dict[str, object] = {
        "n_10m": small, "n_100m": large, "quick": quick,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    result.update(probe_perturb(small, "10m", repeats=15, naive=True))
    result.update(probe_perturb(large, "100m", repeats=7, naive=True))
    result.update(probe_update(small, "10m", repeats=15))
    result.update(probe_step_small(repeats=3 if quick else 10))
    result.update(probe_record_bytes())
    result["compile_fallback"] = compile_fallback_reason()
    return result


def print_table(r: dict[str, object]) -> None:
    print(f"torch {r['torch']}, {r['threads']} threads; ratios are to theta.add_(0.001)")
    print(f"{'op':<28}{'elements':>12}{'seconds':>12}{'ratio':>9}")
    rows = [("perturb (compiled)", "10m", "perturb"), ("perturb (compiled)", "100m", "perturb"),
            ("naive torch.normal", "10m", "naive"), ("naive torch.normal", "100m", "naive"),
            ("update_, 8 records", "10m", "update")]
    for label, tag, key in rows:
        suffix = f"{tag}_8rec" if key == "update" else tag
        s, ratio = r.get(f"{key}_s_{suffix}"), r.get(f"{key}_ratio_{suffix}")
        if s is not None:
            print(f"{label:<28}{r['n_' + tag]:>12,}{s:>12.5f}{ratio:>8.2f}x")
    for tag in ("10m", "100m"):
        print(f"{'theta.add_(0.001)':<28}{r['n_' + tag]:>12,}{r[f'add_s_{tag}']:>12.5f}")
    print(f"{'SPSA step, small preset':<28}{r['params_small']:>12,}{r['step_s_small']:>12.5f}"
          f"{r['step_ratio_small']:>8.2f}x  (to two forward passes)")
    print(f"record on the wire: {r['record_bytes']} bytes "
          f"({r['record_bytes_short_id']} with a short peer id)")
    if r.get("compile_fallback"):
        print(f"WARNING: compiled path fell back to the reference: {r['compile_fallback']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    args = ap.parse_args()
    result = run(args.quick)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    main()

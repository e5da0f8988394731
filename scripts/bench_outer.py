"""Benchmark the fused outer steps, the codecs, and the bytes each algorithm sends.

    python scripts/bench_outer.py            # a readable table
    python scripts/bench_outer.py --json     # one JSON object

Fused vs unfused: the in-place outer step through ``impl="compiled"`` (CPU) or ``"triton"``
(CUDA) against the best unfused eager sequence, in place (NoLoCo: mul_/add_/sub_/add_/copy_;
DiLoCo: ``torch.optim.SGD(nesterov=True).step()`` and a copy to θ) — ``ratio`` — and against
``impl="reference"``, the out-of-place oracle — ``ratio_vs_reference``; at 10M and 100M fp32
parameters, all measured in this run (min of a few repeats after a warm-up). Codecs:
compress + decompress throughput in GB/s of fp32 input, wire bytes over fp32 bytes, and
relative L2 error on one Gaussian vector. Bytes per outer step: what one peer sends per
round for the ``small`` preset, NoLoCo (φ and θ − φ to one partner, whatever the swarm
size) against DiLoCo's butterfly all-reduce (2·(N−1)/N of the vector), for N = 8 and 64.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from byteswarm.optim.codecs import CODECS, decompress, make_codec
from byteswarm.optim.diloco import part_bounds
from byteswarm.optim.model import ModelConfig, build_model, count_params
from byteswarm.optim.outer import diloco_outer_step_, noloco_outer_step_
from byteswarm.protocols.tensors import decode, encode, max_encoded_size


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_outer(n: int, fused: str, device: str, repeats: int) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    phi, delta, theta, pm, tm = (torch.randn(n, generator=g, device=device) for _ in range(5))

    def noloco(impl):
        noloco_outer_step_(phi, delta, theta, pm, tm, 0.5, 0.7, 0.7, impl=impl)

    def diloco(impl):
        diloco_outer_step_(phi, delta, pm, theta, 0.7, 0.9, impl=impl)

    out = {impl: {"noloco": best_time(lambda: noloco(impl), repeats),  # noqa: B023
                  "diloco": best_time(lambda: diloco(impl), repeats)}  # noqa: B023
           for impl in ("reference", fused)}

    # The best eager sequences, in place: what one would write without a fused kernel.
    def noloco_eager():
        delta.mul_(0.5).add_(tm, alpha=0.7).sub_(phi - pm, alpha=0.7)
        phi.add_(delta)
        theta.copy_(phi)

    p = torch.nn.Parameter(phi)
    p.grad = pm
    sgd = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)

    def diloco_eager():
        sgd.step()
        theta.copy_(p.detach())

    out["eager"] = {"noloco": best_time(noloco_eager, repeats),
                    "diloco": best_time(diloco_eager, repeats)}
    return {algo: {"fused_s": out[fused][algo], "unfused_s": out["eager"][algo],
                   "reference_s": out["reference"][algo],
                   "ratio": out[fused][algo] / out["eager"][algo],
                   "ratio_vs_reference": out[fused][algo] / out["reference"][algo]}
            for algo in ("noloco", "diloco")}


def bench_codecs(n: int, device: str, repeats: int) -> dict:
    x = torch.randn(n, generator=torch.Generator(device=device).manual_seed(1), device=device)
    out = {}
    for name in CODECS:
        codec = make_codec(name)
        t = best_time(lambda codec=codec: codec.decompress(codec.compress(x)), repeats)
        codec = make_codec(name)  # a fresh top-k residual for the error measurement
        c = codec.compress(x)
        data = encode(c)
        t_wire = best_time(lambda c=c, m=len(data): decode(  # noqa: B008
            encode(c), expected_numel=n, max_bytes=m), repeats)
        y = decompress(c)
        out[name] = {"gbps": 4 * n / t / 1e9, "wire_gbps": 4 * n / t_wire / 1e9,
                     "wire_fraction": len(data) / (4 * n),
                     "rel_error": float((y - x).norm() / x.norm())}
    return out


def bytes_per_outer_step(params: int) -> dict:
    out: dict = {"params": params, "noloco": {}, "diloco": {}}
    for n_peers in (8, 64):
        out["noloco"][str(n_peers)] = {c: 2 * max_encoded_size(c, params)
                                       for c in ("none", "int8")}
        sizes = [hi - lo for lo, hi in part_bounds(params, n_peers)]
        me = sizes[0]
        out["diloco"][str(n_peers)] = {
            c: sum(max_encoded_size(c, s) for s in sizes[1:])  # reduce: others' parts
            + (n_peers - 1) * max_encoded_size(c, me)  # gather: my part to everyone
            for c in ("none", "int8")}
        out["diloco"][str(n_peers)]["fraction_of_vector"] = 2 * (n_peers - 1) / n_peers
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="10m,100m", help="outer-step sizes, e.g. 10m,100m")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fused = "triton" if device == "cuda" else "compiled"
    result: dict = {"device": device, "fused_impl": fused, "threads": torch.get_num_threads()}
    result["outer"] = {}
    for label in args.sizes.split(","):
        n = int(float(label.lower().rstrip("m")) * 1_000_000)
        r = bench_outer(n, fused, device, args.repeats)
        result["outer"][label] = r
        result[f"outer_fused_ratio_{label}"] = r["noloco"]["ratio"]
        result[f"outer_fused_ratio_{label}_diloco"] = r["diloco"]["ratio"]
    result["codecs"] = bench_codecs(10_000_000, device, args.repeats)
    small = count_params(build_model(ModelConfig(preset="small")))
    result["bytes_per_outer_step"] = bytes_per_outer_step(small)
    if args.json:
        print(json.dumps(result))
        return
    for label, r in result["outer"].items():
        for algo, v in r.items():
            print(f"outer {algo:6s} {label:>5s}: fused {v['fused_s'] * 1e3:8.1f} ms, "
                  f"unfused eager {v['unfused_s'] * 1e3:8.1f} ms (ratio {v['ratio']:.3f}), "
                  f"reference {v['reference_s'] * 1e3:8.1f} ms "
                  f"(ratio {v['ratio_vs_reference']:.3f})")
    for name, v in result["codecs"].items():
        print(f"codec {name:5s}: {v['gbps']:6.2f} GB/s (wire {v['wire_gbps']:5.2f}), "
              f"wire {v['wire_fraction']:.4f} of fp32, rel error {v['rel_error']:.2e}")
    b = result["bytes_per_outer_step"]
    for n_peers in ("8", "64"):
        print(f"bytes/outer step, {b['params']} params, N={n_peers}: "
              f"noloco {b['noloco'][n_peers]}, diloco {b['diloco'][n_peers]}")


if __name__ == "__main__":
    main()

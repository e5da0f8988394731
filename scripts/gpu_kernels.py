"""The kernel half of scripts/gpu_check.py: the Triton kernels on the device bit for bit
against the plain-torch reference on the CPU (check a), and the perturbation pass's
throughput against the device's copy bandwidth (check b), with the small helpers every
check shares. Loaded by gpu_check.py from this folder; see its docstring for the run."""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable
from typing import Any

import torch

try:  # only for the raw randint kernel below; the package imports triton lazily too
    import triton.language as tl
except ImportError:
    tl = None

# Kernel sizes: tails of every shape (1 element, a word less one, a word plus one), blocks
# of the kernels plus one (1024-element programs), beyond 2^20, and 10M (a prime count).
SIZES = (1, 31, 32, 33, 1000, 4097, 65_537, 1_048_583, 10_000_019)
QUICK_SIZES = (1, 33, 4097, 10_000_019)
# Seeds: small, the top bit set (> 2^63: both key halves, the sign of the int64 Triton
# loads), negative (taken mod 2^64), zero, and one with both key halves small.
SEEDS = (1, 2**63 + 7, -5, 0, 0x1234_5678_9ABC)
QUICK_SEEDS = SEEDS[:3]
LARGE = 1 << 20  # from this size on, the first two seeds only: the CPU reference is slow

# A perturbation is a memory pass plus a handful of integer ops per element (Philox's ten
# rounds are shared by 32 elements), below memory time on any recent GPU: it should run
# near copy speed. Below this fraction something is wrong (the interpreter, a fallback).
MIN_BANDWIDTH_RATIO = 0.25



class CheckTimeout(Exception):
    """A check ran past its own time limit (gpu_check.py's SIGALRM handler raises it)."""

# ---------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: same dtype and shape, same bytes (so -0.0 differs from 0.0)."""
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.detach().cpu().double() - b.detach().cpu().double()).abs().max())


def randn(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """(n,) fp32 on the CPU from a seeded generator (the same on every machine)."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


class Tally:
    """One kernel's cases: how many, the worst difference, the first few failures."""

    def __init__(self) -> None:
        self.cases, self.worst, self.failures = 0, 0.0, []
        self.error: str | None = None

    def add(self, what: str, got: torch.Tensor, want: torch.Tensor) -> None:
        self.cases += 1
        diff = max_abs_diff(got, want) if got.shape == want.shape else math.inf
        if math.isnan(diff) or diff > self.worst:  # a NaN sticks (max() would drop it)
            self.worst = diff
        if not same_bits(got, want) and len(self.failures) < 5:
            self.failures.append(f"{what}: max |diff| {diff:.3g}")

    def report(self) -> dict[str, Any]:
        ok = self.error is None and not self.failures and self.cases > 0
        worst = self.worst if math.isfinite(self.worst) else str(self.worst)  # valid JSON
        out = {"pass": ok, "cases": self.cases, "max_abs_diff": worst}
        if self.failures:
            out["failures"] = self.failures
        if self.error:
            out["error"] = self.error
        return out


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:400]


# ---------------------------------------------------------------------------------------
# a. Kernels: Triton on the device against the plain-torch reference on the CPU.
# ---------------------------------------------------------------------------------------


def _randint_body(out_ptr, offs_ptr, seed_ptr, n, BLOCK: tl.constexpr):
    """``tl.randint(seed, offsets)`` as it stands, the seed loaded from an int64 tensor as
    the Rademacher kernel loads it. Decorated on first use (``randint_kernel``), after
    main() has settled TRITON_INTERPRET; ``tl`` is a module global, as Triton resolves it."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    m = i < n
    seed = tl.load(seed_ptr)
    tl.store(out_ptr + i, tl.randint(seed, tl.load(offs_ptr + i, mask=m, other=0)), mask=m)


@functools.cache
def randint_kernel():
    import triton

    return triton.jit(_randint_body), triton.cdiv


def kernel_philox(t: Tally, dev: str, sizes: tuple[int, ...], seeds: tuple[int, ...]) -> None:
    from byteswarm.optim.philox import philox_words, seed_as_int64

    kernel, cdiv = randint_kernel()
    # Counters the Rademacher kernel uses (0 .. 10M/32) and 64-bit ones beyond them.
    offs = torch.cat([torch.arange(0, max(sizes) // 32 + 2, dtype=torch.int64),
                      torch.tensor([2**31 - 1, 2**32 - 1, 2**32, 2**40 + 3, 2**63 - 1])])
    for seed in seeds:
        out = torch.empty(offs.numel(), dtype=torch.int32, device=dev)
        seed_t = torch.tensor([seed_as_int64(seed)], dtype=torch.int64, device=dev)
        kernel[(cdiv(offs.numel(), 1024),)](out, offs.to(dev), seed_t, offs.numel(),
                                            BLOCK=1024)
        t.add(f"seed {seed}", out, philox_words(seed, offs))


def kernel_perturb(t: Tally, dev: str, sizes: tuple[int, ...], seeds: tuple[int, ...]) -> None:
    from byteswarm.optim.kernels import perturb

    for n in sizes:
        theta = randn(n, n)
        for seed in seeds[:2] if n >= LARGE else seeds:
            for c in (1e-3, -0.37):
                want = perturb(theta, torch.empty_like(theta), seed, c, impl="reference")
                got = perturb(theta.to(dev), torch.empty(n, device=dev), seed, c,
                              impl="triton")
                t.add(f"n {n} seed {seed} c {c}", got, want)


def kernel_update(t: Tally, dev: str, sizes: tuple[int, ...], seeds: tuple[int, ...]) -> None:
    from byteswarm.optim.kernels import update_

    for n in sizes:
        theta = randn(n, n + 1)
        for seed in seeds[:2] if n >= LARGE else seeds:
            for r in (1, 3, 9):  # 9: more than the compiled path's 8-record slot
                recs = [seed + 7919 * k for k in range(r)]  # all below 2^64
                coeffs = [(-1) ** k * 1e-3 * (k + 1) for k in range(r)]
                want = update_(theta.clone(), recs, coeffs, impl="reference")
                got = update_(theta.to(dev), recs, coeffs, impl="triton")
                t.add(f"n {n} seed {seed} records {r}", got, want)


def kernel_noloco(t: Tally, dev: str, sizes: tuple[int, ...], _seeds) -> None:
    from byteswarm.optim.outer import noloco_outer_step, noloco_outer_step_

    for n in sizes:
        phi, delta, theta, pm, tm = (randn(n, 100 * n + k) for k in range(5))
        want_phi, want_delta = noloco_outer_step(phi, delta, theta, pm, tm, 0.5, 0.7, 0.65)
        p, d, th = phi.to(dev), delta.to(dev), theta.to(dev)
        noloco_outer_step_(p, d, th, pm.to(dev), tm.to(dev), 0.5, 0.7, 0.65, impl="triton")
        for name, got, want in (("phi", p, want_phi), ("delta", d, want_delta),
                                ("theta", th, want_phi)):
            t.add(f"n {n} {name}", got, want)


def kernel_diloco(t: Tally, dev: str, sizes: tuple[int, ...], _seeds) -> None:
    from byteswarm.optim.outer import diloco_outer_step, diloco_outer_step_

    for n in sizes:
        phi, m, g = (randn(n, 200 * n + k) for k in range(3))
        want_phi, want_m = diloco_outer_step(phi, m, g, 0.7, 0.9)
        p, mm, th = phi.to(dev), m.to(dev), torch.empty(n, device=dev)
        diloco_outer_step_(p, mm, g.to(dev), th, 0.7, 0.9, impl="triton")
        for name, got, want in (("phi", p, want_phi), ("momentum", mm, want_m),
                                ("theta", th, want_phi)):
            t.add(f"n {n} {name}", got, want)


def kernel_int8(t: Tally, dev: str, sizes: tuple[int, ...], _seeds, *, dequant: bool) -> None:
    from byteswarm.optim.codecs import (
        dequantize_int8,
        dequantize_int8_reference,
        quantize_int8,
        quantize_int8_reference,
    )

    for n in sizes:
        x = randn(n, 300 * n, 2.0)
        x[n // 3: n // 3 + 300] = 0.0  # whole zero blocks (scale 0)
        x[n // 2] = 1e-30
        for block in (64, 256):
            q, s = quantize_int8_reference(x, block)
            if dequant:
                t.add(f"n {n} block {block}",
                      dequantize_int8(q.to(dev), s.to(dev), block, impl="triton"),
                      dequantize_int8_reference(q, s, block))
            else:
                q2, s2 = quantize_int8(x.to(dev), block, impl="triton")
                t.add(f"n {n} block {block} codes", q2, q)
                t.add(f"n {n} block {block} scales", s2, s)


KERNELS: dict[str, Callable] = {
    "philox_randint": kernel_philox,
    "perturb": kernel_perturb,
    "update_": kernel_update,
    "noloco_outer": kernel_noloco,
    "diloco_outer": kernel_diloco,
    "int8_quantize": functools.partial(kernel_int8, dequant=False),
    "int8_dequantize": functools.partial(kernel_int8, dequant=True),
}


def check_kernels(dev: str, quick: bool) -> dict[str, Any]:
    sizes = QUICK_SIZES if quick else SIZES
    seeds = QUICK_SEEDS if quick else SEEDS
    out: dict[str, Any] = {}
    for name, fn in KERNELS.items():  # one kernel's exception does not stop the others
        t = Tally()
        try:
            fn(t, dev, sizes, seeds)
        except CheckTimeout:
            raise
        except Exception as e:
            t.error = error_text(e)
        out[name] = t.report()
    ok = all(r["pass"] for r in out.values())
    return {"status": "pass" if ok else "fail", "sizes": list(sizes),
            "seeds": [str(s) for s in seeds], "kernels": out}


# ---------------------------------------------------------------------------------------
# b. Bandwidth: the perturbation pass against a plain copy of the same bytes.
# ---------------------------------------------------------------------------------------


def cuda_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3
            ) -> dict[str, float]:
    """Median milliseconds of each fn by CUDA events, the fns interleaved per repeat so a
    clock or thermal drift touches them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[k].append(start.elapsed_time(end))
    return {k: statistics.median(v) for k, v in times.items()}


def check_bandwidth(dev: str, quick: bool) -> dict[str, Any]:
    from byteswarm.optim.kernels import perturb, update_

    n = 1 << (27 if quick else 28)  # 0.5 / 1 GiB per buffer: far beyond any L2
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    seeds8 = list(range(11, 19))
    ms = cuda_ms({"copy": lambda: dst.copy_(src),
                  "perturb": lambda: perturb(src, dst, 12345, 1e-3, impl="triton"),
                  "update_1": lambda: update_(dst, [7], [1e-3], impl="triton"),
                  "update_8": lambda: update_(dst, seeds8, [1e-3] * 8, impl="triton")},
                 repeats=10 if quick else 20)
    nbytes = 2 * 4 * n  # each op reads n fp32 and writes n fp32 (update_ in place)
    gbps = {k: nbytes / (v / 1e3) / 1e9 for k, v in ms.items()}
    ratio = gbps["perturb"] / gbps["copy"]
    return {"status": "pass" if ratio >= MIN_BANDWIDTH_RATIO else "fail",
            "elements": n, "bytes_per_op": nbytes,
            "ms": {k: round(v, 4) for k, v in ms.items()},
            "gb_per_s": {k: round(v, 1) for k, v in gbps.items()},
            "perturb_over_copy": round(ratio, 4),
            "update_1_over_copy": round(gbps["update_1"] / gbps["copy"], 4),
            "update_8_over_copy": round(gbps["update_8"] / gbps["copy"], 4),
            "min_ratio": MIN_BANDWIDTH_RATIO,
            "note": "ops timed as called (perturb/update_ include copying their seeds and "
                    "coefficients to the device); copy is dst.copy_(src)"}

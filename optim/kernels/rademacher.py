"""Seeded Rademacher perturb and update: θ + c·z with z ∈ {−1,+1}^d regenerated from a seed.

This is the hot loop of seeded SPSA (Zelikman et al. 2023, arXiv 2306.10015, §3; the
perturbation itself is MeZO's, Malladi et al. 2023, arXiv 2305.17333, Alg. 1, with z drawn
Rademacher instead of Gaussian). DESIGN.md §3.1 states the determinism contract; here it is
in code:

- element j of a flat fp32 tensor uses bit ``j % 32`` of ``philox(seed, j // 32)``
  (``philox.py``; bit 1 is z = +1, bit 0 is z = −1);
- c is rounded to fp32 first, and ``θ + where(bit, c, −c)`` is one fp32 addition, so it
  rounds once and every backend gives the same bits (θ + c − 2c·bit, or adding in fp64,
  does not: measured while planning);
- a multi-record update adds the records one after another, each addition rounding once,
  so it equals applying them one at a time. Order matters: fp32 addition is not
  associative, so swapping two records changes the bits in general. Callers apply records
  in the canonical order (DESIGN.md §3.1 step 4).

Three implementations, picked by ``impl``:

``"reference"``  eager torch on ``philox.py``; slow (20–90× an add), it is the test oracle.
``"compiled"``   ``torch.compile`` (inductor) of the same math, the CPU fast path. Seeds and
                 coefficients go in as tensors and the word count is a dynamic dimension, so
                 new seeds, coefficients or sizes do not recompile.
``"triton"``     ``rademacher_triton.py``, which calls ``tl.randint`` itself (CUDA, or CPU
                 tensors under ``TRITON_INTERPRET=1``).
``"auto"``       triton for CUDA tensors, compiled otherwise; with the environment variable
                 ``BYTESWARM_CPU_KERNELS=reference``, the reference on CPU (no compile
                 at start: about 14 s less per process, and about 1.7x the time per pass
                 at 137k parameters; for short runs, such as the tests' nodes).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch

from ..philox import M32, philox_rounds, philox_words, rademacher_bits, seed_key

IMPLS = ("auto", "reference", "compiled", "triton")
CPU_ENV = "BYTESWARM_CPU_KERNELS"  # "reference": auto means the reference on CPU

# Records per compiled update pass. A pass with R records unrolls R fp32 adds, so each
# distinct R is its own graph; we round R up to one of these (padding with no-op records)
# to keep the number of graphs small. More than 8 records take more passes.
_SLOTS = (1, 2, 4, 8)


# ---------------------------------------------------------------------------------------
# Reference (eager torch): the oracle.
# ---------------------------------------------------------------------------------------


def _f32(c: float) -> float:
    """c rounded to the nearest fp32, as a Python float (exactly representable)."""
    return float(torch.tensor(float(c), dtype=torch.float32))


def signs(seed: int, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """z for elements 0..n-1 as (n,) bool, True meaning +1 (the reference, for tests)."""
    words = philox_words(seed, torch.arange((n + 31) // 32, device=device))  # (W,)
    return rademacher_bits(words).reshape(-1)[:n]  # (n,)


def _reference_segment(src: torch.Tensor, dst: torch.Tensor, word0: int,
                       seeds: Sequence[int], coeffs: Sequence[float]) -> None:
    """dst = src + Σ_r c_r·z_r over a 1-D segment whose element 0 is flat index 32·word0.

    src and dst may be the same tensor. Records are added one at a time, in order.
    """
    n = src.numel()
    idx = torch.arange(word0, word0 + (n + 31) // 32, device=src.device)  # (W,) word offsets
    acc = src
    for seed, c in zip(seeds, coeffs):
        bit = rademacher_bits(philox_words(seed, idx)).reshape(-1)[:n]  # (n,) bool
        cp = torch.tensor(_f32(c), dtype=torch.float32, device=src.device)
        acc = acc + torch.where(bit, cp, -cp)  # one fp32 rounding per record
    dst.copy_(acc)


# ---------------------------------------------------------------------------------------
# Compiled (inductor) CPU path.
#
# One graph per op: Philox over the W words of θ viewed as (W, 32), then one pass that
# broadcasts each word across its row and picks bit b with a shift. Inductor emits both
# loops in one kernel, with the words (1/8 of θ's bytes per record) in a scratch buffer in
# between. We measured this against two graphs (words, then apply): the fused graph was
# 10-35% faster, mostly the saved dispatch and round trip of the words.
# ---------------------------------------------------------------------------------------


def _words(theta2d: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor) -> torch.Tensor:
    """theta2d (W, 32) is only read for W; k0, k1 (R, 1) int64 -> words (R, W) int32."""
    w = torch.arange(theta2d.shape[0], dtype=torch.int64, device=theta2d.device)  # (W,)
    # (R, W) int64 in [0, 2^32); to int32 keeps the low 32 bits, as tl.randint returns them
    return philox_rounds(w & M32, (w >> 32) & M32, k0, k1).to(torch.int32)


def _bits(word_row: torch.Tensor) -> torch.Tensor:
    """(W,) int32 -> (W, 32) bool; the shift count is a constant, so the row stays 32 wide."""
    shifts = torch.arange(32, dtype=torch.int32, device=word_row.device)
    return ((word_row.unsqueeze(1) >> shifts) & 1).bool()


def _perturb_graph(theta2d: torch.Tensor, out2d: torch.Tensor, k0: torch.Tensor,
                   k1: torch.Tensor, c: torch.Tensor) -> None:
    """out2d = theta2d + where(bit, c, -c); theta2d, out2d (W, 32) fp32; k0, k1 (1, 1)."""
    words = _words(theta2d, k0, k1)  # (1, W)
    out2d.copy_(theta2d + torch.where(_bits(words[0]), c, -c))


def _update_graph(theta2d: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor,
                  cp: torch.Tensor, cm: torch.Tensor) -> None:
    """theta2d += K records in order; k0, k1 (K, 1) int64 keys; cp, cm (K,) fp32.

    A record adds cp[r] where its bit is 1 and cm[r] where it is 0; for a real record
    cm = −cp. Padding records use cp = cm = −0.0, which leaves every fp32 value unchanged
    bit for bit (x + (−0.0) == x, including x = −0.0), so padding costs compute, not bits.
    K is static (one graph per slot count): with it dynamic, inductor emitted a
    single-threaded Philox loop, 1.7x slower per record.
    """
    words = _words(theta2d, k0, k1)  # (K, W)
    x = theta2d
    for r in range(words.shape[0]):  # unrolled: one fp32 rounding per record
        x = x + torch.where(_bits(words[r]), cp[r], cm[r])
    theta2d.copy_(x)


class _Compiled:
    """The compiled graphs, made on first use and cached for the process."""

    def __init__(self) -> None:
        self.perturb = torch.compile(_perturb_graph)
        self.update = torch.compile(_update_graph)


_compiled: _Compiled | None = None
_fallback_reason: str | None = None


def compile_fallback_reason() -> str | None:
    """Why the compiled path fell back to the reference, or None if it has not."""
    return _fallback_reason


def _get_compiled() -> _Compiled | None:
    global _compiled
    if _fallback_reason is None and _compiled is None:
        _compiled = _Compiled()
    return None if _fallback_reason is not None else _compiled


def _give_up(err: BaseException) -> None:
    global _fallback_reason
    _fallback_reason = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    warnings.warn("torch.compile is unavailable for the Rademacher kernels; falling back to "
                  f"the eager reference (20-90x slower). Reason: {_fallback_reason}",
                  RuntimeWarning, stacklevel=3)


def _keys(seeds: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, 1) int64 tensors of the Philox key halves: new seeds are new data, not a new graph."""
    keys = [seed_key(s) for s in seeds]
    k0 = torch.tensor([[k[0]] for k in keys], dtype=torch.int64, device=device)
    k1 = torch.tensor([[k[1]] for k in keys], dtype=torch.int64, device=device)
    return k0, k1


def _perturb_compiled(flat: torch.Tensor, out: torch.Tensor, seed: int, c: float) -> None:
    n_words = flat.numel() // 32  # whole words go through the graph; a tail goes eager
    bulk = 32 * n_words
    # W = 0 or 1 would be a graph of its own (dynamo specialises sizes 0 and 1).
    fns = _get_compiled() if n_words >= 2 else None
    if fns is not None:
        try:
            t2, o2 = flat[:bulk].view(n_words, 32), out[:bulk].view(n_words, 32)
            # W varies with the model; marking it dynamic up front means one graph for all
            # sizes (otherwise dynamo compiles the first size static, then recompiles).
            torch._dynamo.maybe_mark_dynamic(t2, 0)
            torch._dynamo.maybe_mark_dynamic(o2, 0)
            k0, k1 = _keys([seed], flat.device)
            fns.perturb(t2, o2, k0, k1, torch.tensor(_f32(c), device=flat.device))
        except Exception as err:  # a missing or broken compiler: nothing was written yet
            _give_up(err)
            fns = None
    if fns is None:
        bulk = 0
    if bulk < flat.numel():
        _reference_segment(flat[bulk:], out[bulk:], bulk // 32, [seed], [c])


def _update_compiled(flat: torch.Tensor, seeds: Sequence[int], coeffs: Sequence[float]) -> None:
    n_words = flat.numel() // 32
    bulk = 32 * n_words
    done = 0  # records already applied to the bulk
    fns = _get_compiled() if n_words >= 2 else None
    t2 = flat[:bulk].view(n_words, 32)
    torch._dynamo.maybe_mark_dynamic(t2, 0)
    while fns is not None and done < len(seeds):
        s = list(seeds[done:done + _SLOTS[-1]])
        c = [_f32(x) for x in coeffs[done:done + _SLOTS[-1]]]
        pad = next(k for k in _SLOTS if k >= len(s)) - len(s)
        # Padding records repeat the last seed (any words will do: their coefficients are
        # -0.0). Their Philox is wasted work, but the graph count stays at len(_SLOTS).
        k0, k1 = _keys(s + s[-1:] * pad, flat.device)
        cp = torch.tensor(c + [-0.0] * pad, dtype=torch.float32, device=flat.device)
        cm = torch.tensor([-x for x in c] + [-0.0] * pad, dtype=torch.float32,
                          device=flat.device)
        try:
            fns.update(t2, k0, k1, cp, cm)
        except Exception as err:  # compile failure happens before the graph writes θ
            _give_up(err)
            break
        done += len(s)
    if done < len(seeds):
        _reference_segment(t2.view(-1), t2.view(-1), 0, seeds[done:], coeffs[done:])
    if bulk < flat.numel():
        _reference_segment(flat[bulk:], flat[bulk:], n_words, seeds, coeffs)


# ---------------------------------------------------------------------------------------
# Public ops.
# ---------------------------------------------------------------------------------------


def _pick(impl: str, t: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, not {impl!r}")
    if impl != "auto":
        return impl
    if t.is_cuda:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "compiled"
        return "triton"
    return "reference" if os.environ.get(CPU_ENV) == "reference" else "compiled"


def _flat(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype != torch.float32:
        raise TypeError(f"{what} must be float32, not {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous")
    return t.view(-1)


def perturb(theta: torch.Tensor, out: torch.Tensor, seed: int, c: float, *,
            impl: str = "auto") -> torch.Tensor:
    """out = θ + fp32(c)·z(seed), one fp32 rounding per element; θ is untouched.

    theta, out: same-shape contiguous float32 tensors, not the same memory (out is the
    scratch buffer the perturbed forward pass reads). Element j uses bit j%32 of
    ``philox(seed, j//32)``. Returns out.
    """
    src, dst = _flat(theta, "theta"), _flat(out, "out")
    if dst.shape != src.shape or dst.device != src.device:
        raise ValueError(f"out {tuple(out.shape)} on {out.device} does not match theta "
                         f"{tuple(theta.shape)} on {theta.device}")
    if dst.numel() and dst.data_ptr() == src.data_ptr():
        raise ValueError("out must not be theta; use update_ for an in-place change")
    how = _pick(impl, theta)
    with torch.no_grad():
        if how == "reference":
            _reference_segment(src, dst, 0, [seed], [c])
        elif how == "compiled":
            _perturb_compiled(src, dst, seed, c)
        else:
            from .rademacher_triton import apply_triton

            apply_triton(src, dst, [seed], [_f32(c)])
    return out


def update_(theta: torch.Tensor, seeds: Sequence[int], coeffs: Sequence[float], *,
            impl: str = "auto") -> torch.Tensor:
    """θ ← θ + Σ_r fp32(c_r)·z(s_r) in place, records added in the given order.

    Bit-identical to calling it once per record in that order (each addition rounds once
    in fp32). One pass over θ for up to 8 records on the compiled path, one pass for any
    number on Triton. Returns theta.
    """
    if len(seeds) != len(coeffs):
        raise ValueError(f"{len(seeds)} seeds but {len(coeffs)} coefficients")
    flat = _flat(theta, "theta")
    if not len(seeds):
        return theta
    how = _pick(impl, theta)
    with torch.no_grad():
        if how == "reference":
            _reference_segment(flat, flat, 0, seeds, coeffs)
        elif how == "compiled":
            _update_compiled(flat, seeds, coeffs)
        else:
            from .rademacher_triton import apply_triton

            apply_triton(flat, flat, list(seeds), [_f32(c) for c in coeffs])
    return theta

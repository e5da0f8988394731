"""Triton kernels for blockwise int8 quantise/dequantise (see ``optim/codecs.py``).

One program per quantisation block: it loads the block once, takes its absmax, and writes
the int8 codes and the block's fp32 scale. The arithmetic is the reference's: scale =
absmax / 127 and q = round_half_even(x / scale), both divisions IEEE-rounded (``div_rn``;
a plain ``/`` may be approximate on a GPU), the rounding done with the 1.5·2²³ trick, which
is exact round-half-to-even for |v| < 2²² (here |v| ≤ 127.x). Results equal the reference
bit for bit.

Imported lazily by ``codecs.py``; runs on CUDA tensors, and on CPU tensors when
TRITON_INTERPRET=1 was set before triton was first imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# 1.5 * 2**23: adding and subtracting it rounds to an integer (RNE). A constexpr: the GPU
# compiler refuses plain globals inside @jit functions (only the interpreter takes them).
ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, s_ptr, n, BLOCK: tl.constexpr):
    """One block: s = max|x| / 127; q = rne(x / s) as int8 (q = 0 where s = 0)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    s = tl.div_rn(tl.max(tl.abs(x), axis=0), 127.0)  # () fp32
    safe = tl.where(s > 0.0, s, 1.0)
    v = tl.div_rn(x, safe)
    r = (v + ROUND_MAGIC) - ROUND_MAGIC
    r = tl.minimum(tl.maximum(r, -127.0), 127.0)
    tl.store(q_ptr + offs, r.to(tl.int8), mask=mask)
    tl.store(s_ptr + pid, s)


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """One block: out = q · s."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    q = tl.load(q_ptr + offs, mask=mask, other=0)
    s = tl.load(s_ptr + pid)
    tl.store(out_ptr + offs, q.to(tl.float32) * s, mask=mask)


def quantize_triton(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N,) fp32 contiguous -> q (N,) int8, scales (ceil(N/block),) fp32."""
    n = x.numel()
    nb = triton.cdiv(n, block)
    q = torch.empty(n, dtype=torch.int8, device=x.device)
    s = torch.empty(nb, dtype=torch.float32, device=x.device)
    if n:
        _quantize_kernel[(nb,)](x, q, s, n, BLOCK=block, enable_fp_fusion=False)
    return q, s


def dequantize_triton(q: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    n = q.numel()
    out = torch.empty(n, dtype=torch.float32, device=q.device)
    if n:
        _dequantize_kernel[(scales.numel(),)](q, scales, out, n, BLOCK=block,
                                              enable_fp_fusion=False)
    return out

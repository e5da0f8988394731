"""Triton kernels for the fused NoLoCo and DiLoCo outer steps (see ``optim/outer.py``).

One pass over memory: each program loads its block of φ, δ (or the momentum m) and the group
averages once and stores φ, δ and θ once, instead of the six or seven passes the eager
sequence makes. The arithmetic is the reference's, in the reference's order; launches pass
``enable_fp_fusion=False`` so the GPU compiler does not contract a*b + c into an FMA
behind our back, and ``tl.fma`` appears exactly where the DiLoCo reference (torch's
``add(alpha=)``) has one. Under TRITON_INTERPRET=1 the results equal the reference bit
for bit.

Imported lazily by ``outer.py``; runs on CUDA tensors, and on CPU tensors when
TRITON_INTERPRET=1 was set before triton was first imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per program


@triton.jit
def _noloco_kernel(phi_ptr, delta_ptr, theta_ptr, pm_ptr, tm_ptr, n, alpha, beta, gamma,
                   BLOCK: tl.constexpr):
    """δ ← α·δ + β·tm − γ·(φ − pm); φ ← φ + δ; θ ← φ over one block. All (N,) fp32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = offs < n
    phi = tl.load(phi_ptr + offs, mask=mask, other=0.0)
    delta = tl.load(delta_ptr + offs, mask=mask, other=0.0)
    pm = tl.load(pm_ptr + offs, mask=mask, other=0.0)
    tm = tl.load(tm_ptr + offs, mask=mask, other=0.0)
    d = alpha * delta + beta * tm - gamma * (phi - pm)
    p = phi + d
    tl.store(delta_ptr + offs, d, mask=mask)
    tl.store(phi_ptr + offs, p, mask=mask)
    tl.store(theta_ptr + offs, p, mask=mask)


@triton.jit
def _diloco_kernel(phi_ptr, m_ptr, g_ptr, theta_ptr, n, neg_lr, mu, BLOCK: tl.constexpr):
    """m ← μ·m + g; φ ← φ − lr·(g + μ·m); θ ← φ over one block, rounded as SGD rounds."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = offs < n
    phi = tl.load(phi_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    m = m * mu + g  # momentum.mul(mu).add(g): two roundings
    step = tl.fma(m, mu, g)  # g.add(m, alpha=mu): one rounding
    p = tl.fma(step, neg_lr, phi)  # phi.add(step, alpha=-lr): one rounding
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(phi_ptr + offs, p, mask=mask)
    tl.store(theta_ptr + offs, p, mask=mask)


def _check(*ts: torch.Tensor) -> int:
    n = ts[0].numel()
    for t in ts:
        if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != n:
            raise ValueError("triton outer step: need contiguous fp32 vectors of one size")
    return n


def noloco_triton_(phi: torch.Tensor, delta: torch.Tensor, theta: torch.Tensor,
                   pm: torch.Tensor, tm: torch.Tensor, alpha: float, beta: float,
                   gamma: float) -> None:
    n = _check(phi, delta, theta, pm, tm)
    if n == 0:
        return
    _noloco_kernel[(triton.cdiv(n, BLOCK),)](phi, delta, theta, pm, tm, n, alpha, beta, gamma,
                                             BLOCK=BLOCK, enable_fp_fusion=False)


def diloco_triton_(phi: torch.Tensor, momentum: torch.Tensor, grad: torch.Tensor,
                   theta: torch.Tensor, lr: float, mu: float) -> None:
    n = _check(phi, momentum, grad, theta)
    if n == 0:
        return
    _diloco_kernel[(triton.cdiv(n, BLOCK),)](phi, momentum, grad, theta, n, -lr, mu,
                                             BLOCK=BLOCK, enable_fp_fusion=False)

"""Outer steps of the local-update algorithms, as plain functions and fused kernels.

Every vector here is one flat fp32 parameter vector of N elements, shape (N,). Each step
has three forms:

- a pure reference (``noloco_outer_step``, ``diloco_outer_step``): plain torch, returns new
  tensors; it is the test oracle;
- an in-place form (``noloco_outer_step_``, ``diloco_outer_step_``) that writes φ, δ and θ
  in one pass, with ``impl``:
    * ``"reference"``: the plain torch sequence, then copies;
    * ``"compiled"``: the same sequence through ``torch.compile`` (CPU or GPU), scalars as
      0-d tensors and dynamic shapes, so new α/β/γ or a new N never recompile;
    * ``"triton"``: a Triton kernel (CUDA; on CPU tensors only under TRITON_INTERPRET=1);
    * ``"auto"``: triton on CUDA when Triton imports, compiled on CPU for N ≥
      ``COMPILE_MIN_NUMEL``, the reference below that (compiling costs seconds once; the
      reference costs microseconds on a 136k-parameter model).

Bit-exactness. Fused kernels run the reference's operations in the reference's order, each
rounded once in fp32, so compiled and Triton-interpreted results equal the reference bit for
bit. Two exceptions, both within 1 ulp per operation: torch's ``add(x, alpha=a)`` is a fused
multiply-add on CPU (the DiLoCo reference copies ``torch.optim.SGD``, which uses it), and
inductor splits it into a multiply and an add; and Triton on a GPU contracts a*b + c into
an FMA unless told not to (we launch with ``enable_fp_fusion=False`` and use ``tl.fma``
exactly where the reference has one).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .config import ConfigError

IMPLS = ("auto", "reference", "compiled", "triton")
COMPILE_MIN_NUMEL = 1 << 20


def resolve_impl(impl: str, x: torch.Tensor, *, min_compiled: int = COMPILE_MIN_NUMEL) -> str:
    """Turn ``"auto"`` into a concrete implementation for tensor ``x``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if x.is_cuda and triton_available():
        return "triton"
    return "compiled" if x.numel() >= min_compiled else "reference"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def scalar(v: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d fp32 tensor: compiled kernels take scalars this way so they never recompile."""
    return torch.tensor(v, dtype=torch.float32, device=like.device)


def _compiled(fn: Callable, cache: dict) -> Callable:
    if fn not in cache:
        cache[fn] = torch.compile(fn, dynamic=True)
    return cache[fn]


_COMPILED: dict = {}


# --- NoLoCo ---------------------------------------------------------------------------------

def check_noloco_stability(alpha: float, beta: float, gamma: float, group_size: int) -> None:
    """Raise ConfigError unless (α, β, γ) lie in NoLoCo's stable region.

    Kolehmainen et al. 2025 (arXiv 2506.10911, §3 and appendix) show the variance between
    replicas stays bounded for α < γ < √(2 + α²) with groups of n = 2, and need β > α for
    the outer gradient to outweigh the momentum. The upper bound is proved for n = 2 only;
    for larger groups we keep α < γ and β > α and trust the averaging to be no less stable.
    """
    if not 0 <= alpha < 1:
        raise ConfigError(f"noloco: alpha (outer momentum) must be in [0, 1), got {alpha}")
    if not beta > alpha:
        raise ConfigError(f"noloco: beta ({beta}) must exceed alpha ({alpha}), or the "
                          "momentum outweighs the outer gradient and replicas drift")
    if not gamma > alpha:
        raise ConfigError(f"noloco: gamma ({gamma}) must exceed alpha ({alpha}), or the "
                          "pull toward the group mean is too weak to stop replicas drifting")
    bound = math.sqrt(2 + alpha * alpha)
    if group_size == 2 and not gamma < bound:
        raise ConfigError(f"noloco: gamma ({gamma}) must be below sqrt(2 + alpha^2) = "
                          f"{bound:.4f} for pairs, or the averaging step overshoots")


def noloco_outer_step(phi_i: torch.Tensor, delta_i: torch.Tensor, theta_i: torch.Tensor,
                      phi_group_mean: torch.Tensor, theta_minus_phi_group_mean: torch.Tensor,
                      alpha: float, beta: float, gamma: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """NoLoCo's outer step for peer i (Kolehmainen et al. 2025, arXiv 2506.10911, Eq. 2–3).

        δ_i ← α·δ_i + β·mean_G(θ_j − φ_j) − γ·(φ_i − mean_G φ_j)
        φ_i ← φ_i + δ_i ;  θ_i ← φ_i

    All arguments are (N,) fp32; the group means include peer i itself. Returns
    (new φ_i, new δ_i); the new θ_i is the new φ_i (θ_i is taken so the signature matches the
    in-place form and is only shape-checked here).

    Sign: Eq. 2 in the paper prints −β·mean(θ − φ), but θ − φ is the direction the inner
    steps moved (a negative gradient), and both the appendix proof and the authors' code
    add it; so +β. γ = β by default, as in the code, which scales the averaging term by the
    outer learning rate.
    """
    if not (phi_i.shape == delta_i.shape == theta_i.shape == phi_group_mean.shape
            == theta_minus_phi_group_mean.shape):
        raise ValueError("noloco_outer_step: all vectors must have the same shape")
    new_delta = alpha * delta_i + beta * theta_minus_phi_group_mean - gamma * (
        phi_i - phi_group_mean)  # (N,)
    new_phi = phi_i + new_delta  # (N,)
    return new_phi, new_delta


def _noloco_fused(phi, delta, theta, pm, tm, alpha, beta, gamma):
    # Same operations, same order as noloco_outer_step; scalars are 0-d tensors.
    d = alpha * delta + beta * tm - gamma * (phi - pm)
    p = phi + d
    delta.copy_(d)
    phi.copy_(p)
    theta.copy_(p)


def noloco_outer_step_(phi: torch.Tensor, delta: torch.Tensor, theta: torch.Tensor,
                       phi_group_mean: torch.Tensor, theta_minus_phi_group_mean: torch.Tensor,
                       alpha: float, beta: float, gamma: float, *, impl: str = "auto") -> None:
    """In place: δ, φ and θ updated as in ``noloco_outer_step``, one pass over memory."""
    impl = resolve_impl(impl, phi)
    args = (phi, delta, theta, phi_group_mean, theta_minus_phi_group_mean)
    if impl == "reference":
        new_phi, new_delta = noloco_outer_step(*args, alpha, beta, gamma)
        delta.copy_(new_delta)
        phi.copy_(new_phi)
        theta.copy_(new_phi)
    elif impl == "compiled":
        _compiled(_noloco_fused, _COMPILED)(
            *args, scalar(alpha, phi), scalar(beta, phi), scalar(gamma, phi))
    else:
        from .kernels.outer_triton import noloco_triton_
        noloco_triton_(*args, alpha, beta, gamma)


# --- DiLoCo ---------------------------------------------------------------------------------

def diloco_outer_step(phi: torch.Tensor, momentum: torch.Tensor, outer_grad: torch.Tensor,
                      lr: float, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DiLoCo's outer step: Nesterov SGD on the outer gradient (Douillard et al. 2023,
    arXiv 2311.08105, Alg. 1; lr 0.7, momentum 0.9 in the paper).

        g = mean_G(φ − θ_j) = φ − mean_G θ_j        (N,)  computed by the caller
        m ← μ·m + g ;  φ ← φ − lr·(g + μ·m) ;  θ_j ← φ

    Written as ``torch.optim.SGD(nesterov=True)`` writes it (dampening 0, no weight
    decay), so the result is bit-identical to that optimizer stepping φ with grad g and
    momentum buffer m (a zero buffer gives the same first step as SGD's clone of g).
    Returns (new φ, new m).
    """
    if not phi.shape == momentum.shape == outer_grad.shape:
        raise ValueError("diloco_outer_step: all vectors must have the same shape")
    new_m = momentum.mul(mu).add(outer_grad)  # (N,)
    step = outer_grad.add(new_m, alpha=mu)  # (N,), an FMA on CPU
    return phi.add(step, alpha=-lr), new_m


def _diloco_fused(phi, momentum, grad, theta, lr, mu):
    # Same sequence as diloco_outer_step; inductor turns add(alpha=) into mul + add.
    m = momentum * mu + grad
    p = phi - lr * (grad + mu * m)
    momentum.copy_(m)
    phi.copy_(p)
    theta.copy_(p)


def diloco_outer_step_(phi: torch.Tensor, momentum: torch.Tensor, outer_grad: torch.Tensor,
                       theta: torch.Tensor, lr: float, mu: float, *, impl: str = "auto") -> None:
    """In place: m, φ updated as in ``diloco_outer_step`` and θ ← φ, one pass over memory."""
    impl = resolve_impl(impl, phi)
    if impl == "reference":
        new_phi, new_m = diloco_outer_step(phi, momentum, outer_grad, lr, mu)
        momentum.copy_(new_m)
        phi.copy_(new_phi)
        theta.copy_(new_phi)
    elif impl == "compiled":
        _compiled(_diloco_fused, _COMPILED)(phi, momentum, outer_grad, theta,
                                            scalar(lr, phi), scalar(mu, phi))
    else:
        from .kernels.outer_triton import diloco_triton_
        diloco_triton_(phi, momentum, outer_grad, theta, lr, mu)


def group_mean(vectors: list[torch.Tensor]) -> torch.Tensor:
    """Mean of (N,) vectors, summed in the order given (callers sort by peer id so every
    member of a group gets the same bits)."""
    out = vectors[0].clone()
    for v in vectors[1:]:
        out.add_(v)
    return out.div_(len(vectors))

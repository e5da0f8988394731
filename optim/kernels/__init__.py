"""Fused kernels for the hot loops, each beside a plain-torch reference (DESIGN.md §3.5).

Triton on CUDA, ``torch.compile`` on CPU; the reference is the test oracle. Triton is
imported only when a Triton implementation is asked for, so this package works without it.
"""

from .rademacher import IMPLS, compile_fallback_reason, perturb, signs, update_

__all__ = ["IMPLS", "compile_fallback_reason", "perturb", "signs", "update_"]

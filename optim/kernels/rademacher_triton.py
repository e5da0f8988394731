"""The Triton kernel for seeded Rademacher perturb/update (see ``rademacher.py``).

It calls ``tl.randint(seed, word_offsets)`` itself: bit-identity with Triton's generator is
the point of the whole design (DESIGN.md §3.1), so the GPU path uses Triton's Philox, and
``philox.py`` is checked against it rather than the other way round.

Imported lazily by ``rademacher.py``, so the package works where triton is not installed.
Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton
was first imported (that is how the tests run it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..philox import seed_as_int64

# 32 words x 32 bits = 1024 elements per program: enough work per program on a GPU, and a
# few programs per test tensor under the (slow) interpreter.
BLOCK_WORDS = 32


@triton.jit
def _rademacher_kernel(src_ptr, dst_ptr, seeds_ptr, coeffs_ptr, n_records, n_elements,
                       BLOCK_WORDS: tl.constexpr):
    """dst = src + Σ_r where(bit_r, c_r, −c_r) over one block of BLOCK_WORDS × 32 elements.

    seeds_ptr: (R,) int64, each seed's 64 bits in two's complement (tl.randint widens the
    seed to uint64 and splits it into the Philox key, low word first). coeffs_ptr: (R,)
    fp32. Records are added in order, one fp32 rounding each, as in the reference.
    """
    pid = tl.program_id(0)
    words = pid * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)  # (BW,) word offsets, int32
    bits = tl.arange(0, 32)  # (32,)
    idx = words.to(tl.int64)[:, None] * 32 + bits[None, :]  # (BW, 32) flat element index
    mask = idx < n_elements
    x = tl.load(src_ptr + idx, mask=mask, other=0.0)  # (BW, 32) fp32
    for r in range(n_records):
        seed = tl.load(seeds_ptr + r)
        c = tl.load(coeffs_ptr + r)
        rnd = tl.randint(seed, words)  # (BW,) int32, bit-identical to philox_words
        z_pos = ((rnd[:, None] >> bits[None, :]) & 1) != 0  # (BW, 32) True where z = +1
        x = x + tl.where(z_pos, c, -c)  # a plain add: no multiply, so nothing to fuse (FMA)
    tl.store(dst_ptr + idx, x, mask=mask)


def apply_triton(src: torch.Tensor, dst: torch.Tensor, seeds: list[int],
                 coeffs: list[float]) -> None:
    """dst = src + Σ_r c_r·z(seed_r) for flat fp32 tensors; dst may be src (in place).

    coeffs must already be fp32 values (``rademacher._f32``); they are stored as fp32.
    """
    n = src.numel()
    n_words = (n + 31) // 32
    if n_words >= 2**31:  # word offsets are int32 in the kernel
        raise ValueError(f"{n} elements is beyond the Triton kernel's int32 word offsets")
    if n == 0 or not seeds:
        if dst.data_ptr() != src.data_ptr():
            dst.copy_(src)
        return
    seeds_t = torch.tensor([seed_as_int64(s) for s in seeds], dtype=torch.int64,
                           device=src.device)  # (R,)
    coeffs_t = torch.tensor(coeffs, dtype=torch.float32, device=src.device)  # (R,)
    grid = (triton.cdiv(n_words, BLOCK_WORDS),)
    _rademacher_kernel[grid](src, dst, seeds_t, coeffs_t, len(seeds), n,
                             BLOCK_WORDS=BLOCK_WORDS)

"""Compression for the NoLoCo/DiLoCo exchanges: tensors in, tensors out (DESIGN.md §3.4).

A codec turns a flat fp32 vector x of N elements into a ``Compressed`` (a few small
tensors) and back. Bytes are not made here: ``protocols/tensors.py`` encodes a Compressed
with a version byte and validates it on the way back in.

Codecs, by registry name, with their error on one call:

- ``none``: fp32 as is; exact.
- ``fp16`` / ``bf16``: round to nearest half / bfloat16; relative error ≤ 2⁻¹¹ / 2⁻⁸ per
  element (fp16 also flushes |x| < 6e-8 to zero and overflows beyond 65504 — fine for
  weights and outer gradients, which are O(1)).
- ``int8``: blockwise absmax, symmetric, round to nearest. Each block of ``block``
  elements (default 256) gets one fp32 scale s = max|x| / 127 and codes q = round(x / s) in
  [−127, 127]; x̂ = q·s. Per element |x − x̂| ≤ s/2 (up to fp32 rounding of the division
  and product, a few ulp of |x|). Wire cost: 1 byte per element + 4 bytes per block.
- ``topk``: keep the k = ⌈fraction·N⌉ entries of largest magnitude (values and int32
  indices) with error feedback (Seide et al. 2014; Karimireddy et al. 2019, arXiv
  1901.09847): what is not sent is kept in a residual e and added to the next input. With
  a = x + e, top-k keeps at least a k/N share of ‖a‖², so the new residual satisfies
  ‖e'‖ ≤ c·(‖x‖ + ‖e‖), c = √(1 − k/N) < 1, and therefore stays bounded:
  ‖e‖ ≤ c/(1 − c) · max‖x‖. The sum of everything decompressed equals the sum of the
  inputs minus the current residual, so the accumulated error never grows. ``TopK`` is
  the one stateful codec: use one object per stream of related vectors.

Every codec has ``compress(x) -> Compressed`` and ``decompress(c) -> Tensor``;
``decompress(c)`` at module level works for any Compressed. ``make_codec(name, ...)``
builds a fresh codec from the registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .outer import resolve_impl

INT8_BLOCK = 256
MIN_BLOCK, MAX_BLOCK = 8, 1 << 16  # int8 block sizes: powers of two in this range


@dataclass(frozen=True, eq=False)
class Compressed:
    """A compressed flat vector of ``numel`` elements."""

    codec: str  # registry name
    numel: int
    values: torch.Tensor  # none: (N,) fp32; fp16/bf16: (N,); int8: (N,) int8; topk: (k,)
    scales: torch.Tensor | None = None  # int8: (ceil(N/block),) fp32
    indices: torch.Tensor | None = None  # topk: (k,) int32, ascending
    block: int = 0  # int8: elements per scale

    @property
    def nbytes(self) -> int:
        """Bytes of tensor payload (numel × element size, summed over the tensors)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.values, self.scales, self.indices) if t is not None)


# --- blockwise int8: reference, compiled, triton -----------------------------------------

def quantize_int8_reference(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N,) fp32 -> q (N,) int8, scales (ceil(N/block),) fp32: s = max|x|/127 per
    block, q = round_half_even(x/s) (q = 0 in an all-zero block)."""
    n = x.numel()
    nb = (n + block - 1) // block
    xb = F.pad(x, (0, nb * block - n)).view(nb, block)  # (nb, block), zero padded
    scales = xb.abs().amax(dim=1) / 127.0  # (nb,)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(xb / safe[:, None]).clamp_(-127, 127).to(torch.int8)  # (nb, block)
    return q.view(-1)[:n], scales


def dequantize_int8_reference(q: torch.Tensor, scales: torch.Tensor,
                              block: int) -> torch.Tensor:
    """q (N,) int8, scales (nb,) fp32 -> x̂ (N,) fp32 = q·s of q's block."""
    n = q.numel()
    nb = scales.numel()
    qb = F.pad(q, (0, nb * block - n)).view(nb, block)  # (nb, block)
    return (qb.to(torch.float32) * scales[:, None]).view(-1)[:n]


# The compiled path works on the whole blocks in place (writing straight into the output,
# with no padded copy and no slice copy after) and leaves the short tail block to the
# reference; the operations are the reference's, so the bits are too.

def _quantize_blocks_(xb: torch.Tensor, qb: torch.Tensor, s: torch.Tensor) -> None:
    """xb (nb, B) fp32 -> qb (nb, B) int8 and s (nb,) fp32, in place."""
    sc = xb.abs().amax(dim=1) / 127.0
    safe = torch.where(sc > 0, sc, torch.ones_like(sc))
    qb.copy_(torch.round(xb / safe[:, None]).clamp(-127, 127).to(torch.int8))
    s.copy_(sc)


def _dequantize_blocks_(qb: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> None:
    """qb (nb, B) int8, s (nb,) -> out (nb, B) fp32, in place."""
    out.copy_(qb.to(torch.float32) * s[:, None])


_COMPILED: dict = {}


def _compiled(fn):
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def _quantize_compiled(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    full = n // block * block
    q = torch.empty(n, dtype=torch.int8, device=x.device)
    s = torch.empty((n + block - 1) // block, dtype=torch.float32, device=x.device)
    if full:
        _compiled(_quantize_blocks_)(x[:full].view(-1, block), q[:full].view(-1, block),
                                     s[: full // block])
    if full < n:
        q[full:], s[-1:] = quantize_int8_reference(x[full:], block)
    return q, s


def _dequantize_compiled(q: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    n = q.numel()
    full = n // block * block
    out = torch.empty(n, dtype=torch.float32, device=q.device)
    if full:
        _compiled(_dequantize_blocks_)(q[:full].view(-1, block), scales[: full // block],
                                       out[:full].view(-1, block))
    if full < n:
        out[full:] = dequantize_int8_reference(q[full:], scales[-1:], block)
    return out


def quantize_int8(x: torch.Tensor, block: int = INT8_BLOCK, *,
                  impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise int8 quantisation of a flat fp32 vector (see module docstring)."""
    x = x.reshape(-1).float().contiguous()
    impl = resolve_impl(impl, x)
    if impl == "reference":
        return quantize_int8_reference(x, block)
    if impl == "compiled":
        return _quantize_compiled(x, block)
    from .kernels.quant_triton import quantize_triton
    return quantize_triton(x, block)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, block: int = INT8_BLOCK, *,
                    impl: str = "auto") -> torch.Tensor:
    q, scales = q.reshape(-1).contiguous(), scales.reshape(-1).contiguous()
    impl = resolve_impl(impl, q)
    if impl == "reference":
        return dequantize_int8_reference(q, scales, block)
    if impl == "compiled":
        return _dequantize_compiled(q, scales, block)
    from .kernels.quant_triton import dequantize_triton
    return dequantize_triton(q, scales, block)


# --- codecs ------------------------------------------------------------------------------

def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1).float()


class NoCodec:
    name = "none"

    def compress(self, x: torch.Tensor) -> Compressed:
        x = _flat(x)
        return Compressed(self.name, x.numel(), x.clone())

    def decompress(self, c: Compressed) -> torch.Tensor:
        return c.values.float()


class HalfCodec:
    """fp16 or bf16: one rounding to nearest."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[name]

    def compress(self, x: torch.Tensor) -> Compressed:
        x = _flat(x)
        return Compressed(self.name, x.numel(), x.to(self.dtype))

    def decompress(self, c: Compressed) -> torch.Tensor:
        return c.values.float()


class Int8Codec:
    """Blockwise absmax int8 with one fp32 scale per ``block`` elements."""

    name = "int8"

    def __init__(self, block: int = INT8_BLOCK, impl: str = "auto"):
        if not (MIN_BLOCK <= block <= MAX_BLOCK and block & (block - 1) == 0):
            raise ValueError(f"int8 block must be a power of two in [{MIN_BLOCK}, "
                             f"{MAX_BLOCK}], got {block}")
        self.block, self.impl = block, impl

    def compress(self, x: torch.Tensor) -> Compressed:
        x = _flat(x)
        q, s = quantize_int8(x, self.block, impl=self.impl)
        return Compressed(self.name, x.numel(), q, scales=s, block=self.block)

    def decompress(self, c: Compressed) -> torch.Tensor:
        return dequantize_int8(c.values, c.scales, c.block, impl=self.impl)


class TopK:
    """Top-k by magnitude with error feedback; holds the residual of its stream."""

    name = "topk"

    def __init__(self, fraction: float = 0.01, *, error_feedback: bool = True,
                 value_dtype: torch.dtype = torch.float32):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"topk fraction must be in (0, 1], got {fraction}")
        self.fraction, self.error_feedback, self.value_dtype = fraction, error_feedback, \
            value_dtype
        self.residual: torch.Tensor | None = None  # (N,) fp32, what was not sent yet

    def k_for(self, n: int) -> int:
        return min(n, math.ceil(self.fraction * n))

    def compress(self, x: torch.Tensor) -> Compressed:
        x = _flat(x)
        n = x.numel()
        if self.residual is not None and self.residual.numel() != n:
            raise ValueError(f"TopK stream changed size ({self.residual.numel()} -> {n}); "
                             "use one TopK object per stream")
        a = x + self.residual if self.residual is not None else x.clone()  # (N,)
        idx = a.abs().topk(self.k_for(n), sorted=False).indices.sort().values  # (k,)
        vals = a[idx].to(self.value_dtype)  # (k,)
        if self.error_feedback:
            a[idx] -= vals.float()  # keeps the value dtype's rounding error too
            self.residual = a
        return Compressed(self.name, n, vals, indices=idx.to(torch.int32))

    def decompress(self, c: Compressed) -> torch.Tensor:
        return decompress(c)

    def bound(self, max_input_norm: float, n: int) -> float:
        """The documented bound on ‖residual‖ given max‖x‖ over the stream so far."""
        c = math.sqrt(1.0 - self.k_for(n) / n)
        return math.inf if c == 1.0 else c / (1.0 - c) * max_input_norm


def decompress(c: Compressed) -> torch.Tensor:
    """Any Compressed back to a flat fp32 vector of c.numel elements."""
    if c.codec == "int8":
        return dequantize_int8(c.values, c.scales, c.block)
    if c.codec == "topk":
        out = torch.zeros(c.numel, dtype=torch.float32, device=c.values.device)
        out[c.indices.long()] = c.values.float()
        return out
    return c.values.float()


CODECS = {
    "none": NoCodec,
    "fp16": lambda **kw: HalfCodec("fp16", **kw),
    "bf16": lambda **kw: HalfCodec("bf16", **kw),
    "int8": Int8Codec,
    "topk": TopK,
}


def make_codec(name: str, **options):
    """A fresh codec by registry name (a new TopK has an empty residual)."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r} (known: {', '.join(CODECS)})")
    return CODECS[name](**options)

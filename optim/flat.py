"""One flat fp32 buffer behind all of a model's trainable parameters.

Seeded SPSA perturbs and updates every parameter from one seed (DESIGN.md §3.1). Doing that
tensor by tensor would launch one kernel per tensor and give a compiled kernel a new shape
to specialise on each time; one buffer gives one kernel call and one shape per model.

Layout (the canonical flat order every peer shares):

- trainable parameters (``requires_grad``), in ``named_parameters()`` order, each starting
  at a multiple of 32 elements, so a tensor's elements start at bit 0 of a fresh Philox
  word: element j of the buffer uses bit ``j % 32`` of ``philox(seed, j // 32)``, and a
  tensor at offset ``o`` uses words from ``o // 32`` on (the same thing, seen per tensor);
- the gaps between tensors and the tail up to a multiple of 32 are **padding, kept zero**
  in the canonical buffer. The kernels run over the whole buffer (one call, no per-tensor
  masks), so an update writes ±c into the padding; ``zero_padding_()`` puts it back. We
  keep it zero so the buffer is a pure function of the parameter values: a fingerprint of
  the buffer then agrees between a replica that applied records and one that loaded the
  same values from a checkpoint or a peer. Scratch buffers (perturbed copies) need not
  bother: nothing reads their padding.

The module's parameters are moved into the buffer (their storage, not their identity), so
training and evaluation go through it; ``views(other)`` maps the same layout onto a scratch
buffer for a perturbed forward pass with ``torch.func.functional_call`` (see
``forward_with``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

ALIGN = 32  # elements; one Philox word supplies 32 signs


def _align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


class FlatParams:
    """The trainable parameters of ``module``, moved into one flat fp32 buffer.

    After construction the module's trainable parameters are views of ``.buffer``: each
    ``nn.Parameter`` object stays the same (so tied parameters stay tied, and whoever holds
    a reference to one sees the buffer) and its ``.data`` moves into the buffer. Frozen
    parameters and buffers are left where they were.

    Attributes:
        buffer: (numel,) fp32, the canonical θ; padding is zero.
        numel: length of ``buffer``, padding included (a multiple of 32).
        n_params: trainable elements, padding excluded.
        slices: name -> (offset, numel, shape), in ``named_parameters()`` order.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the module has no trainable parameters")
        devices = {p.device for _, p in named}
        if len(devices) != 1:
            raise ValueError(f"trainable parameters are on several devices: {devices}")
        bad = [n for n, p in named if p.dtype != torch.float32]
        if bad:
            raise TypeError(f"FlatParams holds float32 only; not: {', '.join(bad[:5])}")

        self.slices: dict[str, tuple[int, int, torch.Size]] = {}
        cursor = 0
        for name, p in named:
            offset = _align_up(cursor)
            self.slices[name] = (offset, p.numel(), p.shape)
            cursor = offset + p.numel()
        self.numel = _align_up(cursor)
        self.n_params = sum(n for _, n, _ in self.slices.values())
        self.buffer = torch.zeros(self.numel, dtype=torch.float32, device=devices.pop())

        # Each parameter keeps its identity (the caller's references, ties, an optimizer
        # built over them all stay valid) and gets the buffer's storage.
        with torch.no_grad():
            for name, p in named:
                self.tensor(name).copy_(p)
        self.params: dict[str, nn.Parameter] = {}
        for name, p in named:
            p.data = self.tensor(name)
            self.params[name] = p
        mask = torch.ones(self.numel, dtype=torch.bool, device=self.buffer.device)
        for offset, n, _ in self.slices.values():
            mask[offset:offset + n] = False
        self.pad_index = mask.nonzero().squeeze(1)  # (n_pad,) int64 positions of padding

    # -- layout ---------------------------------------------------------------------------

    def tensor(self, name: str, buf: torch.Tensor | None = None) -> torch.Tensor:
        """The view of parameter ``name`` in ``buf`` (default: the canonical buffer)."""
        offset, n, shape = self.slices[name]
        return (self.buffer if buf is None else buf)[offset:offset + n].view(shape)

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> view into ``buf``, a buffer with this layout (e.g. a perturbed scratch)."""
        self._check(buf)
        return {name: self.tensor(name, buf) for name in self.slices}

    def word_offset(self, name: str) -> int:
        """The Philox word that parameter ``name``'s element 0 uses (its offset / 32)."""
        return self.slices[name][0] // ALIGN

    def new_scratch(self) -> torch.Tensor:
        """An uninitialised buffer of the same size, for ``perturb(..., out=scratch)``."""
        return torch.empty_like(self.buffer)

    # -- padding --------------------------------------------------------------------------

    def zero_padding_(self, buf: torch.Tensor | None = None) -> torch.Tensor:
        """Zero the padding of ``buf`` (default: the canonical buffer) after a kernel pass."""
        buf = self.buffer if buf is None else buf
        self._check(buf)
        if self.pad_index.numel():
            buf.index_fill_(0, self.pad_index, 0.0)
        return buf

    def padding_is_zero(self, buf: torch.Tensor | None = None) -> bool:
        buf = self.buffer if buf is None else buf
        return bool((buf[self.pad_index] == 0).all()) if self.pad_index.numel() else True

    # -- evaluation through another buffer -----------------------------------------------

    def forward_with(self, buf: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """``module(*args, **kwargs)`` with its trainable parameters read from ``buf``.

        Uses ``torch.func.functional_call``, so the module and the canonical buffer are
        untouched; ties are honoured.
        """
        return torch.func.functional_call(self.module, self.views(buf), args, kwargs)

    @contextmanager
    def swapped(self, buf: torch.Tensor) -> Iterator[None]:
        """Within the block the module reads ``buf`` (for code that calls the module
        directly, e.g. a loss function). Cheap: it swaps the storage the views point at."""
        self._check(buf)
        old = self.buffer
        with torch.no_grad():
            for name, p in self.params.items():
                p.set_(self.tensor(name, buf))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.set_(self.tensor(name, old))

    def _check(self, buf: torch.Tensor) -> None:
        if buf.shape != (self.numel,) or buf.dtype != torch.float32 \
                or buf.device != self.buffer.device:
            raise ValueError(f"expected a ({self.numel},) float32 buffer on "
                             f"{self.buffer.device}, got {tuple(buf.shape)} {buf.dtype} "
                             f"on {buf.device}")

"""Perturbed forward passes without a perturbed copy of θ: each module's weights are made
just in time, as the module runs (issue 12, "SPSA's memory advantage").

Seeded SPSA measures L(θ ± εz) (optim/spsa.py). The plain way writes θ ± εz into a
scratch buffer the size of θ and runs the model on it: one more copy of the weights than
inference holds. Here the model's parameters are θ itself (FlatParams' buffer, never
written by a perturbed pass). A forward pre-hook on each module that owns trainable
parameters writes that module's slice of θ ± εz into a small stack and points its
parameters there (``Parameter.set_``, as ``FlatParams.swapped`` does); a forward hook
points them back when the module returns. The extra memory is the deepest nest of modules'
own parameters (for a GPT: one Linear) plus a NaN buffer the size of the largest tensor,
not θ.

Exactness. Every tensor starts at a 32-aligned offset o of the flat layout, so its slice of
z is the Philox words from o/32 on (``perturb(..., word0=o // 32)``), and θ + c·z rounds
once per element: each value a module reads is the very value the whole-buffer
``perturb`` writes, and the loss is the same bits (tests/test_spsa_memory.py checks it on
a GPT, on tied weights, and on a model that falls back).

When it would be wrong, and how we notice. The hooks see only a module's own forward. A
parameter read anywhere else would see θ instead of θ ± εz: a tied weight used in a
functional call (``F.linear(x, self.tok.weight)`` in the parent), a loss term that reads
the weights, a ``forward`` called directly instead of through ``__call__``, the user's own
modules reading ``byteswarm.Optimizer``'s parameters. So for the length of a pass every
parameter points at a NaN buffer outside its owners' hooks: such a read turns the loss
into NaN, and the caller (SPSA) measures that pass again on a full scratch and stays there
(``turn_off``). Every pass checks itself this way, not only a first one, so a read on a
rare path (a branch some batches take) is caught when it happens, before a byte is sent.
It is sound for reads whose values reach the loss through arithmetic (NaN goes through
+, ×, matmul, exp, max, softmax, a norm); not for a read used only to decide something (``if
w.norm() > 1``, an argmax that picks a path, NaN made an integer), which we know of no
model doing outside the module that owns the weight. A loss that is NaN for its own
reasons also sends us to the full scratch: more memory, never different bits.

We do not try where it cannot pay: if the stack would hold more than ``max_share`` of θ
(one module owns most of the parameters, e.g. ``byteswarm.Optimizer``'s holder module,
which owns them all and whose forward never runs), the caller uses the full scratch from
the start and no pass is wasted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from .flat import ALIGN, FlatParams, align_up
from .kernels import perturb

MAX_SHARE = 0.5  # of θ's elements: a bigger stack is not worth the hooks


@dataclass(frozen=True)
class Owned:
    """A module's own trainable parameters (``recurse=False``) and where they come from."""

    module: nn.Module
    # (flat offset, elements, offset in the frame): 32-aligned spans of the flat buffer,
    # padding included, so a span is whole Philox words; adjacent tensors share a span.
    runs: tuple[tuple[int, int, int], ...]
    # (parameter, offset in the frame, shape)
    params: tuple[tuple[nn.Parameter, int, torch.Size], ...]
    size: int  # elements of the frame


def plan(flat: FlatParams) -> tuple[list[Owned], int]:
    """The owners of ``flat``'s parameters, and the stack they need: the largest sum of
    frames along a path of the module tree (a module's frame is live while its children
    run)."""
    where = {id(p): flat.slices[name][:2] for name, p in flat.params.items()}
    owned: dict[int, Owned] = {}
    for mod in flat.module.modules():
        mine = sorted((where[id(p)][0], where[id(p)][1], p)
                      for _, p in mod.named_parameters(recurse=False) if id(p) in where)
        if not mine:
            continue
        runs: list[list[int]] = []  # [flat offset, elements, frame offset]
        params = []
        size = 0
        for offset, n, p in mine:
            span = align_up(offset + n) - offset
            if runs and runs[-1][0] + runs[-1][1] == offset:
                runs[-1][1] += span  # the next tensor of the flat layout: one span
            else:
                runs.append([offset, span, size])
            params.append((p, runs[-1][2] + offset - runs[-1][0], p.shape))
            size += span
        owned[id(mod)] = Owned(mod, tuple(tuple(r) for r in runs), tuple(params), size)

    depth: dict[int, int] = {}

    def need(mod: nn.Module, path: frozenset[int]) -> int:
        if id(mod) not in depth:
            kids = [need(c, path | {id(mod)}) for c in mod.children() if id(c) not in path]
            own = owned[id(mod)].size if id(mod) in owned else 0
            depth[id(mod)] = own + max(kids, default=0)
        return depth[id(mod)]

    return list(owned.values()), need(flat.module, frozenset())


@dataclass
class _Pass:
    base: torch.Tensor
    seed: int
    c: float
    top: int = 0  # elements of the stack in use
    # (owner, what each of its parameters read before) per module running now
    frames: list[tuple[Owned, list[tuple[nn.Parameter, torch.Tensor]]]] = field(
        default_factory=list)


class JustInTime:
    """Forward passes of ``flat.module`` on base + c·z(seed), module by module.

    ``on`` is False (and ``off_reason`` says why) where this cannot serve; the caller then
    perturbs a full scratch (``FlatParams.swapped``). ``overflows`` counts frames that did
    not fit the stack (a module called inside one that is not its ancestor) and were
    allocated on their own.
    """

    def __init__(self, flat: FlatParams, *, max_share: float = MAX_SHARE):
        self.flat = flat
        self.owned, capacity = plan(flat)
        self.off_reason: str | None = None
        self.overflows = 0
        if capacity > max_share * flat.numel:
            self.off_reason = (f"the module tree needs {capacity} of {flat.numel} elements "
                               "perturbed at once")
            return
        dev = flat.buffer.device
        self.stack = torch.empty(capacity, dtype=torch.float32, device=dev)
        biggest = max(p.numel() for p in flat.params.values())
        self.poison = torch.full((biggest,), float("nan"), dtype=torch.float32, device=dev)
        self._home = [(p, flat.tensor(name)) for name, p in flat.params.items()]
        self._away = [(p, self.poison[:p.numel()].view(p.shape)) for p in flat.params.values()]

    @property
    def on(self) -> bool:
        return self.off_reason is None

    def turn_off(self, reason: str) -> None:
        """From now on the caller uses the full scratch; our buffers are freed."""
        self.off_reason = reason
        self.stack = self.poison = None  # type: ignore[assignment]
        self._away = []

    def nbytes(self) -> int:
        """What this holds besides θ: the stack and the NaN buffer."""
        return 0 if not self.on else 4 * (self.stack.numel() + self.poison.numel())

    @contextmanager
    def perturbed(self, base: torch.Tensor, seed: int, c: float) -> Iterator[None]:
        """Within the block, each module that owns parameters reads base + fp32(c)·z(seed)
        for them while it runs, and NaN outside (see the module docstring); afterwards the
        parameters are views of θ again. ``base`` has θ's layout (θ itself, or a θ rebuilt
        for a spot check) and is never written."""
        if not self.on:
            raise RuntimeError(f"just-in-time perturbation is off: {self.off_reason}")
        self.flat.check(base)
        self.poison.fill_(float("nan"))  # in case a pass wrote into it
        state = _Pass(base, seed, c)
        handles = []
        for own in self.owned:
            handles.append(own.module.register_forward_pre_hook(
                partial(self._enter, state, own)))
            handles.append(own.module.register_forward_hook(
                partial(self._leave, state, own), always_call=True))
        try:
            with torch.no_grad():
                for p, away in self._away:
                    p.set_(away)
            yield
        finally:
            for h in handles:
                h.remove()
            with torch.no_grad():
                for p, home in self._home:
                    p.set_(home)

    def _enter(self, state: _Pass, own: Owned, module: nn.Module, args: Any) -> None:
        top = state.top
        if top + own.size <= self.stack.numel():
            frame = self.stack[top:top + own.size]
        else:
            frame = torch.empty(own.size, dtype=torch.float32, device=self.stack.device)
            self.overflows += 1
        state.top = top + own.size
        for offset, n, at in own.runs:
            perturb(state.base[offset:offset + n], frame[at:at + n], state.seed, state.c,
                    word0=offset // ALIGN)
        saved = []
        with torch.no_grad():
            for p, at, shape in own.params:
                saved.append((p, p.detach()))  # what it read before: θ's NaN, or a frame
                p.set_(frame[at:at + shape.numel()].view(shape))
        state.frames.append((own, saved))

    def _leave(self, state: _Pass, own: Owned, module: nn.Module, args: Any,
               output: Any) -> None:
        if not state.frames or state.frames[-1][0] is not own:
            return  # our pre-hook did not run (another hook raised first): nothing to undo
        _, saved = state.frames.pop()
        with torch.no_grad():
            for p, before in saved:
                p.set_(before)
        state.top -= own.size

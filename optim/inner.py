"""What NoLoCo and DiLoCo share: H inner Adam(W) steps on θ, then an exchange phase.

``LocalUpdate`` is the common half of both state machines: the inner loop, the slow
weights φ, the phase table that starts in TRAIN, and the driver methods that only depend on
those. A subclass starts its exchange in ``_end_inner_phase(now)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .data import Shard
from .model import lm_loss
from .sansio import Mailbox, PhaseTable
from .train import evaluate

TRAIN = "train"


def flatten(model: torch.nn.Module) -> torch.Tensor:
    """The model's trainable parameters as one new (N,) fp32 vector."""
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()
                      if p.requires_grad])


@torch.no_grad()
def load_flat_(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Copy an (N,) vector into the model's trainable parameters (no aliasing)."""
    o = 0
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(flat[o:o + p.numel()].view_as(p))
            o += p.numel()


class InnerLoop:
    """Adam(W) steps on one model and shard: the inner phase of NoLoCo and DiLoCo.

    The learning rate warms up linearly for ``warmup`` steps, then stays constant, or with
    ``decay_steps`` > 0 follows a cosine down to ``min_lr_ratio``·lr at that step. The
    optimizer state carries over from round to round, as in both papers.
    """

    def __init__(self, model: torch.nn.Module, shard: Shard, *, batch_size: int, seq_len: int,
                 lr: float, weight_decay: float, grad_clip: float, warmup: int,
                 decay_steps: int, min_lr_ratio: float):
        self.model, self.shard = model, shard
        self.batch_size, self.seq_len = batch_size, seq_len
        self.lr, self.grad_clip = lr, grad_clip
        self.warmup, self.decay_steps, self.min_lr_ratio = warmup, decay_steps, min_lr_ratio
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                     lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
        self.step_count = 0

    def lr_at(self, t: int) -> float:
        if t < self.warmup:
            return self.lr * (t + 1) / self.warmup
        if self.decay_steps <= 0:
            return self.lr
        frac = min(1.0, (t - self.warmup) / max(1, self.decay_steps - self.warmup))
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * frac))

    def step(self) -> dict[str, float]:
        t = self.step_count
        lr = self.lr_at(t)
        for group in self.opt.param_groups:
            group["lr"] = lr
        x, y = self.shard.batch(t, self.batch_size, self.seq_len)
        loss = lm_loss(self.model, x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.step_count += 1
        return {"loss": loss.item(), "lr": lr}


class LocalUpdate(Mailbox):
    """The half of NoLoCo and DiLoCo that is the same: see the module docstring."""

    def _init_local(self, cfg: Any, peer_id: str, model: torch.nn.Module, shard: Shard,
                    val: list, *, batch_size: int, seq_len: int, peers: frozenset[str],
                    moves: dict[str, set[str]]) -> None:
        cfg.check()
        self.cfg, self.model, self.val = cfg, model, val
        self.inner = InnerLoop(model, shard, batch_size=batch_size, seq_len=seq_len,
                               lr=cfg.lr, weight_decay=cfg.weight_decay,
                               grad_clip=cfg.grad_clip, warmup=cfg.warmup,
                               decay_steps=cfg.decay_steps, min_lr_ratio=cfg.min_lr_ratio)
        self.phi = flatten(model)  # (N,) slow / outer weights
        self.theta = torch.empty_like(self.phi)  # (N,) θ at the exchange
        self.numel = self.phi.numel()
        self._init_mailbox(peer_id, peers)
        self._moves = moves
        self._restart(0)

    def _restart(self, round_: int) -> None:
        """Start round ``round_`` from φ (θ ← φ), with no exchange in flight."""
        load_flat_(self.model, self.phi)
        self.round, self.inner_done, self.deadline = round_, 0, None
        self.phases = PhaseTable(TRAIN, self._moves)

    # -- driver interface
    def can_step(self) -> bool:
        return self.phases.phase == TRAIN

    def on_local_step(self, now: float) -> dict[str, float]:
        if not self.can_step():
            raise RuntimeError(f"on_local_step called in phase {self.phases.phase}")
        out = self.inner.step()
        self.inner_done += 1
        if self.inner_done == self.cfg.inner_steps:
            self._end_inner_phase(now)
        return out

    def evaluate(self) -> float:
        return evaluate(self.model, self.val)

    def state_bytes(self) -> int:
        """Bytes a joiner downloads: φ and the outer momentum, fp32."""
        return 2 * 4 * self.numel

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "round": self.round, "phase": self.phases.phase,
                "rejects": self.rejects.snapshot()}

    def _end_inner_phase(self, now: float) -> None:
        raise NotImplementedError

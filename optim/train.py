"""Local training with AdamW: the single-machine baseline and the inner loop of the
local-update algorithms. No clock and no files here; the driver times and saves."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import opt
from .model import count_params
from .task import Job


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = opt(300, "optimizer steps to run", lo=1)
    lr: float = opt(3e-3, "peak AdamW learning rate", lo=0.0, hi=1.0, lo_open=True)
    warmup: int = opt(20, "linear warm-up steps", lo=0)
    min_lr_ratio: float = opt(0.1, "cosine decay ends at lr * this", lo=0.0, hi=1.0)
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay", lo=0.0, hi=1.0)
    grad_clip: float = opt(1.0, "clip the global gradient norm (0: off)", lo=0.0)
    eval_every: int = opt(50, "evaluate validation loss every this many steps", lo=1)
    log_every: int = opt(10, "write a metrics line every this many steps", lo=1)
    checkpoint_every: int = opt(100, "checkpoint every this many steps", lo=1)
    seed: int = opt(0, "seed of the built-in task: init, data order and validation "
                    "batches (the same weights a swarm with this seed starts from)", lo=0,
                    hi=2**63 - 1)


def cosine_lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the update made at ``step`` (0-based): warm-up, then cosine."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    frac = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * frac))


class LocalTrainer:
    """One model, one shard of a task, AdamW. ``step()`` trains once and returns the batch
    loss. The job (optim/task.py) carries the model, its device and forward precision."""

    def __init__(self, job: Job, cfg: TrainConfig):
        self.cfg, self.job, self.model = cfg, job, job.model
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                     lr=cfg.lr, betas=(0.9, 0.95),
                                     weight_decay=cfg.weight_decay)
        self.step_count = 0

    @property
    def params(self) -> int:
        return count_params(self.model)

    def step(self) -> float:
        t = self.step_count
        for group in self.opt.param_groups:
            group["lr"] = cosine_lr(t, self.cfg)
        loss = self.job.loss(self.job.data.batch(t))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.step_count += 1
        return loss.item()

    def evaluate(self) -> float:
        return self.job.evaluate()

    def state_dict(self) -> dict:
        return {"step": self.step_count, "model": self.model.state_dict(),
                "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step_count = int(state["step"])

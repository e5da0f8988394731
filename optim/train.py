"""Local training with AdamW: the single-machine baseline and the inner loop of the
local-update algorithms. No clock and no files here; the driver times and saves."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import opt
from .data import Corpus, DataConfig
from .model import ModelConfig, build_model, count_params, lm_loss
from .seeds import derive_seed


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
    seed: int = opt(0, "seed for init, data order and validation batches", lo=0,
                    hi=2**63 - 1)


def cosine_lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the update made at ``step`` (0-based): warm-up, then cosine."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    frac = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * frac))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean validation loss in nats over a fixed list of batches."""
    was_training = model.training
    model.eval()
    total = sum(lm_loss(model, x, y).item() for x, y in batches)
    model.train(was_training)
    return total / len(batches)


class LocalTrainer:
    """One model, one shard, AdamW. ``step()`` trains once and returns the batch loss."""

    def __init__(self, model_cfg: ModelConfig, data_cfg: DataConfig, cfg: TrainConfig,
                 corpus: Corpus | None = None, *, peer: int = 0, n_peers: int = 1):
        self.cfg = cfg
        self.data_cfg = data_cfg
        self.model = build_model(model_cfg, seed=derive_seed("init", cfg.seed) % 2**31)
        self.seq_len = self.model.cfg.context
        self.corpus = corpus if corpus is not None else Corpus.load(data_cfg)
        self.corpus.check_fits(self.seq_len)
        self.shard = self.corpus.shard(peer, n_peers, non_iid=data_cfg.non_iid, seed=cfg.seed)
        self.val = self.corpus.val_set(data_cfg.batch_size, self.seq_len, data_cfg.val_batches,
                                       seed=cfg.seed)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr,
                                     weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
        self.step_count = 0

    @property
    def params(self) -> int:
        return count_params(self.model)

    def step(self) -> float:
        t = self.step_count
        x, y = self.shard.batch(t, self.data_cfg.batch_size, self.seq_len)
        for group in self.opt.param_groups:
            group["lr"] = cosine_lr(t, self.cfg)
        loss = lm_loss(self.model, x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.step_count += 1
        return loss.item()

    def evaluate(self) -> float:
        return evaluate(self.model, self.val)

    def state_dict(self) -> dict:
        return {"step": self.step_count, "model": self.model.state_dict(),
                "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step_count = int(state["step"])

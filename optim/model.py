"""A small byte-level GPT: the default workload every byteswarm algorithm trains.

Decoder-only, pre-norm, learned positions, vocabulary of 256 bytes (so no tokenizer and no
download). Shapes follow nanoGPT's conventions: B batch, T time, C channels, nh heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, opt

VOCAB = 256  # one token per byte


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    preset: str = opt("tiny", "model size preset; other model fields override it",
                      choices=("tiny", "small", "medium"))
    n_layer: int | None = opt(None, "transformer blocks", lo=1, hi=64)
    n_embd: int | None = opt(None, "width (channels)", lo=8, hi=4096)
    n_head: int | None = opt(None, "attention heads (must divide the width)", lo=1, hi=64)
    context: int | None = opt(None, "context length in bytes", lo=8, hi=4096)

    def check(self) -> None:
        r = self.resolved()
        if r.n_embd % r.n_head:
            raise ConfigError(f"model: n_embd {r.n_embd} is not divisible by n_head {r.n_head}")

    def resolved(self) -> ModelConfig:
        """Fill unset fields from the preset."""
        base = PRESETS[self.preset]
        return replace(self, **{k: v if v is not None else base[k] for k, v in
                                (("n_layer", self.n_layer), ("n_embd", self.n_embd),
                                 ("n_head", self.n_head), ("context", self.context))})


# tiny: 2 x 64 wide, 136k parameters (the size the algorithm specs were planned with).
# small: 4 x 256 wide, about 3.3M parameters (the default simulation).
# medium: 8 x 768 wide, 57.3M parameters (229 MB of fp32 weights), big enough that weights
# and optimizer state, not the interpreter, dominate memory (scripts/bench_memory.py).
PRESETS = {
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 4, "context": 64},
    "small": {"n_layer": 4, "n_embd": 256, "n_head": 8, "context": 128},
    "medium": {"n_layer": 8, "n_embd": 768, "n_head": 12, "context": 256},
}


class Block(nn.Module):
    def __init__(self, c: int, nh: int):
        super().__init__()
        self.nh = nh
        self.ln1 = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.ln2 = nn.LayerNorm(c)
        self.fc = nn.Linear(c, 4 * c)
        self.out = nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.nh, C // self.nh).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = cfg.resolved()
        self.cfg = cfg
        c = cfg.n_embd
        self.tok = nn.Embedding(VOCAB, c)
        self.pos = nn.Embedding(cfg.context, c)
        self.blocks = nn.ModuleList(Block(c, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(c)
        self.head = nn.Linear(c, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) int64 bytes -> logits (B, T, 256)."""
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def init_weights(model: GPT, seed: int) -> None:
    """GPT-2 style init from a private generator, so a seed gives the same model anywhere."""
    g = torch.Generator().manual_seed(seed)
    n_layer = model.cfg.n_layer
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln" in name or name.startswith("ln_"):
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight",
                                                                       "out.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    model = GPT(cfg)
    init_weights(model, seed)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy in nats; x, y are (B, T) int64."""
    logits = model(x)  # (B, T, 256)
    return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))

"""Seeded SPSA's math as plain functions, and its configuration (see optim/spsa.py for the
theory: the byte code, the scale, and why every number is computed the way it is)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from .config import opt
from .deadlines import WaitOptions
from .kernels import update_
from .seeds import derive_seed

Q_MAX = 127



@dataclass(frozen=True, kw_only=True)
class SPSAConfig(WaitOptions):
    swarm: str = opt("byteswarm", "swarm name; seeds are derived from it")
    eps: float = opt(1e-3, "perturbation size ε", lo=0.0, hi=1.0, lo_open=True)
    lr: float = opt(3e-3, "learning rate η of one record; a step's |R| records are summed "
                    "and divided by sqrt|R|, so one η suits any swarm size",
                    lo=0.0, hi=10.0, lo_open=True)
    lr_decay_steps: int = opt(0, "decay η linearly to lr·min_lr_ratio over this many steps "
                              "(0: constant)", lo=0)
    min_lr_ratio: float = opt(0.1, "final η as a fraction of lr", lo=0.0, hi=1.0)
    weight_decay: float = opt(0.0, "decoupled weight decay λ: θ ← θ·(1 − ηλ) each step",
                              lo=0.0, hi=1.0)
    scale_init: float = opt(8.0, "byte scale S before any history (|g| that maps to 127)",
                            lo=0.0, lo_open=True)
    scale_sigmas: float = opt(3.0, "S = this × RMS of recent dequantised g", lo=0.5)
    scale_ema: float = opt(0.95, "weight of the old value in the g² average", lo=0.0, hi=1.0)
    scale_min: float = opt(1e-3, "S never goes below this", lo=0.0, lo_open=True)
    finality_steps: int = opt(4, "a step stops accepting late records this many steps after "
                              "it closes", lo=1, hi=1000)
    max_ahead: int = opt(4, "reject records more than this many steps ahead", lo=1)
    step_timeout: float = opt(5.0, "most seconds to wait for the other records of a step",
                              lo=0.0, lo_open=True)
    spot_check_rate: float = opt(0.0, "fraction of other peers' records that every peer "
                                 "recomputes from the sender's public shard (two forward "
                                 "passes each); a liar is banned (needs the job's data_of)",
                                 lo=0.0, hi=1.0)
    spot_check_tolerance: int = opt(2, "a recomputed byte may differ by this much (float "
                                    "rounding on other hardware)", lo=0, hi=2 * 127)
    spot_check_strikes: int = opt(2, "ban a peer once this many of its records failed "
                                  "their check within spot_check_window steps (an honest "
                                  "record measured just before a late one came can fail "
                                  "once)", lo=1)
    spot_check_window: int = opt(1000, "steps over which failed checks add up", lo=1)


# --- math: plain functions ------------------------------------------------------------

def record_seed(swarm: str, step: int, peer: str) -> int:
    """s = H(swarm, t, p): the 64-bit seed of peer p's perturbation at step t."""
    return derive_seed("spsa", swarm, step, peer)


def spsa_projected_grad(l_plus: float, l_minus: float, eps: float) -> float:
    """g = (ℓ+ − ℓ−) / 2ε: the directional derivative along z (MeZO Alg. 1)."""
    return (l_plus - l_minus) / (2.0 * eps)


def quantize_g(g: float, scale: float, seed: int) -> int:
    """One signed byte for g: unbiased stochastic rounding of g/S·127, saturating at ±127.

    The rounding coin is drawn from the record's own seed, so the sender is accountable:
    anyone can recompute q from (θ, batch, seed)."""
    x = max(-Q_MAX, min(Q_MAX, g / scale * Q_MAX))
    lo = math.floor(x)
    u = derive_seed("round", seed) / 2.0**64  # uniform in [0, 1)
    return int(lo + (1 if u < x - lo else 0))


def dequantize_g(q: int, scale: float) -> float:
    return q * scale / Q_MAX


def learning_rate(step: int, cfg: SPSAConfig) -> float:
    """η_t: constant, or linear decay. Only +, −, ×, / so every peer gets the same bits."""
    if cfg.lr_decay_steps == 0:
        return cfg.lr
    frac = min(step, cfg.lr_decay_steps) / cfg.lr_decay_steps
    return cfg.lr * (1.0 - (1.0 - cfg.min_lr_ratio) * frac)


def step_coefficients(step: int, records: dict[str, int], scale: float,
                      cfg: SPSAConfig) -> tuple[list[int], list[float]]:
    """Seeds and coefficients c_r = −η_t·ĝ_r/|R_t| of one step, in canonical (peer id) order."""
    eta = learning_rate(step, cfg)
    peers = sorted(records)
    seeds = [record_seed(cfg.swarm, step, p) for p in peers]
    norm = math.sqrt(len(peers))  # correctly rounded, like + − × /: the same bits everywhere
    coeffs = [-eta * dequantize_g(records[p], scale) / norm for p in peers]
    return seeds, coeffs


def apply_step_(theta: torch.Tensor, step: int, records: dict[str, int], scale: float,
                cfg: SPSAConfig, pad: torch.Tensor | None = None) -> None:
    """θ ← θ·(1 − ηλ) − Σ_r η·ĝ_r·z_r/|R_t|, one fused pass for the records.

    ``pad`` (FlatParams.pad_index) is zeroed again afterwards: the kernel runs over the
    whole flat buffer, and keeping the padding zero makes θ's bytes a function of the
    parameter values alone."""
    if cfg.weight_decay > 0:
        theta.mul_(1.0 - learning_rate(step, cfg) * cfg.weight_decay)
    if records:
        seeds, coeffs = step_coefficients(step, records, scale, cfg)
        update_(theta, seeds, coeffs)
        if pad is not None and pad.numel():
            theta.index_fill_(0, pad, 0.0)


def next_g2_average(v: float | None, records: dict[str, int], scale: float,
                    cfg: SPSAConfig) -> float | None:
    """Fold one final step's records into the average of ĝ² (None: no history yet)."""
    if not records:
        return v
    mean_g2 = sum(dequantize_g(q, scale) ** 2 for q in records.values()) / len(records)
    return mean_g2 if v is None else cfg.scale_ema * v + (1.0 - cfg.scale_ema) * mean_g2


def scale_from_average(v: float | None, cfg: SPSAConfig) -> float:
    if v is None:
        return cfg.scale_init
    return max(cfg.scale_min, cfg.scale_sigmas * math.sqrt(v))


def fingerprint_of(theta: torch.Tensor) -> str:
    """Hash of θ's bytes: equal fingerprints mean bit-identical replicas."""
    return hashlib.blake2b(theta.detach().cpu().numpy().tobytes(), digest_size=8).hexdigest()

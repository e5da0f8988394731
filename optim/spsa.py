"""Seeded SPSA: one signed byte per peer per step, bit-identical replicas everywhere.

Zelikman et al. 2023, "Just One Byte (per gradient)", arXiv 2306.10015; the perturbation
and the two-forward-pass estimate follow MeZO (Malladi et al. 2023, arXiv 2305.17333, Alg. 1)
with Rademacher z instead of Gaussian.

Theory of operation
-------------------
Every peer holds the same θ. At step t, peer p draws z from the seed s = H(swarm, t, p),
measures ℓ± = L(θ ± εz) on its own batch for step t, and sends one byte q that encodes
g = (ℓ+ − ℓ−)/(2ε). Every peer then applies every record of step t, in order of peer id:
θ ← θ − η_t · ĝ(q) · z(s) / sqrt|R_t|. Dividing by sqrt|R_t|, not |R_t|, keeps the
noise of a step (the part of z that is not the gradient, which grows with the number of
parameters and limits η) the same at any swarm size, while the signal adds up: measured
on the tiny preset, η = 1e-2 over the mean diverged for one peer and η = 3e-3 learned.

Bit-identity rests on three rules:
1. every number that reaches θ is computed the same way on every peer: the dequantised ĝ,
   η_t (no transcendental functions: libm's cos is not correctly rounded everywhere),
   the byte scale (from +, ×, / and sqrt only, which IEEE rounds exactly), and the count
   |R_t|; each update rounds once in fp32 (see kernels);
2. records are applied in canonical order, never arrival order;
3. the perturbation never touches the canonical θ: ℓ± are measured on a scratch copy.

Late records. A step closes locally when every expected record is in or the driver's
deadline passes, so peers can close a step with different record sets. To stay exact, the
live θ is defined as a *final* snapshot (steps ≤ f, which no longer accept records) plus
the canonical application of steps f+1 … closed. A record that arrives late for a step
after f rebuilds the live θ from the snapshot (replay: one fused pass per step), so the
result is the same bits as if it had come on time. A record for a step ≤ f is rejected as
too late. Steps become final ``finality_steps`` after they close.

The byte code. q ∈ [−127, 127]; ĝ = q · S_t / 127 with stochastic rounding seeded from
the record's seed (unbiased while |g| ≤ S_t; error |ĝ − g| < S_t/127, variance ≤
(S_t/127)²/4). S_t is not sent: it is k·sqrt(v), where v is an exponential average of
ĝ² over *final* steps (t − 1 − finality_steps and older), so every peer derives the same
S_t from the shared record log whatever arrived late. Values beyond S_t saturate (the only
bias), and saturation pushes v, and so S, up.

Spot checks. A record is a deterministic function of public things: θ before its step,
the sender's shard (assigned from its peer id, so ``shard_of(peer)`` is known to all) and
the record's seed, which also draws the rounding coin. Every peer recomputes the same
sample of records — chosen by a hash of (swarm, step, peer) below ``spot_check_rate`` —
just before it applies them, so honest peers reach the same verdict on the same records:
a byte more than ``spot_check_tolerance`` away from the recomputed one is dropped and its
sender banned (its later records are rejected) on every honest peer at the same step,
and the replicas stay identical. A sampled record that arrives late is checked against θ
replayed to the step before it. A liar's influence is bounded anyway (a byte moves θ by
at most η·S/|R_t| along z); the checks make lying a lasting cost.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import opt
from .data import Shard
from .flat import FlatParams
from .kernels import perturb, update_
from .model import lm_loss
from .sansio import EVERYONE, Mailbox, Rejected, Send
from .seeds import derive_seed
from .train import evaluate

Q_MAX = 127
HISTORY_STEPS = 128  # records of final steps kept for joiners (log_since)


@dataclass(frozen=True, kw_only=True)
class SPSAConfig:
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
    step_timeout: float = opt(5.0, "seconds to wait for the other records of a step",
                              lo=0.0, lo_open=True)
    spot_check_rate: float = opt(0.0, "fraction of other peers' records that every peer "
                                 "recomputes from the sender's public shard (two forward "
                                 "passes each); a liar is banned (needs shard_of)",
                                 lo=0.0, hi=1.0)
    spot_check_tolerance: int = opt(2, "a recomputed byte may differ by this much (float "
                                    "rounding on other hardware)", lo=0, hi=2 * 127)


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


# --- the state machine ------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """What goes on the wire: peer ``peer``'s byte for step ``step`` (swarm in the envelope)."""

    step: int
    peer: str
    q: int


@dataclass
class Snapshot:
    """The final part of the record log folded into θ: everything up to ``step``.

    It is all a late joiner needs besides the records after ``step``, and all that
    ``replay`` needs to rebuild any later θ."""

    step: int  # last final step (-1: nothing final yet)
    theta: torch.Tensor  # (numel,) fp32
    g2: float | None = None  # average of ĝ² over final steps
    scales: dict[int, float] = field(default_factory=dict)  # pending step -> its S

    def scale(self, t: int, cfg: SPSAConfig) -> float:
        """S_t, from ĝ² history up to step t − 1 − finality_steps (final by the time
        anyone needs S_t)."""
        if t - 1 - cfg.finality_steps < 0:
            return cfg.scale_init
        return self.scales[t]

    def copy(self) -> Snapshot:
        return Snapshot(self.step, self.theta.clone(), self.g2, dict(self.scales))

    def advance_(self, records: dict[str, int], cfg: SPSAConfig,
                 pad: torch.Tensor | None = None) -> None:
        """Fold step ``self.step + 1`` with these records in; it is final from now on."""
        t = self.step + 1
        scale = self.scale(t, cfg)
        apply_step_(self.theta, t, records, scale, cfg, pad)
        self.g2 = next_g2_average(self.g2, records, scale, cfg)
        self.step = t
        self.scales[t + 1 + cfg.finality_steps] = scale_from_average(self.g2, cfg)
        self.scales.pop(t, None)


def replay(snap: Snapshot, log: dict[int, dict[str, int]], to_step: int,
           cfg: SPSAConfig, pad: torch.Tensor | None = None) -> Snapshot:
    """θ at ``to_step`` rebuilt from a snapshot and the records since (one pass a step)."""
    out = snap.copy()
    while out.step < to_step:
        out.advance_(log.get(out.step + 1, {}), cfg, pad)
    return out


class SPSA(Mailbox):
    """Sans-IO seeded SPSA for one peer (see module docstring and optim/sansio.py)."""

    def __init__(self, cfg: SPSAConfig, peer_id: str, model: torch.nn.Module, shard: Shard,
                 val: list, *, batch_size: int, seq_len: int, peers: frozenset[str] = frozenset()):
        self.cfg = cfg
        self.model, self.shard, self.val = model, shard, val
        self.batch_size, self.seq_len = batch_size, seq_len
        self.flat = FlatParams(model)  # the model reads its weights from flat.buffer
        self.theta = self.flat.buffer.detach().clone()  # canonical θ, never perturbed
        self.pad = self.flat.pad_index
        self.snap = Snapshot(-1, self.theta.clone())
        self.records: dict[int, dict[str, int]] = {}  # step -> peer -> q, steps > snap.step
        self.expected: dict[int, frozenset[str]] = {}
        self._init_mailbox(peer_id, peers)
        # Records are accepted from anyone who has been a member, not only current ones: a
        # peer that just left may have records in flight that others already applied.
        self.known = set(self.peers)
        self.closed = -1  # last step closed locally (applied to self.theta)
        self._mark: tuple[int, str] | None = None
        self.shard_of: Callable[[str], Shard] | None = None  # for spot checks
        self.history: dict[int, dict[str, int]] = {}  # records of the latest final steps
        self.banned: set[str] = set()
        self.counts = {"records_sent": 0, "records_applied": 0, "late_records": 0,
                       "replays": 0, "steps_closed": 0, "steps_timed_out": 0,
                       "spot_checks": 0, "spot_failures": 0}

    def scale(self, step: int) -> float:
        return self.snap.scale(step, self.cfg)

    # -- driver interface
    @property
    def step(self) -> int:
        """The step this peer works on next."""
        return self.closed + 1

    def can_step(self) -> bool:
        return self.peer_id not in self.records.get(self.step, {})

    def on_local_step(self, now: float) -> dict[str, float]:
        if not self.can_step():
            raise RuntimeError("on_local_step called while waiting for the step to close")
        t = self.step
        seed = record_seed(self.cfg.swarm, t, self.peer_id)
        losses = self._losses(self.theta, self.shard, t, seed)
        g = spsa_projected_grad(losses[0], losses[1], self.cfg.eps)
        q = quantize_g(g, self.scale(t), seed)
        self.expected.setdefault(t, self.peers)
        self.records.setdefault(t, {})[self.peer_id] = q
        self._out.append(Send(EVERYONE, Record(t, self.peer_id, q)))
        self.counts["records_sent"] += 1
        self.deadline = now + self.cfg.step_timeout
        self._maybe_close(now)
        return {"loss": 0.5 * (losses[0] + losses[1]), "g": g, "q": float(q)}

    def _losses(self, theta: torch.Tensor, shard: Shard, t: int, seed: int) -> list[float]:
        """ℓ+ and ℓ− of step t on ``shard``'s batch, measured on a scratch copy of θ."""
        x, y = shard.batch(t, self.batch_size, self.seq_len)
        losses = []
        with torch.no_grad():
            for sign in (1.0, -1.0):
                perturb(theta, self.flat.buffer, seed, sign * self.cfg.eps)
                losses.append(lm_loss(self.model, x, y).item())
        return losses

    def on_timer(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline:
            self.counts["steps_timed_out"] += 1
            self._close(self.step)

    def evaluate(self) -> float:
        self.flat.buffer.copy_(self.theta)
        return evaluate(self.model, self.val)

    def fingerprint(self) -> str:
        return fingerprint_of(self.theta)

    def final_mark(self) -> tuple[int, str]:
        """(step, fingerprint) of the final snapshot: equal on every peer that applied the
        same records, whatever arrived late, so peers compare these to find a split."""
        if self._mark is None or self._mark[0] != self.snap.step:
            self._mark = (self.snap.step, fingerprint_of(self.snap.theta))
        return self._mark

    def state_bytes(self) -> int:
        """Bytes a joiner downloads: the snapshot θ and the open records (~32 B each)."""
        return 4 * self.theta.numel() + 32 * sum(len(r) for r in self.records.values())

    def export_state(self) -> dict:
        """What a joiner downloads: the final snapshot and the open part of the log."""
        return {"snap": self.snap.copy(), "closed": self.closed,
                "records": {t: dict(r) for t, r in self.records.items()}}

    def import_state(self, state: dict) -> None:
        """Adopt a donor's state. The records we hold for steps still open there are
        kept too: each came from its author (ours we sent), so every peer will hold it,
        and the donor may simply not have it yet (a re-step of ours would even send a
        second, different byte for a step)."""
        held = self.records
        self.snap = state["snap"].copy()
        self.records = {t: dict(r) for t, r in state["records"].items()}
        for t, recs in held.items():
            if t > self.snap.step:
                for p, q in recs.items():
                    self.records.setdefault(t, {}).setdefault(p, q)
        self.closed = state["closed"]
        self.history = {}  # of our old lineage: not to be served to anyone
        # The snapshot may be older than the donor's own (statesync.py sends a marked one):
        # fold the steps that are final by now into it, as _close would have.
        while self.snap.step < self.closed - self.cfg.finality_steps:
            self._finalize(self.snap.step + 1)
        self.theta.copy_(replay(self.snap, self.records, self.closed, self.cfg,
                                self.pad).theta)
        self.expected, self.deadline = {}, None

    def stats(self) -> dict:
        return {**self.counts, "closed_step": self.closed, "final_step": self.snap.step,
                "banned": len(self.banned), "rejects": self.rejects.snapshot()}

    # -- internals
    def _accept(self, sender: str, msg: object) -> None:
        if not isinstance(msg, Record):
            raise Rejected("wrong_type", type(msg).__name__)
        if not isinstance(msg.q, int) or not -Q_MAX <= msg.q <= Q_MAX:
            raise Rejected("byte_out_of_range", repr(msg.q))
        if msg.peer not in self.known:
            raise Rejected("unknown_peer", msg.peer)
        if msg.peer in self.banned:
            raise Rejected("banned", msg.peer)
        if msg.step <= self.snap.step:
            raise Rejected("too_late", f"step {msg.step} is final")
        if msg.step > self.step + self.cfg.max_ahead:
            raise Rejected("too_far_ahead", f"step {msg.step}, working on {self.step}")
        step_records = self.records.setdefault(msg.step, {})
        if msg.peer in step_records:
            raise Rejected("duplicate", f"step {msg.step} peer {msg.peer}")
        step_records[msg.peer] = msg.q
        if msg.step <= self.closed:  # late: rebuild θ as if it had come on time
            self.counts["late_records"] += 1
            if self._sampled(msg.step, msg.peer):
                before = replay(self.snap, self.records, msg.step - 1, self.cfg, self.pad)
                if not self._check(before.theta, msg.step, msg.peer):
                    return
            self._replay_live()

    def on_peers(self, peers: frozenset[str], now: float) -> None:
        super().on_peers(peers, now)
        self.known |= self.peers

    def _after_message(self, now: float) -> None:
        self._maybe_close(now)

    def _maybe_close(self, now: float) -> None:
        t = self.step
        have = self.records.get(t, {})
        if self.peer_id in have and self.expected.get(t, self.peers) - self.banned <= set(have):
            self._close(t)

    def _close(self, t: int) -> None:
        for peer in sorted(self.records.get(t, {})):
            if self._sampled(t, peer):
                self._check(self.theta, t, peer)  # self.theta is θ before step t
        apply_step_(self.theta, t, self.records.get(t, {}), self.scale(t), self.cfg, self.pad)
        self.counts["records_applied"] += len(self.records.get(t, {}))
        self.counts["steps_closed"] += 1
        self.closed = t
        self.deadline = None
        self.expected.pop(t, None)
        while self.snap.step < self.closed - self.cfg.finality_steps:
            self._finalize(self.snap.step + 1)

    def _sampled(self, t: int, peer: str) -> bool:
        rate = self.cfg.spot_check_rate
        return (rate > 0 and self.shard_of is not None and peer != self.peer_id
                and derive_seed("spot", self.cfg.swarm, t, peer) < rate * 2.0**64)

    def _check(self, theta_before: torch.Tensor, t: int, peer: str) -> bool:
        """Recompute ``peer``'s byte of step t; on a lie, drop the record and ban the peer
        (its records of later steps too). True if the record stands."""
        q = self.records[t][peer]
        seed = record_seed(self.cfg.swarm, t, peer)
        losses = self._losses(theta_before, self.shard_of(peer), t, seed)
        expect = quantize_g(spsa_projected_grad(*losses, self.cfg.eps), self.scale(t), seed)
        self.counts["spot_checks"] += 1
        if abs(q - expect) <= self.cfg.spot_check_tolerance:
            return True
        self.counts["spot_failures"] += 1
        self.rejects.add("spot_check_failed")
        self.banned.add(peer)
        for s, recs in self.records.items():
            if s >= t:
                recs.pop(peer, None)
        return False

    def _finalize(self, t: int) -> None:
        """Fold step t into the snapshot; from now on it accepts no more records."""
        records = self.records.pop(t, {})
        self.snap.advance_(records, self.cfg, self.pad)
        self.history[t] = records
        self.history.pop(t - HISTORY_STEPS, None)

    def log_since(self, step: int) -> dict[int, dict[str, int]]:
        """Records of the steps after ``step``, final or open, as far as we still hold
        them: with a snapshot at ``step`` they rebuild our θ (``replay``)."""
        out = {t: dict(r) for t, r in self.history.items() if t > step}
        out.update({t: dict(r) for t, r in self.records.items() if t > step})
        return out

    def _replay_live(self) -> None:
        self.counts["replays"] += 1
        self.theta.copy_(self.snap.theta)
        for s in range(self.snap.step + 1, self.closed + 1):
            apply_step_(self.theta, s, self.records.get(s, {}), self.scale(s), self.cfg,
                        self.pad)

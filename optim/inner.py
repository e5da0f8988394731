"""What NoLoCo and DiLoCo share: H inner Adam(W) steps on θ, then an exchange phase.

``LocalUpdate`` is the common half of both state machines: the inner loop, the slow
weights φ, the phase table that starts in TRAIN, and the driver methods that only depend on
those. A subclass starts its exchange in ``_end_inner_phase(now)``.

The inner steps run on an engine passed to the constructor (``inner=``): by default the
``InnerLoop`` itself, one AdamW step per call. The simulator passes others: a bank that
defers steps and runs many replicas' as one computation (sim/batched.py), or a cheap
stand-in (sim/analytic.py). An engine has ``step()``, ``step_count`` and ``settle()``,
which makes the model's weights current; ``LocalUpdate`` calls it before each read of θ
(the exchange, ``evaluate``, a checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .deadlines import Deadlines
from .sansio import Mailbox, PhaseTable, Rejected
from .task import Job

TRAIN = "train"
MAX_ROUND = 1 << 62


@dataclass
class OuterState:
    """What a NoLoCo or DiLoCo joiner takes from a donor: the round it is in, φ and the outer
    momentum (NoLoCo's δ, DiLoCo's Nesterov buffer). The inner optimizer starts fresh, as
    for any new replica. It changes only when a round ends, so a donor serves one per round."""

    round: int
    phi: torch.Tensor  # (N,) fp32
    momentum: torch.Tensor  # (N,) fp32


def check_outer_state(state: Any, numel: int) -> OuterState:
    """``Rejected`` unless ``state`` is an OuterState of our size with finite values."""
    if not isinstance(state, OuterState):
        raise Rejected("bad_state", f"not an outer state: {type(state).__name__}")
    if type(state.round) is not int or not 0 <= state.round < MAX_ROUND:
        raise Rejected("bad_state", f"round {state.round!r}"[:80])
    for name in ("phi", "momentum"):
        v = getattr(state, name)
        if not (isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.dim() == 1
                and v.numel() == numel):
            raise Rejected("bad_state", f"{name} is not a ({numel},) fp32 vector")
        if not bool(torch.isfinite(v).all()):
            raise Rejected("bad_state", f"{name} is not finite")
    return state


def median_state(states: list[OuterState]) -> OuterState:
    """The coordinate-wise median of outer states of one round (the mean of two). With three
    or more, no single liar moves a coordinate outside the range of the honest ones."""
    if len(states) == 1:
        return states[0]
    pick = (lambda x: x.mean(0)) if len(states) == 2 else (lambda x: x.median(0).values)
    return OuterState(states[0].round, pick(torch.stack([s.phi for s in states])),
                      pick(torch.stack([s.momentum for s in states])))


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


class InnerEngine(Protocol):
    """What ``LocalUpdate`` asks of its inner steps (see the module docstring)."""

    step_count: int

    def step(self) -> dict[str, float]: ...

    def settle(self) -> None: ...


class InnerLoop:
    """Adam(W) steps on one peer's job: the inner phase of NoLoCo and DiLoCo.

    The learning rate warms up linearly for ``warmup`` steps, then stays constant, or with
    ``decay_steps`` > 0 follows a cosine down to ``min_lr_ratio``·lr at that step. The
    optimizer state carries over from round to round, as in both papers.
    """

    def __init__(self, job: Job, *, lr: float, weight_decay: float, grad_clip: float,
                 warmup: int, decay_steps: int, min_lr_ratio: float):
        self.job, self.model = job, job.model
        model = job.model
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
        loss = self.job.loss(self.job.data.batch(self.step_count))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        return {"loss": loss.item(), "lr": self.apply_grads()}

    def apply_grads(self) -> float:
        """One AdamW update from the gradients on the parameters, at the scheduled
        learning rate, clipped; returns the rate. (node/api.py calls it after the user's
        own backward.)"""
        lr = self.lr_at(self.step_count)
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.step_count += 1
        return lr

    def settle(self) -> None:
        """Nothing to do: every step has run when ``step()`` returns."""


class LocalUpdate(Mailbox):
    """The half of NoLoCo and DiLoCo that is the same: see the module docstring."""

    def _init_local(self, cfg: Any, peer_id: str, job: Job, *, peers: frozenset[str],
                    moves: dict[str, set[str]],
                    inner: Callable[[InnerLoop], InnerEngine] | None) -> None:
        cfg.check()
        self.cfg, self.job, self.model = cfg, job, job.model
        self.loop = InnerLoop(job, lr=cfg.lr, weight_decay=cfg.weight_decay,
                              grad_clip=cfg.grad_clip, warmup=cfg.warmup,
                              decay_steps=cfg.decay_steps, min_lr_ratio=cfg.min_lr_ratio)
        self.inner: InnerEngine = self.loop if inner is None else inner(self.loop)
        self.phi = flatten(self.model)  # (N,) slow / outer weights
        self.theta = torch.empty_like(self.phi)  # (N,) θ at the exchange
        self.numel = self.phi.numel()
        self._init_mailbox(peer_id, peers)
        self._moves = moves
        self.waits = Deadlines.of(cfg, cfg.round_timeout)
        self._arrived: list[tuple[str, int, str]] = []  # (sender, round, phase awaited in)
        self._restart(0)

    def _restart(self, round_: int) -> None:
        """Start round ``round_`` from φ (θ ← φ), with no exchange in flight."""
        load_flat_(self.model, self.phi)
        self.round, self.inner_done, self.deadline = round_, 0, None
        self._awaited: frozenset[str] = frozenset()  # whom the current phase waits for
        self._since: dict[tuple[int, str], float] = {}  # (round, phase) -> waiting since
        self.phases = PhaseTable(TRAIN, self._moves)

    # -- learned waits (optim/deadlines.py)
    def _await(self, senders: set[str] | list[str], now: float) -> None:
        """The phase just entered waits for these senders' messages: arm its deadline."""
        self._awaited = frozenset(senders) - {self.peer_id}
        self._since = {k: t for k, t in self._since.items() if k[0] >= self.round - 2}
        self._since[(self.round, self.phases.phase)] = now
        self.deadline = now + self.waits.wait(self._awaited)

    def _arrival(self, sender: str, round_: int, phase: str) -> None:
        """Note a message of ``sender`` for (round, phase), even one too late to use: its
        delay is timed when ``on_message`` is done with it."""
        self._arrived.append((sender, round_, phase))

    def on_message(self, sender: str, msg: Any, now: float) -> None:
        super().on_message(sender, msg, now)
        for who, round_, phase in self._arrived:
            since = self._since.get((round_, phase))
            # None: we were not waiting for it yet (delay 0), or we no longer know when.
            delay = now - since if since is not None else 0.0 if round_ >= self.round else None
            self.waits.heard(who, delay)
        self._arrived.clear()

    def _missing(self, have: set[str]) -> frozenset[str]:
        """Those awaited (and not dormant) that are not in ``have``."""
        return self._awaited - have - self.waits.dormant

    def _still_waiting(self, have: set[str]) -> bool:
        return bool(self._missing(have))

    def _timed_out(self, have: set[str]) -> None:
        self.counts["timeouts"] += 1
        self.waits.missed(self._missing(have))

    def on_peers(self, peers: frozenset[str], now: float) -> None:
        for back in peers - self.peers:
            self.waits.welcome(back)
        super().on_peers(peers, now)

    # -- driver interface
    def can_step(self) -> bool:
        return self.phases.phase == TRAIN

    def on_local_step(self, now: float) -> dict[str, float]:
        if not self.can_step():
            raise RuntimeError(f"on_local_step called in phase {self.phases.phase}")
        out = self.inner.step()
        self.inner_done += 1
        if self.inner_done == self.cfg.inner_steps:
            self.inner.settle()  # the exchange reads θ
            self._end_inner_phase(now)
        return out

    def evaluate(self) -> float:
        self.inner.settle()
        return self.job.evaluate()

    def state_bytes(self) -> int:
        """Bytes a joiner downloads: φ and the outer momentum, fp32."""
        return 2 * 4 * self.numel

    # -- the state contract (optim/sansio.py)
    identical_replicas = False  # each replica averaged with its own partners
    waits_for_syncing = False  # a joiner's share is not waited for until it is in
    MOMENTUM_KEY = "momentum"  # its name in checkpoints (NoLoCo: "delta")

    def _momentum(self) -> torch.Tensor:
        raise NotImplementedError

    def _drop_exchange(self) -> None:
        raise NotImplementedError

    def position(self) -> int:
        return self.round * self.cfg.inner_steps + self.inner_done

    def behind(self, other: int) -> bool:
        # A peer in a later round no longer takes our shares.
        h = self.cfg.inner_steps
        return other // h > self.position() // h

    def mark(self) -> tuple[int, str] | None:
        return None

    def served_tag(self) -> int | None:
        return self.round if self.round > 0 else None

    def served_state(self) -> OuterState:
        return self.export_state()

    has_log = False

    def served_mark(self, state: OuterState) -> None:
        return None

    def log_since(self, tag: int) -> None:
        return None

    def check_served(self, state: Any) -> OuterState:
        return check_outer_state(state, self.numel)

    def join_state(self, served: OuterState, log: Any) -> OuterState:
        return served

    def combine(self, states: list[OuterState]) -> OuterState:
        return median_state(states)

    def export_state(self) -> OuterState:
        return OuterState(self.round, self.phi.clone(), self._momentum().clone())

    def import_state(self, state: OuterState) -> None:
        """Start the donor's current round from its φ (θ ← φ), dropping any exchange."""
        check_outer_state(state, self.numel)
        self.phi.copy_(state.phi)
        self._momentum().copy_(state.momentum)
        self._restart(state.round)
        self._drop_exchange()

    def state_dict(self) -> dict[str, Any]:
        self.inner.settle()
        return {"sync": {"round": self.round, "phi": self.phi.clone(),
                         self.MOMENTUM_KEY: self._momentum().clone()},
                "local": {"model": self.model.state_dict(), "opt": self.loop.opt.state_dict(),
                          "inner_steps": self.inner.step_count,
                          "inner_done": self.inner_done}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sync, local = state["sync"], state["local"]
        self.import_state(OuterState(int(sync["round"]), sync["phi"],
                                     sync[self.MOMENTUM_KEY]))
        self.model.load_state_dict(local["model"])
        self.loop.opt.load_state_dict(local["opt"])
        self.inner.step_count = int(local["inner_steps"])
        self.inner_done = int(local["inner_done"])

    def to_model(self) -> None:
        self.inner.settle()  # the model holds θ

    def warm_up(self) -> None:
        pass  # nothing is compiled

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "round": self.round, "phase": self.phases.phase,
                "rejects": self.rejects.snapshot(), "deadlines": self.waits.stats()}

    def _end_inner_phase(self, now: float) -> None:
        raise NotImplementedError

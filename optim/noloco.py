"""NoLoCo: local Adam steps, then an outer step averaged with a small random group.

Kolehmainen et al. 2025, "NoLoCo: No-all-reduce Low Communication Training Method for
Large Models", arXiv 2506.10911 (the math is ``outer.noloco_outer_step``).

Theory of operation
-------------------
Each peer keeps fast weights θ (the model), slow weights φ and an outer momentum δ. A round
is H inner steps on θ, then an exchange:

1. The peer draws its group for round r: the peers it knows, sorted by a hash of (seed, r,
   id), cut into blocks of n (``draw_groups``). Every peer with the same peer set draws the
   same blocks, so partners pick each other without talking; a peer left alone at the end
   of the order steps alone.
2. It sends φ and θ − φ (through the codecs) to the rest of its group and waits, with
   ``can_step()`` false, until the group's shares for round r are in or ``round_timeout``
   has passed (``next_deadline``/``on_timer``). Blocking is the simple choice: the outer
   step needs the group's values, and a peer that trained on while waiting would have to
   reconcile θ with the new φ afterwards. Overlapping the exchange with the next inner
   phase is a possible optimisation, not done here.
3. It applies the outer step with the means over the members that arrived (itself, with
   its own exact values, included), sets θ ← φ, and starts round r + 1.

No step ever waits on the whole swarm, and a vanished partner costs one timeout.
Shares for later rounds are buffered (at most ``max_ahead`` rounds, a few per round);
shares for rounds already done are dropped and counted as ``stale``. Each share is checked
before use: size, finiteness, its update's norm against our own and its φ's distance
from ours (DESIGN.md §6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .codecs import CODECS, Compressed, decompress, make_codec
from .config import ConfigError, opt, validate
from .deadlines import MODES, WaitOptions
from .inner import TRAIN, InnerEngine, InnerLoop, LocalUpdate, flatten, load_flat_
from .outer import IMPLS, check_noloco_stability, group_mean, noloco_outer_step_
from .sansio import Rejected, Send
from .seeds import derive_seed
from .task import Job

CODEC_NAMES = tuple(CODECS)


def check_share(vec: torch.Tensor, numel: int, what: str) -> None:
    if vec.numel() != numel:
        raise Rejected("wrong_size", f"{what}: {vec.numel()} elements, expected {numel}")
    if not bool(torch.isfinite(vec).all()):
        raise Rejected("non_finite", what)


# --- the algorithm ------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class NoLoCoConfig(WaitOptions):
    inner_steps: int = opt(50, "H: inner steps per outer round (paper: 50)", lo=1)
    alpha: float = opt(0.5, "outer momentum α", lo=0.0, hi=1.0)
    beta: float = opt(0.7, "outer learning rate β on the group's mean θ − φ", lo=0.0,
                      hi=10.0, lo_open=True)
    gamma: float | None = opt(None, "pull γ toward the group's mean φ (unset: = beta)",
                              lo=0.0, hi=10.0)
    group_size: int = opt(2, "n: peers per averaging group (paper: 2)", lo=2, hi=256)
    codec: str = opt("none", "codec for θ − φ", choices=CODEC_NAMES)
    phi_codec: str | None = opt(None, "codec for φ (unset: as codec, but 'none' when codec "
                                "is topk: φ is weights, not an update)",
                                choices=("none", "fp16", "bf16", "int8"))
    int8_block: int = opt(256, "elements per int8 scale", lo=8, hi=65536)
    topk_fraction: float = opt(0.01, "share of entries top-k sends", lo=0.0, hi=1.0,
                               lo_open=True)
    round_timeout: float = opt(30.0, "most seconds to wait for the group's shares, then step "
                               "with whoever arrived", lo=0.0, lo_open=True)
    deadline: str = opt("learned", "'learned' (the default here): wait for each partner "
                        "about as long as its recent shares took, at most round_timeout, and "
                        "stop waiting for one that missed dormant_after deadlines "
                        "(optim/deadlines.py); 'fixed': always round_timeout",
                        choices=MODES)
    lr: float = opt(3e-3, "inner Adam learning rate", lo=0.0, hi=1.0, lo_open=True)
    weight_decay: float = opt(0.0, "inner decoupled weight decay (paper: none)", lo=0.0,
                              hi=1.0)
    warmup: int = opt(20, "inner linear warm-up steps", lo=0)
    decay_steps: int = opt(0, "cosine-decay the inner lr over this many inner steps "
                           "(0: constant after warm-up)", lo=0)
    min_lr_ratio: float = opt(0.1, "final inner lr as a fraction of lr", lo=0.0, hi=1.0)
    grad_clip: float = opt(1.0, "clip the inner gradient norm (0: off)", lo=0.0)
    max_ahead: int = opt(2, "buffer shares at most this many rounds ahead", lo=0, hi=64)
    max_norm_ratio: float = opt(10.0, "drop a share whose ‖θ−φ‖ exceeds this × our own "
                                "(0: no check)", lo=0.0)
    max_phi_distance: float = opt(0.5, "drop a share whose φ is farther from ours than this "
                                  "× ‖φ‖ (0: no check; tiny preset: replicas stay within "
                                  "0.09)", lo=0.0)
    seed: int = opt(0, "seed of the group draw (the same on every peer)", lo=0,
                    hi=2**63 - 1)
    impl: str = opt("auto", "outer-step kernel", choices=IMPLS)

    @property
    def gamma_(self) -> float:
        return self.beta if self.gamma is None else self.gamma

    @property
    def phi_codec_(self) -> str:
        if self.phi_codec is not None:
            return self.phi_codec
        return "none" if self.codec == "topk" else self.codec

    def check(self) -> None:
        validate(self)
        check_noloco_stability(self.alpha, self.beta, self.gamma_, self.group_size)
        if self.int8_block & (self.int8_block - 1):
            raise ConfigError(f"noloco: int8_block must be a power of two, "
                              f"got {self.int8_block}")


def codec_options(name: str, cfg: Any) -> dict[str, Any]:
    return ({"block": cfg.int8_block, "impl": cfg.impl} if name == "int8" else
            {"fraction": cfg.topk_fraction} if name == "topk" else {})


def draw_groups(round_: int, peers: frozenset[str] | set[str], seed: int,
                n: int) -> list[list[str]]:
    """Round r's groups: peers in a seeded order, cut into blocks of n (last may be short)."""
    order = sorted(peers, key=lambda p: (derive_seed("noloco-group", seed, round_, p), p))
    return [sorted(order[i:i + n]) for i in range(0, len(order), n)]


def group_of(peer: str, round_: int, peers: frozenset[str] | set[str], seed: int,
             n: int) -> list[str]:
    return next(g for g in draw_groups(round_, peers, seed, n) if peer in g)


@dataclass(frozen=True, eq=False)
class NoLoCoShare:
    """A peer's contribution to round ``round``: its φ and its θ − φ, compressed."""

    round: int
    phi: Compressed
    update: Compressed  # θ − φ


WAIT = "wait"
MOVES = {TRAIN: {WAIT}, WAIT: {TRAIN}}


class NoLoCo(LocalUpdate):
    """Sans-IO NoLoCo for one peer (see the module docstring and optim/sansio.py)."""

    Config = NoLoCoConfig

    def __init__(self, cfg: NoLoCoConfig, peer_id: str, job: Job, *,
                 peers: frozenset[str] = frozenset(),
                 inner: Callable[[InnerLoop], InnerEngine] | None = None):
        self._init_local(cfg, peer_id, job, peers=peers, moves=MOVES, inner=inner)
        self.delta = torch.zeros_like(self.phi)  # (N,) outer momentum
        self.update_codec = make_codec(cfg.codec, **codec_options(cfg.codec, cfg))
        self.phi_codec = make_codec(cfg.phi_codec_, **codec_options(cfg.phi_codec_, cfg))
        self.group: list[str] = [peer_id]
        self.inbox: dict[int, dict[str, NoLoCoShare]] = {}  # round -> sender -> share
        self.counts = {"rounds_completed": 0, "rounds_with_partner": 0, "rounds_alone": 0,
                       "timeouts": 0, "bytes_sent": 0, "shares_used": 0}

    # -- driver interface
    def on_timer(self, now: float) -> None:
        if self.phases.phase == WAIT and self.deadline is not None and now >= self.deadline:
            self._timed_out(set(self.inbox.get(self.round, {})))
            self._apply()

    MOMENTUM_KEY = "delta"

    def _momentum(self) -> torch.Tensor:
        return self.delta

    def _drop_exchange(self) -> None:
        self.inbox = {}

    # -- internals
    def _after_message(self, now: float) -> None:
        self._maybe_apply()

    def _end_inner_phase(self, now: float) -> None:
        self.theta = flatten(self.model)
        self.group = group_of(self.peer_id, self.round, self.peers, self.cfg.seed,
                              self.cfg.group_size)
        self.phases.move(WAIT)
        for sender in set(self.inbox.get(self.round, {})) - set(self.group):
            del self.inbox[self.round][sender]  # drew another group than we did
            self.rejects.add("not_in_group")
        if len(self.group) == 1:  # the odd peer out
            self._apply()
            return
        share = NoLoCoShare(self.round, self.phi_codec.compress(self.phi),
                            self.update_codec.compress(self.theta - self.phi))
        for peer in self.group:
            if peer != self.peer_id:
                self._out.append(Send(peer, share))
                self.counts["bytes_sent"] += share.phi.nbytes + share.update.nbytes
        self._await(self.group, now)
        self._maybe_apply()

    def _accept(self, sender: str, msg: Any) -> None:
        if not isinstance(msg, NoLoCoShare):
            raise Rejected("wrong_type", type(msg).__name__)
        if not (isinstance(msg.phi, Compressed) and isinstance(msg.update, Compressed)):
            raise Rejected("malformed", "share without compressed tensors")
        if msg.phi.numel != self.numel or msg.update.numel != self.numel:
            raise Rejected("wrong_size", f"{msg.phi.numel}/{msg.update.numel} != {self.numel}")
        if sender == self.peer_id:
            raise Rejected("from_self", sender)
        if msg.round < self.round:
            self._arrival(sender, msg.round, WAIT)  # too late to use; its delay still counts
            raise Rejected("stale", f"round {msg.round}, now {self.round}")
        if msg.round > self.round + self.cfg.max_ahead:
            raise Rejected("too_far_ahead", f"round {msg.round}, now {self.round}")
        if msg.round == self.round and self.phases.phase == WAIT and sender not in self.group:
            raise Rejected("not_in_group", sender)
        box = self.inbox.setdefault(msg.round, {})
        if sender in box:
            raise Rejected("duplicate", f"round {msg.round} from {sender}")
        if len(box) >= 4 * self.cfg.group_size:  # bounded: a flood cannot grow memory
            raise Rejected("buffer_full", f"round {msg.round}")
        box[sender] = msg
        self._arrival(sender, msg.round, WAIT)

    def _maybe_apply(self) -> None:
        if self.phases.phase == WAIT and not self._still_waiting(
                set(self.inbox.get(self.round, {}))):
            self._apply()

    def _usable(self, share: NoLoCoShare, own_norm: float) -> tuple[torch.Tensor,
                                                                     torch.Tensor] | None:
        """The share's (φ, θ − φ) as vectors, or None (counted) if it is junk."""
        try:
            phi, upd = decompress(share.phi), decompress(share.update)
            check_share(phi, self.numel, "phi")
            check_share(upd, self.numel, "update")
            # Bounded influence (DESIGN.md §6): the update is compared with our own, φ with
            # our φ's size (replicas drift apart by a few percent, not by our update's size).
            ratio, dist = self.cfg.max_norm_ratio, self.cfg.max_phi_distance
            if ratio > 0 and own_norm > 0 and float(upd.norm()) > ratio * own_norm:
                raise Rejected("norm_too_large", "update far larger than our own")
            if dist > 0 and float((phi - self.phi).norm()) > dist * float(self.phi.norm()):
                raise Rejected("phi_too_far", "slow weights far from ours")
        except Rejected as e:
            self.rejects.add(e.reason)
            return None
        return phi, upd

    def _apply(self) -> None:
        """The outer step with whatever of the group arrived; then the next round."""
        own_update = self.theta - self.phi  # (N,)
        own_norm = float(own_update.norm())
        shares = self.inbox.pop(self.round, {})
        phis, updates = {self.peer_id: self.phi}, {self.peer_id: own_update}
        for sender in self.group:
            if sender in shares:
                got = self._usable(shares[sender], own_norm)
                if got is not None:
                    phis[sender], updates[sender] = got
        order = sorted(phis)  # canonical order: every member sums the same way
        pm = group_mean([phis[p] for p in order])
        tm = group_mean([updates[p] for p in order])
        noloco_outer_step_(self.phi, self.delta, self.theta, pm, tm, self.cfg.alpha,
                           self.cfg.beta, self.cfg.gamma_, impl=self.cfg.impl)
        load_flat_(self.model, self.theta)
        used = len(order) - 1
        self.counts["shares_used"] += used
        self.counts["rounds_completed"] += 1
        self.counts["rounds_with_partner" if used else "rounds_alone"] += 1
        self.round += 1
        self.inner_done = 0
        self.deadline = None
        self.phases.move(TRAIN)
        for r in [r for r in self.inbox if r < self.round]:
            for _ in self.inbox.pop(r):
                self.rejects.add("stale")

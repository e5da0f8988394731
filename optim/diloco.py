"""DiLoCo: local AdamW steps, then an outer Nesterov step on the swarm's mean update.

Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language
Models", arXiv 2311.08105 (the math is ``outer.diloco_outer_step``). The baseline NoLoCo is
measured against.

Theory of operation
-------------------
Every peer starts round r from the same φ. After H inner steps each peer has an outer
gradient g_i = φ − θ_i, and the round needs mean_i g_i over the participants: the peers
it knows when it finishes its inner steps, sorted by id. The mean is a butterfly
all-reduce (as in hivemind's AllReduceRunner): the flat vector is cut into one contiguous
part per participant (``part_bounds``);

1. reduce: peer i sends part j of g_i to participant j and keeps its own part;
2. participant j averages part j over the contributions that arrived (its own included),
   compresses the average and sends it to every other participant — and uses the
   decompressed copy itself, so every peer applies the very same bits;
3. gather: with every part in, each peer has the same mean g, takes the outer Nesterov
   step, sets θ ← φ, and starts round r + 1.

Each stage waits at most ``round_timeout``: a contribution that has not arrived is left
out of its part's average (the average is over who arrived). A part whose owner never sends
its average is filled from the peer's own g for that part (hivemind does the same); peers
that saw different parts then hold slightly different φ from that round on — the price
of never hanging, counted in ``stats()['parts_missing']``. ``can_step()`` is false during
the exchange: DiLoCo's next round must start from the new φ. Every incoming part is
checked (size, finiteness, norm against our own g) before use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .codecs import Compressed, decompress, make_codec
from .config import ConfigError, opt, validate
from .deadlines import WaitOptions
from .inner import TRAIN, InnerEngine, InnerLoop, LocalUpdate, flatten, load_flat_
from .noloco import CODEC_NAMES, check_share, codec_options
from .outer import IMPLS, diloco_outer_step_, group_mean
from .sansio import Rejected, Send
from .task import Job


@dataclass(frozen=True, kw_only=True)
class DiLoCoConfig(WaitOptions):
    inner_steps: int = opt(50, "H: inner steps per outer round (paper: 500)", lo=1)
    outer_lr: float = opt(0.7, "outer Nesterov learning rate", lo=0.0, hi=10.0, lo_open=True)
    outer_momentum: float = opt(0.9, "outer Nesterov momentum", lo=0.0, hi=1.0)
    codec: str = opt("none", "codec for the outer gradient parts", choices=CODEC_NAMES)
    int8_block: int = opt(256, "elements per int8 scale", lo=8, hi=65536)
    topk_fraction: float = opt(0.01, "share of entries top-k sends", lo=0.0, hi=1.0,
                               lo_open=True)
    round_timeout: float = opt(30.0, "seconds each all-reduce stage waits before going on "
                               "without the missing peers", lo=0.0, lo_open=True)
    lr: float = opt(3e-3, "inner AdamW learning rate (paper: 4e-4 on far larger models)",
                    lo=0.0, hi=1.0, lo_open=True)
    weight_decay: float = opt(0.01, "inner AdamW weight decay (paper: 0.1, which costs the "
                              "tiny workload 0.013 nats at 500 steps)", lo=0.0, hi=1.0)
    warmup: int = opt(20, "inner linear warm-up steps", lo=0)
    decay_steps: int = opt(0, "cosine-decay the inner lr over this many inner steps "
                           "(0: constant after warm-up)", lo=0)
    min_lr_ratio: float = opt(0.1, "final inner lr as a fraction of lr", lo=0.0, hi=1.0)
    grad_clip: float = opt(1.0, "clip the inner gradient norm (0: off)", lo=0.0)
    max_ahead: int = opt(2, "buffer parts at most this many rounds ahead", lo=0, hi=64)
    max_norm_ratio: float = opt(10.0, "drop a part whose norm exceeds this × the norm of "
                                "our own g on that part (0: no check)", lo=0.0)
    impl: str = opt("auto", "outer-step kernel", choices=IMPLS)

    def check(self) -> None:
        validate(self)
        if self.int8_block & (self.int8_block - 1):
            raise ConfigError(f"diloco: int8_block must be a power of two, "
                              f"got {self.int8_block}")


def part_bounds(numel: int, n_parts: int) -> list[tuple[int, int]]:
    """[lo, hi) of each part: contiguous, sizes differing by at most one."""
    base, extra = divmod(numel, n_parts)
    bounds, lo = [], 0
    for j in range(n_parts):
        hi = lo + base + (1 if j < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


@dataclass(frozen=True, eq=False)
class ReducePart:
    """Stage 1: the sender's part ``part`` of its outer gradient, for participant ``part``."""

    round: int
    part: int
    n_parts: int
    data: Compressed


@dataclass(frozen=True, eq=False)
class GatherPart:
    """Stage 2: participant ``part``'s average of its part over ``contributors`` peers."""

    round: int
    part: int
    n_parts: int
    contributors: int
    data: Compressed


REDUCE, GATHER = "reduce", "gather"
MOVES = {TRAIN: {REDUCE}, REDUCE: {GATHER}, GATHER: {TRAIN}}


class DiLoCo(LocalUpdate):
    """Sans-IO DiLoCo for one peer (see the module docstring and optim/sansio.py)."""

    Config = DiLoCoConfig

    def __init__(self, cfg: DiLoCoConfig, peer_id: str, job: Job, *,
                 peers: frozenset[str] = frozenset(),
                 inner: Callable[[InnerLoop], InnerEngine] | None = None):
        self._init_local(cfg, peer_id, job, peers=peers, moves=MOVES, inner=inner)
        self.momentum = torch.zeros_like(self.phi)  # (N,) Nesterov buffer
        self.grad = torch.empty_like(self.phi)  # (N,) own outer gradient φ − θ
        self.members: list[str] = [peer_id]
        self.bounds: list[tuple[int, int]] = [(0, self.numel)]
        self.inbox: dict[str, dict[int, dict[str, Any]]] = {REDUCE: {}, GATHER: {}}
        self.parts: dict[int, torch.Tensor] = {}  # part index -> averaged part (gather)
        self._codecs: dict[tuple, Any] = {}
        self.counts = {"rounds_completed": 0, "rounds_with_partner": 0, "rounds_alone": 0,
                       "timeouts": 0, "bytes_sent": 0, "contributions_used": 0,
                       "parts_missing": 0}

    # -- driver interface
    def on_timer(self, now: float) -> None:
        if self.deadline is None or now < self.deadline:
            return
        self._timed_out(set(self.inbox[self.phases.phase].get(self.round, {})))
        if self.phases.phase == REDUCE:
            self._finish_reduce(now)
        elif self.phases.phase == GATHER:
            self._finish_round()

    def _momentum(self) -> torch.Tensor:
        return self.momentum

    def _drop_exchange(self) -> None:
        self.inbox = {REDUCE: {}, GATHER: {}}
        self.parts = {}

    # -- internals
    def _after_message(self, now: float) -> None:
        self._advance(now)

    def _codec(self, key: tuple) -> Any:
        """One codec per stream (stage, part, n_parts): top-k's residual is per stream."""
        if key not in self._codecs:
            self._codecs[key] = make_codec(self.cfg.codec,
                                           **codec_options(self.cfg.codec, self.cfg))
        return self._codecs[key]

    def _send(self, to: str, msg: Any) -> None:
        self._out.append(Send(to, msg))
        self.counts["bytes_sent"] += msg.data.nbytes

    def _my_part(self) -> int:
        return self.members.index(self.peer_id)

    def _slice(self, v: torch.Tensor, j: int) -> torch.Tensor:
        lo, hi = self.bounds[j]
        return v[lo:hi]

    def _end_inner_phase(self, now: float) -> None:
        self.theta = flatten(self.model)
        torch.sub(self.phi, self.theta, out=self.grad)
        self.members = sorted(self.peers)
        n = len(self.members)
        self.bounds = part_bounds(self.numel, n)
        # Top-k residuals belong to a part layout; drop those of layouts gone with churn.
        self._codecs = {k: v for k, v in self._codecs.items() if k[2] == n}
        self.phases.move(REDUCE)
        me = self._my_part()
        for j, peer in enumerate(self.members):
            if j != me:
                data = self._codec((REDUCE, j, n)).compress(self._slice(self.grad, j))
                self._send(peer, ReducePart(self.round, j, n, data))
        self._await(self.members, now)
        self._advance(now)

    def _accept(self, sender: str, msg: Any) -> None:
        if isinstance(msg, ReducePart):
            stage = REDUCE
        elif isinstance(msg, GatherPart):
            stage = GATHER
        else:
            raise Rejected("wrong_type", type(msg).__name__)
        if not isinstance(msg.data, Compressed):
            raise Rejected("malformed", "part without a compressed tensor")
        if sender == self.peer_id:
            raise Rejected("from_self", sender)
        if msg.round < self.round:
            self._arrival(sender, msg.round, stage)  # too late to use; its delay still counts
            raise Rejected("stale", f"round {msg.round}, now {self.round}")
        if msg.round > self.round + self.cfg.max_ahead:
            raise Rejected("too_far_ahead", f"round {msg.round}, now {self.round}")
        if msg.round == self.round and (self.phases.phase == GATHER and stage == REDUCE):
            raise Rejected("late", "contribution after the part was averaged")
        box = self.inbox[stage].setdefault(msg.round, {})
        if sender in box:
            raise Rejected("duplicate", f"{stage} round {msg.round} from {sender}")
        if len(box) >= len(self.peers) + 4:  # bounded whatever a flood sends
            raise Rejected("buffer_full", f"{stage} round {msg.round}")
        box[sender] = msg
        self._arrival(sender, msg.round, stage)

    def _checked(self, msg: Any, j: int, sender: str, stage: str) -> torch.Tensor | None:
        """The part as a vector, or None (counted) if it does not fit this round."""
        n = len(self.members)
        own = self._slice(self.grad, j)
        try:
            if msg.n_parts != n or msg.part != j or sender not in self.members:
                raise Rejected("bad_part", f"part {msg.part}/{msg.n_parts} from {sender}")
            if stage == GATHER and self.members[j] != sender:
                raise Rejected("bad_part", f"part {j} from {sender}, not its owner")
            if msg.data.numel != own.numel():
                raise Rejected("wrong_size", f"{msg.data.numel} != {own.numel()}")
            vec = decompress(msg.data)
            check_share(vec, own.numel(), stage)
            own_norm = float(own.norm())
            if self.cfg.max_norm_ratio > 0 and own_norm > 0 and \
                    float(vec.norm()) > self.cfg.max_norm_ratio * own_norm:
                raise Rejected("norm_too_large", f"{stage} part {j} from {sender}")
        except Rejected as e:
            self.rejects.add(e.reason)
            return None
        return vec

    def _advance(self, now: float) -> None:
        """Move on as soon as a stage has everything it waits for."""
        if self.phases.phase == REDUCE:
            if not self._still_waiting(set(self.inbox[REDUCE].get(self.round, {}))):
                self._finish_reduce(now)
        if self.phases.phase == GATHER:
            if not self._still_waiting(set(self.inbox[GATHER].get(self.round, {}))):
                self._finish_round()

    def _finish_reduce(self, now: float) -> None:
        """Average my part over the contributions that came; send it to everyone."""
        me, n = self._my_part(), len(self.members)
        got = {self.peer_id: self._slice(self.grad, me)}
        for sender, msg in sorted(self.inbox[REDUCE].pop(self.round, {}).items()):
            vec = self._checked(msg, me, sender, REDUCE)
            if vec is not None:
                got[sender] = vec
        self.counts["contributions_used"] += len(got) - 1
        avg = group_mean([got[p] for p in sorted(got)])
        self.parts = {}
        if n > 1:
            data = self._codec((GATHER, me, n)).compress(avg)
            avg = decompress(data)  # what everyone else gets, so all apply the same bits
            for peer in self.members:
                if peer != self.peer_id:
                    self._send(peer, GatherPart(self.round, me, n, len(got), data))
        self.parts[me] = avg
        self.phases.move(GATHER)
        self._await(self.members, now)
        self._advance(now)

    def _finish_round(self) -> None:
        """Assemble the mean outer gradient, take the Nesterov step, start the next round."""
        gathered = self.inbox[GATHER].pop(self.round, {})
        for j, owner in enumerate(self.members):
            if j in self.parts:
                continue
            vec = self._checked(gathered[owner], j, owner, GATHER) if owner in gathered \
                else None
            if vec is None:
                self.counts["parts_missing"] += 1
                vec = self._slice(self.grad, j)  # hivemind's fallback: our own part
            self.parts[j] = vec
        for _ in set(gathered) - set(self.members):
            self.rejects.add("bad_part")
        mean_g = torch.cat([self.parts[j] for j in range(len(self.members))])  # (N,)
        diloco_outer_step_(self.phi, self.momentum, mean_g, self.theta, self.cfg.outer_lr,
                           self.cfg.outer_momentum, impl=self.cfg.impl)
        load_flat_(self.model, self.theta)
        alone = len(self.members) == 1
        self.counts["rounds_completed"] += 1
        self.counts["rounds_alone" if alone else "rounds_with_partner"] += 1
        self.round += 1
        self.inner_done = 0
        self.deadline = None
        self.parts = {}
        self.phases.move(TRAIN)
        for stage in (REDUCE, GATHER):
            for r in [r for r in self.inbox[stage] if r < self.round]:
                for _ in self.inbox[stage].pop(r):
                    self.rejects.add("stale")

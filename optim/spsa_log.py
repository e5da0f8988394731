"""Seeded SPSA's record log and the states built from it: a record, the final snapshot,
a log of records since a step, and what a joiner adopts (see optim/spsa.py, "Late
records", for why θ is a snapshot plus the records since)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .sansio import Rejected
from .spsa_math import (
    Q_MAX,
    SPSAConfig,
    apply_step_,
    next_g2_average,
    scale_from_average,
)

MAX_OPEN_STEPS = 1024  # steps past a snapshot that a joiner's state may hold records for
MAX_PEERS_PER_STEP = 4096
MAX_PEER_ID = 128  # characters
MAX_STEP = 1 << 62


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
    # Spot-check verdicts of the final steps (optim/spsa.py), part of the state a joiner
    # takes: a banned peer -> the first step of its that is refused; a peer -> the final
    # steps within the window where a record of its failed its check.
    bans: dict[str, int] = field(default_factory=dict)
    strikes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def scale(self, t: int, cfg: SPSAConfig) -> float:
        """S_t, from ĝ² history up to step t − 1 − finality_steps (final by the time
        anyone needs S_t)."""
        if t - 1 - cfg.finality_steps < 0:
            return cfg.scale_init
        return self.scales[t]

    def copy(self, device: torch.device | None = None) -> Snapshot:
        """A copy, on ``device`` (a state read from the wire is on the CPU) if given."""
        theta = self.theta.clone() if device is None else self.theta.to(device, copy=True)
        return Snapshot(self.step, theta, self.g2, dict(self.scales), dict(self.bans),
                        dict(self.strikes))

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


@dataclass
class RecordLog:
    """Records after some step, final or open, and the last step closed by whoever holds
    them: on top of a snapshot at that step they rebuild the holder's θ (``replay``)."""

    closed: int
    records: dict[int, dict[str, int]]  # step -> peer -> q


@dataclass
class SPSAState:
    """What a joiner adopts: a final snapshot, the last closed step and the open records."""

    snap: Snapshot
    closed: int
    records: dict[int, dict[str, int]]


def check_spsa_state(state: Any, numel: int) -> SPSAState:
    """``Rejected`` unless every field of a joiner's state is in range (it came from the
    network: protocols/state.py decodes it, and this is the algorithm's own last word)."""
    if not isinstance(state, SPSAState) or not isinstance(state.snap, Snapshot):
        raise Rejected("bad_state", f"not an SPSA state: {type(state).__name__}")
    snap = state.snap
    ok_float = lambda v: type(v) is float and math.isfinite(v) and v >= 0
    theta = snap.theta
    if not (type(snap.step) is int and -1 <= snap.step < MAX_STEP
            and (snap.g2 is None or ok_float(snap.g2))
            and isinstance(snap.scales, dict) and len(snap.scales) <= MAX_OPEN_STEPS
            and all(type(t) is int and ok_float(v) for t, v in snap.scales.items())
            and isinstance(snap.bans, dict) and isinstance(snap.strikes, dict)
            and all(type(p) is str and type(t) is int for p, t in snap.bans.items())
            and all(type(p) is str and isinstance(ts, tuple)
                    and all(type(t) is int for t in ts) for p, ts in snap.strikes.items())):
        raise Rejected("bad_state", "snapshot fields out of range")
    if not (isinstance(theta, torch.Tensor) and theta.dtype == torch.float32
            and theta.dim() == 1 and theta.numel() == numel):
        raise Rejected("bad_state", f"θ is not a ({numel},) fp32 vector")
    if not bool(torch.isfinite(theta).all()):
        raise Rejected("bad_state", "θ is not finite")
    if not (type(state.closed) is int
            and snap.step <= state.closed <= snap.step + MAX_OPEN_STEPS):
        raise Rejected("bad_state", f"closed={state.closed!r}"[:80])
    if not isinstance(state.records, dict) or len(state.records) > MAX_OPEN_STEPS:
        raise Rejected("bad_state", "too many open steps")
    for t, recs in state.records.items():
        if not (type(t) is int and snap.step < t <= state.closed + MAX_OPEN_STEPS
                and isinstance(recs, dict) and len(recs) <= MAX_PEERS_PER_STEP):
            raise Rejected("bad_state", f"records of step {t!r}"[:80])
        for p, q in recs.items():
            if not (isinstance(p, str) and 0 < len(p) <= MAX_PEER_ID
                    and type(q) is int and -Q_MAX <= q <= Q_MAX):
                raise Rejected("bad_state", f"a record of step {t}")
    return state


def replay(snap: Snapshot, log: dict[int, dict[str, int]], to_step: int,
           cfg: SPSAConfig, pad: torch.Tensor | None = None) -> Snapshot:
    """θ at ``to_step`` rebuilt from a snapshot and the records since (one pass a step)."""
    out = snap.copy()
    while out.step < to_step:
        out.advance_(log.get(out.step + 1, {}), cfg, pad)
    return out

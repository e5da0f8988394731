"""How long to wait for a peer, learned from when its messages actually came.

A fixed timeout has to be guessed for the worst link in the swarm, and a member that
announced itself and went silent (or never was real) costs the whole of it on every step.
``Deadlines`` instead keeps, per sender, the delays its recent messages had (time from the
moment we were ready for them to their arrival; a message that came before we were ready
has delay 0) and waits for each sender about as long as it has needed: a high quantile of
its recent delays with a margin, never less than a floor and never more than the configured
timeout, which stays the bound. A sender seen too rarely for an estimate of its own (a
NoLoCo partner met once in a while) is waited for as long as the swarm's recent messages
needed, with a wider margin; before anything is observed, the whole timeout.

A sender that misses its deadline ``dormant_after`` times in a row is *dormant*: nobody
waits for it until a message of its arrives again. A silent member so costs at most that
many timeouts in all, not one per step. Shorter waits never split SPSA replicas: late
records still rebuild θ exactly on every peer (optim/spsa.py); a peer that ended a step
early only measures its next record on the θ it had then.

Not with SPSA's spot checks: they recompute a record from θ with every record of the
steps before it, and a peer that ended a step early computes its next record on a θ
without the late ones, a strike against an honest peer if sampled (two ban it).
Spot-checking SPSA peers keep fixed waits (which a member that sends its records just
late can still exploit: docs/security.md).

Sans-IO like the algorithms: the caller passes ``now``; the same object runs in the node
and the simulator. ``mode="fixed"`` keeps the old behaviour (always the timeout, nobody
dormant) for tests and comparisons.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .config import opt

WINDOW = 16  # recent delays kept per sender
MIN_SEEN = 3  # observations before a sender's own estimate replaces the timeout
QUANTILE = 0.9
MARGIN = 2.0  # the wait is the quantile times this, plus the floor
POOLED_MARGIN = 3.0  # the same from everyone's delays, for a sender seen too rarely
POOLED_WINDOW = 64
MODES = ("learned", "fixed")


@dataclass(frozen=True, kw_only=True)
class WaitOptions:
    """The deadline options every algorithm's config has (its own timeout is the bound)."""

    # Fixed unless an algorithm says otherwise (NoLoCo does). SPSA: a step ended early makes
    # the next records stale (measured on a θ without the late ones), and on lossy links
    # (mobile-churn, lr 0.02) that stopped the loss from falling. DiLoCo: a part cut off is
    # replaced by the peer's own, so replicas drift (global-mixed, 8 peers: learned waits
    # 2.199 nats against 2.135).
    deadline: str = opt("fixed", "'learned': wait for each peer about as long as its recent "
                        "messages took, at most the timeout, and stop waiting for one that "
                        "missed dormant_after deadlines (optim/deadlines.py); 'fixed': always "
                        "the whole timeout (SPSA with spot checks: always fixed)",
                        choices=MODES)
    deadline_floor: float = opt(0.5, "a learned wait is never shorter than this (seconds; "
                                "below it, scheduling jitter on a busy machine ends steps "
                                "early and records come late)", lo=0.0)
    dormant_after: int = opt(3, "stop waiting for a peer that missed this many deadlines in "
                             "a row, until it sends again (0: never; learned mode)", lo=0)


class Deadlines:
    """Per-sender waits and dormancy (see module docstring)."""

    def __init__(self, timeout: float, *, mode: str = "learned", floor: float = 0.5,
                 dormant_after: int = 3):
        if mode not in MODES:
            raise ValueError(f"deadline mode must be one of {MODES}, got {mode!r}")
        self.timeout, self.mode, self.floor = timeout, mode, min(floor, timeout)
        self.dormant_after = dormant_after
        self._delays: dict[str, deque[float]] = {}
        self._pooled: deque[float] = deque(maxlen=POOLED_WINDOW)  # everyone's recent delays
        self._misses: dict[str, int] = {}
        self.dormant: set[str] = set()
        self.counts = {"deadlines_missed": 0, "went_dormant": 0, "woke": 0}

    def heard(self, sender: str, delay: float | None) -> None:
        """A message of ``sender`` arrived, ``delay`` seconds after we were ready for it
        (None: we were not waiting for it, e.g. it is for a step we have not reached)."""
        self._misses.pop(sender, None)
        if sender in self.dormant:
            self.dormant.discard(sender)
            self.counts["woke"] += 1
        if delay is not None:
            self._delays.setdefault(sender, deque(maxlen=WINDOW)).append(max(0.0, delay))
            self._pooled.append(max(0.0, delay))

    def missed(self, senders: set[str] | frozenset[str]) -> None:
        """A deadline passed without these senders' messages."""
        for s in senders:
            self.counts["deadlines_missed"] += 1
            self._misses[s] = self._misses.get(s, 0) + 1
            if (self.mode == "learned" and self.dormant_after
                    and self._misses[s] >= self.dormant_after and s not in self.dormant):
                self.dormant.add(s)
                self.counts["went_dormant"] += 1

    def welcome(self, sender: str) -> None:
        """``sender`` (re)joined the membership: a returning peer is waited for again
        from its first step, as a joiner must be (SPSA: left behind while it syncs, its
        records would come too late for the others' final steps)."""
        self._misses.pop(sender, None)
        self.dormant.discard(sender)

    def wait_for(self, sender: str) -> float:
        """Seconds to wait for ``sender``'s next message once we are ready for it."""
        seen = self._delays.get(sender, ())
        if self.mode == "fixed":
            return self.timeout
        if len(seen) >= MIN_SEEN:
            return self._bounded(_quantile(seen), MARGIN)
        if len(self._pooled) >= MIN_SEEN:
            return self._bounded(_quantile(self._pooled), POOLED_MARGIN)
        return self.timeout

    def _bounded(self, q: float, margin: float) -> float:
        return min(self.timeout, max(self.floor, margin * q + self.floor))

    def wait(self, senders: set[str] | frozenset[str]) -> float:
        """Seconds to wait for all of ``senders`` (the dormant ones excepted); 0 if none is
        left to wait for."""
        live = [s for s in senders if s not in self.dormant]
        return max((self.wait_for(s) for s in live), default=0.0)

    @classmethod
    def of(cls, cfg: WaitOptions, timeout: float, *, fixed: bool = False) -> Deadlines:
        """From a config; ``fixed``: whatever it says (SPSA with spot checks)."""
        return cls(timeout, mode="fixed" if fixed else cfg.deadline,
                   floor=cfg.deadline_floor, dormant_after=cfg.dormant_after)

    def stats(self) -> dict[str, float | int]:
        """Counters, and the waits learned so far (median and longest over senders)."""
        waits = sorted(self.wait_for(s) for s in self._delays)
        return {**self.counts, "dormant": len(self.dormant),
                "wait_median": round(waits[len(waits) // 2], 4) if waits else self.timeout,
                "wait_max": round(waits[-1], 4) if waits else self.timeout}


def _quantile(values: deque[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(QUANTILE * len(ordered)))]

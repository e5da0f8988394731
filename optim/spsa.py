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

Late records. A step closes locally when every expected record is in or its deadline
passes (learned per sender from its recent records, at most ``step_timeout``; a member that
misses ``dormant_after`` deadlines in a row is not waited for until it sends again:
optim/deadlines.py), so peers can close a step with different record sets. To stay exact, the
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
the sender's shard (assigned from its peer id, so ``job.data_of(peer)`` is known to all) and
the record's seed, which also draws the rounding coin. Every peer recomputes the same
sample of records — chosen by a hash of (swarm, step, peer) below ``spot_check_rate``, our
own included — when their step becomes final, against the final snapshot before it: the
one θ that every peer holding the same final records holds too, whatever arrived late (a
check at close time, on the live θ, would judge a record against a θ that a late record
then changes, and honest peers reached different verdicts: a split, then mutual bans).
A byte more than ``spot_check_tolerance`` away from the recomputed one is a strike; at
``spot_check_strikes`` strikes within ``spot_check_window`` steps its sender is banned from
step t + finality_steps + 1 on, on every peer at the same step: its bytes of the steps up
to there stay applied (others' records of those steps were measured on a θ with them, and
would fail their checks if they went), later ones are refused. A liar's bytes so count
until its strikes-th sampled lie and finality_steps steps after it, each moving θ by at
most η·S/sqrt|R_t| along z. Strikes and bans are part of the final snapshot, so a joiner
takes them with the state (and donors vote on them with the bytes they serve).

A peer that closed a step without a record that came later measured its next records on
another θ; sampled and off by more than the tolerance, such a record is an honest strike
(measured: 2 of ~860 sampled records in five runs of tests/test_public.py's three-node
join on 2 cores), hence the strikes. A peer banned all the same is banned by every peer,
itself included (it then follows the swarm without sending: ``self_banned`` in its
stats).
"""

from __future__ import annotations

from typing import Any

import torch

from .deadlines import Deadlines
from .flat import FlatParams
from .kernels import perturb, update_
from .sansio import EVERYONE, Mailbox, Rejected, Send
from .seeds import derive_seed
from .spsa_log import (  # noqa: F401  (re-exported: the record log's names)
    MAX_OPEN_STEPS,
    MAX_PEERS_PER_STEP,
    Record,
    RecordLog,
    Snapshot,
    SPSAState,
    check_spsa_state,
    replay,
)
from .spsa_math import (  # noqa: F401  (re-exported: the math's names)
    Q_MAX,
    SPSAConfig,
    apply_step_,
    dequantize_g,
    fingerprint_of,
    learning_rate,
    quantize_g,
    record_seed,
    scale_from_average,
    spsa_projected_grad,
    step_coefficients,
)
from .task import Batches, Job

MARK_EVERY = 5  # final steps between fingerprints (hashing θ costs a memory pass)
SERVE_EVERY = 40  # final steps between snapshots served to joiners (a multiple of MARK_EVERY)
SERVED_KEPT = 4  # snapshots a donor keeps (protocols/serving.KEEP)
# Records of final steps kept for joiners (log_since): enough to replay from the oldest
# snapshot a donor still serves, and a margin for the steps not yet final.
HISTORY_STEPS = SERVED_KEPT * SERVE_EVERY + 32


class SPSA(Mailbox):
    """Sans-IO seeded SPSA for one peer (see module docstring and optim/sansio.py)."""

    def __init__(self, cfg: SPSAConfig, peer_id: str, job: Job, *,
                 peers: frozenset[str] = frozenset()):
        self.cfg = cfg
        self.job, self.model = job, job.model
        self.flat = FlatParams(job.model)  # the model reads its weights from flat.buffer
        self.theta = self.flat.buffer.detach().clone()  # canonical θ, never perturbed
        self.numel = self.theta.numel()  # with the flat buffer's padding
        self.pad = self.flat.pad_index
        self.snap = Snapshot(-1, self.theta.clone())
        self.records: dict[int, dict[str, int]] = {}  # step -> peer -> q, steps > snap.step
        self.expected: dict[int, frozenset[str]] = {}
        self._init_mailbox(peer_id, peers)
        # Records are accepted from anyone who has been a member, not only current ones: a
        # peer that just left may have records in flight that others already applied.
        self.known = set(self.peers)
        self.closed = -1  # last step closed locally (applied to self.theta)
        self._made = -1  # last step we measured (and, unless banned, sent a record for)
        self._mark: tuple[int, str] | None = None
        self.history: dict[int, dict[str, int]] = {}  # records of the latest final steps
        # Spot checks recompute a record from θ with every record of the steps before it.
        # A peer that closed a step without a record that came later computes its next
        # record on another θ, a strike against it if sampled: with spot checks on, waits
        # stay fixed (learned waits end far more steps early).
        self.waits = Deadlines.of(cfg, cfg.step_timeout,
                                  fixed=cfg.spot_check_rate > 0)
        self._ready_at: dict[int, float] = {}  # step -> when our own record of it was made
        self._arrived: list[tuple[str, int]] = []  # (peer, step) accepted, not yet timed
        self._latest: dict[str, int] = {}  # peer -> the latest step it sent a record for
        self.counts = {"records_sent": 0, "records_applied": 0, "late_records": 0,
                       "replays": 0, "steps_closed": 0, "steps_timed_out": 0,
                       "seconds_timed_out": 0.0,
                       "spot_checks": 0, "spot_failures": 0}

    def scale(self, step: int) -> float:
        return self.snap.scale(step, self.cfg)

    # -- driver interface
    @property
    def step(self) -> int:
        """The step this peer works on next."""
        return self.closed + 1

    def can_step(self) -> bool:
        return self._made < self.step

    def on_local_step(self, now: float) -> dict[str, float]:
        if not self.can_step():
            raise RuntimeError("on_local_step called while waiting for the step to close")
        t = self.step
        seed = record_seed(self.cfg.swarm, t, self.peer_id)
        losses = self._losses(self.theta, self.job.data, t, seed)
        g = spsa_projected_grad(losses[0], losses[1], self.cfg.eps)
        q = quantize_g(g, self.scale(t), seed)
        self.expected.setdefault(t, self.peers)
        self._made = t
        if self.peer_id not in self.banned:  # banned: we follow; our bytes count nowhere
            self.records.setdefault(t, {})[self.peer_id] = q
            self._out.append(Send(EVERYONE, Record(t, self.peer_id, q)))
            self.counts["records_sent"] += 1
        self._ready_at[t] = now
        self.deadline = now + self._wait(t)
        self._maybe_close(now)
        return {"loss": 0.5 * (losses[0] + losses[1]), "g": g, "q": float(q)}

    def _losses(self, theta: torch.Tensor, data: Batches, t: int, seed: int) -> list[float]:
        """ℓ+ and ℓ− of step t on ``data``'s batch, measured on a scratch copy of θ."""
        batch = data.batch(t)
        losses = []
        with torch.no_grad():
            for sign in (1.0, -1.0):
                perturb(theta, self.flat.buffer, seed, sign * self.cfg.eps)
                losses.append(self.job.loss(batch).item())
        return losses

    def on_timer(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline:
            self.counts["steps_timed_out"] += 1
            self.counts["seconds_timed_out"] += now - self._ready_at.get(self.step, now)
            self.waits.missed(self._missing(self.step) - self.waits.dormant)
            self._close(self.step)

    def evaluate(self) -> float:
        self.to_model()
        return self.job.evaluate()

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

    # -- the state contract (optim/sansio.py)
    identical_replicas = True
    # A joiner's records keep coming while it syncs: closing steps without them would
    # leave it behind the swarm's finality, and its first records too late for anyone but
    # itself (a split).
    waits_for_syncing = True

    def position(self) -> int:
        return self.closed + 1

    def behind(self, other: int) -> bool:
        # Records for steps we have not reached are buffered, and ours reach the others
        # late but in time while their step is not final: a gap up to finality heals.
        return other > self.position() + self.cfg.finality_steps

    def mark(self) -> tuple[int, str] | None:
        if self.snap.step >= 0 and self.snap.step % MARK_EVERY == 0:
            return self.final_mark()
        return None

    def served_tag(self) -> int | None:
        step = self.snap.step
        return step if step > 0 and step % SERVE_EVERY == 0 else None

    def served_state(self) -> Snapshot:
        return self.snap.copy()

    has_log = True

    def served_mark(self, state: Snapshot) -> str:
        return fingerprint_of(state.theta)

    def check_served(self, state: Any) -> Snapshot:
        if not (isinstance(state, Snapshot) and state.theta.numel() == self.numel):
            raise Rejected("bad_state", f"not a snapshot of {self.numel} values")
        return state

    def join_state(self, served: Snapshot, log: RecordLog) -> SPSAState:
        """Every closed step has at least its closer's record: a step without any is a
        gap in the donors' logs, and replaying it empty would split us."""
        gaps = [t for t in range(served.step + 1, log.closed + 1) if not log.records.get(t)]
        if gaps:
            raise Rejected("log_gap", f"no records for step {gaps[0]} ({len(gaps)} steps)")
        return SPSAState(served, log.closed, log.records)

    def combine(self, states: list[Any]) -> Any:
        raise RuntimeError("SPSA replicas are identical: a joiner takes a vouched state")

    def export_state(self) -> SPSAState:
        """What a joiner downloads: the final snapshot and the open part of the log."""
        return SPSAState(self.snap.copy(), self.closed,
                         {t: dict(r) for t, r in self.records.items()})

    def import_state(self, state: SPSAState) -> None:
        """Adopt a donor's state. The records we hold for steps still open there are
        kept too: each came from its author (ours we sent), so every peer will hold it,
        and the donor may simply not have it yet (a re-step of ours would even send a
        second, different byte for a step)."""
        check_spsa_state(state, self.theta.numel())
        held = self.records
        self.snap = state.snap.copy(self.theta.device)
        self.records = {t: dict(r) for t, r in state.records.items()}
        for t, recs in held.items():
            if t > self.snap.step:
                for p, q in recs.items():
                    self.records.setdefault(t, {}).setdefault(p, q)
        self.closed = state.closed
        self.banned = set(self.snap.bans)  # the swarm's verdicts, not our old lineage's
        # Never a second byte for a step we measured already, nor a step behind the donor.
        own = [t for t, r in self.records.items() if self.peer_id in r]
        self._made = max([self._made, self.closed, *own])
        self.history = {}  # of our old lineage: not to be served to anyone
        # The snapshot may be older than the donor's own (a joiner takes a marked one):
        # fold the steps that are final by now into it, as _close would have.
        while self.snap.step < self.closed - self.cfg.finality_steps:
            self._finalize(self.snap.step + 1)
        self.theta.copy_(replay(self.snap, self.records, self.closed, self.cfg,
                                self.pad).theta)
        self.expected, self.deadline = {}, None

    def state_dict(self) -> dict[str, Any]:
        snap = self.snap
        return {"sync": {"snap": {"step": snap.step, "theta": snap.theta.clone(),
                                  "g2": snap.g2, "scales": dict(snap.scales),
                                  "bans": dict(snap.bans), "strikes": dict(snap.strikes)},
                         "closed": self.closed,
                         "records": {t: dict(r) for t, r in self.records.items()}}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = state["sync"]
        snap = s["snap"]
        self.import_state(SPSAState(
            Snapshot(snap["step"], snap["theta"], snap["g2"], dict(snap["scales"]),
                     dict(snap.get("bans", {})), dict(snap.get("strikes", {}))),
            s["closed"], {t: dict(r) for t, r in s["records"].items()}))

    def to_model(self) -> None:
        self.flat.buffer.copy_(self.theta)

    def warm_up(self) -> None:
        """Compile the kernels before announcing ourselves: a first step that spends
        seconds in torch.compile would make every other peer time the step out."""
        scratch = self.theta.clone()
        perturb(self.theta, scratch, 1, 0.0)
        for records in (1, 2, 4, 8):  # one compiled graph per record-count slot
            update_(scratch, list(range(records)), [0.0] * records)

    def stats(self) -> dict:
        return {**self.counts, "closed_step": self.closed, "final_step": self.snap.step,
                "banned": len(self.banned), "rejects": self.rejects.snapshot(),
                "deadlines": self.waits.stats()}

    # -- internals
    def _accept(self, sender: str, msg: object) -> None:
        if not isinstance(msg, Record):
            raise Rejected("wrong_type", type(msg).__name__)
        if not isinstance(msg.q, int) or not -Q_MAX <= msg.q <= Q_MAX:
            raise Rejected("byte_out_of_range", repr(msg.q))
        if msg.peer not in self.known:
            raise Rejected("unknown_peer", msg.peer)
        if msg.step >= self.snap.bans.get(msg.peer, msg.step + 1):
            raise Rejected("banned", msg.peer)
        if msg.step <= self.snap.step:
            raise Rejected("too_late", f"step {msg.step} is final")
        if msg.step > self.step + self.cfg.max_ahead:
            raise Rejected("too_far_ahead", f"step {msg.step}, working on {self.step}")
        step_records = self.records.setdefault(msg.step, {})
        if msg.peer in step_records:
            raise Rejected("duplicate", f"step {msg.step} peer {msg.peer}")
        step_records[msg.peer] = msg.q
        self._arrived.append((msg.peer, msg.step))
        if msg.step <= self.closed:  # late: rebuild θ as if it had come on time
            self.counts["late_records"] += 1
            self._replay_live()

    def on_peers(self, peers: frozenset[str], now: float) -> None:
        for back in peers - self.peers:
            self.waits.welcome(back)
        super().on_peers(peers, now)
        self.known |= self.peers

    def _after_message(self, now: float) -> None:
        for peer, t in self._arrived:  # how long after our own record each one came
            self._latest[peer] = max(t, self._latest.get(peer, -1))
            ready = self._ready_at.get(t)
            early = ready is None and t >= self.step  # before we were ready: no wait at all
            self.waits.heard(peer, 0.0 if early else None if ready is None else now - ready)
        self._arrived.clear()
        self._maybe_close(now)

    def _wait(self, t: int) -> float:
        """How long step t waits for the records not in. The whole timeout for a member
        (not dormant) whose latest record is finality_steps - 1 or more steps old: ending
        steps early would leave it further behind, until its records came too late for a
        final step here but not for the peers that waited (a split)."""
        missing = self._missing(t)
        oldest = t - (self.cfg.finality_steps - 1)
        if any(self._latest.get(p, -1) < oldest for p in missing - self.waits.dormant):
            return self.cfg.step_timeout
        return self.waits.wait(missing)

    def _missing(self, t: int) -> set[str]:
        """Members expected at step t whose records are not in (the dormant included)."""
        have = self.records.get(t, {})
        return set(self.expected.get(t, self.peers)) - self.banned - set(have) - {self.peer_id}

    def _maybe_close(self, now: float) -> None:
        t = self.step
        if self._made >= t and not self._missing(t) - self.waits.dormant:
            self._close(t)

    def _close(self, t: int) -> None:
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
        return (rate > 0 and self.job.data_of is not None
                and derive_seed("spot", self.cfg.swarm, t, peer) < rate * 2.0**64)

    def _check(self, theta_before: torch.Tensor, t: int, peer: str) -> bool:
        """Recompute ``peer``'s byte of step t from θ before it; True if the byte is
        within the tolerance."""
        q = self.records[t][peer]
        seed = record_seed(self.cfg.swarm, t, peer)
        losses = self._losses(theta_before, self.job.data_of(peer), t, seed)
        expect = quantize_g(spsa_projected_grad(*losses, self.cfg.eps), self.scale(t), seed)
        self.counts["spot_checks"] += 1
        return abs(q - expect) <= self.cfg.spot_check_tolerance

    def _strike(self, peer: str, t: int) -> None:
        """``peer``'s record of final step t failed its check: ban it at the strikes-th
        failure within the window (from step t + finality_steps + 1: see _finalize)."""
        self.counts["spot_failures"] += 1
        self.rejects.add("spot_check_failed")
        cfg, strikes = self.cfg, self.snap.strikes
        strikes[peer] = (*strikes.get(peer, ()), t)
        if len(strikes[peer]) >= cfg.spot_check_strikes:
            del strikes[peer]
            self._ban(peer, t + cfg.finality_steps + 1)

    def _ban(self, peer: str, start: int) -> None:
        """Take nothing of ``peer``'s from step ``start`` on (its records of earlier steps
        stay, on every peer alike); replay θ if a dropped record was applied."""
        if peer == self.peer_id:
            self.counts["self_banned"] = 1
        self.banned.add(peer)
        self.snap.bans[peer] = start
        applied = False
        for s, recs in self.records.items():
            if s >= start and recs.pop(peer, None) is not None:
                applied |= s <= self.closed
        if applied:  # only after import_state: a step this far is never closed otherwise
            self._replay_live()

    def _finalize(self, t: int) -> None:
        """Spot-check step t against the final θ before it (self.snap), then fold it into
        the snapshot; from now on it accepts no more records. A byte that fails its check
        bans its sender from step t + finality_steps + 1 on: the records of the steps up to
        there may have been applied already (and the honest records after them measured on
        that θ), and stay, so every peer reaches the same θ whenever it learnt what."""
        snap, window = self.snap, self.cfg.spot_check_window
        if snap.strikes:  # forget the strikes that left the window
            snap.strikes = {p: kept for p, ts in snap.strikes.items()
                            if (kept := tuple(s for s in ts if s > t - window))}
        for peer in sorted(self.records.get(t, {})):
            if peer not in self.banned and self._sampled(t, peer) and \
                    not self._check(snap.theta, t, peer):
                self._strike(peer, t)
        records = self.records.pop(t, {})
        self._ready_at.pop(t, None)
        self.snap.advance_(records, self.cfg, self.pad)
        self.history[t] = records
        self.history.pop(t - HISTORY_STEPS, None)

    def log_since(self, tag: int) -> RecordLog:
        """Records of the steps after ``tag``, final or open, as far as we still hold
        them: with a snapshot at ``tag`` they rebuild our θ (``replay``)."""
        out = {t: dict(r) for t, r in self.history.items() if t > tag}
        out.update({t: dict(r) for t, r in self.records.items() if t > tag})
        return RecordLog(self.closed, out)

    def _replay_live(self) -> None:
        self.counts["replays"] += 1
        self.theta.copy_(self.snap.theta)
        for s in range(self.snap.step + 1, self.closed + 1):
            apply_step_(self.theta, s, self.records.get(s, {}), self.scale(s), self.cfg,
                        self.pad)

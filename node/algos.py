"""Building one peer's algorithm object, and turning its state into plain data and back.

State comes in two sizes:

- ``sync_state``: what a joiner downloads from a donor (the algorithm's ``export_state``),
  as plain dicts, lists and tensors, so ``torch.load(weights_only=True)`` can read it and no
  peer can make us run code. It arrives from the network: ``load_sync_state`` checks every
  field (types, shapes, finiteness, ranges) before ``import_state`` sees it.
- ``full_state``: a checkpoint, which also keeps what a donor does not hand over (the inner
  AdamW state, the fast weights θ and the position inside a round), so a restart resumes
  where it stopped, not at the start of the round.

Both reach into the algorithm objects (Snapshot, ``inner``); that knowledge should move
into the algorithms as ``state_dict()``/``load_state_dict()``.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from typing import Any

import torch
from byteswarm.optim.data import Shard
from byteswarm.optim.diloco import DiLoCo
from byteswarm.optim.kernels import perturb, update_
from byteswarm.optim.noloco import NoLoCo
from byteswarm.optim.sansio import Algorithm, Rejected
from byteswarm.optim.seeds import derive_seed
from byteswarm.optim.spsa import Q_MAX, SPSA, Snapshot
from byteswarm.optim.workload import ALGOS, Workload

MAX_RECORD_STEPS = 1024  # open steps a donor may hand over
MAX_PEERS_PER_STEP = 4096


def make_algorithm(name: str, cfg: Any, peer_id: str, shard: int, num_shards: int,
                   w: Workload) -> Algorithm:
    """Every peer builds the same initial weights from the run's seed (SPSA needs it)."""
    return ALGOS[name].make(cfg, peer_id, shard, num_shards, {peer_id}, w)


def shard_index(peer_id: str, num_shards: int) -> int:
    """The shard a peer reads unless told otherwise: public, from its id."""
    return derive_seed("shard", peer_id) % num_shards


def public_shards(w: Workload, num_shards: int) -> Callable[[str], Shard]:
    """Any peer's shard from its id (what SPSA's spot checks recompute records on)."""
    @functools.lru_cache(maxsize=256)
    def shard_of(peer_id: str) -> Shard:
        return w.corpus.shard(shard_index(peer_id, num_shards), num_shards,
                              non_iid=w.data.non_iid, seed=w.seed)
    return shard_of


def warm_up(algo: Algorithm) -> None:
    """Compile SPSA's kernels before announcing ourselves: a first step that spends
    seconds in torch.compile would make every other peer time the step out."""
    if isinstance(algo, SPSA):
        scratch = algo.theta.clone()
        perturb(algo.theta, scratch, 1, 0.0)
        for records in (1, 2, 4, 8):  # one compiled graph per record-count slot
            update_(scratch, list(range(records)), [0.0] * records)


def progress(algo: Algorithm) -> int:
    """Steps behind this replica: closed SPSA steps, or inner steps over all rounds.

    The same number on every peer of a swarm that is in step, so ``--steps`` is a swarm
    position and a joiner can tell it is behind."""
    if isinstance(algo, SPSA):
        return algo.closed + 1
    return algo.round * algo.cfg.inner_steps + algo.inner_done


MARK_EVERY = 5  # SPSA peers fingerprint every 5th final step
MARKS_PUBLISHED = 8  # and publish the latest 8 with their heartbeat


def mark(algo: Algorithm) -> tuple[int, str] | None:
    """SPSA: (final step, fingerprint) when the final step is a multiple of MARK_EVERY
    (hashing θ costs a memory pass, so not every step); otherwise None."""
    if isinstance(algo, SPSA) and algo.snap.step >= 0 and algo.snap.step % MARK_EVERY == 0:
        return algo.final_mark()
    return None


def outvoted(own: dict[int, str], members: dict[str, Any], me: str) -> list[str]:
    """Peers whose replica we should copy. The latest step that we and others marked and
    where one fingerprint has more votes than any other (we count as one) decides: if
    that fingerprint is not ours, the peers who published it. Steps with a tie are
    skipped (two peers alone cannot tell who split); none decisive: empty."""
    for step in sorted(own, reverse=True):
        votes: dict[str, list[str]] = {own[step]: [me]}
        for peer, m in members.items():
            if peer != me and step in m.marks:
                votes.setdefault(m.marks[step], []).append(peer)
        ranked = sorted(map(len, votes.values()), reverse=True)
        if len(ranked) > 1 and ranked[0] == ranked[1]:
            continue  # a tie, or a step only we marked
        if len(ranked) == 1 and ranked[0] == 1:
            continue  # a step only we marked
        best = max(votes.values(), key=len)
        return [] if me in best else best
    return []


def needs_sync(algo: Algorithm, own: int, other: int) -> bool:
    """Is a peer at position ``other`` too far ahead for us to take part without its state?

    SPSA: its records for steps we have not reached are buffered, and ours reach it late
    but in time while the step is not final, so a gap up to ``finality_steps`` heals by
    itself. NoLoCo/DiLoCo: a peer in a later round no longer takes our shares."""
    if isinstance(algo, SPSA):
        return other > own + algo.cfg.finality_steps
    h = algo.cfg.inner_steps
    return other // h > own // h


# --- plain state ------------------------------------------------------------------------

def dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def loads(blob: bytes) -> Any:
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike: junk from a peer
        raise Rejected("bad_state", f"unreadable ({type(e).__name__})") from None


def sync_state(algo: Algorithm) -> dict[str, Any]:
    s = algo.export_state()
    if isinstance(algo, SPSA):
        snap = s["snap"]
        return {"snap": {"step": snap.step, "theta": snap.theta, "g2": snap.g2,
                         "scales": dict(snap.scales)},
                "closed": s["closed"], "records": s["records"]}
    return s


def _vector(value: Any, numel: int, name: str) -> torch.Tensor:
    if not (isinstance(value, torch.Tensor) and value.dtype == torch.float32
            and value.dim() == 1 and value.numel() == numel):
        raise Rejected("bad_state", f"{name} is not a ({numel},) fp32 vector")
    if not bool(torch.isfinite(value).all()):
        raise Rejected("bad_state", f"{name} is not finite")
    return value.clone()


def _int(value: Any, lo: int, hi: int, name: str) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise Rejected("bad_state", f"{name}={value!r}"[:80])
    return value


def _float(value: Any, name: str) -> float:
    if type(value) is not float or not math.isfinite(value) or value < 0:
        raise Rejected("bad_state", f"{name}={value!r}"[:80])
    return value


def _spsa_state(algo: SPSA, s: dict) -> dict[str, Any]:
    snap = s.get("snap")
    if not isinstance(snap, dict) or not isinstance(s.get("records"), dict):
        raise Rejected("bad_state", "spsa state without snap or records")
    step = _int(snap.get("step"), -1, 1 << 62, "snap.step")
    closed = _int(s.get("closed"), step, step + MAX_RECORD_STEPS, "closed")
    g2 = snap.get("g2")
    g2 = None if g2 is None else _float(g2, "g2")
    scales_in = snap.get("scales")
    if not isinstance(scales_in, dict) or len(scales_in) > MAX_RECORD_STEPS:
        raise Rejected("bad_state", "scales")
    scales = {_int(t, 0, 1 << 62, "scale step"): _float(v, "scale")
              for t, v in scales_in.items()}
    records = {}
    if len(s["records"]) > MAX_RECORD_STEPS:
        raise Rejected("bad_state", "too many open steps")
    for t, recs in s["records"].items():
        _int(t, step + 1, closed + MAX_RECORD_STEPS, "record step")
        if not isinstance(recs, dict) or len(recs) > MAX_PEERS_PER_STEP:
            raise Rejected("bad_state", f"records of step {t}")
        records[t] = {p: _int(q, -Q_MAX, Q_MAX, "q") for p, q in recs.items()
                      if isinstance(p, str) and 0 < len(p) <= 128}
    theta = _vector(snap.get("theta"), algo.theta.numel(), "theta")
    return {"snap": Snapshot(step, theta, g2, scales), "closed": closed, "records": records}


def load_sync_state(algo: Algorithm, s: Any) -> None:
    """Check a donor's state field by field, then import it (Rejected: nothing changed)."""
    if not isinstance(s, dict):
        raise Rejected("bad_state", "not a dict")
    if isinstance(algo, SPSA):
        algo.import_state(_spsa_state(algo, s))
        return
    numel = algo.numel
    second = "delta" if isinstance(algo, NoLoCo) else "momentum"
    clean = {"round": _int(s.get("round"), 0, 1 << 62, "round"),
             "phi": _vector(s.get("phi"), numel, "phi"),
             second: _vector(s.get(second), numel, second)}
    algo.import_state(clean)


# --- checkpoints (our own files: trusted, but still read with weights_only) ---------------

def full_state(algo: Algorithm) -> dict[str, Any]:
    out = {"sync": sync_state(algo)}
    if isinstance(algo, (NoLoCo, DiLoCo)):
        out["local"] = {"model": algo.model.state_dict(), "opt": algo.inner.opt.state_dict(),
                        "inner_steps": algo.inner.step_count, "inner_done": algo.inner_done}
    return out


def load_full_state(algo: Algorithm, state: dict[str, Any]) -> None:
    load_sync_state(algo, state["sync"])
    local = state.get("local")
    if local is not None:
        algo.model.load_state_dict(local["model"])
        algo.inner.opt.load_state_dict(local["opt"])
        algo.inner.step_count = int(local["inner_steps"])
        algo.inner_done = int(local["inner_done"])


def frame_limit(numel: int) -> int:
    """Largest frame worth reading: two uncompressed fp32 vectors with top-k's indices
    (wire.decode applies each type's exact bound afterwards)."""
    return 4096 + 2 * (16 + 8 * numel)


def state_limit(numel: int) -> int:
    """Largest state download: θ or φ and δ, plus open SPSA records."""
    return (1 << 24) + 3 * 4 * numel

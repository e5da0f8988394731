"""What a node reports: its metrics rows, its progress line and its summary.

Rows and summaries share their names with the simulator's (sim/runner.py), so a node run
and a simulated one can be compared key by key. Bytes are counted at the application
layer by the transport, per message kind.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from byteswarm.optim.sansio import Algorithm

if TYPE_CHECKING:  # the driver calls us; we only read it
    from .driver import Driver


def measure(algo: Algorithm, evaluate: bool) -> dict[str, Any]:
    """On the algorithm's thread: fingerprint, validation loss if asked, numeric stats."""
    out: dict[str, Any] = {}
    if hasattr(algo, "fingerprint"):
        out["fingerprint"] = algo.fingerprint()
    if evaluate:
        val = algo.evaluate()
        if math.isfinite(val):  # nan: the task has no validation batches
            out["val_loss"] = round(val, 6)
    out["algo"] = {k: v for k, v in algo.stats().items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


def row(d: Driver, step: int, extra: dict[str, Any]) -> dict[str, Any]:
    """One line of metrics.jsonl."""
    tr = d.transport
    return {"step": step, "loss": round(d.last_loss, 6), "peers": len(d.peers),
            "seconds": round(d.seconds(), 3),
            "bytes_sent": sum(tr.sent.values()), "bytes_received": sum(tr.received.values()),
            "sent_by_type": dict(tr.sent), "received_by_type": dict(tr.received),
            "wait_seconds": round(d.last_wait, 4), "resyncs": d.resyncs, **extra}


def line(r: dict[str, Any], rate: float) -> str:
    """The progress line for a row: step, loss, peers, bytes up and down, rate."""
    val = f"  val {r['val_loss']:.3f}" if "val_loss" in r else ""
    return (f"step {r['step']}  loss {r['loss']:.3f}{val}  peers {r['peers']}  up "
            f"{r['bytes_sent'] / 1e3:.1f} kB  down {r['bytes_received'] / 1e3:.1f} kB  "
            f"{rate:.2f} steps/s")


def summary(d: Driver) -> dict[str, Any]:
    """summary.json's fields that come from the run (the CLI adds its settings)."""
    tr, total = d.transport, max(d.now() - d.t0, 1e-9)
    stats = d.algo.stats()
    steps = max(1, d.poll.progress)
    rounds = getattr(getattr(d.algo, "cfg", None), "inner_steps", 1)
    idle = max(0.0, total - d.compute_seconds)
    return {"final_val_loss": d.val_loss, "steps": d.poll.progress,
            "peer_id": d.algo.peer_id, "peers": len(d.peers),
            "seconds": round(d.seconds(), 3),
            "bytes_sent": sum(tr.sent.values()), "bytes_received": sum(tr.received.values()),
            "sent_by_type": dict(tr.sent), "received_by_type": dict(tr.received),
            "bytes_sent_per_step": sum(tr.sent.values()) / steps,
            "idle_fraction": round(idle / total, 4),
            "sync_seconds_mean": round(idle / (steps / rounds), 4),
            "rejects": {**dict(d.rejects), **stats.get("rejects", {})},
            "resyncs": d.resyncs, "donor_blame": dict(d.blame), "catch_ups": d.catchups,
            **({"sealing": d.frames.sealer.stats()} if d.frames.sealer is not None else {}),
            "transport_events": dict(tr.events),
            "stats": {k: v for k, v in stats.items() if k != "rejects"},
            **({"fingerprint": d.algo.fingerprint()} if hasattr(d.algo, "fingerprint")
               else {})}

"""A NoLoCo or DiLoCo joiner's state: from several peers, in checked chunks.

Theory of operation
-------------------
What a joiner takes is the outer state: the round, φ, and DiLoCo's outer momentum or
NoLoCo's δ (the inner optimizer starts fresh, as for any new replica). It changes only
when a round ends, so every peer keeps a serialized copy at each of its latest rounds
(``outer_blob``: deterministic, equal states give equal bytes) in the store that holds
SPSA snapshots (statesync.SnapshotStore, keyed by round here).

A joiner asks up to ``DONORS`` peers ahead of it for the index of their latest copy:
round, size and a sha256 per chunk. It takes the round most donors hold (the latest among
equals). DiLoCo peers that averaged that round together hold the same bytes, hence the same
index: if two or more donors agree, the joiner fetches the chunks from all of them, each
checked against the index (statesync.fetch_blob), as an SPSA joiner does. NoLoCo replicas
differ by design (each averaged with its own partners), and so does a DiLoCo straggler's;
when no two donors agree, the joiner fetches each donor's copy (every chunk checked against
that donor's own index) and starts from their coordinate-wise median. With three or more
donors one liar cannot move any coordinate outside the range of the honest ones; with two
it is their mean, which one liar can move (a node then needs another donor to know better).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgpack
import torch
from byteswarm.optim.sansio import Rejected

from .statesync import DONORS, ask_all, fetch_blob, parse_index
from .transport import Transport

SECONDS = ("delta", "momentum")  # NoLoCo's outer state beside φ, DiLoCo's
MEDIAN_OF = 3  # donors whose differing copies a joiner combines


def outer_blob(state: dict[str, Any]) -> bytes:
    """[round, "delta" | "momentum", φ, the other] with vectors as little-endian fp32."""
    second = next(k for k in SECONDS if k in state)
    raw = lambda v: v.detach().cpu().contiguous().numpy().astype("<f4").tobytes()
    return msgpack.packb([state["round"], second, raw(state["phi"]), raw(state[second])])


def parse_outer(blob: bytes, numel: int) -> dict[str, Any]:
    """An outer state as ``algos.load_sync_state`` takes it; Rejected if malformed or not
    finite (as statesync.parse_snapshot)."""
    try:
        round_, second, phi, other = msgpack.unpackb(blob)
    except Exception:  # msgpack's own errors, or the wrong shape of list
        raise Rejected("bad_state", "outer state is not [round, name, φ, other]") from None
    if not (type(round_) is int and 0 <= round_ < 1 << 62 and second in SECONDS
            and all(isinstance(v, bytes) and len(v) == 4 * numel for v in (phi, other))):
        raise Rejected("bad_state", "outer state fields out of range")
    state = {"round": round_, "phi": torch.frombuffer(bytearray(phi), dtype=torch.float32),
             second: torch.frombuffer(bytearray(other), dtype=torch.float32)}
    if not all(bool(torch.isfinite(state[k]).all()) for k in ("phi", second)):
        raise Rejected("bad_state", "outer state is not finite")
    return state


def median_state(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The coordinate-wise median of outer states of one round (the mean of two)."""
    out = dict(states[0])
    for key in ("phi", *SECONDS):
        if key in out:
            stack = torch.stack([s[key] for s in states])
            out[key] = stack.mean(0) if len(states) == 2 else stack.median(0).values
    return out


async def download_outer(tr: Transport, donors: list[str], numel: int,
                         blame: Counter[str]) -> tuple[dict[str, Any], list[str], str]:
    """(state, donors that served it, how it was made). Raises Rejected if nothing
    consistent came."""
    limit = 8 * numel + (1 << 20)
    answers = await ask_all(tr, donors[:DONORS], msgpack.packb(["latest", 0, 0]), 1 << 20,
                            blame)
    indexes: dict[str, tuple[bytes, dict[str, Any]]] = {}
    for peer, data in answers.items():
        try:
            if data is not None:
                indexes[peer] = (data, parse_index(data, None, limit))
        except Rejected:
            blame[peer] += 1
    if not indexes:
        raise Rejected("state_fetch_failed", "no donor holds an outer state")
    rounds = Counter(idx["step"] for _, idx in indexes.values())
    round_ = max(rounds, key=lambda r: (rounds[r], r))
    at = {p: v for p, v in indexes.items() if v[1]["step"] == round_}
    same = Counter(data for data, _ in at.values())
    best, n = same.most_common(1)[0]
    served: set[str] = set()
    if n >= 2 or len(at) == 1:
        agree = sorted(p for p, (data, _) in at.items() if data == best)
        blob = await fetch_blob(tr, agree, round_, at[agree[0]][1], blame, served)
        return parse_outer(blob, numel), sorted(served), f"{n} identical"
    states = []
    for peer in sorted(at)[:MEDIAN_OF]:
        try:  # fetch_blob blames a peer for each chunk it fails
            blob = await fetch_blob(tr, [peer], round_, at[peer][1], blame, served)
        except Rejected:
            continue
        try:
            states.append(parse_outer(blob, numel))
        except Rejected:  # the chunks matched its own index: the donor sent junk
            blame[peer] += 1
    if not states:
        raise Rejected("bad_state", f"no donor sent its outer state of round {round_}")
    return median_state(states), sorted(served), f"median of {len(states)}"

"""Building one peer's algorithm object and its public shard.

What a driver needs of the object's state (its position, what it serves joiners, its
checkpoint) is the algorithm's own business: the state contract in optim/sansio.py. The
bytes of that state on the wire are protocols/state.py's.
"""

from __future__ import annotations

from typing import Any

from byteswarm.optim.sansio import Algorithm
from byteswarm.optim.seeds import derive_seed
from byteswarm.optim.task import Task
from byteswarm.optim.workload import ALGOS


def make_algorithm(name: str, cfg: Any, peer_id: str, shard: int, num_shards: int,
                   task: Task, *, device: str = "cpu", dtype: str = "fp32") -> Algorithm:
    """Every peer builds the same initial weights (the task's: SPSA needs it). Any peer's
    shard is public, from its id (what SPSA's spot checks recompute records on)."""
    return ALGOS[name].make(cfg, peer_id, shard, num_shards, {peer_id}, task, device=device,
                            dtype=dtype, index_of=lambda p: shard_index(p, num_shards))


def shard_index(peer_id: str, num_shards: int) -> int:
    """The shard a peer reads unless told otherwise: public, from its id."""
    return derive_seed("shard", peer_id) % num_shards


def frame_limit(numel: int) -> int:
    """Largest frame worth reading: two uncompressed fp32 vectors with top-k's indices
    (wire.decode applies each type's exact bound afterwards)."""
    return 4096 + 2 * (16 + 8 * numel)

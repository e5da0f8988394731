"""Building one peer's algorithm object and its public shard.

What a driver needs of the object's state (its position, what it serves joiners, its
checkpoint) is the algorithm's own business: the state contract in optim/sansio.py. The
bytes of that state on the wire are protocols/state.py's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from byteswarm.optim.data import Shard
from byteswarm.optim.sansio import Algorithm
from byteswarm.optim.seeds import derive_seed
from byteswarm.optim.workload import ALGOS, Workload


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


def frame_limit(numel: int) -> int:
    """Largest frame worth reading: two uncompressed fp32 vectors with top-k's indices
    (wire.decode applies each type's exact bound afterwards)."""
    return 4096 + 2 * (16 + 8 * numel)

"""Which algorithm objects the simulator builds, and what their steps cost.

Each entry makes one peer's sans-IO object (the same class the node runs) from the shared
workload. Every replica starts from the same weights: the init seed is the run's, not the
peer's. Compute is charged in forward-pass equivalents: an Adam step (forward + backward)
costs about 3 forward passes, an SPSA step exactly 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from byteswarm.optim.data import Corpus, DataConfig
from byteswarm.optim.diloco import DiLoCo, DiLoCoConfig
from byteswarm.optim.model import ModelConfig, build_model
from byteswarm.optim.noloco import NoLoCo, NoLoCoConfig
from byteswarm.optim.sansio import Algorithm
from byteswarm.optim.spsa import SPSA, SPSAConfig


@dataclass(frozen=True)
class Workload:
    model: ModelConfig
    data: DataConfig
    corpus: Corpus
    seed: int
    seq_len: int
    val: list


@dataclass(frozen=True)
class AlgoEntry:
    cls: type
    config_cls: type
    forwards_per_step: float

    def make(self, cfg: Any, peer: str, k: int, n: int, ids: list[str],
             w: Workload) -> Algorithm:
        model = build_model(w.model, seed=w.seed)
        shard = w.corpus.shard(k, n, non_iid=w.data.non_iid, seed=w.seed)
        return self.cls(cfg, peer, model, shard, w.val, batch_size=w.data.batch_size,
                        seq_len=w.seq_len, peers=frozenset(ids))

    def rounds_per_step(self, cfg: Any) -> float:
        """Synchronisation rounds per local step: every step for SPSA, 1/H otherwise."""
        return 1.0 / getattr(cfg, "inner_steps", 1)

    @staticmethod
    def sync_bytes(algo: Any) -> int:
        """What a joiner downloads: the weights, plus optimizer-side state of equal size."""
        return algo.state_bytes()


ALGOS: dict[str, AlgoEntry] = {
    "spsa": AlgoEntry(SPSA, SPSAConfig, 2.0),
    "noloco": AlgoEntry(NoLoCo, NoLoCoConfig, 3.0),
    "diloco": AlgoEntry(DiLoCo, DiLoCoConfig, 3.0),
}

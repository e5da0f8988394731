"""The workload every peer trains, and the table of algorithms the simulator and the node
build from it.

Each entry makes one peer's sans-IO object (the same class in the simulator and the node)
from the shared workload. Every replica starts from the same weights: the init seed is the
run's, not the peer's. The simulator charges compute in forward-pass equivalents: an Adam
step (forward + backward) costs about 3 forward passes, an SPSA step exactly 2.
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


def load_workload(mcfg: ModelConfig, dcfg: DataConfig, seed: int) -> Workload:
    """The corpus, context length and fixed validation batches of a run (same on every peer)."""
    corpus = Corpus.load(dcfg)
    seq_len = mcfg.resolved().context
    corpus.check_fits(seq_len)
    val = corpus.val_set(dcfg.batch_size, seq_len, dcfg.val_batches, seed=seed)
    return Workload(mcfg, dcfg, corpus, seed, seq_len, val)


@dataclass(frozen=True)
class AlgoEntry:
    cls: type
    config_cls: type
    forwards_per_step: float

    def make(self, cfg: Any, peer: str, k: int, n: int, ids: list[str] | frozenset[str],
             w: Workload) -> Algorithm:
        """Peer ``peer`` reading shard ``k`` of ``n``, knowing peers ``ids`` at the start."""
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

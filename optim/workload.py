"""The workload every peer trains, and the table of algorithms the simulator and the node
build from it.

Each entry makes one peer's sans-IO object (the same class in the simulator and the node)
from the shared workload. Every replica starts from the same weights: the init seed is the
run's, not the peer's, or a weights file every peer holds (``read_weights``). The simulator
charges compute in forward-pass equivalents: an Adam step (forward + backward) costs about
3 forward passes, an SPSA step exactly 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from byteswarm.optim.config import ConfigError
from byteswarm.optim.data import Corpus, DataConfig
from byteswarm.optim.diloco import DiLoCo, DiLoCoConfig
from byteswarm.optim.files import load_checkpoint
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
    init: dict[str, torch.Tensor] | None = None  # initial weights (None: from the seed)


def load_workload(mcfg: ModelConfig, dcfg: DataConfig, seed: int,
                  init: dict[str, torch.Tensor] | None = None) -> Workload:
    """The corpus, context length and fixed validation batches of a run (same on every peer)."""
    corpus = Corpus.load(dcfg)
    seq_len = mcfg.resolved().context
    corpus.check_fits(seq_len)
    val = corpus.val_set(dcfg.batch_size, seq_len, dcfg.val_batches, seed=seed)
    return Workload(mcfg, dcfg, corpus, seed, seq_len, val, init)


def read_weights(path: str | Path, mcfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Initial weights from a file: a model's state dict saved with ``torch.save``, or a
    ``byteswarm train`` checkpoint (its model is taken). Loaded without running code, and
    checked against the model ``mcfg`` builds: the same names and shapes, finite floats."""
    try:
        obj = load_checkpoint(path)
    except Exception as e:  # a missing file, not torch's format, or code in the pickle
        raise ConfigError(f"weights: cannot load {path}: {type(e).__name__}: {e}"[:300]) \
            from None
    for key in ("trainer", "model"):  # a train checkpoint: {"trainer": {"model": ...}}
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    want = build_model(mcfg, seed=0).state_dict()
    if not isinstance(obj, dict) or set(obj) != set(want):
        names = sorted(set(obj) ^ set(want)) if isinstance(obj, dict) else ["(not a dict)"]
        raise ConfigError(f"weights: {path} is not this model's state: names differ "
                          f"({', '.join(map(str, names[:3]))})"[:300])
    for name, ref in want.items():
        t = obj[name]
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == ref.shape
                and bool(torch.isfinite(t).all())):
            raise ConfigError(f"weights: {path}: {name} is not a finite float tensor of "
                              f"shape {tuple(ref.shape)}")
    return {name: obj[name].to(ref.dtype) for name, ref in want.items()}


@dataclass(frozen=True)
class AlgoEntry:
    cls: type
    config_cls: type
    forwards_per_step: float

    def make(self, cfg: Any, peer: str, k: int, n: int, ids: list[str] | frozenset[str],
             w: Workload) -> Algorithm:
        """Peer ``peer`` reading shard ``k`` of ``n``, knowing peers ``ids`` at the start."""
        model = build_model(w.model, seed=w.seed)
        if w.init is not None:
            model.load_state_dict(w.init)
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

"""The built-in task (a byte-level GPT on the embedded corpus), and the table of
algorithms the simulator and the node build from any task.

``Workload`` is the default task, written against optim/task.py's interface like any
user's. Each ``ALGOS`` entry makes one peer's sans-IO object (the same class in the
simulator and the node) from a task. Every replica starts from the same weights: the init
seed is the run's, not the peer's, or a weights file every peer holds (``read_weights``).
The simulator charges compute in forward-pass equivalents: an Adam step (forward +
backward) costs about 3 forward passes, an SPSA step exactly 2.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from byteswarm.optim.config import ConfigError
from byteswarm.optim.data import Corpus, DataConfig, Shard
from byteswarm.optim.diloco import DiLoCo, DiLoCoConfig
from byteswarm.optim.files import load_checkpoint
from byteswarm.optim.model import ModelConfig, build_model, lm_loss
from byteswarm.optim.noloco import NoLoCo, NoLoCoConfig
from byteswarm.optim.sansio import Algorithm
from byteswarm.optim.spsa import SPSA, SPSAConfig
from byteswarm.optim.task import Batches, Job, Task, TaskConfig, load_task


@dataclass(frozen=True)
class Workload:
    model: ModelConfig
    data: DataConfig
    corpus: Corpus
    seed: int
    seq_len: int
    val: list
    init: dict[str, torch.Tensor] | None = None  # initial weights (None: from the seed)

    # -- the task interface (optim/task.py)
    @property
    def name(self) -> str:
        return f"bytes-gpt-{self.model.preset}"

    def build(self) -> torch.nn.Module:
        model = build_model(self.model, seed=self.seed)
        if self.init is not None:
            model.load_state_dict(self.init)
        return model

    def loss(self, model, batch) -> torch.Tensor:
        return lm_loss(model, *batch)

    def batches(self, k: int, n: int) -> LMBatches:
        shard = self.corpus.shard(k, n, non_iid=self.data.non_iid, seed=self.seed)
        return LMBatches(shard, self.data.batch_size, self.seq_len)

    def val_batches(self) -> list:
        return self.val


@dataclass(frozen=True)
class LMBatches:
    """A shard's batches: ``batch(step)`` is a pure function of (seed, k, n, step)."""

    shard: Shard
    batch_size: int
    seq_len: int

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shard.batch(step, self.batch_size, self.seq_len)


def load_workload(mcfg: ModelConfig, dcfg: DataConfig, seed: int,
                  init: dict[str, torch.Tensor] | None = None) -> Workload:
    """The corpus, context length and fixed validation batches of a run (same on every peer)."""
    corpus = Corpus.load(dcfg)
    seq_len = mcfg.resolved().context
    corpus.check_fits(seq_len)
    val = corpus.val_set(dcfg.batch_size, seq_len, dcfg.val_batches, seed=seed)
    return Workload(mcfg, dcfg, corpus, seed, seq_len, val, init)


def make_task(tcfg: TaskConfig, mcfg: ModelConfig, dcfg: DataConfig, seed: int,
              init: dict[str, torch.Tensor] | None = None) -> Task:
    """The task a run trains: the user's (``--task module:attr``) or the built-in one,
    starting from the weights ``init`` if given (``read_weights``)."""
    if not tcfg.task:
        return load_workload(mcfg, dcfg, seed, init)
    task = load_task(tcfg.task)
    return task if init is None else WithWeights(task, init)


class WithWeights:
    """A task whose ``build()`` starts from given weights (a public swarm's file)."""

    def __init__(self, task: Task, init: dict[str, torch.Tensor]):
        self.task, self.init = task, init
        self.name = task.name

    def build(self) -> torch.nn.Module:
        model = self.task.build()
        model.load_state_dict(self.init)
        return model

    def __getattr__(self, name: str) -> Any:  # loss, batches, val_batches: the task's
        return getattr(self.task, name)


def read_weights(path: str | Path, reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Initial weights from a file: a state dict saved with ``torch.save`` (or a ``byteswarm
    train`` checkpoint: its model is taken), or a ``.safetensors`` file. Loaded without
    running code, and checked against ``reference`` (the model the task builds): the same
    names and shapes, finite floats."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file  # the hf extra

            obj: Any = load_file(str(path))
        else:
            obj = load_checkpoint(path)
    except ImportError:
        raise ConfigError("weights: reading .safetensors needs the safetensors package "
                          "(pip install 'byteswarm[hf]')") from None
    except Exception as e:  # a missing file, not the format, or code in the pickle
        raise ConfigError(f"weights: cannot load {path}: {type(e).__name__}: {e}"[:300]) \
            from None
    for key in ("trainer", "model"):  # a train checkpoint: {"trainer": {"model": ...}}
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    want = reference.state_dict()
    if not isinstance(obj, dict) or set(obj) != set(want):
        names = sorted(set(obj) ^ set(want)) if isinstance(obj, dict) else ["(not a dict)"]
        raise ConfigError(f"weights: {path} is not this model's state: names differ "
                          f"({', '.join(map(str, names[:3]))})"[:300])
    for name, ref in want.items():
        t = obj[name]
        if not (isinstance(t, torch.Tensor) and t.shape == ref.shape
                and t.is_floating_point() == ref.is_floating_point()
                and (not t.is_floating_point() or bool(torch.isfinite(t).all()))):
            raise ConfigError(f"weights: {path}: {name} is not a finite tensor of shape "
                              f"{tuple(ref.shape)} like the model's")
    return {name: obj[name].to(ref.dtype) for name, ref in want.items()}


@dataclass(frozen=True)
class AlgoEntry:
    cls: type
    config_cls: type
    forwards_per_step: float
    has_inner: bool  # its constructor takes an inner-step engine (``inner=``, optim/inner.py)

    def make(self, cfg: Any, peer: str, k: int, n: int, ids: list[str] | frozenset[str],
             task: Task, *, device: str | torch.device = "cpu",
             dtype: str | torch.dtype = torch.float32,
             index_of: Callable[[str], int] | None = None,
             inner: Callable[[Any], Any] | None = None) -> Algorithm:
        """Peer ``peer`` reading shard ``k`` of ``n``, knowing peers ``ids`` at the start.
        ``index_of(peer)``: any peer's shard index (SPSA's spot checks rebuild its batches;
        None: no spot checks). ``inner``: the inner-step engine for an algorithm that has
        inner steps (the simulator's; ignored by SPSA)."""
        data_of = None if index_of is None else _cached(lambda p: task.batches(index_of(p), n))
        job = Job.of(task, k, n, device=device, dtype=dtype, data_of=data_of)
        return self.build(cfg, peer, job, ids, inner=inner)

    def build(self, cfg: Any, peer: str, job: Job, ids: list[str] | frozenset[str], *,
              inner: Callable[[Any], Any] | None = None) -> Algorithm:
        """The object on a job made elsewhere (node/api.py: the user's parameters)."""
        extra = {"inner": inner} if self.has_inner and inner is not None else {}
        return self.cls(cfg, peer, job, peers=frozenset(ids), **extra)

    def rounds_per_step(self, cfg: Any) -> float:
        """Synchronisation rounds per local step: every step for SPSA, 1/H otherwise."""
        return 1.0 / getattr(cfg, "inner_steps", 1)

    @staticmethod
    def sync_bytes(algo: Any) -> int:
        """What a joiner downloads: the weights, plus optimizer-side state of equal size."""
        return algo.state_bytes()


def _cached(fn: Callable[[str], Batches]) -> Callable[[str], Batches]:
    return functools.lru_cache(maxsize=256)(fn)


ALGOS: dict[str, AlgoEntry] = {
    "spsa": AlgoEntry(SPSA, SPSAConfig, 2.0, has_inner=False),
    "noloco": AlgoEntry(NoLoCo, NoLoCoConfig, 3.0, has_inner=True),
    "diloco": AlgoEntry(DiLoCo, DiLoCoConfig, 3.0, has_inner=True),
}

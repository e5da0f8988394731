"""A plain-PyTorch task: a small MLP learns to imitate a random "teacher" network.

Nothing is downloaded. The data are made here from one seed: inputs x ~ N(0, I) in ``dim``
dimensions, labelled by the argmax of a fixed, randomly initialised teacher MLP. A wider
student MLP (the model every peer trains) can follow the teacher's decision boundaries
closely, so the loss keeps falling well below the ln(classes) of guessing, and its curve
says how well an algorithm optimises rather than how lucky a split was.

The task interface (byteswarm/optim/task.py), part by part:

- ``build()``: the student, initialised from ``seed``: the same weights on every peer;
- ``loss(model, batch)``: cross-entropy; ``model`` is only called, never inspected, because
  the simulator's batched mode passes a stand-in built on ``torch.func.functional_call``;
- ``batches(k, n)``: peer k of n gets every n-th example of a seeded shuffle of the
  training split, and ``batch(step)`` draws ``batch_size`` of those with a generator seeded
  from (seed, k, n, step): a pure function, so SPSA's spot checks can rebuild any peer's
  batch of any step;
- ``val_batches()``: the held-out split, the same fixed batches on every peer.

Run it (from the repository root)::

    byteswarm train --task examples/mlp_task.py:task --steps 300 --out runs/mlp-train
    byteswarm sim --task examples/mlp_task.py:task --algo noloco,diloco,spsa \\
        --scenario datacenter --peers 8 --steps 300 --out runs/mlp-sim
    byteswarm node --task examples/mlp_task.py:task --algo noloco --steps 200 \\
        --out runs/mlp-node

The node starts a swarm and prints the address others join with (``listening on
MADDR``): a second peer runs the same command with ``--initial-peers MADDR`` and its own
``--out``.

(``MLPTask(dim=32, classes=10)`` is a harder variant: point ``--task`` at a module-level
object or a zero-argument factory of your own that returns one.)
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def seed_of(*parts: object) -> int:
    """A 63-bit generator seed from a tuple of values: the same on every machine (Python's
    ``hash`` is salted per process, so it will not do)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def mlp(sizes: list[int], act: type[nn.Module]) -> nn.Sequential:
    """Linear layers of ``sizes`` with ``act`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


@dataclass(frozen=True, kw_only=True)
class MLPTask:
    """Numbers only; the dataset is made (once, lazily) from them."""

    seed: int = 0
    dim: int = 16  # input dimensions
    classes: int = 4
    hidden: int = 64  # the student's width (two hidden layers)
    teacher_hidden: int = 32  # the teacher's width (one hidden layer)
    train_size: int = 8192
    val_size: int = 1024
    batch_size: int = 32
    val_batch_size: int = 256

    @property
    def name(self) -> str:
        return f"mlp-teacher-{self.dim}x{self.classes}"

    # -- the data: made once per process, identical everywhere
    @functools.cached_property
    def _data(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed_of("data", self.seed))
        with torch.random.fork_rng(devices=[]):  # the teacher's init must not move ours
            torch.manual_seed(seed_of("teacher", self.seed))
            teacher = mlp([self.dim, self.teacher_hidden, self.classes], nn.Tanh)
        x = torch.randn(self.train_size + self.val_size, self.dim, generator=g)  # (N, dim)
        with torch.no_grad():
            # Scaled up so the teacher's tanh units saturate: sharper, more varied regions.
            y = teacher(3.0 * x).argmax(dim=1)  # (N,) int64
        return x, y

    @functools.cached_property
    def _order(self) -> torch.Tensor:
        """A seeded shuffle of the training indices; peer k of n deals every n-th."""
        g = torch.Generator().manual_seed(seed_of("deal", self.seed))
        return torch.randperm(self.train_size, generator=g)

    # -- the task interface (byteswarm/optim/task.py)
    def build(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
            torch.manual_seed(seed_of("init", self.seed))
            return mlp([self.dim, self.hidden, self.hidden, self.classes], nn.ReLU)

    def loss(self, model, batch) -> torch.Tensor:
        x, y = batch  # (B, dim) float32, (B,) int64
        return F.cross_entropy(model(x).float(), y)

    def batches(self, k: int, n: int) -> MLPBatches:
        if not 0 <= k < n:
            raise ValueError(f"peer index {k} outside 0..{n - 1}")
        if n > self.train_size:
            raise ValueError(f"{n} peers but only {self.train_size} training examples")
        x, y = self._data
        mine = self._order[k::n]  # (≈ train_size / n,) indices into the training split
        return MLPBatches(x[mine], y[mine], seed_of("batch", self.seed, k, n), self.batch_size)

    def val_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self._data
        x, y = x[self.train_size:], y[self.train_size:]
        step = self.val_batch_size
        return [(x[i:i + step], y[i:i + step]) for i in range(0, self.val_size, step)]


@dataclass(frozen=True)
class MLPBatches:
    """One peer's examples; ``batch(step)`` depends on (its seed, step) and nothing else."""

    x: torch.Tensor  # (M, dim)
    y: torch.Tensor  # (M,)
    seed: int  # already a function of (task seed, k, n)
    batch_size: int

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed_of(self.seed, step))
        idx = torch.randint(0, self.y.numel(), (self.batch_size,), generator=g)  # (B,)
        return self.x[idx], self.y[idx]


task = MLPTask()

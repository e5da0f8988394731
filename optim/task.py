"""What to train: the task interface every algorithm, driver and simulator runs on.

A task is user code. It says three things, and nothing about networks or peers:

- ``build()``: a fresh ``nn.Module`` with the initial weights, the same on every peer (from
  a seed of the task's, or a weights file every peer holds);
- ``loss(model, batch)``: a scalar loss tensor (mean over the batch) of ``model`` on one
  batch; the model may be a stand-in callable (the simulator's batched mode calls the loss
  through ``torch.func.functional_call``), so call it, do not reach into its attributes;
- ``batches(k, n)``: peer k of n's training stream, an object whose ``batch(step)`` is a
  pure function of (the task's seed, k, n, step). SPSA's spot checks rebuild another peer's
  batch from that; NoLoCo and DiLoCo only ever ask for their own steps in order, so for
  them ``batch`` may as well read the next item of any iterator (``IterBatches``);
- ``val_batches()``: a fixed list of batches every peer evaluates on.

A batch is a tensor or a tuple/list/dict of tensors, built on the CPU; the ``Job`` moves it
to the peer's device. The built-in byte-level GPT (``optim/workload.py``) is one task among
others; ``load_task("module:attr")`` finds a user's (``byteswarm train|sim|node --task``).

A ``Job`` is one peer's share of a task: its model on its device, its batches, the loss
under the forward precision it chose. Master weights, SPSA's perturbations and every update
stay fp32 whatever that precision (``dtype`` only autocasts forward passes), so replicas
on different machines stay bit-identical.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .config import ConfigError, opt

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    task: str = opt("", "what to train: module:attr or path/file.py:attr naming a Task "
                    "object or a factory of one (see byteswarm.optim.task and examples/); "
                    "empty: the built-in byte-level GPT")
    device: str = opt("auto", "where the model runs: auto (CUDA if present, else the CPU), "
                      "cpu, cuda or cuda:N")
    dtype: str = opt("fp32", "forward-pass precision (autocast): fp32, bf16 or fp16; master "
                     "weights and every update stay fp32", choices=tuple(DTYPES))

    def check(self) -> None:
        resolve_device(self.device)


class Batches(Protocol):
    def batch(self, step: int) -> Any: ...


@runtime_checkable
class Task(Protocol):
    name: str

    def build(self) -> nn.Module: ...

    def loss(self, model: Callable[..., Any], batch: Any) -> torch.Tensor: ...

    def batches(self, k: int, n: int) -> Batches: ...

    def val_batches(self) -> list: ...


class IterBatches:
    """``Batches`` over any iterator, for algorithms that read their own steps in order
    (NoLoCo, DiLoCo). Asking for a step other than the next one is a bug of the caller's,
    and so is running out of batches."""

    def __init__(self, items: Iterable[Any]):
        self._it: Iterator[Any] = iter(items)
        self._next = 0

    def batch(self, step: int) -> Any:
        if step != self._next:
            raise RuntimeError(f"IterBatches: asked for step {step}, the next is {self._next} "
                               "(an iterator cannot be replayed: give batches(k, n) a pure "
                               "function of the step for SPSA's spot checks)")
        self._next += 1
        return next(self._it)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device: {name!r} is not auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: {name!r} is not auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but this machine has no CUDA device "
                          "torch can use (try --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device: {name!r}: this machine has {torch.cuda.device_count()} "
                          "CUDA device(s)")
    return dev


def resolve_dtype(name: str) -> torch.dtype:
    """The forward-pass precision: ``fp32``, ``bf16`` or ``fp16``."""
    if name not in DTYPES:
        raise ConfigError(f"dtype: {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (tensor, or tuple/list/dict of them and plain values) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


@dataclass
class Job:
    """Peer k of n's share of ``task``: its model on ``device``, its batches, its loss.

    ``data_of(peer)`` gives any peer's batches (SPSA's spot checks; None: no checks)."""

    task: Task
    model: nn.Module
    data: Batches
    val: list
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    data_of: Callable[[str], Batches] | None = None

    @classmethod
    def of(cls, task: Task, k: int, n: int, *, device: str | torch.device = "cpu",
           dtype: str | torch.dtype = torch.float32,
           data_of: Callable[[str], Batches] | None = None) -> Job:
        device = resolve_device(device) if isinstance(device, str) else device
        dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
        model = task.build()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"task {task.name}: build() returned {type(model).__name__}, "
                              "not a torch.nn.Module")
        bad = [n_ for n_, p in model.named_parameters()
               if p.dtype not in (torch.float32, torch.float64)]  # fp64: exactness tests
        if bad:
            raise ConfigError(f"task {task.name}: parameters must be fp32 master weights "
                              f"(choose the forward precision with dtype): {bad[:3]}")
        return cls(task, model.to(device), task.batches(k, n), task.val_batches(), device,
                   dtype, data_of)

    def autocast(self):
        """The forward-pass precision context (nothing for fp32)."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def loss(self, batch: Any, model: Callable[..., Any] | None = None) -> torch.Tensor:
        """The task's loss of ``model`` (ours by default) on a CPU-built batch, in fp32."""
        with self.autocast():
            out = self.task.loss(self.model if model is None else model,
                                 to_device(batch, self.device))
        return out.float()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches."""
        was = self.model.training
        self.model.eval()
        if not self.val:
            return math.nan  # a task without validation batches
        total = sum(self.loss(b).item() for b in self.val)
        self.model.train(was)
        return total / len(self.val)


def load_task(spec: str) -> Task:
    """``module:attr`` or ``path/to/file.py:attr`` -> the task it names: a Task object, or
    a callable (a class or a factory) that returns one when called with no arguments. A
    module is looked for on ``sys.path`` and then in the current directory."""
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise ConfigError(f"task: {spec!r} is not module:attr or file.py:attr "
                          "(e.g. examples/mlp_task.py:task)")
    mod = _import(mod_name)
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"task: {mod_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, type) or (callable(obj) and not isinstance(obj, Task)):
        obj = obj()  # a class, or a factory
    missing = [m for m in ("name", "build", "loss", "batches", "val_batches")
               if not hasattr(obj, m)]
    if missing:
        raise ConfigError(f"task: {spec} lacks {', '.join(missing)} (see byteswarm.optim.task)")
    return obj


def _import(name: str) -> Any:
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"task: no file {name}")
        key = f"byteswarm_task_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
        if key in sys.modules:
            return sys.modules[key]
        spec = importlib.util.spec_from_file_location(key, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod  # dataclasses and pickling look modules up by name
        try:
            spec.loader.exec_module(mod)
        except Exception as e:
            del sys.modules[key]
            raise ConfigError(f"task: {name} failed to load: {type(e).__name__}: {e}") from e
        return mod
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name.split(".")[0] or os.getcwd() in sys.path:
            raise ConfigError(f"task: cannot import {name!r}: {e}") from None
    sys.path.insert(0, os.getcwd())  # as ``python -m`` would
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ConfigError(f"task: cannot import {name!r}: {e}") from None

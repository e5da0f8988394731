"""byteswarm: train neural networks across peers on ordinary internet links.

The import package's top level (installed as ``byteswarm``; its subpackages are
``byteswarm.optim``, ``.protocols``, ``.node`` and ``.sim``). It holds the public Python
API, imported on first use so that ``import byteswarm.optim`` stays light:

- ``byteswarm.Optimizer``: your model and training loop, trained with a swarm
  (node/api.py);
- ``byteswarm.Task``, ``byteswarm.Job``: what to train, for ``byteswarm train|sim|node
  --task`` (optim/task.py).
"""

from __future__ import annotations

from typing import Any

_API = {"Optimizer": "byteswarm.node.api", "SwarmError": "byteswarm.node.api",
        "Task": "byteswarm.optim.task", "Job": "byteswarm.optim.task",
        "IterBatches": "byteswarm.optim.task"}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'byteswarm' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)

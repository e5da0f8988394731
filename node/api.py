"""``byteswarm.Optimizer``: keep your model and your training loop, train with a swarm.

    opt = byteswarm.Optimizer(model.parameters(), algo="noloco", swarm="my-run",
                              initial_peers=[...], config={"inner_steps": 50})
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()          # NoLoCo/DiLoCo: an AdamW inner step; every H steps, the exchange
    opt.close()

For SPSA there is no backward: ``opt.step(closure)`` with a closure that returns the loss
of the model on this step's batch (as ``torch.optim.LBFGS`` takes one); it is called twice,
on the perturbed weights, under ``torch.no_grad()``.

Theory of operation. The network side is the node's own: hivemind's DHT (started here, in
the calling thread), and the driver and transport of ``byteswarm node`` (node/driver.py,
node/node_cli.drive) on an asyncio loop in a background thread, around the same sans-IO
algorithm objects. Only the source of local steps differs: the driver's ``pace`` asks the
``Handoff`` whether the user has handed over a step, and the algorithm's step takes it:

- NoLoCo/DiLoCo get an inner-step engine (optim/inner.py) that applies AdamW to the
  gradients the user's ``backward()`` left on the parameters;
- SPSA gets a job whose batch for the step is the user's closure.

``step()`` returns once the driver has taken the step and the swarm's step (SPSA) or round
(NoLoCo/DiLoCo, after the H-th inner step) it belongs to is over, with the replica's weights
in the parameters (``to_model``); while the user computes the next step, nothing writes the
weights (NoLoCo/DiLoCo only buffer messages in their inner phase, and SPSA reads the model
only inside the step). So the outer exchange is not overlapped with compute here.

The parameters keep their identity: they are moved into the algorithm's flat buffer (their
storage changes, optim/flat.py), so the user's model, and anything holding them, trains.
They must be fp32 and on one device. Every peer must build the same initial weights (seed
your init): SPSA replicas must be identical, and a joiner of a running swarm downloads the
swarm's state anyway. Metrics, the checkpoint (resumed when ``out`` holds one) and the
identity key go to ``out``.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from byteswarm.optim import config as C
from byteswarm.optim.files import load_checkpoint
from byteswarm.optim.inner import InnerLoop
from byteswarm.optim.task import Job
from byteswarm.optim.workload import ALGOS
from torch import nn

from .identity import ensure_identity, load_identity
from .node_cli import drive, say
from .procs import start_dht, start_reaper, stop_dht
from .settings import NodeConfig


class SwarmError(RuntimeError):
    """The swarm side stopped (no peers, a crash in the driver): the cause is chained."""


class Handoff:
    """The user's thread hands each step to the driver (see the module docstring)."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.item: Any = None  # the step handed over and not yet taken
        self.handed = self.taken = self.released = 0
        self.closed = False
        self.error: BaseException | None = None
        self.live = threading.Event()  # the driver asked for a first step: we are in
        self.wake: Callable[[], None] = lambda: None  # thread-safe kick of the driver
        self.release: Callable[[], None] = lambda: None  # loop side: settle, then released
        self._releasing = False

    # -- the user's thread
    def hand(self, item: Any) -> None:
        with self.cv:
            self._check()
            self.item = item
            self.handed += 1
            n = self.handed
        self.wake()
        with self.cv:
            self.cv.wait_for(lambda: self.released >= n or self.closed)
            self._check()

    def _check(self) -> None:
        if self.error is not None:
            raise SwarmError(f"the swarm side stopped: {self.error!r}") from self.error
        if self.closed:
            raise SwarmError("the optimizer is closed")

    # -- the driver's loop thread
    def pace(self) -> bool:
        """Driver.pace: may the next step be taken now?"""
        self.live.set()
        with self.cv:
            done = self.taken > self.released
            ready = self.item is not None
        if done and not self._releasing:
            self._releasing = True
            self.release()
        return not done and ready

    def released_all(self) -> None:
        with self.cv:
            self.released = self.taken
            self._releasing = False
            self.cv.notify_all()

    # -- the algorithm's worker thread
    def take(self) -> Any:
        with self.cv:
            item, self.item = self.item, None
            self.taken += 1
        if item is None:
            raise RuntimeError("Handoff.take: the driver stepped without a step handed over")
        return item

    def close(self, error: BaseException | None = None) -> None:
        with self.cv:
            self.closed = True
            self.error = self.error or error
            self.cv.notify_all()
        self.live.set()


class _Params(nn.Module):
    """The user's parameters as one module (the algorithms' ``job.model``)."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        for i, p in enumerate(params):
            self.register_parameter(f"p{i}", p)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("byteswarm.Optimizer: the steps come from your own model")


class _Handed:
    """A job's batches: the step's item, as the user handed it over (SPSA: the closure)."""

    def __init__(self, handoff: Handoff):
        self.handoff = handoff

    def batch(self, step: int) -> Any:
        return self.handoff.take()


class _ClosureTask:
    """SPSA's loss on a step: the user's closure (the model is already perturbed)."""

    name = "user"

    def build(self) -> nn.Module:
        raise RuntimeError("byteswarm.Optimizer trains the parameters it is given")

    def loss(self, model: Any, closure: Callable[[], Any]) -> torch.Tensor:
        out = closure()
        return out.detach() if isinstance(out, torch.Tensor) else torch.tensor(float(out))

    def batches(self, k: int, n: int) -> _Handed:
        raise RuntimeError("byteswarm.Optimizer: the steps come from your own loop")

    def val_batches(self) -> list:
        return []


class _UserSteps:
    """NoLoCo's/DiLoCo's inner-step engine: AdamW (the loop's optimizer, learning-rate
    schedule and clipping) on the gradients the user's backward left on the parameters."""

    def __init__(self, loop: InnerLoop, handoff: Handoff):
        self.loop, self.handoff = loop, handoff

    @property
    def step_count(self) -> int:  # the loop's: its learning-rate schedule counts them
        return self.loop.step_count

    @step_count.setter
    def step_count(self, n: int) -> None:  # a checkpoint restores it
        self.loop.step_count = n

    def step(self) -> dict[str, float]:
        loss = self.handoff.take()
        lr = self.loop.apply_grads()
        self.loop.opt.zero_grad(set_to_none=True)
        return {"loss": loss, "lr": lr}

    def settle(self) -> None:
        pass  # each step is applied when step() returns


class Optimizer:
    """Train ``params`` with a swarm (see the module docstring).

    ``algo``: "noloco", "diloco" or "spsa"; ``config``: that algorithm's settings (the
    keys of its ``[noloco]``/``[diloco]``/``[spsa]`` table, e.g. ``inner_steps``, ``lr``);
    ``node``: the node's settings (the keys of ``byteswarm node``'s ``[node]`` table, e.g.
    ``host_maddrs``, ``min_peers``, ``heartbeat_period``); ``out``: the folder for
    metrics, checkpoint and identity (a new temporary folder if None); ``fresh``: ignore
    a checkpoint in ``out``. Returns once the node is in the swarm (and, joining a running
    swarm, has copied its state into ``params``)."""

    def __init__(self, params: Iterable[torch.Tensor], *, algo: str = "noloco",
                 swarm: str = "byteswarm", initial_peers: Iterable[str] = (),
                 config: dict[str, Any] | None = None, node: dict[str, Any] | None = None,
                 out: str | Path | None = None, fresh: bool = False, quiet: bool = True):
        if algo not in ALGOS:
            raise C.ConfigError(f"algo: {algo!r} is not one of {', '.join(ALGOS)}")
        params = list(params)
        if not params or any(isinstance(p, dict) for p in params):
            raise C.ConfigError("params: give the parameters (model.parameters()), not "
                                "parameter groups; the algorithm sets the learning rates")
        if any(not isinstance(p, nn.Parameter) or p.dtype != torch.float32 for p in params):
            raise C.ConfigError("params: fp32 nn.Parameters only (the master weights; use "
                                "autocast in your forward pass for lower precision)")
        self.algo_name = algo
        self.out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="byteswarm-"))
        self.out.mkdir(parents=True, exist_ok=True)
        settings = {"swarm": swarm, "algo": algo, "initial_peers": " ".join(initial_peers),
                    "eval_every": 1 << 30, **(node or {})}
        self.node = C.from_mapping(NodeConfig, settings, where="node")
        section = dict(config or {})
        if algo == "spsa":
            section.setdefault("swarm", swarm)
        self.cfg = C.from_mapping(ALGOS[algo].config_cls, section, where=algo)
        key_path, peer_id = ensure_identity(self.node.identity or self.out / "identity.key")
        self.peer_id = peer_id
        self.handoff = Handoff()
        self._thread: threading.Thread | None = None
        self._dht: Any = None
        self.model = _Params(params)
        job = Job(_ClosureTask(), self.model, _Handed(self.handoff), [],
                  device=params[0].device)
        self.algorithm = ALGOS[algo].build(
            self.cfg, peer_id, job, [peer_id],
            inner=lambda loop: _UserSteps(loop, self.handoff))
        configs = {"swarm": swarm, "algo": algo, "api": True, algo: C.to_dict(self.cfg),
                   "shapes": [list(p.shape) for p in params]}
        ckpt = None
        ckpt_path = self.out / "checkpoint.pt"
        if ckpt_path.exists() and not fresh:
            ckpt = load_checkpoint(ckpt_path)
            if ckpt.get("configs") != configs or ckpt.get("peer_id") != peer_id:
                raise C.ConfigError(f"{self.out} holds a run with another configuration; "
                                    "use another out, or fresh=True")
            self.algorithm.load_state_dict(ckpt["state"])
            self.algorithm.to_model()
        self.algorithm.warm_up()
        self._driver: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stopped: str | None = None
        self._dht = start_dht(self.node, str(key_path))  # in this thread: it forks
        start_reaper(self._dht)
        self.maddrs = [str(m) for m in self._dht.get_visible_maddrs()]
        for maddr in self.maddrs if not quiet else ():
            say(f"listening on {maddr}")
        identity = load_identity(key_path)
        self._thread = threading.Thread(
            target=self._serve, name="byteswarm-node", daemon=True,
            args=(peer_id, configs, ckpt, identity, quiet))
        self._thread.start()
        self.handoff.live.wait(self.node.start_timeout + 60)
        if not self.handoff.live.is_set() or self.handoff.closed:
            err = self.handoff.error
            self.close()
            raise SwarmError(f"could not join swarm {swarm!r} ({self.stopped or err!r})") \
                from err
        # A joiner may have copied the swarm's state: the parameters show it from now on.
        asyncio.run_coroutine_threadsafe(self._driver.act(self.algorithm.to_model),
                                         self._loop).result(timeout=120)

    # -- the background thread
    def _serve(self, peer_id: str, configs: dict, ckpt: dict | None, identity: Any,
               quiet: bool) -> None:
        error = None
        try:
            why, self._driver = asyncio.run(drive(
                self.node, self.algorithm, self._dht, peer_id, self.out, configs, ckpt, [],
                quiet=quiet, identity=identity, pace=self.handoff.pace,
                started=self._started, signals=False))
            self.stopped = why
        except BaseException as e:  # handed to the user's thread
            error = e
        finally:
            self.handoff.close(error)

    def _started(self, driver: Any) -> None:
        self._driver, self._loop = driver, asyncio.get_running_loop()
        loop = self._loop
        self.handoff.wake = lambda: loop.call_soon_threadsafe(driver.kick.set)

        async def release() -> None:
            try:
                await driver.act(self.algorithm.to_model)
            finally:
                self.handoff.released_all()
                driver.kick.set()

        self.handoff.release = lambda: asyncio.ensure_future(release())

    # -- the torch.optim side
    def step(self, closure: Callable[[], Any] | None = None) -> float:
        """One local step; returns its loss (NaN if unknown: NoLoCo/DiLoCo without a
        closure). SPSA needs ``closure``: the loss on this step's batch, no backward. For
        NoLoCo/DiLoCo a closure, if given, is called first with gradients on (it runs
        your forward and backward) and its loss is reported."""
        if self.algo_name == "spsa":
            if closure is None:
                raise ValueError("SPSA needs step(closure): a function returning the loss "
                                 "on this step's batch (it runs twice, perturbed, no backward)")
            self.handoff.hand(closure)
            return float(self._driver.last_loss)
        loss = math.nan
        if closure is not None:
            with torch.enable_grad():
                loss = float(closure())
        self.handoff.hand(loss)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model.parameters():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @property
    def position(self) -> int:
        """The swarm step (SPSA) or local step count this replica is at."""
        return self.algorithm.position()

    def close(self) -> None:
        """Stop after the current step (checkpointed), leave the swarm, stop the DHT."""
        if self._thread is not None:
            if self._loop is not None and self._thread.is_alive():
                self._loop.call_soon_threadsafe(self._driver.stop)
            self._thread.join(timeout=120)
        self.handoff.close()
        if self._dht is not None:
            stop_dht(self._dht)
            self._dht = None

    def __enter__(self) -> Optimizer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

"""Batched inner steps: many small NoLoCo/DiLoCo replicas trained as one computation.

Theory of operation
-------------------
NoLoCo's and DiLoCo's inner phase (``optim.inner.InnerLoop``: AdamW with grad clipping)
depends on nothing but the peer's own weights, AdamW state, step count and shard. So the
simulator may *defer* a peer's inner steps and run them later, all peers' together, as
long as nobody looks at the weights in between. The bank is an inner-step engine, passed
to the algorithm's constructor (``inner=bank.engine(k)``, optim/inner.py); for slot k it
takes the peer's ``InnerLoop``:

* the model's parameters become views of slot k of stacked ``(K, ...)`` tensors, so the
  weights of all K replicas live in one block (no copies in or out, and ``load_flat_``
  writes by the algorithm land in the bank directly);
* the algorithm's engine is a ``DeferredInner`` whose ``step()`` only records a pending
  step, and whose ``settle()`` flushes the bank: ``LocalUpdate`` settles before it reads θ
  (the exchange right after the H-th step, ``evaluate``). ``export_state`` reads φ and the
  outer momentum only, which inner steps never touch, so it does not settle. The algorithm
  writes θ (``load_flat_``) only in its exchange phases, when nothing is pending: a flush
  always precedes them.

A flush runs every peer's pending steps as levels: level d takes one step for each peer
with more than d steps to do. The peers are sorted by steps to do, so each level's replicas
are a prefix of one gathered copy of their weights and AdamW state (masking by
compaction: a replica without a step at level d is not computed at all, and its AdamW
state does not move). A level (in chunks of at most ``max_width`` replicas) is
``vmap(grad_and_value(...))`` of the real model through ``torch.func.functional_call``
over stacked parameters, per-replica gradient clipping (``clip_grad_norms_``), and
``adamw_``: torch.optim.AdamW's single-tensor update on stacked tensors with a learning
rate and step count per replica.

Lock-step peers (the datacenter scenario) finish their H-th steps close together with
nothing in between, so the first to finish would flush everyone's H − 1 steps and the
others would then flush one step each. To avoid that, a flush also runs, in levels it
runs anyway, the *in-flight* step of a peer that is busy computing one: that step is
committed (the engine will deliver it before anything can read the peer's weights, and θ
cannot change meanwhile: the peer is in TRAIN, where messages and timers only buffer);
when its event comes, ``step()`` finds the result ready. The engine says which steps are committed
(``Simulation.step_committed``: busy, alive, landing within the run's time limit); a peer
that leaves before its step lands is never read again, or comes back as a new object whose
slot ``engine`` resets.

Losses. ``DeferredInner.step()`` returns ``{"lr": lr}`` with no ``"loss"``: the loss is
not known yet. Each step's loss is handed to ``on_loss(slot, loss)`` when it is both
computed and claimed by the algorithm, in step order; the runner appends it to the peer's
``step_losses``, as the engine does with ``info["loss"]`` one by one. Anything that reads
losses reads weights too (the runner's rows evaluate first), so they are complete then.

Exactness. Given the same gradients, ``clip_grad_norms_`` and ``adamw_`` equal torch's
bit for bit. The batched gradients differ from ``loss.backward()`` by fp32 rounding
(batched kernels sum in another order), which Adam amplifies where a gradient is nearly
zero (rarely seen bytes' embedding rows: √v is tiny there too): after four rounds of 4
peers the weights differ by up to 1.3e-5, and like any change of summation order (or of
thread count) the gap grows over a long run. In float64 the two modes agree to 1e-15, so
the logic is the same; tests/test_batched.py checks both (max |Δ| < 1e-10 in float64,
< 5e-5 in fp32). Runs are deterministic in each mode: the flush schedule is a function of
the event order.

Not batched: SPSA. Its step depends on every peer's records of the previous step, so there
is nothing to defer; ``adopt`` returns False for objects without an ``InnerLoop``, and
they run one by one. On 2 CPU cores batching does not pay (0.5-1.0x): the tiny model's
step is compute-bound already, and a wider computation only spills the caches (see
scripts/bench_sim.py ``batched_speedup``), so ``--batched`` is off by default. Batching
pays where one small replica cannot fill the device — an accelerator, which the simulator
puts the bank's tensors on (they live on the device of the first model taken).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from byteswarm.optim.inner import InnerEngine, InnerLoop
from byteswarm.optim.task import to_device
from torch.func import functional_call, grad_and_value, vmap


def stack(batches: list[Any]) -> Any:
    """Replicas' batches (tensors, or tuples/lists/dicts of them) stacked on a new dim 0."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(batches)
    if isinstance(first, (tuple, list)):
        return type(first)(stack(list(parts)) for parts in zip(*batches))
    if isinstance(first, dict):
        return {k: stack([b[k] for b in batches]) for k in first}
    raise TypeError(f"batched mode: cannot stack a batch of {type(first).__name__}")


def _per_replica(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """(w,) floats -> a (w, 1, ..., 1) tensor that broadcasts against ``like`` (w, ...)."""
    t = torch.tensor(values, dtype=like.dtype, device=like.device)
    return t.view(-1, *([1] * (like.dim() - 1)))


@torch.no_grad()
def clip_grad_norms_(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for each of w replicas at once.

    grads: tensors (w, ...), replica i's gradient in row i; scaled in place so each
    replica's global 2-norm is at most ``max_norm``. Returns the norms before, (w,)."""
    w = grads[0].shape[0]
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(w, -1), dim=1)
                         for g in grads], dim=1)  # (w, n_tensors)
    total = torch.linalg.vector_norm(norms, dim=1)  # (w,)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch: always multiply
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))
    return total


@torch.no_grad()
def adamw_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
           exp_avg_sqs: list[torch.Tensor], lr: list[float], step: list[int], *,
           betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One AdamW update of w replicas (Loshchilov & Hutter, arXiv 1711.05101, Algorithm 2),
    op for op as torch.optim.AdamW's single-tensor path (the one it takes on CPU), so the
    results are bit for bit the same.

    params, grads, exp_avgs, exp_avg_sqs: tensors (w, ...), one replica per row; lr: (w,)
    learning rates; step: (w,) step numbers after this update (1 on the first). The
    per-replica scalars are worked out in float64, as torch does in Python, then applied
    as fp32 rows."""
    beta1, beta2 = betas
    step_size = [-(a / (1 - beta1 ** t)) for a, t in zip(lr, step)]
    bc2_sqrt = [(1 - beta2 ** t) ** 0.5 for t in step]
    decay = [1 - a * weight_decay for a in lr]
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        if weight_decay != 0:
            p.mul_(_per_replica(decay, p))
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / _per_replica(bc2_sqrt, v)).add_(eps)
        p.add_(m.mul(_per_replica(step_size, p)).div_(denom))  # addcdiv: (value·m) / denom


class DeferredInner:
    """Stands in for one peer's ``InnerLoop``: ``step()`` records the step in the bank."""

    def __init__(self, bank: ReplicaBank, slot: int, lr_at: Callable[[int], float]):
        self.bank, self.slot, self.lr_at = bank, slot, lr_at
        self.step_count = 0  # steps the algorithm has taken (as InnerLoop.step_count)

    def step(self) -> dict[str, float]:
        lr = self.lr_at(self.step_count)
        self.step_count += 1
        self.bank.claim(self.slot)
        return {"lr": lr}  # the loss goes to the bank's on_loss (module docstring)

    def settle(self) -> None:
        self.bank.flush()


class ReplicaBank:
    """The weights and AdamW state of up to ``n_slots`` replicas, and their pending steps.

    ``committed(slot)``: whether the peer in ``slot`` has a step in flight that will land
    (see the module docstring); ``on_loss(slot, loss)``: receives each step's loss;
    ``max_width``: replicas per computation at most (a wider level runs in chunks). The
    activations grow with the width; on 2 CPU cores 8 was fastest (NoLoCo, 64 tiny
    replicas, batch 32: 0.83x one by one at 8, 0.60x at 16, 0.39x at 64). An accelerator
    would want far more.
    """

    def __init__(self, n_slots: int, *, committed: Callable[[int], bool] = lambda s: False,
                 on_loss: Callable[[int, float], None] = lambda s, x: None,
                 max_width: int = 8):
        self.n, self.committed, self.on_loss = n_slots, committed, on_loss
        self.max_width = max_width
        self.params: dict[str, torch.Tensor] = {}  # name -> (K, ...) weights
        self.exp_avg: dict[str, torch.Tensor] = {}  # name -> (K, ...) AdamW first moment
        self.exp_avg_sq: dict[str, torch.Tensor] = {}  # name -> (K, ...) second moment
        self.count = [0] * n_slots  # inner steps computed (AdamW's step counter)
        self.pending = [0] * n_slots  # claimed by the algorithm, not yet computed
        self.early: list[list[float]] = [[] for _ in range(n_slots)]  # computed, unclaimed
        self.inner: list[InnerLoop | None] = [None] * n_slots
        self.hyper: tuple | None = None
        self.counts = {"adopted": 0, "flushes": 0, "computations": 0, "replica_steps": 0,
                       "in_flight_steps": 0}
        self._grad: Callable | None = None
        self._device = torch.device("cpu")

    # -- taking peers over
    def engine(self, slot: int) -> Callable[[InnerLoop], InnerEngine]:
        """The inner-step engine for the algorithm built into ``slot`` (its constructor's
        ``inner=``): the slot's ``DeferredInner``, or the loop itself (one by one) for a
        model with buffers or frozen parameters."""
        return lambda loop: self.take(slot, loop)

    def take(self, slot: int, inner: InnerLoop) -> InnerEngine:
        """Move ``inner``'s weights into ``slot`` and defer its steps."""
        model = inner.model
        if list(model.buffers()) or not all(p.requires_grad for p in model.parameters()):
            return inner
        if inner.step_count or inner.opt.state:
            raise RuntimeError("ReplicaBank.take: the inner loop has already stepped")
        group = inner.opt.param_groups[0]
        hyper = (tuple(group["betas"]), group["eps"], group["weight_decay"], inner.grad_clip)
        if self.hyper is None:
            self._allocate(inner)
            self.hyper = hyper
        elif hyper != self.hyper:
            raise ValueError(f"ReplicaBank.take: slot {slot} has other inner settings "
                             f"{hyper} than {self.hyper}")
        if self.pending[slot]:  # the slot's last occupant left with steps to compute
            self.flush()
        with torch.no_grad():
            for name, p in model.named_parameters():
                row = self.params[name][slot]  # (...) view
                row.copy_(p)
                p.data = row
                self.exp_avg[name][slot].zero_()
                self.exp_avg_sq[name][slot].zero_()
        self.count[slot], self.pending[slot], self.early[slot] = 0, 0, []
        self.inner[slot] = inner
        self.counts["adopted"] += 1
        return DeferredInner(self, slot, inner.lr_at)

    def _allocate(self, inner: InnerLoop) -> None:
        model, job = inner.model, inner.job
        for name, p in model.named_parameters():
            shape = (self.n, *p.shape)
            for d in (self.params, self.exp_avg, self.exp_avg_sq):
                d[name] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        # The structure; weights come stacked. Tied parameters must stay one parameter (a
        # plain .to("meta") unties them, and functional_call would then leave the second
        # slot an empty placeholder): the memo maps each to one meta stand-in.
        memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"),
                                          requires_grad=p.requires_grad)
                for p in model.parameters()}
        skeleton = copy.deepcopy(model, memo)  # no buffers: take() refused those

        def loss(params: dict[str, torch.Tensor], batch: Any):
            def bound(*args: Any, **kwargs: Any) -> Any:
                return functional_call(skeleton, params, args, kwargs)
            with job.autocast():
                return job.task.loss(bound, batch).float()

        self._grad = vmap(grad_and_value(loss))  # (K, ...) params, batches stacked (K, ...)
        self._device = job.device

    # -- the deferred steps
    def claim(self, slot: int) -> None:
        """The algorithm in ``slot`` took a step: hand over its result or defer it."""
        if self.early[slot]:
            self.on_loss(slot, self.early[slot].pop(0))
        else:
            self.pending[slot] += 1

    def flush(self) -> None:
        """Compute every pending step (and fitting in-flight ones), batched by level."""
        depth = max(self.pending)
        if depth == 0:
            return
        todo = {s: p for s, p in enumerate(self.pending) if p}
        for s in range(self.n):
            if self.pending[s] < depth and not self.early[s] and self.inner[s] is not None \
                    and self.committed(s):
                todo[s] = self.pending[s] + 1
        order = sorted(todo, key=lambda s: (-todo[s], s))  # each level is a prefix
        if order == list(range(self.n)):
            gathered = [self.params, self.exp_avg, self.exp_avg_sq]  # views, in place
        else:
            idx = torch.tensor(order)
            gathered = [{k: t.index_select(0, idx) for k, t in d.items()}
                        for d in (self.params, self.exp_avg, self.exp_avg_sq)]
        losses: dict[int, list[float]] = {s: [] for s in order}
        for level in range(depth):
            active = [s for s in order if todo[s] > level]  # rows 0..len(active)-1
            for lo in range(0, len(active), self.max_width):
                chunk = active[lo:lo + self.max_width]
                for s, loss in zip(chunk, self._level(chunk, lo, *gathered)):
                    losses[s].append(loss)
        if order != list(range(self.n)):
            for dst, src in zip((self.params, self.exp_avg, self.exp_avg_sq), gathered):
                for k, t in dst.items():
                    t.index_copy_(0, idx, src[k])
        self.counts["flushes"] += 1
        for s in order:
            claimed, self.pending[s] = self.pending[s], 0
            for loss in losses[s][:claimed]:
                self.on_loss(s, loss)
            self.early[s] = losses[s][claimed:]
            self.counts["in_flight_steps"] += len(self.early[s])

    def _level(self, active: list[int], lo: int, params: dict[str, torch.Tensor],
               exp_avg: dict[str, torch.Tensor],
               exp_avg_sq: dict[str, torch.Tensor]) -> list[float]:
        """One inner step for the replicas ``active``, rows lo..hi-1 of the gathered state."""
        w, hi = len(active), lo + len(active)
        betas, eps, weight_decay, grad_clip = self.hyper
        batch = to_device(stack([self.inner[s].job.data.batch(self.count[s]) for s in active]),
                          self._device)  # each tensor (w, ...)
        p = {k: t[lo:hi] for k, t in params.items()}  # (w, ...) views
        with warnings.catch_warnings():
            # CPU attention has no vmap batching rule: torch loops over replicas inside.
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            grads, loss = self._grad(p, batch)  # name -> (w, ...), (w,)
        g = [grads[k] for k in p]
        if grad_clip > 0:
            clip_grad_norms_(g, grad_clip)
        lr = [self.inner[s].lr_at(self.count[s]) for s in active]
        for s in active:
            self.count[s] += 1
        adamw_(list(p.values()), g, [exp_avg[k][lo:hi] for k in p],
               [exp_avg_sq[k][lo:hi] for k in p], lr, [self.count[s] for s in active],
               betas=betas, eps=eps, weight_decay=weight_decay)
        self.counts["computations"] += 1
        self.counts["replica_steps"] += w
        return loss.tolist()

    def stats(self) -> dict[str, Any]:
        n = self.counts["computations"]
        return {**self.counts, "max_width": self.max_width,
                "mean_width": round(self.counts["replica_steps"] / n, 3) if n else 0.0}

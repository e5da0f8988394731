"""SPSA's memory (issue 12): θ is the model's weights, perturbed module by module, with the
bits of a whole perturbed copy; a full copy only where that cannot be exact."""

import copy

import pytest
import torch
import torch.nn.functional as F
from byteswarm.optim import spsa_math
from byteswarm.optim.flat import FlatParams
from byteswarm.optim.kernels import perturb
from byteswarm.optim.lean import JustInTime
from byteswarm.optim.model import ModelConfig, build_model, lm_loss
from byteswarm.optim.sansio import EVERYONE
from byteswarm.optim.spsa import (
    SPSA,
    Snapshot,
    SPSAConfig,
    apply_step_,
    record_seed,
    replay,
)
from byteswarm.optim.task import Job
from torch import nn

V = 13  # vocabulary of the small models


class Tied(nn.Module):
    """Odd sizes, a weight shared by two modules that both run (an embedding and an output
    layer), and a parameter of the root itself, live while its children run."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(11))
        self.emb = nn.Embedding(V, 7)
        self.lin = nn.Linear(7, 11)
        self.mid = nn.Linear(11, 11)
        self.out = nn.Linear(11, V)
        self.tied = nn.Linear(7, V, bias=False)
        self.tied.weight = self.emb.weight

    def forward(self, idx):
        h = torch.tanh(self.mid(torch.tanh(self.lin(self.emb(idx))) * self.gain))
        return self.out(h) + self.tied(self.emb(idx))


class Outside(nn.Module):
    """The output layer reads the embedding's weight in a functional call of the parent's:
    the embedding module is not running then, so its hooks cannot perturb that read."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.lin = nn.Linear(16, 16)
        self.mid = nn.Linear(16, 16)

    def forward(self, idx):
        h = torch.tanh(self.mid(torch.tanh(self.lin(self.emb(idx)))))
        return F.linear(h, self.emb.weight)


class Borrower(nn.Module):
    """``a`` calls ``b``, which is not its child (a plain reference): ``b``'s frame is
    stacked on ``a``'s, deeper than the module tree said."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, V)
        self.c = nn.Linear(16, 16)
        a, b = self.a, self.b
        a.register_forward_hook(lambda m, args, out: b(out).sum(-1, keepdim=True) + out)

    def forward(self, idx):
        return self.b(torch.tanh(self.c(self.a(self.emb(idx)))))


class Stream:
    def __init__(self, k, vocab, seq):
        self.k, self.vocab, self.seq = k, vocab, seq

    def batch(self, step):
        g = torch.Generator().manual_seed(1000 * self.k + step)
        return torch.randint(0, self.vocab, (4, self.seq + 1), generator=g)


class ToyTask:
    name = "toy"

    def __init__(self, make, vocab=V, seq=9):
        self.make, self.vocab, self.seq = make, vocab, seq

    def build(self):
        torch.manual_seed(0)
        return self.make()

    def loss(self, model, batch):
        x, y = batch[:, :-1], batch[:, 1:]
        if self.vocab == 256:
            return lm_loss(model, x, y)
        return F.cross_entropy(model(x).reshape(-1, self.vocab), y.reshape(-1))

    def batches(self, k, n):
        return Stream(k, self.vocab, self.seq)

    def val_batches(self):
        return [Stream(99, self.vocab, self.seq).batch(0)]


TASKS = {
    "gpt": (ToyTask(lambda: build_model(ModelConfig(preset="tiny")), 256, 32), "jit"),
    "tied": (ToyTask(Tied), "jit"),
    "outside": (ToyTask(Outside), "full"),
    "borrower": (ToyTask(Borrower), "jit"),
}


def peer(task, **kw):
    # A small byte scale: every byte saturates, so every step moves θ.
    return SPSA(SPSAConfig(lr=0.05, finality_steps=1, scale_init=1e-3), "p0", Job.of(task, 0, 1),
                peers=frozenset({"p0"}), **kw)


@pytest.mark.parametrize("name", list(TASKS))
def test_jit_losses_equal_the_whole_buffer_losses(name):
    task, mode = TASKS[name]
    algo = peer(task)
    # Today's way, kept as the oracle: a model that reads its own flat buffer, into which
    # each pass writes the whole θ ± εz.
    ref_model = task.build()
    ref = FlatParams(ref_model)
    for t in range(3):
        seed = record_seed("byteswarm", t, "p0")
        batch = algo.job.data.batch(t)
        want = []
        with torch.no_grad():
            for c in (1e-3, -1e-3):
                perturb(algo.theta, ref.buffer, seed, c)
                want.append(task.loss(ref_model, batch).item())
        assert algo._losses(algo.theta, algo.job.data, t, seed) == want  # bit for bit
        before = algo.theta.clone()
        out = algo.on_local_step(0.0)
        assert out["loss"] == 0.5 * (want[0] + want[1])
        assert not torch.equal(algo.theta, before)  # the step moved θ ...
    assert algo.memory()["perturb"] == mode
    # ... and θ is the model: its parameters are views of it again after every pass.
    lo, hi = algo.theta.data_ptr(), algo.theta.data_ptr() + 4 * algo.numel
    assert all(lo <= p.data_ptr() < hi for p in algo.model.parameters())
    # Borrower: once a pass (b inside a's hook), four passes in each of three rounds.
    assert algo.jit.overflows == (3 * 4 if name == "borrower" else 0)


def test_the_tiny_gpt_needs_no_second_theta():
    algo = peer(TASKS["gpt"][0])
    assert algo.theta.data_ptr() == algo.flat.buffer.data_ptr()
    mem = algo.memory()
    # The stack holds one module's weights (the embedding, 16k of 137k elements) and the
    # NaN buffer one tensor's: under a quarter of θ here, less the bigger the model.
    assert mem["perturb"] == "jit" and mem["perturb_bytes"] < 0.25 * 4 * algo.numel
    assert mem["snapshot_device"] == "cpu" and mem["snapshot_bytes"] == 4 * algo.numel
    algo.to_model()  # nothing to do
    assert algo.evaluate() == pytest.approx(5.55, abs=0.1)


def test_a_pass_that_raises_leaves_the_model_reading_theta():
    task = ToyTask(Tied)
    algo = peer(task)
    boom = algo.model.mid.register_forward_pre_hook(lambda m, a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        algo.on_local_step(0.0)
    boom.remove()
    lo, hi = algo.theta.data_ptr(), algo.theta.data_ptr() + 4 * algo.numel
    assert all(lo <= p.data_ptr() < hi for p in algo.model.parameters())
    assert algo.memory()["perturb"] == "jit"  # an error is not a reason to give up
    assert all(not m._forward_pre_hooks and not m._forward_hooks
               for m in algo.model.modules())  # our hooks are gone


def test_a_holder_of_all_parameters_uses_the_full_scratch_from_the_start():
    # byteswarm.Optimizer's job.model: one module owning the user's parameters, whose
    # forward never runs (the user's modules do). The stack would be θ: not worth a pass.
    holder = nn.Module()
    for i, p in enumerate(Tied().parameters()):
        holder.register_parameter(f"p{i}", p)
    jit = JustInTime(FlatParams(holder))
    assert not jit.on and "perturbed at once" in jit.off_reason and jit.nbytes() == 0


def test_a_snapshot_on_the_host_streamed_in_chunks_has_the_same_bits(monkeypatch):
    # On a GPU the snapshot lives in host memory and its updates run on the GPU, in
    # chunks; here the same path runs on the CPU, with chunks of 64 elements.
    monkeypatch.setattr(spsa_math, "STREAM_CHUNK", 64)
    cfg = SPSAConfig(weight_decay=0.1, lr=0.05, finality_steps=1)
    theta = torch.randn(64 * 5 + 32, generator=torch.Generator().manual_seed(3))
    pad = torch.tensor([3, 100, 351])
    for records in ({"a": 5, "b": -127, "c": 1}, {}):
        whole, chunked = theta.clone(), theta.clone()
        apply_step_(whole, 7, records, 2.0, cfg, pad)
        apply_step_(chunked, 7, records, 2.0, cfg, pad, via=torch.device("cpu"))
        assert torch.equal(whole, chunked) and not torch.equal(whole, theta)
    # ... and a peer keeping its snapshot so ends with the same bits as one that does not.
    task = TASKS["tied"][0]
    ids = ["p0", "p1"]
    pairs = [[SPSA(cfg, p, Job.of(task, k, 2), peers=frozenset(ids), snapshot_on_host=h)
              for k, p in enumerate(ids)] for h in (False, True)]
    start = pairs[0][0].snap.theta.clone()
    log = {}
    for t in range(5):
        for pair in pairs:
            sent = []
            for p in pair:
                p.on_local_step(0.0)
                sent += [s.msg for s in p.outbox() if s.to == EVERYONE]
            for p in pair:
                for m in sent:
                    if m.peer != p.peer_id:
                        p.on_message(m.peer, m, 0.0)
            log[t] = {m.peer: m.q for m in sent}
    plain, hosted = pairs
    assert hosted[0].memory()["snapshot_device"] == "cpu" and hosted[0]._via is not None
    assert hosted[0].snap.step == plain[0].snap.step == 3
    assert {p.fingerprint() for p in plain + hosted} == {plain[0].fingerprint()}
    assert hosted[0].final_mark() == plain[0].final_mark()
    want = replay(Snapshot(-1, start), log, 3, cfg, plain[0].pad).theta
    assert torch.equal(hosted[1].snap.theta, want)


def test_a_copy_of_the_model_is_not_needed_to_export_and_import():
    task = TASKS["tied"][0]
    a, b = peer(task), peer(task)
    for _ in range(4):
        a.on_local_step(0.0)
        a.outbox()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.fingerprint() == a.fingerprint() and b.final_mark() == a.final_mark()
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in b.model.parameters()]),
                       torch.cat([p.detach().reshape(-1) for p in a.model.parameters()]))

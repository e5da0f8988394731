"""The task interface (optim/task.py): user tasks, devices, forward precision."""

import textwrap

import pytest
import torch
from byteswarm.optim.config import ConfigError
from byteswarm.optim.data import Corpus, DataConfig
from byteswarm.optim.model import ModelConfig
from byteswarm.optim.noloco import NoLoCoConfig
from byteswarm.optim.sansio import EVERYONE
from byteswarm.optim.spsa import SPSAConfig
from byteswarm.optim.task import IterBatches, Job, TaskConfig, load_task, resolve_device
from byteswarm.optim.workload import ALGOS, Workload, make_task

MICRO = ModelConfig(n_layer=1, n_embd=16, n_head=2, context=16)


@pytest.fixture(scope="module")
def task():
    corpus = Corpus.load(DataConfig(max_bytes=300_000))
    return Workload(MICRO, DataConfig(batch_size=4), corpus, 0, 16, corpus.val_set(4, 16, 2))


def test_a_task_from_a_file_and_from_a_module(tmp_path, monkeypatch):
    src = textwrap.dedent('''
        import torch
        from byteswarm.optim.task import IterBatches

        class Tiny:
            name = "tiny-linear"
            def build(self):
                torch.manual_seed(0)
                return torch.nn.Linear(3, 1)
            def loss(self, model, batch):
                x, y = batch
                return ((model(x) - y) ** 2).mean()
            def batches(self, k, n):
                g = torch.Generator().manual_seed(k)
                return IterBatches((torch.randn(8, 3, generator=g), torch.zeros(8, 1))
                                   for _ in range(1000))
            def val_batches(self):
                return [(torch.ones(4, 3), torch.zeros(4, 1))]
        task = Tiny()
    ''')
    (tmp_path / "usertask.py").write_text(src)
    by_file = load_task(f"{tmp_path / 'usertask.py'}:task")
    monkeypatch.chdir(tmp_path)  # a module in the current directory, as python -m finds it
    by_module = load_task("usertask:Tiny")  # a class: called to make the task
    assert by_file.name == by_module.name == "tiny-linear"
    a, b = Job.of(by_file, 0, 2), Job.of(by_module, 0, 2)
    assert torch.equal(a.model.weight, b.model.weight)
    algo = ALGOS["noloco"].make(NoLoCoConfig(inner_steps=5, warmup=0), "p", 0, 1, ["p"],
                                by_file)
    before = algo.evaluate()
    for _ in range(5):
        algo.on_local_step(0.0)
    assert algo.evaluate() < before
    assert make_task(TaskConfig(task=f"{tmp_path / 'usertask.py'}:task"), MICRO,
                     DataConfig(), 0).name == "tiny-linear"


@pytest.mark.parametrize("spec, why", [
    ("no_colon", "module:attr"),
    ("surely_not_a_module_xyz:task", "cannot import"),
    ("byteswarm.optim.task:nothing_here", "has no"),
    ("byteswarm.optim.task:DTYPES", "lacks"),
    ("/nonexistent/t.py:task", "no file"),
])
def test_a_bad_task_spec_is_a_clear_error(spec, why):
    with pytest.raises(ConfigError, match=why):
        load_task(spec)


def test_devices_are_checked():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:banana", "what"):
        with pytest.raises(ConfigError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            TaskConfig(device="cuda").check()
    with pytest.raises(ConfigError, match="dtype"):
        Job.of(Workload(MICRO, DataConfig(), None, 0, 16, []), 0, 1, dtype="fp8")


def test_iterator_batches_only_go_forward():
    b = IterBatches(iter(range(3)))
    assert [b.batch(0), b.batch(1)] == [0, 1]
    with pytest.raises(RuntimeError, match="cannot be replayed"):
        b.batch(1)


def test_bf16_forward_keeps_fp32_master_weights_and_spsa_replicas_identical(task):
    """Autocast changes the losses (so the bytes), never the replicas' agreement."""
    ids = ["p0", "p1"]
    cfg = SPSAConfig(finality_steps=1, lr=0.05)
    runs = {}
    for dtype in ("fp32", "bf16"):
        peers = [ALGOS["spsa"].make(cfg, p, k, 2, ids, task, dtype=dtype)
                 for k, p in enumerate(ids)]
        qs = []
        for t in range(4):
            sent = []
            for p in peers:
                qs.append(p.on_local_step(float(t))["q"])
                sent += [s.msg for s in p.outbox() if s.to == EVERYONE]
            for p in peers:
                for m in sent:
                    if m.peer != p.peer_id:
                        p.on_message(m.peer, m, float(t))
        assert peers[0].fingerprint() == peers[1].fingerprint()
        assert all(q.dtype == torch.float32 for q in peers[0].model.parameters())
        runs[dtype] = qs
    assert runs["fp32"] != runs["bf16"]  # the forward really ran in bf16


def test_a_user_task_with_fp16_parameters_is_refused():
    class Half:
        name = "half"

        def build(self):
            return torch.nn.Linear(2, 2).half()

        def batches(self, k, n):
            return IterBatches([])

        def val_batches(self):
            return []

        def loss(self, model, batch):
            return model(batch).sum()

    with pytest.raises(ConfigError, match="fp32 master weights"):
        Job.of(Half(), 0, 1)

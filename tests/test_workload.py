"""The embedded workload: model presets, corpus split, shards and batches."""

import pytest
import torch
from byteswarm.optim.config import ConfigError, from_mapping
from byteswarm.optim.data import Corpus, DataConfig
from byteswarm.optim.model import ModelConfig, build_model, count_params, lm_loss
from byteswarm.optim.train import TrainConfig, cosine_lr


@pytest.fixture(scope="module")
def corpus():
    return Corpus.load(DataConfig(max_bytes=2_000_000))


def test_presets_have_the_promised_sizes():
    tiny = count_params(build_model(ModelConfig(preset="tiny")))
    small = count_params(build_model(ModelConfig(preset="small")))
    assert 100_000 <= tiny <= 300_000
    assert 2_500_000 <= small <= 4_000_000


def test_untrained_model_guesses_uniformly(corpus):
    # Small init -> logits near zero -> loss near ln 256 = 5.545 nats.
    model = build_model(ModelConfig(), seed=1)
    x, y = corpus.val_set(8, 64, 1)[0]
    assert abs(lm_loss(model, x, y).item() - 5.545) < 0.1


def test_init_is_a_function_of_the_seed():
    a, b, c = (build_model(ModelConfig(), seed=s) for s in (3, 3, 4))
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_corpus_is_stdlib_text_with_a_held_out_split(corpus):
    assert corpus.train.numel() > 1_000_000 and corpus.val.numel() > 5_000
    assert b"def " in bytes(corpus.train[:200_000].tolist())
    # The validation documents are not a slice of the training stream.
    probe = bytes(corpus.val[1000:1064].tolist())
    assert probe not in bytes(corpus.train.tolist())


def test_iid_shards_partition_the_blocks(corpus):
    shards = [corpus.shard(k, 4, seed=7) for k in range(4)]
    sizes = [s.data.numel() for s in shards]
    assert max(sizes) - min(sizes) <= 4096
    assert sum(sizes) == corpus.train.numel() // 4096 * 4096
    # Same (k, n, seed) -> same bytes; another seed deals differently.
    assert torch.equal(corpus.shard(1, 4, seed=7).data, shards[1].data)
    assert not torch.equal(corpus.shard(1, 4, seed=8).data, shards[1].data)


def test_non_iid_shards_are_contiguous(corpus):
    a = corpus.shard(0, 4, non_iid=True)
    b = corpus.shard(1, 4, non_iid=True)
    n = corpus.train.numel()
    assert torch.equal(torch.cat([a.data, b.data]), corpus.train[: n * 2 // 4])


def test_batches_are_pure_functions_of_the_step(corpus):
    shard = corpus.shard(2, 4, seed=1)
    x1, y1 = shard.batch(17, 8, 64)
    x2, y2 = corpus.shard(2, 4, seed=1).batch(17, 8, 64)
    x3, _ = shard.batch(18, 8, 64)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert x1.shape == (8, 64) and x1.dtype == torch.int64
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # y is x shifted by one byte


def test_user_data_file_and_too_small_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"hello world, " * 5000)
    c = Corpus.load(DataConfig(data=str(f)))
    assert c.train.numel() + c.val.numel() == 65_000
    tiny = tmp_path / "t.txt"
    tiny.write_bytes(b"x" * 100)
    with pytest.raises(ConfigError, match="only"):
        Corpus.load(DataConfig(data=str(tiny))).check_fits(64)
    with pytest.raises(ConfigError, match="neither"):
        Corpus.load(DataConfig(data=str(tmp_path / "missing")))


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        from_mapping(TrainConfig, {"stepz": 3})
    with pytest.raises(ConfigError, match="expected an integer"):
        from_mapping(TrainConfig, {"steps": "ten"})
    with pytest.raises(ConfigError, match="must be >= 1"):
        from_mapping(TrainConfig, {"steps": 0})
    with pytest.raises(ConfigError, match="must be > 0.0"):
        from_mapping(TrainConfig, {"lr": 0.0})
    with pytest.raises(ConfigError, match="one of tiny, small"):
        from_mapping(ModelConfig, {"preset": "huge"})
    with pytest.raises(ConfigError, match="not divisible"):
        from_mapping(ModelConfig, {"n_embd": 64, "n_head": 5})
    assert from_mapping(TrainConfig, {"lr": 1}).lr == 1.0  # ints are fine for floats


def test_cosine_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    lrs = [cosine_lr(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_initial_weights_from_a_file_are_checked_and_used(tmp_path):
    from byteswarm.optim.files import save_checkpoint
    from byteswarm.optim.workload import ALGOS, load_workload, read_weights

    cfg = ModelConfig()
    state = build_model(cfg, seed=7).state_dict()
    torch.save(state, tmp_path / "w.pt")
    save_checkpoint(tmp_path / "ckpt.pt", {"trainer": {"model": state, "step": 3}})
    for name in ("w.pt", "ckpt.pt"):  # a state dict, or what byteswarm train writes
        got = read_weights(tmp_path / name, build_model(cfg))
        assert all(torch.equal(got[k], v) for k, v in state.items())
    w = load_workload(cfg, DataConfig(max_bytes=200_000, batch_size=4), 0, init=got)
    for algo in ("spsa", "noloco"):  # every replica starts from the file, not the seed
        a = ALGOS[algo].make(ALGOS[algo].config_cls(), "p", 0, 1, ["p"], w)
        assert all(torch.equal(a.model.state_dict()[k], v) for k, v in state.items())
    bad = dict(state)
    bad[next(iter(bad))] = torch.full_like(state[next(iter(state))], float("nan"))
    torch.save(bad, tmp_path / "nan.pt")
    torch.save({k: v for k, v in list(state.items())[1:]}, tmp_path / "short.pt")
    torch.save({**state, next(iter(state)): torch.zeros(3)}, tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    for name, why in (("nan.pt", "finite"), ("short.pt", "names differ"),
                      ("other.pt", "shape"), ("junk.pt", "cannot load"),
                      ("missing.pt", "cannot load")):
        with pytest.raises(ConfigError, match=why):
            read_weights(tmp_path / name, build_model(cfg))

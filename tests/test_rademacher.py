"""Seeded Rademacher kernels: reference, compiled and Triton agree bit for bit; FlatParams."""

import copy
import os

import pytest
import torch
from byteswarm.optim.flat import FlatParams
from byteswarm.optim.kernels import compile_fallback_reason, perturb, signs, update_
from byteswarm.optim.philox import philox_words
from torch import nn
from torch._dynamo.utils import counters

# Not multiples of 32 (a tail word), nor of the Triton block (1024), plus tiny ones that the
# compiled path sends to the reference (under two whole words).
SIZES = [4099, 5000, 31, 33]
SEEDS_C = [(0, 1e-3), (2**31 + 5, 0.37), (2**63 + 7, -2.5e-4), (2**64 - 1, 1e-7), (-12, 3.0)]


def bits(t):
    return t.view(torch.int32)


def impls():
    out = ["reference", "compiled"]
    try:
        import triton  # noqa: F401
    except ImportError:
        return out
    if os.environ.get("TRITON_INTERPRET") == "1":
        return out + ["triton"]
    return out


def perturbed(theta, seed, c, impl):
    out = torch.full_like(theta, float("nan"))
    perturb(theta, out, seed, c, impl=impl)
    return out


@pytest.mark.parametrize("n", SIZES)
def test_perturb_agrees_across_impls(n):
    theta = torch.randn(n, generator=torch.Generator().manual_seed(n))
    before = theta.clone()
    for seed, c in SEEDS_C:
        ref = perturbed(theta, seed, c, "reference")
        for impl in impls()[1:]:
            assert torch.equal(bits(perturbed(theta, seed, c, impl)), bits(ref)), (impl, seed)
    assert torch.equal(bits(theta), bits(before))
    assert compile_fallback_reason() is None


def test_perturb_is_theta_plus_c_z_rounded_once():
    n = 1000
    z = signs(77, n)  # (n,) True = +1
    c = 0.1  # not an fp32 value: it is rounded first
    c32 = torch.tensor(c, dtype=torch.float32)
    zero = perturbed(torch.zeros(n), 77, c, "compiled")
    assert torch.equal(zero, torch.where(z, c32, -c32))
    theta = torch.randn(n)
    want = theta + torch.where(z, c32, -c32)  # one fp32 add
    assert torch.equal(bits(perturbed(theta, 77, c, "compiled")), bits(want))
    # The tempting alternative, θ + c − 2c·bit, is not the same function in fp32.
    alt = theta + c32 - 2 * c32 * z.float()
    assert not torch.equal(bits(alt), bits(want))


@pytest.mark.parametrize("n", [4099, 33])
def test_update_agrees_across_impls_and_with_one_at_a_time(n):
    theta = torch.randn(n, generator=torch.Generator().manual_seed(1))
    for n_rec in (1, 3, 8, 11):  # 11 = a full 8-record pass plus a padded one
        seeds = [1000 + 17 * i for i in range(n_rec)]
        coeffs = [0.01 * (i + 1) * (-1) ** i for i in range(n_rec)]
        one_by_one = theta.clone()
        for s, c in zip(seeds, coeffs):
            update_(one_by_one, [s], [c], impl="reference")
        for impl in impls():
            got = update_(theta.clone(), seeds, coeffs, impl=impl)
            assert torch.equal(bits(got), bits(one_by_one)), (impl, n_rec)
    assert compile_fallback_reason() is None


def test_record_order_matters():
    # fp32 addition is not associative, so swapping two records changes some bits: callers
    # must apply records in the canonical order.
    theta = torch.randn(5000, generator=torch.Generator().manual_seed(2))
    seeds, coeffs = [11, 22], [0.3, 1e-3]
    ab = update_(theta.clone(), seeds, coeffs, impl="compiled")
    ba = update_(theta.clone(), seeds[::-1], coeffs[::-1], impl="compiled")
    assert not torch.equal(bits(ab), bits(ba))
    assert torch.allclose(ab, ba, atol=1e-6)  # ... while agreeing as real numbers


def test_new_seeds_coeffs_and_sizes_do_not_recompile():
    theta = torch.randn(6000)
    out = torch.empty_like(theta)
    perturb(theta, out, 1, 0.5, impl="compiled")
    update_(theta, [1], [0.5], impl="compiled")
    update_(theta, [1, 2, 3], [0.5, 0.1, 0.2], impl="compiled")
    graphs = counters["stats"]["unique_graphs"]
    for k, n in enumerate([6000, 3200, 64_000, 70_001]):
        theta = torch.randn(n)
        perturb(theta, torch.empty_like(theta), 2**63 + k, 1e-3 * (k + 1), impl="compiled")
        update_(theta, [k], [0.25 / (k + 1)], impl="compiled")
        update_(theta, [k, 9, 2**64 - k - 1], [0.5, -0.1, 0.2 + k], impl="compiled")
    assert counters["stats"]["unique_graphs"] == graphs


def test_z_is_balanced_in_every_bit_position():
    n = 32 * 4000
    z = signs(2**63 + 7, n).view(-1, 32).float()  # (words, bit position)
    # Each bit position, i.e. each offset mod 32 at which a tensor could start, is fair.
    frac = z.mean(0)  # (32,)
    assert (frac - 0.5).abs().max() < 5 * (0.25 / 4000) ** 0.5
    assert abs(z.mean().item() - 0.5) < 5 * (0.25 / n) ** 0.5
    # ... and consecutive words are not the same or complementary.
    w = philox_words(3, torch.arange(4000))
    assert (w[1:] != w[:-1]).all() and (w[1:] != ~w[:-1]).all()


def test_errors():
    theta = torch.zeros(100)
    with pytest.raises(ValueError):
        perturb(theta, theta, 1, 0.1)
    with pytest.raises(TypeError):
        perturb(theta.double(), theta.double().clone(), 1, 0.1)
    with pytest.raises(ValueError):
        update_(theta, [1, 2], [0.1])
    with pytest.raises(ValueError):
        update_(theta, [1], [0.1], impl="fast")


# --- FlatParams -----------------------------------------------------------------------


class Odd(nn.Module):
    """Odd sizes (padding between tensors), a frozen parameter and a tied one."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 7)
        self.frozen = nn.Parameter(torch.randn(5), requires_grad=False)
        self.lin = nn.Linear(7, 11)
        self.out = nn.Linear(11, 13)
        self.tied = nn.Linear(7, 13, bias=False)
        self.tied.weight = self.emb.weight  # (13, 7), tied

    def forward(self, idx):
        h = torch.tanh(self.lin(self.emb(idx))) + self.frozen.sum()
        return self.out(h) + self.tied(self.emb(idx))


def loss_of(model, idx):
    return nn.functional.cross_entropy(model(idx).reshape(-1, 13), idx.reshape(-1))


def test_flat_params_layout_and_aliasing():
    torch.manual_seed(0)
    model = Odd()
    original = copy.deepcopy(model)
    idx = torch.randint(0, 13, (4, 9))
    flat = FlatParams(model)
    names = [n for n, p in original.named_parameters() if p.requires_grad]
    assert list(flat.slices) == names == ["emb.weight", "lin.weight", "lin.bias",
                                          "out.weight", "out.bias"]
    end = 0
    for name, (offset, n, shape) in flat.slices.items():
        assert offset % 32 == 0 and offset >= end and offset - end < 32
        assert flat.word_offset(name) == offset // 32
        p = model.get_parameter(name)
        assert p.shape == shape and p.data_ptr() == flat.buffer.data_ptr() + 4 * offset
        assert torch.equal(p, original.get_parameter(name))
        end = offset + n
    assert flat.numel % 32 == 0 and flat.n_params == sum(p.numel() for p in
                                                         original.parameters()
                                                         if p.requires_grad)
    assert model.tied.weight is model.emb.weight and flat.padding_is_zero()
    assert not flat.buffer.data_ptr() <= model.frozen.data_ptr() < flat.buffer.data_ptr() \
        + 4 * flat.numel
    assert torch.equal(loss_of(model, idx), loss_of(original, idx))
    with torch.no_grad():  # writes to the buffer are writes to the model
        flat.buffer.add_(0.5)
        assert torch.equal(model.lin.bias, original.lin.bias + 0.5)


def test_flat_params_perturbed_forward_and_update():
    torch.manual_seed(1)
    model = Odd()
    idx = torch.randint(0, 13, (4, 9))
    flat = FlatParams(model)
    scratch = perturb(flat.buffer, flat.new_scratch(), 2**63 + 7, 0.05)
    # The perturbation of one tensor is its slice of the whole-buffer z (32-aligned starts).
    off, n, shape = flat.slices["out.weight"]
    z = signs(2**63 + 7, flat.numel)[off:off + n].view(shape)
    c = torch.tensor(0.05, dtype=torch.float32)
    assert torch.equal(flat.tensor("out.weight", scratch),
                       model.out.weight.detach() + torch.where(z, c, -c))
    with torch.no_grad():
        via_func = flat.forward_with(scratch, idx)
        with flat.swapped(scratch):
            via_swap = model(idx)
        manual = copy.deepcopy(model)
        for name, p in manual.named_parameters():
            if p.requires_grad:
                p.copy_(flat.tensor(name, scratch))
        assert torch.equal(via_func, manual(idx)) and torch.equal(via_swap, via_func)
        assert not torch.equal(model(idx), via_func)  # the model itself is unperturbed
    update_(flat.buffer, [5, 6], [0.1, -0.2])
    assert not flat.padding_is_zero()  # the kernels run over the padding too ...
    flat.zero_padding_()
    assert flat.padding_is_zero()  # ... and zero_padding_ restores the invariant
    loss_of(model, idx).backward()  # gradients still reach the (rebound) parameters
    assert model.lin.weight.grad is not None


def test_the_environment_can_make_auto_eager_on_cpu(monkeypatch):
    """BYTESWARM_CPU_KERNELS=reference: auto takes the reference (no graph is compiled),
    with the compiled path's bits."""
    theta = torch.randn(4096 + 7)
    want = update_(theta.clone(), [1, 2, 3], [0.1, -0.2, 0.3], impl="compiled")
    monkeypatch.setenv("BYTESWARM_CPU_KERNELS", "reference")
    counters.clear()
    got = update_(theta.clone(), [1, 2, 3], [0.1, -0.2, 0.3])
    assert torch.equal(got, want)
    assert not counters["stats"]["unique_graphs"]  # dynamo saw nothing

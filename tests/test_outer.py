"""Outer steps: closed forms, torch's own Nesterov SGD, and the fused kernels."""

import math

import pytest
import torch
import torch._dynamo
from byteswarm.optim.config import ConfigError, from_mapping
from byteswarm.optim.diloco import DiLoCoConfig
from byteswarm.optim.noloco import NoLoCoConfig
from byteswarm.optim.outer import (
    check_noloco_stability,
    diloco_outer_step,
    diloco_outer_step_,
    group_mean,
    noloco_outer_step,
    noloco_outer_step_,
    resolve_impl,
)


def vecs(k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) for _ in range(k)]


@pytest.mark.parametrize("n_group", [2, 4])
def test_noloco_matches_the_closed_form(n_group):
    a, b, c = 0.5, 0.7, 0.6
    N = 1000
    phis, thetas, deltas = vecs(n_group, N, 1), vecs(n_group, N, 2), vecs(n_group, N, 3)
    pm = group_mean(phis)
    tm = group_mean([t - p for t, p in zip(thetas, phis)])
    for i in range(n_group):
        new_phi, new_delta = noloco_outer_step(phis[i], deltas[i], thetas[i], pm, tm, a, b, c)
        # Closed form in float64, one peer at a time, straight from the paper's update.
        P, T, D = ([v.double() for v in vs] for vs in (phis, thetas, deltas))
        mean_diff = sum(T[j] - P[j] for j in range(n_group)) / n_group
        mean_phi = sum(P) / n_group
        want_delta = a * D[i] + b * mean_diff - c * (P[i] - mean_phi)
        torch.testing.assert_close(new_delta.double(), want_delta, rtol=0, atol=1e-5)
        torch.testing.assert_close(new_phi.double(), P[i] + want_delta, rtol=0, atol=1e-5)


def test_noloco_moves_toward_theta_and_the_pull_cancels_in_the_mean():
    # +β: with equal φ and no momentum, φ moves by β·mean(θ − φ), toward the fast weights
    # (the paper's Eq. 2 prints −β, which would move away).
    phi, theta_a, theta_b = vecs(3, 500, 4)
    delta = torch.zeros(500)
    tm = group_mean([theta_a - phi, theta_b - phi])
    new_phi, _ = noloco_outer_step(phi, delta, theta_a, phi, tm, 0.5, 0.7, 0.7)
    torch.testing.assert_close(new_phi, phi + 0.7 * tm)
    # The γ term pulls each φ toward the group mean, so it cancels in the group's mean φ.
    phis, deltas, thetas = vecs(2, 500, 5), vecs(2, 500, 6), vecs(2, 500, 7)
    pm = group_mean(phis)
    tm = group_mean([t - p for t, p in zip(thetas, phis)])
    outs = [noloco_outer_step(phis[i], deltas[i], thetas[i], pm, tm, 0.5, 0.7, 1.3)[0]
            for i in range(2)]
    torch.testing.assert_close(group_mean(outs), pm + 0.5 * group_mean(deltas) + 0.7 * tm,
                               rtol=0, atol=1e-5)


def test_stability_region():
    check_noloco_stability(0.5, 0.7, 0.7, 2)  # the paper's defaults
    for args, word in [((0.5, 0.7, 0.4, 2), "gamma"), ((0.5, 0.4, 0.7, 2), "beta"),
                       ((0.5, 0.7, 1.6, 2), "sqrt")]:
        with pytest.raises(ConfigError, match=word):
            check_noloco_stability(*args)
    check_noloco_stability(0.5, 0.7, 1.6, 4)  # the √(2+α²) bound is for pairs only
    with pytest.raises(ConfigError, match="sqrt"):
        from_mapping(NoLoCoConfig, {"gamma": 1.6})
    assert from_mapping(NoLoCoConfig, {}).gamma_ == 0.7
    with pytest.raises(ConfigError, match="power of two"):
        from_mapping(DiLoCoConfig, {"int8_block": 100})
    with pytest.raises(ConfigError, match="phi_codec"):
        NoLoCoConfig(phi_codec="topk").check()


def test_diloco_equals_torch_nesterov_sgd():
    N = 4097
    phi0, = vecs(1, N, 8)
    p = phi0.clone().requires_grad_(True)
    sgd = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    phi, m = phi0.clone(), torch.zeros(N)
    g = torch.Generator().manual_seed(9)
    for _ in range(6):
        thetas = [phi + 0.01 * torch.randn(N, generator=g) for _ in range(3)]
        outer_grad = phi - group_mean(thetas)  # φ − mean θ
        p.grad = outer_grad.clone()
        sgd.step()
        phi, m = diloco_outer_step(phi, m, outer_grad, 0.7, 0.9)
        assert torch.equal(phi, p.detach())
        assert torch.equal(m, sgd.state[p]["momentum_buffer"])


def noloco_case(N, seed):
    phi, delta, theta, pm, tm = vecs(5, N, seed)
    return phi, delta, theta, pm, tm


@pytest.mark.parametrize("impl", ["compiled", "triton"])
def test_fused_noloco_is_bit_exact(impl):
    for N, (a, b, c), seed in [(5000, (0.5, 0.7, 0.7), 10), (3001, (0.3, 0.9, 0.8), 11),
                               (1024, (0.1, 0.2, 0.3), 12)]:
        phi, delta, theta, pm, tm = noloco_case(N, seed)
        want_phi, want_delta = noloco_outer_step(phi, delta, theta, pm, tm, a, b, c)
        noloco_outer_step_(phi, delta, theta, pm, tm, a, b, c, impl=impl)
        assert torch.equal(phi, want_phi) and torch.equal(delta, want_delta)
        assert torch.equal(theta, want_phi)


def ulp(x):
    x = x.abs()
    return torch.nextafter(x, torch.full_like(x, math.inf)) - x


@pytest.mark.parametrize("impl", ["compiled", "triton"])
def test_fused_diloco_matches_the_reference(impl):
    for N, (lr, mu), seed in [(5000, (0.7, 0.9), 13), (3001, (0.5, 0.8), 14)]:
        phi, m, grad = vecs(3, N, seed)
        theta = torch.empty(N)
        want_phi, want_m = diloco_outer_step(phi, m, grad, lr, mu)
        # Error scale: every intermediate magnitude, since the step can cancel.
        scale = phi.abs() + lr * (grad.abs() + mu * want_m.abs())
        diloco_outer_step_(phi, m, grad, theta, lr, mu, impl=impl)
        assert torch.equal(m, want_m) and torch.equal(theta, phi)
        if impl == "triton":  # same operations, tl.fma where torch's add(alpha=) has one
            assert torch.equal(phi, want_phi)
        else:  # inductor splits each FMA into two roundings: a couple of ulp of the scale
            bound = 2 * ulp(scale)
            assert bool(((phi - want_phi).abs() <= bound).all())


def test_compiled_outer_steps_do_not_recompile():
    phi, delta, theta, pm, tm = noloco_case(2000, 15)
    noloco_outer_step_(phi, delta, theta, pm, tm, 0.5, 0.7, 0.7, impl="compiled")
    phi2, m2, g2 = vecs(3, 2000, 16)
    diloco_outer_step_(phi2, m2, g2, torch.empty(2000), 0.7, 0.9, impl="compiled")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for N, s in [(2000, 0.25), (7777, 0.125), (4096, 0.375)]:
            phi, delta, theta, pm, tm = noloco_case(N, 17)
            noloco_outer_step_(phi, delta, theta, pm, tm, s, s + 0.1, s + 0.2,
                               impl="compiled")
            phi2, m2, g2 = vecs(3, N, 18)
            diloco_outer_step_(phi2, m2, g2, torch.empty(N), s, 1 - s, impl="compiled")


def test_auto_picks_by_device_and_size():
    assert resolve_impl("auto", torch.zeros(10)) == "reference"
    assert resolve_impl("auto", torch.zeros(1 << 20)) == "compiled"
    assert resolve_impl("triton", torch.zeros(10)) == "triton"
    with pytest.raises(ValueError):
        resolve_impl("fast", torch.zeros(10))

"""comfy_pec.sde against docs/design.md §2-§3 and independent references (torch.distributions, Monte Carlo)."""

import math

import pytest
import torch

from comfy_pec import PECError
from comfy_pec.sde import (
    cps_step,
    flow_sde_step,
    flux_mu,
    flux_schedule,
    gaussian_kl,
    gaussian_log_prob,
    ode_step,
    sample_window_start,
    sd3_schedule,
    step_entropy,
    stochastic_steps,
    window_all,
    window_fixed,
    window_sliding,
)

SHAPE = (3, 4, 8, 8)


def _xv(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(SHAPE, generator=g).to(dtype), torch.randn(SHAPE, generator=g).to(dtype)


# ---- schedules ------------------------------------------------------------------------------------


def test_sd3_schedule_static_shift():
    sig = sd3_schedule(10, shift=3.0)
    assert sig.shape == (11,) and sig.dtype == torch.float32
    assert sig[0] == 1.0 and sig[-1] == 0.0
    assert torch.all(sig[1:] < sig[:-1])
    base = torch.linspace(1, 0, 11)[:-1]
    torch.testing.assert_close(sig[:-1], 3 * base / (1 + 2 * base))


def test_flux_schedule_dynamic_shift():
    assert flux_mu(256) == pytest.approx(0.5)
    assert flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)
    seq = (1024 // 16) ** 2
    sig = flux_schedule(6, seq)
    mu = flux_mu(seq)
    base = torch.linspace(1, 0, 7)[:-1]
    expected = math.exp(mu) / (math.exp(mu) + 1 / base - 1)
    torch.testing.assert_close(sig[:-1], expected.float())
    assert sig[-1] == 0 and sig[0] == 1


# ---- steps ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [flow_sde_step, cps_step])
@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9), (0.6, 0.45), (0.2, 0.0)])
def test_noise_level_zero_is_euler(step, sigma, sigma_next):
    x, v = _xv()
    res = step(x, v, sigma, sigma_next, 0.0)
    euler = x - (sigma - sigma_next) * v
    torch.testing.assert_close(res.x_next, euler, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(res.mean, euler, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ode_step(x, v, sigma, sigma_next).x_next, euler)


def test_flow_sde_formula_by_hand():
    x, v = _xv()
    eps = torch.randn(SHAPE)
    sigma, sigma_next, a = 0.7, 0.55, 0.7
    res = flow_sde_step(x, v, sigma, sigma_next, a, noise=eps)
    s = a * math.sqrt(sigma / (1 - sigma))
    dt = sigma - sigma_next
    mean = x - dt * (v + s**2 / (2 * sigma) * (x + (1 - sigma) * v))
    torch.testing.assert_close(res.mean, mean)
    torch.testing.assert_close(res.x_next, mean + s * math.sqrt(dt) * eps)
    assert float(res.std) == pytest.approx(s * math.sqrt(dt), rel=1e-6)
    assert float(res.scale) == pytest.approx(s, rel=1e-6)


def test_flow_sde_sigma_one_uses_sigma_1():
    x, v = _xv()
    sig = sd3_schedule(10)
    default = flow_sde_step(x, v, sig[0], sig[1], 0.7)
    assert float(default.scale) == pytest.approx(0.7 * math.sqrt(1 / (1 - float(sig[1]))), rel=1e-6)
    explicit = flow_sde_step(x, v, 1.0, sig[1], 0.7, sigma_1=0.5)
    assert float(explicit.scale) == pytest.approx(0.7 * math.sqrt(2.0), rel=1e-6)
    with pytest.raises(PECError):
        flow_sde_step(x, v, 1.0, 0.9, 0.7, sigma_1=1.0)


def test_cps_formula_by_hand():
    x, v = _xv()
    eps = torch.randn(SHAPE)
    sigma, sigma_next, a = 0.7, 0.55, 0.9
    res = cps_step(x, v, sigma, sigma_next, a, noise=eps)
    sc = sigma_next * math.sin(a * math.pi / 2)
    x0, x1 = x - sigma * v, x + (1 - sigma) * v
    mean = (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - sc**2) * x1
    torch.testing.assert_close(res.mean, mean)
    torch.testing.assert_close(res.x_next, mean + sc * eps)
    assert float(res.std) == pytest.approx(sc, rel=1e-6)


def test_cps_preserves_noise_coefficient():
    # On an exact velocity field the CPS marginal at σ' has x0-coefficient (1-σ') and total noise σ'.
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(20000, generator=g).reshape(20000, 1) * 0 + 0.5  # a point mass at 0.5
    eps = torch.randn(20000, 1, generator=g)
    sigma, sigma_next = 0.8, 0.5
    x = (1 - sigma) * x0 + sigma * eps
    v = eps - x0
    res = cps_step(x, v, sigma, sigma_next, 0.8, generator=g)
    assert float(res.x_next.mean()) == pytest.approx((1 - sigma_next) * 0.5, abs=0.02)
    assert float(res.x_next.std()) == pytest.approx(sigma_next, rel=0.03)


def test_steps_compute_in_float32():
    x, v = _xv(torch.bfloat16)
    for step in (flow_sde_step, cps_step):
        res = step(x, v, 0.6, 0.5, 0.7)
        assert res.x_next.dtype == res.mean.dtype == res.std.dtype == torch.float32
    ref = flow_sde_step(x.float(), v.float(), 0.6, 0.5, 0.7, noise=torch.zeros(SHAPE))
    torch.testing.assert_close(flow_sde_step(x, v, 0.6, 0.5, 0.7, noise=torch.zeros(SHAPE)).mean, ref.mean)


def test_per_sample_sigmas_broadcast():
    x, v = _xv()
    sig = torch.tensor([0.9, 0.6, 0.3])
    sig_next = sig - 0.1
    batched = flow_sde_step(x, v, sig, sig_next, 0.7, noise=torch.zeros(SHAPE))
    for i in range(3):
        one = flow_sde_step(
            x[i : i + 1], v[i : i + 1], float(sig[i]), float(sig_next[i]), 0.7, noise=torch.zeros(1, *SHAPE[1:])
        )
        torch.testing.assert_close(batched.mean[i : i + 1], one.mean)


def test_seeded_noise_reproducible():
    x, v = _xv()
    a = flow_sde_step(x, v, 0.6, 0.5, 0.7, generator=torch.Generator().manual_seed(7))
    b = flow_sde_step(x, v, 0.6, 0.5, 0.7, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.x_next, b.x_next)


# ---- log-prob, entropy, KL ------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_matches_torch_normal(reduction):
    x, v = _xv()
    res = flow_sde_step(x, v, 0.6, 0.5, 0.7)
    ours = gaussian_log_prob(res.x_next, res.mean, res.std, reduction)
    elem = torch.distributions.Normal(res.mean, res.std.expand_as(res.mean)).log_prob(res.x_next)
    ref = elem.mean(dim=(1, 2, 3)) if reduction == "mean" else elem.sum(dim=(1, 2, 3))
    assert ours.shape == (SHAPE[0],)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_log_prob_rejects_bad_reduction():
    with pytest.raises(PECError):
        gaussian_log_prob(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, "max")


def test_step_entropy_independent_of_velocity_and_matches_monte_carlo():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(SHAPE, generator=g)
    v1, v2 = torch.randn(SHAPE, generator=g), 3 * torch.randn(SHAPE, generator=g) + 1
    d = x[0].numel()
    r1 = flow_sde_step(x, v1, 0.6, 0.5, 0.7)
    r2 = flow_sde_step(x, v2, 0.6, 0.5, 0.7)
    h1, h2 = step_entropy(r1.std, d), step_entropy(r2.std, d)
    assert torch.equal(h1, h2)
    # Monte Carlo: -E[log p(x'|x)] over many draws of x' from the step.
    # -log p has std sqrt(d/2) per draw, so 1% of H needs ~10^4 draws: one batched step of 20,000 copies.
    many = 20000
    r = flow_sde_step(x[:1].expand(many, -1, -1, -1), v1[:1].expand(many, -1, -1, -1), 0.6, 0.5, 0.7, generator=g)
    mc = -gaussian_log_prob(r.x_next, r.mean, r.std, "sum").mean()
    assert float(mc) == pytest.approx(float(h1), rel=0.01)
    # CPS too: its entropy depends on the schedule only.
    c1, c2 = cps_step(x, v1, 0.6, 0.5, 0.9), cps_step(x, v2, 0.6, 0.5, 0.9)
    assert torch.equal(step_entropy(c1.std, d), step_entropy(c2.std, d))


def test_gaussian_kl_exact_and_flow_grpo_compat():
    x, v = _xv()
    r = flow_sde_step(x, v, 0.6, 0.5, 0.7)
    r_ref = flow_sde_step(x, v + 0.1, 0.6, 0.5, 0.7)
    kl = gaussian_kl(r.mean, r_ref.mean, r.std)
    # Independent: torch's KL of two Normals with equal std, mean over elements.
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(r.mean, r.std.expand_as(r.mean)),
        torch.distributions.Normal(r_ref.mean, r.std.expand_as(r.mean)),
    ).mean(dim=(1, 2, 3))
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)
    compat = gaussian_kl(r.mean, r_ref.mean, r.scale)
    torch.testing.assert_close(compat, kl * 0.1, rtol=1e-5, atol=1e-7)  # factor Δ = 0.1
    assert torch.all(gaussian_kl(r.mean, r.mean, r.std) == 0)


# ---- windows --------------------------------------------------------------------------------------


def test_window_rules():
    assert window_all(5).tolist() == [True, True, True, True, False]
    assert window_fixed(10, 2, 3).nonzero().flatten().tolist() == [3, 4]
    with pytest.raises(PECError):
        window_fixed(10, 3, 7)  # would reach the last step
    starts = [window_sliding(10, 2, it, shift_every=5).nonzero()[0].item() for it in range(0, 60, 5)]
    assert starts == sorted(starts) and starts[0] == 0 and starts[-1] == 7  # high → low noise, then stops
    assert stochastic_steps("steps", 10, size=2, start=3).tolist() == window_fixed(10, 2, 3).tolist()
    assert stochastic_steps("all", 4).tolist() == [True, True, True, False]
    with pytest.raises(PECError, match="unknown window rule"):
        stochastic_steps("egrpo-ish", 10)


def test_sample_window_start_seeded_and_in_range():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = [sample_window_start(1, 4, g1) for _ in range(50)]
    b = [sample_window_start(1, 4, g2) for _ in range(50)]
    assert a == b and set(a) == {1, 2, 3, 4}

"""comfy_pec.diversity against independent float64 references and docs/design.md §5/§7."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comfy_pec import PECError
from comfy_pec.diversity import (
    feature_variance,
    mean_pairwise_distance,
    select_diverse,
    vendi_gradient,
    vendi_repulsion,
    vendi_score,
)
from comfy_pec.perceptual import pcvae_gain, pcvae_penalty, perceptual_energy, perceptual_entropy

ORDERS = [0.5, 1.0, 2.0, math.inf]


def reference_vendi(features: np.ndarray, q: float) -> float:
    """Independent float64 Vendi: eigenvalues of the full n×n cosine kernel / n via numpy."""
    x = features.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    lam = np.linalg.eigvalsh(x @ x.T / x.shape[0])
    lam = np.clip(lam, 0, None)
    lam = lam[lam > 1e-12]
    lam = lam / lam.sum()
    if q == 1:
        return float(np.exp(-(lam * np.log(lam)).sum()))
    if math.isinf(q):
        return float(1 / lam.max())
    return float(np.exp(np.log((lam**q).sum()) / (1 - q)))


@pytest.mark.parametrize("q", ORDERS)
@pytest.mark.parametrize("n,d", [(12, 40), (60, 8)])  # n < d (n×n form) and n > d (d×d form)
def test_vendi_matches_independent_eigendecomposition(q, n, d):
    rng = np.random.default_rng(0)
    # Low-rank-ish data with a spread spectrum, so the orders disagree with each other.
    feats = rng.normal(size=(n, 5)) @ rng.normal(size=(5, d)) + 0.3 * rng.normal(size=(n, d)) + 1.0
    ours = vendi_score(torch.from_numpy(feats), q, dtype=torch.float64)
    assert ours.dtype == torch.float64 and ours.dim() == 0
    assert float(ours) == pytest.approx(reference_vendi(feats, q), abs=1e-9, rel=1e-9)


@pytest.mark.parametrize("q", [0.0, *ORDERS])
def test_vendi_identical_rows_is_one_orthonormal_rows_is_n(q):
    row = torch.randn(1, 16)
    assert float(vendi_score(row.repeat(9, 1), q, dtype=torch.float64)) == pytest.approx(1.0, abs=1e-9)
    eye = torch.eye(7, 16)
    assert float(vendi_score(eye, q, dtype=torch.float64)) == pytest.approx(7.0, abs=1e-9)
    assert float(vendi_score(torch.eye(30, 20)[:20], q)) == pytest.approx(20.0, rel=1e-5)  # n = d


def test_vendi_invariant_to_order_and_scale():
    x = torch.randn(25, 32, dtype=torch.float64)
    base = vendi_score(x, dtype=torch.float64)
    perm = torch.randperm(25)
    scales = torch.rand(25, 1, dtype=torch.float64) * 100 + 0.01
    assert float(vendi_score(x[perm], dtype=torch.float64)) == pytest.approx(float(base), abs=1e-9)
    assert float(vendi_score(x * scales, dtype=torch.float64)) == pytest.approx(float(base), abs=1e-9)


@pytest.mark.parametrize("q", [0.0, *ORDERS])
@pytest.mark.parametrize("n,d", [(10, 32), (40, 6)])
def test_vendi_batched_equals_loop(q, n, d):
    x = torch.randn(6, n, d)
    x[2] = x[2, :1]  # one collapsed prompt
    batched = vendi_score(x, q, dtype=torch.float64)
    loop = torch.stack([vendi_score(x[p], q, dtype=torch.float64) for p in range(6)])
    assert batched.shape == (6,)
    torch.testing.assert_close(batched, loop, rtol=1e-10, atol=1e-10)
    assert float(batched[2]) == pytest.approx(1.0, abs=1e-9)


def test_vendi_order_zero_counts_rank_with_tolerance():
    x = torch.randn(4, 8, dtype=torch.float64) @ torch.randn(8, 64, dtype=torch.float64)
    x = torch.cat([x, x[:2] * 3.0])  # 6 rows, rank 4
    assert float(vendi_score(x, 0.0, dtype=torch.float64)) == 4.0
    # Three copies of e1 and one of e2: the spectrum of K/n is {3/4, 1/4}; eig_tol cuts below it.
    y = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64)
    assert float(vendi_score(y, 0.0, dtype=torch.float64, eig_tol=0.1)) == 2.0
    assert float(vendi_score(y, 0.0, dtype=torch.float64, eig_tol=0.5)) == 1.0
    assert float(vendi_score(y, 1.0, dtype=torch.float64)) == pytest.approx(
        math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    )


def test_vendi_orders_are_ordered_and_float32_close():
    x = torch.randn(30, 50)
    vals = [float(vendi_score(x, q, dtype=torch.float64)) for q in (0.0, 0.5, 1.0, 2.0, math.inf)]
    assert all(a >= b - 1e-9 for a, b in zip(vals, vals[1:]))  # Hill numbers decrease with q
    assert float(vendi_score(x)) == pytest.approx(vals[2], rel=1e-4)


def test_vendi_bad_input():
    with pytest.raises(PECError):
        vendi_score(torch.randn(5))
    with pytest.raises(PECError):
        vendi_score(torch.randn(0, 5))
    with pytest.raises(PECError):
        vendi_score(torch.randn(3, 5), q=-1)
    assert float(vendi_score(torch.randn(1, 5))) == pytest.approx(1.0)
    assert float(vendi_score(torch.zeros(4, 5))) == pytest.approx(1.0)  # degenerate, not NaN


def test_weighted_vendi_counts_a_weight_as_copies_and_uniform_weights_as_none():
    x = torch.randn(3, 10, 6, dtype=torch.float64)
    assert torch.allclose(
        vendi_score(x, weights=torch.full((3, 10), 7.0), dtype=torch.float64), vendi_score(x, dtype=torch.float64)
    )
    doubled = torch.cat([x[0], x[0, :2]])  # samples 0 and 1 twice = weight 2 each
    w = torch.tensor([2.0, 2.0] + [1.0] * 8)
    assert torch.allclose(vendi_score(doubled, dtype=torch.float64), vendi_score(x[0], weights=w, dtype=torch.float64))
    assert float(vendi_score(x[0], weights=torch.eye(10)[3], dtype=torch.float64)) == pytest.approx(1.0)
    w = torch.rand(10, dtype=torch.float64, requires_grad=True)
    vendi_score(x[0], weights=w, dtype=torch.float64).backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    for bad in (torch.zeros(10), -torch.ones(10)):
        with pytest.raises(PECError, match="weights"):
            vendi_score(x[0], weights=bad)


def _population_and_group(sets: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[sets, 8, dim]`` population and ``[sets, 6, dim]`` group samples spread ``spread`` around one start."""
    gen = torch.Generator().manual_seed(seed)
    population = torch.randn(sets, 8, dim, generator=gen, dtype=torch.float64) + 1.0
    start = torch.randn(sets, 1, dim, generator=gen, dtype=torch.float64)
    return population, start + spread * torch.randn(sets, 6, dim, generator=gen, dtype=torch.float64) + 1.0


@pytest.mark.parametrize("dim", [64, 5])  # the n×n Gram and the d×d covariance paths
def test_vendi_gradient_is_the_derivative_of_the_pooled_populations_log_vendi(dim):
    population, samples = _population_and_group(3, dim, 0.3, seed=0)
    b = vendi_gradient(samples, population)
    assert b.shape == (3, 6) and b.dtype == torch.float32
    # Weights of the pooled population: 1/9 per member, the 6 samples sharing one more ninth.
    w = torch.cat([torch.full((8,), 1 / 9), torch.full((6,), 1 / 54)]).double().expand(3, -1).clone()
    w.requires_grad_(True)
    vendi_score(torch.cat([population, samples], 1), weights=w, dtype=torch.float64).log().sum().backward()
    # On the simplex only differences between samples are defined: ∂/∂w_i − ∂/∂w_j = b_i − b_j.
    grad = w.grad[:, 8:]
    assert torch.allclose(grad - grad[:, :1], (b - b[:, :1]).double(), atol=1e-5)
    # A sample in a direction the population rarely takes earns more than one at its centre.
    rare = torch.zeros(dim, dtype=torch.float64)
    rare[0] = 1.0
    common = population[0].mean(0)
    assert float(vendi_gradient(torch.stack([rare, common]), population[0])[0]) > float(
        vendi_gradient(torch.stack([rare, common]), population[0])[1]
    )
    with pytest.raises(PECError, match="do not match"):
        vendi_gradient(samples, population[:2])


@pytest.mark.parametrize("dim", [64, 5])
def test_vendi_repulsion_is_the_positional_derivative_of_the_populations_log_vendi(dim):
    population, samples = _population_and_group(2, dim, 0.1, seed=1)
    b = vendi_repulsion(samples, population)
    assert b.shape == (2, 6) and b.dtype == torch.float32
    unit = F.normalize(samples, dim=-1)
    centre = F.normalize(unit.mean(1, keepdim=True), dim=-1).requires_grad_(True)
    vendi_score(torch.cat([population, centre], 1), dtype=torch.float64).log().sum().backward()
    # b_i = x̂_i · (the gradient of log VS in the centre's position, per unit of its weight 1/9)
    assert torch.allclose(b.double(), 9 * (unit * centre.grad).sum(-1), atol=1e-5)
    # Linear in the deviation, and orthogonal to the centre: samples mirrored about it get opposite bonuses.
    c = centre.detach()[0, 0]
    tangent = torch.randn(dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    tangent = F.normalize(tangent - (tangent @ c) * c, dim=0)
    pair = torch.stack([c + 0.01 * tangent, c - 0.01 * tangent])
    mirrored = vendi_repulsion(pair, population[0])
    assert float(mirrored.sum()) == pytest.approx(0.0, abs=1e-6) and float(mirrored.abs().max()) > 0


def test_feature_variance_raw_and_normalised():
    x = torch.randn(3, 20, 8, dtype=torch.float64) * 2 + 5
    raw = feature_variance(x)
    ref = torch.stack([torch.cov(x[p].T).trace() for p in range(3)])
    torch.testing.assert_close(raw, ref)
    xn = x / x.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(
        feature_variance(x, normalize=True), torch.stack([torch.cov(xn[p].T).trace() for p in range(3)])
    )
    torch.testing.assert_close(feature_variance(x * 10, normalize=True), feature_variance(x, normalize=True))
    assert float(feature_variance(torch.randn(1, 8))) == 0.0


def test_mean_pairwise_distance():
    x = torch.randn(15, 6, dtype=torch.float64)
    xn = x / x.norm(dim=-1, keepdim=True)
    cos = xn @ xn.T
    ref = 1 - (cos.sum() - cos.diagonal().sum()) / (15 * 14)
    assert float(mean_pairwise_distance(x)) == pytest.approx(float(ref), abs=1e-12)
    assert float(mean_pairwise_distance(torch.ones(4, 3))) == pytest.approx(0.0, abs=1e-6)
    assert float(mean_pairwise_distance(torch.eye(4))) == pytest.approx(1.0)
    assert float(mean_pairwise_distance(torch.randn(1, 3))) == 0.0
    batched = mean_pairwise_distance(torch.stack([x, x.flip(0)]))
    torch.testing.assert_close(batched, torch.full((2,), float(ref), dtype=torch.float64))


def test_perceptual_energy_and_entropy_formulas():
    g_next, g_mean = torch.randn(4, 16), torch.randn(4, 16)
    std = torch.tensor([0.1, 0.2, 0.3, 0.4])
    e = perceptual_energy(g_next, g_mean, std)
    torch.testing.assert_close(e, ((g_next - g_mean) ** 2).sum(-1) / (2 * std**2))
    h = perceptual_entropy(g_next, g_mean, std)
    torch.testing.assert_close(h, e + 8 * torch.log(2 * math.pi * std**2))
    # The per-sample perceptual entropy is -log N(g(x'); g(μ), std²·I) in feature space.
    ref = -torch.distributions.Normal(g_mean, std[:, None].expand(4, 16)).log_prob(g_next).sum(-1)
    torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-4)
    # Scalar std and multi-dim features.
    e2 = perceptual_energy(g_next.reshape(4, 4, 4), g_mean.reshape(4, 4, 4), 0.5)
    torch.testing.assert_close(e2, ((g_next - g_mean) ** 2).sum(-1) / 0.5)
    with pytest.raises(PECError):
        perceptual_energy(g_next, g_mean, torch.ones(3))


def test_latent_energy_is_half_noise_norm():
    # Applied to latents, e_VAE = ||x' - μ||²/(2·std²) = ||ε||²/2 for x' = μ + std·ε.
    mu, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    e_vae = perceptual_energy(mu + 0.3 * eps, mu, 0.3)
    torch.testing.assert_close(e_vae, (eps**2).flatten(1).sum(-1) / 2, rtol=1e-5, atol=1e-4)


def test_pcvae_gain_and_penalty():
    e = torch.tensor([[2.0, 8.0], [1.0, 4.0]])
    e_vae = torch.tensor([[100.0, 100.0], [50.0, 200.0]])
    gain = pcvae_gain(e, e_vae, feat_dim=4, latent_dim=100)
    torch.testing.assert_close(gain, torch.log(e / 4) - torch.log(e_vae / 100))
    calib = torch.tensor([0.0, 0.5])
    torch.testing.assert_close(pcvae_penalty(gain, calib), (gain - calib).abs().mean(-1))
    torch.testing.assert_close(pcvae_penalty(gain, calib, one_sided=True), (calib - gain).clamp_min(0).mean(-1))
    assert torch.isfinite(pcvae_gain(torch.zeros(2), torch.ones(2), 4, 100)).all()


def test_select_diverse_picks_the_spread_points():
    # Three tight clusters plus duplicates: the best 3 must come from 3 different clusters.
    centres = torch.eye(3, 8) * 5
    feats = torch.cat([centres[i] + 0.01 * torch.randn(6, 8) for i in range(3)])
    idx = select_diverse(feats, 3)
    assert idx.shape == (3,) and len(set(idx.tolist())) == 3
    assert sorted(i // 6 for i in idx.tolist()) == [0, 1, 2]
    # Greedy is at least as good as random subsets of the same size.
    best = float(vendi_score(feats[idx]))
    rand = max(float(vendi_score(feats[torch.randperm(18)[:3]])) for _ in range(20))
    assert best >= rand - 1e-5
    assert select_diverse(feats, 18).sort().values.tolist() == list(range(18))
    with pytest.raises(PECError):
        select_diverse(feats, 0)

"""The math of the docs/design.md §6 methods against hand-written formulas: Clip-Cov, KL-Cov, entropy
regularisation, E-GRPO's merge rule, DRIFT; and the config rules that combine them."""

import math
import shutil

import pytest
import torch
from test_trainer import model_dir, tiny_overrides  # noqa: F401  (model_dir is a fixture)

from comfy_pec.sde import (
    egrpo_merge_steps,
    egrpo_schedule,
    flow_sde_stds,
    flow_sde_step,
    gaussian_kl,
    sd3_schedule,
    step_entropy,
)
from trainer.checkpoint import complete_checkpoints
from trainer.config import ConfigError, load_config
from trainer.grpo import clipped_surrogate, group_advantages
from trainer.methods.cov import clip_cov_detach, kl_cov_penalty, top_covariance_mask
from trainer.methods.drift import drift_diversity_shaping, prompt_noise_std, reward_concentrated_subset
from trainer.methods.entropy_reg import native_entropy_bonus, perceptual_entropy_bonus
from trainer.runlog import read_log
from trainer.train import train


def _covariances(log_prob, adv):
    return [(lp - log_prob.mean()) * (a - adv.mean()) for lp, a in zip(log_prob.tolist(), adv.tolist())]


def test_clip_cov_detaches_exactly_the_top_fraction_by_covariance():
    log_prob = torch.tensor([0.3, -0.2, 0.9, 0.1, -0.7, 0.5, 0.0, -0.1], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5, -2.0, 0.5, 1.5, -1.5])
    cov = _covariances(log_prob.detach(), adv)
    top = sorted(range(8), key=lambda i: -cov[i])[:2]  # 25% of 8
    selected = top_covariance_mask(log_prob, adv, 0.25)
    assert sorted(selected.nonzero().flatten().tolist()) == sorted(top)
    assert top_covariance_mask(log_prob, adv, 0.3).sum() == 3  # ⌈0.3·8⌉
    # Ratio near 1 with a wide clip range: only the detaching can zero a gradient.
    loss, _ = clipped_surrogate(clip_cov_detach(log_prob, selected), log_prob.detach(), adv, 10.0, 10.0)
    loss.backward()
    assert torch.equal(log_prob.grad == 0, selected)
    torch.testing.assert_close(clip_cov_detach(log_prob, selected), log_prob)  # values unchanged


def test_kl_cov_penalises_exactly_the_selected():
    torch.manual_seed(1)
    mean = torch.randn(8, 3, 2, 2, requires_grad=True)
    old = mean.detach() + 0.1 * torch.randn(8, 3, 2, 2)
    std = torch.tensor(0.3)
    log_prob = torch.randn(8)
    adv = torch.randn(8)
    selected = top_covariance_mask(log_prob, adv, 0.25)
    kl = gaussian_kl(mean, old, std)
    penalty = kl_cov_penalty(kl, selected)
    torch.testing.assert_close(penalty, kl[selected].sum() / 8)
    penalty.backward()
    has_grad = mean.grad.flatten(1).abs().sum(1) > 0
    assert torch.equal(has_grad, selected)


def test_native_entropy_bonus_has_a_gradient_and_the_closed_form_has_none():
    theta = torch.tensor(0.5, requires_grad=True)
    x = torch.randn(4, 3, 2, 2)
    res = flow_sde_step(x, theta * x, 0.6, 0.5, 0.7, noise=torch.randn_like(x))
    bonus = native_entropy_bonus(res.x_next.detach(), res.mean, res.std).mean()
    (grad,) = torch.autograd.grad(bonus, theta)
    assert grad.abs() > 0
    closed_form = step_entropy(res.std, 1)
    assert not closed_form.requires_grad  # paper Property 1: no gradient to follow
    # e_θ is -log p_θ(x') per element up to the constant log std + ½ log 2π.
    elem = ((res.x_next - res.mean) ** 2 / (2 * res.std**2)).flatten(1).mean(1)
    torch.testing.assert_close(native_entropy_bonus(res.x_next, res.mean, res.std), elem)


def test_perceptual_entropy_bonus_chunked_value_and_gradient_are_exact():
    torch.manual_seed(2)
    weight = torch.randn(12, 5)

    def embed(z):  # a differentiable stand-in for f∘D
        return torch.tanh(z.flatten(1) @ weight)

    theta = torch.tensor(1.3, requires_grad=True)
    base = torch.randn(6, 3, 2, 2)
    mean = theta * base
    x_next = base + 0.2 * torch.randn_like(base)
    std = torch.tensor(0.4)
    direct = ((embed(x_next) - embed(mean)) ** 2).sum(1).div(2 * std**2).mean()
    (expected,) = torch.autograd.grad(direct, theta)
    chunked = perceptual_entropy_bonus(embed, x_next, theta * base, std, chunk_size=4)
    torch.testing.assert_close(chunked, direct.detach())
    (got,) = torch.autograd.grad(chunked, theta)
    torch.testing.assert_close(got, expected)


def test_egrpo_merge_rule_on_a_known_schedule():
    # The embedded model's schedule (10 steps, shift 1, a = 0.7) with the default τ = 0.5.
    sigmas = sd3_schedule(10, shift=1.0)
    stds = flow_sde_stds(sigmas, 0.7)
    h = step_entropy(stds, 1)
    assert h[:3].min() >= 0.5 > h[3]  # three high-entropy steps, then low entropy
    jumps = egrpo_merge_steps(stds, 0.5)
    assert [(j.start, j.length) for j in jumps] == [(0, 1), (1, 1), (2, 1), (3, 2)]
    for j in jumps:  # the merged std keeps the total variance of the replaced steps
        assert j.std**2 == pytest.approx(float((stds[j.start : j.start + j.length] ** 2).sum()), rel=1e-6)
    assert float(step_entropy(jumps[-1].std, 1)) >= 0.5 > float(step_entropy(stds[3], 1))
    # Hand-made stds: h(std) = ½·log(2πe·std²); τ = h(1) so 1 stays single, three 0.6 merge (1.08 ≥ 1),
    # and the trailing 0.3, 0.3 (0.18 < 1) stay ODE; the last step is never trained.
    hand = torch.tensor([1.0, 0.6, 0.6, 0.6, 0.3, 0.3, 5.0])
    tau = float(step_entropy(torch.tensor(1.0), 1))
    assert [(j.start, j.length) for j in egrpo_merge_steps(hand, tau)] == [(0, 1), (1, 3)]
    assert egrpo_merge_steps(hand, 10.0) == []


def test_egrpo_schedule_jump_has_the_merged_std():
    sigmas = sd3_schedule(10, shift=1.0)
    jump = egrpo_merge_steps(flow_sde_stds(sigmas, 0.7), 0.5)[-1]  # steps 3-4 merged
    merged, stochastic, levels = egrpo_schedule(sigmas, jump, 0.7)
    torch.testing.assert_close(merged, torch.cat([sigmas[:4], sigmas[5:]]))
    assert stochastic.nonzero().flatten().tolist() == [3] and len(stochastic) == 9
    x = torch.randn(2, 4)
    step = flow_sde_step(x, x, float(merged[3]), float(merged[4]), float(levels[3]), sigma_1=float(merged[1]))
    assert float(step.std) == pytest.approx(jump.std, rel=1e-5)
    assert levels[0] == 0.7


def test_drift_shaped_reward_equals_its_formula():
    torch.manual_seed(3)
    g = 4
    feats = torch.randn(8, 6)
    task = torch.tensor([0.1, 0.5, 0.3, 0.9, 1.0, 2.0, 0.0, 1.5])
    rewards = task + torch.tensor([0.2, -0.1, 0.0, 0.3, 0.0, 0.1, -0.2, 0.0])  # e.g. after PEC shaping
    alpha = 0.7
    out = drift_diversity_shaping(rewards, task, feats, g, alpha)
    expected = []
    unit = feats / feats.norm(dim=1, keepdim=True)
    for grp in range(2):
        idx = range(grp * g, grp * g + g)
        d = [1 - sum(float(unit[i] @ unit[j]) for j in idx if j != i) / (g - 1) for i in idx]
        d_hat = [(v - min(d)) / (max(d) - min(d)) for v in d]
        r = [float(task[i]) for i in idx]
        mean = sum(r) / g
        std = math.sqrt(sum((v - mean) ** 2 for v in r) / g)
        expected += [float(rewards[i]) + alpha * (r[k] - mean) / (std + 1e-4) * d_hat[k] for k, i in enumerate(idx)]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_drift_subset_drops_outliers_from_the_normalisation():
    rewards = torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 9.0])
    keep = reward_concentrated_subset(rewards, 8, threshold=3.0)
    assert keep.tolist() == [True] * 7 + [False]
    adv = group_advantages(rewards, 8, keep=keep)
    kept = rewards[:7].double()
    ref = (kept - kept.mean()) / (kept.std(unbiased=False) + 1e-4)
    torch.testing.assert_close(adv.values[:7], ref.float())
    assert adv.values[7] == 0 and adv.trained.tolist() == [True] * 7 + [False]
    # All kept: the same advantages as without a subset.
    torch.testing.assert_close(
        group_advantages(rewards, 4, keep=torch.ones(8, dtype=torch.bool)).values, group_advantages(rewards, 4).values
    )


def test_prompt_noise_anneals_linearly_to_zero():
    assert [prompt_noise_std(0.2, k, 4) for k in (0, 2, 4, 9)] == [0.2, 0.1, 0.0, 0.0]


@pytest.mark.parametrize(
    "overrides, rule",
    [
        (["sampling.window.rule=egrpo", "sampling.sde=cps"], "E-GRPO needs sampling.sde=flow_sde"),
        (["sampling.window.rule=egrpo", "pec.method=pcvae"], "PCVAE's calibration"),
        (["train.cov.kind=kl_cov", "train.cov.kl_beta=0"], "greater than 0"),
        (["pec.energy_draw=group", "pec.decode=x0"], "energy_draw=group perturbs μ_old itself"),
    ],
)
def test_method_combinations_that_cannot_work_fail_naming_the_rule(overrides, rule):
    with pytest.raises(ConfigError, match=rule):
        load_config("demo", None, overrides)


def test_methods_are_off_by_default():
    cfg = load_config("demo")
    assert cfg.train.entropy_reg.kind == "none" and cfg.train.cov.kind == "none"
    assert not cfg.drift.subset and cfg.drift.prompt_noise == 0 and cfg.drift.diversity_alpha == 0


# ---- each method switch in `pec train`, on a tiny random SD3 -------------------------------------

# Three runs that switch every method on at least once, combined as they compose (2 iterations each).
METHOD_RUNS = {
    "kl+clip-higher+clip-cov+entropy-native": (
        {
            "train.kl_beta": 0.05,
            "train.clip_range_high": 0.01,
            "train.cov.kind": "clip_cov",
            "train.entropy_reg.kind": "native",
        },
        ["kl", "cov_frac", "entropy_reg"],
    ),
    "egrpo+kl-cov-perceptual+entropy-perceptual+drift-shaping": (
        {
            "sampling.window.rule": "egrpo",
            "sampling.window.tau": 0.0,
            "train.cov.kind": "kl_cov",
            "train.cov.space": "perceptual",
            "train.entropy_reg.kind": "perceptual",
            "drift.diversity_alpha": 0.5,
        },
        ["egrpo_merged_steps", "egrpo_jump_std", "cov_frac", "kl_cov", "entropy_reg"],
    ),
    "cps+sliding+pcvae+drift-subset-prompt-noise": (
        {
            "sampling.sde": "cps",
            "sampling.window.rule": "sliding",
            "sampling.window.shift_every": 1,
            "pec.method": "pcvae",
            "drift.subset": True,
            "drift.prompt_noise": 0.1,
        },
        ["drift_kept_frac", "prompt_noise_std"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHOD_RUNS))
def test_each_method_trains_and_logs_its_quantities(model_dir, tmp_path, name):  # noqa: F811
    overrides, keys = METHOD_RUNS[name]
    run = tmp_path / "run"
    extra = {"train.iterations": 2, "checkpoint.every": 5, "report.grid_seeds": [0], **overrides}
    train(load_config("demo", None, tiny_overrides(model_dir, run, **extra)))
    rows = read_log(run)
    assert len(rows) == 2 and (run / "lora.safetensors").is_file()
    for key in ["policy_loss", "grad_norm", *keys]:
        assert all(key in r and r[key] is not None for r in rows), key
    assert abs(rows[0]["ratio_mean"] - 1) < 1e-3  # rollout and update see the same policy
    if "cov_frac" in keys:
        assert all(r["cov_frac"] == 0.25 for r in rows)
    if "sliding" in name:
        assert rows[0]["window_steps"] == [0, 1] and rows[1]["window_steps"] == [1, 2]
    if "egrpo" in name:  # one merged jump per iteration, in schedule order
        assert rows[0]["egrpo_merged_steps"][0] == 0 and len(rows[0]["window_steps"]) == 1
        assert rows[1]["egrpo_merged_steps"][0] == rows[0]["egrpo_merged_steps"][-1] + 1


def test_the_shuffled_bonus_control_keeps_each_groups_values_and_drops_their_link_to_samples():
    from trainer.methods.pec import shuffle_within_groups

    values = torch.arange(12.0)
    shuffled = shuffle_within_groups(values, 4, torch.Generator().manual_seed(0))
    for g in range(3):
        assert sorted(shuffled[4 * g : 4 * g + 4].tolist()) == values[4 * g : 4 * g + 4].tolist()
    assert not torch.equal(shuffled, values)
    assert torch.equal(shuffled, shuffle_within_groups(values, 4, torch.Generator().manual_seed(0)))


def test_the_group_draw_perturbs_every_mean_by_its_groups_own_noise():
    from trainer.rollout import group_draw_latents

    means, stds = torch.randn(4, 3, 2, 5, 5), torch.tensor([0.5, 0.2, 0.1])
    seeds = torch.tensor([7, 7, 9, 9])
    drawn = group_draw_latents(means, stds, seeds)
    eps = (drawn - means) / stds.reshape(1, 3, 1, 1, 1)
    assert torch.allclose(eps[0], eps[1], atol=1e-5) and torch.allclose(eps[2], eps[3], atol=1e-5)  # one per group
    assert not torch.allclose(eps[0], eps[2])
    assert torch.allclose(eps[0], torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(7)), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "combine,control,draw",
    [("relative", "none", "sample"), ("decoupled", "shuffled", "sample"), ("sum", "none", "group")],
)
def test_pec_combinations_and_the_control_train(model_dir, tmp_path, combine, control, draw):  # noqa: F811
    run = tmp_path / "run"
    extra = {"train.iterations": 2, "report.grid_seeds": [0], "pec.method": "pec", "pec.combine": combine}
    extra |= {"pec.bonus_control": control, "pec.energy_draw": draw}
    train(load_config("demo", None, tiny_overrides(model_dir, run, **extra)))
    rows = read_log(run)
    assert len(rows) == 2 and all(math.isfinite(r["shaped_reward_mean"]) for r in rows)
    assert (run / "lora.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False])
def test_the_anchor_is_the_base_models_image_from_the_same_start(model_dir, tmp_path, shared):  # noqa: F811
    # At the first iteration the LoRA is zero, so with almost no SDE noise every final image is the anchor itself:
    # a distance of 0 shows that the anchor was drawn from each sample's own start (its group's, or its own).
    distances = {}
    for level in (1e-6, 0.7):
        run = tmp_path / f"run{level}"
        extra = {"train.iterations": 1, "report.grid_seeds": [0], "pec.method": "pec", "pec.bonus": "anchor"}
        extra |= {"sampling.noise_level": level, "sampling.shared_init_noise": shared, "run.perceptual_stats": False}
        train(load_config("demo", None, tiny_overrides(model_dir, run, **extra)))
        (row,) = read_log(run)
        assert "perceptual_energy" not in row and "vendi" in row
        distances[level] = row["anchor_distance"]
    assert distances[1e-6] < 1e-9 < 1e-6 < distances[0.7]


@pytest.mark.slow
@pytest.mark.parametrize(
    "bonus,auto",
    [
        ("vendi", {}),
        ("repulsion", {"pec.beta_target": 0.95, "pec.beta_lr": 1.0, "pec.beta_max": 1.0}),
        ("anchor", {}),
    ],
)
def test_a_population_bonus_needs_no_energies_and_a_resumed_run_replays_its_draws(model_dir, tmp_path, bonus, auto):  # noqa: F811
    run = tmp_path / "run"
    extra = {"train.iterations": 2, "report.grid_seeds": [0], "pec.method": "pec", "pec.bonus": bonus}
    extra |= {"pec.population": 3, "pec.beta": 0.2, "run.perceptual_stats": False, **auto}
    overrides = tiny_overrides(model_dir, run, **extra)
    train(load_config("demo", None, overrides))
    rows = read_log(run)
    assert all("vendi" in r and "perceptual_energy" not in r and "step_energy" not in r for r in rows)
    assert all(len(r["group_bonus_std"]) == 2 and max(r["group_bonus_std"]) > 0 for r in rows)
    if auto:  # β steered by the population's Vendi over the base's, from the first iteration on
        assert all(r["population_vendi_ratio"] > 0 and r["beta"] != 0.2 for r in rows)
    shutil.rmtree(complete_checkpoints(run)[-1])
    train(load_config("demo", None, overrides))  # resumes at iteration 1: the same population draws and β
    resumed = read_log(run)
    assert [r["iteration"] for r in resumed] == [0, 1]
    for key in ("shaped_reward_mean", "group_bonus_std", "policy_loss", "beta"):
        assert resumed[1][key] == rows[1][key], key

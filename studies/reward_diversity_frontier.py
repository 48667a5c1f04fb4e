"""The reward–diversity frontier of the embedded world: how much diversity can a policy keep at a given reward gain?

    python studies/reward_diversity_frontier.py [--out runs/study_frontier] [--prompt-stride 3] [--samples 128]
                                                [--lora NAME=PATH ...] [--reference NAME ...]

Samples the base model with the ODE on every ``--prompt-stride``-th training prompt (the toy list is ordered by
colour; every third covers all five) at ``--samples`` seeds (2000, 2001, …), scores the task reward and the
toy-encoder features, and traces two frontiers over the distributions that reweight those samples — the base
model's own support, which a LoRA fine-tune mostly reweights:

- **KL-regularised optimum**, ``p_τ(x) ∝ p_base(x)·exp(r(x)/τ)``: the maximiser of ``E_p[r] − τ·KL(p ‖ p_base)``,
  where RL with a KL anchor to the base model converges at temperature τ;
- **Vendi-optimal reweighting**: the weights maximising ``log Vendi_w + λ·E_w[r]`` (gradient ascent on their
  logits), the most diversity any reweighting of these samples keeps at that reward.

A point is the mean reward gain over the base samples and the mean per-prompt Vendi / base, both of the weighted
population (:func:`comfy_pec.diversity.vendi_score` with ``weights``). LoRAs given by ``--lora`` are sampled at the
same prompts and seeds and placed on the same axes (their Vendi also as the mean over 16-sample subsets, the
study's and the demo's estimator). The mean gain of the reference LoRAs (``--reference``, default the first; for
example Flow-GRPO's runs) sets issue #18's target: gain ≥ 75 % of it at Vendi ≥ 0.90× the base. Writes ``results.md``, ``results.json`` and
``frontier.png`` in ``--out``; the base samples are cached there (``base_samples.pt``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from comfy_pec.diversity import vendi_score
from comfy_pec.encoders import load_encoder
from trainer.backends import load_backend
from trainer.config import load_config
from trainer.prompts import resolve_prompts
from trainer.rewards import build_reward
from trainer.sampling import sample_images

TEMPERATURES = [1.0, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.035, 0.025, 0.015]
MULTIPLIERS = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0, 20.0, 40.0]
TARGET_GAIN, TARGET_VENDI = 0.75, 0.90  # issue #18's mean targets
SEED0 = 2000


def tilted_weights(rewards: torch.Tensor, tau: float) -> torch.Tensor:
    """The KL-regularised optimum on samples of the base model: ``w ∝ exp(r / τ)`` per prompt.
    ``rewards`` ``[P, N]`` → weights ``[P, N]``, each row summing to 1."""
    return torch.softmax(rewards.double() / tau, dim=-1)


def vendi_optimal_weights(
    features: torch.Tensor, rewards: torch.Tensor, multiplier: float, steps: int = 400, lr: float = 0.05
) -> torch.Tensor:
    """Weights ``w`` (softmax of logits, from uniform) maximising ``log Vendi_w(features) + multiplier·Σ w·r`` by Adam.
    ``features`` ``[N, D]``, ``rewards`` ``[N]`` → ``[N]`` summing to 1. ``multiplier`` 0: the most diverse
    reweighting; large: all weight on the best samples."""
    logits = torch.zeros(rewards.shape[0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    x, r = features.double(), rewards.double()
    for _ in range(steps):
        w = torch.softmax(logits, 0)
        loss = -(vendi_score(x, weights=w, dtype=torch.float64).log() + multiplier * (w * r).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.softmax(logits.detach(), 0)


def population_point(rewards: torch.Tensor, features: torch.Tensor, weights: torch.Tensor, base: dict) -> dict:
    """Mean reward gain and mean Vendi / base of the weighted populations of P prompts.
    ``rewards`` ``[P, N]``, ``features`` ``[P, N, D]``, ``weights`` ``[P, N]``; ``base`` from :func:`base_reference`."""
    reward = (weights * rewards.double()).sum(-1).mean()
    vendi = vendi_score(features, weights=weights, dtype=torch.float64) / base["vendi"]
    return {"gain": float(reward) - base["reward"], "vendi_ratio": float(vendi.mean())}


def base_reference(rewards: torch.Tensor, features: torch.Tensor) -> dict:
    """The base samples' mean reward and per-prompt population Vendi ``[P]``."""
    return {"reward": float(rewards.double().mean()), "vendi": vendi_score(features, dtype=torch.float64)}


def subset_vendi(features: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Per-prompt Vendi as the mean over disjoint ``size``-sample subsets: ``[P, N, D]`` → ``[P]``."""
    p, n, d = features.shape
    chunks = features[:, : n - n % size].reshape(p, -1, size, d)
    return vendi_score(chunks.flatten(0, 1), dtype=torch.float64).reshape(p, -1).mean(-1)


def interpolate_vendi(points: list[dict], gain: float) -> float | None:
    """The frontier's Vendi / base at ``gain`` (linear between the two points around it; None outside)."""
    pts = sorted(points, key=lambda q: q["gain"])
    for a, b in zip(pts, pts[1:], strict=False):
        if a["gain"] <= gain <= b["gain"] and b["gain"] > a["gain"]:
            t = (gain - a["gain"]) / (b["gain"] - a["gain"])
            return a["vendi_ratio"] + t * (b["vendi_ratio"] - a["vendi_ratio"])
    return None


@torch.no_grad()
def sample_scores(model_path, lora, prompts: list[str], seeds: list[int], reward_fn, encoder) -> dict:
    """Task rewards ``[P, N]`` and encoder features ``[P, N, D]`` of ODE samples of every prompt at every seed."""
    backend = load_backend(model_path)
    if lora is not None:
        backend.load_lora(str(lora))
    rewards, features = [], []
    for prompt in tqdm(prompts, desc=f"sample {Path(lora).parent.name if lora else 'base'}", leave=False):
        images = sample_images(backend, [prompt] * len(seeds), seeds, progress=False, batch_size=32)
        rewards.append(reward_fn(images, [prompt] * len(seeds))[0].float())
        features.append(encoder(images).float())
    return {"rewards": torch.stack(rewards), "features": torch.stack(features)}


def plot(path: Path, kl: list[dict], vendi: list[dict], loras: dict[str, dict], target: tuple[float, float] | None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for points, label in ((kl, "KL-regularised optimum p ∝ p_base·exp(r/τ)"), (vendi, "Vendi-optimal reweighting")):
        pts = sorted(points, key=lambda q: q["gain"])
        ax.plot([q["gain"] for q in pts], [q["vendi_ratio"] for q in pts], marker=".", label=label)
    for name, point in loras.items():
        ax.scatter(point["gain"], point["vendi_ratio"], zorder=3)
        ax.annotate(name, (point["gain"], point["vendi_ratio"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if target is not None:
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        box = Rectangle(
            target, x1 - target[0], y1 - target[1], alpha=0.12, color="green", label="issue #18's mean target"
        )
        ax.add_patch(box)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
    ax.set_xlabel("task reward gain over the base model")
    ax.set_ylabel("Vendi / base (population)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/study_frontier")
    parser.add_argument("--prompt-stride", type=int, default=3, help="every k-th training prompt (default 3: 10 of 30)")
    parser.add_argument("--samples", type=int, default=128, help="ODE samples per prompt (seeds 2000, 2001, ...)")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=PATH", help="a LoRA to place on the axes")
    parser.add_argument(
        "--reference", nargs="+", default=None, help="--lora NAMEs whose mean gain sets the target (default: the first)"
    )
    args = parser.parse_args()
    loras = dict(item.split("=", 1) for item in args.lora)
    for name, path in loras.items():
        if not Path(path).is_file():
            parser.error(f"--lora {name}: no file {path}")
    unknown = set(args.reference or []) - set(loras)
    if unknown:
        parser.error(
            f"--reference {', '.join(sorted(unknown))}: not a --lora name ({', '.join(loras) or 'none given'})"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    config = load_config("demo")
    prompts = resolve_prompts(config.prompts.train)[:: args.prompt_stride]
    seeds = list(range(SEED0, SEED0 + args.samples))
    reward_fn, encoder = build_reward(config.rewards), load_encoder(config.pec.encoder)
    cache, key = out / "base_samples.pt", {"prompts": prompts, "seeds": seeds}
    saved = torch.load(cache) if cache.exists() else None
    if saved is None or saved["key"] != key:
        saved = {"key": key, **sample_scores(config.model.path, None, prompts, seeds, reward_fn, encoder)}
        torch.save(saved, cache)
    rewards, features = saved["rewards"], saved["features"]
    base = base_reference(rewards, features)

    kl = [{"tau": t, **population_point(rewards, features, tilted_weights(rewards, t), base)} for t in TEMPERATURES]
    vendi = []
    for m in tqdm(MULTIPLIERS, desc="Vendi-optimal frontier"):
        w = torch.stack([vendi_optimal_weights(f, r, m) for f, r in zip(features, rewards, strict=True)])
        vendi.append({"multiplier": m, **population_point(rewards, features, w, base)})

    placed, base16 = {}, subset_vendi(features)
    for name, path in loras.items():
        s = sample_scores(config.model.path, path, prompts, seeds, reward_fn, encoder)
        uniform = torch.full(s["rewards"].shape, 1.0 / len(seeds), dtype=torch.float64)
        point = population_point(s["rewards"], s["features"], uniform, base)
        placed[name] = {**point, "vendi16_ratio": float((subset_vendi(s["features"]) / base16).mean())}

    target = None
    lines = [
        f"Embedded world, base model: {len(prompts)} training prompts (stride {args.prompt_stride}) × {len(seeds)} "
        f"ODE samples; reward {base['reward']:.4f}. Vendi / base of the weighted population.",
        "",
        "| frontier | parameter | reward gain | Vendi / base |",
        "| --- | --- | --- | --- |",
        *(f"| KL-regularised | τ {p['tau']} | {p['gain']:+.4f} | {p['vendi_ratio']:.3f} |" for p in kl),
        *(f"| Vendi-optimal | λ {p['multiplier']} | {p['gain']:+.4f} | {p['vendi_ratio']:.3f} |" for p in vendi),
    ]
    if placed:
        lines += [
            "",
            "| LoRA | reward gain | Vendi / base | Vendi / base, 16-sample subsets |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {n} | {p['gain']:+.4f} | {p['vendi_ratio']:.3f} | {p['vendi16_ratio']:.3f} |" for n, p in placed.items()
        ]
        refs = args.reference or [next(iter(placed))]
        gain = TARGET_GAIN * sum(placed[r]["gain"] for r in refs) / len(refs)
        target = (gain, TARGET_VENDI)
        at = {
            name: interpolate_vendi(points, gain) for name, points in (("KL-regularised", kl), ("Vendi-optimal", vendi))
        }
        lines += [
            "",
            f"At {TARGET_GAIN:.0%} of the mean gain of {', '.join(refs)} ({gain:+.4f}) the frontiers keep: "
            + ", ".join(f"{n} {'n/a' if v is None else f'{v:.3f}×'}" for n, v in at.items())
            + f" (target ≥ {TARGET_VENDI}×).",
        ]
    plot(out / "frontier.png", kl, vendi, placed, target)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(
        json.dumps({"base_reward": base["reward"], "kl": kl, "vendi": vendi, "loras": placed}, indent=1)
    )
    print("\n".join(lines))
    print(f"wrote {out / 'results.md'} and {out / 'frontier.png'}")


if __name__ == "__main__":
    main()

"""The run report: ``report.md`` with training curves and before/after grids (PNG) in the run directory.

The curves show the paper's Fig. 2 paradox when it happens: the closed-form policy entropy stays
flat while the perceptual entropy and the Vendi score of the samples fall.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch

from .backends import Backend
from .config import Config
from .grids import image_grid
from .metrics import image_batches, score_images
from .prompts import resolve_prompts
from .runlog import read_log, read_probes
from .sampling import sample_images

#: the curves a fixed probe measures (trainer.probe), plotted from its rows when the run has them
PROBED = ("policy_entropy", "perceptual_entropy", "vendi")
CURVES = [
    ("reward_mean", "task reward (mean)"),
    ("policy_entropy", "policy entropy (closed form, per dim)"),
    ("perceptual_entropy", "perceptual entropy Ĥ_A"),
    ("vendi", "Vendi per group (perceptual space)"),
]


def plot_curves(rows: list[dict], path: Path, probes: list[dict] | None = None, runs: dict | None = None) -> None:
    """The :data:`CURVES` of one run's ``rows`` — or of several, ``runs`` = {label: (rows, probes)}, on shared
    axes. Where a run has probe rows, the entropy and Vendi panels plot them (the fixed probe: the same
    prompts, seeds and steps every time) instead of the per-iteration values, which follow each
    iteration's draw of prompts and SDE window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = runs or {"": (rows, probes or [])}
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for i, (label, (run_rows, run_probes)) in enumerate(runs.items()):
        style = ("-", "--", ":", "-.")[i % 4]  # lines that coincide (the policy entropy) stay visible
        for ax, (key, title) in zip(axes, CURVES):
            source = run_probes if run_probes and key in PROBED else run_rows
            values = [r.get(key) if r.get(key) is not None else float("nan") for r in source]
            ax.plot([r["iteration"] for r in source], values, style, marker=".", label=label or None)
            ax.set_title(title + (" — probe" if run_probes and key in PROBED else ""), fontsize=10)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def evaluate_grid(backend: Backend, prompts: list[str], seeds: list[int], encoder, reward_fn) -> dict:
    """Samples every prompt at every seed (ODE); returns the images, the mean reward (total and per
    term, ``reward/<name>``) and the mean per-prompt Vendi in the encoder's space."""
    all_prompts = [p for p in prompts for _ in seeds]
    images = sample_images(backend, all_prompts, [s for _ in prompts for s in seeds], progress=False)
    batches = image_batches(images, all_prompts, len(images))
    metrics, _ = score_images(batches, len(prompts), {"reward": reward_fn}, {"encoder": encoder}, backend.device)
    means = {name: float(values.mean()) for name, values in metrics.items() if name.startswith("reward")}
    return {"images": images, **means, "vendi": float(metrics["vendi/encoder"].mean())}


def write_report(
    run_dir: Path,
    backend: Backend,
    config: Config,
    encoder,
    reward_fn,
    lora_disabled: Callable[[Backend], contextlib.AbstractContextManager],
) -> Path:
    """Write curves, before/after grids and ``report.md``; returns the report's path."""
    run_dir = Path(run_dir)
    rows = read_log(run_dir)
    plot_curves(rows, run_dir / "curves.png", read_probes(run_dir))

    prompts = resolve_prompts(config.prompts.eval)[: config.report.grid_prompts]
    seeds = config.report.grid_seeds
    with lora_disabled(backend):
        before = evaluate_grid(backend, prompts, seeds, encoder, reward_fn)
    after = evaluate_grid(backend, prompts, seeds, encoder, reward_fn)
    for name, result in (("before", before), ("after", after)):
        image_grid(result["images"], len(seeds), row_labels=prompts, upscale=2).save(run_dir / f"grid_{name}.png")

    first, last = rows[0], rows[-1]
    lora = run_dir / "lora.safetensors"
    lines = [
        f"# PEC run report — {run_dir.name}",
        "",
        f"Method: **{config.pec.method if config.pec.method != 'none' else 'flow-grpo'}**"
        f" (β = {config.pec.beta}, encoder {config.pec.encoder}), rewards "
        + ", ".join(f"{r.name}×{r.weight}" for r in config.rewards)
        + f"; {len(rows)} iterations of {config.train.prompts_per_iteration} prompts × {config.train.group_size} samples.",
        "",
        "## Before / after (held-out prompts, fixed seeds, ODE sampling)",
        "",
        "| | task reward | Vendi per prompt |",
        "| --- | --- | --- |",
        f"| base model | {before['reward']:.4f} | {before['vendi']:.3f} |",
        f"| with the LoRA | {after['reward']:.4f} | {after['vendi']:.3f} |",
        "",
        "Base: ![before](grid_before.png)",
        "",
        "LoRA: ![after](grid_after.png)",
        "",
        "## Training curves",
        "",
        "![curves](curves.png)",
        "",
        "| | first iteration | last iteration |",
        "| --- | --- | --- |",
    ]
    for key, title in CURVES:
        lines.append(f"| {title} | {first.get(key, float('nan')):.4f} | {last.get(key, float('nan')):.4f} |")
    phases = [k for k in last if k.startswith("time_")]
    lines += [
        "",
        "Seconds per iteration (mean): "
        + ", ".join(f"{k[5:]} {sum(r.get(k, 0.0) for r in rows) / len(rows):.2f}" for k in phases),
        "",
        "## Using the LoRA",
        "",
        f"File: `{lora}` (scale baked in: use strength 1.0).",
        "",
        "- ComfyUI: copy it to `models/loras/` and load it with *LoraLoaderModelOnly* (or the PEC LoRA Loader).",
        '- diffusers: `pipe.load_lora_weights("' + str(lora) + '")`.',
        f'- PEC: `pec sample --lora {lora} --prompt "{prompts[0]}"`.',
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path

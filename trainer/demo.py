"""`pec demo`: the paradox side by side — Flow-GRPO and PEC trained from the same seed and budget on the
embedded model, then one report (docs/design.md §9).

Both runs use the ``demo`` preset with its fixed probe on; they differ only in ``pec.method``. The report
shows, for held-out prompts at the same seeds, the base model, the Flow-GRPO LoRA and the PEC LoRA one row
each; the probe curves of both runs on shared axes (the closed-form policy entropy: two identical flat
lines; the perceptual entropy and Vendi: Flow-GRPO falls, PEC holds); and a table of reward, Vendi,
Vendi/base and each method's share of Flow-GRPO's reward gain.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .backends import load_backend
from .config import Config, load_config
from .grids import image_grid
from .prompts import resolve_prompts
from .report import evaluate_grid, plot_curves
from .rewards import build_reward
from .runlog import read_log, read_probes
from .train import train

#: the compared methods: label → overrides of the demo preset
METHODS = {"Flow-GRPO": ["pec.method=none"], "PEC": ["pec.method=pec"]}


def demo_configs(overrides: list[str]) -> dict[str, Config]:
    """One config per method, in ``run.dir``/``<method>`` (the same seed and budget for each)."""
    base = load_config("demo", None, overrides)
    folder = Path(base.run.dir)
    return {
        label: load_config("demo", None, [*overrides, *extra, f"run.dir={folder / label.lower()}"])
        for label, extra in METHODS.items()
    }


def gain_share(reward: float, base: float, reference: float) -> float:
    """A method's reward gain over the base model as a share of the reference method's (Flow-GRPO's) gain."""
    return (reward - base) / (reference - base) if reference != base else float("nan")


def run_demo(overrides: list[str], resume: bool = True, workers: int | None = None) -> Path:
    """Train both methods (resuming finished or interrupted runs), evaluate, write ``report.md``; its path."""
    configs = demo_configs(overrides)
    folder = Path(load_config("demo", None, overrides).run.dir)
    runs = train_side_by_side(configs, resume, workers)
    return write_demo_report(folder, configs, runs)


def train_side_by_side(configs: dict[str, Config], resume: bool, workers: int | None = None) -> dict[str, Path]:
    """Train every config, ``workers`` processes at once (default: one per config, as many as there are CPU
    cores), each on its share of the cores; ``{label: run_dir}``. The tiny model's steps keep one core busy,
    not two, so two runs side by side take the time of one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(len(configs), cores) if workers is None else workers
    if workers <= 1:
        return {label: train(config, resume=resume) for label, config in configs.items()}
    # spawn: a forked child would inherit the parent's torch thread pool and locks
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    with pool:
        futures = {
            label: pool.submit(_train_in_process, config, resume, max(1, cores // workers), position)
            for position, (label, config) in enumerate(configs.items())
        }
        return {label: future.result() for label, future in futures.items()}


def _train_in_process(config: Config, resume: bool, threads: int, position: int) -> Path:
    torch.set_num_threads(threads)
    return train(config, resume=resume, bar_position=position)


@torch.no_grad()
def write_demo_report(folder: Path, configs: dict[str, Config], runs: dict[str, Path]) -> Path:
    """The side-by-side report of finished runs ``{label: run_dir}`` in ``folder``."""
    from comfy_pec.encoders import load_encoder

    first = next(iter(configs.values()))
    prompts = resolve_prompts(first.prompts.eval)[: first.report.grid_prompts]
    seeds = first.report.grid_seeds
    encoder = load_encoder(first.pec.encoder, path=first.pec.encoder_path)
    reward_fn = build_reward(first.rewards)
    results = {}
    models = [("base model", None), *((k, v / "lora.safetensors") for k, v in runs.items())]
    for label, lora in tqdm(models, desc="evaluate"):
        backend = load_backend(first.model.path)
        if lora is not None:
            backend.load_lora(str(lora))
        results[label] = evaluate_grid(backend, prompts, seeds, encoder, reward_fn)

    # Rows: for each prompt, base / Flow-GRPO / PEC at the same seeds.
    per_prompt = [r["images"].reshape(len(prompts), len(seeds), *r["images"].shape[1:]) for r in results.values()]
    images = torch.stack(per_prompt, dim=1).flatten(0, 2)  # [prompt, method, seed] order
    labels = [f"{name}: {p}" for p in prompts for name in results]
    image_grid(images, len(seeds), row_labels=labels, upscale=2).save(folder / "grid.png")
    plot_curves([], folder / "curves.png", runs={k: (read_log(v), read_probes(v)) for k, v in runs.items()})

    base, reference = results["base model"], results["Flow-GRPO"]
    lines = [
        "# PEC demo — the paradox side by side",
        "",
        f"Flow-GRPO and PEC trained from the same seed ({first.train.seed}) and budget ({first.train.iterations} "
        f"iterations of {first.train.prompts_per_iteration} prompts × {first.train.group_size} samples) on the "
        "embedded model; evaluated on held-out prompts at fixed seeds (ODE).",
        "",
        "| | task reward | Vendi per prompt | Vendi / base | share of Flow-GRPO's gain |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, r in results.items():
        share = "" if label == "base model" else f"{gain_share(r['reward'], base['reward'], reference['reward']):.2f}"
        lines.append(f"| {label} | {r['reward']:.4f} | {r['vendi']:.3f} | {r['vendi'] / base['vendi']:.2f} | {share} |")
    lines += [
        "",
        "Rows: base model, Flow-GRPO, PEC for each prompt, the same seeds in every row.",
        "",
        "![grid](grid.png)",
        "",
        "Fixed probe every few iterations (the same prompts, seeds and SDE steps each time): the policy entropy "
        "is a property of the schedule, identical for both; the perceptual entropy and Vendi are the policy's.",
        "",
        "![curves](curves.png)",
        "",
        "## The LoRAs",
        "",
    ]
    for label, run_dir in runs.items():
        lora = run_dir / "lora.safetensors"
        lines.append(f"- {label}: `{lora}` (strength 1.0; its own report: `{run_dir / 'report.md'}`)")
    lines += [
        "",
        f'Try one: `pec sample --lora {runs["PEC"] / "lora.safetensors"} --prompt "{prompts[0]}"`; in ComfyUI copy it to '
        "`models/loras/` and load it with LoraLoaderModelOnly or the PEC LoRA Loader.",
        "",
    ]
    path = folder / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path

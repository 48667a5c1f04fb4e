"""`pec demo`: the paradox side by side — Flow-GRPO and PEC trained from the same seed and budget on the
embedded model, then one report (docs/design.md §9).

Both runs use the ``demo`` preset with its fixed probe on; they differ only in ``pec.method``, and they train
side by side in two processes. The report shows, for held-out prompts at the same seeds, the base model, the
Flow-GRPO LoRA and the PEC LoRA one row each; the probe curves of both runs on shared axes (the closed-form
policy entropy: two identical flat lines; the perceptual entropy and Vendi: each policy's own); and a table of
reward, Vendi, Vendi/base and each method's share of Flow-GRPO's reward gain on training and held-out prompts
(:func:`measure`, the measurement ``studies/flow_grpo_vs_pec.py`` makes per seed).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
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
    return write_demo_report(folder, configs, runs, workers)


def train_side_by_side(configs: dict[str, Config], resume: bool, workers: int | None = None) -> dict[str, Path]:
    """Train every config, ``workers`` processes at once (default: one per config, as many as there are CPU
    cores), each on its share of the cores; ``{label: run_dir}``. The tiny model's steps keep one core busy,
    not two, so two runs side by side take the time of one."""
    jobs = {label: (config, resume, position) for position, (label, config) in enumerate(configs.items())}
    return side_by_side(_train_in_process, jobs, workers)


def side_by_side(fn, jobs: dict[str, tuple], workers: int | None = None, desc: str | None = None) -> dict:
    """``{label: fn(*args, threads)}`` for every ``label: args`` of ``jobs``, ``workers`` spawned processes at once
    (default: one per job, as many as there are CPU cores), each given ``threads`` = its share of the cores;
    ``desc`` names a progress bar of finished jobs (none when the jobs draw their own)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(len(jobs), cores) if workers is None else workers
    if workers <= 1:
        items = tqdm(jobs.items(), desc=desc, disable=desc is None)
        return {label: fn(*args, torch.get_num_threads()) for label, args in items}
    bar = tqdm(total=len(jobs), desc=desc, disable=desc is None)
    # spawn: a forked child would inherit the parent's torch thread pool and locks
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool, bar:
        futures = {label: pool.submit(fn, *args, max(1, cores // workers)) for label, args in jobs.items()}
        for _ in as_completed(futures.values()):
            bar.update()
        return {label: future.result() for label, future in futures.items()}


def _train_in_process(config: Config, resume: bool, position: int, threads: int) -> Path:
    torch.set_num_threads(threads)
    return train(config, resume=resume, bar_position=position)


def _measure_in_process(config: Config, lora: Path | None, prompt_sets: dict[str, list[str]], threads: int) -> dict:
    from comfy_pec.encoders import load_encoder

    torch.set_num_threads(threads)
    encoder = load_encoder(config.pec.encoder, path=config.pec.encoder_path)
    return measure(config.model.path, lora, prompt_sets, EVAL_SEEDS, encoder, build_reward(config.rewards))


@torch.no_grad()
def measure(
    model_path, lora: Path | None, prompt_sets: dict[str, list[str]], seeds: list[int], encoder, reward_fn
) -> dict[str, dict]:
    """The base model (``lora=None``) or base + LoRA on every prompt set at ``seeds`` (ODE): per set the mean task
    reward, the mean per-prompt Vendi in the encoder's space and the images ``[P·S, 3, H, W]`` (prompt-major)."""
    backend = load_backend(model_path)
    if lora is not None:
        backend.load_lora(str(lora))
    return {name: evaluate_grid(backend, prompts, seeds, encoder, reward_fn) for name, prompts in prompt_sets.items()}


def evaluation_sets(config: Config, training: int | None = None, heldout: int | None = None) -> dict[str, list[str]]:
    """The prompts the demo's table and ``studies/flow_grpo_vs_pec.py`` measure: the first ``training`` training and
    ``heldout`` held-out prompts, every one of them by default. A few first prompts are not a sample of the set: the
    toy set's first 8 name only red and yellow shapes, and a run's collapse differs from colour to colour."""
    return {
        "training": resolve_prompts(config.prompts.train)[:training],
        "held-out": resolve_prompts(config.prompts.eval)[:heldout],
    }


#: the fixed seeds of that measurement (16 samples per prompt); the grid shows the first GRID_SEEDS of them
EVAL_SEEDS = list(range(1000, 1016))
GRID_SEEDS = 8


@torch.no_grad()
def write_demo_report(
    folder: Path, configs: dict[str, Config], runs: dict[str, Path], workers: int | None = None
) -> Path:
    """The side-by-side report of finished runs ``{label: run_dir}`` in ``folder`` (the models measured
    ``workers`` at a time, as :func:`side_by_side`)."""
    first = next(iter(configs.values()))
    prompt_sets = evaluation_sets(first)
    models = {"base model": None, **{k: v / "lora.safetensors" for k, v in runs.items()}}
    jobs = {label: (first, lora, prompt_sets) for label, lora in models.items()}
    results = side_by_side(_measure_in_process, jobs, workers, desc="evaluate")

    # Rows: for each held-out prompt shown, base / Flow-GRPO / PEC at the same seeds.
    shown, seeds = prompt_sets["held-out"][: first.report.grid_prompts], GRID_SEEDS
    per_prompt = [
        r["held-out"]["images"].reshape(-1, len(EVAL_SEEDS), *r["held-out"]["images"].shape[1:])
        for r in results.values()
    ]
    images = torch.stack([p[: len(shown), :seeds] for p in per_prompt], dim=1).flatten(0, 2)  # [prompt, method, seed]
    labels = [f"{name}: {p}" for p in shown for name in results]
    image_grid(images, seeds, row_labels=labels, upscale=2).save(folder / "grid.png")
    plot_curves([], folder / "curves.png", runs={k: (read_log(v), read_probes(v)) for k, v in runs.items()})

    lines = [
        "# PEC demo — the paradox side by side",
        "",
        f"Flow-GRPO and PEC trained from the same seed ({first.train.seed}) and budget ({first.train.iterations} "
        f"iterations of {first.train.prompts_per_iteration} prompts × {first.train.group_size} samples) on the "
        f"embedded model; measured on {len(prompt_sets['training'])} training and {len(prompt_sets['held-out'])} "
        f"held-out prompts × {len(EVAL_SEEDS)} seeds ({EVAL_SEEDS[0]}–{EVAL_SEEDS[-1]}, ODE).",
        "",
        "| | prompts | task reward | Vendi per prompt | Vendi / base | share of Flow-GRPO's gain |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for set_name in prompt_sets:
        base, reference = results["base model"][set_name], results["Flow-GRPO"][set_name]
        for label, per_set in results.items():
            r = per_set[set_name]
            share = (
                "" if label == "base model" else f"{gain_share(r['reward'], base['reward'], reference['reward']):.2f}"
            )
            lines.append(
                f"| {label} | {set_name} | {r['reward']:.4f} | {r['vendi']:.3f} | {r['vendi'] / base['vendi']:.2f} | "
                f"{share} |"
            )
    lines += [
        "",
        f"Rows: base model, Flow-GRPO, PEC for each of the first {len(shown)} held-out prompts, the same {seeds} seeds "
        "in every row.",
        "",
        "![grid](grid.png)",
        "",
        "Fixed probe every few iterations (the same prompts, seeds and SDE steps each time): the policy entropy "
        "is a property of the schedule, identical for both (the two lines coincide); the perceptual entropy and "
        "Vendi are the policy's.",
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
        f'Try one: `pec sample --lora {runs["PEC"] / "lora.safetensors"} --prompt "{shown[0]}"`; in ComfyUI copy it to '
        "`models/loras/` and load it with LoraLoaderModelOnly or the PEC LoRA Loader.",
        "",
    ]
    path = folder / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path

"""`pec demo`: the paradox side by side — Flow-GRPO and PEC trained from the same seed and budget on the
embedded model, then one report (docs/design.md §9).

Both runs use the ``demo`` preset with its fixed probe on; they differ only in ``pec.method`` (and Flow-GRPO,
whose training uses no perceptual quantity, skips measuring them every iteration: the probe measures what the
report plots). They train side by side in two processes, and a core that a finished run frees starts measuring
the models while the other still trains. The report shows, for held-out prompts at the same seeds, the base
model, the Flow-GRPO LoRA and the PEC LoRA one row each; the probe curves of both runs on shared axes (the
closed-form policy entropy: two identical flat lines; the perceptual entropy and Vendi: each policy's own); and
a table of reward, Vendi, Vendi/base and each method's share of Flow-GRPO's reward gain on training and held-out
prompts (:func:`measure`, the measurement ``studies/flow_grpo_vs_pec.py`` makes per seed).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Hashable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
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
METHODS = {"Flow-GRPO": ["pec.method=none", "run.perceptual_stats=false"], "PEC": ["pec.method=pec"]}


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
    """Train both methods (resuming finished or interrupted runs) and measure them and the base model, ``workers``
    processes at once (default: as many as there are CPU cores, :func:`side_by_side`); write ``report.md``, its
    path."""
    configs = demo_configs(overrides)
    folder = Path(load_config("demo", None, overrides).run.dir)
    first = next(iter(configs.values()))
    prompt_sets = evaluation_sets(first)
    chunks = measurement_chunks(prompt_sets)

    def measure_jobs(label: str, lora: Path | None) -> dict:
        return {(label, i): (_measure_in_process, (first, lora, chunk)) for i, chunk in enumerate(chunks)}

    def then(key, run_dir: Path) -> dict:  # a finished training run: measure its LoRA
        return measure_jobs(key, run_dir / "lora.safetensors") if key in configs else {}

    jobs = {
        **{
            label: (_train_in_process, (config, resume, position))
            for position, (label, config) in enumerate(configs.items())
        },
        **measure_jobs("base model", None),
    }
    bar = tqdm(total=len(chunks) * (len(configs) + 1), desc="evaluate", position=len(configs))

    def count(key) -> None:  # the training runs draw their own bars
        if key not in configs:
            bar.update()

    with bar:
        done = side_by_side(jobs, workers, then, on_done=count)
    runs = {label: done[label] for label in configs}
    results = {
        label: merge_measurements([done[label, i] for i in range(len(chunks))], chunks)
        for label in ("base model", *configs)
    }
    return write_demo_report(folder, first, runs, prompt_sets, results)


Job = tuple[Callable, tuple]


def side_by_side(
    jobs: dict[Hashable, Job],
    workers: int | None = None,
    then: Callable[[Hashable, object], dict[Hashable, Job]] | None = None,
    on_done: Callable[[Hashable], None] | None = None,
) -> dict:
    """``{key: fn(*args, threads)}`` for every ``key: (fn, args)`` of ``jobs`` and of the jobs that ``then(key,
    result)`` returns as each job finishes (queued behind those waiting). ``workers`` spawned processes run them
    (default: one per initial job, as many as there are CPU cores), each job given ``threads`` = its process's
    share of the cores; with one worker they run here, in order. ``on_done(key)`` follows each finished job."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(len(jobs), cores) if workers is None else workers
    # spawn: a forked child would inherit the parent's torch thread pool and locks
    pool = (
        _InProcess() if workers <= 1 else ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    )
    threads = torch.get_num_threads() if workers <= 1 else max(1, cores // workers)
    results: dict = {}
    with pool:
        pending = {pool.submit(fn, *args, threads): key for key, (fn, args) in jobs.items()}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    key = pending.pop(future)
                    results[key] = future.result()
                    for new_key, (fn, args) in (then(key, results[key]) if then else {}).items():
                        pending[pool.submit(fn, *args, threads)] = new_key
                    if on_done:
                        on_done(key)
        finally:  # a failed job: the queued ones would only delay its error
            for future in pending:
                future.cancel()
    return {key: results[key] for key in [*jobs, *(k for k in results if k not in jobs)]}


class _InProcess:
    """An executor that runs each job when it is submitted (one worker: no process to spawn)."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as error:  # re-raised by future.result(), as a pool's worker would
            future.set_exception(error)
        return future

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc) -> None:
        pass


def _train_in_process(config: Config, resume: bool, position: int, threads: int) -> Path:
    torch.set_num_threads(threads)
    return train(config, resume=resume, bar_position=position)


def _measure_in_process(config: Config, lora: Path | None, prompt_sets: dict[str, list[str]], threads: int) -> dict:
    import diffusers
    import transformers

    from comfy_pec.encoders import load_encoder

    torch.set_num_threads(threads)
    # A measurement loads the model once per chunk: its loading bars would bury the evaluation's bar.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
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
#: prompts per measurement job: the toy sets' 30 + 6 prompts make six equal jobs per model, few enough to load the
#: model seldom and small enough that the last ones leave a core idle only briefly
CHUNK_PROMPTS = 6


def measurement_chunks(prompt_sets: dict[str, list[str]], size: int = CHUNK_PROMPTS) -> list[dict[str, list[str]]]:
    """``prompt_sets`` cut, in order, into jobs of at most ``size`` prompts of one set each: ``[{set: prompts}]``."""
    return [
        {name: prompts[i : i + size]} for name, prompts in prompt_sets.items() for i in range(0, len(prompts), size)
    ]


def merge_measurements(parts: list[dict[str, dict]], chunks: list[dict[str, list[str]]]) -> dict[str, dict]:
    """:func:`measure` of the whole prompt sets from its results on ``chunks`` (:func:`measurement_chunks`): the
    images in order, every mean (reward, per-prompt Vendi) weighted by its chunk's number of prompts."""
    pieces: dict[str, list[tuple[dict, int]]] = {}
    for part, chunk in zip(parts, chunks):
        for name, result in part.items():
            pieces.setdefault(name, []).append((result, len(chunk[name])))
    merged = {}
    for name, results in pieces.items():
        total = sum(n for _, n in results)
        merged[name] = {"images": torch.cat([r["images"] for r, _ in results])}
        merged[name].update(
            {key: sum(r[key] * n for r, n in results) / total for key in results[0][0] if key != "images"}
        )
    return merged


@torch.no_grad()
def write_demo_report(
    folder: Path, first: Config, runs: dict[str, Path], prompt_sets: dict[str, list[str]], results: dict[str, dict]
) -> Path:
    """The side-by-side report of finished runs ``{label: run_dir}`` (trained with configs like ``first``) in
    ``folder``, from the measurements ``{model: {set: measure's result}}`` of the base model and each run."""
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

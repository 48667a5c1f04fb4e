"""Compare evaluations side by side: the paper's Table-1 layout and its plots (paper §5.2, docs/design.md §7).

Input: eval directories written by :func:`trainer.evaluation.run_eval` (``metrics.json`` inside). A
directory that holds eval directories one level down (a ``pec eval --out`` folder, or a training run's
``eval/`` folder) stands for all of them, in name order. Published or external results join them as
rows of a CSV file (:func:`load_rows`; ``docs/paper_table1.csv`` holds the paper's Table 1).

Overall score (:func:`overall_table`): within one comparison table every metric column is min-max
normalised across the compared methods (1 = best; lower-is-better columns flipped), the quality
columns and the diversity columns are averaged separately (Norm.Avg quality / diversity), and Overall
is the mean of the two averages. A column with the same value for every method ranks no one and
normalises to 0.5. This reproduces every Norm.Avg and Overall entry of the paper's Tables 1 and 2 from
their raw columns (tests/test_compare.py).

Outputs (:func:`run_compare`): ``table.md`` and ``table.csv``; ``tradeoff.png`` (quality vs diversity
Norm.Avg, one labelled point per method); ``grids.png`` (the first prompts × seeds of every method, side
by side); ``similarity.png`` (per method, the cosine-similarity matrix of one prompt's samples).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from comfy_pec import PECError

from .grids import image_grid

NORM_QUALITY, NORM_DIVERSITY, OVERALL = "norm_avg_quality", "norm_avg_diversity", "overall"
TITLE_HEIGHT = 16

PathLike = str | Path


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def find_eval_dirs(run: PathLike) -> list[Path]:
    """``run`` itself when it holds ``metrics.json``; else the eval directories in its ``eval/`` folder or
    in itself, models without LoRA first, then by name."""
    run = Path(run)
    if (run / "metrics.json").is_file():
        return [run]
    parent = run / "eval" if (run / "eval").is_dir() else run
    found = [d for d in parent.glob("*") if (d / "metrics.json").is_file()] if parent.is_dir() else []
    if not found:
        raise PECError(f"{run}: no metrics.json here or one level down; run `pec eval` first")
    return sorted(found, key=lambda d: (bool(load_metrics(d).get("identity", {}).get("loras")), d.name))


def load_metrics(run_dir: PathLike) -> dict:
    """The ``metrics.json`` of one eval directory (see :mod:`trainer.evaluation`)."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise PECError(f"{run_dir}: no metrics.json; not an eval directory (run `pec eval`)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise PECError(f"{path}: not readable JSON ({err})") from None


#: derived columns a rows file may carry as published values; they are recomputed, never averaged.
DERIVED = (NORM_QUALITY, NORM_DIVERSITY, OVERALL)
#: name prefixes of diversity columns (as `pec eval` names them); every other metric column is quality.
DIVERSITY_PREFIXES = ("vendi/", "variance/")


def load_rows(path: PathLike) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Rows of published or external results: a ``method`` column, then metric columns (numbers).

    Other text columns (e.g. the paper's feature ``space``) are appended to the method name in brackets
    unless empty or ``-``. Columns named like :data:`DERIVED` are the published Norm.Avg / Overall.
    Returns ``(rows, published)``: rows ``{"method": name, column: value}`` and ``{name: {derived: value}}``.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            table = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise PECError(f"--rows {path}: cannot read it as CSV ({err})") from None
    if not table or "method" not in table[0]:
        raise PECError(f"--rows {path}: needs a header with a 'method' column and at least one row")

    def number(text: str) -> float | None:
        try:
            return float(text)
        except (TypeError, ValueError):
            return None

    columns = [c for c in table[0] if c != "method"]
    numeric = [c for c in columns if all(number(r[c]) is not None for r in table)]
    labels = [c for c in columns if c not in numeric]
    rows, published = [], {}
    for line, record in enumerate(table, start=2):
        tags = [record[c].strip() for c in labels if record[c] and record[c].strip() not in ("", "-")]
        name = record["method"].strip() + (f" [{', '.join(tags)}]" if tags else "")
        if not record["method"].strip():
            raise PECError(f"--rows {path}:{line}: empty method name")
        rows.append({"method": name, **{c: number(record[c]) for c in numeric if c not in DERIVED}})
        published[name] = {c: number(record[c]) for c in numeric if c in DERIVED}
    if len({r["method"] for r in rows}) != len(rows):
        raise PECError(f"--rows {path}: method names (with their labels) repeat; make each row's name unique")
    return rows, published


def common_columns(metrics: Sequence[dict], group: str) -> list[str]:
    """The ``group`` ("quality", "diversity", "extra") columns every run has, in the first run's order."""
    return [c for c in metrics[0].get(group, []) if all(c in m.get("mean", {}) for m in metrics)]


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------


def overall_table(
    rows: Sequence[Mapping[str, float]],
    quality_cols: Sequence[str],
    diversity_cols: Sequence[str],
    higher_is_better: Mapping[str, bool] | None = None,
) -> list[dict]:
    """Add the paper's Norm.Avg (quality), Norm.Avg (diversity) and Overall to each row (docs/design.md §7).

    Args:
        rows: one mapping per compared method, column → raw value (other keys pass through).
        quality_cols / diversity_cols: the columns averaged into each Norm.Avg.
        higher_is_better: per column (default True for every column).
    Returns:
        copies of ``rows`` with :data:`NORM_QUALITY`, :data:`NORM_DIVERSITY` and :data:`OVERALL` added.
    """
    if not rows:
        raise PECError("no rows to compare")
    if not quality_cols or not diversity_cols:
        raise PECError("the overall score needs at least one quality and one diversity column")
    better = dict(higher_is_better or {})
    normalised: dict[str, list[float]] = {}
    for col in [*quality_cols, *diversity_cols]:
        try:
            values = [float(row[col]) for row in rows]
        except KeyError:
            raise PECError(f"column {col!r} is missing from a compared row") from None
        if any(math.isnan(v) for v in values):
            raise PECError(f"column {col!r} has a NaN value; cannot rank it")
        lo, hi = min(values), max(values)
        if hi == lo:
            normalised[col] = [0.5] * len(values)
        else:
            scaled = [(v - lo) / (hi - lo) for v in values]
            normalised[col] = scaled if better.get(col, True) else [1.0 - s for s in scaled]
    out = []
    for i, row in enumerate(rows):
        quality = sum(normalised[c][i] for c in quality_cols) / len(quality_cols)
        diversity = sum(normalised[c][i] for c in diversity_cols) / len(diversity_cols)
        out.append({**row, NORM_QUALITY: quality, NORM_DIVERSITY: diversity, OVERALL: (quality + diversity) / 2})
    return out


def reproduction_gap(table: Sequence[dict], published: Mapping[str, Mapping[str, float]]):
    """(largest |recomputed - published| over rows and derived columns, those columns) or None."""
    pairs = [(row[c], value) for row in table for c, value in published.get(row["method"], {}).items()]
    if not pairs:
        return None
    columns = sorted({c for values in published.values() for c in values}, key=DERIVED.index)
    return max(abs(ours - theirs) for ours, theirs in pairs), columns


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def table_markdown(
    rows: Sequence[dict],
    quality_cols: Sequence[str],
    diversity_cols: Sequence[str],
    higher_is_better: Mapping[str, bool] | None = None,
) -> str:
    """Table-1 layout: method | quality… | Norm.Avg (Q) | diversity… | Norm.Avg (D) | Overall; best in bold."""
    better = dict(higher_is_better or {})
    cols = [*quality_cols, NORM_QUALITY, *diversity_cols, NORM_DIVERSITY, OVERALL]
    heads = {NORM_QUALITY: "Norm.Avg (Q)", NORM_DIVERSITY: "Norm.Avg (D)", OVERALL: "Overall"}

    def show(c: str, value: float) -> str:
        return f"{value:.3f}" if c in heads else _fmt(value)

    best = {}
    for c in cols:
        values = [row[c] for row in rows]
        best[c] = show(c, max(values) if better.get(c, True) else min(values))
    lines = ["| method | " + " | ".join(heads.get(c, c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in rows:
        # bold what prints as the best value (ties at the printed precision included)
        cells = [
            f"**{show(c, row[c])}**" if show(c, row[c]) == best[c] and len(rows) > 1 else show(c, row[c]) for c in cols
        ]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], columns: Sequence[str], path: PathLike) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", *columns])
        for row in rows:
            writer.writerow([row["method"], *(f"{row[c]:.6g}" for c in columns)])


# ---------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(rows: Sequence[dict], path: PathLike) -> None:
    """Quality vs diversity (both Norm.Avg), a labelled point per method, faint iso-Overall lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for level in (0.25, 0.5, 0.75):
        ax.plot([0, 2 * level], [2 * level, 0], color="0.85", lw=0.8, zorder=0)
        ax.text(level + 0.01, level + 0.01, f"overall {level}", color="0.6", fontsize=7, rotation=-45)
    points: list[tuple[float, float, list[str]]] = []  # methods at (nearly) the same point share one label
    for row in rows:
        x, y = row[NORM_DIVERSITY], row[NORM_QUALITY]
        ax.scatter(x, y, s=36)
        near = next((p for p in points if abs(p[0] - x) < 0.02 and abs(p[1] - y) < 0.02), None)
        if near is None:
            points.append((x, y, [row["method"]]))
        else:
            near[2].append(row["method"])
    for x, y, names in points:
        below = len(names) > 1  # a stacked label hangs below its point, clear of its neighbours' labels
        ax.annotate(
            "\n".join(names),
            (x, y),
            textcoords="offset points",
            xytext=(5, -6 if below else 4),
            va="top" if below else "baseline",
            fontsize=8,
        )
    ax.set(
        xlim=(-0.05, 1.1),
        ylim=(-0.05, 1.1),
        xlabel="diversity (Norm.Avg)",
        ylabel="quality (Norm.Avg)",
        title="quality vs diversity",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _tile(images: torch.Tensor, size: int) -> tuple[torch.Tensor, int]:
    """Images resized for a grid of ``size``-px tiles: (images, integer upscale for :func:`image_grid`)."""
    side = images.shape[-1]
    if side >= size:
        return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False), 1
    return images, max(1, size // side)  # small images: nearest-neighbour upscale keeps them crisp


def plot_grids(
    eval_dirs: Sequence[Path],
    names: Sequence[str],
    path: PathLike,
    *,
    prompts: int = 4,
    seeds: int = 4,
    tile: int = 128,
) -> None:
    """The first ``prompts`` prompts × ``seeds`` seeds of every eval directory, side by side, one title each."""
    from .evaluation import image_name, load_images, read_manifest

    panels = []
    for eval_dir, name in zip(eval_dirs, names):
        manifest = read_manifest(eval_dir)
        rows, cols = manifest["prompts"][:prompts], manifest["seeds"][:seeds]
        images = load_images([eval_dir / "images" / image_name(i, s) for i in range(len(rows)) for s in cols])
        images, upscale = _tile(images, tile)
        grid = image_grid(images, ncols=len(cols), row_labels=rows, upscale=upscale)
        panel = Image.new("RGB", (grid.width, grid.height + TITLE_HEIGHT), "white")
        ImageDraw.Draw(panel).text((4, 2), name, fill="black", font=ImageFont.load_default())
        panel.paste(grid, (0, TITLE_HEIGHT))
        panels.append(panel)
    gap = 12
    out = Image.new(
        "RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), max(p.height for p in panels)), "white"
    )
    left = 0
    for panel in panels:
        out.paste(panel, (left, 0))
        left += panel.width + gap
    out.save(path)


def plot_similarity(
    eval_dirs: Sequence[Path], names: Sequence[str], path: PathLike, *, encoder: str | None = None, prompt_idx: int = 0
) -> None:
    """Per method, the cosine-similarity matrix ``[N, N]`` of one prompt's samples in an encoder space
    (default: the alphabetically first one in ``features.safetensors``), on one colour scale."""
    from safetensors.torch import load_file

    from .evaluation import read_manifest

    mats = []
    for eval_dir in eval_dirs:
        file = eval_dir / "features.safetensors"
        if not file.is_file():
            raise PECError(f"{eval_dir}: no features.safetensors (the eval measured no encoder)")
        feats = load_file(str(file))
        key = encoder or sorted(feats)[0]
        if key not in feats:
            raise PECError(f"{eval_dir}: no features for encoder {key!r} (has {', '.join(sorted(feats))})")
        if not 0 <= prompt_idx < feats[key].shape[0]:
            raise PECError(f"prompt index {prompt_idx} out of range: {eval_dir} has {feats[key].shape[0]} prompts")
        x = F.normalize(feats[key][prompt_idx].float(), dim=-1)
        mats.append(x @ x.T)
    prompt = read_manifest(eval_dirs[0])["prompts"][prompt_idx]
    lo = min(float(m.min()) for m in mats)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(mats), figsize=(3.2 * len(mats) + 0.8, 3.4), squeeze=False)
    for ax, mat, name in zip(axes[0], mats, names):
        image = ax.imshow(mat.numpy(), vmin=lo, vmax=1.0, cmap="viridis")
        n = mat.shape[0]
        off = (float(mat.sum()) - float(mat.diagonal().sum())) / max(n * (n - 1), 1)
        ax.set_title(f"{name}\nmean off-diagonal cos {off:.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="cosine similarity", format="%.2f")
    fig.suptitle(f"{key} features, prompt {prompt_idx}: {prompt!r}", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------


def run_compare(
    runs: Sequence[PathLike],
    out_dir: PathLike,
    *,
    rows_files: Sequence[PathLike] = (),
    names: Sequence[str] | None = None,
    quality: Sequence[str] | None = None,
    diversity: Sequence[str] | None = None,
    grid_prompts: int = 4,
    grid_seeds: int = 4,
    encoder: str | None = None,
    prompt_idx: int = 0,
) -> dict[str, Path]:
    """Table (Markdown + CSV) and plots for the eval directories found in ``runs`` and the rows of ``rows_files``.

    ``names`` (eval directories only) default to each eval's label (``embedded+pec``); ``quality`` /
    ``diversity`` default to the columns every eval has (its reward means; its Vendi and raw-variance
    columns) and every rows file has too; rows files alone split their metric columns by
    :data:`DIVERSITY_PREFIXES`. Returns ``{"markdown", "csv", "tradeoff", "grids", "similarity"}`` →
    written paths (grids and similarity need eval directories).
    """
    eval_dirs = [d for run in runs for d in find_eval_dirs(run)]
    metrics = [load_metrics(d) for d in eval_dirs]
    external, published = [], {}
    for file in rows_files:
        more, values = load_rows(file)
        external += more
        published.update(values)
    if not eval_dirs and not external:
        raise PECError("nothing to compare: name eval directories and/or --rows FILE.csv")
    names = list(names) if names else [m.get("label", d.name) for m, d in zip(metrics, eval_dirs)]
    if len(names) != len(eval_dirs):
        raise PECError(f"{len(names)} names for {len(eval_dirs)} eval directories ({', '.join(map(str, eval_dirs))})")
    if len(set(names)) != len(names):
        names = [d.name for d in eval_dirs]  # labels collide (same LoRA stem): the unique directory names
    if metrics:
        quality = list(quality or common_columns(metrics, "quality"))
        diversity = list(diversity or common_columns(metrics, "diversity"))
    else:
        metric_cols = [c for c in external[0] if c != "method"]
        quality = list(quality or [c for c in metric_cols if not c.startswith(DIVERSITY_PREFIXES)])
        diversity = list(diversity or [c for c in metric_cols if c.startswith(DIVERSITY_PREFIXES)])
    if external:  # only the columns every external row has too
        quality, diversity = ([c for c in cols if all(c in r for r in external)] for cols in (quality, diversity))
    if not quality or not diversity:
        group = "quality (reward)" if not quality else "diversity (encoder)"
        raise PECError(
            f"the evals and rows share no {group} metric; re-run `pec eval` with --rewards / --encoders "
            "(images are reused), name the columns with --quality / --diversity, or name the rows file's "
            "columns as `pec eval` does (reward names; vendi/ENCODER, variance/ENCODER)"
        )
    extra = [c for c in common_columns(metrics, "extra") if c not in quality + diversity] if metrics else []
    rows = []
    for name, m in zip(names, metrics):
        missing = [c for c in quality + diversity if c not in m["mean"]]
        if missing:
            raise PECError(f"{name}: no metric {', '.join(missing)} (has {', '.join(m['mean'])})")
        rows.append({"method": name, **m["mean"]})
    if {r["method"] for r in rows} & {r["method"] for r in external}:
        raise PECError("an eval directory and a --rows row have the same method name; rename one (--names)")
    rows += external
    table = overall_table(rows, quality, diversity)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes = [
        f"Quality (averaged): {', '.join(quality)}. Diversity (averaged): {', '.join(diversity)}.",
        "Norm.Avg: min-max normalised across the methods of this table, then averaged; "
        "Overall = mean of the two Norm.Avg.",
    ]
    if extra:
        notes.append(f"Also in table.csv (not averaged): {', '.join(extra)}.")
    if len({json.dumps([m["identity"]["sampler"], m["num_prompts"], m["samples_per_prompt"]]) for m in metrics}) > 1:
        notes.append("Warning: the evals differ in sampler settings, prompt count or samples per prompt.")
    gap = reproduction_gap(table, published)
    if gap is not None:
        notes.append(
            f"Rows with published {', '.join(gap[1])}: recomputed here within {gap[0]:.4f} of the published values "
            "(adding methods outside their ranges renormalises them)."
        )
    sizes = ", ".join(f"{n}: {m['num_prompts']} prompts x {m['samples_per_prompt']}" for n, m in zip(names, metrics))
    sources = [f"Evaluations: {sizes}."] if metrics else []
    if external:
        sources.append(f"Rows from {', '.join(map(str, rows_files))}: {', '.join(r['method'] for r in external)}.")
    text = "\n".join(
        [
            "# Quality–diversity comparison",
            "",
            *sources,
            "",
            table_markdown(table, quality, diversity),
            "",
            *notes,
        ]
    )
    paths = {
        "markdown": out / "table.md",
        "csv": out / "table.csv",
        "tradeoff": out / "tradeoff.png",
        "grids": out / "grids.png",
        "similarity": out / "similarity.png",
    }
    paths["markdown"].write_text(text + "\n", encoding="utf-8")
    write_csv(table, [*quality, *diversity, *extra, NORM_QUALITY, NORM_DIVERSITY, OVERALL], paths["csv"])
    plot_tradeoff(table, paths["tradeoff"])
    if eval_dirs:
        plot_grids(eval_dirs, names, paths["grids"], prompts=grid_prompts, seeds=grid_seeds)
    else:
        del paths["grids"]
    if any((d / "features.safetensors").is_file() for d in eval_dirs):
        plot_similarity(eval_dirs, names, paths["similarity"], encoder=encoder, prompt_idx=prompt_idx)
    else:
        del paths["similarity"]
    return paths

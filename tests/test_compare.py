"""`pec compare`: the paper's Overall score reproduced from its own tables, and the outputs of a comparison.

Fixtures ``data/pec_table1.csv`` (Table 1, FLUX.dev on HPD, 18 rows) and ``data/pec_table2.csv``
(Table 2, against other models, 12 rows) are typed from ../shared/seeds/pec-paper.txt. The text copy
lost the β values in the PEC/PCVAE method names (rows are numbered #1/#2 in table order) and four
headers of the diversity block: after "DINO | CLIP" (the raw feature variances, ~100 and ~1) come four
Vendi columns, named here in the order the paper's §5.1 lists the spaces (CLIP, DINO, ImageReward,
PickScore). Their order does not change the averages; that all six diversity columns enter Norm.Avg
(diversity) is what reproducing the paper's numbers shows (dropping any one of them breaks it).
"""

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from comfy_pec import PECError
from trainer.compare import NORM_DIVERSITY, NORM_QUALITY, OVERALL, find_eval_dirs, overall_table, run_compare

DATA = Path(__file__).parent / "data"
QUALITY = ["pickscore", "aesthetic_v25", "imagereward", "clip", "hpsv21", "unifiedreward"]
DIVERSITY = ["variance_dino", "variance_clip", "vendi_clip", "vendi_dino", "vendi_imagereward", "vendi_pickscore"]
PAPER = {NORM_QUALITY: "norm_avg_quality", NORM_DIVERSITY: "norm_avg_diversity", OVERALL: "overall"}


def _read(name: str) -> list[dict]:
    with open(DATA / name, newline="") as handle:
        return [
            {k: (v if k in ("method", "space", "type") else float(v)) for k, v in row.items()}
            for row in csv.DictReader(handle)
        ]


def _max_errors(rows: list[dict], diversity=DIVERSITY) -> dict[str, float]:
    table = overall_table([{c: r[c] for c in QUALITY + DIVERSITY} for r in rows], QUALITY, diversity)
    return {ours: max(abs(t[ours] - r[paper]) for t, r in zip(table, rows)) for ours, paper in PAPER.items()}


@pytest.mark.parametrize("name, rows", [("pec_table1.csv", 18), ("pec_table2.csv", 12)])
def test_overall_reproduces_the_paper_tables(name, rows):
    """Table 1 reproduces to 5e-4 (the paper's rounding). Table 2 to 4.4e-3: some of its raw Vendi
    columns are printed with 3 significant digits (13.7, 32.4, 10.1), which moves SD-3.5-M's diversity
    average by that much; still within the issue's ±0.005 for every row."""
    table = _read(name)
    assert len(table) == rows
    errors = _max_errors(table)
    bound = 1e-3 if name == "pec_table1.csv" else 5e-3
    assert max(errors.values()) <= bound, errors


def test_each_table_normalises_on_its_own():
    """Flux Dev has the lowest quality in Table 1 (Norm.Avg 0) but not among Table 2's models (0.215)."""
    t1 = overall_table(_read("pec_table1.csv"), QUALITY, DIVERSITY)
    t2 = overall_table(_read("pec_table2.csv"), QUALITY, DIVERSITY)
    assert t1[0][NORM_QUALITY] == 0.0
    assert next(r for r in t2 if r["method"].startswith("Flux Dev"))[NORM_QUALITY] == pytest.approx(0.215, abs=5e-4)


@pytest.mark.parametrize("dropped", DIVERSITY)
def test_every_diversity_column_enters_the_average(dropped):
    errors = _max_errors(_read("pec_table1.csv"), [c for c in DIVERSITY if c != dropped])
    assert errors[NORM_DIVERSITY] > 0.01


def test_direction_constant_columns_and_missing_values():
    rows = [{"q": 1.0, "fid": 10.0, "d": 3.0}, {"q": 3.0, "fid": 30.0, "d": 3.0}]
    low, high = overall_table(rows, ["q", "fid"], ["d"], higher_is_better={"fid": False})
    assert (low[NORM_QUALITY], high[NORM_QUALITY]) == (0.5, 0.5)  # q and fid disagree
    assert low[NORM_DIVERSITY] == high[NORM_DIVERSITY] == 0.5  # a constant column ranks no one
    assert high[OVERALL] == 0.5 and high["fid"] == 30.0  # raw values pass through
    with pytest.raises(PECError, match="missing"):
        overall_table(rows, ["q", "nope"], ["d"])
    with pytest.raises(PECError, match="NaN"):
        overall_table([{"q": float("nan"), "d": 1.0}], ["q"], ["d"])


def _fake_eval(root: Path, name: str, quality: float, spread: float) -> Path:
    """A minimal eval directory as `pec eval` writes it: 2 prompts × 3 seeds of 16-px images."""
    d = root / name
    (d / "images").mkdir(parents=True)
    prompts, seeds = ["a red circle", "a blue square"], [7, 8, 9]
    gen = torch.Generator().manual_seed(len(name))
    for i in range(2):
        for s in seeds:
            pixels = (torch.rand(16, 16, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(d / "images" / f"p{i:04d}_s{s}.png")
    (d / "manifest.json").write_text(json.dumps({"prompts": prompts, "seeds": seeds, "images": {}}))
    save_file({"toy": torch.randn(2, 3, 8, generator=gen) * spread + 1.0}, str(d / "features.safetensors"))
    mean = {"reward": quality, "vendi/toy": 1 + spread, "variance/toy": spread, "variance_norm/toy": spread / 2}
    (d / "metrics.json").write_text(
        json.dumps(
            {
                "label": name.split("-")[0],
                "identity": {"sampler": {"sde": "ode"}},
                "num_prompts": 2,
                "samples_per_prompt": 3,
                "quality": ["reward"],
                "diversity": ["vendi/toy", "variance/toy"],
                "extra": ["variance_norm/toy"],
                "mean": mean,
            }
        )
    )
    return d


def test_compare_writes_table_and_plots(tmp_path):
    evals = tmp_path / "evals"
    base = _fake_eval(evals, "base-1111", quality=0.2, spread=1.0)
    _fake_eval(evals, "grpo-2222", quality=0.8, spread=0.1)
    assert find_eval_dirs(base) == [base] and len(find_eval_dirs(evals)) == 2
    paths = run_compare([evals], tmp_path / "cmp", names=["Base", "Flow-GRPO"])
    assert set(paths) == {"markdown", "csv", "tradeoff", "grids", "similarity"}
    assert all(p.stat().st_size > 0 for p in paths.values())
    md = paths["markdown"].read_text()
    assert "| method | reward | Norm.Avg (Q) | vendi/toy | variance/toy | Norm.Avg (D) | Overall |" in md
    assert "| Base | 0.2 | 0.000 | **2** | **1** | **1.000** | **0.500** |" in md
    with open(paths["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == ["Base", "Flow-GRPO"] and "variance_norm/toy" in rows[0]
    assert float(rows[1][OVERALL]) == 0.5
    grid = Image.open(paths["grids"])
    assert grid.width > 2 * 3 * 16 * 8  # two panels of 3 seeds, 16-px tiles enlarged to 128 px


def test_compare_input_errors(tmp_path):
    with pytest.raises(PECError, match="no metrics.json"):
        find_eval_dirs(tmp_path)
    _fake_eval(tmp_path, "a-1", 0.1, 1.0)
    with pytest.raises(PECError, match="1 names for 2"):
        run_compare([tmp_path / "a-1", tmp_path / "a-1"], tmp_path / "out", names=["x"])


ROWS = Path(__file__).resolve().parent.parent / "docs" / "paper_table1.csv"


def _published_overall(table_csv: Path) -> dict[str, float]:
    with open(table_csv, newline="") as handle:
        return {r["method"]: float(r[OVERALL]) for r in csv.DictReader(handle)}


def test_rows_file_reproduces_the_papers_overall(tmp_path):
    from trainer.compare import load_rows

    rows, published = load_rows(ROWS)
    assert len(rows) == 18 and rows[4]["method"] == "Entropy Reg. [VAE]" and OVERALL not in rows[0]
    paths = run_compare([], tmp_path / "cmp", rows_files=[ROWS])
    assert set(paths) == {"markdown", "csv", "tradeoff"}  # no images behind published rows
    ours = _published_overall(paths["csv"])
    errors = [abs(ours[name] - values[OVERALL]) for name, values in published.items()]
    assert max(errors) <= 0.005 and max(errors) <= 6e-4
    assert "within 0.0005 of the published values" in paths["markdown"].read_text()


def test_rows_mixed_with_eval_directories(tmp_path):
    """An eval inside the published ranges leaves the paper's rows' Overall where the paper has it."""
    from trainer.compare import load_rows

    rows, published = load_rows(ROWS)
    quality = ["pickscore", "aesthetic", "imagereward", "clip_score", "hpsv21", "unifiedreward"]
    diversity = [c for c in rows[0] if c.startswith(("vendi/", "variance/"))]
    eval_dir = _fake_eval(tmp_path / "evals", "mine-1234", quality=0.0, spread=1.0)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    mean = {c: (min(r[c] for r in rows) + max(r[c] for r in rows)) / 2 for c in quality + diversity}
    metrics.update(quality=quality, diversity=diversity, extra=[], mean=mean)
    (eval_dir / "metrics.json").write_text(json.dumps(metrics))
    paths = run_compare([eval_dir], tmp_path / "cmp", rows_files=[ROWS], names=["my run"])
    ours = _published_overall(paths["csv"])
    assert len(ours) == 19 and ours["my run"] == pytest.approx(0.5)  # the midpoint of every column
    assert max(abs(ours[n] - v[OVERALL]) for n, v in published.items()) <= 0.005
    assert "grids" in paths  # the eval directory's images still make the grid
    # the CLI: `pec compare RUN --rows FILE.csv`
    from trainer import cli

    assert (
        cli.main(["compare", str(eval_dir), "--rows", str(ROWS), "--names", "my run", "--out", str(tmp_path / "c2")])
        == 0
    )
    assert _published_overall(tmp_path / "c2" / "table.csv") == pytest.approx(ours)


def test_rows_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("name,score\nx,1\n")
    with pytest.raises(PECError, match="'method' column"):
        run_compare([], tmp_path / "out", rows_files=[bad])
    twice = tmp_path / "twice.csv"
    twice.write_text("method,pickscore,vendi/clip\nA,1,2\nA,2,3\n")
    with pytest.raises(PECError, match="names .*repeat"):
        run_compare([], tmp_path / "out", rows_files=[twice])
    with pytest.raises(PECError, match="nothing to compare"):
        run_compare([], tmp_path / "out")
    _fake_eval(tmp_path / "evals", "a-1", 0.1, 1.0)
    with pytest.raises(PECError, match="share no quality"):  # the toy eval's columns are not the paper's
        run_compare([tmp_path / "evals"], tmp_path / "out", rows_files=[ROWS])

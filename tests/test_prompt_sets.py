"""Built-in prompt sets for real models and the prompt loaders (text, table columns, hub dataset files)."""

import json

import pytest

from comfy_pec import PECError
from trainer.prompts import PRESETS, SET_DIR, parse_hub_spec, resolve_prompts

CATEGORIES = ["people", "animals", "objects", "scenes", "styles", "text rendering", "counting", "composition"]


def _sections(name: str) -> dict[str, list[str]]:
    sections, current = {}, None
    for line in (SET_DIR / f"{name}.txt").read_text().splitlines():
        if line.startswith("# ") and line[2:] in CATEGORIES:
            current = sections.setdefault(line[2:], [])
        elif line.strip() and not line.startswith("#"):
            current.append(line)
    return sections


def test_builtin_sets_are_large_disjoint_and_cover_every_category():
    train, heldout = resolve_prompts("pec-train"), resolve_prompts("pec-heldout")
    assert len(train) + len(heldout) >= 400 and len(heldout) >= 100
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    assert not set(train) & set(heldout)
    for name in ("pec-train", "pec-heldout"):
        sections = _sections(name)
        assert list(sections) == CATEGORIES and min(map(len, sections.values())) >= 12
    assert sum('"' in p for p in heldout) >= 10  # text rendering prompts quote the text to render


def test_table_columns(tmp_path):
    (tmp_path / "p.csv").write_text('id,caption\n1,"a cat, sleeping"\n2,\n3,a dog\n')
    assert resolve_prompts(f"{tmp_path / 'p.csv'}#caption") == ["a cat, sleeping", "a dog"]
    (tmp_path / "p.tsv").write_text("prompt\tx\na red fox\t1\n")
    assert resolve_prompts(str(tmp_path / "p.tsv")) == ["a red fox"]  # default column: prompt
    (tmp_path / "p.jsonl").write_text(json.dumps({"Prompt": "a boat"}) + "\n" + json.dumps({"Prompt": "a car"}) + "\n")
    assert resolve_prompts(f"{tmp_path / 'p.jsonl'}#Prompt") == ["a boat", "a car"]
    (tmp_path / "p.json").write_text(json.dumps(["one", "two"]))
    assert resolve_prompts(str(tmp_path / "p.json")) == ["one", "two"]
    with pytest.raises(PECError, match=r"no column 'prompt' .*columns: Prompt.*#COLUMN"):
        resolve_prompts(str(tmp_path / "p.jsonl"))


def test_hub_specs_and_the_offline_error():
    assert parse_hub_spec("hf:owner/name@v2/data/test.csv#Prompt") == ("owner/name", "v2", "data/test.csv", "Prompt")
    assert parse_hub_spec("hf:owner/name/prompts.txt") == ("owner/name", None, "prompts.txt", None)
    with pytest.raises(PECError, match="expected hf:OWNER/NAME"):
        resolve_prompts("hf:owner/file.csv")
    with pytest.raises(PECError, match="not in the local hub cache and cannot be fetched"):
        resolve_prompts("hf:pec-tests/no-such-dataset/prompts.csv#prompt")  # HF_HUB_OFFLINE=1 (conftest)


def test_hub_file_from_the_local_cache(tmp_path, monkeypatch):
    """A dataset file already in the hub cache loads offline through hf_hub_download."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "datasets--pec-tests--prompts"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit / "data"
    snapshot.mkdir(parents=True)
    (snapshot / "test.csv").write_text("Prompt,Category\na lighthouse,scenes\ntwo cats,counting\n")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_prompts("hf:pec-tests/prompts/data/test.csv#Prompt") == ["a lighthouse", "two cats"]


def test_presets_name_the_builtin_sets():
    from trainer.config import load_config

    for preset in ("sd35m-pickscore", "flux-dev-pickscore"):
        prompts = load_config(preset).prompts
        assert (prompts.train, prompts.eval) == ("pec-train", "pec-heldout") and prompts.train in PRESETS


def test_prompt_set_files_are_package_data():
    """An installed `pec` must find the sets: every file in trainer/prompt_sets matches a package-data glob."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = SET_DIR.parent.parent
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["trainer"]
    for file in SET_DIR.iterdir():
        relative = file.relative_to(SET_DIR.parent).as_posix()
        assert any(fnmatch.fnmatch(relative, g) for g in globs), relative

"""Prompt lists for training and evaluation: built-in sets, text/CSV/JSONL files, hub dataset files, lists.

A prompt spec is one of:

* a built-in set name (:data:`PRESETS`): ``pec-train`` / ``pec-heldout`` for real models (424 prompts
  written for this project over people, animals, objects, scenes, styles, text rendering, counting
  and composition; the two sets are disjoint), ``toy-*`` for the embedded tiny model;
* a local file: ``prompts.txt`` (one prompt per line, ``#`` comments), or a table with a column,
  ``prompts.csv#caption`` / ``.tsv`` / ``.jsonl`` / ``.json`` / ``.parquet`` (``#column`` may be left
  out when the table has a ``prompt`` column);
* a file of a dataset repository on the Hugging Face hub: ``hf:OWNER/NAME[@REVISION]/PATH/IN/REPO[#column]``,
  e.g. ``hf:nateraw/parti-prompts/data/train-00000-of-00001.parquet#Prompt``; fetched once into the hub
  cache by ``huggingface_hub.hf_hub_download`` (offline: from the cache only, else a clear error);
* an inline list of prompts.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

from comfy_pec import PECError

SET_DIR = Path(__file__).resolve().parent / "prompt_sets"
HUB_PREFIX = "hf:"
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
DEFAULT_COLUMN = "prompt"


def _toy(split: str, extended: bool) -> Callable[[], list[str]]:
    def build() -> list[str]:
        from trainer.world import scenes as world

        return world.train_prompts(extended) if split == "train" else world.heldout_prompts(extended)

    return build


def _shipped(name: str) -> Callable[[], list[str]]:
    return lambda: _read_text(SET_DIR / f"{name}.txt")


#: built-in prompt lists: the project's sets for real models and the embedded world's prompts.
PRESETS: dict[str, Callable[[], list[str]]] = {
    "pec-train": _shipped("pec-train"),
    "pec-heldout": _shipped("pec-heldout"),
    "toy-train": _toy("train", False),
    "toy-train-extended": _toy("train", True),
    "toy-heldout": _toy("heldout", False),
    "toy-heldout-extended": _toy("heldout", True),
}


def _read_text(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _records(path: Path) -> list[dict]:
    """The rows of a CSV/TSV/JSONL/JSON/Parquet table as dicts."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        # a list of strings is a prompt list; a list of objects a table
        return [{DEFAULT_COLUMN: d} if isinstance(d, str) else d for d in data] if isinstance(data, list) else []
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PECError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    return pq.read_table(path).to_pylist()


def read_table_column(path: Path, column: str | None, spec: str) -> list[str]:
    """Column ``column`` (default ``prompt``) of a table file, empty cells dropped."""
    try:
        rows = _records(path)
    except (ValueError, UnicodeDecodeError, csv.Error) as err:
        raise PECError(f"prompts {spec!r}: {path} is not a readable {path.suffix} table ({err})") from None
    if not rows or not isinstance(rows[0], dict):
        raise PECError(f"prompts {spec!r}: {path} holds no table rows")
    name = column or DEFAULT_COLUMN
    if name not in rows[0]:
        hint = "" if column else f"; name one with {spec}#COLUMN"
        raise PECError(f"prompts {spec!r}: no column {name!r} in {path} (columns: {', '.join(rows[0])}){hint}")
    return [str(row[name]).strip() for row in rows if row.get(name) is not None and str(row[name]).strip()]


def parse_hub_spec(spec: str) -> tuple[str, str | None, str, str | None]:
    """``hf:OWNER/NAME[@REV]/PATH[#COL]`` → (repo id, revision, file path in the repo, column)."""
    body, _, column = spec[len(HUB_PREFIX) :].partition("#")
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise PECError(f"prompts {spec!r}: expected hf:OWNER/NAME[@REVISION]/PATH/IN/REPO[#column]")
    name, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{name}", revision or None, "/".join(parts[2:]), column or None


def fetch_hub_file(spec: str) -> Path:
    """Download (or find in the hub cache) the dataset file a ``hf:`` spec names."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    repo, revision, filename, _ = parse_hub_spec(spec)
    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset", revision=revision))
    except LocalEntryNotFoundError:
        raise PECError(
            f"prompts {spec!r}: {filename} of dataset {repo} is not in the local hub cache and cannot be fetched "
            "(offline, HF_HUB_OFFLINE=1, or no network): run once online, or download the file and give its path"
        ) from None
    except EntryNotFoundError:
        raise PECError(f"prompts {spec!r}: dataset {repo} has no file {filename}") from None
    except HfHubHTTPError as err:
        reason = str(err).splitlines()[0]
        raise PECError(
            f"prompts {spec!r}: cannot fetch {filename} from dataset {repo} ({reason}); for a gated dataset accept "
            "its terms on the hub and log in (hf auth login or HF_TOKEN)"
        ) from None


def _split_column(spec: str) -> tuple[Path, str | None]:
    """``file.csv#col`` → (path, column); a ``#`` belongs to the column only after a table suffix."""
    head, sep, column = spec.rpartition("#")
    if sep and head.lower().endswith(TABLE_SUFFIXES):
        return Path(head), column or None
    return Path(spec), None


def _read_file(path: Path, column: str | None, spec: str) -> list[str]:
    if path.suffix.lower() in TABLE_SUFFIXES:
        return read_table_column(path, column, spec)
    if column is not None:
        raise PECError(f"prompts {spec!r}: a #column applies to {', '.join(TABLE_SUFFIXES)} files only")
    try:
        return _read_text(path)
    except (OSError, UnicodeDecodeError) as err:
        raise PECError(f"prompts {spec!r}: cannot read {path} as UTF-8 text ({err})") from None


def resolve_prompts(spec: str | list[str]) -> list[str]:
    """A prompt spec (see the module docstring) → list of prompts; an empty or unreadable one is a PECError."""
    if isinstance(spec, list):
        prompts = [p.strip() for p in spec if p and p.strip()]
    elif spec in PRESETS:
        prompts = PRESETS[spec]()
    elif spec.startswith(HUB_PREFIX):
        prompts = _read_file(fetch_hub_file(spec), parse_hub_spec(spec)[3], spec)
    else:
        path, column = _split_column(spec)
        if not path.is_file():
            raise PECError(
                f"prompts {spec!r}: not a built-in set ({', '.join(PRESETS)}), a hub file (hf:...) or an existing file"
            )
        prompts = _read_file(path, column, spec)
    if not prompts:
        raise PECError(f"prompts {spec!r}: the list is empty")
    return prompts

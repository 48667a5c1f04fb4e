"""Quality–diversity evaluation of a model with or without a LoRA (paper §5.1, docs/design.md §7).

``run_eval`` samples N images per prompt at fixed seeds and measures them. One *eval directory* holds
one (model, LoRA set, sampler settings) combination::

    <out>/<label>-<hash8>/
        manifest.json         identity (model fingerprint, LoRAs with sha256, sampler) + every image made
        images/p0003_s1007.png    prompt 3 drawn with seed 1007 (image j of a prompt: seed_base + j)
        features.safetensors  raw perceptual features per encoder, [P, N, D] float32
        metrics.json          per-prompt and mean metrics, and which are quality / diversity
        metrics.csv           the same, one row per prompt, then the mean row

Resumable: an image whose manifest entry matches (prompt, seed) and whose file exists is reused, so an
interrupted run continues and a longer prompt list or a larger N only samples what is new. Images go to
disk batch by batch, the manifest after each batch. Metrics are always computed from the saved PNGs, so
a resumed run and a fresh one give identical numbers.

Metrics per prompt (then averaged over prompts, the paper's protocol): each reward's mean (quality);
per encoder space the Vendi score (q = 1) and the feature variance ``tr(Cov)`` of the raw features
(diversity, the columns of the paper's Table 1) and the variance of the L2-normalised features (reported,
not averaged by ``pec compare``: it would count the same spread twice).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from comfy_pec import PECError
from comfy_pec.encoders import ENCODERS, load_encoder
from comfy_pec.kinds import STEP_KIND_NAMES

from .backends import EMBEDDED_MODEL, load_backend
from .grids import to_uint8
from .metrics import score_images
from .rewards import REWARDS
from .sampling import sample_images

MANIFEST_VERSION = 1
#: a local model directory up to this size is fingerprinted by content, a larger one by file stats.
CONTENT_HASH_LIMIT = 1 << 30
#: "auto" batch size: the CPU default, and the first size tried on CUDA (halved on out-of-memory).
AUTO_BATCH = {"cpu": 32, "cuda": 64}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Lora = tuple[str | Path, float]


@dataclass(frozen=True)
class SamplerSettings:
    """Everything besides the model, the LoRAs, the prompt and the seed that decides an image."""

    num_steps: int
    guidance_scale: float
    resolution: int
    sde: str  # "ode", "flow_sde" or "cps"
    noise_level: float  # 0 for the ODE
    dtype: str


# ---------------------------------------------------------------------------------------------------
# Identity and manifest
# ---------------------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(model: str | None) -> dict:
    """``{"source", "fingerprint"}`` of a model: a local directory by the sha256 of its files (by their
    names, sizes and mtimes above :data:`CONTENT_HASH_LIMIT`), a hub id by its name.

    Content hashing keeps a retrained embedded model from silently reusing its predecessor's images.
    """
    source = model or EMBEDDED_MODEL
    path = Path(source)
    if not path.is_dir():
        return {"source": source, "fingerprint": f"hub:{source}"}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    by_content = sum(p.stat().st_size for p in files) <= CONTENT_HASH_LIMIT
    for p in files:
        stat = p.stat()
        digest.update(str(p.relative_to(path)).encode())
        digest.update(file_sha256(p).encode() if by_content else f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    kind = "sha256" if by_content else "stat"
    return {"source": str(path.resolve()), "fingerprint": f"{kind}:{digest.hexdigest()}"}


def lora_label(path: str | Path) -> str:
    """A short name for a LoRA file: its stem, or its run directory's name for the trainer's ``lora.safetensors``."""
    path = Path(path)
    return path.parent.resolve().name if path.stem == "lora" else path.stem


def eval_identity(model: str | None, loras: Sequence[Lora], sampler: SamplerSettings) -> dict:
    """What makes two evaluations' images interchangeable (paths are recorded but not compared)."""
    return {
        "model": model_fingerprint(model),
        "loras": [
            {"file": str(Path(p).resolve()), "sha256": file_sha256(p), "scale": float(s), "label": lora_label(p)}
            for p, s in loras
        ],
        "sampler": asdict(sampler),
    }


def identity_hash(identity: dict) -> str:
    key = {
        "model": identity["model"]["fingerprint"],
        "loras": [(lo["sha256"], lo["scale"]) for lo in identity["loras"]],
        "sampler": identity["sampler"],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def default_eval_name(model: str | None, identity: dict) -> str:
    """``<model>[+<lora>...]-<hash8>``, e.g. ``embedded+pec-1a2b3c4d``."""
    base = "embedded" if model is None else Path(str(model).rstrip("/")).name
    parts = [base] + [lo["label"] + ("" if lo["scale"] == 1.0 else f"@{lo['scale']:g}") for lo in identity["loras"]]
    return "+".join(parts) + "-" + identity_hash(identity)[:8]


def image_name(prompt_idx: int, seed: int) -> str:
    return f"p{prompt_idx:04d}_s{seed}.png"


def _write_json(path: Path, data: dict) -> None:
    """Through a temporary file, so an interruption never leaves half a manifest."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(eval_dir: str | Path) -> dict | None:
    path = Path(eval_dir) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise PECError(f"{path}: not a readable manifest ({err}); delete it to start over") from None


# ---------------------------------------------------------------------------------------------------
# Sampling (resumable)
# ---------------------------------------------------------------------------------------------------


def _save_png(image: torch.Tensor, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    Image.fromarray(to_uint8(image[None])[0]).save(tmp)
    os.replace(tmp, path)


def load_images(files: Sequence[Path]) -> torch.Tensor:
    """PNG files → ``[B, 3, H, W]`` float32 in [0, 1]."""
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def _sample_missing(
    backend,
    manifest: dict,
    eval_dir: Path,
    missing: list[tuple[int, str, int]],
    sampler: SamplerSettings,
    batch_size: int | str,
    total: int,
    progress: bool,
) -> None:
    """Draw ``missing`` (prompt_idx, prompt, seed) images, saving PNGs and the manifest after each batch.

    ``batch_size="auto"``: :data:`AUTO_BATCH` for the device, halved on CUDA out-of-memory (safe: an
    image does not depend on its batch).
    """
    device = backend.device.type
    auto = batch_size == "auto"
    size = AUTO_BATCH.get(device, AUTO_BATCH["cpu"]) if auto else batch_size
    bar = tqdm(total=total, initial=total - len(missing), desc="sampling", unit="img", disable=not progress)
    pos = 0
    while pos < len(missing):
        chunk = missing[pos : pos + size]
        try:
            images = sample_images(
                backend,
                [p for _, p, _ in chunk],
                [s for _, _, s in chunk],
                num_steps=sampler.num_steps,
                guidance_scale=sampler.guidance_scale,
                resolution=sampler.resolution,
                sde=sampler.sde,
                noise_level=sampler.noise_level,
                batch_size=size,
                progress=False,
            )
        except torch.cuda.OutOfMemoryError:
            if not auto or size == 1:
                raise PECError(f"out of GPU memory at batch size {size}; pass a smaller --batch-size") from None
            size //= 2
            torch.cuda.empty_cache()
            bar.set_postfix(batch=size)
            continue
        for (idx, prompt, seed), image in zip(chunk, images):
            name = image_name(idx, seed)
            _save_png(image, eval_dir / "images" / name)
            manifest["images"][name] = {"prompt_idx": idx, "prompt": prompt, "seed": seed}
        _write_json(eval_dir / "manifest.json", manifest)
        pos += len(chunk)
        bar.update(len(chunk))
    bar.close()


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------


def parse_encoder_spec(spec: str) -> tuple[str, str | None]:
    """``"toy"`` or ``"toy=/path/weights.safetensors"`` → (name, path or None)."""
    name, _, path = spec.partition("=")
    return name.strip(), (path.strip() or None)


def default_metrics(model: str | None) -> tuple[list[str], list[str]]:
    """(rewards, encoders) measured when none are named: the toy ones on the embedded model, every
    registered non-toy one on any other model (the toy world's measures mean nothing on real images)."""
    toy = model is None or Path(model).resolve() == Path(EMBEDDED_MODEL).resolve()
    pick = (lambda n: n.startswith("toy")) if toy else (lambda n: not n.startswith("toy"))
    return [n for n in REWARDS if pick(n)], [n for n in ENCODERS if pick(n)]


def metric_names(rewards: Sequence[str], encoders: Sequence[str]) -> dict[str, list[str]]:
    """Column names: ``quality`` (reward means), ``diversity`` (Vendi and raw variance per encoder, the
    paper's Table-1 columns) and ``extra`` (normalised variance; reported, not averaged)."""
    names = [parse_encoder_spec(e)[0] for e in encoders]
    return {
        "quality": list(rewards),
        "diversity": [f"vendi/{n}" for n in names] + [f"variance/{n}" for n in names],
        "extra": [f"variance_norm/{n}" for n in names],
    }


def check_metrics(rewards: Sequence[str], encoders: Sequence[str]) -> None:
    """Unknown reward or encoder names are an error before any image is drawn."""
    if not rewards and not encoders:
        raise PECError("nothing to measure: give at least one reward or one encoder")
    for name in rewards:
        if name not in REWARDS:
            raise PECError(f"unknown reward {name!r}; available: {', '.join(sorted(REWARDS))}")
    for spec in encoders:
        if parse_encoder_spec(spec)[0] not in ENCODERS:
            raise PECError(f"unknown perceptual encoder {spec!r}; available: {', '.join(sorted(ENCODERS))}")


@torch.no_grad()
def measure(
    files: list[list[Path]],
    prompts: Sequence[str],
    rewards: Sequence[str],
    encoders: Sequence[str],
    *,
    device="cpu",
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-prompt metrics of saved images.

    Args:
        files: ``[P][N]`` PNG paths, N images of each of the P ``prompts``.
        rewards: names in :data:`trainer.rewards.REWARDS` (called on CPU images with their prompts).
        encoders: ``NAME[=PATH]`` of :func:`comfy_pec.encoders.load_encoder` (raw, un-normalised features).
    Returns:
        ``(metrics {name: [P]}, features {encoder: [P, N, D]})``, names as :func:`metric_names`.
    """
    check_metrics(rewards, encoders)
    reward_fns = {name: REWARDS[name]() for name in rewards}
    models = {}
    for spec in encoders:
        name, path = parse_encoder_spec(spec)
        models[name] = load_encoder(name, normalize=False, device=device, path=path)
    flat = [(i, f) for i, row in enumerate(files) for f in row]
    starts = range(0, len(flat), batch_size)
    batches = (
        (load_images([f for _, f in flat[s : s + batch_size]]), [prompts[i] for i, _ in flat[s : s + batch_size]])
        for s in tqdm(starts, desc="metrics", disable=not progress)
    )
    return score_images(batches, len(files), reward_fns, models, device)


def write_metrics(eval_dir: Path, summary: dict) -> None:
    """``metrics.json`` and ``metrics.csv`` (one row per prompt, then ``mean``)."""
    _write_json(eval_dir / "metrics.json", summary)
    cols = summary["quality"] + summary["diversity"] + summary["extra"]
    with open(eval_dir / "metrics.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt_idx", "prompt", *cols])
        for row in summary["per_prompt"]:
            writer.writerow([row["prompt_idx"], row["prompt"], *(f"{row[c]:.6g}" for c in cols)])
        writer.writerow(["mean", "", *(f"{summary['mean'][c]:.6g}" for c in cols)])


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------


def resolve_sampler(
    defaults: dict,
    *,
    sde: str,
    noise_level: float | None,
    num_steps: int | None,
    guidance: float | None,
    resolution: int | None,
    dtype: str,
) -> SamplerSettings:
    """Unset values from the model's ``defaults`` (as :func:`trainer.sampling.sample_images` would)."""
    if sde not in STEP_KIND_NAMES:
        raise PECError(f"unknown sampler {sde!r}; expected one of {', '.join(STEP_KIND_NAMES)}")
    level = 0.0 if sde == "ode" else float(defaults["noise_level"] if noise_level is None else noise_level)
    return SamplerSettings(
        num_steps=int(num_steps or defaults.get("eval_num_steps") or defaults["num_steps"]),
        guidance_scale=float(defaults["guidance_scale"] if guidance is None else guidance),
        resolution=int(resolution or defaults["resolution"]),
        sde=sde,
        noise_level=level,
        dtype=dtype,
    )


def run_eval(
    model: str | None,
    loras: Sequence[Lora],
    prompts: Sequence[str],
    per_prompt: int,
    out_dir: str | Path,
    *,
    name: str | None = None,
    family: str | None = None,
    seed_base: int = 1000,
    sde: str = "ode",
    noise_level: float | None = None,
    num_steps: int | None = None,
    guidance: float | None = None,
    resolution: int | None = None,
    batch_size: int | str = "auto",
    rewards: Sequence[str] = (),
    encoders: Sequence[str] = ("toy",),
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool = True,
) -> Path:
    """Evaluate ``model`` (None: the embedded tiny model) with the LoRA stack ``loras`` [(file, scale)].

    Image j of prompt i is drawn with seed ``seed_base + j`` (the same seeds for every prompt and every
    model, so methods are compared on paired noise). ``sde="ode"`` (default) samples deterministically;
    ``"flow_sde"`` / ``"cps"`` at ``noise_level`` (default: the model's). Unset steps / guidance /
    resolution are the model's eval defaults. The eval directory is ``out_dir/name`` (default
    :func:`default_eval_name`); an existing one is resumed when its identity matches and refused otherwise.

    Returns the eval directory (with ``manifest.json``, ``images/``, ``features.safetensors``,
    ``metrics.json``, ``metrics.csv``).
    """
    prompts = list(prompts)
    if not prompts:
        raise PECError("no prompts to evaluate")
    if per_prompt < 2:
        raise PECError(f"per_prompt must be >= 2 (diversity needs several samples per prompt), got {per_prompt}")
    if len(loras) > 1:
        # SD3Backend.load_lora activates only the adapter it loads; stacking needs backend support first.
        raise PECError(f"{len(loras)} LoRAs given; evaluating a stack of LoRAs is not supported yet (one per eval)")
    if dtype not in DTYPES:
        raise PECError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
        raise PECError(f"batch size must be a positive integer or 'auto', got {batch_size!r}")
    check_metrics(rewards, encoders)
    for path, _ in loras:
        if not Path(path).is_file():
            raise PECError(f"LoRA file not found: {path}")

    backend = load_backend(model, family=family, device=device, dtype=DTYPES[dtype])
    sampler = resolve_sampler(
        backend.defaults,
        sde=sde,
        noise_level=noise_level,
        num_steps=num_steps,
        guidance=guidance,
        resolution=resolution,
        dtype=dtype,
    )
    identity = eval_identity(model, loras, sampler)
    eval_dir = Path(out_dir) / (name or default_eval_name(model, identity))
    manifest = read_manifest(eval_dir)
    if manifest is not None and manifest.get("identity_hash") != identity_hash(identity):
        raise PECError(
            f"{eval_dir} holds an evaluation of another model, LoRA or sampler setting; "
            "choose another name or delete it"
        )
    seeds = [seed_base + j for j in range(per_prompt)]
    manifest = {
        "version": MANIFEST_VERSION,
        "name": eval_dir.name,
        "identity": identity,
        "identity_hash": identity_hash(identity),
        "prompts": prompts,
        "seeds": seeds,
        "images": (manifest or {}).get("images", {}),
    }
    (eval_dir / "images").mkdir(parents=True, exist_ok=True)
    _write_json(eval_dir / "manifest.json", manifest)

    def made(idx: int, prompt: str, seed: int) -> bool:
        entry = manifest["images"].get(image_name(idx, seed))
        same = bool(entry) and entry["prompt"] == prompt and entry["seed"] == seed
        return same and (eval_dir / "images" / image_name(idx, seed)).is_file()

    jobs = [(i, p, s) for i, p in enumerate(prompts) for s in seeds]
    missing = [job for job in jobs if not made(*job)]
    start = time.perf_counter()
    if missing:
        for path, scale in loras:
            backend.load_lora(str(path), scale=scale)
        _sample_missing(backend, manifest, eval_dir, missing, sampler, batch_size, len(jobs), progress)
    sampling_s = time.perf_counter() - start
    del backend  # free the generator before the reward models and encoders load
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    start = time.perf_counter()
    files = [[eval_dir / "images" / image_name(i, s) for s in seeds] for i in range(len(prompts))]
    metric_batch = AUTO_BATCH["cpu"] if batch_size == "auto" else batch_size
    metrics, features = measure(
        files, prompts, rewards, encoders, device=device, batch_size=metric_batch, progress=progress
    )
    features_file = eval_dir / "features.safetensors"
    if features:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in features.items()}, str(features_file))
    else:
        features_file.unlink(missing_ok=True)  # a stale one would not match these metrics
    cols = metric_names(rewards, encoders)
    summary = {
        "name": eval_dir.name,
        "label": eval_dir.name if name else eval_dir.name.rsplit("-", 1)[0],
        "identity": identity,
        "num_prompts": len(prompts),
        "samples_per_prompt": len(seeds),
        **cols,
        "mean": {k: float(v.mean()) for k, v in metrics.items()},
        "per_prompt": [
            {"prompt_idx": i, "prompt": p, **{k: float(v[i]) for k, v in metrics.items()}}
            for i, p in enumerate(prompts)
        ],
        "timing_s": {
            "sampling": round(sampling_s, 2),
            "metrics": round(time.perf_counter() - start, 2),
            "images_sampled": len(missing),
            "images_reused": len(jobs) - len(missing),
        },
    }
    write_metrics(eval_dir, summary)
    return eval_dir

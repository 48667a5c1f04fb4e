"""Checks before anything loads, and the dry-run plan (``pec train --dry-run``).

``pec train`` runs :func:`check_before_loading` first: everything that needs no weights — prompts
(resolved and counted, training set first), reward and encoder names, LoRA targets against the model
family's transformer (built on the meta device from its config: no weights), a writable run directory
and free disk for the checkpoints. Then :func:`locate` finds every model, reward and encoder the run
will load (local path, local hub cache, or the hub when it answers) and :func:`require_available`
stops with one line naming the first missing one and the fix. Only then does training load weights.

:func:`estimate` computes peak GPU memory and time per iteration from the configs (parameter counts
of meta-device modules, token counts, activation sizes) for every family, from the model's own configs when
they are on this machine, else from the published ones (:func:`published_spec`); :func:`format_plan` prints
all of it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from comfy_pec import PECError

from .config import Config

#: the published config (``random_init.SPECS`` / ``LLM_SPECS``) a plan falls back to when the model's own configs
#: are not on this machine: the family's, or the one :data:`PUBLISHED_BY_ID` names for a size of its own.
PUBLISHED_SPECS = {
    "sd3": "sd3.5-medium",
    "flux": "flux.1-dev",
    "zimage": "z-image-turbo",
    "qwenimage": "qwen-image",
    "flux2": "flux.2-dev",
    "flux2-klein": "flux.2-klein-4b",
}
PUBLISHED_BY_ID = {
    "black-forest-labs/FLUX.2-klein-9B": "flux.2-klein-9b",
    "black-forest-labs/FLUX.2-klein-base-9B": "flux.2-klein-9b",
}


@dataclasses.dataclass(frozen=True)
class TokenModel:
    """What the memory/FLOP model needs to know of a family beyond its configs (checked against each diffusers
    transformer's forward and pipeline). Every family here makes one token of 2×2 latent pixels: SD3 and Z-Image
    patchify inside the transformer, FLUX.1, FLUX.2 and Qwen-Image pack 2×2 before it."""

    transformer: str  # diffusers class
    extra_text: int = 0  # text tokens besides the max_sequence_length of the main encoder (SD3: CLIP's 77)
    text_trimmed: bool = False  # the forward sees the prompt's real tokens only (≤ max_sequence_length), not padding
    cfg_above: float | None = None  # guidance above which one forward carries both CFG branches; None: never
    pad_to: int = 1  # image and text token counts are each padded to a multiple of this


#: family -> its :class:`TokenModel`.
TOKEN_MODELS = {
    "sd3": TokenModel("SD3Transformer2DModel", extra_text=77, cfg_above=1.0),
    "flux": TokenModel("FluxTransformer2DModel"),  # distilled guidance embedding: one branch
    "zimage": TokenModel("ZImageTransformer2DModel", text_trimmed=True, cfg_above=0.0, pad_to=32),  # SEQ_MULTI_OF
    "qwenimage": TokenModel("QwenImageTransformer2DModel", text_trimmed=True, cfg_above=1.0),  # true CFG
    "flux2": TokenModel("Flux2Transformer2DModel"),  # distilled guidance embedding; text padded to its length
    "flux2-klein": TokenModel("Flux2Transformer2DModel", cfg_above=1.0),  # CFG on the base models only
}
#: bytes of one value per dtype name.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Korthikanti et al. 2022 (eq. 2) with memory-efficient attention: a transformer block keeps ≈ 34·L·d
#: bytes of 16-bit activations per sample for its backward pass (L tokens, width d).
BLOCK_ACTIVATION_BYTES = 34
#: a VAE decoder keeps about this many float32 maps of its full-resolution stage alive (128 channels published).
VAE_LIVE_MAPS = 4
#: throughput assumed for the time estimate: 40 % of an H100's dense bf16 peak (989 TFLOP/s).
ASSUMED_FLOPS = 0.4 * 989e12
#: the PickScore / CLIP-H tower's published config (yuvalkirstain/PickScore_v1), for plans without it cached.
CLIP_H_CONFIG = dict(
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    vision_config=dict(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14
    ),
    projection_dim=1024,
)


# --------------------------------------------------------------------------------------------------
# Checks that need no weights
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Checked:
    """What :func:`check_before_loading` resolved: prompt counts, the family, the transformer skeleton."""

    train_prompts: int
    eval_prompts: int
    family: str
    transformer: Any  # the transformer on the meta device (module names and parameter counts, no weights)
    transformer_config_from: str  # where its config came from
    lora_params: int
    checkpoint_bytes: int
    free_bytes: int


def _nearest_existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _model_dir(config: Config) -> Path | None:
    """The local diffusers directory the pipeline comes from (the model, its single-file base, or a
    cached hub snapshot), or None when there is none on this machine."""
    from .backends import EMBEDDED_MODEL
    from .backends.pipeline import is_single_file

    m = config.model
    source = m.path or EMBEDDED_MODEL
    if is_single_file(source):
        source = m.base
    if os.path.isdir(source):
        return Path(source)
    found = _cache_lookup(source, m.revision)
    return found.snapshot if found is not None else None


def model_family(config: Config) -> str:
    """``model.family``, else from the local (or cached) pipeline's model_index.json."""
    from comfy_pec.pretrained import is_local

    from .backends import FAMILIES, detect_family

    if config.model.family is not None:
        return config.model.family
    directory = _model_dir(config)
    source = config.model.base or config.model.path
    if directory is None and is_local(source):
        which = "model.base" if config.model.base else "model.path"
        raise PECError(f"{which} {source}: no such directory; point it at a diffusers pipeline directory")
    if directory is None:
        raise PECError(
            f"model.path {config.model.path!r}: set model.family (one of {', '.join(FAMILIES)}) for a hub id that is "
            "not in the local cache, or point model.path at a diffusers pipeline directory"
        )
    return detect_family(str(directory))


def published_spec(config: Config, family: str):
    """(name, spec) of the published config that stands in for the model's own: ``random_init.SPECS`` or
    ``LLM_SPECS``, by hub id (:data:`PUBLISHED_BY_ID`) or by family (:data:`PUBLISHED_SPECS`)."""
    from .backends.random_init import LLM_SPECS, SPECS

    source = config.model.base or config.model.path
    name = PUBLISHED_BY_ID.get(source, PUBLISHED_SPECS[family])
    return name, (SPECS | LLM_SPECS)[name]


def meta_transformer(config: Config, family: str) -> tuple[Any, str]:
    """The model's transformer on the meta device (no memory, no weights) and where its config came from: the
    local (or cached) model's config, else the published one (:func:`published_spec`)."""
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, TOKEN_MODELS[family].transformer)
    directory = _model_dir(config)
    if directory is not None and (directory / "transformer" / "config.json").is_file():
        settings, origin = cls.load_config(str(directory), subfolder="transformer"), f"{directory}/transformer"
    else:
        name, spec = published_spec(config, family)
        settings, origin = spec.transformer, f"the published {name} config (model config not on this machine)"
    with init_empty_weights(include_buffers=True):  # SD3's sin-cos table alone would be ~1 GB
        return cls.from_config(settings), origin


def lora_param_count(transformer, targets: list[str], rank: int) -> tuple[int, set[str]]:
    """(Σ over the LoRA's linear layers of r·(in + out), the targets that matched a linear layer); targets are
    matched as :func:`trainer.lora.target_regex` has PEFT match them."""
    import torch

    from .lora import target_matches

    total, matched = 0, set()
    for name, module in transformer.named_modules():
        hit = next((t for t in targets if target_matches(name, t)), None)
        if hit is not None and isinstance(module, torch.nn.Linear):
            total += rank * (module.in_features + module.out_features)
            matched.add(hit)
    return total, matched


def check_before_loading(config: Config) -> Checked:
    """Every check that needs no weights, cheapest first; a :class:`PECError` names the first failure."""
    from comfy_pec.encoders import ENCODERS

    from .prompts import resolve_prompts
    from .rewards import REWARDS

    # prompts: the training set first, resolved and counted
    counts = [len(resolve_prompts(config.prompts.train)), len(resolve_prompts(config.prompts.eval))]
    for term in config.rewards:
        if term.name not in REWARDS:
            raise PECError(f"rewards: unknown reward {term.name!r}; available: {', '.join(sorted(REWARDS))}")
    if config.pec.encoder not in ENCODERS:
        raise PECError(f"pec.encoder: unknown encoder {config.pec.encoder!r}; available: {', '.join(ENCODERS)}")
    family = model_family(config)
    transformer, origin = meta_transformer(config, family)
    lora_params, matched = lora_param_count(transformer, list(config.lora.targets), config.lora.rank)
    unmatched = [t for t in config.lora.targets if t not in matched]
    if unmatched:
        raise PECError(
            f"lora.targets: {', '.join(unmatched)} match no linear layer of the {family} transformer "
            f"({transformer.__class__.__name__}); e.g. to_q, to_k, to_v, to_out.0"
        )
    run_dir = Path(config.run.dir)
    existing = _nearest_existing(run_dir)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PECError(f"run.dir {run_dir}: cannot create or write it ({existing} is not a writable directory)")
    # a checkpoint holds the LoRA, AdamW's two moments and the EMA copy (float32); plus the exported LoRA
    per_checkpoint = lora_params * 4 * (3 + int(config.train.ema.enabled))
    needed = per_checkpoint * (config.checkpoint.keep + 1) + lora_params * 4
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise PECError(
            f"run.dir {run_dir}: {_gb(free)} free, the checkpoints need about {_gb(needed)} "
            f"({config.checkpoint.keep} kept + 1 being written + the LoRA); free space or set run.dir elsewhere"
        )
    return Checked(counts[0], counts[1], family, transformer, origin, lora_params, needed, free)


# --------------------------------------------------------------------------------------------------
# Where every model comes from
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CacheHit:
    snapshot: Path
    size: int
    commit: str


def _cache_lookup(repo_id: str, revision: str | None, repo_type: str = "model") -> CacheHit | None:
    """The local hub-cache snapshot of ``repo_id`` at ``revision`` (a branch, tag or commit; default main)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return None
    want = revision or "main"
    for repo in cache.repos:
        if repo.repo_id != repo_id or repo.repo_type != repo_type:
            continue
        for rev in repo.revisions:
            if want in rev.refs or rev.commit_hash.startswith(want):
                return CacheHit(Path(rev.snapshot_path), rev.size_on_disk, rev.commit_hash)
    return None


@dataclasses.dataclass
class Resource:
    """One set of weights the run loads."""

    role: str  # "model", "reward pickscore", "encoder pickscore", ...
    source: str  # hub id or local path
    revision: str | None = None
    status: str = ""  # "local", "cached", "on the hub", "built in", "missing"
    size: int | None = None  # bytes, when known
    problem: str | None = None  # one line: what is missing and the fix

    @property
    def available(self) -> bool:
        return self.problem is None


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _missing_pipeline_parts(directory: Path, skip: set[str]) -> list[str]:
    """Components named by model_index.json that the directory lacks (``skip``: left out on purpose)."""
    index = directory / "model_index.json"
    if not index.is_file():
        return ["model_index.json"]
    entries = json.loads(index.read_text(encoding="utf-8"))
    return [
        name
        for name, value in entries.items()
        if not name.startswith("_") and isinstance(value, list) and value[0] and name not in skip
        if not (directory / name).is_dir()
    ]


def hub_problem(
    repo_id: str, revision: str | None, role: str, option: str, kind: str = "offline", reason: str = ""
) -> str:
    """One line: the id, what is missing, and the fix. ``kind``: gated, revision, repository, offline, or
    unreachable (with ``reason``)."""
    at = f"@{revision}" if revision else ""
    local = f"or use a local copy: --set {option}"
    if kind == "gated":
        return (
            f"{role} {repo_id}{at} is gated: accept its license at https://huggingface.co/{repo_id} and log in "
            f"(hf auth login, or HF_TOKEN=...), {local}"
        )
    if kind == "revision":
        return f"{role} {repo_id}: no revision {revision!r} on the hub; fix the revision, {local}"
    if kind == "repository":
        return f"{role} {repo_id}: no such repository on the hub (or private: log in), {local}"
    if kind == "unreachable":
        return f"{role} {repo_id}{at}: the hub did not answer ({reason}); {local}"
    return (
        f"{role} {repo_id}{at} is not in the local hub cache and the hub cannot be reached (HF_HUB_OFFLINE=1 or no "
        f"network): download it online first (hf download {repo_id}), {local}"
    )


def _hub_kind(err: BaseException) -> str | None:
    """The :func:`hub_problem` kind of a hub error, or None for other errors."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kinds = [
        (GatedRepoError, "gated"),  # a RepositoryNotFoundError too: first
        (RevisionNotFoundError, "revision"),
        (RepositoryNotFoundError, "repository"),
        ((OfflineModeIsEnabled, LocalEntryNotFoundError), "offline"),
    ]
    return next((kind for cls, kind in kinds if isinstance(err, cls)), None)


def hub_load_error(repo_id: str, revision: str | None, role: str, option: str, err: BaseException) -> str | None:
    """The :func:`hub_problem` line for a loading error caused by the hub (searched along the exception's
    causes), or None when the hub is not the cause."""
    seen: BaseException | None = err
    while seen is not None:
        kind = _hub_kind(seen)
        if kind is not None:
            return hub_problem(repo_id, revision, role, option, kind)
        seen = seen.__cause__ or seen.__context__
    return None


def _hub_info(repo_id: str, revision: str | None, role: str, option: str) -> tuple[int | None, str | None]:
    """(size in bytes, problem) of an uncached hub repo, asking the hub; gated repos need a token."""
    from huggingface_hub import HfApi, get_token

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as err:  # network, gated, missing: one line for each
        kind = _hub_kind(err) or "unreachable"
        return None, hub_problem(repo_id, revision, role, option, kind, str(err).splitlines()[0] if str(err) else "")
    size = sum(f.size or 0 for f in info.siblings or []) or None
    if info.gated and get_token() is None:
        return size, hub_problem(repo_id, revision, role, option, "gated")
    return size, None


def locate(role: str, source: str, revision: str | None, option: str, pipeline_skip: set[str] | None = None):
    """A :class:`Resource` for ``source``: a local path, a cached hub repo, or one the hub must supply.

    ``pipeline_skip``: for a diffusers pipeline, components it does not load (checked for completeness
    otherwise); None for single models.
    """
    from comfy_pec.pretrained import is_local

    res = Resource(role, source, revision)
    if is_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            res.status, res.problem = "missing", f"{role} {source}: no such file or directory; fix it: --set {option}"
            return res
        res.status, res.size = "local", _du(path)
        if pipeline_skip is not None and path.is_dir():
            lacking = _missing_pipeline_parts(path, pipeline_skip)
            if lacking:
                res.problem = f"{role} {source}: not a complete diffusers pipeline (lacks {', '.join(lacking)})"
        return res
    hit = _cache_lookup(source, revision)
    if hit is not None:
        res.status, res.size = f"cached ({hit.commit[:10]})", hit.size
        lacking = _missing_pipeline_parts(hit.snapshot, pipeline_skip) if pipeline_skip is not None else []
        if not lacking:
            return res
        res.status += f", lacks {', '.join(lacking)}"
    if _offline():
        res.status = "missing" if hit is None else res.status
        res.problem = hub_problem(source, revision, role, option)
        return res
    res.size, res.problem = _hub_info(source, revision, role, option)
    res.status = "on the hub (will download)" if res.problem is None else "missing"
    return res


def _reward_source(name: str) -> str | None:
    """The published weights a reward loads by default (None: model-free)."""
    from importlib import import_module

    from comfy_pec.encoders import TOWERS

    if name.startswith("toy_"):
        return None
    if name in ("pickscore", "clip_score"):
        return TOWERS["pickscore" if name == "pickscore" else "clip"].default
    module = {"hpsv21": "hps", "aesthetic": "aesthetic", "imagereward": "image_reward"}[name]
    mod = import_module(f"trainer.rewards.{module}")
    return getattr(mod, "HUB_ID", None) or mod.ENCODER_ID


def resources(config: Config, family: str) -> list[Resource]:
    """Every set of weights the run loads: the model (and its base), each reward model, the encoder."""
    from comfy_pec.encoders import TOWERS

    from .backends import EMBEDDED_MODEL
    from .backends.pipeline import is_single_file

    m = config.model
    found: list[Resource] = []
    skip = {"text_encoder_3", "tokenizer_3"} if family == "sd3" and not m.use_t5 else set()
    if m.path is None:
        found.append(Resource("model", EMBEDDED_MODEL, status="built in", size=_du(Path(EMBEDDED_MODEL))))
    elif is_single_file(m.path):
        found.append(locate("model (single file)", m.path, None, "model.path=/path/to/file.safetensors"))
        found.append(locate("model base", m.base, m.revision, "model.base=/path/to/it", skip | {"transformer"}))
    else:
        found.append(locate("model", m.path, m.revision, "model.path=/path/to/it", skip))
    for term in config.rewards:
        source = term.path or _reward_source(term.name)
        if source is not None:
            option = f"'rewards=[{{name: {term.name}, path: /path/to/it}}]'"
            found.append(locate(f"reward {term.name}", source, None, option))
    encoder = config.pec.encoder
    if config.pec.encoder_path is not None or encoder in TOWERS:
        source = config.pec.encoder_path or TOWERS[encoder].default
        if not any(r.source == source for r in found):  # PickScore reward and encoder share one tower
            found.append(locate(f"encoder {encoder}", source, None, "pec.encoder_path=/path/to/it"))
    return found


def require_available(items: list[Resource]) -> None:
    """Stop with the first missing resource's one-line message (what is missing, the fix)."""
    for item in items:
        if not item.available:
            raise PECError(item.problem)


# --------------------------------------------------------------------------------------------------
# Estimates from the configs
# --------------------------------------------------------------------------------------------------


def _meta_params(build) -> int:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        module = build()
    return sum(p.numel() for p in module.parameters())


def _component_params(config: Config, family: str) -> dict[str, int]:
    """Parameter counts of the VAE and text encoders (local/cached configs, else the published ones)."""
    import diffusers
    import transformers

    from .backends.random_init import LLMPipelineSpec, llm_text_encoder, llm_vae

    directory = _model_dir(config)
    counts: dict[str, int] = {}
    use_t5 = family == "flux" or bool(config.model.use_t5)
    if directory is not None and (directory / "model_index.json").is_file():
        index = json.loads((directory / "model_index.json").read_text(encoding="utf-8"))
        for name, value in index.items():
            if name.startswith("_") or not isinstance(value, list) or not (directory / name / "config.json").is_file():
                continue
            if name == "transformer" or (name == "text_encoder_3" and not use_t5):
                continue
            library, cls_name = value
            if library == "diffusers":
                cls = getattr(diffusers, cls_name)
                settings = cls.load_config(str(directory / name))
                counts[name] = _meta_params(lambda cls=cls, settings=settings: cls.from_config(settings))
            else:
                cfg = transformers.AutoConfig.from_pretrained(str(directory / name))
                cls = getattr(transformers, cls_name)
                counts[name] = _meta_params(lambda cls=cls, cfg=cfg: cls(cfg))
        return counts
    _, spec = published_spec(config, family)
    if isinstance(spec, LLMPipelineSpec):
        counts["vae"] = _meta_params(lambda: llm_vae(spec))
        counts["text_encoder"] = _meta_params(lambda: llm_text_encoder(spec))
        return counts
    counts["vae"] = _meta_params(lambda: diffusers.AutoencoderKL(**spec.vae))
    clip_cls = transformers.CLIPTextModelWithProjection if family == "sd3" else transformers.CLIPTextModel
    counts["text_encoder"] = _meta_params(lambda: clip_cls(transformers.CLIPTextConfig(**spec.clip)))
    if spec.clip_2:
        counts["text_encoder_2"] = _meta_params(lambda: clip_cls(transformers.CLIPTextConfig(**spec.clip_2)))
    if use_t5:
        name = "text_encoder_2" if family == "flux" else "text_encoder_3"
        counts[name] = _meta_params(lambda: transformers.T5EncoderModel(transformers.T5Config(**spec.t5)))
    return counts


def _tower_params(source: str, kind: str) -> int | None:
    """Parameter count of a CLIP-type reward/encoder tower from its config (local, cached, or CLIP-H)."""
    import transformers

    path = Path(source) if os.path.isdir(source) else None
    if path is None:
        hit = _cache_lookup(source, None)
        path = hit.snapshot if hit is not None else None
    if path is not None and (path / "config.json").is_file():
        cfg = transformers.AutoConfig.from_pretrained(str(path))
    elif kind == "pickscore":
        cfg = transformers.CLIPConfig(**CLIP_H_CONFIG)
    else:
        return None
    return _meta_params(lambda: transformers.AutoModel.from_config(cfg))


@dataclasses.dataclass
class Estimate:
    """Unmeasured estimates (bytes, seconds) and the numbers they come from."""

    params: dict[str, int]  # module -> parameter count
    tokens: int  # image + text tokens per transformer forward
    weights: int
    lora_states: int
    activations: int  # training micro-batch (backward)
    decode: int  # VAE decode chunk (no grad)
    peak: int
    flops: float  # per iteration (transformer only)
    seconds: float
    notes: list[str]


def _vae_geometry(vae: dict[str, Any]) -> tuple[int, int]:
    """(down-sampling factor, channels of the full-resolution stage) of a VAE config."""
    if "block_out_channels" in vae:  # AutoencoderKL, AutoencoderKLFlux2
        return 2 ** (len(vae["block_out_channels"]) - 1), vae["block_out_channels"][0]
    # Qwen-Image's video VAE (one frame): a stage per dim_mult entry, base_dim·dim_mult[0] channels at full size
    return 2 ** (len(vae["dim_mult"]) - 1), vae["base_dim"] * vae["dim_mult"][0]


def _model_defaults(config: Config, family: str) -> dict[str, Any]:
    """The family's sampling defaults, updated by the model directory's pec.json and the config's sampling, and
    its VAE's geometry (``vae_factor``, ``vae_width``) from the local VAE config, else the published one."""
    from .backends import backend_class
    from .backends.base import read_defaults

    directory = _model_dir(config)
    builtin = backend_class(family).builtin_defaults
    defaults = read_defaults(str(directory), builtin) if directory is not None else dict(builtin)
    for key in ("resolution", "num_steps", "guidance_scale"):
        if getattr(config.sampling, key) is not None:
            defaults[key] = getattr(config.sampling, key)
    if config.model.max_sequence_length is not None:
        defaults["max_sequence_length"] = config.model.max_sequence_length
    vae = directory / "vae" / "config.json" if directory is not None else None
    settings = (
        json.loads(vae.read_text()) if vae is not None and vae.is_file() else published_spec(config, family)[1].vae
    )
    defaults["vae_factor"], defaults["vae_width"] = _vae_geometry(settings)
    return defaults


def _width_and_blocks(cfg) -> tuple[int, int]:
    """(hidden width, transformer blocks) of a transformer config. Z-Image's refiners run on the image tokens
    (noise refiner) or the text tokens (context refiner) only: per layer pair, one block's worth of the sequence."""
    if hasattr(cfg, "dim"):  # Z-Image
        return cfg.dim, cfg.n_layers + cfg.n_refiner_layers
    return cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_layers + getattr(cfg, "num_single_layers", 0)


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def estimate(config: Config, checked: Checked) -> Estimate:
    """Peak GPU memory and time per iteration from the configs (see the module constants for the method).

    * weights: transformer and text encoders at ``model.dtype`` (offloaded encoders: 0), VAE and the
      reward/encoder towers float32;
    * LoRA: parameter, gradient and AdamW's two moments, float32;
    * activations of one training micro-batch: per block ``34·L·d`` bytes (16-bit) per sample, all
      blocks without gradient checkpointing, one recomputed block plus every block's input with it;
      L = image tokens (2×2 latent pixels each) + text tokens; a family that batches CFG's branches in one
      forward (:data:`TOKEN_MODELS`) doubles the batch above its guidance threshold;
    * VAE decode of a ``pec.chunk_size`` chunk: ``VAE_LIVE_MAPS`` float32 maps of C × H × W per image (C: the
      VAE's full-resolution width, 128);
    * peak = weights + LoRA + max(activations, decode), + 10 % allocator slack;
    * time: transformer FLOPs ``2·P·L`` per sample-step forward plus attention ``4·L²·d`` per block,
      backward 2× forward (+1 forward recomputed with checkpointing), at :data:`ASSUMED_FLOPS`.
    """
    family, t, m = checked.family, config.train, config.model
    tr = checked.transformer
    cfg = tr.config
    params = {"transformer": sum(p.numel() for p in tr.parameters()), **_component_params(config, family)}
    uncounted = []
    for term in config.rewards:
        count = None
        if term.name in ("pickscore", "clip_score"):
            count = _tower_params(term.path or _reward_source(term.name), term.name)
        if count:
            params[f"reward {term.name}"] = count
        elif _reward_source(term.name) is not None:
            uncounted.append(f"reward {term.name}")
    pick = next((term for term in config.rewards if term.name == "pickscore"), None)
    # the PickScore reward and encoder of the same weights are one tower (comfy_pec.encoders.shared_tower)
    shared = config.pec.encoder == "pickscore" and pick is not None and config.pec.encoder_path in (None, pick.path)
    if config.pec.encoder != "toy" and not shared:
        uncounted.append(f"encoder {config.pec.encoder}")
    shape = TOKEN_MODELS[family]
    width, blocks = _width_and_blocks(cfg)
    defaults = _model_defaults(config, family)
    resolution = int(defaults["resolution"])
    image_tokens = _padded((resolution // (defaults["vae_factor"] * 2)) ** 2, shape.pad_to)  # 2x2 latent pixels
    text_tokens = _padded(int(defaults["max_sequence_length"]), shape.pad_to) + shape.extra_text
    tokens = image_tokens + text_tokens
    guidance = float(defaults["guidance_scale"])
    branches = 2 if shape.cfg_above is not None and guidance > shape.cfg_above else 1
    batch = t.batch_size * branches

    dtype = DTYPE_BYTES[m.dtype]
    text = sum(v for k, v in params.items() if k.startswith("text_encoder"))
    towers = sum(v for k, v in params.items() if k.startswith("reward"))
    weights = (
        params["transformer"] * dtype
        + (0 if m.offload_text_encoders else text * dtype)
        + params.get("vae", 0) * 4
        + towers * 4
    )
    lora_states = checked.lora_params * 4 * 4
    per_block = BLOCK_ACTIVATION_BYTES * tokens * width * batch * dtype // 2
    if m.gradient_checkpointing:
        activations = blocks * tokens * width * batch * dtype + per_block
    else:
        activations = blocks * per_block
    decode = VAE_LIVE_MAPS * defaults["vae_width"] * resolution * resolution * 4 * config.pec.chunk_size
    peak = int(1.1 * (weights + lora_states + max(activations, decode)))

    steps = int(defaults["num_steps"])
    w = config.sampling.window
    trained = steps if w.rule == "all" else min(w.size, steps)
    samples = t.prompts_per_iteration * t.group_size
    forward = (2 * params["transformer"] * tokens + 4 * tokens**2 * width * blocks) * branches
    backward_factor = 3 + int(m.gradient_checkpointing) + int(t.kl_beta > 0)  # fwd+bwd (+recompute, +reference)
    flops = samples * forward * (steps + trained * backward_factor * t.inner_epochs)
    text_kind = "text (at most: the prompt's real tokens)" if shape.text_trimmed else "text"
    notes = [
        f"tokens per forward: {image_tokens} image + {text_tokens} {text_kind} = {tokens}; width {width}, "
        f"{blocks} blocks",
        f"micro-batch {t.batch_size} x {branches} branch(es); {samples} samples x {steps} steps, "
        f"{trained} trained step(s) per sample",
    ]
    if uncounted:
        notes.append(f"not in the memory estimate (no config to count from): {', '.join(uncounted)}")
    return Estimate(
        params,
        tokens,
        weights,
        lora_states,
        activations,
        decode,
        peak,
        flops,
        flops / ASSUMED_FLOPS,
        notes,
    )


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


def _gb(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def format_plan(config: Config, checked: Checked, items: list[Resource], est: Estimate | None) -> str:
    """The dry-run plan as text: prompts, weights (where they come from), LoRA, estimates, verdict."""
    m, t = config.model, config.train
    lines = [
        "PEC training plan (nothing was loaded)",
        f"  prompts: train {config.prompts.train!r}: {checked.train_prompts}; "
        f"eval {config.prompts.eval!r}: {checked.eval_prompts}",
        f"  family {checked.family}; transformer config from {checked.transformer_config_from}",
        "  weights:",
    ]
    for item in items:
        rev = f"@{item.revision}" if item.revision else ""
        lines.append(f"    {item.role:<22} {item.source}{rev}  [{item.status}]  {_gb(item.size)}")
        if item.problem:
            lines.append(f"      MISSING: {item.problem}")
    lines += [
        f"  LoRA: rank {config.lora.rank} on {', '.join(config.lora.targets)}: {_count(checked.lora_params)} params; "
        f"checkpoints need ~{_gb(checked.checkpoint_bytes)} ({_gb(checked.free_bytes)} free in {config.run.dir})",
    ]
    if est is not None:
        lines += [
            "  parameters: " + ", ".join(f"{k} {_count(v)}" for k, v in est.params.items()),
            f"  estimate (from the configs, not measured): peak GPU memory ~{_gb(est.peak)} = weights {_gb(est.weights)}"
            f" + LoRA/AdamW {_gb(est.lora_states)} + max(training activations {_gb(est.activations)}, "
            f"VAE decode of {config.pec.chunk_size} images {_gb(est.decode)}) + 10 %",
            f"    dtype {m.dtype}, gradient checkpointing {'on' if m.gradient_checkpointing else 'off'}, "
            f"text encoders {'offloaded' if m.offload_text_encoders else 'on the GPU'}",
            f"  estimate: ~{est.flops / 1e15:.1f} PFLOP per iteration (transformer only) -> ~{est.seconds:.0f} s at "
            f"{ASSUMED_FLOPS / 1e12:.0f} TFLOP/s effective; {t.iterations} iterations ~{est.seconds * t.iterations / 3600:.1f} h",
            *(f"    {note}" for note in est.notes),
        ]
    missing = [i for i in items if not i.available]
    lines.append(
        "  ready: everything is available"
        if not missing
        else f"  NOT READY: {len(missing)} missing (see MISSING above)"
    )
    return "\n".join(lines)


def plan(config: Config) -> tuple[str, bool]:
    """(the plan's text, whether everything is available) — ``pec train --dry-run``."""
    checked = check_before_loading(config)
    items = resources(config, checked.family)
    text = format_plan(config, checked, items, estimate(config, checked))
    return text, all(i.available for i in items)


def preflight(config: Config) -> Checked:
    """The checks ``pec train`` runs before loading: :func:`check_before_loading`, then every weight located."""
    checked = check_before_loading(config)
    require_available(resources(config, checked.family))
    return checked


__all__ = [
    "check_before_loading",
    "estimate",
    "format_plan",
    "locate",
    "plan",
    "preflight",
    "published_spec",
    "resources",
]

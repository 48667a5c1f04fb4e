"""Training configuration: one typed schema, YAML files, presets, dotted command-line overrides.

A run's configuration is built in layers — a preset (``demo``, ``sd35m-pickscore``, ...), then a
YAML file, then ``--set section.key=value`` overrides — and validated once by pydantic. Unknown keys
are errors that name the key and the nearest valid one; rules that tie fields together (group size,
batch size, SDE window) fail with the rule spelled out, and nothing is silently adjusted. The
resolved configuration is written to the run directory as ``config.yaml``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from comfy_pec import PECError
from comfy_pec.kinds import SDE_KINDS

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(PECError):
    """A configuration that cannot run; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which model to fine-tune, and how to hold it in memory."""

    path: str | None = Field(
        None,
        description="diffusers pipeline dir or hub id, or a single-file transformer checkpoint (.safetensors, "
        "needs model.base); null = the embedded tiny model",
    )
    family: str | None = Field(
        None, description="model family (trainer.backends.FAMILIES); detected from model_index.json"
    )
    base: str | None = Field(
        None,
        description="single-file checkpoints only: the diffusers pipeline (hub id or dir) of the same architecture "
        "that supplies the transformer config, VAE, text encoders, tokenizers and scheduler",
    )
    revision: str | None = Field(None, description="hub revision of path (of base for a single file)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="transformer and text encoders; the VAE, LoRA and step math stay float32"
    )
    use_t5: bool | None = Field(None, description="SD3: load T5 (default off: its tokens are zeros); FLUX: always")
    max_sequence_length: int | None = Field(None, ge=1, description="T5 tokens; null = model default (256 / 512)")
    gradient_checkpointing: bool = Field(False, description="recompute transformer activations in the backward pass")
    prompt_cache: int = Field(0, ge=0, description="prompts whose text embeddings are kept on the CPU (0 = off)")
    offload_text_encoders: bool = Field(False, description="keep text encoders on the CPU between encodes")
    device: str = Field("auto", description="'auto' = cuda when available (this rank's GPU under accelerate), else cpu")
    compile: bool = Field(False, description="torch.compile the transformer's forward (the first iterations compile)")

    @model_validator(mode="after")
    def _single_file_rules(self) -> ModelConfig:
        from .backends.pipeline import is_single_file

        single = self.path is not None and is_single_file(self.path)
        if single and self.base is None:
            raise ValueError(
                f"model.path {self.path} is a single-file checkpoint: set model.base to the diffusers pipeline "
                "(hub id or directory) it belongs to, e.g. black-forest-labs/FLUX.1-dev"
            )
        if self.base is not None and not single:
            raise ValueError("model.base is only for a single-file model.path (a .safetensors transformer checkpoint)")
        if self.family == "flux" and self.use_t5 is False:
            raise ValueError("model.use_t5 cannot be false for a flux model: FLUX reads its prompt tokens from T5")
        return self


class WindowConfig(_Section):
    """Which sampling steps are stochastic and trained (docs/design.md §3 windows)."""

    rule: Literal["all", "steps", "sliding", "egrpo"] = Field(
        "all",
        description="all: every step SDE; steps: `size` SDE steps from a start drawn in [start_min, start_max] "
        "each iteration (Flow-GRPO-Fast); sliding: "
        "MixGRPO's window moving to low noise every `shift_every` iterations; egrpo: E-GRPO's merged jumps, one "
        "per iteration in turn, ODE elsewhere, each group sharing its initial noise and ODE prefix",
    )
    size: int = Field(2, ge=1, description="number of SDE steps (steps / sliding)")
    start_min: int = Field(0, ge=0, description="steps: earliest start step")
    start_max: int = Field(0, ge=0, description="steps: latest start step (drawn per iteration)")
    shift_every: int = Field(25, ge=1, description="sliding: iterations between moves")
    stride: int = Field(1, ge=1, description="sliding: steps moved each time")
    tau: float = Field(
        0.5,
        description="egrpo: entropy threshold τ in nats per latent dimension, h = ½·log(2πe·std_step²); steps below "
        "it are merged until the merged jump reaches it, a tail that cannot stays ODE. 0.5 is calibrated on the "
        "embedded model (10 steps, shift 1, a=0.7: h = 1.06 … -1.19): the three noisiest steps stay single, steps "
        "3-4 merge, the five steps with h < 0 stay ODE (SD3 shift 3: 4 single steps + two 2-step merges). "
        "E-GRPO's published τ≈2.2 is in other units",
    )


class SamplingConfig(_Section):
    """Rollout sampling; null values take the model's defaults (its pec.json)."""

    resolution: int | None = Field(None, gt=0)
    num_steps: int | None = Field(None, ge=2)
    guidance_scale: float | None = Field(None, ge=0)
    sde: Literal[SDE_KINDS] = Field("flow_sde", description="the step kind of the trained steps")
    noise_level: float | None = Field(None, gt=0, le=1.5)
    shared_init_noise: bool = Field(
        False,
        description="a group shares its initial noise (DanceGRPO; E-GRPO always does), so the reward spread "
        "inside a group comes from the trained SDE steps instead of from the starting points",
    )
    window: WindowConfig = WindowConfig()


class LoraConfig(_Section):
    """The trained adapter (docs/design.md §4 defaults for SD3: r=32, α=64 on attention)."""

    rank: int = Field(32, ge=1)
    alpha: float = Field(64.0, gt=0)
    targets: list[str] = Field(
        default_factory=lambda: [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "to_add_out",
        ],
        description="modules that get a LoRA: name suffixes (to_out.0), or full-path patterns whose * stands for one "
        "path component (single_transformer_blocks.*.attn.to_out)",
    )
    init_scale: float = Field(0.0, ge=0, description="std of a random lora_B init (0 = PEFT's zero init)")


class EmaConfig(_Section):
    enabled: bool = False
    decay: float = Field(0.9, gt=0, lt=1)


class EntropyRegConfig(_Section):
    """Entropy regularisation (docs/design.md §6): loss − β_H·mean(e_θ), e_θ a sample-based entropy estimate."""

    kind: Literal["none", "native", "perceptual"] = Field(
        "none",
        description="native: e_θ = ||x' - μ_θ||²/(2 std²) per latent element; perceptual: "
        "||g(x') - g(μ_θ)||²/(2 std²) in pec.encoder's space, gradient through the VAE decoder and encoder",
    )
    beta: float = Field(0.01, ge=0, description="β_H")
    chunk_size: int = Field(4, ge=1, description="perceptual: samples decoded and encoded with gradient at a time")


class CovConfig(_Section):
    """Clip-Cov / KL-Cov (docs/design.md §6, App. C): act on the transitions of highest cov = (log p - mean)(A - mean)."""

    kind: Literal["none", "clip_cov", "kl_cov"] = Field(
        "none", description="clip_cov: detach the selected transitions; kl_cov: add kl_beta·KL(θ‖old) on them"
    )
    space: Literal["native", "perceptual"] = Field(
        "native", description="rank by the policy's log p_θ (native) or by the perceptual log p_A = -h_A"
    )
    fraction: float = Field(0.25, gt=0, le=1, description="selected top fraction per step and micro-batch")
    kl_beta: float = Field(1.0, gt=0, description="kl_cov: β_cov")


class TrainConfig(_Section):
    """The GRPO loop (docs/design.md §4)."""

    iterations: int = Field(100, ge=1)
    prompts_per_iteration: int = Field(4, ge=1, description="groups per iteration")
    group_size: int = Field(8, ge=2, description="samples per prompt (G)")
    batch_size: int = Field(8, ge=1, description="samples per rollout / gradient micro-batch")
    inner_epochs: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    clip_range: float = Field(1e-4, gt=0, description="ε_low of the PPO clip")
    clip_range_high: float | None = Field(None, gt=0, description="ε_high (Clip-Higher); null = ε_low")
    adv_clip: float = Field(5.0, gt=0)
    adv_std: Literal["group", "global"] = "group"
    kl_beta: float = Field(0.0, ge=0)
    kl_flow_grpo_compat: bool = Field(False, description="divide the KL by s² like Flow-GRPO (a factor Δ off)")
    log_prob_reduction: Literal["mean", "sum"] = "mean"
    entropy_reg: EntropyRegConfig = EntropyRegConfig()
    cov: CovConfig = CovConfig()
    ema: EmaConfig = EmaConfig()
    seed: int = 0
    nan_patience: int = Field(3, ge=1, description="stop after this many iterations in a row with NaN rewards")


class RewardTerm(_Section):
    """One weighted term of the task reward (``trainer.rewards.REWARDS``)."""

    name: str
    weight: float = 1.0
    path: str | None = Field(None, description="reward model: hub id or local path; null = its published weights")


class PecConfig(_Section):
    """Perceptual-entropy reward shaping (docs/design.md §5)."""

    method: Literal["none", "pec", "pcvae"] = "none"
    beta: float = Field(0.5, ge=0)
    encoder: str = "toy"
    encoder_path: str | None = Field(None, description="weights for the encoder; null = its shipped/hub weights")
    normalize_features: bool = True
    decode: Literal["noisy", "x0"] = "noisy"
    energy_draw: Literal["sample", "group"] = Field(
        "sample",
        description="which noise draw perturbs μ_old in the residual energy: 'sample' each sample's own x' (the "
        "paper's); 'group' one draw per group and step, shared by its samples (common random numbers: in-group "
        "energy differences then come from the states, not from the draws)",
    )
    bonus: Literal["energy", "vendi", "repulsion", "anchor"] = Field(
        "energy",
        description="PEC: what the bonus b measures: 'energy' the group-z-scored residual energy of the trained steps "
        "(eq. 17); against an ODE population of the drawn prompt sampled by the current policy from pec.population "
        "independent starts: 'vendi' how much each final image would raise the population's Vendi by its weight "
        "(comfy_pec.diversity.vendi_gradient), 'repulsion' how far it moved its start along the direction that "
        "raises that Vendi (vendi_repulsion); both in reward units per unit log Vendi; 'anchor' minus the squared "
        "distance of each final image's normalised feature from the LoRA-off model's ODE image of the same start "
        "(comfy_pec.perceptual.perceptual_anchor)",
    )
    population: int = Field(
        8,
        ge=1,
        description="PEC with a population bonus: ODE samples of the current policy per drawn prompt and iteration",
    )
    step_norm: Literal["zscore", "none"] = "zscore"
    bonus_clip: float | None = Field(
        None, gt=0, description="PEC: bound each step's z-scored energy to ±bonus_clip (null = unbounded, eq. 17)"
    )
    combine: Literal["sum", "relative", "decoupled"] = Field(
        "sum",
        description="PEC: how the bonus joins the task reward: 'sum' r + β·b (eq. 17); 'relative' r + β·m·b with m "
        "the median in-group reward std of the iteration (β in units of the typical reward spread); 'decoupled' "
        "z_group(r) + β·b (every group's reward z-scored first)",
    )
    bonus_control: Literal["none", "shuffled"] = Field(
        "none",
        description="PEC: 'shuffled' permutes each group's bonuses at random before they are added — a control with "
        "the bonus's exact spread and no link to the sample it is added to (how much of PEC is the energy itself?)",
    )
    one_sided: bool = Field(False, description="PCVAE: penalise only gains below the calibration")
    beta_target: float | None = Field(
        None,
        gt=0,
        description="PEC: automatic β holding the diversity probe's Vendi at beta_target × its value at the first "
        "iteration (log-space dual ascent, comfy_pec.perceptual.adaptive_beta; pec.beta is the starting value) — with "
        "a population bonus the iteration's population over the base model's, per prompt, instead of a probe; "
        "null = β fixed at pec.beta",
    )
    beta_lr: float = Field(4.0, gt=0, description="automatic β: step η of log β per unit log-ratio of the probe Vendi")
    beta_min: float = Field(0.01, gt=0, description="automatic β: lower clamp")
    beta_max: float = Field(0.5, gt=0, description="automatic β: upper clamp")
    probe_prompts: int = Field(4, ge=1, description="automatic β: training prompts in the diversity probe")
    probe_seeds: int = Field(8, ge=2, description="automatic β: ODE samples per probe prompt (fixed seeds)")
    probe_every: int = Field(1, ge=1, description="automatic β: iterations between probes (β changes only at a probe)")
    chunk_size: int = Field(32, ge=1, description="images per decode/encode chunk")


class DriftConfig(_Section):
    """DRIFT (docs/design.md §6), each part on its own switch; all off by default."""

    subset: bool = Field(False, description="(i) drop each group's reward outliers before normalising")
    subset_threshold: float = Field(
        2.0, gt=0, description="(i) keep |r - median| <= threshold · 1.4826 · MAD (robust std) of the group"
    )
    prompt_noise: float = Field(
        0.0, ge=0, description="(ii) std of the Gaussian noise on prompt embeddings, relative to their RMS (0 = off)"
    )
    prompt_noise_anneal: int | None = Field(
        None, ge=1, description="(ii) iterations over which the noise decays linearly to 0; null = train.iterations"
    )
    diversity_alpha: float = Field(
        0.0, ge=0, description="(iii) α of r̃ = r + α·y·d̂ (in-group task-reward z-score × distinctness; 0 = off)"
    )


class PromptsConfig(_Section):
    train: str | list[str] = Field(
        "toy-train",
        description="a built-in set (pec-train, toy-train, ...), a text file, FILE.csv#COLUMN (.tsv/.jsonl/.json/"
        ".parquet), a hub dataset file hf:OWNER/NAME[@REV]/PATH[#COLUMN], or a list (trainer.prompts)",
    )
    eval: str | list[str] = Field("toy-heldout", description="prompts for before/after grids")


class CheckpointConfig(_Section):
    every: int = Field(10, ge=1, description="iterations between checkpoints")
    keep: int = Field(2, ge=1, description="checkpoints kept on disk")


class ReportConfig(_Section):
    grid_seeds: list[int] = Field(default_factory=lambda: list(range(8)))
    grid_prompts: int = Field(4, ge=1, description="eval prompts shown in the before/after grids")


class ProbeConfig(_Section):
    """The fixed probe of the paradox (docs/design.md §9): every ``every`` iterations, apart from training, the
    current policy samples the same prompts and seeds with SDE on the same steps; its own ``log.jsonl`` rows
    hold the closed-form policy entropy of those steps (the same in every probe, by construction), their
    perceptual entropy Ĥ_A, and the Vendi and feature variance of the final images in the perceptual space."""

    every: int = Field(0, ge=0, description="iterations between probes (and one after the last); 0 = no probe")
    prompts: int = Field(2, ge=1, description="the first N prompts of prompts.eval")
    seeds: list[int] = Field(default_factory=lambda: list(range(8)), description="one sample per seed and prompt")
    steps: list[int] = Field(default_factory=lambda: [0, 1, 2], description="the stochastic (probed) steps")

    @model_validator(mode="after")
    def _enough_seeds(self) -> ProbeConfig:
        if len(self.seeds) < 2:
            raise ValueError("probe.seeds needs at least 2 seeds: Vendi and variance compare samples of a prompt")
        if not self.steps:
            raise ValueError("probe.steps must name at least one step")
        return self


class FsdpConfig(_Section):
    """FSDP for models too large to replicate per GPU (FLUX): full sharding, one unit per transformer block."""

    enabled: bool = Field(False, description="shard the transformer over the processes (needs accelerate launch)")
    activation_checkpointing: bool = Field(True, description="recompute each transformer block in the backward pass")


class DistributedConfig(_Section):
    """Several processes started by ``accelerate launch`` (DDP by default; multi-node through accelerate)."""

    sampler: Literal["auto", "contiguous", "k_repeat"] = Field(
        "auto",
        description="contiguous: each rank draws whole groups (needs group_size | samples per rank); k_repeat: "
        "sample i on rank i mod processes, groups spread over ranks; auto: contiguous when possible",
    )
    fsdp: FsdpConfig = FsdpConfig()


class RunConfig(_Section):
    dir: str = "runs/default"
    tensorboard: Literal["auto", "on", "off"] = "auto"
    progress: bool = True
    log_advantages: bool = Field(False, description="also write each iteration's advantages [N] to log.jsonl")
    perceptual_stats: bool = Field(
        True,
        description="measure perceptual entropy and per-group Vendi every iteration even when the method does not "
        "use them (the Fig. 2 curves of a Flow-GRPO run); false skips that phase where nothing needs it (benchmarks)",
    )


class Config(_Section):
    model: ModelConfig = ModelConfig()
    sampling: SamplingConfig = SamplingConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    rewards: list[RewardTerm] = Field(default_factory=lambda: [RewardTerm(name="toy_preference")])
    pec: PecConfig = PecConfig()
    drift: DriftConfig = DriftConfig()
    prompts: PromptsConfig = PromptsConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    report: ReportConfig = ReportConfig()
    probe: ProbeConfig = ProbeConfig()
    distributed: DistributedConfig = DistributedConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Config:
        t = self.train
        total = t.prompts_per_iteration * t.group_size
        if total % t.batch_size:
            raise ValueError(
                f"train.batch_size ({t.batch_size}) must divide train.prompts_per_iteration × train.group_size "
                f"({t.prompts_per_iteration} × {t.group_size} = {total}) so every sample is in exactly one batch"
            )
        w = self.sampling.window
        if w.start_max < w.start_min:
            raise ValueError(f"sampling.window.start_max ({w.start_max}) must be >= start_min ({w.start_min})")
        if not self.rewards:
            raise ValueError("rewards must name at least one reward")
        if self.pec.bonus_clip is not None and self.pec.step_norm != "zscore":
            raise ValueError("pec.bonus_clip bounds z-scored energies: it needs pec.step_norm=zscore")
        pec = self.pec
        if pec.energy_draw == "group" and pec.decode != "noisy":
            raise ValueError("pec.energy_draw=group perturbs μ_old itself: it needs pec.decode=noisy")
        if pec.method == "pec" and pec.beta_target is not None and not pec.beta_min <= pec.beta <= pec.beta_max:
            raise ValueError(
                f"automatic β starts at pec.beta ({pec.beta}), which must lie in [pec.beta_min, pec.beta_max] "
                f"= [{pec.beta_min}, {pec.beta_max}]"
            )
        fsdp = self.distributed.fsdp
        if fsdp.enabled and fsdp.activation_checkpointing and self.model.gradient_checkpointing:
            raise ValueError(
                "distributed.fsdp.activation_checkpointing already recomputes the transformer blocks: "
                "set model.gradient_checkpointing=false (or the FSDP one to false)"
            )
        return self

    @model_validator(mode="after")
    def _method_rules(self) -> Config:
        """Combinations of the docs/design.md §6 methods that cannot work, each named."""
        if self.sampling.window.rule == "egrpo":
            if self.sampling.sde != "flow_sde":
                raise ValueError(
                    "E-GRPO needs sampling.sde=flow_sde: its merged jump keeps the Flow-SDE noise variance of the "
                    f"steps it replaces (sampling.window.rule=egrpo with sampling.sde={self.sampling.sde})"
                )
            if self.pec.method == "pcvae":
                raise ValueError(
                    "PCVAE's calibration is per step of the unmerged schedule and does not apply to E-GRPO's merged "
                    "jumps: use pec.method=pec or none with sampling.window.rule=egrpo"
                )
        return self

    def fingerprint(self) -> str:
        """Short hash of everything except where the run lives (``pec.config_hash`` in LoRA files)."""
        data = self.model_dump(mode="json")
        data.pop("run")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# Loading: presets, YAML files, overrides, readable errors
# --------------------------------------------------------------------------------------------------


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path, what: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {what} must be a mapping of sections, got {type(data).__name__}")
    return data


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_override(text: str) -> dict:
    """``"pec.beta=0.5"`` → ``{"pec": {"beta": 0.5}}``; the value is parsed as YAML (numbers, lists...)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys at the location of an error (walking nested sections)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if isinstance(current, type) and issubclass(current, BaseModel) else None
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        current = next((a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if current is None:
            return []
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def _has_key(data: Any, loc: tuple) -> bool:
    for part in loc:
        if isinstance(part, int):
            if not isinstance(data, list) or part >= len(data):
                return False
        elif not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _explain(err: ValidationError, layers: list[tuple[str, dict]]) -> str:
    """One line: where the offending key came from (the last layer that sets it), the key, the fix."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    source = next((name for name, data in reversed(layers) if _has_key(data, loc)), None)
    source = source or " + ".join(name for name, _ in layers) or "config"
    dotted = ".".join(str(p) for p in loc) or "<root>"
    if first["type"] == "extra_forbidden":
        valid = _field_names(Config, loc)
        near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), near[0]])}?" if near else ""
        return f"{source}: unknown key {dotted}{hint} (valid here: {', '.join(valid)})"
    message = first["msg"].removeprefix("Value error, ")
    return f"{source}: {dotted}: {message}" if loc else f"{source}: {message}"


def load_config(preset: str | None = None, file: str | None = None, overrides: list[str] | None = None) -> Config:
    """Build and validate a :class:`Config` from a preset, a YAML file and ``key=value`` overrides."""
    layers: list[tuple[str, dict]] = []
    if preset is not None:
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            near = difflib.get_close_matches(preset, preset_names(), n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise ConfigError(f"unknown preset {preset!r}{hint} (presets: {', '.join(preset_names())})")
        layers.append((str(path), _read_yaml(path, "preset")))
    if file is not None:
        layers.append((str(file), _read_yaml(Path(file), "config file")))
    for text in overrides or []:
        layers.append((f"--set {text}", parse_override(text)))
    data: dict = {}
    for _, layer in layers:
        data = _merge(data, layer)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_explain(err, layers)) from None


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")

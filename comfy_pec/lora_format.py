"""The PEC LoRA file (docs/design.md §8): write it, read it back safely, inspect it, check key coverage.

Layout, chosen so that stock ComfyUI and diffusers both load the file at the trained strength:

* safetensors; keys ``transformer.<diffusers module path>.lora_A.weight`` [r, in] and
  ``transformer.<diffusers module path>.lora_B.weight`` [out, r];
* the PEFT scale alpha/r (alpha/sqrt(r) with rsLoRA) is multiplied into ``lora_B``, so
  ``W' = W + B @ A`` at strength 1.0 in every loader; there are no ``.alpha`` tensors;
* the header (all strings) carries ``format=pt``, diffusers' ``lora_adapter_metadata`` (with
  lora_alpha == r because the scale is baked), ``modelspec.*``, kohya-style ``ss_*`` and the PEC
  provenance block ``pec.*``.

FLUX.2 is the exception: ComfyUI maps its diffusers keys with the FLUX.1 table and leaves the MLPs and
single blocks unloaded, so FLUX.2 files use the original BFL module names under ``diffusion_model.``
(:func:`flux2_to_bfl`), q/k/v fused into one LoRA of the fused ``qkv`` weight, which diffusers' FLUX.2
converter reads back exactly.

Reading never trusts the file: the safetensors header is parsed and every size is checked, in bounded
memory, before safetensors sees it, and any problem surfaces as one :class:`LoraFormatError` whose
message is a single line naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import stat
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import safetensors
import safetensors.torch
import torch

from . import PECError, __version__

_A = ".lora_A.weight"
_B = ".lora_B.weight"
# Wrappers a module path may carry: diffusers' pipeline prefix and PEFT's PeftModel prefix.
_WRAPPERS = ("base_model.model.", "transformer.")
FILE_PREFIX = "transformer."

# safetensors' own header limit; anything larger is refused before reading it.
_MAX_HEADER_BYTES = 100_000_000
_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
}
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}  # what a LoRA tensor may be stored as
_SAVE_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}

# Short architecture name -> (modelspec.architecture, ss_base_model_version).
ARCHITECTURES = {
    "sd3": ("stable-diffusion-v3-medium/lora", "sd3"),
    "sd3.5-medium": ("stable-diffusion-v3.5-medium/lora", "sd3.5-medium"),
    "sd3.5-large": ("stable-diffusion-v3.5-large/lora", "sd3.5-large"),
    "flux": ("flux-1-dev/lora", "flux1"),
    # The embedded tiny SD3-architecture model that ships with PEC (keys look like "sd3").
    "sd3-toy": ("pec-embedded-sd3-toy/lora", "sd3-toy"),
    # FLUX.2 is written in the original (BFL) layout: the one ComfyUI maps completely (docs/lora-layouts.md).
    "flux2": ("flux-2-dev/lora", "flux2"),
    "flux2-klein": ("flux-2-klein/lora", "flux2_klein"),
    "zimage": ("z-image/lora", "zimage"),
    "qwen-image": ("qwen-image/lora", "qwen_image"),
}
_FLUX_SCHNELL_SPEC = "flux-1-schnell/lora"
_SPEC_TO_ARCH = {spec: arch for arch, (spec, _) in ARCHITECTURES.items()} | {_FLUX_SCHNELL_SPEC: "flux"}

# The lora_adapter_metadata fields diffusers needs to rebuild the LoraConfig. The full
# LoraConfig.to_dict() also holds fields of the newest PEFT, which older PEFT versions refuse
# (`LoraConfig(**metadata)` raises on unknown keywords), so only these portable ones are written.
_ADAPTER_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora")

DEFAULT_USAGE_HINT = (
    "Scale is baked in: strength 1.0 reproduces the trained model. ComfyUI: LoraLoaderModelOnly; "
    "diffusers: pipe.load_lora_weights(path)."
)


class LoraFormatError(PECError):
    """A file (or tensor set) that is not a LoRA in the PEC/diffusers layout; the message is one line."""


def _error(where: object, problem: str) -> LoraFormatError:
    # Keys and paths come from untrusted files: keep the message on one line whatever they contain.
    return LoraFormatError(" ".join(f"{where}: {problem}".splitlines()))


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(key: str, limit: int = 80) -> str:
    """A file-supplied name, quoted (control characters escaped) and clipped for a one-line message."""
    return _clip(repr(key), limit)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def module_path(key: str) -> str:
    """The bare diffusers module path of a LoRA tensor key or module name.

    ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` -> ``transformer_blocks.0.attn.to_q``;
    PEFT's ``base_model.model.`` wrapper and diffusers' ``transformer.`` prefix are removed.
    """
    for suffix in (_A, _B):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
            break
    for wrapper in _WRAPPERS:
        if key.startswith(wrapper):
            key = key[len(wrapper) :]
    return key


# ----------------------------------------------------------------------------- architecture


_BLOCK_RE = re.compile(r"(?:^|\.)transformer_blocks\.(\d{1,9})\.(.*)$")
_SINGLE_RE = re.compile(r"(?:^|\.)single_transformer_blocks\.\d{1,9}\.")
_HIDDEN_KEYS = {"attn.to_q.weight", "attn.to_k.weight", "attn.to_q" + _A, "attn.to_k" + _A}
# Z-Image: single-stream "layers" with attention / feed_forward, plus the noise and context refiners.
_ZIMAGE_RE = re.compile(
    r"(?:^|\.)(?:(?:noise|context)_refiner\.\d{1,9}\.|layers\.\d{1,9}\.(?:attention|feed_forward)\.)"
)
# Qwen-Image: MMDiT blocks with per-stream MLPs and modulations (FLUX.1 and SD3 name them ff / norm1).
_QWENIMAGE_RE = re.compile(r"(?:^|\.)transformer_blocks\.\d{1,9}\.(?:img_mlp|txt_mlp|img_mod|txt_mod)\.")
# FLUX.2 (diffusers layout): SwiGLU ff.linear_in/out and the single blocks' fused qkv+MLP projection.
_FLUX2_RE = re.compile(
    r"(?:^|\.)(?:transformer_blocks\.\d{1,9}\.ff(?:_context)?\.linear_(?:in|out)|attn\.to_qkv_mlp_proj)\."
)
# Original (BFL) layout: FLUX.2's SwiGLU MLPs are 2·3h wide (FLUX.1: 4h), its single blocks' linear1 9h (FLUX.1: 7h).
_BFL_MLP_RE = re.compile(
    r"(?:^|\.)(?:double_blocks\.\d{1,9}\.img_mlp\.0|single_blocks\.\d{1,9}\.linear1)\.lora_B\.weight$"
)
_FLUX_DOUBLE_BLOCKS = 19  # FLUX.1 has 19 double blocks: a 3072-wide block index beyond is Qwen-Image's (60)


def guess_architecture(keys_and_shapes: Mapping[str, Any]) -> str:
    """Guess the base model family from tensor keys and shapes.

    Args:
        keys_and_shapes: ``{key: shape or tensor}``; LoRA keys (``...lora_A.weight`` [r, in]) or a
            diffusers transformer's own state dict (``...weight`` [out, in]); any prefix is fine.

    Returns ``"sd3" | "sd3.5-medium" | "sd3.5-large" | "flux" | "flux2" | "zimage" | "qwen-image" | "unknown"``,
    by these rules in order:

    1. any ``ff.linear_in|out`` / ``ff_context.linear_in|out`` / ``attn.to_qkv_mlp_proj`` key, or in the BFL
       layout an ``img_mlp.0`` 6x / ``linear1`` 9x wider than its input (lora_B and lora_A shapes) -> ``flux2``;
       any other ``single_transformer_blocks.N.`` key -> ``flux`` (only FLUX has single-stream blocks);
       any ``noise_refiner`` / ``context_refiner`` / ``layers.N.attention|feed_forward`` key -> ``zimage``;
       any ``transformer_blocks.N.img_mlp|txt_mlp|img_mod|txt_mod`` key -> ``qwen-image``;
    2. no ``transformer_blocks.N.`` key -> ``unknown``;
    3. hidden size (in-features of ``attn.to_q`` / ``attn.to_k``) 3072 -> ``qwen-image`` when a block
       index is 19 or more, else ``flux`` (a FLUX LoRA that only targets the double blocks; no SD3 model
       is that wide);
    4. any ``transformer_blocks.N.attn2.`` key -> ``sd3.5-medium`` (MMDiT-X self-attention blocks);
    5. hidden size 2432 or any block index >= 24 -> ``sd3.5-large`` (38 blocks, 38 heads x 64);
    6. otherwise ``sd3`` (24 blocks of 1536: SD3-Medium, or an SD3.5-Medium LoRA that leaves the
       attn2 blocks alone -- the keys cannot tell these apart).
    """
    hidden: set[int] = set()
    max_block = -1
    has_attn2 = False
    for key, value in keys_and_shapes.items():
        if _FLUX2_RE.search(key):
            return "flux2"
        if _BFL_MLP_RE.search(key):
            a_shape = keys_and_shapes.get(key.replace(".lora_B.", ".lora_A."))
            if a_shape is not None and _shape(value)[0] in (6 * _shape(a_shape)[1], 9 * _shape(a_shape)[1]):
                return "flux2"
        if _SINGLE_RE.search(key):
            return "flux"
        if _ZIMAGE_RE.search(key):
            return "zimage"
        if _QWENIMAGE_RE.search(key):
            return "qwen-image"
        match = _BLOCK_RE.search(key)
        if match is None:
            continue
        max_block = max(max_block, int(match.group(1)))
        rest = match.group(2)
        has_attn2 = has_attn2 or rest.startswith("attn2.")
        if rest in _HIDDEN_KEYS:
            shape = _shape(value)
            if len(shape) == 2:
                hidden.add(shape[1])
    if max_block < 0:
        return "unknown"
    if 3072 in hidden:
        return "qwen-image" if max_block >= _FLUX_DOUBLE_BLOCKS else "flux"
    if has_attn2:
        return "sd3.5-medium"
    if 2432 in hidden or max_block >= 24:
        return "sd3.5-large"
    return "sd3"


def _modelspec_architecture(arch: str, base_model: str | None) -> str:
    if arch == "flux" and base_model and "schnell" in base_model.lower():
        return _FLUX_SCHNELL_SPEC
    return ARCHITECTURES[arch][0]


# ----------------------------------------------------------------------------- LoRA structure


def _lora_modules(shapes: Mapping[str, tuple[int, ...]], where: object) -> dict[str, tuple[int, int, int]]:
    """Pair ``<m>.lora_A.weight`` [r, in] with ``<m>.lora_B.weight`` [out, r].

    Args:
        shapes: ``{tensor key: shape}``; keys other than lora_A/lora_B weights are ignored.
    Returns:
        ``{m: (r, in, out)}`` in key order; raises :class:`LoraFormatError` on an unpaired or
        mis-shaped tensor, or when there is no pair at all.
    """
    modules: dict[str, tuple[int, int, int]] = {}
    for key, a_shape in shapes.items():
        if not key.endswith(_A):
            continue
        module = key[: -len(_A)]
        b_shape = shapes.get(module + _B)
        if b_shape is None:
            raise _error(where, f"{_short(key)} has no matching lora_B.weight")
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise _error(
                where,
                f"LoRA tensors of {_short(module)} must be 2-D, got lora_A {list(a_shape)} and lora_B {list(b_shape)}",
            )
        if a_shape[0] != b_shape[1] or a_shape[0] == 0:
            raise _error(
                where,
                f"rank mismatch in {_short(module)}: lora_A {list(a_shape)} is [r, in], lora_B {list(b_shape)} "
                "must be [out, r] with the same r > 0",
            )
        modules[module] = (a_shape[0], a_shape[1], b_shape[0])
    orphans = [k for k in shapes if k.endswith(_B) and k[: -len(_B)] not in modules]
    if orphans:
        raise _error(where, f"{_short(orphans[0])} has no matching lora_A.weight")
    if not modules:
        first = ", ".join(_short(k, 60) for k in list(shapes)[:3]) or "none"
        kohya = any("lora_down" in k or "lora_up" in k or k.endswith(".alpha") for k in shapes)
        hint = (
            "; it looks like a kohya/sd-scripts LoRA (lora_down/lora_up/.alpha), which this tool does not read"
            if kohya
            else ""
        )
        raise _error(
            where,
            f"has {len(shapes)} tensors but no lora_A/lora_B pairs; not a LoRA in the diffusers layout "
            f"(first keys: {first}){hint}",
        )
    return modules


# ----------------------------------------------------------------------------- writing


def _pairs_from_state(state: Mapping[str, torch.Tensor], where: object) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{any-prefix <m>.lora_A/B.weight: tensor}`` -> ``{bare m: (A [r, in], B [out, r])}``."""
    unsupported = [k for k in state if not (k.endswith(_A) or k.endswith(_B))]
    if unsupported:
        raise _error(
            where,
            f"cannot save {len(unsupported)} tensor(s) that are not lora_A/lora_B weights (first: "
            f"{_short(unsupported[0])}); DoRA, LoRA biases, embedding LoRAs and modules_to_save have no "
            "place in this layout",
        )
    by_module: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        suffix = _A if key.endswith(_A) else _B
        bare = module_path(key) + suffix
        if bare in by_module:
            raise _error(where, f"two tensors map to the module key {_short(bare)} once prefixes are removed")
        by_module[bare] = tensor
    modules = _lora_modules({k: _shape(v) for k, v in by_module.items()}, where)
    return {m: (by_module[m + _A], by_module[m + _B]) for m in modules}


def _from_peft(model: torch.nn.Module, adapter_name: str, where: object):
    """A peft-adapted transformer (``add_adapter`` or a ``PeftModel``) -> ``{m: (A, B, scale)}``."""
    from peft.utils import get_peft_model_state_dict
    from peft.utils.other import get_pattern_key

    configs = model.peft_config
    if adapter_name not in configs:
        raise _error(where, f"the model has no adapter {adapter_name!r} (adapters: {sorted(configs)})")
    config = configs[adapter_name]
    if getattr(config, "peft_type", None) != "LORA":  # PeftType is a str enum
        raise _error(where, f"adapter {adapter_name!r} is {config.peft_type}, not a LoRA")
    if getattr(config, "use_dora", False):
        raise _error(
            where,
            "DoRA adapters cannot be saved in this layout: ComfyUI and diffusers would load them as plain "
            "LoRAs and change the result; train with use_dora=False",
        )
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    out = {}
    for module, (a, b) in _pairs_from_state(state, where).items():
        rank = a.shape[0]
        # PEFT matches patterns against the module name inside the wrapped model: the bare path.
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        out[module] = (a, b, alpha / math.sqrt(rank) if config.use_rslora else alpha / rank)
    return out


def _from_dict(state: Mapping[str, torch.Tensor], rank: int | None, alpha: float | None, where: object):
    """``{<m>.lora_A.weight: [r, in], <m>.lora_B.weight: [out, r]}`` -> ``{m: (A, B, alpha / r)}``."""
    if alpha is None:
        raise ValueError("save_lora with a tensor dict needs alpha= (and optionally rank= to check the shapes)")
    out = {}
    for module, (a, b) in _pairs_from_state(state, where).items():
        if rank is not None and a.shape[0] != rank:
            raise _error(where, f"{_short(module)} has rank {a.shape[0]}, but rank={rank} was given")
        out[module] = (a, b, alpha / a.shape[0])
    return out


def _adapter_metadata(ranks: Mapping[str, int]) -> dict[str, Any]:
    """diffusers' ``lora_adapter_metadata`` for baked tensors: lora_alpha == r, alpha_pattern == rank_pattern."""
    from peft import LoraConfig

    r = Counter(ranks.values()).most_common(1)[0][0]
    # "^" anchors the pattern at the start of the module name, as diffusers does (peft#2419).
    pattern = {"^" + m: k for m, k in ranks.items() if k != r}
    config = LoraConfig(
        r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=pattern, alpha_pattern=dict(pattern)
    ).to_dict()
    fields = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items() if k in _ADAPTER_FIELDS}
    return {FILE_PREFIX + k: v for k, v in fields.items()}


def save_lora(
    source: torch.nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    rank: int | None = None,
    alpha: float | None = None,
    adapter_name: str = "default",
    dtype: torch.dtype = torch.bfloat16,
    architecture: str | None = None,
    base_model: str | None = None,
    title: str | None = None,
    resolution: str | int | None = None,
    license: str | None = None,
    usage_hint: str | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write a LoRA in the PEC layout (docs/design.md §8), atomically; FLUX.2 (``architecture`` flux2 / flux2-klein, or
    guessed so) in the original BFL layout of :func:`flux2_to_bfl`, the one ComfyUI loads completely.

    Args:
        source: a diffusers transformer with a PEFT LoRA (``transformer.add_adapter(LoraConfig(...))``)
            or a ``PeftModel`` wrapping one -- rank, alpha, rank/alpha patterns and rsLoRA come from its
            ``peft_config[adapter_name]``; or a plain dict ``{"<m>.lora_A.weight": [r, in],
            "<m>.lora_B.weight": [out, r]}`` (``transformer.`` / ``base_model.model.`` prefixes allowed)
            with ``alpha`` (and optionally ``rank``, checked against the shapes) given.
        path: destination ``.safetensors`` file; written through a temporary file in the same folder.
        dtype: dtype of the stored tensors (the scale is applied in float32 first).
        architecture: one of :data:`ARCHITECTURES`; default: :func:`guess_architecture` on the keys.
        base_model: base model id (hub id or path), stored as ``pec.base_model_id``.
        provenance: ``{key: value}`` written as ``pec.<key>`` (non-strings JSON-encoded), e.g. method,
            beta, encoder, rewards, noise_level, group_size, global_step, config_hash, eval.

    Returns:
        The header metadata written (``{str: str}``).
    """
    where = os.fspath(path)
    if isinstance(source, Mapping):
        modules = _from_dict(source, rank, alpha, where)
    elif isinstance(source, torch.nn.Module) and hasattr(source, "peft_config"):
        if rank is not None or alpha is not None:
            raise ValueError("rank and alpha come from the adapter's LoraConfig; pass them only with a tensor dict")
        modules = _from_peft(source, adapter_name, where)
    else:
        raise TypeError(f"save_lora needs a PEFT-adapted model or a dict of tensors, got {type(source).__name__}")
    if dtype not in _SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(map(str, _SAVE_DTYPES))}, got {dtype}")
    if architecture is not None and architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}")

    tensors: dict[str, torch.Tensor] = {}
    for module, (a, b, scale) in modules.items():
        tensors[FILE_PREFIX + module + _A] = a.detach().to("cpu", dtype).contiguous()
        tensors[FILE_PREFIX + module + _B] = (b.detach().to("cpu", torch.float32) * scale).to(dtype).contiguous()
    ranks = {m: a.shape[0] for m, (a, _, _) in modules.items()}
    arch = architecture or guess_architecture({m + _A: a.shape for m, (a, _, _) in modules.items()})
    if arch.startswith("flux2"):
        # diffusers' lora_adapter_metadata would describe modules the file does not have: without it
        # diffusers takes each rank from the shapes with alpha == rank, i.e. the baked scale 1.
        tensors = flux2_to_bfl(tensors, where)
    adapter = _adapter_metadata(ranks)
    r = adapter[FILE_PREFIX + "r"]
    metadata = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title or os.path.splitext(os.path.basename(where))[0],
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "modelspec.usage_hint": usage_hint or DEFAULT_USAGE_HINT,
        "ss_network_dim": str(r),
        "ss_network_alpha": str(r),  # baked scale: alpha == dim means "multiply by 1"
    }
    if not arch.startswith("flux2"):
        metadata["lora_adapter_metadata"] = json.dumps(adapter, sort_keys=True)
    if arch in ARCHITECTURES:  # an unrecognised key set gets no architecture rather than a wrong one
        metadata["modelspec.architecture"] = _modelspec_architecture(arch, base_model)
        metadata["ss_base_model_version"] = ARCHITECTURES[arch][1]
        metadata["modelspec.resolution"] = "1024x1024"
    if resolution is not None:
        metadata["modelspec.resolution"] = f"{resolution}x{resolution}" if isinstance(resolution, int) else resolution
    if license is not None:
        metadata["modelspec.license"] = license
    pec = {"trainer_version": __version__, **(provenance or {})}
    if base_model is not None:
        pec["base_model_id"] = base_model
    for key, value in pec.items():
        metadata[f"pec.{key}"] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)

    _write_atomic(tensors, metadata, where)
    return metadata


# FLUX.2 diffusers module (after the block index) -> (BFL module, slice of a fused q/k/v weight or None).
_FLUX2_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.linear_in": ("img_mlp.0", None),
    "ff.linear_out": ("img_mlp.2", None),
    "ff_context.linear_in": ("txt_mlp.0", None),
    "ff_context.linear_out": ("txt_mlp.2", None),
}
_FLUX2_SINGLE = {"attn.to_qkv_mlp_proj": ("linear1", None), "attn.to_out": ("linear2", None)}
_FLUX2_BLOCK_RE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d{1,9})\.(.+)$")
BFL_PREFIX = "diffusion_model."
_BFL_MODULE_RE = re.compile(r"^diffusion_model\.(double_blocks|single_blocks)\.(\d{1,9})\.(.+)\.lora_A\.weight$")


def _flux2_bfl_module(module: str, where: object) -> tuple[str, int | None]:
    """``transformer_blocks.3.attn.to_k`` -> (``double_blocks.3.img_attn.qkv``, 1)."""
    match = _FLUX2_BLOCK_RE.match(module)
    table = _FLUX2_DOUBLE if match and match.group(1) == "transformer_blocks" else _FLUX2_SINGLE
    target = table.get(match.group(3)) if match else None
    if target is None:
        raise _error(
            where,
            f"FLUX.2 module {_short(module)} has no place in the original (BFL) layout that ComfyUI loads; "
            f"LoRA targets must be among {sorted(_FLUX2_DOUBLE)} (double blocks) and {sorted(_FLUX2_SINGLE)} (single)",
        )
    kind = "double_blocks" if match.group(1) == "transformer_blocks" else "single_blocks"
    return f"{kind}.{match.group(2)}.{target[0]}", target[1]


def flux2_to_bfl(tensors: Mapping[str, torch.Tensor], where: object = "FLUX.2 LoRA") -> dict[str, torch.Tensor]:
    """A FLUX.2 LoRA in diffusers module paths -> the original (BFL) layout, exactly.

    Args:
        tensors: ``{"transformer.<diffusers module>.lora_A.weight": [r, in], ...lora_B.weight: [out, r]}``.
    Returns:
        ``{"diffusion_model.<BFL module>.lora_A/B.weight": ...}``. Renamed modules keep their tensors; the
        q, k, v projections of a stream fuse into one LoRA of its ``qkv`` weight ``[3·out, in]``:
        ``A = [A_q; A_k; A_v]`` ``[r_q + r_k + r_v, in]`` and ``B = blockdiag(B_q, B_k, B_v)``, so
        ``B A = [B_q A_q; B_k A_k; B_v A_v]``; a projection the LoRA leaves out gets zero rows.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for key, a in tensors.items():
        if not key.endswith(_A):
            continue
        b = tensors[key[: -len(_A)] + _B]
        bfl, part = _flux2_bfl_module(module_path(key), where)
        if part is None:
            out[BFL_PREFIX + bfl + _A], out[BFL_PREFIX + bfl + _B] = a, b
        else:
            fused.setdefault(bfl, {})[part] = (a, b)
    for bfl, parts in fused.items():
        rows = next(iter(parts.values()))[1].shape[0]
        ranks = {i: a.shape[0] for i, (a, _) in parts.items()}
        a_fused = torch.cat([parts[i][0] for i in sorted(parts)])
        b_fused = a_fused.new_zeros(3 * rows, a_fused.shape[0])
        col = 0
        for i in sorted(parts):
            b_fused[i * rows : (i + 1) * rows, col : col + ranks[i]] = parts[i][1]
            col += ranks[i]
        out[BFL_PREFIX + bfl + _A], out[BFL_PREFIX + bfl + _B] = a_fused, b_fused
    return out


def flux2_from_bfl(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FLUX.2 LoRA in the BFL layout -> diffusers module paths (``transformer.<module>.lora_A/B.weight``).

    The inverse of :func:`flux2_to_bfl` as diffusers' converter does it, exact for any BFL file: a fused
    ``qkv`` LoRA ``(A, B)`` becomes q, k and v LoRAs sharing ``A`` with ``B``'s three row blocks.
    Keys not in the BFL layout pass through unchanged.
    """
    # (kind, BFL module, diffusers module, slice): a fused qkv appears three times
    inverse = [("double_blocks", bfl, name, part) for name, (bfl, part) in _FLUX2_DOUBLE.items()]
    inverse += [("single_blocks", bfl, name, part) for name, (bfl, part) in _FLUX2_SINGLE.items()]
    blocks = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}
    out = dict(tensors)
    for key in tensors:
        match = _BFL_MODULE_RE.match(key)
        if match is None:
            continue
        kind, index, bfl = match.groups()
        names = [(n, p) for k, m, n, p in inverse if (k, m) == (kind, bfl)]
        if not names:
            continue  # not a module FLUX.2 LoRAs target: left as it is, for the caller's fit check
        a, b = out.pop(key), out.pop(key[: -len(_A)] + _B)
        for name, part in names:
            module = f"{FILE_PREFIX}{blocks[kind]}.{index}.{name}"
            rows = b.shape[0] // 3 if part is not None else b.shape[0]
            out[module + _A] = a
            out[module + _B] = b if part is None else b[part * rows : (part + 1) * rows]
    return out


def _write_atomic(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str) -> None:
    # A unique name in the destination folder, so os.replace is an atomic rename on the same file system;
    # safetensors creates it, so it gets the usual permissions (mkstemp would make it 0600).
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        # Without fsync a crash right after the rename can leave an empty file under the final name.
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class _Header:
    path: str
    file_bytes: int
    dtypes: dict[str, str]  # tensor key -> safetensors dtype code
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]
    modules: dict[str, tuple[int, int, int]]  # file module key -> (r, in, out)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _nbytes(shape: list[int], bits: int, limit: int) -> int | None:
    """Bytes of a tensor, or None when it exceeds ``limit`` (stops early: shapes may be absurd)."""
    if 0 in shape:
        return 0
    count = 1
    for dim in shape:
        count *= dim
        if count * bits > 8 * limit:
            return None
    return count * bits // 8


def _parse_header(path: str, size: int, raw: bytes) -> tuple[dict, dict, dict[str, str]]:
    """Validate the JSON header; returns ``(dtypes, shapes, metadata)``."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _error(path, "not a safetensors file (header is not UTF-8 text)") from None
    except (ValueError, RecursionError):
        raise _error(path, "not a safetensors file (header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise _error(path, "not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _error(path, "__metadata__ must map strings to strings")
    data_bytes = size - 8 - len(raw)
    dtypes: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for key, entry in header.items():
        name = _short(key)
        if not isinstance(entry, dict):
            raise _error(path, f"tensor {name} has no dtype/shape/data_offsets entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPE_BITS:
            raise _error(path, f"tensor {name} has unknown dtype {_short(str(dtype), 30)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise _error(path, f"tensor {name} has an invalid shape (needs a list of non-negative integers)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise _error(path, f"tensor {name} has invalid data_offsets (needs [begin, end])")
        begin, end = offsets
        if not begin <= end <= data_bytes:
            raise _error(path, f"tensor {name} data_offsets {offsets} lie outside the {data_bytes} data bytes")
        needed = _nbytes(shape, _DTYPE_BITS[dtype], data_bytes)
        if needed != end - begin:
            shown = "more than the file holds" if needed is None else f"{needed} bytes"
            raise _error(
                path,
                f"tensor {name} of shape {_clip(str(shape), 60)} {dtype} needs {shown}, "
                f"its data_offsets span {end - begin}",
            )
        dtypes[key], shapes[key] = dtype, tuple(shape)
    return dtypes, shapes, metadata


def _read_header(path: str | os.PathLike) -> _Header:
    """Read and validate the header of a LoRA file without reading the tensor data."""
    name = os.fspath(path)
    try:
        info = os.stat(name)
        if stat.S_ISDIR(info.st_mode):
            raise _error(name, "is a directory, not a LoRA file")
        if not stat.S_ISREG(info.st_mode):
            raise _error(name, "is not a regular file")
        size = info.st_size
        if size < 8:
            raise _error(name, f"not a safetensors file (only {size} bytes)")
        with open(name, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length > min(size - 8, _MAX_HEADER_BYTES):
                raise _error(
                    name,
                    f"not a safetensors file or truncated (header length {length} but the file has {size} bytes)",
                )
            raw = handle.read(length)
    except FileNotFoundError:
        raise _error(name, "no such file") from None
    except (OSError, ValueError) as err:  # ValueError: e.g. a NUL byte in the path
        raise _error(name, f"cannot read it ({getattr(err, 'strerror', None) or err})") from None
    if len(raw) != length:
        raise _error(name, "file changed while being read")
    dtypes, shapes, metadata = _parse_header(name, size, raw)
    modules = _lora_modules(shapes, name)
    for module in modules:
        for key in (module + _A, module + _B):
            if dtypes[key] not in _FLOAT_DTYPES:
                raise _error(name, f"LoRA tensor {_short(key)} has dtype {dtypes[key]}, expected a float type")
    return _Header(name, size, dtypes, shapes, metadata, modules)


@contextlib.contextmanager
def _safetensors_errors(path: str):
    # The header checks above leave safetensors little to reject (e.g. overlapping data ranges); whatever
    # it still raises becomes a LoraFormatError.
    try:
        yield
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _error(path, f"safetensors cannot read it ({err})") from None


def load_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file after validating it.

    Returns ``(tensors, metadata)``: every tensor of the file under its file key (LoRA pairs
    ``<m>.lora_A.weight`` [r, in] / ``<m>.lora_B.weight`` [out, r], plus any other tensor the file
    holds) and the header's ``__metadata__`` (``{str: str}``, empty if absent).

    Raises :class:`LoraFormatError` (and nothing else) for any file that is not a readable LoRA:
    missing, a directory, truncated, not safetensors, absurd sizes, bad JSON, unknown dtypes, no
    lora_A/lora_B pairs, mismatched ranks.
    """
    header = _read_header(path)
    with _safetensors_errors(header.path), safetensors.safe_open(header.path, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors, dict(header.metadata)


# ----------------------------------------------------------------------------- inspecting


_BLOCK_INDEX_RE = re.compile(r"(blocks)\.\d+\.")


def _module_kind(module: str) -> str:
    """``transformer_blocks.3.attn.to_q`` -> ``transformer_blocks.*.attn.to_q``."""
    return _BLOCK_INDEX_RE.sub(r"\1.*.", module)


def _json_or_str(value: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return value


@dataclasses.dataclass
class LoraInfo:
    """What :func:`inspect_lora` finds in a LoRA file (JSON-friendly through :meth:`to_dict`)."""

    path: str
    file_bytes: int
    architecture: str  # guessed from the keys (see guess_architecture)
    declared_architecture: str | None  # modelspec.architecture
    architecture_mismatch: bool
    rank: int  # the largest rank
    ranks: list[int]
    module_count: int  # lora_A/lora_B pairs
    module_kinds: dict[str, int]  # module path with block indices as "*" -> count
    dtypes: list[str]  # safetensors dtype codes of the LoRA tensors
    parameter_count: int
    scale_baked: bool  # no .alpha tensors and lora_adapter_metadata (if any) has alpha == r
    base_model: str | None
    title: str | None
    usage_hint: str | None
    provenance: dict[str, Any]  # pec.* without the prefix, JSON values decoded
    metadata_keys: list[str]
    notes: list[str]  # things a user should know (mismatch, PEFT wrapper, unbaked scale, ...)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_compatible(guessed: str, declared: str | None) -> bool:
    # "sd3" only means "SD3 family without 3.5 evidence": it does not contradict an SD3.5 declaration.
    if declared is None or guessed == "unknown":
        return True
    declared_arch = _SPEC_TO_ARCH.get(declared)
    if declared_arch is None:
        return False
    return declared_arch == guessed or any(guessed == f and declared_arch.startswith(f) for f in ("sd3", "flux2"))


def _adapter_scale_baked(metadata: Mapping[str, str], notes: list[str]) -> bool:
    """Whether diffusers would apply scale 1.0 (lora_alpha == r everywhere); explains a "no" in ``notes``."""
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return True
    config = _json_or_str(raw)
    if not isinstance(config, dict):
        notes.append("lora_adapter_metadata is not a JSON object: diffusers cannot load this file")
        return False
    config = {module_path(k): v for k, v in config.items()}
    baked = (
        config.get("lora_alpha") == config.get("r")
        and (config.get("alpha_pattern") or {}) == (config.get("rank_pattern") or {})
        and not config.get("use_rslora")
    )
    if not baked:
        notes.append("lora_adapter_metadata scales by lora_alpha/r != 1: ComfyUI ignores it, so strengths differ")
    return baked


def inspect_lora(path: str | os.PathLike) -> LoraInfo:
    """Describe a LoRA file from its (validated) header, without loading the tensor data.

    Raises :class:`LoraFormatError` exactly when :func:`load_lora` would.
    """
    header = _read_header(path)
    with _safetensors_errors(header.path), safetensors.safe_open(header.path, framework="pt"):
        pass  # safetensors' own header checks, as load_lora would run them
    metadata = header.metadata
    lora_keys = [m + s for m in header.modules for s in (_A, _B)]
    architecture = guess_architecture({k: header.shapes[k] for k in lora_keys})
    declared = metadata.get("modelspec.architecture")
    notes: list[str] = []
    mismatch = not _is_compatible(architecture, declared)
    if mismatch:
        notes.append(f"keys look like {architecture} but the header declares {declared}")

    alpha_keys = [k for k in header.shapes if k.endswith(".alpha")]
    if alpha_keys:
        notes.append(f"{len(alpha_keys)} .alpha tensors: the scale is not baked in, loaders may disagree on strength")
    scale_baked = _adapter_scale_baked(metadata, notes) and not alpha_keys
    if any(m.startswith("base_model.model.") for m in header.modules):
        notes.append("keys carry PEFT's base_model.model. wrapper: a raw PEFT file, not the docs/design.md §8 layout")
    elif not all(m.startswith(FILE_PREFIX) for m in header.modules) and not (
        architecture == "flux2" and all(m.startswith(BFL_PREFIX) for m in header.modules)
    ):
        notes.append("keys lack the transformer. prefix that diffusers and ComfyUI expect")
    others = len(header.shapes) - len(lora_keys) - len(alpha_keys)
    if others:
        notes.append(f"{others} tensors besides the LoRA pairs")

    ranks = sorted({r for r, _, _ in header.modules.values()})
    provenance = {k[len("pec.") :]: _json_or_str(v) for k, v in metadata.items() if k.startswith("pec.")}
    base_model = provenance.get("base_model_id")
    return LoraInfo(
        path=header.path,
        file_bytes=header.file_bytes,
        architecture=architecture,
        declared_architecture=declared,
        architecture_mismatch=mismatch,
        rank=ranks[-1],
        ranks=ranks,
        module_count=len(header.modules),
        module_kinds=dict(sorted(Counter(_module_kind(module_path(m)) for m in header.modules).items())),
        dtypes=sorted({header.dtypes[k] for k in lora_keys}),
        parameter_count=sum(r * (i + o) for r, i, o in header.modules.values()),
        scale_baked=scale_baked,
        base_model=base_model if isinstance(base_model, str) else None,
        title=metadata.get("modelspec.title"),
        usage_hint=metadata.get("modelspec.usage_hint"),
        provenance=provenance,
        metadata_keys=sorted(metadata),
        notes=notes,
    )


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def _show(value: Any) -> str:
    """Provenance values for people: lists as "a, b", dicts as "k=v  k=v"."""
    if isinstance(value, list):
        return ", ".join(map(_show, value))
    if isinstance(value, dict):
        return "  ".join(f"{k}={_show(v)}" for k, v in value.items())
    return str(value)


def format_lora_info(info: LoraInfo) -> str:
    """A readable multi-line summary of :func:`inspect_lora`'s result, for people choosing a LoRA."""
    prov = info.provenance
    arch = info.architecture
    if info.declared_architecture:
        arch += f" (declared: {info.declared_architecture}{', MISMATCH' if info.architecture_mismatch else ''})"
    lines = [f"{os.path.basename(info.path)}  ({_size(info.file_bytes)})"]

    def row(label: str, value: Any) -> None:
        if value not in (None, "", [], {}):
            lines.append(f"  {label:<13}{value}")

    row("title", info.title)
    row("architecture", arch)
    revision = prov.get("base_model_revision")
    row("base model", f"{info.base_model}{f' @ {revision}' if revision else ''}" if info.base_model else None)
    method = [_show(prov["method"])] if "method" in prov else []
    method += [
        f"{label}={_show(prov[key])}"
        for key, label in (("beta", "β"), ("encoder", "encoder"), ("rewards", "rewards"))
        if key in prov
    ]
    row("method", "  ".join(method))
    ranks = "" if len(info.ranks) == 1 else f" (ranks {', '.join(map(str, info.ranks))})"
    row("rank", f"{info.rank}{ranks}")
    row(
        "modules",
        f"{info.module_count} LoRA pairs, {info.parameter_count:,} parameters, {', '.join(info.dtypes)}",
    )
    for kind, count in info.module_kinds.items():
        lines.append(f"  {'':<13}  {count:>4} x {kind}")
    row("scale", "baked in (use strength 1.0)" if info.scale_baked else "NOT baked in (see notes)")
    training = [f"{key}={_show(prov[key])}" for key in ("global_step", "noise_level", "group_size") if key in prov]
    row("training", "  ".join(training))
    row("eval", _show(prov.get("eval", "")))
    row("trainer", _show(prov.get("trainer_version", "")))
    row("usage", info.usage_hint)
    for note in info.notes:
        row("note", note)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- key coverage


class KeyCoverage(NamedTuple):
    """Which LoRA modules a model has (``matched``) and which it lacks (``unmatched``); bare paths, sorted."""

    matched: list[str]
    unmatched: list[str]


def lora_key_coverage(lora_keys: Iterable[str], model_module_names: Iterable[str]) -> KeyCoverage:
    """Match LoRA modules against a model's module names.

    Args:
        lora_keys: LoRA tensor keys or module paths, any prefix (``transformer.``, ``base_model.model.``);
            ``.alpha`` keys are skipped (they belong to a module, they are not one).
        model_module_names: the model's module names (e.g. ``name for name, _ in model.named_modules()``,
            or a ComfyUI key map's diffusers-side keys), prefixes likewise ignored.
    """
    modules = {module_path(k) for k in lora_keys if not k.endswith(".alpha")}
    available = {module_path(k) for k in model_module_names}
    return KeyCoverage(sorted(modules & available), sorted(modules - available))

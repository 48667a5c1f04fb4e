"""Does a PEC LoRA file fit the model it is applied to? The checks of the PEC LoRA Loader node,
on plain values (LoraInfo, key coverage, the model's family) so tests run them without ComfyUI."""

from __future__ import annotations

from .. import PECError
from ..lora_format import ARCHITECTURES, KeyCoverage, LoraInfo, format_lora_info

__all__ = ["check_lora", "lora_family", "model_family"]

# ComfyUI model-config class names (comfy.supported_models) → the LoRA family they take.
_CONFIG_FAMILIES = {"SD3": "sd3", "Flux2": "flux2", "Flux": "flux", "ZImage": "zimage", "QwenImage": "qwen-image"}


def model_family(config_class_names: list[str]) -> str:
    """``"sd3"`` / ``"flux"`` / ``"flux2"`` / ``"zimage"`` / ``"qwen-image"`` / ``"other:<name>"`` from a model
    config's class and its bases, the most derived first (``Flux2`` derives from ``Flux``; ComfyUI's
    ``FluxSchnell`` and ``FluxInpaint`` derive from ``Flux``; SD3, SD3.5 Medium and Large are ``SD3``)."""
    for name in config_class_names:
        if name in _CONFIG_FAMILIES:
            return _CONFIG_FAMILIES[name]
    return f"other:{config_class_names[0] if config_class_names else 'unknown'}"


def lora_family(info: LoraInfo) -> str:
    """The family of :func:`model_family` a LoRA is for, or ``"unknown"``: from the declared architecture
    when the header has one we know, else from the one guessed from the keys (the embedded toy model's
    LoRAs are SD3-family)."""
    declared = next((arch for arch, (spec, _) in ARCHITECTURES.items() if spec == info.declared_architecture), None)
    arch = declared or info.architecture
    if arch.startswith("sd3"):
        return "sd3"
    if arch.startswith("flux2"):  # dev and klein: one ComfyUI model class
        return "flux2"
    return arch if arch in set(_CONFIG_FAMILIES.values()) else "unknown"


def check_lora(
    info: LoraInfo, coverage: KeyCoverage, family: str, allow_mismatch: bool = False
) -> tuple[str, list[str]]:
    """Check a LoRA against a model and describe it.

    Args:
        info: :func:`comfy_pec.lora_format.inspect_lora` of the file.
        coverage: which of its modules the model has (:func:`comfy_pec.lora_format.lora_key_coverage`).
        family: :func:`model_family` of the model.
        allow_mismatch: turn the errors below into warnings.
    Returns:
        ``(summary, warnings)``: the multi-line summary (method, β, base model, usage hint, key counts,
        warnings) and the warnings alone.
    Raises:
        PECError: the LoRA is for another model family, or none of its modules exists in the model.
    """
    problems = []
    lora = lora_family(info)
    if lora != "unknown" and lora != family:
        problems.append(f"this LoRA is for {lora.upper()} models but the model is {family.removeprefix('other:')}")
    if not coverage.matched:
        problems.append(f"none of the LoRA's {len(coverage.unmatched)} modules exists in this model")
    if problems and not allow_mismatch:
        raise PECError(f"{info.path}: " + "; ".join(problems) + " (enable allow_mismatch to apply it anyway)")
    warnings = problems + info.notes
    if coverage.unmatched and coverage.matched:
        warnings.append(f"{len(coverage.unmatched)} LoRA modules have no counterpart in the model and are skipped")
    total = len(coverage.matched) + len(coverage.unmatched)
    keys = (
        f"  {'keys':<13}{len(coverage.matched)} of {total} modules matched the model "
        f"({family.removeprefix('other:')}), {len(coverage.unmatched)} unmatched"
    )
    lines = [format_lora_info(info), keys]
    lines += [f"  {'WARNING':<13}{w}" for w in problems]
    return "\n".join(lines), warnings

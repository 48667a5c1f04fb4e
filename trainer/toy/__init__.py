"""The embedded toy world ("shapes"): a procedural text-to-image data set and pixel rewards.

See :mod:`trainer.toy.world` for the generative distribution and the caption grammar, and
:mod:`trainer.toy.rewards` for the model-free rewards (prompt adherence, a single-mode preference).
"""

from .rewards import adherence_reward, preference_reward, to_image_tensor
from .world import (
    COLOUR_NAMES,
    COLOURS,
    HELDOUT_COMBOS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZE_WORDS,
    ObjectSpec,
    PromptSpec,
    Scene,
    ShapeObject,
    ShapesDataset,
    all_captions,
    caption,
    format_prompt,
    heldout_prompts,
    parse_prompt,
    render,
    sample_scene,
    sample_spec,
    scene_matches,
    spec_of,
    train_prompts,
)

__all__ = [
    "COLOURS",
    "COLOUR_NAMES",
    "HELDOUT_COMBOS",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZE_WORDS",
    "ObjectSpec",
    "PromptSpec",
    "Scene",
    "ShapeObject",
    "ShapesDataset",
    "adherence_reward",
    "all_captions",
    "caption",
    "format_prompt",
    "heldout_prompts",
    "parse_prompt",
    "preference_reward",
    "render",
    "sample_scene",
    "sample_spec",
    "scene_matches",
    "spec_of",
    "to_image_tensor",
    "train_prompts",
]

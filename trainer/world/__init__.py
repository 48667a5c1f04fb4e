"""The embedded world ("shapes"): a procedural text-to-image data set, its prompts and pixel rewards.

Part of the trainer's core (the toy rewards and prompt sets are used like any others); the tools that
pre-train the embedded model on it live in :mod:`trainer.toy`. See :mod:`trainer.world.scenes` for the
generative distribution and the caption grammar, :mod:`trainer.world.rewards` for the model-free rewards
(prompt adherence, a two-peaked preference) and :mod:`trainer.world.vocabulary` for the tokenizer.
"""

from .rewards import adherence_reward, preference_reward, to_image_tensor
from .scenes import (
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

"""PEC headless trainer: GRPO fine-tuning of flow-matching models with perceptual-entropy shaping.

The math lives once, in ``comfy_pec``; this package drives models, rewards, runs and files.
"""

from comfy_pec import __version__

__all__ = ["__version__"]

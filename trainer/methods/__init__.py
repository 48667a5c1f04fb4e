"""Training methods as modules behind one hook interface (:class:`~trainer.methods.base.Method`).

:data:`METHODS` lists them in the order the loop calls their hooks: E-GRPO before the Flow-GRPO baseline
(the first schedule wins), PEC/PCVAE shaping before DRIFT's, then the loss terms. Adding a method is one
module with a :class:`Method` subclass, its entry here, and its switches in :mod:`trainer.config`.
"""

from __future__ import annotations

from .base import Method, RunContext, ShapeInputs, StepInputs
from .cov import Cov
from .drift import Drift
from .egrpo import EGRPO
from .entropy_reg import EntropyReg
from .flow_grpo import FlowGRPO
from .pec import PCVAE, PEC

METHODS: list[type[Method]] = [EGRPO, FlowGRPO, PEC, PCVAE, Drift, Cov, EntropyReg]

__all__ = ["METHODS", "Method", "RunContext", "ShapeInputs", "StepInputs", "build_methods"]


def build_methods(config) -> list[Method]:
    """The methods ``config`` switches on, in hook order (the Flow-GRPO baseline is always one)."""
    return [m for cls in METHODS if (m := cls.from_config(config)) is not None]

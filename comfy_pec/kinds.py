"""The names of step kinds and window rules, shared by the trainer, `pec sample` and the ComfyUI nodes.

Torch-free, so the node pack can list them at ComfyUI start-up; :mod:`comfy_pec.sde` maps each name to
its function (``STEP_KINDS``) and implements each rule (``stochastic_steps``).
"""

#: Step kinds that inject noise (and so can be trained).
SDE_KINDS: tuple[str, ...] = ("flow_sde", "cps")
#: Every step kind: the Euler ODE step and the stochastic ones.
STEP_KIND_NAMES: tuple[str, ...] = ("ode", *SDE_KINDS)
#: Which steps of a schedule are stochastic (docs/design.md §3). E-GRPO's merged jumps change the schedule
#: itself and are not a mask rule.
WINDOW_RULES: tuple[str, ...] = ("all", "steps", "sigmas", "sliding")
#: The rules one sampling run can use (``sliding`` moves with the training iteration).
SAMPLER_WINDOWS: tuple[str, ...] = ("all", "steps", "sigmas")

"""What the diffusers-pipeline backends (SD3, FLUX) share: loading, precision, text encoders, VAE, LoRA.

* Loading: a hub id or a local pipeline directory (``from_pretrained``), or a single-file checkpoint
  of the transformer (``.safetensors`` in the original or the diffusers key layout, through
  ``from_single_file``) together with ``base``, the pipeline that supplies the transformer's config
  and every other component (VAE, text encoders, tokenizers, scheduler).
* Precision: the transformer and text encoders in the requested dtype (bf16 for real models), the
  VAE in float32 (decoding feeds the rewards and perceptual entropy); velocities come back float32,
  so the step math of ``comfy_pec.sde`` always runs in float32.
* Text: an optional per-prompt cache of the embeddings (:class:`PromptCache`) and optional offload
  of the text encoders to the CPU between encodes.
* Memory: optional gradient checkpointing of the transformer blocks.
"""

from __future__ import annotations

import abc
import contextlib
import os
from collections import OrderedDict
from typing import Any

import torch

from comfy_pec import PECError
from comfy_pec.lora_format import guess_architecture
from comfy_pec.pretrained import dtype_option

from .base import Backend, PromptEmbeds, load_lora_for, read_defaults

#: file endings taken as a single-file transformer checkpoint rather than a pipeline directory.
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth")


def is_single_file(path_or_id: str) -> bool:
    return path_or_id.lower().endswith(SINGLE_FILE_SUFFIXES)


class PromptCache:
    """Text conditioning per prompt, least recently used evicted first; entries live on the CPU.

    Real text encoders (T5-XXL) cost far more than a lookup, and GRPO encodes each prompt once per
    micro-batch of its group. Every entry is a prompt encoded alone, so its embedding does not depend
    on the batch it came in with (a resumed run replays the same numbers).
    """

    def __init__(self, size: int):
        self.size = int(size)
        self._items: OrderedDict[str, PromptEmbeds] = OrderedDict()

    def get(self, prompt: str) -> PromptEmbeds | None:
        item = self._items.get(prompt)
        if item is not None:
            self._items.move_to_end(prompt)
        return item

    def put(self, prompt: str, embeds: PromptEmbeds) -> None:
        self._items[prompt] = PromptEmbeds(embeds.embeds.detach().cpu(), embeds.pooled.detach().cpu())
        self._items.move_to_end(prompt)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class PipelineBackend(Backend):
    """A :class:`Backend` around a diffusers pipeline; subclasses add the family's conditioning and layout.

    Args:
        pipe: the loaded pipeline (modules frozen, on their device).
        defaults: sampling defaults over the family's built-in ones (a model directory's pec.json).
        source: where the model came from (for messages).
        prompt_cache: prompts whose embeddings are kept (0 = encode every call, batched).
        offload_text_encoders: keep the text encoders on the CPU, moving them to the device per encode.
        gradient_checkpointing: recompute the transformer blocks' activations in the backward pass.
    """

    #: the diffusers pipeline class (``model_index.json`` ``_class_name``) and its transformer class.
    pipeline_class: str
    transformer_class: str
    #: the family's sampling defaults (Flow-GRPO's settings, docs/design.md §4).
    builtin_defaults: dict[str, Any]
    #: pipeline attributes holding text encoders.
    text_encoder_names: tuple[str, ...]

    def __init__(
        self,
        pipe,
        defaults: dict[str, Any] | None = None,
        source: str = "<in memory>",
        *,
        prompt_cache: int = 0,
        offload_text_encoders: bool = False,
        gradient_checkpointing: bool = False,
    ):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.source = source
        self.defaults = {**self.builtin_defaults, **(defaults or {})}
        self.max_sequence_length = int(self.defaults["max_sequence_length"])
        self.vae_scale_factor = self._vae_scale_factor(self.vae)
        # The network's dtype as loaded: LoRA parameters added later may be float32.
        self.dtype = next(self.transformer.parameters()).dtype
        self.prompt_cache = PromptCache(prompt_cache) if prompt_cache > 0 else None
        self.offload_text_encoders = offload_text_encoders
        if offload_text_encoders:
            for encoder in self.text_encoders:
                encoder.to("cpu")
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        # For LoRA metadata: pec.json may name it (the embedded model: "sd3-toy"); else from the weights.
        self.architecture = self.defaults.get("architecture") or guess_architecture(
            {k: v.shape for k, v in self.transformer.state_dict().items()}
        )

    @staticmethod
    def _vae_scale_factor(vae) -> int:
        """Pixels per latent cell of ``vae`` (an ``AutoencoderKL``: 2 per down-sampling block)."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return self._encoders_of(self.pipe)

    @classmethod
    def _encoders_of(cls, pipe) -> list[torch.nn.Module]:
        return [m for m in (getattr(pipe, n, None) for n in cls.text_encoder_names) if m is not None]

    # ---- loading ------------------------------------------------------------------------------

    @classmethod
    def optional_components(cls, use_t5: bool | None) -> dict[str, None]:
        """Pipeline components to leave out (``{name: None}``) for the ``use_t5`` choice."""
        return {}

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        *,
        base: str | None = None,
        revision: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        use_t5: bool | None = None,
        max_sequence_length: int | None = None,
        **options,
    ) -> PipelineBackend:
        """Load from a hub id, a pipeline directory, or a single-file transformer checkpoint + ``base``.

        A single file (see :data:`SINGLE_FILE_SUFFIXES`) takes the transformer's weights from the file
        (original or diffusers key layout) and its config and every other component (VAE, text
        encoders, tokenizers, scheduler) from ``base``, a diffusers pipeline of the same architecture
        (hub id or directory); ``revision`` then applies to ``base``. Sampling defaults come from the
        family, then the directory's ``pec.json``, then ``max_sequence_length`` (T5 tokens).
        ``options`` go to ``__init__`` (prompt cache, offload, gradient checkpointing).
        """
        import diffusers

        components = cls.optional_components(use_t5)
        source = path_or_id
        try:
            if is_single_file(path_or_id):
                if base is None:
                    raise PECError(
                        f"{path_or_id} is a single-file checkpoint: also give model.base, the diffusers pipeline "
                        "(hub id or directory) of the same architecture that supplies the config, VAE and text encoders"
                    )
                components["transformer"] = getattr(diffusers, cls.transformer_class).from_single_file(
                    path_or_id, config=base, subfolder="transformer", config_revision=revision, **dtype_option(dtype)
                )
                source = base
            # The VAE loads in float32 (the supported way to keep a component's precision; casting it
            # afterwards with .to(dtype) is what diffusers warns about).
            precision = dtype_option({"vae": torch.float32, "default": dtype})
            pipe = getattr(diffusers, cls.pipeline_class).from_pretrained(
                source, revision=revision, **precision, **components
            )
        except (OSError, ValueError, KeyError) as err:
            from trainer.preflight import hub_load_error

            # a hub id that is gated, missing or not cached offline: one line with the id and the fix
            hub = None if os.path.exists(source) else hub_load_error(source, revision, "model", "model.path=DIR", err)
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise PECError(hub or f"cannot load a {cls.pipeline_class} from {path_or_id!r}: {first}") from None
        defaults = read_defaults(source, {}) if os.path.isdir(source) else {}
        if max_sequence_length is not None:
            defaults["max_sequence_length"] = max_sequence_length
        return cls.wrap(pipe, device, defaults, source=path_or_id, **options)

    @classmethod
    def wrap(cls, pipe, device: str | torch.device = "cpu", defaults: dict[str, Any] | None = None, **options):
        """A backend around an already built pipeline: frozen, on ``device``, VAE in float32."""
        pipe.set_progress_bar_config(disable=True)
        if pipe.vae.dtype != torch.float32:  # built in another precision: cast (from_pretrained loads it float32)
            pipe.vae.to(dtype=torch.float32)
        pipe.vae.to(device)
        pipe.transformer.to(device)
        # Offloaded text encoders never visit the device here: the GPU need not hold them and the rest.
        text_device = "cpu" if options.get("offload_text_encoders") else device
        for encoder in cls._encoders_of(pipe):
            encoder.to(text_device)
        for module in (pipe.transformer, pipe.vae, *cls._encoders_of(pipe)):
            module.eval().requires_grad_(False)
        return cls(pipe, defaults, **options)

    # ---- text ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        """Run the text encoders on ``prompts`` (they are on ``self.device``)."""

    @contextlib.contextmanager
    def _text_encoders_on_device(self):
        if not self.offload_text_encoders:
            yield
            return
        for encoder in self.text_encoders:
            encoder.to(self.device)
        try:
            yield
        finally:
            for encoder in self.text_encoders:
                encoder.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        prompts = list(prompts)
        if self.prompt_cache is None:
            with self._text_encoders_on_device():
                return self._encode(prompts)
        self.cache_prompts(prompts)
        embeds = PromptEmbeds.cat([self.prompt_cache.get(p) for p in prompts])
        return PromptEmbeds(embeds.embeds.to(self.device), embeds.pooled.to(self.device))

    def cache_prompts(self, prompts: list[str]) -> None:
        """Encode the prompts not in the cache yet, each alone, with one text-encoder move (no-op without cache)."""
        if self.prompt_cache is None:
            return
        missing = [p for p in dict.fromkeys(prompts) if self.prompt_cache.get(p) is None]
        if len(missing) > self.prompt_cache.size:
            raise PECError(
                f"{len(missing)} new prompts in one call exceed model.prompt_cache ({self.prompt_cache.size})"
            )
        if missing:
            with torch.no_grad(), self._text_encoders_on_device():
                for prompt in missing:
                    self.prompt_cache.put(prompt, self._encode([prompt]))

    # ---- images <-> latents -------------------------------------------------------------------

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents ``[B, C, h, w]`` → the family's layout (identity unless overridden)."""
        return latents

    def _unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """The family's layout → VAE latents ``[B, C, h, w]``."""
        return latents

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        pixels = images.to(self.device, torch.float32) * 2.0 - 1.0
        mean = self.vae.encode(pixels).latent_dist.mean
        return self._pack((mean - (cfg.shift_factor or 0.0)) * cfg.scaling_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        z = self._unpack(latents.to(torch.float32)) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return (self.vae.decode(z, return_dict=False)[0] / 2.0 + 0.5).clamp(0.0, 1.0)

    # ---- LoRA ---------------------------------------------------------------------------------

    def load_lora(self, path: str, scale: float = 1.0, adapter_name: str = "pec") -> None:
        tensors = load_lora_for(self.transformer, path, self.family)
        # Into the transformer by name: a PEC LoRA holds only transformer.* keys, and the pipeline-level
        # loader would also search every text encoder for keys and log that it found none.
        self.transformer.load_lora_adapter(tensors, prefix="transformer", adapter_name=adapter_name)
        self.transformer.set_adapters([adapter_name], [scale])

"""The PEC nodes: each a :class:`NodeSpec` whose ``run`` is thin glue over plain functions of
:mod:`comfy_pec` (``flow_sampler``, ``batch``, ``lora_format``) and of this package (``lora_check``,
``perceptual``). ComfyUI modules (``comfy``, ``folder_paths``) and the torch-side library are imported
inside ``run``, so importing this module at ComfyUI start-up costs next to nothing."""

from __future__ import annotations

import logging
import os

from .. import PECError
from ..kinds import SAMPLER_WINDOWS, SDE_KINDS
from .spec import In, NodeResult, NodeSpec, Out

__all__ = ["SPECS", "encoder_folders"]

log = logging.getLogger("comfy_pec")

TOY_CHOICE = "toy (embedded)"
ENCODER_FOLDER = "pec_encoders"
SAMPLER_METHODS = list(SDE_KINDS)
WINDOWS = list(SAMPLER_WINDOWS)


# ----------------------------------------------------------------------------- LoRA loader


def _lora_files() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list("loras")


def _apply_lora(model, clip, lora_name, strength_model, strength_clip, allow_mismatch):
    """Validate, check against ``model`` and apply a LoRA file; returns (model, clip, summary)."""
    import comfy.lora
    import comfy.sd
    import folder_paths

    from ..lora_format import inspect_lora, load_lora, lora_key_coverage
    from .lora_check import check_lora, model_family

    path = folder_paths.get_full_path("loras", lora_name)
    if path is None:
        raise PECError(f"LoRA {lora_name!r} is not in the loras folder")
    info = inspect_lora(path)
    tensors, _ = load_lora(path)
    coverage = lora_key_coverage(tensors, comfy.lora.model_lora_keys_unet(model.model, {}))
    family = model_family([c.__name__ for c in type(model.model.model_config).__mro__])
    summary, warnings = check_lora(info, coverage, family, allow_mismatch)
    for warning in warnings:
        log.warning("PEC LoRA Loader: %s: %s", lora_name, warning)
    model, clip = comfy.sd.load_lora_for_models(model, clip, tensors, strength_model, strength_clip)
    return model, clip, summary


def _lora_loader(model, clip, lora_name, strength_model, strength_clip, allow_mismatch):
    model, clip, summary = _apply_lora(model, clip, lora_name, strength_model, strength_clip, allow_mismatch)
    return NodeResult((model, clip, summary))


def _lora_loader_model_only(model, lora_name, strength_model, allow_mismatch):
    model, _, summary = _apply_lora(model, None, lora_name, strength_model, 0.0, allow_mismatch)
    return NodeResult((model, summary))


_LORA_INPUTS = [
    In("lora_name", "COMBO", "a LoRA file in models/loras", options=_lora_files),
    In(
        "strength_model",
        "FLOAT",
        "1.0 = the trained strength (PEC LoRAs have the scale baked in)",
        default=1.0,
        min=-10.0,
        max=10.0,
        step=0.01,
    ),
]
_ALLOW = In(
    "allow_mismatch",
    "BOOLEAN",
    "apply a LoRA made for another model family with a warning instead of an error",
    default=False,
)
_SUMMARY = Out("summary", "STRING", "method, β, base model, usage hint, matched/unmatched keys")


def _embedded_model():
    from .embedded import load_embedded

    return NodeResult(load_embedded())


# ----------------------------------------------------------------------------- Flow SDE sampler


def _require_flow_model(model, node: str) -> None:
    """Refuse a denoiser (what ComfyUI hands a sampler function) whose model is not rectified flow."""
    import comfy.model_sampling

    patcher = getattr(getattr(model, "inner_model", None), "model_patcher", None)
    sampling = patcher.get_model_object("model_sampling") if patcher is not None else None
    if not isinstance(sampling, comfy.model_sampling.CONST):
        raise PECError(
            f"{node} needs a flow-matching model (SD3/SD3.5, FLUX, ...); this model samples with "
            f"{type(sampling).__name__} (not rectified flow)"
        )


def _flow_sampler(method, noise_level, window, window_start, window_count, sigma_high, sigma_low):
    import comfy.samplers

    from ..flow_sampler import sample_flow
    from ..sde import stochastic_steps

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = {} if extra_args is None else extra_args
        _require_flow_model(model, "PEC Flow SDE Sampler")
        mask = stochastic_steps(
            window, sigmas, start=window_start, size=window_count, sigma_low=sigma_low, sigma_high=sigma_high
        )

        def report(i, denoised, x_i):
            if callback is not None:
                callback({"x": x_i, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})

        return sample_flow(
            lambda x_i, sigma: model(x_i, sigma, **extra_args),
            x,
            sigmas,
            method=method,
            noise_level=noise_level,
            sde_mask=mask,
            seed=extra_args.get("seed") or 0,
            callback=report,
        )

    return NodeResult((comfy.samplers.KSAMPLER(sample),))


_SDE_INPUTS = [
    In(
        "method",
        "COMBO",
        "flow_sde: Flow-GRPO's SDE; cps: coefficient-preserving sampling",
        default="flow_sde",
        options=SAMPLER_METHODS,
    ),
    In(
        "noise_level",
        "FLOAT",
        "a: 0 = Euler (ODE); Flow-GRPO trains SD3 at 0.7, FLUX at 0.9",
        default=0.7,
        min=0.0,
        max=2.0,
        step=0.01,
    ),
]


# ----------------------------------------------------------------------------- encoders


def encoder_folders() -> list[str]:
    """The ``models/pec_encoders`` folders (registered with ComfyUI on first use; extra_model_paths.yaml
    may add more under the ``pec_encoders`` key)."""
    import folder_paths

    folder_paths.add_model_folder_path(ENCODER_FOLDER, os.path.join(folder_paths.models_dir, ENCODER_FOLDER))
    return folder_paths.get_folder_paths(ENCODER_FOLDER)


def _encoder_choices() -> list[str]:
    from .perceptual import list_encoder_entries

    return [TOY_CHOICE] + list_encoder_entries(encoder_folders())


def _encoder_types() -> list[str]:
    from .perceptual import ENCODER_TYPES

    return list(ENCODER_TYPES)


def _encoder_loader(model, encoder_type, clip_vision=None):
    import comfy.model_management

    from ..encoders import load_encoder
    from .perceptual import ClipVisionEncoder, load_from_folder

    if clip_vision is not None:
        encoder, source = ClipVisionEncoder(clip_vision), "the connected CLIP_VISION model"
    elif model == TOY_CHOICE:
        encoder, source = (
            load_encoder("toy", device=comfy.model_management.get_torch_device()),
            "the embedded toy encoder",
        )
    else:
        path = next((os.path.join(b, model) for b in encoder_folders() if os.path.exists(os.path.join(b, model))), None)
        if path is None:
            raise PECError(f"encoder {model!r} is not in models/{ENCODER_FOLDER}")
        encoder = load_from_folder(path, encoder_type, device=comfy.model_management.get_torch_device())
        source = path
    return NodeResult((encoder,), text=f"{encoder.name} encoder from {source}")


# ----------------------------------------------------------------------------- diversity


def _batch_diversity(images, encoder, q, group_size):
    from ..batch import concat_images, diversity_of, embed_images, similarity_heatmap

    features, notes = embed_images(encoder, images, raw=True)
    result = diversity_of(features, q, group_size)
    result.notes += notes
    heatmap = similarity_heatmap(features, concat_images(images)[0])
    report = result.report()
    outputs = (result.vendi, result.variance, result.variance_normalised, report, heatmap)
    return NodeResult(outputs, preview=heatmap, text=report)


def _select_diverse(images, encoder, k, q):
    from ..batch import concat_images, embed_images
    from ..diversity import select_diverse, vendi_score

    features, _ = embed_images(encoder, images)
    batch, notes = concat_images(images)
    if k > len(batch):
        notes.append(f"asked for {k} of {len(batch)} images: keeping all {len(batch)}")
    chosen = select_diverse(features, min(k, len(batch)), q)
    for note in notes:
        log.warning("PEC Select Diverse: %s", note)
    indices = ",".join(str(int(i)) for i in chosen)
    vendi = float(vendi_score(features[chosen], q))
    report = "\n".join(
        [f"kept {len(chosen)} of {len(batch)}: images {indices}", f"Vendi (q={q:g}) of the kept images: {vendi:.3f}"]
        + [f"note: {n}" for n in notes]
    )
    return NodeResult((batch[chosen.to(batch.device)], indices, vendi), text=report)


_ENCODER_IN = In("encoder", "PEC_ENCODER", "from PEC Perceptual Encoder Loader")
_Q = In(
    "q",
    "FLOAT",
    "Vendi order: 1 = Shannon (the paper's), 2 = emphasises common modes, 0 = rank",
    default=1.0,
    min=0.0,
    max=100.0,
    step=0.1,
)


# ----------------------------------------------------------------------------- perceptual entropy


def _perceptual_entropy(
    guider, sigmas, latent_image, noise_seed, vae, encoder, step, method, noise_level, repeats, decode
):
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import torch

    from ..batch import embed_images, probe_entropy
    from ..flow_sampler import probe_step

    patcher = guider.model_patcher
    latent = comfy.sample.fix_empty_latent_channels(patcher, latent_image["samples"])
    probes = []

    def probe(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = {} if extra_args is None else extra_args
        _require_flow_model(model, "PEC Perceptual Entropy")
        probes.append(
            probe_step(
                lambda x_i, s: model(x_i, s, **extra_args),
                x,
                sigmas,
                step=step,
                repeats=repeats,
                method=method,
                noise_level=noise_level,
                seed=noise_seed,
                decode=decode,
            )
        )
        return x

    noise = comfy.sample.prepare_noise(latent, noise_seed)
    guider.sample(noise, latent, comfy.samplers.KSAMPLER(probe), sigmas, disable_pbar=True, seed=noise_seed)
    found = probes[0]
    targets = torch.cat([found.mean_target, found.sample_targets.flatten(0, 1)])
    images = vae.decode(patcher.model.process_latent_out(targets.to(comfy.model_management.intermediate_device())))
    images = images.reshape(-1, *images.shape[-3:])
    features, _ = embed_images(encoder, images)
    b = len(found.mean_target)
    result = probe_entropy(features[b:].reshape(repeats, b, -1), features[:b], found.std)
    report = result.report(found.step, found.sigma, found.sigma_next, found.std, repeats)
    draws = images[b:]
    return NodeResult((result.entropy, result.energy, result.vendi, report, draws), preview=draws, text=report)


# ----------------------------------------------------------------------------- the node list

SPECS = [
    NodeSpec(
        "PECLoraLoader",
        "PEC LoRA Loader",
        "PEC/loaders",
        "Apply a PEC LoRA to MODEL and CLIP after checking that it fits the model; the summary shows how it "
        "was trained and how many of its modules matched.",
        [
            In("model", "MODEL", "the diffusion model the LoRA was trained on (FLUX, SD3.5, ...)"),
            In("clip", "CLIP", "the text encoders (passed through: PEC LoRAs train none)"),
            *_LORA_INPUTS,
            In(
                "strength_clip",
                "FLOAT",
                "strength on the text encoders (PEC LoRAs train none: no effect)",
                default=1.0,
                min=-10.0,
                max=10.0,
                step=0.01,
            ),
            _ALLOW,
        ],
        [Out("MODEL", "MODEL", "the model with the LoRA applied"), Out("CLIP", "CLIP", "the text encoders"), _SUMMARY],
        _lora_loader,
    ),
    NodeSpec(
        "PECLoraLoaderModelOnly",
        "PEC LoRA Loader (model only)",
        "PEC/loaders",
        "Apply a PEC LoRA to MODEL after checking that it fits the model.",
        [In("model", "MODEL", "the diffusion model the LoRA was trained on (FLUX, SD3.5, ...)"), *_LORA_INPUTS, _ALLOW],
        [Out("MODEL", "MODEL", "the model with the LoRA applied"), _SUMMARY],
        _lora_loader_model_only,
    ),
    NodeSpec(
        "PECEmbeddedModelLoader",
        "PEC Embedded Model Loader",
        "PEC/loaders",
        "The tiny SD3-type model that ships with PEC (64 px images of coloured shapes, seconds on a CPU): "
        "try the sampler, a `pec demo` LoRA and the diversity nodes without downloading weights. MODEL is "
        "ComfyUI's own SD3 model (stock samplers and LoRA loaders work); CLIP and VAE wrap the tiny diffusers "
        "components. Latent nodes assume 8x downscaling, this VAE has 4: a 128x128 EmptySD3LatentImage gives "
        "64x64 images.",
        [],
        [
            Out("MODEL", "MODEL", "ComfyUI's SD3 model class with the embedded weights (shift 1.0)"),
            Out("CLIP", "CLIP", "the two tiny CLIP text encoders (for CLIPTextEncode)"),
            Out("VAE", "VAE", "the tiny 16-channel VAE (for VAEDecode / VAEEncode)"),
        ],
        _embedded_model,
    ),
    NodeSpec(
        "PECFlowSDESampler",
        "PEC Flow SDE Sampler",
        "PEC/sampling",
        "Flow-GRPO's SDE (or CPS) as a SAMPLER for SamplerCustom / SamplerCustomAdvanced on flow models "
        "(SD3/SD3.5, FLUX). Stochastic steps in the window, Euler elsewhere; the step noise comes from a CPU "
        "generator seeded from the sampling seed, so a seed gives the same image on any device.",
        [
            *_SDE_INPUTS,
            In(
                "window",
                "COMBO",
                "which steps are stochastic: all, a step range, or a sigma range (the last step is always Euler)",
                default="all",
                options=WINDOWS,
            ),
            In("window_start", "INT", "first stochastic step (window = steps)", default=0, min=0, max=10000),
            In("window_count", "INT", "number of stochastic steps (window = steps)", default=2, min=0, max=10000),
            In(
                "sigma_high",
                "FLOAT",
                "steps starting at sigma <= this are stochastic (window = sigmas)",
                default=1.0,
                min=0.0,
                max=1.0,
                step=0.01,
            ),
            In(
                "sigma_low",
                "FLOAT",
                "steps starting at sigma >= this are stochastic (window = sigmas)",
                default=0.0,
                min=0.0,
                max=1.0,
                step=0.01,
            ),
        ],
        [Out("SAMPLER", "SAMPLER", "for SamplerCustom / SamplerCustomAdvanced (flow models only)")],
        _flow_sampler,
    ),
    NodeSpec(
        "PECPerceptualEncoderLoader",
        "PEC Perceptual Encoder Loader",
        "PEC/loaders",
        "A perceptual encoder for the diversity nodes: a connected CLIP_VISION model (CLIP, SigLIP, DINOv2), "
        "a model folder under models/pec_encoders (DINOv2, CLIP, PickScore), or the embedded toy encoder.",
        [
            In(
                "model",
                "COMBO",
                "a folder under models/pec_encoders, or the embedded toy encoder",
                default=TOY_CHOICE,
                options=_encoder_choices,
            ),
            In(
                "encoder_type",
                "COMBO",
                "auto: guess from the folder's config and name",
                default="auto",
                options=_encoder_types,
            ),
            In("clip_vision", "CLIP_VISION", "when connected, used instead of the folder", optional=True),
        ],
        [Out("PEC_ENCODER", "PEC_ENCODER", "for PEC Batch Diversity, PEC Select Diverse, PEC Perceptual Entropy")],
        _encoder_loader,
    ),
    NodeSpec(
        "PECBatchDiversity",
        "PEC Batch Diversity",
        "PEC/diversity",
        "How diverse is a batch? Vendi score and feature variance (of the raw and of the normalised features) in "
        "the encoder's space, per prompt group with group_size > 0; the report and a cosine-similarity heatmap "
        "with a colour scale are shown in the node.",
        [
            In("images", "IMAGE", "the batch to score (several batches from a list are scored together)"),
            _ENCODER_IN,
            _Q,
            In(
                "group_size",
                "INT",
                "images per prompt (seeds of one prompt next to each other); 0 = one group",
                default=0,
                min=0,
                max=4096,
            ),
        ],
        [
            Out("vendi", "FLOAT", "effective number of distinct images (1 = all alike, N = all different)"),
            Out("feature_variance", "FLOAT", "tr(Cov) of the raw encoder features (the paper's; in encoder units)"),
            Out(
                "feature_variance_normalised",
                "FLOAT",
                "tr(Cov) of the L2-normalised features, scale-free (= mean pairwise cosine distance)",
            ),
            Out("report", "STRING", "the figures and notes shown in the node"),
            Out("heatmap", "IMAGE", "cosine similarity of every pair, with thumbnails and a colour scale"),
        ],
        _batch_diversity,
        output_node=True,
        list_inputs=frozenset({"images"}),
    ),
    NodeSpec(
        "PECSelectDiverse",
        "PEC Select Diverse",
        "PEC/diversity",
        "Keep the k images whose set has the highest Vendi score (greedy).",
        [
            In("images", "IMAGE", "the batch to choose from (batches of other sizes are resized to the first)"),
            _ENCODER_IN,
            In(
                "k",
                "INT",
                "how many images to keep (all of them when the batch is smaller)",
                default=4,
                min=1,
                max=4096,
            ),
            _Q,
        ],
        [
            Out("images", "IMAGE", "the kept images, in selection order"),
            Out("indices", "STRING", "positions in the input batch, in selection order"),
            Out("vendi", "FLOAT", "Vendi score of the kept images"),
        ],
        _select_diverse,
        list_inputs=frozenset({"images"}),
    ),
    NodeSpec(
        "PECPerceptualEntropy",
        "PEC Perceptual Entropy",
        "PEC/diversity",
        "Perceptual entropy of one sampling step (docs/design.md §5): Euler up to `step`, then that Flow-SDE/CPS step "
        "`repeats` times from the same state; the draws (and the step mean) are decoded and embedded.",
        [
            In("guider", "GUIDER", "model and conditioning (BasicGuider / CFGGuider)"),
            In("sigmas", "SIGMAS", "the sampling schedule (BasicScheduler)"),
            In("latent_image", "LATENT", "the starting latent batch (its size is the number of states)"),
            In(
                "noise_seed",
                "INT",
                "initial noise and step noise",
                default=0,
                min=0,
                max=0xFFFFFFFFFFFFFFFF,
                control_after_generate=True,
            ),
            In("vae", "VAE", "decodes the draws for the encoder"),
            _ENCODER_IN,
            In("step", "INT", "the step to probe (0 = the noisiest)", default=2, min=0, max=10000),
            *_SDE_INPUTS,
            In("repeats", "INT", "draws of the step", default=8, min=1, max=256),
            In(
                "decode",
                "COMBO",
                "noisy: decode x' and the mean (the paper); x0: decode their clean predictions",
                default="noisy",
                options=["noisy", "x0"],
            ),
        ],
        [
            Out("perceptual_entropy", "FLOAT", "H_A: mean perceptual entropy of the step's draws"),
            Out("energy", "FLOAT", "mean residual energy ||g(x') - g(mu)||^2 / (2 std^2)"),
            Out("vendi", "FLOAT", "mean Vendi score of each state's draws (distinct outcomes of one step)"),
            Out("report", "STRING", "the figures shown in the node"),
            Out("draws", "IMAGE", "the decoded draws"),
        ],
        _perceptual_entropy,
        output_node=True,
    ),
]

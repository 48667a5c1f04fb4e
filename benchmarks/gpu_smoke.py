"""Two PEC iterations at the real model sizes on one GPU, with randomly initialised weights (no download).

Builds SD3.5-Medium and/or FLUX.1-dev from their published configs (transformer, VAE, CLIP and T5
text encoders; :mod:`trainer.backends.random_init`) in bf16 on the GPU, and a PickScore-size reward
model (CLIP ViT-H/14) and a DINOv2-L perceptual encoder from transformers configs (saved to a
temporary directory and loaded by the trainer's own reward / encoder loaders). Then it runs
``trainer.train`` with the family's preset (``sd35m-pickscore`` / ``flux-dev-pickscore``: its LoRA,
sampling steps, noise level, guidance and memory options) for two iterations of one prompt group and
prints the seconds per phase of each iteration and the peak GPU memory. Random weights make the
images noise; timings and memory are those of the real shapes.

    python benchmarks/gpu_smoke.py                      # both models, 512², group 8
    python benchmarks/gpu_smoke.py --model flux.1-dev --group 16 --encoder pickscore
    python benchmarks/gpu_smoke.py --tiny               # tiny sizes on the CPU (tests the script)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRESETS = {"sd3.5-medium": "sd35m-pickscore", "flux.1-dev": "flux-dev-pickscore"}
TINY_SPECS = {"sd3.5-medium": "tiny-sd3.5", "flux.1-dev": "tiny-flux"}
PROMPTS = ["a photo of a red fox in the snow", "an oil painting of a lighthouse at dusk"]
PHASES = ("time_rollout", "time_reward", "time_perceptual", "time_update", "time_total")

# Published sizes: PickScore_v1 is a CLIP-H/14 (laion2B), DINOv2-L/14 (facebook/dinov2-large).
PICKSCORE = dict(
    text=dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        max_position_embeddings=77,
        hidden_act="gelu",
    ),
    vision=dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
    ),
    projection_dim=1024,
)
DINOV2 = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14, image_size=518)
TINY_PICKSCORE = dict(
    text=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77
    ),
    vision=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    ),
    projection_dim=16,
)
TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=14, image_size=28)


def save_reward_models(folder: Path, tiny: bool) -> tuple[Path, Path]:
    """Random-init PickScore-size CLIP (with an offline tokenizer) and DINOv2, saved for the loaders."""
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    from trainer.backends.random_init import clip_tokenizer
    from trainer.world.vocabulary import write_tokenizer_files

    spec, dino = (TINY_PICKSCORE, TINY_DINOV2) if tiny else (PICKSCORE, DINOV2)
    tokenizer = clip_tokenizer(77)
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    text = dict(
        spec["text"],
        vocab_size=len(tokenizer),
        eos_token_id=eos,
        pad_token_id=eos,
        bos_token_id=tokenizer.convert_tokens_to_ids(tokenizer.bos_token),
    )
    torch.manual_seed(0)
    pickscore, dinov2 = folder / "pickscore", folder / "dinov2"
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=spec["vision"], projection_dim=spec["projection_dim"])
    ).save_pretrained(pickscore)
    tokenizer.save_pretrained(pickscore)
    write_tokenizer_files(pickscore)
    Dinov2Model(Dinov2Config(**dino)).save_pretrained(dinov2)
    return pickscore, dinov2


def model_config(name: str, args, folder: Path, reward_dir: Path, encoder_dir: Path, overrides=()):
    """The family's preset with the benchmark's prompts, group, resolution and saved reward / encoder models.

    ``overrides``: ``section.key=value`` strings on top (as ``pec train --set``).
    """
    from trainer.config import load_config

    device = "cpu" if args.tiny else "cuda"
    dtype = "float32" if args.tiny else "bfloat16"
    settings = {
        "model": {"path": f"random-init/{name}", "device": device, "dtype": dtype},
        "rewards": [{"name": "pickscore", "path": str(reward_dir)}],
        "pec": {
            "encoder": args.encoder,
            "encoder_path": str(reward_dir if args.encoder == "pickscore" else encoder_dir),
        },
        "prompts": {"train": PROMPTS[: args.prompts], "eval": PROMPTS[:1]},
        "train": {
            "iterations": 2,
            "prompts_per_iteration": args.prompts,
            "group_size": args.group,
            "batch_size": args.batch or args.group,
        },
        "sampling": {"resolution": args.resolution},
        "checkpoint": {"every": 10},
        "report": {"grid_prompts": 1, "grid_seeds": [0]},
        "run": {"dir": str(folder / name), "progress": False, "tensorboard": "off"},
    }
    if args.tiny:
        settings["sampling"]["num_steps"] = 3
        settings["lora"] = {"rank": 4, "alpha": 8}
    file = folder / f"{name}.yaml"
    file.write_text(yaml.safe_dump(settings))
    return load_config(PRESETS[name], str(file), list(overrides))


def build_backend(name: str, config, args):
    """The random-init pipeline of ``name`` (tiny with ``--tiny``) as the config's backend; ``(backend, spec)``."""
    from trainer.backends.flux import FluxBackend
    from trainer.backends.random_init import SPECS, build_pipeline
    from trainer.backends.sd3 import SD3Backend

    m = config.model
    spec = SPECS[TINY_SPECS[name] if args.tiny else name]
    if spec.family == "sd3" and not m.use_t5:
        spec = dataclasses.replace(spec, t5=None)  # as the SD3 backend loads it: no T5 unless asked for
    pipe = build_pipeline(spec, device=m.device, dtype=getattr(torch, m.dtype))
    backend_cls = SD3Backend if spec.family == "sd3" else FluxBackend
    backend = backend_cls.wrap(
        pipe,
        m.device,
        {**spec.defaults, "resolution": args.resolution},
        source=m.path,
        prompt_cache=m.prompt_cache,
        offload_text_encoders=m.offload_text_encoders,
        gradient_checkpointing=m.gradient_checkpointing,
    )
    return backend, spec


def run_model(name: str, args, folder: Path, reward_dir: Path, encoder_dir: Path) -> None:
    from trainer.runlog import read_log
    from trainer.train import train

    config = model_config(name, args, folder, reward_dir, encoder_dir)
    device, dtype = config.model.device, config.model.dtype
    clock = time.perf_counter()
    backend, spec = build_backend(name, config, args)
    built = time.perf_counter() - clock
    params = sum(p.numel() for p in backend.transformer.parameters()) / 1e6
    if device == "cuda":
        torch.cuda.synchronize()
        static = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    print(
        f"\n== {name}: transformer {params:,.1f} M params, built in {built:.1f} s, "
        f"{args.prompts} prompt(s) x group {args.group} at {args.resolution}², {config.sampling.num_steps or spec.defaults.get('num_steps')} steps, "
        f"LoRA r={config.lora.rank}, encoder {args.encoder}, {dtype}"
    )
    if device == "cuda":
        print(f"   GPU memory after building: {static:.1f} GiB")
    if not args.tiny:  # the plan counts the published configs, which the tiny models are not
        from trainer.preflight import check_before_loading, estimate

        est = estimate(config, check_before_loading(config))
        print(
            f"   pec train --dry-run's estimate for this config: peak {est.peak / 2**30:.1f} GiB, "
            f"{est.seconds:.1f} s per iteration (transformer FLOPs at an assumed throughput)"
        )

    train(config, backend=backend)
    for row in read_log(Path(config.run.dir)):
        phases = "  ".join(f"{k.removeprefix('time_')} {row[k]:.2f}s" for k in PHASES if k in row)
        print(f"   iteration {row['iteration']}: {phases}")
    if device == "cuda":
        print(
            f"   peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated, "
            f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved (of "
            f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
        )
    del backend
    if device == "cuda":
        torch.cuda.empty_cache()


def add_size_arguments(parser: argparse.ArgumentParser, default_group: int) -> None:
    """The options of the benchmarks at real sizes: --tiny, resolution, prompts, group, micro-batch, encoder."""
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (tests the script)")
    parser.add_argument("--resolution", type=int, default=None, help="default 512 (32 with --tiny)")
    parser.add_argument("--prompts", type=int, default=1, choices=[1, 2], help="prompt groups per iteration")
    parser.add_argument(
        "--group", type=int, default=None, help=f"samples per prompt (default {default_group}, 2 with --tiny)"
    )
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (default: the group size)")
    parser.add_argument("--encoder", choices=["dinov2", "pickscore"], default="dinov2")
    parser.set_defaults(full_size_group=default_group)


def parse_sizes(parser: argparse.ArgumentParser, argv):
    """Parsed arguments with the size defaults filled in, and torch seeded; None (said why) without CUDA unless --tiny."""
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (32 if args.tiny else 512)
    args.group = args.group or (2 if args.tiny else args.full_size_group)
    if not args.tiny and not torch.cuda.is_available():
        print(
            f"{parser.prog}: no CUDA device here; run it on a GPU machine, or with --tiny for a CPU check of the script."
        )
        return None
    torch.manual_seed(0)
    return args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=Path(__file__).stem, description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*PRESETS, "both"], default="both")
    add_size_arguments(parser, default_group=8)
    args = parse_sizes(parser, argv)
    if args is None:
        return 2
    names = list(PRESETS) if args.model == "both" else [args.model]
    with tempfile.TemporaryDirectory(prefix="pec-gpu-smoke-") as tmp:
        folder = Path(tmp)
        reward_dir, encoder_dir = save_reward_models(folder, args.tiny)
        for name in names:
            run_model(name, args, folder, reward_dir, encoder_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the PEC Batch Diversity node costs: 64 images at 512² through a DINOv2-small-sized encoder.

    python benchmarks/diversity_node.py [--images 64] [--size 512] [--threads 2] [--repeats 2]

The encoder is the project's DINOv2 encoder (``load_encoder("dinov2", path=...)``) on a transformers
Dinov2Model with DINOv2-small's configuration (ViT-S/14, 384 wide, 12 layers, 224² crop) and random
weights saved to a temp folder (no download: the cost does not depend on the weights). The timed call
is the node's own ``run`` (embedding in chunks of 16, Vendi, variance, distances, heatmap) on the CPU;
the best of ``--repeats`` is printed with the time per image (issue #8 target: < 30 s on 2 cores).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from timing import time_calls  # benchmarks/ is on the path when a script here runs

from comfy_pec.encoders import load_encoder
from comfy_pec.nodes.definitions import SPECS


def dinov2_small_sized(folder: str):
    """The DINOv2 perceptual encoder on a randomly initialised DINOv2-small saved in ``folder``."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        patch_size=14,
        image_size=518,
    )
    Dinov2Model(config).save_pretrained(folder)
    return load_encoder("dinov2", path=folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        encoder = dinov2_small_sized(folder)
    images = torch.rand(args.images, args.size, args.size, 3)
    node = next(spec for spec in SPECS if spec.node_id == "PECBatchDiversity")

    def run_node():
        with torch.inference_mode():  # as ComfyUI's executor runs nodes
            return node.run(images=[images], encoder=encoder, q=1.0, group_size=0)

    times, result = time_calls(run_node, args.repeats)
    best = min(times)
    vendi = result.outputs[0]
    print(
        f"PEC Batch Diversity: {args.images} images at {args.size}x{args.size}, DINOv2-small-sized encoder, "
        f"{args.threads} threads"
    )
    print(f"  best of {args.repeats}: {best:.2f} s ({best / args.images * 1000:.0f} ms per image), Vendi {vendi:.3f}")


if __name__ == "__main__":
    main()

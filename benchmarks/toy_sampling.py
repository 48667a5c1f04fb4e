"""Time to sample 16 images × 10 steps from the embedded tiny model on this machine (target: < 10 s on 2 CPU cores).

    python benchmarks/toy_sampling.py [--images 16] [--steps 10] [--repeats 3] [--device cpu]

Uses the shipped model's defaults (CFG, resolution); prints the best of --repeats after one warm-up.
"""

from __future__ import annotations

import argparse

import torch
from timing import time_calls  # benchmarks/ is on the path when a script here runs

from trainer.backends import load_backend
from trainer.sampling import sample_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    backend = load_backend(device=args.device)
    prompts = ["a red circle"] * args.images
    sample_images(backend, prompts[:2], [0, 1], num_steps=2, progress=False)  # warm-up
    times, _ = time_calls(
        lambda: sample_images(
            backend, prompts, list(range(args.images)), num_steps=args.steps, batch_size=args.images, progress=False
        ),
        args.repeats,
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(
        f"{args.images} images x {args.steps} steps (CFG {backend.defaults['guidance_scale']}, "
        f"{backend.defaults['resolution']} px): best {min(times):.2f} s, mean {sum(times) / len(times):.2f} s"
    )


if __name__ == "__main__":
    main()

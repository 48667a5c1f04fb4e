"""Time every diversity metric at the paper's evaluation size and compare with a per-prompt loop.

    python benchmarks/diversity.py [--prompts 400] [--samples 30] [--dim 1024] [--repeats 3]

Prints, for P prompts × N samples × D-dim features (paper: 400 × 30; 1024-d features):
  * batched: Vendi (q = 1, 2, ∞), feature variance (raw and normalised), mean pairwise distance,
    all prompts in one call each;
  * pooled: the same on all P·N samples as one set (n > d, so Vendi takes the d×d form);
  * loop: the naive way, one prompt at a time with an n×n eigen-decomposition,
and the loop/batched ratio, measured in the same run. Best of ``--repeats`` timings.
"""

from __future__ import annotations

import argparse
import math

import torch
from timing import time_calls  # benchmarks/ is on the path when a script here runs

from comfy_pec.diversity import feature_variance, mean_pairwise_distance, vendi_score

ORDERS = (1.0, 2.0, math.inf)


def all_metrics(features: torch.Tensor) -> list[torch.Tensor]:
    """Every diversity metric of docs/design.md §7 on ``[N, D]`` or ``[P, N, D]`` features."""
    return [
        *(vendi_score(features, q) for q in ORDERS),
        feature_variance(features),
        feature_variance(features, normalize=True),
        mean_pairwise_distance(features),
    ]


def naive_loop(features: torch.Tensor) -> list[torch.Tensor]:
    """One prompt at a time, Vendi from a fresh n×n kernel eigen-decomposition for each order."""
    out = []
    for feats in features:
        x = torch.nn.functional.normalize(feats, dim=-1)
        for q in ORDERS:
            lam = torch.linalg.eigvalsh(x @ x.T / x.shape[0]).clamp_min(0)
            lam = lam[lam > 1e-7] / lam[lam > 1e-7].sum()
            if q == 1.0:
                out.append(torch.exp(-(lam * lam.log()).sum()))
            elif math.isinf(q):
                out.append(1 / lam.max())
            else:
                out.append(torch.exp(torch.log((lam**q).sum()) / (1 - q)))
        out.append(torch.cov(feats.T).trace())
        out.append(torch.cov(x.T).trace())
        cos = x @ x.T
        out.append(1 - (cos.sum() - cos.trace()) / (x.shape[0] * (x.shape[0] - 1)))
    return out


def best_time(fn, repeats: int) -> float:
    return min(time_calls(fn, repeats)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    feats = torch.randn(args.prompts, args.samples, args.dim)
    pooled = feats.reshape(-1, args.dim)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"features: {args.prompts} prompts x {args.samples} samples x {args.dim}-d (float32)")

    batched = best_time(lambda: all_metrics(feats), args.repeats)
    pooled_t = best_time(lambda: all_metrics(pooled), args.repeats)
    loop = best_time(lambda: naive_loop(feats), args.repeats)

    print(f"all metrics, batched over prompts : {batched:8.3f} s")
    print(f"all metrics, pooled {pooled.shape[0]} x {args.dim}  : {pooled_t:8.3f} s")
    print(f"all metrics, batched + pooled     : {batched + pooled_t:8.3f} s")
    print(f"naive per-prompt loop (n x n eig) : {loop:8.3f} s")
    print(f"loop / batched ratio              : {loop / batched:8.1f} x")


if __name__ == "__main__":
    main()

"""Noise on a model-independent scale: does the mask learn on efficientnet_lite0?

Before, ``noise_std`` was added in the model's normalised space, so
EfficientNet-Lite0 (``(x - 0.5) / 0.5``, twice ImageNet's std) got ~2.2× the
reference's pixel-space noise; now ``noise_std`` is in units of ImageNet's std
for every model. Runs the cases of ``faithfulness.py`` (flute; the dog and the
cat of both.png) with the default settings (``--iterations``) both ways, in one
batch per way, and prints per case the score before → after, the mean of the
mask and the fraction of the mask below 0.5 (0 = the mask learned nothing).

Usage:
    python benchmarks/noise_scale.py [--iterations 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _local import CASES, add_machine_options, apply_machine_options, example_pixels, worker_model

from shared.attribution.config import PerturbationConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--noise-std", type=float, default=0.2)
    add_machine_options(parser)
    args = parser.parse_args()
    apply_machine_options(args)
    from shared.attribution.perturbation import MaskOptimisation, step_batch

    classifier = worker_model("efficientnet_lite0", args.device)
    images = example_pixels()
    config = PerturbationConfig(iterations=args.iterations, noise_std=args.noise_std)
    print(f"efficientnet_lite0 on {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"noise_std {args.noise_std}, {args.iterations} iterations")
    rows = []
    for name in ("model space (before)", "ImageNet-std units (now)"):
        start = time.perf_counter()
        runs = [MaskOptimisation.create(classifier, images[f], t, config) for f, t in CASES]
        if name.startswith("model"):
            for r in runs:
                r.noise_scale = float(args.noise_std)  # the old behaviour
        while not all(r.done for r in runs):
            step_batch(classifier, runs)
        for (f, t), r in zip(CASES, runs):
            e = r.result(classifier)
            rows.append((name, f"{f} {e.label}", e.score_before, e.score_after, float(e.mask.mean()),
                         float((e.mask < 0.5).mean())))
        print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
    print()
    print("| noise | case | score before → after | mask mean | mask < 0.5 |")
    print("|---|---|---|---|---|")
    for name, case, before, after, mean, low in rows:
        print(f"| {name} | {case} | {before:.3f} → {after:.3f} | {mean:.3f} | {low:.1%} |")


if __name__ == "__main__":
    main()

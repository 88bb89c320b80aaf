"""What the faithfulness scores on every job cost, next to the mask itself.

For each case of ``faithfulness.py`` (offline pretrained ``efficientnet_lite0``
on ``tests/data/images``) it times, in one run, side by side:

* ``mask``: the seed-faithful Meaningful Perturbation optimisation
  (``--iterations``, reference 500), as one job;
* ``metrics``: the deletion and insertion curves of that mask, batched
  (``batch_size`` 4 on a CPU, as the worker runs them) and unbatched
  (``batch_size`` 1), to show what batching the 58 step images buys;
* ``gradcam``: the Grad-CAM baseline's map and its own curves.

and prints each as seconds and as a fraction of the mask's time: the
overhead the worker adds to every job (``timings.metrics_s`` and
``timings.gradcam_s`` on the job report the same numbers per job).

Usage:
    python benchmarks/scoring_cost.py [--iterations 500] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from _local import CASES, add_machine_options, apply_machine_options, example_pixels, worker_model

from shared.attribution.config import PerturbationConfig
from shared.attribution.evaluation import evaluate
from shared.attribution.metrics import deletion_insertion
from shared.attribution.perturbation import explain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=500)
    add_machine_options(parser)
    args = parser.parse_args()
    apply_machine_options(args)
    classifier = worker_model("efficientnet_lite0", args.device)
    pixels = example_pixels()
    config = PerturbationConfig(iterations=args.iterations)
    print(f"efficientnet_lite0 on {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; {args.iterations} iterations")
    # warm-up (first Grad-CAM import, allocator)
    warm = pixels[CASES[0][0]]
    evaluate(classifier, warm, explain(classifier, warm, CASES[0][1], config.replace(iterations=2)))

    rows = []
    for file, target in CASES:
        image = pixels[file]
        start = time.perf_counter()
        e = explain(classifier, image, target, config)
        mask_s = time.perf_counter() - start
        start = time.perf_counter()
        ev = evaluate(classifier, image, e, gradcam=True)
        scoring_s = time.perf_counter() - start
        start = time.perf_counter()
        deletion_insertion(classifier, image, e.saliency, target, blur=config.blur, batch_size=1)
        unbatched_s = time.perf_counter() - start
        rows.append((f"{file}:{target}", mask_s, ev.metrics.seconds, unbatched_s, ev.gradcam_s, scoring_s))
        print(f"  {file}:{target}: mask {mask_s:.1f}s, metrics {ev.metrics.seconds:.2f}s "
              f"(unbatched {unbatched_s:.2f}s), grad-cam {ev.gradcam_s:.2f}s", flush=True)

    cols = np.array([r[1:] for r in rows]).mean(axis=0)
    mask_s, metrics_s, unbatched_s, gradcam_s, scoring_s = cols
    print()
    print("| step | seconds (mean of 3 cases) | vs the mask |")
    print("|---|---|---|")
    print(f"| mask ({args.iterations} it) | {mask_s:.2f} | 1.00 |")
    print(f"| deletion + insertion curves, batched (4) | {metrics_s:.2f} | {metrics_s / mask_s:.3f} |")
    print(f"| same, unbatched (1) | {unbatched_s:.2f} | {unbatched_s / mask_s:.3f} |")
    print(f"| Grad-CAM map + its curves | {gradcam_s:.2f} | {gradcam_s / mask_s:.3f} |")
    print(f"| all scoring the worker adds | {scoring_s:.2f} | {scoring_s / mask_s:.3f} |")
    print(f"\nbatching the curves: {unbatched_s / metrics_s:.2f}x faster than one image per forward")


if __name__ == "__main__":
    main()

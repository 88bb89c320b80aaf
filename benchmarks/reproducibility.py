"""The cost of reproducibility: the engine's fixed batch layout vs the old one.

Runs ``--load`` 1, 2 and 4 identical-setting Meaningful Perturbation jobs at
once (the cases of ``faithfulness.py``, round robin) through a
:class:`worker.engine.BatchEngine` of ``max_batch`` ``--max-batch`` on the
offline pretrained ``efficientnet_lite0``, with the fixed layout
(``reproducible=True``: always ``max_batch`` samples per step, free slots
zero-filled) and the old dynamic one (a batch of just the running jobs),
variants alternated over ``--repeats`` rounds. Prints jobs per minute per load
and the ratio fixed / dynamic, then each layout's largest difference between
the first job's mask under load and the same job alone (0 = bit-for-bit).

Usage:
    python benchmarks/reproducibility.py [--max-batch 4] [--iterations 30] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from _local import CASES, add_machine_options, apply_machine_options, example_pixels, worker_model

from shared.attribution.config import PerturbationConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--loads", default="1,2,4", help="jobs submitted at once, comma-separated")
    add_machine_options(parser)
    args = parser.parse_args()
    apply_machine_options(args)
    from worker.engine import BatchEngine

    classifier = worker_model("efficientnet_lite0", args.device)
    images = example_pixels()
    loads = [int(v) for v in args.loads.split(",")]
    config = PerturbationConfig(iterations=args.iterations, seed=77)
    print(f"efficientnet_lite0 on {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"max_batch {args.max_batch}, {args.iterations} iterations, loads {loads}")

    rates: dict[tuple[str, int], list[float]] = {}
    first_mask: dict[tuple[str, int], np.ndarray] = {}
    for round_ in range(args.repeats):
        order = ("fixed", "dynamic") if round_ % 2 == 0 else ("dynamic", "fixed")
        for load in loads:
            for name in order:
                engine = BatchEngine(classifier, max_batch=args.max_batch, channels_last=False,
                                     reproducible=name == "fixed")
                jobs = [CASES[i % len(CASES)] for i in range(load)]
                start = time.perf_counter()
                futures = [engine.submit(images[f], t, config) for f, t in jobs]
                results = [fut.result() for fut in futures]
                seconds = time.perf_counter() - start
                engine.stop()
                rates.setdefault((name, load), []).append(load / seconds * 60)
                first_mask[(name, load)] = results[0].mask
                print(f"  round {round_ + 1} load {load} {name:7s}: {seconds:6.1f} s, "
                      f"{rates[(name, load)][-1]:.2f} jobs/min", flush=True)
    print()
    print("| jobs at once | fixed layout, jobs/min | dynamic layout, jobs/min | fixed / dynamic |")
    print("|---|---|---|---|")
    for load in loads:
        fixed = statistics.median(rates[("fixed", load)])
        dynamic = statistics.median(rates[("dynamic", load)])
        print(f"| {load} | {fixed:.2f} | {dynamic:.2f} | {fixed / dynamic:.2f}× |")
    print()
    for name in ("fixed", "dynamic"):
        solo = first_mask[(name, loads[0])]
        diffs = [float(np.abs(first_mask[(name, load)] - solo).max()) for load in loads[1:]]
        print(f"{name}: max |Δ mask| of the first job under load vs alone: "
              + ", ".join(f"load {load}: {d:.3g}" for load, d in zip(loads[1:], diffs)))


if __name__ == "__main__":
    main()

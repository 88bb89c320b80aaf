"""Extremal-perturbation jobs through the worker's batch engine: batching on vs off.

Submits ``--jobs`` extremal jobs (the cases of ``faithfulness.py``, round
robin: flute, and both targets of ``both.png``) at once to a
:class:`worker.engine.BatchEngine` on the offline pretrained
``efficientnet_lite0``, with ``max_batch`` 1 (each job stepped alone, one after
the other) and ``max_batch`` = ``--jobs`` (every job's areas in one batch per
step), variants alternated over ``--repeats`` rounds, and prints jobs per
minute and the ratio; then the largest difference of the masks' scores
between the two (batching must not change the results beyond float noise).

Usage:
    python benchmarks/extremal_batching.py [--jobs 4] [--iterations 30] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _local import CASES, add_machine_options, apply_machine_options, example_pixels, worker_model

from shared.attribution.config import PerturbationConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    add_machine_options(parser)
    args = parser.parse_args()
    apply_machine_options(args)
    from worker.engine import BatchEngine

    classifier = worker_model("efficientnet_lite0", args.device)
    images = example_pixels()
    jobs = [CASES[i % len(CASES)] for i in range(args.jobs)]
    config = PerturbationConfig(method="extremal", game="preservation", iterations=args.iterations)
    print(f"efficientnet_lite0 on {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.jobs} extremal jobs x {len(config.areas)} areas x {args.iterations} iterations")

    rates: dict[str, list[float]] = {"off": [], "on": []}
    scores: dict[str, list[list[float]]] = {}
    for round_ in range(args.repeats):
        for name in (("off", "on") if round_ % 2 == 0 else ("on", "off")):
            engine = BatchEngine(classifier, max_batch=1 if name == "off" else args.jobs)
            start = time.perf_counter()
            futures = [engine.submit(images[f], t, config) for f, t in jobs]
            results = [fut.result() for fut in futures]
            seconds = time.perf_counter() - start
            engine.stop()
            rates[name].append(args.jobs / seconds * 60)
            scores[name] = [[a.score_after for a in r.areas] for r in results]
            print(f"  round {round_ + 1} {name:3s}: {seconds:6.1f} s, {rates[name][-1]:.2f} jobs/min "
                  f"(max batch seen {engine.max_seen_batch})", flush=True)
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    diff = max(abs(a - b) for ra, rb in zip(scores["off"], scores["on"]) for a, b in zip(ra, rb))
    print()
    print("| variant | jobs / min (median) | vs off |")
    print("|---|---|---|")
    print(f"| off (max_batch 1) | {off:.2f} | 1.00× |")
    print(f"| on (max_batch {args.jobs}) | {on:.2f} | {on / off:.2f}× |")
    print(f"\nmax |Δ score_after| between off and on, over every area: {diff:.2e}")


if __name__ == "__main__":
    main()

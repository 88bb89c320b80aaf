"""The admission cost model (``shared/cost.py``) against measurements.

Each case runs in a fresh subprocess, as a worker runs it (the batch engine,
channels_last weights on the CPU): a few Adam steps of ``items`` masks at
``input_size``. It prints, per case, the model's estimate next to the
measured peak memory (growth of the process's peak RSS over its RSS once the
model and image are loaded) and the measured seconds per step, with the
ratio estimate / measured (>= 1: the model is conservative).

    python benchmarks/cost_model.py                    # efficientnet_lite0 and VGG19 (random weights)
    python benchmarks/cost_model.py --models efficientnet_lite0 --iterations 4

Under a minute on a 2-core CPU with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (method, input_size, items): items = targets (Meaningful Perturbation) or areas (extremal).
CASES = {
    "efficientnet_lite0": [("mp", 224, 1), ("mp", 448, 1), ("mp", 224, 4), ("extremal", 224, 3),
                           ("extremal", 448, 1)],
    "vgg19": [("mp", 224, 1), ("extremal", 224, 2)],
}


def _child(model: str, method: str, size: int, items: int, iterations: int) -> dict:
    import resource
    import time

    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from shared.attribution.classifier import Classifier
    from shared.attribution.config import PerturbationConfig
    from worker.engine import BatchEngine

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))
    if model == "vgg19":
        import torchvision

        classifier = Classifier(module=torchvision.models.vgg19(weights=None).eval(), name="vgg19")
    else:
        from shared.models.registry import load_model

        classifier = load_model(model, device="cpu")
    classifier.module.eval()
    for p in classifier.module.parameters():
        p.requires_grad_(False)
    pixels = (np.random.RandomState(0).rand(480, 640, 3) * 255).astype(np.uint8)
    areas = (0.05, 0.1, 0.2, 0.3, 0.4)[:items] if method == "extremal" else (0.1,)
    config = PerturbationConfig(iterations=iterations, input_size=size, mask_size=28 if size >= 28 else size,
                                method="extremal" if method == "extremal" else "meaningful_perturbation",
                                areas=areas)
    engine = BatchEngine(classifier, max_batch=max(items, 1), reproducible=False, model_name=model)
    stamps: list[float] = []

    def on_step(i, total, losses):
        stamps.append(time.perf_counter())

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n_jobs = 1 if method == "extremal" else items
    futures = [engine.submit(pixels, 100 + k, config, on_step if k == 0 else None) for k in range(n_jobs)]
    for f in futures:
        f.result()
    engine.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"peak_growth": peak - base, "step_s": sorted(steps)[len(steps) // 2] if steps else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet_lite0,vgg19")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, method, size, items = json.loads(args.child)
        print(json.dumps(_child(model, method, int(size), int(items), args.iterations)))
        return

    sys.path.insert(0, str(ROOT))
    from shared.cost import item_memory, model_cost

    print("| model | method | input_size | masks | est. memory | measured peak growth | ratio "
          "| est. s/step | measured s/step | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for method, size, items in CASES[model]:
            out = subprocess.run(
                [sys.executable, __file__, "--iterations", str(args.iterations), "--child",
                 json.dumps([model, method, size, items])],
                capture_output=True, text=True, check=True, cwd=ROOT)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            kind = "extremal" if method == "extremal" else "meaningful_perturbation"
            cost = model_cost(model)
            est_mem = items * item_memory(model, size, kind) + cost.overhead_bytes
            est_s = cost.step_overhead_s + items * size * size / 1e6 * cost.per_mpix_iter(kind)
            mem, step = got["peak_growth"], got["step_s"]
            print(f"| {model} | {method} | {size} | {items} | {est_mem / 2**20:.0f} MiB "
                  f"| {mem / 2**20:.0f} MiB | {est_mem / max(mem, 1):.2f} "
                  f"| {est_s:.3f} | {step:.3f} | {est_s / step:.2f} |", flush=True)


if __name__ == "__main__":
    main()

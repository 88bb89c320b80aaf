"""GPU benchmark: VGG19 (random weights) at 500 iterations, ours against the reference loop.

On one CUDA device, in one run, it reports

1. the reference loop's speed (re-implemented as published: batch 1, fp32,
   noise drawn with numpy on the host and copied to the device every step;
   ``benchmarks/iteration_speed.py`` ``reference_loop``) as jobs per minute;
2. single-job latency: one ``explain()`` of ``--iterations`` steps (creation,
   every step and the final scoring, synchronised), per variant (target:
   under 1 s);
3. jobs per minute at batch 1, 8 and 32: that many jobs created together and
   stepped with ``step_batch`` until done (creation and results included), per
   variant, and the ratio to the reference loop (target at batch 32: >= 20x).

Variants (each kept in the tables, so it is plain which pays):

* ``fp32``, ``bf16`` -- ``PerturbationConfig.precision``;
* ``+cl`` -- the module in ``channels_last`` memory format;
* ``+fused`` -- each job's Adam with ``fused=True`` (one kernel per step
  instead of a dozen);
* ``+compile`` -- ``torch.compile(module)`` (default mode), and
  ``+graphs`` -- ``torch.compile(module, mode="reduce-overhead")`` (CUDA
  graphs); their compilation time is reported and they are skipped, with a
  message, once ``--budget-s`` seconds have gone.

Everything runs in well under 8 minutes on one H200 (``--budget-s 420`` caps
the optional parts). Without CUDA it says so and exits with status 0.

Usage:
    python benchmarks/gpu_bench.py                      # CUDA, 500 iterations
    python benchmarks/gpu_bench.py --device cpu --iterations 3   # dry run (no GPU needed)
    python benchmarks/gpu_bench.py --dry-run            # the same, with batches 1,2

``--json out.json`` also writes the raw numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _service import in_thread  # noqa: E402
from iteration_speed import example_image, load, reference_loop  # noqa: E402
from shared.attribution.classifier import Classifier  # noqa: E402
from shared.attribution.config import PerturbationConfig  # noqa: E402
from shared.attribution.perturbation import MaskOptimisation, explain, step_batch  # noqa: E402


@dataclass
class Variant:
    name: str
    precision: str
    classifier: Classifier
    fused: bool = False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def with_module(base: Classifier, module: torch.nn.Module) -> Classifier:
    return Classifier(module=module, mean=base.mean, std=base.std, labels=base.labels, name=base.name,
                      input_size=base.input_size)


def fuse_adam(runs: list[MaskOptimisation]) -> None:
    """Give each run a fused Adam (same hyperparameters, fresh state: call before the first step)."""
    for r in runs:
        r.optimizer = torch.optim.Adam([r.mask], lr=r.config.learning_rate, fused=True)


def run_jobs(variant: Variant, image: np.ndarray, target: int, batch: int, iterations: int) -> float:
    """Seconds to create ``batch`` jobs, step them to the end together and read their results."""
    device = variant.classifier.device
    config = PerturbationConfig(iterations=iterations, precision=variant.precision)
    sync(device)
    start = time.perf_counter()
    runs = [MaskOptimisation.create(variant.classifier, image, target, config.replace(seed=i)) for i in range(batch)]
    if variant.fused:
        fuse_adam(runs)
    while not all(r.done for r in runs):
        step_batch(variant.classifier, runs)
    results = [r.result(variant.classifier) for r in runs]
    sync(device)
    elapsed = time.perf_counter() - start
    assert all(r.iterations_run == iterations for r in results)
    return elapsed


def single_job(variant: Variant, image: np.ndarray, target: int, iterations: int) -> tuple[float, float]:
    """(seconds, score_after) of one ``explain()``-equivalent job."""
    if not variant.fused:
        device = variant.classifier.device
        config = PerturbationConfig(iterations=iterations, precision=variant.precision)
        sync(device)
        start = time.perf_counter()
        result = explain(variant.classifier, image, target, config)
        sync(device)
        return time.perf_counter() - start, result.score_after
    return run_jobs(variant, image, target, 1, iterations), float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per measurement (median)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip the optional (compiled) variants once this much time has gone")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile variants: auto = on CUDA only")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the script on the CPU: --device cpu --iterations 3 --batches 1,2 --repeats 1")
    parser.add_argument("--json", help="write the raw results here")
    args = parser.parse_args()
    if args.dry_run:
        args.device, args.iterations, args.batches, args.repeats = "cpu", 3, "1,2", 1

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device is available (torch.cuda.is_available() is False); nothing to do. "
              "Run with --device cpu --iterations 3 (or --dry-run) to check the script on the CPU.")
        return 0
    began = time.monotonic()
    batches = [int(b) for b in args.batches.split(",")]
    compile_on = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    print(f"device {device} ({name}); torch {torch.__version__}; VGG19 random weights; {args.iterations} "
          f"iterations; batches {batches}; {args.repeats} repeat(s), median", flush=True)

    base = load("vgg19", str(device))
    image = example_image()
    target = 558  # flute (the example image's class), as iteration_speed.py

    def call(fn: Callable[..., float], *a) -> float:
        # On the CPU, on a side thread as the worker (see _service.in_thread);
        # on CUDA, on this thread (CUDA graph trees are per thread).
        return in_thread(fn, *a) if device.type == "cpu" else fn(*a)

    def timed(fn: Callable[[], float]) -> float:
        call(fn)  # warm-up (cuDNN autotuning, allocator, lazy init) at the same shapes
        return statistics.median(call(fn) for _ in range(args.repeats))

    results: dict[str, object] = {"device": name, "iterations": args.iterations}

    # 1. the reference loop
    call(reference_loop, base, image, target, 3)
    ref_s = statistics.median(call(reference_loop, base, image, target, args.iterations)
                              for _ in range(args.repeats))
    ref_jpm = 60.0 / (ref_s * args.iterations)
    results["reference"] = {"s_per_iteration": ref_s, "jobs_per_min": ref_jpm}
    print(f"reference loop: {ref_s * 1e3:.2f} ms/iteration -> {ref_s * args.iterations:.2f} s/job, "
          f"{ref_jpm:.1f} jobs/min", flush=True)

    cl = with_module(base, copy.deepcopy(base.module).to(memory_format=torch.channels_last))
    variants = [
        Variant("fp32", "fp32", base),
        Variant("bf16", "bf16", base),
        Variant("bf16+cl", "bf16", cl),
        Variant("bf16+cl+fused", "bf16", cl, fused=True),
    ]
    if device.type == "cpu":  # fused Adam on the CPU exists too, but keep the dry run short
        variants = variants[:3] + [Variant("bf16+fused", "bf16", base, fused=True)]

    # 2. single-job latency
    latency: dict[str, float] = {}
    for v in variants:
        latency[v.name] = timed(lambda v=v: single_job(v, image, target, args.iterations)[0])
        print(f"single job {v.name:16s} {latency[v.name]:.3f} s", flush=True)

    # 3. jobs per minute at each batch
    jpm: dict[str, dict[int, float]] = {}
    for v in variants:
        jpm[v.name] = {}
        for b in batches:
            seconds = timed(lambda v=v, b=b: run_jobs(v, image, target, b, args.iterations))
            jpm[v.name][b] = 60.0 * b / seconds
            print(f"batch {b:3d} {v.name:16s} {jpm[v.name][b]:9.1f} jobs/min ({seconds:.2f} s)", flush=True)

    # 4. optional: torch.compile (default mode), then CUDA graphs, within the budget
    compiled: dict[str, float] = {}
    if compile_on:
        best = max(variants, key=lambda v: jpm[v.name][batches[-1]])
        for mode, label in ((None, "+compile"), ("reduce-overhead", "+graphs")):
            if time.monotonic() - began > args.budget_s:
                print(f"skipped {label}: the {args.budget_s:.0f} s budget is spent", flush=True)
                continue
            module = torch.compile(copy.deepcopy(best.classifier.module), mode=mode, dynamic=False)
            v = Variant(best.name + label, best.precision, with_module(base, module), best.fused)
            try:
                t0 = time.monotonic()
                call(run_jobs, v, image, target, batches[-1], 2)  # compiles for this batch size
                compiled[v.name] = time.monotonic() - t0
                print(f"{v.name}: compiled in {compiled[v.name]:.1f} s", flush=True)
                jpm[v.name] = {}
                for b in (batches[-1], batches[0]):
                    if time.monotonic() - began > args.budget_s:
                        print(f"skipped {v.name} at batch {b}: budget spent", flush=True)
                        continue
                    seconds = timed(lambda v=v, b=b: run_jobs(v, image, target, b, args.iterations))
                    jpm[v.name][b] = 60.0 * b / seconds
                    if b == 1:
                        latency[v.name] = seconds
                    print(f"batch {b:3d} {v.name:16s} {jpm[v.name][b]:9.1f} jobs/min ({seconds:.2f} s)", flush=True)
            except Exception as error:  # noqa: BLE001 - report and carry on
                print(f"{v.name} failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}", flush=True)

    # tables
    print(f"\n### Reference loop (batch 1, fp32, host numpy noise): {ref_s * 1e3:.2f} ms/iteration, "
          f"{ref_jpm:.1f} jobs/min\n")
    print(f"### Single job, {args.iterations} iterations (target < 1 s)\n")
    print("| variant | seconds | vs reference job |")
    print("|---|---|---|")
    for k, s in latency.items():
        print(f"| {k} | {s:.3f} | {ref_s * args.iterations / s:.1f}x |")
    print(f"\n### Jobs per minute (target at batch {batches[-1]}: >= 20x the reference)\n")
    print("| variant | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for k, row in jpm.items():
        cells = [f"{row[b]:.1f} ({row[b] / ref_jpm:.1f}x)" if b in row else "-" for b in batches]
        print(f"| {k} | " + " | ".join(cells) + " |")
    if compiled:
        print("\ncompilation: " + ", ".join(f"{k} {s:.1f} s" for k, s in compiled.items()))
    print(f"\ntotal {time.monotonic() - began:.0f} s")
    results.update(latency=latency, jobs_per_min=jpm, compile_s=compiled)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which device-level speed-ups pay, measured on the real optimisation step.

For each model it times one ``step_batch`` (forward + backward of every mask
in the batch, the Adam steps and the noise) per mask, for

* ``fp32`` against ``bf16`` autocast (``PerturbationConfig.precision``);
* the default (contiguous, NCHW) memory format against ``channels_last``
  (the module's 4-D weights converted with ``module.to(memory_format=...)``);
* optionally (``--compile``) ``torch.compile(module)`` (inductor), with its
  compilation time;

at each batch size of ``--batches``, variants interleaved round by round so
machine noise hits all alike (medians reported). It also checks that the
channels_last masks equal the default ones (max abs difference after the timed
steps, same seeds), and times drawing the per-step noise on the model's device
with a ``torch.Generator`` (ours) against the reference's host numpy draw +
copy.

Usage:
    python benchmarks/device_speedups.py [--models vgg19,efficientnet_lite0]
        [--batches 1,4] [--iterations 4] [--repeats 3] [--threads 2] [--clock wall|thread]
        [--compile]

Every timed call runs on a fresh side thread, as the worker's batch engine
does (see ``_service.in_thread``). On a shared, busy machine use
``--threads 1 --clock thread`` (the timing thread's CPU time), which other
processes barely disturb. ``vgg19`` has random weights (the same state dict
the service benchmarks give the worker through ``EBB_WEIGHTS_FILE``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _service import ROOT, in_thread, load_local_model  # noqa: E402

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared.attribution.classifier import Classifier  # noqa: E402
from shared.attribution.config import PerturbationConfig  # noqa: E402
from shared.attribution.perturbation import MaskOptimisation, step_batch  # noqa: E402
from shared.imaging.decode import decode_image  # noqa: E402


def cpu_report() -> str:
    flags = ""
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        pass
    have = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni") if f in flags.split()]
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("Model name")), "?")
    return (f"CPU {model}; torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
            f"mkldnn bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}; flags: {', '.join(have) or 'none'}")


def channels_last(classifier: Classifier) -> Classifier:
    module = copy.deepcopy(classifier.module).to(memory_format=torch.channels_last)
    return Classifier(module=module, mean=classifier.mean, std=classifier.std, labels=classifier.labels,
                      name=classifier.name, input_size=classifier.input_size)


def compiled(classifier: Classifier) -> tuple[Classifier, float]:
    module = torch.compile(copy.deepcopy(classifier.module))
    wrapped = Classifier(module=module, mean=classifier.mean, std=classifier.std, labels=classifier.labels,
                         name=classifier.name, input_size=classifier.input_size)
    return wrapped, 0.0


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
clock = time.perf_counter


def time_steps(classifier: Classifier, image: np.ndarray, target: int, batch: int, precision: str,
               iterations: int) -> tuple[float, np.ndarray]:
    """Seconds per mask-iteration of ``step_batch`` (one untimed warm-up step) and the masks."""
    config = PerturbationConfig(iterations=iterations + 1, precision=precision)
    runs = [MaskOptimisation.create(classifier, image, target, config.replace(seed=i)) for i in range(batch)]
    step_batch(classifier, runs)
    start = clock()
    for _ in range(iterations):
        step_batch(classifier, runs)
    elapsed = clock() - start
    return elapsed / (iterations * batch), np.stack([r.mask.detach()[0, 0].numpy() for r in runs])


def noise_timing(repeats: int = 200) -> tuple[float, float]:
    """(ours, reference) seconds per noise draw for one (1, 3, 224, 224) input on the CPU."""
    gen = torch.Generator().manual_seed(0)
    shape = (1, 3, 224, 224)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.randn(shape, generator=gen)
    ours = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        noise = np.zeros((224, 224, 3), dtype=np.float32)
        noise = noise + np.random.normal(0, 0.2, noise.shape).astype(np.float32)
        torch.from_numpy(np.transpose(noise, (2, 0, 1)))[None].to("cpu")
    return ours, (time.perf_counter() - t0) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vgg19,efficientnet_lite0")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--iterations", type=int, default=4, help="timed steps per sample")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(module) (fp32 and bf16)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall time, or the timing thread's CPU time (with --threads 1: robust to "
                             "other processes competing for the cores)")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread's CPU time: use it with --threads 1")
    torch.set_num_threads(args.threads)
    print(cpu_report())
    print(f"threads {torch.get_num_threads()}, {args.iterations} timed steps x {args.repeats} repeats (median), "
          f"{args.clock} clock, seconds per mask-iteration of step_batch")
    images = sorted((ROOT / "tests" / "data" / "images").glob("flute.jpg"))
    image = decode_image(images[0].read_bytes()).pixels if images else \
        (np.random.RandomState(0).rand(224, 224, 3) * 255).astype(np.uint8)

    ours, ref = noise_timing()
    print(f"\nnoise per step: torch.Generator on the model's device {ours * 1e3:.3f} ms, "
          f"reference host numpy + copy {ref * 1e3:.3f} ms\n")

    batches = [int(b) for b in args.batches.split(",")]
    precisions = args.precisions.split(",")
    for name in args.models.split(","):
        base = load_local_model(name)
        with torch.no_grad():
            target = int(base.module(base.normalise(torch.rand(1, 3, 224, 224))).argmax())
        models = {"contiguous": base, "channels_last": channels_last(base)}
        if args.compile:
            started = time.perf_counter()
            comp, _ = compiled(base)
            in_thread(time_steps, comp, image, target, batches[0], "fp32", 1)  # compiles
            print(f"{name}: torch.compile first call (compilation) {time.perf_counter() - started:.1f} s")
            models["compiled"] = comp
        variants = [(fmt, p, b) for b in batches for p in precisions for fmt in models]
        samples: dict[tuple, list[float]] = {v: [] for v in variants}
        masks: dict[tuple, np.ndarray] = {}
        for rep in range(args.repeats):
            for v in variants:
                fmt, precision, batch = v
                seconds, mask = in_thread(time_steps, models[fmt], image, target, batch, precision,
                                          args.iterations)
                samples[v].append(seconds)
                masks[v] = mask
        print(f"\n### {name}\n")
        print("| batch | precision | memory format | ms / mask-iteration | samples (ms) | vs contiguous fp32 b1 "
              "| max |mask - contiguous| |")
        print("|---|---|---|---|---|---|---|")
        ref_key = ("contiguous", "fp32", batches[0])
        ref_t = statistics.median(samples[ref_key])
        for v in variants:
            fmt, precision, batch = v
            t = statistics.median(samples[v])
            diff = float(np.abs(masks[v] - masks[("contiguous", precision, batch)]).max())
            spread = ", ".join(f"{s * 1e3:.0f}" for s in samples[v])
            print(f"| {batch} | {precision} | {fmt} | {t * 1e3:.1f} | {spread} | {ref_t / t:.2f}x | {diff:.2e} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

"""Time per mask-iteration: our optimiser against a plain re-implementation of
the reference loop, on the same model, in the same run.

The reference loop (batch 1, fp32, noise drawn in numpy on the host on every
step and copied to the device) is re-implemented here as it is published.

Usage:
    python benchmarks/iteration_speed.py [--models vgg19,efficientnet_lite0]
        [--iterations 20] [--repeats 3] [--device cpu]

Prints one line per (model, variant) and the ratios (reference seconds per
mask-iteration / ours: above 1 means we are faster).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.attribution.classifier import Classifier
from shared.attribution.config import PerturbationConfig
from shared.attribution.perturbation import MaskOptimisation, blurred_copy, prepare_image, step_batch

IMAGES = Path(__file__).resolve().parents[1] / "tests" / "data" / "images"


def load(name: str, device: str) -> Classifier:
    if name == "vgg19":
        import torchvision

        torch.manual_seed(0)
        return Classifier(module=torchvision.models.vgg19(weights=None).eval().to(device), name="vgg19 (random)")
    from shared.models.registry import load_model

    return load_model(name, device=device)


def example_image() -> np.ndarray:
    path = IMAGES / "flute.jpg"
    if path.exists():
        from shared.imaging.decode import decode_image

        return decode_image(path.read_bytes()).pixels
    return (np.random.RandomState(0).rand(224, 224, 3) * 255).astype(np.uint8)


def tv_norm(mask, beta):
    img = mask[0, 0, :]
    row_grad = torch.mean(torch.abs(img[:-1, :] - img[1:, :]).pow(beta))
    col_grad = torch.mean(torch.abs(img[:, :-1] - img[:, 1:]).pow(beta))
    return row_grad + col_grad


def reference_loop(classifier: Classifier, image: np.ndarray, target: int, iterations: int) -> float:
    """The published loop, returning seconds per mask-iteration."""
    device = classifier.device
    model = classifier.module
    for p in model.parameters():
        p.requires_grad = False
    x = prepare_image(image, 224, device)
    img = classifier.normalise(x)
    blurred = classifier.normalise(blurred_copy(x, "mean"))
    mask = torch.ones(1, 1, 28, 28, device=device, requires_grad=True)
    upsample = nn.UpsamplingBilinear2d(size=(224, 224)).to(device)
    optimizer = torch.optim.Adam([mask], lr=0.1)
    start = time.perf_counter()
    for _ in range(iterations):
        upsampled_mask = upsample(mask).expand(1, 3, 224, 224)
        perturbated_input = img.mul(upsampled_mask) + blurred.mul(1 - upsampled_mask)
        noise = np.zeros((224, 224, 3), dtype=np.float32)
        noise = noise + np.random.normal(0, 0.2, noise.shape).astype(np.float32)
        noise = torch.from_numpy(np.transpose(noise, (2, 0, 1)))[None].to(device)
        outputs = F.softmax(model(perturbated_input + noise), dim=1)
        loss = 0.01 * torch.mean(torch.abs(1 - mask)) + 0.2 * tv_norm(mask, 3) + outputs[0, target]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mask.data.clamp_(0, 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iterations


def ours(classifier: Classifier, image: np.ndarray, target: int, iterations: int, batch: int,
         precision: str = "fp32") -> float:
    """Our optimiser at ``batch`` masks per step, returning seconds per mask-iteration."""
    config = PerturbationConfig(iterations=iterations + 1, precision=precision)
    runs = [MaskOptimisation.create(classifier, image, target, config.replace(seed=i)) for i in range(batch)]
    step_batch(classifier, runs)  # warm-up step, not timed
    start = time.perf_counter()
    for _ in range(iterations):
        step_batch(classifier, runs)
    if classifier.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (iterations * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vgg19,efficientnet_lite0")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="also time ours with bf16 autocast")
    parser.add_argument("--no-channels-last", action="store_true",
                        help="run ours in the default memory format (the worker uses channels_last on CPU)")
    args = parser.parse_args()
    image = example_image()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"{args.iterations} iterations x {args.repeats} repeats (median)")
    for name in args.models.split(","):
        classifier = load(name, args.device)
        target = 558
        reference_loop(classifier, image, target, 2)  # warm-up
        # Ours runs as the worker's engine runs it: channels_last weights on the CPU.
        mine = classifier
        if args.device == "cpu" and not args.no_channels_last:
            mine = dataclasses.replace(classifier, module=copy.deepcopy(classifier.module))
            mine.module.to(memory_format=torch.channels_last)
        variants = {"reference (b1)": lambda: reference_loop(classifier, image, target, args.iterations)}
        variants["ours b1"] = lambda: ours(mine, image, target, args.iterations, 1)
        variants["ours b4"] = lambda: ours(mine, image, target, args.iterations, 4)
        if args.bf16:
            variants["ours b1 bf16"] = lambda: ours(mine, image, target, args.iterations, 1, "bf16")
            variants["ours b4 bf16"] = lambda: ours(mine, image, target, args.iterations, 4, "bf16")
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.repeats):  # interleave variants so machine noise hits all alike
            for key, fn in variants.items():
                times[key].append(fn())
        ref = statistics.median(times["reference (b1)"])
        for key, samples in times.items():
            t = statistics.median(samples)
            print(f"{classifier.name:24s} {key:16s} {t * 1000:8.1f} ms/mask-iteration   "
                  f"speed-up vs reference {ref / t:5.2f}x")


if __name__ == "__main__":
    main()

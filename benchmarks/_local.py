"""In-process helpers for the benchmarks that run the model directly (no service).

:func:`worker_model` loads a model the way a worker holds it (eval mode,
frozen parameters, channels_last weights on the CPU as its batch engine puts
them); :func:`add_machine_options` / :func:`apply_machine_options` handle the
``--threads`` and ``--device`` options every such benchmark takes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
#: The example images shipped beside the repository.
IMAGES = ROOT / "tests" / "data" / "images"
#: (file, ImageNet class): the flute, and the dog and cat of both.png.
CASES = [("flute.jpg", 558), ("both.png", 243), ("both.png", 282)]


def add_machine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")


def apply_machine_options(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def worker_model(name: str, device: str):
    """``name`` from the registry, held as a worker holds it."""
    from shared.models.registry import load_model
    from worker.engine import wants_channels_last

    classifier = load_model(name, device=device)
    classifier.module.eval()
    for p in classifier.module.parameters():
        p.requires_grad_(False)
    if wants_channels_last(classifier):
        classifier.module.to(memory_format=torch.channels_last)
    return classifier


def example_pixels() -> dict[str, "object"]:
    """File name -> decoded ``(H, W, 3)`` uint8 pixels of every file in :data:`CASES`."""
    from shared.imaging.decode import decode_image

    return {f: decode_image((IMAGES / f).read_bytes()).pixels for f, _ in CASES}

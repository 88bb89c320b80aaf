"""Faithfulness of each explanation method: deletion / insertion AUC and the pointing game.

Runs the offline pretrained ``efficientnet_lite0`` on the example images in
``tests/data/images``: ``flute.jpg`` (class 558, flute) and
``both.png`` (243 bull mastiff and 282 tiger cat), three cases in all. For
each method and case it measures

* deletion AUC (lower is better) and insertion AUC (higher is better) of the
  method's saliency map (:func:`shared.attribution.metrics.deletion_insertion`,
  28 steps, ``mean`` blur, at 224);
* the pointing game: is the max-saliency pixel inside the hand-drawn box of
  ``tests/data/boxes.json``? (When the maximum is a plateau, as for Meaningful
  Perturbation masks that reach 0, the tied pixel closest to the plateau's
  centroid is the one that points.)
* seconds to compute the explanation (one case at a time, metric excluded).

Methods: ``mp-default`` (the seed-faithful Meaningful Perturbation config at
``--iterations``), our variants (``--variants``), Grad-CAM, and TorchRay's
extremal perturbation if ``import torchray`` works (same areas and
iterations as ours). Our variant with the best mean ``insertion - deletion``
is marked *best*.

Usage:
    python benchmarks/faithfulness.py [--iterations 300] [--threads 2]
        [--variants mp-preservation,mp-constant,extremal] [--json out.json]
        [--no-default] [--no-gradcam] [--no-torchray]

Prints the settings, a markdown summary table (means over the cases) and a
per-case table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from shared.attribution.classifier import Classifier
from shared.attribution.config import PerturbationConfig
from shared.attribution.extremal import extremal
from shared.attribution.metrics import deletion_insertion
from shared.attribution.perturbation import explain, frozen, prepare_image

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "tests" / "data" / "images"
BOXES = ROOT / "tests" / "data" / "boxes.json"
SIZE = 224
AREAS = (0.05, 0.1, 0.2)

# (file, object in boxes.json, ImageNet class)
CASES = [("flute.jpg", "flute", 558), ("both.png", "dog", 243), ("both.png", "cat", 282)]

Method = Callable[[Classifier, np.ndarray, int], np.ndarray]  # -> (224, 224) saliency


@dataclass
class Row:
    method: str
    case: str
    deletion: float
    insertion: float
    hit: bool
    seconds: float


def pointing_point(saliency: np.ndarray) -> tuple[int, int]:
    """``(y, x)`` of the max-saliency pixel; on a plateau, the tied pixel nearest its centroid."""
    top = saliency >= saliency.max() - 1e-6
    ys, xs = np.nonzero(top)
    cy, cx = ys.mean(), xs.mean()
    i = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return int(ys[i]), int(xs[i])


def pointing_hit(saliency: np.ndarray, box: list[float]) -> bool:
    """Max-saliency pixel inside the normalised ``[x0, y0, x1, y1]`` box (at the saliency's size)."""
    h, w = saliency.shape
    y, x = pointing_point(saliency)
    x0, y0, x1, y1 = box
    return x0 * w <= x + 0.5 <= x1 * w and y0 * h <= y + 0.5 <= y1 * h


# --------------------------------------------------------------------------- methods


def mp(config: PerturbationConfig) -> Method:
    def run(classifier: Classifier, image: np.ndarray, target: int) -> np.ndarray:
        return explain(classifier, image, target, config).saliency

    return run


def extremal_method(iterations: int, **kwargs) -> Method:
    def run(classifier: Classifier, image: np.ndarray, target: int) -> np.ndarray:
        results = extremal(classifier, image, target, AREAS, iterations=iterations, **kwargs)
        return np.mean([r.mask for r in results], axis=0)  # nested areas: smaller = more salient

    return run


def gradcam_method(classifier: Classifier, image: np.ndarray, target: int) -> np.ndarray:
    from shared.attribution.gradcam import gradcam_saliency

    return gradcam_saliency(classifier, image, target)


def torchray_method(iterations: int) -> Method:
    from torchray.attribution.extremal_perturbation import extremal_perturbation

    def run(classifier: Classifier, image: np.ndarray, target: int) -> np.ndarray:
        x = classifier.normalise(prepare_image(image, SIZE, classifier.device))
        with frozen(classifier.module):
            masks, _ = extremal_perturbation(classifier.module, x, target, areas=list(AREAS), max_iter=iterations)
        return masks.mean(dim=0)[0].detach().cpu().numpy()

    return run


def variants(iterations: int) -> dict[str, tuple[str, Method]]:
    """Our candidate variants: name -> (settings, method)."""
    base = PerturbationConfig(iterations=iterations)
    return {
        "mp-preservation": (f"game=preservation, {iterations} it", mp(base.replace(game="preservation"))),
        "mp-constant": (f"perturbation=constant, {iterations} it", mp(base.replace(perturbation="constant"))),
        "mp-noise": (f"perturbation=noise, {iterations} it", mp(base.replace(perturbation="noise"))),
        "mp-fewer": (f"{max(1, iterations // 2)} it", mp(base.replace(iterations=max(1, iterations // 2)))),
        "mp-more": (f"{iterations * 2} it", mp(base.replace(iterations=iterations * 2))),
        "extremal": (f"areas {AREAS}, {iterations} it, mean of masks", extremal_method(iterations)),
        "extremal-prob": (
            f"areas {AREAS}, {iterations} it, probability reward",
            extremal_method(iterations, score="probability"),
        ),
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=300, help="iterations of every optimising method")
    parser.add_argument("--variants", default="mp-preservation,mp-constant,extremal",
                        help="comma-separated, from: " + ", ".join(variants(1)))
    parser.add_argument("--no-default", action="store_true", help="skip mp-default")
    parser.add_argument("--no-gradcam", action="store_true", help="skip Grad-CAM")
    parser.add_argument("--no-torchray", action="store_true", help="skip TorchRay even if installed")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write all rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from shared.imaging.decode import decode_image
    from shared.models.registry import load_model

    classifier = load_model("efficientnet_lite0", device=args.device)
    boxes = json.loads(BOXES.read_text())
    images = {name: decode_image((IMAGES / name).read_bytes()).pixels for name in {c[0] for c in CASES}}

    methods: dict[str, tuple[str, Method]] = {}
    if not args.no_default:
        methods["mp-default"] = (f"seed-faithful config, {args.iterations} it (reference 500)",
                                 mp(PerturbationConfig(iterations=args.iterations)))
    candidates = variants(args.iterations)
    chosen = [v for v in args.variants.split(",") if v]
    unknown = [v for v in chosen if v not in candidates]
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(unknown)}")
    methods.update({v: candidates[v] for v in chosen})
    if not args.no_gradcam:
        methods["grad-cam"] = ("pytorch-grad-cam GradCAM, layer bn2", gradcam_method)
    if not args.no_torchray:
        try:
            methods["torchray-extremal"] = (f"areas {AREAS}, max_iter {args.iterations}, mean of masks",
                                            torchray_method(args.iterations))
        except ImportError:
            pass

    print(f"efficientnet_lite0 on {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; iterations {args.iterations}")
    rows: list[Row] = []
    for name, (_, method) in methods.items():
        for file, obj, target in CASES:
            image = images[file]
            start = time.perf_counter()
            saliency = method(classifier, image, target)
            seconds = time.perf_counter() - start
            scores = deletion_insertion(classifier, image, saliency, target, input_size=SIZE)
            row = Row(name, f"{file}:{obj}({target})", scores.deletion_auc, scores.insertion_auc,
                      pointing_hit(saliency, boxes[file][obj]), seconds)
            rows.append(row)
            print(f"  {row.method:18s} {row.case:22s} del {row.deletion:.3f} ins {row.insertion:.3f} "
                  f"hit {int(row.hit)} {row.seconds:7.1f}s", flush=True)

    def mean(name: str, attr: str) -> float:
        return float(np.mean([getattr(r, attr) for r in rows if r.method == name]))

    ours = [m for m in methods if m.startswith(("mp-", "extremal")) and m != "mp-default"]
    best = max(ours, key=lambda m: mean(m, "insertion") - mean(m, "deletion")) if ours else None
    print()
    print("| method | settings | deletion AUC ↓ | insertion AUC ↑ | pointing hits | seconds / explanation |")
    print("|---|---|---|---|---|---|")
    for name, (settings, _) in methods.items():
        hits = sum(r.hit for r in rows if r.method == name)
        label = f"{name} (best)" if name == best else name
        print(f"| {label} | {settings} | {mean(name, 'deletion'):.3f} | {mean(name, 'insertion'):.3f} "
              f"| {hits}/{len(CASES)} | {mean(name, 'seconds'):.1f} |")
    print()
    print("| method | case | deletion AUC | insertion AUC | hit | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.method} | {r.case} | {r.deletion:.3f} | {r.insertion:.3f} | {'yes' if r.hit else 'no'} "
              f"| {r.seconds:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=2))


if __name__ == "__main__":
    main()

"""``ebb explain IMAGE``: explain one image from the command line.

This is the reference's ``python explain.py <image>``, done properly: a
progress bar with the current score, every artifact written atomically, and
readable errors instead of stack traces.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "explain",
        help="explain one image with Meaningful Perturbation",
        description="Optimise a perturbation mask that shows why MODEL predicts TARGET on IMAGE.",
    )
    p.add_argument("image", type=Path, help="the image file (PNG, JPEG, GIF, WebP, ...)")
    p.add_argument("--model", default="vgg19", help="registry name (default vgg19; efficientnet_lite0 works offline)")
    p.add_argument("--target", default=None, help="class INDEX or exact LABEL (default: the model's top-1)")
    p.add_argument("--iterations", type=int, default=None, help="optimisation steps (default 500)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default explanations/<image name>)")
    p.add_argument("--weights-file", default=None, help="local weights file (state_dict) for the model")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default 0)")
    p.add_argument("--blur", choices=("mean", "gaussian", "median"), default=None, help="perturbation blur")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="model precision (default fp32)")
    p.add_argument("--method", choices=("meaningful_perturbation", "extremal"), default=None,
                   help="saliency method (default meaningful_perturbation)")
    p.add_argument("--areas", default=None,
                   help="extremal target areas, comma-separated fractions (default 0.05,0.1,0.2)")
    p.add_argument("--game", choices=("deletion", "preservation"), default=None,
                   help="deletion (default) or preservation game")
    p.add_argument("--perturbation", choices=("blur", "constant", "noise"), default=None,
                   help="what replaces removed pixels (default blur)")
    p.add_argument("--faithfulness", action="store_true",
                   help="also score the mask (deletion/insertion AUC) against Grad-CAM; writes gradcam.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"ebb explain: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    # Heavy imports happen here, not when the CLI starts.
    from shared.attribution.config import PerturbationConfig
    from shared.imaging.decode import ImageDecodeError, decode_image
    from shared.models.labels import resolve_target

    overrides = {
        k: v
        for k, v in {
            "iterations": args.iterations,
            "seed": args.seed,
            "blur": args.blur,
            "precision": args.precision,
            "method": args.method,
            "game": args.game,
            "perturbation": args.perturbation,
        }.items()
        if v is not None
    }
    if args.areas is not None:
        try:
            overrides["areas"] = [float(a) for a in args.areas.split(",") if a.strip()]
        except ValueError:
            return _fail(f"--areas must be comma-separated fractions such as 0.05,0.1,0.2, got {args.areas!r}")
    try:
        config = PerturbationConfig(**overrides)
    except ValueError as exc:
        return _fail(str(exc))
    try:
        data = args.image.read_bytes()
    except OSError as exc:
        return _fail(f"cannot read {args.image}: {exc.strerror or exc}")
    try:
        decoded = decode_image(data)
    except ImageDecodeError as exc:
        return _fail(f"{args.image}: {exc}")

    import torch

    from shared.attribution.methods import run_method
    from shared.imaging.render import save_artifacts
    from shared.models.registry import WeightsUnavailableError, load_model

    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda was asked for but no CUDA device is available")
    try:
        classifier = load_model(args.model, device=args.device, weights_file=args.weights_file)
    except (ValueError, WeightsUnavailableError) as exc:
        return _fail(str(exc))
    try:
        target = resolve_target(args.target, classifier.labels)
    except ValueError as exc:
        return _fail(str(exc))

    on_step = None
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=config.iterations, desc="explaining", unit="it", file=sys.stderr)

        def on_step(iteration, total, losses):
            bar.update(1)
            if iteration % 10 == 0 or iteration == total:
                bar.set_postfix(score=f"{losses['score']:.4f}")

    try:
        result = run_method(classifier, decoded.pixels, target=target, config=config, on_step=on_step)
    finally:
        if bar is not None:
            bar.close()
    out = args.out or Path("explanations") / args.image.stem
    evaluation = None
    if args.faithfulness:
        from shared.attribution.evaluation import evaluate

        evaluation = evaluate(classifier, decoded.pixels, result)
    written = save_artifacts(
        out, decoded.pixels, result,
        gradcam=evaluation.gradcam_saliency if evaluation is not None else None,
        area_masks=getattr(result, "area_masks", None),
    )
    print(
        f"wrote {', '.join(sorted(p.name for p in written.values()))} to {out} "
        f"({result.label} [{result.target}]: {result.score_before:.4f} -> {result.score_after:.4f}, "
        f"{result.elapsed_s:.1f} s)"
    )
    if evaluation is not None:
        rows = [(config.method, evaluation.metrics)]
        if evaluation.gradcam is not None:
            rows.append(("gradcam", evaluation.gradcam))
        print(f"{'method':<24} {'deletion AUC (lower is better)':>31} {'insertion AUC (higher is better)':>33}")
        for name, scores in rows:
            print(f"{name:<24} {scores.deletion_auc:>31.4f} {scores.insertion_auc:>33.4f}")
        if evaluation.gradcam_error:
            print(f"Grad-CAM skipped: {evaluation.gradcam_error}")
    return 0

"""``ebb models list`` and ``ebb models fetch NAME``.

``fetch`` downloads a model's weights into ``TORCH_HOME`` (torchvision's cache)
so a worker can start without network access; ``Dockerfile.worker`` runs it at
build time to bake the weights into the image.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list models or fetch their weights")
    sub = p.add_subparsers(dest="models_command", required=True)
    ls = sub.add_parser("list", help="list the models the registry can load")
    ls.set_defaults(func=run_list)
    fetch = sub.add_parser("fetch", help="download a model's weights into TORCH_HOME and check they load")
    fetch.add_argument("name", help="registry name, e.g. vgg19 or efficientnet_lite0")
    fetch.add_argument("--weights-file", default=None, help="check this local weights file instead")
    fetch.set_defaults(func=run_fetch)


def run_list(args: argparse.Namespace) -> int:
    from shared.models.registry import available_models

    for name in available_models():
        print(name)
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from shared.models.registry import WeightsUnavailableError, load_model

    try:
        classifier = load_model(args.name, device="cpu", weights_file=args.weights_file)
    except (ValueError, WeightsUnavailableError) as exc:
        print(f"ebb models fetch: error: {exc}", file=sys.stderr)
        return 2
    params = sum(p.numel() for p in classifier.module.parameters())
    print(f"{args.name}: weights ready ({params / 1e6:.1f} M parameters, {len(classifier.labels)} labels)")
    return 0

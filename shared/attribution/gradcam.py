"""Grad-CAM (Selvaraju et al., 2017) baseline through the ``grad-cam`` package.

Wraps ``pytorch_grad_cam.GradCAM`` (PyPI ``grad-cam``, imported on first
use: it pulls in matplotlib and scikit-learn) so that it takes the same
inputs as the other methods and returns a saliency map comparable with
``Explanation.saliency``. The model's training flag and ``requires_grad``
flags are restored on exit and its hooks removed; its parameters never
accumulate gradients (they are frozen, so the *input* carries
``requires_grad``: pytorch-grad-cam 1.5 needs an output that has a graph).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .classifier import Classifier
from .perturbation import frozen, prepare_image

__all__ = ["default_target_layer", "gradcam_saliency"]


def default_target_layer(module: nn.Module) -> nn.Module:
    """The layer whose activations Grad-CAM weighs, for common architectures.

    * timm EfficientNet / MobileNet (``tf_efficientnet_lite0`` of
      ``efficientnet_lite0``): ``bn2``, the normalised and activated output of
      ``conv_head``, i.e. the last convolutional stage (7×7×1280 at 224);
    * torchvision VGG, AlexNet, EfficientNet, MobileNet, DenseNet ...:
      ``features[-1]`` (for ``vgg19`` the last max-pool, 7×7×512 at 224);
    * ResNet-like: ``layer4[-1]``;
    * otherwise the last ``nn.Conv2d`` of the module.

    Raises:
        ValueError: no convolution found.
    """
    if isinstance(getattr(module, "conv_head", None), nn.Module) and isinstance(
        getattr(module, "bn2", None), nn.Module
    ):
        return module.bn2
    features = getattr(module, "features", None)
    if isinstance(features, nn.Sequential) and len(features) > 0:
        return features[-1]
    layer4 = getattr(module, "layer4", None)
    if isinstance(layer4, nn.Sequential) and len(layer4) > 0:
        return layer4[-1]
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if convs:
        return convs[-1]
    raise ValueError(f"target_layer must be given: no convolution found in {type(module).__name__}")


def _resolve_layer(module: nn.Module, target_layer: nn.Module | str | None) -> nn.Module:
    if target_layer is None:
        return default_target_layer(module)
    if isinstance(target_layer, str):
        try:
            return module.get_submodule(target_layer)
        except AttributeError as exc:
            raise ValueError(f"target_layer {target_layer!r} is not a submodule of the model") from exc
    if isinstance(target_layer, nn.Module):
        if not any(m is target_layer for m in module.modules()):
            raise ValueError("target_layer must be a submodule of the model")
        return target_layer
    raise ValueError(f"target_layer must be None, a module or a dotted name, got {type(target_layer).__name__}")


def gradcam_saliency(
    classifier: Classifier | nn.Module,
    image: Any,
    target: int,
    target_layer: nn.Module | str | None = None,
    input_size: int | None = None,
) -> np.ndarray:
    """Grad-CAM map of ``target`` on ``image``.

    Args:
        classifier: a :class:`Classifier` (or a bare module with ImageNet
            normalisation); runs on its device.
        image: ``(H, W, 3)`` uint8 RGB array or a float tensor in [0, 1],
            resized to the model's square input like the other methods.
        target: class index whose logit is explained.
        target_layer: the layer (module or dotted name such as ``"blocks.6"``);
            default :func:`default_target_layer`.
        input_size: side of the square input; default ``classifier.input_size``.
    Returns:
        ``(S, S)`` float32 in [0, 1] (min-max normalised ReLU of the weighted
        activations, bilinearly resized by pytorch-grad-cam), high = important.
    """
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Grad-CAM needs the grad-cam package: pip install 'grad-cam>=1.5,<2'") from exc

    wrapped = Classifier.wrap(classifier)
    module = wrapped.module
    size = int(input_size or wrapped.input_size)
    layer = _resolve_layer(module, target_layer)
    x = prepare_image(image, size, wrapped.device)
    with frozen(module):
        with torch.no_grad():
            num_classes = module(wrapped.normalise(x)).shape[1]
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
            raise ValueError(f"target must be a class index (int), got {target!r}")
        if not 0 <= int(target) < num_classes:
            raise ValueError(f"target must be between 0 and {num_classes - 1}, got {target}")
        inp = wrapped.normalise(x).detach().requires_grad_(True)
        with torch.enable_grad(), GradCAM(model=module, target_layers=[layer]) as cam:
            maps = cam(input_tensor=inp, targets=[ClassifierOutputTarget(int(target))])
    saliency = np.asarray(maps[0], dtype=np.float32)
    if saliency.shape != (size, size):  # pragma: no cover - grad-cam resizes to the input already
        t = torch.from_numpy(saliency)[None, None]
        saliency = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear")[0, 0].numpy()
    return np.clip(saliency, 0.0, 1.0)

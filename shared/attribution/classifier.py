"""A differentiable black box plus what it needs to be explained."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Classifier:
    """A model with its preprocessing and labels.

    Attributes:
        module: maps a normalised batch ``(N, 3, H, W)`` float32 to logits ``(N, C)``.
        mean, std: per-channel normalisation applied to RGB pixels in [0, 1]:
            ``x_norm = (x - mean) / std``.
        labels: ``C`` class names (index -> label); may be empty.
        name: registry name, for display.
        input_size: side of the square input the model expects.
    """

    module: nn.Module
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    labels: Sequence[str] = field(default_factory=tuple)
    name: str = "model"
    input_size: int = 224

    @classmethod
    def wrap(cls, model: "Classifier | nn.Module") -> "Classifier":
        """Accept a bare ``nn.Module`` (ImageNet normalisation assumed)."""
        if isinstance(model, Classifier):
            return model
        if isinstance(model, nn.Module):
            return cls(module=model)
        raise ValueError(f"model must be a torch.nn.Module or a Classifier, got {type(model).__name__}")

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        for b in self.module.buffers():
            return b.device
        return torch.device("cpu")

    def label(self, index: int) -> str:
        if 0 <= index < len(self.labels):
            return str(self.labels[index])
        return f"class {index}"

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` RGB in [0, 1] -> the model's input space."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def to(self, device: str | torch.device) -> "Classifier":
        self.module.to(device)
        return self

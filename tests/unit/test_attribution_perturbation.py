"""Unit tests of the pure Meaningful Perturbation module, on tiny hand-built models."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from tests.unit.conftest import TinyNet

from shared.attribution.config import PerturbationConfig
from shared.attribution.perturbation import (
    MaskOptimisation,
    blend,
    blurred_copy,
    explain,
    explain_batch,
    gaussian_blur,
    l1_loss,
    median_blur,
    null_progress,
    prepare_image,
    step_batch,
    tv_loss,
    upsample_mask,
)


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255


# ----------------------------------------------------------------------- regularisers


def test_l1_hand_computed():
    mask = torch.tensor([[[[1.0, 0.5], [0.0, 0.25]]]])
    # |1-1| + |1-.5| + |1-0| + |1-.25| = 0 + .5 + 1 + .75 = 2.25, mean over 4
    assert l1_loss(mask).tolist() == pytest.approx([2.25 / 4])


def test_tv_hand_computed():
    mask = torch.tensor([[[[0.0, 1.0, 1.0], [0.0, 0.0, 0.5]]]])
    beta = 3.0
    # rows (vertical diffs): |0-0|,|0-1|,|0.5-1| -> 0,1,.125 mean = 1.125/3
    # cols (horizontal):     |1-0|,|1-1|,|0-0|,|.5-0| -> 1,0,0,.125 mean = 1.125/4
    expected = 1.125 / 3 + 1.125 / 4
    assert tv_loss(mask, beta).tolist() == pytest.approx([expected])
    # beta changes the exponent: with beta=1 -> 1.5/3 + 1.5/4
    assert tv_loss(mask, 1.0).tolist() == pytest.approx([1.5 / 3 + 1.5 / 4])


def test_regularisers_are_per_sample():
    masks = torch.stack([torch.ones(1, 4, 4), torch.zeros(1, 4, 4)])
    assert l1_loss(masks).tolist() == [0.0, 1.0]
    assert tv_loss(masks).tolist() == [0.0, 0.0]


# ----------------------------------------------------------------------- blend and blurs


def test_blend_endpoints_and_midpoint():
    img = torch.full((1, 3, 4, 4), 0.8)
    blurred = torch.full((1, 3, 4, 4), 0.2)
    assert torch.equal(blend(img, blurred, torch.ones(1, 1, 4, 4)), img)
    assert torch.equal(blend(img, blurred, torch.zeros(1, 1, 4, 4)), blurred)
    assert torch.allclose(blend(img, blurred, torch.full((1, 1, 4, 4), 0.5)), torch.full((1, 3, 4, 4), 0.5))


def test_upsample_mask_matches_reference_bilinear_align_corners():
    mask = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ref = nn.UpsamplingBilinear2d(size=(224, 224))(mask)
    assert torch.allclose(upsample_mask(mask, 224), ref)
    assert upsample_mask(torch.ones(1, 1, 28, 28), 224).min() == 1


@pytest.fixture
def noise_image() -> np.ndarray:
    return (np.random.RandomState(0).rand(64, 48, 3) * 255).astype(np.uint8)


def test_gaussian_blur_matches_opencv(noise_image):
    ours = gaussian_blur(_to_tensor(noise_image), 11, 5.0)[0].permute(1, 2, 0).numpy()
    ref = cv2.GaussianBlur(noise_image.astype(np.float32) / 255, (11, 11), 5)
    assert np.abs(ours - ref).max() < 1e-5


def test_median_blur_matches_opencv(noise_image):
    ours = median_blur(_to_tensor(noise_image), 11)[0].permute(1, 2, 0).numpy()
    ref = cv2.medianBlur(noise_image, 11).astype(np.float32) / 255
    assert np.array_equal(ours, ref)


def test_blurred_copy_options(noise_image):
    x = _to_tensor(noise_image)
    g, m = gaussian_blur(x), median_blur(x)
    assert torch.equal(blurred_copy(x, "gaussian"), g)
    assert torch.equal(blurred_copy(x, "median"), m)
    assert torch.allclose(blurred_copy(x, "mean"), (g + m) / 2)
    with pytest.raises(ValueError, match="blur"):
        blurred_copy(x, "box")


def test_blur_kernel_must_be_odd(noise_image):
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(_to_tensor(noise_image), 10)
    with pytest.raises(ValueError, match="odd"):
        median_blur(_to_tensor(noise_image), 4)


def test_prepare_image_shapes_and_errors(noise_image):
    x = prepare_image(noise_image, 32)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    with pytest.raises(ValueError, match="uint8"):
        prepare_image(noise_image.astype(np.float32), 32)
    with pytest.raises(ValueError, match="numpy array or a torch tensor"):
        prepare_image([1, 2, 3], 32)


# ----------------------------------------------------------------------- optimisation


def test_explain_result_fields(tiny, cfg, images):
    e = explain(tiny, images[0], target=2, config=cfg)
    assert e.mask.shape == (8, 8) and e.mask.dtype == np.float32
    assert e.mask_upsampled.shape == (64, 64)
    assert e.perturbed.shape == (64, 64, 3) and e.perturbed.dtype == np.uint8
    assert 0 <= e.mask.min() and e.mask.max() <= 1
    assert e.target == 2 and e.label == "c2"
    assert e.iterations_run == 15 and not e.cancelled
    assert set(e.history) == {"total", "l1", "tv", "score"}
    assert all(len(v) == 15 for v in e.history.values())
    assert len(e.top5_before) == 5 and e.top5_before[0]["prob"] >= e.top5_before[-1]["prob"]
    assert e.score_after < e.score_before  # the optimisation lowers the target score
    assert e.to_json()["target"] == {"index": 2, "label": "c2"}


def test_default_target_is_top1(tiny, cfg, images):
    e = explain(tiny, images[0], config=cfg)
    assert e.target == e.top5_before[0]["index"]


def test_loss_matches_formula_at_first_step(tiny, images):
    """The first recorded step equals l1*L1 + tv*TV + p[target] at mask=1 (noise off)."""
    cfg = PerturbationConfig(iterations=1, input_size=64, mask_size=8, noise_std=0.0)
    e = explain(tiny, images[0], target=4, config=cfg)
    # at mask == 1 the input is the image itself, both regularisers are 0
    assert e.history["l1"][0] == 0 and e.history["tv"][0] == 0
    assert e.history["score"][0] == pytest.approx(e.score_before, abs=1e-6)
    assert e.history["total"][0] == pytest.approx(e.score_before, abs=1e-6)


def test_deterministic_with_seed(tiny, cfg, images):
    a = explain(tiny, images[0], 1, cfg)
    b = explain(tiny, images[0], 1, cfg)
    c = explain(tiny, images[0], 1, cfg.replace(seed=1))
    assert np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.mask, c.mask)


def test_batched_equals_one_at_a_time(tiny, cfg, images):
    cfgs = [cfg, cfg.replace(seed=7, mask_size=6, l1_coeff=0.05, iterations=11)]
    batched = explain_batch(tiny, images, [1, 3], cfgs)
    for img, t, c, b in zip(images, [1, 3], cfgs, batched):
        alone = explain(tiny, img, t, c)
        assert b.iterations_run == alone.iterations_run
        np.testing.assert_allclose(b.mask, alone.mask, atol=1e-5)
        assert b.score_after == pytest.approx(alone.score_after, abs=1e-5)


def test_runs_can_join_a_batch_later(tiny, cfg, images):
    """Continuous batching: a run joining mid-way still matches its solo result."""
    first = MaskOptimisation.create(tiny, images[0], 1, cfg)
    late = MaskOptimisation.create(tiny, images[1], 3, cfg)
    for _ in range(5):
        step_batch(tiny, [first])
    while not (first.done and late.done):
        step_batch(tiny, [first, late])
    np.testing.assert_allclose(first.result(tiny).mask, explain(tiny, images[0], 1, cfg).mask, atol=1e-5)
    np.testing.assert_allclose(late.result(tiny).mask, explain(tiny, images[1], 3, cfg).mask, atol=1e-5)


def test_batch_requires_same_input_size(tiny, cfg, images):
    a = MaskOptimisation.create(tiny, images[0], 1, cfg)
    b = MaskOptimisation.create(tiny, images[0], 1, cfg.replace(input_size=32))
    with pytest.raises(ValueError, match="input_size"):
        step_batch(tiny, [a, b])


def test_model_state_restored_and_no_param_grads(cfg, images):
    net = TinyNet()
    net.train()
    net.head.weight.requires_grad_(False)  # mixed flags are restored exactly
    before = {n: p.requires_grad for n, p in net.named_parameters()}
    explain(net, images[0], 0, cfg)
    assert net.training
    assert {n: p.requires_grad for n, p in net.named_parameters()} == before
    assert all(p.grad is None for p in net.parameters())


def test_eval_mode_used_during_optimisation(cfg, images):
    seen = []

    class Spy(TinyNet):
        def forward(self, x):
            seen.append(self.training)
            return super().forward(x)

    net = Spy()
    net.train()
    explain(net, images[0], 0, cfg)
    assert seen and not any(seen)
    assert net.training


def test_progress_callback_and_cancel(tiny, cfg, images):
    calls = []

    def on_step(iteration, total, losses):
        calls.append((iteration, total, losses["score"]))
        return iteration >= 4  # ask to stop after step 4

    e = explain(tiny, images[0], 1, cfg, on_step=on_step)
    assert e.cancelled and e.iterations_run == 4
    assert [c[0] for c in calls] == [1, 2, 3, 4]
    assert all(c[1] == 15 for c in calls)
    assert len(e.history["score"]) == 4
    assert null_progress(1, 2, {}) is None


def test_cancel_one_run_leaves_the_others(tiny, cfg, images):
    stopper = lambda it, total, losses: it >= 3  # noqa: E731
    out = explain_batch(tiny, images, [1, 3], cfg, [stopper, None])
    assert out[0].cancelled and out[0].iterations_run == 3
    assert not out[1].cancelled and out[1].iterations_run == 15
    np.testing.assert_allclose(out[1].mask, explain(tiny, images[1], 3, cfg).mask, atol=1e-5)


def test_bad_arguments(tiny, cfg, images):
    with pytest.raises(ValueError, match="target"):
        explain(tiny, images[0], 10, cfg)
    with pytest.raises(ValueError, match="target"):
        explain(tiny, images[0], -1, cfg)
    with pytest.raises(ValueError, match="PerturbationConfig"):
        explain(tiny, images[0], 1, {"iterations": 3})
    with pytest.raises(ValueError, match="Module or a Classifier"):
        explain("resnet", images[0], 1, cfg)
    with pytest.raises(ValueError, match="same length"):
        explain_batch(tiny, images, [1], cfg)


def test_bf16_autocast_close_to_fp32(tiny, cfg, images):
    fp32 = explain(tiny, images[0], 1, cfg)
    bf16 = explain(tiny, images[0], 1, cfg.replace(precision="bf16"))
    assert np.abs(fp32.mask - bf16.mask).mean() < 0.05


def test_median_blur_pure_torch_path_matches_opencv(noise_image, monkeypatch):
    """Without OpenCV the torch fallback gives the same result."""
    import shared.attribution.perturbation as perturbation

    monkeypatch.setattr(perturbation, "_CV2", False)
    ours = median_blur(_to_tensor(noise_image), 11)[0].permute(1, 2, 0).numpy()
    ref = cv2.medianBlur(noise_image, 11).astype(np.float32) / 255
    assert np.array_equal(ours, ref)


def test_noise_std_is_the_same_pixel_noise_for_every_normalisation(tiny, images):
    """noise_std is in ImageNet-std units: a (x - 0.5) / 0.5 model gets the same
    pixel-space noise as an ImageNet-normalised one, which keeps the reference's."""
    from shared.attribution.classifier import IMAGENET_STD, Classifier
    from shared.attribution.perturbation import MaskOptimisation, noise_scale

    half = Classifier(module=tiny.module, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), labels=tiny.labels)
    cfg = PerturbationConfig(iterations=1, input_size=64, mask_size=8, noise_std=0.3, seed=4)
    assert noise_scale(tiny, 0.3) == 0.3  # ImageNet normalisation: the reference, unchanged
    pixel_noise = []
    for clf in (tiny, half):
        run = MaskOptimisation.create(clf, images[0], 1, cfg)
        std = torch.tensor(clf.std).view(1, 3, 1, 1)
        pixel_noise.append((run.perturbed_input(noise=True) - run.perturbed_input(noise=False)) * std)
    torch.testing.assert_close(pixel_noise[0], pixel_noise[1], atol=1e-5, rtol=1e-4)
    measured = pixel_noise[1].std(dim=(0, 2, 3))
    expected = 0.3 * torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(measured, expected, rtol=0.05, atol=0)

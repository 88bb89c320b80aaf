"""Tests of shared.imaging.render: heatmaps, overlays and atomic artifacts."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from shared.imaging import render
from shared.imaging.render import (
    ARTIFACT_NAMES,
    mask_to_png_array,
    overlay,
    saliency_heatmap,
    save_artifacts,
    thumbnail_png,
)


def read_png(path_or_bytes) -> np.ndarray:
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(src) as img:
        assert img.format == "PNG"
        return np.asarray(img).copy()


def smooth_mask(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((size, size)).astype(np.float32)


def fake_explanation(m: int = 7, s: int = 32, seed: int = 0, **overrides) -> SimpleNamespace:
    """Stand-in for shared.attribution.perturbation.Explanation."""
    rng = np.random.default_rng(seed)
    mask = rng.random((m, m)).astype(np.float32)
    up = np.asarray(Image.fromarray(mask).resize((s, s), Image.Resampling.BILINEAR), np.float32)
    up = np.clip(up, 0.0, 1.0)
    perturbed = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
    top5 = [{"index": i, "label": f"class {i}", "prob": 0.5 / (i + 1)} for i in range(5)]
    config = SimpleNamespace(to_dict=lambda: {"iterations": 3, "mask_size": m, "input_size": s})
    fields = dict(
        mask=mask,
        mask_upsampled=up,
        perturbed=perturbed,
        target=3,
        label="class 3",
        score_before=0.9,
        score_after=0.05,
        top5_before=top5,
        top5_after=top5[::-1],
        history={"loss": [1.0, 0.5, 0.25], "score": [0.9, 0.3, 0.05]},
        elapsed_s=1.25,
        iterations_run=3,
        cancelled=False,
        config=config,
    )
    fields.update(overrides)
    ns = SimpleNamespace(**fields)

    def to_json():
        return {
            "target": ns.target,
            "label": ns.label,
            "score_before": ns.score_before,
            "score_after": ns.score_after,
            "top5_before": ns.top5_before,
            "top5_after": ns.top5_after,
            "history": ns.history,
            "elapsed_s": ns.elapsed_s,
            "iterations_run": ns.iterations_run,
            "cancelled": ns.cancelled,
            "config": ns.config.to_dict(),
        }

    ns.to_json = to_json
    return ns


def original(h: int = 30, w: int = 50, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- #
# mask_to_png_array


def test_mask_to_png_array_values():
    out = mask_to_png_array(np.array([[0.0, 0.5, 1.0], [0.25, 0.999, 0.001]], np.float32))
    assert out.dtype == np.uint8 and out.shape == (2, 3)
    assert out.tolist() == [[0, 128, 255], [64, 255, 0]]


def test_mask_tolerates_round_off_but_not_garbage():
    out = mask_to_png_array(np.array([[-1e-6, 1.0 + 1e-6]]))
    assert out.tolist() == [[0, 255]]
    for bad in (
        np.array([[1.5]]),
        np.array([[-0.2]]),
        np.array([[np.nan]]),
        np.zeros((2, 2, 2)),
        np.zeros((0, 3)),
        np.array([["a"]]),
    ):
        with pytest.raises(ValueError):
            mask_to_png_array(bad)


# --------------------------------------------------------------------------- #
# saliency_heatmap


def test_heatmap_shape_dtype_and_contrast():
    mask = smooth_mask(9)
    heat = saliency_heatmap(mask)
    assert heat.dtype == np.uint8 and heat.shape == (9, 9, 3)
    keep = saliency_heatmap(np.ones((4, 4), np.float32))
    delete = saliency_heatmap(np.zeros((4, 4), np.float32))
    assert not np.array_equal(keep, delete)
    # Kept (not salient) is dark; deleted (salient) is bright.
    assert int(keep.sum()) < int(delete.sum())
    assert keep.max() < 20


def test_heatmap_is_rgb_not_bgr():
    # Inferno's top is a bright yellow: red and green high, blue low.
    r, g, b = (int(v) for v in saliency_heatmap(np.zeros((1, 1)))[0, 0])
    assert r > 200 and g > 200 and b < 200 and r > b


def test_heatmap_monotone_brightness():
    ramp = np.linspace(1.0, 0.0, 11, dtype=np.float32)[None, :]
    lum = saliency_heatmap(ramp).astype(int).sum(axis=2)[0]
    assert (np.diff(lum) >= 0).all()


# --------------------------------------------------------------------------- #
# overlay


def test_overlay_keeps_original_resolution():
    img = original(30, 50)
    out = overlay(img, smooth_mask(7))
    assert out.dtype == np.uint8 and out.shape == (30, 50, 3)


def test_overlay_alpha_extremes():
    img = original(20, 40)
    mask = smooth_mask(5)
    np.testing.assert_array_equal(overlay(img, mask, alpha=0.0), img)
    full = overlay(img, mask, alpha=1.0)
    # alpha 1 is the heatmap of the bilinearly resized mask.
    import cv2

    resized = cv2.resize(mask, (40, 20), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(full, saliency_heatmap(np.clip(resized, 0, 1)))


def test_overlay_constant_mask_is_uniform_blend():
    img = np.full((10, 12, 3), 100, np.uint8)
    out = overlay(img, np.ones((3, 3), np.float32), alpha=0.5)
    black = saliency_heatmap(np.ones((1, 1)))[0, 0].astype(float)
    expected = np.rint(0.5 * 100 + 0.5 * black)
    assert np.abs(out.astype(float) - expected).max() <= 1


def test_overlay_differs_where_salient():
    img = np.full((16, 16, 3), 128, np.uint8)
    mask = np.ones((16, 16), np.float32)
    mask[:8] = 0.0  # top half deleted = salient
    out = overlay(img, mask)
    assert out[:8].astype(int).sum() > out[8:].astype(int).sum()


@pytest.mark.parametrize("alpha", [-0.1, 1.1, float("nan"), "0.5", True])
def test_overlay_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        overlay(original(), smooth_mask(4), alpha=alpha)


@pytest.mark.parametrize(
    "image",
    [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), [[0]]],
)
def test_overlay_bad_image(image):
    with pytest.raises(ValueError, match="image"):
        overlay(image, smooth_mask(4))


# --------------------------------------------------------------------------- #
# thumbnail_png


def test_thumbnail_keeps_aspect_ratio():
    thumb = read_png(thumbnail_png(original(100, 200), size=96))
    assert thumb.shape == (48, 96, 3)


def test_thumbnail_never_enlarges():
    assert read_png(thumbnail_png(original(10, 20))).shape == (10, 20, 3)


@pytest.mark.parametrize("size", [0, -1, 5000, 2.5, True])
def test_thumbnail_bad_size(size):
    with pytest.raises(ValueError, match="size"):
        thumbnail_png(original(), size=size)


# --------------------------------------------------------------------------- #
# save_artifacts


def test_artifact_names_contract():
    assert ARTIFACT_NAMES == {
        "mask_npy": "mask.npy",
        "mask_png": "mask.png",
        "heatmap_png": "heatmap.png",
        "overlay_png": "overlay.png",
        "perturbed_png": "perturbed.png",
        "result_json": "result.json",
    }


#: Written for every explanation besides ARTIFACT_NAMES (extras since they were added).
SALIENCY = {"saliency_npy": "saliency.npy", "saliency_png": "saliency.png"}
ALWAYS = [*ARTIFACT_NAMES.values(), *SALIENCY.values()]


def test_save_artifacts_writes_all_files(tmp_path):
    out_dir = tmp_path / "jobs" / "job-1"
    img = original(30, 50)
    expl = fake_explanation(m=7, s=32)
    paths = save_artifacts(out_dir, img, expl)

    assert set(paths) == set(ARTIFACT_NAMES) | set(SALIENCY)
    for key, path in paths.items():
        assert path == out_dir / {**ARTIFACT_NAMES, **SALIENCY}[key] and path.is_file()
    assert sorted(os.listdir(out_dir)) == sorted(ALWAYS)
    assert os.listdir(out_dir.parent) == ["job-1"]  # no temporary directory left

    mask = np.load(paths["mask_npy"])
    assert mask.dtype == np.float32 and mask.shape == (7, 7)
    np.testing.assert_array_equal(mask, expl.mask)

    mask_png = read_png(paths["mask_png"])
    np.testing.assert_array_equal(mask_png, mask_to_png_array(expl.mask_upsampled))
    heat = read_png(paths["heatmap_png"])
    assert heat.shape == (32, 32, 3)
    np.testing.assert_array_equal(heat, saliency_heatmap(expl.mask_upsampled))
    ov = read_png(paths["overlay_png"])
    assert ov.shape == (30, 50, 3)  # original resolution
    np.testing.assert_array_equal(ov, overlay(img, expl.mask_upsampled))
    np.testing.assert_array_equal(read_png(paths["perturbed_png"]), expl.perturbed)

    result = json.loads(paths["result_json"].read_text())
    assert result["artifacts"] == ALWAYS

    # the saliency at the original size: 1 = salient (1 - mask when deleting)
    sal = np.load(paths["saliency_npy"])
    assert sal.dtype == np.float32 and sal.shape == (30, 50)
    assert sal.min() >= 0 and sal.max() <= 1
    np.testing.assert_allclose(sal, 1 - np.clip(render._cv2().resize(
        expl.mask_upsampled, (50, 30), interpolation=render._cv2().INTER_LINEAR), 0, 1), atol=1e-6)
    assert read_png(paths["saliency_png"]).shape == (30, 50, 3)
    np.testing.assert_array_equal(read_png(paths["saliency_png"]), saliency_heatmap(1 - sal))
    assert result["target"] == 3 and result["label"] == "class 3"
    assert result["config"]["mask_size"] == 7
    assert result["top5_before"][0] == {"index": 0, "label": "class 0", "prob": 0.5}
    assert oct(out_dir.stat().st_mode & 0o777) == oct(0o755)


def test_save_artifacts_replaces_existing_dir(tmp_path):
    out_dir = tmp_path / "job"
    out_dir.mkdir()
    (out_dir / "stale.txt").write_text("old run")
    save_artifacts(out_dir, original(), fake_explanation(seed=0))
    first = np.load(out_dir / "mask.npy")
    save_artifacts(out_dir, original(), fake_explanation(seed=5))
    assert sorted(os.listdir(out_dir)) == sorted(ALWAYS)
    assert not np.array_equal(np.load(out_dir / "mask.npy"), first)
    assert os.listdir(tmp_path) == ["job"]


def test_save_artifacts_into_existing_empty_dir(tmp_path):
    out_dir = tmp_path / "job"
    out_dir.mkdir()
    save_artifacts(str(out_dir), original(), fake_explanation())
    assert sorted(os.listdir(out_dir)) == sorted(ALWAYS)


def test_save_artifacts_bad_json_leaves_nothing(tmp_path):
    out_dir = tmp_path / "job"
    expl = fake_explanation(score_after=math.nan)
    with pytest.raises(ValueError, match="JSON"):
        save_artifacts(out_dir, original(), expl)
    assert os.listdir(tmp_path) == []


def test_save_artifacts_failure_keeps_previous_results(tmp_path, monkeypatch):
    out_dir = tmp_path / "job"
    save_artifacts(out_dir, original(), fake_explanation(seed=0))
    before = (out_dir / "mask.npy").read_bytes()

    def broken_swap(tmp: Path, target: Path) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(render, "_swap_into_place", broken_swap)
    with pytest.raises(OSError, match="disk on fire"):
        save_artifacts(out_dir, original(), fake_explanation(seed=9))
    assert os.listdir(tmp_path) == ["job"]  # temporary directory cleaned up
    assert (out_dir / "mask.npy").read_bytes() == before


def test_save_artifacts_validates_arguments(tmp_path):
    expl = fake_explanation()
    with pytest.raises(ValueError, match="image"):
        save_artifacts(tmp_path / "a", np.zeros((4, 4), np.uint8), expl)
    with pytest.raises(ValueError, match="mask"):
        save_artifacts(tmp_path / "b", original(), fake_explanation(mask=np.full((3, 3), 2.0)))
    with pytest.raises(ValueError, match="perturbed"):
        save_artifacts(tmp_path / "c", original(), fake_explanation(perturbed=np.zeros((4, 4, 3))))
    with pytest.raises(ValueError, match="to_json"):
        save_artifacts(tmp_path / "d", original(), SimpleNamespace(mask=1, mask_upsampled=1, perturbed=1))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a plain directory"):
        save_artifacts(tmp_path / "file", original(), expl)
    with pytest.raises(ValueError, match="path"):
        save_artifacts(123, original(), expl)  # type: ignore[arg-type]
    assert sorted(os.listdir(tmp_path)) == ["file"]


# --------------------------------------------------------------------------- #
# extras: Grad-CAM, extremal areas, several targets


def test_save_artifacts_extras_and_other_targets(tmp_path):
    out_dir = tmp_path / "job"
    img = original(30, 50)
    first, second = fake_explanation(seed=0), fake_explanation(seed=1, target=5, label="class 5")
    cam = smooth_mask(32, seed=4)
    areas = [smooth_mask(32, seed=5), smooth_mask(32, seed=6)]
    paths = save_artifacts(out_dir, img, first, gradcam=cam, area_masks=areas,
                           results=[{"explanation": second, "gradcam": cam}])
    assert set(paths) == set(ARTIFACT_NAMES) | set(render.EXTRA_ARTIFACT_NAMES)
    np.testing.assert_array_equal(np.load(out_dir / "gradcam.npy"), cam)
    # Grad-CAM is drawn as saliency (high = important), i.e. overlay of 1 - cam
    np.testing.assert_array_equal(read_png(out_dir / "gradcam.png"), overlay(img, 1.0 - cam))
    strip = read_png(out_dir / "areas.png")
    assert strip.shape == (224, 2 * 224 + 4, 3)
    assert (strip[:, 224:228] == 255).all()  # the white gap between the tiles
    sub = out_dir / render.RESULTS_SUBDIR / "1"
    assert sorted(os.listdir(sub)) == sorted([*ALWAYS, "gradcam.npy", "gradcam.png"])
    assert json.loads((sub / "result.json").read_text())["target"] == 5
    assert json.loads((out_dir / "result.json").read_text())["artifacts"][-3:] == [
        "gradcam.npy", "gradcam.png", "areas.png"]
    assert [p.name for p in out_dir.parent.iterdir()] == ["job"]  # one atomic rename, nothing left


def test_save_artifacts_draws_the_saliency_of_a_preservation_mask(tmp_path):
    expl = fake_explanation(s=32)
    expl.saliency = expl.mask_upsampled  # preservation game: the kept region matters
    img = original(30, 50)
    save_artifacts(tmp_path / "j", img, expl)
    np.testing.assert_array_equal(read_png(tmp_path / "j" / "heatmap.png"),
                                  saliency_heatmap(1.0 - expl.mask_upsampled))
    np.testing.assert_array_equal(read_png(tmp_path / "j" / "overlay.png"), overlay(img, 1.0 - expl.mask_upsampled))


def test_save_artifacts_bad_other_target_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="results\\[0\\] must be a mapping"):
        save_artifacts(tmp_path / "j", original(), fake_explanation(), results=[fake_explanation()])
    assert not (tmp_path / "j").exists()


def test_save_artifacts_caps_the_image_sized_files_and_keeps_exact_arrays(tmp_path):
    out_dir = tmp_path / "job"
    img = original(60, 100)  # (H, W) = (60, 100)
    first, second = fake_explanation(m=7, s=32, seed=0), fake_explanation(m=7, s=32, seed=1, target=5)
    cam = smooth_mask(32, seed=4)
    save_artifacts(out_dir, img, first, gradcam=cam, results=[{"explanation": second, "gradcam": cam}],
                   max_side=40)
    for folder in (out_dir, out_dir / render.RESULTS_SUBDIR / "1"):
        for name in ("overlay.png", "saliency.png", "gradcam.png"):
            assert read_png(folder / name).shape == (24, 40, 3), name  # aspect kept: 60/100 * 40
        assert np.load(folder / "saliency.npy").shape == (24, 40)
        assert np.load(folder / "mask.npy").shape == (7, 7)  # exact, never resized
        np.testing.assert_array_equal(np.load(folder / "gradcam.npy"), cam)
    np.testing.assert_array_equal(np.load(out_dir / "mask.npy"), first.mask)
    # within the cap nothing changes
    save_artifacts(tmp_path / "small", img, first, max_side=100)
    assert read_png(tmp_path / "small" / "overlay.png").shape == (60, 100, 3)


@pytest.mark.parametrize("size, side, expected", [
    ((4000, 3000), 2048, (2048, 1536)), ((3000, 4000), 2048, (1536, 2048)), ((100, 50), 2048, (100, 50)),
    ((5000, 1), 2048, (2048, 1)), ((640, 480), None, (640, 480)),
])
def test_capped_size(size, side, expected):
    assert render.capped_size(*size, side) == expected

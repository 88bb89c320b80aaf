"""`ebb explain` end to end on the offline pretrained model: every file and JSON field."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.realmodel]

EXPECTED = {"mask.npy", "mask.png", "heatmap.png", "overlay.png", "perturbed.png", "result.json",
            "saliency.npy", "saliency.png"}


def _ebb(*args, cwd):
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def test_explain_writes_every_artifact(shared_images, tmp_path):
    out = tmp_path / "out"
    proc = _ebb("explain", str(shared_images / "flute.jpg"), "--model", "efficientnet_lite0",
                "--target", "flute", "--iterations", "12", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0]
    assert "explaining" in proc.stderr  # the progress bar
    assert {p.name for p in out.iterdir()} == EXPECTED
    result = json.loads((out / "result.json").read_text())
    assert result["target"] == {"index": 558, "label": "flute"}
    assert 0 <= result["scores"]["after"] <= 1 and result["scores"]["before"] > 0.9
    assert len(result["top5"]["before"]) == 5 and len(result["top5"]["after"]) == 5
    assert {"index", "label", "prob"} <= set(result["top5"]["before"][0])
    assert result["config"]["iterations"] == 12 and result["config"]["blur"] == "mean"
    assert result["timings"]["total_s"] > 0
    assert result["iterations_run"] == 12
    mask = np.load(out / "mask.npy")
    assert mask.shape == (28, 28) and mask.dtype == np.float32 and 0 <= mask.min() <= mask.max() <= 1
    original = Image.open(shared_images / "flute.jpg")
    assert Image.open(out / "overlay.png").size == original.size  # original resolution
    assert Image.open(out / "heatmap.png").size == (224, 224)
    assert Image.open(out / "mask.png").mode == "L"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "not a label"], "not a label"),
        (["--target", "1000"], "out of range"),
        (["--iterations", "0"], "iterations must be between 1 and 10000"),
        (["--model", "nope"], "nope"),
        (["--areas", "0.1,x"], "--areas must be comma-separated"),
        (["--method", "extremal", "--areas", "0.1,1.5"], "areas must be fractions strictly between 0 and 1"),
    ],
)
def test_explain_bad_options_are_clear_errors(shared_images, tmp_path, args, message):
    proc = _ebb("explain", str(shared_images / "flute.jpg"), "--model", "efficientnet_lite0", *args,
                "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_explain_not_an_image(tmp_path):
    bogus = tmp_path / "fake.png"
    bogus.write_text("hello, not an image")
    proc = _ebb("explain", str(bogus), "--model", "efficientnet_lite0", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "fake.png" in proc.stderr


def test_explain_extremal_with_faithfulness_scores(shared_images, tmp_path):
    out = tmp_path / "ext"
    proc = _ebb("explain", str(shared_images / "flute.jpg"), "--model", "efficientnet_lite0",
                "--target", "flute", "--method", "extremal", "--game", "preservation",
                "--areas", "0.05,0.2", "--iterations", "12", "--faithfulness", "--quiet",
                "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == EXPECTED | {"gradcam.npy", "gradcam.png", "areas.png"}
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "extremal" and [a["area"] for a in result["areas"]] == [0.05, 0.2]
    lines = proc.stdout.strip().splitlines()
    table = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[2:]}
    assert set(table) == {"extremal", "gradcam"}
    assert all(0 <= v <= 1 for values in table.values() for v in values)

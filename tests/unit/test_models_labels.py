"""ImageNet labels and target-class resolution (pure Python, no torch)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shared.models.labels import imagenet_labels, resolve_target


def test_thousand_distinct_labels():
    labels = imagenet_labels()
    assert isinstance(labels, tuple)
    assert len(labels) == 1000
    assert len(set(labels)) == 1000
    assert all(label == label.strip() and label for label in labels)


def test_known_indices():
    labels = imagenet_labels()
    assert labels[0] == "tench"
    assert labels[243] == "bull mastiff"
    assert labels[282] == "tiger cat"
    assert labels[558] == "flute"
    assert labels[999] == "toilet tissue"


def test_cached():
    assert imagenet_labels() is imagenet_labels()


def test_labels_module_does_not_import_torch():
    code = "import sys, shared.models.labels as l; l.imagenet_labels(); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize("value", [None, "", "   "])
def test_blank_means_top1(value):
    assert resolve_target(value, imagenet_labels()) is None


@pytest.mark.parametrize("value, expected", [(558, 558), (0, 0), (999, 999), ("558", 558), (" 243 ", 243)])
def test_by_index(value, expected):
    assert resolve_target(value, imagenet_labels()) == expected


@pytest.mark.parametrize("value", ["flute", "FLUTE", "  Flute ", "bull  Mastiff", "Tiger cat"])
def test_by_label_case_and_whitespace_insensitive(value):
    expected = {"flute": 558, "bull mastiff": 243, "tiger cat": 282}[" ".join(value.split()).lower()]
    assert resolve_target(value, imagenet_labels()) == expected


@pytest.mark.parametrize("value", [1000, "1000", -1, "-1"])
def test_index_out_of_range(value):
    with pytest.raises(ValueError, match=rf"target index {value} out of range 0-999"):
        resolve_target(value, imagenet_labels())


def test_range_follows_label_count():
    with pytest.raises(ValueError, match="target index 3 out of range 0-2"):
        resolve_target(3, ("a", "b", "c"))


def test_unknown_label_suggests_close_matches():
    with pytest.raises(ValueError) as info:
        resolve_target("flutte", imagenet_labels())
    message = str(info.value)
    assert "'flutte'" in message
    assert "'flute'" in message


def test_unknown_label_suggests_containing_labels():
    with pytest.raises(ValueError, match="bull mastiff"):
        resolve_target("mastiff", imagenet_labels())


def test_unknown_label_without_suggestion():
    with pytest.raises(ValueError, match="unknown target label 'qqqqzzzz'.*0-999"):
        resolve_target("qqqqzzzz", imagenet_labels())


@pytest.mark.parametrize("value", [True, 1.5, object()])
def test_wrong_type(value):
    with pytest.raises(ValueError):
        resolve_target(value, imagenet_labels())  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["9" * 5000, "-" + "1" * 4400, "x" * 201])
def test_huge_target_text_is_a_short_clear_error(value):
    from shared.models.labels import resolve_target

    with pytest.raises(ValueError) as info:
        resolve_target(value, [f"c{i}" for i in range(1000)])
    message = str(info.value)
    assert message.startswith("target is too long") and "0-999" in message and len(message) < 200

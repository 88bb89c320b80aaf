"""One entry point for every saliency method a job can ask for (``config.method``).

:func:`run_method` runs Meaningful Perturbation (:func:`~.perturbation.explain`)
or extremal perturbations (:class:`~.extremal.ExtremalOptimisation`) to
completion and returns an :class:`~.perturbation.Explanation` either way (an
:class:`~.extremal.ExtremalExplanation` for ``extremal``), so callers do not
branch on the method. The worker's batch engine steps the same run objects
itself. torch and numpy only.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .classifier import Classifier
from .config import PerturbationConfig
from .perturbation import Explanation, OnStep, explain

__all__ = ["run_method"]


def run_method(
    model: Classifier | nn.Module,
    image: Any,
    target: int | None = None,
    config: PerturbationConfig = PerturbationConfig(),
    on_step: OnStep | None = None,
) -> Explanation:
    """Explain ``target`` on ``image`` with ``config.method``.

    Args:
        model: a :class:`Classifier` or a bare module (ImageNet normalisation).
        image: ``(H, W, 3)`` uint8 RGB array or a float tensor in [0, 1].
        target: class index; ``None`` explains the top-1 class.
        config: the job's settings.
        on_step: progress callback; returning ``True`` stops the run.
    """
    if not isinstance(config, PerturbationConfig):
        raise ValueError(f"config must be a PerturbationConfig, got {type(config).__name__}")
    if config.method != "extremal":
        return explain(model, image, target=target, config=config, on_step=on_step)
    from .extremal import ExtremalOptimisation, to_explanation

    classifier = Classifier.wrap(model)
    run = ExtremalOptimisation.from_config(classifier, image, target, config, on_step)
    while not run.done:
        run.step(classifier)
    return to_explanation(run.result(classifier), config, classifier.name)

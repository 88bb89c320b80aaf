"""Server-side geometry of the job page's deletion/insertion charts.

The page draws each result's curves as a small inline SVG. The same geometry
is implemented in ``static/js/results.js``, which redraws the charts from the
JSON API (adding a hover read-out); rendering them here first means a finished
job's page shows its charts at once, and without JavaScript.

Everything here is plain Python on the cleaned JSON of
:func:`web.jobs.clean_result` (numbers or None).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

#: SVG user units (the element scales with CSS).
WIDTH, HEIGHT = 360, 220
LEFT, RIGHT, TOP, BOTTOM = 50, 12, 12, 36
PLOT_W = WIDTH - LEFT - RIGHT
PLOT_H = HEIGHT - TOP - BOTTOM
#: Upper ends the probability axis may take (the smallest that fits is used).
Y_MAXES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0)
X_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)

SOURCES = (("mask", "metrics", "Perturbation mask"), ("gradcam", "gradcam", "Grad-CAM"))
KINDS = (("deletion", "Deletion"), ("insertion", "Insertion"))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def y_max(values: Sequence[Any]) -> float:
    """The top of the probability axis: the smallest of :data:`Y_MAXES` that
    holds every value (values above 1 stretch it)."""
    top = max((float(v) for v in values if _finite(v)), default=0.0)
    for candidate in Y_MAXES:
        if top <= candidate + 1e-12:
            return candidate
    return float(math.ceil(top))


def x_pos(fraction: float) -> float:
    return LEFT + max(0.0, min(1.0, fraction)) * PLOT_W


def y_pos(value: float, top: float) -> float:
    return TOP + PLOT_H - max(0.0, min(1.0, value / top)) * PLOT_H


def path_data(fractions: Sequence[Any], values: Sequence[Any], top: float) -> str:
    """SVG path ``d`` through the finite points; a missing point breaks the line."""
    parts: list[str] = []
    pen_down = False
    for fraction, value in zip(fractions, values):
        if not (_finite(fraction) and _finite(value)):
            pen_down = False
            continue
        parts.append(f"{'L' if pen_down else 'M'}{x_pos(fraction):.1f},{y_pos(value, top):.1f}")
        pen_down = True
    return " ".join(parts)


def _tick_label(value: float) -> str:
    return f"{value:g}"


def curves_chart(result: dict[str, Any]) -> dict[str, Any] | None:
    """Everything the template needs to draw one result's chart, or None when
    it has no curves: ``series`` (``source``, ``kind``, ``d``, ``name``),
    ``x_ticks``/``y_ticks`` (``pos``, ``label``) and the plot frame."""
    curves = []
    for source, key, name in SOURCES:
        metrics = result.get(key) or {}
        data = metrics.get("curves") or None
        if data:
            curves.append((source, name, data))
    values = [v for _, _, data in curves for kind, _ in KINDS for v in data.get(kind) or ()]
    top = y_max(values)
    series = []
    for source, name, data in curves:
        for kind, kind_name in KINDS:
            d = path_data(data.get("fraction") or (), data.get(kind) or (), top)
            if d:
                series.append({"source": source, "kind": kind, "d": d,
                               "name": f"{kind_name}, {name}"})
    if not series:
        return None
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "plot": {"x": LEFT, "y": TOP, "w": PLOT_W, "h": PLOT_H,
                 "right": LEFT + PLOT_W, "bottom": TOP + PLOT_H},
        "y_max": top,
        "x_ticks": [{"pos": round(x_pos(x), 1), "label": f"{x * 100:g}%"} for x in X_TICKS],
        "y_ticks": [{"pos": round(y_pos(v, top), 1), "label": _tick_label(v)}
                    for v in (0.0, top / 2, top)],
        "series": series,
    }


def _winner(mask: Any, gradcam: Any, lower_is_better: bool) -> str | None:
    if not (_finite(mask) and _finite(gradcam)):
        return None
    if abs(mask - gradcam) < 1e-9:
        return "tie"
    return "mask" if (mask < gradcam) == lower_is_better else "gradcam"


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """Which map is more faithful by each metric (``"mask"``, ``"gradcam"``,
    ``"tie"`` or None when a score is missing) and a one-line summary."""
    mask = result.get("metrics") or {}
    gradcam = result.get("gradcam") or {}
    deletion = _winner(mask.get("deletion_auc"), gradcam.get("deletion_auc"), True)
    insertion = _winner(mask.get("insertion_auc"), gradcam.get("insertion_auc"), False)
    names = {"mask": "the perturbation mask", "gradcam": "Grad-CAM"}
    if deletion is None and insertion is None:
        summary = None
    elif deletion == insertion and deletion in names:
        summary = f"More faithful: {names[deletion]} (lower deletion and higher insertion AUC)."
    elif deletion in names and insertion in names:
        summary = (f"Mixed: {names[deletion]} has the lower deletion AUC, "
                   f"{names[insertion]} the higher insertion AUC.")
    else:
        parts = []
        if deletion in names:
            parts.append(f"{names[deletion]} by deletion (lower is better)")
        if insertion in names:
            parts.append(f"{names[insertion]} by insertion (higher is better)")
        summary = ("More faithful: " + "; ".join(parts) + ".") if parts else (
            "Both maps score the same.")
    return {"deletion": deletion, "insertion": insertion, "summary": summary}

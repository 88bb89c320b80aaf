"""Render an explanation: heatmaps, overlays and the artifact files of a job.

numpy, Pillow and OpenCV (``opencv-python-headless``); no torch. OpenCV is
imported lazily by the functions that need it (:func:`saliency_heatmap`,
:func:`overlay`, :func:`save_artifacts`), so :func:`thumbnail_png` and
:func:`mask_to_png_array` also work in the web process, which has no OpenCV.

Conventions (Meaningful Perturbation, Fong & Vedaldi 2017):

* a *mask* is a 2-D float array with values in ``[0, 1]``: ``1`` keeps the
  pixel, ``0`` replaces it with the blurred copy;
* *saliency* is ``1 - mask``: high where deleting the pixel destroys the
  class score;
* images are ``(H, W, 3)`` ``uint8`` RGB arrays, values 0-255.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from shared.imaging.decode import encode_png

__all__ = [
    "ARTIFACT_NAMES",
    "EXTRA_ARTIFACT_NAMES",
    "RESULTS_SUBDIR",
    "HEATMAP_COLORMAP",
    "mask_to_png_array",
    "overlay",
    "saliency_at",
    "saliency_heatmap",
    "save_artifacts",
    "thumbnail_png",
]

#: Artifact key -> file name inside a job's output directory (public contract:
#: the web side and the API link to these names).
ARTIFACT_NAMES = {
    "mask_npy": "mask.npy",
    "mask_png": "mask.png",
    "heatmap_png": "heatmap.png",
    "overlay_png": "overlay.png",
    "perturbed_png": "perturbed.png",
    "result_json": "result.json",
}

#: Optional artifacts, written when the job computed them (same contract):
#: the Grad-CAM baseline's map (``(S, S)`` float32 in [0, 1]) and its overlay
#: on the image, for extremal jobs one overlay per target area, side by side,
#: and (every job since they were added) the saliency map at the original
#: image's ``(H, W)``, float32 in [0, 1] with 1 = salient, and its heatmap.
EXTRA_ARTIFACT_NAMES = {
    "gradcam_npy": "gradcam.npy",
    "gradcam_png": "gradcam.png",
    "areas_png": "areas.png",
    "saliency_npy": "saliency.npy",
    "saliency_png": "saliency.png",
}
#: Sub-folder of a job's folder holding the artifacts of its k-th target
#: (k >= 1): ``results/<k>/``; the first target's are at the top.
RESULTS_SUBDIR = "results"

#: Name of the OpenCV colour map used for saliency (perceptually uniform:
#: black = not salient, bright yellow = most salient).
HEATMAP_COLORMAP = "COLORMAP_INFERNO"

# Values this far outside [0, 1] are accepted (float round-off) and clipped.
_MASK_TOLERANCE = 1e-3


def _cv2():
    import cv2  # noqa: PLC0415 - lazy: the web process has no OpenCV

    return cv2


def _check_mask(mask: Any, name: str = "mask") -> np.ndarray:
    """Validate a mask and return it as a clipped float32 ``(H, W)`` array."""
    try:
        arr = np.asarray(mask)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{name} must be array-like, got {type(mask).__name__}") from exc
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be a real-valued array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (H, W), got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -_MASK_TOLERANCE or hi > 1.0 + _MASK_TOLERANCE:
        raise ValueError(f"{name} values must lie in [0, 1], got range [{lo:g}, {hi:g}]")
    return np.clip(arr, 0.0, 1.0)


def _check_image(image: Any, name: str = "image") -> np.ndarray:
    """Validate an ``(H, W, 3)`` uint8 RGB image; return it C-contiguous."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must have shape (H, W, 3) (RGB), got {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name} must not be empty, got shape {image.shape}")
    return np.ascontiguousarray(image)


def mask_to_png_array(mask: np.ndarray) -> np.ndarray:
    """Grayscale picture of a mask.

    Args:
        mask: ``(H, W)`` float array, values in ``[0, 1]`` (1 = kept).

    Returns:
        ``(H, W)`` ``uint8`` array, ``round(mask * 255)``: white where the
        pixel is kept, black where it is deleted.

    Raises:
        ValueError: not 2-D, empty, non-finite or outside ``[0, 1]``.
    """
    m = _check_mask(mask)
    return np.rint(m * 255.0).astype(np.uint8)


def saliency_heatmap(mask: np.ndarray) -> np.ndarray:
    """Colour-map the saliency ``1 - mask`` with a perceptual colour map.

    Args:
        mask: ``(H, W)`` float array, values in ``[0, 1]`` (1 = kept,
            0 = replaced by the blur).

    Returns:
        ``(H, W, 3)`` ``uint8`` RGB image, same size as ``mask``; inferno
        colours: black where ``mask == 1`` (not salient), bright yellow where
        ``mask == 0`` (most salient).

    Raises:
        ValueError: not 2-D, empty, non-finite or outside ``[0, 1]``.
    """
    cv2 = _cv2()
    saliency = 1.0 - _check_mask(mask)
    levels = np.rint(saliency * 255.0).astype(np.uint8)
    bgr = cv2.applyColorMap(levels, getattr(cv2, HEATMAP_COLORMAP))
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the saliency heatmap over the original image at its resolution.

    The mask (any size, e.g. the ``(S, S)`` upsampled mask of a square model
    input) is first resized bilinearly to the image's ``(H, W)`` (half-pixel
    centres, like ``torch.nn.functional.interpolate(align_corners=False)``);
    this assumes the model saw the whole image resized to a square, not a
    crop.

    Args:
        image: ``(H, W, 3)`` ``uint8`` RGB original image.
        mask: ``(h, w)`` float array, values in ``[0, 1]``.
        alpha: heatmap weight in ``[0, 1]``; the result is
            ``(1 - alpha) * image + alpha * heatmap``, rounded.

    Returns:
        ``(H, W, 3)`` ``uint8`` RGB image, same size as ``image``.

    Raises:
        ValueError: bad image, mask or alpha.
    """
    cv2 = _cv2()
    img = _check_image(image)
    m = _check_mask(mask)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    alpha = float(alpha)
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    height, width = img.shape[:2]
    if m.shape != (height, width):
        m = np.clip(cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
    heat = saliency_heatmap(m)
    # addWeighted computes in float and saturates/rounds back to uint8.
    return cv2.addWeighted(img, 1.0 - alpha, heat, alpha, 0.0)


def thumbnail_png(image: np.ndarray, size: int = 96) -> bytes:
    """Small PNG preview of an image, aspect ratio kept, never enlarged.

    Args:
        image: ``(H, W, 3)`` ``uint8`` RGB image.
        size: the longest side of the thumbnail in pixels, 1-4096.

    Returns:
        PNG bytes of an RGB image whose longer side is ``min(size, max(H, W))``.

    Raises:
        ValueError: bad image or size.
    """
    img = _check_image(image)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= 4096:
        raise ValueError(f"size must be an integer in 1..4096, got {size!r}")
    pil = Image.fromarray(img)
    pil.thumbnail((int(size), int(size)), Image.Resampling.LANCZOS)
    return encode_png(np.asarray(pil))


def save_artifacts(
    out_dir: Path,
    image: np.ndarray,
    explanation: Any,
    *,
    gradcam: np.ndarray | None = None,
    area_masks: Sequence[np.ndarray] | None = None,
    results: Sequence[Mapping[str, Any]] = (),
    max_side: int | None = None,
) -> dict[str, Path]:
    """Write a job's artifacts atomically into ``out_dir``.

    Files (names from :data:`ARTIFACT_NAMES`):

    * ``mask.npy`` -- ``explanation.mask``, the low-resolution ``(m, m)``
      mask, float32 in ``[0, 1]``;
    * ``mask.png`` -- grayscale ``(S, S)`` picture of
      ``explanation.mask_upsampled`` (:func:`mask_to_png_array`);
    * ``heatmap.png`` -- ``(S, S)`` saliency heatmap of the upsampled mask
      (:func:`saliency_heatmap`);
    * ``overlay.png`` -- the heatmap over ``image`` at the image's original
      ``(H, W)`` resolution (:func:`overlay`, alpha 0.5);
    * ``perturbed.png`` -- ``explanation.perturbed``, the ``(S, S)`` image
      the model saw at the end (blurred where the mask is 0);
    * ``result.json`` -- ``explanation.to_json()`` plus ``"artifacts"``,
      the list of the file names written (these six, then the extras).

    Always, also ``saliency.npy`` -- the saliency (1 = salient: ``1 - mask``
    when deleting, the mask when preserving) at ``image``'s ``(H, W)``,
    float32 in [0, 1] (:func:`saliency_at`), and ``saliency.png``, its
    heatmap at that size. Optional extras (:data:`EXTRA_ARTIFACT_NAMES`): with ``gradcam`` (an
    ``(S, S)`` float map in [0, 1], high = important) ``gradcam.npy`` and
    ``gradcam.png`` (its overlay on ``image``); with ``area_masks`` (one
    ``(S, S)`` float mask in [0, 1] per extremal area) ``areas.png``, their
    overlays side by side. ``results`` are the other targets of the job, each a
    mapping with ``explanation`` and optional ``gradcam`` / ``area_masks``,
    written the same way into ``results/<k>/`` (k = 1, 2, ...).

    Everything is written (and fsynced) into a hidden temporary sibling
    directory ``.<name>.tmp-*`` which is then renamed to ``out_dir`` with
    ``os.replace``; an existing ``out_dir`` is moved aside and deleted, so
    readers see either the old complete set or the new complete set, never a
    partial one. On failure the temporary directory is removed and an
    existing ``out_dir`` is left as it was.

    Args:
        out_dir: the job's artifact directory; its parent is created if
            missing.
        image: ``(H, W, 3)`` ``uint8`` RGB original (decoded) image.
        explanation: an ``shared.attribution.perturbation.Explanation`` (or an
            object with the same attributes: ``mask``, ``mask_upsampled``,
            ``perturbed`` and ``to_json()``).
        max_side: cap on the longest side of everything drawn at the image's
            size (``overlay.png``, ``saliency.npy``/``.png``, ``gradcam.png``):
            when ``max(H, W)`` is larger, they are drawn on ``image`` resized
            (area interpolation, aspect ratio kept) to a longest side of
            ``max_side`` (``EBB_MAX_ARTIFACT_SIDE``). The exact arrays
            ``mask.npy`` ``(m, m)`` and ``gradcam.npy`` ``(S, S)`` are never
            resized. None: no cap.

    Returns:
        ``{artifact key: final path}`` for every file of the first target.

    Raises:
        ValueError: bad arguments, ``out_dir`` exists and is not a directory,
            or ``to_json()`` is not JSON-serialisable (e.g. contains NaN).
        OSError: the files cannot be written.
    """
    if not isinstance(out_dir, (str, os.PathLike)):
        raise ValueError(f"out_dir must be a path, got {type(out_dir).__name__}")
    out_dir = Path(out_dir)
    if not out_dir.name or out_dir.name in (".", ".."):
        raise ValueError(f"out_dir must name a directory, got {str(out_dir)!r}")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ValueError(f"out_dir {str(out_dir)!r} exists and is not a plain directory")
    img = cap_image(_check_image(image), max_side)
    # Render before touching the file system so that errors leave no trace.
    sets = [_render_set(img, explanation, gradcam, area_masks)]
    for k, extra in enumerate(results, start=1):
        if not isinstance(extra, Mapping) or "explanation" not in extra:
            raise ValueError(f"results[{k - 1}] must be a mapping with an 'explanation'")
        sets.append(_render_set(img, extra["explanation"], extra.get("gradcam"), extra.get("area_masks")))

    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the web side must read it
        for k, files in enumerate(sets):
            folder = tmp if k == 0 else tmp / RESULTS_SUBDIR / str(k)
            folder.mkdir(parents=True, exist_ok=True, mode=0o755)
            for name, data in files.items():
                _write_synced(folder / name, data)
            _fsync_dir(folder)
        _fsync_dir(tmp)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    names = {**ARTIFACT_NAMES, **EXTRA_ARTIFACT_NAMES}
    return {key: out_dir / name for key, name in names.items() if name in sets[0]}


def capped_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """``(width, height)`` scaled down (aspect ratio kept, each side >= 1) so
    that the longest side is at most ``max_side``; unchanged when it already is
    or ``max_side`` is None."""
    if max_side is None or max(width, height) <= int(max_side):
        return int(width), int(height)
    scale = int(max_side) / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def cap_image(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """``image`` (``(H, W, 3)`` uint8) resized with area interpolation to
    :func:`capped_size`; the same array when no resize is needed."""
    if max_side is not None and (isinstance(max_side, bool) or int(max_side) < 1):
        raise ValueError(f"max_side must be a positive integer, got {max_side!r}")
    height, width = image.shape[:2]
    size = capped_size(width, height, max_side)
    if size == (width, height):
        return image
    return np.ascontiguousarray(_cv2().resize(image, size, interpolation=_cv2().INTER_AREA))


def saliency_at(size: tuple[int, int], saliency: np.ndarray) -> np.ndarray:
    """``saliency`` (any ``(h, w)``, [0, 1], 1 = salient) resized bilinearly
    to ``size`` = ``(H, W)`` (half-pixel centres, as :func:`overlay`);
    ``(H, W)`` float32 in [0, 1]."""
    m = _check_mask(saliency, "saliency")
    height, width = int(size[0]), int(size[1])
    if m.shape != (height, width):
        m = np.clip(_cv2().resize(m, (width, height), interpolation=_cv2().INTER_LINEAR), 0.0, 1.0)
    return np.asarray(m, dtype=np.float32)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _render_set(img: np.ndarray, explanation: Any, gradcam: Any, area_masks: Any) -> dict[str, bytes]:
    """File name -> contents of one target's artifacts (see :func:`save_artifacts`)."""
    for attr in ("mask", "mask_upsampled", "perturbed", "to_json"):
        if not hasattr(explanation, attr):
            raise ValueError(f"explanation has no attribute {attr!r} (expected an Explanation)")
    mask = _check_mask(explanation.mask, "explanation.mask")
    mask_up = _check_mask(explanation.mask_upsampled, "explanation.mask_upsampled")
    perturbed = _check_image(np.asarray(explanation.perturbed), "explanation.perturbed")
    # The heatmap and overlay draw the saliency (high = important): 1 - mask in
    # the deletion game, the mask itself in the preservation game.
    saliency = getattr(explanation, "saliency", None)
    shown = mask_up if saliency is None else 1.0 - _check_mask(saliency, "explanation.saliency")
    files: dict[str, bytes] = {
        ARTIFACT_NAMES["mask_npy"]: _npy_bytes(mask),
        ARTIFACT_NAMES["mask_png"]: encode_png(mask_to_png_array(mask_up)),
        ARTIFACT_NAMES["heatmap_png"]: encode_png(saliency_heatmap(shown)),
        ARTIFACT_NAMES["overlay_png"]: encode_png(overlay(img, shown)),
        ARTIFACT_NAMES["perturbed_png"]: encode_png(perturbed),
    }
    extras: dict[str, bytes] = {}
    sal = saliency_at(img.shape[:2], 1.0 - shown)
    extras[EXTRA_ARTIFACT_NAMES["saliency_npy"]] = _npy_bytes(sal)
    extras[EXTRA_ARTIFACT_NAMES["saliency_png"]] = encode_png(saliency_heatmap(1.0 - sal))
    if gradcam is not None:
        cam = _check_mask(gradcam, "gradcam")
        # Grad-CAM is high where it matters; overlay() draws a mask (low = important).
        extras[EXTRA_ARTIFACT_NAMES["gradcam_npy"]] = _npy_bytes(cam)
        extras[EXTRA_ARTIFACT_NAMES["gradcam_png"]] = encode_png(overlay(img, 1.0 - cam))
    if area_masks:
        extras[EXTRA_ARTIFACT_NAMES["areas_png"]] = encode_png(area_strip(img, area_masks))
    result = dict(explanation.to_json())
    result["artifacts"] = list(ARTIFACT_NAMES.values()) + list(extras)
    try:
        result_text = json.dumps(result, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"explanation.to_json() is not valid JSON: {exc}") from exc
    files.update(extras)
    files[ARTIFACT_NAMES["result_json"]] = (result_text + "\n").encode("utf-8")
    return files


def area_strip(image: np.ndarray, masks: Sequence[np.ndarray], size: int = 224, gap: int = 4) -> np.ndarray:
    """Overlays of ``masks`` (each ``(S, S)`` in [0, 1], high = kept) on
    ``image``, each ``size`` pixels square, side by side with white gaps.

    Returns ``(size, n*size + (n-1)*gap, 3)`` uint8 RGB.
    """
    masks = [_check_mask(m, f"area_masks[{i}]") for i, m in enumerate(masks)]
    if not masks:
        raise ValueError("area_masks must hold at least one mask")
    from PIL import Image

    small = np.asarray(Image.fromarray(_check_image(image)).resize((size, size), Image.BILINEAR))
    tiles = [overlay(small, 1.0 - m) for m in masks]
    out = np.full((size, len(tiles) * size + (len(tiles) - 1) * gap, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        out[:, i * (size + gap): i * (size + gap) + size] = tile
    return out


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Best-effort fsync of a directory entry list (not possible everywhere)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``, replacing an existing directory."""
    try:
        os.replace(tmp, out_dir)  # works when out_dir is missing or empty
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rmdir(old)  # only reserve a unique name
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        try:
            os.replace(old, out_dir)
        except OSError:
            pass
        raise
    shutil.rmtree(old, ignore_errors=True)

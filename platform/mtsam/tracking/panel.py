"""Prediction panels: input, target and prediction side by side, one row per task."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

GAP = 2  # white pixels between tiles, so black (= no target) borders stay visible


def _rgb(x: np.ndarray, *, what: str, shape: tuple[int, int]) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(
            f"prediction_panel: {what} must be (H, W, 3) uint8, got {a.dtype} {a.shape}"
        )
    if a.shape[:2] != shape:
        raise ValueError(f"prediction_panel: {what} is {a.shape[:2]}, the image is {shape}")
    return a


def prediction_panel(
    image: torch.Tensor | np.ndarray,
    preds: Mapping[str, tuple[np.ndarray, np.ndarray]],
) -> np.ndarray:
    """One (rows*H + (rows-1)*GAP, 3*W + 2*GAP, 3) uint8 picture.

    Args:
        image: (3, H, W) float image in [0, 1] (values outside are clipped; NaN -> 0).
        preds: {task: (prediction RGB, target RGB)}, each (H, W, 3) uint8, e.g. from
            ``TaskSpec.visualize``; one row per task, in the mapping's order: input | target |
            prediction.
    """
    img = image.detach().cpu().float().numpy() if torch.is_tensor(image) else np.asarray(image)
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"prediction_panel: image must be (3, H, W), got shape {img.shape}")
    if not preds:
        raise ValueError("prediction_panel: no task to draw")
    h, w = img.shape[1:]
    unit = np.clip(np.nan_to_num(img.astype(np.float64).transpose(1, 2, 0)), 0.0, 1.0)
    rgb = np.floor(unit * 255.0 + 0.5).astype(np.uint8)  # round half up
    rows = len(preds)
    out = np.full((rows * h + (rows - 1) * GAP, 3 * w + 2 * GAP, 3), 255, dtype=np.uint8)
    for i, (task, (pred, target)) in enumerate(preds.items()):
        y = i * (h + GAP)
        tiles = (
            rgb,
            _rgb(target, what=f"{task} target", shape=(h, w)),
            _rgb(pred, what=f"{task} prediction", shape=(h, w)),
        )
        for j, tile in enumerate(tiles):
            x = j * (w + GAP)
            out[y : y + h, x : x + w] = tile
    return out


__all__ = ["prediction_panel"]

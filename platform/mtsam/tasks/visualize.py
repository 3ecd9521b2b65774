"""Drawing predictions and targets as RGB uint8 images (H, W, 3); invalid pixels are black.

No colour used for a valid value is pure black, so black always means "no target here".
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().to("cpu").float().numpy() if x.is_floating_point() else x.cpu().numpy()
    return np.asarray(x)


def class_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours: the PASCAL VOC bit-spread palette, entries 1..C.

    Entry 0 of that palette is black, which is reserved here for ignore pixels, so class c
    gets VOC colour c + 1 (distinct and never black).
    """
    out = np.zeros((num_classes, 3), dtype=np.uint8)
    for c in range(num_classes):
        code, rgb = c + 1, [0, 0, 0]
        for shift in range(8):
            for ch in range(3):
                rgb[ch] |= ((code >> ch) & 1) << (7 - shift)
            code >>= 3
        out[c] = rgb
    return out


@lru_cache(maxsize=1)
def _viridis_lut() -> np.ndarray:
    # matplotlib is imported only when a picture is drawn (it is slow to import).
    from matplotlib import colormaps

    lut = colormaps["viridis"](np.linspace(0.0, 1.0, 256))[:, :3]
    return np.round(lut * 255).astype(np.uint8)


def draw_labels(labels: torch.Tensor | np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) integer class ids (-1 = ignore) -> (H, W, 3) uint8; ignore pixels black."""
    lab = _numpy(labels).astype(np.int64)
    if lab.ndim != 2:
        raise ValueError(f"draw_labels: expected an (H, W) label map, got shape {lab.shape}")
    out = np.zeros((*lab.shape, 3), dtype=np.uint8)
    valid = (lab >= 0) & (lab < num_classes)
    out[valid] = class_palette(num_classes)[lab[valid]]
    return out


def draw_scalar(
    values: torch.Tensor | np.ndarray,
    valid: torch.Tensor | np.ndarray,
    *,
    lo: float,
    hi: float,
) -> np.ndarray:
    """(H, W) floats -> (H, W, 3) uint8 through viridis over [lo, hi] (clipped); invalid black."""
    v = _numpy(values).astype(np.float64)
    mask = _numpy(valid).astype(bool) & np.isfinite(v)
    scale = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    idx = np.clip(np.nan_to_num(scale) * 255.0 + 0.5, 0, 255).astype(np.int64)
    out = np.zeros((*v.shape, 3), dtype=np.uint8)
    out[mask] = _viridis_lut()[idx[mask]]
    return out


def shared_range(target: np.ndarray, valid: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """Colour range for a pred/target pair: that of the valid target (the prediction is clipped
    to it, so pictures of one image stay comparable across training); the prediction's own
    range when the target has no valid pixel."""
    ref = target[valid] if bool(valid.any()) else pred[np.isfinite(pred)]
    if ref.size == 0:
        return 0.0, 1.0
    return float(ref.min()), float(ref.max())


def draw_normals(
    normals: torch.Tensor | np.ndarray, valid: torch.Tensor | np.ndarray
) -> np.ndarray:
    """(3, H, W) unit vectors -> (H, W, 3) uint8 as (n + 1) / 2 * 255; invalid pixels black."""
    n = _numpy(normals).astype(np.float64)
    if n.ndim != 3 or n.shape[0] != 3:
        raise ValueError(f"draw_normals: expected (3, H, W) normals, got shape {n.shape}")
    rgb = np.clip((np.nan_to_num(n.transpose(1, 2, 0)) + 1.0) / 2.0 * 255.0 + 0.5, 0, 255)
    out = rgb.astype(np.uint8)
    out[~_numpy(valid).astype(bool)] = 0
    return out

"""Checks and conversions from stored arrays to the per-sample tensors every reader returns.

Each function takes the array as stored plus the path it came from, raises :class:`DatasetError`
naming that path when the array is not what the layout promises, and returns the array in the
common per-sample form (see :mod:`mtsam.data.base`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mtsam.data.errors import DatasetError

# Stored floats (e.g. images written as float64 then cast) may overshoot [0, 1] / [-1, 1] by
# rounding; anything beyond this is a real layout error.
_RANGE_TOL = 1e-3


def load_npy(path: Path) -> np.ndarray:
    """Load one ``.npy`` array without pickle; any failure becomes a :class:`DatasetError`."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (ValueError, OSError, EOFError) as err:
        raise DatasetError(f"{path}: not a readable .npy array ({err})") from None


def _expect_shape(arr: np.ndarray, path: Path, expected: tuple[int | None, ...], what: str) -> None:
    ok = arr.ndim == len(expected) and all(
        e is None or e == s for e, s in zip(expected, arr.shape, strict=True)
    )
    if not ok:
        want = "x".join("?" if e is None else str(e) for e in expected)
        raise DatasetError(f"{path}: expected {what} of shape {want}, got {arr.shape}")


def _expect_finite(arr: np.ndarray, path: Path, what: str) -> None:
    if np.isnan(arr).any():
        raise DatasetError(f"{path}: {what} contains NaN")
    if not np.isfinite(arr).all():
        raise DatasetError(f"{path}: {what} contains inf")


def image_hwc(arr: np.ndarray, path: Path, *, shape: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) float in [0, 1] or uint8 -> float32 (3, H, W) in [0, 1]."""
    h, w = shape if shape is not None else (None, None)
    _expect_shape(arr, path, (h, w, 3), "an HxWx3 image")
    if arr.dtype == np.uint8:
        return (arr.astype(np.float32) / 255.0).transpose(2, 0, 1).copy()
    if not np.issubdtype(arr.dtype, np.floating):
        raise DatasetError(f"{path}: expected a float or uint8 image, got dtype {arr.dtype}")
    _expect_finite(arr, path, "image")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -_RANGE_TOL or hi > 1.0 + _RANGE_TOL:
        raise DatasetError(f"{path}: expected image values in [0, 1], found [{lo:g}, {hi:g}]")
    out = np.clip(arr.astype(np.float32), 0.0, 1.0)
    return out.transpose(2, 0, 1).copy()


def labels(
    arr: np.ndarray,
    path: Path,
    *,
    num_classes: int,
    ignore_values: Iterable[int] = (-1,),
    shape: tuple[int, int] | None = None,
    what: str = "label map",
) -> np.ndarray:
    """(H, W) integer-valued labels in 0..num_classes-1 or an ignore value -> int64, ignore = -1."""
    _expect_shape(arr, path, shape if shape is not None else (None, None), f"an HxW {what}")
    if np.issubdtype(arr.dtype, np.floating):
        _expect_finite(arr, path, what)
        if (arr != np.round(arr)).any():
            raise DatasetError(f"{path}: expected integer-valued {what}, found fractions")
    elif not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise DatasetError(f"{path}: expected an integer or float {what}, got dtype {arr.dtype}")
    out = arr.astype(np.int64)
    ignore = np.isin(out, np.asarray(list(ignore_values), dtype=np.int64))
    bad = ~ignore & ((out < 0) | (out >= num_classes))
    if bad.any():
        found = np.unique(out[bad])[:5].tolist()
        allowed = ", ".join(str(v) for v in ignore_values)
        raise DatasetError(
            f"{path}: {what} values {found} out of range; expected 0..{num_classes - 1} "
            f"or ignore ({allowed})"
        )
    out[ignore] = -1
    return out


def depth_hw1(arr: np.ndarray, path: Path, *, shape: tuple[int, int]) -> np.ndarray:
    """(H, W, 1) float depth, finite, >= 0 (0 = invalid) -> float32 (1, H, W)."""
    _expect_shape(arr, path, (*shape, 1), "an HxWx1 depth map")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DatasetError(f"{path}: expected a float depth map, got dtype {arr.dtype}")
    _expect_finite(arr, path, "depth")
    if float(arr.min()) < 0:
        raise DatasetError(f"{path}: expected depth >= 0 (0 = invalid), found {arr.min():g}")
    return arr.astype(np.float32).transpose(2, 0, 1).copy()


def normal_hw3(arr: np.ndarray, path: Path, *, shape: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) float normals in [-1, 1] (all-zero = invalid) -> float32 (3, H, W), as stored."""
    _expect_shape(arr, path, (*shape, 3), "an HxWx3 normal map")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DatasetError(f"{path}: expected a float normal map, got dtype {arr.dtype}")
    _expect_finite(arr, path, "normal map")
    peak = float(np.abs(arr).max())
    if peak > 1.0 + _RANGE_TOL:
        raise DatasetError(f"{path}: expected normal components in [-1, 1], found |{peak:g}|")
    return arr.astype(np.float32).transpose(2, 0, 1).copy()


def unit_normals(normal: np.ndarray) -> np.ndarray:
    """(3, H, W) -> same, scaled to unit length where the vector is non-zero (zero stays zero)."""
    norm = np.sqrt((normal.astype(np.float64) ** 2).sum(axis=0, keepdims=True))
    out = np.where(norm > 0, normal / np.maximum(norm, 1e-12), 0.0)
    return out.astype(np.float32)

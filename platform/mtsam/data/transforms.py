"""Training augmentation of the MTAN / LibMTL NYUv2 recipe, deterministic per (seed, epoch, index).

Random scale-crop: a scale ``s`` is drawn from ``SCALES``; a window of ``int(H / s) x int(W / s)``
at a random offset is cropped and resized back to ``H x W`` (the same as upsampling by ``s`` and
cropping ``H x W``). As in the authors' code the image is resized bilinearly with
``align_corners=True``, labels and depth with nearest neighbour, and depth is divided by ``s``
(the zoom imitates a camera ``s`` times closer). Inverse depth (CityScapes' disparity) is
multiplied by ``s`` instead, the same camera model; MTAN's CityScapes loader divides it as
well, which would make a zoomed scene look farther away. Normals are resized with nearest
neighbour too (the authors use bilinear without re-normalising): nearest keeps every vector
unit length and keeps invalid (all-zero) normals from bleeding into valid ones, so the normal
and depth validity masks stay identical. Nearest neighbour here means source index
``(i * h) // H`` (PyTorch's legacy ``"nearest"``), computed in integers so it is exact.

Horizontal flip with probability 0.5 mirrors every map and negates the normals' x-component
(camera frame, x to the right).

The draws for sample ``index`` in ``epoch`` come from a generator seeded by
``(seed, epoch, index)``, so a sample's augmentation does not depend on DataLoader worker count
or iteration order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SCALES: tuple[float, ...] = (1.0, 1.2, 1.5)
LABEL_KEYS = frozenset({"semantic", "human_parts", "saliency"})
# Keys that are per-pixel maps; anything else in a sample (e.g. "index") passes through.
MAP_KEYS = frozenset({"image", "depth", "normal"}) | LABEL_KEYS


@dataclass(frozen=True)
class AugmentParams:
    """One sample's draws: crop window ``top, left`` of size ``crop_size(H, W, scale)``."""

    scale: float
    top: int
    left: int
    flip: bool


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample's draws; a pure function of its three arguments."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index)]))


def crop_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Size of the window that ``scale`` zooms to ``height x width`` (authors: ``int(H / s)``)."""
    return max(1, int(height / scale)), max(1, int(width / scale))


def draw_params(
    rng: np.random.Generator,
    *,
    height: int,
    width: int,
    scales: Sequence[float] = SCALES,
    flip_prob: float = 0.5,
) -> AugmentParams:
    """Draw scale, crop offset and flip for a ``height x width`` sample."""
    scale = float(scales[int(rng.integers(len(scales)))])
    h, w = crop_size(height, width, scale)
    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    flip = bool(rng.random() < flip_prob)
    return AugmentParams(scale=scale, top=top, left=left, flip=flip)


def resize_nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., h, w) -> (..., H, W) by source index ``(i * h) // H``; any dtype, exact."""
    h, w = x.shape[-2:]
    rows = torch.arange(size[0]) * h // size[0]
    cols = torch.arange(size[1]) * w // size[1]
    return x[..., rows[:, None], cols[None, :]]


def resize_bilinear(x: torch.Tensor, size: tuple[int, int], *, align_corners: bool) -> torch.Tensor:
    """(C, h, w) float -> (C, H, W) bilinear."""
    out = F.interpolate(x[None], size=size, mode="bilinear", align_corners=align_corners)
    return out[0]


def scale_crop(
    sample: dict[str, torch.Tensor],
    *,
    scale: float,
    top: int,
    left: int,
    inverse_depth: bool = False,
) -> dict[str, torch.Tensor]:
    """Crop the ``crop_size`` window at ``(top, left)`` from every map and resize it back.

    Depth is divided by ``scale``; with ``inverse_depth`` (disparity) it is multiplied.
    """
    height, width = sample["image"].shape[-2:]
    h, w = crop_size(height, width, scale)
    if (h, w) == (height, width):
        return dict(sample)
    out = dict(sample)
    for key, value in sample.items():
        if key not in MAP_KEYS:
            continue
        window = value[..., top : top + h, left : left + w]
        if key == "image":
            out[key] = resize_bilinear(window, (height, width), align_corners=True)
        elif key == "depth":
            depth = resize_nearest(window, (height, width))
            out[key] = depth * scale if inverse_depth else depth / scale
        else:
            out[key] = resize_nearest(window, (height, width))
    return out


def hflip(sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mirror every map left-right; the normals' x-component changes sign."""
    out = dict(sample)
    for key, value in sample.items():
        if key in MAP_KEYS:
            out[key] = torch.flip(value, dims=[-1])
    if "normal" in out:
        normal = out["normal"].clone()
        normal[0] = -normal[0]
        out["normal"] = normal
    return out


def augment(
    sample: dict[str, torch.Tensor], params: AugmentParams, *, inverse_depth: bool = False
) -> dict[str, torch.Tensor]:
    """Scale-crop then (maybe) flip, as in the authors' data loader."""
    out = scale_crop(
        sample, scale=params.scale, top=params.top, left=params.left, inverse_depth=inverse_depth
    )
    return hflip(out) if params.flip else out

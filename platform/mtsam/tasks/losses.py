"""Per-task training losses (MTAN / LibMTL definitions), safe on batches with no valid pixel.

Every loss is a mean over the valid pixels of the whole batch (pixel-weighted, not a mean of
per-image means). When a batch has no valid pixel the loss is an exact 0 that is still attached
to the graph (its gradient is 0), never NaN: a crop with only ignore labels must not poison
the optimizer state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtsam.tasks.checks import IGNORE_INDEX


def nll_ignore(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of log-softmax(logits), averaged over non-ignored pixels.

    logits: (B, C, H, W) raw scores; target: (B, H, W) int64 in 0..C-1, ``-1`` = ignore.
    Returns a scalar. Same value as ``F.nll_loss(F.log_softmax(logits, 1), target,
    ignore_index=-1)`` whenever at least one pixel is valid, and 0 otherwise.
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    total = F.nll_loss(log_p, target, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (target != IGNORE_INDEX).sum().clamp_min(1)
    return total / count


def depth_valid_mask(target: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 1, H, W) bool: a depth pixel is valid where the target is non-zero."""
    return target != 0


def normal_valid_mask(target: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H, W) bool: a normal is valid unless all three components are 0.

    MTAN / LibMTL test ``sum over channels != 0``, which also drops the (rare) unit vectors whose
    components sum to 0; "not all zero" is the intended meaning of their invalid marker.
    """
    return (target != 0).any(dim=1)


def l1_valid(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean |pred - target| over valid depth pixels (target != 0).

    pred, target: (B, 1, H, W). Returns a scalar; 0 (with gradient) when nothing is valid.
    ``torch.where`` rather than multiplying by the mask, so a non-finite prediction at an
    invalid pixel cannot leak a NaN into the loss.
    """
    valid = depth_valid_mask(target)
    err = torch.where(
        valid, (pred.float() - target.float()).abs(), torch.zeros((), device=pred.device)
    )
    return err.sum() / valid.sum().clamp_min(1)


def cosine_valid(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine similarity over valid normal pixels, after L2-normalising ``pred``.

    pred: (B, 3, H, W) raw; target: (B, 3, H, W) unit vectors, all-zero = invalid. Returns a
    scalar in [0, 2]; 0 (with gradient) when nothing is valid. The target is used as given
    (the benchmarks store unit normals), as in MTAN / LibMTL.
    """
    valid = normal_valid_mask(target)
    unit = F.normalize(pred.float(), p=2, dim=1)
    cos = (unit * target.float()).sum(dim=1)
    cos = torch.where(valid, cos, torch.zeros((), device=pred.device))
    count = valid.sum()
    # With no valid pixel 1 - mean_cos would be 1; the indicator makes it 0, still on the graph.
    mean_cos = cos.sum() / count.clamp_min(1)
    return (1.0 - mean_cos) * (count > 0)

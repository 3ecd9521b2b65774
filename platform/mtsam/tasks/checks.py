"""Input checks shared by the losses, metrics and drawings: one-line errors naming the task."""

from __future__ import annotations

import torch

IGNORE_INDEX = -1


class TaskInputError(ValueError):
    """A prediction or target that does not fit its task (shape, dtype or label range).

    The message is one line: the task, the tensor, what was expected and what was given.
    """


def check_logits(logits: torch.Tensor, *, task: str, channels: int) -> None:
    """``logits`` must be a floating (B, channels, H, W) tensor."""
    if not torch.is_tensor(logits) or not logits.is_floating_point():
        raise TaskInputError(f"{task}: prediction must be a floating tensor, got {_desc(logits)}")
    if logits.dim() != 4 or logits.shape[1] != channels:
        raise TaskInputError(
            f"{task}: prediction must be (B, {channels}, H, W), got {tuple(logits.shape)}"
        )


def check_label_target(
    logits: torch.Tensor, target: torch.Tensor, *, task: str, num_classes: int
) -> None:
    """Class targets: integer (B, H, W) with values in {-1} ∪ [0, num_classes)."""
    check_logits(logits, task=task, channels=num_classes)
    if not torch.is_tensor(target) or target.is_floating_point() or target.dtype == torch.bool:
        raise TaskInputError(f"{task}: target must be an integer tensor, got {_desc(target)}")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise TaskInputError(
            f"{task}: target must be (B, H, W) = {expected} to match the prediction, "
            f"got {tuple(target.shape)}"
        )
    if target.numel() and bool(((target < IGNORE_INDEX) | (target >= num_classes)).any()):
        lo, hi = int(target.min()), int(target.max())
        raise TaskInputError(
            f"{task}: target labels must be in 0..{num_classes - 1} or {IGNORE_INDEX} (ignore), "
            f"got values in [{lo}, {hi}]"
        )


def check_dense_target(
    pred: torch.Tensor, target: torch.Tensor, *, task: str, channels: int
) -> None:
    """Dense targets (depth, normal): floating (B, channels, H, W) matching the prediction."""
    check_logits(pred, task=task, channels=channels)
    if not torch.is_tensor(target) or not target.is_floating_point():
        raise TaskInputError(f"{task}: target must be a floating tensor, got {_desc(target)}")
    if target.shape != pred.shape:
        raise TaskInputError(
            f"{task}: target must be (B, {channels}, H, W) = {tuple(pred.shape)} to match the "
            f"prediction, got {tuple(target.shape)}"
        )


def _desc(x: object) -> str:
    if torch.is_tensor(x):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__

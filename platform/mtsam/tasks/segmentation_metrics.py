"""mIoU and pixel accuracy from a confusion matrix accumulated over a whole split."""

from __future__ import annotations

import math

import torch

from mtsam.tasks.accumulator import MetricAccumulator
from mtsam.tasks.checks import IGNORE_INDEX, check_label_target


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts, rows = ground truth, columns = prediction; ``-1`` targets skipped.

    pred, target: integer tensors of the same shape.
    """
    valid = target != IGNORE_INDEX
    index = target[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def miou_and_accuracy(confusion: torch.Tensor) -> dict[str, float]:
    """{"miou", "pixel_acc"} from a (C, C) confusion matrix (rows = ground truth).

    Rule for classes absent from the split: IoU_c = TP_c / (TP_c + FP_c + FN_c) is averaged
    over the classes with a non-empty union (TP + FP + FN > 0). A class with no ground-truth
    and no predicted pixel is left out (LibMTL would give NaN there); a class that is predicted
    but absent from the ground truth has IoU 0 and counts. Both values are NaN only when no
    valid pixel was accumulated at all. pixel_acc = trace / (number of valid pixels).
    """
    conf = confusion.to(torch.float64)
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    total = float(conf.sum())
    miou = float((tp[present] / union[present]).mean()) if bool(present.any()) else math.nan
    acc = float(tp.sum()) / total if total > 0 else math.nan
    return {"miou": miou, "pixel_acc": acc}


class ConfusionAccumulator(MetricAccumulator):
    """Semantic / human-parts metrics: mIoU and pixel accuracy (both higher is better).

    update(logits (B, C, H, W), target (B, H, W) int64 with -1 = ignore); the prediction is the
    arg-max over channels (ties go to the lower class id). State: the C x C confusion matrix,
    row-major. See ``miou_and_accuracy`` for the rule on absent classes.
    """

    def __init__(self, *, task: str, num_classes: int) -> None:
        self.num_classes = num_classes
        super().__init__(task=task)

    @property
    def state_size(self) -> int:
        return self.num_classes * self.num_classes

    def _statistics(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_label_target(logits, target, task=self.task, num_classes=self.num_classes)
        pred = logits.argmax(dim=1)
        conf = confusion_matrix(pred, target.long(), self.num_classes)
        return conf.reshape(-1).to(torch.float64)

    def _metrics(self, state: torch.Tensor) -> dict[str, float]:
        return miou_and_accuracy(state.view(self.num_classes, self.num_classes))

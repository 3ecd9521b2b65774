"""Saliency: max F-measure over probability thresholds and 2-class mIoU, pooled over a split."""

from __future__ import annotations

import math

import torch

from mtsam.tasks.accumulator import MetricAccumulator
from mtsam.tasks.checks import IGNORE_INDEX, check_label_target
from mtsam.tasks.segmentation_metrics import confusion_matrix, miou_and_accuracy


def saliency_probability(logits: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) scores (raw or log-softmax) -> (B, H, W) float64 probability of class 1."""
    return torch.softmax(logits.to(torch.float64), dim=1)[:, 1]


class SaliencyAccumulator(MetricAccumulator):
    """Saliency metrics: ``maxf`` and ``miou`` (both higher is better).

    maxF as in the published PASCAL-MT evaluation (MTLoRA's ``SaliencyMeterWithBeta``, after
    ASTMT): thresholds t_k = k * step for k = 1 .. 1/step - 1 (step 0.05 by default: 0.05 ..
    0.95, 19 thresholds, each computed as k / (1/step) so that 0.15 is the nearest double to
    0.15), a pixel is predicted salient when p(class 1) >= t_k; TP_k, the predicted positives
    PP_k and the ground-truth positives P are pooled over all valid pixels of the split,
    precision_k = TP_k / PP_k (0 when PP_k = 0), recall_k = TP_k / P, F_k = (1 + b2) prec rec /
    (b2 prec + rec) with b2 = beta^2 = 0.3 (0 when both are 0), and maxf = max_k F_k. NaN when
    the split has no salient ground-truth pixel (the reference would report 0 there).
    miou: 2-class mIoU at p > 0.5 (same rule as ``miou_and_accuracy``).

    update(logits (B, 2, H, W), target (B, H, W) int64 in {0, 1}, -1 = ignore).
    State: histogram of "number of thresholds <= p" for all valid pixels (K + 1 bins),
    the same for salient pixels (K + 1), then the 2 x 2 confusion matrix at 0.5.
    """

    def __init__(self, *, task: str = "saliency", step: float = 0.05, beta2: float = 0.3) -> None:
        count = round(1.0 / step) - 1
        if count < 1 or abs((count + 1) * step - 1.0) > 1e-9:
            raise ValueError(f"{task}: threshold step must divide 1 (e.g. 0.01, 0.05), got {step}")
        if beta2 <= 0:
            raise ValueError(f"{task}: beta2 must be positive, got {beta2}")
        self.step = step
        self.beta2 = beta2
        self.thresholds = torch.arange(1, count + 1, dtype=torch.float64) / (count + 1)
        super().__init__(task=task)

    @property
    def state_size(self) -> int:
        return 2 * (len(self.thresholds) + 1) + 4

    def _statistics(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_label_target(logits, target, task=self.task, num_classes=2)
        target = target.long()
        prob = saliency_probability(logits)
        valid = target != IGNORE_INDEX
        p, gt = prob[valid], target[valid]
        bins = len(self.thresholds) + 1
        # Bucket i = number of thresholds <= p: p is positive (p >= t) at thresholds 0..i-1.
        above = torch.bucketize(p, self.thresholds.to(p.device), right=True)
        hist_all = torch.bincount(above, minlength=bins)
        hist_pos = torch.bincount(above[gt == 1], minlength=bins)
        pred_half = torch.where(valid, (prob > 0.5).long(), torch.full_like(target, IGNORE_INDEX))
        conf = confusion_matrix(pred_half, target, 2).reshape(-1)
        return torch.cat([hist_all, hist_pos, conf]).to(torch.float64)

    def precision_recall(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K,) precision and recall per threshold from a state vector (recall NaN if P = 0)."""
        bins = len(self.thresholds) + 1
        hist_all, hist_pos = state[:bins], state[bins : 2 * bins]
        # Pixels positive at threshold k are those in buckets k+1 .. K.
        pp = hist_all.sum() - hist_all.cumsum(0)[:-1]
        tp = hist_pos.sum() - hist_pos.cumsum(0)[:-1]
        prec = torch.where(pp > 0, tp / pp.clamp_min(1), torch.zeros_like(tp))
        positives = float(hist_pos.sum())
        rec = tp / positives if positives > 0 else torch.full_like(tp, math.nan)
        return prec, rec

    def _metrics(self, state: torch.Tensor) -> dict[str, float]:
        prec, rec = self.precision_recall(state)
        denom = self.beta2 * prec + rec
        f = torch.where(denom > 0, (1 + self.beta2) * prec * rec / denom, torch.zeros_like(denom))
        maxf = math.nan if bool(rec.isnan().any()) else float(f.max())
        conf = state[-4:].view(2, 2)
        return {"maxf": maxf, "miou": miou_and_accuracy(conf)["miou"]}

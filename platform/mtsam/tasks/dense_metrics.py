"""Depth errors and surface-normal angle statistics over the valid pixels of a whole split."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mtsam.tasks.accumulator import MetricAccumulator
from mtsam.tasks.checks import check_dense_target
from mtsam.tasks.losses import depth_valid_mask, normal_valid_mask

NORMAL_THRESHOLDS_DEG = (11.25, 22.5, 30.0)
NORMAL_WITHIN_NAMES = ("within_11_25", "within_22_5", "within_30")


class DepthAccumulator(MetricAccumulator):
    """Depth metrics over valid pixels (target != 0), pixel-weighted over the whole split.

    abs_err = sum |pred - gt| / n and rel_err = sum (|pred - gt| / gt) / n, n = valid pixels
    (both lower is better; LibMTL's definitions). update(pred (B, 1, H, W), target (B, 1, H, W)).
    State: [n, sum |d|, sum |d| / gt]. NaN when no valid pixel was accumulated.
    """

    def __init__(self, *, task: str = "depth") -> None:
        super().__init__(task=task)

    @property
    def state_size(self) -> int:
        return 3

    def _statistics(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_dense_target(logits, target, task=self.task, channels=1)
        valid = depth_valid_mask(target)
        gt = target[valid].to(torch.float64)
        err = (logits[valid].to(torch.float64) - gt).abs()
        count = valid.sum().to(torch.float64)
        return torch.stack([count, err.sum(), (err / gt).sum()])

    def _metrics(self, state: torch.Tensor) -> dict[str, float]:
        n, abs_sum, rel_sum = (float(v) for v in state)
        if n == 0:
            return {"abs_err": math.nan, "rel_err": math.nan}
        return {"abs_err": abs_sum / n, "rel_err": rel_sum / n}


class NormalAccumulator(MetricAccumulator):
    """Angular error (degrees) of L2-normalised predictions over valid normals (target not 0).

    Metrics: mean_deg and median_deg (lower is better); within_11_25, within_22_5, within_30 =
    fraction of valid pixels with angle strictly below 11.25, 22.5, 30 degrees (higher is
    better). Angles are computed in float64 from the clamped cosine, as LibMTL does.

    The mean and the fractions are exact sums. The median is not a sum statistic, so the state
    holds a histogram of angles over [0, 180] with bins of ``bin_deg`` (default 0.01 degree,
    18,000 bins); the median is read from it with linear interpolation inside the bin (the
    values of a bin are taken as evenly spread over it), averaging the two middle ranks for
    an even count as numpy does. Tolerance: |median_deg - exact median| <= bin_deg (0.01 deg).
    A prediction that is all-zero has no direction and counts as 90 degrees from any target;
    a NaN prediction makes the mean and the median NaN and is never within a threshold.

    update(pred (B, 3, H, W), target (B, 3, H, W)). State: [n, sum angle, 3 within-counts,
    histogram]. All NaN when no valid pixel was accumulated.
    """

    def __init__(self, *, task: str = "normal", bin_deg: float = 0.01) -> None:
        if not 0 < bin_deg <= 1:
            raise ValueError(f"{task}: bin_deg must be in (0, 1] degree, got {bin_deg}")
        self.bin_deg = bin_deg
        self.num_bins = math.ceil(180.0 / bin_deg - 1e-9)
        super().__init__(task=task)

    @property
    def state_size(self) -> int:
        return 2 + len(NORMAL_THRESHOLDS_DEG) + self.num_bins

    def angles_deg(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Angles in degrees (float64, 1-D) between pred and target at the valid pixels."""
        check_dense_target(pred, target, task=self.task, channels=3)
        valid = normal_valid_mask(target)
        unit = F.normalize(pred.to(torch.float64), p=2, dim=1)
        cos = (unit * target.to(torch.float64)).sum(dim=1)[valid].clamp(-1.0, 1.0)
        return torch.rad2deg(torch.acos(cos))

    def _statistics(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ang = self.angles_deg(logits, target)
        within = [(ang < t).sum() for t in NORMAL_THRESHOLDS_DEG]
        bins = (ang / self.bin_deg).floor().long().clamp(0, self.num_bins - 1)
        hist = torch.bincount(bins, minlength=self.num_bins)
        head = torch.stack([torch.tensor(ang.numel(), device=ang.device), ang.sum(), *within])
        return torch.cat([head.to(torch.float64), hist.to(torch.float64)])

    def _metrics(self, state: torch.Tensor) -> dict[str, float]:
        n = float(state[0])
        names = ("mean_deg", "median_deg", *NORMAL_WITHIN_NAMES)
        if n == 0:
            return dict.fromkeys(names, math.nan)
        hist = state[2 + len(NORMAL_THRESHOLDS_DEG) :]
        mean = float(state[1]) / n
        # A NaN prediction makes the angle sum NaN; its histogram bin is meaningless, so the
        # median is NaN too rather than a misleadingly small value.
        median = self._median(hist, int(n)) if math.isfinite(mean) else math.nan
        out = {"mean_deg": mean, "median_deg": median}
        for i, name in enumerate(NORMAL_WITHIN_NAMES):
            out[name] = float(state[2 + i]) / n
        return out

    def _median(self, hist: torch.Tensor, n: int) -> float:
        cum = hist.cumsum(0)
        lo, hi = (n - 1) // 2, n // 2
        return 0.5 * (self._value_at_rank(hist, cum, lo) + self._value_at_rank(hist, cum, hi))

    def _value_at_rank(self, hist: torch.Tensor, cum: torch.Tensor, rank: int) -> float:
        # First bin whose cumulative count passes the 0-based rank holds that sorted value.
        k = int(torch.searchsorted(cum, torch.tensor(float(rank), dtype=cum.dtype), right=True))
        before = float(cum[k] - hist[k])
        return (k + (rank - before + 0.5) / float(hist[k])) * self.bin_deg


class PerImageDepthAccumulator(MetricAccumulator):
    """Depth errors per image, then averaged over images (the MTSAM authors' protocol).

    For each image with at least one valid pixel: abs_err_i = mean |pred - gt| and rel_err_i =
    mean |pred - gt| / gt over its valid pixels; the metrics are the means of these over those
    images (an image without a valid pixel is skipped: the reference would divide by zero).
    State: [images, sum abs_err_i, sum rel_err_i], exact to sum across batches and workers.
    update(pred (B, 1, H, W), target (B, 1, H, W)). NaN when no image had a valid pixel.
    """

    def __init__(self, *, task: str = "depth") -> None:
        super().__init__(task=task)

    @property
    def state_size(self) -> int:
        return 3

    def _statistics(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_dense_target(logits, target, task=self.task, channels=1)
        valid = depth_valid_mask(target).flatten(1)  # (B, H*W)
        gt = target.flatten(1).to(torch.float64)
        err = (logits.flatten(1).to(torch.float64) - gt).abs()
        n = valid.sum(dim=1).to(torch.float64)
        seen = n > 0
        abs_i = torch.where(valid, err, 0.0).sum(dim=1)[seen] / n[seen]
        rel_i = torch.where(valid, err / torch.where(valid, gt, 1.0), 0.0).sum(dim=1)[seen]
        rel_i = rel_i / n[seen]
        return torch.stack([seen.sum().to(torch.float64), abs_i.sum(), rel_i.sum()])

    def _metrics(self, state: torch.Tensor) -> dict[str, float]:
        images, abs_sum, rel_sum = (float(v) for v in state)
        if images == 0:
            return {"abs_err": math.nan, "rel_err": math.nan}
        return {"abs_err": abs_sum / images, "rel_err": rel_sum / images}


class PerImageNormalAccumulator(NormalAccumulator):
    """Angle statistics per image, then averaged over images (the MTSAM authors' protocol).

    For each image with at least one valid normal: its mean angle, its median angle (exact,
    the lower of the two middle values for an even count, as ``torch.median`` gives in the
    authors' evaluation) and its fractions within 11.25 / 22.5 / 30 degrees; each metric is the
    mean of these over those images. State: [images, sum mean_i, sum median_i, 3 sums of
    fractions], exact to sum across batches and workers. Images without a valid normal are
    skipped. update(pred (B, 3, H, W), target (B, 3, H, W)).
    """

    def __init__(self, *, task: str = "normal") -> None:
        super().__init__(task=task)

    @property
    def state_size(self) -> int:
        return 3 + len(NORMAL_THRESHOLDS_DEG)

    def _statistics(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        rows = []
        for b in range(logits.shape[0]):
            ang = self.angles_deg(logits[b : b + 1], target[b : b + 1])
            if ang.numel() == 0:
                continue
            within = [(ang < t).to(torch.float64).mean() for t in NORMAL_THRESHOLDS_DEG]
            rows.append(torch.stack([ang.mean(), ang.median(), *within]))
        out = torch.zeros(self.state_size, dtype=torch.float64, device=logits.device)
        if rows:
            out[0] = len(rows)
            out[1:] = torch.stack(rows).sum(dim=0)
        return out

    def _metrics(self, state: torch.Tensor) -> dict[str, float]:
        images = float(state[0])
        names = ("mean_deg", "median_deg", *NORMAL_WITHIN_NAMES)
        if images == 0:
            return dict.fromkeys(names, math.nan)
        return {name: float(v) / images for name, v in zip(names, state[1:], strict=True)}

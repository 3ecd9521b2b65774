"""Task specs: channels, output activation, loss, metrics with their direction, drawings.

One small frozen dataclass per task kind. The model's output for a task is a raw float tensor
(B, C_t, H, W); ``activate`` turns it into the prediction, ``loss`` and the accumulators take the
raw tensor (they apply the activation themselves, and give the same result if it was already
applied). Specs hold only plain values, so they pickle cleanly into Ray workers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from mtsam.tasks.accumulator import MetricAccumulator
from mtsam.tasks.checks import IGNORE_INDEX, check_dense_target, check_label_target
from mtsam.tasks.dense_metrics import (
    DepthAccumulator,
    NormalAccumulator,
    PerImageDepthAccumulator,
    PerImageNormalAccumulator,
)
from mtsam.tasks.losses import (
    cosine_valid,
    depth_valid_mask,
    l1_valid,
    nll_ignore,
    normal_valid_mask,
)
from mtsam.tasks.saliency_metrics import SaliencyAccumulator, saliency_probability
from mtsam.tasks.segmentation_metrics import ConfusionAccumulator
from mtsam.tasks.visualize import draw_labels, draw_normals, draw_scalar, shared_range

Directions = tuple[tuple[str, bool], ...]

#: Evaluation protocols: metrics pooled over every valid pixel of the split (LibMTL), or
#: computed per image and averaged over images (the MTSAM authors' batch-1 evaluation; only
#: depth and normal metrics differ, class metrics stay pooled confusion matrices).
PROTOCOLS = ("pooled", "per_image")


def _check_protocol(name: str, protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"{name}: unknown protocol {protocol!r}; expected one of {PROTOCOLS}")


@dataclass(frozen=True)
class TaskSpec(ABC):
    """What the platform needs to know about one task; ``name`` is also its batch key."""

    name: str

    #: (metric, higher_is_better) for every metric ``compute()`` returns, in that order.
    DIRECTIONS: ClassVar[Directions] = ()
    #: The metrics that are fractions in [0, 1] (not percent).
    FRACTIONS: ClassVar[frozenset[str]] = frozenset()
    #: Name of the output activation (for logs and adapter descriptions).
    ACTIVATION: ClassVar[str] = "identity"

    @property
    @abstractmethod
    def channels(self) -> int:
        """Output channels C_t the model must produce for this task."""

    @property
    def directions(self) -> dict[str, bool]:
        """{metric: True if higher is better}."""
        return dict(self.DIRECTIONS)

    @abstractmethod
    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C_t, H, W) raw output -> (B, C_t, H, W) prediction."""

    @abstractmethod
    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar training loss of a batch (0, not NaN, when no pixel is valid)."""

    @abstractmethod
    def valid_pixels(self, target: torch.Tensor) -> torch.Tensor:
        """The number of pixels :meth:`loss` averages over (its denominator), as a scalar.

        The training loop uses it to weight each worker's and micro-batch's mean so that a
        step's loss is the mean over every valid pixel of the whole step, whatever the split.
        """

    @abstractmethod
    def new_accumulator(self) -> MetricAccumulator:
        """A fresh metric accumulator for one split."""

    @abstractmethod
    def visualize(
        self, logits: torch.Tensor, target: torch.Tensor, *, mask_invalid: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """One sample: logits (C_t, H, W) and its target -> (pred, target) RGB uint8 (H, W, 3).

        Target pixels without a valid value are black; with ``mask_invalid`` the prediction is
        blacked out there too (otherwise it is drawn everywhere).
        """


@dataclass(frozen=True)
class ClassSegmentationTask(TaskSpec):
    """Per-pixel classification (semantic, human parts): C channels, log-softmax, NLL, mIoU."""

    num_classes: int = 2

    DIRECTIONS: ClassVar[Directions] = (("miou", True), ("pixel_acc", True))
    FRACTIONS: ClassVar[frozenset[str]] = frozenset({"miou", "pixel_acc"})
    ACTIVATION: ClassVar[str] = "log_softmax"

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"{self.name}: num_classes must be at least 2, got {self.num_classes}")

    @property
    def channels(self) -> int:
        return self.num_classes

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits, dim=1)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_label_target(logits, target, task=self.name, num_classes=self.num_classes)
        return nll_ignore(logits, target.long())

    def valid_pixels(self, target: torch.Tensor) -> torch.Tensor:
        return (target != IGNORE_INDEX).sum()

    def new_accumulator(self) -> MetricAccumulator:
        return ConfusionAccumulator(task=self.name, num_classes=self.num_classes)

    def visualize(
        self, logits: torch.Tensor, target: torch.Tensor, *, mask_invalid: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        check_label_target(logits[None], target[None], task=self.name, num_classes=self.channels)
        pred = logits.argmax(dim=0)
        if mask_invalid:
            pred = torch.where(target == IGNORE_INDEX, IGNORE_INDEX, pred)
        return draw_labels(pred, self.num_classes), draw_labels(target, self.num_classes)


@dataclass(frozen=True)
class SaliencyTask(ClassSegmentationTask):
    """Binary saliency as 2-class segmentation; metrics maxF (beta^2) and 2-class mIoU."""

    num_classes: int = 2
    step: float = 0.05  # maxF threshold step of the published PASCAL-MT evaluation
    beta2: float = 0.3

    DIRECTIONS: ClassVar[Directions] = (("maxf", True), ("miou", True))
    FRACTIONS: ClassVar[frozenset[str]] = frozenset({"maxf", "miou"})

    def __post_init__(self) -> None:
        if self.num_classes != 2:
            raise ValueError(f"{self.name}: saliency has 2 classes, got {self.num_classes}")

    def new_accumulator(self) -> MetricAccumulator:
        return SaliencyAccumulator(task=self.name, step=self.step, beta2=self.beta2)

    def visualize(
        self, logits: torch.Tensor, target: torch.Tensor, *, mask_invalid: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Probability of "salient" and the {0, 1} target, both through viridis over [0, 1]."""
        check_label_target(logits[None], target[None], task=self.name, num_classes=2)
        prob = saliency_probability(logits[None])[0]
        valid = target != IGNORE_INDEX
        pred_valid = valid if mask_invalid else torch.ones_like(valid)
        pred_img = draw_scalar(prob, pred_valid, lo=0.0, hi=1.0)
        return pred_img, draw_scalar(target.double(), valid, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class DepthTask(TaskSpec):
    """Metric (or inverse) depth: 1 channel, identity, L1 over valid pixels, abs/rel error.

    ``protocol``: "pooled" (errors over every valid pixel of the split) or "per_image".
    """

    protocol: str = "pooled"

    DIRECTIONS: ClassVar[Directions] = (("abs_err", False), ("rel_err", False))
    ACTIVATION: ClassVar[str] = "identity"

    @property
    def channels(self) -> int:
        return 1

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_dense_target(logits, target, task=self.name, channels=1)
        return l1_valid(logits, target)

    def valid_pixels(self, target: torch.Tensor) -> torch.Tensor:
        return depth_valid_mask(target).sum()

    def __post_init__(self) -> None:
        _check_protocol(self.name, self.protocol)

    def new_accumulator(self) -> MetricAccumulator:
        if self.protocol == "per_image":
            return PerImageDepthAccumulator(task=self.name)
        return DepthAccumulator(task=self.name)

    def visualize(
        self, logits: torch.Tensor, target: torch.Tensor, *, mask_invalid: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Both through viridis over the valid target's range (see ``shared_range``)."""
        check_dense_target(logits[None], target[None], task=self.name, channels=1)
        pred = logits[0].detach().cpu().double().numpy()
        gt = target[0].detach().cpu().double().numpy()
        valid = depth_valid_mask(target[0]).cpu().numpy()
        lo, hi = shared_range(gt, valid, pred)
        pred_valid = valid if mask_invalid else np.ones_like(valid)
        return draw_scalar(pred, pred_valid, lo=lo, hi=hi), draw_scalar(gt, valid, lo=lo, hi=hi)


@dataclass(frozen=True)
class NormalTask(TaskSpec):
    """Surface normals: 3 channels, L2-normalised, 1 - cosine, angle statistics in degrees.

    ``protocol``: "pooled" (statistics over every valid pixel of the split; the median from a
    histogram of ``bin_deg`` bins) or "per_image" (exact per-image statistics, averaged).
    """

    bin_deg: float = 0.01
    protocol: str = "pooled"

    DIRECTIONS: ClassVar[Directions] = (
        ("mean_deg", False),
        ("median_deg", False),
        ("within_11_25", True),
        ("within_22_5", True),
        ("within_30", True),
    )
    FRACTIONS: ClassVar[frozenset[str]] = frozenset({"within_11_25", "within_22_5", "within_30"})
    ACTIVATION: ClassVar[str] = "l2_normalize"

    @property
    def channels(self) -> int:
        return 3

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        return F.normalize(logits, p=2, dim=1)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_dense_target(logits, target, task=self.name, channels=3)
        return cosine_valid(logits, target)

    def valid_pixels(self, target: torch.Tensor) -> torch.Tensor:
        return normal_valid_mask(target).sum()

    def __post_init__(self) -> None:
        _check_protocol(self.name, self.protocol)

    def new_accumulator(self) -> MetricAccumulator:
        if self.protocol == "per_image":
            return PerImageNormalAccumulator(task=self.name)
        return NormalAccumulator(task=self.name, bin_deg=self.bin_deg)

    def visualize(
        self, logits: torch.Tensor, target: torch.Tensor, *, mask_invalid: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        check_dense_target(logits[None], target[None], task=self.name, channels=3)
        valid = normal_valid_mask(target[None])[0]
        pred = self.activate(logits[None].float())[0]
        pred_valid = valid if mask_invalid else torch.ones_like(valid)
        return draw_normals(pred, pred_valid), draw_normals(target, valid)

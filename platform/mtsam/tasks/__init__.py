"""Task specs (channels, activation, loss, metrics and their directions, drawings) and delta_m.

Typical use::

    specs = build_tasks(["semantic", "depth", "normal"], num_classes=13)
    loss = sum(w[t.name] * t.loss(out[t.name], batch[t.name]) for t in specs)
    accs = {t.name: t.new_accumulator() for t in specs}   # update(...) per batch
    all_reduce_(list(accs.values()))                       # no-op without a process group
    results = {name: acc.compute() for name, acc in accs.items()}
    score = delta_m(results, baseline, task_metric_directions(specs))
"""

from mtsam.tasks.accumulator import MetricAccumulator, all_reduce_
from mtsam.tasks.checks import IGNORE_INDEX, TaskInputError
from mtsam.tasks.delta_m import delta_m
from mtsam.tasks.dense_metrics import (
    DepthAccumulator,
    NormalAccumulator,
    PerImageDepthAccumulator,
    PerImageNormalAccumulator,
)
from mtsam.tasks.losses import cosine_valid, l1_valid, nll_ignore
from mtsam.tasks.registry import (
    DATASET_CLASS_TASKS,
    TASK_KINDS,
    build_task,
    build_tasks,
    metric_mode,
    task_metric_directions,
)
from mtsam.tasks.saliency_metrics import SaliencyAccumulator
from mtsam.tasks.segmentation_metrics import ConfusionAccumulator, miou_and_accuracy
from mtsam.tasks.spec import (
    PROTOCOLS,
    ClassSegmentationTask,
    DepthTask,
    NormalTask,
    SaliencyTask,
    TaskSpec,
)

__all__ = [
    "DATASET_CLASS_TASKS",
    "IGNORE_INDEX",
    "PROTOCOLS",
    "TASK_KINDS",
    "ClassSegmentationTask",
    "ConfusionAccumulator",
    "DepthAccumulator",
    "DepthTask",
    "MetricAccumulator",
    "NormalAccumulator",
    "NormalTask",
    "PerImageDepthAccumulator",
    "PerImageNormalAccumulator",
    "SaliencyAccumulator",
    "SaliencyTask",
    "TaskInputError",
    "TaskSpec",
    "all_reduce_",
    "build_task",
    "build_tasks",
    "cosine_valid",
    "delta_m",
    "l1_valid",
    "metric_mode",
    "miou_and_accuracy",
    "nll_ignore",
    "task_metric_directions",
]

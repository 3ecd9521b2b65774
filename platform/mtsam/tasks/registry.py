"""Task registry: task name -> spec builder, and the direction of every reported metric."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

from mtsam.tasks.spec import (
    ClassSegmentationTask,
    DepthTask,
    NormalTask,
    SaliencyTask,
    TaskSpec,
    _check_protocol,
)

HUMAN_PARTS_CLASSES = 7  # PASCAL-MT: background + 6 parts
#: Tasks whose class count is the dataset's (``data.num_classes``); the others have their own.
DATASET_CLASS_TASKS = frozenset({"semantic"})


def _semantic(num_classes: int | None) -> TaskSpec:
    if num_classes is None:
        raise ValueError("build_task('semantic'): num_classes is required (the dataset's classes)")
    return ClassSegmentationTask(name="semantic", num_classes=num_classes)


def _human_parts(num_classes: int | None) -> TaskSpec:
    return ClassSegmentationTask(name="human_parts", num_classes=num_classes or HUMAN_PARTS_CLASSES)


def _fixed(name: str, channels: int, make: Callable[[], TaskSpec]) -> Callable[..., TaskSpec]:
    def build(num_classes: int | None) -> TaskSpec:
        if num_classes not in (None, channels):
            raise ValueError(
                f"build_task({name!r}): the task has {channels} output channel(s); "
                f"num_classes = {num_classes} does not apply"
            )
        return make()

    return build


#: Every known task: name -> builder(num_classes) returning its spec.
TASK_KINDS: Mapping[str, Callable[[int | None], TaskSpec]] = {
    "semantic": _semantic,
    "human_parts": _human_parts,
    "saliency": _fixed("saliency", 2, lambda: SaliencyTask(name="saliency")),
    "depth": _fixed("depth", 1, lambda: DepthTask(name="depth")),
    "normal": _fixed("normal", 3, lambda: NormalTask(name="normal")),
}

_SPEC_CLASSES: Mapping[str, type[TaskSpec]] = {
    "semantic": ClassSegmentationTask,
    "human_parts": ClassSegmentationTask,
    "saliency": SaliencyTask,
    "depth": DepthTask,
    "normal": NormalTask,
}


def _lookup(name: str, table: Mapping[str, object]) -> None:
    if name not in table:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(table)}")


def build_task(name: str, *, num_classes: int | None = None, protocol: str = "pooled") -> TaskSpec:
    """The spec of task ``name``; ``num_classes`` is the class count of a classification task
    (required for ``semantic``, 7 by default for ``human_parts``; fixed tasks accept only their
    own channel count or None). ``protocol`` ("pooled" or "per_image") is the evaluation
    protocol of the tasks that have one (depth, normal); class metrics are always pooled."""
    _lookup(name, TASK_KINDS)
    _check_protocol(name, protocol)
    spec = TASK_KINDS[name](num_classes)
    if any(f.name == "protocol" for f in dataclasses.fields(spec)):
        spec = dataclasses.replace(spec, protocol=protocol)  # type: ignore[type-var]
    return spec


def build_tasks(
    names: Sequence[str], *, num_classes: int | None = None, protocol: str = "pooled"
) -> tuple[TaskSpec, ...]:
    """Specs for a dataset's task list, in order; ``num_classes`` is the dataset's *semantic*
    class count (the other tasks take their defaults); ``protocol`` as in ``build_task``."""
    if isinstance(names, str):
        names = (names,)
    return tuple(
        build_task(
            n, num_classes=num_classes if n in DATASET_CLASS_TASKS else None, protocol=protocol
        )
        for n in names
    )


def task_metric_directions(tasks: Iterable[TaskSpec | str]) -> dict[str, dict[str, bool]]:
    """{task: {metric: True if higher is better}} for specs or task names."""
    out: dict[str, dict[str, bool]] = {}
    for t in tasks:
        if isinstance(t, TaskSpec):
            out[t.name] = t.directions
        else:
            _lookup(t, _SPEC_CLASSES)
            out[t] = dict(_SPEC_CLASSES[t].DIRECTIONS)
    return out


def check_baseline(baseline: Mapping[str, Mapping[str, float]], tasks: Iterable[str]) -> None:
    """Raise ValueError naming ``data.baseline.<task>.<metric>`` for a task not in ``tasks``, a
    metric the task does not report, a value that is not finite and > 0, a fraction metric
    (mIoU, accuracy, ...) given in percent, or a baseline that leaves out a task."""
    tasks = list(tasks)
    for task, metrics in baseline.items():
        if task not in tasks:
            raise ValueError(f"data.baseline.{task}: not one of data.tasks {tasks}")
        _lookup(task, _SPEC_CLASSES)
        spec = _SPEC_CLASSES[task]
        known = [m for m, _ in spec.DIRECTIONS]
        for m, v in metrics.items():
            field = f"data.baseline.{task}.{m}"
            if m not in known:
                raise ValueError(
                    f"{field}: {task} reports no metric {m!r}; expected one of {known}"
                )
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"{field} = {v}: expected a finite value > 0")
            if m in spec.FRACTIONS and not 0 < v <= 1:
                raise ValueError(
                    f"{field} = {v}: expected a fraction in (0, 1] (metrics are not in percent)"
                )
    missing = [t for t in tasks if not baseline.get(t)]
    if baseline and missing:
        raise ValueError(
            f"data.baseline: no metric for tasks {missing}; delta_m needs every task (or no "
            "baseline at all)"
        )


def metric_mode(key: str, tasks: Iterable[TaskSpec | str]) -> Literal["max", "min"]:
    """Tune's ``mode`` for a reported key: ``val/delta_m`` (higher is better, see ``delta_m``)
    or ``<split>/<task>/<metric>``."""
    parts = key.split("/")
    if len(parts) == 2 and parts[1] == "delta_m":
        return "max"
    directions = task_metric_directions(tasks)
    if len(parts) != 3 or parts[1] not in directions or parts[2] not in directions[parts[1]]:
        known = [f"val/{t}/{m}" for t, ms in directions.items() for m in ms]
        raise ValueError(f"metric {key!r}: expected 'val/delta_m' or one of {known}")
    return "max" if directions[parts[1]][parts[2]] else "min"

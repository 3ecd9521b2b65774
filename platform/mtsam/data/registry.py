"""Readers by benchmark name, for jobs that choose the dataset from a config field."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mtsam.data.base import DenseDataset
from mtsam.data.cityscapes import CITYSCAPES_TASKS, CityScapes
from mtsam.data.errors import DatasetError
from mtsam.data.nyuv2 import NYUV2_TASKS, NYUv2
from mtsam.data.pascal_context import PASCAL_TASKS, PascalContext
from mtsam.data.scenes import read_scene_info

DATASET_TASKS: dict[str, tuple[str, ...]] = {
    "nyuv2": NYUV2_TASKS,
    "cityscapes": CITYSCAPES_TASKS,
    "pascal_context": PASCAL_TASKS,
    "scenes": NYUV2_TASKS,
}
READERS: dict[str, type[DenseDataset]] = {
    "nyuv2": NYUv2,
    "cityscapes": CityScapes,
    "pascal_context": PascalContext,
    "scenes": NYUv2,  # generated scenes are written in NYUv2's layout
}
DEFAULT_NUM_CLASSES: dict[str, int | None] = {
    "nyuv2": 13,
    "cityscapes": 7,
    "pascal_context": 21,
    "scenes": None,  # read from the generated folder's scenes.json
}


def open_dataset(
    name: str,
    root: str | Path,
    split: str,
    *,
    tasks: Sequence[str] | None = None,
    num_classes: int | None = None,
    augment: bool = False,
    seed: int = 0,
) -> DenseDataset:
    """The reader for benchmark ``name`` (a key of :data:`DATASET_TASKS`).

    ``tasks=None`` selects all of the benchmark's tasks; ``num_classes=None`` its default.
    """
    if name not in DATASET_TASKS:
        raise DatasetError(
            f"dataset: unknown name {name!r}; expected one of {sorted(DATASET_TASKS)}"
        )
    chosen = DATASET_TASKS[name] if tasks is None else tuple(tasks)
    if name == "scenes":
        info = read_scene_info(root)
        if num_classes is not None and num_classes != info.num_classes:
            raise DatasetError(
                f"{Path(root) / 'scenes.json'}: generated with {info.num_classes} classes, "
                f"not {num_classes}"
            )
        num_classes = info.num_classes
    classes = DEFAULT_NUM_CLASSES[name] if num_classes is None else num_classes
    assert classes is not None
    return READERS[name](root, split, tasks=chosen, num_classes=classes, augment=augment, seed=seed)

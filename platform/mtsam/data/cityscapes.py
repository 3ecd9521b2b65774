"""CityScapes as preprocessed for the MTAN / LibMTL benchmarks (2975 train, 500 val, 128x256)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mtsam.data.errors import DatasetError
from mtsam.data.npy_layout import NpyLayoutDataset

CITYSCAPES_TASKS = ("semantic", "depth")


class CityScapes(NpyLayoutDataset):
    """``root/{split}/{image,<labels>,depth}/{i}.npy``; 7 or 19 classes, -1 = ignore.

    The label folder is ``label_dir`` when given, else ``label`` if it exists (LibMTL), else
    ``label_{num_classes}`` (MTAN's ``label_7`` / ``label_19``). Depth is returned as stored
    (the benchmark stores inverse depth; 0 = invalid); augmentation multiplies it by the zoom
    factor (see :mod:`mtsam.data.transforms`; MTAN's loader divides it, as for metric depth).
    """

    available_tasks = CITYSCAPES_TASKS
    inverse_depth = True

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        tasks: Sequence[str] = CITYSCAPES_TASKS,
        num_classes: int = 7,
        label_dir: str | None = None,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        if num_classes not in (7, 19):
            raise DatasetError(
                f"{Path(root) / split}: num_classes must be 7 or 19, got {num_classes}"
            )
        if label_dir is None:
            plain = Path(root) / split / "label"
            label_dir = "label" if plain.is_dir() else f"label_{num_classes}"
        folders = {"image": "image", "semantic": label_dir, "depth": "depth"}
        super().__init__(
            root,
            split,
            tasks=tasks,
            num_classes=num_classes,
            folders=folders,
            augment=augment,
            seed=seed,
        )

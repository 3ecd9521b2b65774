"""CityScapes as preprocessed for the MTAN / LibMTL benchmarks (2975 train, 500 val, 128x256)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mtsam.data.errors import DatasetError
from mtsam.data.npy_layout import NpyLayoutDataset

CITYSCAPES_TASKS = ("semantic", "depth")


class CityScapes(NpyLayoutDataset):
    """``root/{split}/{image,<labels>,depth}/{i}.npy``; 7 or 19 classes, -1 = ignore.

    The label folder is ``label_dir`` when given, else ``label`` (LibMTL, 7 classes only) if it
    exists and ``num_classes`` is 7, else ``label_{num_classes}`` (MTAN's ``label_7`` /
    ``label_19``); 19 classes with ``label`` but no ``label_19`` is an error. Depth is
    returned as stored (the benchmark stores inverse depth; 0 = invalid); augmentation
    multiplies it by the zoom factor (see :mod:`mtsam.data.transforms`; MTAN's loader divides
    it, as for metric depth).
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
            split_dir = Path(root) / split
            label_dir = f"label_{num_classes}"
            if (split_dir / "label").is_dir():
                if num_classes == 7:
                    label_dir = "label"
                elif "semantic" in tasks and not (split_dir / label_dir).is_dir():
                    # 7-class labels pass the 0..18 range check, so reading them would not fail.
                    raise DatasetError(
                        f"{split_dir / 'label'}: LibMTL's 7-class labels, but num_classes is "
                        f"{num_classes}; expected MTAN's 19-class labels in "
                        f"{split_dir / label_dir}/<i>.npy, or num_classes 7"
                    )
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

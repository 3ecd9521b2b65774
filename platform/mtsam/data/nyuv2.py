"""NYUv2 as preprocessed for the MTAN / LibMTL benchmarks (795 train, 654 in ``val``, 288x384)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mtsam.data.npy_layout import NpyLayoutDataset

NYUV2_TASKS = ("semantic", "depth", "normal")
NYUV2_FOLDERS = {"image": "image", "semantic": "label", "depth": "depth", "normal": "normal"}


class NYUv2(NpyLayoutDataset):
    """``root/{split}/{image,label,depth,normal}/{i}.npy``; depth in metres (0 = invalid).

    Sample: image (3, H, W), semantic (H, W) in -1..num_classes-1, depth (1, H, W),
    normal (3, H, W); see :mod:`mtsam.data.base`. Also serves the generated scenes.
    """

    available_tasks = NYUV2_TASKS

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        tasks: Sequence[str] = NYUV2_TASKS,
        num_classes: int = 13,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            root,
            split,
            tasks=tasks,
            num_classes=num_classes,
            folders=NYUV2_FOLDERS,
            augment=augment,
            seed=seed,
        )

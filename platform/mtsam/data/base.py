"""Common base of every reader: task selection, per-sample augmentation, epochs, full validation.

Per-sample dict returned by every reader (torch tensors; only the requested tasks are present):

- ``"image"``: float32 (3, H, W) in [0, 1]
- ``"semantic"``: int64 (H, W), class ids 0..C-1, -1 = ignore
- ``"human_parts"``: int64 (H, W), 0 = background, 1..6 parts, -1 = ignore
- ``"saliency"``: int64 (H, W) in {0, 1}, -1 = ignore
- ``"depth"``: float32 (1, H, W), depth as the benchmark stores it, 0 = invalid
- ``"normal"``: float32 (3, H, W), camera-frame unit vectors, all-zero = invalid
- ``"index"``: int64 scalar, the sample's position in the split
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mtsam.data.errors import DatasetError
from mtsam.data.transforms import augment as apply_augment
from mtsam.data.transforms import draw_params, sample_rng

Sample = dict[str, torch.Tensor]


def check_tasks(tasks: Sequence[str], available: Sequence[str], *, source: str) -> tuple[str, ...]:
    """Validate a task selection against what a dataset provides; keeps the given order."""
    if isinstance(tasks, str):
        tasks = (tasks,)
    tasks = tuple(tasks)
    if not tasks:
        raise DatasetError(f"{source}: tasks must not be empty; available: {list(available)}")
    unknown = [t for t in tasks if t not in available]
    if unknown:
        raise DatasetError(f"{source}: unknown tasks {unknown}; available: {list(available)}")
    if len(set(tasks)) != len(tasks):
        raise DatasetError(f"{source}: duplicate tasks in {list(tasks)}")
    return tasks


def to_sample(arrays: dict[str, np.ndarray]) -> Sample:
    """Numpy arrays in the per-sample form -> torch tensors (no copy beyond contiguity)."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


class DenseDataset(Dataset):
    """A split of a dense-prediction benchmark; subclasses implement ``__len__`` and ``_load``.

    ``augment=True`` applies :func:`mtsam.data.transforms.augment` with draws seeded by
    ``(seed, epoch, index)``; call :meth:`set_epoch` at the start of each epoch (before the
    DataLoader iterator is created, so non-persistent workers pick it up).
    """

    available_tasks: tuple[str, ...] = ()
    # True when the "depth" maps hold inverse depth (disparity): the zoom multiplies them.
    inverse_depth: bool = False

    def __init__(self, *, tasks: Sequence[str], augment: bool, seed: int, source: str) -> None:
        self.tasks = check_tasks(tasks, self.available_tasks, source=source)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def _load(self, index: int) -> Sample:
        """The validated, un-augmented sample ``index`` without the ``"index"`` key."""

    @abstractmethod
    def source_files(self) -> list[Path]:
        """Every file this split reads (for fingerprints of converted copies)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able parameters that, with the source files, determine every sample."""

    def load(self, index: int) -> Sample:
        """Sample ``index`` without augmentation, with ``"index"``."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        sample = self._load(index)
        sample["index"] = torch.tensor(index, dtype=torch.int64)
        return sample

    def __getitem__(self, index: int) -> Sample:
        sample = self.load(index)
        if self.augment:
            height, width = sample["image"].shape[-2:]
            rng = sample_rng(self.seed, self.epoch, int(index))
            params = draw_params(rng, height=height, width=width)
            sample = apply_augment(sample, params, inverse_depth=self.inverse_depth)
        return sample

    def validate_all(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Load (and so fully check) every sample; returns the count. Raises DatasetError."""
        n = len(self)
        for i in range(n):
            self._load(i)
            if progress is not None:
                progress(i + 1, n)
        return n

"""Reader of the MTAN / LibMTL ``.npy`` layout shared by NYUv2 and CityScapes.

``root/{split}/{folder}/{i}.npy`` with ``i = 0..N-1`` in every modality folder:
``image`` (H, W, 3) float in [0, 1] (uint8 also accepted), labels (H, W) integer-valued
(float or int dtype) in -1..C-1, ``depth`` (H, W, 1) float >= 0 (0 = invalid), ``normal``
(H, W, 3) float in [-1, 1] (all-zero = invalid; returned as stored, not re-normalised).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtsam.data import validate as V
from mtsam.data.base import DenseDataset, Sample, to_sample
from mtsam.data.errors import DatasetError

_ID = re.compile(r"^(0|[1-9][0-9]*)\.npy$")


def _sample_ids(folder: Path) -> set[int]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: modality folder not found")
    ids: set[int] = set()
    for entry in folder.iterdir():
        if entry.suffix != ".npy":
            continue
        match = _ID.match(entry.name)
        if match is None:
            raise DatasetError(f"{entry}: unexpected file name; expected <integer>.npy")
        ids.add(int(match.group(1)))
    return ids


class NpyLayoutDataset(DenseDataset):
    """One split of an MTAN-layout benchmark. Subclasses fix the tasks and folder names.

    Construction checks folders, that every modality holds exactly ``0.npy .. N-1.npy`` and
    the full validity of sample 0; every other sample is checked when loaded.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        tasks: Sequence[str],
        num_classes: int,
        folders: Mapping[str, str],
        augment: bool,
        seed: int,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.split_dir = self.root / split
        super().__init__(tasks=tasks, augment=augment, seed=seed, source=str(self.split_dir))
        if num_classes < 1:
            raise DatasetError(f"{self.split_dir}: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        if not self.split_dir.is_dir():
            raise DatasetError(
                f"{self.split_dir}: split folder not found; expected "
                f"{self.split_dir}/image/0.npy and one folder per task"
            )
        self.folders = {"image": folders["image"], **{t: folders[t] for t in self.tasks}}
        image_dir = self.split_dir / self.folders["image"]
        ids = _sample_ids(image_dir)
        if not ids:
            raise DatasetError(f"{image_dir}: no .npy files")
        missing = sorted(set(range(len(ids))) - ids)
        if missing:
            raise DatasetError(
                f"{image_dir / f'{missing[0]}.npy'}: missing; expected files 0.npy.."
                f"{len(ids) - 1}.npy without gaps"
            )
        for key, name in self.folders.items():
            if key == "image":
                continue
            folder = self.split_dir / name
            other = _sample_ids(folder)
            if other != ids:
                gone = sorted(ids - other)
                extra = sorted(other - ids)
                where = folder / f"{gone[0]}.npy" if gone else folder / f"{extra[0]}.npy"
                reason = "missing" if gone else f"has no matching {image_dir.name}/ file"
                raise DatasetError(
                    f"{where}: {reason}; {folder.name}/ holds {len(other)} files but "
                    f"{image_dir.name}/ holds {len(ids)}"
                )
        self._count = len(ids)
        self._load(0)

    def __len__(self) -> int:
        return self._count

    def _path(self, key: str, index: int) -> Path:
        return self.split_dir / self.folders[key] / f"{index}.npy"

    def _load(self, index: int) -> Sample:
        path = self._path("image", index)
        image = V.image_hwc(V.load_npy(path), path)
        shape = image.shape[1:]
        arrays = {"image": image}
        for task in self.tasks:
            path = self._path(task, index)
            raw = V.load_npy(path)
            if task == "semantic":
                arrays[task] = V.labels(raw, path, num_classes=self.num_classes, shape=shape)
            elif task == "depth":
                arrays[task] = V.depth_hw1(raw, path, shape=shape)
            elif task == "normal":
                arrays[task] = V.normal_hw3(raw, path, shape=shape)
            else:  # pragma: no cover - subclasses only list the tasks above
                raise AssertionError(task)
        return to_sample(arrays)

    def source_files(self) -> list[Path]:
        return [self._path(k, i) for k in self.folders for i in range(self._count)]

    def describe(self) -> dict[str, Any]:
        return {
            "reader": type(self).__name__,
            "root": str(self.root.resolve()),
            "split": self.split,
            "tasks": list(self.tasks),
            "num_classes": self.num_classes,
            "folders": dict(self.folders),
        }

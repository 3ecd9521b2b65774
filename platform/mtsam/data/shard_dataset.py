"""Local random-access reader of Parquet shards (see :mod:`mtsam.data.shards`)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from mtsam.data.base import DenseDataset, Sample
from mtsam.data.errors import DatasetError
from mtsam.data.registry import READERS
from mtsam.data.shards import SHAPE_SUFFIX, decode_row, load_manifest


class ShardDataset(DenseDataset):
    """A split of a shard folder; returns the same per-sample dicts as the reader it came from.

    ``tasks=None`` selects every task stored. The manifest and (with ``verify``) the sha256 of
    the split's shards are checked at construction.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        tasks: Sequence[str] | None = None,
        augment: bool = False,
        seed: int = 0,
        verify: bool = True,
    ) -> None:
        self.root = Path(root)
        self.split = split
        manifest = load_manifest(self.root, splits=[split], verify=verify)
        self.available_tasks = tuple(manifest["tasks"])
        self.dataset_name = manifest["dataset"]
        classes = manifest.get("num_classes")  # None in shard sets written before it was kept
        self.num_classes = int(classes) if isinstance(classes, int) else None
        reader = READERS.get(self.dataset_name)
        self.inverse_depth = reader is not None and reader.inverse_depth
        chosen = self.available_tasks if tasks is None else tasks
        super().__init__(tasks=chosen, augment=augment, seed=seed, source=str(self.root / split))
        self.columns = {k: manifest["columns"][k] for k in ("image", *self.tasks)}
        entry = manifest["splits"][split]
        self._files = [self.root / s["file"] for s in entry["shards"]]
        self._starts = [0]
        for shard in entry["shards"]:
            self._starts.append(self._starts[-1] + int(shard["num_rows"]))
        if self._starts[-1] != entry["num_samples"]:
            raise DatasetError(f"{self.root}/manifest.json: row counts of {split!r} do not add up")
        self._handles: dict[int, tuple[pq.ParquetFile, list[int]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files do not travel to DataLoader workers
        return state

    def __len__(self) -> int:
        return self._starts[-1]

    def _handle(self, shard: int) -> tuple[pq.ParquetFile, list[int]]:
        if shard not in self._handles:
            pf = pq.ParquetFile(self._files[shard])
            starts = [0]
            for g in range(pf.metadata.num_row_groups):
                starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
            self._handles[shard] = (pf, starts)
        return self._handles[shard]

    def _load(self, index: int) -> Sample:
        shard = bisect.bisect_right(self._starts, index) - 1
        pf, starts = self._handle(shard)
        row_in_shard = index - self._starts[shard]
        group = bisect.bisect_right(starts, row_in_shard) - 1
        names = ["index"] + [n for k in self.columns for n in (k, k + SHAPE_SUFFIX)]
        table = pf.read_row_group(group, columns=names)
        row = table.slice(row_in_shard - starts[group], 1).to_pylist()[0]
        arrays = decode_row(row, self.columns)
        arrays.pop("index")
        return {k: torch.from_numpy(v) for k, v in arrays.items()}

    def source_files(self) -> list[Path]:
        return list(self._files)

    def describe(self) -> dict[str, Any]:
        return {
            "reader": "ShardDataset",
            "root": str(self.root.resolve()),
            "split": self.split,
            "tasks": list(self.tasks),
            "dataset": self.dataset_name,
        }

"""Random-access reader of Parquet shards (see :mod:`mtsam.data.shards`), local or remote."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mtsam.data.base import DenseDataset, Sample
from mtsam.data.errors import DatasetError
from mtsam.data.registry import READERS
from mtsam.data.shards import MANIFEST, SHAPE_SUFFIX, decode_row, inspect_split
from mtsam.data.storage import ShardStore
from mtsam.storage import first_line


class ShardDataset(DenseDataset):
    """A split of a shard set; returns the same per-sample dicts as the reader it came from.

    ``root`` is a folder or a URI (``s3://bucket/prefix``, ``gs://...``). Each item is read on
    its own (one Parquet row group per sample), so a data-parallel rank reads only the samples
    its sampler gives it, from wherever the shards are, with ranged reads: nothing is copied
    to the node first. ``tasks=None`` selects every task stored.

    At construction the manifest, the shards' sizes and their Parquet footers are checked
    (:func:`mtsam.data.shards.inspect_split`); ``verify`` adds the sha256 of every shard
    (reads the whole split). Each page read is checked against its stored CRC32, so damage
    inside a shard fails the read that meets it, naming the file.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        tasks: Sequence[str] | None = None,
        augment: bool = False,
        seed: int = 0,
        verify: bool = False,
    ) -> None:
        self.store = ShardStore(root)
        self.root = self.store.root
        self.split = split
        manifest, files = inspect_split(self.store, split, verify=verify)
        self.available_tasks = tuple(manifest["tasks"])
        self.dataset_name = manifest["dataset"]
        classes = manifest.get("num_classes")  # None in shard sets written before it was kept
        self.num_classes = int(classes) if isinstance(classes, int) else None
        reader = READERS.get(self.dataset_name)
        self.inverse_depth = reader is not None and reader.inverse_depth
        chosen = self.available_tasks if tasks is None else tasks
        super().__init__(tasks=chosen, augment=augment, seed=seed, source=self.store.name(split))
        self.columns = {k: manifest["columns"][k] for k in ("image", *self.tasks)}
        entry = manifest["splits"][split]
        self._files = files
        self._starts = [0]
        for shard in entry["shards"]:
            self._starts.append(self._starts[-1] + int(shard["num_rows"]))
        if self._starts[-1] != entry["num_samples"]:
            raise DatasetError(
                f"{self.store.name(MANIFEST)}: row counts of {split!r} do not add up"
            )
        self._group_starts = []
        for f in files:
            starts = [0]
            for g in range(f.metadata.num_row_groups):
                starts.append(starts[-1] + f.metadata.row_group(g).num_rows)
            self._group_starts.append(starts)
        self._handles: dict[int, pq.ParquetFile] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files do not travel to DataLoader workers
        return state

    def __len__(self) -> int:
        return self._starts[-1]

    def _handle(self, shard: int) -> pq.ParquetFile:
        if shard not in self._handles:
            f = self._files[shard]
            self._handles[shard] = pq.ParquetFile(
                self.store.fs.open_input_file(f.path),
                metadata=f.metadata,  # checked at construction: not fetched again
                pre_buffer=self.store.uri,  # one coalesced ranged read per row group
                page_checksum_verification=True,
            )
        return self._handles[shard]

    def _load(self, index: int) -> Sample:
        shard = bisect.bisect_right(self._starts, index) - 1
        starts = self._group_starts[shard]
        row_in_shard = index - self._starts[shard]
        group = bisect.bisect_right(starts, row_in_shard) - 1
        names = ["index"] + [n for k in self.columns for n in (k, k + SHAPE_SUFFIX)]
        try:
            table = self._handle(shard).read_row_group(group, columns=names)
            i = row_in_shard - starts[group]
            # Tensor columns as Arrow buffers (no copy); decode_row makes the one copy.
            row = {
                n: table.column(n)[i].as_buffer()
                if n in self.columns
                else table.column(n)[i].as_py()
                for n in names
            }
            arrays = decode_row(row, self.columns)
        except (OSError, pa.ArrowException, ValueError) as err:
            # A failed page checksum or undecodable data means damage; another I/O error
            # (network, permissions) is reported as it is.
            text = first_line(err)
            damaged = not isinstance(err, OSError) or "checksum" in text.lower()
            raise DatasetError(
                f"{self._files[shard].name}: sample {index} unreadable ({text})"
                + ("; the shard is damaged" if damaged else "")
            ) from None
        arrays.pop("index")
        return {k: torch.from_numpy(v) for k, v in arrays.items()}

    def source_files(self) -> list[Path]:
        return [Path(f.name) for f in self._files]

    def describe(self) -> dict[str, Any]:
        root = self.store.name() if self.store.uri else str(Path(self.root).resolve())
        return {
            "reader": "ShardDataset",
            "root": root,
            "split": self.split,
            "tasks": list(self.tasks),
            "dataset": self.dataset_name,
        }

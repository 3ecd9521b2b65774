"""Datasets and loaders for the worker loop: the readers, sharded across data-parallel ranks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mtsam.data import DatasetError, ShardDataset, ensure_scenes, open_dataset
from mtsam.data.shards import MANIFEST


def scenes_root(
    cache_dir: str | Path, *, num_train: int, num_val: int, height: int, width: int, seed: int
) -> Path:
    """The generated-scenes folder for these parameters, generated on first use (atomic)."""
    return ensure_scenes(
        cache_dir, num_train=num_train, num_val=num_val, height=height, width=width, seed=seed
    )


def open_split(
    dataset: str,
    root: str | Path,
    split: str,
    *,
    fmt: str,
    tasks: Sequence[str],
    num_classes: int | None,
    augment: bool,
    seed: int,
    verify: bool = False,
) -> Dataset:
    """One split from the raw layout (``fmt="files"``) or from Parquet shards (``"shards"``, a
    folder or an ``s3://`` / ``gs://`` URI, which must hold ``dataset``).

    Shards are checked from their manifest and Parquet footers (sizes, row counts, schema) and
    page checksums as pages are read; ``verify`` adds the sha256 of every byte (reads the whole
    split, so workers leave it off)."""
    if fmt == "shards":
        ds = ShardDataset(
            root, split, tasks=tuple(tasks), augment=augment, seed=seed, verify=verify
        )
        manifest = ds.store.name(MANIFEST)
        if ds.dataset_name != dataset:
            raise DatasetError(
                f"{manifest}: shards of {ds.dataset_name!r}, but data.dataset = {dataset!r}"
            )
        if (
            "semantic" in ds.tasks
            and None not in (num_classes, ds.num_classes)
            and num_classes != ds.num_classes
        ):
            raise DatasetError(
                f"{manifest}: shards with {ds.num_classes} semantic classes, but the config "
                f"has {num_classes} (data.num_classes)"
            )
        return ds
    return open_dataset(
        dataset,
        root,
        split,
        tasks=tuple(tasks),
        num_classes=None if dataset == "scenes" else num_classes,
        augment=augment,
        seed=seed,
    )


class ShardSampler(Sampler[int]):
    """Rank r of W takes indices r, r+W, ... in order, without padding (exact evaluation)."""

    def __init__(self, size: int, *, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, size, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_loader(
    ds: Dataset, *, batch_size: int, rank: int, world_size: int, seed: int, workers: int
) -> tuple[DataLoader, DistributedSampler]:
    """Shuffled, rank-sharded batches; call ``sampler.set_epoch(e)`` before each epoch.

    Every rank draws from the same seeded permutation and takes every W-th index, so W ranks
    with batch b see exactly the samples one rank with batch W*b sees, step for step.
    """
    sampler = DistributedSampler(
        ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
    return loader, sampler


def eval_loader(
    ds: Dataset, *, batch_size: int, rank: int, world_size: int, workers: int
) -> DataLoader:
    sampler = ShardSampler(len(ds), rank=rank, world_size=world_size)  # type: ignore[arg-type]
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers)

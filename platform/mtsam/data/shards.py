"""Parquet shards of converted dataset splits: writing, the manifest, and verified reading.

Layout of a shard folder ``out``::

    manifest.json                  written last; a folder without it is refused
    {split}/part-00000.parquet     one row per sample, in sample order

Row format: column ``index`` (int64) plus, for every other key ``K`` of the sample dict
(``"image"`` and the task names), a column ``K`` of ``large_binary`` holding the tensor's raw
little-endian C-order bytes and a column ``K__shape`` (``list<int32>``) with its shape. The
dtype of every tensor column is in the manifest and in each file's schema metadata (key
``mtsam``: JSON with format, version, dataset, split, tasks, columns and, where all rows of the
file agree, per-column shapes). Raw bytes + shape were chosen over Arrow's fixed-shape tensor
extension type because they survive Parquet without registering extension types, allow a
different size per sample (PASCAL-Context at native resolution) and reach Ray Data as plain
``bytes`` / list columns; :func:`decode_row` turns such a row back into arrays.

Safety: every shard is written to ``*.tmp`` and moved into place with ``os.replace``; the old
manifest is deleted before the first shard changes and the new one is written last, so an
interrupted run leaves no manifest and readers refuse the folder.

Integrity on reading (:func:`inspect_split`): before the first batch a reader checks every
shard's size against the manifest and its Parquet footer (row count, columns, the dataset and
split it was written for) -- a listing and a small ranged read per file, so a worker's start-up
does not grow with the dataset; every data page read is then checked against the CRC32 stored
with it. The sha256 of every byte (the manifest keeps one per shard) is checked where that is
cheap or asked for: ``prepare_data`` re-runs and ``verify=True``.

A shard set may live on an object store (``s3://...``, ``gs://...``): see
:mod:`mtsam.data.storage`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from mtsam.data.errors import DatasetError
from mtsam.data.storage import ShardStore
from mtsam.storage import first_line

FORMAT = "mtsam-shards"
VERSION = 1
MANIFEST = "manifest.json"
SHAPE_SUFFIX = "__shape"
_META_KEY = b"mtsam"


@dataclass(frozen=True)
class SplitSource:
    """One split to convert: a fingerprint of its input and a way to open it (only if needed).

    ``open()`` returns a dataset whose items are per-sample dicts (see :mod:`mtsam.data.base`),
    without augmentation. A split whose fingerprint, shard size and files match the existing
    manifest is not opened at all.
    """

    fingerprint: str
    open: Callable[[], Any]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_fingerprint(params: Mapping[str, Any], files: Iterable[Path]) -> str:
    """Hash of reader parameters and the (path, size, mtime) of every source file."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for path in files:
        st = os.stat(path)
        digest.update(f"\n{path}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def dataset_fingerprint(dataset: Any) -> str:
    """Fingerprint of a reader (anything with ``describe()`` and ``source_files()``)."""
    return source_fingerprint(dataset.describe(), dataset.source_files())


def _tensor_keys(sample: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k in sample if k != "index"]


def _encode(sample: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, str]]:
    """Sample dict -> (column values of one row, dtype per tensor column)."""
    row: dict[str, Any] = {"index": int(sample["index"])}
    dtypes: dict[str, str] = {}
    for key in _tensor_keys(sample):
        arr = np.ascontiguousarray(sample[key].numpy())
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        row[key] = arr.tobytes()
        row[key + SHAPE_SUFFIX] = list(arr.shape)
        dtypes[key] = arr.dtype.name
    return row, dtypes


def decode_row(
    row: Mapping[str, Any], columns: Mapping[str, Mapping[str, str]]
) -> dict[str, np.ndarray]:
    """One stored row (from pyarrow or a Ray Data row) -> {key: array}, ``"index"`` included.

    ``columns`` is the manifest's ``columns`` entry ({key: {"dtype": name}}). Only the tensor
    columns present in ``row`` are decoded; their values may be ``bytes`` or any buffer
    (e.g. ``pyarrow.Buffer``): each array is copied once, into native byte order.
    """
    out: dict[str, np.ndarray] = {}
    for key, spec in columns.items():
        if key not in row:
            continue
        dtype = np.dtype(spec["dtype"]).newbyteorder("<")
        shape = [int(s) for s in row[key + SHAPE_SUFFIX]]
        out[key] = (
            np.frombuffer(row[key], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
        )
    if "index" in row:
        out["index"] = np.asarray(row["index"], dtype=np.int64)
    return out


def _write_shard(
    path: Path, rows: list[dict[str, Any]], keys: list[str], meta: dict[str, Any]
) -> dict[str, Any]:
    shapes = {k: rows[0][k + SHAPE_SUFFIX] for k in keys}
    shapes = {
        k: (s if all(r[k + SHAPE_SUFFIX] == s for r in rows) else None) for k, s in shapes.items()
    }
    fields = [pa.field("index", pa.int64())]
    for key in keys:
        fields += [
            pa.field(key, pa.large_binary()),
            pa.field(key + SHAPE_SUFFIX, pa.list_(pa.int32())),
        ]
    schema = pa.schema(
        fields, metadata={_META_KEY: json.dumps({**meta, "shapes": shapes}).encode()}
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    tmp = path.with_name(path.name + ".tmp")
    # One row per row group: a local reader fetches exactly one sample per random access.
    # Page checksums (CRC32) let readers check each page they read as they read it, instead
    # of hashing whole shards before the first batch.
    pq.write_table(table, tmp, row_group_size=1, compression="zstd", write_page_checksum=True)
    entry = {"num_rows": len(rows), "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)}
    os.replace(tmp, path)
    return entry


def _write_split(
    out: Path,
    split: str,
    dataset: Any,
    *,
    name: str,
    samples_per_shard: int,
    progress: Callable[[str], None] | None,
) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """Write one split's shards -> (manifest split entry, tasks, column dtypes)."""
    split_dir = out / split
    split_dir.mkdir(parents=True, exist_ok=True)
    for stale in split_dir.glob("*.tmp"):
        stale.unlink()
    count = len(dataset)
    if count == 0:
        raise DatasetError(f"{split_dir}: split {split!r} has no samples")
    keys: list[str] = []
    dtypes: dict[str, str] = {}
    shards: list[dict[str, Any]] = []
    split_shapes: dict[str, Any] = {}
    for shard_no, start in enumerate(range(0, count, samples_per_shard)):
        rows = []
        for i in range(start, min(start + samples_per_shard, count)):
            row, row_dtypes = _encode(dataset[i])
            if not keys:
                keys, dtypes = list(row_dtypes), row_dtypes
                split_shapes = {k: row[k + SHAPE_SUFFIX] for k in keys}
            elif row_dtypes != dtypes:
                raise DatasetError(
                    f"{split_dir}: sample {i} has columns {row_dtypes}, sample 0 had {dtypes}"
                )
            for k in keys:
                if split_shapes[k] != row[k + SHAPE_SUFFIX]:
                    split_shapes[k] = None
            rows.append(row)
        tasks = [k for k in keys if k != "image"]
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "dataset": name,
            "split": split,
            "tasks": tasks,
            "columns": {k: {"dtype": dtypes[k]} for k in keys},
        }
        rel = f"{split}/part-{shard_no:05d}.parquet"
        shards.append({"file": rel, **_write_shard(out / rel, rows, keys, meta)})
        if progress is not None:
            progress(f"{split}: {start + len(rows)}/{count} samples, wrote {rel}")
    entry = {"num_samples": count, "shapes": split_shapes, "shards": shards}
    return entry, [k for k in keys if k != "image"], dtypes


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return load_manifest(out, verify=True)
    except DatasetError:
        return None


def _check_shard_folder(out: Path) -> None:
    """``out`` must be absent, empty, or hold only what :func:`write_shards` writes (a manifest
    and split folders of parquet parts, with the temporary files of an interrupted run): shards
    written among other files (a raw dataset, say) would mix the two and later clean-ups of
    stale parts would run in someone else's folder."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a folder")
    for entry in out.iterdir():
        if entry.is_file() and entry.name in (MANIFEST, MANIFEST + ".tmp"):
            continue
        if entry.is_dir() and all(
            f.is_file() and f.suffix in (".parquet", ".tmp") for f in entry.iterdir()
        ):
            continue
        raise DatasetError(
            f"{out}: holds {entry.name!r}, which is not part of a shard set; write the shards "
            "to an empty or new folder"
        )


def write_shards(
    out: str | Path,
    sources: Mapping[str, SplitSource],
    *,
    dataset: str,
    samples_per_shard: int = 64,
    validate: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Convert the given splits into ``out`` and return the manifest written (or kept).

    A split is rewritten unless the existing manifest has the same dataset name, shard size
    and fingerprint for it and its files verify; if nothing needs writing and the manifest
    lists exactly these splits, nothing is touched. With ``validate`` every sample of the
    splits to write is checked (``validate_all``) before any file changes, so bad input leaves
    an existing shard set intact. The new manifest lists exactly the given splits.
    """
    out = Path(out)
    if samples_per_shard < 1:
        raise DatasetError(f"{out}: samples_per_shard must be >= 1, got {samples_per_shard}")
    if not sources:
        raise DatasetError(f"{out}: no splits to convert")
    _check_shard_folder(out)
    old = _read_manifest(out) if (out / MANIFEST).exists() else None
    keep: dict[str, dict[str, Any]] = {}
    if (
        old is not None
        and old["dataset"] == dataset
        and old["samples_per_shard"] == samples_per_shard
        and old.get("page_checksums") is True  # older sets are rewritten to gain them
    ):
        for split, source in sources.items():
            entry = old["splits"].get(split)
            if entry is not None and entry["fingerprint"] == source.fingerprint:
                keep[split] = entry
    if old is not None and set(keep) == set(sources) == set(old["splits"]):
        return old
    opened = {split: src.open() for split, src in sources.items() if split not in keep}
    for split, ds in opened.items():
        if getattr(ds, "augment", False):
            raise DatasetError(f"{out}: split {split!r} is augmented; shards store raw samples")
        if validate and hasattr(ds, "validate_all"):
            ds.validate_all()
    # Kept splits carry the old manifest's count (None: written before it was recorded).
    classes: int | None = old.get("num_classes") if keep and old else None
    for split, ds in opened.items():
        n = getattr(ds, "num_classes", None)  # the readers' semantic class count
        if classes is not None and n is not None and n != classes:
            raise DatasetError(f"{out / split}: {n} semantic classes, other splits have {classes}")
        if not keep and n is not None:
            classes = int(n)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    tasks: list[str] | None = list(old["tasks"]) if keep and old else None
    columns: dict[str, Any] | None = dict(old["columns"]) if keep and old else None
    splits: dict[str, dict[str, Any]] = dict(keep)
    for split, ds in opened.items():
        entry, split_tasks, dtypes = _write_split(
            out, split, ds, name=dataset, samples_per_shard=samples_per_shard, progress=progress
        )
        split_columns = {k: {"dtype": v} for k, v in dtypes.items()}
        if tasks is None:
            tasks, columns = split_tasks, split_columns
        elif (tasks, columns) != (split_tasks, split_columns):
            raise DatasetError(f"{out / split}: columns {split_columns} differ from {columns}")
        splits[split] = {**entry, "fingerprint": sources[split].fingerprint}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "complete": True,
        "dataset": dataset,
        "tasks": tasks,
        "columns": columns,
        "num_classes": classes,
        "samples_per_shard": samples_per_shard,
        "page_checksums": True,
        "splits": {s: splits[s] for s in sources},
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    for split in opened:
        listed = {Path(s["file"]).name for s in splits[split]["shards"]}
        for stale in (out / split).glob("part-*.parquet"):
            if stale.name not in listed:
                stale.unlink()
    return manifest


@dataclass(frozen=True)
class ShardFile:
    """One checked shard: where it is, its listing entry and its Parquet footer."""

    rel: str  # path inside the shard set, e.g. "train/part-00000.parquet"
    name: str  # path or URI for messages
    path: str  # path on the store's filesystem
    size: int
    metadata: pq.FileMetaData


def _expected_fields(columns: Mapping[str, Any]) -> dict[str, pa.DataType]:
    fields = {"index": pa.int64()}
    for key in columns:
        fields[key] = pa.large_binary()
        fields[key + SHAPE_SUFFIX] = pa.list_(pa.int32())
    return fields


def _read_footer(
    store: ShardStore, shard: Mapping[str, Any], info: pafs.FileInfo, manifest: Mapping[str, Any]
) -> pq.FileMetaData:
    """The shard's Parquet footer, checked against the manifest: row count, columns and their
    types, and the dataset / split the file says it belongs to."""
    name = store.name(shard["file"])
    try:
        with store.fs.open_input_file(info.path) as fh:
            md = pq.read_metadata(fh)
        schema = md.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as err:
        raise DatasetError(f"{name}: not a readable Parquet file ({first_line(err)})") from None
    if md.num_rows != shard["num_rows"]:
        raise DatasetError(f"{name}: {md.num_rows} rows, {MANIFEST} says {shard['num_rows']}")
    for col, want in _expected_fields(manifest["columns"]).items():
        got = schema.field(col).type if col in schema.names else None
        if got != want:
            raise DatasetError(
                f"{name}: column {col!r} is {got or 'missing'}, {MANIFEST} expects {want}"
            )
    try:
        meta = json.loads((schema.metadata or {})[_META_KEY])
    except (KeyError, ValueError):
        raise DatasetError(f"{name}: no {FORMAT} metadata; not a shard of this set") from None
    split = shard["file"].split("/")[0]
    if meta.get("dataset") != manifest["dataset"] or meta.get("split") != split:
        raise DatasetError(
            f"{name}: a shard of {meta.get('dataset')!r}/{meta.get('split')!r}, "
            f"{MANIFEST} lists it under {manifest['dataset']!r}/{split!r}"
        )
    return md


def _sha256(store: ShardStore, info: pafs.FileInfo) -> str:
    digest = hashlib.sha256()
    with store.fs.open_input_stream(info.path) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest_file(store: ShardStore) -> dict[str, Any]:
    name = store.name(MANIFEST)
    try:
        text = store.read_bytes(MANIFEST)
    except FileNotFoundError:
        bucket = store.missing_bucket()
        if bucket is not None:
            raise DatasetError(f"{bucket}: no such bucket (shard set {store.name()})") from None
        raise DatasetError(
            f"{name}: not found; {store.name()} holds no complete shard set "
            "(an interrupted or failed prepare_data run leaves none)"
        ) from None
    except OSError as err:
        raise DatasetError(f"{name}: unreadable manifest ({first_line(err)})") from None
    try:
        manifest = json.loads(text)
    except ValueError as err:
        raise DatasetError(f"{name}: unreadable manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{name}: not an {FORMAT} manifest")
    if manifest.get("version") != VERSION or manifest.get("complete") is not True:
        raise DatasetError(f"{name}: expected a complete version-{VERSION} manifest")
    return manifest


def inspect_split(
    root: str | Path | ShardStore, split: str, *, verify: bool = False
) -> tuple[dict[str, Any], list[ShardFile]]:
    """Read the manifest and check ``split``'s shards without reading their data.

    Checked for every shard: that it exists and has the manifest's size (one listing of the
    split's folder), and its Parquet footer (a ranged read at the end of the file): the
    manifest's row count, columns and types, and the dataset and split it was written for.
    A truncated, replaced or foreign shard fails here, in one line naming it. Flipped bytes
    inside the data are caught when they are read, by the page checksums the writer stores
    (:class:`mtsam.data.shard_dataset.ShardDataset` verifies them). ``verify`` adds the full
    check: the sha256 of every byte of every shard, as ``prepare_data`` does (slow: it reads
    the whole split).
    """
    store = root if isinstance(root, ShardStore) else ShardStore(root)
    manifest = _read_manifest_file(store)
    return manifest, _check_split(store, manifest, split, verify=verify)


def _check_split(
    store: ShardStore, manifest: Mapping[str, Any], split: str, *, verify: bool
) -> list[ShardFile]:
    if split not in manifest["splits"]:
        raise DatasetError(
            f"{store.name(MANIFEST)}: no split {split!r}; has {sorted(manifest['splits'])}"
        )
    shards = manifest["splits"][split]["shards"]
    folders = sorted({s["file"].rpartition("/")[0] for s in shards})
    try:
        listed = store.list_files(folders)
    except OSError as err:
        raise DatasetError(f"{store.name(folders[0])}: cannot list ({first_line(err)})") from None
    infos = []
    for shard in shards:
        info = listed.get(shard["file"])
        name = store.name(shard["file"])
        if info is None:
            raise DatasetError(f"{name}: shard listed in {MANIFEST} is missing")
        if info.size != shard["bytes"]:
            raise DatasetError(
                f"{name}: {info.size} bytes, {MANIFEST} says {shard['bytes']}; the shard is "
                "truncated or was replaced"
            )
        infos.append(info)
    # Footers are tiny ranged reads; on an object store their latency dominates, so overlap them.
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(shards)))) as pool:
        footers = list(pool.map(lambda s, i: _read_footer(store, s, i, manifest), shards, infos))
    if verify:
        for shard, info in zip(shards, infos, strict=True):
            if _sha256(store, info) != shard["sha256"]:
                raise DatasetError(
                    f"{store.name(shard['file'])}: sha256 differs from {MANIFEST}; the shard "
                    "is damaged"
                )
    return [
        ShardFile(rel=s["file"], name=store.name(s["file"]), path=i.path, size=i.size, metadata=m)
        for s, i, m in zip(shards, infos, footers, strict=True)
    ]


def load_manifest(
    root: str | Path, *, splits: Iterable[str] | None = None, verify: bool = False
) -> dict[str, Any]:
    """Read ``root/manifest.json`` (a folder or URI) and check the shards of ``splits`` (all by
    default) as :func:`inspect_split` does; ``verify`` adds the sha256 of every byte."""
    store = ShardStore(root)
    manifest = _read_manifest_file(store)
    for split in manifest["splits"] if splits is None else splits:
        _check_split(store, manifest, split, verify=verify)
    return manifest


def shard_files(root: str | Path, split: str, *, verify: bool = False) -> list[str]:
    """The paths or URIs of ``split``'s shard files in sample order, after checking them."""
    _, files = inspect_split(root, split, verify=verify)
    return [f.name for f in files]


def read_ray_dataset(
    root: str | Path, split: str, *, verify: bool = False, columns: list[str] | None = None
):
    """``ray.data.read_parquet`` over a split's checked shard files, local or remote (rows as
    :func:`decode_row` expects them: tensor columns as bytes plus ``K__shape``)."""
    store = ShardStore(root)
    _, files = inspect_split(store, split, verify=verify)
    import ray.data  # lazy: the library does not need Ray otherwise

    paths = [f.path for f in files]
    return ray.data.read_parquet(paths, filesystem=store.fs, columns=columns)

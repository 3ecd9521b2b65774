"""Parquet shards read in place from S3, against a real S3 API (moto's server on 127.0.0.1).

The shard set is written by the project's own writer, uploaded with boto3, and read through
``data.root = s3://...`` with the endpoint and credentials taken from the standard environment
variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), as a cluster user would.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from mtsam.config import load_config
from mtsam.data import DatasetError, generate_scenes, load_manifest, write_shards
from mtsam.data.shards import SplitSource, dataset_fingerprint
from mtsam.train import runner
from mtsam.train.context import local_context
from mtsam.train.data import eval_loader, open_split, train_loader
from mtsam.train.loop import data_root, fit
from s3server import moto_s3, s3_client
from test_shards import flip_last_data_byte

REPO = Path(__file__).resolve().parents[1]
BUCKET = "mtsam-shards"
NUM_TRAIN, NUM_VAL = 8, 4


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free loopback port with the bucket, the standard AWS variables
    pointing at it; yields a boto3 client (under CI a missing moto fails instead of skipping)."""
    with moto_s3(BUCKET):
        yield s3_client()


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory) -> Path:
    """Generated scenes converted by the project's writer (2 train shards, 1 val shard)."""
    tmp = tmp_path_factory.mktemp("shards")
    generate_scenes(
        tmp / "scenes", num_train=NUM_TRAIN, num_val=NUM_VAL, height=32, width=48, seed=3
    )
    from mtsam.data import NYUv2

    sources = {}
    for split in ("train", "val"):
        ds = NYUv2(tmp / "scenes", split, num_classes=6)
        sources[split] = SplitSource(fingerprint=dataset_fingerprint(ds), open=lambda ds=ds: ds)
    write_shards(tmp / "out", sources, dataset="scenes", samples_per_shard=4)
    return tmp / "out"


def upload(client, local: Path, prefix: str, change=None) -> str:
    """Upload the shard set under ``prefix``; ``change(rel, data) -> data | None`` may alter
    (or, returning None, leave out) a file. Returns the set's URI."""
    for path in sorted(local.rglob("*")):
        if path.is_file():
            rel = path.relative_to(local).as_posix()
            data = path.read_bytes()
            if change is not None:
                data = change(rel, data)
            if data is not None:
                client.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=data)
    return f"s3://{BUCKET}/{prefix}"


def small_config(root: str | Path, out: Path, *extra: str):
    return load_config(
        REPO / "configs" / "default.yaml",
        [
            "tracking.enabled=false",
            f"output_dir={out}",
            "data.format=shards",
            f"data.root={root}",
            "train.batch_size=2",
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
            "train.log_every=1000",
            "train.vis_samples=0",
            *extra,
        ],
    )


def test_two_ranks_stream_their_own_parts_from_s3_as_from_local_disk(s3, local_shards, tmp_path):
    """What each of two data-parallel ranks reads from s3:// (its loader's batches, with
    augmentation, and its evaluation part) equals what it reads from the local copy; the two
    ranks' parts are disjoint. Then the worker loop trains from s3:// and reports exactly the
    metrics it reports from local disk."""
    uri = upload(s3, local_shards, "good")
    cfg = small_config(uri, tmp_path / "o")
    assert data_root(cfg) == uri  # not mangled into a local path
    assert runner.prepare_data(cfg) == uri  # the launch-time check reads it too
    common = {"fmt": "shards", "tasks": cfg.data.tasks, "num_classes": 6, "seed": 0}
    seen: dict[str, list[set[int]]] = {"train": [], "val": []}
    for rank in (0, 1):
        per_root = []
        for root in (uri, local_shards):
            train = open_split("scenes", root, "train", augment=True, **common)
            val = open_split("scenes", root, "val", augment=False, **common)
            train.set_epoch(1)
            loader, sampler = train_loader(
                train, batch_size=2, rank=rank, world_size=2, seed=0, workers=0
            )
            sampler.set_epoch(1)
            evals = eval_loader(val, batch_size=2, rank=rank, world_size=2, workers=0)
            per_root.append((list(loader), list(evals)))
        (s3_train, s3_val), (disk_train, disk_val) = per_root
        for got, want in zip(s3_train + s3_val, disk_train + disk_val, strict=True):
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in want)
        seen["train"].append({int(i) for b in s3_train for i in b["index"]})
        seen["val"].append({int(i) for b in s3_val for i in b["index"]})
    assert not seen["train"][0] & seen["train"][1]
    assert len(seen["train"][0]) == len(seen["train"][1]) == NUM_TRAIN // 2
    assert seen["val"][0] | seen["val"][1] == set(range(NUM_VAL))
    assert not seen["val"][0] & seen["val"][1]
    # A spawned DataLoader worker gets a pickled copy: it reconnects from its environment.
    remote = open_split("scenes", uri, "val", augment=False, **common)
    remote[0]  # with an open connection and file handle
    copy = pickle.loads(pickle.dumps(remote))
    assert torch.equal(copy[3]["depth"], remote[3]["depth"])

    torch.set_num_threads(1)
    timing = ("train/step_time_s", "train/images_per_s")
    from_s3 = fit(cfg, local_context(), log=lambda s: None)
    from_disk = fit(small_config(local_shards, tmp_path / "p"), local_context(), log=lambda s: None)
    for key in timing:
        from_s3.pop(key), from_disk.pop(key)
    assert from_s3 == from_disk and "val/semantic/miou" in from_s3


def _one_line_error(root: str, split: str = "train", read: int | None = None) -> str:
    with pytest.raises(DatasetError) as err:
        ds = open_split(
            "scenes", root, split, fmt="shards", tasks=["semantic"], num_classes=6,
            augment=False, seed=0,
        )  # fmt: skip
        if read is not None:
            ds[read]
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_damaged_or_missing_s3_shards_are_one_line_naming_the_uri(s3, local_shards):
    first = "train/part-00000.parquet"
    size = (local_shards / first).stat().st_size

    uri = upload(s3, local_shards, "truncated", lambda rel, d: d[:-100] if rel == first else d)
    assert _one_line_error(uri) == (
        f"{uri}/{first}: {size - 100} bytes, manifest.json says {size}; the shard is "
        "truncated or was replaced"
    )

    def more_rows(rel, data):
        if rel != "manifest.json":
            return data
        manifest = json.loads(data)
        manifest["splits"]["train"]["shards"][0]["num_rows"] += 1
        manifest["splits"]["train"]["num_samples"] += 1
        return json.dumps(manifest).encode()

    uri = upload(s3, local_shards, "rows", more_rows)
    assert _one_line_error(uri) == f"{uri}/{first}: 4 rows, manifest.json says 5"

    flipped = local_shards.parent / "flipped.parquet"
    flipped.write_bytes((local_shards / first).read_bytes())
    flip_last_data_byte(flipped, 2, "image")
    uri = upload(
        s3, local_shards, "flipped", lambda rel, d: flipped.read_bytes() if rel == first else d
    )
    msg = _one_line_error(uri, read=2)  # opens fine: only sample 2's data is damaged
    assert msg.startswith(f"{uri}/{first}: sample 2 unreadable (") and "CRC" in msg
    with pytest.raises(DatasetError) as err:  # the full check (prepare_data.py --verify)
        load_manifest(uri, verify=True)
    assert (
        str(err.value) == f"{uri}/{first}: sha256 differs from manifest.json; the shard is damaged"
    )

    second = "train/part-00001.parquet"
    uri = upload(s3, local_shards, "lost", lambda rel, d: None if rel == second else d)
    assert _one_line_error(uri) == f"{uri}/{second}: shard listed in manifest.json is missing"

    uri = f"s3://{BUCKET}/nothing-here"
    assert _one_line_error(uri) == (
        f"{uri}/manifest.json: not found; {uri} holds no complete shard set (an interrupted "
        "or failed prepare_data run leaves none)"
    )
    assert _one_line_error("s3://no-such-bucket/set") == (
        "s3://no-such-bucket: no such bucket (shard set s3://no-such-bucket/set)"
    )
    # refused at launch, before any worker starts
    with pytest.raises(DatasetError, match=r"^s3://no-such-bucket: no such bucket"):
        runner.prepare_data(small_config("s3://no-such-bucket/set", Path("unused")))


def test_raw_layout_from_a_uri_is_refused_in_the_config():
    with pytest.raises(ValueError, match=r"data\.root = 's3://b/nyuv2': only Parquet shards"):
        load_config(
            REPO / "configs" / "default.yaml", ["data.dataset=nyuv2", "data.root=s3://b/nyuv2"]
        )

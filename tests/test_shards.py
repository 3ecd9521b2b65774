"""Parquet shards: bitwise round trip, crash safety, no-op re-runs, the CLI, and Ray Data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from mtsam.data import (
    CityScapes,
    DatasetError,
    NYUv2,
    ShardDataset,
    SplitSource,
    generate_scenes,
    load_manifest,
    read_ray_dataset,
    write_shards,
)
from mtsam.data import shards as shards_mod
from mtsam.data.scenes import ensure_scenes
from mtsam.data.shards import dataset_fingerprint, decode_row

REPO = Path(__file__).resolve().parents[1]
H, W = 8, 12


def write_nyuv2(root: Path, n: int = 5, split: str = "train", h: int = H, w: int = W) -> None:
    H, W = h, w
    rng = np.random.default_rng(len(split) + n)
    for folder in ("image", "label", "depth", "normal"):
        (root / split / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        normal = rng.normal(size=(H, W, 3))
        normal /= np.linalg.norm(normal, axis=2, keepdims=True)
        normal[0, 0] = -0.0  # signed zeros must survive too
        np.save(root / split / f"image/{i}.npy", rng.uniform(0, 1, (H, W, 3)).astype(np.float32))
        np.save(root / split / f"label/{i}.npy", rng.integers(-1, 13, (H, W)).astype(np.float32))
        np.save(root / split / f"depth/{i}.npy", rng.uniform(0, 9, (H, W, 1)).astype(np.float32))
        np.save(root / split / f"normal/{i}.npy", normal.astype(np.float32))


def sources(root: Path, splits=("train",), **kwargs) -> dict[str, SplitSource]:
    out = {}
    for split in splits:
        ds = NYUv2(root, split, **kwargs)
        out[split] = SplitSource(fingerprint=dataset_fingerprint(ds), open=lambda ds=ds: ds)
    return out


def assert_same_samples(reader, shards) -> None:
    assert len(reader) == len(shards)
    for i in range(len(reader)):
        a, b = reader[i], shards[i]
        assert set(a) == set(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), (i, k)


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_round_trip_is_bitwise(tmp_path):
    write_nyuv2(tmp_path / "src", n=5)
    write_nyuv2(tmp_path / "src", n=2, split="val")
    manifest = write_shards(
        tmp_path / "out",
        sources(tmp_path / "src", ("train", "val")),
        dataset="nyuv2",
        samples_per_shard=2,
    )
    assert manifest["tasks"] == ["semantic", "depth", "normal"]
    assert [s["file"] for s in manifest["splits"]["train"]["shards"]] == [
        f"train/part-{k:05d}.parquet" for k in range(3)
    ]
    assert manifest["splits"]["val"]["num_samples"] == 2
    assert manifest["splits"]["train"]["shapes"]["depth"] == [1, H, W]
    for split in ("train", "val"):
        assert_same_samples(NYUv2(tmp_path / "src", split), ShardDataset(tmp_path / "out", split))
    meta = json.loads(pq.read_schema(tmp_path / "out/train/part-00000.parquet").metadata[b"mtsam"])
    assert meta["tasks"] == ["semantic", "depth", "normal"] and meta["split"] == "train"
    assert meta["shapes"]["image"] == [3, H, W] and meta["columns"]["semantic"]["dtype"] == "int64"


def test_task_subset_reading(tmp_path):
    write_nyuv2(tmp_path / "src", n=2)
    write_shards(tmp_path / "out", sources(tmp_path / "src"), dataset="nyuv2")
    s = ShardDataset(tmp_path / "out", "train", tasks=["normal"])[1]
    assert set(s) == {"image", "normal", "index"} and int(s["index"]) == 1
    with pytest.raises(DatasetError, match="unknown tasks"):
        ShardDataset(tmp_path / "out", "train", tasks=["saliency"])
    with pytest.raises(DatasetError, match="no split 'val'"):
        ShardDataset(tmp_path / "out", "val")


def test_scenes_round_trip_and_augmented_reading(tmp_path):
    info = generate_scenes(tmp_path / "scenes", num_train=3, num_val=1, height=16, width=24, seed=2)
    src = sources(tmp_path / "scenes", ("train", "val"), num_classes=info.num_classes)
    write_shards(tmp_path / "out", src, dataset="scenes", samples_per_shard=2)
    for split in ("train", "val"):
        reader = NYUv2(tmp_path / "scenes", split, num_classes=info.num_classes)
        assert_same_samples(reader, ShardDataset(tmp_path / "out", split))
    # Same seed, same epoch: augmented shard samples equal augmented reader samples.
    reader = NYUv2(tmp_path / "scenes", "train", num_classes=6, augment=True, seed=1)
    shard = ShardDataset(tmp_path / "out", "train", augment=True, seed=1)
    reader.set_epoch(3)
    shard.set_epoch(3)
    assert_same_samples(reader, shard)


def test_cityscapes_shards_augment_like_the_reader(tmp_path):
    """Shards remember the benchmark, so augmented CityScapes shards scale disparity as the
    CityScapes reader does (up with the zoom, not down like NYUv2's depth)."""
    write_nyuv2(tmp_path / "src", n=4)  # labels 0..12 and a depth folder: CityScapes-19 reads them
    src = CityScapes(tmp_path / "src", "train", num_classes=19, label_dir="label")
    write_shards(
        tmp_path / "out",
        {"train": SplitSource(fingerprint=dataset_fingerprint(src), open=lambda: src)},
        dataset="cityscapes",
    )
    reader = CityScapes(
        tmp_path / "src", "train", num_classes=19, label_dir="label", augment=True, seed=4
    )
    shard = ShardDataset(tmp_path / "out", "train", augment=True, seed=4)
    assert shard.inverse_depth
    for epoch in range(3):
        reader.set_epoch(epoch)
        shard.set_epoch(epoch)
        assert_same_samples(reader, shard)


def test_training_reads_scenes_shards_and_checks_their_benchmark(tmp_path):
    """data.format=shards reads the given folder for every benchmark (scenes included), and
    shards of another benchmark than data.dataset are refused, naming the manifest."""
    from mtsam.config import build_config
    from mtsam.train import runner

    info = generate_scenes(tmp_path / "scenes", num_train=3, num_val=1, height=16, width=24, seed=2)
    src = sources(tmp_path / "scenes", ("train", "val"), num_classes=info.num_classes)
    write_shards(tmp_path / "out", src, dataset="scenes")
    sets = [f"data.root={tmp_path / 'out'}", "data.format=shards", "train.batch_size=2"]
    cfg = build_config({}, [*sets, f"output_dir={tmp_path / 'o'}"])
    assert runner.prepare_data(cfg) == tmp_path / "out"
    wrong = build_config({}, [*sets, "data.dataset=nyuv2"])
    with pytest.raises(
        DatasetError, match=r"out/manifest\.json: shards of 'scenes', but data\.data"
    ):
        runner.prepare_data(wrong)
    # The manifest keeps the class count: a config with other classes fails here, naming the
    # manifest, not in the loss of every worker.
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_classes"] == 6
    classes = build_config({}, [*sets, "data.num_classes=5"])
    with pytest.raises(
        DatasetError,
        match=r"out/manifest\.json: shards with 6 semantic classes, but the "
        r"config has 5 \(data\.num_classes\)",
    ):
        runner.prepare_data(classes)
    no_semantic = build_config({}, [*sets, "data.num_classes=5", "data.tasks=[depth]"])
    assert runner.prepare_data(no_semantic) == tmp_path / "out"


def test_rerun_is_noop_and_changed_input_rewrites(tmp_path):
    write_nyuv2(tmp_path / "src", n=3)
    write_shards(tmp_path / "out", sources(tmp_path / "src"), dataset="nyuv2", samples_per_shard=2)
    before = mtimes(tmp_path / "out")
    opened = []
    lazy = {
        "train": SplitSource(
            fingerprint=dataset_fingerprint(NYUv2(tmp_path / "src", "train")),
            open=lambda: opened.append(1),
        )
    }
    write_shards(tmp_path / "out", lazy, dataset="nyuv2", samples_per_shard=2)
    assert opened == [] and mtimes(tmp_path / "out") == before
    # Changed source -> new fingerprint -> rewritten, readable, equal to the new source.
    depth = np.load(tmp_path / "src/train/depth/1.npy")
    np.save(tmp_path / "src/train/depth/1.npy", depth + 1)
    old_sha = load_manifest(tmp_path / "out")["splits"]["train"]["shards"][0]["sha256"]
    write_shards(tmp_path / "out", sources(tmp_path / "src"), dataset="nyuv2", samples_per_shard=2)
    assert load_manifest(tmp_path / "out")["splits"]["train"]["shards"][0]["sha256"] != old_sha
    assert_same_samples(NYUv2(tmp_path / "src", "train"), ShardDataset(tmp_path / "out", "train"))


def test_missing_manifest_and_leftover_tmp_are_refused(tmp_path):
    write_nyuv2(tmp_path / "src", n=3)
    write_shards(tmp_path / "out", sources(tmp_path / "src"), dataset="nyuv2", samples_per_shard=2)
    (tmp_path / "out/manifest.json").unlink()
    (tmp_path / "out/train/part-00002.parquet.tmp").write_bytes(b"half a shard")
    with pytest.raises(DatasetError) as err:
        ShardDataset(tmp_path / "out", "train")
    assert str(tmp_path / "out/manifest.json") in str(err.value) and "not found" in str(err.value)
    with pytest.raises(DatasetError, match=r"manifest\.json"):
        read_ray_dataset(tmp_path / "out", "train")


def flip_last_data_byte(shard: Path, row_group: int, column: str) -> None:
    """Flip the last byte of one column chunk: payload of its last data page, CRC-covered."""
    md = pq.read_metadata(shard)
    rg = md.row_group(row_group)
    chunk = next(
        rg.column(c) for c in range(rg.num_columns) if rg.column(c).path_in_schema == column
    )
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data = bytearray(shard.read_bytes())
    data[start + chunk.total_compressed_size - 1] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_damaged_shard_fails_the_read_that_meets_it(tmp_path):
    """A flipped byte inside a shard's data is not hashed for at start-up: the page checksum
    fails the read of that sample, in one line naming the file; ``verify=True`` (sha256 of
    every byte) refuses the shard up front."""
    write_nyuv2(tmp_path / "src", n=2)
    write_shards(tmp_path / "out", sources(tmp_path / "src"), dataset="nyuv2")
    shard = tmp_path / "out/train/part-00000.parquet"
    flip_last_data_byte(shard, 1, "image")
    ds = ShardDataset(tmp_path / "out", "train")
    assert ds[0]["image"].shape == (3, H, W)  # row group 0 is intact
    with pytest.raises(DatasetError) as err:
        ds[1]
    msg = str(err.value)
    assert msg.startswith(f"{shard}: sample 1 unreadable (") and "\n" not in msg
    assert msg.endswith("the shard is damaged")
    with pytest.raises(DatasetError) as err:
        ShardDataset(tmp_path / "out", "train", verify=True)
    assert str(err.value) == f"{shard}: sha256 differs from manifest.json; the shard is damaged"


def test_interrupted_rewrite_leaves_no_readable_folder_then_recovers(tmp_path, monkeypatch):
    write_nyuv2(tmp_path / "src", n=4)
    write_shards(tmp_path / "out", sources(tmp_path / "src"), dataset="nyuv2", samples_per_shard=2)
    np.save(tmp_path / "src/train/depth/0.npy", np.ones((H, W, 1), np.float32))  # new input
    real = shards_mod._write_shard
    calls = []

    def crash_on_second(path, rows, keys, meta):
        calls.append(path)
        if len(calls) == 2:
            (path.with_name(path.name + ".tmp")).write_bytes(b"partial")
            raise KeyboardInterrupt
        return real(path, rows, keys, meta)

    monkeypatch.setattr(shards_mod, "_write_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        write_shards(
            tmp_path / "out", sources(tmp_path / "src"), dataset="nyuv2", samples_per_shard=2
        )
    with pytest.raises(DatasetError, match="no complete shard set"):
        ShardDataset(tmp_path / "out", "train")
    monkeypatch.setattr(shards_mod, "_write_shard", real)
    write_shards(tmp_path / "out", sources(tmp_path / "src"), dataset="nyuv2", samples_per_shard=2)
    assert not list((tmp_path / "out").rglob("*.tmp"))
    assert_same_samples(NYUv2(tmp_path / "src", "train"), ShardDataset(tmp_path / "out", "train"))


def test_bad_input_keeps_existing_shards(tmp_path):
    write_nyuv2(tmp_path / "src", n=3)
    write_shards(tmp_path / "out", sources(tmp_path / "src"), dataset="nyuv2")
    before = mtimes(tmp_path / "out")
    depth = np.load(tmp_path / "src/train/depth/2.npy")
    depth[0, 0, 0] = np.nan
    np.save(tmp_path / "src/train/depth/2.npy", depth)
    with pytest.raises(DatasetError, match="NaN"):
        write_shards(tmp_path / "out", sources(tmp_path / "src"), dataset="nyuv2")
    assert mtimes(tmp_path / "out") == before
    assert len(ShardDataset(tmp_path / "out", "train")) == 3


def test_shards_are_not_written_among_other_files(tmp_path):
    """--out = the raw dataset's own folder, or a file: refused, nothing written there."""
    write_nyuv2(tmp_path / "src", n=2)
    before = mtimes(tmp_path / "src")
    with pytest.raises(DatasetError, match=r"src: holds 'train', which is not part of a shard"):
        write_shards(tmp_path / "src", sources(tmp_path / "src"), dataset="nyuv2")
    assert mtimes(tmp_path / "src") == before
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DatasetError, match=r"afile: exists and is not a folder"):
        write_shards(tmp_path / "afile", sources(tmp_path / "src"), dataset="nyuv2")
    # an earlier shard set (even an interrupted one, without manifest) is rewritten as before
    write_shards(tmp_path / "out", sources(tmp_path / "src"), dataset="nyuv2")
    (tmp_path / "out" / "manifest.json").unlink()
    write_shards(tmp_path / "out", sources(tmp_path / "src"), dataset="nyuv2")
    assert len(ShardDataset(tmp_path / "out", "train")) == 2


def _run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "jobs/prepare_data.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_prepare_data_cli(tmp_path):
    write_nyuv2(tmp_path / "src", n=3)
    write_nyuv2(tmp_path / "src", n=1, split="val")
    ok = _run_cli(
        "--dataset",
        "nyuv2",
        "--root",
        str(tmp_path / "src"),
        "--out",
        str(tmp_path / "out"),
        "--samples-per-shard",
        "2",
    )
    assert ok.returncode == 0, ok.stderr
    assert "train: 2/3 samples" in ok.stdout and "train: 3/3 samples" in ok.stdout
    assert load_manifest(tmp_path / "out")["splits"]["val"]["num_samples"] == 1
    np.save(tmp_path / "src/train/label/1.npy", np.full((H, W), 40.0, np.float32))
    bad = _run_cli(
        "--dataset", "nyuv2", "--root", str(tmp_path / "src"), "--out", str(tmp_path / "out")
    )
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(tmp_path / "src/train/label/1.npy") in lines[0]


def test_bootstrap_finds_platform_without_install():
    code = (
        "import sys; sys.path[:] = [p for p in sys.path if not p.rstrip('/').endswith('platform')];"
        "sys.modules.pop('mtsam', None); sys.path.insert(0, 'jobs'); import _bootstrap, mtsam;"
        "print(mtsam.__file__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == REPO / "platform/mtsam/__init__.py"


def test_ray_data_reads_the_shards(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    write_nyuv2(tmp_path / "src", n=3)
    manifest = write_shards(
        tmp_path / "out", sources(tmp_path / "src"), dataset="nyuv2", samples_per_shard=2
    )
    reader = NYUv2(tmp_path / "src", "train")
    ray.init(num_cpus=1, address="local", include_dashboard=False, log_to_driver=False)
    try:
        rows = read_ray_dataset(tmp_path / "out", "train").take_all()
    finally:
        ray.shutdown()
    assert len(rows) == 3
    for row in sorted(rows, key=lambda r: r["index"]):
        got = decode_row(row, manifest["columns"])
        want = reader[int(got["index"])]
        for k, v in want.items():
            assert got[k].dtype == v.numpy().dtype and got[k].tobytes() == v.numpy().tobytes(), k


def test_dataloader_workers_do_not_change_augmented_batches(tmp_path):
    write_nyuv2(tmp_path / "src", n=4)
    write_shards(tmp_path / "out", sources(tmp_path / "src"), dataset="nyuv2", samples_per_shard=3)
    ds = ShardDataset(tmp_path / "out", "train", augment=True, seed=4)
    ds.set_epoch(2)
    ds[0]  # opens a file handle that must not be pickled into the workers

    def batches(workers: int) -> list[dict]:
        loader = DataLoader(ds, batch_size=2, num_workers=workers, shuffle=False)
        return list(loader)

    for a, b in zip(batches(0), batches(2), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert a["image"].shape == (2, 3, H, W) and a["index"].tolist() in ([0, 1], [2, 3])


def test_prepare_data_cli_scenes(tmp_path):
    args = [
        "--dataset",
        "scenes",
        "--root",
        str(tmp_path / "scenes"),
        "--out",
        str(tmp_path / "out"),
        "--scenes-train",
        "3",
        "--scenes-val",
        "1",
        "--height",
        "16",
        "--width",
        "24",
        "--num-classes",
        "5",
        "--samples-per-shard",
        "2",
    ]
    ok = _run_cli(*args)
    assert ok.returncode == 0, ok.stderr
    for split in ("train", "val"):
        assert_same_samples(
            NYUv2(tmp_path / "scenes", split, num_classes=5), ShardDataset(tmp_path / "out", split)
        )
    bad = _run_cli(*args[:-4], "--num-classes", "12")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "num_classes" in bad.stderr
    for extra, expect in [
        (["--splits", "train", "test"], "error: --splits ['test']: generated scenes have the"),
        (["--tasks", "semantic", "saliency"], "error: --tasks ['saliency']: generated scenes"),
    ]:
        no_root = [*args[:2], *args[4:]]  # scenes in a temporary folder
        r = _run_cli(*no_root, *extra)
        assert r.returncode == 2 and r.stderr.strip().startswith(expect), r.stderr
        assert "generating scenes" not in r.stdout


def test_prepare_data_cli_scenes_root_that_holds_generated_scenes(tmp_path):
    """``--root outputs/cache`` (where runs keep scenes in ``scenes/scenes-<key>``) is refused
    in one line naming the generated folders below it, none picked silently; a generated folder
    made with the same options is reused, and the job says so."""
    small = {"num_val": 1, "height": 16, "width": 24}
    opts = ["--scenes-val", "1", "--height", "16", "--width", "24"]
    cache, out = tmp_path / "cache", tmp_path / "out"
    three = ensure_scenes(cache / "scenes", num_train=3, **small)
    cli = ["--dataset", "scenes", "--root", str(cache), "--out", str(out), *opts]

    def refused(*extra: str) -> str:
        r = _run_cli(*cli, *extra)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert "generating" not in r.stdout and not out.exists()
        return lines[0]

    where = f"error: --root {cache}: not a generated-scenes folder; it holds"
    assert refused("--scenes-train", "3") == (
        f"{where} {three}, made with these options; pass that as --root"
    )
    four = ensure_scenes(cache / "scenes", num_train=4, **small)
    assert refused("--scenes-train", "3") == (
        f"{where} {three}, made with these options (and 1 made with other options); "
        "pass that as --root"
    )
    err = refused("--scenes-train", "5")  # several, none made with these options: all named
    assert err.startswith(f"{where} 2 generated-scenes folders, none made with these options: ")
    assert f"{three} (--scenes-train 3 --scenes-val 1 --height 16 --width 24 --seed 0" in err
    assert f"{four} (--scenes-train 4 --scenes-val 1" in err
    assert err.endswith("; pass one of them as --root with its options")

    afile = tmp_path / "afile"
    afile.write_text("x")
    r = _run_cli(*cli[:3], str(afile), *cli[4:], "--scenes-train", "3")
    assert r.returncode == 2 and r.stderr == f"error: --root {afile}: exists and is not a folder\n"

    before = sorted(p.relative_to(three) for p in three.rglob("*"))
    ok = _run_cli(*cli[:3], str(three), *cli[4:], "--scenes-train", "3")
    assert ok.returncode == 0, ok.stderr
    assert f"reusing scenes in {three}" in ok.stdout and "generating" not in ok.stdout
    assert sorted(p.relative_to(three) for p in three.rglob("*")) == before
    assert_same_samples(NYUv2(three, "train", num_classes=6), ShardDataset(out, "train"))


def test_splits_with_different_class_counts_are_refused(tmp_path):
    write_nyuv2(tmp_path / "src", n=2)
    write_nyuv2(tmp_path / "src", n=2, split="val")
    src = sources(tmp_path / "src", ("train",)) | sources(
        tmp_path / "src", ("val",), num_classes=14
    )
    with pytest.raises(DatasetError, match=r"out/val: 14 semantic classes, other splits have 13"):
        write_shards(tmp_path / "out", src, dataset="nyuv2", validate=False)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_manifest_from_before_the_class_count_keeps_it_unknown(tmp_path):
    """Splits kept from a manifest written without ``num_classes`` have no known count: a
    partial rewrite records none rather than the rewritten split's."""
    write_nyuv2(tmp_path / "src", n=2)
    write_nyuv2(tmp_path / "src", n=2, split="val")
    write_shards(tmp_path / "out", sources(tmp_path / "src", ("train", "val")), dataset="nyuv2")
    path = tmp_path / "out" / "manifest.json"
    old = json.loads(path.read_text())
    assert old.pop("num_classes") == 13
    path.write_text(json.dumps(old))
    assert ShardDataset(tmp_path / "out", "train").num_classes is None
    write_nyuv2(tmp_path / "src", n=3, split="val")  # val changed: rewritten, train kept
    manifest = write_shards(
        tmp_path / "out", sources(tmp_path / "src", ("train", "val")), dataset="nyuv2"
    )
    assert manifest["splits"]["val"]["num_samples"] == 3 and manifest["num_classes"] is None


class CountingFS(pafs.FileSystemHandler):
    """A local filesystem that counts the bytes read through it (pyarrow's PyFileSystem)."""

    def __init__(self) -> None:
        self.local = pafs.LocalFileSystem()
        self.bytes_read = 0

    def _counted(self, f):
        handler = self

        class Reader:
            closed = False

            def read(self, n=-1):
                data = f.read() if n is None or n < 0 else f.read(n)
                handler.bytes_read += len(data)
                return data

            def seek(self, pos, whence=0):
                return f.seek(pos, whence)

            def tell(self):
                return f.tell()

            def close(self):
                f.close()
                self.closed = True

        return pa.PythonFile(Reader(), mode="r")

    def open_input_file(self, path):
        return self._counted(self.local.open_input_file(path))

    def open_input_stream(self, path):
        return self._counted(self.local.open_input_stream(path))

    def get_type_name(self):
        return "counting"

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def normalize_path(self, path):
        return path

    def equals(self, other):
        return self is other

    def _unused(self, *args):
        raise NotImplementedError

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _unused
    delete_file = move = copy_file = open_output_stream = open_append_stream = _unused


def test_workers_start_without_reading_or_hashing_the_shards(tmp_path, monkeypatch):
    """What the worker loop runs before its first batch (open both splits as loop.fit does,
    a rank's loader, one batch) checks the shards from their sizes and footers: it reads a
    small part of the shard bytes and hashes none. The old start-up (sha256 of every byte at
    every start) fails both checks; ``verify=True`` still offers it, and is counted here too."""
    from mtsam.data.storage import ShardStore
    from mtsam.train.data import open_split, train_loader

    for split, n in (("train", 12), ("val", 4)):
        write_nyuv2(tmp_path / "src", n=n, split=split, h=128, w=160)
    write_shards(
        tmp_path / "out",
        sources(tmp_path / "src", ("train", "val")),
        dataset="nyuv2",
        samples_per_shard=4,
    )
    total = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*.parquet"))
    counter = CountingFS()
    real_resolve = ShardStore._resolve

    def counted(self):
        _, base = real_resolve(self)
        return pafs.PyFileSystem(counter), base

    def no_hashing(*args, **kwargs):
        raise AssertionError("a worker hashed shard bytes at start-up")

    monkeypatch.setattr(ShardStore, "_resolve", counted)
    monkeypatch.setattr(shards_mod, "sha256_file", no_hashing)
    monkeypatch.setattr(shards_mod, "hashlib", SimpleNamespace(sha256=no_hashing))
    common = {"fmt": "shards", "tasks": ("semantic", "depth", "normal"), "num_classes": 13}
    train = open_split("nyuv2", tmp_path / "out", "train", augment=True, seed=0, **common)
    open_split("nyuv2", tmp_path / "out", "val", augment=False, seed=0, **common)
    opened = counter.bytes_read
    assert 0 < opened < 0.05 * total, (opened, total)  # the footers' ends of the files
    loader, _ = train_loader(train, batch_size=2, rank=1, world_size=2, seed=0, workers=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 128, 160)
    per_sample = total / 16
    assert counter.bytes_read - opened < 3 * per_sample  # the batch's two samples, not more
    monkeypatch.undo()
    monkeypatch.setattr(ShardStore, "_resolve", counted)
    counter.bytes_read = 0
    ShardDataset(tmp_path / "out", "train", verify=True)
    assert counter.bytes_read >= 12 / 16 * total  # the full check reads every train byte


def test_prepare_data_verify_checks_every_byte(tmp_path, capsys):
    """``prepare_data.py --verify`` is the explicit full check: the sha256 of every shard."""
    import importlib.util

    sys.path.insert(0, str(REPO / "jobs"))
    spec = importlib.util.spec_from_file_location(
        "mtsam_job_prepare", REPO / "jobs/prepare_data.py"
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    write_nyuv2(tmp_path / "src", n=3)
    write_shards(tmp_path / "out", sources(tmp_path / "src"), dataset="nyuv2", samples_per_shard=2)
    assert job.main(["--verify", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out == (
        f"verified {tmp_path / 'out'} (nyuv2; train: 3 samples in 2 shards): sizes, footers "
        "and sha256 match\n"
    )
    shard = tmp_path / "out/train/part-00001.parquet"
    flip_last_data_byte(shard, 0, "depth")
    assert job.main(["--verify", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {shard}: sha256 differs from manifest.json; the shard is damaged\n"


def test_a_set_written_without_page_checksums_is_rewritten_with_them(tmp_path):
    write_nyuv2(tmp_path / "src", n=2)
    write_shards(tmp_path / "out", sources(tmp_path / "src"), dataset="nyuv2")
    path = tmp_path / "out" / "manifest.json"
    old = json.loads(path.read_text())
    assert old.pop("page_checksums") is True
    path.write_text(json.dumps(old))
    before = mtimes(tmp_path / "out")
    assert len(ShardDataset(tmp_path / "out", "train")) == 2  # still readable as it is
    manifest = write_shards(tmp_path / "out", sources(tmp_path / "src"), dataset="nyuv2")
    assert manifest["page_checksums"] is True
    shard = "train/part-00000.parquet"
    assert mtimes(tmp_path / "out")[shard] != before[shard]
    flip_last_data_byte(tmp_path / "out" / shard, 0, "image")  # now caught by a checksum
    with pytest.raises(DatasetError, match="CRC checksum verification failed"):
        ShardDataset(tmp_path / "out", "train")[0]

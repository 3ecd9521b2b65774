"""Generated scenes: layout, determinism, caching, and geometric consistency of depth/normals."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

from mtsam.data import CLASS_NAMES, DatasetError, NYUv2, ensure_scenes, generate_scenes

SMALL = {"num_train": 4, "num_val": 2, "height": 24, "width": 32, "seed": 5}


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes") / "s"
    generate_scenes(root, num_train=8, num_val=2, height=48, width=64, seed=0)
    return root


def test_layout_is_read_by_nyuv2_reader(tmp_path):
    info = generate_scenes(tmp_path / "s", **SMALL)
    assert info.class_names == CLASS_NAMES and info.num_classes == len(CLASS_NAMES) == 6
    for split, n in (("train", 4), ("val", 2)):
        for folder in ("image", "label", "depth", "normal"):
            assert sorted(p.name for p in (tmp_path / "s" / split / folder).iterdir()) == [
                f"{i}.npy" for i in range(n)
            ]
        ds = NYUv2(tmp_path / "s", split, num_classes=info.num_classes)
        assert ds.validate_all() == n
        s = ds[0]
        assert s["image"].shape == (3, 24, 32) and s["normal"].shape == (3, 24, 32)
    assert not [p for p in tmp_path.iterdir() if p.name != "s"]  # no temp folder left


def test_fewer_classes(tmp_path):
    info = generate_scenes(tmp_path / "s", **{**SMALL, "num_classes": 4})
    assert info.class_names == ("floor", "wall", "ceiling", "box")
    labels = np.stack([np.load(tmp_path / f"s/train/label/{i}.npy") for i in range(4)])
    assert labels.max() <= 3
    with pytest.raises(DatasetError, match="num_classes"):
        generate_scenes(tmp_path / "t", **{**SMALL, "num_classes": 9})


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    generate_scenes(tmp_path / "a", **SMALL)
    generate_scenes(tmp_path / "b", **SMALL)
    generate_scenes(tmp_path / "c", **{**SMALL, "seed": 6})
    a, b, c = (_digests(tmp_path / n) for n in "abc")
    assert len(a) == 6 * 4 + 2  # 6 samples x 4 modalities + scenes.json + .complete
    assert a == b
    assert a["train/image/0.npy"] != c["train/image/0.npy"]


def test_rerun_is_noop_and_params_change_replaces(tmp_path):
    root = tmp_path / "s"
    generate_scenes(root, **SMALL)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    time.sleep(0.01)
    generate_scenes(root, **SMALL)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    info = generate_scenes(root, **{**SMALL, "num_train": 2})
    assert info.num_train == 2 and len(list((root / "train/image").iterdir())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_refuses_to_replace_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not a generated-scenes folder"):
        generate_scenes(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_ensure_scenes_caches_by_parameters(tmp_path):
    first = ensure_scenes(tmp_path, **SMALL)
    mtime = (first / ".complete").stat().st_mtime_ns
    again = ensure_scenes(tmp_path, **SMALL)
    assert again == first and (first / ".complete").stat().st_mtime_ns == mtime
    other = ensure_scenes(tmp_path, **{**SMALL, "seed": 9})
    assert other != first and first.exists()
    assert json.loads((first / "scenes.json").read_text())["params"]["seed"] == 5


def test_maps_are_well_formed_and_every_class_appears(scenes):
    labels = []
    for i in range(8):
        depth = np.load(scenes / f"train/depth/{i}.npy")
        normal = np.load(scenes / f"train/normal/{i}.npy")
        image = np.load(scenes / f"train/image/{i}.npy")
        assert depth.dtype == np.float32 and (depth > 0).all() and depth.max() < 20
        np.testing.assert_allclose(np.linalg.norm(normal, axis=2), 1.0, atol=1e-5)
        assert image.dtype == np.float32 and image.min() >= 0 and image.max() <= 1
        labels.append(np.load(scenes / f"train/label/{i}.npy"))
    assert set(np.unique(np.stack(labels)).astype(int)) == set(range(len(CLASS_NAMES)))


def _backprojected_normals(depth: np.ndarray, k: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Camera points from z-depth, and normals from central differences (interior pixels)."""
    h, w = depth.shape
    rows, cols = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    rays = np.stack(
        [(cols - k["cx"]) / k["fx"], (rows - k["cy"]) / k["fy"], np.ones_like(rows)], -1
    )
    points = depth.astype(np.float64)[..., None] * rays
    du = points[1:-1, 2:] - points[1:-1, :-2]
    dv = points[2:, 1:-1] - points[:-2, 1:-1]
    n = np.cross(du, dv)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    facing = np.sign(-(n * points[1:-1, 1:-1]).sum(-1, keepdims=True))  # towards the camera
    return points, n * facing


def test_normals_agree_with_depth_on_planar_regions(scenes):
    k = json.loads((scenes / "scenes.json").read_text())["intrinsics"]
    angles, facing = [], []
    for i in range(8):
        depth = np.load(scenes / f"train/depth/{i}.npy")[..., 0]
        normal = np.load(scenes / f"train/normal/{i}.npy").astype(np.float64)
        label = np.load(scenes / f"train/label/{i}.npy")
        points, fd = _backprojected_normals(depth, k)
        facing.append((normal * points).sum(-1).max())
        # Planar: all 3x3 neighbours share the label and the rendered normal.
        planar = np.ones(fd.shape[:2], dtype=bool)
        h, w = depth.shape
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                nb_n = normal[1 + dr : h - 1 + dr, 1 + dc : w - 1 + dc]
                nb_l = label[1 + dr : h - 1 + dr, 1 + dc : w - 1 + dc]
                planar &= (nb_l == label[1:-1, 1:-1]) & (
                    (nb_n * normal[1:-1, 1:-1]).sum(-1) > 1 - 1e-9
                )
        cos = np.clip((fd * normal[1:-1, 1:-1]).sum(-1)[planar], -1, 1)
        angles.append(np.degrees(np.arccos(cos)))
    angles = np.concatenate(angles)
    assert angles.size > 5000
    assert np.median(angles) < 0.5 and np.percentile(angles, 90) < 2.0
    assert max(facing) < 0  # every rendered normal faces the camera


def test_classes_look_different(scenes):
    """Class-specific albedo: mean colours per class are pairwise apart (hue carries class)."""
    pixels = {c: [] for c in range(len(CLASS_NAMES))}
    for i in range(8):
        image = np.load(scenes / f"train/image/{i}.npy")
        label = np.load(scenes / f"train/label/{i}.npy").astype(int)
        for c in pixels:
            pixels[c].append(image[label == c])
    chroma = {}
    for c, chunks in pixels.items():
        rgb = np.concatenate(chunks).mean(0)
        chroma[c] = rgb / rgb.sum()
    dists = [np.abs(chroma[a] - chroma[b]).sum() for a in chroma for b in chroma if a < b]
    assert min(dists) > 0.03


def test_generation_is_fast(tmp_path):
    start = time.perf_counter()
    generate_scenes(tmp_path / "s", num_train=40, num_val=0, height=96, width=128)
    assert time.perf_counter() - start < 10.0  # ~0.5 s alone; loose for shared machines

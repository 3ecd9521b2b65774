"""Readers (NYUv2, CityScapes, PASCAL-Context) on tiny fixtures, bad input, and augmentation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from mtsam.data import CityScapes, DatasetError, NYUv2, PascalContext, open_dataset
from mtsam.data.transforms import (
    SCALES,
    crop_size,
    draw_params,
    hflip,
    sample_rng,
    scale_crop,
)

H, W = 8, 12


# --------------------------------------------------------------------------- fixtures


def write_npy_layout(
    root: Path,
    split: str = "train",
    *,
    n: int = 3,
    num_classes: int = 13,
    label_dir: str = "label",
    with_normal: bool = True,
    seed: int = 0,
) -> dict[str, list[np.ndarray]]:
    """MTAN layout with float images, float labels (-1 = ignore), HxWx1 depth, HxWx3 normals."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, list[np.ndarray]] = {"image": [], label_dir: [], "depth": [], "normal": []}
    for _ in range(n):
        label = rng.integers(-1, num_classes, size=(H, W)).astype(np.float32)
        depth = rng.uniform(0.5, 9.0, size=(H, W, 1)).astype(np.float32)
        depth[0, 0, 0] = 0.0  # invalid pixel
        normal = rng.normal(size=(H, W, 3))
        normal = (normal / np.linalg.norm(normal, axis=2, keepdims=True)).astype(np.float32)
        normal[0, 0] = 0.0
        arrays["image"].append(rng.uniform(0, 1, size=(H, W, 3)).astype(np.float32))
        arrays[label_dir].append(label)
        arrays["depth"].append(depth)
        arrays["normal"].append(normal)
    if not with_normal:
        del arrays["normal"]
    for folder, items in arrays.items():
        (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i, arr in enumerate(items):
            np.save(root / split / folder / f"{i}.npy", arr)
    return arrays


def _part_struct(parts: list[tuple[str, np.ndarray]]) -> np.ndarray:
    out = np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
    for k, (name, mask) in enumerate(parts):
        out[0, k] = (name, mask.astype(np.uint8))
    return out


def _anno(objects: list[tuple[str, int, np.ndarray, list[tuple[str, np.ndarray]]]]) -> dict:
    dt = [("class", "O"), ("classIndex", "O"), ("mask", "O"), ("parts", "O")]
    objs = np.zeros((1, len(objects)), dtype=dt)
    for k, (name, idx, mask, parts) in enumerate(objects):
        objs[0, k] = (
            name,
            idx,
            mask.astype(np.uint8),
            _part_struct(parts) if parts else np.zeros((0, 0)),
        )
    return {"anno": {"imname": "x", "objects": objs}}


def box_mask(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def write_pascal(root: Path) -> dict[str, dict]:
    """Three images: a.mat with parts, b without a .mat, c with a plain human_parts array."""
    rng = np.random.default_rng(1)
    ids = ["2008_000001", "2008_000002", "2008_000003"]
    for folder in (
        "JPEGImages",
        "semseg/pascal-context",
        "human_parts",
        "sal_distill",
        "normals_distill",
        "ImageSets/Context",
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets/Context/train.txt").write_text("\n".join(ids[:2]) + "\n")
    (root / "ImageSets/Context/val.txt").write_text(ids[2] + "\n\n")
    info: dict[str, dict] = {}
    for image_id in ids:
        rgb = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        sem = rng.integers(0, 21, size=(H, W)).astype(np.uint8)
        sem[0, :3] = 255
        Image.fromarray(sem, mode="L").save(root / "semseg/pascal-context" / f"{image_id}.png")
        sal = rng.integers(0, 256, size=(H, W)).astype(np.uint8)
        sal[0, 0], sal[0, 1] = 127, 128  # 127/255 < 0.5 < 128/255
        Image.fromarray(sal, mode="L").save(root / "sal_distill" / f"{image_id}.png")
        nrm = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
        Image.fromarray(nrm, mode="RGB").save(root / "normals_distill" / f"{image_id}.png")
        info[image_id] = {"sem": sem, "sal": sal, "nrm": nrm}
    # Person 1: head (hair) + torso (neck) + lower arm (lhand); a dog with parts (ignored);
    # person 2 without parts -> ignore on its mask.
    anno = _anno(
        [
            (
                "person",
                15,
                box_mask(0, 6, 0, 4),
                [
                    ("hair", box_mask(0, 2, 0, 4)),
                    ("neck", box_mask(2, 4, 0, 4)),
                    ("lhand", box_mask(4, 6, 0, 2)),
                ],
            ),
            ("dog", 12, box_mask(6, 8, 0, 12), [("head", box_mask(6, 8, 0, 3))]),
            ("person", 15, box_mask(0, 3, 8, 12), []),
        ]
    )
    scipy.io.savemat(root / "human_parts" / f"{ids[0]}.mat", anno)
    expected = np.zeros((H, W), dtype=np.int64)
    expected[0:2, 0:4] = 1
    expected[2:4, 0:4] = 2
    expected[4:6, 0:2] = 4
    expected[0:3, 8:12] = -1
    info[ids[0]]["parts"] = expected
    info[ids[1]]["parts"] = np.full((H, W), -1, dtype=np.int64)
    plain = rng.integers(0, 7, size=(H, W)).astype(np.uint8)
    plain[1, 1] = 255
    scipy.io.savemat(root / "human_parts" / f"{ids[2]}.mat", {"human_parts": plain})
    exp_plain = plain.astype(np.int64)
    exp_plain[1, 1] = -1
    info[ids[2]]["parts"] = exp_plain
    return info


# --------------------------------------------------------------------------- readers


def test_nyuv2_sample_matches_stored_arrays(tmp_path):
    arrays = write_npy_layout(tmp_path)
    ds = NYUv2(tmp_path, "train")
    assert len(ds) == 3
    for i in range(3):
        s = ds[i]
        assert set(s) == {"image", "semantic", "depth", "normal", "index"}
        assert s["image"].dtype == torch.float32 and s["image"].shape == (3, H, W)
        np.testing.assert_array_equal(s["image"].numpy(), arrays["image"][i].transpose(2, 0, 1))
        assert s["semantic"].dtype == torch.int64
        np.testing.assert_array_equal(s["semantic"].numpy(), arrays["label"][i].astype(np.int64))
        assert s["depth"].shape == (1, H, W) and s["depth"].dtype == torch.float32
        np.testing.assert_array_equal(s["depth"].numpy()[0], arrays["depth"][i][..., 0])
        np.testing.assert_array_equal(s["normal"].numpy(), arrays["normal"][i].transpose(2, 0, 1))
        assert s["index"].dtype == torch.int64 and s["index"].ndim == 0 and int(s["index"]) == i


def test_task_subset_and_unknown_task(tmp_path):
    write_npy_layout(tmp_path)
    s = NYUv2(tmp_path, "train", tasks=("depth",))[1]
    assert set(s) == {"image", "depth", "index"}
    with pytest.raises(DatasetError, match="unknown tasks"):
        NYUv2(tmp_path, "train", tasks=("semantic", "saliency"))
    with pytest.raises(IndexError):
        NYUv2(tmp_path, "train")[3]


def test_nyuv2_only_needs_requested_folders(tmp_path):
    write_npy_layout(tmp_path, with_normal=False)
    assert len(NYUv2(tmp_path, "train", tasks=("semantic", "depth"))) == 3
    with pytest.raises(DatasetError, match="normal"):
        NYUv2(tmp_path, "train")


@pytest.mark.parametrize(("label_dir", "classes"), [("label", 7), ("label_7", 7), ("label_19", 19)])
def test_cityscapes_label_folders(tmp_path, label_dir, classes):
    arrays = write_npy_layout(
        tmp_path, split="val", num_classes=classes, label_dir=label_dir, with_normal=False
    )
    ds = CityScapes(tmp_path, "val", num_classes=classes)
    s = ds[2]
    assert set(s) == {"image", "semantic", "depth", "index"}
    np.testing.assert_array_equal(s["semantic"].numpy(), arrays[label_dir][2].astype(np.int64))
    with pytest.raises(DatasetError, match="7 or 19"):
        CityScapes(tmp_path, "val", num_classes=13)


def test_cityscapes_19_classes_never_read_libmtl_7_class_labels(tmp_path):
    write_npy_layout(tmp_path, split="val", num_classes=7, label_dir="label", with_normal=False)
    with pytest.raises(DatasetError) as info:
        CityScapes(tmp_path, "val", num_classes=19)
    message = str(info.value)
    assert str(tmp_path / "val" / "label") in message and "label_19" in message
    assert "7-class" in message and "\n" not in message
    assert len(CityScapes(tmp_path, "val", num_classes=19, tasks=("depth",))) == 3
    # With MTAN's label_19 beside LibMTL's label, each num_classes reads its own folder.
    fine = write_npy_layout(
        tmp_path, split="val", num_classes=19, label_dir="label_19", with_normal=False, seed=1
    )
    s = CityScapes(tmp_path, "val", num_classes=19)[1]
    np.testing.assert_array_equal(s["semantic"].numpy(), fine["label_19"][1].astype(np.int64))
    assert (CityScapes(tmp_path, "val", num_classes=7)[1]["semantic"] < 7).all()


def test_pascal_context_sample(tmp_path):
    info = write_pascal(tmp_path)
    ds = PascalContext(tmp_path, "train")
    assert len(ds) == 2
    for i, image_id in enumerate(["2008_000001", "2008_000002"]):
        s = ds[i]
        assert set(s) == {"image", "semantic", "human_parts", "saliency", "normal", "index"}
        ref = np.asarray(Image.open(tmp_path / "JPEGImages" / f"{image_id}.jpg"), np.float32) / 255
        np.testing.assert_allclose(s["image"].numpy(), ref.transpose(2, 0, 1), atol=1e-6)
        sem = info[image_id]["sem"].astype(np.int64)
        sem[sem == 255] = -1
        np.testing.assert_array_equal(s["semantic"].numpy(), sem)
        sal = s["saliency"].numpy()
        assert s["saliency"].dtype == torch.int64 and sal[0, 0] == 0 and sal[0, 1] == 1
        np.testing.assert_array_equal(sal, (info[image_id]["sal"] >= 128).astype(np.int64))
        raw = info[image_id]["nrm"].astype(np.float64).transpose(2, 0, 1) * 2 / 255 - 1
        ref_n = raw / np.linalg.norm(raw, axis=0, keepdims=True)
        np.testing.assert_allclose(s["normal"].numpy(), ref_n, atol=1e-6)
        np.testing.assert_array_equal(s["human_parts"].numpy(), info[image_id]["parts"])
    val = PascalContext(tmp_path, "val", tasks=("human_parts",))
    assert len(val) == 1
    np.testing.assert_array_equal(val[0]["human_parts"].numpy(), info["2008_000003"]["parts"])


def test_pascal_context_resize(tmp_path):
    write_pascal(tmp_path)
    s = PascalContext(tmp_path, "train", size=(16, 24))[0]
    assert s["image"].shape == (3, 16, 24) and s["semantic"].shape == (16, 24)
    full = PascalContext(tmp_path, "train")[0]
    # Doubling with nearest neighbour repeats each label twice along both axes.
    np.testing.assert_array_equal(
        s["semantic"].numpy(), np.repeat(np.repeat(full["semantic"].numpy(), 2, 0), 2, 1)
    )


def test_open_dataset_by_name(tmp_path):
    write_npy_layout(tmp_path)
    ds = open_dataset("nyuv2", tmp_path, "train", tasks=["normal"])
    assert isinstance(ds, NYUv2) and ds.tasks == ("normal",)
    with pytest.raises(DatasetError, match="unknown name"):
        open_dataset("kitti", tmp_path, "train")


# --------------------------------------------------------------------------- bad input

Corrupt = Callable[[Path], None]


def _save(rel: str, arr: np.ndarray) -> Corrupt:
    return lambda root: np.save(root / rel, arr)


def _remove(rel: str) -> Corrupt:
    return lambda root: (root / rel).unlink()


def _nan_depth(root: Path) -> None:
    d = np.load(root / "train/depth/2.npy")
    d[3, 4, 0] = np.nan
    np.save(root / "train/depth/2.npy", d)


def _rmdir_depth(root: Path) -> None:
    for f in (root / "train/depth").iterdir():
        f.unlink()
    (root / "train/depth").rmdir()


NPY_CASES: dict[str, tuple[Corrupt, str, str]] = {
    # name: (corruption, file the message must name, phrase it must contain)
    "missing split": (lambda root: None, "test", "split folder not found"),
    "missing folder": (_rmdir_depth, "train/depth", "not found"),
    "count mismatch": (_remove("train/depth/2.npy"), "train/depth/2.npy", "missing"),
    "extra file": (
        _save("train/normal/3.npy", np.zeros((H, W, 3), np.float32)),
        "train/normal/3.npy",
        "no matching",
    ),
    "gap in ids": (
        lambda r: [
            (r / f"train/{m}/2.npy").rename(r / f"train/{m}/5.npy")
            for m in ("image", "label", "depth", "normal")
        ],
        "train/image/2.npy",
        "without gaps",
    ),
    "bad file name": (
        _save("train/label/x.npy", np.zeros((H, W))),
        "train/label/x.npy",
        "unexpected file name",
    ),
    "image shape": (
        _save("train/image/1.npy", np.zeros((H, W, 4), np.float32)),
        "train/image/1.npy",
        "HxWx3",
    ),
    "image range": (
        _save("train/image/2.npy", np.full((H, W, 3), 255.0, np.float32)),
        "train/image/2.npy",
        "[0, 1]",
    ),
    "image dtype": (
        _save("train/image/1.npy", np.zeros((H, W, 3), np.int32)),
        "train/image/1.npy",
        "dtype",
    ),
    "label range": (
        _save("train/label/1.npy", np.full((H, W), 13.0, np.float32)),
        "train/label/1.npy",
        "out of range",
    ),
    "label fraction": (
        _save("train/label/2.npy", np.full((H, W), 0.5, np.float32)),
        "train/label/2.npy",
        "integer-valued",
    ),
    "label shape": (
        _save("train/label/1.npy", np.zeros((H, W + 1), np.float32)),
        "train/label/1.npy",
        "shape",
    ),
    "depth shape": (
        _save("train/depth/1.npy", np.ones((H, W), np.float32)),
        "train/depth/1.npy",
        "HxWx1",
    ),
    "depth nan": (_nan_depth, "train/depth/2.npy", "NaN"),
    "depth negative": (
        _save("train/depth/1.npy", -np.ones((H, W, 1), np.float32)),
        "train/depth/1.npy",
        ">= 0",
    ),
    "normal range": (
        _save("train/normal/2.npy", np.full((H, W, 3), 2.0, np.float32)),
        "train/normal/2.npy",
        "[-1, 1]",
    ),
    "normal dtype": (
        _save("train/normal/0.npy", np.zeros((H, W, 3), np.int64)),
        "train/normal/0.npy",
        "dtype",
    ),
    "corrupt npy": (
        lambda r: (r / "train/depth/1.npy").write_bytes(b"not numpy"),
        "train/depth/1.npy",
        "readable",
    ),
}


@pytest.mark.parametrize("case", sorted(NPY_CASES))
def test_npy_bad_input_names_the_file(tmp_path, case):
    corrupt, rel, phrase = NPY_CASES[case]
    write_npy_layout(tmp_path)
    corrupt(tmp_path)
    split = "test" if case == "missing split" else "train"
    with pytest.raises(DatasetError) as info:
        NYUv2(tmp_path, split).validate_all()
    message = str(info.value)
    assert str(tmp_path / rel) in message and phrase in message
    assert "\n" not in message


def test_late_bad_sample_found_by_validate_all_and_load(tmp_path):
    write_npy_layout(tmp_path)
    _nan_depth(tmp_path)
    ds = NYUv2(tmp_path, "train")  # construction checks sample 0 only
    assert ds[1]["depth"].shape == (1, H, W)
    with pytest.raises(DatasetError, match="NaN"):
        ds[2]


def _png(rel: str, arr: np.ndarray, mode: str) -> Corrupt:
    return lambda root: Image.fromarray(arr, mode=mode).save(root / rel)


def _mat(rel: str, variables: dict) -> Corrupt:
    return lambda root: scipy.io.savemat(root / rel, variables)


def _person(**fields: object) -> dict:
    """``anno`` with one person object that has exactly the given fields besides its class."""
    return {"anno": {"objects": {"class": "person", "classIndex": 15, **fields}}}


def test_pascal_objects_other_than_persons_need_no_mask(tmp_path):
    """Only person objects are read: another object's missing mask is not an error."""
    from mtsam.data.pascal_context import read_human_parts

    path = tmp_path / "a.mat"
    cat = {"class": "cat", "classIndex": 8, "parts": np.zeros(0)}
    person = {"class": "person", "classIndex": 15, "mask": np.ones((H, W)), "parts": np.zeros(0)}
    scipy.io.savemat(path, {"anno": {"objects": np.array([cat, person], dtype=object)}})
    assert (read_human_parts(path, shape=(H, W)) == -1).all()  # the person, without parts


PASCAL_CASES: dict[str, tuple[Corrupt, str, str]] = {
    "split file": (
        lambda r: (r / "ImageSets/Context/train.txt").unlink(),
        "ImageSets/Context/train.txt",
        "not found",
    ),
    "missing semseg": (
        lambda r: (r / "semseg/pascal-context/2008_000002.png").unlink(),
        "semseg/pascal-context/2008_000002.png",
        "missing",
    ),
    "missing folder": (
        lambda r: (
            [p.unlink() for p in (r / "sal_distill").iterdir()] and (r / "sal_distill").rmdir()
        ),
        "sal_distill",
        "not found",
    ),
    "semseg range": (
        _png("semseg/pascal-context/2008_000002.png", np.full((H, W), 30, np.uint8), "L"),
        "semseg/pascal-context/2008_000002.png",
        "out of range",
    ),
    "semseg size": (
        _png("semseg/pascal-context/2008_000002.png", np.zeros((H + 1, W), np.uint8), "L"),
        "semseg/pascal-context/2008_000002.png",
        "shape",
    ),
    "saliency mode": (
        _png("sal_distill/2008_000002.png", np.zeros((H, W, 3), np.uint8), "RGB"),
        "sal_distill/2008_000002.png",
        "mode",
    ),
    "normals size": (
        _png("normals_distill/2008_000002.png", np.zeros((H, W + 2, 3), np.uint8), "RGB"),
        "normals_distill/2008_000002.png",
        "normal map",
    ),
    "bad jpeg": (
        lambda r: (r / "JPEGImages/2008_000002.jpg").write_bytes(b"xx"),
        "JPEGImages/2008_000002.jpg",
        "readable",
    ),
    "mat without parts": (
        lambda r: scipy.io.savemat(r / "human_parts/2008_000002.mat", {"other": np.zeros(3)}),
        "human_parts/2008_000002.mat",
        "'anno'",
    ),
    "unknown part": (
        lambda r: scipy.io.savemat(
            r / "human_parts/2008_000002.mat",
            _anno([("person", 15, box_mask(0, 2, 0, 2), [("tail", box_mask(0, 1, 0, 1))])]),
        ),
        "human_parts/2008_000002.mat",
        "tail",
    ),
    "part mask size": (
        lambda r: scipy.io.savemat(
            r / "human_parts/2008_000002.mat",
            _anno([("person", 15, box_mask(0, 2, 0, 2), [("head", np.ones((3, 3)))])]),
        ),
        "human_parts/2008_000002.mat",
        "shape",
    ),
    # scipy raises MatReadError / IndexError on these, neither an OSError nor a ValueError
    "empty mat": (
        lambda r: (r / "human_parts/2008_000002.mat").write_bytes(b""),
        "human_parts/2008_000002.mat",
        "not a readable .mat file",
    ),
    "junk mat": (
        lambda r: (r / "human_parts/2008_000002.mat").write_bytes(b"x" * 34),
        "human_parts/2008_000002.mat",
        "not a readable .mat file",
    ),
    "person without mask": (
        _mat("human_parts/2008_000002.mat", _person(parts=np.zeros(0))),
        "human_parts/2008_000002.mat",
        "person object needs fields mask, parts",
    ),
    "part without mask": (
        _mat(
            "human_parts/2008_000002.mat",
            _person(mask=np.ones((H, W)), parts={"part_name": "head"}),
        ),
        "human_parts/2008_000002.mat",
        "part_name, mask",
    ),
    "mask not numeric": (
        _mat(
            "human_parts/2008_000002.mat",
            _person(mask=np.full((H, W), "1", object), parts=np.zeros(0)),
        ),
        "human_parts/2008_000002.mat",
        "dtype",
    ),
}


@pytest.mark.parametrize("case", sorted(PASCAL_CASES))
def test_pascal_bad_input_names_the_file(tmp_path, case):
    corrupt, rel, phrase = PASCAL_CASES[case]
    write_pascal(tmp_path)
    corrupt(tmp_path)
    with pytest.raises(DatasetError) as info:
        PascalContext(tmp_path, "train").validate_all()
    message = str(info.value)
    assert str(tmp_path / rel) in message and phrase in message
    assert "\n" not in message


# --------------------------------------------------------------------------- augmentation


def _sample(seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    normal = rng.normal(size=(3, H, W))
    normal /= np.linalg.norm(normal, axis=0, keepdims=True)
    return {
        "image": torch.from_numpy(rng.uniform(0, 1, (3, H, W)).astype(np.float32)),
        "semantic": torch.from_numpy(rng.integers(-1, 5, (H, W))),
        "depth": torch.from_numpy(rng.uniform(1, 5, (1, H, W)).astype(np.float32)),
        "normal": torch.from_numpy(normal.astype(np.float32)),
        "index": torch.tensor(4),
    }


def test_flip_twice_is_identity_and_flip_mirrors_consistently():
    s = _sample()
    twice = hflip(hflip(s))
    for k in s:
        assert torch.equal(twice[k], s[k]), k
    f = hflip(s)
    for k in ("image", "semantic", "depth"):
        np.testing.assert_array_equal(f[k].numpy(), s[k].numpy()[..., ::-1])
    n = s["normal"].numpy()
    np.testing.assert_array_equal(f["normal"].numpy()[0], -n[0, :, ::-1])
    np.testing.assert_array_equal(f["normal"].numpy()[1:], n[1:, :, ::-1])
    assert int(f["index"]) == 4


def _bilinear_align_corners(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Independent reference: (C, h, w) -> (C, out_h, out_w), corners of input and output align."""
    _, h, w = img.shape
    ys = np.arange(out_h) * (h - 1) / (out_h - 1)
    xs = np.arange(out_w) * (w - 1) / (out_w - 1)
    y0 = np.clip(np.floor(ys).astype(int), 0, h - 2)
    x0 = np.clip(np.floor(xs).astype(int), 0, w - 2)
    wy = (ys - y0)[:, None]
    wx = (xs - x0)[None, :]
    a = img[:, y0][:, :, x0]
    b = img[:, y0][:, :, x0 + 1]
    cc = img[:, y0 + 1][:, :, x0]
    d = img[:, y0 + 1][:, :, x0 + 1]
    return (1 - wy) * ((1 - wx) * a + wx * b) + wy * ((1 - wx) * cc + wx * d)


@pytest.mark.parametrize(("scale", "top", "left"), [(1.5, 2, 3), (1.2, 1, 0), (1.5, 0, 4)])
def test_scale_crop_against_numpy_reference(scale, top, left):
    s = _sample(1)
    out = scale_crop(s, scale=scale, top=top, left=left)
    h, w = int(H / scale), int(W / scale)
    assert crop_size(H, W, scale) == (h, w)
    rows = np.floor(np.arange(H) * h / H).astype(int) + top
    cols = np.floor(np.arange(W) * w / W).astype(int) + left
    depth = s["depth"].numpy()[0]
    np.testing.assert_allclose(
        out["depth"].numpy()[0], depth[np.ix_(rows, cols)] / scale, rtol=1e-6
    )
    np.testing.assert_array_equal(
        out["semantic"].numpy(), s["semantic"].numpy()[np.ix_(rows, cols)]
    )
    np.testing.assert_array_equal(out["normal"].numpy(), s["normal"].numpy()[:, rows][:, :, cols])
    window = s["image"].numpy()[:, top : top + h, left : left + w].astype(np.float64)
    np.testing.assert_allclose(
        out["image"].numpy(), _bilinear_align_corners(window, H, W), atol=1e-5
    )
    assert out["semantic"].dtype == torch.int64 and out["depth"].dtype == torch.float32


def test_scale_one_is_identity():
    s = _sample(2)
    out = scale_crop(s, scale=1.0, top=0, left=0)
    assert all(torch.equal(out[k], s[k]) for k in s)


def test_draws_cover_scales_and_flip_rate():
    draws = [draw_params(sample_rng(0, 0, i), height=H, width=W) for i in range(400)]
    assert {d.scale for d in draws} == set(SCALES)
    assert 0.4 < np.mean([d.flip for d in draws]) < 0.6
    for d in draws:
        h, w = crop_size(H, W, d.scale)
        assert 0 <= d.top <= H - h and 0 <= d.left <= W - w


def test_augmented_maps_stay_consistent(tmp_path):
    """Depth and normals are functions of the label; augmentation must keep that relation."""
    write_npy_layout(tmp_path, n=6)
    axes = np.eye(3, dtype=np.float32)
    for i in range(6):
        label = np.load(tmp_path / f"train/label/{i}.npy").astype(np.int64)
        depth = np.where(label >= 0, label + 2.0, 0.0)[..., None].astype(np.float32)
        normal = np.where(label[..., None] >= 0, axes[np.abs(label) % 3], 0).astype(np.float32)
        np.save(tmp_path / f"train/depth/{i}.npy", depth)
        np.save(tmp_path / f"train/normal/{i}.npy", normal)
    ds = NYUv2(tmp_path, "train", augment=True, seed=3)
    seen_scales, seen_flips = set(), set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(6):
            s = ds[i]
            p = draw_params(sample_rng(3, epoch, i), height=H, width=W)
            seen_scales.add(p.scale)
            seen_flips.add(p.flip)
            label = s["semantic"].numpy()
            valid = label >= 0
            np.testing.assert_allclose(
                s["depth"].numpy()[0][valid] * p.scale, label[valid] + 2.0, rtol=1e-6
            )
            assert (s["depth"].numpy()[0][~valid] == 0).all()
            expect = axes[label % 3].transpose(2, 0, 1) * valid
            if p.flip:
                expect[0] = -expect[0]
            np.testing.assert_array_equal(s["normal"].numpy(), expect)
    assert len(seen_scales) > 1 and seen_flips == {True, False}


def test_cityscapes_zoom_brings_the_scene_closer(tmp_path):
    """CityScapes stores inverse depth: a zoom by s makes metric depth z into z / s, so the
    stored disparity 1 / z must become s / z (NYUv2's metric depth is divided, above)."""
    write_npy_layout(tmp_path, n=4, num_classes=7, with_normal=False)
    for i in range(4):
        label = np.load(tmp_path / f"train/label/{i}.npy").astype(np.int64)
        disparity = np.where(label >= 0, 1.0 / (label + 2.0), 0.0)[..., None]
        np.save(tmp_path / f"train/depth/{i}.npy", disparity.astype(np.float32))
    ds = CityScapes(tmp_path, "train", augment=True, seed=5)
    seen_scales = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(4):
            s = ds[i]
            scale = draw_params(sample_rng(5, epoch, i), height=H, width=W).scale
            seen_scales.add(scale)
            label = s["semantic"].numpy()
            valid = label >= 0
            metric_depth = (label[valid] + 2.0) / scale
            np.testing.assert_allclose(s["depth"].numpy()[0][valid], 1.0 / metric_depth, rtol=1e-6)
            assert (s["depth"].numpy()[0][~valid] == 0).all()
    assert len(seen_scales) > 1


def test_augmentation_depends_only_on_seed_epoch_index(tmp_path):
    write_npy_layout(tmp_path, n=3)
    a = NYUv2(tmp_path, "train", augment=True, seed=7)
    b = NYUv2(tmp_path, "train", augment=True, seed=7)
    forward = [a[i] for i in range(3)]
    backward = [b[i] for i in reversed(range(3))][::-1]  # other order, other instance
    for x, y in zip(forward, backward, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    differs = False
    for epoch in range(1, 6):
        a.set_epoch(epoch)
        differs |= not torch.equal(a[0]["image"], forward[0]["image"])
    assert differs

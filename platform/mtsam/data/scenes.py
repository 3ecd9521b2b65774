"""Generated indoor scenes: the embedded default's data, written in the NYUv2 ``.npy`` layout.

Each scene is a room (floor, four walls, ceiling) holding a few boxes, spheres and cylinders,
seen by a pinhole camera with a jittered pose and rendered by :mod:`mtsam.data.raycast`:

- semantic: one class per primitive kind (:data:`CLASS_NAMES`, the first ``num_classes``);
- depth: camera z-depth in metres (> 0 everywhere, no invalid pixels);
- normal: unit surface normals in the camera frame (x right, y down, z forward), facing the
  camera, so they agree with the depth's back-projection;
- image: class-specific albedo pattern (checker, stripes, grid) and hue, Lambertian shading
  from a point light with distance fall-off plus ambient light, and a little pixel noise, so
  class, depth and orientation are all visible in the pixels.

Scene ``i`` of a split depends only on ``(seed, split, i)`` and the image size, so a fixed seed
gives identical files. ``root/scenes.json`` records the parameters, class names and the camera
intrinsics (pixel ``(row i, col j)`` looks along ``((j + 0.5 - cx) / fx, (i + 0.5 - cy) / fy, 1)``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtsam.data import raycast
from mtsam.data.errors import DatasetError

CLASS_NAMES = ("floor", "wall", "ceiling", "box", "sphere", "cylinder")
GENERATOR_VERSION = 1
_MARKER = ".complete"
_INFO = "scenes.json"
_SPLIT_CODES = {"train": 0, "val": 1}
_FOV_X = math.radians(65.0)
# (tone a, tone b) per class; patterns mix the two.
_TONES = np.array(
    [
        [[0.55, 0.38, 0.22], [0.33, 0.22, 0.12]],
        [[0.78, 0.80, 0.84], [0.60, 0.65, 0.75]],
        [[0.93, 0.92, 0.88], [0.55, 0.55, 0.52]],
        [[0.88, 0.48, 0.15], [0.55, 0.24, 0.07]],
        [[0.28, 0.72, 0.32], [0.10, 0.40, 0.15]],
        [[0.62, 0.32, 0.78], [0.30, 0.12, 0.45]],
    ]
)


@dataclass(frozen=True)
class SceneSet:
    """What :func:`generate_scenes` wrote: an NYUv2-layout folder and its class list."""

    root: Path
    class_names: tuple[str, ...]
    num_classes: int
    num_train: int
    num_val: int
    intrinsics: dict[str, float]


def _params(num_train: int, num_val: int, height: int, width: int, seed: int, num_classes: int):
    if num_train < 1 or num_val < 0:
        raise DatasetError(
            f"scenes: need num_train >= 1 and num_val >= 0, got {num_train}, {num_val}"
        )
    if height < 8 or width < 8:
        raise DatasetError(f"scenes: image must be at least 8x8, got {height}x{width}")
    if not 4 <= num_classes <= len(CLASS_NAMES):
        raise DatasetError(
            f"scenes: num_classes must be in 4..{len(CLASS_NAMES)}, got {num_classes}"
        )
    return {
        "num_train": int(num_train),
        "num_val": int(num_val),
        "height": int(height),
        "width": int(width),
        "seed": int(seed),
        "num_classes": int(num_classes),
        "version": GENERATOR_VERSION,
    }


def intrinsics(height: int, width: int) -> dict[str, float]:
    f = (width / 2.0) / math.tan(_FOV_X / 2.0)
    return {"fx": f, "fy": f, "cx": width / 2.0, "cy": height / 2.0}


def _camera_rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Camera (x right, y down, z forward) -> world (x right, y up, z forward)."""
    cp, sp, cr, sr = math.cos(pitch), math.sin(pitch), math.cos(roll), math.sin(roll)
    pitch_m = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    roll_m = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return raycast.yaw_matrix(yaw) @ pitch_m @ roll_m @ np.diag([1.0, -1.0, 1.0])


def _pattern(cls: int, point: np.ndarray, normal: np.ndarray, local: np.ndarray) -> np.ndarray:
    """0/1 texture pattern of class ``cls`` at world points (P, 3)."""
    x, y, z = point[:, 0], point[:, 1], point[:, 2]
    if cls == 0:  # floor: 0.5 m checker
        return (np.floor(x / 0.5) + np.floor(z / 0.5)) % 2
    if cls == 1:  # walls: horizontal bands
        return np.floor(y / 0.3) % 2
    if cls == 2:  # ceiling: tile grid lines
        return ((x / 0.6) % 1.0 < 0.1) | ((z / 0.6) % 1.0 < 0.1)
    if cls == 3:  # boxes: small 3-d checker in the box frame
        return np.floor(local / 0.12).sum(axis=1) % 2
    if cls == 4:  # spheres: latitude bands
        return np.floor(np.arcsin(np.clip(normal[:, 1], -1, 1)) / (math.pi / 8)) % 2
    return np.floor(np.arctan2(normal[:, 2], normal[:, 0]) / (math.pi / 6)) % 2  # cylinders


def _place(rng, cam: np.ndarray, yaw: float, size: float, lo: np.ndarray, hi: np.ndarray):
    """An (x, z) in front of the camera, inside the room, clear of the camera by ``size``."""
    for _ in range(20):
        azimuth = yaw + rng.uniform(-0.45, 0.45)
        dist = rng.uniform(1.4, 0.9 * (hi[2] - cam[2]))
        x = np.clip(cam[0] + dist * math.sin(azimuth), lo[0] + size, hi[0] - size)
        z = np.clip(cam[2] + dist * math.cos(azimuth), lo[2] + size, hi[2] - size)
        if math.hypot(x - cam[0], z - cam[2]) > size + 0.6:
            break
    return float(x), float(z)


def render_scene(
    rng: np.random.Generator, *, height: int, width: int, num_classes: int
) -> dict[str, np.ndarray]:
    """One scene -> image (H, W, 3), label (H, W), depth (H, W, 1), normal (H, W, 3), float32."""
    lo = np.array([-rng.uniform(1.8, 2.8), 0.0, -1.0])
    hi = np.array([-lo[0], rng.uniform(2.5, 3.1), rng.uniform(4.0, 6.5)])
    cam = np.array([rng.uniform(-0.3, 0.3) * hi[0], rng.uniform(1.2, 1.7), rng.uniform(-0.7, -0.3)])
    yaw = rng.uniform(-0.35, 0.35)
    # positive pitch looks down (towards the floor and the objects)
    rot = _camera_rotation(yaw, rng.uniform(0.0, 0.35), rng.uniform(-0.05, 0.05))
    k = intrinsics(height, width)
    rows, cols = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    d_cam = np.stack([(cols - k["cx"]) / k["fx"], (rows - k["cy"]) / k["fy"], np.ones_like(rows)])
    d_cam = d_cam.reshape(3, -1).T
    d = d_cam @ rot.T  # z-depth of a hit equals its ray parameter because d_cam.z == 1

    t, normal, axis = raycast.room_from_inside(cam, d, lo=lo, hi=hi)
    cls = np.where(axis == 1, np.where(d[:, 1] < 0, 0, 2), 1)
    local = np.zeros_like(d)
    kinds = [kind for kind in range(3, num_classes) for _ in range(int(rng.integers(1, 3)))]
    for kind in kinds:
        if kind == 3:
            half = np.array([rng.uniform(0.2, 0.55), rng.uniform(0.2, 0.6), rng.uniform(0.2, 0.55)])
            x, z = _place(rng, cam, yaw, float(np.hypot(half[0], half[2])), lo, hi)
            t_o, n_o, loc_o = raycast.box(
                cam, d, center=np.array([x, half[1], z]), half=half, yaw=rng.uniform(0, math.pi)
            )
        elif kind == 4:
            r = rng.uniform(0.18, 0.4)
            x, z = _place(rng, cam, yaw, r, lo, hi)
            t_o, n_o = raycast.sphere(cam, d, center=np.array([x, r, z]), radius=r)
            loc_o = local
        else:
            r = rng.uniform(0.1, 0.25)
            x, z = _place(rng, cam, yaw, r, lo, hi)
            t_o, n_o = raycast.cylinder(
                cam, d, center_xz=np.array([x, z]), radius=r, height=rng.uniform(0.5, 2.0)
            )
            loc_o = local
        closer = t_o < t
        t = np.where(closer, t_o, t)
        normal = np.where(closer[:, None], n_o, normal)
        cls = np.where(closer, kind, cls)
        local = np.where(closer[:, None], loc_o, local)

    point = cam + t[:, None] * d
    pattern = np.zeros(len(d))
    for c in np.unique(cls):
        sel = cls == c
        pattern[sel] = _pattern(int(c), point[sel], normal[sel], local[sel])
    tones = _TONES[:num_classes] * rng.uniform(0.9, 1.1, size=(num_classes, 1, 3))
    albedo = np.where(pattern[:, None] > 0, tones[cls, 1], tones[cls, 0])
    light = np.array([rng.uniform(lo[0], hi[0]) * 0.5, hi[1] - 0.1, rng.uniform(0.5, hi[2] / 2)])
    to_light = light - point
    dist = np.linalg.norm(to_light, axis=1)
    lambert = np.maximum((normal * to_light).sum(axis=1) / dist, 0.0)
    shade = 0.3 + 1.1 * lambert / (1.0 + 0.04 * dist**2)
    image = albedo * shade[:, None] + rng.normal(0.0, 0.01, size=albedo.shape)

    n_cam = normal @ rot  # world -> camera frame
    return {
        "image": np.clip(image, 0, 1).reshape(height, width, 3).astype(np.float32),
        "label": cls.reshape(height, width).astype(np.float32),
        "depth": t.reshape(height, width, 1).astype(np.float32),
        "normal": n_cam.reshape(height, width, 3).astype(np.float32),
    }


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _scene_set(root: Path) -> SceneSet:
    info = json.loads((root / _INFO).read_text())
    return SceneSet(
        root=root,
        class_names=tuple(info["class_names"]),
        num_classes=int(info["params"]["num_classes"]),
        num_train=int(info["params"]["num_train"]),
        num_val=int(info["params"]["num_val"]),
        intrinsics={k: float(v) for k, v in info["intrinsics"].items()},
    )


def read_scene_info(root: str | Path) -> SceneSet:
    """The :class:`SceneSet` of a complete generated folder; DatasetError otherwise."""
    root = Path(root)
    if _read_marker(root) is None:
        raise DatasetError(f"{root / _MARKER}: not a complete generated-scenes folder")
    return _scene_set(root)


def read_scene_params(root: str | Path) -> dict[str, Any] | None:
    """The parameters a complete generated-scenes folder was made with, or None."""
    return _read_marker(Path(root))


def is_generated(root: str | Path, **params: Any) -> bool:
    """Whether ``root`` is a complete generated-scenes folder made with ``params`` (the
    keyword arguments of :func:`generate_scenes`), i.e. generating there is a no-op."""
    return _read_marker(Path(root)) == _params(**params)


def find_scene_sets(root: str | Path, *, depth: int = 3) -> list[Path]:
    """Complete generated-scenes folders below ``root`` (not ``root`` itself), at most
    ``depth`` levels down, sorted; hidden folders (temporary or old copies) are skipped."""
    found: list[Path] = []
    level = [Path(root)]
    for _ in range(depth):
        below = []
        for folder in level:
            try:
                children = sorted(folder.iterdir())
            except OSError:
                continue
            for child in children:
                if child.name.startswith(".") or not child.is_dir():
                    continue
                if _read_marker(child) is not None:
                    found.append(child)
                else:
                    below.append(child)
        level = below
    return sorted(found)


def _write_split(folder: Path, split: str, count: int, params: dict[str, Any]) -> None:
    for name in ("image", "label", "depth", "normal"):
        (folder / split / name).mkdir(parents=True)
    for i in range(count):
        rng = np.random.default_rng([params["seed"], _SPLIT_CODES[split], i])
        arrays = render_scene(
            rng, height=params["height"], width=params["width"], num_classes=params["num_classes"]
        )
        for name, arr in arrays.items():
            np.save(folder / split / name / f"{i}.npy", arr)


def generate_scenes(
    root: str | Path,
    *,
    num_train: int,
    num_val: int,
    height: int = 96,
    width: int = 128,
    seed: int = 0,
    num_classes: int = len(CLASS_NAMES),
) -> SceneSet:
    """Write ``root/{train,val}/{image,label,depth,normal}/{i}.npy`` (NYUv2 layout).

    Written into a temporary sibling folder and renamed into place, with ``.complete`` last;
    a complete folder with the same parameters is left untouched (no-op); one of ours with other
    parameters is replaced; a non-empty folder that is not ours raises :class:`DatasetError`.
    Read it with ``NYUv2(root, split, num_classes=scene_set.num_classes)``.
    """
    root = Path(root)
    params = _params(num_train, num_val, height, width, seed, num_classes)
    if _read_marker(root) == params:
        return _scene_set(root)
    if root.exists() and _read_marker(root) is None and any(root.iterdir()):
        raise DatasetError(
            f"{root}: exists and is not a generated-scenes folder; refusing to replace"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write_split(tmp, "train", num_train, params)
        _write_split(tmp, "val", num_val, params)
        info = {
            "params": params,
            "class_names": list(CLASS_NAMES[:num_classes]),
            "intrinsics": intrinsics(height, width),
            "layout": "nyuv2",
        }
        (tmp / _INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        (tmp / _MARKER).write_text(json.dumps(params, sort_keys=True) + "\n")
        _swap_into_place(tmp, root, params)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return _scene_set(root)


def _swap_into_place(tmp: Path, root: Path, params: dict[str, Any]) -> None:
    if root.exists():
        if _read_marker(root) == params:  # another process finished the same folder first
            return
        if any(root.iterdir()):
            old = root.with_name(f".{root.name}.old-{os.getpid()}")
            os.replace(root, old)
            shutil.rmtree(old)
        else:
            root.rmdir()
    try:
        os.replace(tmp, root)
    except OSError:
        if _read_marker(root) != params:
            raise


def scenes_key(**params: Any) -> str:
    """Cache key of a parameter set (includes the generator version)."""
    full = _params(**params)
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:16]


def ensure_scenes(
    cache_dir: str | Path,
    *,
    num_train: int,
    num_val: int,
    height: int = 96,
    width: int = 128,
    seed: int = 0,
    num_classes: int = len(CLASS_NAMES),
) -> Path:
    """A complete generated folder under ``cache_dir`` keyed by the parameters (made if absent)."""
    params = {
        "num_train": num_train,
        "num_val": num_val,
        "height": height,
        "width": width,
        "seed": seed,
        "num_classes": num_classes,
    }
    root = Path(cache_dir) / f"scenes-{scenes_key(**params)}"
    generate_scenes(root, **params)
    return root

"""PASCAL-Context in the PASCAL-MT layout (semantic, human parts, saliency, normals).

Layout under ``root``::

    ImageSets/Context/{split}.txt      one image id per line
    JPEGImages/{id}.jpg                RGB (grey JPEGs are expanded to RGB)
    semseg/pascal-context/{id}.png     class ids 0..num_classes-1, 255 = ignore
    human_parts/{id}.mat               see below; a missing file means "not annotated"
    sal_distill/{id}.png               grey 0..255, saliency = value / 255 > 0.5
    normals_distill/{id}.png           RGB, normal = 2 * value / 255 - 1, re-normalised

Accepted ``human_parts/{id}.mat`` contents (``scipy.io.loadmat``), checked in this order:

1. a variable ``human_parts``: (H, W) integer array with values 0..6 or 255 (ignore);
2. a variable ``anno`` with the PASCAL-Part structure: ``anno.objects`` is a struct array
   with fields ``class`` (str), ``classIndex`` (int), ``mask`` ((H, W) 0/1) and ``parts``
   (a struct array with fields ``part_name`` (str) and ``mask`` ((H, W) 0/1), or empty).
   Objects with ``classIndex == 15`` or ``class == "person"`` paint their parts with the
   six-part grouping of PASCAL-MT (:data:`PART_OF`); a person without parts is marked
   ignore; every other pixel is background (0).

Images without a ``.mat`` file get human_parts all -1 (ignore). A ``.mat`` that does not load,
or holds neither structure in full, fails with a :class:`DatasetError` naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from PIL import Image

from mtsam.data import validate as V
from mtsam.data.base import DenseDataset, Sample, to_sample
from mtsam.data.errors import DatasetError
from mtsam.data.transforms import resize_bilinear, resize_nearest

PASCAL_TASKS = ("semantic", "human_parts", "saliency", "normal")
PART_NAMES = ("background", "head", "torso", "upper_arm", "lower_arm", "upper_leg", "lower_leg")
_GROUPS = {
    1: ("head", "hair", "leye", "reye", "lear", "rear", "lebrow", "rebrow", "nose", "mouth"),
    2: ("torso", "neck"),
    3: ("luarm", "ruarm"),
    4: ("llarm", "rlarm", "lhand", "rhand"),
    5: ("luleg", "ruleg"),
    6: ("llleg", "rlleg", "lfoot", "rfoot"),
}
PART_OF: dict[str, int] = {name: gid for gid, names in _GROUPS.items() for name in names}
PERSON_CLASS_INDEX = 15
_FILES = {
    "image": ("JPEGImages", ".jpg"),
    "semantic": ("semseg/pascal-context", ".png"),
    "human_parts": ("human_parts", ".mat"),
    "saliency": ("sal_distill", ".png"),
    "normal": ("normals_distill", ".png"),
}


def _read_image(path: Path, *, modes: tuple[str, ...], to_rgb: bool = False) -> np.ndarray:
    """Pixels of a PNG/JPEG whose PIL mode is one of ``modes`` (optionally converted to RGB)."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            pixels = np.asarray(img.convert("RGB") if to_rgb else img).copy()
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: not a readable image ({err})") from None
    if mode not in modes:
        raise DatasetError(f"{path}: expected image mode {' or '.join(modes)}, got {mode}")
    return pixels


def _mask(value: Any, path: Path, shape: tuple[int, int], what: str) -> np.ndarray:
    mask = np.asarray(value)
    if mask.shape != shape:
        raise DatasetError(f"{path}: {what} mask has shape {mask.shape}, expected {shape}")
    if mask.dtype.kind not in "biuf":
        raise DatasetError(f"{path}: {what} mask has dtype {mask.dtype}, expected 0/1 numbers")
    return mask.astype(bool)


def read_human_parts(path: Path, *, shape: tuple[int, int]) -> np.ndarray:
    """Parse one ``.mat`` of the accepted structures -> int64 (H, W), 0..6, -1 = ignore."""
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as err:
        # scipy's parser has no closed set of errors for malformed files: truncated or junk
        # files raise MatReadError, IndexError, OSError, ValueError, zlib.error, ...
        raise DatasetError(
            f"{path}: not a readable .mat file ({type(err).__name__}: {err}); expected a "
            "MATLAB file with a 'human_parts' or 'anno' variable"
        ) from None
    if "human_parts" in mat:
        raw = np.asarray(mat["human_parts"])
        return V.labels(
            raw,
            path,
            num_classes=len(PART_NAMES),
            ignore_values=(255,),
            shape=shape,
            what="human_parts map",
        )
    if "anno" not in mat:
        raise DatasetError(f"{path}: expected a variable 'human_parts' or 'anno' (PASCAL-Part)")
    target = np.zeros(shape, dtype=np.int64)
    objects = getattr(mat["anno"], "objects", None)
    if objects is None:
        raise DatasetError(f"{path}: 'anno' has no field 'objects'")
    for obj in np.atleast_1d(objects).ravel():
        try:
            name, cls_idx = str(getattr(obj, "class")), int(obj.classIndex)
        except (AttributeError, TypeError, ValueError):
            raise DatasetError(
                f"{path}: each anno.objects entry needs fields class, classIndex"
            ) from None
        if cls_idx != PERSON_CLASS_INDEX and name != "person":
            continue  # only persons are read
        try:
            obj_mask, parts = obj.mask, np.atleast_1d(obj.parts).ravel()
        except (AttributeError, TypeError, ValueError):
            raise DatasetError(f"{path}: each person object needs fields mask, parts") from None
        if parts.size == 0:
            target[_mask(obj_mask, path, shape, "person")] = -1
            continue
        for part in parts:
            if not (hasattr(part, "part_name") and hasattr(part, "mask")):
                raise DatasetError(
                    f"{path}: each person's parts entry needs fields part_name, mask"
                )
            part_name = str(part.part_name)
            if part_name not in PART_OF:
                raise DatasetError(f"{path}: unknown person part {part_name!r}")
            target[_mask(part.mask, path, shape, part_name)] = PART_OF[part_name]
    return target


class PascalContext(DenseDataset):
    """One split of PASCAL-Context (PASCAL-MT layout); see the module docstring for files.

    Samples keep each image's own size unless ``size=(H, W)`` is given, in which case the image
    is resized bilinearly and the maps with nearest neighbour (needed to batch samples).
    """

    available_tasks = PASCAL_TASKS

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        tasks: Sequence[str] = PASCAL_TASKS,
        num_classes: int = 21,
        size: tuple[int, int] | None = None,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.split = split
        super().__init__(tasks=tasks, augment=augment, seed=seed, source=str(self.root))
        if num_classes < 1:
            raise DatasetError(f"{self.root}: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        split_file = self.root / "ImageSets" / "Context" / f"{split}.txt"
        if not split_file.is_file():
            raise DatasetError(f"{split_file}: split file not found")
        self.ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        if not self.ids:
            raise DatasetError(f"{split_file}: no image ids")
        for key in ("image", *self.tasks):
            folder = self.root / _FILES[key][0]
            if not folder.is_dir():
                raise DatasetError(f"{folder}: folder not found (needed for {key})")
            if key == "human_parts":
                continue  # a missing file means "not annotated"
            for image_id in self.ids:
                path = self._path(key, image_id)
                if not path.is_file():
                    raise DatasetError(f"{path}: missing ({split_file.name} lists {image_id})")
        self._load(0)

    def __len__(self) -> int:
        return len(self.ids)

    def _path(self, key: str, image_id: str) -> Path:
        folder, suffix = _FILES[key]
        return self.root / folder / f"{image_id}{suffix}"

    def _load(self, index: int) -> Sample:
        image_id = self.ids[index]
        path = self._path("image", image_id)
        image = V.image_hwc(_read_image(path, modes=("RGB", "L"), to_rgb=True), path)
        shape = (image.shape[1], image.shape[2])
        arrays: dict[str, np.ndarray] = {"image": image}
        for task in self.tasks:
            path = self._path(task, image_id)
            if task == "semantic":
                raw = _read_image(path, modes=("P", "L"))
                arrays[task] = V.labels(
                    raw, path, num_classes=self.num_classes, ignore_values=(255,), shape=shape
                )
            elif task == "human_parts":
                arrays[task] = (
                    read_human_parts(path, shape=shape)
                    if path.is_file()
                    else np.full(shape, -1, dtype=np.int64)
                )
            elif task == "saliency":
                raw = _read_image(path, modes=("L",))
                V.labels(raw, path, num_classes=256, shape=shape, what="saliency map")
                arrays[task] = (raw.astype(np.float64) / 255.0 > 0.5).astype(np.int64)
            elif task == "normal":
                raw = _read_image(path, modes=("RGB",))
                if raw.shape[:2] != shape:
                    raise DatasetError(f"{path}: normal map is {raw.shape[:2]}, image is {shape}")
                normal = raw.astype(np.float32).transpose(2, 0, 1) * (2.0 / 255.0) - 1.0
                arrays[task] = V.unit_normals(normal)
        sample = to_sample(arrays)
        return sample if self.size is None else self._resize(sample)

    def _resize(self, sample: Sample) -> Sample:
        out: Sample = {}
        for key, value in sample.items():
            if key == "image":
                out[key] = resize_bilinear(value, self.size, align_corners=False).clamp(0, 1)
            else:
                out[key] = resize_nearest(value, self.size)
        return out

    def source_files(self) -> list[Path]:
        files = [self.root / "ImageSets" / "Context" / f"{self.split}.txt"]
        for key in ("image", *self.tasks):
            files.extend(p for p in (self._path(key, i) for i in self.ids) if p.is_file())
        return files

    def describe(self) -> dict[str, Any]:
        return {
            "reader": "PascalContext",
            "root": str(self.root.resolve()),
            "split": self.split,
            "tasks": list(self.tasks),
            "num_classes": self.num_classes,
            "size": None if self.size is None else list(self.size),
        }

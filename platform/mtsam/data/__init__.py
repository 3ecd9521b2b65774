"""Benchmark readers, generated scenes, augmentation and Parquet shards.

Every reader yields the same per-sample dict (see :mod:`mtsam.data.base`) and raises
:class:`DatasetError` with a one-line message naming the bad file.
"""

from mtsam.data.base import DenseDataset
from mtsam.data.cityscapes import CityScapes
from mtsam.data.errors import DatasetError
from mtsam.data.nyuv2 import NYUv2
from mtsam.data.pascal_context import PascalContext
from mtsam.data.registry import DATASET_TASKS, open_dataset
from mtsam.data.scenes import CLASS_NAMES, SceneSet, ensure_scenes, generate_scenes, read_scene_info
from mtsam.data.shard_dataset import ShardDataset
from mtsam.data.shards import SplitSource, load_manifest, read_ray_dataset, write_shards

__all__ = [
    "CLASS_NAMES",
    "DATASET_TASKS",
    "CityScapes",
    "DatasetError",
    "DenseDataset",
    "NYUv2",
    "PascalContext",
    "SceneSet",
    "ShardDataset",
    "SplitSource",
    "ensure_scenes",
    "generate_scenes",
    "load_manifest",
    "open_dataset",
    "read_ray_dataset",
    "read_scene_info",
    "write_shards",
]

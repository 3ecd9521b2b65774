"""Training checkpoints: trainable tensors only, optimizer, scheduler, epoch, RNG states, config.

One file, ``train_state.pt``, written by rank 0 into a fresh folder that Ray Train then
persists; loaded with ``weights_only=True``. RNG states are stored as tensors so that the
restricted unpickler accepts them. A resumed run is bit-identical on CPU: the data order and
augmentation are seeded by (seed, epoch, index), and torch's RNG, which the training steps
draw from (dropout masks, gate noise), is reseeded per (seed, epoch, rank) by the loop; the
restored states cover anything else.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "train_state.pt"
FORMAT_VERSION = 1


class TrainCheckpointError(ValueError):
    """A training checkpoint that cannot be resumed from; the message names the file."""


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": json.dumps(random.getstate()),
    }
    # No CUDA states: the loop's per-epoch torch.manual_seed reseeds every GPU before the GPU
    # draws anything, and restoring one state per GPU seen at save time fails (IndexError)
    # when a restart sees fewer GPUs.
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))  # a "cuda" entry (older checkpoints): unused


def save_train_state(
    directory: str | Path,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    step: int,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``train_state.pt`` atomically (temp file + rename) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "trainable": {k: v.detach().cpu().clone() for k, v in trainable.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": int(epoch),
        "step": int(step),
        "rng": rng_state(),
        "config_json": json.dumps(config, sort_keys=True),
        "extra_json": json.dumps(extra or {}, sort_keys=True),
    }
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, directory / STATE_FILE)
    return directory / STATE_FILE


def load_train_state(directory: str | Path) -> dict[str, Any]:
    """Read a checkpoint folder's ``train_state.pt``; one clear error for anything unusable."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise TrainCheckpointError(f"checkpoint {path}: no such file (not a training checkpoint?)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises many types for damaged files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrainCheckpointError(
            f"checkpoint {path}: unreadable (truncated or corrupt?): {first}"
        ) from None
    needed = {"format_version", "trainable", "optimizer", "scheduler", "epoch", "step", "rng"}
    if not isinstance(payload, dict) or not needed <= set(payload):
        missing = sorted(needed - set(payload)) if isinstance(payload, dict) else sorted(needed)
        raise TrainCheckpointError(f"checkpoint {path}: missing entries {missing}")
    if payload["format_version"] != FORMAT_VERSION:
        raise TrainCheckpointError(
            f"checkpoint {path}: format version {payload['format_version']}, "
            f"expected {FORMAT_VERSION}"
        )
    payload["config"] = json.loads(payload.pop("config_json", "{}"))
    payload["extra"] = json.loads(payload.pop("extra_json", "{}"))
    return payload

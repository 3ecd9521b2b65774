"""Save and load mSAM's trainable tensors apart from the frozen base.

A saved adapter is a directory with two files:

- ``adapter.safetensors``: every trainable tensor of the model (adapters, encoder block
  LayerNorms, no-mask embeddings, task decoders), keyed by ``named_parameters`` names; nothing
  frozen.
- ``adapter.json``: format version, the adapter spec (method, decomposition, ranks, targets,
  scaling, ...), the tasks with their channels, the base preset and the fingerprint of the base
  checkpoint: enough to rebuild the model (:func:`build_from_adapter`) without the config.

Writes are atomic: both files go to a temporary sibling directory that is renamed into place,
so a failure leaves either the old directory or nothing.

Format version 1 (written before mSAM froze the decoder parts it never reads, the hypernetwork
MLPs of mask tokens 1..3, and Conv-LoRA's gate when it has one expert) also holds those
tensors. Training never changed them (they received no gradient, so the optimizer skipped
them): loading a version-1 adapter skips every stored tensor that is now a frozen parameter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtsam.adapters.spec import AdapterSpec

if TYPE_CHECKING:
    from mtsam.model.msam import MSAM

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
WEIGHTS_FILE = "adapter.safetensors"
META_FILE = "adapter.json"


class AdapterFileError(ValueError):
    """A saved adapter is malformed or does not fit the model; the message names the file."""


class AdapterNotFoundError(FileNotFoundError):
    """The adapter directory or one of its files is missing."""


@dataclass(frozen=True)
class AdapterMeta:
    """What ``adapter.json`` says about a saved adapter."""

    format_version: int
    spec: AdapterSpec | None  # None: no adapter modules (norms, embeddings and decoders only)
    tasks: tuple[tuple[str, int], ...]
    preset: str
    base_fingerprint: str
    num_tensors: int
    num_parameters: int

    def to_json(self) -> dict[str, Any]:
        s = self.spec
        ranks: dict[str, int] = {}
        if s is not None:
            ranks = (
                {"r1": s.r1, "r2": s.r2, "r3": s.r3}
                if s.variant == "tora_tucker"
                else {"rank": s.rank}
            )
        return {
            "format_version": self.format_version,
            # Readable summary; "spec" below is what loading uses.
            "method": s.method if s else "none",
            "decomposition": s.decomposition if s and s.method == "tora" else None,
            "ranks": ranks,
            "targets": list(s.targets) if s else [],
            "scaling": (s.scaling if s.method == "tora" else s.lora_scale) if s else None,
            "spec": s.to_dict() if s else None,
            "tasks": [{"name": n, "channels": c} for n, c in self.tasks],
            "preset": self.preset,
            "base_fingerprint": self.base_fingerprint,
            "num_tensors": self.num_tensors,
            "num_parameters": self.num_parameters,
        }


def _preset_name(model: MSAM) -> str:
    return str(getattr(model.preset, "name", model.preset))


def meta_of(model: MSAM) -> AdapterMeta:
    """The description ``save_adapter`` would write for ``model``."""
    state = model.trainable_state_dict()
    return AdapterMeta(
        format_version=FORMAT_VERSION,
        spec=model.adapter_spec,
        tasks=tuple(model.task_channels.items()),
        preset=_preset_name(model),
        base_fingerprint=model.base_fingerprint,
        num_tensors=len(state),
        num_parameters=sum(v.numel() for v in state.values()),
    )


def save_adapter(model: MSAM, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model``'s trainable tensors and description to ``directory`` atomically.

    An existing ``directory`` is replaced only with ``overwrite=True`` and only if it is an
    adapter directory (holds ``adapter.json``) or empty. Returns the directory.
    """
    target = Path(directory)
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target}: exists and is not a directory")
        if not overwrite:
            raise FileExistsError(f"{target}: already exists (pass overwrite=True to replace it)")
        if any(target.iterdir()) and not (target / META_FILE).is_file():
            raise FileExistsError(
                f"{target}: not an adapter directory (no {META_FILE}); refusing to replace it"
            )
    meta = meta_of(model)
    tensors = {
        k: v.detach().to("cpu").contiguous() for k, v in model.trainable_state_dict().items()
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(
            tensors, str(tmp / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)}
        )
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta.to_json(), f, indent=2)
            f.write("\n")
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_adapter_meta(directory: str | Path) -> AdapterMeta:
    """Parse and check ``directory/adapter.json``."""
    path = Path(directory) / META_FILE
    if not Path(directory).is_dir():
        raise AdapterNotFoundError(f"{directory}: no such adapter directory")
    if not path.is_file():
        raise AdapterNotFoundError(f"{path}: missing (not a saved adapter directory)")
    try:
        d = json.loads(path.read_text())
        version = d["format_version"]
        if version not in READABLE_VERSIONS:
            raise AdapterFileError(
                f"{path}: format_version {version!r}, this code reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        spec = None if d["spec"] is None else AdapterSpec.from_dict(d["spec"])
        tasks = tuple((str(t["name"]), int(t["channels"])) for t in d["tasks"])
        return AdapterMeta(
            format_version=version,
            spec=spec,
            tasks=tasks,
            preset=str(d["preset"]),
            base_fingerprint=str(d["base_fingerprint"]),
            num_tensors=int(d["num_tensors"]),
            num_parameters=int(d["num_parameters"]),
        )
    except AdapterFileError:
        raise
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path}: not valid JSON ({e})") from None
    except KeyError as e:
        raise AdapterFileError(f"{path}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{path}: {e}") from None


def check_compatible(
    saved: AdapterMeta, model: MSAM, *, where: str, allow_other_base: bool = False
) -> None:
    """Raise :class:`AdapterFileError` naming the first difference between ``saved`` and ``model``."""
    own = meta_of(model)
    if saved.preset != own.preset:
        raise AdapterFileError(
            f"{where}: saved for base preset {saved.preset!r}, the model is {own.preset!r}"
        )
    if saved.tasks != own.tasks:
        raise AdapterFileError(
            f"{where}: saved for tasks {_tasks(saved.tasks)}, the model has {_tasks(own.tasks)}"
        )
    if _comparable(saved.spec) != _comparable(own.spec):
        raise AdapterFileError(f"{where}: adapter {_spec_diff(saved.spec, own.spec)}")
    if saved.base_fingerprint != own.base_fingerprint and not allow_other_base:
        raise AdapterFileError(
            f"{where}: trained on base weights {saved.base_fingerprint}, the model has "
            f"{own.base_fingerprint} (pass allow_other_base=True to load anyway)"
        )


def load_adapter(
    model: MSAM, directory: str | Path, *, allow_other_base: bool = False
) -> AdapterMeta:
    """Load a saved adapter into ``model`` (same preset, tasks and adapter spec) in place.

    Every trainable tensor must be present with its shape; nothing else may be. A different
    base checkpoint fingerprint is an error unless ``allow_other_base``.
    """
    meta = read_adapter_meta(directory)
    weights = Path(directory) / WEIGHTS_FILE
    check_compatible(meta, model, where=str(Path(directory)), allow_other_base=allow_other_base)
    if not weights.is_file():
        raise AdapterNotFoundError(f"{weights}: missing")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as e:
        raise AdapterFileError(f"{weights}: unreadable safetensors file ({e})") from None
    if meta.format_version == 1:  # it also stored tensors that are frozen now (see above)
        trainable = {n for n, _ in model.trainable_named_parameters()}
        frozen = {n for n, _ in model.named_parameters()} - trainable
        state = {k: v for k, v in state.items() if k not in frozen}
    model.load_trainable_state_dict(state, source=str(weights))
    return meta


def build_from_adapter(
    directory: str | Path,
    *,
    checkpoint: str | Path | None = None,
    seed: int | None = None,
    allow_other_base: bool = False,
) -> MSAM:
    """Rebuild mSAM from a saved adapter alone (plus the base checkpoint it was trained on).

    Without a checkpoint the base is random; ``seed=None`` then reuses the seed recorded in a
    ``random-init:<preset>:seed=<n>`` fingerprint, so the same random base comes back.
    """
    from mtsam.model.msam import build_msam

    meta = read_adapter_meta(directory)
    if seed is None:
        m = re.fullmatch(r"random-init:[^:]+:seed=(-?\d+)", meta.base_fingerprint)
        seed = int(m.group(1)) if m and checkpoint is None else 0
    model = build_msam(meta.preset, meta.tasks, checkpoint=checkpoint, adapter=meta.spec, seed=seed)
    load_adapter(model, directory, allow_other_base=allow_other_base)
    return model


def _comparable(spec: AdapterSpec | None) -> dict[str, Any] | None:
    # Dropout changes neither the tensors nor eval outputs, so it may differ.
    return None if spec is None else {k: v for k, v in spec.to_dict().items() if k != "dropout"}


def _tasks(tasks: Sequence[tuple[str, int]]) -> str:
    return "[" + ", ".join(f"{n}:{c}" for n, c in tasks) + "]"


def _spec_diff(saved: AdapterSpec | None, own: AdapterSpec | None) -> str:
    if saved is None or own is None:
        s = saved.method if saved else "none"
        o = own.method if own else "none"
        return f"method: saved {s!r}, the model has {o!r}"
    a, b = saved.to_dict(), own.to_dict()
    diff = [k for k in a if a[k] != b[k] and k != "dropout"]
    return ", ".join(f"{k}: saved {a[k]!r}, the model has {b[k]!r}" for k in diff)


__all__ = [
    "AdapterFileError",
    "AdapterMeta",
    "AdapterNotFoundError",
    "build_from_adapter",
    "load_adapter",
    "read_adapter_meta",
    "save_adapter",
]

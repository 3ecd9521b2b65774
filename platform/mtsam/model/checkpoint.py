"""Load an official SAM checkpoint (a plain state dict, as ``sam_vit_l_0b3195.pth``) into mSAM.

Key mapping (SAM -> mSAM):
- ``image_encoder.*``                     -> ``image_encoder.*``
- ``prompt_encoder.pe_layer.*``           -> ``pe_layer.*`` (the dense positional encoding)
- ``prompt_encoder.no_mask_embed.weight`` -> ``no_mask_embed.weight``, its one row repeated to
  every output channel of every task
- ``mask_decoder.*``                      -> ``decoders.<task>.*`` for every task
- the rest of the prompt encoder (point / box / mask-input embeddings) is not used by mSAM and
  is skipped by name, listed in ``UNUSED_SAM_PREFIXES``.

Anything else (a missing key, an unexpected key, a shape of another preset) is an error naming
the file, the preset and the offending keys: nothing is loaded with ``strict=False`` silently.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mtsam.model.msam import short_keys

if TYPE_CHECKING:
    from mtsam.model.msam import MSAM

UNUSED_SAM_PREFIXES = (
    "prompt_encoder.point_embeddings.",
    "prompt_encoder.not_a_point_embed.",
    "prompt_encoder.mask_downscaling.",
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded as asked; the message names file and keys."""


def file_fingerprint(path: str | Path, *, chunk: int = 1 << 22) -> str:
    """``sha256:<hex>`` of a file's bytes (identifies the base weights an adapter was trained on)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


def read_state_dict(path: str | Path, *, preset: str | None = None) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` a state dict, turning every failure into one clear line.

    ``preset``, when given, is named in the error (the preset the file was meant for).
    """
    path = Path(path)
    where = f"checkpoint {path}" + (f" (preset {preset!r})" if preset else "")
    if not path.is_file():
        raise CheckpointError(f"{where}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (
        RuntimeError,
        EOFError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        OSError,
        struct.error,  # a legacy (non-zip) file cut short
        IndexError,
        ValueError,
    ) as e:
        raise CheckpointError(
            f"{where}: could not be read as a PyTorch checkpoint "
            f"(truncated, corrupt or not a checkpoint): {_torch_reason(e)}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{where}: expected a flat state dict of tensors (SAM's format), "
            f"got {type(state).__name__}"
        )
    return state


def _torch_reason(e: BaseException, limit: int = 120) -> str:
    """The gist of a ``torch.load`` error: the first sentence of its first line, without
    torch's advice that follows (the ``weights_only`` and miniz paragraphs)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    if not text:
        return type(e).__name__
    first = text.splitlines()[0].strip()
    first = re.split(r"(?<=[^.])\. ", first + " ", maxsplit=1)[0].strip().rstrip(".")
    if len(first) > limit:
        first = first[: limit - 3].rstrip() + "..."
    return first


def sam_to_msam_state(
    sam_state: dict[str, torch.Tensor], model: MSAM, *, source: str
) -> dict[str, torch.Tensor]:
    """Map SAM's keys onto mSAM's frozen+trainable base (adapters excluded); strict."""
    own = model.state_dict()
    preset = model.preset.name
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    total_rows = model.no_mask_embed.weight.shape[0]
    for key, value in sam_state.items():
        if key.startswith("image_encoder."):
            out[key] = value
        elif key.startswith("prompt_encoder.pe_layer."):
            out[key.removeprefix("prompt_encoder.")] = value
        elif key == "prompt_encoder.no_mask_embed.weight":
            if value.ndim != 2 or value.shape[0] != 1:
                raise CheckpointError(
                    f"{source}: {key} has shape {tuple(value.shape)}, expected (1, D)"
                )
            out["no_mask_embed.weight"] = value.expand(total_rows, -1).clone()
        elif key.startswith("mask_decoder."):
            rest = key.removeprefix("mask_decoder.")
            for task in model.task_names:
                out[f"decoders.{task}.{rest}"] = value
        elif key.startswith(UNUSED_SAM_PREFIXES):
            continue
        else:
            unexpected.append(key)
    mapped = {}
    for k, v in out.items():
        if k in own:
            mapped[k] = v
        else:
            unexpected.append(_sam_name(k))
    missing = sorted(_sam_name(k) for k in own if k not in out)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit preset {preset!r}{_guess(sam_state)}: "
            f"missing keys {short_keys(missing)}, "
            f"unexpected keys {short_keys(sorted(set(unexpected)))}"
        )
    bad = [k for k, v in mapped.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"{source} does not fit preset {preset!r}: {_sam_name(k)} has shape "
            f"{tuple(mapped[k].shape)}, the preset expects {tuple(own[k].shape)} "
            f"({len(bad)} mismatched tensors{_guess(sam_state)})"
        )
    return mapped


def load_sam_state(
    model: MSAM, state: Mapping[str, torch.Tensor], *, source: str, fingerprint: str
) -> None:
    """Load an in-memory SAM state dict into ``model`` (before adapters are injected)."""
    from mtsam.adapters.base import adapters_of

    if adapters_of(model):
        raise CheckpointError(f"{source}: load the SAM base weights before injecting adapters")
    mapped = sam_to_msam_state(dict(state), model, source=source)
    with torch.no_grad():
        own = model.state_dict(keep_vars=True)
        for k, v in mapped.items():
            own[k].copy_(v.to(own[k].dtype))
    model.base_fingerprint = fingerprint


def load_sam_checkpoint(model: MSAM, path: str | Path) -> None:
    """Load SAM weights from ``path`` into ``model`` in place and record the file's fingerprint."""
    load_sam_state(
        model,
        read_state_dict(path, preset=model.preset.name),
        source=f"checkpoint {path}",
        fingerprint=file_fingerprint(path),
    )


def check_fits_preset(sam_state: Mapping[str, torch.Tensor], preset: str, *, source: str) -> None:
    """Raise :class:`CheckpointError` unless ``sam_state`` loads into mSAM of ``preset``.

    The same strict key and shape check as loading, against a model built on the meta device
    (no memory, no weights), so a driver can refuse a wrong file before any worker starts.
    """
    from mtsam.model.msam import MSAM
    from mtsam.model.presets import get_preset

    with torch.device("meta"):
        model = MSAM(get_preset(preset), [("task", 1)])
    sam_to_msam_state(dict(sam_state), model, source=source)


def _guess(sam_state: dict[str, torch.Tensor]) -> str:
    """', it looks like a <preset> checkpoint' from the encoder's width and depth, if known."""
    from mtsam.model.presets import PRESETS

    pos = sam_state.get("image_encoder.pos_embed")
    depth = len({k.split(".")[2] for k in sam_state if k.startswith("image_encoder.blocks.")})
    if pos is None or pos.ndim != 4:
        return ""
    for name, make in PRESETS.items():
        p = make()
        if (p.embed_dim, p.depth, p.embedding_size) == (pos.shape[-1], depth, pos.shape[1]):
            return f" (it looks like a {name!r} checkpoint)"
    return f" (its encoder is {pos.shape[-1]} wide with {depth} blocks)"


def _sam_name(msam_key: str) -> str:
    """Name a mSAM key as the SAM checkpoint would (for error messages)."""
    if msam_key.startswith("decoders."):
        return "mask_decoder." + msam_key.split(".", 2)[2]
    if msam_key.startswith(("pe_layer.", "no_mask_embed.")):
        return "prompt_encoder." + msam_key
    return msam_key

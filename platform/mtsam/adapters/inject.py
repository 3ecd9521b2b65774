"""Wrap the target linears of a segment-anything ``ImageEncoderViT`` with adapters, in place.

Targets per block ``encoder.blocks[i]``: ``qkv`` -> ``attn.qkv`` (only the ``qkv_parts`` thirds
of its output are adapted), ``proj`` -> ``attn.proj``, ``mlp`` -> ``mlp.lin1`` and ``mlp.lin2``.
The method is a registry lookup (:data:`ADAPTERS`) keyed by ``AdapterSpec.variant``.
"""

from __future__ import annotations

import copy

from torch import nn

from mtsam.adapters.base import AdapterModule, adapters_of
from mtsam.adapters.conv_lora import ConvLoRA
from mtsam.adapters.lora import LoRAHPS, LoRASTL
from mtsam.adapters.spec import QKV_PARTS, AdapterSpec
from mtsam.adapters.tora import ToRACP, ToRATucker

ADAPTERS: dict[str, type[AdapterModule]] = {
    "tora_tucker": ToRATucker,
    "tora_cp": ToRACP,
    "lora_stl": LoRASTL,
    "lora_hps": LoRAHPS,
    "conv_lora": ConvLoRA,
}

# Target name -> module paths inside one encoder block.
TARGET_PATHS: dict[str, tuple[str, ...]] = {
    "qkv": ("attn.qkv",),
    "proj": ("attn.proj",),
    "mlp": ("mlp.lin1", "mlp.lin2"),
}


class AdapterInjectionError(ValueError):
    """The encoder cannot take these adapters (already adapted, or not a SAM ViT)."""


def qkv_slices(d_out: int, parts: tuple[str, ...]) -> tuple[tuple[int, int], ...] | None:
    """Output row ranges of the chosen thirds of a fused qkv linear (None: all rows)."""
    if d_out % 3:
        raise AdapterInjectionError(f"a fused qkv linear has 3 * dim outputs, got {d_out}")
    third = d_out // 3
    chosen = sorted(QKV_PARTS.index(p) for p in parts)
    if len(chosen) == 3:
        return None
    return tuple((i * third, (i + 1) * third) for i in chosen)


def target_linears(encoder: nn.Module, spec: AdapterSpec) -> list[tuple[nn.Module, str, str]]:
    """(parent module, attribute, target name) of every linear to adapt, block by block."""
    blocks = getattr(encoder, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise AdapterInjectionError(
            f"expected a segment-anything ImageEncoderViT with .blocks, got {type(encoder).__name__}"
        )
    found = []
    for i, block in enumerate(blocks):
        for target in spec.targets:
            for path in TARGET_PATHS[target]:
                parent_path, attr = path.rsplit(".", 1)
                try:
                    parent = block.get_submodule(parent_path)
                except AttributeError:
                    raise AdapterInjectionError(
                        f"encoder block {i} has no {parent_path!r}"
                    ) from None
                if not isinstance(getattr(parent, attr, None), nn.Linear):
                    raise AdapterInjectionError(
                        f"encoder block {i}: {path!r} is {type(getattr(parent, attr, None)).__name__}, "
                        "expected nn.Linear"
                    )
                found.append((parent, attr, target))
    return found


def inject_adapters(encoder: nn.Module, spec: AdapterSpec, num_tasks: int) -> list[AdapterModule]:
    """Replace the spec's target linears of every block by adapters; returns them in block order.

    The encoder's own weights become the adapters' frozen ``base``; the new parameters are
    initialised from torch's global RNG (seed it before calling). Refuses an encoder that
    already holds adapters.
    """
    existing = adapters_of(encoder)
    if existing:
        raise AdapterInjectionError(
            f"the encoder already holds {len(existing)} {type(existing[0]).__name__} adapters; "
            "adapters can be injected once (build a fresh model to change the method)"
        )
    if num_tasks < 1:
        raise AdapterInjectionError(f"num_tasks must be >= 1, got {num_tasks}")
    cls = ADAPTERS[spec.variant]
    injected = []
    for parent, attr, target in target_linears(encoder, spec):
        linear = getattr(parent, attr)
        slices = qkv_slices(linear.out_features, spec.qkv_parts) if target == "qkv" else None
        adapter = cls.from_spec(linear, spec, num_tasks, out_slices=slices)
        setattr(parent, attr, adapter)
        injected.append(adapter)
    return injected


def adapter_count_formula(
    spec: AdapterSpec, *, embed_dim: int, depth: int, num_tasks: int, mlp_ratio: float = 4.0
) -> int:
    """Closed-form adapter parameter count for a SAM ViT of this width and depth."""
    mlp_dim = int(embed_dim * mlp_ratio)
    sel = embed_dim * len(spec.qkv_parts)  # adapted rows of the fused qkv (3 * embed_dim)
    shapes = {
        "qkv": [(embed_dim, sel)],
        "proj": [(embed_dim, embed_dim)],
        "mlp": [(embed_dim, mlp_dim), (mlp_dim, embed_dim)],
    }
    cls = ADAPTERS[spec.variant]
    per_block = sum(
        cls.count_for(spec, d_in=d_in, d_out=d_out, num_tasks=num_tasks)
        for target in spec.targets
        for d_in, d_out in shapes[target]
    )
    return depth * per_block


def merged_copy(module: nn.Module, task: int) -> nn.Module:
    """A deep copy of ``module`` with every adapter folded into a plain linear for ``task``.

    For single-task inference (eval mode). Raises for methods without a weight update
    (Conv-LoRA).
    """
    out = copy.deepcopy(module)
    for name, child in list(out.named_modules()):
        if isinstance(child, AdapterModule):
            parent_name, _, attr = name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            setattr(parent, attr, child.merge(task))
    return out

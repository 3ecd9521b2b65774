"""Model presets: SAM's own sizes (vit_b / vit_l / vit_h, 1024 px) and a CPU-sized ``tiny``.

Each preset is a builder function returning explicit numbers, registered in ``PRESETS`` (the
pattern of segment-anything's ``build_sam.py``). Building the modules is done by
:mod:`mtsam.model.msam` from segment-anything's own classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class SamPreset:
    """Sizes of one SAM-style model. All numbers are those passed to segment-anything."""

    name: str
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int
    prompt_dim: int  # encoder out_chans == decoder transformer_dim == prompt embedding dim
    decoder_depth: int
    decoder_mlp_dim: int
    decoder_heads: int
    iou_head_hidden_dim: int
    num_multimask_outputs: int = 3
    mlp_ratio: float = 4.0
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (img_size / patch_size)."""
        return self.img_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's low-resolution masks (4x the embedding grid)."""
        return 4 * self.embedding_size


def _sam(name: str, embed_dim: int, depth: int, num_heads: int, global_attn: tuple[int, ...]):
    return SamPreset(
        name=name,
        img_size=1024,
        patch_size=16,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        global_attn_indexes=global_attn,
        window_size=14,
        prompt_dim=256,
        decoder_depth=2,
        decoder_mlp_dim=2048,
        decoder_heads=8,
        iou_head_hidden_dim=256,
    )


def vit_b() -> SamPreset:
    """SAM ViT-B: 768 wide, 12 blocks, 12 heads, global attention at 2, 5, 8, 11."""
    return _sam("vit_b", 768, 12, 12, (2, 5, 8, 11))


def vit_l() -> SamPreset:
    """SAM ViT-L: 1024 wide, 24 blocks, 16 heads, global attention at 5, 11, 17, 23."""
    return _sam("vit_l", 1024, 24, 16, (5, 11, 17, 23))


def vit_h() -> SamPreset:
    """SAM ViT-H: 1280 wide, 32 blocks, 16 heads, global attention at 7, 15, 23, 31."""
    return _sam("vit_h", 1280, 32, 16, (7, 15, 23, 31))


def tiny() -> SamPreset:
    """A ViT that trains on 2 CPU cores in seconds.

    128 px input, patch 8 (a 16 x 16 token grid, low-res masks of 64 x 64), width 64, 4 blocks
    with windowed attention (window 4) in blocks 0 and 2 and global attention in 1 and 3, and a
    64-wide two-way decoder (the decoder asserts (64 / 2) % heads == 0).
    """
    return SamPreset(
        name="tiny",
        img_size=128,
        patch_size=8,
        embed_dim=64,
        depth=4,
        num_heads=4,
        global_attn_indexes=(1, 3),
        window_size=4,
        prompt_dim=64,
        decoder_depth=2,
        decoder_mlp_dim=256,
        decoder_heads=4,
        iou_head_hidden_dim=64,
    )


PRESETS: dict[str, Callable[[], SamPreset]] = {
    "vit_b": vit_b,
    "vit_l": vit_l,
    "vit_h": vit_h,
    "tiny": tiny,
}


def get_preset(name: str) -> SamPreset:
    """The preset called ``name``; a one-line error lists the known names otherwise."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}"
        ) from None

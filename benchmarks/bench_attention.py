"""Encoder attention: segment-anything's own ``Attention`` vs :class:`SdpaAttention`, side by side.

Times a segment-anything ``ImageEncoderViT`` with each attention kernel on the same weights and
inputs, in one process, interleaved round by round (the ratio of each round, then the median):

1. tiny (width 64, 4 blocks, 16 x 16 tokens, windows of 4, 2 global blocks);
2. ViT-B width and heads (768, 12 heads, windows of 14) at reduced size: 4 blocks (global
   attention in blocks 1 and 3) and a 224 px input (14 x 14 tokens, one window, no padding,
   instead of SAM's 64 x 64 tokens);
3. one global ViT-B attention layer at 32 x 32 tokens (where the N x N scores dominate).

Each is timed for inference (forward under ``no_grad``) and for a training step (forward +
backward, LayerNorms trainable as in mSAM, so gradients flow through every attention).
On CPU, SDPA runs its generic kernel: the GPU fused kernels are where the larger gain is.

Run:  PYTHONPATH=platform python benchmarks/bench_attention.py [--rounds N] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import platform as host
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Attention
from torch import nn

from mtsam.model.attention import SdpaAttention, use_sdpa_attention


def _encoder(*, img: int, patch: int, width: int, depth: int, heads: int, window: int, glob):
    enc = ImageEncoderViT(
        img_size=img,
        patch_size=patch,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        out_chans=min(256, width),
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=window,
        global_attn_indexes=glob,
    )
    with torch.no_grad():  # SAM zero-initialises the rel-pos tables: make them count
        for name, p in enc.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.02)
    for m in enc.modules():  # mSAM's trainable set inside the encoder: the block LayerNorms
        for p in m.parameters(recurse=False):
            p.requires_grad_(isinstance(m, nn.LayerNorm))
    return enc


def _steps(module: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    def infer() -> None:
        with torch.no_grad():
            module(x)

    def train() -> None:
        module(x).square().mean().backward()

    return {"forward": infer, "fwd+bwd": train}


def _time(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(name: str, ref: nn.Module, fast: nn.Module, x: torch.Tensor, rounds: int) -> None:
    """Print median ms of each kernel and the median per-round ratio sdpa / sam."""
    ref_steps, fast_steps = _steps(ref, x), _steps(fast, x)
    for mode in ref_steps:
        ref_steps[mode]()  # warm-up (allocator, kernel selection)
        fast_steps[mode]()
        t_ref, t_fast, ratios = [], [], []
        for r in range(rounds):
            # Alternate which goes first, so neither always sees a warm cache.
            if r % 2:
                b, a = _time(fast_steps[mode]), _time(ref_steps[mode])
            else:
                a, b = _time(ref_steps[mode]), _time(fast_steps[mode])
            t_ref.append(a)
            t_fast.append(b)
            ratios.append(b / a)
        print(
            f"| {name} | {mode} | {1e3 * statistics.median(t_ref):.1f} "
            f"| {1e3 * statistics.median(t_fast):.1f} | {statistics.median(ratios):.2f}x |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per case (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"{dt.date.today()}, {host.machine()} CPU, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, float32, {args.rounds} interleaved rounds"
    )
    print()
    print("| case | step | sam ms | sdpa ms | sdpa / sam |")
    print("|---|---|---:|---:|---:|")

    cases = [
        (
            "tiny encoder (w64, 4 blocks, 16x16 tokens), batch 6",
            dict(img=128, patch=8, width=64, depth=4, heads=4, window=4, glob=(1, 3)),
            torch.randn(6, 3, 128, 128),
        ),
        (
            "ViT-B-width encoder (w768, 4 blocks, 14x14 tokens), batch 2",
            dict(img=224, patch=16, width=768, depth=4, heads=12, window=14, glob=(1, 3)),
            torch.randn(2, 3, 224, 224),
        ),
    ]
    for name, sizes, x in cases:
        ref = _encoder(**sizes)
        fast = copy.deepcopy(ref)
        use_sdpa_attention(fast)
        compare(name, ref, fast, x, args.rounds)

    attn = Attention(768, num_heads=12, use_rel_pos=True, input_size=(32, 32))
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.02)
        attn.rel_pos_w.normal_(0, 0.02)
    fast_attn = SdpaAttention.from_attention(copy.deepcopy(attn))
    x = torch.randn(1, 32, 32, 768, requires_grad=True)
    compare("ViT-B global attention layer (32x32 tokens), batch 1", attn, fast_attn, x, args.rounds)


if __name__ == "__main__":
    main()

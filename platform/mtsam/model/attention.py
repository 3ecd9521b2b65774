"""Encoder attention through ``torch.nn.functional.scaled_dot_product_attention`` (SDPA).

segment-anything's ``Attention`` forms the (B*heads, N, N) score matrix by hand, adds the
decomposed relative-position term, and applies softmax and the value product as three separate
operations. :class:`SdpaAttention` computes the same function with one SDPA call, passing the
relative-position term as an additive float mask, so PyTorch can pick a fused kernel. In
training the mask needs a gradient (it is built from the queries): on GPU the call is then
limited to the memory-efficient kernel (and the math path), which have one; cuDNN attention,
which PyTorch prefers on Hopper and newer, has none for its bias and would refuse the call.

Swapping keeps every parameter and state-dict key (``qkv``, ``proj``, ``rel_pos_h``,
``rel_pos_w``): the new module reuses the old one's submodules, including an adapter that
already wraps ``qkv``. The fused ``qkv`` still receives the (B, H, W, C) token grid, so adapters
that need the spatial layout (Conv-LoRA) see what they see under segment-anything's module.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# SDPA kernels that give an additive float mask its gradient.
MASK_GRAD_BACKENDS = (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """SAM's decomposed relative-position term as an additive attention mask.

    Args:
        q: unscaled queries (B, heads, H*W, C) (SAM adds the term to the scaled scores, but
            builds it from the unscaled queries).
        rel_pos_h: height table (2*H - 1, C) (or any length: ``get_rel_pos`` interpolates).
        rel_pos_w: width table (2*W - 1, C).
        size: the token grid (H, W); queries and keys share it (self-attention).

    Returns:
        (B, heads, H*W, H*W) mask in q's dtype: entry [n, m] = q_n . Rh[h_n - h_m]
        + q_n . Rw[w_n - w_m].
    """
    h, w = size
    b, heads, n, c = q.shape
    rh = get_rel_pos(h, h, rel_pos_h)  # (H, H, C): [query row, key row]
    rw = get_rel_pos(w, w, rel_pos_w)  # (W, W, C)
    r_q = q.reshape(b, heads, h, w, c)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)  # (B, heads, H, W, H_k)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)  # (B, heads, H, W, W_k)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B, heads, H, W, H_k, W_k)
    return bias.reshape(b, heads, n, n).to(q.dtype)


def kernels_for(q: torch.Tensor, mask: torch.Tensor | None) -> contextlib.AbstractContextManager:
    """The SDPA kernels allowed for this call: on GPU, with a mask that needs a gradient, only
    :data:`MASK_GRAD_BACKENDS`; elsewhere PyTorch's own choice."""
    if mask is not None and mask.requires_grad and q.device.type == "cuda":
        return sdpa_kernel(list(MASK_GRAD_BACKENDS))
    return contextlib.nullcontext()


class SdpaAttention(Attention):
    """segment-anything's ``Attention`` computed by one SDPA call; same parameters and keys.

    Build it with :meth:`from_attention`; the forward takes and returns (B, H, W, dim) like
    segment-anything's (B counts windows in windowed blocks).
    """

    @classmethod
    def from_attention(cls, attn: Attention) -> SdpaAttention:
        """A new module sharing ``attn``'s submodules and parameters (nothing is copied)."""
        if not isinstance(attn, Attention):
            raise TypeError(
                f"expected a segment-anything Attention module, got {type(attn).__name__}"
            )
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.train(attn.training)
        new.num_heads = attn.num_heads
        new.scale = attn.scale
        # Same registration order as Attention.__init__, so state-dict keys keep their order.
        new.qkv = attn.qkv
        new.proj = attn.proj
        new.use_rel_pos = attn.use_rel_pos
        if attn.use_rel_pos:
            new.rel_pos_h = attn.rel_pos_h
            new.rel_pos_w = attn.rel_pos_w
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, dim) -> (B, H, W, dim)."""
        b, h, w, _ = x.shape
        # (B, H*W, 3, heads, C) -> 3 x (B, heads, H*W, C), the layout SDPA takes.
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        mask = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w)) if self.use_rel_pos else None
        with kernels_for(q, mask):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, h, w, -1)
        return self.proj(out)


def use_sdpa_attention(encoder: ImageEncoderViT) -> None:
    """Swap every block's ``attn`` for :class:`SdpaAttention`, in place (idempotent).

    Parameters, buffers, state-dict keys, ``requires_grad`` flags and any adapter wrapping
    ``attn.qkv`` are kept: only the module object around them changes. Call it before building
    the optimizer or wrapping the model in DDP (the parameters are the same objects, so an
    earlier optimizer would still work, but hooks registered on the old ``attn`` are dropped).
    """
    blocks = getattr(encoder, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(
            f"expected a segment-anything ImageEncoderViT with .blocks, got {type(encoder).__name__}"
        )
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if isinstance(attn, SdpaAttention):
            continue
        if not isinstance(attn, Attention):
            raise TypeError(
                f"encoder block {i}: attn is {type(attn).__name__}, "
                "expected segment-anything's Attention"
            )
        block.attn = SdpaAttention.from_attention(attn)


__all__ = ["SdpaAttention", "rel_pos_bias", "use_sdpa_attention"]

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

Global-attention blocks do not build the (B*heads, N, N) bias at all (N = H*W tokens: at SAM's
64 x 64 grid that is 64 MiB per head in float32, 768 MiB per image at ViT-B, plus its gradient).
The bias is a sum of two small tables, ``rel_h`` (B, heads, N, H) and ``rel_w`` (B, heads, N, W)
(entry [n, m] = rel_h[n, row of m] + rel_w[n, column of m]), and :func:`rel_pos_attention`
adds them inside the attention:

- on CUDA, FlexAttention (``torch.nn.attention.flex_attention``, compiled) with a ``score_mod``
  reading the two tables; it also gives them their gradients;
- elsewhere (FlexAttention has no backward on CPU), or if FlexAttention fails on first use,
  :class:`RelPosAttentionFunction`: an exact attention computed over blocks of heads and
  queries, so only a (block, N) slice of the scores exists at a time; the backward recomputes
  the slice from the saved log-sum-exp (as flash attention does) instead of keeping the
  probabilities.

Windowed blocks (14 x 14 tokens in SAM: a 196 x 196 bias) keep the additive-mask SDPA call,
which is the faster of the two there (``benchmarks/bench_attention.py`` measures both).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

# SDPA kernels that give an additive float mask its gradient.
MASK_GRAD_BACKENDS = (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)

# Entries of one float32 score block of RelPosAttentionFunction (64 MiB): one head of a
# 64 x 64 grid at a time, every head at once for small grids.
SCORE_BLOCK = 1 << 24


def rel_pos_terms(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's decomposed relative-position term as its two factors.

    Args:
        q: unscaled queries (B, heads, H*W, C) (SAM adds the term to the scaled scores, but
            builds it from the unscaled queries).
        rel_pos_h: height table (2*H - 1, C) (or any length: ``get_rel_pos`` interpolates).
        rel_pos_w: width table (2*W - 1, C).
        size: the token grid (H, W); queries and keys share it (self-attention).

    Returns:
        rel_h (B, heads, H*W, H) and rel_w (B, heads, H*W, W) in q's dtype: the term for query
        n and key m = (h_m, w_m) is rel_h[n, h_m] + rel_w[n, w_m], with rel_h[n, i] =
        q_n . Rh[h_n - i] and rel_w[n, j] = q_n . Rw[w_n - j].
    """
    h, w = size
    b, heads, n, c = q.shape
    rh = get_rel_pos(h, h, rel_pos_h)  # (H, H, C): [query row, key row]
    rw = get_rel_pos(w, w, rel_pos_w)  # (W, W, C)
    r_q = q.reshape(b, heads, h, w, c)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh).reshape(b, heads, n, h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw).reshape(b, heads, n, w)
    return rel_h.to(q.dtype), rel_w.to(q.dtype)


def rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """SAM's decomposed relative-position term materialised as an additive attention mask.

    Arguments as :func:`rel_pos_terms`. Returns (B, heads, H*W, H*W) in q's dtype: entry
    [n, m] = q_n . Rh[h_n - h_m] + q_n . Rw[w_n - w_m].
    """
    h, w = size
    b, heads, n, _ = q.shape
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, size)
    bias = rel_h.view(b, heads, n, h, 1) + rel_w.view(b, heads, n, 1, w)  # (..., H_k, W_k)
    return bias.reshape(b, heads, n, n)


def _score_blocks(groups: int, n: int) -> Iterator[tuple[slice, slice]]:
    """(groups, queries) slices covering a (groups, n, n) score tensor in blocks of at most
    ``SCORE_BLOCK`` entries (at least one query row of one group)."""
    rows = max(1, min(n, SCORE_BLOCK // n))
    per = max(1, SCORE_BLOCK // (n * n)) if rows == n else 1
    for g in range(0, groups, per):
        for s in range(0, n, rows):
            yield slice(g, min(groups, g + per)), slice(s, min(n, s + rows))


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Softmax and gradient dtype: float32 for bf16/fp16 inputs, else the input's own."""
    return torch.promote_types(t.dtype, torch.float32)


def _block_scores(q, k_t, rel_h, rel_w, gs: slice, qs: slice) -> torch.Tensor:
    """Scores of one block in the accumulation dtype: q_n . k_m + rel_h[n, h_m] + rel_w[n, w_m]
    (q pre-scaled)."""
    scores = torch.matmul(q[gs, qs], k_t[gs]).to(_acc_dtype(q))
    g, m, _ = scores.shape
    grid = scores.view(g, m, rel_h.shape[-1], rel_w.shape[-1])  # keys as (H_k, W_k)
    grid.add_(rel_h[gs, qs, :, None]).add_(rel_w[gs, qs, None, :])
    return scores


class RelPosAttentionFunction(torch.autograd.Function):
    """softmax(scale * q k^T + bias) v with bias[n, m] = rel_h[n, h_m] + rel_w[n, w_m], computed
    block by block (:func:`_score_blocks`) without the (B, heads, N, N) bias or probabilities.

    Forward saves the per-row log-sum-exp; backward recomputes each block's probabilities from
    it, and reduces the block's score gradient over key columns / rows into rel_h / rel_w's
    gradients. Softmax and gradients run in float32 whatever the input dtype.

    ``apply(q, k, v, rel_h, rel_w, scale)``: q, k (B, heads, N, C), v (B, heads, N, Cv),
    rel_h (B, heads, N, H), rel_w (B, heads, N, W) with N = H*W (keys in row-major grid order)
    -> (B, heads, N, Cv).
    """

    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w, scale: float):
        b, heads, n, _ = q.shape
        bh = b * heads
        q_s = (q * scale).reshape(bh, n, -1)
        k_t = k.reshape(bh, n, -1).transpose(1, 2).contiguous()
        # Contiguous copies (N x C each): v is a strided view of the fused qkv output, and
        # strided operands make every block's matrix product several times slower.
        v = v.reshape(bh, n, -1).contiguous()
        rel_h = rel_h.reshape(bh, n, -1).contiguous()
        rel_w = rel_w.reshape(bh, n, -1).contiguous()
        out = v.new_empty(bh, n, v.shape[-1])
        lse = torch.empty(bh, n, 1, dtype=_acc_dtype(q), device=q.device)
        for gs, qs in _score_blocks(bh, n):
            scores = _block_scores(q_s, k_t, rel_h, rel_w, gs, qs)
            top, at = scores.max(dim=-1, keepdim=True)
            p = torch.softmax(scores, dim=-1)
            del scores
            # log-sum-exp = max - log(p at the max): no second pass over the block.
            lse[gs, qs] = top - p.gather(-1, at).log()
            out[gs, qs] = torch.matmul(p.to(v.dtype), v[gs])
        ctx.save_for_backward(q_s, k_t, v, rel_h, rel_w, lse)
        ctx.scale = scale
        ctx.shape = (b, heads)
        return out.view(b, heads, n, -1)

    @staticmethod
    def backward(ctx, d_out):
        q_s, k_t, v, rel_h, rel_w, lse = ctx.saved_tensors
        bh, n, _ = q_s.shape
        d_out = d_out.reshape(bh, n, -1).contiguous()
        dq = torch.empty_like(q_s)
        acc = _acc_dtype(q_s)
        dk = torch.zeros(bh, n, q_s.shape[-1], dtype=acc, device=q_s.device)
        dv = torch.zeros(bh, n, v.shape[-1], dtype=acc, device=v.device)
        d_rel_h, d_rel_w = torch.empty_like(rel_h), torch.empty_like(rel_w)
        hk, wk = rel_h.shape[-1], rel_w.shape[-1]
        rel_h_minus_lse = rel_h.to(acc) - lse  # exp(scores - lse) = p: one pass less per block
        for gs, qs in _score_blocks(bh, n):
            p = _block_scores(q_s, k_t, rel_h_minus_lse, rel_w, gs, qs).exp_()
            do = d_out[gs, qs]
            dv[gs] += torch.matmul(p.transpose(1, 2).to(v.dtype), do)
            dp = torch.matmul(do, v[gs].transpose(1, 2)).to(acc)
            ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)  # p * (dp - rowsum)
            del p, dp
            grid = ds.view(ds.shape[0], ds.shape[1], hk, wk)
            d_rel_h[gs, qs] = grid.sum(-1)
            d_rel_w[gs, qs] = grid.sum(-2)
            ds = ds.to(q_s.dtype)
            dq[gs, qs] = torch.matmul(ds, k_t[gs].transpose(1, 2)).mul_(ctx.scale)
            dk[gs] += torch.matmul(ds.transpose(1, 2), q_s[gs, qs])
        b, heads = ctx.shape

        def shaped(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return t.view(b, heads, n, -1).to(like.dtype)

        return (
            shaped(dq, q_s),
            shaped(dk, k_t),
            shaped(dv, v),
            shaped(d_rel_h, rel_h),
            shaped(d_rel_w, rel_w),
            None,
        )


_flex = {"fn": None, "failed": False}


def flex_rel_pos_attention(q, k, v, rel_h, rel_w, scale: float) -> torch.Tensor:
    """The same function through FlexAttention (compiled on first use; a second batch size
    makes torch.compile recompile once with dynamic shapes): a ``score_mod``
    adds rel_h[b, head, n, m // W] + rel_w[b, head, n, m % W] to each score. Shapes as
    :class:`RelPosAttentionFunction`. Gradients need CUDA (FlexAttention has no CPU backward)."""
    if _flex["fn"] is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex["fn"] = torch.compile(flex_attention)
    width = rel_w.shape[-1]

    def add_rel_pos(score, b, h, q_idx, kv_idx):
        return score + rel_h[b, h, q_idx, kv_idx // width] + rel_w[b, h, q_idx, kv_idx % width]

    return _flex["fn"](q, k, v, score_mod=add_rel_pos, scale=scale)


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention with SAM's relative-position term added inside, never as a (N, N) tensor.

    q, k, v (B, heads, N, C); rel_h, rel_w from :func:`rel_pos_terms` -> (B, heads, N, C).
    CUDA: FlexAttention; if it fails on first use (no Triton, an unsupported GPU), a warning
    and :class:`RelPosAttentionFunction` from then on. Elsewhere: RelPosAttentionFunction.
    """
    if q.device.type == "cuda" and not _flex["failed"]:
        try:
            return flex_rel_pos_attention(q, k, v, rel_h, rel_w, scale)
        except Exception as e:  # compile or kernel errors differ by torch version and GPU
            _flex["failed"] = True
            log.warning("FlexAttention failed (%s); using the blocked attention instead", e)
    return RelPosAttentionFunction.apply(q, k, v, rel_h, rel_w, scale)


def kernels_for(q: torch.Tensor, mask: torch.Tensor | None) -> contextlib.AbstractContextManager:
    """The SDPA kernels allowed for this call: on GPU, with a mask that needs a gradient, only
    :data:`MASK_GRAD_BACKENDS`; elsewhere PyTorch's own choice."""
    if mask is not None and mask.requires_grad and q.device.type == "cuda":
        return sdpa_kernel(list(MASK_GRAD_BACKENDS))
    return contextlib.nullcontext()


class SdpaAttention(Attention):
    """segment-anything's ``Attention`` computed by one SDPA call; same parameters and keys.

    Build it with :meth:`from_attention`; the forward takes and returns (B, H, W, dim) like
    segment-anything's (B counts windows in windowed blocks). With ``bias_free`` (global
    blocks) the relative-position term is added inside :func:`rel_pos_attention`; otherwise
    it is passed to SDPA as a (B, heads, N, N) mask.
    """

    bias_free: bool = False

    @classmethod
    def from_attention(cls, attn: Attention, *, bias_free: bool = False) -> SdpaAttention:
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
        new.bias_free = bool(bias_free)
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
        if self.use_rel_pos and self.bias_free:
            rel_h, rel_w = rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, (h, w))
            out = rel_pos_attention(q, k, v, rel_h, rel_w, self.scale)
            return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))
        mask = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w)) if self.use_rel_pos else None
        with kernels_for(q, mask):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, h, w, -1)
        return self.proj(out)


def use_sdpa_attention(encoder: ImageEncoderViT) -> None:
    """Swap every block's ``attn`` for :class:`SdpaAttention`, in place (idempotent).

    Global-attention blocks (``window_size == 0``) get the bias-free path, windowed ones the
    additive mask (see the module docstring).

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
        block.attn = SdpaAttention.from_attention(
            attn, bias_free=getattr(block, "window_size", 0) == 0
        )


__all__ = [
    "RelPosAttentionFunction",
    "SdpaAttention",
    "flex_rel_pos_attention",
    "rel_pos_attention",
    "rel_pos_bias",
    "rel_pos_terms",
    "use_sdpa_attention",
]

"""SDPA encoder attention equals segment-anything's own ``Attention`` (values and gradients)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, Block
from torch.nn.attention import SDPBackend

from mtsam.adapters.base import adapters_of
from mtsam.adapters.spec import AdapterSpec
from mtsam.model import attention
from mtsam.model.attention import SdpaAttention, use_sdpa_attention
from mtsam.model.msam import build_image_encoder, build_msam
from mtsam.model.presets import get_preset

# Tolerance relative to the largest reference entry (float32 round-off of a softmax grows with
# the size of the values, the order of summation differs between the two implementations).
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def assert_near(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(
        actual, expected, atol=tol * scale, rtol=0, msg=lambda m: f"{what}: {m}" if what else m
    )


def _randomise(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Random values for every parameter: SAM zero-initialises the rel-pos tables."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _grads(module, x, params, weight):
    """Gradients of sum(out * weight) w.r.t. the input and ``params`` (names on ``module``)."""
    x = x.detach().clone().requires_grad_(True)
    tensors = [module.get_parameter(n) for n in params]
    out = module(x)
    grads = torch.autograd.grad((out * weight).sum(), [x, *tensors])
    return out.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "use_rel_pos,input_size,grid",
    [
        (True, (5, 7), (5, 7)),  # tables of length 2*size - 1, non-square grid
        (True, (6, 6), (4, 5)),  # other length: get_rel_pos interpolates the tables
        (False, None, (4, 6)),
    ],
    ids=["relpos", "relpos-interp", "no-relpos"],
)
def test_attention_matches_segment_anything(dtype, use_rel_pos, input_size, grid):
    torch.manual_seed(0)
    ref = Attention(24, num_heads=3, use_rel_pos=use_rel_pos, input_size=input_size).to(dtype)
    _randomise(ref, seed=1)
    fast = SdpaAttention.from_attention(copy.deepcopy(ref))
    x = torch.randn(2, *grid, 24, dtype=dtype)
    weight = torch.randn(2, *grid, 24, dtype=dtype)
    names = ["qkv.weight", "proj.weight"] + (["rel_pos_h", "rel_pos_w"] if use_rel_pos else [])
    out_ref, g_ref = _grads(ref, x, names, weight)
    out_fast, g_fast = _grads(fast, x, names, weight)
    assert out_fast.shape == out_ref.shape == x.shape
    assert_near(out_fast, out_ref, TOL[dtype], "output")
    for name, a, b in zip(["input", *names], g_fast, g_ref, strict=True):
        assert b.abs().max() > 0, name  # the reference gradient is not trivially zero
        assert_near(a, b, TOL[dtype], f"grad {name}")


@pytest.mark.parametrize("window_size", [0, 3], ids=["global", "windowed"])
def test_block_matches_segment_anything(window_size):
    """A whole segment-anything Block, windowed (with padding: 7 = 3 + 3 + 1) and global."""
    torch.manual_seed(0)
    size = (window_size, window_size) if window_size else (7, 7)
    ref = Block(32, 4, use_rel_pos=True, window_size=window_size, input_size=size)
    _randomise(ref, seed=2)
    fast = copy.deepcopy(ref)
    fast.attn = SdpaAttention.from_attention(fast.attn)
    x = torch.randn(2, 7, 7, 32)
    weight = torch.randn(2, 7, 7, 32)
    names = ["attn.rel_pos_h", "attn.rel_pos_w", "attn.qkv.weight"]
    out_ref, g_ref = _grads(ref, x, names, weight)
    out_fast, g_fast = _grads(fast, x, names, weight)
    assert_near(out_fast, out_ref, TOL[torch.float32], "output")
    for name, a, b in zip(["input", *names], g_fast, g_ref, strict=True):
        assert b.abs().max() > 0, name
        assert_near(a, b, TOL[torch.float32], f"grad {name}")


def test_tiny_encoder_equal_and_state_dict_unchanged():
    torch.manual_seed(0)
    ref = build_image_encoder(get_preset("tiny"))
    _randomise(ref, seed=3, scale=0.1)
    fast = copy.deepcopy(ref)
    before = fast.state_dict()
    flags = [p.requires_grad for p in fast.parameters()]
    use_sdpa_attention(fast)
    after = fast.state_dict()
    assert list(after) == list(before)  # same keys, same order
    assert all(after[k].data_ptr() == before[k].data_ptr() for k in before)  # same tensors
    assert [p.requires_grad for p in fast.parameters()] == flags
    assert all(type(b.attn) is SdpaAttention for b in fast.blocks)
    use_sdpa_attention(fast)  # idempotent
    assert list(fast.state_dict()) == list(before)
    # The segment-anything module loads into the swapped one with strict key matching.
    fast.load_state_dict(ref.state_dict(), strict=True)

    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert_near(fast(x), ref(x), TOL[torch.float32], "encoder output")


@pytest.mark.parametrize(
    "spec",
    [
        AdapterSpec(method="tora", r1=4, r2=4, r3=2, dropout=0.0),
        AdapterSpec(method="conv_lora", rank=2, conv_experts=2, dropout=0.0),
    ],
    ids=["tora", "conv_lora"],
)
def test_adapter_wrapped_qkv(spec):
    """Adapters keep wrapping qkv (Conv-LoRA needs the (B, H, W, C) grid) and give equal results."""
    torch.manual_seed(0)
    ref = build_msam("tiny", [("semantic", 7), ("depth", 1)], adapter=spec, seed=0)
    # Adapters start as a zero update: make them non-zero so the test can see them.
    with torch.no_grad():
        for a in adapters_of(ref):
            for p in a.adapter_parameters():
                p.add_(torch.randn_like(p) * 0.2)
    ref.eval()  # Conv-LoRA's gate noise is training-only
    fast = copy.deepcopy(ref)
    qkvs = [b.attn.qkv for b in fast.image_encoder.blocks]
    keys = list(fast.state_dict())
    use_sdpa_attention(fast.image_encoder)
    assert [b.attn.qkv for b in fast.image_encoder.blocks] == qkvs  # same adapter objects
    assert list(fast.state_dict()) == keys
    assert len(adapters_of(fast)) == len(adapters_of(ref)) == 4

    x = torch.randn(1, 3, 128, 128)
    emb_ref = ref.embed_tasks(x, stacked=True)
    emb_fast = fast.embed_tasks(x, stacked=True)
    loss_ref = sum((e * (i + 1)).square().mean() for i, e in enumerate(emb_ref.values()))
    loss_fast = sum((e * (i + 1)).square().mean() for i, e in enumerate(emb_fast.values()))
    for t in emb_ref:
        assert_near(emb_fast[t], emb_ref[t], TOL[torch.float32], f"embedding {t}")
    if spec.method == "tora":  # task-specific: the two tasks' embeddings differ
        assert not torch.equal(emb_ref["semantic"], emb_ref["depth"])
    p_ref = [p for a in adapters_of(ref) for p in a.adapter_parameters()]
    p_fast = [p for a in adapters_of(fast) for p in a.adapter_parameters()]
    g_ref = torch.autograd.grad(loss_ref, p_ref, allow_unused=True)
    g_fast = torch.autograd.grad(loss_fast, p_fast, allow_unused=True)
    for a, b in zip(g_fast, g_ref, strict=True):
        if b is None:
            assert a is None
            continue
        assert_near(a, b, TOL[torch.float32], "adapter grad")


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="Attention"):
        SdpaAttention.from_attention(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="ImageEncoderViT"):
        use_sdpa_attention(torch.nn.Linear(4, 4))


def test_gpu_calls_with_a_mask_gradient_use_kernels_that_give_one(monkeypatch):
    """cuDNN attention (PyTorch's first choice on Hopper and newer) cannot give its bias a
    gradient, the memory-efficient kernel can (both checked on the meta device: no GPU
    needed); so a GPU call whose mask needs a gradient is limited to the kernels that have it."""
    q = torch.zeros(1, 2, 16, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.zeros(1, 2, 16, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(
        RuntimeError, match="not differentiable with respect to argument 'attn_bias'"
    ):
        torch.ops.aten._scaled_dot_product_cudnn_attention(q, q, q, bias, False, 0.0, False, False)
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, q, q, bias, True, 0.0, False)
    out[0].sum().backward()
    assert bias.grad is not None and bias.grad.shape == bias.shape

    calls = []
    monkeypatch.setattr(
        attention, "sdpa_kernel", lambda b: calls.append(b) or contextlib.nullcontext()
    )
    for device, needs_grad, limited in (
        ("cuda", True, True),
        ("cuda", False, False),
        ("cpu", True, False),
    ):
        calls.clear()
        fake_q = type("Q", (), {"device": torch.device(device)})()
        mask = torch.zeros(2, requires_grad=needs_grad)
        with attention.kernels_for(fake_q, mask):
            pass
        assert calls == ([list(attention.MASK_GRAD_BACKENDS)] if limited else []), device
    with attention.kernels_for(type("Q", (), {"device": torch.device("cuda")})(), None):
        pass
    assert calls == []  # no mask (no relative positions): PyTorch's own choice
    assert SDPBackend.EFFICIENT_ATTENTION in attention.MASK_GRAD_BACKENDS
    assert SDPBackend.CUDNN_ATTENTION not in attention.MASK_GRAD_BACKENDS

    # SdpaAttention asks kernels_for about each call, with the mask it passes to SDPA: in
    # training that mask needs a gradient (it is built from the queries).
    seen = []
    choose = attention.kernels_for
    monkeypatch.setattr(attention, "kernels_for", lambda q, m: seen.append(m) or choose(q, m))
    ref = Attention(24, num_heads=3, use_rel_pos=True, input_size=(4, 5))
    _randomise(ref, seed=1)
    SdpaAttention.from_attention(ref)(torch.randn(2, 4, 5, 24)).sum().backward()
    assert len(seen) == 1 and seen[0].shape == (2, 3, 20, 20) and seen[0].requires_grad


# ---------------------------------------------------------------- bias-free global attention
# RelPosAttentionFunction splits the scores into blocks of at most SCORE_BLOCK entries: the
# default (every head at once for these sizes), one head at a time, and a few query rows of
# one head (rows that do not divide N: 35 tokens, 8 rows per block).
BLOCKS = {"whole": 1 << 24, "per-head": 35 * 35, "rows": 8 * 35}  # 20 tokens: 14 rows


@pytest.mark.parametrize(
    "dtype,input_size,grid,block",
    [
        (torch.float32, (5, 7), (5, 7), "whole"),
        (torch.float32, (6, 6), (4, 5), "rows"),  # other table length: interpolated
        (torch.float64, (5, 7), (5, 7), "whole"),
        (torch.float64, (5, 7), (5, 7), "per-head"),
        (torch.float64, (5, 7), (5, 7), "rows"),
        (torch.float64, (6, 6), (4, 5), "rows"),
    ],
    ids=["f32", "f32-interp-rows", "f64", "f64-per-head", "f64-rows", "f64-interp-rows"],
)
def test_bias_free_attention_matches_segment_anything(monkeypatch, block, dtype, input_size, grid):
    monkeypatch.setattr(attention, "SCORE_BLOCK", BLOCKS[block])
    torch.manual_seed(0)
    ref = Attention(24, num_heads=3, use_rel_pos=True, input_size=input_size).to(dtype)
    _randomise(ref, seed=1, scale=0.5)  # large enough that the bias matters to the softmax
    fast = SdpaAttention.from_attention(copy.deepcopy(ref), bias_free=True)
    x = torch.randn(2, *grid, 24, dtype=dtype)
    weight = torch.randn(2, *grid, 24, dtype=dtype)
    names = ["qkv.weight", "qkv.bias", "proj.weight", "rel_pos_h", "rel_pos_w"]
    out_ref, g_ref = _grads(ref, x, names, weight)
    out_fast, g_fast = _grads(fast, x, names, weight)
    # float32: both sides round (scores up to ~30 here); float64 shows the two are equal.
    tol = 5e-5 if dtype == torch.float32 else TOL[dtype]
    assert_near(out_fast, out_ref, tol, "output")
    for name, a, b in zip(["input", *names], g_fast, g_ref, strict=True):
        assert b.abs().max() > 0, name
        assert_near(a, b, tol, f"grad {name}")


def test_bias_free_function_gradcheck(monkeypatch):
    """Autograd's numerical check of the hand-written backward, on the function alone
    (float64, two blocks of query rows)."""
    monkeypatch.setattr(attention, "SCORE_BLOCK", 3 * 6)
    g = torch.Generator().manual_seed(0)
    b, heads, h, w, c = 1, 2, 2, 3, 4
    n = h * w

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    inputs = (rand(b, heads, n, c), rand(b, heads, n, c), rand(b, heads, n, 5))
    inputs += (rand(b, heads, n, h), rand(b, heads, n, w))
    assert torch.autograd.gradcheck(
        lambda *t: attention.RelPosAttentionFunction.apply(*t, 0.7), inputs, fast_mode=True
    )


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("bias_free", [True, False], ids=["bias-free", "mask"])
def test_bias_free_attention_never_holds_the_bias(monkeypatch, bias_free):
    """Forward and backward of a global block: no tensor as large as one head's (N, N) bias
    exists with the bias-free path; the mask path (the case that must fail) makes several."""
    n = 12 * 12
    monkeypatch.setattr(attention, "SCORE_BLOCK", n * 8)  # 8 query rows of one head
    ref = Attention(16, num_heads=4, use_rel_pos=True, input_size=(12, 12))
    _randomise(ref, seed=1)
    fast = SdpaAttention.from_attention(ref, bias_free=bias_free)
    x = torch.randn(2, 12, 12, 16, requires_grad=True)
    with _LargestTensor() as seen:
        fast(x).square().sum().backward()
    full = 2 * 4 * n * n  # (B, heads, N, N)
    if bias_free:  # the largest are the (B, N, 3 * dim) qkv activations and their gradient
        assert seen.largest < n * n
    else:
        assert seen.largest >= full


def test_global_blocks_get_the_bias_free_path():
    torch.manual_seed(0)
    enc = build_image_encoder(get_preset("tiny"))  # blocks 1 and 3 global, 0 and 2 windowed
    use_sdpa_attention(enc)
    assert [b.attn.bias_free for b in enc.blocks] == [b.window_size == 0 for b in enc.blocks]
    assert [b.attn.bias_free for b in enc.blocks] == [False, True, False, True]


def test_flex_attention_forward_matches_segment_anything():
    """The CUDA path's score_mod, compiled on the CPU (forward only: FlexAttention has no CPU
    backward; tests/test_gpu.py checks its gradients on CUDA)."""
    torch.manual_seed(0)
    ref = Attention(32, num_heads=2, use_rel_pos=True, input_size=(4, 8))
    _randomise(ref, seed=1, scale=0.5)
    x = torch.randn(1, 4, 8, 32)
    with torch.no_grad():
        qkv = ref.qkv(x).reshape(1, 32, 3, 2, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        rel_h, rel_w = attention.rel_pos_terms(q, ref.rel_pos_h, ref.rel_pos_w, (4, 8))
        out = attention.flex_rel_pos_attention(q, k, v, rel_h, rel_w, ref.scale)
        out = ref.proj(out.transpose(1, 2).reshape(1, 4, 8, -1))
        assert_near(out, ref(x), TOL[torch.float32], "flex output")

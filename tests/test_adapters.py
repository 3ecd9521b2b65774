"""Adapters against references written here: tensorly's Tucker/CP products, materialised
weights, hand-written LoRA, numpy/scipy gate and expert computations, segment-anything's encoder."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import tensorly as tl
import torch
from scipy.signal import correlate2d
from scipy.special import erf
from scipy.stats import norm
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from mtsam.adapters.base import (
    AdapterModule,
    adapters_of,
    collect_aux_losses,
    emit_aux_loss,
    set_active_tasks,
)
from mtsam.adapters.conv_lora import ConvLoRA, MergeNotSupportedError
from mtsam.adapters.inject import (
    ADAPTERS,
    AdapterInjectionError,
    adapter_count_formula,
    inject_adapters,
    merged_copy,
)
from mtsam.adapters.lora import LoRAHPS, LoRASTL
from mtsam.adapters.regularizers import extra_losses, sum_terms
from mtsam.adapters.spec import AdapterSpec
from mtsam.adapters.tora import ToRACP, ToRATucker
from mtsam.model.msam import hold_frozen_in

D_IN, D_OUT, T = 6, 9, 3

ALL_SPECS = {
    "tora": AdapterSpec(method="tora", r1=3, r2=4, r3=2, dropout=0.0),
    "tora_cp": AdapterSpec(method="tora", decomposition="cp", rank=3, dropout=0.0),
    "lora_stl": AdapterSpec(method="lora_stl", rank=2, dropout=0.0),
    "lora_hps": AdapterSpec(method="lora_hps", rank=2, dropout=0.0),
    "conv_lora": AdapterSpec(method="conv_lora", rank=2, conv_experts=3, dropout=0.0),
}


def tiny_encoder(dtype=torch.float32) -> ImageEncoderViT:
    torch.manual_seed(0)
    enc = ImageEncoderViT(
        img_size=64,
        patch_size=16,
        embed_dim=32,
        depth=2,
        num_heads=2,
        window_size=2,
        global_attn_indexes=(1,),
        use_rel_pos=True,
        out_chans=32,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    return enc.to(dtype)


def linear64(d_in=D_IN, d_out=D_OUT) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(d_in, d_out).double()


def randomise(adapter: nn.Module, seed: int = 3) -> None:
    """Give every trainable tensor a non-trivial value (the init makes the update zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.adapter_parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def run_with_aux(enc: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """An adapted encoder's forward plus the aux dict mSAM's forward would return with it."""
    with collect_aux_losses() as terms:
        y = enc(x)
    return y, {"balance": sum_terms(terms, like=y)}


NO_AUX = {"balance": torch.zeros(())}


# ----------------------------------------------------------------------- tensor references
def test_tucker_update_equals_tensorly_slices():
    a = ToRATucker(linear64(), T, ranks=(3, 4, 2), scaling=0.7)
    randomise(a)
    # Mode order (d_in, d_out, T): factors (U1, U2, U3); dW_t = s * X[:, :, t]^T.
    x = tl.tucker_to_tensor((np_(a.G), [np_(a.U1), np_(a.U2), np_(a.U3)]))
    assert x.shape == (D_IN, D_OUT, T)
    for t in range(T):
        np.testing.assert_allclose(
            np_(a.delta_weight(t)), 0.7 * x[:, :, t].T, rtol=1e-12, atol=1e-12
        )


def test_cp_update_equals_tensorly_slices():
    a = ToRACP(linear64(), T, rank=3, scaling=0.3)
    randomise(a)
    x = tl.cp_to_tensor((np_(a.weights), [np_(a.A), np_(a.B), np_(a.C)]))
    assert x.shape == (D_IN, D_OUT, T)
    for t in range(T):
        np.testing.assert_allclose(
            np_(a.delta_weight(t)), 0.3 * x[:, :, t].T, rtol=1e-12, atol=1e-12
        )


def _materialised_tucker(a: ToRATucker) -> torch.Tensor:
    """Full (T, d_out, d_in) update, differentiable, written independently of the module."""
    x = torch.einsum("pqv,ip,jq,tv->tji", a.G, a.U1, a.U2, a.U3)
    return a.scaling * x


@pytest.mark.parametrize("active", [(0, 1, 2), (2, 0), (1,)])
def test_tucker_factored_forward_and_grads_equal_materialised(active):
    a = ToRATucker(linear64(), T, ranks=(3, 4, 2), scaling=0.5)
    randomise(a)
    a.set_active_tasks(active)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(len(active) * 2, 3, D_IN, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(len(active) * 2, 3, D_OUT, generator=g, dtype=torch.float64)

    y = a(x)
    (y * w).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in a.adapter_parameters()]
    x.grad = None
    for p in a.adapter_parameters():
        p.grad = None

    dw = _materialised_tucker(a)
    w0, b0 = a.base.weight, a.base.bias
    ref = torch.cat(
        [xc @ (w0 + dw[t]).T + b0 for xc, t in zip(x.chunk(len(active)), active, strict=True)]
    )
    (ref * w).sum().backward()
    want = [x.grad] + [p.grad for p in a.adapter_parameters()]
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for gt, wt in zip(got, want, strict=True):
        torch.testing.assert_close(gt, wt, rtol=1e-10, atol=1e-12)


def test_cp_factored_forward_equals_materialised():
    a = ToRACP(linear64(), T, rank=4, scaling=0.5)
    randomise(a)
    x = torch.randn(T * 2, 5, D_IN, dtype=torch.float64)
    dw = 0.5 * torch.einsum("r,ir,jr,tr->tji", a.weights, a.A, a.B, a.C)
    ref = torch.cat(
        [xc @ (a.base.weight + dw[t]).T + a.base.bias for t, xc in enumerate(x.chunk(T))]
    )
    torch.testing.assert_close(a(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ToRATucker(linear64(), T, ranks=(2, 2, 2), scaling=0.5),
        lambda: ToRACP(linear64(), T, rank=2, scaling=0.5),
        lambda: LoRASTL(linear64(), T, rank=2, alpha=1.0),
    ],
)
def test_batch_not_divisible_by_active_tasks(make):
    a = make()
    with pytest.raises(ValueError, match="task-major"):
        a(torch.randn(4, D_IN, dtype=torch.float64))
    with pytest.raises(ValueError, match="task-major"):  # 4 x 3 rows would split, 4 maps not
        a(torch.randn(4, 3, D_IN, dtype=torch.float64))
    with pytest.raises(ValueError, match="out of range"):
        a.set_active_tasks([3])


# ----------------------------------------------------------------------- LoRA
def test_lora_stl_matches_hand_written():
    a = LoRASTL(linear64(), T, rank=2, alpha=6.0)
    randomise(a)
    a.set_active_tasks([2, 1])
    x = torch.randn(4, 3, D_IN, dtype=torch.float64)
    w0, b0 = np_(a.base.weight), np_(a.base.bias)
    ref = []
    for xc, t in zip(np_(x).reshape(2, 2, 3, D_IN), (2, 1), strict=True):
        ref.append(xc @ w0.T + b0 + 3.0 * (xc @ np_(a.A[t]).T) @ np_(a.B[t]).T)
    np.testing.assert_allclose(np_(a(x)), np.concatenate(ref), rtol=1e-12)


def test_lora_hps_is_shared_and_matches_hand_written():
    a = LoRAHPS(linear64(), T, rank=2, alpha=4.0)
    randomise(a)
    assert not a.task_specific
    x = torch.randn(5, D_IN, dtype=torch.float64)
    ref = np_(x) @ np_(a.base.weight).T + np_(a.base.bias) + 2.0 * np_(x) @ np_(a.A).T @ np_(a.B).T
    np.testing.assert_allclose(np_(a(x)), ref, rtol=1e-12)
    for t in range(T):
        torch.testing.assert_close(a.delta_weight(t), a.delta_weight(0))


def test_lora_init_kaiming_bounds_and_zero_b():
    torch.manual_seed(0)
    a = LoRASTL(nn.Linear(400, 30), T, rank=8, alpha=8.0)
    bound = 1.0 / np.sqrt(400)  # kaiming-uniform with a = sqrt(5): sqrt(6 / ((1 + 5) fan_in))
    assert a.A.abs().max() <= bound and a.A.abs().max() > 0.9 * bound
    assert not a.B.any()
    assert not torch.equal(a.A[0], a.A[1])


# ----------------------------------------------------------------------- q/k/v parts
@pytest.mark.parametrize("name", ["tora", "lora_stl", "tora_cp"])
def test_qkv_parts_leave_unselected_rows_alone(name):
    enc = tiny_encoder(torch.float64)
    spec = AdapterSpec(**{**ALL_SPECS[name].to_dict(), "qkv_parts": ["q", "v"]})
    (ad, _) = inject_adapters(enc, spec, T)
    randomise(ad)
    x = torch.randn(T, 2, 2, 32, dtype=torch.float64)
    y, y0 = ad(x), ad.base(x)
    assert ad.adapted_out_features == 64
    torch.testing.assert_close(y[..., 32:64], y0[..., 32:64], rtol=0, atol=0)
    assert (y[..., :32] - y0[..., :32]).abs().min() > 0
    assert (y[..., 64:] - y0[..., 64:]).abs().min() > 0
    dw = ad.delta_weight(1)
    assert dw.shape == (96, 32) and not dw[32:64].any()
    torch.testing.assert_close(ad.delta(x), y - y0, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------- Conv-LoRA
def _gate_input():
    # h (N=4, r=2, H=2, W=2); per-map means z are easy to read off.
    z = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5], [2.0, 2.0]])
    h = np.repeat(np.repeat(z[:, :, None, None], 2, axis=2), 2, axis=3)
    h[:, :, 0, 0] += 0.3  # spatial variation, same mean
    h[:, :, 1, 1] -= 0.3
    return torch.tensor(h), z


def _cv2(v):
    return np.var(v, ddof=1) / (np.mean(v) ** 2 + 1e-10)


def test_gate_routing_and_balance_eval_by_hand():
    a = ConvLoRA(linear64(), T, rank=2, alpha=2.0, num_experts=3).double().eval()
    wg = np.array([[1.0, -1.0, 0.0], [0.0, 0.5, 2.0]])
    with torch.no_grad():
        a.gate.w_gate.copy_(torch.tensor(wg))
    h, z = _gate_input()
    choice, loss = a.gate(h)
    logits = z @ wg  # [[1,-1,0],[0,.5,2],[-1,1.25,1],[2,-1,4]]
    assert choice.tolist() == [0, 2, 1, 2] == list(np.argmax(logits, 1))
    counts = np.array([1.0, 1.0, 2.0])  # importance == load in eval (gates are one-hot)
    assert float(loss) == pytest.approx(2 * _cv2(counts), rel=1e-12)


def test_gate_noisy_load_by_hand():
    a = ConvLoRA(linear64(), T, rank=2, alpha=2.0, num_experts=3).double().train()
    wg = np.array([[0.2, -0.1, 0.0], [0.0, 0.1, 0.3]])
    wn = np.array([[0.5, -0.3, 0.1], [0.2, 0.0, -0.4]])
    with torch.no_grad():
        a.gate.w_gate.copy_(torch.tensor(wg))
        a.gate.w_noise.copy_(torch.tensor(wn))
    h, z = _gate_input()
    torch.manual_seed(11)
    choice, loss = a.gate(h)
    torch.manual_seed(11)
    eps = torch.randn(4, 3, dtype=torch.float64).numpy()
    clean = z @ wg
    std = np.log1p(np.exp(z @ wn)) + 1e-2
    noisy = clean + eps * std
    order = np.sort(noisy, axis=1)[:, ::-1]
    best, second = order[:, :1], order[:, 1:2]
    # Expert j's chance of being top-1 with fresh noise, the others' noisy logits held fixed.
    p = np.where(noisy > second, norm.cdf((clean - second) / std), norm.cdf((clean - best) / std))
    importance = np.bincount(np.argmax(noisy, 1), minlength=3).astype(float)
    assert choice.tolist() == list(np.argmax(noisy, 1))
    assert float(loss.detach()) == pytest.approx(_cv2(importance) + _cv2(p.sum(0)), rel=1e-9)


def test_single_expert_has_no_balance_loss():
    a = ConvLoRA(linear64(), T, rank=2, alpha=2.0, num_experts=1).double().train()
    h, _ = _gate_input()
    choice, loss = a.gate(h)
    assert choice.tolist() == [0, 0, 0, 0] and float(loss) == 0.0


def test_conv_lora_dropout_masks_the_branch_input():
    """One expert (no gate noise): the branch equals dropout(x) A^T -> mix -> B^T by hand, with
    the mask drawn from the same seed, and so do the gradients of x and A."""
    from mtsam.adapters.dropout import keep_mask

    a = ConvLoRA(linear64(), T, rank=2, alpha=4.0, num_experts=1, dropout=0.25).double().train()
    randomise(a)
    x = torch.randn(3, 4, 4, D_IN, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, 4, D_OUT, dtype=torch.float64)
    torch.manual_seed(7)
    y = a(x)
    got = torch.autograd.grad(y, [x, a.A], g)
    torch.manual_seed(7)
    xd = x * keep_mask(x.shape, a.dropout._q, dtype=x.dtype) / (1 - a.dropout.cpu_p)
    h = (xd @ a.A.T).permute(0, 3, 1, 2)
    mixed = (h + a.experts[0](h)).permute(0, 2, 3, 1)
    ref = x @ a.base.weight.T + a.base.bias + 2.0 * mixed @ a.B.T
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for got_g, want_g in zip(got, torch.autograd.grad(ref, [x, a.A], g), strict=True):
        torch.testing.assert_close(got_g, want_g, rtol=1e-12, atol=1e-12)


def _gelu(v):
    return 0.5 * v * (1 + erf(v / np.sqrt(2)))


def test_conv_lora_routes_each_map_to_its_expert():
    a = ConvLoRA(linear64(), T, rank=2, alpha=4.0, num_experts=3).double().eval()
    randomise(a)
    with torch.no_grad():
        a.gate.w_gate.copy_(torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.5, 2.0]]))
        a.A.zero_()
        a.A[0, 0] = a.A[1, 1] = 1.0  # h = x[..., :2], so the gate sees _gate_input's means
    hmap, _ = _gate_input()
    x = torch.randn(4, 2, 2, D_IN, dtype=torch.float64)
    x[..., :2] = hmap.permute(0, 2, 3, 1)
    routed: list[list[int]] = []
    a.gate.register_forward_hook(lambda m, args, out: routed.append(out[0].tolist()))
    y = a(x)
    h = (x @ a.A.T).permute(0, 3, 1, 2)
    (choice,) = routed
    assert choice == [0, 2, 1, 2]
    for n, e in enumerate(choice):
        mapped = h[n : n + 1] + a.experts[e](h[n : n + 1])
        ref = x[n] @ a.base.weight.T + a.base.bias + 2.0 * mapped[0].permute(1, 2, 0) @ a.B.T
        torch.testing.assert_close(y[n], ref, rtol=1e-12, atol=1e-12)
    # Expert 1 (scale 1) by hand: 3x3 cross-correlation with zero padding, bias, GELU.
    n = choice.index(0)
    conv = a.experts[0].conv
    hn = np_(h[n])
    want = np.stack(
        [
            _gelu(
                sum(correlate2d(hn[c], np_(conv.weight[o, c]), mode="same") for c in range(2))
                + float(conv.bias[o].detach())
            )
            for o in range(2)
        ]
    )
    np.testing.assert_allclose(np_(a.experts[0](h[n : n + 1]))[0], want, rtol=1e-10, atol=1e-12)


def test_conv_lora_experts_keep_the_bottleneck_dtype_under_autocast(monkeypatch):
    """CUDA autocast runs bicubic resampling in float32 while the bottleneck is bf16 (and does
    not promote index_copy, as CPU autocast does): every expert must hand back the
    bottleneck's dtype for the mixture. Emulated on CPU autocast, which keeps bicubic in bf16,
    by an interpolate that returns float32."""
    interpolate = torch.nn.functional.interpolate
    monkeypatch.setattr(
        torch.nn.functional, "interpolate", lambda *a, **k: interpolate(*a, **k).float()
    )
    a = ConvLoRA(linear64().float(), T, rank=2, alpha=4.0, num_experts=3).eval()
    randomise(a)
    h = torch.randn(2, 2, 4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for expert in a.experts:
            assert expert(h).dtype == torch.bfloat16, expert.scale


def test_conv_lora_needs_token_maps_and_cannot_merge():
    a = ConvLoRA(linear64(), T, rank=2, alpha=4.0, num_experts=2).double()
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        a(torch.randn(3, D_IN, dtype=torch.float64))
    with pytest.raises(MergeNotSupportedError, match="non-linear"):
        a.merge(0)
    assert isinstance(MergeNotSupportedError("x"), NotImplementedError)


# ----------------------------------------------------------------------- on the encoder
@pytest.mark.parametrize("name", list(ALL_SPECS))
@pytest.mark.parametrize("train", [False, True])
def test_every_adapter_is_an_exact_noop_at_init(name, train):
    enc = tiny_encoder()
    x = torch.randn(T, 3, 64, 64)
    enc.train(train)
    with torch.no_grad():
        ref = enc(x)
    spec = AdapterSpec(
        **{**ALL_SPECS[name].to_dict(), "targets": ["qkv", "proj", "mlp"], "dropout": 0.1}
    )
    ads = inject_adapters(enc, spec, T)
    assert len(ads) == 2 * 4
    enc.train(train)
    with torch.no_grad():
        assert torch.equal(enc(x), ref)


@pytest.mark.parametrize("name", ["tora", "tora_cp", "lora_stl", "lora_hps"])
def test_merge_equals_adapted_forward(name):
    enc = tiny_encoder(torch.float64)
    spec = AdapterSpec(
        **{**ALL_SPECS[name].to_dict(), "targets": ["qkv", "mlp"], "qkv_parts": ["k", "v"]}
    )
    ads = inject_adapters(enc, spec, T)
    for i, a in enumerate(ads):
        randomise(a, seed=i)
    enc.eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for t in range(T):
        set_active_tasks(enc, [t])
        with torch.no_grad():
            want = enc(x)
        merged = merged_copy(enc, t)
        assert not adapters_of(merged)
        with torch.no_grad():
            torch.testing.assert_close(merged(x), want, rtol=1e-10, atol=1e-10)
        lin = ads[0].merge(t)
        xs = torch.randn(5, 32, dtype=torch.float64)
        ads[0].set_active_tasks([t])
        torch.testing.assert_close(lin(xs), ads[0](xs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["tora", "lora_stl"])
def test_stacked_batch_equals_task_at_a_time(name):
    enc = tiny_encoder(torch.float64)
    ads = inject_adapters(enc, ALL_SPECS[name], T)
    for i, a in enumerate(ads):
        randomise(a, seed=i)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    set_active_tasks(enc, range(T))
    with torch.no_grad():
        stacked = enc(x.repeat(T, 1, 1, 1)).chunk(T)
    for t in range(T):
        set_active_tasks(enc, [t])
        with torch.no_grad():
            torch.testing.assert_close(enc(x), stacked[t], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(stacked[0], stacked[1])


@pytest.mark.parametrize("name", list(ALL_SPECS))
def test_optimizer_steps_change_only_adapter_tensors(name):
    enc = tiny_encoder().requires_grad_(False)
    spec = AdapterSpec(**{**ALL_SPECS[name].to_dict(), "dropout": 0.1})
    ads = inject_adapters(enc, spec, T)
    trainable = [p for a in ads for p in a.adapter_parameters()]
    assert all(p.requires_grad for p in trainable)
    frozen = {n: p.detach().clone() for n, p in enc.named_parameters() if not p.requires_grad}
    tracked = {id(p) for p in trainable}
    # The adapters' new tensors are trainable, the rest stays frozen.
    assert {id(p) for p in enc.parameters() if p.requires_grad} == tracked
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    enc.train()
    set_active_tasks(enc, range(T))
    for _ in range(2):
        opt.zero_grad()
        y, aux = run_with_aux(enc, torch.randn(T, 3, 64, 64))
        loss = y.square().mean() + extra_losses(enc, aux, orth_weight=1e-4)["total"]
        loss.backward()
        opt.step()
    for n, p in enc.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    changed = [not torch.equal(p, b) for p, b in zip(trainable, before, strict=True)]
    assert sum(changed) >= 2


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(ALL_SPECS))
def test_every_adapter_runs_under_bf16_autocast(name, base_dtype):
    """The GPU default (bf16 autocast, optionally a bf16 frozen base) on CPU autocast: every
    adapted linear runs in bf16 and gives the float32 result to bf16 accuracy (the first one,
    whose input differs only by the patch embedding's rounding; the random updates are large,
    so later blocks' attention amplifies rounding), and the adapters' gradients are float32."""
    enc = tiny_encoder()
    ads = inject_adapters(enc, ALL_SPECS[name], T)
    for i, a in enumerate(ads):
        randomise(a, seed=i)
    enc.eval()  # no dropout or gate noise: the two runs see the same branches
    set_active_tasks(enc, range(T))
    x = torch.randn(T, 3, 64, 64)
    outputs: list[torch.Tensor] = []
    for a in ads:
        a.register_forward_hook(lambda m, args, out: outputs.append(out))
    with torch.no_grad():
        enc(x)
    want = outputs[0]
    outputs.clear()
    hold_frozen_in(enc, base_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = enc(x)
    assert [o.dtype for o in outputs] == [torch.bfloat16] * len(ads)
    err = float((outputs[0].detach().float() - want).norm() / want.norm())
    assert err < 2e-2, err
    got.float().square().mean().backward()
    for a in ads:  # Conv-LoRA's unpicked experts and noise layer get none in eval mode
        grads = [p.grad for p in a.adapter_parameters() if p.grad is not None]
        assert len(grads) >= 2
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == base_dtype for p in enc.parameters() if not p.requires_grad)


# ----------------------------------------------------------------------- regularisers
def test_orth_regulariser_by_hand():
    enc = tiny_encoder(torch.float64)
    ads = inject_adapters(enc, AdapterSpec(method="tora", r1=3, r2=4, r3=2), T)
    for i, a in enumerate(ads):
        randomise(a, seed=i)
    terms = []
    for a in ads:
        mats = [np_(a.U1), np_(a.U2)] + [np_(a.G)[:, :, v] for v in range(2)]
        terms += [np.sqrt(((m.T @ m - np.eye(m.shape[1])) ** 2).sum()) for m in mats]
    with torch.no_grad():
        out = extra_losses(enc, NO_AUX, orth_weight=0.25)
    assert len(terms) == 2 * 4
    assert float(out["orth_reg"]) == pytest.approx(np.mean(terms), rel=1e-12)
    assert float(out["total"]) == pytest.approx(0.25 * np.mean(terms), rel=1e-12)
    assert float(out["balance"]) == 0.0


def test_orth_regulariser_is_float32_under_autocast():
    """bf16 autocast (the GPU default) must not round the Gram matrices: near-orthogonal
    factors leave a residual far below bf16's resolution of 1.0."""
    enc = tiny_encoder()
    ads = inject_adapters(enc, AdapterSpec(method="tora", r1=3, r2=4, r3=2), T)
    with torch.no_grad():
        for a in ads:
            for m in (a.U1, a.U2):
                q, _ = torch.linalg.qr(torch.randn(m.shape, dtype=torch.float64))
                m.copy_(q + 1e-3 * torch.randn(m.shape, dtype=torch.float64))
            a.G.normal_()
    want = extra_losses(enc, NO_AUX, orth_weight=1.0)["orth_reg"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = extra_losses(enc, NO_AUX, orth_weight=1.0)["orth_reg"]
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_orth_regulariser_at_init_order_of_magnitude():
    # N(0, 1) factors: ||U^T U - I||_F ~ d sqrt(R) on the diagonal; G = 0 gives sqrt(R2).
    torch.manual_seed(0)
    a = ToRATucker(nn.Linear(256, 768), T, ranks=(8, 8, 2), scaling=0.5)
    terms = [float(t.detach()) for t in a.orth_terms()]
    assert terms[0] == pytest.approx(255 * np.sqrt(8), rel=0.1)
    assert terms[1] == pytest.approx(767 * np.sqrt(8), rel=0.1)
    assert terms[2:] == pytest.approx([np.sqrt(8)] * 2, rel=1e-6)


def test_cp_orth_terms_and_lora_has_none():
    a = ToRACP(linear64(), T, rank=3, scaling=0.5)
    want = [np.linalg.norm(np_(m).T @ np_(m) - np.eye(3)) for m in (a.A, a.B)]
    assert [float(t.detach()) for t in a.orth_terms()] == pytest.approx(want, rel=1e-12)
    enc = tiny_encoder()
    inject_adapters(enc, ALL_SPECS["lora_stl"], T)
    out = extra_losses(enc, NO_AUX, orth_weight=1.0)
    assert float(out["total"]) == 0.0 and float(out["orth_reg"]) == 0.0


def test_balance_sums_layers():
    """Each Conv-LoRA layer emits 1e-2 x its gate's CV^2 sum once per forward into the
    enclosing collection; extra_losses adds the collected terms up. Nothing is kept on the
    adapters: a forward outside a collection leaves no term anywhere."""
    enc = tiny_encoder()
    ads = inject_adapters(enc, ALL_SPECS["conv_lora"], T)
    gate_losses: list[float] = []
    for a in ads:
        a.gate.register_forward_hook(
            lambda m, args, out: gate_losses.append(float(out[1].detach()))
        )
    enc.train()
    _, aux = run_with_aux(enc, torch.randn(2, 3, 64, 64))
    assert len(gate_losses) == len(ads) == 2 and all(v > 0 for v in gate_losses)
    out = {k: v.detach() for k, v in extra_losses(enc, aux, orth_weight=5.0).items()}
    assert float(out["balance"]) == pytest.approx(1e-2 * sum(gate_losses), rel=1e-6)
    assert float(out["total"]) == pytest.approx(1e-2 * sum(gate_losses), rel=1e-6)
    assert float(out["orth_reg"]) == 0.0
    with collect_aux_losses() as outer:
        enc(torch.randn(2, 3, 64, 64))
        with collect_aux_losses() as inner:
            enc(torch.randn(2, 3, 64, 64))
    assert len(outer) == len(inner) == 2  # each forward's terms go to its own collection
    emit_aux_loss(torch.ones(()))  # no collection open: dropped, not stored
    assert not [k for a in ads for k, v in vars(a).items() if isinstance(v, torch.Tensor)]


# ----------------------------------------------------------------------- counts
@pytest.mark.parametrize("name", list(ALL_SPECS))
@pytest.mark.parametrize("targets", [("qkv",), ("qkv", "proj", "mlp")])
def test_parameter_counts_equal_formulas(name, targets):
    enc = tiny_encoder()
    spec = AdapterSpec(
        **{**ALL_SPECS[name].to_dict(), "targets": list(targets), "qkv_parts": ["q", "k"]}
    )
    ads = inject_adapters(enc, spec, T)
    for a in ads:
        assert a.num_parameters() == a.num_parameters_formula()
    assert sum(a.num_parameters() for a in ads) == adapter_count_formula(
        spec, embed_dim=32, depth=2, num_tasks=T
    )


def test_hand_formulas():
    lin = nn.Linear(10, 30)
    assert ToRATucker(lin, 3, ranks=(2, 3, 4), scaling=1).num_parameters() == 20 + 90 + 12 + 24
    assert ToRACP(lin, 3, rank=2, scaling=1).num_parameters() == 2 * (10 + 30 + 3 + 1)
    assert LoRASTL(lin, 3, rank=2, alpha=1).num_parameters() == 3 * 2 * 40
    assert LoRAHPS(lin, 3, rank=2, alpha=1).num_parameters() == 2 * 40
    # LoRA + gate (2 x r x M) + M convs (r x r x 3 x 3 + r).
    assert ConvLoRA(lin, 3, rank=2, alpha=1, num_experts=4).num_parameters() == 80 + 16 + 4 * 38


def test_tora_nyuv2_vit_l_count():
    # The authors' setting: ViT-L (1024 wide, 24 blocks), T = 3, qkv, R1 = R2 = 32, R3 = 4.
    spec = AdapterSpec(method="tora", r1=32, r2=32, r3=4)
    one = ToRATucker.from_spec(nn.Linear(1024, 3072), spec, 3)
    assert one.num_parameters() == 135_180
    assert adapter_count_formula(spec, embed_dim=1024, depth=24, num_tasks=3) == 3_244_320


# ----------------------------------------------------------------------- injection and spec
def test_injection_targets_and_refuses_twice():
    enc = tiny_encoder()
    spec = AdapterSpec(method="lora_stl", targets=("qkv", "proj", "mlp"))
    ads = inject_adapters(enc, spec, T)
    for blk in enc.blocks:
        for m in (blk.attn.qkv, blk.attn.proj, blk.mlp.lin1, blk.mlp.lin2):
            assert isinstance(m, LoRASTL)
    assert [a.out_features for a in ads[:4]] == [96, 32, 128, 32]
    with pytest.raises(AdapterInjectionError, match="already holds 8 LoRASTL"):
        inject_adapters(enc, spec, T)
    with pytest.raises(AdapterInjectionError, match="ImageEncoderViT"):
        inject_adapters(nn.Linear(2, 2), spec, T)


def test_registry_covers_every_method():
    assert set(ADAPTERS) == {
        AdapterSpec(method=m).variant for m in ("lora_stl", "lora_hps", "conv_lora")
    } | {
        "tora_tucker",
        "tora_cp",
    }
    assert all(issubclass(c, AdapterModule) for c in ADAPTERS.values())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("method", "lora"),
        ("method", "none"),
        ("decomposition", "tt"),
        ("r1", 0),
        ("r3", 1.5),
        ("rank", True),
        ("alpha", 0),
        ("scaling", "big"),
        ("dropout", 1.0),
        ("targets", ()),
        ("targets", "qkv"),
        ("qkv_parts", "qv"),
        ("targets", ("qkv", "attn")),
        ("qkv_parts", ("q", "q")),
        ("conv_experts", 0),
    ],
)
def test_bad_spec_field_is_named(field, value):
    with pytest.raises(ValueError, match=f"'{field}'"):
        AdapterSpec(**{field: value})


def test_spec_dict_round_trip():
    spec = AdapterSpec(method="conv_lora", targets=["qkv", "mlp"], qkv_parts=["v"], conv_experts=2)
    assert AdapterSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown fields"):
        AdapterSpec.from_dict({**spec.to_dict(), "ranks": 3})


# ----------------------------------------------------------------------- growth table / plot
def test_param_growth_formulas_and_plot(tmp_path):
    from mtsam.adapters.growth import growth_markdown, param_growth, plot_param_growth

    rows = {(r["model"], r["tasks"]): r for r in param_growth(max_tasks=10)}
    assert len(rows) == 30
    assert rows[("vit_l", 3)]["tora"] == 3_244_320
    for t in (1, 5, 10):
        # ViT-H: 32 blocks of qkv 1280 -> 3840; LoRA rank 32; ToRA 32/32/4.
        assert rows[("vit_h", t)]["lora_stl"] == t * 32 * 32 * (1280 + 3840)
        assert rows[("vit_h", t)]["lora_hps"] == 32 * 32 * (1280 + 3840)
        assert rows[("vit_h", t)]["tora"] == 32 * (1280 * 32 + 3840 * 32 + 4 * t + 32 * 32 * 4)
    assert "| vit_b | 10 |" in growth_markdown(list(rows.values()))
    png = plot_param_growth(tmp_path / "sub" / "growth.png", max_tasks=4)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------- branch dropout
def test_keep_mask_rate_and_independent_lanes():
    from mtsam.adapters.dropout import keep_mask

    torch.manual_seed(0)
    q = round(0.1 * 65536)
    m = keep_mask((1000, 2000), q, dtype=torch.float64)
    p_keep = 1 - q / 65536
    assert m.shape == (1000, 2000) and m.dtype == torch.float64
    assert set(m.unique().tolist()) == {0.0, 1.0}
    lanes = m.view(-1, 4)  # the four 16-bit lanes of each random word
    for i in range(4):
        assert abs(float(lanes[:, i].mean()) - p_keep) < 2e-3
        for j in range(i + 1, 4):
            assert abs(float((lanes[:, i] * lanes[:, j]).mean()) - p_keep**2) < 2e-3
    assert keep_mask((3,), q).shape == (3,)  # odd sizes
    assert float(keep_mask((10_000,), 0).min()) == 1.0  # q = 0 drops nothing
    torch.manual_seed(0)
    assert torch.equal(keep_mask((1000, 2000), q, dtype=torch.float64), m)  # torch's seed fixes it
    with pytest.raises(ValueError, match="q must be"):
        keep_mask((3,), 70_000)


def test_masked_projection_gradients_each_input_alone_and_under_autocast():
    from mtsam.adapters.dropout import BranchDropout, keep_mask

    d = BranchDropout(0.25).train()
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 3, dtype=torch.float64)
    torch.manual_seed(0)
    mask = keep_mask(x.shape, d._q, dtype=x.dtype)
    want_x, want_w = torch.autograd.grad((x * mask) @ w * d.cpu_scale, [x, w], g)
    for inputs, wrt, want in (((x.detach(), w), w, want_w), ((x, w.detach()), x, want_x)):
        torch.manual_seed(0)
        h, scale = d.project(*inputs)
        torch.testing.assert_close(torch.autograd.grad(h * scale, wrt, g)[0], want)
    torch.manual_seed(0)
    h, _ = d.project(x, w)
    (gw,) = torch.autograd.grad(h.pow(2).sum(), [w], create_graph=True)
    with pytest.raises(RuntimeError):  # once differentiable: no silently wrong 2nd derivative
        torch.autograd.grad(gw.sum(), [x])
    xf, wf = torch.randn(6, 5, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hb, _ = d.project(xf, wf)
    hb.float().sum().backward()
    assert xf.grad.shape == xf.shape and wf.grad.shape == wf.shape


def test_branch_dropout_modes():
    from mtsam.adapters.dropout import BranchDropout

    x = torch.randn(4, 8)
    d = BranchDropout(0.3)
    d.eval()
    out, scale = d(x)
    assert out is x and scale == 1.0
    d.train()
    out, scale = d(x)
    kept = out != 0
    assert torch.equal(out[kept], x[kept]) and scale == pytest.approx(1 / (1 - d.cpu_p))
    assert abs(d.cpu_p - 0.3) < 1e-5
    assert BranchDropout(0.0).train()(x)[0] is x
    with pytest.raises(ValueError, match="dropout"):
        BranchDropout(1.0)


@pytest.mark.parametrize("cls", [ToRATucker, ToRACP, LoRASTL, LoRAHPS])
def test_dropout_only_on_the_branch_and_rescaled(cls):
    from mtsam.adapters.dropout import keep_mask

    kwargs = {
        ToRATucker: dict(ranks=(3, 4, 2), scaling=0.5),
        ToRACP: dict(rank=3, scaling=0.5),
        LoRASTL: dict(rank=2, alpha=3.0),
        LoRAHPS: dict(rank=2, alpha=3.0),
    }[cls]
    a = cls(linear64(), T, dropout=0.25, out_slices=((0, 3), (6, 9)), **kwargs).train()
    randomise(a)
    x = torch.randn(T * 2, 5, D_IN, dtype=torch.float64, requires_grad=True)
    g = torch.randn(T * 2, 5, D_OUT, dtype=torch.float64)
    params = [x, *a.adapter_parameters()]
    torch.manual_seed(4)
    y = a(x)
    grads = torch.autograd.grad(y, params, g)
    torch.manual_seed(4)
    mask = keep_mask(x.shape, round(0.25 * 65536), dtype=x.dtype)
    xd = x * mask / (1 - a.dropout.cpu_p)
    ref = torch.cat(
        [
            xc @ a.base.weight.T + a.base.bias + xdc @ a.delta_weight(t).T
            for t, (xc, xdc) in enumerate(zip(x.chunk(T), xd.chunk(T), strict=True))
        ]
    )
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    # the masked input gradient (in place in the projection's backward) and every factor's
    for got, want in zip(grads, torch.autograd.grad(ref, params, g), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not mask.bool().all()

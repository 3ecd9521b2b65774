"""Conv-LoRA: a LoRA whose bottleneck passes through a mixture of convolutional experts.

The wrapped linear sees a token map (N, H, W, d_in): in segment-anything's ``Attention`` the
qkv / proj linears (and the block's MLP) get the window (windowed blocks, N = B * windows) or
the whole map (global blocks). In the bottleneck h = dropout(x) A^T, read as a map (N, r, H, W):

    gate:     z = mean_{H,W} h  (N, r);  logits = z W_g (+ noise ~ N(0, softplus(z W_n) + 1e-2)
              while training);  each map goes to its top-1 expert (gate value 1).
    expert i: bicubic upsample by i, 3x3 conv (r -> r, bias 0) + GELU, bicubic back to (H, W)
    update:   h <- h + expert(h);   y = base(x) + (alpha / r) h B^T

Load balancing (Shazeer et al.'s sparse MoE, as in the authors' code): importance = gate values
summed over the batch, load = number of maps per expert (in training, the smooth estimate
P(expert in top-1 under noise) summed over the batch); loss = (CV^2(importance) + CV^2(load))
* 1e-2 with CV^2(v) = var(v) / (mean(v)^2 + 1e-10) (unbiased variance; 0 when M = 1). Each
layer emits its term with ``emit_aux_loss``: mSAM's forward returns their sum as ``balance``.

Trainable set: LoRA's A and B, the experts, and the gate when M > 1. The gate reaches the loss
only through the balancing term, which is 0 for a single expert: with M = 1 it would never get
a gradient, so it is frozen then. An expert the gate picks for no map of a step gets no
gradient in that step: the experts are the adapter's ``optional_parameters`` (M > 1).

Shared by all tasks in this platform (``task_specific = False``, like LoRA-HPS): the method is a
single-task PEFT in its paper, the experts are its point, and a per-task copy would be
LoRA-STL's linear parameter growth with M convolutions per task on top.
The experts are non-linear, so the update is not a weight: :meth:`merge` raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mtsam.adapters.base import emit_aux_loss
from mtsam.adapters.lora import LoRABase, lora_count

if TYPE_CHECKING:
    from mtsam.adapters.spec import AdapterSpec


class MergeNotSupportedError(NotImplementedError):
    """The adapter's update depends non-linearly on its input, so it has no weight to fold."""


def conv_lora_count(d_in: int, d_out: int, rank: int, num_experts: int) -> int:
    """LoRA r (d_in + d_out) + gate 2 r M (when M > 1) + experts M (9 r^2 + r)."""
    gate = 2 * rank * num_experts if num_experts > 1 else 0
    return lora_count(d_in, d_out, rank) + gate + num_experts * (9 * rank**2 + rank)


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var(v) / (mean(v)^2 + 1e-10); 0 for a single entry."""
    if v.shape[0] == 1:
        return v.new_zeros(())
    if v.dtype in (torch.float16, torch.bfloat16):
        v = v.float()  # the variance of counts overflows / rounds badly in half precision
    return v.var() / (v.mean() ** 2 + 1e-10)


class NoisyTop1Gate(nn.Module):
    """Noisy top-1 gate over M experts; both linears start at zero (uniform random routing)."""

    def __init__(self, channels: int, num_experts: int, *, noise_epsilon: float = 1e-2) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.noise_epsilon = noise_epsilon
        self.w_gate = nn.Parameter(torch.zeros(channels, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(channels, num_experts))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (N, r, H, W) -> (expert index per map (N,), unscaled CV^2(importance) + CV^2(load))."""
        z = h.mean(dim=(2, 3))
        clean = z @ self.w_gate  # (N, M)
        noisy = self.training and self.num_experts > 1
        if noisy:
            noise_std = F.softplus(z @ self.w_noise) + self.noise_epsilon
            logits = clean + torch.randn_like(clean) * noise_std
        else:
            logits = clean
        top, top_idx = logits.topk(min(2, self.num_experts), dim=1)
        choice = top_idx[:, 0]
        gates = F.one_hot(choice, self.num_experts).to(h.dtype)  # softmax of one logit is 1
        importance = gates.sum(0)
        if noisy:
            # P(expert j is top-1 when only its own noise is redrawn): beat the best other logit.
            normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
            is_in = logits > top[:, 1:2]
            p_in = normal.cdf((clean - top[:, 1:2]) / noise_std)
            p_out = normal.cdf((clean - top[:, 0:1]) / noise_std)
            load = torch.where(is_in, p_in, p_out).sum(0)
        else:
            load = (gates > 0).sum(0).to(h.dtype)
        return choice, cv_squared(importance) + cv_squared(load)


class ConvExpert(nn.Module):
    """Resample by ``scale`` (bicubic), 3x3 conv + GELU, resample back: (n, r, H, W) -> same."""

    def __init__(self, channels: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        size, dtype = h.shape[-2:], h.dtype
        if self.scale != 1:
            h = F.interpolate(h, scale_factor=self.scale, mode="bicubic")
        h = F.gelu(self.conv(h))
        if self.scale != 1:
            h = F.interpolate(h, size=size, mode="bicubic")
        # CUDA autocast runs bicubic resampling in float32: hand back the input's dtype, which
        # the mixture's index_copy needs.
        return h.to(dtype)


class ConvLoRA(LoRABase):
    """LoRA (rank r, scale alpha / r) with M convolutional experts in its bottleneck.

    Args:
        base: the frozen linear, fed (N, H, W, d_in) token maps.
        num_tasks: T (the update is shared; kept for routing bookkeeping).
        rank, alpha: LoRA rank r and alpha.
        num_experts: M; expert i (1-based) works at scale factor i.
        dropout: dropout on the branch input.
        balance_coef: weight of the balancing loss each forward emits (authors: 1e-2).
        out_slices: the adapted output rows.
    """

    task_specific = False

    def __init__(
        self,
        base: nn.Linear,
        num_tasks: int,
        *,
        rank: int,
        alpha: float,
        num_experts: int,
        dropout: float = 0.0,
        balance_coef: float = 1e-2,
        out_slices: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(
            base, num_tasks, rank=rank, alpha=alpha, dropout=dropout, out_slices=out_slices
        )
        self.balance_coef = float(balance_coef)
        w = base.weight
        self.gate = NoisyTop1Gate(self.rank, num_experts).to(w.device, w.dtype)
        self.experts = nn.ModuleList(
            ConvExpert(self.rank, scale=i + 1).to(w.device, w.dtype) for i in range(num_experts)
        )

    @classmethod
    def spec_kwargs(cls, spec: AdapterSpec) -> dict[str, object]:
        return {**super().spec_kwargs(spec), "num_experts": spec.conv_experts}

    @classmethod
    def count_for(cls, spec: AdapterSpec, *, d_in: int, d_out: int, num_tasks: int) -> int:
        return conv_lora_count(d_in, d_out, spec.rank, spec.conv_experts)

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        """The expert mixture on bottleneck maps: h (N, r, H, W) -> h + expert_{g(h)}(h)."""
        choice, balance = self.gate(h)
        emit_aux_loss(balance * self.balance_coef)
        mixed = torch.zeros_like(h)
        for i, expert in enumerate(self.experts):
            idx = (choice == i).nonzero().squeeze(1)
            if idx.numel():
                mixed = mixed.index_copy(0, idx, expert(h.index_select(0, idx)))
        return h + mixed

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, H, W, d_in) -> (N, H, W, d_sel)."""
        if x.ndim != 4:
            raise ValueError(
                f"Conv-LoRA needs a (N, H, W, C) token map as the linear's input, got shape "
                f"{tuple(x.shape)}"
            )
        h, keep_scale = self.dropout.project(x.reshape(-1, self.in_features), self.A.T)
        if keep_scale != 1.0:
            h = h * keep_scale  # (N*, r): small
        h = h.view(*x.shape[:-1], self.rank).permute(0, 3, 1, 2)  # (N, r, H, W)
        h = self.mix(h).permute(0, 2, 3, 1)
        return h @ (self.B.T * self.scale)

    def branch_weight(self, task: int) -> torch.Tensor:
        raise MergeNotSupportedError(
            "Conv-LoRA's update passes through non-linear convolutional experts chosen per input, "
            "so it has no weight matrix to fold into the linear; keep the adapter for inference"
        )

    def merge(self, task: int) -> nn.Linear:
        """Not possible (see :meth:`branch_weight`): raises :class:`MergeNotSupportedError`."""
        return self.branch_weight(task)  # always raises

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        yield from super().adapter_parameters()  # A, B
        if len(self.experts) > 1:
            yield from self.gate.parameters()
        yield from self.experts.parameters()

    def optional_parameters(self) -> Iterator[nn.Parameter]:
        """The experts (M > 1): a step whose maps the gate sends elsewhere leaves one unused."""
        if len(self.experts) > 1:
            yield from self.experts.parameters()

    def num_parameters_formula(self) -> int:
        return conv_lora_count(
            self.in_features, self.adapted_out_features, self.rank, len(self.experts)
        )

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}, experts={len(self.experts)}, rows={self.out_slices}"

"""The LoRA baselines: one LoRA per task (STL) and one LoRA shared by all tasks (HPS).

Both (and Conv-LoRA) build on :class:`LoRABase`. Each LoRA is dW = (alpha / r) * B A with
A (r, d_in) kaiming-uniform(a = sqrt 5) and B (d_sel, r) = 0, so the update is zero at the
start (PEFT's / the LoRA paper's init).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from mtsam.adapters.base import AdapterModule

if TYPE_CHECKING:
    from mtsam.adapters.spec import AdapterSpec


def lora_count(d_in: int, d_out: int, rank: int) -> int:
    """r (d_in + d_out) for one LoRA."""
    return rank * (d_in + d_out)


class LoRABase(AdapterModule):
    """What the LoRA methods share: rank r, scale alpha / r, and the factors A, B.

    A is kaiming-uniform(a = sqrt 5) and B = 0, one pair per task when ``per_task_factors``
    (A (T, r, d_in), B (T, d_sel, r); fan_in d_in for each A[t], as for a lone LoRA), else one
    pair for all tasks (A (r, d_in), B (d_sel, r)); a subclass with shared factors also sets
    ``task_specific = False``. Subclasses define the branch (``low_rank_parts`` or ``branch``),
    ``branch_weight`` and the parameter counts.
    """

    per_task_factors: bool = False

    def __init__(
        self,
        base: nn.Linear,
        num_tasks: int,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        out_slices: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(base, num_tasks, out_slices=out_slices, dropout=dropout)
        self.rank = int(rank)
        self.scale = float(alpha) / self.rank
        w = base.weight
        lead = (num_tasks,) if self.per_task_factors else ()
        a = torch.empty(*lead, self.rank, self.in_features, device=w.device, dtype=w.dtype)
        for a_t in a if self.per_task_factors else [a]:
            nn.init.kaiming_uniform_(a_t, a=math.sqrt(5))
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(w.new_zeros(*lead, self.adapted_out_features, self.rank))

    @classmethod
    def spec_kwargs(cls, spec: AdapterSpec) -> dict[str, object]:
        return {"rank": spec.rank, "alpha": spec.alpha}

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        yield from (self.A, self.B)

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, scale={self.scale}, tasks={self.num_tasks}, rows={self.out_slices}"
        )


class LoRASTL(LoRABase):
    """One LoRA per task: A (T, r, d_in), B (T, d_sel, r); task t's update (alpha/r) B[t] A[t]."""

    per_task_factors = True

    @classmethod
    def count_for(cls, spec: AdapterSpec, *, d_in: int, d_out: int, num_tasks: int) -> int:
        return num_tasks * lora_count(d_in, d_out, spec.rank)

    def _active(self, p: torch.Tensor) -> torch.Tensor:
        if self.active_tasks == tuple(range(self.num_tasks)):
            return p
        return p[list(self.active_tasks)]

    def low_rank_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunk i uses task active_tasks[i]'s LoRA: h (n_active, M, r), w (n_active, d_sel, r)."""
        xd, keep_scale = self.dropout(x)
        h = torch.bmm(self.task_chunks(xd), self._active(self.A).transpose(1, 2))
        return h, self._active(self.B) * (self.scale * keep_scale)

    def branch_weight(self, task: int) -> torch.Tensor:
        return self.scale * self.B[task] @ self.A[task]

    def num_parameters_formula(self) -> int:
        return self.num_tasks * lora_count(self.in_features, self.adapted_out_features, self.rank)


class LoRAHPS(LoRABase):
    """One LoRA shared by every task (hard parameter sharing): A (r, d_in), B (d_sel, r)."""

    task_specific = False

    @classmethod
    def count_for(cls, spec: AdapterSpec, *, d_in: int, d_out: int, num_tasks: int) -> int:
        return lora_count(d_in, d_out, spec.rank)

    def low_rank_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same update for every row, any batch layout: h (N*, r), w (d_sel, r)."""
        h, keep_scale = self.dropout.project(x.reshape(-1, self.in_features), self.A.T)
        return h, self.B * (self.scale * keep_scale)

    def branch_weight(self, task: int) -> torch.Tensor:
        return self.scale * self.B @ self.A

    def num_parameters_formula(self) -> int:
        return lora_count(self.in_features, self.adapted_out_features, self.rank)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}, shared by {self.num_tasks} tasks, rows={self.out_slices}"

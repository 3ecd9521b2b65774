"""ToRA: one low-rank *tensor* update shared by all tasks (Tucker or CP form).

For one adapted linear (d_sel adapted output rows, d_in inputs) and T tasks the update tensor
X has modes ordered (d_in, d_out, T), the order of the factors (U1, U2, U3):

    Tucker:  X = G x1 U1 x2 U2 x3 U3,   G (R1, R2, R3), U1 (d_in, R1), U2 (d_sel, R2), U3 (T, R3)
    CP:      X = [lambda; A, B, C],     lambda (R,), A (d_in, R), B (d_sel, R), C (T, R)

and task t's weight update is dW_t = s * X[:, :, t]^T  (d_sel, d_in). This is tensorly's
``tucker_to_tensor((G, [U1, U2, U3]))`` / ``cp_to_tensor((lambda, [A, B, C]))``.

The forward never materialises X: on a task-major batch it computes x·U1 (one matmul for all
tasks), multiplies each task's chunk by its own small R1 x R2 core slice
core_t = s * sum_v G[:, :, v] U3[t, v] (one bmm), then ·U2^T (one matmul). Its cost is that
of one LoRA of rank ~R1 plus an R1 x R2 product per token.

Init (authors' code): G = 0 (CP: lambda = 0) and every factor ~ N(0, 1), so dW = 0 at start.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from mtsam.adapters.base import AdapterModule

if TYPE_CHECKING:
    from mtsam.adapters.spec import AdapterSpec


def tucker_count(d_in: int, d_out: int, num_tasks: int, r1: int, r2: int, r3: int) -> int:
    """d_in R1 + d_out R2 + T R3 + R1 R2 R3."""
    return d_in * r1 + d_out * r2 + num_tasks * r3 + r1 * r2 * r3


def cp_count(d_in: int, d_out: int, num_tasks: int, rank: int) -> int:
    """R (d_in + d_out + T + 1): three factors and the weight vector lambda."""
    return rank * (d_in + d_out + num_tasks + 1)


def _gram_distance(m: torch.Tensor) -> torch.Tensor:
    """||M^T M - I||_F (not squared) for M (n, k)."""
    eye = torch.eye(m.shape[1], device=m.device, dtype=m.dtype)
    return torch.linalg.matrix_norm(m.T @ m - eye)


class ToRATucker(AdapterModule):
    """ToRA in Tucker form: dW_t = s * (G x1 U1 x2 U2 x3 U3)[:, :, t]^T.

    Args:
        base: the frozen linear.
        num_tasks: T.
        ranks: (R1, R2, R3).
        scaling: s.
        dropout: dropout on the branch input.
        out_slices: the adapted output rows (see :class:`AdapterModule`).
    """

    def __init__(
        self,
        base: nn.Linear,
        num_tasks: int,
        *,
        ranks: tuple[int, int, int],
        scaling: float,
        dropout: float = 0.0,
        out_slices: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(base, num_tasks, out_slices=out_slices, dropout=dropout)
        r1, r2, r3 = (int(r) for r in ranks)
        self.ranks = (r1, r2, r3)
        self.scaling = float(scaling)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.U1 = nn.Parameter(torch.randn(self.in_features, r1, **kw))
        self.U2 = nn.Parameter(torch.randn(self.adapted_out_features, r2, **kw))
        self.U3 = nn.Parameter(torch.randn(num_tasks, r3, **kw))
        self.G = nn.Parameter(torch.zeros(r1, r2, r3, **kw))

    @classmethod
    def spec_kwargs(cls, spec: AdapterSpec) -> dict[str, object]:
        return {"ranks": (spec.r1, spec.r2, spec.r3), "scaling": spec.scaling}

    @classmethod
    def count_for(cls, spec: AdapterSpec, *, d_in: int, d_out: int, num_tasks: int) -> int:
        return tucker_count(d_in, d_out, num_tasks, spec.r1, spec.r2, spec.r3)

    def cores(self, tasks: Sequence[int]) -> torch.Tensor:
        """Scaled per-task core slices s * G x3 U3[t]: (len(tasks), R1, R2)."""
        u3 = self.U3 if tuple(tasks) == tuple(range(self.num_tasks)) else self.U3[list(tasks)]
        return torch.einsum("pqv,tv->tpq", self.G, u3 * self.scaling)

    def low_rank_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factored branch: h = dropout(x) U1 core_t  (N*, R2), w = U2 (d_sel, R2)."""
        n = self.check_task_major(x)
        # (N*, R1): one GEMM for every task
        h, keep_scale = self.dropout.project(x.reshape(-1, self.in_features), self.U1)
        cores = self.cores(self.active_tasks)  # (n_active, R1, R2)
        if keep_scale != 1.0:
            cores = cores * keep_scale
        h = torch.bmm(h.view(n, -1, self.ranks[0]), cores)  # (n_active, M, R2)
        return h.reshape(-1, self.ranks[1]), self.U2

    def branch_weight(self, task: int) -> torch.Tensor:
        """s * U2 core_t^T U1^T: (d_sel, d_in)."""
        return self.U2 @ self.cores([task])[0].T @ self.U1.T

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        yield from (self.U1, self.U2, self.U3, self.G)

    def orth_terms(self) -> list[torch.Tensor]:
        """[||U1^T U1 - I||, ||U2^T U2 - I||] + [||G_v^T G_v - I|| for each v < R3] (authors)."""
        terms = [_gram_distance(self.U1), _gram_distance(self.U2)]
        terms += [_gram_distance(self.G[:, :, v]) for v in range(self.ranks[2])]
        return terms

    def num_parameters_formula(self) -> int:
        return tucker_count(
            self.in_features, self.adapted_out_features, self.num_tasks, *self.ranks
        )

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}, scaling={self.scaling}, tasks={self.num_tasks}, rows={self.out_slices}"


class ToRACP(AdapterModule):
    """ToRA in CP form: dW_t = s * B diag(lambda * C[t]) A^T.

    The cheaper variant: a CP tensor is a Tucker tensor with a super-diagonal core, so there is
    no R1 x R2 x R3 core, only a weight vector lambda (R,) that starts at zero (the role of
    G = 0). Orthogonal regulariser: [||A^T A - I||, ||B^T B - I||] (the analogues of U1, U2);
    the task factor C and lambda are not regularised, as U3 is not in the Tucker form.
    """

    def __init__(
        self,
        base: nn.Linear,
        num_tasks: int,
        *,
        rank: int,
        scaling: float,
        dropout: float = 0.0,
        out_slices: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(base, num_tasks, out_slices=out_slices, dropout=dropout)
        self.rank = int(rank)
        self.scaling = float(scaling)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.A = nn.Parameter(torch.randn(self.in_features, self.rank, **kw))
        self.B = nn.Parameter(torch.randn(self.adapted_out_features, self.rank, **kw))
        self.C = nn.Parameter(torch.randn(num_tasks, self.rank, **kw))
        self.weights = nn.Parameter(torch.zeros(self.rank, **kw))

    @classmethod
    def spec_kwargs(cls, spec: AdapterSpec) -> dict[str, object]:
        return {"rank": spec.rank, "scaling": spec.scaling}

    @classmethod
    def count_for(cls, spec: AdapterSpec, *, d_in: int, d_out: int, num_tasks: int) -> int:
        return cp_count(d_in, d_out, num_tasks, spec.rank)

    def task_scales(self, tasks: Sequence[int]) -> torch.Tensor:
        """s * lambda * C[t]: (len(tasks), R)."""
        c = self.C if tuple(tasks) == tuple(range(self.num_tasks)) else self.C[list(tasks)]
        return c * (self.weights * self.scaling)

    def low_rank_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h = dropout(x) A * (s lambda C[t])  (N*, R), w = B (d_sel, R)."""
        n = self.check_task_major(x)
        h, keep_scale = self.dropout.project(x.reshape(-1, self.in_features), self.A)
        h = h.view(n, -1, self.rank)  # (n_active, M, R)
        h = h * (self.task_scales(self.active_tasks) * keep_scale).unsqueeze(1)
        return h.reshape(-1, self.rank), self.B

    def branch_weight(self, task: int) -> torch.Tensor:
        return (self.B * self.task_scales([task])) @ self.A.T

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        yield from (self.A, self.B, self.C, self.weights)

    def orth_terms(self) -> list[torch.Tensor]:
        return [_gram_distance(self.A), _gram_distance(self.B)]

    def num_parameters_formula(self) -> int:
        return cp_count(self.in_features, self.adapted_out_features, self.num_tasks, self.rank)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling}, tasks={self.num_tasks}, rows={self.out_slices}"

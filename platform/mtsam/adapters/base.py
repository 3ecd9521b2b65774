"""The one interface every adapter method implements.

An adapter wraps one frozen ``nn.Linear`` of the image encoder. Its input is a *task-major
stacked batch*: the leading dimension holds ``len(active_tasks)`` equal chunks, chunk ``i``
belonging to task ``active_tasks[i]``. mSAM sets ``active_tasks`` before each encoder pass
(all tasks for the stacked path, one task for the task-at-a-time path, any task for inference).

Trainability is structural: mSAM collects ``adapter_parameters()`` of every ``AdapterModule``
it finds by type, never by parameter names.

An adapter may update only some rows of the base output (``out_slices``, e.g. the q and v
thirds of a fused qkv linear). Subclasses compute their own rows only (:meth:`branch`,
:meth:`branch_weight`, ``d_sel = adapted_out_features`` wide); this class scatters them into
the full output (zeros elsewhere) for :meth:`delta`, :meth:`delta_weight` and :meth:`forward`.

A loss term that depends on the forward (Conv-LoRA's load balancing) leaves through the
enclosing model's forward, never through state kept on the adapter: the adapter hands it to
:func:`emit_aux_loss`, the model's forward gathers the terms of its own call with
:func:`collect_aux_losses` and returns them with its outputs (the way mixture-of-experts models
return their auxiliary loss). Data parallelism needs this: DDP looks for the tensors a step
uses by walking back from what the wrapped forward returned, so a term added outside it would
reach tensors DDP had already counted as unused.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
from torch import nn

from mtsam.adapters.dropout import BranchDropout

if TYPE_CHECKING:
    from mtsam.adapters.spec import AdapterSpec


class AdapterModule(nn.Module, ABC):
    """A frozen base linear plus a trainable low-rank update.

    Subclasses implement :meth:`branch` (the adapter branch on their output rows) and the
    bookkeeping methods. ``task_specific`` is False when the update is the same for every task
    (shared LoRA), which lets mSAM run the encoder once for all tasks instead of once per task.

    Args:
        base: the frozen linear (d_out x d_in); its parameters are set to requires_grad=False.
        num_tasks: T, the number of tasks.
        out_slices: (start, stop) row ranges of the base output that receive the update, in
            increasing order; None for all rows.
        dropout: dropout probability on the branch input (training mode only); subclasses call
            ``x_masked, scale = self.dropout(x)`` and fold ``scale`` into a small factor.
    """

    task_specific: bool = True

    def __init__(
        self,
        base: nn.Linear,
        num_tasks: int,
        *,
        out_slices: Sequence[tuple[int, int]] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if not isinstance(base, nn.Linear):
            raise TypeError(f"an adapter wraps an nn.Linear, got {type(base).__name__}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.num_tasks = num_tasks
        self.active_tasks: tuple[int, ...] = tuple(range(num_tasks))
        d_out = base.out_features
        slices = (
            ((0, d_out),) if out_slices is None else tuple((int(a), int(b)) for a, b in out_slices)
        )
        prev = 0
        for a, b in slices:
            if not prev <= a < b <= d_out:
                raise ValueError(
                    f"out_slices {slices}: expected increasing ranges within [0, {d_out})"
                )
            prev = b
        self.out_slices = slices
        self.dropout = BranchDropout(dropout)

    @classmethod
    def from_spec(
        cls,
        base: nn.Linear,
        spec: AdapterSpec,
        num_tasks: int,
        *,
        out_slices: Sequence[tuple[int, int]] | None = None,
    ) -> AdapterModule:
        """Build this method's adapter around ``base`` with the sizes in ``spec``."""
        return cls(
            base, num_tasks, out_slices=out_slices, dropout=spec.dropout, **cls.spec_kwargs(spec)
        )

    @classmethod
    @abstractmethod
    def spec_kwargs(cls, spec: AdapterSpec) -> dict[str, object]:
        """This method's own constructor arguments taken from ``spec`` (sizes, scaling)."""

    @classmethod
    @abstractmethod
    def count_for(cls, spec: AdapterSpec, *, d_in: int, d_out: int, num_tasks: int) -> int:
        """Closed-form trainable count of one adapted (d_out x d_in) linear (d_out = d_sel)."""

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def adapted_out_features(self) -> int:
        """d_sel: the number of output rows that receive the update."""
        return sum(b - a for a, b in self.out_slices)

    @property
    def full_output(self) -> bool:
        return self.out_slices == ((0, self.out_features),)

    def set_active_tasks(self, tasks: Sequence[int]) -> None:
        tasks = tuple(int(t) for t in tasks)
        if not tasks or any(t < 0 or t >= self.num_tasks for t in tasks):
            raise ValueError(f"active tasks {tasks} out of range for {self.num_tasks} tasks")
        self.active_tasks = tasks

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, ..., d_in) with N = len(active_tasks) * B, task-major -> (N, ..., d_out).

        Low-rank methods write base and update into one buffer: for a shared final factor the
        update GEMM creates the output (with the bias) and the frozen GEMM accumulates into it
        in place, so there is no separate update tensor and no output-sized sum; per-task
        factors use one batched ``baddbmm`` on the base output. Under autocast (bf16 on GPU)
        the shared-factor case adds the update out of place instead: autocast does not cast
        in-place ops, so the in-place GEMM would meet a bf16 output and fp32 operands.
        """
        parts = self.low_rank_parts(x)
        if parts is None:
            return self._add_rows(self.base(x), self.branch(x))
        h, w = parts
        w = self._full_rows(w)
        lead = x.shape[:-1]
        if h.ndim == 2:
            x2 = x.reshape(-1, self.in_features)
            if torch.is_autocast_enabled(x.device.type):
                out = torch.addmm(self.base(x2), h, w.T)
            else:
                b = self.base.bias
                out = h @ w.T if b is None else torch.addmm(b, h, w.T)  # fresh (N*, d_out)
                # In place on a fresh, unsaved, non-view tensor: no copy in fwd or bwd.
                out.addmm_(x2, self.base.weight.T)
        else:
            # (A batched in-place GEMM with the frozen weight broadcast over tasks is slower
            # on CPU than one big GEMM plus an out-of-place baddbmm.)
            y = self.base(x).reshape(h.shape[0], -1, self.out_features)
            out = torch.baddbmm(y, h, w.transpose(1, 2))
        return out.view(*lead, self.out_features)

    def _full_rows(self, w: torch.Tensor) -> torch.Tensor:
        """w (..., d_sel, k) -> (..., d_out, k) with zero rows outside ``out_slices``."""
        if self.full_output:
            return w
        pieces, start, used = [], 0, 0
        for a, e in self.out_slices:
            if a > start:
                pieces.append(w.new_zeros((*w.shape[:-2], a - start, w.shape[-1])))
            pieces.append(w[..., used : used + e - a, :])
            used += e - a
            start = e
        if start < self.out_features:
            pieces.append(w.new_zeros((*w.shape[:-2], self.out_features - start, w.shape[-1])))
        return torch.cat(pieces, dim=-2)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter branch alone: (N, ..., d_in) -> (N, ..., d_out), zeros on unadapted rows."""
        b = self.branch(x)
        return self._add_rows(b.new_zeros((*b.shape[:-1], self.out_features)), b)

    def low_rank_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The branch as a final low-rank product, or None if it is not one.

        Returns (h, w) with branch(x) = h @ w^T: either h (N*, k) and w (d_sel, k) shared by
        all rows, or h (n_active, M, k) and w (n_active, d_sel, k) per task chunk; any dropout
        and scale already applied.
        """
        return None

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The update on the adapted rows: (N, ..., d_in) -> (N, ..., d_sel)."""
        parts = self.low_rank_parts(x)
        if parts is None:
            raise NotImplementedError(
                f"{type(self).__name__} defines neither branch nor low_rank_parts"
            )
        h, w = parts
        out = h @ w.T if h.ndim == 2 else torch.bmm(h, w.transpose(1, 2))
        return out.reshape(*x.shape[:-1], self.adapted_out_features)

    def _add_rows(self, y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """y (..., d_out) plus b (..., d_sel) placed on ``out_slices``."""
        if self.full_output:
            return y + b
        pieces, start, used = [], 0, 0
        for a, e in self.out_slices:
            if a > start:
                pieces.append(y[..., start:a])
            pieces.append(y[..., a:e] + b[..., used : used + e - a])
            used += e - a
            start = e
        if start < self.out_features:
            pieces.append(y[..., start:])
        return torch.cat(pieces, dim=-1)

    def check_task_major(self, x: torch.Tensor) -> int:
        """The number of active tasks n, after checking x's batch (dim 0) splits into n chunks."""
        n = len(self.active_tasks)
        if x.shape[0] % n:
            raise ValueError(
                f"batch of {x.shape[0]} is not a task-major stack of {n} active tasks "
                f"{self.active_tasks}"
            )
        return n

    def task_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ..., d) task-major -> (len(active_tasks), N / len(active_tasks) * ..., d) view."""
        return x.reshape(self.check_task_major(x), -1, x.shape[-1])

    # ------------------------------------------------------------------ parameters and losses
    @abstractmethod
    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable tensors of this adapter (never the frozen base).

        Each of them receives a gradient (possibly zero) in every training step, except those
        :meth:`optional_parameters` names: data-parallel training relies on it.
        """

    def optional_parameters(self) -> Iterator[nn.Parameter]:
        """The part of :meth:`adapter_parameters` that a training step may leave without a
        gradient (Conv-LoRA: the experts its gate may not pick). None for most methods."""
        return iter(())

    def orth_terms(self) -> list[torch.Tensor]:
        """Frobenius norms ||M^T M - I|| this layer adds to the orthogonal regulariser's list."""
        return []

    @abstractmethod
    def num_parameters_formula(self) -> int:
        """Trainable parameter count from the method's closed-form formula."""

    def num_parameters(self) -> int:
        """Trainable parameter count as counted on the tensors."""
        return sum(p.numel() for p in self.adapter_parameters())

    # ------------------------------------------------------------------ weights and merging
    @abstractmethod
    def branch_weight(self, task: int) -> torch.Tensor:
        """Task ``task``'s update on the adapted rows, (d_sel, d_in)."""

    def delta_weight(self, task: int) -> torch.Tensor:
        """Task ``task``'s full weight update, (d_out, d_in): for merging and reference tests."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task {task} out of range for {self.num_tasks} tasks")
        w = self.branch_weight(task)
        if self.full_output:
            return w
        return self._add_rows(w.new_zeros((self.out_features, self.in_features)).T, w.T).T

    def merge(self, task: int) -> nn.Linear:
        """A plain linear computing base + task ``task``'s update (inference, eval mode)."""
        merged = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None).to(
            self.base.weight.device, self.base.weight.dtype
        )
        with torch.no_grad():
            merged.weight.copy_(self.base.weight + self.delta_weight(task).to(self.base.weight))
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        merged.requires_grad_(False)
        return merged


_AUX_SINK: ContextVar[list[torch.Tensor] | None] = ContextVar("mtsam_aux_losses", default=None)


@contextmanager
def collect_aux_losses() -> Iterator[list[torch.Tensor]]:
    """Gather the loss terms adapters emit while the block runs (a model's forward) in a list.

    Terms emitted outside such a block are dropped: e.g. when activation checkpointing
    recomputes a block during backward, the term of the original forward is already counted.
    """
    terms: list[torch.Tensor] = []
    token = _AUX_SINK.set(terms)
    try:
        yield terms
    finally:
        _AUX_SINK.reset(token)


def emit_aux_loss(term: torch.Tensor) -> None:
    """Hand a scalar loss term of this forward to the enclosing :func:`collect_aux_losses`."""
    sink = _AUX_SINK.get()
    if sink is not None:
        sink.append(term.reshape(()))


def adapters_of(model: nn.Module) -> list[AdapterModule]:
    """Every adapter inside ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, AdapterModule)]


def set_active_tasks(model: nn.Module, tasks: Sequence[int]) -> None:
    """Route the next encoder pass: chunk i of the batch belongs to task ``tasks[i]``."""
    for m in adapters_of(model):
        m.set_active_tasks(tasks)

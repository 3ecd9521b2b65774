"""The one interface every adapter method implements.

An adapter wraps one frozen ``nn.Linear`` of the image encoder. Its input is a *task-major
stacked batch*: the leading dimension holds ``len(active_tasks)`` equal chunks, chunk ``i``
belonging to task ``active_tasks[i]``. mSAM sets ``active_tasks`` before each encoder pass
(all tasks for the stacked path, one task for the task-at-a-time path, any task for inference).

Trainability is structural: mSAM collects ``adapter_parameters()`` of every ``AdapterModule``
it finds by type, never by parameter names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import torch
from torch import nn


class AdapterModule(nn.Module, ABC):
    """A frozen base linear plus a trainable low-rank update.

    Subclasses implement :meth:`delta` (the adapter branch) and the bookkeeping methods.
    ``task_specific`` is False when the update is the same for every task (shared LoRA), which
    lets mSAM run the encoder once for all tasks instead of once per task.
    """

    task_specific: bool = True

    def __init__(self, base: nn.Linear, num_tasks: int) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.num_tasks = num_tasks
        self.active_tasks: tuple[int, ...] = tuple(range(num_tasks))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def set_active_tasks(self, tasks: Sequence[int]) -> None:
        tasks = tuple(int(t) for t in tasks)
        if not tasks or any(t < 0 or t >= self.num_tasks for t in tasks):
            raise ValueError(f"active tasks {tasks} out of range for {self.num_tasks} tasks")
        self.active_tasks = tasks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, ..., d_in) with N = len(active_tasks) * B, task-major -> (N, ..., d_out)."""
        return self.base(x) + self.delta(x)

    @abstractmethod
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter branch alone: (N, ..., d_in) -> (N, ..., d_out)."""

    @abstractmethod
    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable tensors of this adapter (never the frozen base)."""

    def extra_loss(self) -> torch.Tensor | None:
        """A loss term contributed by this layer for the last forward (None when it has none)."""
        return None

    @abstractmethod
    def num_parameters_formula(self) -> int:
        """Trainable parameter count from the method's closed-form formula."""

    def num_parameters(self) -> int:
        """Trainable parameter count as counted on the tensors."""
        return sum(p.numel() for p in self.adapter_parameters())

    @abstractmethod
    def delta_weight(self, task: int) -> torch.Tensor:
        """Task ``task``'s full weight update, (d_out, d_in): for merging and reference tests."""

    def merge(self, task: int) -> nn.Linear:
        """A plain linear computing base + task ``task``'s update (inference, eval mode)."""
        merged = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None).to(
            self.base.weight.device, self.base.weight.dtype
        )
        with torch.no_grad():
            merged.weight.copy_(self.base.weight + self.delta_weight(task).to(self.base.weight))
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged


def adapters_of(model: nn.Module) -> list[AdapterModule]:
    """Every adapter inside ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, AdapterModule)]


def set_active_tasks(model: nn.Module, tasks: Sequence[int]) -> None:
    """Route the next encoder pass: chunk i of the batch belongs to task ``tasks[i]``."""
    for m in adapters_of(model):
        m.set_active_tasks(tasks)

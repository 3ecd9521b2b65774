"""Where the worker loop runs: under Ray Train, or in a bare process (benchmarks, unit tests).

The loop only sees a :class:`WorkerContext`: its rank, the world size, its device, how to
report an epoch (metrics plus an optional checkpoint folder), and the checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device
    report: Callable[[dict[str, Any], Path | None], None]
    resume_from: Callable[[], contextlib.AbstractContextManager[Path | None]]
    node_id: str = "local"
    reports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def _no_checkpoint() -> Iterator[Path | None]:
    yield None


def local_context(checkpoint_root: str | Path | None = None, *, resume: Path | None = None):
    """A single-process context: reports are kept in ``ctx.reports``; checkpoints are copied
    under ``checkpoint_root/checkpoint_<epoch>`` when a root is given."""
    device = torch.device("cpu")

    @contextlib.contextmanager
    def resume_from() -> Iterator[Path | None]:
        yield resume

    ctx = WorkerContext(0, 1, device, report=lambda m, c: None, resume_from=resume_from)

    def report(metrics: dict[str, Any], ckpt: Path | None) -> None:
        entry = dict(metrics)
        if ckpt is not None and checkpoint_root is not None:
            dest = Path(checkpoint_root) / f"checkpoint_{int(metrics['epoch']):04d}"
            shutil.copytree(ckpt, dest, dirs_exist_ok=True)
            entry["checkpoint_path"] = str(dest)
        ctx.reports.append(entry)

    ctx.report = report
    return ctx


def ray_context() -> WorkerContext:
    """The context of a Ray Train worker (call inside ``train_loop_per_worker``)."""
    import ray.train
    import ray.train.torch

    tc = ray.train.get_context()

    def report(metrics: dict[str, Any], ckpt: Path | None) -> None:
        if ckpt is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt)))

    @contextlib.contextmanager
    def resume_from() -> Iterator[Path | None]:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    node_id = "unknown"
    with contextlib.suppress(Exception):
        import ray

        node_id = ray.get_runtime_context().get_node_id()
    return WorkerContext(
        rank=tc.get_world_rank(),
        world_size=tc.get_world_size(),
        device=ray.train.torch.get_device(),
        report=report,
        resume_from=resume_from,
        node_id=node_id,
    )


@contextlib.contextmanager
def scratch_dir(prefix: str = "mtsam-ckpt-") -> Iterator[Path]:
    """A temporary folder for one checkpoint before Ray Train persists it."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)

"""Real data-parallel ranks without Ray: gloo process groups on 127.0.0.1, for tests that start
them with ``torch.multiprocessing.spawn``."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from mtsam.train.context import WorkerContext


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_rank(
    rank: int, port: int, world_size: int = 2, *, timeout: timedelta | None = None
) -> Iterator[WorkerContext]:
    """Join the gloo group at ``port`` as ``rank`` (one thread, loopback only) and yield the
    loop's worker context for it (reports dropped, nothing to resume); leave the group after.
    ``timeout``: how long a collective waits for the other ranks (torch's default if None)."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        **({"timeout": timeout} if timeout is not None else {}),
    )
    try:
        yield WorkerContext(
            rank=rank,
            world_size=world_size,
            device=torch.device("cpu"),
            report=lambda metrics, path: None,
            resume_from=contextlib.nullcontext,
        )
    finally:
        dist.destroy_process_group()

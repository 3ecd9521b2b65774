"""Upload spools left by runs whose tracking back end was unreachable (``jobs/sync_mlflow.py``).

Delivered operations are removed from the spool as they go, so running the sync again sends
nothing twice (a spool fully delivered is deleted); metrics are sent with the step and
timestamp recorded at the time of the call.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtsam.tracking.delivery import Deliverer, DeliveryReport, RunTarget
from mtsam.tracking.spool import Spool, SpoolError, find_spools
from mtsam.tracking.tracker import LOCK_FILE


@dataclass(frozen=True)
class SyncResult:
    spool_path: Path
    report: DeliveryReport | None  # None: skipped (see note) or malformed (see error)
    note: str = ""
    error: str = ""  # why the spool could not be read (naming the file and line)


def sync_spool(
    root: str | Path, *, tracking_uri: str | None = None, request_timeout_s: float = 30.0
) -> list[SyncResult]:
    """Deliver every spool under ``root`` (a spool folder, a spool file or a tree of run
    folders) to the back end named in it, or to ``tracking_uri``. A spool whose tracker is
    still running (its folder is locked), or that names no back end while ``tracking_uri`` is
    None, is skipped with a note; a malformed one with an error, after which the others are
    still synced. Raises FileNotFoundError for a missing ``root``."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such spool folder or file")
    results = []
    for spool in find_spools(root):
        fd = os.open(spool.directory / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                results.append(SyncResult(spool.path, None, "skipped: a tracker is writing it"))
                continue
            try:
                header, ops = spool.load()
                if not tracking_uri and not header.get("tracking_uri"):
                    note = "skipped: its header names no tracking URI (pass one to sync it)"
                    results.append(SyncResult(spool.path, None, note))
                    continue
                report = _sync_one(spool, header, ops, tracking_uri, request_timeout_s)
            except SpoolError as e:
                results.append(SyncResult(spool.path, None, error=str(e)))
                continue
            results.append(SyncResult(spool.path, report))
        finally:
            os.close(fd)
    return results


def _sync_one(
    spool: Spool,
    header: dict[str, Any],
    ops: list[dict[str, Any]],
    tracking_uri: str | None,
    timeout_s: float,
) -> DeliveryReport:
    try:
        target = RunTarget.from_header(header, tracking_uri=tracking_uri)
        d = Deliverer(target, spool, request_timeout_s=timeout_s, reopen=False)
    except (TypeError, ValueError) as e:  # e.g. neither a run id nor experiment and run name
        raise SpoolError(f"{spool.path}: its header names no run to send to ({e})") from None
    d.adopt(ops)
    d.pump(force=True)
    return d.report()


__all__ = ["SyncResult", "sync_spool"]

"""Ordered, failure-tolerant delivery of tracking operations to one MLflow run.

Every operation is queued; each call tries to deliver the queue in order, one attempt per
request (no MLflow retries, a short time-out), and stops at the first failure. After a failure
the next attempt waits for a back-off (1 s doubling to 60 s), so a dead server costs a training
step at most one time-out per back-off period, and a refused connection costs nothing. Whatever
is still queued when a call returns is in the spool file (see :mod:`~mtsam.tracking.spool`), so
a crash loses nothing either. One warning is logged when the back end becomes unreachable and
one line when it is back.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from mtsam.tracking.client import (
    MAX_METRICS_PER_BATCH,
    PARENT_TAG,
    experiment_id,
    find_run_in,
    is_transient,
    log_metric_rows,
    log_params_once,
    make_client,
    one_line,
    set_tags,
)
from mtsam.tracking.spool import Spool, SpoolError
from mtsam.tracking.uri import http_limits

log = logging.getLogger("mtsam.tracking")

CHANGED_PARAM_TAG = "mtsam.changed_param."  # + param key: a value changed after the first log


@dataclass(frozen=True)
class DeliveryReport:
    """What reached MLflow and what did not (still in ``spool_path``)."""

    tracking_uri: str
    run_id: str | None
    delivered: int
    pending: int
    pending_metrics: int
    pending_artifacts: tuple[str, ...]
    rejected: tuple[str, ...]
    spool_path: Path | None

    @property
    def complete(self) -> bool:
        """Everything was delivered (nothing pending, nothing refused)."""
        return self.pending == 0 and not self.rejected

    def summary(self) -> str:
        if self.complete:
            return f"MLflow run {self.run_id}: all {self.delivered} operations delivered"
        parts = []
        if self.pending:
            parts.append(
                f"{self.pending} operations ({self.pending_metrics} metric values, "
                f"{len(self.pending_artifacts)} artifacts) not delivered to {self.tracking_uri}; "
                f"kept in {self.spool_path}: upload with "
                f"python jobs/sync_mlflow.py --spool {self.spool_path.parent if self.spool_path else '?'}"
            )
        if self.rejected:
            parts.append(f"{len(self.rejected)} refused by the server: {'; '.join(self.rejected)}")
        return f"MLflow run {self.run_id}: " + "; ".join(parts)


@dataclass
class RunTarget:
    """The run the operations belong to: known by id, or found/created by name (under a parent)."""

    tracking_uri: str
    experiment: str | None = None
    run_name: str | None = None
    parent_run_id: str | None = None
    run_id: str | None = None
    start_time: int = field(default_factory=lambda: int(time.time() * 1000))

    def header(self) -> dict[str, Any]:
        return {
            "tracking_uri": self.tracking_uri,
            "experiment": self.experiment,
            "run_name": self.run_name,
            "parent_run_id": self.parent_run_id,
            "run_id": self.run_id,
            "start_time": self.start_time,
        }

    @classmethod
    def from_header(cls, h: dict[str, Any], *, tracking_uri: str | None = None) -> RunTarget:
        return cls(
            tracking_uri=tracking_uri or h["tracking_uri"],
            experiment=h.get("experiment"),
            run_name=h.get("run_name"),
            parent_run_id=h.get("parent_run_id"),
            # A run id belongs to the back end it was created on.
            run_id=h.get("run_id")
            if not tracking_uri or tracking_uri == h.get("tracking_uri")
            else None,
            start_time=int(h.get("start_time") or time.time() * 1000),
        )

    def same_run(self, other: RunTarget) -> bool:
        return (self.experiment, self.run_name, self.parent_run_id) == (
            other.experiment,
            other.run_name,
            other.parent_run_id,
        ) and (self.run_id is None or other.run_id is None or self.run_id == other.run_id)


class Deliverer:
    """Queue + spool + back-off in front of one MLflow run."""

    def __init__(
        self,
        target: RunTarget,
        spool: Spool,
        *,
        request_timeout_s: float,
        reopen: bool = True,
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
    ) -> None:
        if target.run_id is None and (target.experiment is None or target.run_name is None):
            raise ValueError("a run target needs a run_id or an experiment and a run name")
        self.target = target
        self.spool = spool
        self.timeout = float(request_timeout_s)
        self.reopen = reopen
        self.min_backoff, self.max_backoff = min_backoff_s, max_backoff_s
        self.client = make_client(target.tracking_uri)
        self.queue: list[dict[str, Any]] = []
        self.spooled: set[int] = set()  # seq of queued operations already in the spool file
        self.next_seq = 0
        self.delivered = 0
        self.rejected: list[str] = []
        self.down_since: float | None = None
        self.backoff = 0.0
        self.next_try = 0.0
        self.opened = False
        self.spool_warned = False
        self.rejections_logged = 0

    # -------------------------------------------------------------------- queue

    def adopt(self, ops: list[dict[str, Any]]) -> None:
        """Put operations read back from the spool at the front, in their order.

        ``seq`` tells queued operations apart (which of them are in the spool file): one whose
        number is taken already (in a spool appended to by two deliverers that did not know of
        each other) gets a new one.
        """
        taken = {op["seq"] for op in self.queue}
        self.next_seq = max([self.next_seq, *(op["seq"] + 1 for op in ops)])
        adopted = []
        for op in ops:
            if op["seq"] in taken:
                op = {**op, "seq": self.next_seq}
                self.next_seq += 1
            taken.add(op["seq"])
            adopted.append(op)
        self.queue = [*adopted, *self.queue]
        self.spooled |= {op["seq"] for op in adopted}

    def adopt_spool(self) -> None:
        """Queue first what an earlier deliverer of this run left in the spool file (so that
        new operations continue its sequence numbers). A spool that cannot be read or that
        belongs to another run is moved aside, for ``jobs/sync_mlflow.py``."""
        spool, t = self.spool, self.target
        if not spool.exists():
            return
        try:
            header, ops = spool.load()
            old = RunTarget.from_header(header)
        except (SpoolError, KeyError, OSError) as e:
            _set_aside(spool, f"unreadable ({e})")
            return
        if old.tracking_uri != t.tracking_uri or not old.same_run(t):
            name = old.run_name or old.run_id
            _set_aside(spool, f"belongs to run {name!r} at {old.tracking_uri}")
            return
        t.run_id = t.run_id or old.run_id
        t.start_time = old.start_time
        self.adopt(ops)
        log.info("MLflow: %d operations left by a previous attempt will be sent first", len(ops))

    def submit(self, op: dict[str, Any], *, pump: bool = True) -> None:
        op = {"seq": self.next_seq, **op}
        self.next_seq += 1
        self.queue.append(op)
        if pump:
            self.pump(budget_s=self.timeout)
        self.persist()

    def persist(self) -> None:
        """Write every queued operation that is not in the spool yet (copying its artifact)."""
        fresh: list[dict[str, Any]] = []
        gone: list[int] = []
        for i, op in enumerate(self.queue):
            if op["seq"] in self.spooled:
                continue
            try:
                self.queue[i] = op = self.spool.stash(op)
            except FileNotFoundError as e:
                gone.append(i)
                self._reject(op, f"cannot copy to the spool: {one_line(e)}")
                continue
            except OSError as e:
                self._warn_spool(e)
                continue
            fresh.append(op)
        for i in reversed(gone):
            del self.queue[i]
        if not fresh:
            return
        try:
            self.spool.append(self.target.header(), [self.spool.relative(op) for op in fresh])
        except OSError as e:
            self._warn_spool(e)
            return
        self.spooled |= {op["seq"] for op in fresh}

    # ----------------------------------------------------------------- delivery

    def pump(self, *, budget_s: float | None = None, force: bool = False) -> bool:
        """Deliver queued operations in order; True when the queue is empty afterwards.

        Skipped during the back-off unless ``force``; stops at the first transient failure and
        (when ``budget_s`` is given) once that much time has been spent.
        """
        if not self.queue and self.opened:
            return True
        if not force and time.monotonic() < self.next_try:
            return False
        start = time.monotonic()
        changed = False
        try:
            with http_limits(self.timeout):
                while True:
                    try:
                        self._open()
                        while self.queue:
                            if budget_s is not None and time.monotonic() - start > budget_s:
                                break
                            changed |= self._drop(self._deliver_head())
                        break
                    except Exception as e:
                        if not (self.opened and self.queue) or is_transient(e):
                            self._went_down(e)
                            return False
                        # The back end refused this operation itself: retrying cannot help.
                        head = self.queue.pop(0)
                        changed |= head["seq"] in self.spooled
                        self._reject(head, one_line(e))
        finally:
            if changed:
                self._rewrite()
        self._came_back()
        return not self.queue

    def _drop(self, n: int) -> bool:
        """Forget the first ``n`` (delivered) operations; True if any of them was spooled."""
        was_spooled = False
        for op in self.queue[:n]:
            if op["seq"] in self.spooled:
                was_spooled = True
                self.spooled.discard(op["seq"])
            self.spool.release(op)
        del self.queue[:n]
        self.delivered += n
        return was_spooled

    def _rewrite(self) -> None:
        try:
            self.spool.rewrite(
                self.target.header(),
                [self.spool.relative(op) for op in self.queue if op["seq"] in self.spooled],
            )
        except OSError as e:
            self._warn_spool(e)

    def _warn_spool(self, e: BaseException) -> None:
        if not self.spool_warned:
            self.spool_warned = True
            log.warning(
                "MLflow spool %s not writable (%s): undelivered operations kept in memory only",
                self.spool.path,
                one_line(e),
            )

    def _open(self) -> None:
        if self.opened:
            return
        t, c = self.target, self.client
        if t.run_id is not None:
            try:
                c.get_run(t.run_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST" or t.run_name is None:
                    raise
                log.warning(
                    "MLflow run %s not found at %s: looking the run up by name %r instead",
                    t.run_id,
                    t.tracking_uri,
                    t.run_name,
                )
                t.run_id = None
            else:
                if self.reopen:
                    c.update_run(t.run_id, status="RUNNING")
        if t.run_id is None:
            if t.experiment is None or t.run_name is None:
                raise ValueError("no run id and no experiment/run name to find the run by")
            exp = experiment_id(c, t.tracking_uri, t.experiment)
            t.run_id = find_run_in(
                c,
                exp,
                run_name=t.run_name,
                parent_run_id=t.parent_run_id,
                top_level=t.parent_run_id is None,
            )
            if t.run_id is None:
                tags = {PARENT_TAG: t.parent_run_id} if t.parent_run_id else {}
                run = c.create_run(exp, start_time=t.start_time, tags=tags, run_name=t.run_name)
                t.run_id = run.info.run_id
            elif self.reopen:
                c.update_run(t.run_id, status="RUNNING")
            if self.spool.exists():
                self._rewrite()  # the header now names the run id
        self.opened = True

    def _deliver_head(self) -> int:
        """Deliver the first queued operation (or the run of consecutive metric operations
        at the head, merged into batches); returns how many operations were delivered."""
        run_id, c, head = self.target.run_id, self.client, self.queue[0]
        assert run_id is not None
        kind = head["op"]
        if kind == "metrics":
            # One request for consecutive metric operations (up to MLflow's batch size), so a
            # batch is delivered entirely or not at all.
            n, rows = 0, []
            while n < len(self.queue) and self.queue[n]["op"] == "metrics":
                op = self.queue[n]
                if n and len(rows) + len(op["metrics"]) > MAX_METRICS_PER_BATCH:
                    break
                rows += [
                    (k, float(v), op["timestamp"], op["step"]) for k, v in op["metrics"].items()
                ]
                n += 1
            log_metric_rows(c, run_id, rows)
            return n
        if kind == "params":
            conflicts = log_params_once(c, run_id, head["params"])
            if conflicts:
                # MLflow params cannot change (e.g. train.epochs raised on --resume): the new
                # values go into tags, which the run page shows next to the params.
                set_tags(
                    c,
                    run_id,
                    {f"{CHANGED_PARAM_TAG}{k}": str(head["params"][k]) for k in conflicts},
                )
                log.warning(
                    "MLflow run %s already has different values for params %s: kept the old ones "
                    "(MLflow params cannot change) and put the new ones in tags %s<param>",
                    run_id,
                    ", ".join(sorted(conflicts)[:10]),
                    CHANGED_PARAM_TAG,
                )
        elif kind == "tags":
            set_tags(c, run_id, head["tags"])
        elif kind == "artifact":
            path = self.spool.resolve(head["path"])
            if path.is_dir():
                c.log_artifacts(run_id, str(path), head.get("artifact_path"))
            elif path.is_file():
                c.log_artifact(run_id, str(path), head.get("artifact_path"))
            else:
                raise FileNotFoundError(f"{path}: artifact to upload is gone")
        elif kind == "terminate":
            c.set_terminated(run_id, status=head["status"], end_time=head["end_time"])
        return 1

    # ------------------------------------------------------------- bookkeeping

    def _reject(self, op: dict[str, Any], reason: str) -> None:
        what = describe(op)
        self.rejected.append(f"{what}: {reason}")
        if self.rejections_logged < 5:
            self.rejections_logged += 1
            more = (
                " (further refusals are only in the final report)"
                if self.rejections_logged == 5
                else ""
            )
            log.warning(
                "MLflow refused %s for run %s: %s (dropped)%s",
                what,
                self.target.run_id,
                reason,
                more,
            )
        self.spooled.discard(op["seq"])
        self.spool.release(op)

    def _went_down(self, e: BaseException) -> None:
        now = time.monotonic()
        self.backoff = min(self.max_backoff, max(self.min_backoff, self.backoff * 2))
        self.next_try = now + self.backoff
        if self.down_since is None:
            self.down_since = now
            log.warning(
                "MLflow at %s unreachable (%s); buffering to %s and retrying in the background "
                "of later calls",
                self.target.tracking_uri,
                one_line(e),
                self.spool.path,
            )

    def _came_back(self) -> None:
        self.backoff = 0.0
        self.next_try = 0.0
        if self.down_since is not None:
            log.warning(
                "MLflow at %s reachable again after %.0f s; buffered operations delivered",
                self.target.tracking_uri,
                time.monotonic() - self.down_since,
            )
            self.down_since = None

    def report(self) -> DeliveryReport:
        pending_artifacts = tuple(
            f"{op.get('artifact_path') or '.'}/{Path(op['path']).name}"
            for op in self.queue
            if op["op"] == "artifact"
        )
        return DeliveryReport(
            tracking_uri=self.target.tracking_uri,
            run_id=self.target.run_id,
            delivered=self.delivered,
            pending=len(self.queue),
            pending_metrics=sum(len(op["metrics"]) for op in self.queue if op["op"] == "metrics"),
            pending_artifacts=pending_artifacts,
            rejected=tuple(self.rejected),
            spool_path=self.spool.path if self.queue else None,
        )


def _set_aside(spool: Spool, why: str) -> None:
    stamp = time.time_ns()  # a free name: two spools set aside at once keep both
    while (aside := spool.path.with_name(f"mlflow_spool.{stamp}.jsonl")).exists():
        stamp += 1
    os.replace(spool.path, aside)
    log.warning(
        "MLflow spool %s %s: moved to %s (upload it with jobs/sync_mlflow.py)",
        spool.path,
        why,
        aside,
    )


def describe(op: dict[str, Any]) -> str:
    kind = op["op"]
    if kind == "metrics":
        return f"metrics at step {op['step']} ({', '.join(list(op['metrics'])[:3])}...)"
    if kind == "artifact":
        return f"artifact {Path(op['path']).name} -> {op.get('artifact_path') or '.'}"
    if kind in ("params", "tags"):
        return f"{len(op[kind])} {kind}"
    return f"{kind} {op.get('status', '')}".strip()


__all__ = ["Deliverer", "DeliveryReport", "RunTarget"]

"""The spool: tracking calls not yet delivered, on disk, so neither an outage nor a crash loses them.

``<dir>/mlflow_spool.jsonl`` holds one JSON object per line: a header naming the run (tracking
URI, experiment, run name, parent run, run id once known), then the undelivered operations in
the order they were made, each with a sequence number ``seq``:

- ``{"op": "params", "params": {key: text}}``
- ``{"op": "tags", "tags": {key: text}}``
- ``{"op": "metrics", "metrics": {key: value}, "step": int, "timestamp": ms}``
- ``{"op": "artifact", "path": ..., "artifact_path": ..., "owned": bool}``
- ``{"op": "terminate", "status": "FINISHED" | "FAILED" | "KILLED", "end_time": ms}``

Files and folders of spooled artifacts are copied under ``<dir>/mlflow_spool_artifacts/<session>-<seq>/``
and referenced relative to ``<dir>`` (what the file said at the time of the call is what gets
uploaded, and a spool folder can be moved to another machine to be synced). Delivered operations
are removed by rewriting the file atomically; an empty spool is deleted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("mtsam.tracking")

SPOOL_FILE = "mlflow_spool.jsonl"
ARTIFACTS_DIR = "mlflow_spool_artifacts"
FORMAT = 1


class SpoolError(ValueError):
    """A spool file is malformed; the message names the file and line."""


class Spool:
    """One spool file and its artifact copies inside ``directory``."""

    def __init__(self, directory: str | Path, *, file_name: str = SPOOL_FILE) -> None:
        self.directory = Path(directory).resolve()
        self.path = self.directory / file_name
        self.artifacts = self.directory / ARTIFACTS_DIR
        # Copies of this session go to their own folders: a spool set aside by an earlier
        # session may still reference folders with the same sequence numbers.
        self.session = uuid.uuid4().hex[:8]

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(header, operations). A cut-off last line (a crash while appending) is dropped and
        cut from the file, and a last line without its newline gets one, so that the next
        append starts on a line of its own."""
        data = self.path.read_bytes()
        lines = data.splitlines(keepends=True)
        end = len(data)  # where the complete lines end
        records: list[dict[str, Any]] = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:  # also bytes that are not UTF-8
                if i == len(lines) - 1 and i > 0:
                    end -= len(line)
                    break
                raise SpoolError(f"{self.path}:{i + 1}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise SpoolError(f"{self.path}:{i + 1}: expected a JSON object")
            records.append(rec)
        if not records or records[0].get("mtsam_spool") != FORMAT:
            raise SpoolError(
                f"{self.path}: first line is not an mtsam spool header (format {FORMAT})"
            )
        header, ops = records[0], records[1:]
        for n, op in enumerate(ops, start=2):
            if op.get("op") not in ("params", "tags", "metrics", "artifact", "terminate") or not (
                isinstance(op.get("seq"), int)
            ):
                raise SpoolError(f"{self.path}:{n}: unknown operation {op.get('op')!r} or no seq")
        if end < len(data) or not data.endswith(b"\n"):
            self._repair(end, newline=not data[:end].endswith(b"\n"))
        return header, ops

    def _repair(self, end: int, *, newline: bool) -> None:
        """Cut the file to its first ``end`` bytes (and end it with a newline). A file that
        cannot be written (read-only) is left as it is: reading it still works."""
        # In place rather than by rewriting: whenever a crash comes, the complete lines are
        # left as they were.
        try:
            with open(self.path, "r+b") as f:
                f.truncate(end)
                if newline:
                    f.seek(end)
                    f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            log.warning("MLflow spool %s: cannot repair its cut-off last line (%s)", self.path, e)

    def append(self, header: dict[str, Any], ops: list[dict[str, Any]]) -> None:
        """Append ``ops`` (writing the header first if the file is new) and flush to disk."""
        self.directory.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with open(self.path, "a") as f:
            if new:
                f.write(_line({"mtsam_spool": FORMAT, **header}))
            for op in ops:
                f.write(_line(op))
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, header: dict[str, Any], ops: list[dict[str, Any]]) -> None:
        """Replace the file with ``header`` + ``ops`` atomically; delete it when ``ops`` is empty."""
        if not ops:
            self.clear()
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(_line({"mtsam_spool": FORMAT, **header}))
                for op in ops:
                    f.write(_line(op))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        if self.artifacts.is_dir() and not any(self.artifacts.iterdir()):
            self.artifacts.rmdir()

    def slot(self, seq: int) -> Path:
        """Folder for the artifact files of operation ``seq`` (created)."""
        d = self.artifacts / f"{self.session}-{seq:08d}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def stash(self, op: dict[str, Any]) -> dict[str, Any]:
        """An artifact operation whose file or folder is a copy owned by the spool."""
        if op["op"] != "artifact" or op.get("owned"):
            return op
        src = Path(op["path"])
        dst = self.slot(op["seq"]) / src.name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
        return {**op, "path": str(dst), "owned": True}

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.directory / p

    def relative(self, op: dict[str, Any]) -> dict[str, Any]:
        """The operation as written to disk: owned artifact paths relative to the spool folder."""
        if op["op"] == "artifact" and op.get("owned"):
            p = Path(op["path"])
            if p.is_absolute() and p.is_relative_to(self.directory):
                return {**op, "path": str(p.relative_to(self.directory))}
        return op

    def release(self, op: dict[str, Any]) -> None:
        """Delete the spool's copy of a delivered artifact."""
        if op["op"] != "artifact" or not op.get("owned"):
            return
        p = self.resolve(op["path"])
        slot = p.parent
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        if slot.parent == self.artifacts and slot.is_dir() and not any(slot.iterdir()):
            slot.rmdir()


def _line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":")) + "\n"


def find_spools(root: str | Path) -> list[Spool]:
    """Every spool file under ``root`` (a spool folder, a spool file or a tree of run folders)."""
    root = Path(root)
    if root.is_file():
        return [Spool(root.parent, file_name=root.name)]
    files = sorted(root.rglob("mlflow_spool*.jsonl"))
    return [Spool(f.parent, file_name=f.name) for f in files]


__all__ = ["SPOOL_FILE", "Spool", "SpoolError", "find_spools"]

"""Where a shard set lives: a local folder, or a URI read through pyarrow's filesystem layer.

``s3://bucket/prefix`` and ``gs://bucket/prefix`` (any scheme ``pyarrow.fs.FileSystem.from_uri``
knows) are read in place, with ranged reads of just the bytes a worker needs: nothing is copied
to the node first. The filesystem is configured the standard way, from the environment: for S3
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or a profile / instance role),
``AWS_DEFAULT_REGION`` and, for an S3-compatible server (MinIO, Ceph, moto),
``AWS_ENDPOINT_URL``; for GCS Google's application-default credentials.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from mtsam.data.errors import DatasetError
from mtsam.storage import first_line, is_uri


class ShardStore:
    """A shard set's root: a local folder or a URI, with the filesystem that reads it.

    ``name(rel)`` is what error messages show (the path or URI a user typed, plus ``rel``);
    ``path(rel)`` is the same location for :attr:`fs`. The filesystem is made on first use
    and not pickled: a DataLoader worker or Ray worker makes its own from its environment.
    """

    def __init__(self, root: str | Path) -> None:
        self.uri = is_uri(root)
        self.root: str | Path = str(root).rstrip("/") if self.uri else Path(root)
        self._fs: pafs.FileSystem | None = None
        self._base = ""

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}

    def _resolve(self) -> tuple[pafs.FileSystem, str]:
        """(filesystem, the root's path on it)."""
        if not self.uri:
            return pafs.LocalFileSystem(), str(Path(self.root).absolute())
        try:
            fs, base = pafs.FileSystem.from_uri(str(self.root))
        except (OSError, ValueError) as err:
            raise DatasetError(f"{self.root}: cannot open ({first_line(err)})") from None
        return fs, base.rstrip("/")

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs, self._base = self._resolve()
        return self._fs

    def path(self, rel: str = "") -> str:
        self.fs  # noqa: B018  (sets _base)
        return f"{self._base}/{rel}" if rel else self._base

    def name(self, rel: str = "") -> str:
        if self.uri:
            return f"{self.root}/{rel}" if rel else str(self.root)
        return str(Path(self.root) / rel) if rel else str(self.root)

    def missing_bucket(self) -> str | None:
        """``scheme://bucket`` when the root's bucket does not exist (object stores only)."""
        if not self.uri or isinstance(self.fs, pafs.LocalFileSystem):
            return None
        bucket = self.path().split("/")[0]
        try:
            found = self.fs.get_file_info(bucket).type != pafs.FileType.NotFound
        except OSError:
            return None  # e.g. no permission to look at the bucket itself: say nothing about it
        scheme = str(self.root).split("://")[0]
        return None if found else f"{scheme}://{bucket}"

    def read_bytes(self, rel: str) -> bytes:
        """The whole file ``rel``; FileNotFoundError when it does not exist."""
        with self.fs.open_input_stream(self.path(rel)) as fh:
            return fh.read()

    def list_files(self, folders: list[str]) -> dict[str, pafs.FileInfo]:
        """{relative path: FileInfo} of the files directly in ``folders`` (one listing each,
        so an object store answers with a few LIST requests instead of one HEAD per file)."""
        found: dict[str, pafs.FileInfo] = {}
        base = self.path()
        for folder in folders:
            selector = pafs.FileSelector(self.path(folder), allow_not_found=True)
            for info in self.fs.get_file_info(selector):
                if info.type == pafs.FileType.File:
                    found[info.path[len(base) :].lstrip("/")] = info
        return found

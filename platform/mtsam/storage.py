"""Run folders on a local disk or in object storage (``s3://``, ``gs://``), through pyarrow.

Ray Train and Tune write runs, checkpoints and sweep state through ``pyarrow.fs``; the jobs use
the same file systems here, so a path that Ray can write is one these helpers can read. S3 is
reached with the standard AWS settings of the environment (``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3`` for an S3-compatible server, ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``). A URI's query (pyarrow's own options) is
kept through :func:`join` and :func:`as_uri`.

Every failure is a :class:`StorageError` whose one-line message names the URI: no such bucket,
no such object, access denied, endpoint unreachable.

Also where a job's local outputs go (:func:`output_root`): ``ray job submit`` runs a job in a
temporary copy of its working folder, so a relative ``output_dir`` needs a durable root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

OUTPUT_ROOT_ENV = "MTSAM_OUTPUT_ROOT"
DEFAULT_SUBMITTED_ROOT = "~/mtsam_outputs"


def in_submitted_job() -> bool:
    """True in the driver of a ``ray job submit`` job, which runs inside Ray's temporary copy of
    the working folder (``.../runtime_resources/working_dir_files/_ray_pkg_*``)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ or (
        "working_dir_files" in Path.cwd().parts and "runtime_resources" in Path.cwd().parts
    )


def output_root() -> Path:
    """The folder a relative ``output_dir`` (and ``scaling.storage_path``) is taken from:
    ``$MTSAM_OUTPUT_ROOT`` if set; inside a submitted job ``~/mtsam_outputs`` on the node that
    runs the job (the job's working folder is deleted with the Ray session); else the folder
    the job was launched in."""
    if os.environ.get(OUTPUT_ROOT_ENV):
        return Path(os.environ[OUTPUT_ROOT_ENV]).expanduser().resolve()
    if in_submitted_job():
        return Path(DEFAULT_SUBMITTED_ROOT).expanduser().resolve()
    return Path.cwd()


def local_output_dir(output_dir: str) -> Path:
    """``output_dir`` as the jobs resolve it: as given when absolute, else under
    :func:`output_root` (readers, e.g. of the default MLflow store, find what jobs wrote)."""
    path = Path(output_dir).expanduser()
    return path if path.is_absolute() else output_root() / path


class StorageError(ValueError):
    """A storage URI that cannot be used; the message names it."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """An error's message on one line (pyarrow's S3 errors span several), at most ``limit``."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_uri(path: str | Path | None) -> bool:
    """True for a URI with a scheme (``s3://...``, ``gs://...``), False for a local path."""
    return path is not None and "://" in str(path)


OBJECT_SCHEMES = ("s3", "gs", "gcs")


def is_object_uri(path: str | Path | None) -> bool:
    """True for an object-storage URI that pyarrow reads (``s3://``, ``gs://``, ``gcs://``)."""
    return is_uri(path) and str(path).split("://", 1)[0].lower() in OBJECT_SCHEMES


def split_uri(uri: str) -> tuple[str, str, str]:
    """(scheme, path inside the file system, query) of ``uri``: ``s3://b/x?q`` -> (s3, b/x, q)."""
    parts = urlsplit(uri)
    return parts.scheme, (parts.netloc + parts.path).rstrip("/"), parts.query


def join(base: str, *names: str) -> str:
    """``base`` (a URI or a local path) with ``names`` appended; a URI's query stays at the end."""
    if not is_uri(base):
        return str(Path(base, *names))
    scheme, path, query = split_uri(base)
    path = "/".join([path, *(n.strip("/") for n in names)])
    return f"{scheme}://{path}" + (f"?{query}" if query else "")


def parent_and_name(uri: str) -> tuple[str, str]:
    """(parent URI, last name) of a URI: ``s3://b/runs/r1/`` -> (``s3://b/runs``, ``r1``)."""
    scheme, path, query = split_uri(uri)
    parent, _, name = path.rpartition("/")
    if not parent or not name:
        raise StorageError(f"{uri}: expected <scheme>://<bucket>/<folder>/<name>")
    return f"{scheme}://{parent}" + (f"?{query}" if query else ""), name


def as_uri(storage: str, path: str | None) -> str | None:
    """A path that Ray reports for a run under ``storage`` (for object storage, Ray gives the
    path inside the file system, ``bucket/...``) as something a user can pass back: the URI."""
    if path is None or not is_uri(storage) or is_uri(path):
        return path
    scheme, _, query = split_uri(storage)
    return f"{scheme}://{path.lstrip('/')}" + (f"?{query}" if query else "")


def _fs(uri: str) -> tuple[Any, str]:
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:
        raise StorageError(f"{uri}: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    """A short cause for a pyarrow / AWS SDK error."""
    text = " ".join(str(e).split())
    upper = text.upper()
    if "NO_SUCH_BUCKET" in upper or "NOSUCHBUCKET" in upper:
        return "no such bucket"
    if "ACCESS_DENIED" in upper or "ACCESSDENIED" in upper or "FORBIDDEN" in upper:
        return "access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the node's role)"
    if any(k in upper for k in ("INVALIDACCESSKEYID", "INVALID_ACCESS_KEY_ID", "SIGNATURE")):
        return "credentials refused (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    if "CURL" in upper or "NETWORK_CONNECTION" in upper or "COULD NOT CONNECT" in upper:
        return f"storage endpoint unreachable (check AWS_ENDPOINT_URL): {text[:200]}"
    return first_line(e) or type(e).__name__


def _info(uri: str, *, shown: str | None = None):
    """(file system, path, FileInfo) of ``uri``; errors name ``shown`` (default: ``uri``)."""
    fs, path = _fs(uri)
    try:
        return fs, path, fs.get_file_info(path)
    except (OSError, ValueError) as e:
        raise StorageError(f"{shown or uri}: {_reason(e)}") from None


def check_bucket(uri: str, *, what: str) -> None:
    """Refuse ``uri`` unless its bucket exists and answers (credentials, endpoint): called
    before Ray starts, so a typo costs neither a cluster start nor a half-made run."""
    import pyarrow.fs

    scheme, path, query = split_uri(uri)
    bucket = path.split("/", 1)[0]
    if not bucket:
        raise StorageError(f"{what} {uri}: no bucket in the URI")
    _, _, info = _info(
        f"{scheme}://{bucket}" + (f"?{query}" if query else ""), shown=f"{what} {uri}"
    )
    if info.type == pyarrow.fs.FileType.NotFound:
        raise StorageError(f"{what} {uri}: no such bucket {bucket!r}")


def exists(uri: str) -> bool:
    import pyarrow.fs

    return _info(uri)[2].type != pyarrow.fs.FileType.NotFound


def is_file(uri: str) -> bool:
    import pyarrow.fs

    return _info(uri)[2].type == pyarrow.fs.FileType.File


def read_text(uri: str) -> str:
    fs, path = _fs(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode("utf-8")
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such object") from None
    except OSError as e:
        raise StorageError(f"{uri}: {_reason(e)}") from None


def write_text(uri: str, text: str) -> None:
    """Write one object (object stores make a single put atomic: no half-written file)."""
    fs, path = _fs(uri)
    try:
        with fs.open_output_stream(path) as f:
            f.write(text.encode("utf-8"))
    except OSError as e:
        raise StorageError(f"{uri}: {_reason(e)}") from None


@contextlib.contextmanager
def local_copy(path: str | Path, *, what: str) -> Iterator[Path]:
    """A local folder with the contents of ``path``: the folder itself for a local path, a
    temporary download (removed afterwards) for a URI. ``what`` names the argument in errors
    (e.g. ``--checkpoint``)."""
    if not is_uri(path):
        yield Path(path)
        return
    import pyarrow.fs

    uri = str(path)
    fs, src, info = _info(uri, shown=f"{what} {uri}")
    if info.type == pyarrow.fs.FileType.NotFound:
        check_bucket(uri, what=what)
        raise StorageError(f"{what} {uri}: no such folder or object")
    if info.type != pyarrow.fs.FileType.Directory:
        raise StorageError(f"{what} {uri}: an object, expected a folder")
    tmp = Path(tempfile.mkdtemp(prefix="mtsam-download-"))
    try:
        try:
            pyarrow.fs.copy_files(src, str(tmp), source_filesystem=fs)
        except OSError as e:
            raise StorageError(f"{what} {uri}: {_reason(e)}") from None
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

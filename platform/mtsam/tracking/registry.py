"""Adapters in the MLflow model registry: register a run's adapter, load any adapter back.

A registered version's source is ``runs:/<run_id>/<artifact_path>`` (checked with MLflow 3.17
on SQLite with local artifacts and on a server with proxied artifacts; ``mlflow.register_model``
on a plain artifact folder fails in 3.x, so the version is created directly).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from mlflow.exceptions import MlflowException

from mtsam.adapters.io import META_FILE, AdapterNotFoundError, build_from_adapter
from mtsam.tracking.client import make_client, one_line
from mtsam.tracking.uri import TrackingError, http_limits, resolve_tracking_uri, sqlite_path

if TYPE_CHECKING:
    from mtsam.model.msam import MSAM

_URI_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/")


def register_adapter(
    tracking_uri: str,
    *,
    run_id: str,
    name: str,
    artifact_path: str = "adapter",
    alias: str | None = None,
    request_timeout_s: float = 30.0,
) -> str:
    """Register ``runs:/<run_id>/<artifact_path>`` as a version of model ``name`` (created if
    missing) and return the version number as text. Registering the same run and path again
    returns the existing version instead of adding one (a resumed sweep registers once).
    ``alias`` (e.g. ``best``) is pointed at the version. Raises :class:`TrackingError`."""
    source = f"runs:/{run_id}/{artifact_path.strip('/')}"
    try:
        with http_limits(request_timeout_s):
            client = make_client(tracking_uri)
            client.get_run(run_id)  # a clear error for a wrong run id, before creating anything
            try:
                client.create_registered_model(name)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            found = [
                v
                for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
                if v.source == source
            ]
            if found:
                version = str(min(int(v.version) for v in found))
            else:
                mv = client.create_model_version(name, source=source, run_id=run_id)
                version = str(mv.version)
            if alias:
                client.set_registered_model_alias(name, alias, version)
    except MlflowException as e:
        raise TrackingError(
            f"MLflow {tracking_uri}: cannot register {source} as {name!r}: {one_line(e)}"
        ) from None
    return version


def _adapter_folder(root: Path, uri: str) -> Path:
    if (root / META_FILE).is_file():
        return root
    found = sorted(p.parent for p in root.rglob(META_FILE))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise AdapterNotFoundError(f"{uri}: {what} {META_FILE} in the downloaded artifacts")
    return found[0]


_MODEL_RE = re.compile(r"^models:/([^/@]+)(?:/([^/@]+)|@([^/@]+))/?$")


def _model_source(text: str, tracking_uri: str) -> str:
    """``models:/<name>/<version|latest>`` or ``models:/<name>@<alias>`` -> the version's source."""
    m = _MODEL_RE.match(text)
    if m is None:
        raise ValueError(f"{text}: expected models:/<name>/<version> or models:/<name>@<alias>")
    name, version, alias = m.groups()
    client = make_client(tracking_uri)
    if alias is not None:
        return client.get_model_version_by_alias(name, alias).source
    if version == "latest":
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise AdapterNotFoundError(f"{text}: model {name!r} has no versions")
        return max(versions, key=lambda v: int(v.version)).source
    return client.get_model_version(name, version).source


def _store_uri(tracking_uri: str | None, text: str) -> str:
    """``tracking_uri`` or, for None, the store of the default config (``$MLFLOW_TRACKING_URI``,
    else ``<output root>/<output_dir>/mlflow.db``, the root being ``$MTSAM_OUTPUT_ROOT`` or the
    current folder, as the jobs resolve it), as :func:`resolve_tracking_uri` resolves it. A SQLite
    store that ``runs:``/``models:`` read must already exist: opening a missing one would create
    an empty database (other artifact URIs, e.g. ``s3://``, need no store)."""
    from mtsam.config import ExperimentConfig
    from mtsam.storage import local_output_dir

    output_dir = local_output_dir(ExperimentConfig.model_fields["output_dir"].default)
    uri = resolve_tracking_uri(tracking_uri, str(output_dir))
    db = sqlite_path(uri)
    if db is not None and not db.is_file() and text.startswith(("runs:", "models:")):
        raise AdapterNotFoundError(
            f"{text}: no MLflow store at {db} (pass tracking_uri= or set $MLFLOW_TRACKING_URI)"
        )
    return uri


def load_adapter(
    uri_or_path: str | Path,
    *,
    checkpoint: str | Path | None = None,
    seed: int | None = None,
    allow_other_base: bool = False,
    tracking_uri: str | None = None,
) -> MSAM:
    """A ready mSAM, in eval mode, from a saved adapter: a local folder, a folder in object
    storage (``s3://bucket/.../checkpoint_<n>/adapter`` or the checkpoint folder itself, read
    with the AWS / Google settings of the environment),
    ``runs:/<run_id>/adapter``, ``models:/<name>/<version>`` (or ``/latest``),
    ``models:/<name>@<alias>`` or any MLflow artifact URI.

    A local folder needs no tracking store. Otherwise the adapter folder
    (``adapter.safetensors`` + ``adapter.json``) is downloaded to a temporary folder from the
    MLflow store at ``tracking_uri``; None means what training uses with the default config:
    ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/outputs/mlflow.db`` (``$MTSAM_OUTPUT_ROOT``
    in place of the current folder when set). A SQLite store that
    does not exist raises :class:`~mtsam.adapters.io.AdapterNotFoundError` (none is created).
    Then :func:`mtsam.adapters.io.build_from_adapter` rebuilds the model on the base
    ``checkpoint`` (None: the random base the adapter was trained on, re-created from the seed
    in its fingerprint, or ``seed``).
    """
    text = str(uri_or_path)
    if text.startswith("file:"):
        text = urlparse(text).path
    if not _URI_RE.match(text):
        local = Path(text)
        if not local.is_dir():
            raise AdapterNotFoundError(f"{local}: no such adapter directory")
        model = build_from_adapter(
            local, checkpoint=checkpoint, seed=seed, allow_other_base=allow_other_base
        )
        return model.eval()

    from mtsam import storage

    if storage.is_object_uri(text):  # a run folder in s3:// / gs://: no MLflow store needed
        with storage.local_copy(text, what="adapter") as got:
            model = build_from_adapter(
                _adapter_folder(got, text),
                checkpoint=checkpoint,
                seed=seed,
                allow_other_base=allow_other_base,
            )
        return model.eval()

    import mlflow.artifacts

    uri = _store_uri(tracking_uri, text)
    with tempfile.TemporaryDirectory(prefix="mtsam-adapter-") as tmp:
        try:
            # models:/ URIs are resolved here: MLflow's download would look the model up in the
            # process-wide registry URI, not in ``tracking_uri``.
            source = _model_source(text, uri) if text.startswith("models:") else text
            got = mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=tmp, tracking_uri=uri
            )
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise AdapterNotFoundError(f"{text}: not found ({one_line(e)})") from None
            raise TrackingError(f"{text}: cannot download ({one_line(e)})") from None
        except OSError as e:
            raise AdapterNotFoundError(f"{text}: cannot download ({one_line(e)})") from None
        folder = _adapter_folder(Path(got), text)
        model = build_from_adapter(
            folder, checkpoint=checkpoint, seed=seed, allow_other_base=allow_other_base
        )
    return model.eval()


__all__ = ["load_adapter", "register_adapter"]

"""Driver side of a training run: Ray start-up, base weights in the object store, TorchTrainer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtsam.config import ExperimentConfig

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../platform/mtsam


def ray_runtime_env() -> dict[str, Any]:
    """Ship this copy of ``mtsam`` to every trial driver and worker (not an installed one)."""
    return {
        "py_modules": [str(PACKAGE_DIR)],
        "env_vars": {
            "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHONUNBUFFERED": "1",
            "RAY_TRAIN_V2_ENABLED": "1",
        }
        | {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ},
    }


# Passed on to every trial driver and worker: the fault injection of the tests, and where object
# storage is and in which region (not credentials: runtime_env values show in Ray's dashboard;
# those come from the nodes' own environment or role).
FORWARDED_ENV = (
    "MTSAM_FAULT_NAN_STEP",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


def check_scaling(cfg: ExperimentConfig) -> None:
    """Refuse a worker layout that cannot start: several workers on GPU shares (Ray may pack
    two of them onto one GPU, and NCCL refuses two ranks on one). Checked when a run or sweep
    is launched or resumed, not in the config itself, so evaluation still reads any run."""
    sc = cfg.scaling
    if sc.use_gpu and sc.num_workers > 1 and sc.gpus_per_worker < 1:
        raise ValueError(
            f"scaling.gpus_per_worker = {sc.gpus_per_worker} with scaling.num_workers = "
            f"{sc.num_workers}: NCCL needs a whole GPU per worker (fractions are for "
            "single-worker sweep trials)"
        )


LOCAL_PATH_FIELDS = ("output_dir", "data.root", "model.checkpoint", "scaling.storage_path")
# Where a job writes (not what it reads): relative values resolve against output_root().
OUTPUT_FIELDS = ("output_dir", "scaling.storage_path")


def with_absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with its relative local paths (and ``~``) made absolute.

    Ray Train runs every worker in its run's own folder, not where the job was launched: a
    relative ``data.root`` there names another folder (a dataset not found after the checks
    passed), and a relative ``output_dir`` made every trial generate the scenes again inside
    Ray's session folder. Inputs (``data.root``, ``model.checkpoint``) resolve against the
    launch folder, outputs against :func:`mtsam.storage.output_root`. URIs (``s3://...``) are left alone.
    """
    from mtsam.config import set_path
    from mtsam.storage import output_root

    d = cfg.to_dict()
    changed = False
    for key in LOCAL_PATH_FIELDS:
        section, _, leaf = key.rpartition(".")
        value = (d[section] if section else d).get(leaf)
        if not value or "://" in value or Path(value).is_absolute():
            continue
        path = Path(value).expanduser()
        if not path.is_absolute() and key in OUTPUT_FIELDS:
            path = output_root() / path
        d = set_path(d, key, str(path.resolve()))
        changed = True
    return ExperimentConfig.model_validate(d) if changed else cfg


def resources_needed(cfg: ExperimentConfig, *, sweep: bool = False) -> dict[str, float]:
    """CPUs and GPUs one run (or one sweep trial, with its driver) reserves at once."""
    sc = cfg.scaling
    need = {"CPU": sc.num_workers * sc.cpus_per_worker + (cfg.tune.driver_cpus if sweep else 0)}
    if sc.use_gpu:
        need["GPU"] = sc.num_workers * sc.gpus_per_worker
    return need


def init_ray(
    *, num_cpus: int | None = None, need: dict[str, float] | None = None, log=print
) -> str:
    """Connect to a running cluster (RAY_ADDRESS, "auto" inside a submitted job, or one started
    on this machine by ``ray start``), else start a local one on 127.0.0.1 with the dashboard
    on. Returns what it did, for the log.

    A local cluster never grows, so one that lacks ``need`` (see :func:`resources_needed`) is
    shut down again and a ValueError names the scaling fields: the run would wait forever.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return "already connected"
    address = os.environ.get("RAY_ADDRESS")
    in_job = "RAY_JOB_ID" in os.environ or os.environ.get("RAY_JOB_SUBMISSION_ID")
    if address or in_job:
        ray.init(address=address or "auto", runtime_env=ray_runtime_env(), log_to_driver=True)
        what = f"connected to the Ray cluster at {address or 'auto'}"
        log(what)
        return what
    try:  # a cluster started on this machine by `ray start` (it may grow: no resource check)
        ray.init(address="auto", runtime_env=ray_runtime_env(), log_to_driver=True)
        what = "connected to the Ray cluster running on this machine"
        log(what)
        return what
    except ConnectionError:
        pass
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env=ray_runtime_env(),
    )
    have = ray.cluster_resources()
    short = {k: v for k, v in (need or {}).items() if have.get(k, 0.0) + 1e-9 < v}
    if short:
        ray.shutdown()
        parts = ", ".join(f"{v:g} {k}" for k, v in short.items())
        mine = ", ".join(f"{have.get(k, 0.0):g} {k}" for k in short)
        raise ValueError(
            f"scaling: one run needs {parts} (num_workers x cpus_per_worker / "
            f"gpus_per_worker), but the local Ray on this machine has {mine}; lower them or "
            "set RAY_ADDRESS to a cluster"
        )
    what = "started a local Ray (dashboard on 127.0.0.1)"
    log(what)
    return what


def read_base_weights(cfg: ExperimentConfig) -> tuple[dict[str, Any], str] | None:
    """(state dict, fingerprint) of ``model.checkpoint``, checked against ``model.preset``.

    Runs in the driver before Ray starts: a missing, corrupt or wrong-preset file is one
    :class:`~mtsam.model.checkpoint.CheckpointError` naming the file, not a worker traceback.
    """
    path = cfg.model.checkpoint
    if path is None:
        return None
    from mtsam.model.checkpoint import check_fits_preset, file_fingerprint, read_state_dict

    state = read_state_dict(path, preset=cfg.model.preset)
    check_fits_preset(state, cfg.model.preset, source=f"model.checkpoint {path}")
    return state, file_fingerprint(path)


def put_base_weights(base: tuple[dict[str, Any], str] | None) -> tuple[Any, str] | None:
    """Put the base weights read by :func:`read_base_weights` into Ray's object store.

    Workers ``ray.get`` the reference: the tensors cross to each node once and are shared by
    every worker and trial there, instead of every trial reading the file again.
    """
    if base is None:
        return None
    import ray

    return ray.put(base[0]), base[1]


def storage_path(cfg: ExperimentConfig) -> str:
    s = cfg.scaling.storage_path
    if s and "://" in s:
        return s
    return str(Path(s or Path(cfg.output_dir) / "ray_results").resolve())


def _largest_in_sweep(cfg: ExperimentConfig, key: str, base: int) -> tuple[int, str]:
    """The largest value a sweep can give the integer field ``key``, and how to name it."""
    entry = cfg.tune.space.get(key)
    if entry is None:
        return base, f"{key} = {base}"
    if entry.type in ("choice", "grid"):
        top = max(int(v) for v in entry.values or [base])
    elif entry.type == "randint":
        top = int(entry.high) - 1  # type: ignore[arg-type]  # Tune's high is exclusive
    else:
        return base, f"{key} = {base}"
    return top, f"tune.space.{key} up to {top}"


def prepare_data(cfg: ExperimentConfig, *, sweep: bool = False) -> Path | str:
    """Generate the scenes (once, atomically) before any worker starts, and open both splits
    once: a missing or malformed dataset, or too few samples for one step, is one error here
    instead of a traceback from every worker (and every retry). For a ``sweep`` the step is
    checked at the largest batch size and accumulation its search space can sample."""
    from mtsam.train.data import open_split
    from mtsam.train.loop import data_root

    root = data_root(cfg)
    # s3:// / gs:// shards (a str) are checked by opening them below
    needs_folder = cfg.data.dataset != "scenes" or cfg.data.format == "shards"
    if needs_folder and isinstance(root, Path) and not root.is_dir():
        raise FileNotFoundError(f"data.root {root}: no such folder")
    common = {"fmt": cfg.data.format, "tasks": cfg.data.tasks, "num_classes": cfg.data.classes}
    splits = {
        split: open_split(
            cfg.data.dataset, root, split, augment=False, seed=cfg.seed, verify=False, **common
        )
        for split in ("train", "val")
    }
    t, sc = cfg.train, cfg.scaling
    (batch, batch_s), (accum, accum_s) = (
        _largest_in_sweep(cfg, k, v) if sweep else (v, f"{k} = {v}")
        for k, v in (("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum))
    )
    per_step = batch * accum * sc.num_workers
    if len(splits["train"]) < per_step:  # type: ignore[arg-type]
        raise ValueError(
            f"{batch_s} x {accum_s} x {sc.num_workers} workers needs {per_step} training "
            f"samples; {root} has {len(splits['train'])}"  # type: ignore[arg-type]
        )
    return root


@dataclass
class TrainOutcome:
    metrics: dict[str, Any]
    path: str
    checkpoint: str | None
    error: str | None


def score_order(cfg: ExperimentConfig, metric: str) -> str:
    """ "max" or "min" for ranking checkpoints by ``metric``: an explicit ``tune.mode`` is the
    direction of ``tune.metric`` and of no other metric; otherwise the metric's own."""
    from mtsam.tasks import metric_mode

    if metric == cfg.tune.metric and cfg.tune.mode != "auto":
        return cfg.tune.mode
    return metric_mode(metric, cfg.data.tasks)


def make_trainer(
    cfg: ExperimentConfig,
    *,
    name: str,
    storage: str,
    base: tuple[Any, str] | None = None,
    tracking: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    metric: str | None = None,
):
    """A ``TorchTrainer`` running :func:`mtsam.train.loop.train_loop_per_worker` for ``cfg``.

    Checkpoints are kept by ``metric`` (a sweep's metric; default ``val/delta_m`` when the
    config has a baseline), so the best epoch's checkpoint and adapter survive retention.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    if metric is None and cfg.data.baseline_table():
        metric = "val/delta_m"
    checkpoint_config = ray.train.CheckpointConfig(num_to_keep=2)
    if metric:
        checkpoint_config = ray.train.CheckpointConfig(
            num_to_keep=2,
            checkpoint_score_attribute=metric,
            checkpoint_score_order=score_order(cfg, metric),
        )
    loop_config = {
        "config": cfg.to_dict(),
        "threads": max(1, int(sc.cpus_per_worker)),
        "base_ref": base[0] if base else None,
        "base_fingerprint": base[1] if base else None,
        "tracking": tracking,
    }
    return TorchTrainer(
        _entry,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=checkpoint_config,
            callbacks=callbacks or None,
        ),
    )


def _entry(loop_config: dict[str, Any]) -> dict[str, str] | None:
    from mtsam.train.loop import train_loop_per_worker

    return train_loop_per_worker(loop_config)


def outcome_of(result: Any, *, metric: str | None = None, mode: str = "max") -> TrainOutcome:
    """Plain values from a Ray Train ``Result``; the best checkpoint by ``metric`` if given."""
    metrics = dict(result.metrics or {})
    ckpt = _path_of(result.checkpoint) if result.checkpoint is not None else None
    ranked = [
        (m[metric], _path_of(c))
        for c, m in (getattr(result, "best_checkpoints", None) or [])
        if metric and isinstance(m.get(metric), (int, float))
    ]
    if ranked:
        ckpt = (max if mode == "max" else min)(ranked)[1]
    # A NaN stop comes back as the loop's return value; Result.metrics are those of the last
    # checkpointed report (the good epoch before it).
    returned = getattr(result, "return_value", None)
    error = metrics.get("error") or (returned.get("error") if isinstance(returned, dict) else None)
    return TrainOutcome(metrics=metrics, path=_path_of(result), checkpoint=ckpt, error=error)


def _path_of(item: Any) -> str:
    """A Ray result's or checkpoint's path, as a URI when it lives in object storage (Ray gives
    ``bucket/...`` there, the path inside its pyarrow file system)."""
    path = str(item.path)
    fs = getattr(item, "filesystem", None)
    scheme = {"s3": "s3", "gcs": "gs"}.get(getattr(fs, "type_name", ""), "")
    return f"{scheme}://{path.lstrip('/')}" if scheme and "://" not in path else path


def failure_line(error: BaseException) -> str:
    """One line for a failed ``fit()`` (``ray.train.TrainingFailedError``): the first failing
    worker's own error, e.g. ``DatasetError: <file>: not found``, instead of Ray's report."""
    failures = getattr(error, "worker_failures", None) or {}
    cause = failures[min(failures)] if failures else getattr(error, "controller_failure", error)
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


RUN_CONFIG_FILE = "mtsam_config.yaml"


def save_run_config(run_path: str | Path, cfg: ExperimentConfig) -> None:
    """Keep the resolved config beside the run (a local folder or a storage URI), so
    ``--resume`` needs only the run path."""
    import yaml

    from mtsam import storage

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if storage.is_uri(run_path):
        storage.write_text(storage.join(str(run_path), RUN_CONFIG_FILE), text)
        return
    run_path = Path(run_path)
    run_path.mkdir(parents=True, exist_ok=True)
    tmp = run_path / (RUN_CONFIG_FILE + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, run_path / RUN_CONFIG_FILE)


def resume_config_path(run_path: Path) -> str:
    path = run_path / RUN_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"--resume {run_path}: no {RUN_CONFIG_FILE} there "
            "(not a folder written by jobs/train.py or jobs/tune.py?)"
        )
    return str(path)


def resume_config_text(run_uri: str) -> str:
    """The saved config of the run at a storage URI, as YAML text; one line if it is not one."""
    from mtsam import storage

    storage.check_bucket(run_uri, what="--resume")
    if not storage.is_file(storage.join(run_uri, RUN_CONFIG_FILE)):
        raise storage.StorageError(
            f"--resume {run_uri}: no {RUN_CONFIG_FILE} there "
            "(not a folder written by jobs/train.py or jobs/tune.py?)"
        )
    return storage.read_text(storage.join(run_uri, RUN_CONFIG_FILE))

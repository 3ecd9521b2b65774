"""Evaluate a trained mSAM on one split and print its per-task metrics.

    python jobs/evaluate.py --checkpoint outputs/ray_results/train-default-<time>/checkpoint_<...>
    python jobs/evaluate.py --adapter path/to/adapter [--base-checkpoint sam_vit_l_0b3195.pth]
    python jobs/evaluate.py --adapter models:/mtsam-best/1 --config configs/default.yaml

--checkpoint takes a training checkpoint folder (train_state.pt + adapter/): the config stored
in it gives the model and the data (--config replaces the data section, --set overrides any
key). --adapter takes a saved adapter folder or an MLflow URI (models:/..., runs:/...): the
adapter describes the model; the data come from --config (default configs/default.yaml), and
--set of model.* or adapter.* keys is refused (model.checkpoint and model.attention excepted).
A random base (no --base-checkpoint, no checkpoint in the config) is rebuilt from the seed the
adapter recorded, so it is the same random base the adapter was trained on. --json FILE also
writes the metrics at full precision. --device auto (the default) runs on a GPU when one is
visible, under the config's train.precision (bf16 autocast for auto), else on the CPU in fp32.
--checkpoint and --adapter also take a folder in object storage (s3://bucket/..., gs://...;
endpoint and credentials from the AWS_* / Google settings of the environment, see README).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import _bootstrap  # noqa: F401  (puts this checkout's platform/ on sys.path)
from mtsam import storage
from mtsam.cli import add_config_args, fail, metrics_table

DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "default.yaml")
URI_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/")


def _checkpoint_config(ckpt: Path, config: str | None, overrides: list[str], base: str | None):
    """The run's stored config; ``--config`` replaces its data section, ``--set`` wins last."""
    from mtsam.config import build_config, load_config
    from mtsam.train.state import load_train_state

    state = load_train_state(ckpt)
    stored = dict(state["config"])
    if not stored:
        raise ValueError(f"checkpoint {ckpt}: train_state.pt holds no config")
    if config is not None:
        stored["data"] = load_config(config).to_dict()["data"]
    extra = [f"model.checkpoint={base}"] if base else []
    cfg = build_config(stored, [*overrides, *extra])
    trained = build_config(state["config"])
    if (cfg.data.tasks, cfg.data.classes) != (trained.data.tasks, trained.data.classes):
        raise ValueError(
            f"checkpoint {ckpt}: trained for tasks {list(trained.data.tasks)} with "
            f"{trained.data.classes} classes, but the data config has {list(cfg.data.tasks)} "
            f"with {cfg.data.classes}"
        )
    return cfg, state


def _model_from_checkpoint(cfg, state, ckpt: Path, tasks):
    """The run's model on the base the config gives, which must be the base it was trained on
    (recorded in the checkpoint's adapter.json): another base silently gives other metrics."""
    from mtsam.adapters.io import META_FILE, read_adapter_meta
    from mtsam.train.loop import build_model

    model = build_model(cfg, tasks=tasks, base=None)
    if (ckpt / "adapter" / META_FILE).is_file():
        trained_on = read_adapter_meta(ckpt / "adapter").base_fingerprint
        if trained_on != model.base_fingerprint:
            raise ValueError(
                f"checkpoint {ckpt}: trained on base weights {trained_on}, this evaluation "
                f"would use {model.base_fingerprint} (give --base-checkpoint the file it was "
                "trained on; do not change seed or model.checkpoint)"
            )
    model.load_trainable_state_dict(state["trainable"], source=str(ckpt / "train_state.pt"))
    return model


def _model_from_adapter(adapter: str, *, base: str | None, cfg):
    if storage.is_object_uri(adapter):
        from mtsam.adapters.io import build_from_adapter

        with storage.local_copy(adapter, what="--adapter") as path:  # s3://, gs://
            model = build_from_adapter(path, checkpoint=base, seed=None)
    elif adapter.startswith(URI_PREFIXES) or "://" in adapter:
        model = _load_uri(adapter, base, cfg)
    else:
        from mtsam.adapters.io import build_from_adapter

        path = Path(adapter)
        if not path.is_dir():
            raise FileNotFoundError(f"--adapter {adapter}: no such folder")
        model = build_from_adapter(path, checkpoint=base, seed=None)
    if cfg.model.attention == "sdpa":
        from mtsam.model.attention import use_sdpa_attention

        use_sdpa_attention(model.image_encoder)
    return model


def _load_uri(uri: str, base: str | None, cfg):
    """Download through MLflow at the config's tracking URI (tracking.uri, $MLFLOW_TRACKING_URI,
    else <output_dir>/mlflow.db, a relative output_dir taken as the jobs take it: under
    $MTSAM_OUTPUT_ROOT when set); a missing SQLite store is an error, not a new empty one."""
    try:
        from mtsam.tracking.registry import load_adapter
        from mtsam.tracking.uri import TrackingError, resolve_tracking_uri, sqlite_path
    except ImportError:
        raise ValueError(
            f"--adapter {uri}: loading from MLflow needs mtsam.tracking.registry, which this "
            "checkout lacks; pass a local adapter folder instead"
        ) from None
    tracking_uri = resolve_tracking_uri(
        cfg.tracking.uri, str(storage.local_output_dir(cfg.output_dir))
    )
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        raise FileNotFoundError(
            f"--adapter {uri}: no MLflow store at {db} (set tracking.uri or $MLFLOW_TRACKING_URI)"
        )
    try:
        return load_adapter(uri, checkpoint=base, tracking_uri=tracking_uri)
    except TrackingError as e:  # MLflow unreachable or refused: still a one-line error
        raise ValueError(str(e)) from None


def _check_tasks(model, tasks, where: str) -> None:
    """The model's heads must be exactly the data's tasks, channel for channel."""
    have = dict(model.task_channels)
    want = {t.name: t.channels for t in tasks}
    if have != want:
        raise ValueError(
            f"{where}: the model predicts {have} but the data config asks for {want} "
            "(set data.tasks / data.num_classes to match)"
        )


def pick_device(name: str):
    """``--device``: auto (a GPU when one is visible, else the CPU), cpu or cuda."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no GPU is visible (torch.cuda.is_available() is False)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def evaluate_split(cfg, model, tasks, *, split: str, device=None) -> dict[str, float]:
    """Flat metrics ("val/<task>/<metric>", "val/delta_m") of ``model`` on ``split``, on
    ``device`` (default CPU): fp32 on the CPU, the config's train.precision on a GPU."""
    import torch

    from mtsam.tasks import task_metric_directions
    from mtsam.train.data import eval_loader, open_split
    from mtsam.train.evaluate import evaluate, flat_metrics
    from mtsam.train.loop import data_root

    root = data_root(cfg)
    if isinstance(root, Path) and cfg.data.dataset != "scenes" and not root.exists():
        raise FileNotFoundError(f"data.root {root}: no such folder")
    ds = open_split(
        cfg.data.dataset,
        root,
        split,
        fmt=cfg.data.format,
        tasks=cfg.data.tasks,
        num_classes=cfg.data.classes,
        augment=False,
        seed=cfg.seed,
    )
    loader = eval_loader(
        ds, batch_size=cfg.train.batch_size, rank=0, world_size=1, workers=cfg.data.loader_workers
    )
    device = device or torch.device("cpu")
    precision = cfg.train.precision if device.type == "cuda" else "fp32"
    results = evaluate(model.to(device), loader, tasks, device=device, precision=precision)
    return flat_metrics(results, cfg.data.baseline_table() or None, task_metric_directions(tasks))


# With --adapter, the model keys that still apply: the base weights and the attention kernel.
_ADAPTER_MODEL_KEYS = ("model.checkpoint", "model.attention")


def _refuse_model_overrides(overrides: list[str]) -> None:
    """With --adapter the adapter fixes the model: a ``--set`` of any other model.* or
    adapter.* key would be ignored without a word, so it is refused."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.split(".")[0] in ("model", "adapter") and key not in _ADAPTER_MODEL_KEYS:
            raise ValueError(
                f"--set {key}: --adapter fixes the model and the adapter; only "
                f"{' and '.join(_ADAPTER_MODEL_KEYS)} may be set beside it"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", metavar="DIR", help="training checkpoint folder")
    which.add_argument("--adapter", metavar="DIR_OR_URI", help="adapter folder or MLflow URI")
    add_config_args(
        ap,
        config_help="experiment YAML; with --checkpoint: only its data section is used, in\n"
        "place of the run's (default: the config stored in the checkpoint);\n"
        "with --adapter: data and evaluation settings (default: configs/default.yaml)",
    )
    ap.add_argument("--split", choices=("val", "train"), default="val", help="split (val)")
    ap.add_argument("--base-checkpoint", metavar="SAM_PTH", help="SAM base weights (.pth)")
    ap.add_argument("--json", metavar="FILE", help="also write the metrics to FILE as JSON")
    ap.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to evaluate (auto: a GPU when one is visible)",
    )
    args = ap.parse_args(argv)

    from mtsam.tasks import build_tasks

    try:
        device = pick_device(args.device)
        if args.json and (Path(args.json).is_dir() or not Path(args.json).parent.is_dir()):
            raise FileNotFoundError(f"--json {args.json}: expected a file in an existing folder")
        if args.base_checkpoint and not Path(args.base_checkpoint).is_file():
            raise FileNotFoundError(f"--base-checkpoint {args.base_checkpoint}: no such file")
        if args.checkpoint:
            # a storage URI (s3://, gs://) is downloaded to a temporary folder first
            with storage.local_copy(args.checkpoint, what="--checkpoint") as ckpt:
                if not ckpt.is_dir():
                    raise FileNotFoundError(f"--checkpoint {ckpt}: no such folder")
                try:
                    cfg, state = _checkpoint_config(
                        ckpt, args.config, args.set, args.base_checkpoint
                    )
                    tasks = build_tasks(
                        cfg.data.tasks,
                        num_classes=cfg.data.classes,
                        protocol=cfg.data.eval_protocol,
                    )
                    model = _model_from_checkpoint(cfg, state, ckpt, tasks)
                except (ValueError, OSError) as e:
                    if not storage.is_uri(args.checkpoint):
                        raise
                    # name the checkpoint as given, not its temporary download
                    raise ValueError(
                        str(e).replace(str(ckpt), args.checkpoint.rstrip("/"))
                    ) from None
            shown = args.checkpoint.rstrip("/").rsplit("/", 1)[-1]
            name = f"{shown} (epoch {state['epoch'] + 1})"
        else:
            from mtsam.cli import load_cli_config

            _refuse_model_overrides(args.set)
            cfg = load_cli_config(args.config or DEFAULT_CONFIG, args.set)
            tasks = build_tasks(
                cfg.data.tasks, num_classes=cfg.data.classes, protocol=cfg.data.eval_protocol
            )
            base = args.base_checkpoint or cfg.model.checkpoint
            model = _model_from_adapter(args.adapter, base=base, cfg=cfg)
            name = Path(args.adapter).name if "/" in args.adapter else args.adapter
        _check_tasks(model, tasks, args.checkpoint or args.adapter)
        metrics: dict[str, Any] = evaluate_split(cfg, model, tasks, split=args.split, device=device)
    except (ValueError, OSError) as e:  # OSError: a path that cannot be read or created
        return fail(e)
    if args.split != "val":
        metrics = {k.replace("val/", f"{args.split}/", 1): v for k, v in metrics.items()}
    print(metrics_table({name: metrics}, columns=list(metrics)))
    if args.json:
        import json
        import os

        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(metrics, indent=1, sort_keys=True))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

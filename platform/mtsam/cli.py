"""Helpers shared by the thin scripts in ``jobs/``: config arguments, errors, tables."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mtsam.config import ExperimentConfig, load_config


def add_config_args(
    ap: argparse.ArgumentParser, *, default: str | None = None, config_help: str | None = None
) -> None:
    """``--config`` and ``--set``; ``args.config`` stays None unless given (so it can conflict
    with ``--resume``), ``args.default_config`` holds ``default``. ``config_help`` replaces
    the ``--config`` help for a script that reads the file its own way (jobs/evaluate.py)."""
    ap.add_argument(
        "--config",
        default=None,
        help=config_help or f"experiment YAML (default: {default or 'built-in defaults'})",
    )
    ap.set_defaults(default_config=default)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)",
    )


def load_cli_config(path: str | None, overrides: Sequence[str]) -> ExperimentConfig:
    return load_config(path, overrides)


def add_run_args(ap: argparse.ArgumentParser, *, what: str, default_name: str) -> None:
    """``--name`` and ``--resume`` for a job that writes one folder under the storage path."""
    ap.add_argument("--name", help=f"{what} name (default: {default_name})")
    ap.add_argument(
        "--resume",
        metavar="PATH",
        help=f"continue the {what} stored at PATH (a folder, or a URI such as s3://bucket/...)",
    )


def run_config_and_place(
    args: argparse.Namespace,
    default_name: Callable[[ExperimentConfig], str],
    *,
    sweep: bool = False,
    validate: Callable[[ExperimentConfig], object] | None = None,
) -> tuple[ExperimentConfig, str, str]:
    """(config, run name, storage path): a new run's, or those of the run at ``--resume``
    (which must be a sweep folder exactly when ``sweep``).

    ``validate`` (e.g. the sweep's plan) runs on a new run's config before anything outside
    it is checked (folders, the storage bucket), so a config error is reported as one.

    A new run never reuses a folder: Ray would silently continue (or mix into) the run that is
    there, with the new config written over the one it was trained with.
    """
    from mtsam import storage
    from mtsam.train import runner

    if args.resume:
        if args.config or args.name:
            given = "--config" if args.config else "--name"
            raise ValueError(
                f"--resume takes the config and name of the run it continues; drop {given} "
                "(use --set to change values)"
            )
        if storage.is_uri(args.resume):
            return _resume_from_uri(args, sweep=sweep)
        path = Path(args.resume).resolve()
        cfg_path = runner.resume_config_path(path)
        is_sweep = (path / "tuner.pkl").is_file()  # Ray Tune writes it when a sweep starts
        if is_sweep != sweep:
            raise ValueError(
                f"--resume {path}: a sweep folder; continue it with jobs/tune.py --resume"
                if is_sweep
                else f"--resume {path}: not a sweep folder (no tuner.pkl); continue a run of "
                "jobs/train.py with jobs/train.py --resume"
            )
        cfg = runner.with_absolute_paths(load_cli_config(cfg_path, args.set))
        runner.check_scaling(cfg)
        return cfg, path.name, str(path.parent)
    cfg = runner.with_absolute_paths(load_cli_config(args.config or args.default_config, args.set))
    runner.check_scaling(cfg)
    if validate is not None:
        validate(cfg)
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out}: exists and is not a folder")
    name = args.name or default_name(cfg)
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(
            f"run name {name!r} (from --name or the config's name): expected a plain folder "
            "name (no '/')"
        )
    where = runner.storage_path(cfg)
    if storage.is_uri(where):
        storage.check_bucket(where, what="scaling.storage_path")  # before Ray starts
        taken = storage.exists(storage.join(where, name))
    else:
        taken = (Path(where) / name).exists()
    if taken:
        raise ValueError(
            f"--name {name}: {storage.join(where, name)} already exists; pass --resume with "
            "that path to continue it, or choose another --name"
        )
    return cfg, name, where


def _resume_from_uri(args: argparse.Namespace, *, sweep: bool) -> tuple[ExperimentConfig, str, str]:
    """``--resume s3://bucket/runs/<name>``: the config saved in the run folder there."""
    import yaml

    from mtsam import storage
    from mtsam.config import build_config
    from mtsam.train import runner

    uri = args.resume.rstrip("/")
    parent, name = storage.parent_and_name(uri)
    text = runner.resume_config_text(uri)
    is_sweep = storage.is_file(storage.join(uri, "tuner.pkl"))
    if is_sweep != sweep:
        raise ValueError(
            f"--resume {uri}: a sweep folder; continue it with jobs/tune.py --resume"
            if is_sweep
            else f"--resume {uri}: not a sweep folder (no tuner.pkl); continue a run of "
            "jobs/train.py with jobs/train.py --resume"
        )
    cfg = runner.with_absolute_paths(build_config(yaml.safe_load(text) or {}, args.set))
    runner.check_scaling(cfg)
    return cfg, name, parent


def fail(error: BaseException, code: int = 2) -> int:
    """Print a one-line error to stderr and return the exit code."""
    msg = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if not msg.startswith(("error:", "config error:")):
        msg = f"error: {msg}"
    print(msg, file=sys.stderr)
    return code


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def metrics_table(
    rows: Mapping[str, Mapping[str, Any]],
    *,
    columns: Sequence[str] | None = None,
    best: str | None = None,
) -> str:
    """A plain-text table, one row per run; ``best`` marks one row with '*'."""
    if columns is None:
        keys: list[str] = []
        for r in rows.values():
            keys += [k for k in r if k.startswith("val/") and k not in keys]
        columns = keys
    header = ["", "run", *columns]
    body = [
        ["*" if name == best else "", name, *(_fmt(r.get(c, "")) for c in columns)]
        for name, r in rows.items()
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    lines = [
        "  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True))
        for line in [header, *body]
    ]
    return "\n".join(lines)

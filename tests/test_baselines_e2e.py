"""The baseline workflow end to end through the real CLI: jobs/baselines.py measures
single-task baselines on a local Ray (MLflow in SQLite), then a two-objective jobs/tune.py
sweep reads them back from MLflow (data.baseline=runs:/<id>) and marks its Pareto front.

One test, tiny generated scenes, one epoch per run: two single-task trials, then three
Optuna trials (three trials share the 2 cores: 0.6 CPU per worker).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
SMALL = [
    "data.scenes.num_train=8",
    "data.scenes.num_val=4",
    "train.batch_size=8",
    "train.epochs=1",
    "train.log_every=1000",
    "train.vis_samples=0",
    "scaling.cpus_per_worker=0.6",
    "data.tasks=[depth, normal]",
    "train.task_weights={}",
]

pytestmark = pytest.mark.slow


def run_job(job: str, args: list[str], cwd: Path, timeout: int = 300):
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / job), *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its local Ray too: killed as a group on a time-out
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"jobs/{job} timed out:\n{err[-3000:]}") from None
    assert proc.returncode == 0, (out + err)[-4000:]
    return out


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def non_dominated(rows: list[dict], objectives: dict[str, str]) -> set[str]:
    """Brute force over the sweep's own rows: a trial is dominated when another finished
    trial is no worse on every objective and better on one."""
    sign = {m: 1.0 if d == "max" else -1.0 for m, d in objectives.items()}
    done = [r for r in rows if r["status"] == "TERMINATED"]
    keep = set()
    for r in done:
        if not any(
            all(sign[m] * (float(o[m]) - float(r[m])) >= 0 for m in objectives)
            and any(sign[m] * (float(o[m]) - float(r[m])) > 0 for m in objectives)
            for o in done
            if o is not r
        ):
            keep.add(r["trial_id"])
    return keep


def test_measure_baselines_then_sweep_two_objectives(tmp_path):
    from mlflow import MlflowClient

    out = tmp_path / "out"
    db = f"sqlite:///{out / 'mlflow.db'}"
    file = tmp_path / "measured.json"
    log = run_job(
        "baselines.py",
        ["--name", "stl", "--out", str(file), *sets(*SMALL, f"output_dir={out}")],
        tmp_path,
    )
    measured = json.loads(file.read_text())
    assert set(measured["baseline"]) == {"depth", "normal"}
    prov = measured["provenance"]
    assert prov["produced_by"] == "jobs/baselines.py" and prov["config_digest"].startswith("sha")
    assert prov["code_version"]["git_commit"] and prov["date"]

    client = MlflowClient(tracking_uri=db)
    parent = client.get_run(prov["mlflow"]["parent_run_id"])
    assert parent.data.tags["mtsam.kind"] == "baselines" and parent.info.status == "FINISHED"
    assert f"runs:/{parent.info.run_id}" in log
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    assert {c.info.run_name: c.info.run_id for c in children} == prov["mlflow"]["runs"]
    for child in children:  # each child trained one task, and its last epoch is the baseline
        task = child.info.run_name
        assert json.loads(child.data.params["data.tasks"]) == [task]
        for m, v in measured["baseline"][task].items():
            assert child.data.metrics[f"val/{task}/{m}"] == pytest.approx(v)
    got = Path(client.download_artifacts(parent.info.run_id, "baselines.json", str(tmp_path)))
    assert got.read_bytes() == file.read_bytes()

    objectives = {"val/delta_m": "max", "adapter_params": "min"}
    name = "pareto"
    sweep_log = run_job(
        "tune.py",
        [
            "--name",
            name,
            *sets(
                *SMALL,
                f"output_dir={out}",
                f"data.baseline=runs:/{parent.info.run_id}",
                "tune.objectives={val/delta_m: max, adapter_params: min}",
                "tune.searcher=optuna",
                "tune.num_samples=3",
                "tune.max_concurrent_trials=3",
                "tune.space.adapter.r1={type: choice, values: [2, 16]}",
                "tune.space.adapter.r2={type: choice, values: [2, 16]}",
                "tune.space.adapter.r3={type: choice, values: [2]}",
            ),
        ],
        tmp_path,
    )
    sweep = out / "ray_results" / name
    with open(sweep / "summary" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    marked = {r["trial_id"] for r in rows if r["pareto"] == "True"}
    assert marked and marked == non_dominated(rows, objectives)
    # the printed table marks the same trials
    table = sweep_log.split("optimising the Pareto front")[1].split("Pareto-optimal trials")[0]
    printed = {
        ln.split()[1] if ln.startswith("*") else ln.split()[0]
        for ln in table.splitlines()
        if ln.rstrip().endswith("yes")
    }
    assert printed == marked

    # the sweep's run and every trial's run say which baseline their delta_m used
    exp = client.get_experiment_by_name("default")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`mtsam.kind` = 'sweep'")
    (sweep_run,) = runs
    source = f"runs:/{parent.info.run_id}/baselines.json"
    assert sweep_run.data.tags["mtsam.baseline"] == source
    assert sweep_run.data.params["data.baseline"] == f"runs:/{parent.info.run_id}"
    arts = {a.path for a in client.list_artifacts(sweep_run.info.run_id, "summary")}
    assert "summary/pareto.png" in arts
    trial = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{sweep_run.info.run_id}'"
    )[0]
    assert trial.data.tags["mtsam.baseline"] == source
    key = "data.baseline_record.values.depth.abs_err"
    assert float(trial.data.params[key]) == pytest.approx(measured["baseline"]["depth"]["abs_err"])
    logged = client.download_artifacts(
        trial.info.run_id, "baseline/baselines.json", str(tmp_path / "t")
    )
    assert Path(logged).read_bytes() == file.read_bytes()

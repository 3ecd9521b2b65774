"""Sweeps end to end through the real CLI: ray job submit, ASHA, the budget, resume after a kill.

Every test starts its own Ray (a `ray start --head` on 127.0.0.1, or the CLI's local Ray) and
leaves no Ray process behind. Data are tiny generated scenes; a trial takes ~20-30 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
SMALL = [
    "tracking.enabled=false",
    "data.scenes.num_train=16",
    "data.scenes.num_val=8",
    "train.batch_size=8",
    "train.log_every=1000",
    "train.vis_samples=0",
]

pytestmark = pytest.mark.slow


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = VENV_BIN + os.pathsep + e.get("PATH", "")
    e.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1")
    e.pop("RAY_ADDRESS", None)
    return e


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def start_tune(args: list[str], *, cwd: Path, **popen: Any) -> subprocess.Popen:
    """jobs/tune.py in a session of its own (its local Ray too), so a test can signal or kill
    the whole group."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "jobs/tune.py"), *args],
        cwd=cwd,
        env=env(),
        text=True,
        start_new_session=True,
        **popen,
    )


def tune_cli(args: list[str], *, cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    """Run jobs/tune.py; on a time-out kill its whole process group (its local Ray too)."""
    proc = start_tune(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"jobs/tune.py timed out after {timeout} s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def trial_epochs(experiment: Path) -> dict[str, int]:
    """Epochs each trial reported to Tune, read from Tune's own result.json files."""
    out = {}
    for result in experiment.glob("*/result.json"):
        lines = [json.loads(x) for x in result.read_text().splitlines() if x.strip()]
        out[result.parent.name] = max((int(x.get("epoch", 0)) for x in lines), default=0)
    return out


def ray_processes() -> list[str]:
    r = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True)
    return [
        line
        for line in r.stdout.splitlines()
        if ("raylet" in line or "gcs_server" in line) and "ps -eo" not in line
    ]


@pytest.fixture
def no_stray_ray():
    before = set(ray_processes())
    yield
    deadline = time.time() + 20
    while time.time() < deadline and set(ray_processes()) - before:
        time.sleep(1)
    assert not (set(ray_processes()) - before), "a Ray process outlived the test"


@pytest.fixture
def ray_head(tmp_path):
    """A real `ray start --head` on 127.0.0.1 with the dashboard (job server) on. Jobs get
    MTSAM_OUTPUT_ROOT=<tmp>/durable from the head's environment, so that a submitted job's
    relative outputs go there instead of the real home folder."""
    port, dash = "6391", "8267"
    head_env = env() | {"MTSAM_OUTPUT_ROOT": str(tmp_path / "durable")}
    r = subprocess.run(
        [
            f"{VENV_BIN}/ray",
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            port,
            "--num-cpus",
            "2",
            "--include-dashboard",
            "true",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            dash,
            "--disable-usage-stats",
        ],
        env=head_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run(
            [f"{VENV_BIN}/ray", "stop", "--force"], env=env(), capture_output=True, timeout=120
        )


def test_ray_job_submit_runs_the_submitted_code(ray_head, tmp_path):
    """The README's cluster command, against a real head: SUCCEEDED, results, submitted code.
    With the default relative output_dir, the MLflow store and the best adapter are under the
    durable output root (MTSAM_OUTPUT_ROOT), not in the job's temporary working folder, and
    are still there after `ray stop`."""
    from mlflow import MlflowClient

    durable = tmp_path / "durable"
    cmd = [
        f"{VENV_BIN}/ray",
        "job",
        "submit",
        "--address",
        ray_head,
        "--working-dir",
        ".",
        "--",
        "python",
        "jobs/tune.py",
        "--config",
        "configs/default.yaml",
        *sets(
            *SMALL,
            "tracking.enabled=true",
            "tune.num_samples=1",
            "train.epochs=1",
            "tune.max_concurrent_trials=1",
        ),
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=400)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "succeeded" in log
    assert "* best trial" in log and "best adapter:" in log
    # one trial, one epoch: its progress line reaches the job's log once (Train V2's print
    # patch sent each worker line twice)
    assert log.count("[epoch 1/1]") == 1, log[-3000:]
    adapter = Path(log.split("best adapter:")[1].split()[0])
    # the training worker imported mtsam from the package shipped with the job, not the checkout
    origin = log.split("mtsam from ")[1].split()[0]
    assert "_ray_pkg_" in origin and not origin.startswith(str(REPO)), origin
    assert f"outputs in {durable / 'outputs'}" in log, log[-3000:]

    subprocess.run(
        [f"{VENV_BIN}/ray", "stop", "--force"], env=env(), capture_output=True, timeout=120
    )
    assert adapter.is_relative_to(durable), adapter
    assert (adapter / "adapter.safetensors").is_file() and (adapter / "adapter.json").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{durable / 'outputs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    assert sorted(x.info.status for x in runs) == ["FINISHED", "FINISHED"]  # sweep + trial
    assert any("val/depth/abs_err" in x.data.metrics for x in runs)


def test_asha_stops_weak_trials_early(tmp_path, no_stray_ray):
    out = tmp_path / "out"
    epochs = 3
    r = tune_cli(
        [
            "--name",
            "asha",
            *sets(
                *SMALL,
                f"output_dir={out}",
                f"train.epochs={epochs}",
                "tune.searcher=grid",
                "tune.num_samples=1",
                "tune.scheduler=asha",
                "tune.asha.grace_period=1",
                "tune.asha.reduction_factor=2",
                "tune.max_concurrent_trials=2",
                "tune.metric=val/semantic/miou",
                # strong rates first: ASHA then has recorded rung values to cut the weak ones against
                "tune.space.train.lr={type: grid, values: [1.0e-2, 5.0e-3, 1.0e-7, 1.0e-6]}",
                "tune.space.adapter.orth_weight={type: grid, values: [0.0]}",
                "tune.space.adapter.method={type: grid, values: [tora]}",
            ),
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    spent = trial_epochs(out / "ray_results" / "asha")
    assert len(spent) == 4
    # FIFO would spend 4 x 3 = 12 trial-epochs; ASHA must stop at least one trial early
    assert sum(spent.values()) < 4 * epochs, spent
    assert max(spent.values()) == epochs  # the best trial ran to the end
    assert "* best trial" in r.stdout


def test_budget_rejects_before_training(tmp_path, no_stray_ray):
    out = tmp_path / "out"
    r = tune_cli(
        [
            "--name",
            "budget",
            *sets(
                *SMALL,
                f"output_dir={out}",
                "train.epochs=1",
                "tune.searcher=grid",
                "tune.num_samples=1",
                "tune.metric=val/depth/abs_err",
                "tune.max_concurrent_trials=1",
                "tune.max_trainable_params=600000",  # only r1 = r2 = 96 (642,296) is above
                "tune.space.adapter.r1={type: grid, values: [2, 96]}",
                "tune.space.adapter.r2={type: grid, values: [2, 96]}",
                "tune.space.train.lr={type: grid, values: [0.003]}",
                "tune.space.adapter.orth_weight={type: grid, values: [0.0]}",
                "tune.space.adapter.method={type: grid, values: [tora]}",
            ),
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    table = r.stdout.split("optimising")[1]  # our summary, not Tune's progress tables
    rows = [line for line in table.splitlines() if "REJECTED" in line or "TERMINATED" in line]
    assert sum("REJECTED" in x for x in rows) == 1 and sum("TERMINATED" in x for x in rows) == 3
    # the rejected trial never started a Train run: only 3 train-* folders exist, each inside
    # the sweep's folder with its checkpoints (none beside it)
    trials = list((out / "ray_results" / "budget").glob("train-*"))
    assert len(trials) == 3 and all(list(t.glob("checkpoint_*")) for t in trials), trials
    assert not list((out / "ray_results").glob("train-*"))


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, no_stray_ray):
    out = tmp_path / "out"
    name = "resumable"
    args = [
        "--name",
        name,
        *sets(
            *SMALL,
            f"output_dir={out}",
            "train.epochs=2",
            "tune.num_samples=3",
            "tune.max_concurrent_trials=1",
            "tune.metric=val/depth/abs_err",
        ),
    ]
    exp = out / "ray_results" / name
    proc = start_tune(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            done = [t for t, e in trial_epochs(exp).items() if e == 2]
            # kill only once Tune's own snapshot records a finished trial
            if done and any("TERMINATED" in p.read_text() for p in exp.glob("experiment_state*")):
                break
            time.sleep(2)
        assert done, "no trial finished before the deadline"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(timeout=60)
    finished_before = {t: (exp / t / "result.json").read_text() for t in done}

    r = tune_cli(["--resume", str(exp)], cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    spent = trial_epochs(exp)
    assert len(spent) == 3 and all(e == 2 for e in spent.values()), spent
    for t, text in finished_before.items():  # finished trials were not run again
        assert (exp / t / "result.json").read_text() == text
    assert "* best trial" in r.stdout


def test_ctrl_c_stops_a_sweep_without_a_final_result(tmp_path, no_stray_ray):
    """Ctrl-C (SIGINT to the job's process group) once a trial has finished: Tune ends the
    sweep gracefully; the job says it was interrupted and how to resume, exits 130, ends the
    MLflow sweep run KILLED and registers nothing (only a finished sweep picks a best)."""
    from mlflow import MlflowClient

    out = tmp_path / "out"
    name = "stopped"
    args = [
        "--name",
        name,
        *sets(
            *SMALL,
            "tracking.enabled=true",
            "tracking.register_as=stopped-best",
            f"output_dir={out}",
            "train.epochs=1",
            "tune.num_samples=3",
            "tune.max_concurrent_trials=1",
        ),
    ]
    exp = out / "ray_results" / name
    proc = start_tune(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            states = list(exp.glob("experiment_state*"))
            if any("TERMINATED" in p.read_text() for p in states):
                break
            time.sleep(1)
        assert proc.poll() is None, "the sweep ended before a trial finished"
        os.killpg(proc.pid, signal.SIGINT)
        log, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode == 130, log[-3000:]
    assert "interrupted (Ctrl-C):" in log and f"jobs/tune.py --resume {exp}" in log, log[-3000:]
    assert "not registered: the sweep was interrupted" in log, log[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (sweep_run,) = [
        r
        for r in client.search_runs([client.get_experiment_by_name("default").experiment_id])
        if "mlflow.parentRunId" not in r.data.tags
    ]
    assert sweep_run.info.status == "KILLED"
    assert not client.search_registered_models()

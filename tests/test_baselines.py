"""Measured baselines (the file jobs/baselines.py writes, read by data.baseline), the refusal of
delta_m without one, tune.objectives checks and the Pareto front (no Ray cluster needed).

The shipped configs/baselines/default.json is checked against a new single-task run of the
training loop in this process (no Ray: one worker, one thread, as the job's Ray trial runs it).
"""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mtsam.config import ConfigError, build_config, load_config
from mtsam.tasks.baselines import BaselineError, document, parse, sha256_text, write_file
from mtsam.tune.pareto import pareto_front
from mtsam.tune.sweep import plan

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
SHIPPED = REPO / "configs" / "baselines" / "default.json"
VALUES = {"depth": {"abs_err": 1.25, "rel_err": 0.5}, "semantic": {"miou": 0.2}}
FULL = {**VALUES, "normal": {"mean_deg": 40.0}}


def _file(tmp_path: Path, values=None, name: str = "b.json") -> Path:
    return write_file(tmp_path / name, values or FULL, {"produced_by": "test"})


def test_file_round_trip_is_canonical(tmp_path):
    path = _file(tmp_path)
    text = path.read_text()
    values, provenance = parse(text, where="x")
    assert values == {t: {m: float(v) for m, v in ms.items()} for t, ms in FULL.items()}
    assert provenance == {"produced_by": "test"}
    assert document(values, provenance) == text  # written again: the same bytes
    assert json.loads(text)["format"] == "mtsam-baselines/1"


@pytest.mark.parametrize(
    "text, expect",
    [
        ("{not json", r"invalid JSON at line 1"),
        ('{"baseline": {}}', r'expected "format": "mtsam-baselines/1".*jobs/baselines\.py'),
        (
            '{"format": "mtsam-baselines/1", "baseline": {"depth": {"abs_err": "a"}}, '
            '"provenance": {}}',
            r"baseline\.depth\.abs_err = 'a': expected a number",
        ),
    ],
)
def test_bad_file_fails_in_one_line(text, expect):
    with pytest.raises(BaselineError, match=expect) as e:
        parse(text, where="f.json")
    assert "\n" not in str(e.value)


def test_relative_path_is_read_from_the_yaml_files_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    _file(folder / "baselines")
    cfg_path = folder / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump({"data": {"baseline": "baselines/b.json"}}))
    monkeypatch.chdir(tmp_path)  # not the YAML's folder
    cfg = load_config(cfg_path)
    assert cfg.data.baseline == "baselines/b.json"  # as written (a resumed run keeps it)
    record = cfg.data.baseline_record
    assert record.source == str((folder / "baselines" / "b.json").resolve())
    assert record.sha256 == sha256_text((folder / "baselines" / "b.json").read_text())
    assert cfg.data.baseline_table() == FULL
    # --set data.baseline: relative to the current folder
    _file(tmp_path, VALUES | {"normal": {"mean_deg": 30.0}}, "here.json")
    other = load_config(cfg_path, ["data.baseline=here.json"])
    assert other.data.baseline_table()["normal"] == {"mean_deg": 30.0}
    # the config saved with a run holds the record: loading it again reads no file
    (folder / "baselines" / "b.json").unlink()
    again = build_config(cfg.to_dict())
    assert again.data.baseline_table() == FULL


def test_only_the_configs_tasks_are_used_and_every_task_is_needed(tmp_path):
    path = _file(tmp_path)
    cfg = build_config({}, [f"data.baseline={path}", "data.tasks=[depth, semantic]"])
    assert cfg.data.baseline_table() == VALUES
    partial = _file(tmp_path, VALUES, "partial.json")
    with pytest.raises(ConfigError, match=r"data\.baseline: no metric for tasks \['normal'\].*"):
        build_config({}, [f"data.baseline={partial}"])


@pytest.mark.parametrize(
    "overrides, expect",
    [
        (["data.baseline=nope.json"], r"nope\.json: no such file \(measure the baselines with "),
        (["data.baseline=s3://b/x.json"], r"expected a local file path or runs:/<run id>"),
        (["data.baseline=runs:/"], r"expected runs:/<run id>"),
    ],
)
def test_bad_reference_fails_in_one_line(overrides, expect, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=expect) as e:
        build_config({}, [f"output_dir={tmp_path}", *overrides])
    assert str(e.value).startswith("config error: data.baseline = ") and "\n" not in str(e.value)


def test_a_file_reference_takes_no_per_metric_override(tmp_path):
    path = _file(tmp_path)
    with pytest.raises(ConfigError, match=r"--set data\.baseline\.depth\.abs_err: data\.baseline"):
        build_config({}, [f"data.baseline={path}", "data.baseline.depth.abs_err=1"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_no_config_holds_an_unmeasured_baseline(path):
    """A config either has no baseline (then delta_m is refused, naming jobs/baselines.py) or
    names a file that jobs/baselines.py wrote for its own settings."""
    from mtsam.tune.baselines import settings_digest

    raw = yaml.safe_load(path.read_text())
    baseline = (raw.get("data") or {}).get("baseline")
    cfg = load_config(path)
    if baseline is None:
        with pytest.raises(ValueError, match=r"needs data\.baseline .*jobs/baselines\.py") as e:
            plan(cfg)
        assert "\n" not in str(e.value)
        plan(build_config(cfg.to_dict(), [f"tune.metric=val/{cfg.data.tasks[0]}/miou"]))
        return
    assert isinstance(baseline, str), "an inline table: measure it with jobs/baselines.py"
    record = cfg.data.baseline_record
    assert record.provenance["produced_by"] == "jobs/baselines.py"
    assert record.provenance["config_digest"] == settings_digest(cfg), (
        f"{record.source} was measured with other settings: run jobs/baselines.py again"
    )


def test_a_real_dataset_without_baseline_is_refused_before_anything_starts(tmp_path):
    """Through the real CLI: exit 2, one line naming jobs/baselines.py, nothing written."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "jobs/tune.py"), "--config"]
    cmd += [str(REPO / "configs/nyuv2_vit_l_tora.yaml"), "--set", f"output_dir={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "jobs/baselines.py" in lines[0], r.stderr[-2000:]
    assert lines[0].startswith("config error: tune.metric = 'val/delta_m' needs data.baseline")
    assert not out.exists()


def test_shipped_default_baseline_comes_from_the_job(tmp_path):
    """Recompute the depth task of configs/baselines/default.json: configs/default.yaml with
    the job's single-task settings, trained by the same loop in this process (no Ray; one
    thread, like the job's worker with cpus_per_worker 0.9)."""
    import torch

    from mtsam.train.context import local_context
    from mtsam.train.loop import fit
    from mtsam.tune.baselines import base_config, values_of

    shipped = json.loads(SHIPPED.read_text())
    assert shipped["provenance"]["produced_by"] == "jobs/baselines.py"
    # the job's own overrides were only where it wrote (output_dir)
    assert all(o.startswith("output_dir=") for o in shipped["provenance"]["overrides"])
    cfg = base_config(
        load_config(
            REPO / "configs/default.yaml",
            ["data.baseline={}", f"output_dir={tmp_path}", "tracking.enabled=false"],
        )
    )
    single = build_config(cfg.to_dict(), ["data.tasks=[depth]"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = fit(single, local_context(tmp_path / "ckpt"), log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    got, _ = values_of("depth", metrics)
    want = shipped["baseline"]["depth"]
    assert set(got) == set(want)
    for m, v in want.items():
        assert got[m] == pytest.approx(v, rel=1e-5), m


@pytest.mark.parametrize(
    "overrides, expect",
    [
        (
            ["tune.objectives={val/delta_m: max, adapter_params: min}", "tune.scheduler=asha"],
            r"^config error: tune\.scheduler = 'asha' stops trials by one metric, but "
            r"tune\.objectives names 2 \(val/delta_m, adapter_params\); use tune\.scheduler=fifo$",
        ),
        (["tune.objectives={val/delta_m: max}"], r"tune\.objectives: names one metric"),
        (
            ["tune.objectives={val/delta_m: max, params: min}"],
            r"tune\.objectives\.params = 'params': expected .*adapter_params or trainable_params",
        ),
        (
            [
                "tune.objectives={val/delta_m: max, adapter_params: min}",
                "tune.metric=val/depth/abs_err",
            ],
            r"tune\.metric = 'val/depth/abs_err' is not one of tune\.objectives",
        ),
        (["tune.objectives={val/delta_m: up, adapter_params: min}"], r"val/delta_m"),
    ],
)
def test_objectives_are_checked_in_one_line(overrides, expect):
    with pytest.raises(ConfigError, match=expect) as e:
        build_config({}, overrides)
    assert "\n" not in str(e.value)


def test_plan_of_two_objectives(tmp_path):
    path = _file(tmp_path)
    cfg = build_config(
        {},
        [f"data.baseline={path}", "tune.objectives={val/delta_m: max, adapter_params: min}"],
    )
    p = plan(cfg)
    assert p.multi and p.objectives == (("val/delta_m", "max"), ("adapter_params", "min"))
    with pytest.raises(ValueError, match=r"tune\.objectives needs data\.baseline"):
        plan(build_config({}, ["tune.objectives={val/delta_m: max, adapter_params: min}"]))
    only_params = ["tune.objectives={val/depth/abs_err: min, trainable_params: min}"]
    assert plan(build_config({}, only_params)).metric == "val/depth/abs_err"


def _brute_force_front(points, modes):
    """All pairs: i is on the front unless some j is no worse everywhere, better somewhere."""
    sign = [1 if m == "max" else -1 for m in modes]
    out = []
    for i, p in enumerate(points):
        dominated = False
        for j, q in enumerate(points):
            if i == j:
                continue
            no_worse = all(s * (b - a) >= 0 for s, a, b in zip(sign, p, q, strict=True))
            better = any(s * (b - a) > 0 for s, a, b in zip(sign, p, q, strict=True))
            dominated |= no_worse and better
        out.append(not dominated)
    return out


@pytest.mark.parametrize("modes", [("max", "min"), ("min", "min"), ("max", "max", "min")])
def test_pareto_front_matches_a_brute_force_filter(modes):
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        # few distinct values: ties and duplicate points are common
        points = [tuple(rng.choice([0.5, 1, 2, 3]) for _ in modes) for _ in range(n)]
        assert pareto_front(points, modes) == _brute_force_front(points, modes), points


def test_pareto_front_skips_unfinished_points():
    nan = float("nan")
    assert pareto_front([(1.0, 5.0), (nan, 1.0), (0.5, 9.0)], ["max", "min"]) == [
        True,
        False,
        False,
    ]
    assert list(itertools.compress("ab", pareto_front([(1, 1), (1, 1)], ["max", "min"]))) == [
        "a",
        "b",
    ]


def test_the_table_marks_the_front_and_the_plot_draws_it(tmp_path):
    """Hand-computed front: c is dominated by a; b and e are equal (both stay); the failed d
    would dominate everything but did not finish."""
    from mtsam.tune.driver import TrialRow
    from mtsam.tune.sweep import Plan, mark_front, plot_front, render

    objectives = (("val/delta_m", "max"), ("adapter_params", "min"))
    data = [
        ("a", 1.0, 100, "TERMINATED"),
        ("b", 2.0, 300, "TERMINATED"),
        ("c", 0.5, 300, "TERMINATED"),
        ("d", 5.0, 50, "ERROR"),
        ("e", 2.0, 300, "TERMINATED"),
    ]
    rows = [
        TrialRow(t, s, {}, {"val/delta_m": dm, "adapter_params": n}, None, 1, 10)
        for t, dm, n, s in data
    ]
    mark_front(rows, objectives)
    assert [r.trial_id for r in rows if r.pareto] == ["a", "b", "e"]
    text = render(rows, rows[1], plan=Plan("val/delta_m", "max", objectives), path="sweep")
    assert "Pareto-optimal trials (pareto = yes): a, b, e" in text
    lines = [ln.rstrip() for ln in text.splitlines()]
    yes = {ln.replace("*", " ").split()[0] for ln in lines if ln.endswith(" yes")}
    assert yes == {"a", "b", "e"}
    png = plot_front(rows, objectives, tmp_path / "pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

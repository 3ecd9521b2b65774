"""benchmarks/gpu_check.py: its dry run (the same functions on the CPU, tiny preset) works
end to end, so the one command prepared for a lent GPU does not rot between GPU visits."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def test_dry_run_writes_both_reports(tmp_path, capsys):
    out = tmp_path / "report"
    assert gpu_check.main(["--out", str(out), "--dry-run"]) == 0, capsys.readouterr().out
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["gpu_tests", "throughput", "tora_cost", "trials_sharing"]
    assert all(s["ok"] is True for s in sections.values()), sections
    # pytest -m gpu ran the GPU test file: every test collected and skipped (no CUDA here)
    assert "skipped" in sections["gpu_tests"]["summary"]
    log = (out / "gpu_tests.log").read_text()
    assert "error" not in sections["gpu_tests"]["summary"].lower(), log[-2000:]
    th = sections["throughput"]
    assert [(r["batch"], r["checkpointing"]) for r in th["rows"]] == [
        (1, False), (2, False), (1, True), (2, True)
    ]  # fmt: skip
    assert all(r["images_per_s"] > 0 for r in th["rows"])
    assert th["flops_per_image"] > 1e8  # the tiny model's step, counted by FlopCounterMode
    tc = sections["tora_cost"]
    assert set(tc["step_s"]) == {"frozen", "tora", "authors"}
    assert sections["trials_sharing"]["shared"]["planned"]  # the sweep config validated
    md = (out / "gpu_check.md").read_text()
    assert "dry run" in md and "| 2 | True |" in md and "Goal ToRA" in md


def test_device_table():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_tflops("NVIDIA GeForce GTX 1080") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_a_gpu_the_real_run_fails_with_a_report(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "no CUDA device" in report["error"]
    assert "FAILED: no CUDA device" in (tmp_path / "gpu_check.md").read_text()
    assert "FAILED: device" in capsys.readouterr().out


def test_out_must_be_a_folder(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert gpu_check.main(["--out", str(f), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {f}: exists and is not a folder"


def test_the_budget_ends_sections_and_the_run_fails(tmp_path, monkeypatch):
    """A budget too small for the work: the pytest subprocess is killed, an in-process section
    (here one that would sleep for a minute) is interrupted by the alarm, the report is still
    written and the exit status is 1."""
    monkeypatch.setattr(gpu_check, "section_tora_cost", lambda s: time.sleep(60))
    t0 = time.perf_counter()
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--budget-s", "2"]) == 1
    assert time.perf_counter() - t0 < 30
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert sections["gpu_tests"]["ok"] is False
    assert sections["gpu_tests"]["error"] == "pytest -m gpu did not finish in 1 s"
    assert sections["gpu_tests"]["seconds"] < 5
    assert sections["tora_cost"]["ok"] is False
    assert sections["tora_cost"]["error"] == "BudgetExceeded: the wall-time budget ran out"

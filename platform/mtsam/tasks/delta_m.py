"""delta_m: the multi-task summary against a fixed single-task baseline, in percent."""

from __future__ import annotations

import math
from collections.abc import Mapping


def delta_m(
    results: Mapping[str, Mapping[str, float]],
    baseline: Mapping[str, Mapping[str, float]],
    directions: Mapping[str, Mapping[str, bool]],
) -> float:
    """Mean relative improvement over the baseline, in percent; **positive = better**.

        delta_m = 100 / T * sum_t 1 / |M_t| * sum_{m in M_t} s_m * (R_tm - B_tm) / B_tm

    with s_m = +1 when higher is better and -1 when lower is better. This is LibMTL's
    ``count_improvement`` (``(-1)**w * (B - R) / B`` with w = 1 for higher-is-better), times 100:
    a result better than the baseline on every metric gives a positive value. The metrics
    M_t are those the baseline lists for task t (``results`` may hold more; they are unused).

    Arguments are {task: {metric: value}} and {task: {metric: higher_is_better}}. Raises
    ValueError, naming them, for tasks of ``results`` absent from the baseline (or the other
    way round), baseline metrics missing from ``results`` or of unknown direction, and
    baseline values that are 0 or not finite.
    """
    missing_base = sorted(set(results) - set(baseline))
    missing_res = sorted(set(baseline) - set(results))
    if missing_base or missing_res:
        raise ValueError(
            f"delta_m: tasks differ: no baseline for {missing_base}, no results for {missing_res}"
        )
    if not baseline:
        raise ValueError("delta_m: the baseline is empty")
    problems: list[str] = []
    for task, metrics in baseline.items():
        if not metrics:
            problems.append(f"{task}: baseline lists no metric")
        for m, b in metrics.items():
            if m not in results[task]:
                problems.append(f"{task}/{m}: not in the results {sorted(results[task])}")
            if m not in directions.get(task, {}):
                known = sorted(directions.get(task, {}))
                problems.append(f"{task}/{m}: unknown metric (direction known for {known})")
            if not math.isfinite(b) or b == 0:
                problems.append(f"{task}/{m}: baseline value {b} (needs finite, non-zero)")
    if problems:
        raise ValueError("delta_m: " + "; ".join(problems))
    total = 0.0
    for task, metrics in baseline.items():
        per_task = 0.0
        for m, b in metrics.items():
            sign = 1.0 if directions[task][m] else -1.0
            per_task += sign * (float(results[task][m]) - b) / b
        total += per_task / len(metrics)
    return 100.0 * total / len(baseline)

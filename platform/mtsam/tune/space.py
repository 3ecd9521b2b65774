"""YAML search space -> Ray Tune search space, searcher and scheduler.

Each ``tune.space`` entry names a config key and a distribution::

    adapter.r1:          {type: choice, values: [8, 16, 32]}
    train.lr:            {type: loguniform, low: 1.0e-4, high: 1.0e-2}
    adapter.orth_weight: {type: loguniform, low: 1.0e-3, high: 1.0, include_zero: true}

``include_zero`` adds a companion choice ``<key>@zero`` in {False, True}: when True the key is
set to exactly 0 (e.g. no orthogonal regularisation), else to the log-uniform sample. Both
searchers (random and Optuna) see a flat, static space this way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mtsam.config import SpaceEntry

ZERO_SUFFIX = "@zero"


def tune_space(space: Mapping[str, SpaceEntry]) -> dict[str, Any]:
    """{config key: Tune domain} for ``Tuner(param_space=...)``."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, e in space.items():
        if e.type == "choice":
            out[key] = tune.choice(list(e.values or []))
        elif e.type == "grid":
            out[key] = tune.grid_search(list(e.values or []))
        elif e.type == "uniform":
            out[key] = tune.uniform(float(e.low), float(e.high))  # type: ignore[arg-type]
        elif e.type == "loguniform":
            out[key] = tune.loguniform(float(e.low), float(e.high))  # type: ignore[arg-type]
            if e.include_zero:
                out[key + ZERO_SUFFIX] = tune.choice([False, True])
        elif e.type == "randint":
            out[key] = tune.randint(int(e.low), int(e.high))  # type: ignore[arg-type]
        else:  # the schema admits no other type
            raise ValueError(f"tune.space.{key}: unknown type {e.type!r}")
    return out


def resolve_sample(sample: Mapping[str, Any]) -> dict[str, Any]:
    """A sampled point -> {config key: value}, applying the ``@zero`` companions."""
    out = {k: v for k, v in sample.items() if not k.endswith(ZERO_SUFFIX)}
    for k, v in sample.items():
        if k.endswith(ZERO_SUFFIX) and v:
            out[k.removesuffix(ZERO_SUFFIX)] = 0.0
    return out


def overrides_of(sample: Mapping[str, Any]) -> dict[str, Any]:
    """Plain Python values (Tune may hand numpy scalars)."""
    plain: dict[str, Any] = {}
    for k, v in resolve_sample(sample).items():
        plain[k] = v.item() if hasattr(v, "item") else v
    return plain


def make_searcher(
    kind: str,
    *,
    metric: str | list[str],
    mode: str | list[str],
    seed: int,
    max_concurrent: int,
):
    """Tune's random / grid variant generator or Optuna's TPE, both seeded by ``seed``.

    Seeding the variant generator makes a random sweep sample the same configurations on every
    run with the same seed (so two schedulers can be compared on the same trials). Optuna is
    wrapped in a ``ConcurrencyLimiter``; the variant generator limits concurrency itself.
    Lists of metrics and modes (one mode per metric) make Optuna's TPE sampler search them
    as one multi-objective study (it keeps the non-dominated trials as its reference).
    """
    if kind in ("random", "grid"):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=seed)
    if kind == "optuna":
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        if isinstance(metric, list) != isinstance(mode, list) or (
            isinstance(metric, list) and len(metric) != len(mode)
        ):
            raise ValueError(f"make_searcher: one mode per metric, got {metric} and {mode}")
        searcher = OptunaSearch(
            metric=metric, mode=mode, sampler=optuna.samplers.TPESampler(seed=seed)
        )
        return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
    raise ValueError(f"tune.searcher: unknown {kind!r}")


def make_scheduler(kind: str, *, max_epochs: int, grace_period: int, reduction_factor: float):
    """FIFO, or ASHA over the reported ``epoch``.

    Not ``training_iteration``: it restarts from 0 for trials resumed with the sweep, and a
    trial rejected by the parameter budget (one report, ``epoch`` 0) would enter the first
    rung with the worst metric and lower its cut.
    """
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if kind == "fifo":
        return FIFOScheduler()
    if kind == "asha":
        return ASHAScheduler(
            time_attr="epoch",
            max_t=max_epochs,
            grace_period=min(grace_period, max_epochs),
            reduction_factor=reduction_factor,
        )
    raise ValueError(f"tune.scheduler: unknown {kind!r}")

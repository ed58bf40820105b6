"""Jobs: ``run_<job>(config) -> result dict``. The CLI, the ``ray job submit`` entry points and
Tune trials all call these; each validates, calls the library on Ray, and records what it produced."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from genmem.config import EvaluateConfig, PosteriorConfig, RetrainConfig, TrainConfig


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train on Ray Train workers (a local Ray cluster unless attached to one), tracked in MLflow."""
    from genmem.distributed.train import fit

    return fit(cfg)


def run_sample(checkpoint: str | Path, n: int, out: str | Path, *, seed: int = 0, tasks: int | None = None, batch_size: int = 256) -> dict[str, Any]:
    """Generate samples 0..n-1 of ``seed`` across Ray tasks into Parquet shards with provenance."""
    from genmem.distributed.sampling import sample

    return sample(checkpoint, n, out, seed=seed, tasks=tasks, batch_size=batch_size)


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Samples (generated across Ray tasks, or given) scored against the checkpoint's own data."""
    from genmem.distributed.evaluate import run_evaluate as evaluate

    return evaluate(cfg)


def run_posterior(cfg: PosteriorConfig) -> dict[str, Any]:
    """θ*, Euclidean and Riemannian Laplace arms side by side: weight samples as Ray tasks."""
    from genmem.distributed.posterior import run_posterior as posterior

    return posterior(cfg)


def run_quickstart(train_cfg: TrainConfig, *, scales: tuple[float, ...] = (1e-2, 1e-1, 1.0), samples: int = 4, n: int = 500) -> dict[str, Any]:
    """The quickstart: train until the model memorises, then θ* against Euclidean and Riemannian
    Laplace weight samples at each scale, every arm evaluated and tracked."""
    trained = run_train(train_cfg)
    posterior = run_posterior(PosteriorConfig(checkpoint=trained["checkpoint"], scales=list(scales), samples=samples, n=n))
    return {"train": trained, "posterior": posterior}


def run_retrain(cfg: RetrainConfig, **kwargs: Any) -> dict[str, Any]:
    """The self-consuming loop: train, sample and evaluate each generation on Ray, tracked as a
    parent MLflow run with a child run per generation."""
    from genmem.methods.retraining import run_retrain as retrain

    return retrain(cfg, **kwargs)


def run_sweep(space: str | Path, job: str, base: dict[str, Any], *, name: str | None = None, resume: bool = False) -> dict[str, Any]:
    """A Ray Tune sweep of ``job`` over a tune_spaces/ file, one MLflow child run per trial."""
    from genmem.distributed.tune import run_sweep as sweep

    return sweep(space, job, base, name=name, resume=resume)

"""`genmem quickstart` (`make demo`): train until the model memorises, then θ* against Euclidean
and Riemannian Laplace weight samples at each scale, every arm evaluated and tracked, then the report of the arms."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from genmem.config import Strict, TrainConfig
from genmem.jobs import registry
from genmem.jobs.base import COMMANDS, Context, Job


class QuickstartConfig(Strict):
    train: TrainConfig = Field(default_factory=TrainConfig)  # --config and --set address this
    scales: list[float] = Field(default_factory=lambda: [1e-2, 1e-1, 1.0], min_length=1)
    samples: int = Field(4, gt=0)  # weight samples per (method, scale)
    n: int = Field(500, gt=20)  # images per arm

    @model_validator(mode="after")
    def _check_posterior(self) -> "QuickstartConfig":
        """The posterior half's settings, checked before the training half runs (its checkpoint
        does not exist yet, so a placeholder stands in)."""
        registry.get("posterior").config(checkpoint="<trained>", scales=self.scales, samples=self.samples, n=self.n)
        return self


def run(cfg: QuickstartConfig, ctx: Context) -> dict[str, Any]:
    """The three jobs in turn, each reached through the registry as the CLI reaches it."""
    train, posterior, report = (registry.get(name) for name in ("train", "posterior", "report"))
    trained = train.run(cfg.train, ctx)
    arms = posterior.run(posterior.config(checkpoint=trained["checkpoint"], scales=cfg.scales, samples=cfg.samples, n=cfg.n), ctx)
    return {"train": trained, "posterior": arms, "report": report.run(report.config(runs=[arms["mlflow_run_id"]], name="quickstart"), ctx)}


def table(result: dict[str, Any]) -> str:
    return (registry.get("posterior").table(result["posterior"]) + "\n\n" + registry.get("report").table(result["report"])
            + "\nMLflow: `make mlflow-ui`, then experiments genmem/train, genmem/posterior and genmem/report at http://127.0.0.1:5000")


def summary(result: dict[str, Any]) -> dict[str, Any]:
    return {"checkpoint": result["train"]["checkpoint"], "grid": result["train"]["grid"],
            "train_run_id": result["train"]["mlflow_run_id"], "posterior_run_id": result["posterior"]["mlflow_run_id"], "report_run_id": result["report"]["mlflow_run_id"]}


JOB = Job(
    command=COMMANDS["quickstart"],
    config=QuickstartConfig,
    run=run,
    table=table,
    summary=summary,
)

"""How a run was started: the one record every job and every shared run helper takes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Context:
    """How a job was started. From the CLI: all defaults. From a Tune trial: the sweep's parent
    MLflow run and tags, a deterministic ``key`` (a restored trial reopens the same Ray and
    MLflow runs instead of starting new ones) and ``report``, which sends metrics to Tune."""

    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    key: str | None = None
    report: Callable[[dict[str, float]], None] | None = None

    @property
    def under_tune(self) -> bool:
        return self.report is not None

    def emit(self, metrics: dict[str, float]) -> None:
        """Progress metrics for Tune (nothing outside a sweep)."""
        if self.report is not None:
            self.report(metrics)

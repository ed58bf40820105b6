"""An evaluation (:class:`genmem.evaluation.Evaluation`) into an MLflow run: what every job that
measures samples logs the same way."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from genmem.config import MetricsConfig, to_yaml
from genmem.evaluation import Evaluation
from genmem.runs import headlines
from genmem.tracking import Tracker

# An evaluation's headline figures: the run list's columns of the experiments that evaluate
COLUMNS = ("eval/memorised_fraction", "eval/memorised_fraction_lo", "eval/memorised_fraction_hi", "eval/null/memorised_fraction",
           "eval/fd_classifier", "eval/fd_pixels", "eval/precision", "eval/recall")


def log_evaluation(tracker: Tracker, result: Evaluation, cfg: MetricsConfig, *, step: int = 0, figure_step: int | None = None) -> None:
    """An evaluation into a run: metrics at ``step``, the figures (by ``figure_step`` when given),
    the most memorised samples with their provenance, every sample's copy-test verdicts
    (``copy_tests.parquet``), C_T's cells (``ct_cells.json``), and the metric settings; the
    headline figures as the run's description."""
    tracker.metrics(result.metrics, step=step)
    tracker.describe(headlines.evaluation(result.metrics))
    for name, picture in result.figures.items():
        tracker.image(name, picture, step=figure_step)
    tracker.text(json.dumps(result.most_memorised, indent=2), "most_memorised.json")
    if result.ct_cells:
        tracker.text(json.dumps(result.ct_cells, indent=1), "ct_cells.json")
    if result.per_sample and tracker.enabled:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "copy_tests.parquet"
            pq.write_table(pa.table(result.per_sample), path)
            tracker.artifact(path)
    tracker.text(to_yaml(cfg), "evaluate.yaml")

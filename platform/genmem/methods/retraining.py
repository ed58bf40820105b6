"""The self-consuming loop's algorithms (METHODS.md §Iterative retraining): which generated rows
join the next generation's training set, and when the loop has collapsed. Library code: the
loop itself (train, sample, evaluate on Ray, tracked) is the retrain job.

Generation 0 trains on the real data. Generation g trains on the real rows plus floor(λ n) rows
chosen (seeded) from fresh samples of generation g-1, or on those samples alone ("fully
synthetic"), warm-started from g-1 or from scratch, with the same images-seen budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from genmem.data import read_shards, select, write_shards
from genmem.viz import line_panels

# Per-generation metrics shown against generation (those present: MMD only on 2-D data).
CURVES = ("fd", "precision", "recall", "memorised_fraction", "sample_variance", "mmd")


def collapse_generation(fd: list[float], factor: float, patience: int = 2, *,
                        intervals: list[tuple[float, float]] | None = None) -> int | None:
    """The first generation g whose FD rose at each of the last ``patience`` generations and
    exceeds ``factor`` x the FD of generation 0, and, given each generation's FD ``intervals``
    (lo, hi), whose interval lies wholly above generation 0's: a rise within sampling noise is
    not a collapse. None when the loop has not collapsed."""
    for g in range(patience, len(fd)):
        rising = all(fd[i] > fd[i - 1] for i in range(g - patience + 1, g + 1))
        beyond_noise = intervals is None or intervals[g][0] > intervals[0][1]
        if rising and fd[g] > factor * fd[0] and beyond_noise:
            return g
    return None


def select_synthetic(samples: str | Path, k: int, seed: int, out: Path, *, generation: int, checkpoint: str) -> str:
    """The k generated rows (chosen with ``seed``) that the next generation trains on, written to
    ``out`` with their provenance (generation, parent checkpoint, model id, seed, index)."""
    chosen = select(read_shards(samples), k, seed)
    columns = {**chosen.columns(), "generation": np.full(k, generation, dtype=np.int64),
               "parent_checkpoint": np.full(k, checkpoint, dtype=object)}
    columns.pop("is_synthetic", None)
    write_shards(out, chosen.x, columns, source=f"generation:{generation}", split="synthetic",
                 extra={"generation": generation, "parent_checkpoint": checkpoint, "samples": str(samples), "selection_seed": seed})
    return str(out)


def curves(history: list[dict[str, Any]]) -> np.ndarray:
    """Each metric of :data:`CURVES` against generation."""
    panels = {}
    for name in CURVES:
        if all(name in h["metrics"] for h in history):
            panels[name] = {"": ([h["generation"] for h in history], [h["metrics"][name] for h in history])}
    return line_panels(panels, "generation", integer_x=True)

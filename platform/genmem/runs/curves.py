"""A finished sweep's trials as lines: grouped by the swept values that are not seeds, and
measured curves against one swept value (the jobs' ``sweep_figure``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from genmem.space import Space
from genmem.viz import line_panels


def grouped(space: Space, rows: list[dict[str, Any]], exclude: tuple[str, ...] = ()) -> dict[str, list[dict[str, Any]]]:
    """The finished trials grouped into one line each: by every swept key except the seeds and
    ``exclude`` (the figure's x axis), labelled ``key=value, ...`` (a single group: ``""``)."""
    keys = [a.key for a in space.axes if a.key.split(".")[-1] != "seed" and a.key not in exclude]
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        label = ", ".join(f"{k.split('.')[-1]}={row['params'].get(k)}" for k in keys)
        groups.setdefault(label, []).append(row)
    return groups


def curves_against(space: Space, rows: list[dict[str, Any]], x: str, curves: dict[str, Callable[[dict[str, float]], float | None]],
                   xlabel: str | None = None) -> np.ndarray | None:
    """One panel per curve, its value (``curves[title](final report)``) against the final
    report's ``x`` (e.g. the regulariser weight), one line per other swept value, mean over seeds."""
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for title, read in curves.items():
        lines = {}
        for label, group in grouped(space, rows, exclude=(x,)).items():
            by_x: dict[float, list[float]] = {}
            for row in group:
                final = row["reports"][-1] if row["reports"] else {}
                value = read(final) if x in final else None
                if value is not None and np.isfinite(value):
                    by_x.setdefault(final[x], []).append(float(value))
            if by_x:
                xs = sorted(by_x)
                lines[label] = (xs, [float(np.mean(by_x[v])) for v in xs])
        if lines:
            panels[title] = lines
    xs = [v for lines in panels.values() for line in lines.values() for v in line[0]]
    decades = bool(xs) and min(xs) > 0 and max(xs) >= 30 * min(xs)  # a weight swept over decades reads on a log axis
    return line_panels(panels, xlabel or x, log_x=decades) if panels else None

"""A run's result in one line, for its MLflow description (the run page's first line, and a
column of the run list): what was measured and the figures a reader compares, with the
interval and the null control where they were measured."""

from __future__ import annotations

import math
from collections.abc import Mapping

from genmem.report import quality_of


def _num(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def evaluation(metrics: Mapping[str, float], prefix: str = "eval/") -> str:
    """``memorised 22.4% [19.5%, 26.9%] of 500 samples (null control 0.4%), fd_classifier 0.23,
    precision 0.996, recall 0.969`` from an evaluation's metrics."""
    m = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
    parts = []
    if "memorised_fraction" in m:
        text = f"memorised {_pct(m['memorised_fraction'])}"
        if "memorised_fraction_lo" in m:
            text += f" [{_pct(m['memorised_fraction_lo'])}, {_pct(m['memorised_fraction_hi'])}]"
        if "n" in m:
            text += f" of {int(m['n']):,} samples"
        if "null/memorised_fraction" in metrics:  # the null control's keys sit beside eval/*, not under it
            text += f" (null control {_pct(metrics['null/memorised_fraction'])})"
        parts.append(text)
    quality = quality_of(m)
    if quality:
        parts.append(f"{quality[0]} {_num(quality[1])}")
    parts += [f"{key} {_num(m[key])}" for key in ("precision", "recall") if key in m]
    return ", ".join(parts) or "no memorisation or quality metric was measured"


def change(metrics: Mapping[str, float], names: tuple[str, ...]) -> str:
    """``memorised 22.4% → 1.4%, fd_classifier 0.74 → 0.98``: each of ``names`` measured as
    ``<name>_before`` and ``<name>``, in order; fractions as percentages."""
    parts = []
    for name in names:
        if name in metrics and f"{name}_before" in metrics:
            fmt = _pct if name.endswith("fraction") else _num
            label = "memorised" if name == "memorised_fraction" else name
            parts.append(f"{label} {fmt(metrics[name + '_before'])} → {fmt(metrics[name])}")
    return ", ".join(parts) or "measured before and after (no headline figure applies)"


def training(images: int, steps: int, loss: float | None, memorised: tuple[int, float] | None, verdict: str | None) -> str:
    """``trained 60,000 images (1,875 steps): loss 0.0123, memorised 22.4% at 60,000 images``, and
    the memorisation budget's verdict where one was set."""
    figures = [f"loss {_num(loss)}"] if loss is not None else []
    if memorised is not None:
        figures.append(f"memorised {_pct(memorised[1])} at {memorised[0]:,} images")
    text = f"trained {images:,} images ({steps:,} steps)" + (": " + ", ".join(figures) if figures else "")
    return text + (f"; memorisation budget {verdict}" if verdict else "")


DEGENERATE_PRECISION = 0.05  # below this precision an arm's samples are not the data's: "0 memorised" would mislead


def arm(title: str, metrics: Mapping[str, float], prefix: str = "eval/") -> str:
    """``riemannian τ=0.01: memorised 21.2% [...] of 500 samples, ...``: one posterior arm's
    evaluation; an arm whose precision is near 0 is called degenerate instead."""
    precision = metrics.get(prefix + "precision", 1.0)
    if precision < DEGENERATE_PRECISION:
        return (f"{title}: degenerate (precision {precision:.3f}): its samples are not the data's, so its memorised "
                f"{_pct(metrics.get(prefix + 'memorised_fraction', math.nan))} says nothing about copying")
    return f"{title}: {evaluation(metrics, prefix)}"


def posterior(rows: list[Mapping], fd_key: str) -> str:
    """``θ* memorised 23.0%, fd_classifier 0.23; riemannian τ=0.01 21.2% (0.29), ...``: each arm's
    memorised share and quality; an arm whose precision is near 0 is called degenerate, since
    samples that are not data cannot be copies either."""
    def arm(row: Mapping) -> str:
        if row.get("precision", 1.0) < DEGENERATE_PRECISION:
            return f"τ={row['scale']:g} degenerate (precision {row['precision']:.3f})"
        return f"τ={row['scale']:g} {_pct(row['memorised_fraction'])} ({_num(row[fd_key])})"

    star = next(r for r in rows if r["arm"] == "theta_star")
    parts = [f"θ* memorised {_pct(star['memorised_fraction'])}, {fd_key} {_num(star[fd_key])}"]
    for method in dict.fromkeys(r["arm"] for r in rows if r["arm"] != "theta_star"):
        parts.append(f"{method} " + ", ".join(arm(r) for r in rows if r["arm"] == method))
    return "; ".join(parts)


def generations(history: list[Mapping], ratio: float | str, collapsed_at: int | None) -> str:
    """``5 generations at synthetic ratio 0.5: memorised 2.1% → 8.0%, fd_classifier 0.5 → 3.2``."""
    first, last = history[0]["metrics"], history[-1]["metrics"]
    n = len(history) - 1
    text = f"{n} generation{'' if n == 1 else 's'} at synthetic ratio {ratio}: "
    figures = []
    if "memorised_fraction" in first and "memorised_fraction" in last:
        figures.append(f"memorised {_pct(first['memorised_fraction'])} → {_pct(last['memorised_fraction'])}")
    figures.append(f"{history[0]['fd_key'].removeprefix('eval/')} {_num(first['fd'])} → {_num(last['fd'])}")
    return text + ", ".join(figures) + (f"; collapsed at generation {collapsed_at}" if collapsed_at is not None else "")


def sweep(job: str, keys: list[str], finished: int, failed: int, stopped: int, metric: str | None, best: Mapping | None) -> str:
    """``4 retrain trials over synthetic_ratio, seed: 4 finished; best fd 1.23 at synthetic_ratio=0.25, seed=0``."""
    text = f"{finished + failed + stopped} {job} trials over {', '.join(keys) or 'one point'}: {finished} finished"
    text += f", {failed} failed" if failed else ""
    text += f", {stopped} stopped early" if stopped else ""
    if best is not None and metric:
        text += f"; best {metric} {_num(best['final'][metric])} at " + ", ".join(f"{k}={v}" for k, v in best["params"].items())
    return text


def size_study(size: int, metrics: Mapping[str, float]) -> str:
    """``64 training points: memorised 15.0% (held-out control 0.3%), FD 0.52; learned dimension 3
    (held-out points 3, true 3)``: one size of a size study, from its evaluation (``eval/*``),
    held-out FD (``fd``) and learned dimension (``learned_dim/*``)."""
    parts = []
    if "eval/memorised_fraction" in metrics:
        text = f"memorised {_pct(metrics['eval/memorised_fraction'])}"
        if "eval/heldout_memorised_fraction" in metrics:
            text += f" (held-out control {_pct(metrics['eval/heldout_memorised_fraction'])})"
        parts.append(text)
    if "fd" in metrics:
        parts.append(f"FD {_num(metrics['fd'])}")
    text = f"{size:,} training points: " + ", ".join(parts)
    if "learned_dim/train_q50" in metrics:
        where = [f"held-out points {_num(metrics['learned_dim/heldout_q50'])}"] if "learned_dim/heldout_q50" in metrics else []
        where += [f"true {_num(metrics['learned_dim/true'])}"] if "learned_dim/true" in metrics else []
        text += f"; learned dimension {_num(metrics['learned_dim/train_q50'])}" + (f" ({', '.join(where)})" if where else "")
    return text

"""One view across methods: every measured (memorised fraction, quality) point of genmem's runs,
its Pareto front, the chart, and the same points as a table, CSV and a self-contained HTML page.

Library code: the points come in as plain records (each job's registry entry reads its own MLflow
runs into them, :mod:`genmem.jobs.report` gathers), so none of this touches MLflow or Ray.

    points = [Point(run_id="…", method="posterior/riemannian", setting="τ=0.1", memorised_fraction=0.4,
                    quality=21.0, quality_key="fd_classifier", model="ab12cd34")]
    picture = chart(points)            # one panel per quality measure, Pareto front drawn
    html = to_html(points, picture)    # opens in MLflow's artifact viewer
"""

from __future__ import annotations

import base64
import csv
import html as html_lib
import io
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

# The quality measures a point can carry, best first: a point takes the first its run measured.
# Images: Fréchet distances; 2-D toys without an FD: MMD to the data.
QUALITY_KEYS = ("fd_classifier", "fid", "fd_pixels", "mmd", "mmd_data")


@dataclass(frozen=True)
class Point:
    """One model's samples, measured: a posterior arm, a retraining generation, an unlearned or
    fine-tuned model, a training-set size, an evaluated checkpoint. ``base``: θ* of a base model
    (the point others are compared with); ``over_budget``: its training crossed its
    memorisation budget (flagged)."""

    run_id: str
    method: str  # the marker: what made the model (posterior/riemannian, retrain, unlearn, ...)
    setting: str  # the colour: the method's knob (τ=0.1, synthetic_ratio=0.25, λ=5)
    memorised_fraction: float
    quality: float
    quality_key: str
    model: str = ""  # the base model the point derives from (checkpoint id or run name)
    run_name: str = ""
    experiment: str = ""
    base: bool = False
    over_budget: bool = False
    ct: float = math.nan  # Meehan et al.'s C_T of the same samples, where measured
    authpct: float = math.nan  # Alaa et al.'s authentic percentage, where measured

    def copying(self, axis: str = "fraction") -> float:
        """This point's memorisation on ``axis`` (see :data:`AXES`)."""
        return getattr(self, AXES[axis].field)


@dataclass(frozen=True)
class Axis:
    """A memorisation measure the report can draw: the Point field, its label, and whether a
    larger value means more copying."""

    field: str
    label: str
    larger_copies: bool


AXES = {
    "fraction": Axis("memorised_fraction", "memorised fraction (d1/d2 < 1/3)", True),
    "ct": Axis("ct", "C_T (negative: copies; positive: underfits)", False),
    "authenticity": Axis("authpct", "authentic % (lower: copies)", False),
}


def quality_of(metrics: dict[str, float], prefix: str = "") -> tuple[str, float] | None:
    """The first of :data:`QUALITY_KEYS` that ``metrics`` holds (under ``prefix``), finite."""
    for key in QUALITY_KEYS:
        value = metrics.get(prefix + key)
        if value is not None and math.isfinite(value):
            return key, float(value)
    return None


def point(run_id: str, metrics: dict[str, float], prefix: str = "", **fields_: object) -> Point | None:
    """A point from a run's metrics under ``prefix`` (``posterior/theta_star/``, ``eval/``);
    ``None`` where the run measured no memorised fraction or no quality."""
    memorised = metrics.get(prefix + "memorised_fraction")
    quality = quality_of(metrics, prefix)
    if memorised is None or not math.isfinite(memorised) or quality is None:
        return None
    extra = {k: float(metrics[prefix + k]) for k in ("ct", "authpct") if prefix + k in metrics}
    return Point(run_id=run_id, memorised_fraction=float(memorised), quality=quality[1], quality_key=quality[0], **extra, **fields_)


def before_and_after(metrics: dict[str, float], prefix: str) -> tuple[dict[str, float], dict[str, float]]:
    """A method's ``<prefix><key>_before`` and ``<prefix><key>`` metrics as two plain records
    (the base model's samples, the changed model's)."""
    keys = ("memorised_fraction", *QUALITY_KEYS)
    after = {k: metrics[prefix + k] for k in keys if prefix + k in metrics}
    before = {k: metrics[f"{prefix}{k}_before"] for k in keys if f"{prefix}{k}_before" in metrics}
    return before, after


def measured(points: list[Point], axis: str) -> list[Point]:
    """The points that carry the ``axis`` measure."""
    return [p for p in points if math.isfinite(p.copying(axis))]


def pareto_front(points: list[Point], axis: str = "fraction") -> list[bool]:
    """Whether each point is on the front of its quality measure: no other point of that measure
    copies no more on ``axis`` and has no worse quality, with one of the two strictly better."""
    sign = 1.0 if AXES[axis].larger_copies else -1.0
    copies = [sign * p.copying(axis) for p in points]
    on = []
    for i, p in enumerate(points):
        same = [j for j, q in enumerate(points) if q.quality_key == p.quality_key and j != i]
        on.append(not any(copies[j] <= copies[i] and points[j].quality <= p.quality
                          and (copies[j] < copies[i] or points[j].quality < p.quality) for j in same))
    return on


_COLUMNS = [f.name for f in fields(Point)] + ["pareto"]
# the page's table: what was measured first, the run id (a tooltip's worth) last
_HTML_COLUMNS = ["method", "setting", "memorised_fraction", "ct", "authpct", "quality", "quality_key", "pareto", "base", "over_budget",
                 "model", "run_name", "experiment", "run_id"]


def rows(points: list[Point], axis: str = "fraction") -> list[dict[str, object]]:
    """The table's rows: each point's fields and whether it is on the front, sorted by quality
    measure, copying on ``axis`` (least first), quality."""
    sign = 1.0 if AXES[axis].larger_copies else -1.0
    out = [{**asdict(p), "pareto": front} for p, front in zip(points, pareto_front(points, axis))]
    return sorted(out, key=lambda r: (r["quality_key"], sign * r[AXES[axis].field], r["quality"]))


def to_csv(points: list[Point], axis: str = "fraction") -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows(points, axis))
    return buf.getvalue()


def format_table(points: list[Point], axis: str = "fraction") -> str:
    """What `genmem report` prints: one line per point, θ* marked ``*``, the front ``P``,
    over-budget runs ``!``; the memorisation column is ``axis``'s."""
    name = {"fraction": "memorised", "ct": "C_T", "authenticity": "authentic%"}[axis]
    head = f"{'method':<24}{'setting':<26}{name:>10}{'quality':>12}  {'measure':<14}{'model':<12}{'':>4}  run"
    lines = [head, "-" * len(head)]
    for r in rows(points, axis):
        marks = ("*" if r["base"] else "") + ("P" if r["pareto"] else "") + ("!" if r["over_budget"] else "")
        lines.append(f"{str(r['method'])[:23]:<24}{str(r['setting'])[:25]:<26}{r[AXES[axis].field]:>10.3f}{r['quality']:>12.4g}  "
                     f"{r['quality_key']:<14}{str(r['model'])[:11]:<12}{marks:>4}  {r['run_id'][:8]}")
    lines.append("* θ* of a base model   P on the Pareto front (less copying for no worse quality)   ! over its memorisation budget")
    return "\n".join(lines)


_MARKERS = "os^Dv<>Ph*Xd"


def chart(points: list[Point], axis: str = "fraction") -> np.ndarray:
    """Memorisation on ``axis`` against quality, one panel per quality measure: one marker shape
    per method, one colour per setting, θ* as a black star, over-budget points ringed red, the
    Pareto front as a dashed step line; log axes where values span decades; for C_T, whose sign
    is the verdict, a line at 0 with the copying side shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from genmem.viz import figure_to_array, log_where_decades

    keys = sorted({p.quality_key for p in points}, key=QUALITY_KEYS.index)
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.8), dpi=100, squeeze=False)
    methods = sorted({p.method for p in points if not p.base})
    settings = sorted({p.setting for p in points if not p.base})
    colours = plt.get_cmap("tab10" if len(settings) <= 10 else "tab20")
    front = pareto_front(points, axis)
    for ax, key in zip(axes[0], keys):
        mine = [(p, f) for p, f in zip(points, front) if p.quality_key == key]
        for p, _ in mine:
            y = p.copying(axis)
            if p.base:
                ax.scatter(p.quality, y, marker="*", s=160, c="k", zorder=4, clip_on=False)
            else:
                ax.scatter(p.quality, y, marker=_MARKERS[methods.index(p.method) % len(_MARKERS)], s=50,
                           color=colours(settings.index(p.setting) % colours.N), edgecolors="k", linewidths=0.4, zorder=3, clip_on=False)
            if p.over_budget:
                ax.scatter(p.quality, y, marker="o", s=260, facecolors="none", edgecolors="#d62728", zorder=2)
        steps = sorted((p.quality, p.copying(axis)) for p, f in mine if f)
        if steps:
            ax.step([s[0] for s in steps], [s[1] for s in steps], where="post", ls="--", c="0.4", lw=1, zorder=1)
        log_where_decades(ax, xs=[p.quality for p, _ in mine], ys=[p.copying(axis) for p, _ in mine] if axis != "ct" else None)
        if axis == "ct":
            ax.axhline(0, c="0.3", lw=0.8)
            ax.axhspan(min(0.0, *(p.ct for p, _ in mine)) - 1, 0, color="#d62728", alpha=0.06, zorder=0)
            ax.text(0.99, 0.02, "copies", transform=ax.transAxes, ha="right", va="bottom", fontsize=10, color="#d62728")
        ax.set_xlabel(f"{key} (lower is better quality)")
        ax.set_ylabel(AXES[axis].label)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], ls="", marker="*", ms=12, c="k", label="θ* (base model)")]
    handles += [plt.Line2D([], [], ls="", marker=_MARKERS[i % len(_MARKERS)], ms=7, mfc="w", mec="k", label=m) for i, m in enumerate(methods)]
    handles += [plt.Line2D([], [], ls="", marker="s", ms=7, c=colours(i % colours.N), label=s) for i, s in enumerate(settings)]
    handles += [plt.Line2D([], [], ls="--", c="0.4", label="Pareto front")]
    if any(p.over_budget for p in points):
        handles.append(plt.Line2D([], [], ls="", marker="o", ms=12, mfc="none", mec="#d62728", label="over memorisation budget"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=10, frameon=False)
    fig.suptitle(f"{AXES[axis].label} against quality, every run")
    return figure_to_array(fig)


SIZE_METHOD = "size study"  # the memorisation job's points; their setting is "n=<training-set size>"


def size_chart(points: list[Point], axis: str = "fraction") -> np.ndarray | None:
    """The size study's summary across its runs, however they were run (one by one or swept):
    memorisation on ``axis`` and quality against training-set size (log x), one line per
    experiment and quality measure through the mean of each size's runs; ``None`` with fewer
    than two sizes to draw."""
    sized = [(float(p.setting.removeprefix("n=")), p) for p in points if p.method == SIZE_METHOD and p.setting.startswith("n=")]
    if len({n for n, _ in sized}) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from genmem.viz import figure_to_array, log_where_decades

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=100)
    lines: dict[tuple[str, str], list[tuple[float, Point]]] = {}
    for n, p in sorted(sized, key=lambda item: item[0]):
        lines.setdefault((p.experiment or "runs", p.quality_key), []).append((n, p))
    for i, ((experiment, key), line) in enumerate(sorted(lines.items())):
        ns = sorted({n for n, _ in line})  # every run as a point, the mean of a size's runs (seeds) as the line
        for ax, value in ((left, lambda p: p.copying(axis)), (right, lambda p: p.quality)):
            ax.scatter([n for n, _ in line], [value(p) for _, p in line], s=18, color=f"C{i}", alpha=0.6)
            ax.plot(ns, [float(np.mean([value(p) for m, p in line if m == n])) for n in ns], "-", color=f"C{i}",
                    label=f"{experiment} ({key})")
    for ax, ylabel in ((left, AXES[axis].label), (right, "quality (lower is better)")):
        ax.set_xscale("log")
        ax.set_xlabel("training-set size")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=10, frameon=False)
    log_where_decades(right, ys=[p.quality for _, p in sized])
    fig.suptitle(f"Size study: {AXES[axis].label.split(' (')[0]} and quality against training-set size, "
                 f"{len(sized)} runs")
    return figure_to_array(fig)


def to_html(points: list[Point], picture: np.ndarray, *, title: str = "genmem memorisation report", axis: str = "fraction",
            sizes: np.ndarray | None = None) -> str:
    """A static page, the chart embedded as a PNG data URI and the table below it: one file that
    MLflow's artifact viewer (or any browser) opens; ``sizes``: :func:`size_chart`'s picture,
    under the chart."""
    body = rows(points, axis)
    head = "".join(f"<th>{html_lib.escape(c)}</th>" for c in _HTML_COLUMNS)
    lines = []
    for r in body:
        cells = []
        for c in _HTML_COLUMNS:
            v = r[c]
            text = f"{v:.4g}" if isinstance(v, float) else ("✓" if v is True else "" if v is False else str(v))
            short = f"{text[:8]}…" if c == "run_id" else text  # the full id in the cell's tooltip
            cells.append(f"<td title=\"{html_lib.escape(text)}\">{html_lib.escape(short)}</td>")
        lines.append(f"<tr class=\"{'front' if r['pareto'] else ''}\">{''.join(cells)}</tr>")
    runs = len({r["run_id"] for r in body})
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html_lib.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}tr.front{background:#eef6ee}img{max-width:100%}"
            f"</style></head><body><h1>{html_lib.escape(title)}</h1><p>{len(body)} point{'s' * (len(body) != 1)} from "
            f"{runs} run{'s' * (runs != 1)}; rows on the Pareto front are shaded.</p>"
            f"<img alt=\"{html_lib.escape(AXES[axis].label)} against quality\" src=\"{_data_uri(picture)}\">"
            + (f"<img alt=\"the size study against training-set size\" src=\"{_data_uri(sizes)}\">" if sizes is not None else "")
            + f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table></body></html>\n")


def _data_uri(picture: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

"""Pictures people read at a glance: sample grids (images) and scatter plots (2-D data).

Returns uint8 RGB arrays (H, W, 3), so the same picture can be written as PNG or sent to MLflow.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image_grid(x: torch.Tensor, nrow: int | None = None, scale: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile images (n, C, H, W) in [-1, 1] into one RGB array; small images are upscaled."""
    x = x.detach().float().cpu().clamp(-1, 1)
    n, c, h, w = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    scale = scale or max(1, 64 // max(h, w))
    imgs = ((x + 1) * 127.5).round().to(torch.uint8)
    if c == 1:
        imgs = imgs.expand(n, 3, h, w)
    elif c == 2:
        imgs = torch.cat([imgs, imgs[:, :1]], dim=1)
    canvas = torch.full((3, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        canvas[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = imgs[i]
    arr = canvas.permute(1, 2, 0).numpy()
    return np.kron(arr, np.ones((scale, scale, 1), dtype=np.uint8)) if scale > 1 else arr


def scatter(x: torch.Tensor, reference: torch.Tensor | None = None, title: str = "", min_width: int | None = None) -> np.ndarray:
    """Scatter of the first two coordinates of vectors, optionally over a reference sample;
    ``min_width``: see :func:`figure_to_array`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        ref = reference.detach().cpu().flatten(1).numpy()
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="#bbbbbb", label="data")
    pts = x.detach().cpu().flatten(1).numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=2, c="#d62728", label="samples")
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=10, markerscale=4)
    return figure_to_array(fig, min_width)


MIN_WIDTH_PX = 1000  # what MLflow's artifact view shows legibly: narrower figures are drawn at a higher resolution


def figure_to_array(fig, min_width: int | None = None) -> np.ndarray:
    """The figure as an RGB array, at least ``min_width`` (default :data:`MIN_WIDTH_PX`) pixels
    wide, its text scaled with it; 0 draws it at its own size (a training run's periodic
    pictures, many and small in MLflow's image history, where the larger render costs 3x)."""
    min_width = MIN_WIDTH_PX if min_width is None else min_width
    import matplotlib.pyplot as plt

    def render(dpi: float) -> np.ndarray:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight", dpi=dpi)
        buf.seek(0)
        return np.asarray(Image.open(buf).convert("RGB"))

    dpi = max(fig.dpi, 1.15 * min_width / fig.get_figwidth())  # 15% over: the tight box trims the margins
    picture = render(dpi)
    if picture.shape[1] < min_width:  # the tight box cut more than the margin: once more, scaled up
        picture = render(dpi * min_width / picture.shape[1] * 1.01)
    plt.close(fig)
    return picture


def sample_picture(x: torch.Tensor, reference: torch.Tensor | None = None, title: str = "", min_width: int | None = None) -> np.ndarray:
    """A grid for images (n, C, H, W), a scatter for anything else (``min_width``: see :func:`figure_to_array`)."""
    if x.dim() == 4 and x.shape[1] <= 3:
        return image_grid(x)
    return scatter(x, reference, title, min_width)


def save_png(picture: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)
    return path


def pairs_grid(generated: torch.Tensor, nearest: torch.Tensor) -> np.ndarray:
    """The most-memorised pairs, generated | nearest training sample, one pair per row block.

    Images are tiled as (generated, nearest) side by side; vectors are drawn as segments from
    each generated point to its nearest training point."""
    if generated.dim() == 4 and generated.shape[1] <= 3:
        n = len(generated)
        both = torch.stack([generated, nearest], dim=1).reshape(2 * n, *generated.shape[1:])
        return image_grid(both, nrow=min(8, 2 * n) if n > 4 else 2 * n)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    _segments(ax, generated, nearest)
    return figure_to_array(fig)


def _segments(ax, generated: torch.Tensor, nearest: torch.Tensor) -> None:
    """Each generated point joined to its nearest training point (first two coordinates)."""
    g, r = generated.flatten(1)[:, :2].cpu().numpy(), nearest.flatten(1)[:, :2].cpu().numpy()
    for a, b in zip(g, r):
        ax.plot([a[0], b[0]], [a[1], b[1]], c="#999999", lw=0.8)
    ax.scatter(r[:, 0], r[:, 1], s=12, c="#1f77b4", label="nearest training")
    ax.scatter(g[:, 0], g[:, 1], s=12, c="#d62728", label="generated")
    ax.set_aspect("equal")
    ax.legend(fontsize=10)


def memorised_pairs(generated: torch.Tensor, nearest: torch.Tensor, ratios: list[float], threshold: float) -> np.ndarray:
    """The most memorised samples, labelled: images as two rows (generated above, its nearest
    training sample below), each column over its d1/d2 ratio; vectors as segments from each
    generated point to its nearest training point."""
    title = f"the {len(generated)} most memorised samples and their nearest training samples (d1/d2 < {threshold:.3g}: a copy)"
    if not (generated.dim() == 4 and generated.shape[1] <= 3):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
        _segments(ax, generated, nearest)
        ax.set_title(f"{title}\nd1/d2 from {min(ratios):.3g} to {max(ratios):.3g}", fontsize=10)
        return figure_to_array(fig)
    # Drawn with PIL, not matplotlib: every evaluation draws one, and this takes milliseconds, not half a second.
    from PIL import ImageDraw, ImageFont

    k = len(generated)
    grid = image_grid(torch.cat([generated, nearest]), nrow=k)
    zoom = math.ceil(0.85 * MIN_WIDTH_PX / grid.shape[1])
    if zoom > 1:
        grid = np.kron(grid, np.ones((zoom, zoom, 1), dtype=np.uint8))
    h, w = grid.shape[:2]
    left, top, bottom = 120, 34, 56
    canvas = Image.new("RGB", (max(left + w + 12, MIN_WIDTH_PX), top + h + bottom), "white")
    canvas.paste(Image.fromarray(grid), (left, top))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=15)
    draw.text((canvas.width / 2, 8), title, fill="black", font=font, anchor="mt")
    draw.text((left - 10, top + h / 4), "generated", fill="black", font=font, anchor="rm")
    draw.text((left - 10, top + 3 * h / 4 - 9), "nearest", fill="black", font=font, anchor="rm")
    draw.text((left - 10, top + 3 * h / 4 + 9), "training", fill="black", font=font, anchor="rm")
    for i, r in enumerate(ratios):
        draw.text((left + (i + 0.5) * w / k, top + h + 6), f"{r:.2f}", fill="black", font=font, anchor="mt")
    draw.text((left + w / 2, top + h + 30), "d1/d2: distance to the nearest training sample over distance to the second nearest",
              fill="black", font=font, anchor="mt")
    return np.asarray(canvas)


def labelled_rows(pictures: list[np.ndarray], labels: list[str], title: str) -> np.ndarray:
    """Pictures stacked one per row, each with its label on the left, under a title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(p.shape[1] for p in pictures)
    heights = [p.shape[0] for p in pictures]
    fig, axes = plt.subplots(len(pictures), 1, figsize=(2.2 + width / 100, 0.6 + sum(heights) / 100), dpi=100,
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, picture, label in zip(axes[:, 0], pictures, labels):
        ax.imshow(picture, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=10)
        for side in ax.spines.values():
            side.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return figure_to_array(fig)


def ratio_histograms(train: torch.Tensor, heldout: torch.Tensor | None, threshold: float, label: str = "d1/d2") -> np.ndarray:
    """Histograms of a nearest-neighbour statistic against the training and held-out sets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    values = [train.cpu().numpy()] + ([heldout.cpu().numpy()] if heldout is not None else [])
    hi = max(float(v.max()) for v in values if len(v)) if any(len(v) for v in values) else 1.0
    bins = np.linspace(0, max(hi, 1e-9), 40)
    ax.hist(values[0], bins=bins, alpha=0.6, label="vs training set", color="#d62728")
    if heldout is not None:
        ax.hist(values[1], bins=bins, alpha=0.6, label="vs held-out set", color="#1f77b4")
    if label == "d1/d2":
        ax.axvline(threshold, c="k", ls="--", lw=1, label=f"memorised below {threshold:.2f}")
    ax.set_xlabel(label)
    ax.set_ylabel("generated samples")
    ax.legend(fontsize=10)
    return figure_to_array(fig)


def line_panels(panels: dict[str, dict[str, tuple[list[float], list[float]]]], xlabel: str, *, integer_x: bool = False,
                log_x: bool = False) -> np.ndarray:
    """One small line plot per panel title, one line per label: ``{title: {label: (xs, ys)}}``
    (metrics against generation, one line per swept value); ``log_x`` for a swept weight that
    spans decades."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), dpi=100, squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels.items()):
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, "o-", ms=3, label=label)
        ax.set_title(title, fontsize=10)
        if log_x:
            ax.set_xscale("log")
        if integer_x:
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel, fontsize=10)
        ax.tick_params(labelsize=10)
        if len(lines) > 1:
            ax.legend(fontsize=10)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return figure_to_array(fig)


def before_after(before: torch.Tensor, after: torch.Tensor, reference: torch.Tensor | None = None,
                 forget: torch.Tensor | None = None, titles: tuple[str, str] = ("before", "after")) -> np.ndarray:
    """Two panels, the same samples' model before and after a change (:func:`side_by_side`)."""
    return side_by_side([before, after], list(titles), reference, forget)


def side_by_side(samples: list[torch.Tensor], titles: list[str], reference: torch.Tensor | None = None,
                 forget: torch.Tensor | None = None) -> np.ndarray:
    """One panel per sample set: image grids, or for 2-D points scatters over the data
    ``reference`` with the data to forget (boolean mask ``forget``) drawn in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(samples), figsize=(4 * len(samples), 4), dpi=100, squeeze=False)
    for ax, x, title in zip(axes[0], samples, titles):
        if x.dim() == 4 and x.shape[1] <= 3:
            ax.imshow(image_grid(x[:64]))
            ax.axis("off")
        else:
            if reference is not None:
                ref = reference.detach().cpu().flatten(1).numpy()
                mask = np.zeros(len(ref), bool) if forget is None else forget.cpu().numpy().astype(bool)
                ax.scatter(ref[~mask, 0], ref[~mask, 1], s=2, c="#bbbbbb", label="data kept" if mask.any() else "data")
                if mask.any():
                    ax.scatter(ref[mask, 0], ref[mask, 1], s=2, c="#f4a6a6", label="data to forget")
            pts = x.detach().cpu().flatten(1).numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=2, c="#1f3b73", label="samples")
            ax.set_aspect("equal")
            ax.legend(loc="upper right", fontsize=10, markerscale=4)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return figure_to_array(fig)


def log_where_decades(ax, xs=None, ys=None, factor: float = 30.0) -> None:
    """Put an axis on a log scale where its finite values span ``factor`` or more (FD 0.23 beside
    21,904 leaves every point but one on a linear axis); with zeros among them, symlog linear
    below half the smallest positive value."""
    for values, set_scale, set_lim in ((xs, ax.set_xscale, ax.set_xlim), (ys, ax.set_yscale, ax.set_ylim)):
        v = [float(x) for x in (values or []) if np.isfinite(x)]
        pos = [x for x in v if x > 0]
        if not pos or min(v) < 0 or max(pos) < factor * min(pos):
            continue
        if len(pos) == len(v):
            set_scale("log")
            set_lim(min(pos) / 1.6, max(pos) * 1.6)
        else:  # zeros: the axis starts at 0 (no empty negative decades), linear up to half the smallest positive value
            set_scale("symlog", linthresh=min(pos) / 2)
            set_lim(0, max(pos) * 1.6)


def phase_plot(panels: dict[str, dict[str, tuple[list[float], list[float]]]], xlabel: str, *, threshold: float | None = None,
               emm: float | None = None) -> np.ndarray:
    """Measures against training-set size on a log axis: ``{title: {label: (xs, ys)}}`` with
    one thin line per seed and a thick ``"mean"``; the first panel (the memorised fraction)
    marks ``threshold`` and the effective model memorisation ``emm``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.0), dpi=100, squeeze=False)
    for i, (ax, (title, lines)) in enumerate(zip(axes.flat, panels.items())):
        for label, (xs, ys) in lines.items():
            mean = label == "mean"
            ax.plot(xs, ys, "o-", ms=4 if mean else 2, lw=2.2 if mean else 0.8, color="k" if mean else None,
                    alpha=1.0 if mean or len(lines) == 1 else 0.6, label=label)
        if i == 0 and threshold is not None:
            ax.axhline(threshold, color="gray", ls=":", lw=1, label=f"threshold {threshold:g}")
            if emm is not None and np.isfinite(emm):
                ax.axvline(emm, color="tab:red", ls="--", lw=1.2, label=f"EMM ≈ {emm:.0f}")
        ax.set_xscale("log")
        ys = [y for _, (_, values) in lines.items() for y in values if np.isfinite(y)]
        if ys and min(ys) > 0:  # e.g. FD falling over decades
            log_where_decades(ax, ys=ys)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=10)
        ax.tick_params(labelsize=10)
        ax.legend(fontsize=10)
    fig.tight_layout()
    return figure_to_array(fig)


def spectrum_plot(spectra: dict[str, torch.Tensor], noise: float) -> np.ndarray:
    """Scaled score-Jacobian spectra s σ_i (rows: points) per group of points: the median and
    the 10-90% band against the index; ~1 is a normal (or lost) direction, ~0 a kept tangent one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for label, sv in spectra.items():
        sv = sv.double().clamp(min=1e-6)
        idx = np.arange(1, sv.shape[1] + 1)
        q = torch.quantile(sv, torch.tensor([0.1, 0.5, 0.9], dtype=sv.dtype), dim=0).numpy()
        ax.plot(idx, q[1], "o-", ms=2, label=f"{label} points (median)")
        ax.fill_between(idx, q[0], q[2], alpha=0.2)
    ax.set_yscale("log")
    ax.axhline(0.5, color="gray", ls=":", lw=1)
    ax.set_xlabel("singular value index (descending)", fontsize=10)
    ax.set_ylabel(f"s·σ_i (s = {noise:g})", fontsize=10)
    ax.set_title("score-Jacobian spectrum: 1 normal or lost, 0 kept", fontsize=10)
    ax.legend(fontsize=10)
    fig.tight_layout()
    return figure_to_array(fig)


def densities(samples: list[torch.Tensor], titles: list[str], weights: list[torch.Tensor | None] | None = None, bins: int = 40) -> np.ndarray:
    """2-D histograms of point sets on one shared grid and colour scale, one panel each; a set
    with ``weights`` is drawn as the weighted density (an exact target as reweighted samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = weights or [None] * len(samples)
    pts = torch.cat([s.double() for s in samples])
    lo, hi = torch.quantile(pts, 0.002, dim=0).tolist(), torch.quantile(pts, 0.998, dim=0).tolist()
    edges = [np.linspace(lo[i], hi[i], bins + 1) for i in range(2)]
    hists = []
    for s, w in zip(samples, weights):
        h, _, _ = np.histogram2d(s[:, 0].double().numpy(), s[:, 1].double().numpy(), bins=edges,
                                 weights=None if w is None else w.double().numpy(), density=True)
        hists.append(h)
    vmax = max(float(h.max()) for h in hists) or 1.0
    fig, axes = plt.subplots(1, len(samples), figsize=(4 * len(samples), 4), dpi=100, squeeze=False)
    for ax, h, title in zip(axes[0], hists, titles):
        ax.imshow(h.T, origin="lower", extent=(lo[0], hi[0], lo[1], hi[1]), cmap="magma", vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=10)
    fig.tight_layout()
    return figure_to_array(fig)

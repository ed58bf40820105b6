"""Every memorisation test on one sample set, with intervals and a null reference, in one space.

The tests answer "does this generator copy its training data?" from different sides:

- the ratio test (d1/d2 < 1/3, :mod:`genmem.metrics.memorisation`): near-exact copies;
- authenticity (:mod:`genmem.metrics.authenticity`): samples inside a training point's own
  neighbourhood;
- C_T and Z_U (:mod:`genmem.metrics.copying`): samples closer to train than fresh data is,
  cell by cell (negative = copying, positive = underfitting);
- the size-matched held-out gap (:mod:`genmem.metrics.contrast`).

Fractions, authPct and the gap carry seeded bootstrap intervals (``*_lo``/``*_hi``). The null
control measures one half of the held-out set as if it were the samples, against train, with the
other half as the held-out set: what "no copying" reads on this data and at these sizes.

Usage::

    ref = CopyReference.build(train, heldout, CopySettings(cells=10), search=knn)
    ev = ref.measure(samples)
    ev.summary()            # {"memorised_fraction": ..., "authpct": ..., "ct": ..., "gap": ...}
    ref.null().summary()    # the same keys for held-out data measured as samples
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from genmem.metrics import intervals
from genmem.metrics.authenticity import authentic
from genmem.metrics.contrast import HeldoutGap, size_matched_gap
from genmem.metrics.copying import MIN_SAMPLES, CopyTest, ct_statistic, mann_whitney_z
from genmem.metrics.kmeans import Cells, kmeans
from genmem.metrics.memorisation import MemorisationReport, memorisation
from genmem.metrics.neighbours import knn

Search = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class CopySettings:
    """How the tests run. ``cells``: k-means cells of C_T (None: no C_T); ``min_samples``: a cell
    enters C_T with more generated samples than this; ``alpha``: a cell copies significantly at
    this one-sided level (Bonferroni over cells); ``gap_draws``: subsamples of the size-matched
    gap; ``bootstrap``: resamples of the gap's interval (0: none; fractions take Wilson's); ``level``: the intervals' coverage;
    ``seed``: cells, subsamples, resamples and the null's split."""

    threshold: float = 1 / 3
    cells: int | None = 10
    min_samples: int = MIN_SAMPLES
    alpha: float = 0.05
    gap_draws: int = 5
    bootstrap: int = 200
    level: float = intervals.LEVEL
    seed: int = 0


@dataclass
class CopyEvidence:
    """The tests' results for one sample set: ``report`` (distances, ratio, nearest), per-sample
    ``authentic`` flags, the C_T test, each sample's C_T ``cell`` and the size-matched gap (None
    without a held-out set), and ``intervals`` keyed by the summary's names."""

    report: MemorisationReport
    authentic: Tensor
    copy_test: CopyTest | None
    cell: Tensor | None
    gap: HeldoutGap | None
    intervals: dict[str, tuple[float, float]]

    @property
    def authpct(self) -> float:
        return 100 * float(self.authentic.double().mean())

    def summary(self) -> dict[str, float]:
        """Scalars to log: the ratio test's (:meth:`MemorisationReport.summary`, with its quantiles)
        and the :meth:`headline`."""
        return {**self.report.summary(), **self.headline()}

    def headline(self) -> dict[str, float]:
        """Each test's figure: ``memorised_fraction`` (and its held-out twin), ``authpct``, C_T's,
        ``gap`` and ``gap_spread``, each interval as ``<name>_lo``/``<name>_hi``; undefined ones left out."""
        rep = self.report
        out = {"memorised_fraction": rep.memorised_fraction, "heldout_memorised_fraction": rep.heldout_memorised_fraction,
               "authpct": self.authpct}
        if self.copy_test is not None:
            out.update(self.copy_test.summary())
        if self.gap is not None:
            out["gap"], out["gap_spread"] = self.gap.gap, self.gap.spread
        for name, (lo, hi) in self.intervals.items():
            out[f"{name}_lo"], out[f"{name}_hi"] = lo, hi
        return {k: v for k, v in out.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


@dataclass
class CopyReference:
    """The training and held-out sets of one space with what every measurement reuses: each
    training point's distance to its nearest other one (authenticity), the held-out rows'
    distances to train (Z_U), the k-means cells (C_T) and each training row's cell. They depend
    on the two sets alone: :meth:`state` gives them to store, ``build(..., state=...)`` reuses them
    (a training set of 60,000 rows costs its own 60,000 x 60,000 neighbour search)."""

    train: Tensor
    heldout: Tensor | None
    settings: CopySettings
    search: Search
    train_nn: Tensor
    heldout_d: Tensor | None
    cells: Cells | None
    train_cells: Tensor | None

    @classmethod
    def build(cls, train: Tensor, heldout: Tensor | None, settings: CopySettings = CopySettings(), *,
              search: Search | None = None, state: dict[str, Tensor] | None = None) -> CopyReference:
        """Check the sizes (one sentence each), then measure what every sample set is compared with,
        or take it from ``state`` (:meth:`state` of a reference of the same sets and settings).
        ``search``: an exact k-NN with :func:`knn`'s contract (default: this process's)."""
        tr = train.detach().flatten(1).float()
        ho = heldout.detach().flatten(1).float() if heldout is not None and len(heldout) >= 2 else None
        check_sizes(len(tr), None if ho is None else len(ho), settings)
        search = search or partial(knn)
        if state is None:
            state = cls._measure_sets(tr, ho, settings, search)
        cells = Cells(state["centres"], float(state["inertia"])) if "centres" in state else None
        return cls(tr, ho, settings, search, state["train_nn"], state.get("heldout_d"), cells, state.get("train_cells"))

    @staticmethod
    def _measure_sets(tr: Tensor, ho: Tensor | None, settings: CopySettings, search: Search) -> dict[str, Tensor]:
        # The second neighbour of a training point among the training set is its nearest other point
        # (itself, or a duplicate of it, at 0 is the first).
        state = {"train_nn": search(tr, tr, 2)[0][:, 1].to(torch.float64).cpu()}
        if ho is not None:
            state["heldout_d"] = search(ho, tr, 1)[0][:, 0].to(torch.float64).cpu()
            if settings.cells:
                cells = kmeans(tr, settings.cells, seed=settings.seed)
                state.update(centres=cells.centres, inertia=torch.tensor(cells.inertia, dtype=torch.float64),
                             train_cells=cells.assign(tr))
        return state

    def state(self) -> dict[str, Tensor]:
        """What :meth:`build` measured, as tensors to store and pass back as ``state``."""
        out = {"train_nn": self.train_nn}
        if self.heldout_d is not None:
            out["heldout_d"] = self.heldout_d
        if self.cells is not None:
            out.update(centres=self.cells.centres, inertia=torch.tensor(self.cells.inertia, dtype=torch.float64),
                       train_cells=self.train_cells)
        return {k: v.contiguous() for k, v in out.items()}

    def measure(self, generated: Tensor) -> CopyEvidence:
        """Every test of ``generated`` against this reference."""
        return self._measure(generated.detach().flatten(1).float(), self.heldout, self.heldout_d)

    def null(self) -> CopyEvidence | None:
        """The null control: a seeded half of the held-out set measured as samples, the other
        half as the held-out set; None without at least 4 held-out rows."""
        if self.heldout is None or len(self.heldout) < 4:
            return None
        order = torch.randperm(len(self.heldout), generator=torch.Generator().manual_seed(self.settings.seed + 1))
        as_samples, rest = order[: len(order) // 2], order[len(order) // 2 :]
        return self._measure(self.heldout[as_samples], self.heldout[rest], self.heldout_d[rest])

    def _measure(self, gen: Tensor, ho: Tensor | None, ho_d: Tensor | None) -> CopyEvidence:
        s = self.settings
        report = memorisation(gen, self.train, ho if ho is not None and len(ho) >= 2 else None, threshold=s.threshold,
                              search=self.search)
        d1, nearest = report.d1.to(torch.float64).cpu(), report.nearest.cpu()
        flags = authentic(d1, nearest, self.train_nn)
        test = gap = labels = None
        if ho is not None and self.cells is not None:
            labels = [self.cells.assign(gen), self.cells.assign(ho), self.train_cells]
            test = ct_statistic(gen, ho, self.train, *labels, k=self.cells.k, min_samples=s.min_samples, alpha=s.alpha,
                                zu=mann_whitney_z(d1, ho_d))
        if ho is not None:
            known = {"train": report.d1, "heldout": report.heldout_d1}  # the ratio test's distances to the whole sets
            gap = size_matched_gap(gen, self.train, ho, draws=s.gap_draws, seed=s.seed, search=self.search,
                                   measured={k: v.cpu() for k, v in known.items() if v is not None})
        spans = {"memorised_fraction": intervals.fraction(report.ratio < s.threshold, s.level),
                 "authpct": tuple(100 * v for v in intervals.fraction(flags, s.level))}
        if gap is not None and s.bootstrap:
            spans["gap"] = gap.interval(s.bootstrap, s.seed, s.level)
        return CopyEvidence(report, flags, test, None if labels is None else labels[0], gap, spans)


def check_sizes(n_train: int, n_heldout: int | None, settings: CopySettings) -> None:
    """One sentence for a set too small for the tests asked for."""
    if n_train < 2:
        raise ValueError(f"the training set has {n_train} row(s) but the nearest-neighbour tests need at least 2")
    if n_heldout is None or not settings.cells:
        return
    if settings.cells > n_train:
        raise ValueError(f"C_T's {settings.cells} k-means cells are more than the {n_train} training rows: "
                         f"set ct_cells to at most {n_train}")
    if settings.cells > n_heldout:
        raise ValueError(f"C_T's {settings.cells} cells are more than the {n_heldout} held-out rows, so some cells hold no "
                         f"fresh data: set ct_cells to at most {n_heldout} or give a larger held-out set")

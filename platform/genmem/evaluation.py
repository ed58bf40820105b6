"""All evaluation metrics of a generated sample set against a model's own training and held-out
data, with the figures a person reads at a glance. Library code: no Ray, no MLflow."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from genmem.checkpoint import read_meta
from genmem.config import MetricsConfig, TrainConfig
from genmem.data import ArrayDataset, load_dataset, load_real
from genmem.errors import CheckpointError, DataError
from genmem.metrics import (
    frechet_distance,
    gaussian_stats,
    get_extractor,
    kid,
    knn,
    lid_mle,
    lid_twonn,
    mmd_rbf,
    prdc,
    reference_stats,
    sliced_wasserstein,
)
from genmem.metrics.evidence import CopyEvidence, CopyReference, CopySettings, check_sizes
from genmem.metrics.frechet import fd_interval, kid_interval
from genmem.metrics.outliers import out_of_range_fraction
from genmem.seeds import Training
from genmem.storage import atomic_write_bytes, pull
from genmem.viz import labelled_rows, memorised_pairs, pairs_grid, ratio_histograms, sample_picture


@dataclass
class Evaluation:
    metrics: dict[str, float]
    figures: dict[str, np.ndarray] = field(default_factory=dict)
    most_memorised: list[dict[str, Any]] = field(default_factory=list)  # provenance to regenerate each
    per_sample: dict[str, np.ndarray] = field(default_factory=dict)  # one row per sample: provenance and each test's verdict
    ct_cells: list[dict[str, Any]] = field(default_factory=list)  # C_T's cells in pixel space: z, counts, used, copies


def training_data(checkpoint: str | Path) -> tuple[dict[str, Any], ArrayDataset, ArrayDataset]:
    """A checkpoint's meta and its training and held-out splits, verified against its manifest hash.

    A model trained on a real/synthetic mix is measured against the real rows alone: copying
    its own generated training rows is not what memorisation asks about."""
    meta = read_meta(checkpoint)
    if not meta.get("data_manifest"):
        raise CheckpointError(f"checkpoint {checkpoint} records no training-data manifest: it cannot be evaluated against its data")
    cfg = TrainConfig.from_saved(meta["config"])
    train, heldout = load_dataset(cfg.data)
    if train.manifest.sha256 != meta["data_manifest"]:
        raise CheckpointError(
            f"the training data of {checkpoint} no longer matches its manifest hash: restore the dataset it was trained on"
        )
    if cfg.data.synthetic:
        train, heldout = load_real(cfg.data)
    return meta, train, heldout


def primary_fd(metrics: dict[str, float]) -> str:
    """The headline Fréchet distance key: classifier features where present, else pixels."""
    for key in ("eval/fd_classifier", "eval/fid", "eval/fd_pixels"):
        if key in metrics:
            return key
    raise KeyError("no Fréchet distance among the metrics")


def feature_names(requested: list[str], train: ArrayDataset) -> list[str]:
    """``auto``: pixels always; a classifier trained on the data's own labels for labelled images."""
    names: list[str] = []
    for name in requested:
        if name == "auto":
            names.append("pixels")
            if train.labels is not None and len(train.shape) == 3:
                names.append("classifier")
        elif name not in names:
            names.append(name)
    return list(dict.fromkeys(names))


def min_samples(cfg: MetricsConfig) -> int:
    """The fewest samples the k-NN metrics take: LID's k + 1, and density/coverage's 6."""
    return max(cfg.lid_k + 1, 6)


def check_samples(generated: ArrayDataset, train: ArrayDataset, cfg: MetricsConfig) -> None:
    """One sentence per problem, before any metric runs."""
    if len(generated) == 0:
        raise DataError("the sample set is empty: generate samples (--n) or point --samples at a non-empty Parquet folder")
    if generated.shape != train.shape:
        raise DataError(
            f"samples have shape {generated.shape} but the checkpoint's training data has shape {train.shape}: "
            "evaluate samples of the model that was trained on this data"
        )
    need = min_samples(cfg)
    if len(generated) < need:
        raise DataError(f"{len(generated)} samples are too few for the k-NN metrics (k up to {need - 1}): use at least --n {need}")


def copy_settings(cfg: MetricsConfig) -> CopySettings:
    """The copy tests' settings from a metrics config."""
    return CopySettings(threshold=cfg.threshold, cells=cfg.ct_cells, min_samples=cfg.ct_min_samples,
                        alpha=cfg.copy_alpha, gap_draws=cfg.gap_draws, bootstrap=cfg.bootstrap, level=cfg.interval_level,
                        seed=cfg.seed)


def check_metrics(cfg: MetricsConfig, train: ArrayDataset, heldout: ArrayDataset) -> None:
    """One sentence, before any work, where the data cannot take what ``cfg`` measures: a
    training or held-out set that cannot hold C_T's cells, a feature space that does not fit the
    data (the classifier without labels, Inception without images)."""
    try:
        check_sizes(len(train), len(heldout) if len(heldout) >= 2 else None, copy_settings(cfg))
    except ValueError as exc:
        raise DataError(str(exc)) from None
    names = feature_names(cfg.features, train)
    if "classifier" in names and train.labels is None:
        raise DataError("features=classifier needs class labels in the training data, which has none: use features=pixels "
                        "or inception, or give labelled data")
    if "inception" in names and (len(train.shape) != 3 or train.shape[0] not in (1, 3)):
        raise DataError(f"features=inception needs images of 1 or 3 channels, but the data has shape {train.shape}: "
                        "use features=pixels (or classifier for labelled data)")


def _cells_that_fit(cfg: MetricsConfig, n_train: int, n_heldout: int) -> int | None:
    """C_T's cells, or None where a set is too small to hold them (a size study's smallest sizes,
    measured without C_T as without density/coverage): the jobs refuse such sets up front."""
    return cfg.ct_cells if cfg.ct_cells and cfg.ct_cells <= min(n_train, n_heldout) else None


def evaluate_samples(
    generated: ArrayDataset,
    train: ArrayDataset,
    heldout: ArrayDataset,
    cfg: MetricsConfig,
    *,
    cache_dir: Path | None = None,
    device: str | torch.device | None = None,
    search=None,
    feature_data: ArrayDataset | None = None,
) -> Evaluation:
    """Memorisation, Fréchet distances per feature extractor, KID, precision/recall/density/
    coverage, intrinsic dimension and (for 2-D data) MMD and sliced Wasserstein. ``search``: the
    memorisation test's exact neighbour search where not this process's (jobs pass
    :func:`genmem.distributed.neighbours.neighbour_search`). ``feature_data``: the labelled data
    a fitted feature extractor (``classifier``) learns from, when not ``train``: a size study
    measures every size in the features of the whole split, not of its own few points."""
    check_samples(generated, train, cfg)
    gen, tr = generated.x.float(), train.x.float()
    ho = heldout.x.float() if len(heldout) >= 2 else None
    metrics: dict[str, float] = {"eval/n": float(len(gen))}
    # Mean per-coordinate variance: shrinks generation after generation when retraining collapses.
    metrics["eval/sample_variance"] = float(gen.flatten(1).double().var(0).mean())
    metrics["eval/train_variance"] = float(tr.flatten(1).double().var(0).mean())
    metrics["eval/out_of_range_fraction"] = out_of_range_fraction(gen, float(tr.min()), float(tr.max()))

    search = search or partial(knn, chunk_size=cfg.chunk_size, backend=cfg.backend, device=device)
    evidence = _copy_tests(gen, tr, ho, cfg, search, "pixels", metrics, cache_dir=cache_dir,
                           key=f"{train.manifest.sha256[:16]}-{heldout.manifest.sha256[:16]}-pixels")
    ref_rows = torch.randperm(len(tr), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.reference_max]
    metrics.update(_feature_metrics(gen, train, heldout, ref_rows, cfg, cache_dir=cache_dir, device=device,
                                    feature_data=feature_data or train))
    k = min(cfg.lid_k, len(gen) - 1)
    metrics["eval/lid_mle"] = float(lid_mle(gen.flatten(1), k=k).mean())
    metrics["eval/lid_twonn"] = float(lid_twonn(gen.flatten(1)))
    metrics["eval/lid_mle_train"] = float(lid_mle(tr[ref_rows].flatten(1), k=min(cfg.lid_k, len(ref_rows) - 1)).mean())
    if train.shape == (2,) and ho is not None:
        metrics["eval/mmd"] = mmd_rbf(gen[:2000], ho[:2000])
        metrics["eval/sliced_wasserstein"] = sliced_wasserstein(gen, ho)
    figures, rows = _worst_pairs(evidence, generated, train, cfg)
    return Evaluation(metrics=metrics, figures=figures, most_memorised=rows, per_sample=_per_sample(evidence, generated, train),
                      ct_cells=evidence.copy_test.cells() if evidence.copy_test is not None else [])


def _copy_tests(gen: torch.Tensor, tr: torch.Tensor, ho: torch.Tensor | None, cfg: MetricsConfig, search, space: str,
                metrics: dict[str, float], *, cache_dir: Path | None = None, key: str = "") -> CopyEvidence:
    """Every copy test in one space into ``metrics`` (pixels as ``eval/<name>``, another space as
    ``eval/<space>/<name>``, the headline figures alone; the null control's headline as
    ``null/...``), returning the samples' evidence. ``key`` names the two sets and the space: what
    depends on them alone is kept under ``cache_dir``."""
    cells = _cells_that_fit(cfg, len(tr), 0 if ho is None else len(ho))
    ref = _reference(tr, ho, replace(copy_settings(cfg), cells=cells), search, cache_dir, f"{key}-c{cells}-s{cfg.seed}")
    evidence = ref.measure(gen)
    name = "" if space == "pixels" else f"{space}/"
    figures = evidence.summary() if space == "pixels" else evidence.headline()  # the quantiles once, in pixels
    metrics.update({f"eval/{name}{k}": float(v) for k, v in figures.items()})
    null = ref.null() if cfg.null_control else None
    if null is not None:
        metrics.update({f"null/{name}{k}": float(v) for k, v in null.headline().items() if k.removesuffix("_lo").removesuffix("_hi") in NULL_KEYS})
    return evidence


# What the null control logs: each test's figure and interval, the reference a reader compares with.
NULL_KEYS = ("memorised_fraction", "authpct", "ct", "zu", "gap")


def _reference(tr: torch.Tensor, ho: torch.Tensor | None, settings: CopySettings, search, cache_dir: Path | None, key: str) -> CopyReference:
    """The copy tests' reference, its training-set neighbour distances and cells cached as
    ``cache_dir/copy-<key>.safetensors`` (recomputed where the cached sizes do not match)."""
    if cache_dir is None:
        return CopyReference.build(tr, ho, settings, search=search)
    file = pull(Path(cache_dir) / f"copy-{key}.safetensors")
    state = load_file(file) if file.is_file() else None
    if state is not None and len(state["train_nn"]) != len(tr):
        state = None
    ref = CopyReference.build(tr, ho, settings, search=search, state=state)
    if state is None:
        atomic_write_bytes(file, save_safetensors(ref.state()))
    return ref


def _feature_metrics(gen: torch.Tensor, train: ArrayDataset, heldout: ArrayDataset, ref_rows: torch.Tensor, cfg: MetricsConfig, *,
                     feature_data: ArrayDataset,
                     cache_dir: Path | None, device) -> dict[str, float]:
    """Per feature extractor: FD to the training (and held-out) set, KID; precision, recall,
    density and coverage in the primary extractor's space."""
    tr = train.x.float()
    ho = heldout.x.float() if len(heldout) > 2 else None
    names = feature_names(cfg.features, train)
    primary = "classifier" if "classifier" in names else names[0]  # precision/recall live here
    metrics: dict[str, float] = {}
    for name in names:
        extractor = get_extractor(name, train=feature_data, cache_dir=cache_dir, path=cfg.inception_path)
        fake = extractor(gen)
        train_stats = reference_stats(extractor, tr, cache_dir=cache_dir, key=f"{train.manifest.sha256[:16]}-train")
        fake_stats = gaussian_stats(fake)
        fd = extractor.metric_name
        metrics[f"eval/{fd}"] = frechet_distance(fake_stats, train_stats)
        if ho is not None:
            ho_stats = reference_stats(extractor, ho, cache_dir=cache_dir, key=f"{heldout.manifest.sha256[:16]}-heldout")
            metrics[f"eval/{fd}_heldout"] = frechet_distance(fake_stats, ho_stats)
        real = extractor(tr[ref_rows])
        kid_mean, kid_std = kid(real, fake, subset_size=min(1000, len(real), len(fake)), seed=cfg.seed)
        metrics[f"eval/kid_{name}"], metrics[f"eval/kid_{name}_std"] = kid_mean, kid_std
        if cfg.bootstrap and len(fake) > 1:
            metrics[f"eval/{fd}_lo"], metrics[f"eval/{fd}_hi"] = fd_interval(fake, train_stats, draws=cfg.bootstrap, seed=cfg.seed,
                                                                            level=cfg.interval_level)
            metrics[f"eval/kid_{name}_lo"], metrics[f"eval/kid_{name}_hi"] = kid_interval(
                real, fake, draws=cfg.bootstrap, subset_size=min(1000, len(real), len(fake)), seed=cfg.seed, level=cfg.interval_level)
        if name != "pixels":  # pixels: measured on the samples themselves, with the job's neighbour search
            _copy_tests(fake, extractor(tr), None if ho is None else extractor(ho), cfg, None, name, metrics, cache_dir=cache_dir,
                        key=f"{train.manifest.sha256[:16]}-{heldout.manifest.sha256[:16]}-{extractor.fingerprint}")
        if name == primary and len(real) > 5:  # density/coverage's k = 5: a smaller training set (a size study) goes without
            scores = prdc(real, fake, chunk_size=cfg.chunk_size, device=device)
            metrics.update({f"eval/{k}": float(v) for k, v in scores.items()})
    return metrics


def _worst_pairs(evidence: CopyEvidence, generated: ArrayDataset, train: ArrayDataset,
                 cfg: MetricsConfig) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """The figures, and the most memorised samples with the provenance to regenerate each."""
    mem = evidence.report
    gen, tr = generated.x.float(), train.x.float()
    worst = mem.worst(min(cfg.worst_k, len(gen)))
    nearest = mem.nearest[worst]
    figures = {
        "memorised_pairs": memorised_pairs(gen[worst], tr[nearest], mem.ratio[worst].tolist(), cfg.threshold),
        "ratio_histogram": ratio_histograms(mem.ratio, mem.heldout_ratio, cfg.threshold, "d1/d2"),
        "d1_histogram": ratio_histograms(mem.d1, mem.heldout_d1, cfg.threshold, "d1 (L2 to nearest)"),
        "samples": sample_picture(gen[:64], tr[:2000], f"{len(gen)} samples"),
    }
    if evidence.copy_test is not None and evidence.copy_test.used.any():
        figures["copying_cells"] = _copying_cells(evidence, gen, tr)
    rows = []
    for j, n in zip(worst.tolist(), nearest.tolist()):
        row = {"sample_row": j, "ratio": float(mem.ratio[j]), "d1": float(mem.d1[j]), "authentic": bool(evidence.authentic[j]),
               "train_index": int(train.index[n])}
        row.update(_provenance(generated, j))
        if "path" in train.meta:
            row["train_path"] = str(train.meta["path"][n])
        rows.append(row)
    return figures, rows


# What regenerates (or finds) a sample: model id, seed and index, or the file an image folder's row came from.
PROVENANCE = ("model_id", "seed", "index", "path")


def _provenance(generated: ArrayDataset, j: int) -> dict[str, Any]:
    """What regenerates (or finds) sample ``j``: its :data:`PROVENANCE` columns."""
    row = {}
    for col in PROVENANCE:
        if col in generated.meta:
            value = generated.meta[col][j]
            row[col] = value.item() if hasattr(value, "item") else value
    if "index" not in row:
        row["index"] = int(generated.index[j])
    return row


def _copying_cells(evidence: CopyEvidence, gen: torch.Tensor, tr: torch.Tensor, cells: int = 3, per_cell: int = 4) -> np.ndarray:
    """The most-copying C_T cells, one row each, lowest z first: the cell's samples nearest to
    train, each beside its nearest training point."""
    test, mem = evidence.copy_test, evidence.report
    pictures, labels = [], []
    for c in test.most_copying(cells).tolist():
        members = torch.nonzero(evidence.cell == c).flatten()
        rows = members[mem.d1[members].argsort(stable=True)[:per_cell]]
        pictures.append(pairs_grid(gen[rows], tr[mem.nearest[rows]]))
        labels.append(f"cell {c}\nz = {float(test.z[c]):.1f}\n{int(test.generated[c])} samples")
    return labelled_rows(pictures, labels, "C_T's most-copying cells: generated | nearest training, side by side")


def _per_sample(evidence: CopyEvidence, generated: ArrayDataset, train: ArrayDataset) -> dict[str, np.ndarray]:
    """Each sample's provenance beside its nearest training row, d1, d1/d2, authenticity and C_T cell."""
    mem = evidence.report
    columns = {col: np.asarray(generated.meta[col]) for col in PROVENANCE if col in generated.meta}
    columns.setdefault("index", generated.index.numpy())
    columns.update(d1=mem.d1.cpu().numpy(), ratio=mem.ratio.cpu().numpy(), train_index=train.index[mem.nearest.cpu()].numpy(),
                   authentic=evidence.authentic.cpu().numpy())
    if evidence.cell is not None:
        columns["cell"] = evidence.cell.cpu().numpy()
    return columns


def memorisation_probe(cfg, train: ArrayDataset, heldout: ArrayDataset):
    """``probe(model, device)`` for the training loop: the cheap copy tests on ``cfg.eval_n``
    fresh samples (fixed seed, so successive probes differ only by the weights): the memorised
    fraction with its Wilson interval, authPct, and the held-out d1 gap. C_T and the size-matched
    gap's subsamples are left to the evaluation after training."""
    from genmem.generative import build_process, generate

    process = build_process(cfg.process)
    settings = CopySettings(cells=None, gap_draws=1, bootstrap=0)
    ref = CopyReference.build(train.x, heldout.x if len(heldout) >= 2 else None, settings)

    def probe(model, device) -> dict[str, float]:
        x = generate(model, process, cfg.sampler, tuple(train.shape), range(cfg.eval_n), seed=Training.PROBE, device=device)
        ev = ref.measure(x.cpu())
        out = {f"eval/{k}": v for k, v in ev.headline().items() if k != "gap_spread"}
        out["eval/d1_q50"] = float(ev.report.d1.median())
        if ev.report.heldout_d1 is not None:
            out["eval/d1_gap_q50"] = float(ev.report.heldout_d1.median() - ev.report.d1.median())
        return out

    return probe


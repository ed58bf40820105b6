"""Search spaces for `genmem sweep`: a YAML file in tune_spaces/, checked in full before Ray starts.
Library code: Tune objects are built from a :class:`Space` in genmem.distributed.tune.

Format::

    num_samples: 1                 # samples of the random axes (grid axes are crossed with them)
    space:                         # dotted keys address fields of the job's config
      synthetic_ratio: {grid: [0.0, 0.25, 0.5, 1.0, fully_synthetic]}
      seed: {grid: [0, 1, 2]}
      train.optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      train.batch_size: {choice: [64, 128]}
      eval.threshold: {uniform: [0.25, 0.4]}
      train.model.depth: {randint: [2, 5]}      # low inclusive, high exclusive (as Tune)
    metric: fd                     # what the trials report; needed with a scheduler
    mode: min
    scheduler: {asha: {max_t: 5, grace_period: 1, reduction_factor: 2}}   # optional
    max_concurrent_trials: 2       # optional; default: as many as the cluster holds

ASHA measures a trial's progress in the job's own unit (``Job.time_attr``): images seen for
``train`` (a trial reports at every ``log_every_images``), generations for ``retrain``, reports
otherwise. ``max_t`` and ``grace_period`` are in that unit; ``max_t`` defaults to the base
config's budget (its ``images``, its ``generations``).

Every value a grid or choice can take, and both ends of every range, is applied to the job's
config and validated, so an unknown key or an invalid value (a negative λ) is refused with the
job config's own one-sentence error, naming the space key.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from genmem.config import _set_dotted, read_yaml_mapping, validate
from genmem.errors import ConfigError

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
_TOP = ("num_samples", "space", "metric", "mode", "scheduler", "max_concurrent_trials")


class SpaceError(ConfigError):
    """A search space that cannot run; one sentence naming the space key and the fix."""


@dataclass
class Axis:
    key: str
    kind: str
    values: list[Any]  # grid/choice: the values; ranges: [low, high]


@dataclass
class Space:
    path: Path
    axes: list[Axis]
    num_samples: int = 1
    metric: str | None = None
    mode: str | None = None
    asha: dict[str, Any] | None = None
    max_concurrent_trials: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def trials(self) -> int:
        """Trials the sweep runs: the grid product times num_samples."""
        return math.prod(len(a.values) for a in self.axes if a.kind == "grid") * self.num_samples

    def candidates(self) -> list[tuple[str, Any]]:
        """(key, value) for every value a trial could take at an extreme: all grid/choice values
        and both ends of each range (randint's last integer)."""
        out = []
        for a in self.axes:
            if a.kind == "randint":
                out += [(a.key, a.values[0]), (a.key, a.values[1] - 1)]
            else:
                out += [(a.key, v) for v in a.values]
        return out


def _fail(path: Path, what: str) -> SpaceError:
    return SpaceError(f"search space {path}: {what}")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _axis(path: Path, key: str, spec: Any) -> Axis:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise _fail(path, f"key '{key}' needs exactly one distribution, e.g. {{grid: [1, 2]}}; choose from {', '.join(DISTRIBUTIONS)}")
    (kind, values), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise _fail(path, f"key '{key}' uses unknown distribution '{kind}': choose one of {', '.join(DISTRIBUTIONS)}")
    if kind in ("grid", "choice"):
        if not isinstance(values, list) or not values:
            raise _fail(path, f"key '{key}' has an empty {kind}: list at least one value")
        return Axis(key, kind, values)
    if not isinstance(values, list) or len(values) != 2 or not all(_number(v) for v in values):
        raise _fail(path, f"key '{key}': {kind} takes [low, high] as two numbers, got {values!r}")
    low, high = values
    if not low < high:
        raise _fail(path, f"key '{key}': {kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise _fail(path, f"key '{key}': loguniform needs a positive low end, got {low}")
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise _fail(path, f"key '{key}': randint takes integer ends, got [{low}, {high}]")
    return Axis(key, kind, [int(low), int(high)] if kind == "randint" else [float(low), float(high)])


def load_space(path: str | Path) -> Space:
    """Parse and structurally check a space file (no job config yet: see :func:`check_space`)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "search space", "tune_spaces/mixing_ratio.yaml", SpaceError)
    unknown = [k for k in raw if k not in _TOP]
    if unknown:
        raise _fail(path, f"unknown top-level key '{unknown[0]}': use {', '.join(_TOP)}")
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise _fail(path, "has no axes: add a 'space' mapping such as {seed: {grid: [0, 1]}}")
    axes = [_axis(path, str(k), v) for k, v in space.items()]
    num_samples = raw.get("num_samples", 1)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise _fail(path, f"num_samples must be a positive integer, got {num_samples!r}")
    mode = raw.get("mode")
    if mode not in (None, "min", "max"):
        raise _fail(path, f"mode must be min or max, got {mode!r}")
    asha = None
    scheduler = raw.get("scheduler")
    if scheduler is not None:
        if not isinstance(scheduler, dict) or list(scheduler) != ["asha"]:
            raise _fail(path, "scheduler must be {asha: {max_t: ..., grace_period: ..., reduction_factor: ...}}")
        asha = scheduler["asha"] or {}
        bad = [k for k in asha if k not in ("max_t", "grace_period", "reduction_factor")]
        if bad:
            raise _fail(path, f"unknown ASHA setting '{bad[0]}': use max_t, grace_period, reduction_factor")
        if not raw.get("metric") or not mode:
            raise _fail(path, "the ASHA scheduler needs 'metric' and 'mode' (min or max) to rank trials")
    limit = raw.get("max_concurrent_trials")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise _fail(path, f"max_concurrent_trials must be a positive integer, got {limit!r}")
    return Space(path, axes, num_samples, raw.get("metric"), mode, asha, limit, raw)


class Sweepable(Protocol):
    """What the checks need of a job: its name, config class and the metric names it reports
    (a tuple of names, or a pattern)."""

    name: str
    config: type[BaseModel]
    metrics: tuple[str, ...] | re.Pattern


def check_metric(space: Space, job: Sweepable) -> None:
    if space.metric is None:
        return
    known = job.metrics
    if isinstance(known, re.Pattern):
        ok, allowed = bool(known.match(space.metric)), f"a name matching {known.pattern}"
    else:
        ok, allowed = space.metric in known, f"one of {', '.join(known)}"
    if not ok:
        raise _fail(space.path, f"metric '{space.metric}' is not reported by {job.name} trials: use {allowed}")


def check_space(space: Space, job: Sweepable, base: dict[str, Any]) -> list[BaseModel]:
    """Apply every candidate value to the job's base config and validate it: an unknown key or a
    value the config refuses is named with its space key; a metric the job does not report is
    refused. Returns the checked configs (for the resource check)."""
    check_metric(space, job)
    cls = job.config
    fields = _field_paths(cls)
    checked = []
    for key, value in space.candidates():
        if key not in fields:
            near = difflib.get_close_matches(key, sorted(fields), n=1, cutoff=0.6)
            hint = f": did you mean '{near[0]}'?" if near else f": address a field of {cls.__name__}, e.g. '{sorted(fields)[0]}'"
            raise _fail(space.path, f"key '{key}' is not a field of the {job.name} config{hint}")
        tree = copy.deepcopy(base)
        try:
            _set_dotted(tree, key, value)
            checked.append(validate(cls, tree))
        except ConfigError as exc:
            raise _fail(space.path, f"key '{key}' = {value!r} is refused: {exc}") from None
    return checked


def _field_paths(cls: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted names of the leaf fields of a config model."""
    out: set[str] = set()
    for name, info in cls.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _field_paths(ann, f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out


def sweep_name(space: Space, job: str, base: dict[str, Any]) -> str:
    """A deterministic name: the same space, job and base config name the same sweep (so
    ``--resume`` finds it); any change names a new one."""
    digest = hashlib.sha256(json.dumps({"space": space.raw, "job": job, "base": base}, sort_keys=True, default=str).encode())
    return f"{space.path.stem}-{job}-{digest.hexdigest()[:8]}"

"""Checkpoints: ``model.safetensors`` (+ ``ema.safetensors``, ``optimizer.safetensors``) and
``meta.json``. Never pickle: loading is safe on checkpoints from anywhere.

``meta.json`` holds the full training config, the per-sample data shape, the step, the images
seen, the data manifest hash, the EMA settings and (for resumption) the optimizer's non-tensor
state. Loading rebuilds the network from the stored config and refuses a mismatch in one sentence.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from genmem.config import ModelConfig, TrainConfig
from genmem.errors import CheckpointError
from genmem.generative import Chained, build_process
from genmem.models import build_model, count_parameters
from genmem.storage import atomic_folder, pull

META = "meta.json"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
OPTIMIZER = "optimizer.safetensors"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the network (EMA weights when asked and present) and its metadata."""

    path: Path
    model: nn.Module
    config: TrainConfig
    meta: dict[str, Any]
    optimizer_state: dict[str, Any] | None = None
    ema_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.meta["shape"])

    @property
    def id(self) -> str:
        return self.meta["checkpoint_id"]


def _optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into flat tensors (safetensors) and JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in rest.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    cfg: TrainConfig,
    *,
    shape: tuple[int, ...],
    step: int,
    images_seen: int,
    data_manifest: str,
    ema: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (:func:`genmem.storage.atomic_folder`): a reader, or a
    job restarted after a crash, finds the previous checkpoint at ``path`` or the complete new one."""
    path = Path(path)
    with atomic_folder(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / WEIGHTS)
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, tmp / EMA_WEIGHTS)
        opt_meta = None
        if optimizer is not None:
            tensors, opt_meta = _optimizer_tensors(optimizer.state_dict())
            save_file(tensors, tmp / OPTIMIZER)
        meta = {
            "format": "genmem.checkpoint/1",
            "checkpoint_id": uuid.uuid4().hex[:12],
            "config": cfg.model_dump(mode="json"),
            "shape": list(shape),
            "parameters": count_parameters(model),
            "step": step,
            "images_seen": images_seen,
            "data_manifest": data_manifest,
            "ema": {"halflife_images": cfg.ema_halflife_images, "file": EMA_WEIGHTS if ema is not None else None},
            "optimizer": opt_meta,
            # Every random draw of the training loop is derived from (seed, step), so the step
            # is the whole RNG state needed to resume bit for bit.
            "rng": {"seed": cfg.seed, "derived_from": "seed, step"},
            **(extra or {}),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's meta.json; a checkpoint on remote storage is first brought to the local mirror."""
    return _read_local_meta(pull(path), name=path)


def _read_local_meta(path: Path, *, name: str | Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {name} does not exist: pass the folder `genmem train` printed")
    if not (path / META).is_file():
        raise CheckpointError(f"checkpoint folder {name} has no {META}: it is not a genmem checkpoint (or was not fully written)")
    try:
        return json.loads((path / META).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / META} is not valid JSON ({exc.msg}): the checkpoint is corrupt") from None


def _load_into(model: nn.Module, file: Path, what: str) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} is missing: the checkpoint is incomplete")
    state = load_file(file)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = (missing[:1] and f"missing {missing[0]}") or (unexpected[:1] and f"unexpected {unexpected[0]}") or (
            f"{wrong[0]} is {tuple(state[wrong[0]].shape)} in the file but {tuple(own[wrong[0]].shape)} in the network"
        )
        raise CheckpointError(f"{what} in {file} do not fit the network ({detail}): the checkpoint was written by another architecture")
    model.load_state_dict(state)
    return state


def load_checkpoint(
    path: str | Path,
    *,
    expect: ModelConfig | None = None,
    use_ema: bool = True,
    with_optimizer: bool = False,
    map_location: str | torch.device = "cpu",
) -> Checkpoint:
    """Load a checkpoint folder (a path or a URI); ``expect`` refuses one trained with another architecture."""
    path, name = pull(path), path  # one download check, not one per read
    meta = _read_local_meta(path, name=name)
    try:
        cfg = TrainConfig.from_saved(meta["config"])
    except Exception as exc:  # pydantic ValidationError or a missing key
        raise CheckpointError(f"{path / META} holds a config this genmem cannot read ({exc.__class__.__name__}): it was written by another version") from None
    if expect is not None and expect != cfg.model:
        diff = {k: (v, getattr(expect, k)) for k, v in cfg.model.model_dump().items() if getattr(expect, k) != v}
        key, (have, want) = next(iter(diff.items()))
        raise CheckpointError(
            f"checkpoint {path} has model.{key}={have!r} but model.{key}={want!r} was requested: "
            "load it with its own architecture or train a new one"
        )
    try:
        model = build_model(cfg.model, tuple(meta["shape"]))
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    _load_into(model, path / WEIGHTS, "weights")
    ema_state = None
    ema_file = (meta.get("ema") or {}).get("file")
    if ema_file:
        ema_model = build_model(cfg.model, tuple(meta["shape"]))
        ema_state = _load_into(ema_model, path / ema_file, "EMA weights")
        if use_ema:
            model = ema_model
    opt_state = None
    if with_optimizer and meta.get("optimizer") is not None:
        opt_state = _optimizer_state(load_file(path / OPTIMIZER), meta["optimizer"])
    if cfg.source_checkpoint and use_ema and not with_optimizer:  # loaded to sample: noise -> source -> this flow
        model = chain_source(model, cfg.source_checkpoint)
    model.to(map_location)
    return Checkpoint(path=path, model=model, config=cfg, meta=meta, optimizer_state=opt_state, ema_state=ema_state)


def chain_source(model: nn.Module, source_checkpoint: str) -> nn.Module:
    """``model`` behind the sampler of the checkpoint it starts from (see ``TrainConfig.source_checkpoint``)."""
    source = load_checkpoint(source_checkpoint)
    return Chained(source.model, build_process(source.config.process), source.config.sampler, model)


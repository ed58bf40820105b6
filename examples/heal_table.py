"""The README's self-healing table: the quickstart's digits setting (32 training images, the
quickstart's MLP, flow matching, 60,000 images) with a memorisation budget of 0.05 probed every
5,000 images, from the same seed, under each way of meeting the budget: ``flag`` (copies freely),
``stop`` (ends at the last checkpoint under budget), ``heal`` with each policy, and ``flag``
followed by ``genmem unlearn --target copies`` by hand (fine-tune mode).

Every result is measured the same way: 1,000 fresh samples (seed 0) of its checkpoint,
evaluated against the training and held-out digits (memorised fraction with its Wilson interval,
FD in the digits classifier's features). Training runs in this process (the library's loop);
the unlearning runs as the job (local Ray, an sqlite MLflow store under OUT).

    python examples/heal_table.py OUT      # about 10 minutes on 2 cores; prints markdown
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "heal-table").resolve()
os.environ.setdefault("GENMEM_STORAGE", str(OUT / "storage"))
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{OUT}/mlflow.db")
OUT.mkdir(parents=True, exist_ok=True)

import torch  # noqa: E402

from genmem.checkpoint import load_checkpoint  # noqa: E402
from genmem.config import MetricsConfig, TrainConfig  # noqa: E402
from genmem.data import ArrayDataset, load_dataset  # noqa: E402
from genmem.evaluation import evaluate_samples, memorisation_probe  # noqa: E402
from genmem.generative import build_process, generate  # noqa: E402
from genmem.methods.healing import Healer  # noqa: E402
from genmem.storage import storage_root  # noqa: E402
from genmem.training import LocalReporter, train_loop  # noqa: E402

BASE = dict(name="heal-table", seed=0, data=dict(source="digits", train_size=32), model=dict(kind="mlp", hidden=256, depth=3),
            process=dict(kind="flow"), sampler=dict(method="heun", steps=32), optim=dict(lr=0.002, warmup_images=5000), batch_size=32,
            images=60_000, ema_halflife_images=5000, log_every_images=10_000, eval_every_images=5000, eval_n=500)
BUDGET = 0.05


def train(name: str, budget: dict | None) -> tuple[str, float, int]:
    """The checkpoint a run ends with, its wall time and the images it spent (heals included);
    prints its verdict and each heal."""
    cfg = TrainConfig.model_validate({**BASE, "memorisation_budget": budget})
    data, heldout = load_dataset(cfg.data)
    healer = Healer(cfg, data, heldout) if budget and budget["action"] == "heal" else None
    t = time.perf_counter()
    reporter = LocalReporter(OUT / name, cfg.images, quiet=True)
    result = train_loop(cfg, data, reporter, probe=memorisation_probe(cfg, data, heldout), heal=healer)
    meta = load_checkpoint(result.checkpoint).meta
    print(f"{name}: trained to {result.images_seen} images, result at {meta['images_seen']}; {reporter.notes.get('memorisation_budget')}: "
          f"{reporter.notes.get('memorisation_budget_reason', '')}", flush=True)
    spent = result.images_seen + sum(h["images"] for h in meta.get("heals", []))
    return str(result.checkpoint), time.perf_counter() - t, spent


def measure(checkpoint: str, data: ArrayDataset, heldout: ArrayDataset) -> dict[str, float]:
    ckpt = load_checkpoint(checkpoint)
    x = generate(ckpt.model, build_process(ckpt.config.process), ckpt.config.sampler, tuple(data.shape), range(1000), seed=0)
    samples = ArrayDataset.from_tensors(x, source="samples")
    metrics = MetricsConfig(features=["classifier"], bootstrap=200)
    return evaluate_samples(samples, data, heldout, metrics, cache_dir=storage_root() / "features").metrics


def unlearn_by_hand(base: str) -> tuple[str, float, int]:
    from genmem.jobs import registry
    from genmem.runs.context import Context

    job = registry.get("unlearn")
    cfg = job.config.model_validate({"base": base, "target": {"kind": "copies"}, "mode": "finetune", "lam": 5, "images": 20_000,
                                     "batch_size": 32, "n_base": 2000, "eval_n": 500, "scaling": {"num_workers": 0}})
    t = time.perf_counter()
    result = job.run(cfg, Context())
    return result["checkpoint"], time.perf_counter() - t, cfg.images


def main() -> None:
    torch.set_num_threads(2)
    data, heldout = load_dataset(TrainConfig.model_validate(BASE).data)
    runs = {"flag": {"max_fraction": BUDGET, "action": "flag"}, "stop": {"max_fraction": BUDGET, "action": "stop"}}
    for policy in ("keep", "downweight", "drop"):
        runs[f"heal ({policy})"] = {"max_fraction": BUDGET, "action": "heal", "heal": {"policy": policy}}
    rows = {}
    for name, budget in runs.items():
        checkpoint, seconds, spent = train(name.replace(" (", "-").rstrip(")"), budget)
        rows[name] = (checkpoint, seconds, spent)
        print(f"{name}: {seconds:.0f} s, {spent} images", flush=True)
    checkpoint, seconds, spent = unlearn_by_hand(rows["flag"][0])
    rows["flag, then unlearn copies by hand"] = (checkpoint, rows["flag"][1] + seconds, rows["flag"][2] + spent)
    print("| run | memorised fraction [95% interval] | FD (classifier) [95% interval] | images spent | wall time |")
    print("|---|---|---|---|---|")
    for name, (checkpoint, seconds, spent) in rows.items():
        m = measure(checkpoint, data, heldout)
        frac = f"{m['eval/memorised_fraction']:.3f} [{m['eval/memorised_fraction_lo']:.3f}, {m['eval/memorised_fraction_hi']:.3f}]"
        fd = f"{m['eval/fd_classifier']:.3f} [{m['eval/fd_classifier_lo']:.3f}, {m['eval/fd_classifier_hi']:.3f}]"
        print(f"| {name} | {frac} | {fd} | {spent:,} | {seconds:.0f} s |", flush=True)


if __name__ == "__main__":
    main()

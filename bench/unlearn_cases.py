"""Where unlearning falls short, on cases no test or default was tuned on (issue 35): three 2-D
toys with forget sets the tests do not use (two non-adjacent Gaussian modes, the inner ring, one
checkerboard cell) and two digits other than "3".

For each case it trains a base (in this process), then runs `genmem unlearn` in this process
(Ray Train's local mode, a sqlite MLflow store) once per variant, each with probes every
``--probe-every`` images up to ``--max-images`` and an unreachable target, so one run gives the
forget ratio against images spent (the budget) and its end the fixed-budget figure. Per run it
records: the final forget ratio, retention min/max over the kept labels and MMD to the kept data
(toys) or FD on the kept classes (digits), all by the independent measure on the final samples;
the probe's forget ratio at each probe; and the proxy's *floor*: the forget ratio of the
reweighted base samples themselves (Σ w·[forget] / Σ w over the base's share), the best the
method can reach if training learns its target exactly. A floor above the target names the proxy
or λ; a trajectory still falling at the end names the budget.

With ``--goal`` the variants run with the job's own stop (its defaults: target_ratio, retention,
max_images) instead: the "after" table. The variant ``retrain`` is exact unlearning's reference:
the base's config trained from scratch without the forget rows, judged by the same measure (the
U-Net digits without their 8s: 0.096, upper bound 0.132, of 3,000 samples), trained with
``data.exclude_labels``; ``--reference`` gives that model to the job as its ``reference``, so the
goal and the row hold the forget ratio above it (``forget_excess``). With
``resample_every_images`` the trajectory runs over every pool's training run.

    .venv/bin/python bench/unlearn_cases.py --out /tmp/unlearn_cases.jsonl [--cases gauss03 ...] [--variants flow5 ...] [--goal]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

TOY_BASE = {"model": {"kind": "mlp", "hidden": 128, "depth": 3}, "process": {"kind": "flow"}, "sampler": {"method": "heun", "steps": 16},
            "batch_size": 256, "images": 80_000, "ema_halflife_images": 10_000, "optim": {"lr": 0.002, "warmup_images": 5000}}
DIGITS_BASE = {"data": {"source": "digits"}, "model": {"kind": "mlp", "hidden": 256, "depth": 3}, "sampler": {"method": "heun", "steps": 16},
               "optim": {"lr": 0.002, "warmup_images": 5000}, "batch_size": 128, "images": 200_000, "ema_halflife_images": 20_000}
# the shipped digits model (configs/digits_flow.yaml: a U-Net, 200,000 images), which configs/unlearn_digit.yaml is for
DIGITS_UNET_BASE = {**yaml.safe_load((ROOT / "configs" / "digits_flow.yaml").read_text()), "grid_every_images": 0,
                    "checkpoint_every_images": 0}
TOY_JOB = {"n_base": 4000, "eval_n": 10_000, "probe_n": 10_000, "batch_size": 256, "lr": 1e-3}  # configs/unlearn_toy.yaml
DIGIT_JOB = {"n_base": 4000, "eval_n": 3000, "batch_size": 128, "lr": 5e-4, "resample_every_images": 100_000,
             "accumulate_pools": True}  # configs/unlearn_digit.yaml

CASES = {
    "gauss03": ({**TOY_BASE, "data": {"source": "6gaussians", "n": 6000}}, ["mode0", "mode3"], TOY_JOB),
    "inner": ({**TOY_BASE, "data": {"source": "circles", "n": 6000}}, ["inner"], TOY_JOB),
    "cell11": ({**TOY_BASE, "data": {"source": "checkerboard", "n": 6000}}, ["cell(1,1)"], TOY_JOB),
    "digit7": (DIGITS_BASE, ["7"], DIGIT_JOB),
    "digit8": (DIGITS_BASE, ["8"], DIGIT_JOB),
    "digit7u": (DIGITS_UNET_BASE, ["7"], DIGIT_JOB),
    "digit8u": (DIGITS_UNET_BASE, ["8"], DIGIT_JOB),
}
VARIANTS = {  # name: (mode, λ); "shipped": the case's config (configs/unlearn_toy.yaml: flow, configs/unlearn_digit.yaml: finetune)
    "flow5": ("flow", 5.0),
    "finetune5": ("finetune", 5.0),
    "flow20": ("flow", 20.0),
    "finetune20": ("finetune", 20.0),
}


def base_checkpoint(work: Path, tree: dict, without: list[str] = ()) -> str:
    """The case's base (seed 0, cached under ``work``); ``without``: trained on its data less
    the rows of those labels (exact unlearning's reference)."""
    from genmem.config import TrainConfig
    from genmem.data import load_dataset
    from genmem.training import LocalReporter, train_loop

    key = tree["data"]["source"] + ("-unet" if tree["model"]["kind"] == "unet" else "") + "".join(f"-without-{f}" for f in without)
    out = work / "bases" / key
    if (out / "checkpoint" / "meta.json").is_file():
        return str(out / "checkpoint")
    tree = {**tree, "data": {**tree["data"], "exclude_labels": list(without)}} if without else tree
    cfg = TrainConfig.model_validate({**tree, "log_every_images": tree["images"], "seed": 0})
    train, _ = load_dataset(cfg.data)
    return str(train_loop(cfg, train, LocalReporter(out, cfg.images, quiet=True)).checkpoint)


def retrain_case(work: Path, case: str, args) -> dict:
    """Exact unlearning's reference (variant ``retrain``): the base's config trained from scratch
    without the forget labels' rows, judged as the job judges, by the same independent measure,
    against ``eval_n`` samples of the base. What a perfect unlearning reaches by that measure."""
    from genmem.checkpoint import load_checkpoint
    from genmem.config import TrainConfig
    from genmem.evaluation import training_data
    from genmem.generative import build_process, generate
    from genmem.jobs.unlearn import Judge, UnlearnConfig, _extractor

    tree, forget, job = CASES[case]
    base, t0 = base_checkpoint(work, tree), time.perf_counter()
    retrained = base_checkpoint(work, tree, forget)
    _, train, _ = training_data(base)
    draw = lambda ckpt, seed: generate((c := load_checkpoint(ckpt)).model, build_process(c.config.process), c.config.sampler,  # noqa: E731
                                       tuple(train.shape), range(job["eval_n"]), seed=seed)
    cfg = UnlearnConfig.model_validate({**job, "base": base, "mode": "finetune", "target": {"kind": "class" if case.startswith("digit") else "region",
                                        "forget": forget}})  # the judge's settings only
    judge = Judge(cfg, train, [train.label_of(f) for f in forget], None, _extractor(train), draw(base, 1))
    m = judge(draw(retrained, 2))
    return {"case": case, "variant": "retrain" + args.tag, "forget_ratio": m["forget_ratio"], "forget_ratio_hi": m["forget_ratio_hi"],
            "retention_min": m["retention_min"], "retention_max": m["retention_max"], "kept_mmd": m["kept_mmd"], "kept_mmd_base": judge.kept_base[0],
            "images": TrainConfig.model_validate(tree).images, "ended_by": "retrained", "seconds": round(time.perf_counter() - t0, 1),
            "trajectory": [], "floor": float("nan")}


def probe_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """The job's ``goal/<key>`` curve: every probe over all pools, against the images spent."""
    return [(h.step, h.value) for h in sorted(client.get_metric_history(run_id, f"goal/{key}"), key=lambda h: h.step)]


def floor(cfg, base_samples: str, judge_labels) -> dict[str, float]:
    """The reweighted base samples' forget ratio for the job's proxy at this λ."""
    import torch

    from genmem.data import read_shards
    from genmem.evaluation import training_data
    from genmem.jobs.unlearn import Proxy
    from genmem.methods.unlearning import weights

    _, train, _ = training_data(cfg.base)
    forget = [train.label_of(f) for f in cfg.target.forget]
    x1 = read_shards(base_samples).x
    logits = Proxy(cfg, train, x1, forget).logits(x1)  # the job's own proxy, margin included
    w = weights(logits, cfg.lam).double()
    gt = torch.isin(judge_labels(x1), torch.tensor(forget)).double()
    proxy_agrees = ((logits > 0).double() == 1 - gt).double().mean().item()
    return {"floor": ((w * gt).sum() / w.sum() / gt.mean().clamp(min=1e-12)).item(), "proxy_agreement": proxy_agrees}


def run_case(work: Path, case: str, variant: str, args) -> dict:
    from mlflow import MlflowClient

    from genmem.jobs.unlearn import Judge, UnlearnConfig, _extractor
    from genmem.jobs.unlearn import run as unlearn
    from genmem.runs.context import Context

    tree, forget, job = CASES[case]
    mode, lam = VARIANTS[variant] if variant != "shipped" else ("finetune" if case.startswith("digit") else "flow", 5.0)
    base = base_checkpoint(work, tree)
    job = {k: v for k, v in job.items() if mode == "finetune" or k not in ("resample_every_images", "accumulate_pools")}  # finetune only
    overrides = {} if args.goal else {"target_ratio": 1e-9, "max_images": args.max_images, "probe_every_images": args.probe_every}
    if args.reference:
        overrides["reference"] = base_checkpoint(work, tree, forget)
    for item in args.set:
        key, value = item.split("=", 1)
        node = overrides
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    cfg = UnlearnConfig.model_validate({**job, "base": base, "target": {"kind": "class" if case.startswith("digit") else "region",
                                        "forget": forget}, "mode": mode, "lam": lam, "run_name": f"{case}-{variant}{'-goal' if args.goal else ''}{args.tag}",
                                        "scaling": {"num_workers": 0, "cpus_per_worker": 2}, **overrides})
    t0 = time.perf_counter()
    result = unlearn(cfg, Context())
    seconds = time.perf_counter() - t0
    m = result["metrics"]
    client = MlflowClient()
    trajectory, upper = (probe_history(client, result["mlflow_run_id"], key) for key in ("forget_ratio", "forget_ratio_hi"))
    from genmem.evaluation import training_data

    _, train, _ = training_data(base)
    judge = Judge(cfg, train, [train.label_of(f) for f in forget], None, _extractor(train), before_samples(result))
    kept = [v for k, v in m.items() if k.startswith("retention/")]
    row = {"case": case, "variant": variant + args.tag, "set": args.set, "goal": args.goal, "forget_ratio": m.get("forget_ratio"), "forget_ratio_lo": m.get("forget_ratio_lo"),
           "forget_ratio_hi": m.get("forget_ratio_hi"), "forget_mass_before": m.get("forget_mass_before"),
           **{k: m[k] for k in ("forget_ratio_reference", "forget_excess", "forget_excess_lo", "forget_excess_hi") if k in m},
           "retention_min": min(kept), "retention_max": max(kept), "mmd_kept": m.get("mmd_kept"), "mmd_kept_before": m.get("mmd_kept_before"),
           "fd_classifier": m.get("fd_classifier"), "fd_classifier_before": m.get("fd_classifier_before"),
           "images": result["images_seen"], "ended_by": result["ended_by"], "seconds": round(seconds, 1), "trajectory": trajectory, "upper": upper,
           **floor(cfg, result["base_samples"], judge.labels)}
    return row


def before_samples(result: dict):
    from genmem.data import read_shards

    return read_shards(result["before"]).x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/unlearn_cases.jsonl")
    ap.add_argument("--work", default=None, help="folder for bases, storage and the MLflow store (default: a temporary one)")
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    ap.add_argument("--variants", nargs="+", default=["flow5", "finetune5", "flow20"])
    ap.add_argument("--max-images", type=int, default=300_000)
    ap.add_argument("--probe-every", type=int, default=20_000)
    ap.add_argument("--goal", action="store_true", help="the job's own stop and defaults instead of a fixed budget")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="unlearn config overrides (YAML values), e.g. lr=3e-4")
    ap.add_argument("--tag", default="", help="appended to the run names (variants with --set)")
    ap.add_argument("--reference", action="store_true", help="exact unlearning's model (variant retrain's) as the job's reference")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="unlearn-cases-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["GENMEM_STORAGE"] = str(work / "store")
    os.environ["GENMEM_RAY_STORAGE"] = str(work / "ray")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    import torch

    torch.set_num_threads(2)
    for case in args.cases:
        for variant in args.variants:
            row = retrain_case(work, case, args) if variant == "retrain" else run_case(work, case, variant, args)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{case:8} {variant:10} ratio {row['forget_ratio']:.3f} floor {row['floor']:.3f} retention {row['retention_min']:.2f}-"
                  f"{row['retention_max']:.2f} images {row['images']} ({row['ended_by']}) {row['seconds']:.0f}s "
                  f"trajectory {[round(v, 3) for _, v in row['trajectory']]}", flush=True)


if __name__ == "__main__":
    main()

"""Bad input, counted: one table across every job (configs, spaces, checkpoints, samples, shards,
rewards, studies). Each case runs the job as `genmem` would (resolve the config, then ``run``) in
one fresh Python process without Ray, and must end in genmem's own error: one sentence on one
line, naming what is wrong, raised before any Ray cluster starts, with nothing written to the
storage root (the content-addressed dataset cache aside: a dataset materialised while checking
the data is whole, and the next run reuses it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RUNNER = r'''
import json, sys
from pathlib import Path

import ray

from genmem.cli import build_parser, job_config
from genmem.errors import GenmemError
from genmem.jobs import registry
from genmem.jobs.base import Context

storage = Path(sys.argv[2])
results = {}
for case_id, argv in json.loads(Path(sys.argv[1]).read_text()).items():
    before = {str(p) for p in storage.rglob("*") if p.is_file()} if storage.exists() else set()
    try:
        args = build_parser().parse_args(argv)
        job = registry.get(args.job)
        job.run(job_config(job, args), Context())
        error = None
    except GenmemError as exc:
        error = f"{type(exc).__name__}: {exc}"
    except SystemExit as exc:
        error = f"SystemExit({exc.code}) from argparse"
    except Exception as exc:  # a bug: not the one-sentence error a user should get
        error = f"UNEXPECTED {type(exc).__name__}: {exc}"
    after = {str(p) for p in storage.rglob("*") if p.is_file()} if storage.exists() else set()
    results[case_id] = {"error": error, "ray_started": ray.is_initialized(), "written": sorted(after - before)}
    if ray.is_initialized():
        ray.shutdown()
print("RESULTS " + json.dumps(results))
'''


def _cases(ck: str, bare: str, empty: str, wrong_samples: str, spaces: dict[str, str], out: str = "OUT",
           audit: dict[str, str] | None = None) -> dict[str, tuple[list[str], str]]:
    """id → (argv, regex the error must match)."""
    a = audit or dict.fromkeys(AUDIT_INPUTS, "A")
    moons = ["--set", "data.source=moons", "--set", "data.n=200"]
    linear = ["--set", "reward.kind=linear", "--set", "reward.a=[1,0]"]
    return {
        # train: configs and data
        "train/unknown-source": (["train", "--set", "data.source=nope"], r"data\.source"),
        "train/zero-batch": (["train", "--set", "batch_size=0"], r"batch_size"),
        "train/negative-budget": (["train", "--set", "images=-5"], r"images"),
        "train/unknown-key": (["train", "--set", "nonsense=1"], r"nonsense"),
        "train/missing-config": (["train", "--config", "no/such/config.yaml"], r"no/such/config\.yaml"),
        "train/unet-on-vectors": (["train", *moons, "--set", "model.kind=unet"], r"U-Net .*model\.kind=mlp"),
        "train/size-beyond-split": (["train", *moons, "--set", "data.train_size=100000"], r"train_size"),
        "train/parquet-without-path": (["train", "--set", "data.source=parquet"], r"path"),
        "train/parquet-missing": (["train", "--set", "data.source=parquet", "--set", "data.path=/no/such/data.parquet"],
                                  r"/no/such/data\.parquet"),
        "train/zero-lr": (["train", "--set", "optim.lr=0"], r"lr"),
        "train/bad-precision": (["train", "--set", "scaling.mixed_precision=fp8"], r"mixed_precision"),
        "train/missing-init": (["train", *moons, "--set", "init_from=/no/such/checkpoint"], r"/no/such/checkpoint"),
        # checkpoints and samples
        "sample/missing-checkpoint": (["sample", "--checkpoint", "/no/such/checkpoint", "--n", "10", "--out", out], r"/no/such/checkpoint"),
        "sample/not-a-checkpoint": (["sample", "--checkpoint", empty, "--n", "10", "--out", out], r"meta\.json"),
        "sample/zero-n": (["sample", "--checkpoint", ck, "--n", "0", "--out", out], r"\bn\b"),
        "sample/no-checkpoint": (["sample", "--n", "10", "--out", out], r"checkpoint"),
        "evaluate/missing-samples": (["evaluate", "--checkpoint", ck, "--samples", "/no/such/samples"], r"/no/such/samples"),
        "evaluate/samples-wrong-shape": (["evaluate", "--checkpoint", ck, "--samples", wrong_samples], r"shape"),
        "evaluate/no-manifest": (["evaluate", "--checkpoint", bare, "--n", "100"], r"manifest"),
        "evaluate/threshold": (["evaluate", "--checkpoint", ck, "--set", "threshold=1.5"], r"threshold"),
        "evaluate/cells-beyond-train": (["evaluate", "--checkpoint", ck, "--set", "ct_cells=100000"],
                                        r"C_T's 100000 k-means cells are more than the \d+ training rows: set ct_cells"),
        # posterior
        "posterior/zero-scale": (["posterior", "--checkpoint", ck, "--scale", "0"], r"scales must be positive"),
        "posterior/too-few-images": (["posterior", "--checkpoint", ck, "--n", "8", "--samples", "1"], r"too few to evaluate"),
        "posterior/unknown-subset": (["posterior", "--checkpoint", ck, "--n", "30", "--set", "subset=[nope.*]"], r"matches no parameter"),
        "posterior/empty-subset": (["posterior", "--checkpoint", ck, "--n", "30", "--set", "subset=[]"], r"leaves no weight"),
        "posterior/more-workers-than-points": (["posterior", "--checkpoint", ck, "--n", "30", "--workers", "17"],
                                               r"num_workers=17 is more than the 16 training points"),
        "posterior/no-manifest": (["posterior", "--checkpoint", bare, "--n", "30"], r"manifest"),
        "posterior/zero-rtol": (["posterior", "--checkpoint", ck, "--set", "rtol=0"], r"rtol"),
        # retraining
        "retrain/negative-ratio": (["retrain", "--set", "synthetic_ratio=-1"], r"synthetic_ratio"),
        "retrain/zero-generations": (["retrain", "--set", "generations=0"], r"generations"),
        # unlearning
        "unlearn/negative-lam": (["unlearn", "--base", ck, "--lam", "-1"], r"lam"),
        "unlearn/missing-base": (["unlearn", "--base", "/no/such/checkpoint"], r"/no/such/checkpoint"),
        "unlearn/region-on-images-or-empty": (["unlearn", "--base", ck, "--set", "target.kind=region", "--set", "target.forget=[]"],
                                              r"target"),
        # fine-tuning and rewards
        "finetune/zero-alpha": (["finetune", "--base", ck, "--alpha", "0", *linear], r"'alpha': Input should be greater than 0"),
        "finetune/unknown-divergence": (["finetune", "--base", ck, "--divergence", "nope", *linear], r"unknown divergence 'nope'"),
        "finetune/linear-without-a": (["finetune", "--base", ck, "--set", "reward.kind=linear"], r"reward"),
        "finetune/reward-dimension": (["finetune", "--base", ck, "--set", "reward.kind=linear", "--set", "reward.a=[1,2,3]"],
                                      r"3 entries but the base's samples have 2 dimensions"),
        "finetune/reward-not-importable": (["finetune", "--base", ck, "--set", "reward.kind=function", "--set",
                                            "reward.function=no_such_module:fn"], r"cannot be imported"),
        "finetune/missing-base": (["finetune", "--base", "/no/such/checkpoint", *linear], r"/no/such/checkpoint"),
        "finetune/no-reward": (["finetune", "--base", ck], r"'reward': Field required"),
        # memorisation against training-set size
        "memorisation/size-below-3": (["memorisation", *moons, "--train-size", "2"], r"train_size"),
        "memorisation/size-beyond-split": (["memorisation", *moons, "--train-size", "100000"], r"train_size|100000"),
        "memorisation/noise-outside": (["memorisation", *moons, "--set", "study.dimension.noise=1.5"], r"noise must lie in \(0, 1\)"),
        "memorisation/per-direction-without-manifold": (["memorisation", *moons, "--set", "study.dimension.per_direction=true"],
                                                        r"per_direction needs linear-manifold data"),
        "memorisation/passes-without-rate": (["memorisation", *moons, "--set", "study.budget=passes"], r"images_per_example"),
        # sweeps and spaces
        "sweep/missing-space": (["sweep", "--space", "/no/such/space.yaml", "--job", "train"], r"/no/such/space\.yaml"),
        "sweep/unknown-job": (["sweep", "--space", spaces["ok"], "--job", "nope"], r"nope"),
        "sweep/unknown-key": (["sweep", "--space", spaces["bad_key"], "--job", "train"], r"no_such_field"),
        "sweep/unreported-metric": (["sweep", "--space", spaces["bad_metric"], "--job", "train"], r"no_such_metric"),
        # memorisation budgets
        "train/budget-without-probe": (["train", "--set", "memorisation_budget.max_fraction=0.05"],
                                       r"memorisation_budget is checked at the memorisation probe: set eval_every_images above 0"),
        "train/budget-above-one": (["train", "--set", "eval_every_images=1000", "--set", "memorisation_budget.max_fraction=1.5"],
                                   r"max_fraction"),
        "train/budget-unknown-action": (["train", "--set", "eval_every_images=1000", "--set", "memorisation_budget.max_fraction=0.1",
                                         "--set", "memorisation_budget.action=halt"], r"action"),
        "train/heal-without-probe": (["train", "--set", "memorisation_budget.max_fraction=0.05", "--set", "memorisation_budget.action=heal"],
                                     r"memorisation_budget is checked at the memorisation probe"),
        "train/heal-no-heals": (["train", "--set", "eval_every_images=1000", "--set", "memorisation_budget.max_fraction=0.1",
                                 "--set", "memorisation_budget.action=heal", "--set", "memorisation_budget.heal.max_heals=0"], r"max_heals"),
        "train/heal-unknown-policy": (["train", "--set", "eval_every_images=1000", "--set", "memorisation_budget.max_fraction=0.1",
                                       "--set", "memorisation_budget.action=heal", "--set", "memorisation_budget.heal.policy=forget"],
                                      r"memorisation_budget\.heal\.policy"),
        # the report
        "report/unknown-experiment": (["report", "--experiment", "nope"], r"has no experiment 'nope'"),
        "report/unknown-run": (["report", "--run", "0123456789abcdef"], r"has no run '0123456789abcdef'"),
        "report/unknown-sweep": (["report", "--sweep", "0123456789abcdef"], r"has no sweep run '0123456789abcdef'"),
        "report/nothing-measured": (["report"], r"no finished run among every genmem experiment .* measured both memorisation and quality"),
        # audits of samples from anywhere
        "audit/shape-mismatch": (["audit", "--samples", a["png16"], "--train", "digits"],
                                 r"per-sample shapes differ \(samples \(1, 16, 16\), training set \(1, 8, 8\)\): set image_size"),
        "audit/no-images": (["audit", "--samples", a["noimg"], "--train", "digits"], r"holds no PNG or JPEG files"),
        "audit/unreadable-image": (["audit", "--samples", a["broken"], "--train", "digits"], r"cannot read image .*bad\.png"),
        "audit/outside-any-range": (["audit", "--samples", a["huge"], "--train", "digits"], r"values of the samples run from -999.4 to 994.6, outside any image range"),
        "audit/ranges-differ": (["audit", "--samples", a["bytes"], "--train", "digits"],
                                r"value ranges differ \(samples \[0, 255\], training set \[-1, 1\]\): .*--rescale"),
        "audit/mixed-sizes": (["audit", "--samples", a["mixed"], "--train", "digits"], r"differ in size .*--image-size"),
        "audit/too-few-samples": (["audit", "--samples", a["png8"], "--train", "digits"], r"10 rows in the samples are too few for the k-NN metrics"),
        "audit/cells-beyond-heldout": (["audit", "--samples", "digits", "--train", "digits", "--heldout", "digits", "--set", "ct_cells=500"],
                                       r"C_T's 500 cells are more than the \d+ held-out rows"),
        "audit/inception-on-vectors": (["audit", "--samples", "moons", "--train", "moons", "--features", "inception"],
                                       r"features=inception needs images"),
        "audit/missing-path": (["audit", "--samples", a["noimg"] + "-nope", "--train", "digits"], r"does not exist"),
        # the quickstart
        "quickstart/too-few-images": (["quickstart", "--n", "5"], r"\bn\b"),
        "quickstart/negative-scale": (["quickstart", "--scale", "-1"], r"scales must be positive, got -1"),
    }


AUDIT_INPUTS = ("png16", "noimg", "broken", "huge", "bytes", "mixed", "png8")


def _audit_inputs(root: Path) -> dict[str, str]:
    """Sample sets an audit must refuse, each with one thing wrong."""
    import numpy as np
    from PIL import Image

    def pngs(name: str, n: int, sizes=(8,)) -> str:
        folder = root / name
        (folder / "sub").mkdir(parents=True)
        for i in range(n):
            side = sizes[i % len(sizes)]
            Image.fromarray(np.full((side, side), 17 * (i % 15), dtype=np.uint8)).save(folder / "sub" / f"{i:03d}.png")
        return str(folder)

    out = {"png16": pngs("png16", 30, (16,)), "png8": pngs("png8", 10), "mixed": pngs("mixed", 30, (8, 9)), "broken": pngs("broken", 30)}
    (root / "broken" / "sub" / "bad.png").write_bytes(b"not a png at all")
    (root / "noimg").mkdir()
    (root / "noimg" / "notes.txt").write_text("no images here")
    out["noimg"] = str(root / "noimg")
    rng = np.random.default_rng(0)
    np.save(root / "huge.npy", rng.uniform(-1, 1, (30, 1, 8, 8)).astype(np.float32) * 1000)
    np.save(root / "bytes.npy", rng.integers(0, 256, (30, 1, 8, 8)).astype(np.uint8))
    out["huge"], out["bytes"] = str(root / "huge.npy"), str(root / "bytes.npy")
    return out


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    from genmem.config import TrainConfig
    from genmem.data import load_dataset, write_shards
    from genmem.training import LocalReporter, train_loop

    root = tmp_path_factory.mktemp("bad-input")
    storage = root / "store"
    cfg = TrainConfig.model_validate({"data": {"source": "moons", "n": 200, "train_size": 16}, "model": {"hidden": 16, "depth": 1},
                                      "batch_size": 16, "images": 16 * 20, "ema_halflife_images": 0, "log_every_images": 320})
    ck = str(train_loop(cfg, load_dataset(cfg.data)[0], LocalReporter(root / "base", cfg.images, quiet=True)).checkpoint)
    bare = root / "bare"  # a checkpoint whose data manifest was removed
    bare.mkdir()
    for f in Path(ck).iterdir():
        (bare / f.name).write_bytes(f.read_bytes())
    meta = json.loads((bare / "meta.json").read_text())
    meta["data_manifest"] = None
    (bare / "meta.json").write_text(json.dumps(meta))
    (root / "empty").mkdir()
    write_shards(root / "wrong", torch.zeros(40, 3), source="test", split="samples")  # 3-D samples for a 2-D model
    spaces = {}
    for name, text in {"ok": "space:\n  seed: {grid: [0, 1]}\nmetric: train/loss\nmode: min\n",
                       "bad_key": "space:\n  no_such_field: {grid: [0, 1]}\nmetric: train/loss\nmode: min\n",
                       "bad_metric": "space:\n  seed: {grid: [0, 1]}\nmetric: no_such_metric\nmode: min\n"}.items():
        spaces[name] = str(root / f"{name}.yaml")
        Path(spaces[name]).write_text(text)
    cases = _cases(ck, str(bare), str(root / "empty"), str(root / "wrong"), spaces, str(storage / "samples-out"), _audit_inputs(root / "audit"))
    (root / "cases.json").write_text(json.dumps({k: argv for k, (argv, _) in cases.items()}))
    (root / "runner.py").write_text(RUNNER)
    env = {**os.environ, "GENMEM_STORAGE": str(storage), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(root / "runner.py"), str(root / "cases.json"), str(storage)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")]
    assert line, proc.stderr[-3000:]
    results = json.loads(line[-1].removeprefix("RESULTS "))
    (root / "results.json").write_text(json.dumps(results, indent=1))  # to read every message at once
    return cases, results


def test_the_table_has_at_least_forty_cases_across_every_job(table):
    from genmem.jobs import registry

    cases, _ = table
    assert len(cases) >= 40
    assert {case_id.split("/")[0] for case_id in cases} == {job.name for job in registry.all_jobs()}


@pytest.mark.parametrize("case_id", list(_cases("CK", "BARE", "EMPTY", "WRONG", {"ok": "", "bad_key": "", "bad_metric": ""})))
def test_bad_input_gets_one_sentence_before_any_cluster_work(table, case_id):
    import re

    cases, results = table
    result, pattern = results[case_id], cases[case_id][1]
    error = result["error"]
    assert error is not None, f"{case_id}: accepted"
    assert not error.startswith(("UNEXPECTED", "SystemExit")), f"{case_id}: {error}"
    assert "\n" not in error and "Traceback" not in error, f"{case_id}: {error}"
    assert re.search(pattern, error), f"{case_id}: {error}"
    assert not result["ray_started"], f"{case_id}: a Ray cluster was started before the error: {error}"
    written = [p for p in result["written"] if "/store/datasets" not in p]
    assert not written, f"{case_id}: wrote {written[:3]}"

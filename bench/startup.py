"""How long the command line takes over the same work called from Python: `genmem audit` of
1,000 digit samples and `genmem train` of 10 steps (quickstart model, `num_workers: 0`), each
against (a) the job called as a library function (``genmem.jobs.audit.run``,
``genmem.runs.training.train_model``: the same work, recorded in the same MLflow store) and (b)
the bare computation with no tracking (``evaluate_samples``; ``train_loop`` with a local
reporter), which shows what the MLflow run itself costs. Every run is a fresh process, as a
user's command is; the three are interleaved, and each figure is the median of ``--repeats`` runs
after one warm-up each (which materialises the data and creates the MLflow store).

Two times per run: to first work (the process's start to the first call of the work's function:
``evaluate_samples``, ``train_loop``) and end to end (to the process's exit). Target: the command
within 3 s of the library function end to end. Exits 1 where it is not.

    .venv/bin/python bench/startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 3.0
ROOT = Path(__file__).resolve().parents[1]

# Runs in the measured process before anything else: wraps the work's function, as its module
# finishes loading, so that its first call writes the time since the parent launched the process.
_PROBE = r"""
import importlib.abc, importlib.machinery, os, sys, time
_T0, _MODULE, _FUNCTION, _OUT = float(os.environ["BENCH_T0"]), *os.environ["BENCH_WORK"].split(":"), os.environ["BENCH_OUT"]

def _wrap(module):
    work = getattr(module, _FUNCTION)
    def first(*args, **kwargs):
        if not os.path.exists(_OUT):
            with open(_OUT, "w") as f:
                f.write(str(time.time() - _T0))
        return work(*args, **kwargs)
    setattr(module, _FUNCTION, first)

class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            _wrap(module)
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _Finder())
"""

_AUDIT_JOB = r"""
import sys
from genmem.jobs.audit import AuditConfig, run
from genmem.runs.context import Context
print(run(AuditConfig(samples=sys.argv[1], train=sys.argv[2], heldout=sys.argv[3]), Context())["memorised_fraction"])
"""

_TRAIN_JOB = r"""
import sys
from genmem.config import TrainConfig, apply_overrides, read_yaml_mapping, validate
from genmem.runs.training import train_model
cfg = validate(TrainConfig, apply_overrides(read_yaml_mapping(sys.argv[1], "config file", ""), sys.argv[2:]))
print(train_model(cfg)["step"])
"""

_AUDIT_BARE = r"""
from genmem.jobs.audit import AuditConfig, read_sets
from genmem.distributed.neighbours import neighbour_search
from genmem.evaluation import evaluate_samples
from genmem.storage import storage_root
import sys, torch
cfg = AuditConfig(samples=sys.argv[1], train=sys.argv[2], heldout=sys.argv[3])
sets = read_sets(cfg)
train = sets["training set"]
result = evaluate_samples(sets["samples"], train, sets["held-out set"], cfg, cache_dir=storage_root() / "features",
                          search=neighbour_search(cfg, len(train)))
print(result.metrics["eval/memorised_fraction"])
"""

_TRAIN_BARE = r"""
import sys, tempfile
from pathlib import Path
from genmem.config import TrainConfig, apply_overrides, read_yaml_mapping, validate
from genmem.data import load_dataset
from genmem.training import LocalReporter, train_loop
cfg = validate(TrainConfig, apply_overrides(read_yaml_mapping(sys.argv[1], "config file", ""), sys.argv[2:]))
train, _ = load_dataset(cfg.data)
with tempfile.TemporaryDirectory() as out:
    result = train_loop(cfg, train, LocalReporter(Path(out), cfg.images, quiet=True))
print(result.step)
"""


def digits_arrays(folder: Path) -> tuple[str, str, str]:
    """1,000 noisy copies of training digits (samples), 1,200 training and 597 held-out digits."""
    import numpy as np
    from sklearn.datasets import load_digits

    x = (load_digits().images.astype("float32") / 16 * 2 - 1)[:, None]
    rng = np.random.default_rng(0)
    samples = x[rng.permutation(1200)[:1000]] + rng.normal(0, 0.05, (1000, 1, 8, 8)).astype("float32")
    paths = [folder / "samples.npy", folder / "train.npy", folder / "heldout.npy"]
    for path, array in zip(paths, (samples, x[:1200], x[1200:])):
        np.save(path, array)
    return tuple(str(p) for p in paths)


def timed(argv: list[str], work: str, env: dict[str, str], folder: Path) -> tuple[float, float]:
    """(seconds to the work's first call, seconds to exit) of one fresh process."""
    out = folder / f"first-{time.time_ns()}"
    t0 = time.time()
    env = {**env, "BENCH_T0": repr(t0), "BENCH_WORK": work, "BENCH_OUT": str(out)}
    done = subprocess.run([sys.executable, "-c", _PROBE + "\nimport runpy, sys\nsys.argv = sys.argv[1:]\n"
                           "runpy.run_path(sys.argv[0], run_name='__main__') if sys.argv[0].endswith('.py') "
                           "else runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)", *argv],
                          env=env, cwd=folder, capture_output=True, text=True)
    total = time.time() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    if not out.exists():
        raise SystemExit(f"{' '.join(argv)} never called {work}")
    return float(out.read_text()), total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        env = {**os.environ, "GENMEM_STORAGE": str(folder / "store"), "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
               "PYTHONPATH": str(ROOT / "platform")}
        env.pop("RAY_ADDRESS", None)
        samples, train, heldout = digits_arrays(folder)
        for name, text in {"audit_job": _AUDIT_JOB, "audit_bare": _AUDIT_BARE, "train_job": _TRAIN_JOB, "train_bare": _TRAIN_BARE}.items():
            (folder / f"{name}.py").write_text(text)
        steps = ["images=320", "batch_size=32", "eval_every_images=0", "checkpoint_every_images=0", "grid_every_images=0",
                 "log_every_images=320", "memorisation_budget=null", "scaling.num_workers=0"]
        config = str(ROOT / "configs" / "quickstart.yaml")
        audit_args, train_args = [samples, train, heldout], [config, *steps]
        workloads = {
            "audit, 1,000 samples": ("genmem.evaluation:evaluate_samples", {
                "command": ["genmem.cli", "audit", "--samples", samples, "--train", train, "--heldout", heldout],
                "library": [str(folder / "audit_job.py"), *audit_args], "bare": [str(folder / "audit_bare.py"), *audit_args]}),
            "train, 10 steps": ("genmem.training:train_loop", {
                "command": ["genmem.cli", "train", "--config", config, *("--set=" + s for s in steps)],
                "library": [str(folder / "train_job.py"), *train_args], "bare": [str(folder / "train_bare.py"), *train_args]}),
        }
        rows = []
        for name, (work, ways) in workloads.items():
            for argv in ways.values():  # warm-up: data, store, caches
                timed(argv, work, env, folder)
            runs = {way: [] for way in ways}
            for _ in range(args.repeats):
                for way, argv in ways.items():
                    runs[way].append(timed(argv, work, env, folder))
            row = {"work": name}
            for way, times in runs.items():
                row[f"{way}_first_s"] = statistics.median(t[0] for t in times)
                row[f"{way}_total_s"] = statistics.median(t[1] for t in times)
            row["gap_s"] = row["command_total_s"] - row["library_total_s"]
            rows.append(row)
            print(f"{name}: " + "; ".join(f"{way} {row[way + '_first_s']:.1f} s to first work, {row[way + '_total_s']:.1f} s end to end"
                                          for way in ways)
                  + f"; command - library {row['gap_s']:+.1f} s (target within {TARGET_S:.0f} s)", flush=True)
    print(json.dumps(rows))
    return 0 if all(r["gap_s"] <= TARGET_S for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The ``genmem`` command. Each subcommand resolves and validates its options, prints them,
then calls one ``run_<job>`` function. With ``--json`` the last line of stdout is one JSON object."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from genmem.config import load_config, to_yaml


def _emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from genmem.jobs import run_train

    cfg = load_config(args.config, args.set)
    print(to_yaml(cfg), file=sys.stderr)
    return run_train(cfg)


def _sample(args: argparse.Namespace) -> dict[str, Any]:
    from genmem.jobs import run_sample

    return run_sample(args.checkpoint, args.n, args.out, seed=args.seed, tasks=args.tasks, batch_size=args.batch_size)


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from genmem.config import EvaluateConfig, apply_overrides, validate
    from genmem.jobs import run_evaluate

    tree: dict[str, Any] = {"checkpoint": args.checkpoint, "n": args.n, "seed": args.seed}
    if args.samples:
        tree["samples"] = args.samples
    if args.features:
        tree["features"] = args.features
    cfg = validate(EvaluateConfig, apply_overrides(tree, args.set))
    print(to_yaml(cfg), file=sys.stderr)
    return run_evaluate(cfg)


def _posterior(args: argparse.Namespace) -> dict[str, Any]:
    from genmem.config import PosteriorConfig, apply_overrides, validate
    from genmem.jobs import run_posterior

    tree: dict[str, Any] = {"checkpoint": args.checkpoint, "methods": args.method, "scales": args.scale,
                            "samples": args.samples, "n": args.n, "seed": args.seed}
    cfg = validate(PosteriorConfig, apply_overrides(tree, args.set))
    print(to_yaml(cfg), file=sys.stderr)
    result = run_posterior(cfg)
    from genmem.distributed.posterior import format_table

    print(format_table(result))
    return result


def _quickstart(args: argparse.Namespace) -> dict[str, Any]:
    from genmem.distributed.posterior import format_table
    from genmem.jobs import run_quickstart

    cfg = load_config(args.config, args.set)
    result = run_quickstart(cfg, scales=tuple(args.scale), samples=args.samples, n=args.n)
    print("\n" + format_table(result["posterior"]))
    print("MLflow: `make mlflow-ui`, then experiments genmem/train and genmem/posterior at http://127.0.0.1:5000")
    return {"checkpoint": result["train"]["checkpoint"], "grid": result["train"]["grid"],
            "train_run_id": result["train"]["mlflow_run_id"], "posterior_run_id": result["posterior"]["mlflow_run_id"]}


def _retrain(args: argparse.Namespace) -> dict[str, Any]:
    from genmem.config import RetrainConfig
    from genmem.jobs import run_retrain
    from genmem.methods.retraining import format_table

    cfg = load_config(args.config, args.set, cls=RetrainConfig)
    print(to_yaml(cfg), file=sys.stderr)
    result = run_retrain(cfg)
    print("\n" + format_table(result))
    return {k: v for k, v in result.items() if k != "generations"} | {
        "checkpoints": [g["checkpoint"] for g in result["generations"]],
        "metrics": [g["metrics"] for g in result["generations"]],
    }


def _sweep(args: argparse.Namespace) -> dict[str, Any]:
    from genmem.distributed.tune import format_results
    from genmem.jobs import run_sweep
    from genmem.sweep import JOBS, load_space

    cfg = load_config(args.config, args.set, cls=JOBS[args.job])
    result = run_sweep(args.space, args.job, cfg.model_dump(mode="json"), name=args.name, resume=args.resume)
    print("\n" + format_results(result, load_space(args.space).metric))
    return result


def _config_command(sub, name: str, func, help: str, config_help: str, example: str) -> None:
    """A subcommand that takes one YAML config plus dotted overrides."""
    cmd = sub.add_parser(name, help=help)
    cmd.add_argument("--config", help=config_help)
    cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"dotted override, e.g. {example}")
    cmd.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    cmd.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genmem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    _config_command(sub, "train", _train, "train a flow-matching or diffusion model",
                    "YAML config (see configs/); defaults apply where absent", "model.hidden=128")

    sample = sub.add_parser("sample", help="generate samples from a checkpoint into Parquet")
    sample.add_argument("--checkpoint", required=True, help="checkpoint folder written by genmem train")
    sample.add_argument("--n", type=int, required=True, help="number of samples")
    sample.add_argument("--out", required=True, help="output folder for the Parquet shards")
    sample.add_argument("--seed", type=int, default=0, help="sample k depends only on (seed, k)")
    sample.add_argument("--tasks", type=int, default=None, help="Ray tasks to split the samples over (default: one per CPU or GPU)")
    sample.add_argument("--batch-size", type=int, default=256)
    sample.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    sample.set_defaults(func=_sample)

    evaluate = sub.add_parser("evaluate", help="memorisation, FD, precision/recall, LID of a checkpoint's samples")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint folder; its own training and held-out data are the reference")
    evaluate.add_argument("--n", type=int, default=1000, help="samples to generate across Ray tasks")
    evaluate.add_argument("--samples", help="evaluate these Parquet samples instead of generating")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--features", nargs="+", choices=["auto", "pixels", "classifier", "inception"], help="feature extractors for FD/PRDC")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any EvaluateConfig field, e.g. threshold=0.3")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    evaluate.set_defaults(func=_evaluate)

    post = sub.add_parser("posterior", help="Euclidean/Riemannian Laplace weight samples of a checkpoint, evaluated arm by arm")
    post.add_argument("--checkpoint", required=True)
    post.add_argument("--method", nargs="+", default=["euclidean", "riemannian"], choices=["euclidean", "riemannian"])
    post.add_argument("--samples", type=int, default=4, help="weight samples per (method, scale), one Ray task each")
    post.add_argument("--scale", type=float, nargs="+", default=[1e-2], help="posterior temperatures tau")
    post.add_argument("--n", type=int, default=1000, help="images per arm")
    post.add_argument("--seed", type=int, default=0)
    post.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any PosteriorConfig field, e.g. curvature=ggn")
    post.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    post.set_defaults(func=_posterior)

    quick = sub.add_parser("quickstart", help="train until memorising, then θ* vs Euclidean vs Riemannian Laplace arms")
    quick.add_argument("--config", default="configs/quickstart.yaml")
    quick.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training config override")
    quick.add_argument("--scale", type=float, nargs="+", default=[1e-2, 1e-1, 1.0])
    quick.add_argument("--samples", type=int, default=4)
    quick.add_argument("--n", type=int, default=500)
    quick.add_argument("--json", action="store_true")
    quick.set_defaults(func=_quickstart)

    _config_command(sub, "retrain", _retrain, "self-consuming retraining on real/synthetic mixes, generation by generation",
                    "YAML RetrainConfig (see configs/*retrain*.yaml); training settings under train:", "synthetic_ratio=0.5")

    sweep = sub.add_parser("sweep", help="a Ray Tune sweep of a job over a tune_spaces/ YAML search space")
    sweep.add_argument("--space", required=True, help="search space YAML, e.g. tune_spaces/mixing_ratio.yaml")
    sweep.add_argument("--job", required=True, choices=["train", "retrain", "posterior"])
    sweep.add_argument("--config", help="the job's base YAML config; each trial applies its point to it")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override of the base config")
    sweep.add_argument("--name", help="sweep name (default: derived from the space, job and base config)")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are not rerun")
    sweep.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    sweep.set_defaults(func=_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as exc:
        # Our errors are written as one sentence for the user: show that, not a traceback.
        print(f"genmem {args.command}: error: {exc}", file=sys.stderr)
        return 2
    _emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``genmem`` command, built from the job registry: one subcommand per job, each taking
``--config FILE``, ``--set key=value`` overrides and the job's own flags. It resolves and
validates the config, prints it, then calls the job's ``run``. With ``--json`` the last line of
stdout is one JSON object. Errors the user can fix print one line and exit 2; anything else is a
bug and shows its traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from genmem.config import _set_dotted, apply_overrides, read_yaml_mapping, to_yaml, validate
from genmem.distributed.submit import add_submit_parser, check_job_defaults
from genmem.distributed.verbosity import set_verbose
from genmem.errors import GenmemError
from genmem.jobs.commands import COMMANDS, Command
from genmem.services import add_tracking_parser

if TYPE_CHECKING:
    from genmem.jobs.base import Job


def _dest(key: str) -> str:
    return f"cfg:{key}"


def _add_job(sub, job: Command) -> None:
    cmd = sub.add_parser(job.name, help=job.help, description=job.help)
    default = f" (default {job.default_config})" if job.default_config else ""
    what = f"the {job.file_key} config" if job.file_key else "the config"
    cmd.add_argument("--config", default=job.default_config, help=f"YAML file of {what}{default}; defaults apply where absent")
    cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"dotted override of {what}, e.g. {job.example}")
    for flag in job.flags:
        options = {"metavar": flag.key.split(".")[-1].upper(), **flag.options} if "action" not in flag.options else flag.options
        cmd.add_argument(flag.name, dest=_dest(flag.key), default=None, **options)
    cmd.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    cmd.add_argument("--verbose", action="store_true", help="show Ray's own log lines too")
    cmd.set_defaults(job=job.name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genmem", description="Train generative models and measure and reduce their memorisation "
                                     "of training data. Each subcommand is a job: `genmem JOB --help` lists its options.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():  # no job module loads until a job runs: --help answers at once
        _add_job(sub, command)
    add_submit_parser(sub)
    add_tracking_parser(sub)
    return parser


def job_config(job: Job, args: argparse.Namespace) -> Any:
    """The job's validated config: YAML file, then --set overrides, then the job's flags."""
    tree = read_yaml_mapping(args.config, "config file", "configs/digits_flow.yaml") if args.config else {}
    tree = apply_overrides(tree, args.set)
    if job.file_key:
        tree = {job.file_key: tree}
    for flag in job.flags:
        value = getattr(args, _dest(flag.key))
        if value is not None:
            _set_dotted(tree, flag.key, value)
    return validate(job.config, tree)


def run_job(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from genmem.jobs import registry
    from genmem.jobs.base import links
    from genmem.runs.context import Context

    job = registry.get(name)
    cfg = job_config(job, args)
    print(to_yaml(cfg), file=sys.stderr)
    check_job_defaults()  # a job running in Ray's working-dir copy would lose its results with it
    result = job.run(cfg, Context())
    if job.table is not None:
        print("\n" + job.table(result))
    summary = job.summary(result) if job.summary is not None else dict(result)
    return {**summary, **links(summary)}


def _emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, default=str))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_verbose(getattr(args, "verbose", False))
    try:
        result = args.func(args) if args.command in ("submit", "tracking") else run_job(args.job, args)
    except GenmemError as exc:
        # Our errors are written as one sentence for the user: show that, not a traceback.
        print(f"genmem {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if "ray" in sys.modules:  # a job that never needed Ray has nothing to release
            from genmem.distributed.cluster import release_ray

            release_ray()
        sys.stdout.flush()
    _emit(result, getattr(args, "json", False))
    return 0


def entry_point(path: str) -> int:
    """``jobs/<name>.py``: the ``ray job submit`` entry point of job <name> (the file's name)."""
    return main([Path(path).stem, *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())

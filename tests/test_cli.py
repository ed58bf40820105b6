"""The `genmem` command: --json output, and one-sentence errors for bad input with nothing
left half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from genmem.cli import main

TINY = ["--set", "data.source=moons", "--set", "data.n=500", "--set", "model.hidden=32", "--set", "model.depth=1",
        "--set", "batch_size=50", "--set", "images=500", "--set", "grid_size=16"]


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("genmem ") and ": error: " in err
    return err


@pytest.mark.slow  # a local Ray cluster, started by the command
def test_train_with_json_shows_progress_once(storage, tmp_path, ray_address):
    """`genmem train` as a user runs it, attached to the session's cluster (`genmem sample` as a
    command: the S3 test, each on its own mirror)."""
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    out = subprocess.run([sys.executable, "-m", "genmem.cli", "train", *TINY, "--set", "log_every_images=250", "--json"],
                         capture_output=True, text=True, check=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # Progress shows once per log point; Ray Train's internal chatter stays out by default.
    progress = [line for line in (out.stdout + out.stderr).splitlines() if "[genmem train]" in line]
    assert len(progress) == 2 and "250/500 images" in progress[0] and "500/500 images" in progress[1], progress
    assert "PlacementGroupCleaner" not in out.stderr and "TrainingReport(" not in out.stderr
    assert result["images_seen"] == 500 and result["step"] == 10
    assert result["checkpoint"].startswith(str(storage)) and result["grid"].endswith(".png")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--set", "data.source=mnistt"], "data.source"),
        (["--set", "model.hiden=3"], "unknown config key 'model.hiden'"),
        (["--set", "images=0"], "config key 'images'"),
        (["--set", "images=-5"], "config key 'images'"),
        (["--set", "data.source=parquet"], "set data.path"),
        (["--config", "does/not/exist.yaml"], "does not exist"),
        (["--set", "sampler.method=sde"], "needs process.kind=diffusion"),
    ],
)
def test_bad_config_is_one_sentence_before_any_work(argv, fragment, capsys, storage):
    assert fragment in _error(capsys, ["train", *argv])
    assert not storage.exists()  # nothing was written


def test_bad_user_data_is_one_sentence(capsys, storage, tmp_path):
    missing = tmp_path / "missing.parquet"
    assert "does not exist" in _error(capsys, ["train", *TINY, "--set", "data.source=parquet", "--set", f"data.path={missing}"])
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    assert "not a readable Parquet file" in _error(capsys, ["train", *TINY, "--set", "data.source=parquet", "--set", f"data.path={corrupt}"])
    rank3 = tmp_path / "rank5.npy"
    np.save(rank3, np.zeros((4, 1, 2, 2, 2), dtype=np.float32))
    assert "rank 5" in _error(capsys, ["train", *TINY, "--set", "data.source=array", "--set", f"data.path={rank3}"])
    nonfinite = tmp_path / "nan.npy"
    arr = np.zeros((10, 2), dtype=np.float32)
    arr[3, 1] = np.nan
    np.save(nonfinite, arr)
    assert "non-finite" in _error(capsys, ["train", *TINY, "--set", "data.source=array", "--set", f"data.path={nonfinite}"])
    # Refused before anything was written: no dataset, no checkpoint, no Ray run, no temp folder.
    assert not [p for p in storage.rglob("*") if p.is_file()]
    assert not [p for p in storage.rglob(".*")]


def test_sample_errors(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "has no meta.json" in _error(capsys, ["sample", "--checkpoint", str(tmp_path / "empty"), "--n", "3", "--out", str(tmp_path / "o")])
    assert "does not exist" in _error(capsys, ["sample", "--checkpoint", str(tmp_path / "nope"), "--n", "3", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


HEAVY = ("torch", "ray", "mlflow")
_HELP = """
import contextlib, io, json, sys
from genmem.cli import main
out = {}
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()) as text:
        try:
            main(argv)
        except SystemExit:
            pass
    out[" ".join(argv)] = text.getvalue()
print(json.dumps({"text": out, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in %r)}))
""" % (HEAVY,)


def test_help_answers_without_loading_torch_ray_or_mlflow():
    """`genmem --help` and every `genmem <job> --help` are built from genmem.jobs.commands alone:
    no job module, and none of torch, Ray or MLflow, loads to print them."""
    from genmem.jobs.commands import COMMANDS

    argvs = [["--help"], *[[name, "--help"] for name in COMMANDS], ["submit", "--help"]]
    done = subprocess.run([sys.executable, "-c", _HELP, json.dumps(argvs)], capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert all(name in report["text"]["--help"] for name in COMMANDS)
    for name, command in COMMANDS.items():
        text = report["text"][f"{name} --help"]
        assert command.help.split()[0] in text and all(flag.name in text for flag in command.flags)


_SMALL_WORK = """
import json, sys
from genmem.cli import main
train, sample = json.loads(sys.argv[1])
results = []
for argv in (train, sample):
    with open(sys.argv[2], "w") as out:
        sys.stdout, saved = out, sys.stdout
        code = main(argv)
        sys.stdout = saved
    assert code == 0, argv
    results.append(json.loads(open(sys.argv[2]).read().strip().splitlines()[-1]))
    if len(results) == 1:
        sample[sample.index("CHECKPOINT")] = results[0]["checkpoint"]
print(json.dumps({"results": results, "ray": "ray" in sys.modules}))
"""


@pytest.mark.slow  # two commands in a fresh process (about 20 s)
def test_small_work_runs_in_the_process_with_no_ray_cluster(storage, tmp_path):
    """`genmem train` with num_workers 0 and `genmem sample` of a few hundred points run in the
    command's own process: no local Ray cluster starts, Ray is not even imported, and the results
    are those of the usual path (a checkpoint in Ray's storage; every sample written)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    train = ["train", *TINY, "--set", "scaling.num_workers=0", "--json"]
    sample = ["sample", "--checkpoint", "CHECKPOINT", "--n", "300", "--out", str(tmp_path / "samples"), "--json"]
    done = subprocess.run([sys.executable, "-c", _SMALL_WORK, json.dumps([train, sample]), str(tmp_path / "out.txt")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    trained, sampled = report["results"]
    assert report["ray"] is False
    assert trained["images_seen"] == 500 and trained["checkpoint"].startswith(str(storage / "ray"))
    # The run's link opens MLflow's model-training view (the UI's default is its GenAI view).
    from mlflow import MlflowClient

    experiment = MlflowClient().get_run(trained["mlflow_run_id"]).info.experiment_id
    assert trained["mlflow_url"] == (f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{trained['mlflow_run_id']}"
                                     "?workflowType=machine_learning")
    # The experiment's link opens its run list with the job's columns (MLflow's shared view state).
    assert trained["experiment_url"] == (f"http://127.0.0.1:5000/#/experiments/{experiment}/runs"
                                         "?workflowType=machine_learning&viewStateShareKey=genmem")
    view = json.loads(MlflowClient().get_experiment(experiment).tags["mlflow.sharedViewState.genmem"])
    assert view["selectedColumns"][:4] == ["attributes.`Description`", "params.`data.source`", "params.`images`", "metrics.`train/loss`"]
    assert sampled["n"] == 300 and sampled["tasks"] == 1
    from genmem.data import read_shards

    assert len(read_shards(sampled["samples"])) == 300


def test_the_commands_match_their_jobs():
    """What --help says of a job is what the job takes: each flag sets a key of its config, and
    the choices it lists are the config's."""
    from typing import get_args

    from genmem.jobs import registry
    from genmem.jobs.commands import COMMANDS
    from pydantic import BaseModel

    from genmem.methods.finetune import DivergenceName

    def has(cls: type[BaseModel], dotted: str) -> bool:
        head, _, rest = dotted.partition(".")
        info = cls.model_fields.get(head)
        if info is None or not rest:
            return info is not None
        return isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel) and has(info.annotation, rest)

    for name, command in COMMANDS.items():
        job = registry.get(name)
        for flag in command.flags:
            assert has(job.config, flag.key), f"{name} {flag.name} sets {flag.key}, which {job.config.__name__} lacks"
    divergence = next(f for f in COMMANDS["finetune"].flags if f.name == "--divergence").options["help"]
    assert all(d in divergence for d in get_args(DivergenceName))

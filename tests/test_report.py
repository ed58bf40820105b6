"""`genmem report`: the points, their Pareto front and the page (library), and the report over
real runs on a real MLflow server: a train + evaluate, a two-scale posterior and a two-setting
retraining sweep."""

from __future__ import annotations

import base64
import csv
import io
import re

import numpy as np
import pytest
from conftest import start_session_ray
from mlflow import MlflowClient
from PIL import Image

from genmem.errors import TrackingError
from genmem.jobs.base import Context
from genmem.jobs.evaluate import EvaluateConfig
from genmem.jobs.evaluate import run as evaluate_job
from genmem.jobs.posterior import PosteriorConfig
from genmem.jobs.posterior import run as posterior_job
from genmem.jobs.report import ReportConfig, table
from genmem.jobs.report import run as report_job
from genmem.report import SIZE_METHOD, Point, chart, pareto_front, point, size_chart, to_csv, to_html


def _p(m: float, q: float, key: str = "fd_pixels", **kw) -> Point:
    return Point(run_id=kw.pop("run_id", "r"), method=kw.pop("method", "m"), setting=kw.pop("setting", "s"),
                 memorised_fraction=m, quality=q, quality_key=key, **kw)


def test_the_pareto_front_is_what_no_other_point_dominates_within_its_measure():
    pts = [_p(0.5, 1.0), _p(0.2, 2.0), _p(0.3, 3.0), _p(0.2, 2.0, setting="tie"), _p(0.9, 0.5, key="mmd"), _p(0.95, 0.6, key="mmd")]
    # (0.3, 3.0) is beaten by (0.2, 2.0); equal points do not dominate each other; measures are separate fronts.
    assert pareto_front(pts) == [True, True, False, True, True, False]
    # brute force on random points: the front is exactly the set with no point at or below both coordinates
    rng = np.random.default_rng(0)
    cloud = [_p(float(a), float(b)) for a, b in rng.random((40, 2))]
    front = pareto_front(cloud)
    for p, on in zip(cloud, front):
        below = [q for q in cloud if q is not p and q.memorised_fraction < p.memorised_fraction and q.quality < p.quality]
        assert on == (not below)


def test_a_point_takes_the_best_quality_measure_its_run_holds():
    m = {"eval/memorised_fraction": 0.25, "eval/fd_pixels": 3.0, "eval/fd_classifier": 7.0}
    p = point("r", m, "eval/", method="evaluate", setting="x")
    assert (p.quality_key, p.quality, p.memorised_fraction) == ("fd_classifier", 7.0, 0.25)
    assert point("r", {"eval/memorised_fraction": 0.25}, "eval/", method="m", setting="s") is None  # no quality: no point
    assert point("r", {"eval/fd_pixels": 1.0}, "eval/", method="m", setting="s") is None


def test_the_ct_and_authenticity_axes_count_larger_values_as_less_copying():
    """C_T: negative copies, so the front keeps the largest C_T at each quality; authPct likewise.
    A point without the measure (a run from before the copy tests) is left out of that axis."""
    from genmem.report import measured

    pts = [_p(0.5, 1.0, ct=-8.0, authpct=5.0), _p(0.1, 2.0, ct=1.0, authpct=60.0), _p(0.2, 3.0, ct=0.5, authpct=70.0),
           _p(0.3, 1.5)]
    assert len(measured(pts, "ct")) == 3 and len(measured(pts, "fraction")) == 4
    scored = measured(pts, "ct")
    assert pareto_front(scored, "ct") == [True, True, False]  # C_T 0.5 at quality 3 is beaten by C_T 1.0 at quality 2
    assert pareto_front(scored, "authenticity") == [True, True, True]  # 70% authentic at quality 3: nothing dominates it
    assert point("r", {"eval/memorised_fraction": 0.2, "eval/fd_pixels": 1.0, "eval/ct": -3.0, "eval/authpct": 12.0}, "eval/",
                 method="m", setting="s").ct == -3.0
    picture = chart(scored, "ct")
    assert picture.ndim == 3
    rows = list(csv.DictReader(io.StringIO(to_csv(scored, "ct"))))
    assert [float(r["ct"]) for r in rows] == [1.0, 0.5, -8.0]  # least copying first


def test_csv_and_html_hold_every_point_and_the_chart():
    pts = [_p(0.5, 1.0, base=True), _p(0.1, 30.0, method="posterior/riemannian", setting="τ=1"), _p(0.0, 900.0, over_budget=True)]
    picture = chart(pts)
    assert picture.ndim == 3 and picture.shape[2] in (3, 4)
    rows = list(csv.DictReader(io.StringIO(to_csv(pts))))
    assert [(float(r["memorised_fraction"]), float(r["quality"])) for r in rows] == [(0.0, 900.0), (0.1, 30.0), (0.5, 1.0)]
    assert [r["pareto"] for r in rows] == ["True", "True", "True"] and rows[2]["base"] == "True"
    html = to_html(pts, picture)
    src = re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(src)))), picture)
    assert html.count("<tr") == 1 + len(pts) and "τ=1" in html
    header = re.findall(r"<th>([^<]+)</th>", html)
    assert header[:3] == ["method", "setting", "memorised_fraction"] and header[-1] == "run_id"  # the result first, the id last


def test_size_study_runs_of_two_or_more_sizes_get_their_own_chart_on_the_page():
    one_size = [_p(0.4, 2.0, method=SIZE_METHOD, setting="n=32"), _p(0.1, 3.0, method="retrain", setting="n=64")]
    assert size_chart(one_size) is None  # a retraining setting named like a size is not a size study
    sizes = [_p(m, q, method=SIZE_METHOD, setting=f"n={n}", experiment=e, run_id=f"{e}{n}")
             for e in ("genmem/manifold", "genmem/digits") for n, m, q in ((32, 0.6, 4.0), (256, 0.2, 2.0), (2048, 0.01, 1.0))]
    picture = size_chart(sizes + one_size)
    assert picture is not None and picture.shape[1] >= 1000  # legible at the UI's size
    html = to_html(sizes, chart(sizes), sizes=picture)
    srcs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(srcs) == 2 and np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(srcs[1])))), picture)
    assert len(re.findall(r'src="data:', to_html(sizes, chart(sizes)))) == 1


def test_the_headline_names_the_front_and_a_base_once():
    from genmem.jobs.report import _headline

    pts = [_p(0.23, 0.23, method="posterior θ*", setting="θ*", base=True, run_id="a"), _p(0.01, 0.5, method="unlearn", setting="λ=5", run_id="b")]
    assert _headline(pts, [True, True], "fraction") == (
        "2 points from 2 runs; on the Pareto front: posterior θ* (memorised_fraction 0.23, fd_pixels 0.23), "
        "unlearn λ=5 (memorised_fraction 0.01, fd_pixels 0.5)")


@pytest.fixture(scope="module")
def measured_runs(toy_checkpoint, mlflow_server, loop_sweep):
    """Real runs on the session's server: an evaluation of the toy checkpoint, a posterior with two
    scales (Euclidean: no solve), and the two-setting retraining sweep."""
    import os

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    start_session_ray()
    try:
        evaluated = evaluate_job(EvaluateConfig(checkpoint=toy_checkpoint, n=30, features=["pixels"]), Context())
        posterior = posterior_job(PosteriorConfig(checkpoint=toy_checkpoint, methods=["euclidean"], scales=[0.5, 2.0], samples=1, n=30,
                                                  features=["pixels"]), Context())
    finally:
        os.environ["MLFLOW_TRACKING_URI"] = saved or ""
    return evaluated, posterior, loop_sweep[0], loop_sweep[1]


def test_the_report_reads_every_arm_and_setting_back_from_mlflow(measured_runs, tracking):
    import json

    evaluated, posterior, sweep, store = measured_runs
    result = report_job(ReportConfig(runs=[evaluated["mlflow_run_id"], posterior["mlflow_run_id"]], sweep=sweep["mlflow_run_id"]), Context())
    rows = {(r["run_id"], r["method"], r["setting"]): r for r in result["points"]}
    expected = {(evaluated["mlflow_run_id"], "evaluate"): (evaluated["memorised_fraction"], evaluated["fd_pixels"], True)}
    for arm in posterior["arms"]:
        method = "posterior θ*" if arm["arm"] == "theta_star" else f"posterior/{arm['arm']}"
        expected[(arm["mlflow_run_id"], method, arm["scale"])] = (arm["memorised_fraction"], arm["fd_pixels"], arm["arm"] == "theta_star")
    for trial in sweep["results"]:
        state = json.loads((store / "retrain" / f"{sweep['sweep']}-{trial['trial_id']}" / "state.json").read_text())
        gens = state["generations"]
        fd_key = gens[0]["fd_key"]
        expected[(state["mlflow_run_id"], "retrain θ*", 0)] = (gens[0]["metrics"]["memorised_fraction"], gens[0]["metrics"][fd_key], True)
        expected[(state["mlflow_run_id"], "retrain", 3)] = (gens[-1]["metrics"]["memorised_fraction"], gens[-1]["metrics"][fd_key], False)
    assert len(rows) == len(expected) == 1 + 3 + 4  # one row per evaluation, arm, and loop's base and last generation
    for (run_id, method, setting), r in rows.items():
        key = next(k for k in expected if k[0] == run_id and k[1] == method and (
            len(k) == 2 or (method.startswith("posterior") and (setting == "θ*" or setting == f"τ={k[2]:g}"))
            or (method.startswith("retrain") and (setting == "generation 0" if k[2] == 0 else setting.endswith(f"(gen {k[2]})")))))
        memorised, quality, base = expected[key]
        assert r["memorised_fraction"] == pytest.approx(memorised, rel=1e-9) and r["quality"] == pytest.approx(quality, rel=1e-9), key
        assert r["base"] is base and r["quality_key"] == "fd_pixels"
    assert {r["setting"] for r in result["points"] if r["method"] == "retrain"} == {
        "synthetic_ratio=0.25 (gen 3)", "synthetic_ratio=fully_synthetic (gen 3)"}
    client = MlflowClient(tracking)
    report_run = client.get_run(result["mlflow_run_id"])
    assert {a.path for a in client.list_artifacts(report_run.info.run_id)} >= {"report.png", "report.csv", "report.html"}
    assert report_run.data.metrics["report/points"] == len(expected)
    assert report_run.data.tags["mlflow.note.content"].startswith(f"{len(expected)} points from ")
    assert "posterior/euclidean" in table(result) and "retrain θ*" in table(result)
    # the same runs on authenticity: every point carries it (θ*, arms, generations, the evaluation)
    by_auth = report_job(ReportConfig(runs=[evaluated["mlflow_run_id"], posterior["mlflow_run_id"]], sweep=sweep["mlflow_run_id"],
                                      memorisation="authenticity"), Context())
    assert len(by_auth["points"]) == len(expected) and all(0 <= r["authpct"] <= 100 for r in by_auth["points"])
    assert [r["authpct"] for r in by_auth["points"] if r["method"] == "evaluate"] == [pytest.approx(evaluated["authpct"], rel=1e-9)]
    assert "authentic%" in table(by_auth).splitlines()[0]


def test_an_unreachable_server_or_an_empty_experiment_gives_one_sentence(tracking, monkeypatch):
    MlflowClient(tracking).create_experiment("genmem/empty-for-report")
    with pytest.raises(TrackingError, match=r"^no finished run among experiments empty-for-report at .* measured both memorisation and "
                                            r"quality \(0 finished runs read\): run evaluate, posterior"):
        report_job(ReportConfig(experiments=["empty-for-report"]), Context())
    with pytest.raises(TrackingError, match=r"^MLflow at .* has no experiment 'no-such': name one of genmem/"):
        report_job(ReportConfig(experiments=["no-such"]), Context())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(TrackingError, match=r"^MLflow tracking server http://127.0.0.1:9 is unreachable .*: start it or fix MLFLOW_TRACKING_URI$"):
        report_job(ReportConfig(), Context())

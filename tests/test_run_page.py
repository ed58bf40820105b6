"""What a run shows in the MLflow UI: its one-line description (genmem.runs.headlines), the
figures a reader compares, each from the metric it names, a degenerate posterior arm never read as
"0 memorised"; params without the settings left unset."""

from __future__ import annotations

from genmem.runs import headlines


def test_an_evaluation_reads_memorised_with_interval_null_and_quality():
    metrics = {"eval/memorised_fraction": 0.224, "eval/memorised_fraction_lo": 0.195, "eval/memorised_fraction_hi": 0.269,
               "eval/n": 500.0, "null/memorised_fraction": 0.004, "eval/null/memorised_fraction": 0.5, "eval/fd_pixels": 9.1, "eval/fd_classifier": 0.2345,
               "eval/precision": 0.996, "eval/recall": 0.969, "other/memorised_fraction": 0.9}
    assert headlines.evaluation(metrics) == ("memorised 22.4% [19.5%, 26.9%] of 500 samples (null control 0.4%), "
                                             "fd_classifier 0.234, precision 0.996, recall 0.969")
    assert headlines.evaluation({"eval/fd_pixels": 3.0}) == "fd_pixels 3"
    assert headlines.evaluation({}) == "no memorisation or quality metric was measured"


def test_a_change_reads_before_and_after_in_the_order_asked():
    metrics = {"memorised_fraction_before": 0.224, "memorised_fraction": 0.014, "fd_classifier_before": 0.74,
               "fd_classifier": 0.98, "forget_mass_before": 0.41, "forget_mass": 0.02, "mmd": 0.1}
    assert headlines.change(metrics, ("forget_mass", "memorised_fraction", "mmd", "fd_classifier")) == (
        "forget_mass 0.41 → 0.02, memorised 22.4% → 1.4%, fd_classifier 0.74 → 0.98")
    assert headlines.change(metrics, ("reward",)).startswith("measured before and after")


def test_a_posterior_arm_with_no_precision_is_degenerate_not_unmemorised():
    rows = [{"arm": "theta_star", "scale": 0.0, "memorised_fraction": 0.23, "fd_classifier": 0.23, "precision": 0.996},
            {"arm": "euclidean", "scale": 0.01, "memorised_fraction": 0.0, "fd_classifier": 2.93, "precision": 0.778},
            {"arm": "euclidean", "scale": 0.1, "memorised_fraction": 0.0, "fd_classifier": 531.0, "precision": 0.0},
            {"arm": "riemannian", "scale": 1.0, "memorised_fraction": 0.004, "fd_classifier": 0.43, "precision": 0.982}]
    text = headlines.posterior(rows, "fd_classifier")
    assert text == ("θ* memorised 23.0%, fd_classifier 0.23; euclidean τ=0.01 0.0% (2.93), τ=0.1 degenerate (precision 0.000); "
                    "riemannian τ=1 0.4% (0.43)")


def test_an_arm_run_is_described_by_its_evaluation_or_as_degenerate():
    good = {"eval/memorised_fraction": 0.212, "eval/fd_classifier": 0.29, "eval/precision": 0.98}
    assert headlines.arm("riemannian τ=0.01", good) == "riemannian τ=0.01: memorised 21.2%, fd_classifier 0.29, precision 0.98"
    noise = {"eval/memorised_fraction": 0.0, "eval/fd_classifier": 531.0, "eval/precision": 0.0}
    assert headlines.arm("euclidean τ=1", noise) == ("euclidean τ=1: degenerate (precision 0.000): its samples are not the data's, "
                                                    "so its memorised 0.0% says nothing about copying")


def test_training_and_generations_name_their_budget_and_collapse():
    assert headlines.training(60_000, 1_875, 0.01234, (60_000, 0.224), "stopped") == (
        "trained 60,000 images (1,875 steps): loss 0.0123, memorised 22.4% at 60,000 images; memorisation budget stopped")
    assert headlines.training(500, 10, None, None, None) == "trained 500 images (10 steps)"
    history = [{"fd_key": "eval/fd_pixels", "metrics": {"fd": 1.0, "memorised_fraction": 0.02}},
               {"fd_key": "eval/fd_pixels", "metrics": {"fd": 4.0, "memorised_fraction": 0.08}}]
    assert headlines.generations(history, 0.5, 1) == "1 generation at synthetic ratio 0.5: memorised 2.0% → 8.0%, fd_pixels 1 → 4; collapsed at generation 1"


def test_a_size_and_a_sweep_read_their_result_in_one_line():
    metrics = {"eval/memorised_fraction": 0.15, "eval/heldout_memorised_fraction": 0.003, "fd": 0.5234, "learned_dim/train_q50": 3.0,
               "learned_dim/heldout_q50": 2.0, "learned_dim/true": 3.0}
    assert headlines.size_study(64, metrics) == ("64 training points: memorised 15.0% (held-out control 0.3%), FD 0.523; "
                                                 "learned dimension 3 (held-out points 2, true 3)")
    assert headlines.size_study(1024, {"fd": 2.0}) == "1,024 training points: FD 2"
    best = {"params": {"synthetic_ratio": 0.25, "seed": 0}, "final": {"fd": 1.234}}
    assert headlines.sweep("retrain", ["synthetic_ratio", "seed"], 3, 1, 0, "fd", best) == (
        "4 retrain trials over synthetic_ratio, seed: 3 finished, 1 failed; best fd 1.23 at synthetic_ratio=0.25, seed=0")


def test_unset_settings_are_not_params(tmp_path):
    from mlflow import MlflowClient

    from genmem.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.start("probe", "probe", params={"a": None, "b": {"c": 1, "d": None}, "e": "x", "f": [], "g": [0]}, uri=uri)
    tracker.describe("memorised 1.0%")
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.data.params == {"b.c": "1", "e": "x", "g": "[0]"}
    assert run.data.tags["mlflow.note.content"] == "memorised 1.0%"


def test_a_run_records_only_the_settings_that_apply():
    from genmem.config import TrainConfig, flatten, tracked

    mlp = flatten(tracked(TrainConfig()))
    assert {"model.hidden", "data.source", "sampler.steps", "process.ot_coupling"} <= set(mlp)
    assert not {"model.channels", "data.ambient_dim", "data.noise", "data.path", "sampler.rtol", "process.schedule"} & set(mlp)
    unet = flatten(tracked(TrainConfig.model_validate({"model": {"kind": "unet"}, "data": {"source": "manifold"},
                                                       "process": {"kind": "diffusion"}, "sampler": {"method": "dopri5"}})))
    assert {"model.channels", "data.ambient_dim", "data.n", "process.schedule", "sampler.rtol"} <= set(unet)
    assert not {"model.hidden", "process.ot_coupling", "sampler.steps"} & set(unet)


def test_figures_are_wide_enough_to_read_in_the_artifact_view():
    """Every matplotlib figure genmem logs is at least 1,000 px wide, its text scaled with it,
    whatever size it was drawn at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from genmem.viz import MIN_WIDTH_PX, figure_to_array

    for size in ((4, 4), (2, 1.5), (12, 3)):
        fig, ax = plt.subplots(figsize=size, dpi=100)
        ax.plot([0, 1], [0, 1], label="a line")
        ax.legend(fontsize=10)
        picture = figure_to_array(fig)
        assert picture.shape[1] >= MIN_WIDTH_PX and picture.shape[2] == 3, (size, picture.shape)
        if size[0] * 100 >= 1.2 * MIN_WIDTH_PX:  # already wide: drawn as it was
            assert picture.shape[1] <= size[0] * 100
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)  # a training run's periodic picture: its own size
    assert figure_to_array(fig, 0).shape[1] <= 400


def test_memorised_pairs_put_generated_above_nearest_training_at_a_readable_width():
    import torch

    from genmem.viz import MIN_WIDTH_PX, memorised_pairs

    for shape in ((16, 1, 8, 8), (3, 1, 28, 28), (5, 3, 32, 32)):
        generated, nearest = torch.ones(shape), -torch.ones(shape)  # white above, black below
        picture = memorised_pairs(generated, nearest, [0.1] * shape[0], 1 / 3)
        assert picture.shape[1] >= MIN_WIDTH_PX and picture.shape[2] == 3, (shape, picture.shape)
        grey = picture.mean(2)
        tiles = grey[:, 130:-20]  # right of the row labels
        dark_rows = (tiles < 10).mean(1) > 0.5
        first_dark = dark_rows.argmax()
        assert dark_rows.any() and first_dark > picture.shape[0] / 3, shape  # the nearest training row is the lower one
    vectors = memorised_pairs(torch.zeros(4, 2), torch.ones(4, 2), [0.2, 0.3, 0.4, 0.5], 1 / 3)
    assert vectors.shape[1] >= MIN_WIDTH_PX


def test_trials_setting_the_run_list_view_at_once_all_get_their_experiment(tracking):
    """The trials of a sweep open their experiment at the same moment, each setting its run-list
    view: on the PostgreSQL-backed server one insert of the tag loses the race (a unique-key
    violation, seen in a λ sweep). Every caller still gets the experiment, and the view is set."""
    import json
    import threading
    import uuid

    from mlflow import MlflowClient

    from genmem.tracking import VIEW_TAG, experiment_id

    columns = ("params.lam", "unlearn/forget_ratio")
    for _ in range(3):
        kind = f"race-{uuid.uuid4().hex[:8]}"
        experiment_id(kind)  # created without a view, as before a job with columns ran
        barrier, got, failed = threading.Barrier(8), [], []

        def open_it():
            barrier.wait()
            try:
                got.append(experiment_id(kind, columns=columns))
            except Exception as exc:  # noqa: BLE001 - what a trial would die of
                failed.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failed and len(set(got)) == 1 and len(got) == 8, failed
        view = json.loads(MlflowClient().get_experiment(got[0]).tags[VIEW_TAG])
        assert view["selectedColumns"][1:] == ["params.`lam`", "metrics.`unlearn/forget_ratio`"]

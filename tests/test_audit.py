"""`genmem audit`: samples from anywhere against data from anywhere. Image folders as real exports
come (nested, mixed sizes, grey or RGB, broken files), the same samples in three formats, and
digits written as PNG files whose memorised fraction is known: copies, unseen digits, a mix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image


def _png_folder(folder: Path, v: np.ndarray, depth: int = 3) -> Path:
    """uint8 images (n, H, W) or (n, H, W, 3) as PNG files spread over ``depth`` nested subfolders."""
    for i, img in enumerate(v):
        sub = folder.joinpath(*[f"part{(i >> k) % 2}" for k in range(depth)])
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(sub / f"img{i:05d}.png")
    return folder


def _as_read(v: np.ndarray) -> np.ndarray:
    """What the image reader makes of uint8 grey images (n, H, W): (n, 1, H, W) in [-1, 1], bit for bit."""
    return ((v.astype(np.float32) / 255.0) * 2.0 - 1.0)[:, None]


def test_an_image_folder_reads_nested_files_in_path_order_with_their_paths(tmp_path):
    from genmem.data.images import read_image_files

    rng = np.random.default_rng(0)
    v = rng.integers(0, 256, (12, 5, 7), dtype=np.uint8)
    folder = _png_folder(tmp_path / "export", v)
    (folder / "part0" / "readme.txt").write_text("not an image")
    ds = read_image_files(folder)
    assert ds.shape == (1, 5, 7) and len(ds) == 12
    order = np.argsort([str(p) for p in ds.meta["path"]])
    assert (order == np.arange(12)).all()  # rows in sorted path order
    rows = [int(Path(p).stem.removeprefix("img")) for p in ds.meta["path"]]
    assert torch.equal(ds.x, torch.from_numpy(_as_read(v)[rows]))


def test_mixed_sizes_resize_to_one_and_grey_or_colour_is_decided_by_the_files(tmp_path):
    from genmem.data.errors import DataError
    from genmem.data.images import read_image_files

    rng = np.random.default_rng(1)
    grey = tmp_path / "grey"
    grey.mkdir()
    for i, side in enumerate((8, 16, 12)):
        Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(grey / f"{i}.png")
    with pytest.raises(DataError, match="differ in size"):
        read_image_files(grey)
    ds = read_image_files(grey, size=(8, 8))
    assert ds.shape == (1, 8, 8)
    assert torch.equal(ds.x[0], torch.from_numpy(_as_read(np.asarray(Image.open(grey / "0.png"))[None])[0]))  # 8x8 kept as is
    big = np.asarray(Image.open(grey / "1.png").resize((8, 8), Image.Resampling.BICUBIC))
    assert torch.equal(ds.x[1], torch.from_numpy(_as_read(big[None])[0]))  # 16x16 resized by Pillow's bicubic

    colour = tmp_path / "colour"
    colour.mkdir()
    i, j, c = np.meshgrid(np.arange(6), np.arange(6), np.arange(3), indexing="ij")
    rgb = (20 * i + 10 * j + 30 * c).astype(np.uint8)  # smooth, so a JPEG keeps it closely
    Image.fromarray(rgb).save(colour / "a.png")
    Image.fromarray(rgb).save(colour / "b.jpg", quality=95)
    Image.fromarray(rgb[..., 0]).save(colour / "c.PNG")  # a grey file among colour ones
    ds = read_image_files(colour)
    assert ds.shape == (3, 6, 6)
    assert torch.equal(ds.x[2, 0], ds.x[2, 1]) and torch.equal(ds.x[2, 0], ds.x[2, 2])
    assert torch.equal(ds.x[0], torch.from_numpy(rgb.astype(np.float32) / 255.0 * 2.0 - 1.0).permute(2, 0, 1))
    assert (ds.x[1] - ds.x[0]).abs().mean() < 0.05  # the JPEG is the same picture, lossily
    assert read_image_files(colour, mode="L").shape == (1, 6, 6)

    greyish = tmp_path / "greyish"  # grey pictures saved as RGB, as many exporters do: auto keeps one channel
    greyish.mkdir()
    Image.fromarray(np.repeat(rgb[..., :1], 3, axis=2)).save(greyish / "g.png")
    assert read_image_files(greyish).shape == (1, 6, 6) and read_image_files(greyish, mode="RGB").shape == (3, 6, 6)


def test_channel_last_arrays_and_lone_npz_arrays_read_as_images(tmp_path):
    from genmem.data.inputs import read_input

    x = np.random.default_rng(2).integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", x)  # saved as arr_0, channels last (guided-diffusion's export)
    ds = read_input(str(tmp_path / "samples.npz"), role="samples")
    assert ds.shape == (3, 8, 8) and torch.equal(ds.x, torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2))


def test_a_value_range_is_read_from_the_bulk_and_rescaling_maps_each_to_the_same_values():
    from genmem.data import ArrayDataset
    from genmem.data.inputs import align, value_range

    v = torch.randint(0, 256, (400, 1, 4, 4), generator=torch.Generator().manual_seed(0)).float()
    unit = v / 255.0
    signed = unit * 2 - 1
    overshoot = signed.clone()
    overshoot.view(-1)[:3] = torch.tensor([-1.6, 1.7, 1.4])  # a generator's few wild values do not decide
    assert [value_range(t, "x") for t in (v, unit, signed, overshoot)] == ["[0, 255]", "[0, 1]", "[-1, 1]", "[-1, 1]"]
    sets = {name: ArrayDataset.from_tensors(t, source="t") for name, t in (("samples", v), ("training set", unit), ("held-out set", signed))}
    out = align(sets, rescale=True)
    for ds in out.values():
        assert torch.allclose(ds.x, signed, atol=1e-6)


@pytest.fixture(scope="module")
def digits_exports(tmp_path_factory):
    """Digits on the 8-bit grid: 300 training copies, 200 unseen held-out digits, a 30% mix of 200
    (60 copies), and the other 159 held-out digits as the audit's held-out set."""
    from genmem.config import DataConfig
    from genmem.data import load_dataset

    root = tmp_path_factory.mktemp("audit")
    train, heldout = load_dataset(DataConfig(source="digits"))
    to_bytes = lambda x: np.round((x[:, 0].numpy() + 1) * 127.5).astype(np.uint8)  # noqa: E731
    copies, unseen = to_bytes(train.x[:300]), to_bytes(heldout.x[:200])
    mix = np.concatenate([copies[:60], unseen[:140]])
    np.save(root / "heldout.npy", heldout.x[200:].numpy())
    sets = {"copies": copies, "unseen": unseen, "mix": mix}
    folders = {name: str(_png_folder(root / name, v)) for name, v in sets.items()}
    return root, train, heldout.take(torch.arange(200, len(heldout))), sets, folders


def _audit(cfg_tree):
    from genmem.config import validate
    from genmem.jobs.audit import AuditConfig, run
    from genmem.jobs.base import Context

    return run(validate(AuditConfig, cfg_tree), Context())


def test_digits_as_png_copies_unseen_and_a_mix_read_1_0_to_0_02_and_0_30_as_evaluate_does(digits_exports, tracking, storage):
    """Each audit against the digits training split (named ``digits``) and a held-out array; the
    mix's every number equal to evaluate's library call on the same arrays; the run, figures and
    provenance in MLflow."""
    from mlflow import MlflowClient

    from genmem.config import MetricsConfig
    from genmem.data import ArrayDataset
    from genmem.evaluation import evaluate_samples
    from genmem.jobs.audit import report_points
    from genmem.jobs.audit import table as audit_table
    from genmem.tracking import finished_runs

    root, train, heldout, sets, folders = digits_exports
    memorised, ct = {}, {}
    for name, v in sets.items():
        result = _audit({"samples": folders[name], "train": "digits", "heldout": str(root / "heldout.npy")})
        memorised[name], ct[name] = result["memorised_fraction"], result.get("ct")
        if name != "mix":
            continue
        # evaluate's library call on the same arrays, rows in the folder's (path) order
        reference = evaluate_samples(ArrayDataset.from_tensors(_as_read(v)[_path_order(len(v))], source="t"), train, heldout,
                                     MetricsConfig(), cache_dir=storage / "features")
        for key, value in reference.metrics.items():
            assert result[key.removeprefix("eval/")] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert memorised["copies"] == 1.0 and memorised["unseen"] <= 0.02, memorised  # measured 1.0, 0.0, 0.30
    assert memorised["mix"] == pytest.approx(0.30, abs=0.03), memorised
    # C_T with held-out data as its reference: copies far below 0, unseen digits near it, as the null control reads
    assert ct["copies"] < -5 and abs(ct["unseen"]) < 2.5 and ct["mix"] < ct["unseen"], ct
    # the null's halves (79 and 80 rows) fill no cell past C_T's 20 samples: its global Z_U is the reference
    assert "null/ct" not in result and abs(result["null/zu"]) < 2.5 and result["null/authpct"] > 30
    assert result["memorised_fraction_lo"] <= memorised["mix"] <= result["memorised_fraction_hi"]

    client = MlflowClient(tracking)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["eval/memorised_fraction"] == memorised["mix"]
    assert run.data.tags["heldout"].endswith("heldout.npy") and "heldout_contrast" not in run.data.tags
    assert run.data.tags["mlflow.note.content"].startswith(f"memorised {100 * memorised['mix']:.1f}% [")
    assert {"memorised_pairs.png", "most_memorised.json", "copy_tests.parquet"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    per_sample = pq.read_table(client.download_artifacts(run.info.run_id, "copy_tests.parquet", str(storage))).to_pydict()
    assert len(per_sample["path"]) == len(sets["mix"]) and all(p.endswith(".png") for p in per_sample["path"])
    assert 100 * np.mean(per_sample["authentic"]) == pytest.approx(run.data.metrics["eval/authpct"])
    assert "null control" in audit_table(result) and "C_T" in audit_table(result)
    worst = result["most_memorised"][0]  # a copy, traced to its file and its training row
    assert worst["d1"] < 8 / 255 and worst["path"].endswith(".png")  # 8-bit rounding: at most 1/255 on each of 64 pixels
    copied = int(Path(worst["path"]).stem.removeprefix("img"))
    assert copied < 60 and worst["train_index"] == int(train.index[copied])
    views = {v.run_id: v for v in finished_runs(experiments=["audit"], uri=tracking)}
    (point,) = report_points(views[run.info.run_id])  # `genmem report` charts audits too
    assert point.memorised_fraction == memorised["mix"] and point.method == "audit" and point.setting == "mix"


def _path_order(n: int) -> np.ndarray:
    """Row k of a folder written by :func:`_png_folder` is image ``_path_order(n)[k]``."""
    paths = [str(Path(*[f"part{(i >> k) % 2}" for k in range(3)], f"img{i:05d}.png")) for i in range(n)]
    return np.argsort(paths, kind="stable")


def test_the_same_samples_as_parquet_npy_and_png_give_the_same_numbers(digits_exports, tracking, storage):
    """No held-out set here: the audit says there is no contrast instead of inventing one."""
    from genmem.data import write_shards

    root, train, _, sets, folders = digits_exports
    x = _as_read(sets["mix"])[_path_order(len(sets["mix"]))]
    np.save(root / "mix.npy", x)
    write_shards(root / "mix-parquet", torch.from_numpy(x), source="export", split="samples")
    results = [_audit({"samples": s, "train": "digits", "features": ["pixels"]})
               for s in (folders["mix"], str(root / "mix.npy"), str(root / "mix-parquet"))]
    numbers = [{k: v for k, v in r.items() if isinstance(v, float)} for r in results]
    assert numbers[0] == numbers[1] == numbers[2] and numbers[0]["memorised_fraction"] == pytest.approx(0.3, abs=0.03)
    assert all(r["heldout"] == 0 and r["heldout_contrast"].startswith("no held-out set") for r in results)
    assert "heldout_memorised_fraction" not in results[0]


def test_a_large_folder_decodes_on_ray_tasks_into_the_same_dataset(digits_exports, ray_local):
    from genmem.data.inputs import read_input
    from genmem.distributed.images import decoder

    _, _, _, _, folders = digits_exports
    local = read_input(folders["copies"], role="samples")
    on_ray = read_input(folders["copies"], role="samples", decode=decoder(files_per_task=70))  # 5 tasks
    assert torch.equal(local.x, on_ray.x) and list(local.meta["path"]) == list(on_ray.meta["path"])


def test_a_known_name_or_a_data_config_gives_its_genmem_split(tmp_path, storage):
    from genmem.config import DataConfig
    from genmem.data import load_dataset
    from genmem.data.inputs import read_input

    config = tmp_path / "train.yaml"  # a training config: its data config sits under data:
    config.write_text("data:\n  source: digits\n  heldout_fraction: 0.5\n  train_size: 100\nimages: 1000\n")
    train, heldout = load_dataset(DataConfig(source="digits", heldout_fraction=0.5, train_size=100))
    assert torch.equal(read_input(str(config), role="train").x, train.x)
    assert torch.equal(read_input(str(config), role="heldout").x, heldout.x) and len(heldout) == 898
    assert torch.equal(read_input("digits", role="heldout").x, load_dataset(DataConfig(source="digits"))[1].x)

"""Diffusion samples as cleanly as flow matching on the quickstart's setting: its MLP on 32
digits at its budget (60,000 images), trained in process with the same seed as flow matching,
sampled with the default sampler (v-prediction, Heun 32 steps on the EDM grid, the denoised
estimate clipped to the data range). The digits U-Net's twin of this check (95 s on 2 cores,
too much for the suite's budget) is ``bench/diffusion_quality.py --model unet --n 1000``, which
checks the same bounds (U-Net: factor 2.5) and prints the whole sampler table (measured: MLP FD
3.0x flow's, U-Net 1.6x, both with no value beyond 1.5; the old eps sampler: 66-88% of values
beyond 1.5 and FD 100x)."""

from __future__ import annotations

import pytest
import torch

from genmem.checkpoint import load_checkpoint
from genmem.config import DataConfig, TrainConfig
from genmem.data import load_dataset
from genmem.generative import build_process, generate
from genmem.metrics.features import get_extractor, reference_stats
from genmem.metrics.frechet import frechet_distance, gaussian_stats
from genmem.metrics.outliers import out_of_range_fraction
from genmem.training import LocalReporter, train_loop

pytestmark = pytest.mark.slow

SETTINGS = {
    "mlp": ({"data": {"source": "digits", "train_size": 32}, "model": {"kind": "mlp", "hidden": 256, "depth": 3},
             "optim": {"lr": 0.002, "warmup_images": 5000}, "batch_size": 32, "ema_halflife_images": 5000}, 4.0),
}


def _fd_and_outliers(tmp_path, base: dict, process: dict, extractor, real) -> tuple[float, float]:
    cfg = TrainConfig.model_validate({**base, "process": process, "images": 60_000, "log_every_images": 60_000, "seed": 0})
    train, _ = load_dataset(cfg.data)
    out = tmp_path / process["kind"]
    result = train_loop(cfg, train, LocalReporter(out, cfg.images, quiet=True))
    ckpt = load_checkpoint(result.checkpoint)
    x = generate(ckpt.model, build_process(ckpt.config.process), ckpt.config.sampler, ckpt.shape, range(500), seed=1)
    return frechet_distance(gaussian_stats(extractor(x.clamp(-3, 3))), real), out_of_range_fraction(x, -1.0, 1.0)


@pytest.mark.parametrize("model", sorted(SETTINGS))
def test_default_diffusion_sampler_is_clean_and_near_flow_matching(model, tmp_path, storage):
    torch.set_num_threads(2)
    base, factor = SETTINGS[model]
    digits, _ = load_dataset(DataConfig(source="digits"))
    extractor = get_extractor("classifier", train=digits, cache_dir=tmp_path / "features")
    real = reference_stats(extractor, digits.x, cache_dir=None, key="digits")
    fd_flow, _ = _fd_and_outliers(tmp_path, base, {"kind": "flow"}, extractor, real)
    fd_diffusion, beyond = _fd_and_outliers(tmp_path, base, {"kind": "diffusion"}, extractor, real)
    assert beyond <= 0.001, f"{100 * beyond:.2f}% of values beyond 1.5"
    assert fd_diffusion <= factor * fd_flow, (fd_diffusion, fd_flow)

"""CUDA paths (skipped without a GPU): seeded sampling on the device, bf16 training through the
Accelerate engine, exact nearest neighbours on the device."""

from __future__ import annotations

import pytest
import torch

from genmem.config import SamplerConfig, TrainConfig
from genmem.data import load_dataset
from genmem.generative import FlowMatching, generate
from genmem.metrics import knn
from genmem.models import MLP
from genmem.training import LocalReporter, train_loop

pytestmark = pytest.mark.gpu


def test_sampling_on_cuda_matches_cpu_and_ignores_batch_size():
    torch.manual_seed(0)
    net = MLP((3,), hidden=32, depth=2)
    cfg = SamplerConfig(method="heun", steps=8)
    cpu = generate(net, FlowMatching(), cfg, (3,), range(50), seed=2, batch_size=50)
    a = generate(net.cuda(), FlowMatching(), cfg, (3,), range(50), seed=2, batch_size=7, device="cuda")
    b = generate(net, FlowMatching(), cfg, (3,), range(50), seed=2, batch_size=50, device="cuda")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(a, cpu, rtol=0, atol=1e-4)  # the noise is drawn on the CPU per sample


def test_bf16_training_through_accelerate_learns(tmp_path, monkeypatch):
    from genmem.distributed.engine import AccelerateEngine

    monkeypatch.setenv("GENMEM_STORAGE", str(tmp_path / "store"))
    cfg = TrainConfig.model_validate(dict(
        data=dict(source="moons", n=4000), model=dict(hidden=128, depth=3), batch_size=256, images=256 * 400,
        log_every_images=256 * 50, ema_halflife_images=20_000, scaling=dict(mixed_precision="bf16"),
    ))
    train, _ = load_dataset(cfg.data)
    engine = AccelerateEngine("bf16")
    assert engine.device.type == "cuda"
    result = train_loop(cfg, train, LocalReporter(tmp_path / "run", cfg.images, quiet=True), engine=engine)
    assert result.images_seen == 256 * 400 and result.loss < 1.9  # the untrained loss on moons is about 2.3


def test_knn_on_cuda_equals_cpu():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3000, 64, generator=g)
    q = torch.cat([ref[:10], torch.randn(200, 64, generator=g)])
    d_cpu, i_cpu = knn(q, ref, 2)
    d_gpu, i_gpu = knn(q.cuda(), ref.cuda(), 2)
    assert torch.equal(i_cpu, i_gpu.cpu())
    torch.testing.assert_close(d_cpu, d_gpu.cpu().to(d_cpu.dtype))
    assert (d_gpu[:10, 0] == 0).all()

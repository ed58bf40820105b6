#!/usr/bin/env bash
# The GPU checks in one run, for the day a GPU is lent (sized for under 8 minutes on one GPU): the
# GPU tests; bf16 against fp32 training throughput on the digits U-Net; exact 2-NN of 50,000 x
# 50,000 rows at d = 3,072 on the device, checked against float64 on the CPU; one Riemannian
# weight sample of a digits U-Net on the device. One line per figure.
#
#     bash bench/gpu_check.sh          # on a machine with a CUDA device; says so and stops without one
#     bash bench/gpu_check.sh --cpu    # the same steps at toy sizes on the CPU: a check of this script
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
if [ "$MODE" = gpu ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: skipped: no CUDA device on this machine (bash bench/gpu_check.sh --cpu checks the script at toy sizes)"
    exit 0
fi
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
export GENMEM_STORAGE="$SCRATCH/store" MLFLOW_TRACKING_URI="sqlite:///$SCRATCH/mlflow.db" PYTHONPATH="$PWD/platform"
status=0
start=$SECONDS

if [ "$MODE" = gpu ]; then
    tests=$("$PY" -m pytest tests/test_gpu.py -q -p no:cacheprovider 2>&1 | grep -E "passed|failed|error" | tail -1) || status=1
    echo "GPU tests (tests/test_gpu.py): ${tests:-no result}"
fi

"$PY" - "$MODE" <<'EOF' || status=1
import sys, tempfile, time
from pathlib import Path

import torch

from genmem.config import TrainConfig
from genmem.data import load_dataset
from genmem.training import Engine, LocalReporter, train_loop

gpu = sys.argv[1] == "gpu"
device = "cuda" if gpu else "cpu"
sync = torch.cuda.synchronize if gpu else (lambda: None)
failed = False
where = torch.cuda.get_device_name() if gpu else "CPU (toy sizes)"

# bf16 against fp32 training throughput, digits U-Net, interleaved; the second pass of each is reported.
from genmem.distributed.engine import AccelerateEngine

images, batch, channels = (200_000, 512, 64) if gpu else (1_024, 64, 8)
speed, loss = {}, {}
try:
    for precision in ("no", "bf16", "no", "bf16"):
        cfg = TrainConfig.model_validate(dict(
            data=dict(source="digits"), model=dict(kind="unet", channels=channels), batch_size=batch, images=images,
            ema_halflife_images=images // 10, grid_size=16, log_every_images=10**9, scaling=dict(mixed_precision=precision)))
        engine = AccelerateEngine(precision) if precision == "bf16" else Engine(device)
        result = train_loop(cfg, load_dataset(cfg.data)[0], LocalReporter(Path(tempfile.mkdtemp()), cfg.images, quiet=True), engine=engine)
        speed[precision], loss[precision] = result.images_per_s, result.loss
    print(f"training, digits U-Net ({channels} channels, batch {batch}, {images:,} images) on {where}: bf16 {speed['bf16']:,.0f} images/s, "
          f"fp32 {speed['no']:,.0f} images/s, ratio {speed['bf16'] / speed['no']:.2f}x; final loss bf16 {loss['bf16']:.4f}, fp32 {loss['no']:.4f}")
except Exception as exc:
    failed = True
    print(f"training, digits U-Net: FAILED ({type(exc).__name__}: {exc})")

# Exact 2-NN on the device, its first 200 queries checked against float64 brute force on the CPU.
from genmem.metrics import knn

m, d = (50_000, 3_072) if gpu else (2_000, 64)
try:
    g = torch.Generator().manual_seed(0)
    queries, reference = torch.randn(m, d, generator=g), torch.randn(m, d, generator=g)
    q, r = queries.to(device), reference.to(device)
    knn(q[:1000], r[:1000], 2)  # warm-up: kernels, allocator
    sync()
    t = time.perf_counter()
    dist, idx = knn(q, r, 2)
    sync()
    seconds = time.perf_counter() - t
    exact = torch.cdist(queries[:200].double(), reference.double()).topk(2, largest=False)
    same = bool((idx[:200].cpu() == exact.indices).all()) and torch.allclose(dist[:200].cpu(), exact.values, rtol=0, atol=1e-9)
    failed |= not same
    print(f"exact 2-NN, {m:,} x {m:,} rows at d = {d:,} on {where}: {seconds:.2f} s; first 200 queries "
          + ("match float64 brute force on the CPU" if same else "DIFFER from float64 brute force on the CPU"))
except Exception as exc:
    failed = True
    print(f"exact 2-NN on {where}: FAILED ({type(exc).__name__}: {exc})")

# One Riemannian weight sample of a digits U-Net (the posterior job's default subset), on the device.
from genmem.checkpoint import load_checkpoint
from genmem.generative import build_process
from genmem.posterior import LaplacePosterior

points, passes, channels = (128, 400, 32) if gpu else (16, 20, 8)
try:
    cfg = TrainConfig.model_validate(dict(
        data=dict(source="digits", train_size=points), model=dict(kind="unet", channels=channels), batch_size=min(points, 128),
        images=points * passes, ema_halflife_images=points * passes // 10, grid_size=16, log_every_images=10**9))
    out = Path(tempfile.mkdtemp())
    trained = train_loop(cfg, load_dataset(cfg.data)[0], LocalReporter(out, cfg.images, quiet=True), engine=Engine(device))
    ck = load_checkpoint(trained.checkpoint, map_location=device)
    train = load_dataset(ck.config.data)[0]
    la = LaplacePosterior(ck.model.to(device), build_process(ck.config.process), train.x.to(device)).fit()
    sync()
    sample = la.sample_one(0, method="riemannian", scale=1e-2)
    sync()
    print(f"Riemannian weight sample, digits U-Net ({channels} channels, {points} points, {la.theta_star.numel():,} weights) on {where}: "
          f"{sample.seconds:.1f} s, {sample.n_grad} gradients + {sample.n_hvp} HVPs, loss +{sample.loss_increase:.3g}")
except Exception as exc:
    failed = True
    print(f"Riemannian weight sample, digits U-Net on {where}: FAILED ({type(exc).__name__}: {str(exc)[:300]})")
sys.exit(1 if failed else 0)
EOF
echo "gpu_check: $((SECONDS - start)) s in all, $([ $status = 0 ] && echo 'every check passed' || echo 'a check FAILED')"
exit $status

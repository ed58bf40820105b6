"""Training-loop throughput on one GPU: bf16 autocast through the Accelerate engine against fp32,
same model, data and batch, in the same run; prints images/s and the ratio. Needs CUDA.

    python bench/train_precision.py [--images 400000] [--batch 512] [--channels 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=400_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--channels", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/train_precision.py: skipped, it needs a CUDA device")
        return
    os.environ.setdefault("GENMEM_STORAGE", tempfile.mkdtemp(prefix="genmem-bench-"))

    from genmem.config import TrainConfig
    from genmem.data import load_dataset
    from genmem.distributed.engine import AccelerateEngine
    from genmem.training import Engine, LocalReporter, train_loop

    results = {}
    for precision in ("no", "bf16", "no", "bf16"):  # interleaved: the second pass is the one reported
        cfg = TrainConfig.model_validate(dict(
            data=dict(source="digits"), model=dict(kind="unet", channels=args.channels),
            batch_size=args.batch, images=args.images, ema_halflife_images=20_000, grid_size=16,
            log_every_images=10**9, scaling=dict(mixed_precision=precision),
        ))
        train, _ = load_dataset(cfg.data)
        engine = AccelerateEngine(precision) if precision == "bf16" else Engine("cuda")
        out = Path(tempfile.mkdtemp())
        result = train_loop(cfg, train, LocalReporter(out, cfg.images, quiet=True), engine=engine)
        results[precision] = result
        print(f"{precision:>4}: {result.images_per_s:10.0f} images/s  final loss {result.loss:.4f}", flush=True)
    print(f"bf16 / fp32 throughput: {results['bf16'].images_per_s / results['no'].images_per_s:.2f}x on {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()

"""Steady-state images/s of the Ray Train + Accelerate loop (1 worker) against a plain PyTorch
loop on the same model, data, batch, clipping and EMA, measured in the same run; prints the start-up
overhead (seconds from the job's start to the first training step) and three ratios:

- against the plain loop run inside a bare Ray Train worker (a TorchTrainer whose function is the
  plain loop): what genmem's loop, its reporting and Accelerate cost (target >= 0.95);
- against the plain loop run as a Ray task on the same cluster: that, plus Ray Train's own runtime
  (its controller and the worker's polling thread: 0.90-0.98 of the Ray task in four runs on 2
  cores, a noisy share);
- against the plain loop with no Ray running: that, plus what Ray's own processes (GCS, raylet,
  agents) take from the machine, which on 2 cores is a visible share.

    .venv/bin/python bench/train_overhead.py [--images 64000] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def plain_loop(cfg, train, threads: int) -> float:
    """The reference: a bare PyTorch loop with the same network, loss, optimizer, clipping, EMA and batch."""
    from genmem.generative import build_process
    from genmem.models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(cfg.model, train.shape)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, fused=True)  # as genmem's loop on CPU and CUDA
    ema_params = [p.detach().clone() for p in model.parameters()]
    beta = 0.5 ** (cfg.batch_size / cfg.ema_halflife_images)
    process = build_process(cfg.process)
    g = torch.Generator().manual_seed(0)
    steps = cfg.images // cfg.batch_size
    warm = max(5, steps // 10)
    for i in range(steps):
        if i == warm:
            t0 = time.perf_counter()
        rows = torch.randint(len(train), (cfg.batch_size,), generator=g)
        x1 = train.x[rows]
        loss = process.loss(model, torch.randn(x1.shape, generator=g), x1, torch.rand(len(x1), generator=g)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        torch._foreach_lerp_(ema_params, list(model.parameters()), 1.0 - beta)  # the EMA the loop keeps too
    return (steps - warm) * cfg.batch_size / (time.perf_counter() - t0)


def plain_in_ray_train(cfg, train, threads: int) -> float:
    """The plain loop as the function of a one-worker TorchTrainer: Ray Train's runtime, no genmem."""
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tempfile.mkdtemp(prefix="genmem-bench-rt-")

    def fn(_config):
        with open(os.path.join(out, "v.json"), "w") as f:
            json.dump(plain_loop(cfg, train, threads), f)

    TorchTrainer(fn, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
                 run_config=RunConfig(storage_path=os.path.join(out, "ray"))).fit()
    with open(os.path.join(out, "v.json")) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="genmem-bench-")
    os.environ.setdefault("GENMEM_STORAGE", os.path.join(work, "store"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
    import ray
    from mlflow import MlflowClient

    from genmem.config import TrainConfig
    from genmem.data import load_dataset
    from genmem.runs.training import train_model

    cfg = TrainConfig.model_validate(dict(
        name="bench", data=dict(source="digits"), model=dict(kind="unet", channels=32),
        batch_size=128, images=args.images, log_every_images=128 * 25, ema_halflife_images=5000,
        grid_size=16, scaling=dict(num_workers=1, cpus_per_worker=args.threads),
    ))
    train, _ = load_dataset(cfg.data)
    before = plain_loop(cfg, train, args.threads)

    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    in_ray = ray.remote(num_cpus=args.threads)(plain_loop)
    task_before = ray.get(in_ray.remote(cfg, train, args.threads))
    bare_train = plain_in_ray_train(cfg, train, args.threads)
    t_submit = time.time()
    result = train_model(cfg)
    task_after = ray.get(in_ray.remote(cfg, train, args.threads))
    ray.shutdown()
    after = plain_loop(cfg, train, args.threads)  # before and after: a shared machine drifts
    ref = (before + after) / 2
    history = MlflowClient().get_metric_history(result["mlflow_run_id"], "train/images_per_s")
    history.sort(key=lambda m: m.step)
    steady = statistics.median(m.value for m in history[1:])  # the first window holds warm-up
    first = history[0]
    startup = first.timestamp / 1000 - first.step / first.value - t_submit

    in_task = (task_before + task_after) / 2
    print(f"plain loop, no Ray running:    {ref:8.1f} images/s (before {before:.1f}, after {after:.1f})")
    print(f"plain loop as a Ray task:      {in_task:8.1f} images/s (before {task_before:.1f}, after {task_after:.1f})")
    print(f"plain loop in bare Ray Train:  {bare_train:8.1f} images/s")
    print(f"genmem train (Ray Train, 1 w): {steady:8.1f} images/s (median of {len(history) - 1} windows)")
    print(f"ratio to bare Ray Train:       {steady / bare_train:8.3f}   (target >= 0.95: genmem's own cost)")
    print(f"ratio to the plain Ray task:   {steady / in_task:8.3f}   (adds Ray Train's runtime)")
    print(f"ratio to plain without Ray:    {steady / ref:8.3f}   (includes Ray's own processes)")
    print(f"start-up, job to 1st step:     {startup:8.1f} s")

if __name__ == "__main__":
    main()

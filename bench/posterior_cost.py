"""Cost of one Riemannian weight sample (METHODS.md §Riemannian Laplace), measured in one run.

For a digits MLP and a digits U-Net trained here (``--train-size`` points, their default subset:
the last block and the output head), prints:

1. trunk cache off/on: seconds per gradient, per gradient+HVP, per weight sample, and the
   sample's cost in gradient-equivalents (right-hand sides × measured grad+HVP seconds / grad
   seconds of the cache-off objective, so cache-on figures show the saving). A cache-off solve of
   the U-Net takes long on 2 cores, so with ``--estimate-off`` its seconds are the cache-on
   solve's plus its right-hand-side count (the same adaptive steps: tests/test_posterior_cache.py)
   times the measured extra seconds per cache-off grad+HVP, and say so;
2. cheaper samples, each against a tight-tolerance reference solve (dopri5, rtol 1e-8 unless
   ``--reference-rtol``): its
   gradient-equivalents and its endpoint error ||θ − θ_ref|| / ||θ_ref − θ*||. Options: dopri5 at
   looser tolerances, bosh3, fixed-step RK4, the second derivative by a forward difference of
   gradients instead of an HVP ("fd"), and the linearised arm (the loss's Gauss–Newton model, no
   data pass per step);
3. with ``--workers 1 2``: seconds per weight sample on Ray Train worker groups of each size
   (a local Ray cluster with as many CPUs as the largest group).

    .venv/bin/python bench/posterior_cost.py                       # MLP and U-Net, 32 points
    .venv/bin/python bench/posterior_cost.py --models unet --train-size 128 --estimate-off
    .venv/bin/python bench/posterior_cost.py --models mlp --workers 1 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from genmem.checkpoint import load_checkpoint
from genmem.config import TrainConfig
from genmem.data import load_dataset
from genmem.generative import build_process
from genmem.posterior import LaplacePosterior
from genmem.training import LocalReporter, train_loop

BASES = {"mlp": "configs/quickstart.yaml", "unet": "configs/digits_diffusion.yaml"}


def train_base(kind: str, train_size: int, passes: int, out: Path) -> str:
    cfg = yaml.safe_load(Path(BASES[kind]).read_text())
    for key in ("scaling", "eval_every_images", "eval_n"):  # one local process, no probes
        cfg.pop(key, None)
    images = train_size * passes
    cfg.update(images=images, log_every_images=images, grid_every_images=images, checkpoint_every_images=images,
               ema_halflife_images=min(cfg.get("ema_halflife_images", 0) or 0, images // 10))
    cfg["data"] = {**cfg.get("data", {}), "source": "digits", "train_size": train_size}
    cfg.setdefault("optim", {})["warmup_images"] = min(cfg["optim"].get("warmup_images", 0), images // 10)
    cfg = TrainConfig.model_validate(cfg)
    return str(train_loop(cfg, load_dataset(cfg.data)[0], LocalReporter(out / kind, cfg.images, quiet=True)).checkpoint)


def median_seconds(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def posterior(checkpoint: str, cache: bool) -> LaplacePosterior:
    ck = load_checkpoint(checkpoint)
    train = load_dataset(ck.config.data)[0]
    return LaplacePosterior(ck.model, build_process(ck.config.process), train.x, trunk_cache=cache).fit()


def unit_costs(la: LaplacePosterior) -> tuple[float, float]:
    obj, theta = la.objective, la.theta_star
    v = torch.randn_like(theta)
    return median_seconds(lambda: obj.grad(theta)), median_seconds(lambda: obj.grad_and_hvp(theta, v))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mlp", "unet"], choices=sorted(BASES))
    p.add_argument("--train-size", type=int, default=32)
    p.add_argument("--passes", type=int, default=400, help="training passes over the train-size points")
    p.add_argument("--scale", type=float, default=1e-2, help="posterior temperature tau of the weight sample")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--reference-rtol", type=float, default=1e-8, help="tolerance of the reference solve (atol = rtol / 100)")
    p.add_argument("--estimate-off", action="store_true", help="estimate the cache-off solve from its per-step cost")
    p.add_argument("--no-options", action="store_true", help="skip the cheaper-sample options")
    p.add_argument("--arms", nargs="*", default=None, help="only the options whose name starts with one of these (e.g. bosh3 linearised)")
    p.add_argument("--workers", type=int, nargs="*", default=[], help="worker-group sizes to time (e.g. 1 2)")
    args = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="genmem-bench-posterior-"))
    print(f"torch threads = {torch.get_num_threads()}, train_size = {args.train_size}, tau = {args.scale}, seed = {args.seed}")
    for kind in args.models:
        t = time.perf_counter()
        checkpoint = train_base(kind, args.train_size, args.passes, out)
        print(f"\n== {kind}: base trained in {time.perf_counter() - t:.0f} s ({checkpoint})")
        on = posterior(checkpoint, True)
        off = posterior(checkpoint, False)
        print(f"subset {on.subset[0]} ... {on.subset[-1]}: {on.objective.num_params} weights; trunk split at {on.objective.split}")
        g_off, gh_off = unit_costs(off)
        g_on, gh_on = unit_costs(on)
        ref = on.sample_one(args.seed, method="riemannian", scale=args.scale)
        rhs = ref.n_grad
        print(f"{'trunk cache':<12}{'s/grad':>9}{'s/grad+HVP':>12}{'rhs':>6}{'grad-equiv':>12}{'s/sample':>10}")
        if args.estimate_off:
            off_seconds, note = ref.seconds + rhs * (gh_off - gh_on), " (estimated: cache-on s/sample + rhs x extra s/grad+HVP)"
        else:
            solved = off.sample_one(args.seed, method="riemannian", scale=args.scale)
            off_seconds, note = solved.seconds, ""
            assert solved.n_grad == rhs, "the cache changed the solver's steps"
        print(f"{'off':<12}{g_off:>9.4f}{gh_off:>12.4f}{rhs:>6}{rhs * gh_off / g_off:>12.0f}{off_seconds:>10.1f}{note}")
        print(f"{'on':<12}{g_on:>9.4f}{gh_on:>12.4f}{rhs:>6}{rhs * gh_on / g_off:>12.0f}{ref.seconds:>10.1f}")
        print(f"speed-up per weight sample: {off_seconds / ref.seconds:.1f}x; grad+HVP = {gh_on / g_on:.1f} cached gradients")

        if not args.no_options:
            options(on, args, g_off)
        if args.workers:
            workers(checkpoint, args)


def options(la: LaplacePosterior, args, g_unit: float) -> None:
    """Each cheaper-sample option against the tight reference; gradient-equivalents in cache-off gradients."""
    t = time.perf_counter()
    rtol = args.reference_rtol
    reference = la.sample_one(args.seed, method="riemannian", scale=args.scale, rtol=rtol, atol=rtol / 100, max_evals=20000)
    print(f"reference: dopri5 rtol {rtol:g}, {reference.n_grad} rhs in {time.perf_counter() - t:.0f} s; "
          f"loss increase {reference.loss_increase:.4g}")
    step = (reference.theta - la.theta_star).norm()
    arms = [("dopri5 rtol 1e-4 (default)", "riemannian", {}), ("dopri5 rtol 1e-3", "riemannian", {"rtol": 1e-3, "atol": 1e-5}),
            ("dopri5 rtol 1e-2", "riemannian", {"rtol": 1e-2, "atol": 1e-4}), ("bosh3 rtol 1e-4", "riemannian", {"solver": "bosh3"}),
            ("bosh3 rtol 1e-3", "riemannian", {"solver": "bosh3", "rtol": 1e-3, "atol": 1e-5}),
            ("dopri5 rtol 1e-4, fd", "riemannian", {"second_derivative": "fd"}),
            ("bosh3 rtol 1e-4, fd", "riemannian", {"solver": "bosh3", "second_derivative": "fd"}),
            ("bosh3 rtol 1e-3, fd", "riemannian", {"solver": "bosh3", "rtol": 1e-3, "atol": 1e-5, "second_derivative": "fd"}),
            ("rk4 8 steps", "riemannian", {"solver": "rk4", "steps": 8}), ("rk4 4 steps", "riemannian", {"solver": "rk4", "steps": 4}),
            ("rk4 2 steps", "riemannian", {"solver": "rk4", "steps": 2}),
            ("linearised (GN model)", "linearised", {}), ("euclidean", "euclidean", {})]
    if args.arms:
        arms = [a for a in arms if a[0].startswith(tuple(args.arms))]
    v = torch.randn_like(la.theta_star)
    g_sec = median_seconds(lambda: la.objective.grad(la.theta_star))
    gh = median_seconds(lambda: la.objective.grad_and_hvp(la.theta_star, v))
    print(f"{'option':<28}{'rhs':>6}{'grad-equiv':>12}{'s/sample':>10}{'endpoint err':>14}{'loss +':>10}")
    for name, method, kw in arms:
        try:
            s = la.sample_one(args.seed, method=method, scale=args.scale, **kw)
        except Exception as err:  # a solver that fails is a result too
            print(f"{name:<28} failed: {str(err)[:80]}")
            continue
        err = float((s.theta - reference.theta).norm() / step)
        rhs = s.n_hvp or s.n_grad // 2  # fd: two gradients per right-hand side, no HVP
        cost = (s.n_hvp * gh + (s.n_grad - s.n_hvp) * g_sec) / g_unit  # each pass at its measured price
        print(f"{name:<28}{rhs:>6}{cost:>12.0f}{s.seconds:>10.1f}{err:>14.2e}{s.loss_increase:>10.4g}")


def workers(checkpoint: str, args) -> None:
    import ray

    from genmem.config import ScalingConfig
    from genmem.distributed.posterior import posterior_on_workers

    ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
    try:
        request = [{"seed": args.seed, "method": "riemannian", "scale": args.scale}]
        for n in args.workers:
            t = time.perf_counter()
            res = posterior_on_workers(checkpoint, samples=request, scaling=ScalingConfig(num_workers=n, cpus_per_worker=1.0))
            s = res["samples"][0]
            print(f"{n} worker(s): {s['n_grad']} rhs, {s['seconds']:.1f} s per weight sample, {time.perf_counter() - t:.0f} s with the group's start")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

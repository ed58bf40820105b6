"""How much a sweep's writers each MLflow store holds: N concurrent writers (Tune trials × Ray
Train ranks, each a process with its own run) log one metric per step, params, tags every 25
steps and a PNG every ``--image-every`` steps, against

  (a) ``sqlite``: the embedded store, a sqlite file every writer opens itself (genmem's default);
  (b) ``server-sqlite``: ``mlflow server`` over a sqlite file (``genmem tracking up --backend sqlite``);
  (c) ``server-postgres``: ``mlflow server`` over PostgreSQL (``genmem tracking up``), with the
      server restarted once a third of the way through and the database once two thirds through.

Each writer is genmem's :class:`~genmem.tracking.Tracker` (synchronous writes, MLflow's own
retries), and a write that still raises is counted and skipped, as a trial's step would be. Per
store and N: values sent (one per step), steps stored (read back; each should be there exactly
once), duplicates, failed writes (metrics, images, tags), trials failed (a writer that could not
start its run or crashed), p50/p99 of a metric write's latency, and values stored per second.
The reference is (a) at the smallest N, measured in the same run. Exits 1 where a stack lost or
duplicated a value, or failed a trial, at any N.

    .venv/bin/python bench/tracking_load.py [--writers 2 8 32] [--steps 300] [--stores sqlite server-sqlite server-postgres]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

KIND = "load-bench"


def writer(uri: str, index: int, steps: int, image_every: int, step_seconds: float, barrier, done, out: str) -> None:
    """One trial's rank 0: its run, then a metric per step, a tag every 25 steps, an image every
    ``image_every``; every write timed, a failed one counted and skipped."""
    import numpy as np

    from genmem.tracking import Tracker

    result = {"index": index, "run_id": None, "failed": 0, "failed_images": 0, "failed_tags": 0, "latencies": [], "error": None}
    try:
        try:
            tracker = Tracker.start(KIND, f"writer-{index}", params={f"p{i}": i for i in range(20)}, tags={"writer": str(index)},
                                    uri=uri)
            result["run_id"] = tracker.run_id
        finally:
            barrier.wait(timeout=600)  # every writer starts its steps together
        picture = np.random.default_rng(index).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        for step in range(steps):
            t0 = time.perf_counter()
            try:
                tracker.metrics({"loss": 1.0 / (step + 1) + index}, step=step)
            except Exception:
                result["failed"] += 1
            result["latencies"].append(time.perf_counter() - t0)
            if step % 25 == 0:
                try:
                    tracker.tags({"progress": f"{step}/{steps}"})
                except Exception:
                    result["failed_tags"] += 1
            if image_every and step % image_every == 0:
                try:
                    tracker.image("sample", picture, step=step)
                except Exception:
                    result["failed_images"] += 1
            with done.get_lock():
                done.value += 1
            time.sleep(step_seconds)
        tracker.finish()
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:300]
    Path(out).write_text(json.dumps(result))


def _restart(stack, done, total: int, log: list) -> None:
    """Restart the MLflow server once the writers have done a third of their steps, the database
    once they have done two thirds."""
    from genmem import services

    while done.value < total / 3:
        time.sleep(0.05)
    t0 = time.monotonic()
    services.stop_mlflow(stack)
    services.start_mlflow(stack)
    log.append(("mlflow server", time.monotonic() - t0))
    while done.value < 2 * total / 3:
        time.sleep(0.05)
    t0 = time.monotonic()
    services.stop_postgres(stack)
    services.start_postgres(stack)
    log.append(("postgresql", time.monotonic() - t0))


def _open_store(store: str, root: Path):
    """The tracking URI of a fresh store of kind ``store`` in ``root`` (and its stack, if any)."""
    from genmem import services
    from genmem.tracking import experiment_id

    if store == "sqlite":
        uri = f"sqlite:///{root / 'mlflow.db'}"
        experiment_id(KIND, uri)  # the tables and the experiment exist before the writers start, as a sweep's parent run makes them
        return uri, None
    stack = services.Stack(root=str(root / "stack"), port=services.free_port(), workers=4,
                           backend="sqlite" if store == "server-sqlite" else "postgres")
    services.up(stack)
    experiment_id(KIND, stack.uri)
    return stack.uri, stack


def measure(store: str, n: int, steps: int, image_every: int, step_seconds: float) -> dict:
    from mlflow import MlflowClient

    from genmem import services

    with tempfile.TemporaryDirectory(prefix=f"load-{store}-{n}-") as tmp:
        root = Path(tmp)
        uri, stack = _open_store(store, root)
        ctx = mp.get_context("spawn")
        barrier, done = ctx.Barrier(n + 1), ctx.Value("q", 0)
        outs = [root / f"writer-{i}.json" for i in range(n)]
        procs = [ctx.Process(target=writer, args=(uri, i, steps, image_every, step_seconds, barrier, done, str(outs[i])))
                 for i in range(n)]
        for p in procs:
            p.start()
        restarts: list = []
        restarter = None
        if store == "server-postgres":
            restarter = threading.Thread(target=_restart, args=(stack, done, n * steps, restarts), daemon=True)
            restarter.start()
        barrier.wait(timeout=600)
        t0 = time.monotonic()
        for p in procs:
            p.join()
        wall = time.monotonic() - t0
        if restarter is not None:
            restarter.join()
        results = [json.loads(o.read_text()) if o.exists() else {"error": "writer died", "latencies": [], "run_id": None}
                   for o in outs]
        client = MlflowClient(tracking_uri=uri)
        stored = duplicates = 0
        for r in results:
            if r["run_id"]:
                history = [m.step for m in client.get_metric_history(r["run_id"], "loss")]
                stored += len(set(history))
                duplicates += len(history) - len(set(history))
        if stack is not None:
            services.down(stack.root)
    latencies = sorted(x for r in results for x in r["latencies"])
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"store": store, "writers": n, "sent": n * steps, "stored": stored, "missing": n * steps - stored,
            "duplicates": duplicates, "failed_writes": sum(r.get("failed", 0) + r.get("failed_images", 0) + r.get("failed_tags", 0)
                                                          for r in results),
            "trials_failed": sum(1 for r in results if r["error"]), "p50_ms": 1000 * q[49], "p99_ms": 1000 * q[98],
            "per_s": stored / wall, "wall_s": wall, "restarts": restarts,
            "errors": sorted({r["error"] for r in results if r["error"]})[:3]}


def table(rows: list[dict]) -> str:
    head = "| store | writers | sent | stored | duplicates | failed writes | trials failed | p50 ms | p99 ms | stored/s | wall s |"
    lines = [head, "|---|" + "---:|" * 10]
    for r in rows:
        lines.append(f"| {r['store']} | {r['writers']} | {r['sent']} | {r['stored']} | {r['duplicates']} | {r['failed_writes']} | "
                     f"{r['trials_failed']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['per_s']:.0f} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--image-every", type=int, default=50)
    parser.add_argument("--step-seconds", type=float, default=0.05, help="a training step's time between writes")
    parser.add_argument("--stores", nargs="+", default=["sqlite", "server-sqlite", "server-postgres"],
                        choices=["sqlite", "server-sqlite", "server-postgres"])
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = []
    for store in args.stores:
        for n in args.writers:
            row = measure(store, n, args.steps, args.image_every, args.step_seconds)
            rows.append(row)
            print(f"{store} × {n}: stored {row['stored']}/{row['sent']}, {row['duplicates']} duplicates, "
                  f"{row['failed_writes']} failed writes, {row['trials_failed']} trials failed, p99 {row['p99_ms']:.0f} ms"
                  + (f", restarts {[(w, round(s, 1)) for w, s in row['restarts']]}" if row["restarts"] else "")
                  + (f"; errors {row['errors']}" if row["errors"] else ""), flush=True)
    print(table(rows))
    reference = rows[0]
    for r in rows[1:]:
        print(f"{r['store']} × {r['writers']}: p99 {r['p99_ms'] / reference['p99_ms']:.1f}× and stored/s "
              f"{r['per_s'] / reference['per_s']:.2f}× the reference ({reference['store']} × {reference['writers']})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    bad = [r for r in rows if r["missing"] or r["duplicates"] or r["trials_failed"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

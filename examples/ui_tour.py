"""What a user sees in the MLflow UI: one small run of each job kind into a fresh store, then
headless Chromium screenshots of each experiment's run list and of the job runs' pages and charts.

    python examples/ui_tour.py OUT            # runs the jobs, serves the UI, writes OUT/*.png
    python examples/ui_tour.py OUT --shots    # screenshots of a store OUT already holds

The jobs run as the commands a user types (``python -m genmem.cli``), so the tree on
``PYTHONPATH`` is the one shown: point it at another checkout to see that tree's UI. Needs
Debian's ``chromium`` (``apt install chromium``) for the screenshots; the runs need nothing else.
About 6 minutes of jobs on 2 cores, then the screenshots.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PORT = 5077
TOY = ["--set", "scaling.num_workers=0"]


def genmem(out: Path, *args: str) -> dict:
    """One command, as a user runs it, into ``out``'s store; its JSON result."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}", "GENMEM_STORAGE": str(out / "store"),
           "GENMEM_RAY_STORAGE": str(out / "ray"), "GENMEM_MLFLOW_UI": f"http://127.0.0.1:{PORT}"}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "genmem.cli", *args, "--json"], capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        sys.exit(f"genmem {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    print(f"genmem {args[0]}: {time.monotonic() - started:.0f} s", flush=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_jobs(out: Path) -> dict[str, dict]:
    trained = genmem(out, "train", "--config", "configs/toy2d_flow.yaml", "--set", "data.source=8gaussians", "--set", "data.n=1000", "--set", "images=60000",
                     "--set", "eval_every_images=20000", *TOY)
    ck = trained["checkpoint"]
    return {
        "train": trained,
        "evaluate": genmem(out, "evaluate", "--checkpoint", ck, "--n", "500"),
        "posterior": genmem(out, "posterior", "--checkpoint", ck, "--scale", "0.01", "1", "--samples", "2", "--n", "200",
                             "--set", "draws=1"),
        "unlearn": genmem(out, "unlearn", "--config", "configs/unlearn_toy.yaml", "--base", ck, "--set", "max_images=20000",
                          "--set", "n_base=1000", "--set", "eval_n=1000", *TOY),
        "memorisation": genmem(out, "memorisation", "--config", "configs/size_manifold.yaml", "--train-size", "16",
                               "--set", "images=20000", "--set", "study.n=300", *TOY),
        "report": genmem(out, "report"),
    }


def serve(out: Path) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{out / 'mlflow.db'}",
                               "--artifacts-destination", str(out / "mlartifacts"), "--host", "127.0.0.1", "--port", str(PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=1)
            return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    sys.exit("mlflow server did not answer in 60 s")


def shoot(url: str, path: Path, height: int = 1100) -> None:
    """A screenshot of ``url`` once the page's scripts have run (Chromium's virtual time: the
    metric charts fetch each history, and 20 s of it left them spinning)."""
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size=1680,{height}",
                    "--virtual-time-budget=90000", "--run-all-compositor-stages-before-draw", f"--screenshot={path}", url],
                   capture_output=True, timeout=180, check=True)
    print(f"{path.name}: {url}", flush=True)


def urls(result: dict) -> list[tuple[str, str]]:
    """(name, URL) of the run list and of the run page each job printed (a tree that prints no
    ``experiment_url``: the list its run's URL lies in), and of one posterior arm's run."""
    out = []
    for kind, summary in result.items():
        run = summary["mlflow_url"]
        listing = summary.get("experiment_url") or run.split("/runs/")[0] + "/runs?" + run.split("?")[1]
        charts = run.replace("?", "/model-metrics?", 1)
        out += [(f"{kind}-list", listing), (f"{kind}-run", run), (f"{kind}-charts", charts)]
    arms = [a for a in result["posterior"].get("arms", []) if a.get("mlflow_run_id")]
    if arms:
        run = result["posterior"]["mlflow_url"]
        out.append(("posterior-arm", run.replace(result["posterior"]["mlflow_run_id"], arms[-1]["mlflow_run_id"])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shots", action="store_true", help="only the screenshots, of the store OUT already holds")
    args = parser.parse_args()
    out = args.out.resolve()
    if not args.shots:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps(run_jobs(out), indent=1))
    if shutil.which("chromium") is None:
        sys.exit("no chromium to take screenshots with: apt install chromium, then rerun with --shots")
    server = serve(out)
    try:
        for name, url in urls(json.loads((out / "results.json").read_text())):
            shoot(url, out / f"{name}.png")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()

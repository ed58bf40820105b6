"""The README's copy-test table: `genmem audit` of the KDE generators of kde_digits_export.py and
of a control (held-out digits as samples), every test side by side with its interval.

The sets go to `genmem audit` as .npz arrays with the digits' labels, 8-bit values as a PNG
holds them scaled to [-1, 1], so the classifier's feature space is measured beside pixels.

    python examples/kde_digits_table.py OUT      # writes OUT/*.npz, runs genmem audit 7 times, prints markdown
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from kde_digits_export import as_bytes, generators, split  # noqa: E402

LABELS = {"pixels-bw0.25": "pixel KDE bw 0.25", "pixels-bw0.5": "pixel KDE bw 0.5", "pixels-bw1": "pixel KDE bw 1",
          "pixels-bw2": "pixel KDE bw 2", "pixels-bw4": "pixel KDE bw 4 (blur)", "pca-bw1": "PCA-15 KDE bw 1",
          "control": "held-out digits as samples (never saw train)"}


def save(path: Path, images: np.ndarray, labels: np.ndarray | None = None) -> str:
    x = as_bytes(images).astype(np.float32) / 127.5 - 1.0
    np.savez(path, x=x, **({} if labels is None else {"labels": labels}))
    return str(path)


def audit(samples: str, train: str, heldout: str, name: str) -> dict:
    cmd = [sys.executable, "-m", "genmem.cli", "audit", "--samples", samples, "--train", train, "--heldout", heldout,
           "--name", f"kde-{name}", "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cell(r: dict, key: str, fmt: str = ".3f") -> str:
    if key not in r:
        return "–"
    text = format(r[key], fmt)
    return f"{text} [{format(r[key + '_lo'], fmt)}, {format(r[key + '_hi'], fmt)}]" if key + "_lo" in r else text


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    train, heldout, y_train, y_heldout = split()
    half = np.random.default_rng(1).permutation(len(heldout))
    a, b = half[: len(half) // 2], half[len(half) // 2 :]
    paths = {"train": save(out / "train.npz", train, y_train), "heldout": save(out / "heldout.npz", heldout, y_heldout),
             "heldout-a": save(out / "heldout-a.npz", heldout[a], y_heldout[a]), "heldout-b": save(out / "heldout-b.npz", heldout[b], y_heldout[b])}
    results = {}
    for name, samples in generators(train).items():
        results[name] = audit(save(out / f"{name}.npz", samples), paths["train"], paths["heldout"], name)
        print(f"audited {name}", file=sys.stderr, flush=True)
    results["control"] = audit(paths["heldout-a"], paths["train"], paths["heldout-b"], "control")
    head = ("| generator | memorised (d1/d2 < 1/3) | authPct | C_T pixels | C_T classifier | Z_U | held-out gap, size-matched "
            "| d1 gap, raw (before) | FD_classifier |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        lines.append(f"| {LABELS[name]} | {cell(r, 'memorised_fraction')} | {cell(r, 'authpct', '.1f')} | {cell(r, 'ct', '.2f')} "
                     f"| {cell(r, 'classifier/ct', '.2f')} | {cell(r, 'zu', '.1f')} | {cell(r, 'gap')} | {cell(r, 'd1_gap_q50')} "
                     f"| {cell(r, 'fd_classifier', '.2f')} |")
    r = results["pixels-bw1"]
    lines.append(f"| null control (in every run: half the held-out set as samples) | {cell(r, 'null/memorised_fraction')} "
                 f"| {cell(r, 'null/authpct', '.1f')} | {cell(r, 'null/ct', '.2f')} | {cell(r, 'null/classifier/ct', '.2f')} "
                 f"| {cell(r, 'null/zu', '.1f')} | {cell(r, 'null/gap')} | – | – |")
    print("\n".join(lines))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

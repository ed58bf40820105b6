"""A generator genmem did not train, for `genmem audit`: scikit-learn's kernel density estimate of
the 8x8 digits, fitted on a seeded half of them and sampled at several bandwidths (pixel units of
0..16), in pixel space and, as in scikit-learn's own KDE example, on 15 PCA components. Writes PNG
folders train/, heldout/, pixels-bw<h>/ and pca-bw<h>/; nothing from genmem is imported.

    python examples/kde_digits_export.py OUT
    genmem audit --samples OUT/pixels-bw0.5 --train OUT/train --heldout OUT/heldout
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.neighbors import KernelDensity


def write_pngs(folder: Path, images: np.ndarray) -> None:
    """Digit images in 0..16 as 8-bit PNGs, 100 to a subfolder."""
    for i, img in enumerate(images):
        sub = folder / f"{i // 100:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(np.round(img * 255 / 16), 0, 255).astype(np.uint8)).save(sub / f"{i:05d}.png")


def main(out: Path, bandwidths=(0.25, 0.5, 1.0, 2.0, 4.0), pca_bandwidths=(1.0,), n: int = 1000) -> None:
    digits = load_digits().images  # (1797, 8, 8) in 0..16
    order = np.random.default_rng(0).permutation(len(digits))
    train, heldout = digits[order[:900]], digits[order[900:]]
    write_pngs(out / "train", train)
    write_pngs(out / "heldout", heldout)
    flat = train.reshape(len(train), -1)
    for h in bandwidths:
        samples = KernelDensity(bandwidth=h).fit(flat).sample(n, random_state=0).reshape(-1, 8, 8)
        write_pngs(out / f"pixels-bw{h:g}", samples)
    pca = PCA(n_components=15).fit(flat)
    for h in pca_bandwidths:
        codes = KernelDensity(bandwidth=h).fit(pca.transform(flat)).sample(n, random_state=0)
        write_pngs(out / f"pca-bw{h:g}", pca.inverse_transform(codes).reshape(-1, 8, 8))
    print(f"wrote {out}: train/, heldout/, " + ", ".join(f"pixels-bw{h:g}/" for h in bandwidths)
          + ", " + ", ".join(f"pca-bw{h:g}/" for h in pca_bandwidths))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

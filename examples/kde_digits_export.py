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

BANDWIDTHS = (0.25, 0.5, 1.0, 2.0, 4.0)
PCA_BANDWIDTHS = (1.0,)


def split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 900 training and 897 held-out digits (0..16) and their labels, seeded."""
    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.images))
    return data.images[order[:900]], data.images[order[900:]], data.target[order[:900]], data.target[order[900:]]


def generators(train: np.ndarray, n: int = 1000) -> dict[str, np.ndarray]:
    """Each KDE's ``n`` samples (0..16, shaped like ``train``), named as the folders are."""
    flat = train.reshape(len(train), -1)
    out = {f"pixels-bw{h:g}": KernelDensity(bandwidth=h).fit(flat).sample(n, random_state=0).reshape(-1, 8, 8) for h in BANDWIDTHS}
    pca = PCA(n_components=15).fit(flat)
    for h in PCA_BANDWIDTHS:
        codes = KernelDensity(bandwidth=h).fit(pca.transform(flat)).sample(n, random_state=0)
        out[f"pca-bw{h:g}"] = pca.inverse_transform(codes).reshape(-1, 8, 8)
    return out


def as_bytes(images: np.ndarray) -> np.ndarray:
    """Digit images in 0..16 as the 8-bit values a PNG holds."""
    return np.clip(np.round(images * 255 / 16), 0, 255).astype(np.uint8)


def write_pngs(folder: Path, images: np.ndarray) -> None:
    """Digit images in 0..16 as 8-bit PNGs, 100 to a subfolder."""
    for i, img in enumerate(as_bytes(images)):
        sub = folder / f"{i // 100:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(sub / f"{i:05d}.png")


def main(out: Path) -> None:
    train, heldout, _, _ = split()
    write_pngs(out / "train", train)
    write_pngs(out / "heldout", heldout)
    for name, samples in generators(train).items():
        write_pngs(out / name, samples)
    print(f"wrote {out}: train/, heldout/, " + ", ".join(f"{name}/" for name in generators(train)))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

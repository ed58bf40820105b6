"""Decoding a large image folder on Ray tasks, a slice of its files each (the folder must be
readable from every node: a shared file system, or a single machine)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from genmem.data.images import decode_images
from genmem.distributed.cluster import ensure_ray
from genmem.distributed.tasks import map_tasks


def decoder(files_per_task: int):
    """``decode(folder, files, size)`` for :func:`genmem.data.inputs.read_input`: in this process up
    to ``files_per_task`` files, else on Ray tasks of that many files each, in file order."""

    def decode(folder: Path, files: Sequence[str], size: tuple[int, int] | None) -> list:
        if len(files) <= files_per_task:
            return decode_images(folder, files, size)
        ensure_ray()
        chunks = [(str(folder), list(files[s : s + files_per_task]), size) for s in range(0, len(files), files_per_task)]
        parts = map_tasks(decode_images, chunks, desc=f"decoding {len(files)} images in {folder}", total=len(files),
                          progress=len, unit="image")
        return [row for part in parts for row in part]

    return decode

"""Atomic writes: a failure at any point leaves the old content readable and no temp files behind.

Failures between the renames of a swap are injected by making ``os.rename`` / ``os.replace``
raise on a chosen call: the real filesystem does everything else.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from genmem.checkpoint import load_checkpoint, read_meta, save_checkpoint
from genmem.config import ModelConfig, TrainConfig
from genmem.data import read_shards, seal_shards, write_part
from genmem.errors import StorageError
from genmem.models import build_model
from genmem.storage import atomic_folder, atomic_write_bytes, atomic_write_text, ensure_writable, publish_folder


def _fail_on(monkeypatch, name: str, *calls: int) -> list[tuple[str, str]]:
    """Make ``os.<name>`` raise on the given 1-based calls; return the (src, dst) of every call."""
    real = getattr(os, name)
    seen: list[tuple[str, str]] = []

    def flaky(src, dst, *args, **kwargs):
        seen.append((str(src), str(dst)))
        if len(seen) in calls:
            raise OSError(errno.EIO, f"injected failure of {name} call {len(seen)}")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, name, flaky)
    return seen


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "content.txt").write_text(text)
    return path


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- atomic_folder -----------------------------------------------------------------------------
def test_atomic_folder_replaces_the_target_and_leaves_nothing_beside_it(tmp_path):
    target = _folder(tmp_path / "target", "old")
    with atomic_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".target.tmp-")
        (tmp / "content.txt").write_text("new")
    assert (target / "content.txt").read_text() == "new"
    assert _names(tmp_path) == ["target"]
    # a target that does not exist yet is created, parents too
    with atomic_folder(tmp_path / "a" / "b") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "a" / "b" / "x").read_text() == "x"


def test_a_block_that_raises_leaves_the_old_target_and_no_temp_folder(tmp_path):
    target = _folder(tmp_path / "target", "old")
    with pytest.raises(RuntimeError, match="half way"):
        with atomic_folder(target) as tmp:
            (tmp / "content.txt").write_text("half")
            raise RuntimeError("half way")
    assert (target / "content.txt").read_text() == "old"
    assert _names(tmp_path) == ["target"]
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "fresh"):
            raise RuntimeError
    assert _names(tmp_path) == ["target"]


def test_replace_false_lets_a_target_published_meanwhile_win(tmp_path):
    target = tmp_path / "target"
    with atomic_folder(target, replace=False) as tmp:
        (tmp / "content.txt").write_text("ours")
        _folder(target, "theirs")  # another worker finished first
    assert (target / "content.txt").read_text() == "theirs"
    assert _names(tmp_path) == ["target"]
    # but a failure that leaves no target behind is not hidden
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    with pytest.raises(OSError):
        with atomic_folder(blocker, replace=False):
            pass
    assert blocker.read_text() == "a file, not a folder" and _names(tmp_path) == ["blocker", "target"]


@pytest.mark.parametrize("call", [1, 2], ids=["rename-aside", "rename-in"])
def test_a_failed_swap_keeps_the_old_folder_in_place(tmp_path, monkeypatch, call):
    # call 1 moves the old folder aside, call 2 moves the new one in: either may fail.
    target = _folder(tmp_path / "target", "old")
    seen = _fail_on(monkeypatch, "rename", call)
    with pytest.raises(OSError, match="injected"):
        with atomic_folder(target) as tmp:
            (tmp / "content.txt").write_text("new")
    assert (target / "content.txt").read_text() == "old"
    assert _names(tmp_path) == ["target"]
    assert Path(seen[0][0]) == target  # the old folder was never deleted before the rename


def test_when_even_the_restore_fails_the_old_folder_waits_at_its_aside_name(tmp_path, monkeypatch):
    target = _folder(tmp_path / "target", "old")
    seen = _fail_on(monkeypatch, "rename", 2, 3)
    with pytest.raises(StorageError, match=r"kept at .*\.target\.old-[0-9a-f]+; rename it back") as info:
        with atomic_folder(target) as tmp:
            (tmp / "content.txt").write_text("new")
    aside = Path(seen[0][1])
    assert str(aside) in str(info.value)
    assert (aside / "content.txt").read_text() == "old"
    assert _names(tmp_path) == [aside.name]  # the new temp folder is cleaned up, the old kept


# -- publish_folder (a staging folder filled by several processes) ------------------------------
def test_publish_folder_swaps_a_staging_folder_in_and_survives_a_failure(tmp_path, monkeypatch):
    target = _folder(tmp_path / "out", "old")
    staging = _folder(tmp_path / "staging", "new")
    with monkeypatch.context() as m:
        _fail_on(m, "rename", 2)
        with pytest.raises(OSError, match="injected"):
            publish_folder(staging, target)
    assert (target / "content.txt").read_text() == "old" and (staging / "content.txt").read_text() == "new"
    assert publish_folder(staging, target) == target
    assert (target / "content.txt").read_text() == "new"
    assert _names(tmp_path) == ["out"]
    # replace=False: the existing target wins and the staging folder is dropped
    staging = _folder(tmp_path / "staging", "late")
    publish_folder(staging, target, replace=False)
    assert (target / "content.txt").read_text() == "new" and _names(tmp_path) == ["out"]


def test_seal_shards_over_an_existing_folder_keeps_it_readable_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "samples"

    def stage(value: float) -> Path:
        staging = tmp_path / f"staging-{value}"
        for part in range(2):
            write_part(staging, part, torch.full((3, 2), value + part))
        return staging

    first = seal_shards(stage(1.0), out, source="test", split="samples")
    staging = stage(5.0)
    with monkeypatch.context() as m:
        _fail_on(m, "rename", 2)
        with pytest.raises(OSError, match="injected"):
            seal_shards(staging, out, source="test", split="samples")
    assert read_shards(out).manifest.sha256 == first.sha256
    second = seal_shards(staging, out, source="test", split="samples")
    ds = read_shards(out)
    assert ds.manifest.sha256 == second.sha256 != first.sha256 and ds.x.min().item() == 5.0
    assert _names(tmp_path) == ["samples"]  # both staging folders became it, no aside copy is left


# -- files -------------------------------------------------------------------------------------
def test_atomic_write_text_replaces_content_and_leaves_no_temp_on_error(tmp_path, monkeypatch):
    path = tmp_path / "deep" / "summary.json"
    assert atomic_write_text(path, "first") == path
    atomic_write_text(path, "second")
    assert path.read_text() == "second" and _names(path.parent) == ["summary.json"]
    with monkeypatch.context() as m:
        _fail_on(m, "replace", 1)
        with pytest.raises(OSError, match="injected"):
            atomic_write_text(path, "third")
    assert path.read_text() == "second" and _names(path.parent) == ["summary.json"]
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_text() == "second" and _names(path.parent) == ["summary.json"]
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


# -- checkpoints -------------------------------------------------------------------------------
def _save(path: Path, model: torch.nn.Module, cfg: TrainConfig, step: int) -> Path:
    return save_checkpoint(path, model, cfg, shape=(2,), step=step, images_seen=10 * step, data_manifest="m")


@pytest.mark.parametrize("calls", [(1,), (2,), (2, 3)], ids=["rename-aside", "rename-in", "rename-in-and-restore"])
def test_save_checkpoint_over_an_old_one_keeps_it_loadable_when_the_swap_fails(tmp_path, monkeypatch, calls):
    cfg = TrainConfig(model=ModelConfig(hidden=8, depth=1, time_dim=8))
    torch.manual_seed(0)
    model = build_model(cfg.model, (2,))
    path = _save(tmp_path / "ckpt", model, cfg, step=1)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    seen = _fail_on(monkeypatch, "rename", *calls)
    with pytest.raises(OSError, match="injected|kept at"):
        _save(path, model, cfg, step=2)
    monkeypatch.undo()
    # After a failed restore the old checkpoint waits at its aside name, which the error names.
    where = Path(seen[0][1]) if 3 in calls else path
    ckpt = load_checkpoint(where, use_ema=False)
    assert ckpt.meta["step"] == 1
    for k, v in ckpt.model.state_dict().items():
        torch.testing.assert_close(v, old[k])
    # ... and a later save goes through, leaving only the checkpoint folder(s)
    _save(path, model, cfg, step=3)
    assert read_meta(path)["step"] == 3
    assert not any(n.startswith(".ckpt.tmp-") for n in _names(tmp_path))


# -- the storage root --------------------------------------------------------------------------
def test_ensure_writable_raises_storage_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StorageError, match=r"storage path .*a-file/store is not writable .*set GENMEM_STORAGE"):
        ensure_writable(blocker / "store")
    assert ensure_writable(tmp_path / "store") == tmp_path / "store"

"""Checkpoints: rotation, reload, and a disk that fills up while one is written."""

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from hgdpo.training.checkpoint import CheckpointManager, TrainingState

ROOT = Path(__file__).resolve().parents[1]


def test_save_rotate_and_load(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        manager.save(TrainingState(step=step, batches_seen=4 * step), {"w": torch.full((3,), float(step))},
                     {"optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "lr": 0.1}})
    assert [p.name for p in manager.list()] == ["checkpoint-00000002", "checkpoint-00000003"]
    state, tensors, objects = CheckpointManager.load(manager.resolve("latest"))
    assert (state.step, state.batches_seen) == (3, 12)
    assert torch.equal(tensors["w"], torch.full((3,), 3.0))
    assert objects["optimizer"]["lr"] == 0.1


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path):
    """A real write failure from the kernel (file-size limit, EFBIG), in a child process."""
    script = textwrap.dedent(f"""
        import resource, signal, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from hgdpo.training.checkpoint import CheckpointManager, TrainingState
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get an OSError instead of being killed
        manager = CheckpointManager({str(tmp_path)!r})
        assert manager.save(TrainingState(step=1, batches_seen=1), {{"w": torch.ones(10)}}, {{}})
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        print("second:", manager.save(TrainingState(step=2, batches_seen=2), {{"w": torch.ones(1_000_000)}}, {{}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "second: None" in result.stdout
    assert "Could not write checkpoint" in result.stderr and "previous checkpoint is kept" in result.stderr
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-00000001"]  # no half-written leftovers
    state, tensors, _ = CheckpointManager.load(CheckpointManager(tmp_path).resolve("latest"))
    assert state.step == 1 and torch.equal(tensors["w"], torch.ones(10))

"""Hardening of the core: crash-safe writes, checkpoint lineages, dataset path containment, cache checksums."""

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from hgdpo.data import readers as dataset_module
from hgdpo.training.latent_cache import _chunk_is_sound, _open_chunk, _write_chunk, cache_entries, prune_cache
from hgdpo.training.checkpoint import CheckpointManager, TrainingState
from hgdpo.data.format import CorruptImageError, resolve_dataset_path
from hgdpo.data.readers import open_preference_dataset
from hgdpo.data.writers import write_triplet_index
from hgdpo.errors import TrainingError
from hgdpo.fileio import TEMP_PATTERN, atomic_path, atomic_write_text, remove_stale_temporaries

ROOT = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# --------------------------------------------------------------------------- fileio


def test_temporaries_are_unpredictable_exclusive_and_follow_the_umask(tmp_path):
    names = []
    for _ in range(2):
        with atomic_path(tmp_path / "file.txt") as tmp:
            names.append(tmp.name)
            assert tmp.is_file() and TEMP_PATTERN.match(tmp.name)
            tmp.write_text("x")
    assert names[0] != names[1] and str(os.getpid()) in names[0]
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "masked.txt", "y")
        with atomic_path(tmp_path / "folder", directory=True) as tmp:
            (tmp / "inside").write_text("z")
    finally:
        os.umask(old)
    assert (tmp_path / "masked.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o750 and (tmp_path / "folder" / "inside").is_file()
    assert os.umask(old) == old  # the process umask was left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "folder", "masked.txt"]


def test_a_failed_write_leaves_nothing_and_new_parents_are_made(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list((tmp_path / "a" / "b").iterdir()) == []
    atomic_write_text(target, "whole")
    assert target.read_text() == "whole"


def test_only_our_temporaries_of_dead_writers_are_removed(tmp_path):
    dead, hexed = _dead_pid(), "0123456789abcdef"
    stale = [tmp_path / f".chunk.safetensors.tmp-{dead}-{hexed}", tmp_path / f".old.json.tmp-{dead}"]
    live = tmp_path / f".chunk.safetensors.tmp-{os.getpid()}-{hexed}"
    foreign = [tmp_path / ".notes.tmp-mine", tmp_path / "data.tmp-1", tmp_path / "keep.png"]
    (tmp_path / "sub").mkdir()
    nested = tmp_path / "sub" / f".x.png.tmp-{dead}-{hexed}"
    for path in [*stale, live, *foreign, nested]:
        path.write_text("x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert live.exists() and all(path.exists() for path in foreign) and nested.exists()
    assert remove_stale_temporaries(tmp_path, recursive=True) == [nested]


# --------------------------------------------------------------------------- checkpoints


def _save(manager, step):
    return manager.save(TrainingState(step=step, batches_seen=step), {"w": torch.full((2,), float(step))}, {})


def test_a_checkpoint_limit_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--checkpoints-total-limit must be at least 1"):
        CheckpointManager(tmp_path, keep_last=0)
    manager = CheckpointManager(tmp_path, keep_last=1)
    for step in (1, 2):
        assert _save(manager, step).is_dir()  # the one just written is kept
    assert [p.name for p in manager.list()] == ["checkpoint-00000002"]


def test_same_step_replacement_survives_a_crash_at_either_moment(tmp_path):
    manager = CheckpointManager(tmp_path)
    final = _save(manager, 4)
    # killed after moving the old one aside, before renaming the new one in: the old one comes back
    aside = final.with_name(f".{final.name}.replaced-0123456789abcdef")
    os.replace(final, aside)
    assert CheckpointManager(tmp_path).list() == [final] and not aside.exists()
    # killed after renaming the new one in, before deleting the old one: the new one stays, the old goes
    (aside / "weights.safetensors").parent.mkdir()
    CheckpointManager(tmp_path)
    assert not aside.exists() and final.is_dir()
    # a normal replacement: the newer content wins, nothing else is left
    manager.save(TrainingState(step=4, batches_seen=99), {"w": torch.zeros(2)}, {})
    state, _, _ = CheckpointManager.load(final)
    assert state.batches_seen == 99 and [p.name for p in manager.root.iterdir()] == [final.name]


def test_resuming_an_older_checkpoint_moves_the_abandoned_newer_ones_aside(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=5)
    for step in (2, 4, 6):
        _save(manager, step)
    older = manager.resolve("checkpoint-00000002")
    with caplog.at_level(logging.WARNING):
        folder = manager.abandon_other_lineages(older)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-00000004", "checkpoint-00000006"]
    assert "does not continue" in caplog.text and folder.name.startswith("abandoned-")
    assert manager.resolve("latest") == older  # a later --resume latest continues the resumed run
    _save(manager, 4)
    assert [p.name for p in manager.list()] == ["checkpoint-00000002", "checkpoint-00000004"]
    # a fresh run (nothing resumed) keeps every earlier checkpoint, out of the way
    second = manager.abandon_other_lineages(None)
    assert manager.list() == [] and len(list(second.iterdir())) == 2 and folder.is_dir()


def test_an_unreadable_checkpoint_is_named(tmp_path):
    manager = CheckpointManager(tmp_path)
    path = _save(manager, 2)
    (path / "weights.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="checkpoint-00000002 is unreadable.*--resume"):
        CheckpointManager.load(path)


# --------------------------------------------------------------------------- dataset paths and sizes


@pytest.mark.parametrize("value", ["/etc/passwd", "../x.png", "images/../../x.png", "C:\\x.png", "..\\x.png",
                                   "images/page.html", "images/a.svg", "", None, "images/a\x00.png"])
def test_unsafe_image_paths_are_refused(tmp_path, value):
    with pytest.raises(ValueError, match="image path"):
        resolve_dataset_path(tmp_path, value)


def test_a_symbolic_link_out_of_the_dataset_is_refused(tmp_path):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "images" / "link.png").symlink_to(outside)
    Image.new("RGB", (8, 8)).save(root / "images" / "ok.png")
    assert resolve_dataset_path(root, "images/ok.png") == (root / "images" / "ok.png").resolve()
    with pytest.raises(ValueError, match="outside the dataset folder"):
        resolve_dataset_path(root, "images/link.png")


def _index(root: Path, pairs) -> Path:
    rows = [{"prompt": f"a person {i}", "win_image": w, "lose_image": l, "win_score": 1.0, "lose_score": 0.0}
            for i, (w, l) in enumerate(pairs)]
    write_triplet_index(root, rows)
    return root


def test_escaping_rows_are_refused_per_pair_naming_the_row(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    for name in ("w.png", "l.png"):
        Image.new("RGB", (8, 8), (200, 0, 0)).save(root / "images" / name)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    dataset = open_preference_dataset(_index(root, [("images/w.png", "images/l.png"), (str(secret), "images/l.png"),
                                                    ("images/w.png", "../secret.png")]))
    assert dataset.load_pair(0)[0].getpixel((0, 0)) == (200, 0, 0)
    for i in (1, 2):
        with pytest.raises(CorruptImageError, match=f"item {i}: .*index.parquet") as error:
            dataset.load_pair(i)
        with pytest.raises(CorruptImageError):
            dataset.image_sources(i)
        assert "absolute" in str(error.value) or "leaves the dataset" in str(error.value)


def test_images_over_the_pixel_limit_are_refused_from_the_header(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (64, 48)).save(root / "images" / "big.png")
    dataset = open_preference_dataset(_index(root, [("images/big.png", "images/big.png")]))
    monkeypatch.setattr(dataset_module, "MAX_IMAGE_PIXELS", 64 * 48 - 1)
    with pytest.raises(CorruptImageError, match="64x48 = 3072 pixels, over the limit.*downscale"):
        dataset.load_pair(0)
    monkeypatch.setattr(dataset_module, "MAX_IMAGE_PIXELS", 64 * 48)
    assert dataset.load_pair(0)[0].size == (64, 48)


def test_pickapic_one_huge_row_group_is_streamed_in_batches(tmp_path):
    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4), (value, 0, 0)).save(buffer, format="PNG")
        return buffer.getvalue()

    rows = 50
    table = pa.table({"caption": [f"a person {i}" for i in range(rows)], "jpg_0": [png(i) for i in range(rows)],
                      "jpg_1": [png(255 - i) for i in range(rows)], "label_0": [1.0] * rows})
    path = tmp_path / "one-group.parquet"
    pq.write_table(table, path, row_group_size=rows)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    dataset = open_preference_dataset(path)
    dataset.batch_rows = 8
    order = list(range(rows)) + [3, 49, 0]  # in order, then backwards and a jump
    for i in order:
        win, lose = dataset.load_pair(i)
        assert (win.getpixel((0, 0))[0], lose.getpixel((0, 0))[0]) == (i, 255 - i)
    cached = [value for value, _ in dataset._row_groups._data.values()]
    assert cached and max(batch.num_rows for batch in cached) <= 8  # never the whole row group


# --------------------------------------------------------------------------- latent cache


def _chunk(tmp_path: Path) -> Path:
    path = tmp_path / "chunk-000000.safetensors"
    _write_chunk(path, {"index": torch.arange(3), "win": torch.randn(3, 4, 8, 8).half()}, {})
    return path


def test_corrupt_and_truncated_chunks_are_detected_and_named(tmp_path, caplog):
    path = _chunk(tmp_path)
    assert _chunk_is_sound(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside the tensors
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert not _chunk_is_sound(path)
    assert "checksum mismatch" in caplog.text and path.name in caplog.text
    path.write_bytes(bytes(data[: len(data) // 2]))
    assert not _chunk_is_sound(path)
    with pytest.raises(TrainingError, match=f"{path.name} is unreadable.*delete that file"):
        _open_chunk(path)


def test_a_full_disk_while_encoding_is_one_clear_error_and_leaves_nothing(tmp_path):
    script = textwrap.dedent(f"""
        import resource, signal, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from hgdpo.training.latent_cache import _write_chunk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        _write_chunk(__import__("pathlib").Path({str(tmp_path)!r}) / "chunk-000000.safetensors",
                     {{"win": torch.ones(1_000_000)}}, {{}})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Could not write latent cache chunk" in result.stderr
    assert "Free disk space" in result.stderr and list(tmp_path.iterdir()) == []


def test_cache_report_and_prune_touch_only_old_caches_of_ours(tmp_path):
    encoded = tmp_path / "encoded"
    old, new = encoded / ("a" * 20), encoded / ("b" * 20)
    for folder in (old, new):
        folder.mkdir(parents=True)
        _chunk(folder)
        (folder / "manifest.json").write_text(json.dumps({"chunks": [], "skipped": {}}))
    foreign = encoded / ("c" * 20)
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (encoded / "README").write_text("mine")
    week_ago = time.time() - 7 * 86400
    for path in [old, *old.iterdir()]:
        os.utime(path, (week_ago, week_ago))
    entries = cache_entries(tmp_path)
    assert [entry.path for entry in entries] == [old, new] and entries[0].size_bytes > 0
    assert prune_cache(tmp_path, 3, dry_run=True)[0].path == old and old.exists()
    assert [entry.path for entry in prune_cache(tmp_path, 3)] == [old]
    assert not old.exists() and new.exists() and (foreign / "notes.txt").exists() and (encoded / "README").exists()
    with pytest.raises(ValueError, match="--older-than"):
        prune_cache(tmp_path, float("nan"))


def test_cache_cli_reports_and_prunes(tmp_path):
    folder = tmp_path / "encoded" / ("d" * 20)
    folder.mkdir(parents=True)
    _chunk(folder)
    cli = [sys.executable, str(ROOT / "trainer" / "cache.py"), "--cache-dir", str(tmp_path)]
    report = subprocess.run(cli + ["report"], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0 and "1 cache(s)" in report.stdout and folder.name in report.stdout
    kept = subprocess.run(cli + ["prune", "--older-than", "1"], capture_output=True, text=True, timeout=120)
    assert "deleted 0 cache(s)" in kept.stdout and folder.exists()
    pruned = subprocess.run(cli + ["prune", "--older-than", "0"], capture_output=True, text=True, timeout=120)
    assert "deleted 1 cache(s)" in pruned.stdout and not folder.exists() and (tmp_path / "encoded").is_dir()


# --------------------------------------------------------------------------- scorer processor


def test_pickscore_uses_the_model_folders_own_processor_offline(tiny_clip_dirs, caplog):
    from hgdpo.feedback.scorers import PickScoreScorer, ScorerWeightsError

    with caplog.at_level(logging.INFO, logger="hgdpo.feedback.scorers"):
        scorer = PickScoreScorer(model=tiny_clip_dirs["combined"])
    assert f"the files in the model folder {tiny_clip_dirs['combined']}" in caplog.text
    image = Image.new("RGB", (32, 32), (255, 0, 0))
    reference = PickScoreScorer(model=tiny_clip_dirs["model"], processor=tiny_clip_dirs["processor"])
    assert torch.allclose(scorer.score(["a person"], [image]), reference.score(["a person"], [image]))
    with pytest.raises(ScorerWeightsError):  # weights only: the hub default is needed, and the hub is off
        PickScoreScorer(model=tiny_clip_dirs["model"])

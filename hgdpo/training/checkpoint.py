"""Atomic, resumable training checkpoints.

A checkpoint is a folder ``checkpoint-<step>`` under ``<output_dir>/checkpoints``. It is written in a
temporary folder, flushed to disk, and renamed into place in one step, so a run killed at any moment,
or a disk that fills up while writing, never leaves a half-written checkpoint: the previous one
survives. Temporary folders start with a dot and are never taken for checkpoints.

Tensors go to safetensors; the optimizer, LR-scheduler and RNG states (plain tensors, numbers and
dicts) go through ``torch.save`` and are read back with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hgdpo.fileio import atomic_path, fsync_dir, make_dirs, remove_stale_temporaries
from hgdpo.safe_load import load_pickle

logger = logging.getLogger(__name__)

LATEST = "latest"
PREFIX = "checkpoint-"
ASIDE = ".replaced-"  # .checkpoint-<step>.replaced-<hex>: the old one while a new one is renamed in


@dataclass
class TrainingState:
    """Everything besides the weights that a resumed run needs to continue exactly."""

    step: int
    batches_seen: int
    consecutive_nonfinite: int = 0


def rng_states(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """Global torch RNG states plus the named generators' states."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    states.update({f"generator/{name}": gen.get_state() for name, gen in generators.items()})
    return states


def restore_rng_states(states: dict[str, torch.Tensor], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    for name, generator in generators.items():
        generator.set_state(states[f"generator/{name}"])


class CheckpointManager:
    """Writes, rotates and finds the checkpoints of one output folder.

    ``keep_last`` (at least 1) newest checkpoints are kept; the one just written is never deleted.
    Checkpoints that a run does not continue (a fresh run in a used folder, or the ones newer than an
    explicit ``--resume`` checkpoint) are moved, never deleted, into ``abandoned-<time>/`` by
    :meth:`abandon_other_lineages`, so that a later ``resume="latest"`` cannot continue them silently.
    """

    def __init__(self, output_dir: str | Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"--checkpoints-total-limit must be at least 1 (the checkpoint just written is always "
                             f"kept), got {keep_last}.")
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self._recover()

    def _recover(self) -> None:
        """Finish or undo a same-step replacement that a killed run left half done (see :meth:`save`)."""
        if not self.root.is_dir():
            return
        for aside in sorted(self.root.glob(f".{PREFIX}*{ASIDE}*")):
            final = self.root / aside.name[1:].split(ASIDE)[0]
            if final.exists():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                try:
                    os.replace(aside, final)
                except FileNotFoundError:  # another rank restored it first
                    continue
                logger.warning("Restored %s, which a killed run had moved aside while replacing it.", final)

    def save(
        self,
        state: TrainingState,
        tensors: dict[str, torch.Tensor],
        objects: dict[str, object],
    ) -> Path | None:
        """Write a checkpoint atomically; return its folder, or None if the write failed (disk full).

        ``tensors`` go to ``weights.safetensors``; each entry of ``objects`` (state dicts) to its own
        ``<name>.pt``. A checkpoint of the same step already there is moved aside, the new one renamed
        in, and only then the old one deleted: a crash at any moment leaves one of the two.
        """
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        final = self.root / f"{PREFIX}{state.step:08d}"
        remove_stale_temporaries(self.root)
        aside = None
        try:
            with atomic_path(final, directory=True) as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "weights.safetensors"))
                for name, obj in objects.items():
                    torch.save(obj, tmp / f"{name}.pt")
                (tmp / "state.json").write_text(json.dumps(state.__dict__, indent=2))
                if final.exists():  # a checkpoint of the same step from an earlier, resumed run
                    aside = final.with_name(f".{final.name}{ASIDE}{secrets.token_hex(8)}")
                    os.replace(final, aside)
        except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error
            logger.error(
                "Could not write checkpoint %s (%s). The previous checkpoint is kept; training goes on. "
                "Free disk space to get new checkpoints.",
                final,
                error,
            )
            self._recover()
            return None
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        self._rotate(keep=final)
        return final

    def _rotate(self, keep: Path) -> None:
        others = [path for path in self.list() if path != keep]
        for old in others[: max(0, len(others) + 1 - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary folders of killed writes are ignored)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))

    def latest(self) -> Path | None:
        checkpoints = self.list()
        return checkpoints[-1] if checkpoints else None

    def resolve(self, resume: str) -> Path | None:
        """``latest`` (None when there is none yet), a checkpoint folder, or a checkpoint name in this run."""
        if resume == LATEST:
            return self.latest()
        path = Path(resume)
        if not path.exists() and (self.root / resume).exists():
            path = self.root / resume
        if not (path / "state.json").is_file():
            raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no state.json inside); give "
                                    f"'latest' or one of {[p.name for p in self.list()][-3:] or 'the checkpoints'} "
                                    f"in {self.root}.")
        return path

    def abandon_other_lineages(self, resumed: Path | None) -> Path | None:
        """Move every checkpoint the run does not continue into ``abandoned-<time>/``; return that folder.

        With ``resumed`` in this folder, the checkpoints after it are moved (its older ones are its own
        history); otherwise (a fresh run, or one resumed from another run's checkpoint) all of them.
        """
        resumed_here = resumed is not None and resumed.resolve().parent == self.root.resolve()
        moved = [path for path in self.list()
                 if not (resumed_here and path.name <= resumed.resolve().name)]
        if not moved:
            return None
        folder = self.root / time.strftime("abandoned-%Y%m%d-%H%M%S")
        while folder.exists():
            folder = folder.with_name(folder.name + "-1")
        make_dirs(folder)
        for path in moved:
            os.replace(path, folder / path.name)
        fsync_dir(self.root)
        logger.warning("Moved %d checkpoint(s) this run does not continue (%s) into %s; they are kept, not "
                       "deleted, so --resume latest continues this run only.", len(moved),
                       ", ".join(path.name for path in moved), folder)
        return folder

    @staticmethod
    def load(path: Path) -> tuple[TrainingState, dict[str, torch.Tensor], dict[str, object]]:
        """Read a checkpoint: state, tensors, and the ``.pt`` objects by name (``weights_only=True``)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = TrainingState(**json.loads((path / "state.json").read_text()))
            tensors = load_file(str(path / "weights.safetensors"))
            objects = {p.stem: load_pickle(p) for p in path.glob("*.pt")}
        except (OSError, ValueError, TypeError, RuntimeError, SafetensorError, pickle.UnpicklingError) as error:
            raise ValueError(f"Checkpoint {path} is unreadable ({type(error).__name__}: {error}); resume from an "
                             "older one with --resume <folder>, or move this one away.") from None
        return state, tensors, objects

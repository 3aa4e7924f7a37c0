"""Crash-safe file writing shared by every module that persists something, and the image-path check of
every module that opens image files named by its input.

A file or folder is written under a hidden temporary sibling name and renamed onto its final name in
one step, so readers never see a half-written file: a killed process leaves at most a hidden
temporary behind, and the previous version survives a failed write.

Temporary names are ``.<name>.tmp-<pid>-<16 random hex digits>``: unpredictable, distinct for two
threads of one process, created with ``O_EXCL`` (a planted file or link is never written through),
with the permissions the process's umask gives (no process-wide umask change). The pid lets
:func:`remove_stale_temporaries` delete the leftovers of killed writers, and only those.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: File suffixes of the images a dataset, a study or a report may name.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# ours: ".<name>.tmp-<pid>-<hex>", and ".<name>.tmp-<pid>" of earlier hgdpo versions
TEMP_PATTERN = re.compile(r"^\..+\.tmp-(?P<pid>\d+)(?:-[0-9a-f]{16})?$")


def image_inside(root: str | Path, path: str | Path, what: str, folder: str = "the folder",
                 keep: str = "keep the images inside it") -> Path:
    """``path`` (relative to ``root``, or absolute) with every ``..`` and symbolic link resolved.

    Raises ValueError unless the result lies inside ``root`` (also resolved) and has an image suffix
    (:data:`IMAGE_SUFFIXES`): a ``..``, an absolute path or a link out of the folder is refused. ``what`` names
    the path in the error, ``folder`` names ``root`` and ``keep`` says what to do.
    """
    base = Path(root).resolve()
    resolved = (base / path).resolve()
    if resolved != base and base not in resolved.parents:
        raise ValueError(f"{what} leads outside {folder} {base} (to {resolved}): {keep}")
    if resolved.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"{what} is not an image file ({resolved.name}): use {', '.join(IMAGE_SUFFIXES)}")
    return resolved


def cache_root() -> Path:
    """Where hgdpo keeps derived files (tokenizer, encoded datasets): $HGDPO_CACHE or ~/.cache/hgdpo."""
    return Path(os.environ.get("HGDPO_CACHE", Path.home() / ".cache" / "hgdpo"))


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names, renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file below ``path``, then ``path`` itself."""
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    for folder in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
        fsync_dir(folder)
    fsync_dir(path)


def make_dirs(path: str | Path, *, fsync: bool = True) -> Path:
    """``mkdir -p`` that also flushes each parent of a folder it creates, so new folders survive a crash."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.is_dir():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue
        if fsync:
            fsync_dir(folder.parent)
    return path


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(8)}")


def _create_temporary(path: Path, directory: bool) -> Path:
    """Create a fresh temporary beside ``path`` (a folder, or an empty file) and return its name."""
    for _ in range(100):
        tmp = _temporary_name(path)
        try:
            if directory:
                os.mkdir(tmp, 0o777)  # the umask applies
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "could not create a temporary name", str(path))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True, directory: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``path`` to write; on success rename it onto ``path``, else delete it.

    The temporary exists when yielded: an empty file (overwrite it), or with ``directory=True`` an empty
    folder to fill. New parent folders are created and flushed.
    """
    path = Path(path)
    make_dirs(path.parent, fsync=fsync)
    tmp = _create_temporary(path, directory)
    try:
        yield tmp
        if fsync:
            if tmp.is_dir():
                fsync_tree(tmp)
            else:
                with open(tmp, "rb") as handle:
                    os.fsync(handle.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: str | Path, *, recursive: bool = False) -> list[Path]:
    """Delete the temporaries of killed writers in ``folder`` (and below it with ``recursive``); return them.

    Only names matching our own pattern whose writer process is gone are touched; a live writer's
    temporary (another thread or process) and every other file stay.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = folder.rglob(".*.tmp-*") if recursive else folder.glob(".*.tmp-*")
    removed = []
    for tmp in sorted(candidates):
        match = TEMP_PATTERN.match(tmp.name)
        if match and not tmp.is_symlink() and not _pid_alive(int(match["pid"])):
            _remove(tmp)
            removed.append(tmp)
    return removed

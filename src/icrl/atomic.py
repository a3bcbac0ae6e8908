"""Safe outputs: every file the library writes appears complete under its name, or not at all; an
existing file is replaced only if it is one of ours; one process at a time writes an output."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on success it is renamed to `path`.

    A writer killed mid-way leaves only its hidden temporary file (`.NAME.tmpPID...`), which the
    next write of the same path removes. The temporary name keeps the suffix, for writers (such
    as matplotlib) that choose the format by it. The temporary file is created before the writer
    runs, so a folder that refuses it raises OSError (naming it) before any work."""
    path = Path(path)
    if not (path.parent.exists() or path.parent.is_symlink()):  # else a file there fails below
        path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        tmp.touch()
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex): what identifies a checkpoint in caches and parts."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_temporary(path: Path) -> bool:
    """Whether `path` is a temporary file left by `atomic_write` (or a lock of `output_lock`)."""
    return path.name.startswith(".") and (".tmp" in path.name or path.name.endswith(".lock"))


def check_replaceable(path: str | Path, is_ours: Callable[[Path], bool], what: str):
    """UserError unless `path` is new or a regular file that `is_ours` recognises as `what`
    (which the command may replace or resume): never some other file, a folder or a device."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, expected a file path")
    if (path.exists() or path.is_symlink()) and not (path.is_file() and is_ours(path)):
        raise UserError(f"{path} exists and is not {what}; not overwriting it (delete it or "
                        f"choose another path)")


def reads(reader) -> Callable[[Path], bool]:
    """A test of ownership for `check_replaceable`: whether `reader` (e.g. read_checkpoint)
    reads the file without a UserError."""
    def ours(path) -> bool:
        try:
            reader(path)
        except UserError:
            return False
        return True
    return ours


def check_directory(path: str | Path):
    """UserError if an output directory `path` exists as something else."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise UserError(f"{path} exists and is not a directory")


@contextmanager
def output_lock(path: str | Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside the output `path` for the block, so that a second process asking
    for the same output gets a one-line UserError instead of racing the first. The lock (an
    advisory `flock`) dies with its process; the file and any folders made for it are removed
    on the way out. A folder that refuses the lock file raises OSError naming it."""
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    made = [p for p in [path.parent, *path.parent.parents] if not (p.exists() or p.is_symlink())]
    fd = None
    try:
        for folder in reversed(made):  # a file or a loop on the way fails in os.open, naming it
            folder.mkdir()
        while fd is None:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                fd = None
                raise UserError(f"{path} is in use by another icrl process (pid {holder}); wait "
                                f"for it to end or choose another output path") from None
            if os.fstat(fd).st_ino != _inode(lock):  # removed by its last holder meanwhile
                os.close(fd)
                fd = None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        if fd is not None:
            Path(lock).unlink(missing_ok=True)  # while still holding it: see the inode check
            os.close(fd)
        for folder in made:  # deepest first; only those left empty
            try:
                folder.rmdir()
            except OSError:
                break


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None

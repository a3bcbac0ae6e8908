"""Atomic file writes: every file the library writes appears complete under its name, or not at all."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on success it is renamed to `path`.

    A writer killed mid-way leaves only its hidden temporary file (`.NAME.tmpPID...`), which the
    next write of the same path removes. The temporary name keeps the suffix, for writers (such
    as matplotlib) that choose the format by it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_temporary(path: Path) -> bool:
    """Whether `path` is a temporary file left by `atomic_write`."""
    return path.name.startswith(".") and ".tmp" in path.name

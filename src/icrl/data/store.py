"""The on-disk history store: one HDF5 file of learning histories (or expert episodes) + metadata.

Layout (H histories of T steps, k observation components):
    obs (H, T, k) uint8 · actions (H, T) uint8 · rewards (H, T) float16
    task_ids (H,) int32 — row of the family's task table · tasks (H, d) float64 — its parameters
    seeds (H,) int64 — the replicate index of the history on its task
    episode_returns (H, E) float32 — every episode's return, recorded or not (learning curves)
    attrs["meta"] — JSON: format version, kind, family config, split, source and its config, ...
Chunked one history at a time so windows stream from disk, and written part by part. The first 512 bytes (an HDF5 "user
block", which HDF5 itself ignores) hold a magic line and the SHA-256 of the rest of the file,
checked before HDF5 parses anything: a truncated file or a flipped byte is a clear error, never
silently different data (nor a crash inside the HDF5 library). Written to a temporary name and
renamed into place, so a killed writer never leaves a half-file under the real name.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from ..atomic import atomic_write
from ..errors import UserError

FORMAT_VERSION = 2
MAGIC = "icrl history file"
HEADER_BYTES = 512
KINDS = ("histories", "expert")
DTYPES = {"obs": np.uint8, "actions": np.uint8, "rewards": np.float16, "task_ids": np.int32,
          "tasks": np.float64, "seeds": np.int64, "episode_returns": np.float32}
STEP_KEYS = ("obs", "actions", "rewards")
REQUIRED_META = ("format_version", "kind", "family", "split", "source", "episode_len",
                 "n_episodes", "every", "record_from")


@dataclass
class HistoryArrays:
    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    task_ids: np.ndarray
    tasks: np.ndarray
    seeds: np.ndarray
    episode_returns: np.ndarray


def write_store(path: str | Path, parts: HistoryArrays | Iterable[HistoryArrays],
                meta: dict) -> Path:
    """Write a history file atomically and return its path. `parts` are consecutive groups of
    histories (or one HistoryArrays), appended in order: the whole dataset need not fit in memory."""
    path = Path(path)
    meta = {"format_version": FORMAT_VERSION, **meta}
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"metadata is missing {missing}")
    parts = [parts] if isinstance(parts, HistoryArrays) else parts
    with atomic_write(path) as tmp:
        with h5py.File(tmp, "w", userblock_size=HEADER_BYTES) as f:
            H = T = 0
            for part in parts:
                T = part.actions.shape[1]
                for key, dtype in DTYPES.items():
                    _append(f, key, getattr(part, key).astype(dtype))
                H += len(part.actions)
            if H == 0:
                raise ValueError("no histories to write")
            meta.update(n_histories=int(H), n_steps=int(T))
            f.attrs["meta"] = json.dumps(meta)
        header = f"{MAGIC}\nsha256 {_digest(tmp)}\n".encode()
        with open(tmp, "r+b") as raw:
            raw.write(header.ljust(HEADER_BYTES, b"\0"))
    return path


def _append(f: h5py.File, key: str, data: np.ndarray):
    """Append rows to a dataset, creating it on first use. The per-step arrays are stored one
    history per HDF5 chunk (windows read single histories); the per-history columns in blocks."""
    if key not in f:
        rows = 1 if key in STEP_KEYS else 1024
        f.create_dataset(key, data=data, maxshape=(None, *data.shape[1:]),
                         chunks=(rows, *data.shape[1:]))
        return
    ds = f[key]
    if ds.shape[1:] != data.shape[1:]:
        raise ValueError(f"{key}: parts have shapes {ds.shape[1:]} and {data.shape[1:]}")
    ds.resize(len(ds) + len(data), axis=0)
    ds[-len(data):] = data


class HistoryStore:
    """Read access to a history file, validated on open. Arrays are read lazily, row by row."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise UserError(f"{self.path} is a directory, expected a history file (.h5)")
        if not self.path.is_file():
            raise UserError(f"{self.path}: is not a file")
        self._check_header()
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as e:
            raise UserError(f"{self.path}: not a readable HDF5 history file ({_short(e)})") from None
        try:
            self._validate()
        except UserError:
            self.file.close()
            raise
        except Exception as e:  # h5py raises OSError, KeyError, ... on damaged structures
            self.file.close()
            raise UserError(f"{self.path}: file is damaged ({_short(e)})") from None

    def _validate(self):
        f, name = self.file, self.path
        if "meta" not in f.attrs:
            raise UserError(f"{name}: not an icrl history file (no metadata)")
        try:
            self.meta = json.loads(f.attrs["meta"])
        except (ValueError, TypeError):
            raise UserError(f"{name}: metadata is not valid JSON") from None
        missing = [k for k in REQUIRED_META + ("n_histories", "n_steps") if k not in self.meta]
        if missing:
            raise UserError(f"{name}: metadata lacks {', '.join(missing)}")
        if self.meta["format_version"] != FORMAT_VERSION:
            raise UserError(f"{name}: format version {self.meta['format_version']}, "
                            f"this icrl reads version {FORMAT_VERSION}")
        if self.meta["kind"] not in KINDS:
            raise UserError(f"{name}: unknown kind {self.meta['kind']!r}")
        H, T = self.meta["n_histories"], self.meta["n_steps"]
        expected = {"obs": (H, T, None), "actions": (H, T), "rewards": (H, T), "task_ids": (H,),
                    "tasks": (H, None),
                    "seeds": (H,), "episode_returns": (H, self.meta["n_episodes"])}
        for key, shape in expected.items():
            if key not in f:
                raise UserError(f"{name}: dataset {key!r} is missing")
            got = f[key].shape
            if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
                raise UserError(f"{name}: dataset {key!r} has shape {got}, expected {shape}")
        if T == 0 or H == 0:
            raise UserError(f"{name}: holds no steps")
        if T % self.meta["episode_len"]:
            raise UserError(f"{name}: {T} steps is not a whole number of episodes")

    def _check_header(self):
        with open(self.path, "rb") as raw:
            header = raw.read(HEADER_BYTES)
        lines = header.rstrip(b"\0").decode(errors="replace").splitlines()
        if len(header) < HEADER_BYTES or not lines or lines[0] != MAGIC:
            raise UserError(f"{self.path}: not an icrl history file")
        if len(lines) < 2 or lines[1] != f"sha256 {_digest(self.path)}":
            raise UserError(f"{self.path}: file is corrupt or truncated (checksum mismatch)")

    @property
    def n_histories(self) -> int:
        return self.meta["n_histories"]

    @property
    def n_steps(self) -> int:
        return self.meta["n_steps"]

    def family_config(self) -> dict:
        return self.meta["family"]

    def read(self, rows) -> dict[str, np.ndarray]:
        """obs, actions, rewards of the given history rows (sorted indices or a slice)."""
        try:
            return {key: self.file[key][rows] for key in STEP_KEYS}
        except OSError as e:
            raise UserError(f"{self.path}: data is corrupt ({_short(e)})") from None

    def column(self, key: str) -> np.ndarray:
        try:
            return self.file[key][...]
        except OSError as e:
            raise UserError(f"{self.path}: data is corrupt ({_short(e)})") from None

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _digest(path: Path) -> str:
    """SHA-256 of everything after the header."""
    h = hashlib.sha256()
    with open(path, "rb") as raw:
        raw.seek(HEADER_BYTES)
        for block in iter(lambda: raw.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _short(err: Exception) -> str:
    return str(err).splitlines()[0][:160]

"""The on-disk history store: one HDF5 file of learning histories (or expert episodes) + metadata.

Layout (H histories of T steps; observations of the family's ObsSpec shape):
    obs (H, T, *shape) spec.store_dtype · actions (H, T) uint8 · rewards (H, T) float16
    dones (H, T) bool — True where an episode ends with that step (episodes may vary in length)
    task_ids (H,) int32 — row of the family's task table · tasks (H, d) float64 — its parameters
    seeds (H,) int64 — the replicate index of the history on its task
    episode_returns (H, E) float32 — every episode's return, recorded or not (learning curves);
        NaN after a row's last finished episode where rows finish different numbers (replay)
    attrs["meta"] — JSON: format version, kind, family config, obs_spec, n_actions, split, ...
Kinds: "histories" (learning histories for AD), "expert" (converged-policy episodes for ED) and
"replay" (every transition of whole learning runs, episodes of any length: Decision Transformer
data, like DQN-Replay). Per-step arrays are chunked one history at a time (at most STEP_CHUNK
steps; images: up to 64 frames, gzip-compressed) and
every chunk carries a Fletcher-32 checksum that HDF5 verifies whenever the chunk is read, so a
damaged file is caught where it is read, without hashing the whole file on open. The first 512
bytes (an HDF5 "user block", which HDF5 ignores) hold a magic line, the SHA-256 computed while
writing (the file's identity, not re-checked on open), the format version and the file's size.
Written to a temporary name and renamed into place, so a killed writer never leaves a half-file.
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
from ..envs.spec import ObsSpec
from ..errors import UserError

FORMAT_VERSION = 3
MAGIC = "icrl history file"
HEADER_BYTES = 512
KINDS = ("histories", "expert", "replay")
# Dtypes of every dataset but obs (whose dtype comes from the ObsSpec).
DTYPES = {"actions": np.uint8, "rewards": np.float16, "dones": np.bool_, "task_ids": np.int32,
          "tasks": np.float64, "seeds": np.int64, "episode_returns": np.float32}
STEP_KEYS = ("obs", "actions", "rewards", "dones")
COLUMN_KEYS = ("task_ids", "tasks", "seeds", "episode_returns")
REQUIRED_META = ("format_version", "kind", "family", "obs_spec", "n_actions", "split", "source",
                 "episode_len", "n_episodes", "every", "record_from")
IMAGE_CHUNK_STEPS = 64  # frames per compressed chunk: a window read decompresses little extra
STEP_CHUNK = 16384      # steps per chunk of the other per-step arrays (long replay rows)
GAP_BYTES = 16 << 10    # holes a block read reads through (and drops): ~ one h5py call
SLAB_BYTES = 16 << 20   # the most a block read holds besides its result


@dataclass
class HistoryArrays:
    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    task_ids: np.ndarray
    tasks: np.ndarray
    seeds: np.ndarray
    episode_returns: np.ndarray


def episode_steps(dones: np.ndarray) -> np.ndarray:
    """Steps since the current episode began, for rows of consecutive steps (..., n): 0 after a
    done and at the first step of the range (a range that starts mid-episode counts from there)."""
    n = dones.shape[-1]
    pos = np.arange(n)
    last_done = np.maximum.accumulate(np.where(dones, pos, -1), axis=-1)  # at or before t
    before = np.concatenate([np.full(dones.shape[:-1] + (1,), -1), last_done[..., :-1]], axis=-1)
    return pos - before - 1


def bad_values(key: str, values: np.ndarray, meta: dict) -> str | None:
    """What is wrong with values read from (or written to) dataset `key`, or None. For dones:
    `values` are consecutive steps, and no run of episode_len of them may lack an episode end."""
    if values.size == 0:
        return None
    if key == "obs":
        spec = ObsSpec.from_dict(meta["obs_spec"])
        if spec.kind == "discrete":  # unsigned, so >= 0; images: any uint8 is a pixel
            # a max per component: max(axis=0) over rows of 2 or 3 values is ~30x slower
            flat = values.reshape(-1, spec.shape[0])
            for i, h in enumerate(spec.high):
                t = flat[:, i].max()
                if t >= h:
                    return f"holds observation component {i} = {t}, outside [0, {h})"
    elif key == "actions":
        if values.max() >= meta["n_actions"]:
            return f"holds action {values.max()}, but the family has {meta['n_actions']} actions"
    elif key in ("rewards", "tasks"):
        if not np.isfinite(values).all():
            return f"holds a non-finite value ({values[~np.isfinite(values)].flat[0]})"
    elif key == "episode_returns":  # NaN only pads a row after its last finished episode
        missing = np.isnan(values)
        if np.isinf(values).any() or (missing[..., :-1] & ~missing[..., 1:]).any():
            return "holds an infinite return or a return after a missing one"
    elif key == "dones":
        # L steps in a row without a done: the running count of dones is the same L apart
        L = meta["episode_len"]
        ends = np.zeros(values.shape[:-1] + (values.shape[-1] + 1,), np.int32)
        np.cumsum(values, axis=-1, out=ends[..., 1:])
        if (ends[..., L:] == ends[..., :-L]).any():
            return f"holds an episode of more than episode_len = {L} steps"
    elif values.min() < 0:  # task_ids, seeds
        return f"holds a negative value ({values.min()})"
    return None


def write_store(path: str | Path, parts: HistoryArrays | Iterable[HistoryArrays],
                meta: dict) -> Path:
    """Write a history file atomically and return its path. `parts` are consecutive groups of
    histories (or one HistoryArrays), appended in order: the whole dataset need not fit in memory.
    The SHA-256 in the header is taken over each dataset's bytes as they are appended, then the
    metadata: it depends on the contents only, not on how they were split into parts."""
    path = Path(path)
    meta = {"format_version": FORMAT_VERSION, **meta}
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"metadata is missing {missing}")
    if not 1 <= meta["n_actions"] <= 256:
        raise ValueError(f"actions are stored as uint8: n_actions {meta['n_actions']} > 256")
    spec = ObsSpec.from_dict(meta["obs_spec"])
    dtypes = {"obs": spec.store_dtype, **DTYPES}
    parts = [parts] if isinstance(parts, HistoryArrays) else parts
    hashes = {key: hashlib.sha256() for key in dtypes}
    with atomic_write(path) as tmp:
        # HDF5 1.10's file format: its metadata (object headers, chunk indexes) is checksummed too
        with h5py.File(tmp, "w", userblock_size=HEADER_BYTES, libver=("v110", "v110")) as f:
            H = T = 0
            for part in parts:
                T = part.actions.shape[1]
                if part.obs.shape[2:] != spec.shape:
                    raise ValueError(f"obs of shape {part.obs.shape[2:]}, spec says {spec.shape}")
                for key, dtype in dtypes.items():
                    data = np.ascontiguousarray(getattr(part, key).astype(dtype, copy=False))
                    problem = bad_values(key, data, meta)
                    if problem:
                        raise ValueError(f"{key} {problem}")
                    _append(f, key, data, spec)
                    hashes[key].update(data)
                H += len(part.actions)
            if H == 0:
                raise ValueError("no histories to write")
            meta.update(n_histories=int(H), n_steps=int(T))
            text = json.dumps(meta)
            f.attrs["meta"] = text
        digest = hashlib.sha256()
        for key, h in hashes.items():
            digest.update(f"{key} {h.hexdigest()}\n".encode())
        digest.update(text.encode())
        size = tmp.stat().st_size
        # The metadata sits in an HDF5 heap without a checksum: its hash is checked on open.
        header = (f"{MAGIC}\nsha256 {digest.hexdigest()}\nformat {FORMAT_VERSION}\nsize {size}\n"
                  f"meta {_sha(text)}\n")
        with open(tmp, "r+b") as raw:
            raw.write(f"{header}check {_sha(header)}\n".encode().ljust(HEADER_BYTES, b"\0"))
    return path


def _append(f: h5py.File, key: str, data: np.ndarray, spec: ObsSpec):
    """Append rows to a dataset, creating it on first use. Per-step arrays: one history per
    chunk (a block read takes whole histories), image frames in compressed chunks of at most
    IMAGE_CHUNK_STEPS steps (a window read takes a few); per-history columns: 1024 rows."""
    if key not in f:
        options = {"chunks": (1024, *data.shape[1:]), "compression": "gzip", "fletcher32": True}
        if key == "obs" and spec.kind == "image":
            steps = min(data.shape[1], IMAGE_CHUNK_STEPS)
            options.update(chunks=(1, steps, *data.shape[2:]))
        elif key in STEP_KEYS:
            options.update(chunks=(1, min(data.shape[1], STEP_CHUNK), *data.shape[2:]))
        f.create_dataset(key, data=data, maxshape=(None, *data.shape[1:]), **options)
        return
    ds = f[key]
    if ds.shape[1:] != data.shape[1:]:
        raise ValueError(f"{key}: parts have shapes {ds.shape[1:]} and {data.shape[1:]}")
    ds.resize(len(ds) + len(data), axis=0)
    ds[-len(data):] = data


class HistoryStore:
    """Read access to a history file. Opening reads the header and HDF5's metadata only; data is
    read on demand (`read`, `column`), and checked as it is read: HDF5 verifies every chunk's
    checksum, and the values must fit the metadata (observation bounds, actions, finite rewards,
    episode lengths). Every problem is a one-line UserError naming the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise UserError(f"{self.path} is a directory, expected a history file (.h5)")
        if not self.path.is_file():
            raise UserError(f"{self.path}: is not a file")
        self._header = self._check_header()
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as e:
            raise UserError(f"{self.path}: file is corrupt or truncated ({_short(e)})") from None
        try:
            self._validate()
        except UserError:
            self.file.close()
            raise
        except Exception as e:  # h5py raises OSError, KeyError, ... on damaged structures
            self.file.close()
            raise UserError(f"{self.path}: file is corrupt or truncated ({_short(e)})") from None

    def _check_header(self) -> dict:
        """The header's fields (sha256, format, size, meta), checked against the file."""
        with open(self.path, "rb") as raw:
            header = raw.read(HEADER_BYTES)
        text = header.rstrip(b"\0").decode(errors="replace")
        lines = text.splitlines()
        if len(header) < HEADER_BYTES or not lines or lines[0] != MAGIC:
            raise UserError(f"{self.path}: not an icrl history file")
        fields = dict(line.split(" ", 1) for line in lines[1:] if " " in line)
        if "format" not in fields:  # format 2 headers held only the magic and a checksum
            raise UserError(f"{self.path}: history file format 2 was written by an older icrl; "
                            f"regenerate it with `icrl generate` (or `icrl run ... --fresh`)")
        signed = text[: text.rfind("check ")]
        if fields.get("check") != _sha(signed) or not {"sha256", "size", "meta"} <= set(fields):
            raise UserError(f"{self.path}: file is corrupt or truncated (damaged header)")
        if fields["format"] != str(FORMAT_VERSION):
            raise UserError(f"{self.path}: history file format {fields['format']}, this icrl "
                            f"reads format {FORMAT_VERSION}")
        size = self.path.stat().st_size
        if fields["size"] != str(size):
            raise UserError(f"{self.path}: file is corrupt or truncated ({size} bytes, the header "
                            f"says {fields['size']})")
        return fields

    def _validate(self):
        f, name = self.file, self.path
        if "meta" not in f.attrs:
            raise UserError(f"{name}: not an icrl history file (no metadata)")
        text = f.attrs["meta"]
        if not isinstance(text, str) or _sha(text) != self._header["meta"]:
            raise UserError(f"{name}: file is corrupt or truncated (metadata checksum mismatch)")
        try:
            self.meta = json.loads(text)
        except ValueError:
            raise UserError(f"{name}: metadata is not valid JSON") from None
        missing = [k for k in REQUIRED_META + ("n_histories", "n_steps") if k not in self.meta]
        if missing:
            raise UserError(f"{name}: metadata lacks {', '.join(missing)}")
        if self.meta["format_version"] != FORMAT_VERSION:
            raise UserError(f"{name}: format version {self.meta['format_version']}, "
                            f"this icrl reads version {FORMAT_VERSION}")
        if self.meta["kind"] not in KINDS:
            raise UserError(f"{name}: unknown kind {self.meta['kind']!r}")
        try:
            self.obs_spec = ObsSpec.from_dict(self.meta["obs_spec"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{name}: bad obs_spec in the metadata ({_short(e)})") from None
        H, T = self.meta["n_histories"], self.meta["n_steps"]
        n_actions, L = self.meta["n_actions"], self.meta["episode_len"]
        for what, value in (("n_actions", n_actions), ("episode_len", L)):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{name}: {what} must be a positive integer, got {value!r}")
        if T == 0 or H == 0:
            raise UserError(f"{name}: holds no steps")
        expected = {"obs": (H, T, *self.obs_spec.shape), "actions": (H, T), "rewards": (H, T),
                    "dones": (H, T), "task_ids": (H,), "tasks": (H, None), "seeds": (H,),
                    "episode_returns": (H, self.meta["n_episodes"])}
        dtypes = {"obs": self.obs_spec.store_dtype, **DTYPES}
        for key, shape in expected.items():
            if key not in f:
                raise UserError(f"{name}: dataset {key!r} is missing")
            ds = f[key]
            got = ds.shape
            if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
                raise UserError(f"{name}: dataset {key!r} has shape {got}, expected {shape}")
            if ds.dtype != dtypes[key] or not ds.fletcher32:
                raise UserError(f"{name}: dataset {key!r} is {ds.dtype}"
                                f"{'' if ds.fletcher32 else ' without checksums'}, expected "
                                f"{np.dtype(dtypes[key])} with checksums")

    @property
    def n_histories(self) -> int:
        return self.meta["n_histories"]

    @property
    def n_steps(self) -> int:
        return self.meta["n_steps"]

    @property
    def n_actions(self) -> int:
        return self.meta["n_actions"]

    @property
    def episode_len(self) -> int:
        """The longest an episode may be (episodes end where `dones` says)."""
        return self.meta["episode_len"]

    def family_config(self) -> dict:
        return self.meta["family"]

    def fingerprint(self) -> dict:
        """What identifies the data: the SHA-256 the writer computed over the contents and the
        metadata, read from the header (not recomputed: opening stays cheap)."""
        return {"name": self.path.name, "n_histories": self.n_histories,
                "n_steps": self.n_steps, "sha256": self._header["sha256"]}

    def read(self, rows, steps=slice(None), keys=STEP_KEYS) -> dict[str, np.ndarray]:
        """Per-step arrays of the given history rows (an index, sorted indices or a slice) over
        consecutive `steps` (a slice), checked against the metadata."""
        return {key: self._read(key, rows, steps) for key in keys}

    def column(self, key: str) -> np.ndarray:
        """A per-history column (task_ids, tasks, seeds, episode_returns), checked."""
        return self._read(key, slice(None))

    def _read(self, key: str, rows, steps=None) -> np.ndarray:
        ds = self.file[key]
        try:
            if np.ndim(rows) == 1:
                values = _read_rows(ds, rows, steps)
            else:
                values = ds[rows] if steps is None else ds[rows, steps]
        except OSError as e:  # a chunk failing its checksum, or a damaged structure
            raise UserError(f"{self.path}: dataset {key!r} is corrupt or truncated "
                            f"({_short(e)})") from None
        problem = bad_values(key, values, self.meta)
        if problem:
            raise UserError(f"{self.path}: dataset {key!r} {problem}")
        return values

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _read_rows(ds: h5py.Dataset, rows, steps: slice) -> np.ndarray:
    """ds[rows, steps] for a list of rows. Row by row, h5py's read_direct cost ~50 µs a row,
    several times the row's own reading, inflating and checksum (~7 µs a small chunk); its
    fancy indexing is slow too. So sorted rows are read in groups, one slice per group, through
    holes of at most GAP_BYTES between wanted rows (dropped after the read). Bound: a group
    spans at most twice its wanted rows and at most SLAB_BYTES (or one row), so at most 2x the
    requested rows are read and at most max(SLAB_BYTES, one row) is held besides the result.
    Rows out of order or negative are read one at a time, as h5py indexes them."""
    rows = np.asarray(rows).tolist()
    n = len(range(*steps.indices(ds.shape[1])))
    values = np.empty((len(rows), n, *ds.shape[2:]), ds.dtype)
    row_bytes = max(1, values[:1].nbytes)
    gap, cap, H = GAP_BYTES // row_bytes + 1, max(1, SLAB_BYTES // row_bytes), len(ds)
    start = 0
    for i in range(1, len(rows) + 1):
        first = rows[start]
        if (i < len(rows) and 0 <= first and 0 <= rows[i] - rows[i - 1] <= gap
                and rows[i] - first < min(2 * (i - start + 1), cap) and rows[i] < H):
            continue  # row i joins the group
        if i - start == 1:  # h5py's own indexing: negative rows, out-of-range errors
            values[start] = ds[first, steps]
        else:  # the wanted rows of the slice, copied straight into the result
            np.take(ds[first: rows[i - 1] + 1, steps], np.subtract(rows[start:i], first), axis=0,
                    out=values[start:i])
        start = i
    return values


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _short(err: Exception) -> str:
    return str(err).splitlines()[0][:160] if str(err) else type(err).__name__

"""Long jobs cut into seeded chunks that survive interruption and can be shared out.

Generating histories and evaluating a checkpoint both split their rows into chunks, each with its
own seed (`chunk_seed`). Every finished chunk is saved atomically as `chunk-NNNNN.npz` in a
`NAME.parts/` folder beside the output `NAME`, next to `plan.json`, the settings that made them.
A rerun with the same settings skips the chunks already there, so an interrupted job ends with
exactly the output of an uninterrupted one.

The same property lets N processes or hosts share a job: with `--shard I/N` a process runs only
the chunks i with i % N == I and leaves them in the folder. A last run without a shard finds every
chunk done (or does what is missing) and joins them: the very file one process would have written.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .errors import UserError


def chunk_seed(seed: int, chunk: int) -> int:
    """Chunk 0 uses `seed` itself (a one-chunk job is the plain seeded run); the others get
    independent streams derived from (seed, chunk)."""
    if chunk == 0:
        return seed
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1, np.uint32)[0])


@dataclass(frozen=True)
class Shard:
    """Share `index` of `count` of a chunked job: chunks i with i % count == index."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not (isinstance(self.index, int) and isinstance(self.count, int)
                and self.count >= 1 and 0 <= self.index < self.count):
            raise UserError(f"a shard is I/N with 0 <= I < N, got {self.index}/{self.count}")

    @property
    def whole(self) -> bool:
        return self.count == 1

    def owns(self, chunk: int) -> bool:
        return chunk % self.count == self.index

    def __str__(self):
        return f"{self.index}/{self.count}"

    def lock_path(self, out: str | Path) -> Path:
        """What a run on `out` locks (icrl.atomic.output_lock): the output itself when joining,
        else its own share, so that the shards of one output run side by side."""
        out = Path(out)
        return out if self.whole else out.with_name(f"{out.name}.shard{self.index}of{self.count}")


WHOLE = Shard()
# Where launchers put a process's rank: torchrun, then Slurm (one task per process).
RANK_VARIABLES = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"))


def parse_shard(text: str) -> Shard:
    """`I/N`, or `auto`: this process's rank among its launcher's processes (torchrun's RANK and
    WORLD_SIZE, else Slurm's SLURM_PROCID and SLURM_NTASKS)."""
    if text == "auto":
        for rank, size in RANK_VARIABLES:
            if rank in os.environ and size in os.environ:
                text = f"{os.environ[rank]}/{os.environ[size]}"
                break
        else:
            raise UserError("--shard auto: no launcher's rank found (RANK and WORLD_SIZE from "
                            "torchrun, or SLURM_PROCID and SLURM_NTASKS); give --shard I/N")
    index, sep, count = text.partition("/")
    try:
        if sep:
            return Shard(int(index), int(count))
    except ValueError:
        pass
    raise UserError(f"--shard expects I/N (e.g. 0/4) or auto, got {text!r}")


class Parts:
    """The chunk folder of one output: `plan` is the job's settings, `keys` the arrays of a chunk."""

    def __init__(self, out: str | Path, plan: dict, keys: tuple[str, ...]):
        self.folder = Path(out).with_name(Path(out).name + ".parts")
        self.plan = json.loads(json.dumps(plan))  # as it reads back from disk
        self.keys = keys

    def start(self):
        """Create the folder, or check that the one there belongs to this same job. Shards of one
        job may start at the same time: each writes the same plan (atomically) or checks it."""
        plan = self.folder / "plan.json"
        self.folder.mkdir(parents=True, exist_ok=True)
        if not plan.exists():
            if any(self.folder.glob("chunk-*.npz")):
                raise UserError(f"{self.folder} holds chunks but no plan.json; delete it to "
                                f"start over")
            # Written whole under a name of its own, then linked into place: of several shards
            # starting at once, one plan lands and the others compare theirs with it.
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".plan.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(self.plan, f, indent=2)
                os.link(tmp, plan)
                return
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        try:
            same = json.loads(plan.read_text()) == self.plan
        except (OSError, ValueError):
            same = False
        if not same:
            raise UserError(f"{self.folder} holds an unfinished run with other settings; rerun "
                            f"it with the same settings to finish it, or delete {self.folder}")

    def path(self, chunk: int) -> Path:
        return self.folder / f"chunk-{chunk:05d}.npz"

    def save(self, chunk: int, arrays: dict):
        with atomic_write(self.path(chunk)) as tmp:
            np.savez(tmp, **arrays)

    def load(self, chunk: int) -> dict | None:
        """A saved chunk, or None if it is missing or unreadable (its CRCs are checked on read)."""
        try:
            with np.load(self.path(chunk)) as f:
                return {k: f[k] for k in self.keys}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None

    def missing(self, chunks) -> list[int]:
        return [i for i in chunks if self.load(i) is None]

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)

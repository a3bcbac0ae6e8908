"""Watermaze: find a hidden platform in a circular pool from a first-person RGB view.

The project's stand-in for DMLab's `rooms_watermaze` (which cannot be installed here). The agent
swims in a pool of radius 1 (it cannot leave the water) in the middle of a round room; the room's
wall (radius 1.4) is painted in eight coloured sectors with vertical stripes, so the colour in
view gives the heading and the wall's apparent height gives the distance to it. A white rim marks
the pool's edge.

A task is the centre (x, y) of a hidden circular platform that lies inside the pool. Every episode
starts at the pool's centre facing north (+y). Reward 1 on *entering* the platform, after which the
agent is moved to a random point of the pool off the platform, facing one of the eight headings
its turns can reach, and the episode goes on; 50 steps per episode.

Actions (headings in radians, counter-clockwise from +x): forward, backward, strafe left, strafe
right (each moves `step`), turn left, turn right (each turns `turn_degrees`), forward + turn left,
forward + turn right (turn, then move). A move that would leave the pool stops at its edge.

Frames are rendered by ray casting in NumPy, vectorised over agents and screen columns (the
ray/circle intersections are analytic, and each column's image is gathered from a table of every
column there can be): one call renders the whole batch; no display, no OpenGL.

`state()` gives the true state as integers for learners that cannot read pixels: the (x, y) bin
on a `state_bins` x `state_bins` grid over the pool, and the heading bin (one bin per turn, bin 0
centred on north, so turning moves exactly one bin).

`save_views(path)` and `save_episode_gif(path)` draw the pictures of docs/watermaze.md.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .base import BatchedEnv, TaskFamily
from .spec import ObsSpec

ACTION_NAMES = ("forward", "backward", "strafe_left", "strafe_right", "turn_left", "turn_right",
                "forward_turn_left", "forward_turn_right")
# Per action: (moves forward, moves left, turns left), in units of `step` and of the turn angle.
ACTION_EFFECTS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0],
                           [0, 0, 1], [0, 0, -1], [1, 0, 1], [1, 0, -1]], dtype=np.float64)

POOL_RADIUS = 1.0
START_HEADING = math.pi / 2   # north: the same first view in every episode


# ---- motion --------------------------------------------------------------------------------------

def move(pos: np.ndarray, heading: np.ndarray, actions: np.ndarray, step: float,
         turn: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions (..., 2) and headings (...) after `actions` (...): turn first, then move; a move
    that would leave the pool ends on its edge (the agent slides along the wall)."""
    forward, left, turning = np.moveaxis(ACTION_EFFECTS[actions], -1, 0)
    heading = np.mod(heading + turning * turn, 2 * math.pi)
    cos, sin = np.cos(heading), np.sin(heading)
    # "Left" of a heading (cos, sin) is (-sin, cos).
    new = pos + step * np.stack([forward * cos - left * sin, forward * sin + left * cos], axis=-1)
    radius = np.sqrt((new ** 2).sum(-1, keepdims=True))
    new = np.where(radius > POOL_RADIUS, new * (POOL_RADIUS / np.maximum(radius, 1e-12)), new)
    return new, heading


def on_platform(pos: np.ndarray, platforms: np.ndarray, radius: float) -> np.ndarray:
    return ((pos - platforms) ** 2).sum(-1) <= radius ** 2


# ---- rendering -----------------------------------------------------------------------------------

HEIGHT, WIDTH = 72, 96
# Eight wall sectors, centred on east, north-east, north, ...: distinct hues.
WALL_COLOURS = np.array([[220, 60, 60], [240, 150, 40], [235, 225, 70], [80, 190, 70],
                         [50, 195, 195], [70, 100, 230], [150, 75, 215], [235, 110, 195]],
                        dtype=np.float32)
# What the floor is made of, seen from above the water (the two tones of the old tiled floor; the
# floor is now drawn in their mean, shaded per screen row).
FLOOR_COLOURS = {"deck": [[150, 145, 135], [120, 115, 108]],
                 "rim": [[235, 235, 235], [235, 235, 235]],
                 "water": [[30, 85, 150], [45, 110, 180]]}
CEILING_COLOUR = np.array([55, 60, 75], dtype=np.float32)


@dataclass(frozen=True)
class Camera:
    """A pinhole camera `eye_height` above the water in a room with a round wall.

    Every screen column shows, from the top: ceiling, wall, then deck, rim and water, and what it
    shows is fixed by three things found per column (96 per agent, cheap): the distance `w` at
    which its ray meets the room's wall (the wall's rows and shade), the distance `p` at which it
    leaves the pool (the rows of rim and water) and where on the wall it lands (sector and stripe:
    the colour). Each distance is binned at the values where some drawn row count or shade
    changes, so a bin draws exactly one way, and a fixed table holds the image of every column
    there can be. A frame is then one gather of whole column images, keyed by (w bin, p bin,
    colour), and two copies into (H, W, 3) order.
    """

    wall_radius: float = 1.4
    wall_height: float = 0.6
    eye_height: float = 0.2
    fov_degrees: float = 90.0
    rim_width: float = 0.05
    stripes: int = 64              # around the whole wall: parallax while turning and moving
    fog_levels: int = 16           # wall shades, from the nearest to the farthest wall
    split: int = 40                # rows above it: always ceiling or wall
    part: int = 16                 # agents per part of a large batch's copies (see _copy_in_parts)

    @cached_property
    def focal(self) -> float:
        return (WIDTH / 2) / math.tan(math.radians(self.fov_degrees) / 2)

    @cached_property
    def column_offsets(self) -> np.ndarray:
        """Lateral slope of each column's ray per unit of forward distance, (W,); positive right."""
        return ((np.arange(WIDTH) + 0.5 - WIDTH / 2) / self.focal).astype(np.float32)

    @cached_property
    def floor_depths(self) -> np.ndarray:
        """Forward distance of the floor seen in each row of the lower half, (H/2,)."""
        return self.eye_height * self.focal / (np.arange(HEIGHT // 2) + 0.5)

    @cached_property
    def nearest_wall(self) -> float:
        return self.wall_radius - POOL_RADIUS

    @cached_property
    def _fog_step(self) -> float:
        farthest = self.wall_radius + POOL_RADIUS
        return (farthest - self.nearest_wall) / self.fog_levels

    # -- what a column shows, as functions of its distances (float64, used to build the table) --

    def _first_wall_row(self, w):
        """The first row of the wall above the horizon (rows above it: ceiling)."""
        above = self.focal * (self.wall_height - self.eye_height) / w
        return np.clip(np.ceil(HEIGHT // 2 - 0.5 - above), 0, HEIGHT // 2)

    def _rows_beyond(self, depth):
        """How many rows below the horizon look farther than `depth`."""
        count = np.floor(self.eye_height * self.focal / np.maximum(depth, 1e-6) + 0.5)
        return np.clip(count, 0, HEIGHT // 2)

    def _fog_level(self, w):
        return np.clip(np.floor((w - self.nearest_wall) / self._fog_step), 0, self.fog_levels - 1)

    def _thresholds(self, counts, step, lo, hi):
        """Sorted distances in (lo, hi) at which `counts(distance)` changes (found on a fine grid,
        then refined by bisection), as float32 bin edges."""
        grid = np.linspace(lo, hi, 40_001)   # finer than the closest two thresholds
        values = counts(grid)
        left, right = grid[:-1][values[1:] != values[:-1]], grid[1:][values[1:] != values[:-1]]
        for _ in range(40):
            mid = (left + right) / 2
            same = counts(mid) == counts(left)
            left, right = np.where(same, mid, left), np.where(same, right, mid)
        return right.astype(np.float32)

    @cached_property
    def _edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bin edges of w for the upper rows (first wall row, shade), of w for the lower rows
        (wall rows below the horizon, shade) and of p (first rim row, first water row)."""
        fog = self._fog_level
        near, far = self.nearest_wall - 0.01, self.wall_radius + POOL_RADIUS + 0.01
        upper = self._thresholds(lambda w: self._first_wall_row(w) * 64 + fog(w), 0, near, far)
        lower = self._thresholds(lambda w: self._rows_beyond(w) * 64 + fog(w), 0, near, far)
        pool = self._thresholds(lambda p: self._rows_beyond(p) * 64 +
                                self._rows_beyond(p + self.rim_width), 0, 0.0, 2 * POOL_RADIUS)
        return upper, lower, pool

    @staticmethod
    def _representatives(edges: np.ndarray) -> np.ndarray:
        """A distance inside each of the len(edges) + 1 bins (np.searchsorted numbering)."""
        edges = edges.astype(np.float64)
        return np.concatenate([[edges[0] - 1e-3], (edges[:-1] + edges[1:]) / 2,
                               [edges[-1] + 1e-3]])

    @cached_property
    def _wall_colours(self) -> np.ndarray:
        """Per stripe s of the wall (0 .. stripes-1 counter-clockwise from east): RGB (S, 3)."""
        s = np.arange(self.stripes)
        sector = np.floor((s + 0.5) / self.stripes * 8 + 0.5).astype(np.int64) % 8
        shade = np.where(s % 2 == 0, 1.0, 0.8)
        return WALL_COLOURS[sector].astype(np.float64) * shade[:, None]

    @cached_property
    def _stripe_colour(self) -> np.ndarray:
        """Per stripe, its colour's index (sector x light/dark, 16), (2S,) intp: stripes S .. 2S-1
        are stripes 0 .. S-1 again, so that the stripe numbers `render` finds need no modulo."""
        _, first, index = np.unique(self._wall_colours, axis=0, return_index=True,
                                    return_inverse=True)
        order = np.argsort(np.argsort(first))     # number the colours by their first stripe
        return np.tile(order[index.reshape(-1)].astype(np.intp), 2)

    @cached_property
    def _parts(self) -> tuple[np.ndarray, np.ndarray]:
        """Column images of the upper `split` rows per (w bin, colour), (Bu, C, split, 3), and of
        the rest per (w bin, p bin, colour), (Bl, P, C, rows, 3); uint8, w binned at the upper
        and at the lower edges respectively."""
        half = HEIGHT // 2
        up_edges, low_edges, pool_edges = self._edges
        wall = self._wall_colours[np.unique(self._stripe_colour, return_index=True)[1]]  # (C, 3)

        w = self._representatives(up_edges)[:, None, None, None]            # (Bu, 1, 1, 1)
        rows = np.arange(self.split)[None, None, :, None]                   # rows from the top
        ceiling = CEILING_COLOUR * np.linspace(0.7, 1.0, half)[:, None]     # (H/2, 3)
        ceiling = np.concatenate([ceiling, np.zeros((self.split - half, 3))])
        fogged = wall[None, :, None] * fog(self.nearest_wall + (self._fog_level(w) + 0.5) *
                                           self._fog_step)                  # (Bu, C, 1, 3)
        upper = np.where(rows < self._first_wall_row(w), ceiling[None, None], fogged)

        w = self._representatives(low_edges)[:, None, None, None, None]     # (Bl, 1, 1, 1, 1)
        p = self._representatives(pool_edges)[None, :, None, None, None]    # (1, P, 1, 1, 1)
        i = np.arange(self.split - half, half)[None, None, None, :, None]   # lower-half rows
        shade = fog(self.floor_depths[self.split - half:])[:, None]         # (rows, 1)
        deck, rim, water = (np.mean(FLOOR_COLOURS[name], axis=0) * shade
                            for name in ("deck", "rim", "water"))
        floor = np.where(i < self._rows_beyond(p + self.rim_width), deck,
                         np.where(i < self._rows_beyond(p), rim, water))    # (1, P, 1, rows, 3)
        fogged = wall[None, None, :, None] * fog(self.nearest_wall + (self._fog_level(w) + 0.5) *
                                                 self._fog_step)            # (Bl, 1, C, 1, 3)
        lower = np.where(i < self._rows_beyond(w), fogged, floor)          # (Bl, P, C, rows, 3)
        return upper.astype(np.uint8), lower.astype(np.uint8)

    @cached_property
    def _wall_edges(self) -> np.ndarray:
        """The union of the upper and lower bin edges of w: within one of its bins, both the
        upper and the lower part of a column draw one way."""
        return np.unique(np.concatenate(self._edges[:2]))

    @cached_property
    def _bins(self) -> tuple["Bins", "Bins"]:
        """Binning of w at `_wall_edges` and of p at the pool's edges."""
        return Bins(self._wall_edges), Bins(self._edges[2])

    @cached_property
    def _bin_steps(self) -> tuple[int, int]:
        """How much one more w bin and one more p bin add to a column's number in `_columns`."""
        n_colours = len(WALL_COLOURS) * 2
        return (len(self._edges[2]) + 1) * n_colours, n_colours

    @cached_property
    def _bin_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """`Bins.below` of the w and the p binning, times their `_bin_steps`."""
        return tuple(bins.below * step for bins, step in zip(self._bins, self._bin_steps))

    @cached_property
    def _columns(self) -> np.ndarray:
        """Every column image there can be, (J * P * C, H) RGBx pixels as uint32, top row first,
        numbered ((w bin) * P + (p bin)) * C + colour, w binned at `_wall_edges` (23 MB: one
        gather of whole columns from it is cheaper than two of single pixels from the parts)."""
        upper, lower = self._parts
        up_edges, low_edges, _ = self._edges
        w = self._representatives(self._wall_edges)
        upper = upper[np.searchsorted(up_edges, w)]                          # (J, C, split, 3)
        lower = lower[np.searchsorted(low_edges, w)]                         # (J, P, C, rows, 3)
        upper = np.broadcast_to(upper[:, None], lower.shape[:3] + upper.shape[2:])
        columns = np.zeros(lower.shape[:3] + (HEIGHT, 4), dtype=np.uint8)   # (J, P, C, H, 4)
        columns[..., :self.split, :3], columns[..., self.split:, :3] = upper, lower
        return columns.view(np.uint32).reshape(-1, HEIGHT)

    def render(self, pos: np.ndarray, heading: np.ndarray) -> np.ndarray:
        """Frames (n, 72, 96, 3) uint8 of agents at `pos` (n, 2) facing `heading` (n,). Every
        operation is elementwise over agents, so a frame does not depend on its batch."""
        return self.frames(self.column_index(pos, heading))

    def column_index(self, pos: np.ndarray, heading: np.ndarray) -> np.ndarray:
        """Each screen column's number in `_columns` (n, W): the rays and their bins."""
        pos = np.asarray(pos, dtype=np.float32).reshape(-1, 2)
        heading = np.asarray(heading, dtype=np.float32).reshape(-1)
        n = len(pos)
        px, py = pos[:, 0, None], pos[:, 1, None]                         # (n, 1)
        cos, sin = np.cos(heading)[:, None], np.sin(heading)[:, None]
        # Each column's ray: forward (cos, sin) plus offset x right (sin, -cos). Its forward
        # component is 1, so distances along it are distances in front of the camera (no fisheye).
        # The (n, W) arrays are worked on in place (out=): the same float32 operations, in the
        # same order, as `dx = cos + off * sin` etc., without a temporary per operation.
        off = self.column_offsets
        dx, dy, a, b, b2, w, p, t = np.empty((8, n, WIDTH), dtype=np.float32)
        np.add(np.multiply(off, sin, out=dx), cos, out=dx)               # cos + off * sin
        np.subtract(sin, np.multiply(off, cos, out=dy), out=dy)          # sin - off * cos
        np.add(np.multiply(dx, dx, out=a), np.multiply(dy, dy, out=t), out=a)
        np.add(np.multiply(px, dx, out=b), np.multiply(py, dy, out=t), out=b)
        c = px * px + py * py
        np.multiply(b, b, out=b2)
        # The forward distance at which each ray leaves the circle of each radius (the camera is
        # in the pool, so inside every circle): (sqrt(max(b2 - a (c - r^2), 0)) - b) / a.
        for radius, out in ((self.wall_radius, w), (POOL_RADIUS, p)):
            np.subtract(b2, np.multiply(a, c - np.float32(radius ** 2), out=out), out=out)
            np.sqrt(np.maximum(out, 0, out=out), out=out)
            np.divide(np.subtract(out, b, out=out), a, out=out)
        y = np.add(np.multiply(w, dy, out=dy), py, out=dy)                # where the ray meets
        x = np.add(np.multiply(w, dx, out=dx), px, out=dx)                # the wall
        angle = np.arctan2(y, x, out=y)                                   # (-pi, pi]
        stripe = np.add(np.multiply(angle, np.float32(self.stripes / (2 * math.pi)), out=angle),
                        np.float32(self.stripes), out=angle).astype(np.intp)  # in [S/2, 3S/2]
        # index = ((w bin) * P + (p bin)) * C + colour, each bin being `Bins`'s count of the edges
        # below the value's cell plus one if the cell's own edge is below it; the counts come
        # pre-multiplied by P * C and by C.
        index = self._stripe_colour.take(stripe)
        for bins, below, step, dist in zip(self._bins, self._bin_counts, self._bin_steps, (w, p)):
            cell = np.multiply(dist, bins.scale, out=t).astype(np.intp)
            index += below.take(cell, mode="clip")
            np.add(index, step, out=index, where=bins.edge.take(cell, mode="clip") < dist)
        return index

    def frames(self, index: np.ndarray) -> np.ndarray:
        """The frames (n, 72, 96, 3) of columns numbered `index` (n, W)."""
        # Whole column images as (n, W, H) RGBx pixels, then two copies into (n, H, W, 3): a
        # transpose of 4-byte pixels, and one that stores each pixel's 4 bytes at 3-byte steps in
        # increasing address order, so its x byte is overwritten by the next pixel's red one (the
        # last pixel's x lands in one spare byte). Each is several times cheaper than a transposing
        # copy of 3-byte pixels.
        n = len(index)
        if n >= 2 * self.part:
            return self._copy_in_parts(index)
        columns = self._columns.take(index, axis=0)
        rows = np.empty((n, HEIGHT, WIDTH), dtype=np.uint32)
        np.copyto(rows, columns.transpose(0, 2, 1))
        buffer = np.empty(n * HEIGHT * WIDTH * 3 + 1, dtype=np.uint8)
        np.copyto(np.ndarray((n, HEIGHT, WIDTH), dtype=np.uint32, buffer=buffer,
                             strides=(HEIGHT * WIDTH * 3, WIDTH * 3, 3)), rows)
        return buffer[:-1].reshape(n, HEIGHT, WIDTH, 3)

    def _copy_in_parts(self, index: np.ndarray) -> np.ndarray:
        """The same gather and two copies as `frames`', `part` agents at a time through two
        scratch arrays that are kept (per thread) and fit in a core's L2 cache, so the copies read
        what the gather has just written from the cache and no large temporaries are made. The
        parts go in order, so each one's spare byte is overwritten by the next part's red."""
        n, k = len(index), self.part
        buffer = np.empty(n * HEIGHT * WIDTH * 3 + 1, dtype=np.uint8)
        frames = np.ndarray((n, HEIGHT, WIDTH), dtype=np.uint32, buffer=buffer,
                            strides=(HEIGHT * WIDTH * 3, WIDTH * 3, 3))
        scratch = getattr(_SCRATCH, "arrays", None)
        if scratch is None or len(scratch[0]) != k:
            scratch = _SCRATCH.arrays = (np.empty((k, WIDTH, HEIGHT), dtype=np.uint32),
                                         np.empty((k, HEIGHT, WIDTH), dtype=np.uint32))
        for start in range(0, n, k):
            stop = min(start + k, n)
            columns, rows = scratch[0][:stop - start], scratch[1][:stop - start]
            # mode="clip" lets take write into `out` directly (every index is in range)
            self._columns.take(index[start:stop], axis=0, out=columns, mode="clip")
            np.copyto(rows, columns.transpose(0, 2, 1))
            np.copyto(frames[start:stop], rows)
        return buffer[:-1].reshape(n, HEIGHT, WIDTH, 3)


class Bins:
    """`np.searchsorted(edges, x)` for sorted float32 edges and float32 `x` by table lookup, faster
    on this hot path: x's cell on a uniform grid fine enough that no cell holds two edges,
    the count of the edges in lower cells, plus one comparison with the cell's own edge. Exact for
    every float32 x, because the edges are put in their cells by the same float32 arithmetic, and
    cells are monotone in x."""

    def __init__(self, edges: np.ndarray):
        edges = np.asarray(edges, dtype=np.float32)
        self.scale = np.float32(1.0)
        while True:
            self.n_cells = int(edges[-1] * self.scale) + 2      # the last cell holds no edge
            cells = self.cell(edges)
            if len(np.unique(cells)) == len(cells):
                break
            self.scale *= 2
        self.below = np.searchsorted(cells, np.arange(self.n_cells))   # edges in lower cells
        self.edge = np.full(self.n_cells, np.inf, dtype=np.float32)     # each cell's own edge
        self.edge[cells] = edges

    def cell(self, x: np.ndarray) -> np.ndarray:
        return np.clip((x * self.scale).astype(np.intp), 0, self.n_cells - 1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        cell = (x * self.scale).astype(np.intp)      # take's mode="clip" clips it as `cell` does
        return self.below.take(cell, mode="clip") + (self.edge.take(cell, mode="clip") < x)


def fog(dist: np.ndarray) -> np.ndarray:
    """Brightness falling off with distance: depth cues for near and far."""
    return (1.0 / (1.0 + 0.3 * np.asarray(dist))).astype(np.float32)


_SCRATCH = threading.local()     # per thread: the scratch arrays of Camera._copy_in_parts
CAMERA = Camera()


def render(pos: np.ndarray, heading: np.ndarray) -> np.ndarray:
    """First-person frames (n, 72, 96, 3) uint8 for agents at `pos` (n, 2) facing `heading` (n,)."""
    return CAMERA.render(pos, heading)

# ---- the batched environment ---------------------------------------------------------------------

class WatermazeEnv(BatchedEnv):
    """`n` agents, each in its own pool with its own platform. Float state: `pos` (n, 2),
    `heading` (n,), `platforms` (n, 2)."""

    def __init__(self, platforms: np.ndarray, family: "Watermaze", seed: int = 0):
        self.platforms = np.asarray(platforms, dtype=np.float64).reshape(-1, 2)
        self.family = family
        self.n = len(self.platforms)
        self.rng = np.random.default_rng(seed)
        self.pos = np.zeros((self.n, 2))
        self.heading = np.full(self.n, START_HEADING)
        self.t = np.zeros(self.n, dtype=np.int64)
        self.inside = np.zeros(self.n, dtype=bool)
        self.reset()

    def reset(self, mask=None):
        mask = np.ones(self.n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        self.pos[mask] = 0.0
        self.heading[mask] = START_HEADING
        self.t[mask] = 0
        # A platform over the centre pays only once the agent has left it and comes back.
        self.inside[mask] = on_platform(self.pos[mask], self.platforms[mask],
                                        self.family.platform_radius)
        return self.observe()

    def advance(self, actions) -> tuple[np.ndarray, np.ndarray]:
        """The dynamics of `step` without drawing: (reward (n,) float32, done (n,) bool)."""
        actions = self._check_actions(actions)
        fam = self.family
        self.pos, self.heading = move(self.pos, self.heading, actions, fam.step, fam.turn)
        inside = on_platform(self.pos, self.platforms, fam.platform_radius)
        entered = inside & ~self.inside
        self.inside = inside & ~entered
        if entered.any():
            self._restart(entered)
        self.t += 1
        return entered.astype(np.float32), self.t >= fam.episode_len

    def step(self, actions):
        reward, done = self.advance(actions)
        return self.observe(), reward, done

    def observe(self) -> np.ndarray:
        """What the agents see: their views, or their true state for `observe="state"`."""
        return self.state() if self.family.observe == "state" else self.render()

    def render(self) -> np.ndarray:
        """Every agent's current view, (n, 72, 96, 3) uint8."""
        return render(self.pos, self.heading)

    def state(self) -> np.ndarray:
        """The true state as integers (n, 3): x bin, y bin, heading bin (Watermaze.state_spec)."""
        return self.family.discretise(self.pos, self.heading)

    def _restart(self, which: np.ndarray) -> None:
        """Move the agents in `which` to uniform random points of the pool off their platform,
        facing a random one of the headings their own turns can reach (north + k turns)."""
        rows = np.flatnonzero(which)
        fam = self.family
        turns = self.rng.integers(fam.heading_bins, size=len(rows))
        self.heading[rows] = np.mod(START_HEADING + turns * fam.turn, 2 * math.pi)
        while len(rows):  # rejection sampling: redraw only the points that fell on the platform
            self.pos[rows] = uniform_disk(self.rng, len(rows), POOL_RADIUS)
            rows = rows[on_platform(self.pos[rows], self.platforms[rows],
                                    self.family.platform_radius)]

    def _check_actions(self, actions) -> np.ndarray:
        actions = np.asarray(actions)
        if actions.shape != (self.n,) or not np.issubdtype(actions.dtype, np.integer):
            raise ValueError(f"expected {self.n} integer actions, got an array of shape "
                             f"{actions.shape} and dtype {actions.dtype}")
        if actions.size and (actions.min() < 0 or actions.max() >= len(ACTION_NAMES)):
            raise ValueError(f"Watermaze actions must lie in [0, {len(ACTION_NAMES)}), got values "
                             f"from {actions.min()} to {actions.max()}")
        return actions.astype(np.int64)


def uniform_disk(rng: np.random.Generator, n: int, radius: float) -> np.ndarray:
    """`n` points uniform over the disk of `radius` around the origin, (n, 2)."""
    r = radius * np.sqrt(rng.random(n))
    theta = rng.uniform(0, 2 * math.pi, n)
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


# ---- the scripted navigator ----------------------------------------------------------------------

def navigator_actions(env: WatermazeEnv, depth: int = 2) -> np.ndarray:
    """Actions of a navigator that knows each platform: it searches every sequence of `depth`
    actions through the true dynamics and takes the first action of the one that enters the
    platform soonest, or else ends nearest to its centre (ties: the lowest action index)."""
    fam, k = env.family, len(ACTION_NAMES)
    pos, heading = env.pos[:, None], env.heading[:, None]                 # (n, 1, ...)
    inside, platforms = env.inside[:, None], env.platforms[:, None]
    entered_at = np.full((env.n, 1), np.inf)        # the level at which a sequence first enters
    for level in range(depth):
        actions = np.tile(np.arange(k), (env.n, pos.shape[1]))
        pos, heading = move(np.repeat(pos, k, 1), np.repeat(heading, k, 1), actions, fam.step,
                            fam.turn)
        now_in = on_platform(pos, platforms, fam.platform_radius)
        entered_at = np.repeat(entered_at, k, 1)
        entered_at[np.isinf(entered_at) & now_in & ~np.repeat(inside, k, 1)] = level
        inside = now_in
    remaining = np.sqrt(((pos - platforms) ** 2).sum(-1))
    score = np.where(np.isinf(entered_at), depth + remaining, entered_at)  # (n, k**depth)
    return np.argmin(score.reshape(env.n, k, -1).min(axis=2), axis=1)


def random_actions(env: WatermazeEnv) -> np.ndarray:
    return env.rng.integers(len(ACTION_NAMES), size=env.n)


# ---- the family ----------------------------------------------------------------------------------

class Watermaze(TaskFamily):
    """Platform centres in the pool; a seeded table of `n_tasks` of them (uniform over the disk of
    centres whose platform lies in the pool) to split into training and held-out tasks, but any
    point of that disk is a task (`check_task`)."""

    n_actions = len(ACTION_NAMES)

    def __init__(self, episode_len: int = 50, step: float = 0.25, turn_degrees: float = 45.0,
                 platform_radius: float = 0.15, state_bins: int = 7, n_tasks: int = 4096,
                 table_seed: int = 0, observe: str = "pixels"):
        if episode_len < 1:
            raise ValueError(f"episode_len must be >= 1, got {episode_len}")
        if not 0 < step <= POOL_RADIUS:
            raise ValueError(f"step must be in (0, {POOL_RADIUS}], got {step}")
        if not 0 < platform_radius < POOL_RADIUS:
            raise ValueError(f"platform_radius must be in (0, {POOL_RADIUS}), got "
                             f"{platform_radius}")
        if not (0 < turn_degrees <= 180 and (360 / turn_degrees).is_integer()):
            raise ValueError(f"turn_degrees must divide 360 (e.g. 30, 45, 90), got {turn_degrees}")
        if state_bins < 1 or n_tasks < 2:
            raise ValueError(f"state_bins must be >= 1 and n_tasks >= 2, got {state_bins} and "
                             f"{n_tasks}")
        if observe not in ("pixels", "state"):
            raise ValueError(f"observe must be 'pixels' or 'state', got {observe!r}")
        # "state": the same task with the true state as the observation (`watermaze-state`), to
        # tell how much of AD's gap on pixels is perception.
        self.observe = observe
        self.name = "watermaze" if observe == "pixels" else "watermaze-state"
        self.episode_len, self.step, self.turn_degrees = int(episode_len), float(step), \
            float(turn_degrees)
        self.platform_radius, self.state_bins = float(platform_radius), int(state_bins)
        self.n_tasks, self.table_seed = int(n_tasks), int(table_seed)
        self.turn = math.radians(self.turn_degrees)
        self.heading_bins = round(360 / self.turn_degrees)
        self.max_centre = POOL_RADIUS - self.platform_radius   # the platform lies in the pool
        self.state_spec = ObsSpec.discrete((state_bins, state_bins, self.heading_bins))
        self.obs_spec = ObsSpec.image(HEIGHT, WIDTH, 3) if observe == "pixels" else self.state_spec

    def config(self):
        return {"name": self.name, "episode_len": self.episode_len, "step": self.step,
                "turn_degrees": self.turn_degrees, "platform_radius": self.platform_radius,
                "state_bins": self.state_bins, "n_tasks": self.n_tasks,
                "table_seed": self.table_seed,
                **({"observe": "state"} if self.observe == "state" else {})}

    def tasks(self):
        if not hasattr(self, "_table"):
            rng = np.random.default_rng(self.table_seed)
            self._table = uniform_disk(rng, self.n_tasks, self.max_centre)
        return self._table.copy()

    def check_task(self, task):
        try:
            task = np.asarray(task, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"a watermaze task must be a platform centre (x, y), got "
                             f"{task!r}") from None
        if task.shape != (2,) or not np.isfinite(task).all():
            raise ValueError(f"a watermaze task is a platform centre (x, y), got {task.tolist()}")
        if np.hypot(*task) > self.max_centre + 1e-12:
            raise ValueError(f"{task.tolist()} is not a watermaze task: the platform centre must "
                             f"lie within {self.max_centre:g} of the pool's centre (the platform, "
                             f"radius {self.platform_radius:g}, inside the pool, radius "
                             f"{POOL_RADIUS:g})")
        return task

    def make(self, tasks, seed=0):
        tasks = np.asarray(tasks, dtype=np.float64).reshape(-1, 2)
        outside = np.hypot(*tasks.T) > self.max_centre + 1e-12
        if outside.any():
            self.check_task(tasks[np.argmax(outside)])   # raises, naming the allowed radius
        return WatermazeEnv(tasks, self, seed)

    def discretise(self, pos: np.ndarray, heading: np.ndarray) -> np.ndarray:
        """(x bin, y bin, heading bin) as int64 (n, 3). Heading bin k is centred on k turns left
        of north (the start), so the headings the agent can face sit in the middle of their bins."""
        cells = np.floor((pos + POOL_RADIUS) / (2 * POOL_RADIUS) * self.state_bins)
        cells = np.clip(cells, 0, self.state_bins - 1).astype(np.int64)
        turns = np.floor(np.mod(heading - START_HEADING + self.turn / 2, 2 * math.pi) / self.turn)
        return np.concatenate([cells, (turns.astype(np.int64) % self.heading_bins)[:, None]], 1)

    def policy_returns(self, tasks, policy, rollouts: int = 4, seed: int = 0) -> np.ndarray:
        """Mean return of one episode of `policy` (a function env -> actions) per task, over
        `rollouts` runs with random restarts drawn from `seed`: (n_tasks,) float64. The true
        dynamics, without drawing frames."""
        tasks = np.asarray(tasks, dtype=np.float64).reshape(-1, 2)
        env = self.make(np.repeat(tasks, rollouts, axis=0), seed=seed)
        total = np.zeros(env.n)
        for _ in range(self.episode_len):
            total += env.advance(policy(env))[0]
        return total.reshape(len(tasks), rollouts).mean(axis=1)

    def oracle_returns(self, tasks, rollouts: int = 4, seed: int = 0):
        """An estimate: the scripted navigator's mean return (it knows the platform; see
        `navigator_actions`), simulated with a fixed seed, so deterministic; not a proven
        optimum."""
        return self.policy_returns(tasks, navigator_actions, rollouts, seed)

    def picture(self, env: WatermazeEnv, row: int = 0) -> np.ndarray:
        """Agent `row`'s view beside a map of where it is (for animations of episodes)."""
        return np.concatenate([env.render()[row], map_view(env, row)], axis=1)


# ---- pictures for the docs -----------------------------------------------------------------------

def map_view(env: WatermazeEnv, row: int = 0, size: int = HEIGHT) -> np.ndarray:
    """A top-down picture (size, size, 3) uint8 of agent `row`: the wall's colours around the
    pool, the hidden platform (yellow ring), the agent (red) and where it faces (white)."""
    cam, span = CAMERA, CAMERA.wall_radius
    coords = (np.arange(size) + 0.5) / size * 2 * span - span
    x, y = np.meshgrid(coords, -coords)                   # north up
    r = np.hypot(x, y)
    sector = np.floor(np.arctan2(y, x) / (2 * math.pi) * 8 + 0.5).astype(np.int64) % 8
    image = np.where((r < span)[..., None], FLOOR_COLOURS["deck"][0], 0.0)
    image = np.where((r >= span - 0.1)[..., None] & (r < span)[..., None], WALL_COLOURS[sector],
                     image)
    image = np.where((r < POOL_RADIUS + cam.rim_width)[..., None], FLOOR_COLOURS["rim"][0], image)
    image = np.where((r < POOL_RADIUS)[..., None], FLOOR_COLOURS["water"][1], image)
    pr = np.hypot(x - env.platforms[row, 0], y - env.platforms[row, 1])
    image = np.where((np.abs(pr - env.family.platform_radius) < 0.03)[..., None],
                     [250, 220, 40], image)
    nose = env.pos[row] + 0.12 * np.array([math.cos(env.heading[row]),
                                           math.sin(env.heading[row])])
    image = np.where((np.hypot(x - nose[0], y - nose[1]) < 0.04)[..., None], 255.0, image)
    image = np.where((np.hypot(x - env.pos[row, 0], y - env.pos[row, 1]) < 0.07)[..., None],
                     [230, 40, 40], image)
    return image.astype(np.uint8)


def save_views(path: str, scale: int = 3) -> None:
    """A 2 x 4 grid of views: the start, then positions and headings around the pool."""
    pos = np.array([[0, 0], [0, 0], [0, 0], [0, 0], [0.6, 0.3], [-0.5, -0.5], [0.2, -0.85],
                    [-0.8, 0.3]])
    heading = np.radians([90, 0, 180, 270, 135, 45, 90, 330])
    frames = render(pos, heading)
    tiles = np.pad(frames, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=255)
    grid = tiles.reshape(2, 4, *tiles.shape[1:]).transpose(0, 2, 1, 3, 4)
    _image(grid.reshape(2 * tiles.shape[1], 4 * tiles.shape[2], 3), scale).save(path)


def save_episode_gif(path: str, task=(0.45, -0.35), seed: int = 0, scale: int = 3) -> float:
    """A GIF of one episode of the scripted navigator: its view beside the map. Returns the
    episode's return."""
    family = Watermaze()
    env = family.make(family.check_task(task)[None], seed=seed)
    pictures, total = [], 0.0
    for t in range(family.episode_len + 1):
        pictures.append(np.concatenate([env.render()[0], map_view(env)], axis=1))
        if t < family.episode_len:
            total += float(env.advance(navigator_actions(env))[0][0])
    images = [_image(p, scale) for p in pictures]
    images[0].save(path, save_all=True, append_images=images[1:], duration=150, loop=0)
    return total


def _image(array: np.ndarray, scale: int):
    from PIL import Image

    return Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale),
                                         Image.NEAREST)

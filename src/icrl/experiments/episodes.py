"""A picture of in-context learning: a frozen policy's first and last in-context episode on one
task, side by side, as an animated GIF (families with image observations)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..agent import InContextAgent
from ..atomic import atomic_write


def record_episodes(policy, family, task, n_episodes: int, *, temperature: float = 1.0,
                    greedy: bool = False, seed: int = 0) -> tuple[list, list, np.ndarray]:
    """Run `policy` in context on one task for `n_episodes` consecutive episodes, from an empty
    context. Returns the pictures of its first and its last episode (one per step, and the last
    state) and every episode's return. A picture is the family's `picture(env)` if it has one
    (Watermaze: the view beside a map), else the observation."""
    task = family.check_task(task)
    agent = InContextAgent(policy, greedy=greedy, temperature=temperature, seed=seed)
    env = family.make(task[None], seed=seed)
    draw = getattr(family, "picture", None)
    agent.start(1)
    returns = np.zeros(n_episodes)
    first, last = [], []
    for episode in range(n_episodes):
        obs = env.reset()
        keep = first if episode == 0 else last if episode == n_episodes - 1 else None
        done = np.zeros(1, dtype=bool)
        while not done[0]:
            if keep is not None:
                keep.append(draw(env) if draw else _rgb(obs[0]))
            obs, reward, done = env.step(agent.act(obs))
            agent.observe(reward, done)
            returns[episode] += reward[0]
        if keep is not None:
            keep.append(draw(env) if draw else _rgb(obs[0]))
    return first, last, returns


def save_side_by_side_gif(path, left: list, right: list, scale: int = 3,
                          ms_per_frame: int = 150) -> Path:
    """An animated GIF of two sequences of pictures played side by side (the shorter one holds
    its last picture), written atomically."""
    from PIL import Image

    n = max(len(left), len(right))
    gap = np.full((left[0].shape[0], 4, 3), 255, np.uint8)
    frames = []
    for t in range(n):
        a, b = left[min(t, len(left) - 1)], right[min(t, len(right) - 1)]
        picture = np.concatenate([a, gap, b], axis=1)
        frames.append(Image.fromarray(picture).resize(
            (picture.shape[1] * scale, picture.shape[0] * scale), Image.NEAREST))
    path = Path(path)
    with atomic_write(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                       duration=ms_per_frame, loop=0)
    return path


def _rgb(obs: np.ndarray) -> np.ndarray:
    """An image observation as RGB uint8 (one channel: grey)."""
    return np.repeat(obs, 3, axis=-1) if obs.shape[-1] == 1 else obs[..., :3]

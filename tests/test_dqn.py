"""The DQN source: it learns a pixel Dark Room near the oracle, does not learn with a zero step
size, keeps the tasks of a batch independent, is deterministic for a seed, its replay rings keep
exactly the most recent transitions, with the right successor frames, across wrap-arounds, its
per-block counts find the slots a search of every slot would, and updates flush denormals."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from icrl.envs import make_family
from icrl.errors import UserError
from icrl.sources import applies, collect
from icrl.sources.dqn import BLOCK, DQN, DQNConfig

# Small enough that 60 episodes of 16 tasks take a few seconds and reach the oracle on most tasks.
FAST = dict(learning_starts=100, learn_every=1, eps_decay_steps=400, target_every=50, lr=2e-3,
            hidden=64)


@pytest.fixture(scope="module")
def pixels():
    return make_family("darkroom-pixels")


def some_tasks(family, k, seed=0):
    return family.tasks()[np.random.default_rng(seed).permutation(len(family.tasks()))[:k]]


def normalised(family, tasks, histories) -> np.ndarray:
    """Each task's return per episode over its oracle return, (n, episodes)."""
    return histories.episode_returns / family.oracle_returns(tasks)[:, None]


def run(family, tasks, episodes, seed=0, greedy_from=None, **config):
    source = DQN(family.obs_spec.shape, family.n_actions, len(tasks),
                 DQNConfig(**{**FAST, **config}), seed=seed)
    return source, collect(family, tasks, source, episodes, greedy_from=greedy_from)


def test_it_is_an_image_source(pixels):
    assert applies(DQN, pixels) and not applies(DQN, make_family("darkroom"))
    source = DQN(pixels.obs_spec.shape, pixels.n_actions, 3)
    # Every hyperparameter but where it ran: a store's metadata does not depend on the device.
    assert source.name == "dqn"
    assert source.hyperparameters() == {k: v for k, v in vars(DQNConfig()).items()
                                        if k != "device"}


def test_an_unusable_device_is_a_user_error(pixels):
    with pytest.raises(UserError, match="device 'nonsense' is not usable"):
        DQN(pixels.obs_spec.shape, pixels.n_actions, 3, DQNConfig(device="nonsense"))


# --- learning, and its absence -------------------------------------------------------------------

def test_dqn_goes_from_random_to_near_the_oracle_on_pixels(pixels):
    tasks = some_tasks(pixels, 16)
    source, h = run(pixels, tasks, 60, greedy_from=55)
    curve = normalised(pixels, tasks, h)
    assert curve[:, :5].mean() <= 0.1                  # random exploration: about 0.04
    assert curve[:, 55:].mean() >= 0.8                 # greedy: 0.9 (14 of 16 tasks optimal)
    assert (curve[:, 55:] == 1).all(axis=1).mean() >= 0.7
    assert source.updates == 55 * 12 - 99            # none in the greedy episodes


def test_dqn_with_a_zero_step_size_learns_nothing(pixels):
    tasks = some_tasks(pixels, 16)
    source, h = run(pixels, tasks, 30, lr=0.0)
    initial = DQN(pixels.obs_spec.shape, pixels.n_actions, 16, DQNConfig(**FAST), seed=0)
    for p, p0 in zip(source.params, initial.params):
        torch.testing.assert_close(p, p0, rtol=0, atol=0)
    assert source.updates == 30 * 12 - 99
    # The untrained greedy policy walks into a wall or stands still: it rarely finds the goal.
    assert normalised(pixels, tasks, h)[:, -10:].mean() <= 0.15


# --- independence of the tasks in a batch --------------------------------------------------------

def test_a_task_learns_the_same_whatever_its_batch_mate(pixels):
    """Task 0 shares the batch with a goal next to the start or one in a far corner. The random
    draws for row 0 are the same either way, so anything leaking between tasks (a shared
    statistic, a mean over the batch, a joint gradient clip) would change task 0's history."""
    goal, near, far = np.array([[1, 4], [3, 4], [0, 0]])
    runs = [run(pixels, np.stack([goal, mate]), 25, seed=3) for mate in (near, far)]
    (s1, h1), (s2, h2) = runs
    assert s1.updates > 100
    assert not np.array_equal(h1.actions[1], h2.actions[1])
    np.testing.assert_array_equal(h1.actions[0], h2.actions[0])
    np.testing.assert_array_equal(h1.episode_returns[0], h2.episode_returns[0])
    assert h1.episode_returns[0, -5:].sum() > 0             # task 0 did learn something
    for p1, p2 in zip(s1.params, s2.params):
        torch.testing.assert_close(p1[0], p2[0], rtol=0, atol=0)
        assert not torch.equal(p1[1], p2[1])


@pytest.mark.parametrize("clip", [10.0, 0.01])
def test_a_task_gets_the_same_update_in_a_batch_as_alone(clip):
    """The loss sums per-task losses and the clip is per task: a task's step must not depend on
    how many tasks share the batch or how large their gradients are (0.01 clips every task)."""
    shape, config = (10, 10, 4), DQNConfig(max_grad_norm=clip, batch_size=8)
    batch = DQN(shape, 6, 5, config, seed=1)
    alone = DQN(shape, 6, 1, config, seed=0)
    with torch.no_grad():
        for p_alone, t_alone, p_batch in zip(alone.params, alone.target, batch.params):
            p_alone.copy_(p_batch[:1])
            t_alone.copy_(p_batch[:1])
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        frames, next_frames = torch.randint(256, (2, 5, 8, *shape), generator=gen,
                                            dtype=torch.uint8)
        actions = torch.randint(6, (5, 8), generator=gen)
        rewards = torch.rand(5, 8, generator=gen) * torch.tensor([1, 1e3, 0, 1, 1])[:, None]
        batch_loss = batch.learn(frames, actions, rewards, next_frames)
        alone_loss = alone.learn(frames[:1], actions[:1], rewards[:1], next_frames[:1])
        torch.testing.assert_close(alone_loss, batch_loss[:1])
    for p_alone, p_batch in zip(alone.params, batch.params):
        torch.testing.assert_close(p_alone.grad, p_batch.grad[:1])
        torch.testing.assert_close(p_alone, p_batch[:1])


@pytest.mark.parametrize("shape", [(6, 6, 1), (36, 40, 3)])   # both torsos
def test_convolutions_over_task_chunks_give_the_same_values_and_gradients(shape):
    """However many tasks share a grouped convolution (all, one, a split that does not divide
    n), every task gets the Q-values and the gradient of its own network run alone."""
    frames = torch.randint(256, (5, 4, *shape), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    results = []
    for per_conv in (0, 5, 1, 2):
        source = DQN(shape, 4, 5, DQNConfig(tasks_per_conv=per_conv), seed=0)
        q = source.q_values(source.params, frames)
        q.square().sum().backward()
        results.append((q.detach(), [p.grad for p in source.params]))
    single = DQN(shape, 4, 1, seed=0)
    with torch.no_grad():
        for p, p_batch in zip(single.params, source.params):
            p.copy_(p_batch[2:3])
    q_alone = single.q_values(single.params, frames[2:3])
    for q, grads in results[1:]:
        torch.testing.assert_close(q, results[0][0])
        for g, g0 in zip(grads, results[0][1]):
            torch.testing.assert_close(g, g0)
    torch.testing.assert_close(q_alone, results[0][0][2:3])


# --- determinism ---------------------------------------------------------------------------------

def test_a_seed_gives_the_same_history(pixels):
    tasks = some_tasks(pixels, 4)
    (s1, h1), (s2, h2), (_, h3) = (run(pixels, tasks, 15, seed=s) for s in (5, 5, 6))
    for field in ("obs", "actions", "rewards", "episode_returns"):
        np.testing.assert_array_equal(getattr(h1, field), getattr(h2, field))
    for p1, p2 in zip(s1.params, s2.params):
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)
    assert not np.array_equal(h1.actions, h3.actions)


def test_exploration_decays_linearly_over_steps():
    source = DQN((6, 6, 1), 5, 2, DQNConfig(eps_start=1.0, eps_end=0.1, eps_decay_steps=100,
                                            learning_starts=10**9))
    frames = np.zeros((2, 6, 6, 1), dtype=np.uint8)
    seen = []
    for t in range(120):
        seen.append(source.epsilon)
        source.update(frames, np.zeros(2, int), np.zeros(2), frames, np.zeros(2, bool))
    np.testing.assert_allclose(seen[::50], [1.0, 0.55, 0.1])
    assert seen[-1] == pytest.approx(0.1)


def test_greedy_actions_are_the_argmax_and_draw_no_randomness():
    source = DQN((6, 6, 1), 5, 3, DQNConfig(), seed=0)
    frames = np.random.default_rng(0).integers(256, size=(3, 6, 6, 1), dtype=np.uint8)
    state = source.rng.bit_generator.state
    actions = source.act(frames, greedy=True)
    assert source.rng.bit_generator.state == state
    with torch.no_grad():
        q = source.q_values(source.params, torch.from_numpy(frames)[:, None])[:, 0]
    np.testing.assert_array_equal(actions, q.argmax(1).numpy())


def test_the_target_network_syncs_every_target_every_updates():
    source = DQN((6, 6, 1), 5, 2, DQNConfig(target_every=3, batch_size=4, lr=0.01), seed=0)
    frames = torch.randint(256, (2, 4, 6, 6, 1), dtype=torch.uint8)
    args = frames, torch.zeros(2, 4, dtype=torch.int64), torch.ones(2, 4), frames
    for k in range(1, 7):
        source.learn(*args)
        synced = all(torch.equal(t, p) for t, p in zip(source.target, source.params))
        assert synced == (k % 3 == 0)


# --- the replay rings ----------------------------------------------------------------------------

def test_replay_rings_keep_the_latest_transitions_across_wraparound():
    """Two tasks with episodes of 3 and 4 steps write into rings of 7 slots for 40 steps. A frame
    encodes (episode, step); the final frame of an episode is its own code. After wrapping, each
    ring must hold exactly its most recent transitions that fit, each with its true successor,
    and sampling must draw only those."""
    lengths, cap = np.array([3, 4]), 7
    source = DQN((3, 3, 1), 5, 2, DQNConfig(capacity=cap, batch_size=4, learning_starts=10**9),
                 seed=0)
    fed = [[], []]                    # per task: (obs code, action, reward, next code)
    ended = [[], []]                  # per task: whether that transition ended its episode
    t_in_ep = np.zeros(2, dtype=int)
    episode = np.zeros(2, dtype=int)
    for t in range(42):
        code = 10 * episode + t_in_ep + 1             # 1..; at most 255 over this run
        done = t_in_ep + 1 == lengths
        actions, rewards = np.array([t % 5, (t + 1) % 5]), np.array([t, -t], dtype=np.float32)
        obs = np.broadcast_to(code[:, None, None, None], (2, 3, 3, 1)).astype(np.uint8)
        source.update(obs, actions, rewards, obs + 1, done)
        for i in range(2):
            fed[i].append((code[i], actions[i], rewards[i], code[i] + 1))
            ended[i].append(done[i])
        t_in_ep = np.where(done, 0, t_in_ep + 1)
        episode += done
    assert ended[0][-1] and not ended[1][-1]        # both cases of the newest transition
    for i in range(2):
        slots = np.flatnonzero(source.starts[i])
        stored = {(source.frames[i, s, 0, 0, 0], source.actions[i, s], source.rewards[i, s],
                   source.frames[i, (s + 1) % cap, 0, 0, 0]) for s in slots}
        # A transition takes a slot, and one more for its final frame if it ended an episode;
        # the newest successor holds the head unless it was such a final frame. The latest
        # transitions that fit remain.
        used, keep = int(not ended[i][-1]), 0
        for k in reversed(range(len(fed[i]))):
            used += 1 + ended[i][k]
            if used > cap:
                break
            keep += 1
        assert keep >= 3
        assert stored == set(fed[i][-keep:])
    frames, actions, rewards, next_frames, terminals = source.sample()
    assert not terminals.any()
    assert frames.shape == (2, 4, 3, 3, 1) and frames.dtype == torch.uint8
    assert (next_frames.int() - frames.int() == 1).all()
    for i in range(2):
        for j in range(4):
            assert (frames[i, j, 0, 0, 0].item(), actions[i, j].item(), rewards[i, j].item(),
                    next_frames[i, j, 0, 0, 0].item()) in set(fed[i][-cap:])


def test_sampling_is_uniform_over_stored_transitions():
    source = DQN((3, 3, 1), 5, 1, DQNConfig(capacity=5, batch_size=5, learning_starts=10**9),
                 seed=0)
    for t in range(12):   # episodes of 3 steps: slots hold 3 transitions, 1 final frame, 1 head
        obs = np.full((1, 3, 3, 1), t, dtype=np.uint8)
        source.update(obs, np.zeros(1, int), np.zeros(1), obs + 1, np.array([t % 3 == 2]))
    assert source.starts.sum() == 3
    counts = np.zeros(256)
    for _ in range(400):
        np.add.at(counts, source.sample()[0][0, :, 0, 0, 0].numpy(), 1)
    assert set(np.flatnonzero(counts)) == {9, 10, 11}    # the last episode only
    np.testing.assert_allclose(counts[[9, 10, 11]] / 2000, 1 / 3, atol=0.04)


def test_block_counts_find_the_slot_of_each_rank():
    """Sampling finds the k-th stored transition through per-block counts: it must pick the
    same slots as a search over every slot, on rings that wrap, with episodes ending at any step
    and a capacity that is no multiple of the block."""
    n, cap, batch = 3, 3 * BLOCK + 5, 64
    source = DQN((3, 3, 1), 5, n, DQNConfig(capacity=cap, batch_size=batch,
                                            learning_starts=10**9), seed=0)
    rng = np.random.default_rng(1)
    frames = np.zeros((n, 3, 3, 1), dtype=np.uint8)
    for t in range(3 * cap):
        source.update(frames, np.zeros(n, int), np.zeros(n), frames, rng.random(n) < 0.2)
        if t < 5 or t % 37 == 0:
            np.testing.assert_array_equal(source.block_counts,
                                          source._blocked_starts.sum(axis=2))
            state = source.rng.bit_generator.state
            slots = source.sample_slots()
            source.rng.bit_generator.state = state
            ranks = (source.rng.random((n, batch)) * source.starts.sum(axis=1)[:, None]).astype(
                np.int64)
            expected = [np.flatnonzero(source.starts[i])[ranks[i]] for i in range(n)]
            np.testing.assert_array_equal(slots, expected)


def test_an_update_flushes_denormals_and_restores_the_mode():
    """Adam's moments of unused weights decay through the denormal range, where x86 CPUs are
    many times slower: an update flushes denormals to zero (where the CPU can) and leaves the
    thread's mode as it found it."""
    def flushing():
        return (torch.full((), 2e-38) * 0.25).item() == 0.0

    source = DQN((6, 6, 1), 3, 2, DQNConfig(batch_size=4), seed=0)
    frames = torch.randint(256, (2, 4, 6, 6, 1), dtype=torch.uint8)
    args = frames, torch.zeros(2, 4, dtype=torch.int64), torch.ones(2, 4), frames
    seen, step = [], source.optimizer.step
    source.optimizer.step = lambda: (seen.append(flushing()), step())
    supported = torch.set_flush_denormal(False)
    try:
        for on in (False, True):
            torch.set_flush_denormal(on)
            source.learn(*args)
            assert flushing() == (on and supported)
    finally:
        torch.set_flush_denormal(False)
    assert seen == [supported, supported] and source.updates == 2


# --- mistakes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("config,match", [
    (dict(capacity=16, batch_size=32), "--capacity: must be at least --batch-size"),
    (dict(lr=-1.0), "--lr: must be >= 0"),
    (dict(gamma=1.5), "--gamma: must be between 0 and 1"),
    (dict(batch_size=0), "--batch-size: must be >= 1"),
    (dict(learn_every=0), "--learn-every: must be >= 1"),
    (dict(eps_end=2.0), "--eps-end: must be between 0 and 1"),
    (dict(capacity=10**12), "replay buffers .* need at least"),
])
def test_bad_config_values_are_one_line_errors(config, match):
    with pytest.raises(UserError, match=match) as e:
        DQN((6, 6, 1), 5, 4, DQNConfig(**config))
    assert "\n" not in str(e.value)


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(ValueError, match="height, width, channels"):
        DQN((6, 6), 5, 2)
    with pytest.raises(ValueError, match="at least 3x3"):
        DQN((2, 8, 1), 5, 2)
    source = DQN((6, 6, 1), 5, 2)
    with pytest.raises(ValueError, match=r"uint8 frames of shape \(2, 6, 6, 1\)"):
        source.act(np.zeros((2, 6, 6, 1), dtype=np.float32))
    with pytest.raises(ValueError, match="next_obs"):
        frames = np.zeros((2, 6, 6, 1), dtype=np.uint8)
        source.update(frames, np.zeros(2, int), np.zeros(2), frames[:1], np.zeros(2, bool))


def test_a_terminal_transition_does_not_bootstrap():
    """After a game's end the target is the reward alone; after a time limit it bootstraps."""
    source = DQN((6, 6, 1), 3, 1, DQNConfig(lr=0.0, gamma=0.5), seed=0)
    frames = torch.randint(256, (1, 2, 6, 6, 1), dtype=torch.uint8)
    actions, rewards = torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, 2)
    with torch.no_grad():
        q = source.q_values(source.params, frames)[0, :, 0]
        future = source.q_values(source.target, frames.roll(1, dims=1))[0].amax(dim=1)
    ended = torch.tensor([[True, False]])
    losses = source.learn(frames, actions, rewards, frames.roll(1, dims=1), ended)
    target = torch.tensor([1.0, 1.0 + 0.5 * future[1].item()])
    expected = torch.nn.functional.smooth_l1_loss(q, target)
    assert torch.allclose(losses[0], expected, atol=1e-6)

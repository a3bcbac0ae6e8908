"""Sharded work: N processes each make their share of the chunks, side by side, and a last run
joins them into exactly the file one process writes."""
import os
import threading

import numpy as np
import pytest

from icrl.checkpoint import load_policy
from icrl.cli import main
from icrl.envs import make_family
from icrl.errors import UserError
from icrl.evaluate import evaluate
from icrl.generate import GenerateConfig, generate
from icrl.parts import Parts, Shard, parse_shard
from icrl.train import ModelSpec, TrainConfig, train
from icrl.models.transformer import TransformerConfig

CFG = GenerateConfig(n_episodes=6, seeds_per_task=2, n_test=16, chunk_size=30)  # 5 chunks


def test_three_shards_side_by_side_then_a_join_give_the_single_process_bytes(tmp_path):
    family = make_family("darkroom")
    single = generate(family, tmp_path / "single.h5", CFG, progress=False)
    out = tmp_path / "sharded.h5"
    errors = []

    def shard(i):
        try:
            folder = generate(family, out, CFG, progress=False, shard=Shard(i, 3))
            assert folder == out.with_name("sharded.h5.parts")
        except Exception as e:  # surfaced below: an assert in a thread is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=shard, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not out.exists()
    chunks = sorted(p.name for p in out.with_name("sharded.h5.parts").glob("chunk-*.npz"))
    assert chunks == [f"chunk-{i:05d}.npz" for i in range(5)]
    assert generate(family, out, CFG, progress=False) == out  # the join
    assert out.read_bytes() == single.read_bytes()
    assert not out.with_name("sharded.h5.parts").exists()


def test_workers_processes_give_the_single_process_bytes(tmp_path):
    family = make_family("darkroom")
    single = generate(family, tmp_path / "single.h5", CFG, progress=False)
    out = tmp_path / "workers.h5"
    environment = dict(os.environ)
    assert main(["generate", "darkroom", "--out", str(out), "--workers", "2", "--episodes", "6",
                 "--seeds-per-task", "2", "--n-test", "16", "--chunk-size", "30"]) in (0, None)
    assert out.read_bytes() == single.read_bytes()
    assert not out.with_name("workers.h5.parts").exists()
    assert dict(os.environ) == environment   # the workers' thread limits were only theirs


@pytest.mark.parametrize("how,message", [
    ({"workers": 0}, "--workers: expected an integer >= 1, got 0"),
    ({"workers": 2, "shard": Shard(0, 2)}, "give --workers or --shard, not both")])
def test_bad_workers_are_one_line_errors(tmp_path, how, message):
    with pytest.raises(UserError, match=message):
        generate(make_family("darkroom"), tmp_path / "h.h5", CFG, progress=False, **how)


def test_a_worker_s_error_reaches_the_caller(tmp_path, monkeypatch):
    # the workers build the sources and meet the bad setting first: their error must cross
    # the process boundary intact
    bad = GenerateConfig(source="dqn", source_config={"device": "nonsense"}, steps=20,
                         seeds_per_task=2, chunk_size=1)
    with pytest.raises(UserError, match="device 'nonsense' is not usable"):
        generate(make_family("darkroom-pixels"), tmp_path / "h.h5", bad, progress=False,
                 workers=2)


def test_a_join_does_the_chunks_no_shard_made(tmp_path):
    family = make_family("darkroom")
    single = generate(family, tmp_path / "single.h5", CFG, progress=False)
    out = tmp_path / "sharded.h5"
    generate(family, out, CFG, progress=False, shard=Shard(1, 2))  # chunks 1 and 3 only
    generate(family, out, CFG, progress=False)
    assert out.read_bytes() == single.read_bytes()


def test_a_shard_with_other_settings_is_refused(tmp_path):
    family = make_family("darkroom")
    out = tmp_path / "sharded.h5"
    generate(family, out, CFG, progress=False, shard=Shard(0, 2))
    other = GenerateConfig(**{**CFG.__dict__, "seed": 1})
    with pytest.raises(UserError, match="other settings"):
        generate(family, out, other, progress=False, shard=Shard(1, 2))


@pytest.mark.parametrize("text, message", [("3/3", "0 <= I < N"), ("1", "expects I/N"),
                                           ("a/b", "expects I/N"), ("-1/2", "0 <= I < N"),
                                           ("auto", "no launcher")])
def test_bad_shards_are_one_line_errors(text, message, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match=message):
        parse_shard(text)


def test_auto_shards_follow_the_launcher(monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "5")
    assert parse_shard("auto") == Shard(2, 5)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_shard("auto") == Shard(1, 4)  # torchrun's first


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-shards")
    data = generate(make_family("darkroom"), d / "h.h5", CFG, progress=False)
    spec = ModelSpec(context=40, transformer=TransformerConfig(n_layer=1, n_head=2, d_model=16,
                                                               d_ff=32))
    return train(data, d / "model", spec, TrainConfig(steps=20, batch_size=8), progress=False)


def test_evaluation_chunks_are_seeded_apart_and_shards_join_to_the_whole(checkpoint, tmp_path):
    policy, ckpt = load_policy(checkpoint)
    family = make_family("darkroom")
    tasks = family.tasks()[ckpt["split"]["test"]]
    whole = evaluate(policy, family, tasks, 3, 5, seed=4, chunk_size=20)
    # One chunk is the plain seeded batch, so small evaluations are as before.
    assert np.array_equal(evaluate(policy, family, tasks, 3, 5, seed=4, chunk_size=80),
                          evaluate(policy, family, tasks, 3, 5, seed=4, chunk_size=1024))
    parts = Parts(tmp_path / "eval.json", {"seed": 4}, ("returns",))
    for i in (2, 0, 1):
        assert evaluate(policy, family, tasks, 3, 5, seed=4, chunk_size=20, parts=parts,
                        shard=Shard(i, 3)) is None
    joined = evaluate(policy, family, tasks, 3, 5, seed=4, chunk_size=20, parts=parts)
    assert np.array_equal(joined, whole)
    assert not parts.folder.exists()


def test_evaluate_command_in_shards_writes_the_single_process_summary(checkpoint, tmp_path,
                                                                      capsys):
    args = [str(checkpoint), "--episodes", "3", "--rollouts", "5", "--chunk-size", "20"]
    assert main(["evaluate", *args, "--out", str(tmp_path / "single.json")]) == 0
    for i in range(3):
        assert main(["evaluate", *args, "--out", str(tmp_path / "joined.json"),
                     "--shard", f"{i}/3"]) == 0
        assert not (tmp_path / "joined.json").exists()
    assert main(["evaluate", *args, "--out", str(tmp_path / "joined.json")]) == 0
    assert (tmp_path / "joined.json").read_bytes() == (tmp_path / "single.json").read_bytes()
    # chunks of other settings are never joined into a summary
    main(["evaluate", *args, "--out", str(tmp_path / "other.json"), "--shard", "0/3"])
    capsys.readouterr()
    assert main(["evaluate", *args, "--seed", "1", "--out", str(tmp_path / "other.json")]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main(["evaluate", *args, "--shard", "0/2"]) == 2
    assert "--shard needs --out" in capsys.readouterr().err

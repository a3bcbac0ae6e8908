"""The GPU path: training and evaluation on CUDA agree with the CPU (skipped without a GPU)."""
import numpy as np
import pytest
import torch

from icrl.checkpoint import load_policy
from icrl.envs import make_family
from icrl.evaluate import evaluate
from icrl.generate import GenerateConfig, generate
from icrl.models.transformer import TransformerConfig
from icrl.train import ModelSpec, TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SPEC = ModelSpec(context=40, transformer=TransformerConfig(n_layer=2, n_head=2, d_model=32,
                                                           d_ff=64))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(make_family("darkroom"), tmp_path_factory.mktemp("cuda") / "h.h5",
                    GenerateConfig(n_episodes=10, seeds_per_task=2, n_test=16), progress=False)


def run(data, out, **changes):
    cfg = TrainConfig(**{"steps": 30, "batch_size": 16, "lr": 3e-3, **changes})
    return train(data, out, SPEC, cfg, progress=False)


def test_training_on_cuda_follows_the_cpu(data, tmp_path):
    cpu = load_policy(run(data, tmp_path / "cpu"))[1]
    gpu = load_policy(run(data, tmp_path / "gpu", device="cuda"))[1]
    # Same data, same initialisation; only the kernels' float rounding differs.
    assert gpu["final_loss"] == pytest.approx(cpu["final_loss"], abs=2e-3)
    for key, value in cpu["state_dict"].items():
        assert torch.allclose(gpu["state_dict"][key].cpu(), value, atol=2e-3), key


def test_bf16_and_compile_train_to_a_finite_loss(data, tmp_path):
    ckpt = load_policy(run(data, tmp_path / "bf16", device="cuda", precision="bf16",
                           compile=True))[1]
    assert np.isfinite(ckpt["final_loss"]) and ckpt["final_loss"] < np.log(5)


def test_evaluation_on_cuda_matches_the_cpu_greedy_rollouts(data, tmp_path):
    path = run(data, tmp_path / "model")
    family = make_family("darkroom")
    cpu, ckpt = load_policy(path)
    gpu, _ = load_policy(path, "cuda")
    tasks = family.tasks()[ckpt["split"]["test"]]
    # Greedy actions: equal unless two logits tie within float rounding.
    a = evaluate(cpu, family, tasks, 4, greedy=True)
    b = evaluate(gpu, family, tasks, 4, greedy=True)
    assert (a == b).mean() >= 0.9

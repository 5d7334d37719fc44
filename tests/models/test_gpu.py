"""CUDA smoke tests: generation, log-likelihoods and one training step on the GPU agree with
the CPU. Marked ``gpu``: skipped where there is no CUDA device (tests/conftest.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from models.afm import AFM, config_from_preset
from models.checkpoint import load_checkpoint, save_checkpoint
from models.generate import generate, loglikelihood
from models.train import TrainConfig, pack_completions, sequence_logprobs, train

pytestmark = pytest.mark.gpu

PAIRS = [([5, 6, 7], [8, 9]), ([1], [2, 3, 4, 5, 6]), ([10, 11, 12, 13, 14, 15], [16])]


def test_a_checkpoint_loads_onto_cuda_and_scores_and_generates_like_the_cpu(tmp_path):
    model = AFM(config_from_preset("tiny")).init_weights(seed=0)
    path = save_checkpoint(tmp_path / "tiny", model.cfg, model.state_dict(), {"source": "test"})
    cpu, cuda = load_checkpoint(path), load_checkpoint(path, device="cuda")
    assert cuda.tok_emb.weight.is_cuda and cuda.rope_cos.is_cuda
    ours = [lp for lp, _ in loglikelihood(cuda, PAIRS)]
    reference = [lp for lp, _ in loglikelihood(cpu, PAIRS)]
    assert ours == pytest.approx(reference, rel=1e-4, abs=1e-4)
    prompts = [[1, 2, 3], [4, 5]]
    out = generate(cuda, prompts, max_new_tokens=8)
    assert [len(row) for row in out] == [8, 8]
    # The first greedy token of each prompt: far from a tie on this model, so the devices agree.
    assert [row[0] for row in out] == [row[0] for row in generate(cpu, prompts, max_new_tokens=1)]


def test_the_builtin_backend_runs_on_cuda_without_the_cpu_speed_paths(smollm2_checkpoint):
    from models.backends import GenerationArgs
    from models.backends.builtin import BuiltinBackend

    gpu = BuiltinBackend(smollm2_checkpoint, batch_size=2)
    cpu = BuiltinBackend(smollm2_checkpoint, batch_size=2, prepack=False, draft=None, device="cpu")
    assert gpu.device.type == "cuda" and gpu.draft is None and gpu.info()["device"] == "cuda"
    prompt = ["The capital of France is"]
    args = GenerationArgs(max_new_tokens=6)
    assert gpu.generate(prompt, args) == cpu.generate(prompt, args)
    pairs = [("The capital of France is", " Paris")]
    assert gpu.loglikelihood(pairs)[0][0] == pytest.approx(cpu.loglikelihood(pairs)[0][0], abs=1e-3)


def test_one_training_step_on_cuda_under_bf16_autocast_moves_the_weights():
    model = AFM(config_from_preset("tiny")).init_weights(seed=0)
    before = model.tok_emb.weight.detach().clone()
    ids, completion, attention = pack_completions(PAIRS)
    seen = []

    def loss_fn(indices):
        lp, n = sequence_logprobs(
            model, ids[indices].cuda(), completion[indices].cuda(), attention[indices].cuda()
        )
        seen.append(torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None)
        return -(lp / n).mean()

    config = replace(TrainConfig(lr=1e-3, batch_size=3, epochs=1), device="cuda")
    state = train(model, loss_fn, len(PAIRS), config)
    assert state.step == 1 and seen == [torch.bfloat16]
    assert model.tok_emb.weight.is_cuda and model.tok_emb.weight.dtype == torch.float32
    assert not torch.equal(model.tok_emb.weight.cpu(), before)

"""The training loop (models/train.py) on the tiny AFM: schedule, accumulation, clipping, exact
resume, determinism, progress, two-process data parallelism, and sequence log-probabilities
against ``generate.loglikelihood``."""

from __future__ import annotations

import copy
import math
import random
import socket
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.optim.optimizer import register_optimizer_step_pre_hook

from models.afm import AFM, config_from_preset
from models.generate import loglikelihood
from models.linear import Linear
from models.train import (
    TrainConfig,
    latest_checkpoint,
    lr_factor,
    make_optimizer,
    pack_completions,
    sequence_logprobs,
    train,
)

BASE = TrainConfig(lr=1e-3, batch_size=4, epochs=2, warmup_ratio=0.2, seed=3, device="cpu")


def tiny(seed: int = 0, **overrides) -> AFM:
    return AFM(config_from_preset("tiny", **overrides)).init_weights(seed=seed)


def dataset(n: int = 10, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) pairs of varied lengths."""
    rng = random.Random(seed)
    return [
        (
            [rng.randrange(256) for _ in range(rng.randint(1, 5))],
            [rng.randrange(256) for _ in range(rng.randint(1, 7))],
        )
        for _ in range(n)
    ]


def nll(model: AFM, data, per_token: bool = False, noisy: bool = False):
    """loss_fn: the completions' negative log-likelihood, mean per example (or per token).
    ``noisy`` adds terms drawn from torch's, python's and numpy's global RNGs, so a resumed
    run matches only if all three are restored."""

    def loss_fn(indices: torch.Tensor):
        ids, completion, attention = pack_completions([data[i] for i in indices.tolist()])
        lp, n = sequence_logprobs(model, ids, completion, attention)
        loss = -lp.sum() / n.sum() if per_token else -(lp / n).mean()
        if noisy:
            scale = 1 + 0.1 * torch.rand(()) + 0.1 * random.random() + 0.1 * np.random.rand()
            loss = loss * scale
        return loss, {"tokens": float(n.sum())}

    return loss_fn


def weights(model: AFM) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_equal_weights(a: AFM, b: AFM) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y), name


# -------------------------------------------------------------------------------- schedule
def test_the_schedule_warms_up_linearly_then_decays_by_a_cosine_to_the_floor():
    f = [lr_factor(s, total=10, warmup=4, schedule="cosine", min_ratio=0.1) for s in range(10)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # the first step is not wasted
    assert f[4] == 1.0 and f[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(f[4:], f[5:], strict=False))
    # halfway through the decay, the cosine is at the middle between peak and floor
    assert lr_factor(7, total=11, warmup=4, schedule="cosine", min_ratio=0.1) == pytest.approx(0.55)
    constant = [lr_factor(s, 10, 2, "constant", 0.1) for s in range(10)]
    assert constant == [0.5] + [1.0] * 9
    assert lr_factor(0, 1, 0, "cosine", 0.1) == 1.0  # a one-step run trains at the peak


def test_the_optimizer_sees_the_scheduled_rate_and_progress_sees_every_step():
    model, data, seen = tiny(), dataset(), []
    config = replace(BASE, clip_norm=None)
    state = train(model, nll(model, data), len(data), config, progress=lambda *a: seen.append(a))
    assert [s for s, _, _ in seen] == list(range(1, 7)) and {t for _, t, _ in seen} == {6}
    assert state.step == state.total == 6 and (state.epoch, state.index) == (2, 0)
    warmup = round(0.2 * 6)
    assert [m["lr"] for *_, m in seen] == pytest.approx(
        [1e-3 * lr_factor(s, 6, warmup, "cosine", 0.1) for s in range(6)]
    )
    assert [m["examples"] for *_, m in seen] == [4, 4, 2] * 2  # the last batch is short
    assert all(math.isfinite(m["loss"]) and m["tokens"] > 0 for *_, m in seen)
    assert "grad_norm" not in seen[0][2]


# ----------------------------------------------------------------- accumulation, clipping
@pytest.mark.parametrize("per_token", [False, True], ids=["per-example", "per-token"])
def test_k_micro_batches_give_the_weights_of_one_big_batch(per_token):
    data = dataset(12, seed=1)
    units = (lambda idx: sum(len(data[i][1]) for i in idx.tolist())) if per_token else None
    models = []
    for accumulation in (1, 3):
        model = tiny()
        config = replace(BASE, accumulation=accumulation, batch_size=6, epochs=1)
        train(model, nll(model, data, per_token), len(data), config, units=units)
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(models[0].tok_emb.weight, tiny().tok_emb.weight)


def test_clipping_scales_the_global_gradient_norm_down_to_the_limit():
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    handle = register_optimizer_step_pre_hook(record)
    try:
        reported = []
        for clip in (None, 0.05):
            model, data = tiny(), dataset()
            config = replace(BASE, clip_norm=clip, epochs=1)
            loss_fn = nll(model, data)
            train(model, loss_fn, len(data), config, progress=lambda *a: reported.append(a))
    finally:
        handle.remove()
    unclipped, clipped = norms[:3], norms[3:]
    assert min(unclipped) > 0.05  # the limit is binding
    assert clipped == pytest.approx([0.05] * 3, rel=1e-4)
    assert reported[3][2]["grad_norm"] == pytest.approx(unclipped[0], rel=1e-5)  # before clipping


# ----------------------------------------------------------------- resume and determinism
def test_same_seed_and_data_give_the_same_weights_bit_for_bit():
    data, runs = dataset(), []
    for seed in (3, 3, 4):
        model = tiny()
        train(model, nll(model, data, noisy=True), len(data), replace(BASE, seed=seed))
        runs.append(model)
    assert_equal_weights(runs[0], runs[1])
    assert not torch.equal(runs[0].tok_emb.weight, runs[2].tok_emb.weight)  # order, noise


@pytest.mark.parametrize("resume_at", [1, 2, 3, 4])  # mid-epoch, the epoch's end, the next
def test_a_resumed_run_reproduces_the_straight_run_bit_for_bit(tmp_path, resume_at):
    data = dataset()
    config = replace(BASE, accumulation=2, clip_norm=0.5, checkpoint_every=1)
    straight = tiny()
    run = train(
        straight,
        nll(straight, data, noisy=True),
        len(data),
        replace(config, checkpoint_dir=str(tmp_path / "straight")),
    )
    assert (
        run.checkpoint
        == latest_checkpoint(tmp_path / "straight")
        == tmp_path / ("straight/step-00000006")
    )

    # Fresh objects and scrambled global RNGs: all that carries over is on disk.
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    resumed = tiny(seed=99)
    state = train(
        resumed,
        nll(resumed, data, noisy=True),
        len(data),
        config,
        resume_from=tmp_path / "straight" / f"step-{resume_at:08d}",
    )
    assert state.step == 6
    assert_equal_weights(resumed, straight)


def test_resume_refuses_a_config_that_would_change_the_run(tmp_path):
    model, data = tiny(), dataset()
    state = train(model, nll(model, data), len(data), replace(BASE, checkpoint_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"\['lr'\]"):
        train(model, nll(model, data), len(data), replace(BASE, lr=1), resume_from=state.checkpoint)
    with pytest.raises(ValueError, match="examples 10 -> 9"):
        train(model, nll(model, data), 9, BASE, resume_from=state.checkpoint)
    longer = replace(BASE, max_steps=3)  # another total: another learning-rate schedule
    with pytest.raises(ValueError, match="max_steps"):
        train(model, nll(model, data), len(data), longer, resume_from=state.checkpoint)


# ------------------------------------------------------------------------ data parallel
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_parallel_worker(rank: int, world: int, port: int, config: TrainConfig, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        model = tiny(seed=rank)  # different on purpose: process 0's weights are broadcast
        data = dataset(12, seed=1)
        losses = []
        train(
            model,
            nll(model, data),
            len(data),
            config,
            progress=lambda step, total, m: losses.append(m["loss"]),
        )
        if rank == 0:
            torch.save({"weights": weights(model), "losses": losses}, out)
        # both ranks done with every collective before either tears gloo down: a rank that
        # destroys its group while the other still holds the pair aborts (std::terminate)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_train_the_weights_of_one_process_on_the_same_global_batch(tmp_path):
    config = replace(BASE, batch_size=6, epochs=1, accumulation=2)  # 3 per process, uneven
    mp.spawn(
        _data_parallel_worker,
        args=(2, _free_port(), config, tmp_path / "dp.pt"),
        nprocs=2,
        join=True,
    )
    parallel = torch.load(tmp_path / "dp.pt", weights_only=True)
    model, data, losses = tiny(), dataset(12, seed=1), []
    loss_fn = nll(model, data)
    train(model, loss_fn, len(data), config, progress=lambda *a: losses.append(a[2]["loss"]))
    for name, p in model.named_parameters():
        torch.testing.assert_close(parallel["weights"][name], p.detach(), rtol=0, atol=2e-6)
    assert parallel["losses"] == pytest.approx(losses, rel=1e-5)  # the global batch's loss


# -------------------------------------------------------------------- sequence log-probs
PAIRS = [([5, 6, 7], [8, 9]), ([1], [2, 3, 4, 5, 6]), ([10, 11, 12, 13, 14, 15], [16])]


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_sequence_logprobs_equal_the_inference_loglikelihoods(tiny_model, left):
    ids, completion, attention = pack_completions(PAIRS, pad_id=0, left=left)
    with torch.enable_grad():
        lp, n = sequence_logprobs(tiny_model, ids, completion, attention)
    assert lp.requires_grad and n.tolist() == [2, 5, 1]
    reference = [value for value, _ in loglikelihood(tiny_model, PAIRS)]
    torch.testing.assert_close(lp.detach(), torch.tensor(reference), rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_what_the_completion_depends_on():
    model = tiny(tie_embeddings=False)  # embedding rows then belong to input tokens only
    pairs = [([5, 6, 7], [8, 9]), ([20, 21], [22])]
    ids, completion, attention = pack_completions(pairs)
    lp, _ = sequence_logprobs(model, ids, completion, attention)
    lp.sum().backward()
    rows = model.tok_emb.weight.grad.abs().sum(dim=1).nonzero()[:, 0].tolist()
    # Prompt tokens matter as context, the last token of each row is never an input.
    assert rows == [5, 6, 7, 8, 20, 21]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.blocks.parameters())

    # Prompt tokens add nothing to the loss: the sum equals a full-logits reference over the
    # completion positions only, and so do its gradients.
    reference_model = tiny(tie_embeddings=False)
    logits = reference_model(ids[:, :-1]).log_softmax(dim=-1)  # (B, T-1, V)
    token_lp = logits.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    (token_lp * completion[:, 1:]).sum().backward()
    for a, b in zip(model.parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_a_row_without_completion_tokens_scores_zero_and_changes_no_gradient():
    model = tiny()
    ids, completion, attention = pack_completions([([1, 2], [3]), ([4, 5, 6], [7, 8])])
    completion[1] = False
    lp, n = sequence_logprobs(model, ids, completion, attention)
    assert lp[1].item() == 0.0 and n.tolist() == [1, 0]
    lp.sum().backward()
    alone = tiny()
    ids1, completion1, attention1 = pack_completions([([1, 2], [3])])
    sequence_logprobs(alone, ids1, completion1, attention1)[0].sum().backward()
    for a, b in zip(model.parameters(), alone.parameters(), strict=True):
        # batched and alone sum in other orders: compare at fp32 rounding of the largest entry
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-5 * b.grad.abs().max())


def test_an_optimizer_step_is_a_write_the_packed_copies_see():
    """make_optimizer's fused AdamW (torch's fused kernel does not bump version counters)
    still marks each updated parameter written, so a prepacked projection serves the new
    weights; the update equals the default multi-tensor AdamW's to rounding."""
    torch.manual_seed(0)
    layer = Linear(32, 16)
    twin = copy.deepcopy(layer)
    layer.pack(4)
    x = torch.randn(4, 32)
    with torch.no_grad():
        layer(x)  # the pack is made from the first weights
    fused = make_optimizer(list(layer.parameters()), TrainConfig(lr=1e-2))
    plain = torch.optim.AdamW(
        twin.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1
    )
    assert fused.defaults["fused"]
    for opt, m in ((fused, layer), (plain, twin)):
        m(x).square().sum().backward()
        opt.step()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), twin(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), x @ layer.effective_weight().T)

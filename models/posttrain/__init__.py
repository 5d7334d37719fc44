"""Post-training on top of ``models.train.train``: supervised fine-tuning (``sft``) and
preference optimisation from graded levels (``dpo``: DPO, soft-target and margin DPO, IPO).

Both run the model's own blocks over flat token layouts (no padding token passes a linear
layer; attention alone is gathered per document or per prompt), full fine-tune or LoRA
(``models.lora``), and return a ``PostTrainResult``: the loop's final state and every step's
metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.afm import AFM
from models.checkpoint import default_device
from models.kernels import SharedPrefixAttention, pack_shared_prefix
from models.train import TrainConfig, TrainState

Progress = Callable[[int, int, dict[str, float]], None]


@dataclass
class PostTrainResult:
    """What a post-training run returns: the loop's final state and the metrics of every
    optimizer step (``history[i]`` after step i + 1; after a resume, the steps run here)."""

    state: TrainState
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def metrics(self) -> dict[str, float]:
        """The last step's metrics."""
        return self.state.metrics

    @property
    def checkpoint(self) -> Path | None:
        return self.state.checkpoint


def recorder(history: list[dict[str, float]], progress: Progress | None) -> Progress:
    """A progress callback that appends each step's metrics to ``history`` and calls on."""

    def record(step: int, total: int, metrics: dict[str, float]) -> None:
        history.append({"step": float(step), **metrics})
        if progress is not None:
            progress(step, total, metrics)

    return record


def training_device(config: TrainConfig) -> torch.device:
    """Where ``models.train.train`` will put the model: precomputation runs there too."""
    return torch.device(config.device) if config.device else default_device()


def run_flat(model: AFM, tokens: torch.Tensor, positions: torch.Tensor, attention) -> torch.Tensor:
    """Final-normed hidden states (N, dim) of flat ``tokens`` (N,) at RoPE ``positions`` (N,)
    through the model's blocks with a flat-layout attention kernel (``models.afm.Block``)."""
    cos = model.rope_cos[positions].unsqueeze(1)  # (N, 1, hd)
    sin = model.rope_sin[positions].unsqueeze(1)  # (N, 1, hd)
    x = model.tok_emb(tokens)  # (N, dim)
    for block in model.blocks:
        x = block(x, cos, sin, attention)
    return model.norm(x)


def response_logits(
    model: AFM, prompts: Sequence[list[int]], responses: Sequence[Sequence[list[int]]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (M, vocab) fp32, target tokens (M,), response row (M,) in 0..B·K−1, response
    lengths (B·K,)) for the M tokens of K non-empty responses to each of B non-empty prompts,
    differentiable, response 0's tokens first. Each prompt runs once for its K responses
    (``pack_shared_prefix``: a response sees its prompt and itself, positions continuing the
    prompt's), and only the positions that predict a response token go through the output
    head: the (tokens, vocab) logits of the whole batch are never built. DPO sums these per
    response, RL keeps them per token."""
    B, K = len(prompts), len(responses[0])
    sp = pack_shared_prefix(prompts, responses)
    p_len = torch.tensor([len(p) for p in prompts])  # (B,)
    r_len = torch.tensor([len(r) for rs in responses for r in rs])  # (B·K,)
    R = sp.response.shape[1]
    real = torch.arange(R) < r_len[:, None]  # (B·K, R)
    prompt_last = sp.prompt.gather(1, (p_len - 1)[:, None]).repeat_interleave(K, 0)  # (B·K, 1)
    predictor = torch.cat((prompt_last, sp.response[:, :-1]), 1)[real]  # (M,) token before
    target = sp.response[real]  # (M,) flat index of each response token
    row = torch.arange(B * K)[:, None].expand(-1, R)[real]  # (M,) its response
    sp = sp.to(model.device, model.rope_cos.dtype)
    h = run_flat(model, sp.tokens, sp.positions, SharedPrefixAttention(sp))  # (N, dim)
    device = h.device
    logits = model.head(h[predictor.to(device)]).float()  # (M, vocab)
    return logits, sp.tokens[target.to(device)], row.to(device), r_len.to(device)

"""Post-training on top of ``models.train.train``: supervised fine-tuning (``sft``) and
preference optimisation from graded levels (``dpo``: DPO, soft-target and margin DPO, IPO).

Both run the model's own blocks over flat token layouts (no padding token passes a linear
layer; attention alone is gathered per document or per prompt), full fine-tune or LoRA
(``models.lora``), and return a ``PostTrainResult``: the loop's final state and every step's
metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.afm import AFM
from models.checkpoint import default_device
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

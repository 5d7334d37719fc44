"""Reward models trained on EvalHub's graded side-by-side preferences.

Features, with references:

- soft-label Bradley-Terry loss: each preference level maps to a target probability that the
  chosen response wins, so "negligibly better" pulls less than "significantly better" and ties
  pull the two rewards together (Apple, "Apple Intelligence Foundation Language Models",
  arXiv:2407.21075, §5.3 "Reinforcement learning from human feedback", reward modelling: a
  soft-label loss that takes the level of human preference into account);
- the usual hard BT loss (Ouyang et al. 2022, arXiv:2203.02155, §3.5) and Llama 2's margin loss
  −log σ(r_c − r_r − m(level)) (Touvron et al. 2023, arXiv:2307.09288, §3.2.2, Table 28);
- single-sided per-aspect grades as a regulariser: linear aspect heads on the reward features
  regress each 1–5 grade (AFM §5.3 adds single-sided gradings as regularisation terms);
- two backbones behind one interface: frozen all-MiniLM-L6-v2 sentence embeddings (cheap
  baseline) and the built-in AFM decoder with only the last N blocks trainable, pooled at the
  last token; the prompt shared by the responses of a pair is computed once (see
  ``models.reward_backbones.pack_shared_prefix``); a pair's prompt is read in its
  conversation (``Preference.context``), as ``models.chat.chat_prompt`` formats it;
- evaluation: pairwise accuracy overall and per level, Spearman against aspect grades,
  expected calibration error of σ(r_c − r_r) against the soft targets (Guo et al. 2017,
  arXiv:1706.04599, 10 equal-width bins); best-of-N reranking; safetensors + JSON save/load.

The levels, their soft targets and margins, and the ``Preference`` record with its JSONL
loading and splitting live in ``models.preferences``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from models.chat import Prompt
from models.preferences import (
    DEFAULT_MARGINS,
    DEFAULT_SOFT_TARGETS,
    LEVELS,
    STRENGTHS,
    TIES,
    Preference,
    labels_hash,
)
from models.reward_backbones import Backbone, backbone_from_reference
from models.train import TrainConfig
from models.train import train as run_training

FORMAT, VERSION = "evalhub-reward", 1


# ---------------------------------------------------------------------------------- losses
def soft_bt_loss(r_a: torch.Tensor, r_b: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of σ(r_a − r_b) against soft targets in [0, 1] (AFM §5.3)."""
    return F.binary_cross_entropy_with_logits(r_a - r_b, target)


def hard_bt_loss(r_a: torch.Tensor, r_b: torch.Tensor) -> torch.Tensor:
    """−log σ(r_a − r_b): target 1 for every pair. Ties must be dropped by the caller."""
    return -F.logsigmoid(r_a - r_b).mean()


def margin_bt_loss(r_a: torch.Tensor, r_b: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Llama 2 §3.2.2: −log σ(r_a − r_b − m(level)). Ties must be dropped by the caller."""
    return -F.logsigmoid(r_a - r_b - margin).mean()


def aspect_loss(pred: torch.Tensor, grades: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Mean squared error of aspect predictions against grades 1..5 rescaled to [−1, 1],
    over the grades that exist (``known``: bool, same shape); 0 when none do."""
    err = (pred - (grades - 3) / 2).square() * known
    return err.sum() / known.sum().clamp(min=1)


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = 10) -> float:
    """Σ_b (n_b / n) |mean prob_b − mean target_b| over ``bins`` equal-width bins of [0, 1];
    a probability of exactly 1 falls in the last bin."""
    idx = (probs * bins).long().clamp(max=bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.float().mean().item() * abs(probs[sel].mean() - targets[sel].mean()).item()
    return ece


# ----------------------------------------------------------------------------------- model
class RewardModel(nn.Module):
    """backbone features -> scalar reward (+ one linear head per single-sided aspect)."""

    def __init__(
        self,
        backbone: Backbone,
        aspects: Sequence[str] = (),
        soft_targets: dict[str, float] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.backbone, self.aspects = backbone, tuple(aspects)
        self.soft_targets = dict(soft_targets or DEFAULT_SOFT_TARGETS)
        if set(self.soft_targets) != set(LEVELS):
            raise ValueError(f"soft_targets must map exactly the levels {LEVELS}")
        g = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(backbone.dim, 1)
        # N(0, 1/(d+1)) as for the reward head of Stiennon et al. 2020 (arXiv:2009.01325).
        nn.init.normal_(self.head.weight, std=(backbone.dim + 1) ** -0.5, generator=g)
        nn.init.zeros_(self.head.bias)
        self.aspect_head = nn.Linear(backbone.dim, len(self.aspects)) if self.aspects else None
        if self.aspect_head is not None:
            nn.init.normal_(self.aspect_head.weight, std=(backbone.dim + 1) ** -0.5, generator=g)
            nn.init.zeros_(self.aspect_head.bias)

    def forward(self, prompts, responses) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rewards (B, K) and aspect predictions (B, K, A) or None."""
        f = self.backbone.encode(prompts, responses)  # (B, K, dim)
        aspects = self.aspect_head(f) if self.aspect_head is not None else None
        return self.head(f).squeeze(-1), aspects

    def pairs(self, prefs: Sequence[Preference]):
        """(rewards (B, 2), aspects (B, 2, A) | None) for [chosen, rejected] of each pair,
        each read in its conversation (the context, then the prompt)."""
        return self([p.messages for p in prefs], [[p.chosen, p.rejected] for p in prefs])

    @torch.no_grad()
    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], batch_size: int = 64
    ) -> list[float]:
        """The reward of each response to its prompt (text, or a conversation ending with
        the user turn: ``models.chat.Prompt``)."""
        out = []
        for i in range(0, len(prompts), batch_size):
            r, _ = self(prompts[i : i + batch_size], [[x] for x in responses[i : i + batch_size]])
            out += r[:, 0].tolist()
        return out

    @torch.no_grad()
    def rerank(self, prompt: Prompt, candidates: Sequence[str], batch_size: int = 16) -> int:
        """Best-of-N: index of the highest-reward candidate (prompt encoded once per chunk)."""
        scores = []
        for i in range(0, len(candidates), batch_size):
            scores += self([prompt], [list(candidates[i : i + batch_size])])[0][0].tolist()
        return max(range(len(scores)), key=scores.__getitem__)


def save_reward_model(
    model: RewardModel, path: str | os.PathLike, report: TrainReport | None = None
) -> Path:
    """Directory with reward.safetensors (every trainable tensor: heads and, for a decoder,
    its trained blocks) and reward.json (backbone reference, aspects, targets, report)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {
        n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad
    }
    save_file(state, path / "reward.safetensors", metadata={"format": FORMAT})
    config = {
        "format": FORMAT,
        "version": VERSION,
        "backbone": model.backbone.reference(),
        "dim": model.backbone.dim,
        "aspects": list(model.aspects),
        "soft_targets": model.soft_targets,
        "report": asdict(report) if report is not None else None,
    }
    (path / "reward.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return path


def load_reward_model(path: str | os.PathLike, backbone: Backbone | None = None) -> RewardModel:
    """Inverse of ``save_reward_model``; ``backbone`` is required for backbones that the
    reference cannot rebuild (custom embedders, checkpoints that were never on disk)."""
    path = Path(path)
    config = json.loads((path / "reward.json").read_text())
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ValueError(f"{path}: not an {FORMAT} v{VERSION} directory")
    backbone = backbone if backbone is not None else backbone_from_reference(config["backbone"])
    if backbone.dim != config["dim"]:
        raise ValueError(f"backbone dim {backbone.dim} != saved dim {config['dim']}")
    model = RewardModel(backbone, config["aspects"], config["soft_targets"])
    state = load_file(path / "reward.safetensors")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != trainable:
        raise ValueError(
            f"{path}: saved tensors {sorted(set(state) ^ trainable)[:4]} "
            "do not match the backbone's trainable parameters"
        )
    model.load_state_dict(state, strict=False)
    return model.eval()


# -------------------------------------------------------------------------------- training
@dataclass
class TrainReport:
    loss: str
    soft_targets: dict[str, float]
    margins: dict[str, float]
    labels_hash: str  # of the training labels as given (before ties are dropped)
    pairs: int  # pairs the loss used (hard and margin drop ties)
    dropped_ties: int
    epochs: int
    steps: int
    lr: float
    batch_size: int
    aspect_weight: float
    seed: int
    backbone: dict
    train_loss: list[float] = field(default_factory=list)  # mean per epoch
    held_out_loss: list[float] = field(default_factory=list)  # after each epoch
    seconds: float = 0.0


def _batch_loss(
    model: RewardModel,
    batch: Sequence[Preference],
    loss: str,
    aspect_weight: float,
    margins: dict[str, float],
) -> torch.Tensor:
    rewards, aspect_pred = model.pairs(batch)  # (B, 2), (B, 2, A) | None
    r_a, r_b = rewards[:, 0], rewards[:, 1]
    device = rewards.device
    if loss == "soft":
        targets = torch.tensor([model.soft_targets[p.level] for p in batch], device=device)
        out = soft_bt_loss(r_a, r_b, targets)
    elif loss == "hard":
        out = hard_bt_loss(r_a, r_b)
    else:
        margin = torch.tensor([margins[p.level] for p in batch], device=device)
        out = margin_bt_loss(r_a, r_b, margin)
    if aspect_pred is not None and aspect_weight:
        sides = [(p.chosen_aspects, p.rejected_aspects) for p in batch]
        grades = torch.tensor(
            [[[g.get(a, 0) for a in model.aspects] for g in gs] for gs in sides], device=device
        ).float()  # (B, 2, A), 0 = ungraded
        out = out + aspect_weight * aspect_loss(aspect_pred, grades, grades > 0)
    return out


HEAD_LR = 1e-3  # heads on frozen features: a linear probe, converges in a few epochs here
FINETUNE_LR = 1e-5  # decoder blocks training: InstructGPT's reward models used 9e-6 (Ouyang
# et al. 2022, appendix C.2); 1e-3 moves pretrained blocks far enough to forget


def default_lr(backbone: Backbone) -> float:
    """The learning rate for ``backbone``: FINETUNE_LR when any of its weights train."""
    return FINETUNE_LR if any(p.requires_grad for p in backbone.parameters()) else HEAD_LR


def train_reward_model(
    train: Sequence[Preference],
    held_out: Sequence[Preference],
    backbone: Backbone,
    *,
    loss: str = "soft",
    epochs: int = 3,
    lr: float | None = None,  # None: default_lr(backbone)
    batch_size: int = 32,
    aspect_weight: float = 0.1,  # AFM gives no value; small, so the pairwise loss dominates
    weight_decay: float = 0.0,
    seed: int = 0,
    soft_targets: dict[str, float] | None = None,
    margins: dict[str, float] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[RewardModel, TrainReport]:
    """Train a reward head (and the backbone's trainable part) with AdamW at a constant lr,
    through ``models.train.train`` on the device the backbone is on (no clipping, no warm-up,
    torch's AdamW betas and eps). ``loss``: "soft" (AFM soft labels, ties kept), "hard" or
    "margin" (ties dropped). ``progress(step, total, loss)`` after every optimizer step."""
    if loss not in ("soft", "hard", "margin"):
        raise ValueError(f"loss must be soft, hard or margin, not {loss!r}")
    margins = dict(margins or DEFAULT_MARGINS)
    keep = (lambda ps: list(ps)) if loss == "soft" else (lambda ps: [p for p in ps if not p.tie])
    used, held = keep(train), keep(held_out)
    if not used:
        raise ValueError("no usable training pairs")
    aspects = sorted({a for p in used for a in (*p.chosen_aspects, *p.rejected_aspects)})
    model = RewardModel(backbone, aspects, soft_targets, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = default_lr(backbone) if lr is None else lr
    per_epoch = math.ceil(len(used) / batch_size)
    report = TrainReport(
        loss,
        model.soft_targets,
        margins,
        labels_hash(train),
        len(used),
        len(train) - len(used),
        epochs,
        epochs * per_epoch,
        lr,
        batch_size,
        aspect_weight,
        seed,
        backbone.reference(),
    )
    config = TrainConfig(
        lr=lr,
        weight_decay=weight_decay,
        betas=(0.9, 0.999),  # torch's AdamW defaults, which reward training has always used
        eps=1e-8,
        schedule="constant",
        warmup_ratio=0.0,
        batch_size=batch_size,
        clip_norm=None,
        epochs=epochs,
        seed=seed,
        device=str(params[0].device),
    )
    seen = 0.0  # summed loss over this epoch's pairs so far

    def step_done(step: int, total: int, metrics: dict[str, float]) -> None:
        nonlocal seen
        seen += metrics["loss"] * metrics["examples"]
        if progress is not None:
            progress(step, total, metrics["loss"])
        if step % per_epoch == 0:  # an epoch ends
            report.train_loss.append(seen / len(used))
            report.held_out_loss.append(
                _mean_loss(model, held, loss, aspect_weight, margins, batch_size)
            )
            seen = 0.0

    def batch_loss(indices: torch.Tensor) -> torch.Tensor:
        return _batch_loss(model, [used[j] for j in indices.tolist()], loss, aspect_weight, margins)

    start = time.perf_counter()
    run_training(model, batch_loss, len(used), config, params=params, progress=step_done)
    report.seconds = time.perf_counter() - start
    return model.eval(), report


@torch.no_grad()
def _mean_loss(model, prefs, loss, aspect_weight, margins, batch_size) -> float:
    model.eval()
    if not prefs:
        return float("nan")
    total = sum(
        _batch_loss(model, prefs[i : i + batch_size], loss, aspect_weight, margins).item()
        * len(prefs[i : i + batch_size])
        for i in range(0, len(prefs), batch_size)
    )
    return total / len(prefs)


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_reward_model(
    model: RewardModel, prefs: Sequence[Preference], batch_size: int = 64
) -> dict:
    """Pairwise accuracy (non-ties) overall and per level, mean |r_a − r_b| on ties, ECE of
    σ(r_a − r_b) against the model's soft targets, Spearman of reward with each aspect."""
    from scipy.stats import spearmanr

    if not prefs:
        raise ValueError("no preferences to evaluate")
    model.eval()
    rewards = torch.cat(
        [model.pairs(prefs[i : i + batch_size])[0] for i in range(0, len(prefs), batch_size)]
    )  # (N, 2)
    diff = rewards[:, 0] - rewards[:, 1]
    levels = [p.level for p in prefs]
    won = diff > 0
    per_level: dict[str, dict] = {}
    for level in LEVELS:
        sel = torch.tensor([lv == level for lv in levels], dtype=torch.bool)
        if not sel.any():
            continue
        tie = level in TIES
        value = diff[sel].abs().mean() if tie else won[sel].float().mean()
        per_level[level] = {
            "n": int(sel.sum()),
            "mean_abs_margin" if tie else "accuracy": value.item(),
        }
    strong = torch.tensor([lv in STRENGTHS for lv in levels], dtype=torch.bool)
    targets = torch.tensor([model.soft_targets[lv] for lv in levels])
    spearman = {}
    for a in sorted({a for p in prefs for a in (*p.chosen_aspects, *p.rejected_aspects)}):
        pts = [
            (rewards[i, s].item(), side[a])
            for i, p in enumerate(prefs)
            for s, side in enumerate((p.chosen_aspects, p.rejected_aspects))
            if a in side
        ]
        rho = spearmanr(*zip(*pts, strict=True)).statistic if len(pts) >= 3 else float("nan")
        spearman[a] = None if math.isnan(rho) else float(rho)
    return {
        "pairs": len(prefs),
        "accuracy": won[strong].float().mean().item() if strong.any() else None,
        "per_level": per_level,
        "ece": expected_calibration_error(diff.sigmoid(), targets),
        "spearman": spearman,
    }

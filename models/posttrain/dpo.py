"""Preference optimisation from graded side-by-side levels: DPO, soft-target and margin DPO, IPO.

Features, with references:

- the losses as pure functions of summed sequence log-probs (policy and reference, chosen and
  rejected), Δ = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)):
  hard DPO −log σ(βΔ) (Rafailov et al. 2023, arXiv:2305.18290, eq. 7);
  **soft-target DPO**, the binary cross-entropy −[p log σ(βΔ) + (1 − p) log σ(−βΔ)] against
  the level's soft target p (``models.preferences``; the reward-model loss of AFM, arXiv:
  2407.21075 §5.3, on DPO's implicit reward, as in label-smoothed "conservative" DPO, Mitchell
  2023); **margin DPO** −log σ(βΔ − m) with Llama 2's margin per level (arXiv:2307.09288
  §3.2.2, on the implicit reward as DPO with an offset, Amini et al. 2024, arXiv:2402.10571);
  IPO (Δ − 1/(2β))² (Azar et al. 2023, arXiv:2310.12036, eq. 17) and **level-aware IPO**,
  whose target gap is (2p − 1)/(2β): IPO's population loss regresses the gap on
  β⁻¹(P(c ≻ r) − ½) (ibid. §5.1), so p = 1 gives the hard IPO target and a tie gives zero;
- ties, explicitly (``DPOConfig.ties``): "keep" trains a tied pair towards equal implicit
  rewards (soft target ½, margin 0, IPO gap 0: the same loss whichever response is called
  chosen); "skip" drops it before training. Level-aware losses keep ties, hard ones skip them
  (a tie has no winner to push up);
- reference log-probs computed once for the whole dataset before training and cached on disk,
  keyed by a hash of the reference's weights and the token ids
  (``reference_logprobs``); with LoRA the reference is the policy with its adapters disabled
  (``models.lora.adapters_disabled``), so no second copy of the model exists; for a full
  fine-tune without a reference model, the policy's weights before training;
- both responses of a pair share one prompt pass (``models.kernels.pack_shared_prefix``) and
  only response positions go through the output head (``pair_logprobs``);
- ``train_dpo`` on ``models.train.train`` (schedule, accumulation, clipping, checkpoints with
  exact resume), logging loss, implicit rewards of chosen and rejected, their margin and the
  accuracy over non-tie pairs (TRL's ``rewards/*`` metrics).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from models.afm import AFM
from models.chat import chat_prompt, transcript
from models.lora import adapters_disabled, lora_layers, lora_parameters
from models.posttrain import (
    PostTrainResult,
    Progress,
    recorder,
    response_logits,
    training_device,
)
from models.preferences import DEFAULT_MARGINS, DEFAULT_SOFT_TARGETS, Preference
from models.tokenizer import TextTokenizer
from models.train import TrainConfig, train

LOSSES = ("dpo", "ipo")


@dataclass(frozen=True)
class DPOConfig:
    loss: str = "dpo"  # "dpo" or "ipo"
    beta: float = 0.1  # β (DPO's KL weight; IPO's τ): 0.1 as Rafailov et al. §6 and TRL
    level_aware: bool = True  # use the level (AFM §5.3); False: hard labels, the baseline
    level_form: str = "soft"  # DPO only: "soft" (the level's soft target) or "margin"
    ties: str | None = None  # "keep" or "skip"; None: keep if level-aware, else skip
    ipo_length_normalize: bool = True  # IPO on per-token mean log-probs (TRL, confirmed with
    # the IPO authors: the paper's results use it); DPO always uses sums
    max_len: int = 1024  # tokens of prompt + response; prompts keep their end (≤ half of it)
    chat_template: bool = True  # prompts in their conversation in the tokenizer's chat template
    reference_batch: int = 16  # pairs per reference pass
    cache_dir: str | None = None  # reference log-probs cache; None: kept in memory only

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, not {self.loss!r}")
        if self.level_form not in ("soft", "margin"):
            raise ValueError(f"level_form must be 'soft' or 'margin', not {self.level_form!r}")
        if self.ties not in (None, "keep", "skip"):
            raise ValueError(f"ties must be 'keep', 'skip' or None, not {self.ties!r}")
        if self.beta <= 0:
            raise ValueError("beta must be positive")

    @property
    def keep_ties(self) -> bool:
        return self.ties == "keep" if self.ties is not None else self.level_aware


# ------------------------------------------------------------------------------ losses
def reward_gap(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor):
    """Δ = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)), per pair."""
    return (pc - rc) - (pr - rr)


def dpo_loss(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    """Hard DPO per pair: −log σ(βΔ)."""
    return -F.logsigmoid(beta * reward_gap(pc, pr, rc, rr))


def soft_dpo_loss(pc, pr, rc, rr, beta: float, target, margin=0.0) -> torch.Tensor:
    """Soft-target DPO per pair: −[p log σ(z) + (1 − p) log σ(−z)], z = βΔ − margin. p = 1
    gives hard (or margin) DPO, p = ½ with margin 0 a tie."""
    z = beta * reward_gap(pc, pr, rc, rr) - margin
    return -(target * F.logsigmoid(z) + (1 - target) * F.logsigmoid(-z))


def margin_dpo_loss(pc, pr, rc, rr, beta: float, margin) -> torch.Tensor:
    """DPO with the level's margin per pair: −log σ(βΔ − m)."""
    return -F.logsigmoid(beta * reward_gap(pc, pr, rc, rr) - margin)


def ipo_loss(pc, pr, rc, rr, beta: float, target_gap=None) -> torch.Tensor:
    """IPO per pair: (Δ − g)², g = 1/(2β) unless given (``level_ipo_gap``)."""
    gap = 1 / (2 * beta) if target_gap is None else target_gap
    return (reward_gap(pc, pr, rc, rr) - gap) ** 2


def level_ipo_gap(target, beta: float):
    """IPO's target gap for soft target p: (2p − 1)/(2β); 1/(2β) at p = 1, 0 for a tie."""
    return (2 * target - 1) / (2 * beta)


def pair_targets(prefs: Sequence[Preference], dpo: DPOConfig) -> tuple[torch.Tensor, ...]:
    """(soft target p, margin m, tie) per pair, (n,) each, for the configured loss. Hard
    labels: p = 1; ties (when kept): p = ½, m = 0."""
    tie = torch.tensor([p.tie for p in prefs], dtype=torch.bool)
    if dpo.level_aware and (dpo.loss == "ipo" or dpo.level_form == "soft"):
        p = torch.tensor([DEFAULT_SOFT_TARGETS[x.level] for x in prefs])
    else:
        p = torch.where(tie, 0.5, 1.0)
    margin = torch.zeros(len(prefs))
    if dpo.loss == "dpo" and dpo.level_aware and dpo.level_form == "margin":
        margin = torch.tensor([DEFAULT_MARGINS.get(x.level, 0.0) for x in prefs])
    return p, margin, tie


def preference_loss(pc, pr, rc, rr, p, margin, dpo: DPOConfig) -> torch.Tensor:
    """The configured loss per pair from summed (or, for IPO, length-normalised) log-probs."""
    if dpo.loss == "ipo":
        return ipo_loss(pc, pr, rc, rr, dpo.beta, level_ipo_gap(p, dpo.beta))
    return soft_dpo_loss(pc, pr, rc, rr, dpo.beta, p, margin)


# ------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class EncodedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def encode_preferences(
    tokenizer: TextTokenizer, prefs: Sequence[Preference], dpo: DPOConfig
) -> list[EncodedPair]:
    """Token ids of each pair: the prompt in its conversation (its context, then the prompt as
    a user turn: ``models.chat.chat_prompt`` with ``dpo.chat_template``, else the plain
    ``transcript``), each response followed by EOS (as TRL). The prompt keeps its last
    ``max_len // 2`` tokens at most, each response its first ``max_len - len(prompt)``."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for p in prefs:
        text = chat_prompt(tokenizer, p.messages) if dpo.chat_template else transcript(p.messages)
        prompt = tokenizer.encode(text)[-(dpo.max_len // 2) :]
        room = dpo.max_len - len(prompt)
        chosen, rejected = (
            tokenizer.encode(r)[: room - len(eos)] + eos for r in (p.chosen, p.rejected)
        )
        out.append(EncodedPair(prompt, chosen, rejected))
    return out


def pair_logprobs(model: AFM, pairs: Sequence[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log π(response | prompt), response length), each (B, 2) for [chosen, rejected],
    differentiable (``response_logprobs`` with K = 2)."""
    return response_logprobs(
        model, [p.prompt for p in pairs], [[p.chosen, p.rejected] for p in pairs]
    )


def response_logprobs(
    model: AFM, prompts: Sequence[list[int]], responses: Sequence[Sequence[list[int]]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log π(response | prompt), response length), each (B, K), differentiable, for K
    non-empty responses to each of B non-empty prompts. Each prompt runs once for its K
    responses (``pack_shared_prefix``: a response sees its prompt and itself, positions
    continuing the prompt's), and only the positions that predict a response token go
    through the output head: the (tokens, vocab) logits of the whole batch are never built."""
    B, K = len(prompts), len(responses[0])
    logits, targets, row, r_len = response_logits(model, prompts, responses)
    token_lp = -F.cross_entropy(logits, targets, reduction="none")  # (M,)
    sums = torch.zeros(B * K, device=logits.device).index_add(0, row, token_lp)
    return sums.view(B, K), r_len.view(B, K)


# ------------------------------------------------------------------------------ reference
def weights_digest(model: nn.Module, *, without_adapters: bool = False) -> str:
    """sha256 over the model's config, parameters and persistent buffers (names, shapes,
    dtypes, bytes); with ``without_adapters``, LoRA's A and B are left out (the model as run
    with ``adapters_disabled``)."""
    skip = {id(p) for p in lora_parameters(model)} if without_adapters else set()
    h = hashlib.sha256()
    cfg = getattr(model, "cfg", None)
    h.update(json.dumps(cfg.to_dict() if cfg is not None else {}, sort_keys=True).encode())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in skip or name.startswith("rope_"):  # RoPE tables derive from the config
            continue
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def pairs_digest(pairs: Sequence[EncodedPair]) -> str:
    rows = [[p.prompt, p.chosen, p.rejected] for p in pairs]
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


@torch.no_grad()
def reference_logprobs(
    reference: AFM,
    pairs: Sequence[EncodedPair],
    *,
    batch_size: int = 16,
    cache_dir: str | os.PathLike | None = None,
    without_adapters: bool = False,
) -> tuple[torch.Tensor, bool]:
    """(summed log-probs (n, 2) of [chosen, rejected] under ``reference``, on the CPU, fp32;
    whether they came from the cache). With ``cache_dir``, read from or written to
    ``reference-<hash>.safetensors`` there, the hash over the reference's weights and the
    token ids, so a run that resumes (or a second run on the same data) never recomputes.
    ``without_adapters``: run with LoRA adapters disabled (the base as reference)."""
    key = hashlib.sha256(
        (
            weights_digest(reference, without_adapters=without_adapters) + pairs_digest(pairs)
        ).encode()
    ).hexdigest()[:32]
    path = Path(cache_dir) / f"reference-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        return load_file(path)["logprobs"], True
    was_training = reference.training
    reference.eval()
    try:
        with adapters_disabled(reference) if without_adapters else nullcontext():
            out = torch.cat(
                [
                    pair_logprobs(reference, pairs[i : i + batch_size])[0].float().cpu()
                    for i in range(0, len(pairs), batch_size)
                ]
            )  # (n, 2)
    finally:
        reference.train(was_training)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        save_file({"logprobs": out.contiguous()}, tmp)
        tmp.rename(path)
    return out, False


# ------------------------------------------------------------------------------ training
def dpo_loss_fn(policy: AFM, pairs: Sequence[EncodedPair], ref: torch.Tensor, targets, dpo):
    """``loss_fn(indices)`` for ``models.train.train``: the mean configured loss over those
    pairs, with the implicit rewards β(log π − log π_ref) of chosen and rejected, their margin
    and the accuracy over non-tie pairs (micro-batch means) as metrics."""
    p_all, margin_all, tie_all = targets

    def loss_fn(indices: torch.Tensor):
        idx = indices.tolist()
        logps, lengths = pair_logprobs(policy, [pairs[i] for i in idx])  # (b, 2) each
        device = logps.device
        ref_b = ref[indices].to(device)
        p, margin, tie = (t[indices].to(device) for t in (p_all, margin_all, tie_all))
        pol, rf = logps, ref_b
        if dpo.loss == "ipo" and dpo.ipo_length_normalize:
            pol, rf = logps / lengths, ref_b / lengths
        losses = preference_loss(pol[:, 0], pol[:, 1], rf[:, 0], rf[:, 1], p, margin, dpo)
        with torch.no_grad():
            chosen = dpo.beta * (logps[:, 0] - ref_b[:, 0])
            rejected = dpo.beta * (logps[:, 1] - ref_b[:, 1])
            metrics = {
                "reward_chosen": float(chosen.mean()),
                "reward_rejected": float(rejected.mean()),
                "reward_margin": float((chosen - rejected).mean()),
            }
            if bool((~tie).any()):
                metrics["accuracy"] = float((chosen > rejected)[~tie].float().mean())
        return losses.mean(), metrics

    return loss_fn


def train_dpo(
    policy: AFM,
    reference: AFM | None,
    tokenizer: TextTokenizer,
    preferences: Sequence[Preference],
    config: TrainConfig,
    dpo: DPOConfig | None = None,
    progress: Progress | None = None,
    *,
    max_len: int | None = None,
    resume_from: str | os.PathLike | None = None,
) -> PostTrainResult:
    """Train ``policy`` (its parameters that require grad: all of them, or only LoRA's after
    ``models.lora.apply_lora``) on ``preferences`` with ``dpo``'s loss through
    ``models.train.train``.

    reference: a frozen model, or None: the policy with its adapters disabled when it has
        LoRA adapters, else the policy's own weights as they are now (call before training;
        reference log-probs are computed once, up front, so no copy is kept).
    max_len: overrides ``dpo.max_len``.
    Ties are kept or dropped as ``dpo.ties`` says (``DPOConfig.keep_ties``); the loop's
    ``n_examples`` is the number of pairs kept.
    """
    dpo = dpo or DPOConfig()
    if max_len is not None:
        dpo = replace(dpo, max_len=max_len)
    kept = [p for p in preferences if dpo.keep_ties or not p.tie]
    if not kept:
        raise ValueError("no preference pairs to train on (only ties, and ties are skipped)")
    pairs = encode_preferences(tokenizer, kept, dpo)
    policy.to(training_device(config))
    if reference is None:
        ref, _ = reference_logprobs(
            policy,
            pairs,
            batch_size=dpo.reference_batch,
            cache_dir=dpo.cache_dir,
            without_adapters=bool(lora_layers(policy)),
        )
    else:
        reference.to(training_device(config))
        ref, _ = reference_logprobs(
            reference, pairs, batch_size=dpo.reference_batch, cache_dir=dpo.cache_dir
        )
    loss_fn = dpo_loss_fn(policy, pairs, ref, pair_targets(kept, dpo), dpo)
    history: list[dict[str, float]] = []
    state = train(
        policy,
        loss_fn,
        len(pairs),
        config,
        progress=recorder(history, progress),
        resume_from=resume_from,
    )
    return PostTrainResult(state, history)

"""Online RL from rewards: MDLOO (AFM's mirror descent with leave-one-out advantages), with
RLOO-with-clipping and plain REINFORCE under the same loop for ablations.

Features, with references:

- one **iteration**: a batch of prompts, k responses each sampled from the current policy
  with the builtin engine (``models.generate.generate``: batched, KV-cached, the prompts'
  shared chat-template prefix run once), scored by ``reward_fn(prompts, responses)``
  (``suites.verifiers`` has verifiers and a reward-model combination), then a few
  gradient steps on the samples (Gunter et al. 2024, "Apple Intelligence Foundation Language
  Models", arXiv:2407.21075, §5.4.2);
- **leave-one-out advantages** A_i = r_i − mean_{j≠i} r_j over the k responses of a prompt
  (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"; Ahmadian et al.
  2024, "Back to basics", arXiv:2402.14740, eq. 6): an unbiased baseline that sums to zero
  per prompt, no value network (``loo_advantages``);
- **mirror-descent policy update** (Tomar et al. 2022, "Mirror Descent Policy Optimization",
  arXiv:2005.09814, on-policy MDPO): ``inner_steps`` gradient steps on
  E_{π_old}[ρ·A] − KL(π‖π_old)/t with no clipping, the KL term being the trust region;
  π_old is the policy that sampled, re-synced every iteration;
- the ratio ρ is **per token**, every token of a response carrying the response's advantage
  (the MDP view with γ = 1, a terminal reward and no critic). At ρ = 1 its gradient
  A·Σ_t ∇log π_t equals the per-sequence ratio's A·∇log π(y), so the first inner step is the
  same either way; on later steps the sequence ratio exp(Σ_t Δ_t) of a 100-token response
  swings by orders of magnitude after a small update and, without PPO's clip, a few
  sequences would own the gradient. Per-token ratios keep the later steps well conditioned,
  and the KL is per token too (the chain rule makes the sequence KL the sum of per-token KLs);
- the KL estimators, from samples of π_old (Schulman 2020, "Approximating KL divergence",
  joschu.net/blog/kl-approx.html): KL(π‖π_old) ≈ ρ log ρ − ρ + 1 per token (unbiased, ≥ 0,
  value and gradient zero at ρ = 1); KL(π‖π_ref) ≈ e^{log π_ref − log π} − (log π_ref −
  log π) − 1 per token ("k3", ≥ 0, GRPO's penalty: Shao et al. 2024, arXiv:2402.03300,
  eq. 4), added to the loss with weight β. The reference is the policy with LoRA adapters
  disabled (``models.lora.adapters_disabled``) or a frozen copy of the starting weights;
- π_old's log-probs are the first inner step's own forward pass, detached: the parameters
  are then exactly the sampler's, so no extra pass is run, and ρ = 1 and KL(π‖π_old) = 0
  exactly there (the log-probs the engine saw while sampling agree only to float rounding);
- losses are sums over response tokens divided by the constant (responses × max_new_tokens),
  not per-response means, so a response's weight does not depend on its length (Liu et al.
  2025, "Understanding R1-Zero-like training", arXiv:2503.20783, §3.1);
- ``algorithm="rloo_clip"``: the same loop with PPO's clipped ratio min(ρA, clip(ρ, 1±ε)A)
  (Schulman et al. 2017, arXiv:1707.06347, eq. 7) instead of the KL trust region;
  ``algorithm="reinforce"``: Williams (1992) with the batch's mean reward as baseline and one
  gradient step per batch (the score-function gradient is valid on-policy only);
- AdamW, schedule and clipping from ``models.train`` (``make_optimizer``, ``lr_factor``);
  checkpoints every N iterations in its format (trainable weights, optimizer, RNG states) with
  exact resume: the prompts and the sampling seed of iteration i depend on (seed, i) only, so
  a resumed run continues the same curve;
- sampling runs on oneDNN-packed copies of the weights (``AFM.prepack``, as the builtin
  backend serves; 2.7x faster decoding of SmolLM2-135M at 8 rows here), rebuilt when an update
  changes the weights and never used where a gradient is wanted; the policy comes back
  without them;
- dropout stays off (the policy runs in eval mode, as TRL's ``disable_dropout``): ρ must
  compare the same function at both ends.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.afm import AFM
from models.checkpoint import default_device
from models.generate import generate
from models.lora import adapters_disabled, lora_layers
from models.posttrain import PostTrainResult, Progress, recorder, response_logits
from models.tokenizer import TextTokenizer
from models.train import (
    TrainConfig,
    TrainState,
    _restore,
    _save_checkpoint,
    lr_factor,
    make_optimizer,
)

ALGORITHMS = ("mdloo", "rloo_clip", "reinforce")
RewardFn = Callable[[list[str], list[str]], Sequence[float]]


@dataclass(frozen=True)
class RLConfig:
    algorithm: str = "mdloo"  # "mdloo", "rloo_clip" or "reinforce"
    k: int = 4  # responses per prompt (RLOO's k = 4, Ahmadian et al. §5)
    prompts_per_step: int = 8  # prompts per iteration: k × this responses are sampled
    iterations: int = 100  # outer iterations (sample, score, update)
    inner_steps: int = 4  # gradient steps per batch (MDPO's m; TRL's num_iterations);
    # reinforce always takes one
    max_new_tokens: int = 256  # response length cap
    temperature: float = 1.0  # sample from π itself: π_old is then exactly the sampler
    top_p: float = 1.0  # < 1 samples from a truncated π: ρ then compares π with a proxy
    md_t: float = 1.0  # mirror-descent step size t: KL(π‖π_old) weighs 1/t. The inner
    # problem's solution is π ∝ π_old·e^{tA}: t scales how far one unit of advantage moves
    # log π per iteration, so it goes with the reward's scale (AFM does not publish its value)
    beta: float = 0.05  # weight of KL(π‖π_ref) (TRL RLOOConfig's default); 0: no reference
    clip_eps: float = 0.2  # rloo_clip's ε (PPO, Schulman et al. 2017 §6)
    lr: float = 1e-6  # AdamW peak rate (TRL RLOOConfig's default for full fine-tunes)
    weight_decay: float = 0.0  # none, as TRL (transformers' default)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW β1, β2 (transformers' default)
    eps: float = 1e-8  # AdamW ε (transformers' default)
    schedule: str = "constant"  # "constant" or "cosine" over all optimizer steps
    warmup_ratio: float = 0.0  # share of optimizer steps warmed up linearly
    min_lr_ratio: float = 0.1  # cosine floor (models.train's)
    clip_norm: float | None = 1.0  # global gradient-norm clip (models.train's)
    prepack: bool = True  # sample with oneDNN-packed weight copies (AFM.prepack; CPU fp32
    # only): decoding 2-3x faster, the copies rebuilt after each update, never used for gradients
    micro_batch: int | None = None  # prompts per forward/backward pass; None: all at once
    chat_template: bool = True  # prompts as one user turn in the tokenizer's chat template
    max_prompt_len: int = 512  # prompts keep their last tokens
    seed: int = 0  # prompt order and sampling
    checkpoint_every: int = 0  # iterations between checkpoints; 0: only the last one
    checkpoint_dir: str | None = None  # None: no checkpoints
    device: str | None = None  # None: CUDA when available, else CPU

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, not {self.algorithm!r}")
        if self.k < 2:
            raise ValueError("k must be at least 2: the leave-one-out baseline needs a sibling")
        if min(self.prompts_per_step, self.iterations, self.inner_steps, self.max_new_tokens) < 1:
            raise ValueError("prompts_per_step, iterations, inner_steps, max_new_tokens >= 1")
        if self.md_t <= 0 or self.beta < 0 or self.temperature <= 0:
            raise ValueError("md_t and temperature must be positive, beta non-negative")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', not {self.schedule!r}")

    @property
    def steps_per_iteration(self) -> int:
        return 1 if self.algorithm == "reinforce" else self.inner_steps

    def optimizer_config(self) -> TrainConfig:
        """The ``models.train`` view of the optimizer fields (for ``make_optimizer``)."""
        return TrainConfig(
            lr=self.lr,
            weight_decay=self.weight_decay,
            betas=self.betas,
            eps=self.eps,
            schedule=self.schedule,
            warmup_ratio=self.warmup_ratio,
            min_lr_ratio=self.min_lr_ratio,
            clip_norm=self.clip_norm,
            seed=self.seed,
        )


# ------------------------------------------------------------------------------ advantages
def loo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = r_i − mean_{j≠i} r_j within each row of ``rewards`` (B, k), k ≥ 2; each row of
    the result sums to zero. Equals k/(k−1)·(r_i − mean_j r_j)."""
    k = rewards.shape[1]
    return (rewards - rewards.mean(dim=1, keepdim=True)) * (k / (k - 1))


def advantages(rewards: torch.Tensor, algorithm: str) -> torch.Tensor:
    """(B, k) advantages: leave-one-out per prompt (mdloo, rloo_clip), or the reward minus the
    whole batch's mean (reinforce: the plain baseline, no grouping by prompt)."""
    if algorithm == "reinforce":
        return rewards - rewards.mean()
    return loo_advantages(rewards)


# ------------------------------------------------------------------------------ losses
def kl_old_estimate(log_ratio: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π‖π_old) from tokens sampled by π_old: ρ log ρ − ρ + 1, ρ = e^{log_ratio}."""
    ratio = log_ratio.exp()
    return ratio * log_ratio - ratio + 1


def kl_ref_estimate(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π‖π_ref) ("k3"): e^{ref − logp} − (ref − logp) − 1."""
    d = ref - logp
    return d.exp() - d - 1


def policy_loss(
    logp: torch.Tensor,
    old: torch.Tensor,
    ref: torch.Tensor | None,
    adv: torch.Tensor,
    config: RLConfig,
    norm: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss (to minimise) of ``config.algorithm`` over M response tokens.

    logp: log π(token) (M,), differentiable; old: log π_old (M,); ref: log π_ref (M,) or None
    (no reference term); adv: each token's response advantage (M,); norm: the constant the
    token sum is divided by (responses × max_new_tokens of the whole batch).
    mdloo: −[ρA − KL_old/t] + β·KL_ref; rloo_clip: −min(ρA, clip(ρ, 1 ± ε)A) + β·KL_ref;
    reinforce: −ρA + β·KL_ref (its gradient at ρ = 1 is −A∇log π).
    Returns (loss, per-token terms detached: "kl_old", "kl_ref", "clipped").
    """
    log_ratio = logp - old
    ratio = log_ratio.exp()
    kl_old = kl_old_estimate(log_ratio)
    if config.algorithm == "mdloo":
        per_token = -(ratio * adv - kl_old / config.md_t)
    elif config.algorithm == "rloo_clip":
        clipped = ratio.clamp(1 - config.clip_eps, 1 + config.clip_eps)
        per_token = -torch.minimum(ratio * adv, clipped * adv)
    else:
        per_token = -ratio * adv
    kl_ref = kl_ref_estimate(logp, ref) if ref is not None else torch.zeros_like(logp)
    if ref is not None and config.beta > 0:
        per_token = per_token + config.beta * kl_ref
    eps = config.clip_eps
    stats = {
        "kl_old": kl_old.detach(),
        "kl_ref": kl_ref.detach(),
        "clipped": (((ratio < 1 - eps) & (adv < 0)) | ((ratio > 1 + eps) & (adv > 0))).detach(),
    }
    return per_token.sum() / norm, stats


# ------------------------------------------------------------------------------ log-probs
@dataclass
class TokenLogprobs:
    """Per-token log-probs of K responses to each of B prompts, flattened over the M response
    tokens in order (response 0's tokens, then response 1's, ...)."""

    logp: torch.Tensor  # (M,) log π(token | prefix), differentiable
    entropy: torch.Tensor | None  # (M,) entropy of π at that position, detached, when asked
    row: torch.Tensor  # (M,) which response (0..B·K−1) the token belongs to


def token_logprobs(
    model: AFM,
    prompts: Sequence[list[int]],
    responses: Sequence[Sequence[list[int]]],
    *,
    entropy: bool = False,
) -> TokenLogprobs:
    """Per-token log π of K responses to each of B non-empty prompts, differentiable. As
    ``models.posttrain.dpo.response_logprobs`` (whose sums these are): each prompt runs once
    for its K responses in ``pack_shared_prefix``'s layout, and only the positions that
    predict a response token go through the output head."""
    logits, targets, row, _ = response_logits(model, prompts, responses)
    logp_all = F.log_softmax(logits, dim=-1)  # (M, vocab)
    logp = logp_all.gather(1, targets[:, None])[:, 0]  # (M,)
    ent = None
    if entropy:
        with torch.no_grad():
            ent = -(logp_all.exp() * logp_all).sum(-1)  # (M,)
    return TokenLogprobs(logp, ent, row)


# ------------------------------------------------------------------------------ sampling
def encode_prompts(
    tokenizer: TextTokenizer, prompts: Sequence[str], config: RLConfig, max_seq_len: int
) -> list[list[int]]:
    """Token ids of each prompt (one user turn of the chat template when there is one and
    ``config.chat_template``), keeping the last tokens that leave room for a full response."""
    keep = min(config.max_prompt_len, max_seq_len - config.max_new_tokens)
    if keep < 1:
        raise ValueError(f"max_new_tokens {config.max_new_tokens} leaves no room in the context")
    templated = config.chat_template and tokenizer.chat_template
    out = []
    for p in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}]) if templated else p
        ids = tokenizer.encode(text)[-keep:]
        if not ids:
            raise ValueError(f"prompt {p!r} encodes to no tokens")
        out.append(ids)
    return out


def sample_responses(
    policy: AFM, prompts: Sequence[list[int]], config: RLConfig, eos: int | None, seed: int
) -> list[list[list[int]]]:
    """k sampled responses (token ids) to each prompt, (B, k) nested, in one batched
    ``generate`` call. A response that ended at EOS keeps it (its probability is part of the
    action, and the reward saw the end); one cut at ``max_new_tokens`` has none."""
    rows = [p for p in prompts for _ in range(config.k)]
    out = generate(
        policy,
        rows,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        stop_token_ids=[eos] if eos is not None else [],
        seed=seed,
    )
    ended = [t + [eos] if eos is not None and len(t) < config.max_new_tokens else t for t in out]
    return [ended[i : i + config.k] for i in range(0, len(ended), config.k)]


def derived_seed(seed: int, stream: int, index: int) -> int:
    """A seed for item ``index`` of stream ``stream`` (0: iteration sampling, 1: epoch order),
    a function of (seed, stream, index) only, so a resumed run draws what the uninterrupted
    one drew."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1)[0])


def prompt_batch(n: int, iteration: int, config: RLConfig) -> list[int]:
    """Indices of iteration ``iteration``'s prompts: consecutive slices of a stream of
    permutations of range(n), one per epoch, each seeded by (seed, epoch)."""
    out = []
    for pos in range(
        iteration * config.prompts_per_step, (iteration + 1) * config.prompts_per_step
    ):
        epoch, at = divmod(pos, n)
        g = torch.Generator().manual_seed(derived_seed(config.seed, 1, epoch))
        out.append(int(torch.randperm(n, generator=g)[at]))
    return out


# ------------------------------------------------------------------------------ training
class _Reference:
    """π_ref's per-token log-probs: the policy with adapters off (LoRA), a given model, or a
    frozen copy of the policy's starting weights."""

    def __init__(self, policy: AFM, reference: AFM | None, config: RLConfig, device: torch.device):
        self.policy, self.model = policy, reference
        self.lora = reference is None and bool(lora_layers(policy))
        if config.beta == 0:
            self.model, self.lora = None, False
        elif reference is None and not self.lora:
            self.model = copy.deepcopy(policy)
        if self.model is not None:
            self.model.requires_grad_(False).eval().to(device)
            if config.prepack and reference is None:  # our own copy, dropped after training
                # oneDNN's packed matmuls halve the reference pass too (1.8 -> 0.9 s for
                # SmolLM2-135M over 2 prompts x 4 responses of 48 tokens), rows or no rows
                self.model.prepack(config.k * config.prompts_per_step)
        self.active = self.lora or self.model is not None

    @torch.no_grad()
    def logprobs(self, prompts, responses, micro: int) -> list[torch.Tensor] | None:
        """Per-token log π_ref (M,) of each micro-batch of ``micro`` prompts; None: no KL."""
        if not self.active:
            return None
        model = self.model if self.model is not None else self.policy
        ctx: AbstractContextManager = adapters_disabled(self.policy) if self.lora else nullcontext()
        with ctx:
            return [
                token_logprobs(model, prompts[s : s + micro], responses[s : s + micro]).logp
                for s in range(0, len(prompts), micro)
            ]


def _update(policy, params, opt, batch, config, lr, first, ref_lp, old_lp) -> dict[str, float]:
    """One optimizer step on the whole batch (micro-batches accumulate). On the ``first``
    inner step, fills ``old_lp`` with the detached log-probs (π_old) and measures entropy."""
    prompts, responses, adv = batch
    micro = config.micro_batch or len(prompts)
    norm = float(len(prompts) * config.k * config.max_new_tokens)
    sums = {"loss": 0.0, "kl_old": 0.0, "kl_ref": 0.0, "clipped": 0.0, "entropy": 0.0}
    for m, s in enumerate(range(0, len(prompts), micro)):
        p, r = prompts[s : s + micro], responses[s : s + micro]
        lp = token_logprobs(policy, p, r, entropy=first)
        if first:
            old_lp.append(lp.logp.detach())
            sums["entropy"] += float(lp.entropy.sum()) if lp.entropy is not None else 0.0
        a = adv[s : s + micro].reshape(-1).to(lp.logp.device)[lp.row]  # (M,)
        ref = ref_lp[m] if ref_lp is not None else None
        loss, stats = policy_loss(lp.logp, old_lp[m], ref, a, config, norm)
        loss.backward()
        sums["loss"] += float(loss.detach())
        for key in ("kl_old", "kl_ref", "clipped"):
            sums[key] += float(stats[key].float().sum())
    out = {"loss": sums["loss"], "lr": lr}
    if config.clip_norm is not None:
        out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, config.clip_norm))
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)
    n_seq = len(prompts) * config.k
    out |= {"kl_old": sums["kl_old"] / n_seq, "kl_ref": sums["kl_ref"] / n_seq}
    out |= {"clipped": sums["clipped"], "entropy": sums["entropy"]}  # token sums: caller divides
    return out


def _score(reward_fn: RewardFn, prompts: list[str], responses: list[str]) -> torch.Tensor:
    """``reward_fn``'s rewards (n,), checked: one finite float per response (a verifier that
    answers None for a prompt it does not know goes through ``verifiers.combine``)."""
    values = list(reward_fn(prompts, responses))
    if len(values) != len(responses) or any(v is None for v in values):
        raise ValueError(
            f"reward_fn must return one float per response ({len(responses)}), got {values[:8]}"
        )
    rewards = torch.tensor([float(v) for v in values])
    if not bool(rewards.isfinite().all()):
        raise ValueError(f"reward_fn returned a non-finite reward: {values[:8]}")
    return rewards


def _iteration_metrics(rewards, responses, inner, times, config: RLConfig) -> dict[str, float]:
    """An iteration's log line from its rewards (B, k), responses, the inner steps' outputs
    and (sampling, update) seconds."""
    n_tokens = sum(len(r) for rs in responses for r in rs)
    metrics = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "kl_old": inner[-1]["kl_old"],
        "kl_ref": inner[0]["kl_ref"],
        "entropy": inner[0]["entropy"] / max(1, n_tokens),
        "response_length": n_tokens / rewards.numel(),
        "loss": sum(x["loss"] for x in inner) / len(inner),
        "lr": inner[-1]["lr"],
        "samples_per_s": rewards.numel() / sum(times),
        "generate_s": times[0],
        "update_s": times[1],
    }
    if "grad_norm" in inner[-1]:
        metrics["grad_norm"] = inner[-1]["grad_norm"]
    if config.algorithm == "rloo_clip":
        metrics["clip_frac"] = sum(x["clipped"] for x in inner) / (len(inner) * max(1, n_tokens))
    return metrics


def train_mdloo(
    policy: AFM,
    tokenizer: TextTokenizer,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    config: RLConfig,
    progress: Progress | None = None,
    reference: AFM | None = None,
    resume_from: str | os.PathLike | None = None,
) -> PostTrainResult:
    """Train ``policy`` (its parameters that require grad: all, or only LoRA's after
    ``models.lora.apply_lora``) on ``reward_fn``'s rewards for responses to ``prompts``
    with ``config.algorithm``; return every iteration's metrics.

    reward_fn(prompts, responses): the prompt text of each response (repeated k times, as
        given here, before the chat template) and the response text (decoded without special
        tokens); returns one float per response.
    reference: π_ref for the KL penalty; None: the policy with its adapters disabled when it
        has LoRA adapters, else a frozen copy of its weights as they are now.
    resume_from: a checkpoint directory this function wrote (``models.train.
        latest_checkpoint``), with the same config (but for checkpoint_every/dir and device)
        and prompts; pass the policy as it was before training (its starting weights are the
        reference).
    progress(iteration, total, metrics) after every iteration; metrics: reward_mean,
    reward_std, kl_old (per response, at the last inner step's forward: how far the update
    moved π from π_old before its final step), kl_ref (per response, of the sampling policy),
    entropy (per token), response_length, loss (mean over inner steps), lr, grad_norm,
    clip_frac (rloo_clip), samples_per_s, generate_s, update_s.
    """
    if not prompts:
        raise ValueError("no prompts to train on")
    device = torch.device(config.device) if config.device else default_device()
    policy.to(device).eval()
    ref_model = _Reference(policy, reference, config, device)
    if config.prepack:
        policy.prepack(config.k * config.prompts_per_step)  # after the reference copy
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = make_optimizer(params, config.optimizer_config())
    encoded = encode_prompts(tokenizer, prompts, config, policy.cfg.max_seq_len)
    n, steps = len(prompts), config.steps_per_iteration
    total = config.iterations * steps
    warmup = round(config.warmup_ratio * total)
    state = TrainState(0, 0, 0, config.iterations)
    if resume_from is not None:
        state = _restore(Path(resume_from), policy, params, opt, config, n, config.iterations)
    history: list[dict[str, float]] = []
    record = recorder(history, progress)
    while state.step < config.iterations:
        it = state.step
        start = time.perf_counter()
        idx = prompt_batch(n, it, config)
        batch_prompts = [encoded[i] for i in idx]
        responses = sample_responses(
            policy, batch_prompts, config, tokenizer.eos_token_id, derived_seed(config.seed, 0, it)
        )
        texts = [tokenizer.decode(r, skip_special_tokens=True) for rs in responses for r in rs]
        rewards = _score(reward_fn, [prompts[i] for i in idx for _ in range(config.k)], texts)
        rewards = rewards.view(len(idx), config.k)
        generated = time.perf_counter()
        batch = (batch_prompts, responses, advantages(rewards, config.algorithm))
        ref_lp = ref_model.logprobs(batch_prompts, responses, config.micro_batch or len(idx))
        old_lp: list[torch.Tensor] = []  # filled by the first inner step
        inner = []
        for j in range(steps):
            factor = lr_factor(it * steps + j, total, warmup, config.schedule, config.min_lr_ratio)
            lr = config.lr * factor
            inner.append(_update(policy, params, opt, batch, config, lr, j == 0, ref_lp, old_lp))
        times = (generated - start, time.perf_counter() - generated)
        metrics = _iteration_metrics(rewards, responses, inner, times, config)
        pos = (it + 1) * config.prompts_per_step
        state = TrainState(it + 1, pos // n, pos % n, config.iterations, metrics, state.checkpoint)
        every = config.checkpoint_every
        due = state.step == config.iterations or (every > 0 and state.step % every == 0)
        if config.checkpoint_dir is not None and due:
            state.checkpoint = _save_checkpoint(policy, params, opt, state, config, n)
        record(state.step, config.iterations, metrics)
        policy.eval()
    if config.prepack:
        policy.prepack(None)
    return PostTrainResult(state, history)

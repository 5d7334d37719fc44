"""The training loop of the model library: reward models now, SFT, DPO/IPO and RL on top of it.

One function, ``train(model, loss_fn, n_examples, config)``: the caller owns the data and the
loss (``loss_fn(indices)`` computes the mean loss over those examples of its dataset), the loop
owns everything else. Features, with references:

- AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101), weight decay on matrices only, not on
  norms and biases (as nanoGPT's ``configure_optimizers`` and GPT-3 practice);
- linear warm-up, then cosine decay (Loshchilov & Hutter 2017, arXiv:1608.03983) to a floor
  of 10% of the peak (Touvron et al. 2023, "Llama 2", arXiv:2307.09288, §2.2), or a constant
  rate; the rate is a pure function of the step (``lr_factor``), so it has no state to save;
- gradient accumulation: a global batch of ``batch_size`` examples is cut into micro-batches,
  each loss weighted by its share of the batch, so k micro-batches give the big batch's
  gradient (to float rounding); gradient-norm clipping (Pascanu et al. 2013,
  arXiv:1211.5063) at 1.0 (Llama 2 §2.2);
- checkpoints every N steps with exact resume: trainable weights, optimizer, RNG states
  (torch, CUDA, python ``random``, numpy) per process, and the data position (epoch, index
  into that epoch's permutation). Same seed and data give the same weights bit for bit on
  CPU, straight through or resumed;
- data parallel when ``torch.distributed`` is initialised (``torchrun``; NCCL on GPUs, gloo on
  CPU): every process draws the same global batch, takes its contiguous shard, and gradients
  are summed with one ``all_reduce`` (see ``_all_reduce_grads`` for why not DDP);
- devices: CUDA when available with bf16 autocast (parameters and optimizer state stay fp32),
  CPU fp32 otherwise;
- ``sequence_logprobs``: summed log p(token | prefix) over a completion mask, with gradients,
  for padded batches (left or right) through ``AFM.trunk``; ``pack_completions`` builds the
  batch from (prompt ids, completion ids) pairs.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from models.afm import AFM
from models.checkpoint import default_device, privatize_

# loss_fn's result: the mean loss over the given examples, optionally with float metrics.
LossResult = torch.Tensor | tuple[torch.Tensor, dict[str, float]]


@dataclass(frozen=True)
class TrainConfig:
    """Defaults are Llama 2's supervised fine-tuning recipe (Touvron et al. 2023,
    arXiv:2307.09288, §3.1, with the optimizer of §2.2) unless noted."""

    lr: float = 2e-5  # peak learning rate (§3.1)
    weight_decay: float = 0.1  # (§3.1); applied to matrices only
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW β1, β2 (§2.2)
    eps: float = 1e-5  # AdamW ε (§2.2)
    schedule: str = "cosine"  # "cosine" (§3.1) or "constant" (after the warm-up)
    warmup_ratio: float = 0.03  # share of steps warmed up linearly (Taori et al. 2023,
    # Stanford Alpaca's fine-tuning recipe, --warmup_ratio 0.03; Llama 2 §3.1 gives none)
    min_lr_ratio: float = 0.1  # cosine floor: 10% of the peak (§2.2)
    batch_size: int = 64  # examples per optimizer step, over all processes (§3.1)
    accumulation: int = 1  # micro-batches per process and optimizer step
    clip_norm: float | None = 1.0  # global gradient-norm clip (§2.2); None: no clipping
    epochs: int = 2  # (§3.1)
    max_steps: int | None = None  # stop after this many optimizer steps, mid-epoch if need be
    seed: int = 0  # data order and the global RNGs (each process adds its rank)
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: only the last step
    checkpoint_dir: str | None = None  # None: no checkpoints
    device: str | None = None  # None: CUDA when available, else CPU

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', not {self.schedule!r}")
        if self.batch_size < 1 or self.accumulation < 1 or self.epochs < 1:
            raise ValueError("batch_size, accumulation and epochs must be positive")


# Fields that do not change the trajectory: a run may resume with other values.
_RESUMABLE_CHANGES = {"checkpoint_every", "checkpoint_dir", "device"}


@dataclass
class TrainState:
    """Where a run is: ``step`` optimizer steps done, the next batch starts at ``index`` of
    epoch ``epoch``'s permutation; the last step's metrics; the last checkpoint written."""

    step: int
    epoch: int
    index: int
    total: int  # optimizer steps in the whole run
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak rate for optimizer step ``step`` (0-based) of ``total``: linear
    warm-up reaching the peak at step ``warmup - 1`` (no step is wasted at rate 0), then the
    peak ("constant") or a cosine from the peak at step ``warmup`` to ``min_ratio`` at the last
    step."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup - 1)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def total_steps(n_examples: int, config: TrainConfig) -> int:
    steps = config.epochs * math.ceil(n_examples / config.batch_size)
    return steps if config.max_steps is None else min(steps, config.max_steps)


def make_optimizer(params: Sequence[nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of two or more dimensions only; torch's fused
    kernel where every parameter allows it (floating point, on CPU or CUDA): one pass over
    each tensor instead of a dozen. SmolLM2-135M, full fine-tune, one CPU thread: 0.07 s a
    step against 0.56-0.78 s for the default multi-tensor path, the same update to rounding.
    Parameters still mapped from a checkpoint file get a private copy first
    (``models.checkpoint.privatize_``): the updates are in place."""
    privatize_(params)
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return _AdamW(
        [g for g in groups if g["params"]],
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        fused=fused or None,
    )


class _AdamW(torch.optim.AdamW):
    """AdamW whose fused step still counts as a write to each parameter: torch's fused kernel
    updates them without bumping their version counters, and derived copies (oneDNN packs,
    ``models.linear.tensor_version``) would go on serving the old weights (an RL policy
    would sample from its first weights forever)."""

    def step(self, closure=None):
        out = super().step(closure)
        if self.defaults.get("fused"):
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            torch.autograd.graph.increment_version(p)
        return out


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor], LossResult],
    n_examples: int,
    config: TrainConfig,
    *,
    params: Sequence[nn.Parameter] | None = None,
    units: Callable[[torch.Tensor], float] | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    resume_from: str | os.PathLike | None = None,
) -> TrainState:
    """Train ``params`` (default: every parameter of ``model`` that requires grad) to lower
    ``loss_fn`` over ``n_examples`` examples; return the final ``TrainState``.

    loss_fn(indices): indices is a 1-D CPU long tensor into the caller's dataset; returns the
        mean loss over those examples (on the model's device), or (loss, metrics dict). It runs
        under bf16 autocast on CUDA.
    units(indices): what loss_fn's mean is over, for weighting micro-batches and shards
        (additive over examples; default the number of examples). A per-token loss passes the
        token count, so every token of the global batch weighs the same.
    progress(step, total, metrics): after every optimizer step, on every process. metrics:
        "loss" (the global batch's, all processes), "lr", "examples" (in the batch),
        "grad_norm" (before clipping, when clipping), and loss_fn's own metrics (this process's
        micro-batches only). It may evaluate the model; the loop sets ``model.train()`` again.
    resume_from: a checkpoint directory written by this loop (``latest_checkpoint``) with the
        same config (but for checkpoint_every/dir and device) and ``n_examples``.

    The model is moved to ``config.device``. Without ``resume_from`` the global RNGs are seeded
    with ``config.seed + rank``, and process 0's parameters are broadcast to the others.
    """
    device = torch.device(config.device) if config.device else default_device()
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    rank, world = _rank_world()
    opt = make_optimizer(params, config)
    total = total_steps(n_examples, config)
    if resume_from is not None:
        state = _restore(Path(resume_from), model, params, opt, config, n_examples, total)
    else:
        state = TrainState(0, 0, 0, total)
        _seed_everything(config.seed + rank)
        if world > 1:
            with torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, src=0)
    warmup = round(config.warmup_ratio * total)
    g = torch.Generator().manual_seed(config.seed)  # the data order: the same on every rank
    for _ in range(state.epoch + 1):  # replay earlier epochs' permutations on resume
        order = torch.randperm(n_examples, generator=g)
    model.train()
    for p in params:
        p.grad = None
    while state.step < total:
        batch = order[state.index : state.index + config.batch_size]
        lr = config.lr * lr_factor(state.step, total, warmup, config.schedule, config.min_lr_ratio)
        state.metrics = _step(loss_fn, batch, params, opt, lr, config, units, device)
        state.step, state.index = state.step + 1, state.index + len(batch)
        if state.index >= n_examples:
            state.epoch, state.index = state.epoch + 1, 0
            order = torch.randperm(n_examples, generator=g)
        if progress is not None:
            progress(state.step, total, state.metrics)
            model.train()
        every = config.checkpoint_every
        due = state.step == total or (every > 0 and state.step % every == 0)
        if config.checkpoint_dir is not None and due:
            state.checkpoint = _save_checkpoint(model, params, opt, state, config, n_examples)
    return state


def _step(loss_fn, batch, params, opt, lr, config, units, device) -> dict[str, float]:
    """One optimizer step on the global ``batch``: this process's shard in micro-batches."""
    rank, world = _rank_world()
    count = units or len
    whole = float(count(batch))
    shard = batch.tensor_split(world)[rank]
    micros = [m for m in shard.tensor_split(config.accumulation) if len(m)]
    loss_sum = torch.zeros((), device=device)
    extra: dict[str, float] = {}
    for micro in micros:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = loss_fn(micro)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        share = count(micro) / whole
        (loss if share == 1.0 else loss * share).backward()
        loss_sum += share * loss.detach().float()
        for k, v in metrics.items():
            extra[k] = extra.get(k, 0.0) + share * float(v)
    if world > 1:
        _all_reduce_grads(params)
        dist.all_reduce(loss_sum)
        local = sum(count(m) for m in micros) / whole
        extra = {k: v / local for k, v in extra.items()} if local else {}
    out = {"loss": loss_sum.item(), "lr": lr, "examples": float(len(batch)), **extra}
    if config.clip_norm is not None:
        out["grad_norm"] = float(nn.utils.clip_grad_norm_(params, config.clip_norm))
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out


def _all_reduce_grads(params: Sequence[nn.Parameter]) -> None:
    """Sum every gradient over the processes in one flat ``all_reduce``.

    Not ``DistributedDataParallel``: DDP syncs the gradients of what runs through its wrapper's
    ``forward``, while ``loss_fn`` calls whatever it likes (``trunk``, ``head``, a reward
    backbone's ``encode``). Each process has already weighted its micro-batches by their share
    of the global batch, so the sum is the global batch's gradient, also for uneven shards
    and per-token weights, where DDP's average over processes is not. The cost: no overlap of
    communication with the backward pass. A parameter without a gradient here counts as zero.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad = g.view_as(p)


# ------------------------------------------------------------------------------ RNG states
def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also every CUDA device
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()  # plain types for weights_only
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, internal, gauss = state["python"]
    random.setstate((kind, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {**np_state["state"], "key": np.array(np_state["state"]["key"], np.uint32)}
    np.random.set_state(np_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ checkpoints
TRAINABLE, STATE, META = "trainable.safetensors", "state.pt", "train.json"


def _param_names(model: nn.Module, params: Sequence[nn.Parameter]) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in by_id]
    if missing:
        raise ValueError(f"params {missing[:4]} are not parameters of the model")
    return [by_id[id(p)] for p in params]


def _save_checkpoint(model, params, opt, state: TrainState, config, n_examples) -> Path:
    """Write ``checkpoint_dir/step-00000123/``: the trainable parameters by name
    (trainable.safetensors), optimizer state and every process's RNG states (state.pt), and the
    data position, metrics and config (train.json). Process 0 writes, into a ``.partial``
    sibling renamed into place, so a crash never leaves a half-written checkpoint."""
    rank, world = _rank_world()
    rngs: list[dict | None] = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
    dst = Path(config.checkpoint_dir) / f"step-{state.step:08d}"
    if rank != 0:
        return dst
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = _param_names(model, params)
    tensors = {n: p.detach().contiguous().cpu() for n, p in zip(names, params, strict=True)}
    save_file(tensors, tmp / TRAINABLE)
    torch.save({"optimizer": opt.state_dict(), "rng": rngs}, tmp / STATE)
    meta = {
        "step": state.step,
        "epoch": state.epoch,
        "index": state.index,
        "total": state.total,
        "n_examples": n_examples,
        "world_size": world,
        "metrics": state.metrics,
        "config": asdict(config),
    }
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``step-*`` checkpoint under ``checkpoint_dir``, or None."""
    steps = sorted(p for p in Path(checkpoint_dir).glob("step-*") if (p / META).is_file())
    return steps[-1] if steps else None


def _restore(path: Path, model, params, opt, config, n_examples, total) -> TrainState:
    meta = json.loads((path / META).read_text())
    saved = {k: v for k, v in meta["config"].items() if k not in _RESUMABLE_CHANGES}
    ours = json.loads(json.dumps(asdict(config)))  # tuples as lists, as saved
    changed = sorted(k for k, v in saved.items() if ours.get(k) != v)
    if changed or meta["n_examples"] != n_examples:
        raise ValueError(
            f"{path}: cannot resume exactly: config differs in {changed}, "
            f"examples {meta['n_examples']} -> {n_examples}"
        )
    rank, world = _rank_world()
    if meta["world_size"] != world:
        raise ValueError(f"{path}: written by {meta['world_size']} processes, not {world}")
    tensors = load_file(path / TRAINABLE)
    names = _param_names(model, params)
    if set(tensors) != set(names):
        differ = sorted(set(tensors) ^ set(names))[:4]
        raise ValueError(f"{path}: trainable parameters differ: {differ}")
    with torch.no_grad():
        for n, p in zip(names, params, strict=True):
            p.copy_(tensors[n])
    saved_state = torch.load(path / STATE, map_location=params[0].device, weights_only=True)
    opt.load_state_dict(saved_state["optimizer"])
    _set_rng_state(saved_state["rng"][rank])
    return TrainState(meta["step"], meta["epoch"], meta["index"], total, meta["metrics"], path)


# ------------------------------------------------------------------- sequence log-probs
def pack_completions(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = 0, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, completion_mask, attention_mask), each (B, T), for (prompt ids, completion
    ids) pairs: prompt then completion in each row, padded with ``pad_id`` on the right (or the
    left); completion_mask is True on completion tokens, attention_mask on real ones."""
    rows = [list(p) + list(c) for p, c in pairs]
    if not all(rows):
        raise ValueError("every pair needs at least one token")
    B, T = len(rows), max(map(len, rows))
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    completion = torch.zeros((B, T), dtype=torch.bool)
    attention = torch.zeros((B, T), dtype=torch.bool)
    for i, (row, (p, _)) in enumerate(zip(rows, pairs, strict=True)):
        start = T - len(row) if left else 0
        input_ids[i, start : start + len(row)] = torch.tensor(row)
        attention[i, start : start + len(row)] = True
        completion[i, start + len(p) : start + len(row)] = True
    return input_ids, completion, attention


def sequence_logprobs(
    model: AFM,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_t log p(input_ids[:, t] | input_ids[:, <t]) over positions t where completion_mask
    is True (B,), the number of those positions (B,)), differentiable through an AFM.

    input_ids, completion_mask, attention_mask: (B, T) on the model's device (as
    ``pack_completions`` makes them); attention_mask False on padding, None for none. Right
    padding needs no attention mask (causal attention never looks ahead); left padding is
    masked as keys and RoPE positions count from each row's first real token, as
    ``models.generate`` does, so values match ``generate.loglikelihood``. Only positions
    that predict a completion token go through the output head: the (B, T, vocab) logits
    are never built. Position 0 has no prefix and never counts.
    """
    key_valid = positions = None
    if attention_mask is not None and not bool(attention_mask[:, 0].all()):  # left padding
        key_valid = attention_mask[:, :-1]
        positions = (attention_mask[:, :-1].cumsum(dim=1) - 1).clamp(min=0)  # (B, T-1)
    hidden = model.trunk(input_ids[:, :-1], positions, key_valid=key_valid)  # (B, T-1, dim)
    targets_mask = completion_mask[:, 1:]  # (B, T-1): hidden state t predicts token t + 1
    rows = targets_mask.nonzero(as_tuple=True)[0]  # (N,)
    logits = model.head(hidden[targets_mask]).float()  # (N, vocab)
    token_lp = -F.cross_entropy(logits, input_ids[:, 1:][targets_mask], reduction="none")  # (N,)
    B = input_ids.shape[0]
    sums = torch.zeros(B, device=hidden.device).index_add(0, rows, token_lp)  # (B,)
    return sums, targets_mask.sum(dim=1)

"""AFM's compression recipe on top of ``models.palettize``: mixed 2/4-bit palettes chosen by
sensitivity, and a LoRA adapter trained to recover what compression lost (Gunter et al. 2024,
arXiv:2407.21075 §5: palettized 4-bit by default and 2-bit where it costs little, ~3.5 bits
per weight on average, then rank-16 "accuracy-recovery adapters" on the frozen base).

- ``layer_sensitivity``: for every block projection (and the embedding with its tied head,
  if asked), the increase of KL(original ‖ model) per token on calibration text when that one
  layer alone goes to 2-bit. This is ZeroQ's sensitivity (Cai et al. 2020, arXiv:2001.00281
  §3.2: KL between the full-precision model and the model with only layer i quantized, the
  others fp32), the default ``baseline``. Against the all-4-bit model instead (the marginal
  4 → 2 cost with the others as they will be) a fifth of SmolLM2's layers measured below
  zero on 256 tokens (one layer's error cancelling others' on those tokens), and the mixed
  3.5 bpw model it chose had a higher held-out KL (1.65 against 1.51 nats/token,
  ``benchmarks/palettize_recovery.py``). The original logits are computed once, each block's
  input once, and a measurement runs only the blocks from the changed one on. The model is
  palettized once per precision (``palettize_variants``) and layers swapped in and out;
  ``assemble`` builds any mix from those same palettes;
- ``choose_bits``: the set of low-bit layers that reaches a target average bits per weight
  (indices and tables of every palettized tensor counted, exactly as
  ``models.palettize.scheme``) with the least predicted loss, the sum of the chosen layers'
  KL impacts (additive, ZeroQ §3.3 and HAWQ-V2, Dong et al. 2020, arXiv:1911.03852, take
  layer sensitivities as additive too): a multiple-choice knapsack solved exactly by dynamic
  programming over the bytes saved, in units of their greatest common divisor (a handful of
  distinct shapes make that small: 30,605 states for SmolLM2 at 3.5 bpw);
- ``distribution_gap``: mean KL(original ‖ model) per token, top-1 agreement and
  perplexity on held-out text, the figures ``benchmarks/palettize_quality.py`` reports.

Passes without gradients run under ``torch.no_grad``, not ``inference_mode``: palettize's
per-thread dequantization buffer, once allocated under inference mode, cannot be written by
a later pass with autograd on (the recovery adapter's training, ``models.recovery``).

Text comes as ``TextBatch`` pairs (input_ids (B, T), completion_mask (B, T)), right-padded,
as ``models.train.pack_completions`` builds them: a position counts when the token it
predicts is marked.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn

from models.afm import AFM
from models.kernels import CachedAttention
from models.linear import TiedHead
from models.palette import GROUP_SIZE
from models.palettize import Calibration, LayerReport, palettize_model

# (input_ids (B, T) long, completion_mask (B, T) bool), right-padded
TextBatch = tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------- sensitivity
@dataclass
class LayerSensitivity:
    """One palettizable tensor: its precision options (the default first), their storage in
    bytes (packed indices + fp16 tables, as ``palette_bits``) and the KL increase per token,
    in nats, of each option against the default (0 for the default itself)."""

    name: str
    shape: tuple[int, int]
    bits: tuple[int, ...]
    bytes: dict[int, int]
    kl: dict[int, float]
    seconds: float  # palettizing at every option and the measuring passes

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate(
    model: AFM,
    batches: Sequence[torch.Tensor],
    *,
    gradients: bool = True,
    head: bool = True,
) -> Calibration:
    """Calibration statistics of every block projection and, with ``head``, the output head
    (what a tied embedding is palettized by; without it the head's (vocab, dim) Fisher, as
    large as its forward pass, is not computed) over ``batches`` ((B, T) ids each, unpadded):
    input second moments from the forward passes and, with ``gradients``, the per-weight
    Fisher diagonal from a backward pass of the next-token loss per batch. The gradient
    enters at the embedding's output, so no weight gradient is computed at all (not even the
    tied head's, nor a dense embedding gradient of vocab x dim), and the loss's gradient is
    written directly (softmax − one-hot, the last position zero) instead of differentiating
    a log-softmax over the vocabulary; ``model`` is left as it was. On SmolLM2 the Fisher
    took the 4-bit model's KL from 0.38 to 0.20 nats/token for about 2x the calibration
    time (``benchmarks/palettize_quality.py``). Multiplying the Fisher in bf16 (4x fp32's
    speed on this CPU's AVX-512 BF16) cut 16 sequences' calibration from 101 to 88 s on one
    thread but raised that KL from 0.196 to 0.199: not taken."""
    calibration = Calibration.of(model, head=head)
    params = list(model.parameters())
    wanted = [p.requires_grad for p in params]

    def leaf(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out.detach().requires_grad_(True)  # backward stops at the embedding's output

    hook = model.tok_emb.register_forward_hook(leaf) if gradients else None
    try:
        for p in params:
            p.requires_grad_(False)
        with calibration, torch.set_grad_enabled(gradients):
            for ids in batches:
                logits = model(ids)  # (B, T, V)
                if gradients:
                    logits.backward(_next_token_grad(logits.detach(), ids))
    finally:
        if hook is not None:
            hook.remove()
        for p, w in zip(params, wanted, strict=True):
            p.requires_grad_(w)
    return calibration


def _next_token_grad(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """d/dlogits of the mean next-token cross-entropy of ``ids`` (B, T) under ``logits``
    (B, T, V): (softmax − one-hot of the next token) / predicted tokens, zero at the last
    position, which predicts nothing."""
    B, T = ids.shape
    grad = torch.softmax(logits, dim=-1)
    grad[:, -1] = 0
    grad[:, :-1].scatter_add_(-1, ids[:, 1:, None], grad.new_full((B, T - 1, 1), -1.0))
    return grad.div_(B * (T - 1))


def _rope(model: AFM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = ids.shape
    positions = torch.arange(T, device=ids.device).expand(B, T)
    return model.rope_cos[positions].unsqueeze(2), model.rope_sin[positions].unsqueeze(2)


def _block_inputs(model: AFM, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each block's input (B, T, dim) in a full causal pass over ``ids`` (B, T), as
    ``AFM.trunk`` computes them (no cache, no padding: SDPA's causal flag)."""
    cos, sin = _rope(model, ids)
    attention = CachedAttention(None, 0, None, None)
    x, inputs = model.tok_emb(ids), []
    for block in model.blocks:
        inputs.append(x)
        x = block(x, cos, sin, attention)
    return inputs


def _tail_log_probs(model: AFM, x: torch.Tensor, start: int, ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (B·T, V) from block ``start``'s input ``x`` on."""
    cos, sin = _rope(model, ids)
    attention = CachedAttention(None, 0, None, None)
    for block in model.blocks[start:]:
        x = block(x, cos, sin, attention)
    return model.head(model.norm(x)).float().log_softmax(-1).flatten(0, -2)


def _kl(ref: torch.Tensor, lp: torch.Tensor) -> float:
    """Mean KL(ref ‖ lp) per row of log-probabilities (N, V)."""
    return float((ref.exp() * (ref - lp)).sum() / ref.shape[0])


def _swap(model: AFM, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``name`` (``tok_emb``: the embedding and its tied head); return
    what was there."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child)
    setattr(owner, child, module)
    if name == "tok_emb" and model.cfg.tie_embeddings:
        model.lm_head = TiedHead(module)  # type: ignore[arg-type]
    return old


def _first_block(name: str) -> int:
    """The block a layer sits in (``blocks.3.mlp.w2`` -> 3); 0 for the embedding."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" else 0


class Variant(NamedTuple):
    """A copy of the model with every palettizable layer at one precision, and its reports."""

    model: AFM
    reports: dict[str, LayerReport]


def palettize_variants(
    model: AFM,
    bits: Sequence[int] = (4, 2),
    *,
    embedding: bool = False,
    calibration: Calibration | None = None,
    group_size: int = GROUP_SIZE,
) -> dict[int, Variant]:
    """``model`` palettized at each of ``bits`` everywhere (with ``embedding``, the embedding
    and tied head too), each by ``palettize_model`` on a copy, from the same ``calibration``.
    Layers are fitted independently, so any mix of them (``assemble``) is exactly what
    ``palettize_model`` gives for that mix: the sensitivity pass's palettes serve the final
    model, and the model is palettized once per precision, not once more per allocation."""
    variants = {}
    for b in bits:
        copied = copy.deepcopy(model)
        reports = palettize_model(
            copied,
            default_bits=b,
            embedding_bits=b if embedding else None,
            calibration=calibration,
            group_size=group_size,
        )
        variants[b] = Variant(copied, {r.name: r for r in reports})
    return variants


def _layer(model: AFM, name: str) -> nn.Module:
    return model.tok_emb if name == "tok_emb" else model.get_submodule(name)


def assemble(variants: dict[int, Variant], bits: dict[str, int]) -> AFM:
    """A new model with each layer taken from the variant at ``bits[name]`` (a layer not in
    ``bits`` at the precision of ``max(variants)``); ``variants`` are left as they were."""
    default = max(variants)
    model = copy.deepcopy(variants[default].model)
    for name, b in bits.items():
        if b != default:
            _swap(model, name, copy.deepcopy(_layer(variants[b].model, name)))
    return model


def layer_sensitivity(
    model: AFM,
    calibration_ids: torch.Tensor,
    bits: int = 2,
    *,
    base_bits: int = 4,
    baseline: str = "fp32",
    embedding: bool = False,
    calibration: Calibration | None = None,
    variants: dict[int, Variant] | None = None,
    group_size: int = GROUP_SIZE,
    progress: Callable[[int, int, LayerSensitivity], None] | None = None,
) -> list[LayerSensitivity]:
    """The KL increase per token on ``calibration_ids`` (B, T) when one layer alone is
    palettized at ``bits`` instead of ``base_bits``, for every block projection (fused
    q/k/v and gate/up count as one: they are palettized as one matrix) and, with
    ``embedding``, the input embedding with its tied head. Rows in model order, embedding
    last, ready for ``choose_bits``; ``model`` (dense, CPU) is left as it was.

    baseline: "fp32" (default, ZeroQ's) measures the layer among dense others and gives
        the KL itself; "palettized" measures against every other layer at ``base_bits``,
        what the allocation starts from, and gives the KL minus the all-``base_bits`` KL
        (noisier on few tokens; the module docstring has the comparison).
    calibration: statistics that fit the palettes (default: forward passes over
        ``calibration_ids``). variants: ``palettize_variants`` at ``base_bits`` and ``bits``
        made already (then ``embedding`` must say whether they include it); else made here.

    Cost: the original logits once, each block's baseline input once, then per layer one
    pass through the blocks from its own on and the head (on average about 60% of a full
    forward on SmolLM2, whose head is a fifth of its matmuls)."""
    if baseline not in ("palettized", "fp32"):
        raise ValueError(f"baseline must be 'palettized' or 'fp32', not {baseline!r}")
    if variants is None:
        if calibration is None:
            calibration = calibrate(model, [calibration_ids])
        variants = palettize_variants(
            model,
            (base_bits, bits),
            embedding=embedding,
            calibration=calibration,
            group_size=group_size,
        )
    if ("tok_emb" in variants[bits].reports) != embedding:
        raise ValueError(f"variants {'lack' if embedding else 'include'} the embedding")
    high, low = variants[base_bits].reports, variants[bits].reports
    work = variants[base_bits].model if baseline == "palettized" else model
    table = []
    with torch.no_grad():
        reference = model(calibration_ids).float().log_softmax(-1).flatten(0, -2)  # (B·T, V)
        inputs = _block_inputs(work, calibration_ids)
        base_kl = _kl(reference, _tail_log_probs(work, inputs[0], 0, calibration_ids))
        for name, report in low.items():
            start = time.perf_counter()
            old = _swap(work, name, _layer(variants[bits].model, name))
            try:
                i = _first_block(name)
                x = work.tok_emb(calibration_ids) if name == "tok_emb" else inputs[i]
                kl = _kl(reference, _tail_log_probs(work, x, i, calibration_ids))
            finally:
                _swap(work, name, old)
            row = LayerSensitivity(
                name=name,
                shape=report.shape,
                bits=(base_bits, bits),
                bytes={base_bits: high[name].bytes, bits: report.bytes},
                kl={base_bits: 0.0, bits: kl - (base_kl if baseline == "palettized" else 0.0)},
                seconds=high[name].seconds + report.seconds + time.perf_counter() - start,
            )
            table.append(row)
            if progress is not None:
                progress(len(table), len(low), row)
    return table


# ---------------------------------------------------------------------------- allocation
class Allocation(NamedTuple):
    """Bits per layer (for ``palettize_model(bits=...)``), the exact bits per weight they
    give (``palettize.scheme``'s figure) and the predicted KL increase (sum of impacts)."""

    bits: dict[str, int]
    bpw: float
    kl: float


def _bpw(table: Sequence[LayerSensitivity], bits: dict[str, int]) -> float:
    total = sum(8 * row.bytes[bits[row.name]] for row in table)
    return total / sum(row.shape[0] * row.shape[1] for row in table)


def choose_bits(
    table: Sequence[LayerSensitivity], target_bpw: float = 3.5, *, max_states: int = 100_000
) -> Allocation:
    """The precision of every layer in ``table`` that brings the average bits per weight to
    ``target_bpw`` or below with the least sum of KL impacts (AFM's 3.5 bpw default,
    arXiv:2407.21075 §5). Every row's first option is its default; others must not be larger.

    Exact: a multiple-choice knapsack over the bytes saved against the defaults, in units of
    their greatest common divisor, states capped at the saving needed. When that needs more
    than ``max_states`` states the savings are counted in coarser units, rounded down, so the
    target is still met (then the optimum is over those rounded savings).
    ValueError when even the smallest option everywhere misses the target."""
    weights = sum(row.shape[0] * row.shape[1] for row in table)
    default = {row.name: row.bits[0] for row in table}
    saving = [{b: row.bytes[row.bits[0]] - row.bytes[b] for b in row.bits[1:]} for row in table]
    if any(s < 0 for options in saving for s in options.values()):
        raise ValueError("an option is larger than its row's default (the first)")
    need = math.ceil(sum(8 * row.bytes[row.bits[0]] for row in table) - target_bpw * weights)
    need = -(-need // 8)  # bytes: every tensor's storage is whole bytes
    if need <= 0:
        return Allocation(default, _bpw(table, default), 0.0)
    unit = math.gcd(*(s for options in saving for s in options.values() if s > 0)) or 1
    unit = max(unit, -(-need // (max_states - 1)))
    S = -(-need // unit)  # states 0..S: saving reached, in units, capped at the need
    best = torch.full((S + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    steps = []  # per row: (option taken at each state, predecessor state)
    states = torch.arange(S + 1)
    for row, options in zip(table, saving, strict=True):
        new, pred = best.clone(), states.clone()
        taken = torch.zeros(S + 1, dtype=torch.long)  # 0: the default
        for k, b in enumerate(row.bits[1:], 1):
            u, cost = min(options[b] // unit, S), row.kl[b]
            cand = torch.full_like(best, math.inf)
            cand[u:S] = best[: S - u] + cost
            src = states.clone()
            src[u:S] -= u
            tail = best[S - u :]  # every state that reaches the cap with this option
            j = int(tail.argmin())
            cand[S], src[S] = tail[j] + cost, S - u + j
            better = cand < new
            new, pred = torch.where(better, cand, new), torch.where(better, src, pred)
            taken[better] = k
        best = new
        steps.append((taken, pred))
    if not math.isfinite(float(best[S])):
        lowest = {row.name: min(row.bits, key=row.bytes.__getitem__) for row in table}
        raise ValueError(f"{target_bpw} bpw is out of reach: {_bpw(table, lowest):.4f} at best")
    chosen, s = dict(default), S
    for row, (taken, pred) in zip(reversed(table), reversed(steps), strict=True):
        k = int(taken[s])
        chosen[row.name] = row.bits[k]
        s = int(pred[s])
    return Allocation(chosen, _bpw(table, chosen), sum(r.kl[chosen[r.name]] for r in table))


# ---------------------------------------------------------------------------- evaluation
def counted_log_probs(model: AFM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (n, V) at the n positions whose next token is marked in ``mask``
    (B, T); only those go through the output head, as ``train.sequence_logprobs``."""
    hidden = model.trunk(ids[:, :-1])  # (B, T-1, dim): position t predicts token t + 1
    return model.head(hidden[mask[:, 1:]]).float().log_softmax(-1)


def distribution_gap(
    original: AFM, model: AFM, token_batches: Sequence[TextBatch]
) -> dict[str, float]:
    """How far ``model`` is from ``original`` on held-out text, over the marked tokens:
    "kl" mean KL(original ‖ model) in nats per token, "top1" the share of positions where
    their argmaxes agree, "ppl" and "ppl_original" the perplexities of the actual tokens,
    "tokens" how many counted. The definitions of ``benchmarks/palettize_quality.py``."""
    kl = top1 = nll = nll_original = 0.0
    n = 0
    with torch.no_grad():
        for ids, mask in token_batches:
            ref = counted_log_probs(original, ids, mask)  # (n, V)
            lp = counted_log_probs(model, ids, mask)
            target = ids[:, 1:][mask[:, 1:]][:, None]  # (n, 1)
            kl += float((ref.exp() * (ref - lp)).sum())
            top1 += float((lp.argmax(-1) == ref.argmax(-1)).sum())
            nll -= float(lp.gather(1, target).sum())
            nll_original -= float(ref.gather(1, target).sum())
            n += len(target)
    if n == 0:
        raise ValueError("no marked tokens to evaluate on")
    return {
        "kl": kl / n,
        "top1": top1 / n,
        "ppl": math.exp(nll / n),
        "ppl_original": math.exp(nll_original / n),
        "tokens": float(n),
    }

"""Accuracy-recovery adapters for a palettized model (Gunter et al. 2024, arXiv:2407.21075
§5: rank-16 LoRA on the frozen compressed base, trained to give back what compression took).

``train_recovery_adapter`` puts rank-16 LoRA (``models.lora.apply_lora``: q/k/v, o,
gate/up, down of every block, as AFM) on the frozen palettized model and trains it through
``models.train.train`` by distillation from the uncompressed model, KL(original ‖ student)
per token on real text (Hinton et al. 2015, arXiv:1503.02531; AFM §5 trains its recovery
adapters the same way on the pre-training data). The teacher's top-k log-probabilities are
computed once, before training, and the rest of its mass kept as one tail bucket; adapters
are trained in fp32 and rounded to fp16 at the end (AFM ships 16-bit adapters).
``init_from_error`` starts the adapters at each layer's compression error instead of at
zero. Text comes as ``models.compress.TextBatch`` pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from models.afm import AFM
from models.compress import TextBatch, counted_log_probs
from models.lora import LoRALinear, apply_lora
from models.palettize import Calibration
from models.train import TrainConfig, TrainState, train

ADAPTER_DTYPE = torch.float16  # AFM's adapters are 16-bit (arXiv:2407.21075 §5)
TOP_K = 64  # teacher log-probs kept per token; SmolLM2's top 64 hold ~97% of its mass on text


class _Target(NamedTuple):
    """One sequence to distil on: ids (T,), the mask (T,) of tokens whose prediction counts
    (trailing padding cut), and the teacher at those n positions: its top-k log-probs (n, k),
    their token ids (n, k) and the log of the mass outside them (n,)."""

    ids: torch.Tensor
    mask: torch.Tensor
    top_lp: torch.Tensor
    top_ids: torch.Tensor
    tail_lp: torch.Tensor


def _tail(lp: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """log Σ exp(lp) over the tokens not in ``top_ids``, per row (n,), exactly (no
    1 - Σ top subtraction to lose digits in)."""
    return lp.scatter(-1, top_ids, -math.inf).logsumexp(-1)


def _teacher(original: AFM, batches: Sequence[TextBatch], top_k: int) -> list[_Target]:
    """The original's top-k targets for every row of ``batches``, once."""
    out = []
    with torch.no_grad():
        for ids, mask in batches:
            lp = counted_log_probs(original, ids, mask)  # (n, V)
            k = min(top_k, lp.shape[-1] - 1)  # the tail keeps at least one token
            top_lp, top_ids = lp.topk(k, dim=-1)
            tail = _tail(lp, top_ids)
            counts = mask[:, 1:].sum(1).tolist()
            splits = (top_lp.split(counts), top_ids.split(counts), tail.split(counts))
            parts = zip(*splits, strict=True)
            for row, (tl, ti, tt) in enumerate(parts):
                marked = mask[row].nonzero()
                end = int(marked[-1]) + 1 if len(marked) else 1
                out.append(_Target(ids[row, :end], mask[row, :end], tl, ti.int(), tt))
    return out


def topk_kl(
    lp: torch.Tensor, top_lp: torch.Tensor, top_ids: torch.Tensor, tail_lp: torch.Tensor
) -> torch.Tensor:
    """KL(teacher ‖ student) per position (n,) between the two distributions coarsened to
    the teacher's top-k tokens plus one bucket for the rest: a lower bound of the full KL
    (coarsening never increases it) that equals it when the tail holds no mass.
    lp: the student's log-probs (n, V); the teacher's top-k log-probs (n, k), their token
    ids (n, k) and the log of its mass outside them (n,)."""
    top_ids = top_ids.long()
    q_top, q_tail = lp.gather(-1, top_ids), _tail(lp, top_ids)
    head = (top_lp.exp() * (top_lp - q_top)).sum(-1)
    return head + tail_lp.exp() * (tail_lp - q_tail)


def _pack(rows: Sequence[_Target], device: torch.device) -> TextBatch:
    T = max(len(r.ids) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r.ids)], mask[i, : len(r.mask)] = r.ids, r.mask
    return ids.to(device), mask.to(device)


@dataclass
class Recovery:
    """A trained recovery adapter: the wrappers on the model, metrics per optimizer step
    ("step", "loss" = top-k KL nats/token, "top1" agreement with the teacher, "lr",
    "grad_norm"), the adapter's size stored at 16 bits (counted apart from the base, as
    AFM counts its adapters), and the loop's final state."""

    adapters: list[LoRALinear]
    metrics: list[dict[str, float]]
    adapter_bytes: int
    state: TrainState


def init_from_error(
    adapters: Sequence[LoRALinear],
    compressed: AFM,
    original: AFM,
    calibration: Calibration | None = None,
    damp: float = 0.01,
) -> list[float]:
    """Start each adapter at the best rank-r correction of its base's compression error
    instead of at zero (LoftQ's idea, Li et al. 2023, arXiv:2310.08659, there for uniform
    NF4 and unweighted): with ΔW = W − Ŵ the original weight minus the palettized one and
    H = E[x xᵀ] the layer's calibration inputs, (α/r)·BA minimises the expected output error
    E‖(ΔW − (α/r)BA) x‖² = ‖(ΔW − (α/r)BA) L‖²_F (H = L Lᵀ): the top-r SVD of ΔW L,
    mapped back through L⁻¹ (the data-aware truncation of SVD-LLM, Wang et al. 2024,
    arXiv:2403.07378), H damped by ``damp`` × the mean of its diagonal. Without calibration
    (or a layer it never saw) H = I, plain SVD. Returns, per adapter, the share of the
    output error tr(ΔW H ΔWᵀ) the correction removes; distillation then trains from there."""
    reference, chosen = dict(original.named_modules()), {id(m) for m in adapters}
    removed = []
    with torch.no_grad():
        for name, m in compressed.named_modules():
            if not isinstance(m, LoRALinear) or m.rank == 0 or id(m) not in chosen:
                continue
            w = reference[name].effective_weight().float()
            delta = w - m.base.effective_weight().float()  # (out, in)
            h = calibration.hessian(name) if calibration is not None else None
            h = torch.eye(delta.shape[1]) if h is None else h
            h = h.double() + damp * float(h.diagonal().mean()) * torch.eye(
                len(h), dtype=torch.double
            )
            chol = torch.linalg.cholesky(h)  # H = L Lᵀ, L lower
            u, sv, vh = torch.linalg.svd(delta.double() @ chol, full_matrices=False)
            root = sv[: m.rank].sqrt()  # B and A share the singular values' square roots
            a = torch.linalg.solve_triangular(
                chol, root[:, None] * vh[: m.rank], upper=False, left=False
            )
            m.lora_B.copy_((u[:, : m.rank] * root / m.scale).float())
            m.lora_A.copy_(a.float())  # (α/r)·BA = U_r S_r V_rᵀ L⁻¹
            removed.append(float(sv[: m.rank].square().sum() / sv.square().sum().clamp_min(1e-30)))
    return removed


def train_recovery_adapter(
    compressed: AFM,
    original: AFM,
    token_batches: Sequence[TextBatch],
    config: TrainConfig,
    rank: int = 16,
    *,
    alpha: float | None = None,
    top_k: int = TOP_K,
    seed: int = 0,
    init: str = "zero",
    calibration: Calibration | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> Recovery:
    """Put rank-``rank`` LoRA on every attention and feed-forward projection of the
    palettized ``compressed`` (frozen; AFM's rank 16, arXiv:2407.21075 §5) and train it to
    match ``original``'s next-token distributions on ``token_batches``: the mean over marked
    tokens of ``topk_kl``, through ``models.train.train`` (examples are rows, weighted by
    their marked tokens). The teacher runs once per row, before training, keeping ``top_k``
    log-probs per token (64 × 12 bytes against SmolLM2's 49,152 × 4); ``original`` can be
    dropped afterwards. α defaults to 2·rank (``apply_lora``'s scale 2). ``init`` "zero"
    starts from PEFT's init (B = 0: the palettized model itself); "error" from the best
    rank-r correction of each layer's compression error under ``calibration``'s input
    statistics (``init_from_error``).

    The adapters train in fp32 and end rounded to fp16: the returned model is what a 16-bit
    adapter computes. They stay separate from the base (no merge), as AFM ships them."""
    targets = _teacher(original, token_batches, top_k)
    if init not in ("zero", "error"):
        raise ValueError(f"init must be 'zero' or 'error', not {init!r}")
    adapters = apply_lora(compressed, rank, 2.0 * rank if alpha is None else alpha, seed=seed)
    if init == "error":
        init_from_error(adapters, compressed, original, calibration)
    tokens = torch.tensor([int(t.mask[1:].sum()) for t in targets], dtype=torch.float64)

    def loss_fn(indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        rows = [targets[int(i)] for i in indices]
        device = compressed.device
        ids, mask = _pack(rows, device)
        lp = counted_log_probs(compressed, ids, mask)  # (n, V)
        # the teacher's top_lp, top_ids and tail_lp over the batch's n positions, in order
        teacher = [torch.cat([r[i] for r in rows]).to(device) for i in (2, 3, 4)]
        kl = topk_kl(lp, *teacher)
        agree = (lp.argmax(-1) == teacher[1][:, 0].long()).float().mean()
        return kl.mean(), {"top1": float(agree)}

    metrics: list[dict[str, float]] = []

    def record(step: int, total: int, m: dict[str, float]) -> None:
        metrics.append({"step": float(step), **m})
        if progress is not None:
            progress(step, total, m)

    state = train(
        compressed,
        loss_fn,
        len(targets),
        config,
        units=lambda idx: float(tokens[idx].sum()),
        progress=record,
    )
    compressed.eval()
    with torch.no_grad():
        for m in adapters:
            m.lora_A.copy_(m.lora_A.to(ADAPTER_DTYPE))
            m.lora_B.copy_(m.lora_B.to(ADAPTER_DTYPE))
    return Recovery(adapters, metrics, adapter_bytes(adapters), state)


def adapter_bytes(adapters: Sequence[LoRALinear]) -> int:
    """Storage of the adapters' A and B at 16 bits a number."""
    itemsize = torch.finfo(ADAPTER_DTYPE).bits // 8
    return sum(itemsize * (m.lora_A.numel() + m.lora_B.numel()) for m in adapters)

"""Kernels for ``models.afm``: plain functions and small classes over tensors, no model in them.

Inference (CPU):
- ``attend``: attention for decoding's few queries against a KV cache, as two matmuls.
- ``argmax_last``: a vectorised argmax over vocabulary-sized rows.
- ``BoundedGreedy``: the exact fp32 argmax of an output head, found through a bf16 copy.

Training (any device; hand-written backwards, used whenever a gradient is wanted in fp32):
- ``rms_norm``, ``rope``, ``swiglu``: the block's elementwise steps. Their forward values are
  the inference ones; forward plus backward runs in ~60% of autograd's decomposition.

Attention kernels, one per layout the decoder block runs in (``models.afm.Block`` takes one):
- ``CachedAttention``: padded (B, T) rows, optionally into a ``KVCache`` (prompt passes,
  speculative verification, training without a cache);
- ``StepAttention``: one new token per row, (B,) (decoding steps and the int4 draft);
- ``SharedPrefixAttention`` / ``PooledAttention``: the flat layout of ``pack_shared_prefix``,
  K responses to each prompt with the prompt computed once (reward models; preference pairs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v for a few queries against a cache, as two batched
    matmuls. q: (B, Hkv, G, T, hd), the G query heads that share each of the Hkv kv heads;
    k, v: (B, Hkv, S, hd); mask: additive, (B or 1, 1, T, S), or None. Returns (B, Hkv, G, T,
    hd). Keys and values are never repeated per query head. For decoding's one to a few dozen
    queries this is 1.3x (one query) to 2x (four) faster on CPU than SDPA's flash kernel,
    which is built for long query blocks (prompts still go through SDPA).
    """
    B, Hkv, G, T, hd = q.shape
    scores = torch.matmul(q.reshape(B, Hkv, G * T, hd), k.transpose(-1, -2))  # (B, Hkv, G*T, S)
    scores = scores.mul_(hd**-0.5).view(B, Hkv, G, T, -1)
    if mask is not None:
        scores = scores + mask[:, :, None]  # (B or 1, 1, 1, T, S)
    probs = scores.softmax(dim=-1).view(B, Hkv, G * T, -1)
    return torch.matmul(probs, v).view(B, Hkv, G, T, hd)


def argmax_last(x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``x.argmax(-1)``, the first index of each row's maximum, 4-7x faster on CPU for
    vocabulary-sized rows: torch's argmax reduction is not vectorised, amax is. Rows are cut
    into chunks; argmax runs over the chunk maxima and inside the first chunk that holds the
    maximum only."""
    V = x.shape[-1]
    if V % chunk or V <= chunk:
        return x.argmax(dim=-1)
    rows = x.reshape(-1, V // chunk, chunk)  # (N, V/chunk, chunk)
    best = rows.amax(dim=-1).argmax(dim=-1)  # (N,)
    inside = rows[torch.arange(rows.shape[0], device=x.device), best].argmax(dim=-1)  # (N,)
    return (best * chunk + inside).view(x.shape[:-1])


class BoundedGreedy:
    """The greedy tokens of an fp32 output head, found through a bf16 copy of it: the same
    tokens as the fp32 argmax, not an approximation of them.

    bf16 rounds the hidden state, each weight row and each product's result by at most 2^-9
    relatively, and oneDNN accumulates in fp32, so a bf16 logit is within
    2^-9 (2 |h| |w_v| + |approx_v|) of the exact one, plus fp32 accumulation error
    (~d 2^-24 |h| |w_v|). The radius used, 2^-8 (2.01 |h| |w_v| + |approx_v|) + 1e-4, is
    twice that. Every token whose upper bound reaches the best lower bound is rescored in
    fp32 and the first maximum wins, as in ``argmax``: the fp32 winner is always among them.
    On SmolLM2's answers that is 3 tokens on average (at most 22 of 827 positions) out of
    49,152; the bf16 product reads half the bytes and runs on bf16 dot-product instructions
    (8 rows: 4.3 against 5.6 ms for the fp32 head and its argmax). Rows with non-finite
    values, or too many candidates, take the fp32 head.
    """

    most = 64  # candidates per row, on average, before the fp32 head is cheaper

    def __init__(self, weight: torch.Tensor, rows: int):
        self.weight = weight  # (V, dim), the model's own tensor
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().bfloat16(), rows)
        self.row_norms = weight.detach().norm(dim=-1)  # (V,)

    @staticmethod
    def usable(weight: torch.Tensor) -> bool:
        cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
        return (
            cpu_fp32
            and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """Greedy tokens (...) for hidden states (..., dim)."""
        lead = h.shape[:-1]
        h = h.reshape(-1, h.shape[-1])  # (N, dim)
        N, V = h.shape[0], self.weight.shape[0]
        approx = torch.ops.mkldnn._linear_pointwise(
            h.bfloat16(), self.packed, None, "none", [], ""
        ).float()  # (N, V)
        radius = approx.abs().add_(2.01 * h.norm(dim=-1, keepdim=True) * self.row_norms)
        radius = radius.mul_(2.0**-8).add_(1e-4)  # (N, V)
        floor = (approx - radius).amax(dim=-1, keepdim=True)  # (N, 1): below each row's best
        rows, cols = (approx.add_(radius) >= floor).nonzero(as_tuple=True)
        if cols.numel() > self.most * N or not bool(torch.isfinite(floor).all()):
            return argmax_last(F.linear(h, self.weight)).view(lead)
        exact = (self.weight[cols] * h[rows]).sum(dim=-1)  # fp32 logits of the candidates
        best = torch.full((N,), float("-inf"), device=h.device)
        best = best.scatter_reduce_(0, rows, exact, "amax")
        win = exact == best[rows]
        first = torch.full((N,), V, device=h.device)
        return first.scatter_reduce_(0, rows[win], cols[win], "amin").view(lead)


# ------------------------------------------------------------------ training elementwise kernels
def _wants_grad(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    if not torch.is_grad_enabled():  # inference: the common case, decided first
        return False
    return x.requires_grad or (weight is not None and weight.requires_grad)


class _RMSNorm(torch.autograd.Function):
    """``F.rms_norm`` (fp32) with a hand-written backward: the same forward values, and forward
    plus backward in about 60% of the time autograd takes through its decomposition."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)  # (..., 1)
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, rstd, weight)
        return x_hat * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_hat, rstd, weight = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            g = grad * weight  # d/dx_hat
            dx = (g - x_hat * (g * x_hat).mean(-1, keepdim=True)) * rstd
        if ctx.needs_input_grad[1]:
            dw = (grad * x_hat).reshape(-1, x_hat.shape[-1]).sum(0)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (Zhang & Sennrich 2019, arXiv:1910.07467): one fused
    kernel for inference (bit-identical to Hugging Face's in fp32), ``_RMSNorm`` when fp32
    gradients are wanted."""
    if x.dtype == torch.float32 and _wants_grad(x, weight):
        return _RMSNorm.apply(x, weight, eps)
    return _rms_norm_inference(x, weight, eps)


class _Rope(torch.autograd.Function):
    """``rope`` without its ``roll`` (a copy through ``cat``, forward and backward): each half
    is rotated in place with ``addcmul_``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        h = x.shape[-1] // 2
        out = x * cos
        out[..., :h].addcmul_(x[..., h:], sin[..., :h])
        out[..., h:].addcmul_(x[..., :h], sin[..., h:])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        h = grad.shape[-1] // 2
        dx = grad * cos
        dx[..., :h].addcmul_(grad[..., h:], sin[..., h:])
        dx[..., h:].addcmul_(grad[..., :h], sin[..., :h])
        return dx, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embeddings (Su et al. 2021, arXiv:2104.09864), Hugging Face's "rotate half"
    layout: x (..., heads, hd); cos and sin broadcast to it, sin sign-folded as in
    ``models.afm.rope_tables``. Equals HF's q*cos + rotate_half(q)*sin."""
    if _wants_grad(x):
        return _Rope.apply(x, cos, sin)
    return _rope_inference(x, cos, sin)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up for [gate; up] = h, with the backward written straight into one (…, 2F)
    gradient instead of two halves joined by ``cat``."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(h, act)
        return act * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, act = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        dh = torch.empty_like(h)
        d_gate, d_up = dh.chunk(2, dim=-1)
        torch.mul(grad, act, out=d_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        return dh


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the fused [gate; up] projection h (Shazeer 2020, arXiv:2002.05202)."""
    if _wants_grad(h):
        return _SwiGLU.apply(h)
    return _swiglu_inference(h)


def _rms_norm_inference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rms_norm(x, weight.shape, weight, eps)


def _rope_inference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def _swiglu_inference(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)  # each (..., hidden)
    return F.silu(gate) * up


@dataclass(frozen=True)
class Elementwise:
    """The block's elementwise steps as one set: ``elementwise()`` picks the inference set
    (the plain kernels, no checks) when autograd is off, else the dispatching functions above
    (hand-written backwards where a gradient is wanted). Decided once per block rather than
    per call: on a 2-core CPU each check is ~1 us, and a decoding step makes ~150."""

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    swiglu: Callable[[torch.Tensor], torch.Tensor]


INFERENCE = Elementwise(_rms_norm_inference, _rope_inference, _swiglu_inference)
AUTOGRAD = Elementwise(rms_norm, rope, swiglu)


def elementwise() -> Elementwise:
    return AUTOGRAD if torch.is_grad_enabled() else INFERENCE


# ------------------------------------------------------------------------- attention kernels
# Each is called by ``models.afm.Block`` as ``kernel(q, k, v, layer)`` with q (..., H, hd) and
# k, v (..., Hkv, hd), already normed and rotated, in the layout's token shape (...), and
# returns (..., H * hd).


class CachedAttention:
    """Padded rows (B, T): keys/values go to ``cache`` (a ``models.afm.KVCache``) at slots
    [start, start + T), or at per-row ``slots`` (B, T), and queries read slots [0, start + T);
    without a cache, the T tokens attend among themselves. ``mask``: additive (B or 1, 1, T,
    S), or None for SDPA's causal flag (or no mask at all for one decoding token)."""

    few_queries = 32  # up to this many new tokens per row, attention runs as ``attend``

    def __init__(self, cache, start: int, mask: torch.Tensor | None, slots: torch.Tensor | None):
        self.cache, self.start, self.mask, self.slots = cache, start, mask, slots

    def __call__(self, q, k, v, layer: int) -> torch.Tensor:
        B, T, H, hd = q.shape
        Hkv = k.shape[2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        start, mask, slots = self.start, self.mask, self.slots
        if self.cache is not None:
            ck, cv = self.cache.k[layer], self.cache.v[layer]  # each (B, Hkv, capacity, hd)
            if slots is None:
                ck[:, :, start : start + T] = k
                cv[:, :, start : start + T] = v
            else:  # row b writes at slots[b]; the indexed view is (B, T, Hkv, hd)
                rows = torch.arange(B, device=q.device)[:, None]  # (B, 1)
                ck[rows, :, slots] = k.transpose(1, 2)
                cv[rows, :, slots] = v.transpose(1, 2)
            k, v = ck[:, :, : start + T], cv[:, :, : start + T]  # (B, Hkv, S, hd), S = start+T
            if T == 1 or (mask is not None and T <= self.few_queries):
                # Decoding one token, or verifying a draft's few (whose mask is always built):
                # plain matmuls, kv heads shared. (No mask with T > 1 means SDPA's causal flag.)
                y = attend(q.reshape(B, Hkv, H // Hkv, T, hd), k, v, mask)  # (B, Hkv, G, T, hd)
                return y.permute(0, 3, 1, 2, 4).reshape(B, T, H * hd)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=H != Hkv
        )  # (B, H, T, hd)
        return y.transpose(1, 2).reshape(B, T, H * hd)


class StepAttention:
    """One new token per row, q (B, H, hd): keys/values to the cache slot ``start`` (or each
    row's ``slots`` (B, 1)), attention over slots [0, start + 1] as two small matmuls
    (``attend``). The same arithmetic as ``CachedAttention`` for T = 1, without the (B, T)
    token axis and its copies."""

    def __init__(self, cache, start: int, mask: torch.Tensor | None, slots: torch.Tensor | None):
        self.cache, self.start, self.mask, self.slots = cache, start, mask, slots

    def __call__(self, q, k, v, layer: int) -> torch.Tensor:
        B, H, hd = q.shape
        Hkv, start, slots = k.shape[1], self.start, self.slots
        ck, cv = self.cache.k[layer], self.cache.v[layer]  # each (B, Hkv, capacity, hd)
        if slots is None:
            ck[:, :, start], cv[:, :, start] = k, v
        else:
            rows = torch.arange(B, device=q.device)
            ck[rows, :, slots[:, 0]], cv[rows, :, slots[:, 0]] = k, v
        y = attend(
            q.view(B, Hkv, H // Hkv, 1, hd), ck[:, :, : start + 1], cv[:, :, : start + 1], self.mask
        )  # (B, Hkv, group, 1, hd)
        return y.view(B, H * hd)


@dataclass(frozen=True)
class SharedPrefix:
    """Index tensors that run K responses to each of B prompts with every prompt computed once
    and no padding token ever passing through a linear layer.

    The N real tokens lie flat: every prompt's tokens, then every response's. Attention, the
    only step that mixes tokens, gathers them into two small padded batches: the prompts
    (causal among themselves) and the B·K responses, each attending to its own prompt and
    causally to itself. A dense (T, T) mask over [prompt, r_1, …, r_K] would cost (P + K·R)²
    scores per row instead of P² + K·R·(P + R), and the padding to the longest packed row would
    run through every linear layer. P and R are the longest prompt and response (at least 1).
    """

    tokens: torch.Tensor  # (N,) token ids
    positions: torch.Tensor  # (N,) RoPE positions: each response restarts where its prompt ends
    prompt: torch.Tensor  # (B, P) flat index of each prompt token; padding points at token 0
    response: torch.Tensor  # (B·K, R) flat index of each response token; padding as above
    keys: torch.Tensor  # (B·K, P + R) what response b·K + k attends to: prompt b, then itself
    # Additive masks, 0 where a query may look and -inf elsewhere (floats: a boolean mask would
    # be converted again by every layer's SDPA call):
    mask: torch.Tensor  # (B·K, 1, R, P + R): real prompt keys, then response keys ≤ the query
    last_mask: torch.Tensor  # (B·K, 1, 1, P + R): every real key (what the last token sees)
    scatter: torch.Tensor  # (N,) each token's row in [prompt outputs (B·P); response outputs]
    last: torch.Tensor  # (B, K) flat index of each response's last token

    def to(self, device: torch.device | str, dtype: torch.dtype) -> SharedPrefix:
        """On ``device``, with the masks in ``dtype`` (the model's)."""
        moved = (getattr(self, f.name).to(device) for f in fields(self))
        return SharedPrefix(*(t.to(dtype) if t.is_floating_point() else t for t in moved))


def pack_shared_prefix(
    prompt_ids: Sequence[list[int]], response_ids: Sequence[Sequence[list[int]]]
) -> SharedPrefix:
    """Lay out each prompt once followed by its K responses (see ``SharedPrefix``). Every
    response restarts its positions where the prompt ends and sees only the prompt and itself,
    so its hidden states equal those of a separate (prompt, response) pass. An empty response
    is pooled at its prompt's last token."""
    B, K = len(prompt_ids), len(response_ids[0])
    if any(len(rs) != K for rs in response_ids):
        raise ValueError("every prompt needs the same number of responses")
    p_len = torch.tensor([len(p) for p in prompt_ids])  # (B,)
    r_len = torch.tensor([len(r) for rs in response_ids for r in rs])  # (B·K,)
    p_of_r = p_len.repeat_interleave(K)  # (B·K,) the prompt length of each response
    if ((p_of_r == 0) & (r_len == 0)).any():
        raise ValueError("an empty prompt with an empty response has no token to pool")
    P, R = max(1, int(p_len.max())), max(1, int(r_len.max()))
    p_real = torch.arange(P) < p_len[:, None]  # (B, P)
    r_real = torch.arange(R) < r_len[:, None]  # (B·K, R)
    # Flat order: every prompt's tokens, then every response's, so that the N real slots of
    # [prompts (B·P); responses (B·K·R)] are, in order, the flat tokens 0..N-1.
    real = torch.cat((p_real.flatten(), r_real.flatten()))  # (B·P + B·K·R,)
    flat = (real.cumsum(0) - 1).masked_fill_(~real, 0)  # each slot's flat index; padding -> 0
    prompt, response = flat[: B * P].view(B, P), flat[B * P :].view(B * K, R)
    tokens = [t for p in prompt_ids for t in p] + [t for rs in response_ids for r in rs for t in r]
    positions = torch.cat(
        (
            torch.arange(P).expand(B, P)[p_real],
            (p_of_r[:, None] + torch.arange(R))[r_real],
        )
    )
    last = torch.where(
        r_len > 0,
        response.gather(1, (r_len - 1).clamp(min=0)[:, None])[:, 0],
        prompt.repeat_interleave(K, 0).gather(1, (p_of_r - 1).clamp(min=0)[:, None])[:, 0],
    )  # (B·K,)
    j = torch.arange(P + R)  # key slot: prompt 0..P-1, then response 0..R-1
    key_valid = torch.where(j < P, j < p_of_r[:, None], j - P < r_len[:, None])  # (B·K, P + R)
    causal = j - P <= torch.arange(R)[:, None]  # (R, P + R): also each query's own slot
    allowed = torch.where(j < P, key_valid[:, None], causal)  # (B·K, R, P + R)
    mask, last_mask = (
        torch.zeros(m.shape).masked_fill_(~m, float("-inf")) for m in (allowed, key_valid)
    )
    return SharedPrefix(
        torch.tensor(tokens),
        positions,
        prompt,
        response,
        torch.cat((prompt.repeat_interleave(K, 0), response), 1),
        mask[:, None],
        last_mask[:, None, None],
        real.nonzero()[:, 0],
        last.view(B, K),
    )


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (N, heads, hd) at index (rows, L) -> (rows, heads, L, hd), SDPA's layout."""
    return x.index_select(0, index.flatten()).unflatten(0, index.shape).transpose(1, 2)


class SharedPrefixAttention:
    """Attention over the ``SharedPrefix`` layout: q (N, H, hd), k and v (N, Hkv, hd); two SDPA
    calls and no (N, N) mask."""

    def __init__(self, sp: SharedPrefix):
        self.sp = sp

    def __call__(self, q, k, v, layer: int) -> torch.Tensor:
        sp = self.sp
        (B, P), (BK, R), (H, hd) = sp.prompt.shape, sp.response.shape, q.shape[1:]
        gqa = H != k.shape[1]
        y_p = F.scaled_dot_product_attention(
            _gather(q, sp.prompt),
            _gather(k, sp.prompt),
            _gather(v, sp.prompt),
            is_causal=True,
            enable_gqa=gqa,
        )  # (B, H, P, hd); a padded prompt's real queries only see real keys
        y_r = F.scaled_dot_product_attention(
            _gather(q, sp.response),
            _gather(k, sp.keys),
            _gather(v, sp.keys),
            attn_mask=sp.mask,
            enable_gqa=gqa,
        )  # (B·K, H, R, hd)
        y = torch.cat(
            (
                y_p.transpose(1, 2).reshape(B * P, H * hd),
                y_r.transpose(1, 2).reshape(BK * R, H * hd),
            )
        )
        return y.index_select(0, sp.scatter)  # (N, H·hd)


class PooledAttention:
    """The ``SharedPrefix`` layout with queries at each response's last token only: q (B·K, H,
    hd) at ``sp.last``, k and v (N, Hkv, hd) for every token. For a last block whose outputs
    are read at those tokens alone (``models.afm.Block`` with ``keep=sp.last.flatten()``)."""

    def __init__(self, sp: SharedPrefix):
        self.sp = sp

    def __call__(self, q, k, v, layer: int) -> torch.Tensor:
        BK, H, hd = q.shape
        y = F.scaled_dot_product_attention(
            q[:, :, None],  # (B·K, H, 1, hd)
            _gather(k, self.sp.keys),
            _gather(v, self.sp.keys),
            attn_mask=self.sp.last_mask,
            enable_gqa=H != k.shape[1],
        )  # (B·K, H, 1, hd)
        return y.reshape(BK, H * hd)

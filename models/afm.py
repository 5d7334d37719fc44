"""AFM: the decoder of Apple's on-device foundation model, in one readable file.

Features (Gunter et al. 2024, "Apple Intelligence Foundation Language Models", arXiv:2407.21075,
§2 "Architecture", unless another reference is given):

- decoder-only Transformer (Vaswani et al. 2017, arXiv:1706.03762);
- pre-normalization with RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467) for stability;
- optional query/key normalization, RMSNorm over each head (Dehghani et al. 2023,
  arXiv:2302.05442; Wortsman et al. 2023, arXiv:2309.14322);
- grouped-query attention with fewer key/value heads than query heads (Ainslie et al. 2023,
  arXiv:2305.13245), which shrinks the KV cache;
- SwiGLU feed-forward (Shazeer 2020, arXiv:2002.05202);
- rotary position embeddings (Su et al. 2021, arXiv:2104.09864) with base 500,000 by default
  (the AFM paper; Xiong et al. 2023, arXiv:2309.16039 on large bases for long context);
- input and output embeddings tied (Press & Wolf 2017, arXiv:1608.05859) to save parameters.

With ``qk_norm=False`` the module is exactly a Llama-family decoder (Touvron et al. 2023), so
Llama-architecture checkpoints such as SmolLM2 load into it (see ``models/checkpoint.py``). RoPE
uses the Hugging Face "rotate half" layout; GGUF files store q/k rows in the interleaved layout
and are un-permuted on import.

One decoder path: ``Block.forward`` is the block's arithmetic for every layout (padded prompt
passes, one-token decoding steps, speculative verification, the flat shared-prefix layout of
reward models), which differ only in the attention kernel they pass (``models/kernels.py``).
Every projection, the output head included, goes through one weight seam
(``models/linear.py``): dense, oneDNN-packed, int4, and later palettized or LoRA-wrapped.

Inference: a static, preallocated KV cache (``KVCache``, with per-row lengths when rows
advance unevenly) and padding-aware masks, used by ``models/generate.py`` for batched
generation and log-likelihoods (``models/draft.py`` drafts tokens for speculative decoding
on the same cache). Weights of q/k/v and of the SwiGLU gate/up projections are fused into
single matrices: one matmul instead of three (two) per layer is most of what makes
single-stream CPU decoding fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from models.kernels import (
    BoundedGreedy,
    CachedAttention,
    StepAttention,
    argmax_last,
    elementwise,
    rms_norm,
)
from models.linear import Linear, Projection, TiedHead


@dataclass(frozen=True)
class AFMConfig:
    vocab_size: int = 49_152  # AFM on-device vocabulary ("49K", arXiv:2407.21075 §2)
    dim: int = 3072  # model dimension of AFM-on-device (§2)
    n_layers: int = 26  # AFM-on-device depth (§2)
    n_heads: int = 24  # query heads; head_dim = 3072 / 24 = 128 (§2)
    n_kv_heads: int = 8  # key/value heads for GQA (§2)
    hidden_dim: int = 8192  # SwiGLU width; not stated, inferred from 2.58B non-embedding params
    norm_eps: float = 1e-5  # RMSNorm epsilon, as in Llama 2/3 (arXiv:2307.09288)
    rope_base: float = 500_000.0  # RoPE base frequency (§2)
    qk_norm: bool = True  # query/key RMSNorm (§2); False gives a plain Llama decoder
    tie_embeddings: bool = True  # shared input/output embedding (§2)
    max_seq_len: int = 8192  # rows of the precomputed RoPE table; AFM trains at 4k then 8k (§3)

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} not divisible by n_kv_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> AFMConfig:
        """Strict: unknown or missing keys are errors, so a stale config never loads silently."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data))
        if unknown or missing:
            raise ValueError(f"bad AFMConfig keys: unknown={unknown} missing={missing}")
        return cls(**data)


PRESETS: dict[str, AFMConfig] = {
    # AFM-on-device as published (arXiv:2407.21075 §2): ~2.73B parameters.
    "afm-on-device": AFMConfig(),
    # SmolLM2-135M (HuggingFaceTB, Allal et al. 2025, arXiv:2502.02737): Llama architecture.
    "smollm2-135m": AFMConfig(
        vocab_size=49_152,
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        hidden_dim=1536,
        rope_base=100_000.0,
        qk_norm=False,
        max_seq_len=8192,
    ),
    # Small enough for unit tests to run in milliseconds; keeps GQA (2 query heads per kv head).
    "tiny": AFMConfig(
        vocab_size=256,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=128,
        max_seq_len=256,
    ),
}


def config_from_preset(name: str, **overrides) -> AFMConfig:
    """Exact-name lookup in ``PRESETS``; keyword overrides replace single fields."""
    if name not in PRESETS:
        raise KeyError(f"unknown AFM preset {name!r}; known: {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def rope_tables(head_dim: int, max_seq_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin tables, each (max_seq_len, head_dim), fp32.

    Frequencies are computed exactly as Hugging Face Llama does (fp32 inverse frequencies times
    fp32 positions), so positions match transformers bit for bit. ``sin`` carries the minus sign
    of "rotate half" on its first half, which lets ``models.kernels.rope`` use one ``roll``
    instead of slice/negate/concatenate.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    t = torch.arange(max_seq_len, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)  # (S, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, hd)
    sin = emb.sin()
    sin[:, : head_dim // 2] *= -1
    return emb.cos(), sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel for inference (in fp32 bit-identical to Hugging Face's
        # x * rsqrt(mean(x^2) + eps) * weight, checked by the SmolLM2 parity tests); a
        # hand-written backward when training (models.kernels.rms_norm).
        return rms_norm(x, self.weight, self.eps)


class KVCache:
    """Static key/value cache, preallocated once for the whole generation.

    ``k``/``v`` are (n_layers, B, n_kv_heads, capacity, head_dim). Normally every row writes at
    the same slot index (prompts are left-padded to a common length), so an append is one slice
    copy per layer and never reallocates; ``length`` is the number of filled slots.

    Speculative decoding accepts a different number of tokens per row; it then sets
    ``lengths`` (B,), each row's filled slots (``length`` is their maximum). Appends go to
    each row's own slots and attention masks every row's slots past its own length.
    """

    def __init__(
        self,
        cfg: AFMConfig,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0
        self.lengths: torch.Tensor | None = None

    def set_lengths(self, lengths: torch.Tensor) -> None:
        """Rewind or advance row by row: row b keeps its first ``lengths[b]`` slots. Equal
        lengths fall back to the cheaper shared ``length``."""
        self.length = int(lengths.max())
        self.lengths = None if int(lengths.min()) == self.length else lengths

    def rows(self, n: int) -> KVCache:
        """A cache over this one's first ``n`` rows, sharing its storage (continuous batching,
        ``models.engine``, keeps its live rows there). Lengths are the caller's to set."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, :n], self.v[:, :n]  # each layer's rows stay contiguous
        view.capacity, view.length, view.lengths = self.capacity, self.length, None
        return view

    def slots(self, T: int) -> torch.Tensor | None:
        """(B, T) slots each row's next T tokens go to when rows have their own lengths; None
        when they all go to [length, length + T)."""
        if self.lengths is None:
            return None
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)

    def advance(self, T: int) -> None:
        """Count T more filled slots in every row."""
        if self.lengths is None:
            self.length += T
        else:
            self.set_lengths(self.lengths + T)


class Attention(nn.Module):
    """The attention sublayer's parameters; its arithmetic is ``Block.forward``."""

    def __init__(self, cfg: AFMConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # Fused [q; k; v] projection: one matmul per layer instead of three.
        self.wqkv = Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * self.hd)
        self.wo = Linear(cfg.n_heads * self.hd, cfg.dim)
        self.q_norm = RMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else None


class SwiGLU(nn.Module):
    """The feed-forward sublayer's parameters; its arithmetic is ``Block.forward``."""

    def __init__(self, cfg: AFMConfig):
        super().__init__()
        # Fused [gate; up] projection, split after the matmul.
        self.w13 = Linear(cfg.dim, 2 * cfg.hidden_dim)
        self.w2 = Linear(cfg.hidden_dim, cfg.dim)


# A block's four projections as ``Block.forward`` takes them to run in place of its own:
# (wqkv, wo, w13, w2), each called as ``f(x)`` (``wqkv(x, rows=...)`` too with ``keep``): a
# ``models.linear.Projection``, or the int4 draft's unchecked ``Int4Linear.multiply``.
StepProjection = Callable[..., torch.Tensor]
Projections = tuple[StepProjection, StepProjection, StepProjection, StepProjection]


class Block(nn.Module):
    """One pre-norm decoder block, written once for every layout the library runs: padded
    prompt passes and speculative verification (x (B, T, dim), ``CachedAttention``), one-token
    decoding steps (x (B, dim), ``StepAttention``), and the flat shared-prefix layout of reward
    models and preference pairs (x (N, dim), ``SharedPrefixAttention``). Layouts differ only in
    the attention kernel they pass (``models.kernels``); the arithmetic here is the same."""

    def __init__(self, cfg: AFMConfig, index: int = 0):
        super().__init__()
        self.index = index  # which layer of the KV cache the kernel reads and writes
        # Plain attributes, read in forward without nn.Module.__getattr__ (~1 us each, 30 blocks
        # a decoding step): the norms' epsilon and whether q/k are normed.
        self.eps, self.qk_norm = cfg.norm_eps, cfg.qk_norm
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: Callable[..., torch.Tensor],
        keep: torch.Tensor | None = None,
        weights: Projections | None = None,
    ) -> torch.Tensor:
        """x (..., dim) -> (..., dim).

        cos, sin: (..., 1, hd) RoPE tables at each token's position.
        attention: the layout's kernel, ``attention(q, k, v, layer)`` with q (..., H, hd), k
            and v (..., Hkv, hd) -> (..., H·hd).
        keep: (M,) flat indices of the only tokens whose outputs are wanted (x is (N, dim)):
            keys and values are computed for every token, everything else at those M; returns
            (M, dim). The kernel then takes queries (M, H, hd) (``PooledAttention``).
        weights: projections to use instead of the block's own (same shapes).
        """
        a, ops, dtype, eps = self.attn, elementwise(), x.dtype, self.eps
        H, Hkv, hd = a.n_heads, a.n_kv, a.hd
        wqkv, wo, w13, w2 = weights or (a.wqkv, a.wo, self.mlp.w13, self.mlp.w2)
        h = ops.rms_norm(x, self.attn_norm.weight, eps)
        if keep is None:
            qkv = wqkv(h)
            if qkv.dtype is not dtype:  # int4 projections answer in bf16
                qkv = qkv.to(dtype)
            # split, not slicing: its backward is one cat instead of zeros, copies and a sum;
            # split_with_sizes is Tensor.split without its Python wrapper
            qkv = qkv.view(*x.shape[:-1], H + 2 * Hkv, hd)
            qk, v = qkv.split_with_sizes((H + Hkv, Hkv), dim=-2)
            if self.qk_norm:
                qk = torch.cat((a.q_norm(qk[..., :H, :]), a.k_norm(qk[..., H:, :])), dim=-2)  # type: ignore[misc]
            q, k = ops.rope(qk, cos, sin).split_with_sizes((H, Hkv), dim=-2)  # q, k in one pass
        else:
            kv = wqkv(h, rows=slice(H * hd, None)).to(dtype).unflatten(-1, (2 * Hkv, hd))
            k, v = kv.split(Hkv, dim=-2)  # each (N, Hkv, hd)
            q = wqkv(h[keep], rows=slice(0, H * hd)).to(dtype).unflatten(-1, (H, hd))
            if self.qk_norm:
                q, k = a.q_norm(q), a.k_norm(k)  # type: ignore[misc]
            q, k = ops.rope(q, cos[keep], sin[keep]), ops.rope(k, cos, sin)
            x = x[keep]  # (M, dim)
        x = x + wo(attention(q, k, v, self.index))
        gate_up = w13(ops.rms_norm(x, self.mlp_norm.weight, eps))
        if gate_up.dtype is not dtype:
            gate_up = gate_up.to(dtype)
        return x + w2(ops.swiglu(gate_up))


class AFM(nn.Module):
    # (max_seq_len, hd) RoPE buffers from __init__, declared so they read as tensors
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, cfg: AFMConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head: Projection = (
            TiedHead(self.tok_emb) if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size)
        )
        self._greedy: tuple[tuple, BoundedGreedy] | None = None  # see prepack()
        self._greedy_rows: int | None = None
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        # Not persistent: derived from the config, so checkpoints hold weights only.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, seed: int = 0) -> AFM:
        """Random init for training from scratch: N(0, 0.02), output projections scaled by
        1/sqrt(2 * n_layers) as in GPT-2 (Radford et al. 2019); norms at one."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
                continue
            std = (
                0.02 / math.sqrt(2 * self.cfg.n_layers)
                if name.endswith(("wo.weight", "w2.weight"))
                else 0.02
            )
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        if capacity > self.cfg.max_seq_len:
            raise ValueError(
                f"cache capacity {capacity} exceeds max_seq_len {self.cfg.max_seq_len}"
            )
        w = self.tok_emb.weight
        return KVCache(self.cfg, batch_size, capacity, w.dtype, w.device)

    def projections(self) -> list[Projection]:
        """Every projection of the model (``models.linear``), the output head last."""
        return [m for m in self.modules() if isinstance(m, Projection)]

    def prepack(self, rows: int | None) -> AFM:
        """Keep a copy of every projection (and of the output head) packed for fast inference
        matmuls on inputs of about ``rows`` rows (``models.linear.Linear.pack``), or drop the
        copies with None. Copies are rebuilt when the weights change and never used where a
        gradient is wanted; a no-op where oneDNN can't take the weights (not CPU fp32)."""
        for projection in self.projections():
            pack = getattr(projection, "pack", None)
            if pack is not None:
                pack(rows)
        usable = rows and BoundedGreedy.usable(self.tok_emb.weight)
        self._greedy_rows = rows if usable else None
        self._greedy = None
        return self

    def trunk(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        key_valid: torch.Tensor | None = None,
        depth: int | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states (B, T, dim) for ``tokens`` (B, T).

        positions: (B, T) RoPE positions; default ``cache.length + arange(T)``.
        cache: if given, keys/values are written at slots [length, length + T) and ``length``
            advances by T; with per-row ``cache.lengths``, at each row's own slots.
        key_valid: (B, capacity) bool, False at padding slots of the cache (or, without a cache,
            (B, T) for the tokens themselves). None means no padding.
        depth: run only the first ``depth`` blocks and return their residual stream, not
            normed (a hidden-state probe's features, ``suites/safety/probe.py``; later blocks
            are not run). Only without a cache, which would be left half-written.
        """
        B, T = tokens.shape
        if depth is not None and (cache is not None or not 1 <= depth <= self.cfg.n_layers):
            raise ValueError(f"depth {depth}: needs no cache and 1..{self.cfg.n_layers} blocks")
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.capacity:
            raise ValueError(f"KV cache full: {start} + {T} > capacity {cache.capacity}")
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        cos = self.rope_cos[positions].unsqueeze(2)  # (B, T, 1, hd)
        sin = self.rope_sin[positions].unsqueeze(2)  # (B, T, 1, hd)
        slots = cache.slots(T) if cache is not None else None  # (B, T) or None
        attention = CachedAttention(cache, start, self._mask(T, start, key_valid, slots), slots)
        x = self.tok_emb(tokens)  # (B, T, dim)
        for block in self.blocks if depth is None else self.blocks[:depth]:
            x = block(x, cos, sin, attention)
        if depth is not None:
            return x
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        key_valid: torch.Tensor | None = None,
        weights: Sequence[Projections] | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states (B, dim) for one new token per row: ``tokens`` (B,) at
        RoPE ``positions`` (B,), keys/values written to the cache slots ``trunk`` would use
        (shared or per-row). ``trunk`` for T = 1 through the same blocks, in the (B,) layout
        that skips the token axis (``StepAttention``).

        weights: per block, projections to run instead of the block's own (a draft model's
            cheaper copies, ``models.draft.Int4Draft``).
        """
        start = cache.length
        if start + 1 > cache.capacity:
            raise ValueError(f"KV cache full: {start} + 1 > capacity {cache.capacity}")
        slots = cache.slots(1)  # (B, 1), or None when every row writes at ``start``
        attention = StepAttention(cache, start, self._mask(1, start, key_valid, slots), slots)
        cos = self.rope_cos[positions][:, None]  # (B, 1, hd)
        sin = self.rope_sin[positions][:, None]  # (B, 1, hd)
        x = self.tok_emb(tokens)  # (B, dim)
        for i, block in enumerate(self.blocks):
            # forward, not __call__: a module call's hooks cost ~1.5 us a block per token
            x = block.forward(x, cos, sin, attention, weights=weights[i] if weights else None)
        cache.advance(1)
        return self.norm(x)

    def _mask(
        self,
        T: int,
        start: int,
        key_valid: torch.Tensor | None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Additive attention mask (B, 1, T, start+T): 0 where a query may look, -inf elsewhere;
        or None where SDPA's own causal flag (or no mask at all, when decoding one token) is
        exact. Built once per forward as floats: a boolean mask would be converted again by
        every layer's SDPA call. With per-row cache ``slots`` (B, T), see ``_row_mask``."""
        if slots is not None:
            return self._row_mask(slots, start + T, key_valid)
        if key_valid is None and (start == 0 or T == 1):
            return None
        S = start + T
        device = key_valid.device if key_valid is not None else None
        q_pos = torch.arange(start, S, device=device)
        allowed = torch.arange(S, device=device)[None, :] <= q_pos[:, None]  # (T, S) causal
        if key_valid is None:
            allowed = allowed[None]  # (1, T, S)
        else:
            allowed = allowed[None] & key_valid[:, None, :S]  # (B, T, S)
            # A padding query would see no key at all (softmax over all -inf is NaN, and NaN
            # leaks through later layers even where masked): let every query see its own slot.
            allowed[:, torch.arange(T), q_pos] = True
        return self._additive(allowed)

    def _row_mask(
        self, slots: torch.Tensor, S: int, key_valid: torch.Tensor | None
    ) -> torch.Tensor:
        """Mask (B, 1, T, S) for queries at per-row cache ``slots`` (B, T): a query sees the
        slots up to its own, less padding. Slots past a row's own are stale (written by a
        longer row's draft or by rejected tokens) and stay hidden. Queries are never padding
        here, so no row is left without a key."""
        allowed = torch.arange(S, device=slots.device) <= slots[:, :, None]  # (B, T, S)
        if key_valid is not None:
            allowed &= key_valid[:, None, :S]
        return self._additive(allowed)

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(allowed.shape, dtype=self.rope_cos.dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, float("-inf"))[:, None]  # (B or 1, 1, T, S)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary for hidden states (..., dim)."""
        return self.lm_head(h)

    def greedy(self, h: torch.Tensor) -> torch.Tensor:
        """Greedy next tokens (...) for hidden states (..., dim): the argmax of ``head(h)``
        (through ``BoundedGreedy`` once prepacked, rebuilt when the head's weight changes).
        A palettized head's lookup-table kernel beats BoundedGreedy's bf16 copy up to about
        four rows (SmolLM2, 4-bit: 1.7 against ~4 ms on one row; 5.9 against 4.3 on eight)."""
        palette = getattr(self.tok_emb, "palette", None)
        lookup = palette is not None and h.numel() <= 4 * h.shape[-1]
        if self._greedy_rows is None or lookup or (torch.is_grad_enabled() and h.requires_grad):
            return argmax_last(self.head(h))
        version = self.lm_head.version()
        if self._greedy is None or self._greedy[0] != version:
            weight = self.lm_head.effective_weight()
            self._greedy = (version, BoundedGreedy(weight, self._greedy_rows))
        return self._greedy[1](h)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for every position."""
        return self.head(self.trunk(tokens, positions, cache, key_valid))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

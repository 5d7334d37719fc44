"""An int4 copy of an AFM that drafts tokens for speculative greedy decoding
(``models.generate.Draft``; Leviathan et al. 2023, arXiv:2211.17192), CPU only.

- ``quantize_int4`` / ``Int4Linear``: weight-only int4 projections (group 32, llama.cpp's Q4_1
  grid) through torch's CPU int4 matmul kernel.
- ``ShortlistHead``: int4 logits pick a shortlist, the fp32 head rescores it.
- ``Int4Draft``: one decoding step of the whole model in int4, on the fp32 model's KV cache.

The draft is never trusted: ``models.generate`` keeps only the tokens the fp32 model itself
picks, so the draft decides how many tokens a pass yields, not which.
"""

from __future__ import annotations

import torch

from models.afm import AFM, KVCache


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric int4 of ``w`` (N, K), one scale and offset per group of
    ``group_size`` input columns: w ~ (q - 8) * scale + zero, q in [0, 15].

    Returns q (N, K) int32 and scales_and_zeros (K / group_size, N, 2) bf16, the layout of
    ``torch.ops.aten._weight_int4pack_mm_for_cpu``. Group 32 with min/max range is the grid
    of llama.cpp's Q4_1, so weights imported from a Q4_1 GGUF file come back up to the bf16
    rounding of their scales.
    """
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"input width {K} is not a multiple of the int4 group size {group_size}")
    groups = w.detach().float().reshape(N, K // group_size, group_size)  # (N, K/g, g)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)  # (N, K/g, 1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = ((groups - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(N, K)
    zeros = torch.cat((scale, lo + 8 * scale), dim=-1)  # (N, K/g, 2)
    return q, zeros.transpose(0, 1).contiguous().to(torch.bfloat16)  # (K/g, N, 2)


class Int4Linear:
    """Weight-only int4 projection (``quantize_int4``), CPU only, for drafting tokens
    (``Int4Draft``): it reads ~7x fewer weight bytes than fp32, and is not exact."""

    def __init__(self, weight: torch.Tensor, group_size: int = 32):
        q, self.scales_zeros = quantize_int4(weight, group_size)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)  # (N, K/2) uint8
        self.group_size = group_size

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, in) rows of any float dtype -> (N, out) bf16 (the kernel's input dtype)."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows.to(torch.bfloat16), self.packed, self.group_size, self.scales_zeros
        )


class ShortlistHead:
    """A draft's output head: int4 logits (``Int4Linear``) pick the ``shortlist`` likeliest
    tokens, which are then scored against the fp32 ``weight``. Its greedy token is the fp32
    head's whenever the fp32 winner is on the shortlist, for ~1/7 of the weight traffic."""

    def __init__(self, weight: torch.Tensor, group_size: int = 32, shortlist: int = 16):
        self.approx = Int4Linear(weight, group_size)
        self.weight = weight  # (V, dim), the model's own tensor, shared
        self.shortlist = shortlist

    def greedy(self, h: torch.Tensor) -> torch.Tensor:
        """Greedy next tokens (B,) for hidden states (B, dim)."""
        candidates = self.approx(h).topk(self.shortlist, dim=-1).indices  # (B, shortlist)
        exact = (self.weight[candidates] @ h.unsqueeze(-1)).squeeze(-1)  # (B, shortlist)
        return candidates.gather(-1, exact.argmax(dim=-1, keepdim=True)).squeeze(-1)


class Int4Draft:
    """A cheap copy of an AFM that drafts tokens for speculative decoding
    (``models.generate.Draft``), CPU only: every block projection in int4 (``Int4Linear``)
    and a ``ShortlistHead``. The embedding, norms and RoPE tables are the model's own tensors,
    shared, not copied; the draft runs on the model's KVCache.

    On SmolLM2-135M (imported from a Q4_1 GGUF file, whose 4-bit grid group-32 int4 nearly
    reproduces), given the same history, the draft's next token is the fp32 model's at 99%
    of the positions of the benchmark's answers; with a plain int4 head it was 88%, with an
    int8 head 97%.

    ``step`` is ``AFM.step`` (``AFM.trunk`` for one token as a flat loop) with the int4
    projections, then the shortlist head: ~11 ms a token on the 2-core CPU. A bf16 SwiGLU saved
    0.3 ms more but lowered acceptance (0.87 against 0.93 on the benchmark's prompts, one at
    a time) and was 5% slower overall.
    """

    def __init__(self, model: AFM, group_size: int = 32):
        self.model = model
        def int4(projection) -> Int4Linear:
            return Int4Linear(projection.weight, group_size)

        self.layers = [  # AFM.step's layout, projections in int4
            (attn_norm, int4(wqkv), q_norm, k_norm, int4(wo), mlp_norm, int4(w13), int4(w2))
            for attn_norm, wqkv, q_norm, k_norm, wo, mlp_norm, w13, w2 in model.step_layers()
        ]
        self.head = ShortlistHead(model._head_weight(), group_size)

    def step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Proposed next tokens (B,) after ``tokens`` (B,) at RoPE ``positions`` (B,); their
        keys/values go to the cache slots ``AFM.trunk`` would write (shared or per-row)."""
        hidden = self.model.step(tokens, positions, cache, key_valid, layers=self.layers)
        return self.head.greedy(hidden)

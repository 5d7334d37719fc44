"""An int4 copy of an AFM that drafts tokens for speculative greedy decoding
(``models.generate.Draft``; Leviathan et al. 2023, arXiv:2211.17192), CPU only.

- ``ShortlistHead``: int4 logits pick a shortlist, the fp32 head rescores it.
- ``Int4Draft``: one decoding step of the whole model with int4 projections
  (``models.linear.Int4Linear``), on the fp32 model's KV cache.

The draft is never trusted: ``models.generate`` keeps only the tokens the fp32 model itself
picks, so the draft decides how many tokens a pass yields, not which. Its int4 copies follow
the model's weights: ``Int4Draft.refresh``, called before every speculative generation,
rebuilds each copy whose fp32 weight changed.
"""

from __future__ import annotations

import torch

from models.afm import AFM, Block, KVCache, Projections
from models.linear import Int4Linear, Projection


class ShortlistHead:
    """A draft's output head: int4 logits (``Int4Linear``) pick the ``shortlist`` likeliest
    tokens, which are then scored by the fp32 head on those rows only. Its greedy token is the
    fp32 head's whenever the fp32 winner is on the shortlist, for ~1/7 of the weight traffic."""

    def __init__(self, head: Projection, group_size: int = 32, shortlist: int = 16):
        self.approx = Int4Linear(head, group_size)  # refreshed by Int4Draft.refresh
        self.head = head  # the model's own head, shared
        self.shortlist = shortlist

    def greedy(self, h: torch.Tensor) -> torch.Tensor:
        """Greedy next tokens (B,) for hidden states (B, dim)."""
        candidates = self.approx.multiply(h).topk(self.shortlist, dim=-1).indices  # (B, shortlist)
        weight = self.head.effective_weight()  # (V, dim), no copy for a dense head
        exact = (weight[candidates] @ h.unsqueeze(-1)).squeeze(-1)  # (B, shortlist)
        return candidates.gather(-1, exact.argmax(dim=-1, keepdim=True)).squeeze(-1)


class Int4Draft:
    """A cheap copy of an AFM that drafts tokens for speculative decoding
    (``models.generate.Draft``), CPU only: every block projection in int4 (``Int4Linear``)
    and a ``ShortlistHead``. The embedding, norms and RoPE tables are the model's own tensors,
    shared, not copied; the draft runs on the model's KVCache through the model's own blocks
    (``AFM.step`` with ``weights=``).

    On SmolLM2-135M (imported from a Q4_1 GGUF file, whose 4-bit grid group-32 int4 nearly
    reproduces), given the same history, the draft's next token is the fp32 model's at 99%
    of the positions of the benchmark's answers; with a plain int4 head it was 88%, with an
    int8 head 97%.

    A step is ~11 ms a token on the 2-core CPU. A bf16 SwiGLU saved 0.3 ms more but lowered
    acceptance (0.87 against 0.93 on the benchmark's prompts, one at a time) and was 5%
    slower overall.
    """

    def __init__(self, model: AFM, group_size: int = 32):
        self.model = model

        self.copies: list[tuple[Int4Linear, Int4Linear, Int4Linear, Int4Linear]] = []
        for b in model.blocks:
            assert isinstance(b, Block)  # an nn.ModuleList's items are typed as plain Modules
            a, m = b.attn, b.mlp
            wqkv, wo, w13, w2 = (Int4Linear(p, group_size) for p in (a.wqkv, a.wo, m.w13, m.w2))
            self.copies.append((wqkv, wo, w13, w2))
        self.head = ShortlistHead(model.lm_head, group_size)
        # What AFM.step runs: the copies' unchecked ``multiply`` (``refresh`` checks them once per
        # generation instead of once per call), bound methods rather than module calls.
        self.layers: list[Projections] = [
            (wqkv.multiply, wo.multiply, w13.multiply, w2.multiply)
            for wqkv, wo, w13, w2 in self.copies
        ]

    def refresh(self) -> None:
        """Rebuild every int4 copy whose fp32 weight changed (a training step, a reload):
        ``models.generate`` calls it before each speculative generation."""
        for copies in self.copies:
            for copy in copies:
                copy.refresh()
        self.head.approx.refresh()

    def step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Proposed next tokens (B,) after ``tokens`` (B,) at RoPE ``positions`` (B,); their
        keys/values go to the cache slots ``AFM.trunk`` would write (shared or per-row)."""
        hidden = self.model.step(tokens, positions, cache, key_valid, weights=self.layers)
        return self.head.greedy(hidden)

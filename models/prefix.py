"""Continuation log-likelihoods that share a context prefix: its KV cache is computed once.

Few-shot suites send many (context, continuation) pairs whose contexts start alike: every 5-shot
MMLU prompt of a subject begins with the same description and answered exemplars (~85% of its
tokens), and the four continuations " A".." D" share the whole context. ``generate.loglikelihood``
runs each pair's full sequence; here the pairs are grouped into families with a common token
prefix, the prefix goes through the model once (B=1, into a ``KVCache``), and only each distinct
suffix (the rest of the context plus all but the last continuation token) is run, batched, on
top of a copy of that cache. Pairs with the same input sequence share one row, so the four
single-token MMLU choices cost one row, read off one position's logits.

Grouping works on token ids, never on text, so the sequences scored are exactly those of
``generate.loglikelihood`` and results agree with it to float rounding (tests/models/
test_prefix.py). ``PrefixScorer`` also keeps the last prefix between calls: a runner that sends
a subject's questions a batch at a time extends the stored cache instead of recomputing it
(keys and values of a position depend only on the tokens up to it, so any common leading part
of two prefixes is reusable).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.afm import AFM, KVCache
from models.generate import loglikelihood as full_loglikelihood

Pair = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


@dataclass
class PrefixKV:
    """Keys/values of ``tokens`` at positions 0..len-1: a B=1 cache with length len(tokens)."""

    tokens: tuple[int, ...]
    cache: KVCache


@dataclass
class Family:
    """Pairs (indices into the caller's list) whose contexts all start with ``prefix_len``
    common tokens and are longer than that."""

    prefix_len: int
    members: list[int]


def common_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def plan_families(pairs: Sequence[Pair], min_prefix: int = 32) -> tuple[list[Family], list[int]]:
    """Split pairs into prefix-sharing families and the rest (for the plain path).

    Distinct contexts are sorted, so contexts with a common start are adjacent; a context joins
    the current family while that does not lower the tokens saved, n * new_prefix >=
    (n - 1) * old_prefix for a family of n contexts (MMLU: a subject's questions join, the next
    subject, which shares only the description's first words, starts a new family). A family
    is kept when its prefix has at least ``min_prefix`` tokens and it has two pairs or more:
    below that the B=1 prefix pass and smaller batches cost more than they save.
    """
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(pairs):
        by_context.setdefault(tuple(ctx), []).append(i)
    groups: list[tuple[int, list[tuple[int, ...]]]] = []  # (prefix length, contexts)
    for ctx in sorted(by_context):
        if groups:
            p, contexts = groups[-1]
            n = len(contexts)
            shared = min(p, common_len(contexts[-1], ctx), len(ctx) - 1)
            if shared > 0 and n * shared >= (n - 1) * p:
                groups[-1] = (shared, [*contexts, ctx])
                continue
        groups.append((len(ctx) - 1, [ctx]))
    families, rest = [], []
    for p, contexts in groups:
        members = sorted(i for ctx in contexts for i in by_context[ctx])
        if p >= min_prefix and len(members) >= 2:
            families.append(Family(p, members))
        else:
            rest.extend(members)
    return families, sorted(rest)


@torch.inference_mode()
def encode_prefix(model: AFM, tokens: Sequence[int], reuse: PrefixKV | None = None) -> PrefixKV:
    """The KV cache of ``tokens``; the part it shares with ``reuse`` is copied, not recomputed."""
    tokens = tuple(tokens)
    done = common_len(reuse.tokens, tokens) if reuse is not None else 0
    cache = model.new_cache(1, len(tokens))
    if reuse is not None and done:
        cache.k[:, :, :, :done] = reuse.cache.k[:, :, :, :done]  # (L, 1, n_kv, done, hd)
        cache.v[:, :, :, :done] = reuse.cache.v[:, :, :, :done]
        cache.length = done
    if done < len(tokens):
        device = model.device
        model.trunk(torch.tensor([tokens[done:]], device=device), cache=cache)
    return PrefixKV(tokens, cache)


@torch.inference_mode()
def suffix_loglikelihood(
    model: AFM, prefix: PrefixKV, pairs: Sequence[Pair], *, batch_size: int = 8
) -> list[tuple[float, bool]]:
    """``generate.loglikelihood`` for pairs whose contexts start with ``prefix.tokens`` and are
    longer than it, running only what follows the prefix. Sequences must fit max_seq_len."""
    P = len(prefix.tokens)
    # A row is what follows the prefix in context + continuation[:-1]; pairs with equal
    # inputs (one context, single-token continuations) share it.
    keys = []
    for ctx, cont in pairs:
        if len(ctx) <= P or tuple(ctx[:P]) != prefix.tokens or not cont:
            raise ValueError("every context must extend the prefix and have a continuation")
        if len(ctx) + len(cont) - 1 > model.cfg.max_seq_len:
            raise ValueError("sequence longer than max_seq_len: use generate.loglikelihood")
        keys.append((*ctx[P:], *cont[:-1]))
    by_length = sorted(set(keys), key=lambda k: (-len(k), k))  # longest first: little padding
    rank = {key: r for r, key in enumerate(by_length)}
    row_of = [rank[k] for k in keys]
    width = len(by_length[0])
    cache = model.new_cache(min(batch_size, len(by_length)), P + width)
    cache.k[:, :, :, :P] = prefix.cache.k[:, :, :, :P]  # broadcast over the batch rows
    cache.v[:, :, :, :P] = prefix.cache.v[:, :, :, :P]
    members: dict[int, list[int]] = {}
    for i, r in enumerate(row_of):
        members.setdefault(r, []).append(i)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for b in range(0, len(by_length), batch_size):
        batch = by_length[b : b + batch_size]
        idx = [i for r in range(b, b + len(batch)) for i in members[r]]
        view = _rows_view(cache, len(batch), P)
        scores = _score_batch(model, view, batch, pairs, idx, [row_of[i] - b for i in idx])
        for i, score in zip(idx, scores, strict=True):
            results[i] = score
    return results


def _rows_view(cache: KVCache, rows: int, length: int) -> KVCache:
    """The first ``rows`` batch rows of ``cache``, rewound to ``length`` filled slots."""
    view = copy.copy(cache)
    view.k, view.v = cache.k[:, :rows], cache.v[:, :rows]  # (L, rows, n_kv, capacity, hd)
    view.length = length
    return view


def _score_batch(
    model: AFM,
    cache: KVCache,
    batch: list[tuple[int, ...]],
    pairs: Sequence[Pair],
    idx: list[int],
    rows: list[int],
) -> list[tuple[float, bool]]:
    """Run the suffix rows ``batch`` on top of ``cache`` (holding the prefix) and score the
    pairs ``idx``, pair idx[k] reading row rows[k]. Right padding needs no mask: causal
    attention never looks ahead."""
    P = cache.length
    device = model.device
    tokens = torch.zeros((len(batch), max(map(len, batch))), dtype=torch.long)  # (b, width)
    for j, suffix in enumerate(batch):
        tokens[j, : len(suffix)] = torch.tensor(suffix)
    hidden = model.trunk(tokens.to(device), cache=cache)  # (b, width, dim)
    # The position predicting continuation token t of pair i is len(ctx) - 1 + t; several
    # pairs (the four MMLU letters) read the same position, whose logits are computed once.
    where: dict[tuple[int, int], int] = {}
    pos, targets = [], []
    for i, row in zip(idx, rows, strict=True):
        ctx, cont = pairs[i]
        for t, tok in enumerate(cont):
            key = (row, len(ctx) - 1 + t - P)
            pos.append(where.setdefault(key, len(where)))
            targets.append(tok)
    rows_t = torch.tensor([r for r, _ in where], device=device)
    cols_t = torch.tensor([c for _, c in where], device=device)
    logprobs = F.log_softmax(model.head(hidden[rows_t, cols_t]).float(), dim=-1)  # (U, V)
    pos_t = torch.tensor(pos, device=device)
    target_t = torch.tensor(targets, device=device)
    token_lp = logprobs[pos_t, target_t]  # (N,)
    hits = logprobs.argmax(dim=-1)[pos_t] == target_t  # (N,)
    out, offset = [], 0
    for i in idx:
        span = slice(offset, offset + len(pairs[i][1]))
        out.append((float(token_lp[span].sum()), bool(hits[span].all())))
        offset = span.stop
    return out


class PrefixScorer:
    """``generate.loglikelihood`` with shared prefixes computed once (see the module doc).

    Keeps the most recent prefix's cache (B=1: ~32 MB for a 700-token SmolLM2-135M prefix)
    so consecutive calls on one subject reuse it. For inference: the stored cache does not
    follow later weight updates.
    """

    def __init__(self, model: AFM, *, batch_size: int = 8, min_prefix: int = 32):
        self.model = model
        self.batch_size = batch_size
        self.min_prefix = min_prefix
        self.last: PrefixKV | None = None

    def loglikelihood(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        max_len = self.model.cfg.max_seq_len
        fits = [i for i, (c, x) in enumerate(pairs) if c and x and len(c) + len(x) - 1 <= max_len]
        families, _ = plan_families([pairs[i] for i in fits], self.min_prefix)
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for fam in families:
            members = [fits[m] for m in fam.members]
            ctx = pairs[members[0]][0]
            self.last = encode_prefix(self.model, ctx[: fam.prefix_len], reuse=self.last)
            scores = suffix_loglikelihood(
                self.model, self.last, [pairs[i] for i in members], batch_size=self.batch_size
            )
            for i, score in zip(members, scores, strict=True):
                results[i] = score
        rest = [i for i, r in enumerate(results) if r is None]  # too long, alone, or invalid
        if rest:
            plain = full_loglikelihood(
                self.model, [pairs[i] for i in rest], batch_size=self.batch_size
            )
            for i, score in zip(rest, plain, strict=True):
                results[i] = score
        return results  # type: ignore[return-value]

"""Batched generation and continuation log-likelihoods for ``models.afm.AFM``.

Works on token ids; text (chat templates, stop strings) is the backends' business and reaches
here only as a ``should_stop`` callback.

Speed on CPU comes from doing little per step: one preallocated ``KVCache`` for the whole run,
``torch.inference_mode``, fused projections in the model, logits only for the last position
of the prompt, no mask at all when a batch has no padding, decoding steps in a layout without
the token axis (``AFM.step``) with attention as two small matmuls (``models.kernels.attend``),
a vectorised argmax (``argmax_last``), and (opt-in, ``AFM.prepack``) weights prepacked for
oneDNN, whose CPU matmuls are 2-3x faster than torch's default for decoding on AMD EPYC. What
is left is memory traffic: a decoding step reads every weight once, so fp32 single-stream speed is
bounded by memory bandwidth (see benchmarks/generate_speed.py). Greedy decoding gets past
that bound by speculation (``Draft``): an int4 copy of the model proposes tokens and one
fp32 pass checks many of them, with the fp32 model's own tokens as the result. Batches big
enough to keep the CPU busy without it (8 prompts on 2 cores) decode plainly.
torch.compile was tried and not adopted: on the shared 2-core CPU it had not
finished compiling the 30-layer decoder after three minutes; compiling one block (reused by
all 30) took 20 s and made a draft step only 12% faster.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.afm import AFM, KVCache
from models.draft import Int4Draft
from models.kernels import argmax_last


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): argmax when temperature is 0, else nucleus
    sampling (Holtzman et al. 2019, arXiv:1904.09751) from softmax(logits / temperature)."""
    if temperature <= 0.0:
        return argmax_last(logits)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before
        # it already does. The top token always survives.
        sorted_p[(sorted_p.cumsum(dim=-1) - sorted_p) >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, extra: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Left-pad prompts to a common length T.

    Returns tokens (B, T); key_valid (B, T + extra) bool, False on padding, or None when no
    prompt needed padding; positions (B, T) counting from 0 at each prompt's first real token
    (what Hugging Face derives from the attention mask, so RoPE phases match it).
    """
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("every prompt needs at least one token")
    B, T = len(prompts), max(lengths)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    valid = torch.ones((B, T + extra), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        valid[i, : T - len(p)] = False
    positions = (valid[:, :T].cumsum(dim=-1) - 1).clamp(min=0)  # (B, T)
    return tokens, (valid if min(lengths) < T else None), positions


@dataclass
class Draft:
    """A draft model for speculative greedy decoding (``generate(..., draft=...)``), how much
    to draft, and a running tally of how often the target model agreed with it."""

    model: Int4Draft  # ``Int4Draft(target)``
    # Most rows one verification pass runs, prompts x (proposals + 1): from about 32 rows on,
    # CPU matmuls are compute-bound and more proposals stop being nearly free to check
    # (benchmarks/generate_speed.py). One prompt gets up to 31 proposals a pass, 4 get 7.
    rows: int = 32
    # Fewer proposals than this a pass and ``generate`` decodes plainly: with 8 prompts (3
    # proposals each) the draft's own steps cost what they save on a 2-core CPU (176 against
    # 175 tokens/s; 5 proposals: 155 against 173), with 4 prompts it gains 1.3x, with 2 2x.
    min_proposals: int = 4
    proposed: int = 0  # proposals made for rows still generating
    accepted: int = 0  # of those, proposals the target model kept

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def most_proposals(self, prompts: int) -> int:
        """Proposals per prompt a pass for a batch of ``prompts``; 0: don't speculate."""
        n = self.rows // prompts - 1
        return n if n >= self.min_proposals else 0


class _Outputs:
    """New tokens per row and which rows are finished: at a stop token (not kept), when
    ``should_stop(row, tokens)`` says so, or at ``max_new_tokens``. Tokens offered to a
    finished row are ignored, so decoding paths may offer more than a row keeps."""

    def __init__(
        self,
        rows: int,
        max_new_tokens: int,
        stop_token_ids: Collection[int],
        should_stop: Callable[[int, list[int]], bool] | None,
    ):
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.done = [False] * rows
        self.max_new_tokens, self.stop = max_new_tokens, set(stop_token_ids)
        self.should_stop = should_stop

    def add(self, row: int, token: int) -> None:
        if self.done[row]:
            return
        if token in self.stop:
            self.done[row] = True
            return
        out = self.tokens[row]
        out.append(token)
        asked = self.should_stop is not None and self.should_stop(row, out)
        self.done[row] = asked or len(out) >= self.max_new_tokens

    def room(self) -> int:
        """The most tokens any unfinished row may still take."""
        return max(
            (
                self.max_new_tokens - len(t)
                for t, d in zip(self.tokens, self.done, strict=True)
                if not d
            ),
            default=0,
        )


def prefill(
    model: AFM,
    prompts: Sequence[Sequence[int]],
    tokens: torch.Tensor,
    positions: torch.Tensor,
    cache: KVCache,
    key_valid: torch.Tensor | None,
    min_shared: int = 8,
) -> torch.Tensor:
    """Run the left-padded prompts (``left_pad``'s tokens, positions, key_valid) into the empty
    ``cache``; return each row's last hidden state (B, dim).

    When the prompts start with the same ``min_shared`` or more tokens (a system prompt, a
    chat template's header, few-shot exemplars), that shared part runs once (B = 1) and its
    keys/values are copied into every row's slots: keys/values at a position depend only on
    the tokens up to it, and RoPE positions count from each row's first real token, so they
    are the same in every row whatever its padding. Only the window from the earliest
    unshared slot on then runs for all rows (a row whose shared part reaches into that window
    recomputes those slots, to float rounding the values just copied). The benchmark's chat
    prompts share 24 of ~40 tokens: the prompt pass runs 156 rows instead of 336.
    """
    B, T = tokens.shape
    # At least one token per row stays unshared: its logits are needed.
    common = os.path.commonprefix([list(p) for p in prompts])
    shared = min(len(common), min(map(len, prompts)) - 1)
    if B == 1 or shared < min_shared:
        return model.trunk(tokens, positions, cache, key_valid)[:, -1]
    once = model.new_cache(1, shared)
    model.trunk(torch.tensor([list(prompts[0][:shared])], device=tokens.device), cache=once)
    pads = [T - len(p) for p in prompts]
    for row, pad in enumerate(pads):
        cache.k[:, row, :, pad : pad + shared] = once.k[:, 0]
        cache.v[:, row, :, pad : pad + shared] = once.v[:, 0]
    start = min(pads) + shared  # the earliest slot some row has not got yet
    cache.length = start
    window = (tokens[:, start:], positions[:, start:])
    return model.trunk(*window, cache, key_valid)[:, -1]


@torch.inference_mode()
def generate(
    model: AFM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_token_ids: Collection[int] = (),
    should_stop: Callable[[int, list[int]], bool] | None = None,
    pad_id: int = 0,
    seed: int | None = None,
    draft: Draft | None = None,
    share_prefix: bool = True,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) and return the new tokens per prompt.

    A row stops at a token in ``stop_token_ids`` (not included in its output), when
    ``should_stop(row, new_tokens)`` returns True (e.g. a stop string appeared), or after
    ``max_new_tokens``. Rows are left-padded into one batch; greedy results equal running each
    prompt alone (up to float rounding of batched matmuls).

    draft: makes greedy decoding speculative (see ``_speculate``): the same tokens (up to the
        same float rounding), from fewer passes over ``model``'s weights. Ignored when
        sampling. This call's proposals are added to its tally.
    share_prefix: run the prompts' common prefix once (``prefill``); False when rows differ in
        more than their tokens (a batch mixing LoRA adapters, ``models.adapters``).
    """
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    B = len(prompts)
    k = 0  # most proposals a row gets; verification writes up to k slots past the last kept
    if draft is not None and temperature <= 0.0:
        room = model.cfg.max_seq_len - max(map(len, prompts)) - max_new_tokens
        k = max(0, min(draft.most_proposals(B), room))
    tokens, key_valid, positions = left_pad(prompts, pad_id, max_new_tokens + k)
    device = model.device
    tokens, positions = tokens.to(device), positions.to(device)
    key_valid = key_valid.to(device) if key_valid is not None else None
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    out = _Outputs(B, max_new_tokens, stop_token_ids, should_stop)

    cache = model.new_cache(B, tokens.shape[1] + max_new_tokens + k)
    min_shared = 8 if share_prefix else model.cfg.max_seq_len + 1
    hidden = prefill(model, prompts, tokens, positions, cache, key_valid, min_shared)

    def pick(hidden: torch.Tensor) -> torch.Tensor:  # (B, dim) -> next tokens (B,)
        if temperature <= 0.0:
            return model.greedy(hidden)
        return sample_next(model.head(hidden), temperature, top_p, generator)

    next_tokens = pick(hidden)
    next_pos = positions[:, -1] + 1  # (B,)
    if draft is not None and k > 0:
        draft.model.refresh()
        _speculate(model, draft, k, cache, key_valid, next_tokens, next_pos, out)
        return out.tokens
    for step in range(max_new_tokens):
        for i, tok in enumerate(next_tokens.tolist()):
            out.add(i, tok)
        if all(out.done):
            break
        # Finished rows keep decoding their last token: cheaper than compacting the cache.
        next_tokens = pick(model.step(next_tokens, next_pos + step, cache, key_valid))
    return out.tokens


def _speculate(
    model: AFM,
    draft: Draft,
    k: int,
    cache: KVCache,
    key_valid: torch.Tensor | None,
    last: torch.Tensor,
    pos: torch.Tensor,
    out: _Outputs,
) -> None:
    """Greedy speculative decoding (Leviathan et al. 2023, arXiv:2211.17192; Chen et al. 2023,
    arXiv:2302.01318) after the prompt pass. ``last`` (B,): each row's first new token, at
    RoPE position ``pos`` (B,); ``cache`` holds the prompts.

    Each round the draft proposes n <= k tokens per row, one at a time; ``model`` then runs
    each row's last token and its n proposals in one pass, which costs little more than one
    decoding step while reading the weights dominates. A row keeps the proposals up to the
    first that differs from ``model``'s own argmax, then ``model``'s token at that point:
    exactly the tokens plain greedy decoding would produce, whatever the draft proposed.
    n follows the "heuristic" schedule of transformers' assisted generation: two more after
    a round in which every row kept every proposal, one fewer otherwise.

    The draft shares ``model``'s cache: it attends to ``model``'s exact keys/values for every
    token kept, and its own writes past them are overwritten by the verification pass. Rows
    keep different numbers of tokens, so after the first round the cache has per-row lengths.
    """
    B = last.shape[0]
    kept = torch.full((B,), cache.length, dtype=torch.long, device=last.device)  # (B,)
    for i, tok in enumerate(last.tolist()):
        out.add(i, tok)
    steps = torch.arange(k + 1, device=last.device)
    n = k
    while not all(out.done):
        n = min(n, out.room() - 1)  # proposals no row could keep are not worth drafting
        live = [not d for d in out.done]
        proposals = [last]
        cache.set_lengths(kept)
        for j in range(n):  # the draft's writes land in slots kept + j
            proposals.append(draft.model.step(proposals[-1], pos + j, cache, key_valid))
        inputs = torch.stack(proposals, dim=1)  # (B, n + 1): last token, then the proposals
        cache.set_lengths(kept)
        hidden = model.trunk(inputs, pos[:, None] + steps[: n + 1], cache, key_valid)
        greedy = model.greedy(hidden)  # (B, n + 1)
        # Proposals kept: the length of the prefix where draft and model agree.
        agree = (inputs[:, 1:] == greedy[:, :-1]).cumprod(dim=1).sum(dim=1)  # (B,)
        kept_all = True
        for i, (row, m) in enumerate(zip(greedy.tolist(), agree.tolist(), strict=True)):
            if live[i]:
                draft.proposed, draft.accepted = draft.proposed + n, draft.accepted + m
                kept_all &= m == n
            for tok in row[: m + 1]:
                out.add(i, tok)
        # Finished rows stay where they were, so the cache never outgrows its capacity.
        advance = torch.where(torch.tensor(out.done, device=last.device), 0, agree + 1)
        kept, pos = kept + advance, pos + advance
        last = greedy.gather(1, agree[:, None]).squeeze(1)  # (B,)
        n = min(k, n + 2) if kept_all else max(1, n - 1)


@torch.inference_mode()
def loglikelihood(
    model: AFM, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 8
) -> list[tuple[float, bool]]:
    """For each (context, continuation) token-id pair: the summed log-probability of the
    continuation given the context, and whether greedy decoding would have produced exactly
    the continuation (lm-evaluation-harness ``loglikelihood`` semantics).

    Sequences longer than ``max_seq_len`` keep their last ``max_seq_len`` tokens of input, as
    lm-eval does. Pairs are run longest-first so each batch pads little; right padding needs no
    mask because causal attention never looks ahead.
    """
    max_len = model.cfg.max_seq_len
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise ValueError(
                "context and continuation both need at least one token "
                "(use BOS/EOS as the context of an unconditional score)"
            )
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    device = model.device
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        inputs, targets = [], []
        for i in idx:
            ctx, cont = pairs[i]
            seq = (list(ctx) + list(cont))[-(max_len + 1) :]
            inputs.append(seq[:-1])
            targets.append(list(cont))
        width = max(len(x) for x in inputs)
        tokens = torch.zeros((len(idx), width), dtype=torch.long)
        for r, x in enumerate(inputs):
            tokens[r, : len(x)] = torch.tensor(x)
        hidden = model.trunk(tokens.to(device))  # (b, width, dim)
        # Gather only the positions that predict continuation tokens, then project those.
        rows = [r for r, t in enumerate(targets) for _ in t]
        cols = [len(inputs[r]) - len(t) + j for r, t in enumerate(targets) for j in range(len(t))]
        logprobs = F.log_softmax(model.head(hidden[rows, cols]).float(), dim=-1)  # (N, V)
        flat_targets = torch.tensor([tok for t in targets for tok in t], device=device)
        token_lp = logprobs.gather(-1, flat_targets[:, None]).squeeze(-1)  # (N,)
        hits = logprobs.argmax(dim=-1) == flat_targets  # (N,)
        offset = 0
        for r, t in enumerate(targets):
            span = slice(offset, offset + len(t))
            results[idx[r]] = (float(token_lp[span].sum()), bool(hits[span].all()))
            offset += len(t)
    return results


@dataclass(frozen=True)
class EchoScores:
    """A sequence's tokens scored by the model (OpenAI's ``echo`` with ``logprobs``):
    ``logprobs[i]`` and ``top[i]`` are for token i + 1 given the tokens before it (token 0 has
    no context), ``next`` the greedy token after the whole sequence with its log-prob and top."""

    logprobs: list[float]  # (T - 1,)
    top: list[list[tuple[int, float]]]  # (T - 1, k) most likely first
    next: tuple[int, float, list[tuple[int, float]]]


class EchoMemo:
    """The last sequence ``echo_scores`` ran, with its keys/values, hidden states and scores,
    so that the next sequence sharing its beginning runs only the tokens after the shared part.
    lm-evaluation-harness's ``local-completions`` client scores a multiple-choice question as one
    request per choice, each the whole few-shot context again: with a memo the context runs once
    per subject, each question's own text once, and each choice's one or two tokens.
    Not thread-safe: one per model, used by the thread that owns the model."""

    def __init__(self, block: int = 512) -> None:
        self.block = block
        self.ids: list[int] = []
        self.top_k = 0
        self.cache: KVCache | None = None
        self.hidden: torch.Tensor | None = None  # (T, dim)
        self.logprobs: list[float] = []  # (T - 1,)
        self.top: list[list[tuple[int, float]]] = []  # (T - 1, k)

    def shared(self, seq: Sequence[int], top_k: int) -> int:
        """How many leading tokens of ``seq`` the memo holds (0 if its scores are of another k)."""
        if self.cache is None or top_k != self.top_k:
            return 0
        return len(os.path.commonprefix([self.ids, list(seq)]))


@torch.inference_mode()
def echo_scores(
    model: AFM,
    seqs: Sequence[Sequence[int]],
    *,
    top: int = 1,
    batch_tokens: int = 4096,
    memo: EchoMemo | None = None,
) -> list[EchoScores]:
    """Every token's log-probability given the tokens before it, for each sequence of token
    ids, and the ``top`` most likely tokens at each position: what lm-evaluation-harness's
    ``local-completions`` client reads from ``echo`` + ``logprobs`` to score a continuation.

    Sequences run longest first, right-padded (causal attention never looks ahead, so padding
    needs no mask) in batches of about ``batch_tokens`` tokens; log-softmax runs one sequence at
    a time so memory stays at one (T, vocab) block. With a ``memo`` (``EchoMemo``) they run one
    at a time instead, each reusing what it shares with the one before.
    """
    for seq in seqs:
        if not seq or len(seq) > model.cfg.max_seq_len:
            raise ValueError(
                f"a sequence needs 1 to {model.cfg.max_seq_len} tokens, got {len(seq)}"
            )
    if memo is not None:
        return [_echo_with_memo(model, list(seq), max(1, top), memo) for seq in seqs]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    results: list[EchoScores | None] = [None] * len(seqs)
    device = model.device
    b = 0
    while b < len(order):
        width = len(seqs[order[b]])
        n = max(1, batch_tokens // width)
        idx = order[b : b + n]
        b += len(idx)
        tokens = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            tokens[r, : len(seqs[i])] = torch.tensor(list(seqs[i]))
        hidden = model.trunk(tokens.to(device))  # (b, width, dim)
        for r, i in enumerate(idx):
            T = len(seqs[i])
            logprobs = F.log_softmax(model.head(hidden[r, :T]).float(), dim=-1)  # (T, V)
            targets = tokens[r, 1:T].to(device)  # (T - 1,)
            own = logprobs[:-1].gather(-1, targets[:, None]).squeeze(-1)  # (T - 1,)
            k = max(1, top)
            values, ids = logprobs.topk(k, dim=-1)  # (T, k)
            pairs = [
                list(zip(a, v, strict=True))
                for a, v in zip(ids.tolist(), values.tolist(), strict=True)
            ]
            best = pairs[-1][0]
            results[i] = EchoScores(
                logprobs=own.tolist(),
                top=pairs[:-1] if top > 0 else [[] for _ in range(T - 1)],
                next=(best[0], best[1], pairs[-1] if top > 0 else []),
            )
    return results  # type: ignore[return-value]


def _echo_with_memo(model: AFM, seq: list[int], k: int, memo: EchoMemo) -> EchoScores:
    """``echo_scores`` of one sequence, running only the tokens after what ``memo`` shares
    with it; the memo then holds this sequence. Scores of tokens 1..p-1 were made at positions
    before p, which see only shared tokens, so they are reused as they are."""
    T, p = len(seq), memo.shared(seq, k)
    device = model.device
    cache = memo.cache
    if cache is None or cache.capacity < T:
        capacity = min(model.cfg.max_seq_len, -(-T // memo.block) * memo.block)
        fresh = model.new_cache(1, capacity)
        if cache is not None and p:
            fresh.k[:, :, :, :p], fresh.v[:, :, :, :p] = cache.k[:, :, :, :p], cache.v[:, :, :, :p]
        cache = fresh
    cache.length, cache.lengths = p, None
    if p < T:
        new = model.trunk(torch.tensor([seq[p:]], device=device), cache=cache)[0]  # (T - p, dim)
        old = memo.hidden[:p] if memo.hidden is not None and p else new[:0]
        hidden = torch.cat([old, new])  # (T, dim)
    else:
        assert memo.hidden is not None
        hidden = memo.hidden[:T]
    start = max(p - 1, 0)  # positions from here on predict tokens not scored yet (and the next)
    logprobs = F.log_softmax(model.head(hidden[start:]).float(), dim=-1)  # (T - start, V)
    targets = torch.tensor(seq[start + 1 :], device=device)  # (T - start - 1,)
    own = logprobs[:-1].gather(-1, targets[:, None]).squeeze(-1).tolist()
    values, ids = logprobs.topk(k, dim=-1)  # (T - start, k)
    pairs = [
        list(zip(a, v, strict=True)) for a, v in zip(ids.tolist(), values.tolist(), strict=True)
    ]
    memo.ids, memo.top_k, memo.cache, memo.hidden = seq, k, cache, hidden
    memo.logprobs = memo.logprobs[:start] + own
    memo.top = memo.top[:start] + pairs[:-1]
    best = pairs[-1][0]
    return EchoScores(list(memo.logprobs), list(memo.top), (best[0], best[1], pairs[-1]))

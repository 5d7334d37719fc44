"""Continuous batching for ``models.afm.AFM``: requests decode together, and new requests join
the running batch between decoding steps instead of waiting for it to finish (iteration-level
scheduling, Yu et al., "Orca", OSDI 2022; the scheduler of vLLM and TGI).

    engine = Engine(model, pad_id=tok.pad_token_id)
    request = engine.submit(Request(tok.encode(prompt), max_new_tokens=64))
    for token in request.tokens():          # as they are decoded; or request.result()
        ...

One thread (the engine's) owns the model: it admits waiting requests (one prompt pass for all
of them, ``models.generate.prefill``), runs one decoding step for every live row, hands each
request its new token, and retires finished rows. Anything else that needs the model (scoring
prompts, ``Engine.call``) runs on the same thread between steps, so nothing else ever touches
the weights concurrently.

The key/value cache is one pool of rows. Live rows are packed at the front and each keeps its
prompt from slot 0 with its own length (``KVCache.lengths``; attention hides every row's slots
past its own), so a row's slot index is its RoPE position and no row is ever padded. A
finished row is replaced by the last live row (one row's slots copied), and the pool grows in
``block``-token steps only when a request needs more room, so memory follows the live work.

Greedy rows give the same tokens as ``models.generate.generate`` on the prompt alone, up to the
float rounding of batched matmuls. A sampled row draws from its own generator seeded by its
request, so its tokens do not depend on who else is in the batch.

A lone greedy row (nothing else running or waiting) decodes by speculation when the engine has
a ``draft`` (``models.generate.Draft`` over the int4 copy): each round the draft proposes up to
k tokens and one pass of the model keeps those it would have picked itself, so the tokens are
the same and a single client gets the 1.5-2x of ``generate``'s speculative path; a round is one
engine iteration, so a request that arrives meanwhile joins at the next. Not done here: chunked
prefill (a long prompt's pass delays the other rows' next step by its length).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from models.afm import AFM, KVCache
from models.generate import Draft, left_pad, prefill, sample_next

# Routing of per-row LoRA adapters (``BuiltinBackend.routing``): rows' adapter names -> context.
Routing = Callable[[Sequence[str | None]], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class Token:
    """One new token; ``logprob`` and ``top`` (the most likely tokens with their log-probs,
    most likely first) are filled when the request asked for log-probs."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


class EngineError(Exception):
    """The engine failed the request (the model raised, or the engine closed)."""


class Request:
    """One prompt (token ids) to continue. Stops at a token in ``stop_token_ids`` (not kept),
    when ``should_stop(new_ids)`` says so (a stop string appeared), or at ``max_new_tokens``.

    logprobs: also report each new token's log-prob and the ``logprobs`` most likely
        alternatives (0: the token's own log-prob only); None: no log-probs (faster greedy).
    adapter: the LoRA adapter the row runs with (``BuiltinBackend.routing``), None for the base.
    """

    def __init__(
        self,
        prompt: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Collection[int] = (),
        should_stop: Callable[[list[int]], bool] | None = None,
        logprobs: int | None = None,
        adapter: str | None = None,
    ):
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        self.prompt = list(prompt)
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.seed, self.stop_token_ids = seed, frozenset(stop_token_ids)
        self.should_stop, self.logprobs, self.adapter = should_stop, logprobs, adapter
        self.new_ids: list[int] = []
        self.finish_reason: str | None = None  # "stop" or "length" once finished
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.cancelled = False
        self._events: queue.SimpleQueue = queue.SimpleQueue()

    @property
    def sampling(self) -> bool:
        return self.temperature > 0.0

    def cancel(self) -> None:
        """Stop decoding this request (its client went away); the engine drops its row."""
        self.cancelled = True

    def tokens(self, timeout: float | None = None) -> Iterator[Token]:
        """The new tokens as they are decoded; ends when the request finishes. Raises
        ``EngineError`` if the engine failed it, ``queue.Empty`` after ``timeout`` s of
        silence."""
        while True:
            event = self._events.get(timeout=timeout)
            if isinstance(event, Token):
                yield event
            elif isinstance(event, BaseException):
                raise EngineError(str(event)) from event
            else:
                return

    def result(self, timeout: float | None = None) -> list[Token]:
        return list(self.tokens(timeout))

    # The engine thread's side.
    def _offer(self, token: Token) -> bool:
        """Take a decoded token; True when the request is finished."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if token.id in self.stop_token_ids:
            return self._finish("stop")
        self.new_ids.append(token.id)
        self._events.put(token)
        if self.should_stop is not None and self.should_stop(self.new_ids):
            return self._finish("stop")
        if len(self.new_ids) >= self.max_new_tokens:
            return self._finish("length")
        return False

    def _finish(self, reason: str) -> bool:
        self.finish_reason = reason
        self._events.put(None)
        return True

    def _fail(self, error: BaseException) -> None:
        if self.finish_reason is None:
            self.finish_reason = "error"
            self._events.put(error)


@dataclass
class _Row:
    request: Request
    length: int  # filled cache slots = the RoPE position of the next token fed
    last: int = 0  # the token to feed at the next step
    generator: torch.Generator | None = field(default=None, repr=False)
    proposals: int = 0  # speculation: proposals to draft next round (0: not started)


@dataclass
class EngineStats:
    requests: int = 0  # submitted
    finished: int = 0
    tokens: int = 0  # new tokens decoded
    steps: int = 0  # decoding steps
    prefills: int = 0  # prompt passes (one per admitted group)
    rows_stepped: int = 0  # sum over steps of the rows decoded: rows_stepped / steps = batch


class Engine:
    """Continuous batching over ``model`` on a thread of its own (see the module docstring).

    max_batch: most rows decoded together; further requests wait in arrival order.
    pad_id: the token that pads prompts of unequal length in a prompt pass.
    routing: ``BuiltinBackend.routing``, for requests that name LoRA adapters.
    block: the cache grows in steps of this many slots.
    draft: speculative decoding for a lone greedy row (``Draft(Int4Draft(model))``, CPU).
    """

    def __init__(
        self,
        model: AFM,
        *,
        max_batch: int = 16,
        pad_id: int = 0,
        routing: Routing | None = None,
        block: int = 256,
        draft: Draft | None = None,
    ):
        self.model, self.max_batch, self.pad_id, self.block = model, max_batch, pad_id, block
        self.draft = draft
        if draft is not None:
            draft.model.refresh()
        self.routing: Routing = routing or (lambda adapters: contextlib.nullcontext())
        self.stats = EngineStats()
        self._waiting: deque[Request] = deque()
        self._calls: deque[tuple[Callable, Future]] = deque()
        self._rows: list[_Row] = []
        self._cache: KVCache | None = None
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def cache_bytes(self) -> int:
        cache = self._cache
        return 0 if cache is None else 2 * cache.k.numel() * cache.k.element_size()

    def submit(self, request: Request) -> Request:
        """Queue ``request``; it joins the running batch at the next step with room for it."""
        room = self.model.cfg.max_seq_len - len(request.prompt)
        if request.max_new_tokens > room:
            raise ValueError(
                f"the prompt has {len(request.prompt)} tokens and asks for "
                f"{request.max_new_tokens} more: the model's context is "
                f"{self.model.cfg.max_seq_len} tokens"
            )
        self.stats.requests += 1
        if request.max_new_tokens <= 0:
            request._finish("length")
            return request
        with self._wake:
            if self._closed:
                raise EngineError("the engine is closed")
            self._waiting.append(request)
            self._wake.notify()
        return request

    def call(self, fn: Callable[[AFM], object]) -> object:
        """Run ``fn(model)`` on the engine's thread between two decoding steps and return
        what it returns (prompt scoring goes through here)."""
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise EngineError("the engine is closed")
            self._calls.append((fn, future))
            self._wake.notify()
        return future.result()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # The engine thread.
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._closed or self._waiting or self._calls or self._rows):
                    self._cache = None  # idle: give the cache's memory back
                    self._wake.wait()
                if self._closed:
                    break
                calls = list(self._calls)
                self._calls.clear()
                room = self.max_batch - len(self._rows)
                joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            for fn, future in calls:
                try:
                    with torch.inference_mode():
                        future.set_result(fn(self.model))
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)
            try:
                with torch.inference_mode():
                    joining = [r for r in joining if not r.cancelled]
                    if joining:
                        self._admit(joining)
                    if self._speculating():
                        self._speculate()
                    elif self._rows:
                        self._step()
            except Exception as exc:  # noqa: BLE001 - fails the work in flight, not the engine
                for request in [*joining, *(row.request for row in self._rows)]:
                    request._fail(exc)
                self._rows, self._cache = [], None
        error = EngineError("the engine is closed")
        for request in [*self._waiting, *(row.request for row in self._rows)]:
            request._fail(error)
        for _, future in self._calls:
            future.set_exception(error)

    def _admit(self, joining: list[Request]) -> None:
        """One prompt pass for the joining requests, their keys/values moved into free rows of
        the pool, and each one's first new token."""
        prompts = [r.prompt for r in joining]
        self._reserve(
            len(self._rows) + len(joining),
            [len(p) + r.max_new_tokens for p, r in zip(prompts, joining, strict=True)],
        )
        device = self.model.device
        tokens, key_valid, positions = left_pad(prompts, self.pad_id, 0)
        T = tokens.shape[1]
        scratch = self.model.new_cache(len(joining), T)
        adapters = [r.adapter for r in joining]
        one_adapter = len(set(adapters)) == 1
        with self.routing(adapters):
            hidden = prefill(
                self.model,
                prompts,
                tokens.to(device),
                positions.to(device),
                scratch,
                key_valid.to(device) if key_valid is not None else None,
                min_shared=8 if one_adapter else self.model.cfg.max_seq_len + 1,
            )  # (J, dim)
        assert self._cache is not None
        rows = []
        for j, request in enumerate(joining):
            b, n = len(self._rows), len(request.prompt)
            self._cache.k[:, b, :, :n] = scratch.k[:, j, :, T - n : T]
            self._cache.v[:, b, :, :n] = scratch.v[:, j, :, T - n : T]
            generator = None
            if request.sampling:
                generator = torch.Generator(device=device)
                if request.seed is not None:
                    generator.manual_seed(request.seed)
                else:
                    generator.seed()
            row = _Row(request, length=n, generator=generator)
            self._rows.append(row)
            rows.append(row)
        self.stats.prefills += 1
        self._emit(rows, hidden)

    def _step(self) -> None:
        """One decoding step for every live row."""
        rows = self._rows
        assert self._cache is not None
        device = self.model.device
        cache = self._cache.rows(len(rows))
        lengths = torch.tensor([r.length for r in rows], device=device)  # (B,)
        cache.set_lengths(lengths)
        last = torch.tensor([r.last for r in rows], device=device)  # (B,)
        with self.routing([r.request.adapter for r in rows]):
            hidden = self.model.step(last, lengths, cache)  # (B, dim)
        for row in rows:
            row.length += 1
        self.stats.steps += 1
        self.stats.rows_stepped += len(rows)
        self._emit(rows, hidden)

    def _speculating(self) -> bool:
        """One greedy row without log-probs, nobody waiting, and a draft to propose with."""
        if self.draft is None or len(self._rows) != 1 or self._waiting:
            return False
        r = self._rows[0].request
        return not r.sampling and r.logprobs is None

    def _speculate(self) -> None:
        """One round of greedy speculative decoding for the lone row (``models.generate``'s
        ``_speculate``, one round at a time): the draft proposes n tokens, one model pass over
        the row's last token and the proposals keeps the agreeing prefix and the model's own
        next token. n grows by two after a round that kept all, shrinks by one otherwise."""
        assert self._cache is not None and self.draft is not None
        row = self._rows[0]
        request, draft = row.request, self.draft
        k = draft.most_proposals(1)
        room = request.max_new_tokens - len(request.new_ids)  # tokens it may still take
        n = min(row.proposals or k, room - 1, self._cache.capacity - row.length - 1)
        if n < 1:
            return self._step()
        device = self.model.device
        cache = self._cache.rows(1)
        cache.length, cache.lengths = row.length, None
        pos = torch.tensor([row.length], device=device)  # (1,)
        proposals = [torch.tensor([row.last], device=device)]
        for j in range(n):  # the draft's writes land in slots length + j
            proposals.append(draft.model.step(proposals[-1], pos + j, cache))
        inputs = torch.stack(proposals, dim=1)  # (1, n + 1)
        cache.length = row.length
        with self.routing([request.adapter]):
            hidden = self.model.trunk(
                inputs, pos[:, None] + torch.arange(n + 1, device=device), cache
            )
        greedy = self.model.greedy(hidden)[0]  # (n + 1,)
        agree = int((inputs[0, 1:] == greedy[:-1]).cumprod(0).sum())
        draft.proposed, draft.accepted = draft.proposed + n, draft.accepted + agree
        row.proposals = min(k, n + 2) if agree == n else max(1, n - 1)
        row.length += agree + 1
        row.last = int(greedy[agree])
        self.stats.steps += 1
        self.stats.rows_stepped += 1
        finished = False
        for token_id in greedy[: agree + 1].tolist():
            self.stats.tokens += 1
            if request.cancelled or request._offer(Token(token_id)):
                finished = True
                break
        if finished:
            self._retire(0)
            self.stats.finished += 1

    def _emit(self, rows: list[_Row], hidden: torch.Tensor) -> None:
        """Pick each row's next token from its hidden state (B, dim), hand it over, and retire
        rows that finished or were cancelled."""
        plain = all(not r.request.sampling and r.request.logprobs is None for r in rows)
        if plain:
            picked = self.model.greedy(hidden).tolist()
        else:
            logits = self.model.head(hidden).float()  # (B, V)
            picked = []
            for i, row in enumerate(rows):
                r = row.request
                if r.sampling:
                    picked.append(
                        int(sample_next(logits[i : i + 1], r.temperature, r.top_p, row.generator))
                    )
                else:
                    picked.append(int(logits[i].argmax()))
        done = []
        for i, (row, token_id) in enumerate(zip(rows, picked, strict=True)):
            token = Token(token_id)
            if row.request.logprobs is not None:
                token = _with_logprobs(token_id, logits[i], row.request.logprobs)
            row.last = token_id
            self.stats.tokens += 1
            if row.request.cancelled or row.request._offer(token):
                done.append(i)
        for i in reversed(done):  # descending, so a row moved into a gap is never a finished one
            self._retire(i)
        self.stats.finished += len(done)

    def _retire(self, i: int) -> None:
        """Drop row i: the last live row takes its place in the pool."""
        last = len(self._rows) - 1
        if i != last:
            assert self._cache is not None
            n = self._rows[last].length
            self._cache.k[:, i, :, :n] = self._cache.k[:, last, :, :n]
            self._cache.v[:, i, :, :n] = self._cache.v[:, last, :, :n]
            self._rows[i] = self._rows[last]
        self._rows.pop()

    def _reserve(self, rows: int, joining_needs: list[int]) -> None:
        """Make the pool hold ``rows`` rows and every row's whole request: reallocate (rows
        rounded up to a power of two, slots to ``block``) and copy the live rows over when it
        is too small."""
        need = max(
            [r.length + r.request.max_new_tokens - len(r.request.new_ids) for r in self._rows]
            + joining_needs
        )
        cache = self._cache
        if cache is not None and cache.k.shape[1] >= rows and cache.capacity >= need:
            return
        n_rows = max(4, 1 << (rows - 1).bit_length())
        capacity = min(self.model.cfg.max_seq_len, -(-need // self.block) * self.block)
        if cache is not None:
            n_rows = max(n_rows, cache.k.shape[1])
            capacity = max(capacity, cache.capacity)
        pool = self.model.new_cache(min(n_rows, max(self.max_batch, 1)), capacity)
        if cache is not None:
            for b, row in enumerate(self._rows):
                pool.k[:, b, :, : row.length] = cache.k[:, b, :, : row.length]
                pool.v[:, b, :, : row.length] = cache.v[:, b, :, : row.length]
        self._cache = pool


def _with_logprobs(token_id: int, logits: torch.Tensor, top: int) -> Token:
    logprobs = F.log_softmax(logits, dim=-1)  # (V,)
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, ids = logprobs.topk(top)
        best = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return Token(token_id, float(logprobs[token_id]), best)

"""Run a suite against a backend: batch its requests, score, aggregate, resume.

The backend is duck-typed (`Backend` below); the local PyTorch models, an HTTP client or a
test double all fit. The runner is synchronous and keeps no state between calls: a caller that
persists results (the Django job) passes the ids it already has as `done_ids` to resume, and
receives every finished batch through `progress` so it can store results as they arrive.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from models.backends.base import TokenBackend, degenerate
from suites.base import (
    GenerateRequest,
    GenerationArgs,
    Loglikelihood,
    LoglikelihoodRequest,
    Message,
    Request,
    SampleResult,
    Suite,
    stratified_sample,
)


class Backend(Protocol):
    """What a model must offer. Outputs come back in the order of the inputs."""

    def generate(self, prompts: list[str], args: GenerationArgs) -> list[str]:
        """Continuations of each prompt, cut before the first stop string."""
        ...

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(log P(continuation | context), continuation is the greedy decode) per pair."""
        ...

    def chat_format(self, messages: Sequence[Message]) -> str:
        """The model's chat template applied to messages, ending with the assistant prompt."""
        ...


Progress = Callable[[list[SampleResult], int, int], None]  # (new results, done, total)
# Tokens generated so far in the batch being answered (called as they come, for long batches).
TokenProgress = Callable[[int], None]


@dataclass
class RunResult:
    """Results of the examples scored in this call, and aggregates over exactly those."""

    samples: list[SampleResult]
    metrics: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


def run_suite(
    suite: Suite[Any],
    backend: Backend,
    limit: int | None = None,
    progress: Progress | None = None,
    done_ids: Collection[str] = frozenset(),
    batch_size: int = 16,
    shard: tuple[int, int] | None = None,
    seed: int = 0,
    tokens: TokenProgress | None = None,
) -> RunResult:
    """Score `limit` examples of `suite` drawn with `seed` (`Suite.sample`: stratified by
    category, not the first N; every example when `limit` is None), skipping ids in
    `done_ids`. `meta` says how many the suite has and whether the sample is all of them.

    `batch_size` counts examples; all requests of a batch go to the backend in one call, in
    suite order (MMLU keeps a subject's shared prefix together). On resume, `metrics` covers
    only the newly scored samples: for the whole run call `suite.aggregate(stored + new)`.
    `shard=(k, n)` scores only the examples whose position i satisfies i % n == k, so n workers
    can split one run; MMLU subjects still reach each shard in order. `tokens` hears how
    many tokens the batch being answered has generated so far (backends that report them).

    Where the suite's generation args say ``stop_on_repetition``, an answer that ended in a
    loop (``models.backends.base.degenerate``) is marked ``details["stopped"] =
    "repetition"``, and ``meta["stopped_repeating"]`` counts them.
    """
    pool = suite.examples()
    chosen = stratified_sample(pool, limit, seed, suite.category_of)
    examples = [
        ex
        for i, ex in enumerate(chosen)
        if ex.id not in done_ids and (shard is None or i % shard[1] == shard[0])
    ]
    samples: list[SampleResult] = []
    looped = 0
    started = time.monotonic()
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        requests = [suite.requests(ex) for ex in batch]
        outputs = _answer(backend, [r for reqs in requests for r in reqs], suite, tokens)
        scored = []
        for ex, reqs in zip(batch, requests, strict=True):
            result = suite.score(ex, outputs[: len(reqs)])
            if _looped(suite, outputs[: len(reqs)]):
                result.details["stopped"] = "repetition"
                looped += 1
            scored.append(result)
            outputs = outputs[len(reqs) :]
        samples.extend(scored)
        if progress is not None:
            progress(scored, len(samples), len(examples))
    meta = {
        **suite.describe(),
        "backend": type(backend).__name__,
        "batch_size": batch_size,
        "limit": limit,
        "seed": seed,
        "sample_size": len(chosen),
        "suite_size": len(pool),
        "complete": len(chosen) == len(pool),
        "skipped": len(done_ids),
        "seconds": time.monotonic() - started,
        "stopped_repeating": looped,
    }
    return RunResult(samples, suite.aggregate(samples), meta)


def _looped(suite: Suite[Any], outputs: Sequence[Any]) -> bool:
    args = suite.spec.generation
    return bool(args is not None and args.stop_on_repetition) and any(
        isinstance(o, str) and degenerate(o) for o in outputs
    )


def _answer(
    backend: Backend, requests: list[Request], suite: Suite[Any], tokens: TokenProgress | None
) -> list[Any]:
    """Send generation and log-likelihood requests in one call each; keep the input order."""
    gen = [(i, r) for i, r in enumerate(requests) if isinstance(r, GenerateRequest)]
    ll = [(i, r) for i, r in enumerate(requests) if isinstance(r, LoglikelihoodRequest)]
    out: list[Any] = [None] * len(requests)
    if gen:
        args = suite.spec.generation
        if args is None:
            raise ValueError(
                f"suite {suite.name} makes generate requests but has no spec.generation"
            )
        prompts = [_prompt_text(backend, r) for _, r in gen]
        if tokens is not None and isinstance(backend, TokenBackend):
            made = 0

            def on_token() -> None:
                nonlocal made
                made += 1
                if made % 64 == 0:  # often enough for a live page, rarely enough to be free
                    tokens(made)

            texts = _checked(backend.generate(prompts, args, on_token), len(gen))
        else:
            texts = _checked(backend.generate(prompts, args), len(gen))
        for (i, _), text in zip(gen, texts, strict=True):
            out[i] = text
    if ll:
        scores = _checked(
            backend.loglikelihood([(r.context, r.continuation) for _, r in ll]), len(ll)
        )
        for (i, _), (logprob, greedy) in zip(ll, scores, strict=True):
            out[i] = Loglikelihood(float(logprob), bool(greedy))
    return out


def _prompt_text(backend: Backend, request: GenerateRequest) -> str:
    if request.messages is not None:
        return backend.chat_format(request.messages)
    assert request.prompt is not None  # GenerateRequest guarantees exactly one
    return request.prompt


def _checked(outputs: list[Any], expected: int) -> list[Any]:
    if len(outputs) != expected:
        raise RuntimeError(f"backend returned {len(outputs)} outputs for {expected} inputs")
    return outputs

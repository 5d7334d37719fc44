"""Backend for an OpenAI-compatible HTTP server (vLLM, llama.cpp server, TGI, OpenAI).

Uses the legacy ``/completions`` endpoint because evaluation needs the raw prompt under our
control (chat formatting is recorded with results) and log-likelihoods, which only that
endpoint offers (``echo`` + ``logprobs``, the method of lm-eval's ``local-completions``).

Reliability: every request has a timeout; connection errors, timeouts, 429 and 5xx answers are
retried with exponential backoff (honouring ``Retry-After``); other 4xx answers fail at once
because repeating them cannot help. At most ``concurrency`` requests are in flight.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import httpx

from models.backends.base import BackendError, GenerationArgs, cut_at_stop

if TYPE_CHECKING:
    from models.tokenizer import TextTokenizer


class OpenAIHTTPBackend:
    """``location`` is the API base URL, e.g. ``http://127.0.0.1:8000/v1``.

    model: the model name the server expects.
    api_key: bearer token; defaults to the OPENAI_API_KEY environment variable, if set.
    timeout: seconds per request (connect, read, write, pool).
    max_retries: extra attempts after the first for retryable failures.
    backoff: first retry delay in seconds, doubled each attempt up to ``max_backoff``.
    concurrency: maximum simultaneous requests.
    chat_template_from: checkpoint or tokenizer directory whose chat template formats
        messages; the server's own template is not visible through /completions.
    extra_body: fields added to every request body (EvalHub's inference server reads which
        model to load from one).
    """

    def __init__(
        self,
        location: str,
        *,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        concurrency: int = 4,
        chat_template_from: str | os.PathLike | None = None,
        transport: httpx.BaseTransport | None = None,
        extra_body: dict | None = None,
    ):
        self.base_url = location.rstrip("/")
        self.model = model
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.concurrency = concurrency
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            headers=headers,
            transport=transport,
            limits=httpx.Limits(max_connections=concurrency),
        )
        self._chat_template_from = chat_template_from
        self.extra_body = dict(extra_body or {})
        self._tokenizer: TextTokenizer | None = None

    # ------------------------------------------------------------------------- transport
    def _post(self, path: str, body: dict) -> dict:
        error, retry_after = "", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self._delay(attempt, retry_after))
                retry_after = None
            try:
                response = self._client.post(path, json={**body, **self.extra_body})
            except httpx.TransportError as e:  # connect/read/write errors and timeouts
                error = f"{type(e).__name__}: {e}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                error = f"HTTP {response.status_code}"
                retry_after = response.headers.get("Retry-After")
                continue
            if response.is_redirect:  # re-sending a POST elsewhere is not ours to decide
                raise BackendError(
                    f"{self.base_url}{path}: HTTP {response.status_code} redirect to "
                    f"{response.headers.get('Location')!r}; configure that URL instead"
                )
            if response.is_error:
                raise BackendError(
                    f"{self.base_url}{path}: HTTP {response.status_code}: {response.text[:300]}"
                )
            try:
                return response.json()
            except ValueError as e:
                raise BackendError(f"{self.base_url}{path}: answer is not JSON ({e})") from e
        raise BackendError(
            f"{self.base_url}{path}: giving up after {self.max_retries + 1} "
            f"attempts; last error: {error}"
        )

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.max_backoff, float(retry_after))
            except ValueError:
                pass  # an HTTP-date: fall back to our own schedule
        # Exponential backoff with +-25% jitter so parallel workers do not retry in lockstep.
        base = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return base * random.uniform(0.75, 1.25)

    def _map(self, fn, items: Sequence) -> list:
        if self.concurrency <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, items))

    # --------------------------------------------------------------------------- protocol
    def generate(self, prompts: Sequence[str], args: GenerationArgs) -> list[str]:
        def one(prompt: str) -> str:
            body = {
                "model": self.model,
                "prompt": prompt,
                "max_tokens": args.max_new_tokens,
                "temperature": args.temperature,
                "top_p": args.top_p,
                "seed": args.seed,
            }
            if args.stop:
                body["stop"] = list(args.stop)
            answer = self._post("/completions", body)
            try:
                text = answer["choices"][0]["text"]
            except (KeyError, IndexError, TypeError) as e:
                raise BackendError(f"{self.base_url}: malformed completion {answer!r:.300}") from e
            return cut_at_stop(text, args.stop)  # servers differ in honouring "stop"

        return self._map(one, list(prompts))

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        def one(pair: tuple[str, str]) -> tuple[float, bool]:
            context, continuation = pair
            body = {
                "model": self.model,
                "prompt": context + continuation,
                "max_tokens": 0,
                "echo": True,
                "logprobs": 1,
                "temperature": 0.0,
            }
            answer = self._post("/completions", body)
            try:
                lp = answer["choices"][0]["logprobs"]
                return score_echo(
                    lp["tokens"],
                    lp["token_logprobs"],
                    lp["top_logprobs"],
                    lp["text_offset"],
                    len(context),
                )
            except (KeyError, IndexError, TypeError) as e:
                raise BackendError(
                    f"{self.base_url}: no echoed logprobs in answer "
                    f"({e!r}); does the server support echo?"
                ) from e

        return self._map(one, list(pairs))

    def chat_format(self, messages: list[dict]) -> str:
        if self._chat_template_from is None:
            raise BackendError(
                "openai_http needs chat_template_from=<checkpoint or tokenizer "
                "dir> to format chat prompts for /completions"
            )
        if self._tokenizer is None:
            from models.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self._chat_template_from)
        return self._tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def info(self) -> dict:
        return {
            "kind": "openai_http",
            "location": self.base_url,
            "model": self.model,
            "concurrency": self.concurrency,
            "max_retries": self.max_retries,
        }

    def close(self) -> None:
        self._client.close()


def score_echo(
    tokens: list[str],
    logprobs: list[float | None],
    top: list[dict | None],
    offsets: list[int],
    context_chars: int,
) -> tuple[float, bool]:
    """Sum the log-probs of echoed tokens that start at or after the context's end, and check
    each was the most likely token. The first prompt token has no log-prob (None)."""
    start = next((i for i, off in enumerate(offsets) if off >= context_chars), len(tokens))
    if start == len(tokens):
        raise BackendError("echoed tokens do not reach the continuation")
    total, greedy = 0.0, True
    for i in range(start, len(tokens)):
        lp = logprobs[i]
        if lp is None:
            raise BackendError("continuation starts at the first token; add context")
        total += lp
        candidates = top[i] or {}
        if candidates and max(candidates, key=lambda t: candidates[t]) != tokens[i]:
            greedy = False
    return total, greedy

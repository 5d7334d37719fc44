"""What EvalHub's inference server does with a request, without HTTP (``server`` puts it on
the network; tests and notebooks call ``InferenceServer`` directly).

Each built-in model gets one ``models.engine.Engine``: concurrent requests decode in one
continuous batch (new requests join between decoding steps) on one copy of the weights, and
LoRA adapters of that base are rows of the same batch. Other backends (``hf``,
``openai_http``) answer one call at a time through their ``generate``.

Models are named in each request: by a name given at start, or by a spec the web app sends
beside the OpenAI body (``"evalhub": {"backend", "location", "params", "adapter"}``), loaded on
first use into a cache with a memory budget (least recently used out first). A request that
arrives while its model loads waits for it; nothing fails because a model is loading.
"""

from __future__ import annotations

import json
import resource
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from models.backends import load_backend
from models.backends.base import Backend, GenerationArgs, cut_at_stop, stop_check
from models.backends.streaming import stream_text
from models.cache import ModelCache
from models.serving import protocol
from models.serving.protocol import CompletionRequest, RequestError


@dataclass(frozen=True)
class Spec:
    """Which model to run: a backend kind, its location and parameters, and an adapter."""

    backend: str
    location: str
    params: str = "{}"  # JSON with sorted keys: hashable, and equal for equal parameters
    adapter: str | None = None

    @classmethod
    def from_json(cls, data: object) -> Spec:
        if not (
            isinstance(data, dict)
            and isinstance(data.get("backend"), str)
            and isinstance(data.get("location"), str)
        ):
            raise RequestError("'evalhub' must name a 'backend' and a 'location'", param="evalhub")
        params = data.get("params") or {}
        adapter = data.get("adapter")
        if not isinstance(params, dict) or not (adapter is None or isinstance(adapter, str)):
            raise RequestError("'evalhub' params must be an object", param="evalhub")
        return cls(data["backend"], data["location"], json.dumps(params, sort_keys=True), adapter)

    @property
    def base(self) -> tuple:
        """What one loaded copy serves: every adapter of a base shares it."""
        return (self.backend, self.location, self.params)


class Loaded:
    """A loaded backend; for the built-in one, also its continuous-batching engine."""

    def __init__(self, spec: Spec, max_batch: int):
        params = json.loads(spec.params)
        if spec.backend == "builtin":
            params.setdefault("batch_size", max_batch)
        self.backend: Backend = load_backend(spec.backend, spec.location, **params)
        self.engine = None
        self.memo = None  # the last echo-scored sequence (``models.generate.EchoMemo``)
        self.lock = threading.Lock()  # other backends answer one call at a time
        if spec.backend == "builtin":
            from models.engine import Engine
            from models.generate import EchoMemo

            self.memo = EchoMemo()

            tok = self.backend.tokenizer  # type: ignore[attr-defined]
            self.engine = Engine(
                self.backend.model,  # type: ignore[attr-defined]
                max_batch=max_batch,
                pad_id=tok.pad_token_id or 0,
                routing=self.backend.routing,  # type: ignore[attr-defined]
                # the int4 draft: a lone greedy request decodes by speculation
                draft=self.backend.draft,  # type: ignore[attr-defined]
            )
        self.loaded_at = time.time()

    @property
    def tokenizer(self):
        return getattr(self.backend, "tokenizer", None)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


@dataclass
class Metrics:
    requests: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: deque = field(default_factory=lambda: deque(maxlen=2000))  # seconds, recent
    started: float = field(default_factory=time.time)

    def quantile(self, q: float) -> float | None:
        values = sorted(self.ttft)
        return values[min(len(values) - 1, int(q * len(values)))] if values else None


class InferenceServer:
    """The models and the request handling, without HTTP (tests and notebooks call it)."""

    def __init__(
        self,
        *,
        cache_bytes: int = 8 << 30,
        max_batch: int = 16,
        token: str | None = None,
        named: dict[str, Spec] | None = None,
    ):
        self.max_batch, self.token = max_batch, token
        self.named: dict[str, Spec] = dict(named or {})
        self.models = ModelCache(cache_bytes, on_evict=lambda loaded: loaded.close())
        self.metrics = Metrics()
        self.loading: set[tuple] = set()

    def load(self, spec: Spec) -> Loaded:
        def build() -> Loaded:
            self.loading.add(spec.base)
            try:
                return Loaded(spec, self.max_batch)
            finally:
                self.loading.discard(spec.base)

        return self.models.get(spec.base, build)

    def resolve(self, body: dict) -> Spec:
        if "evalhub" in body:
            return Spec.from_json(body.pop("evalhub"))
        name = body.get("model")
        if name in self.named:
            return self.named[name]
        raise RequestError(f"the model {name!r} is not served here", status=404, param="model")

    # --------------------------------------------------------------------- completions
    def complete(self, body: dict, *, chat: bool) -> dict | Iterator[str]:
        """The OpenAI answer to ``body``: a dict, or server-sent events when streaming."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        spec = self.resolve(body)
        req = protocol.parse(body, chat=chat)
        loaded = self.load(spec)
        self.metrics.requests += 1
        if loaded.engine is None:
            return self._other(loaded, req)
        tok = loaded.tokenizer
        if chat:
            prompts: list[str | list[int]] = [loaded.backend.chat_format(req.messages)]
        else:
            prompts = req.prompts
        ids = [tok.encode(p) if isinstance(p, str) else p for p in prompts]
        vocab = loaded.backend.model.cfg.vocab_size  # type: ignore[attr-defined]
        for i, seq in enumerate(ids):
            if not seq:
                raise RequestError(f"prompt {i} is empty", param="prompt")
            if max(seq) >= vocab:
                raise RequestError(
                    f"prompt {i} has a token id outside the vocabulary ({vocab})", param="prompt"
                )
        if req.stream:
            return self._stream(loaded, spec, req, ids[0])
        return self._answer(loaded, spec, req, prompts, ids)

    def _requests(self, loaded: Loaded, spec: Spec, req: CompletionRequest, ids: list[int]):
        from models.engine import Request

        tok, args = loaded.tokenizer, req.args
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        check = stop_check(tok, args.stop)
        out = []
        for j in range(req.n):
            out.append(
                loaded.engine.submit(  # type: ignore[union-attr]
                    Request(
                        ids,
                        max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature,
                        top_p=args.top_p,
                        seed=args.seed + j if req.seeded else None,
                        stop_token_ids=eos,
                        should_stop=check,
                        logprobs=req.logprobs,
                        adapter=spec.adapter,
                    )
                )
            )
        return out

    def _answer(self, loaded, spec, req: CompletionRequest, prompts, ids) -> dict:
        from models.engine import Token
        from models.generate import echo_scores

        tok, args = loaded.tokenizer, req.args
        scores = None
        if req.echo and req.logprobs is not None:
            top = max(1, req.logprobs)
            # On the engine's thread, which alone touches the memo: lm-eval's one request per
            # choice runs the shared few-shot context once.
            scores = loaded.engine.call(
                lambda model: echo_scores(model, ids, top=top, memo=loaded.memo)
            )
        # lm-eval's scoring call (echo, one greedy token): the scoring pass already has it.
        one_greedy = scores is not None and args.max_new_tokens == 1 and args.temperature == 0
        choices, completion_tokens = [], 0
        for i, seq in enumerate(ids):
            if one_greedy:
                assert scores is not None
                nxt = scores[i].next
                runs = [([Token(nxt[0], nxt[1], tuple(nxt[2]))], "length")] * req.n
            else:
                started = self._requests(loaded, spec, req, seq)
                runs = [(r.result(), r.finish_reason) for r in started]
                for r in started:
                    self._ttft(r)
            for j, (tokens, finish) in enumerate(runs):
                text = tok.decode([t.id for t in tokens], skip_special_tokens=True)
                cut = cut_at_stop(text, args.stop)
                if len(cut) < len(text):
                    finish = "stop"
                completion_tokens += len(tokens)
                choice: dict = {"index": i * req.n + j, "finish_reason": finish}
                echoed = ""
                if req.echo:
                    echoed = prompts[i] if isinstance(prompts[i], str) else tok.decode(seq)
                logprobs = None
                if req.logprobs is not None:
                    logprobs = self._logprobs(
                        tok, req, seq, scores[i] if scores else None, tokens, cut, one_greedy
                    )
                if req.chat:
                    choice["message"] = {"role": "assistant", "content": cut}
                    choice["logprobs"] = logprobs
                else:
                    choice["text"] = echoed + cut
                    choice["logprobs"] = logprobs
                choices.append(choice)
        prompt_tokens = sum(len(s) for s in ids)
        self.metrics.prompt_tokens += prompt_tokens
        self.metrics.completion_tokens += completion_tokens
        return {
            **protocol.envelope(protocol.new_id(req.chat), req.model, req.chat),
            "choices": choices,
            "usage": protocol.usage(prompt_tokens, completion_tokens),
        }

    def _logprobs(self, tok, req: CompletionRequest, seq, scores, tokens, cut: str, whole: bool):
        """The choice's log-probs: the echoed prompt's (first token: none), then the new
        tokens' that lie within the returned text (all of them for ``whole``)."""
        if not whole:
            kept, text = [], ""
            for t in tokens:
                if len(text) >= len(cut):
                    break
                kept.append(t)
                text += tok.decode([t.id], skip_special_tokens=True)
            tokens = kept
        pieces = [tok.decode([t.id]) for t in tokens]
        if req.chat:
            top = [[(tok.decode([a]), v) for a, v in t.top] for t in tokens]
            return protocol.chat_logprobs(pieces, [t.logprob for t in tokens], top)
        lps: list = [t.logprob for t in tokens]
        tops: list = [self._top(tok, t.top) for t in tokens]
        if req.echo:
            prompt_pieces = [tok.decode([t]) for t in seq]
            prompt_top = (
                [self._top(tok, alts) for alts in scores.top]
                if req.logprobs
                else [None] * (len(seq) - 1)
            )
            pieces, lps, tops = (
                prompt_pieces + pieces,
                [None, *scores.logprobs, *lps],
                [None, *prompt_top, *tops],
            )
        return protocol.completion_logprobs(pieces, lps, tops, 0)

    @staticmethod
    def _top(tok, alts) -> dict[str, float]:
        out: dict[str, float] = {}
        for token_id, value in alts:
            out.setdefault(tok.decode([token_id]), value)
        return out

    def _ttft(self, request) -> None:
        if request.first_token_at is not None:
            self.metrics.ttft.append(request.first_token_at - request.submitted_at)

    def _stream(self, loaded, spec, req: CompletionRequest, ids: list[int]) -> Iterator[str]:
        if req.n != 1:
            raise RequestError("streaming takes n = 1", param="n")
        (request,) = self._requests(loaded, spec, req, ids)
        tok, stop = loaded.tokenizer, req.args.stop
        ident = protocol.new_id(req.chat)
        hold = max((len(s) for s in stop), default=1) - 1

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
            if req.chat:
                body = (
                    {"role": "assistant", "content": delta}
                    if first
                    else ({"content": delta} if delta is not None else {})
                )
                choice = {"index": 0, "delta": body, "logprobs": None, "finish_reason": finish}
            else:
                choice = {
                    "index": 0,
                    "text": delta or "",
                    "logprobs": None,
                    "finish_reason": finish,
                }
            data = {
                **protocol.envelope(ident, req.model, req.chat, chunk=True),
                "choices": [choice],
            }
            if req.include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        def events() -> Iterator[str]:
            sent, finish = "", None
            try:
                yield chunk("", None, first=True)
                ids_out: list[int] = []
                for token in request.tokens():
                    ids_out.append(token.id)
                    whole = tok.decode(ids_out, skip_special_tokens=True)
                    text = cut_at_stop(whole, stop)
                    if len(text) < len(whole):
                        finish = "stop"
                    shown = text.rstrip("\ufffd")
                    shown = shown[: len(shown) - hold] if hold and finish is None else shown
                    if shown.startswith(sent) and len(shown) > len(sent):
                        yield chunk(shown[len(sent) :], None)
                        sent = shown
                text = cut_at_stop(tok.decode(ids_out, skip_special_tokens=True), stop)
                if text.startswith(sent) and len(text) > len(sent):
                    yield chunk(text[len(sent) :], None)
                self._ttft(request)
                self.metrics.completion_tokens += len(ids_out)
                self.metrics.prompt_tokens += len(ids)
                yield chunk(None, finish or request.finish_reason)
                if req.include_usage:
                    data = {
                        **protocol.envelope(ident, req.model, req.chat, chunk=True),
                        "choices": [],
                        "usage": protocol.usage(len(ids), len(ids_out)),
                    }
                    yield f"data: {json.dumps(data)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                request.cancel()  # the client went away, or we are done: free the row

        return events()

    def _other(self, loaded: Loaded, req: CompletionRequest) -> dict | Iterator[str]:
        """A backend without an engine: text in, text out, one call at a time."""
        kind = type(loaded.backend).__name__
        if req.echo or req.logprobs is not None:
            raise RequestError(
                f"'echo' and 'logprobs' need a built-in model, not {kind}", param="logprobs"
            )
        if any(not isinstance(p, str) for p in req.prompts):
            raise RequestError(
                f"token-id prompts need a built-in model, not {kind}", param="prompt"
            )
        prompts = (
            [loaded.backend.chat_format(req.messages)] if req.chat else list(map(str, req.prompts))
        )
        args = req.args
        if req.stream:

            def events() -> Iterator[str]:
                ident = protocol.new_id(req.chat)
                with loaded.lock:
                    for delta in stream_text(loaded.backend, prompts[0], args):
                        key = "delta" if req.chat else "text"
                        value = {"content": delta} if req.chat else delta
                        data = {
                            **protocol.envelope(ident, req.model, req.chat, chunk=True),
                            "choices": [{"index": 0, key: value, "finish_reason": None}],
                        }
                        yield f"data: {json.dumps(data)}\n\n"
                yield "data: [DONE]\n\n"

            return events()
        choices = []
        with loaded.lock:
            for i, prompt in enumerate(prompts):
                for j in range(req.n):
                    seeded = GenerationArgs(**{**args.to_dict(), "seed": args.seed + j})
                    text = loaded.backend.generate([prompt], seeded)[0]
                    choice: dict = {
                        "index": i * req.n + j,
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                    if req.chat:
                        choice["message"] = {"role": "assistant", "content": text}
                    else:
                        choice["text"] = text
                    choices.append(choice)
        return {
            **protocol.envelope(protocol.new_id(req.chat), req.model, req.chat),
            "choices": choices,
            "usage": protocol.usage(0, 0),
        }

    # ------------------------------------------------------------------------ status
    def health(self) -> dict:
        models = []
        for key in self.models.keys():
            assert isinstance(key, tuple)
            loaded = self.models.peek(key)
            if loaded is None:
                continue
            engine = loaded.engine
            models.append(
                {
                    "backend": key[0],
                    "location": key[1],
                    "waiting": engine.waiting if engine else 0,
                    "running": engine.running if engine else 0,
                    "kv_cache_mb": round(engine.cache_bytes / 2**20, 1) if engine else 0,
                }
            )
        return {
            "status": "ok",
            "models": models,
            "loading": len(self.loading),
            "waiting": sum(m["waiting"] for m in models),
            "running": sum(m["running"] for m in models),
            "requests": self.metrics.requests,
            "failed": self.metrics.failed,
            "completion_tokens": self.metrics.completion_tokens,
            "ttft_p50_ms": _ms(self.metrics.quantile(0.5)),
            "ttft_p99_ms": _ms(self.metrics.quantile(0.99)),
            "model_bytes": self.models.used_bytes,
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "uptime_s": round(time.time() - self.metrics.started, 1),
        }

    def prometheus(self) -> str:
        h = self.health()
        lines = []
        for name, value, kind, text in [
            ("requests_total", h["requests"], "counter", "Completion requests answered or started"),
            ("failed_total", h["failed"], "counter", "Requests that ended in a server error"),
            ("completion_tokens_total", h["completion_tokens"], "counter", "New tokens decoded"),
            ("prompt_tokens_total", self.metrics.prompt_tokens, "counter", "Prompt tokens read"),
            ("waiting", h["waiting"], "gauge", "Requests waiting to join a batch"),
            ("running", h["running"], "gauge", "Rows decoding now"),
            ("models_loading", h["loading"], "gauge", "Models being loaded"),
            ("model_bytes", h["model_bytes"], "gauge", "Bytes of loaded model tensors"),
        ]:
            lines += [
                f"# HELP evalhub_inference_{name} {text}",
                f"# TYPE evalhub_inference_{name} {kind}",
                f"evalhub_inference_{name} {value}",
            ]
        for q in (0.5, 0.99):
            value = self.metrics.quantile(q)
            if value is not None:
                lines.append(f'evalhub_inference_ttft_seconds{{quantile="{q}"}} {value:.6f}')
        return "\n".join(lines) + "\n"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)

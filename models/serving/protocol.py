"""The OpenAI request and response formats that EvalHub serves, as plain functions.

``parse(body, chat=...)`` turns a ``/v1/completions`` or ``/v1/chat/completions`` body into a
``CompletionRequest`` or raises ``RequestError`` naming the field. Parameters that change what
a client gets back and that the server cannot honour are rejected by name, never ignored
(OpenAI's own API does the same with unknown arguments). Django's ``/v1`` calls it to answer
bad requests before they reach the inference server; the server calls it again for the
clients that talk to it directly.

The response helpers build OpenAI's JSON: ``logprobs`` of a completion in the legacy layout
that lm-evaluation-harness reads (``tokens``, ``token_logprobs``, ``top_logprobs``,
``text_offset``; the first echoed token has no log-prob), and of a chat completion in the
``content`` list layout.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from models.backends.base import GenerationArgs

MAX_TOKENS_LIMIT = 4096
MAX_N = 16
MAX_LOGPROBS = 5  # completions: OpenAI's limit
MAX_TOP_LOGPROBS = 20  # chat
ROLES = ("system", "user", "assistant")

# Accepted and honoured (or harmless: ``user`` is an end-user id for abuse tracking).
_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "user",
}
_COMPLETION = _COMMON | {"prompt", "echo", "logprobs", "best_of"}
_CHAT = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}
# Accepted only at their no-op value; any other value is refused by name.
_NEUTRAL = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
    "suffix": "",
    "response_format": {"type": "text"},
    "parallel_tool_calls": None,
    "tools": [],
    "tool_choice": "none",
}


class RequestError(ValueError):
    """A request the server will not run; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class CompletionRequest:
    model: str
    chat: bool
    args: GenerationArgs
    prompts: list[str | list[int]] = field(default_factory=list)  # completions
    messages: list[dict] = field(default_factory=list)  # chat
    n: int = 1
    echo: bool = False
    logprobs: int | None = None  # top alternatives per token (0: the token's own only)
    stream: bool = False
    include_usage: bool = False
    seeded: bool = False  # the client gave a seed


def parse(body: object, *, chat: bool) -> CompletionRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    known = _CHAT if chat else _COMPLETION
    for name in body:
        if name in known:
            continue
        if name in _NEUTRAL:
            if body[name] not in (_NEUTRAL[name], None):
                raise RequestError(
                    f"'{name}' is not supported by this server (only {_NEUTRAL[name]!r})",
                    param=name,
                )
            continue
        raise RequestError(f"unrecognized request argument '{name}'", param=name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required", param="model")
    req = CompletionRequest(model=model, chat=chat, args=_args(body, chat))
    req.seeded = body.get("seed") is not None
    req.n = _number(body, "n", 1, lo=1, hi=MAX_N, whole=True)
    best_of = body.get("best_of")
    if best_of is not None and best_of != req.n:
        raise RequestError("'best_of' is not supported (only equal to n)", param="best_of")
    req.stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not (isinstance(options, dict) and set(options) <= {"include_usage"}):
            raise RequestError(
                "'stream_options' may only hold 'include_usage'", param="stream_options"
            )
        req.include_usage = _flag(options, "include_usage")
    if chat:
        req.messages = _messages(body.get("messages"))
        if _flag(body, "logprobs"):
            req.logprobs = _number(body, "top_logprobs", 0, lo=0, hi=MAX_TOP_LOGPROBS, whole=True)
        elif body.get("top_logprobs") is not None:
            raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    else:
        req.prompts = _prompts(body.get("prompt"))
        req.echo = _flag(body, "echo")
        if body.get("logprobs") is not None:
            req.logprobs = _number(body, "logprobs", 0, lo=0, hi=MAX_LOGPROBS, whole=True)
    if req.stream and (req.echo or len(req.prompts) > 1):
        raise RequestError("streaming takes one prompt without 'echo'", param="stream")
    return req


def _args(body: dict, chat: bool) -> GenerationArgs:
    name = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number(body, name, 16 if not chat else 256, lo=0, hi=MAX_TOKENS_LIMIT, whole=True)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise RequestError("'stop' must be a non-empty string or a list of them", param="stop")
    top_p = _number(body, "top_p", 1.0, lo=0, hi=1)
    if top_p == 0:
        raise RequestError("'top_p' must be above 0", param="top_p")
    return GenerationArgs(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, lo=0, hi=2),
        top_p=top_p,
        stop=tuple(stop),
        seed=_number(body, "seed", 0, lo=-(2**63), hi=2**63 - 1, whole=True),
    )


def _number(body: dict, name: str, default, *, lo, hi, whole: bool = False):
    """A numeric parameter: a JSON number (never a boolean) within [lo, hi]."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"'{name}' must be a number", param=name)
    if whole and not (isinstance(value, int) or value.is_integer()):
        raise RequestError(f"'{name}' must be a whole number", param=name)
    if value < lo or value > hi:
        raise RequestError(f"'{name}' must be between {lo} and {hi}, not {value}", param=name)
    return int(value) if whole else float(value)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false", param=name)
    return value


def _prompts(value) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(_is_token(t) for t in value):
            return [list(value)]
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(isinstance(p, list) and p and all(_is_token(t) for t in p) for p in value):
            return [list(p) for p in value]
    raise RequestError(
        "'prompt' must be a string, a list of strings, a list of token ids or a list of "
        "non-empty lists of token ids",
        param="prompt",
    )


def _is_token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def _messages(value) -> list[dict]:
    if not (isinstance(value, list) and value):
        raise RequestError("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(
                f"messages[{i}] needs a 'role' among {list(ROLES)}", param=f"messages[{i}]"
            )
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise RequestError(
                    f"messages[{i}].content parts must all be text", param=f"messages[{i}]"
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}] needs a text 'content'", param=f"messages[{i}]")
        out.append({"role": m["role"], "content": content})
    return out


# Responses.
def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def envelope(ident: str, model: str, chat: bool, *, chunk: bool = False) -> dict:
    kind = "chat.completion" if chat else "text_completion"
    return {
        "id": ident,
        "object": f"{kind}.chunk" if chunk and chat else kind,
        "created": int(time.time()),
        "model": model,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(
    pieces: list[str], logprobs: list[float | None], top: list[dict[str, float] | None], start: int
) -> dict:
    """Legacy completions ``logprobs``: token strings, their log-probs, the top alternatives
    and each token's character offset into the choice's text (counted from ``start``)."""
    offsets, at = [], start
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {
        "tokens": pieces,
        "token_logprobs": logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat_logprobs(
    pieces: list[str], logprobs: list[float], top: list[list[tuple[str, float]]]
) -> dict:
    def entry(token: str, lp: float) -> dict:
        return {"token": token, "logprob": lp, "bytes": list(token.encode())}

    return {
        "content": [
            {**entry(p, lp), "top_logprobs": [entry(t, v) for t, v in alts]}
            for p, lp, alts in zip(pieces, logprobs, top, strict=True)
        ]
    }


def error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}

"""OpenAI-compatible serving of registered models: /v1/models, /v1/chat/completions,
/v1/completions, authenticated by EvalHub API tokens (researchers).

Thin: parse and validate the OpenAI request, call the model's backend, shape the response.
Streaming (``"stream": true``) sends server-sent events as tokens are produced.
"""

import json
import time
import uuid
from functools import wraps

from django.http import JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from core.access import RESEARCHER, has_role
from core.models import ApiToken
from core.payload import PayloadError, request_json
from evalhub.models import ModelVersion
from evalhub.registry import backend_for
from models.backends import BackendError, GenerationArgs
from models.backends.streaming import stream_text

# What /v1 serves by name: policies, and adapters (their base with the adapter on).
SERVED = (ModelVersion.POLICY, ModelVersion.ADAPTER)

MAX_TOKENS_LIMIT = 4096


class BadRequest(Exception):
    pass


def _error(message: str, status: int, kind: str = "invalid_request_error") -> JsonResponse:
    return JsonResponse(
        {"error": {"message": message, "type": kind, "code": status}}, status=status
    )


def openai_endpoint(view):
    """Bearer-token auth (no sessions, so no CSRF), JSON parsing and OpenAI-style errors."""

    @csrf_exempt
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        header = request.headers.get("Authorization", "")
        user = (
            ApiToken.objects.authenticate(header.removeprefix("Bearer ").strip())
            if header.startswith("Bearer ")
            else None
        )
        if user is None:
            return _error(
                "a valid API token is required (Authorization: Bearer …)",
                401,
                "authentication_error",
            )
        if not has_role(user, RESEARCHER):
            return _error("this token's user may not use models", 403, "permission_error")
        body: dict = {}
        try:
            body = request_json(request) if request.method == "POST" else {}
            return view(request, body, *args, **kwargs)
        except PayloadError as exc:
            return _error(str(exc), exc.status)
        except BadRequest as exc:
            return _error(str(exc), 400)
        except ModelVersion.DoesNotExist:
            return _error(f"the model {body.get('model')!r} does not exist", 404, "not_found_error")
        except BackendError as exc:
            return _error(f"the model failed: {exc}", 502, "server_error")

    return wrapper


@openai_endpoint
def list_models(request, body):
    data = [
        {
            "id": m.name,
            "object": "model",
            "created": int(m.created_at.timestamp()),
            "owned_by": "evalhub",
        }
        for m in ModelVersion.objects.filter(kind__in=SERVED)
    ]
    return JsonResponse({"object": "list", "data": data})


def _number(body: dict, name: str, default, *, lo, hi, whole: bool = False):
    """A numeric sampling parameter: a JSON number (never a boolean) within [lo, hi]."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"'{name}' must be a number")
    if whole and not (isinstance(value, int) or value.is_integer()):
        raise BadRequest(f"'{name}' must be a whole number")
    if value < lo or (hi is not None and value > hi):
        bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise BadRequest(f"'{name}' must be {bounds}, not {value}")
    return int(value) if whole else float(value)


def _args(body: dict) -> GenerationArgs:
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number(body, name, 256, whole=True, lo=0, hi=None)
    if max_tokens > MAX_TOKENS_LIMIT:
        raise BadRequest(f"max_tokens may be at most {MAX_TOKENS_LIMIT}")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise BadRequest("'stop' must be a string or a list of strings")
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported")
    return GenerationArgs(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, lo=0, hi=2),
        top_p=_number(body, "top_p", 1.0, lo=0, hi=1),
        stop=tuple(stop),
        seed=_number(body, "seed", 0, whole=True, lo=-(2**63), hi=2**63 - 1),
    )


def _model(body: dict) -> ModelVersion:
    if not isinstance(body.get("model"), str):
        raise BadRequest("'model' is required")
    return ModelVersion.objects.get(name=body["model"], kind__in=SERVED)


@openai_endpoint
def chat_completions(request, body):
    model = _model(body)
    messages = body.get("messages")
    if not (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict)
            and isinstance(m.get("content"), str)
            and m.get("role") in ("system", "user", "assistant")
            for m in messages
        )
    ):
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
    args, backend = _args(body), backend_for(model)
    prompt = backend.chat_format([{"role": m["role"], "content": m["content"]} for m in messages])
    if body.get("stream"):
        return _stream(backend, prompt, args, model.name, chat=True)
    text = backend.generate([prompt], args)[0]
    return JsonResponse(_completion(model.name, text, prompt, args, backend, chat=True))


@openai_endpoint
def completions(request, body):
    model = _model(body)
    prompts = body.get("prompt")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
        raise BadRequest("'prompt' must be a string or a list of strings")
    args, backend = _args(body), backend_for(model)
    if body.get("stream"):
        if len(prompts) != 1:
            raise BadRequest("streaming takes a single prompt")
        return _stream(backend, prompts[0], args, model.name, chat=False)
    texts = backend.generate(prompts, args)
    response = _completion(model.name, texts[0], prompts[0], args, backend, chat=False)
    response["choices"] = [
        {"index": i, "text": t, "finish_reason": "stop", "logprobs": None}
        for i, t in enumerate(texts)
    ]
    return JsonResponse(response)


def _count(backend, text: str) -> int:
    tokenizer = getattr(backend, "tokenizer", None)
    return len(tokenizer.encode(text)) if tokenizer is not None else 0


def _completion(name, text, prompt, args, backend, *, chat: bool) -> dict:
    used, prompt_tokens = _count(backend, text), _count(backend, prompt)
    finish = "length" if used >= args.max_new_tokens else "stop"
    choice = (
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        if chat
        else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    )
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": name,
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": used,
            "total_tokens": prompt_tokens + used,
        },
    }


def _stream(backend, prompt: str, args: GenerationArgs, name: str, *, chat: bool):
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            body = (
                {"role": "assistant", "content": delta}
                if first
                else ({"content": delta} if delta is not None else {})
            )
            choice = {"index": 0, "delta": body, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        data = {
            "id": ident,
            "object": kind,
            "created": int(time.time()),
            "model": name,
            "choices": [choice],
        }
        return f"data: {json.dumps(data)}\n\n"

    def events():
        yield chunk("", None, first=True)
        for delta in stream_text(backend, prompt, args):
            yield chunk(delta, None)
        yield chunk(None, "stop")
        yield "data: [DONE]\n\n"

    response = StreamingHttpResponse(events(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    return response

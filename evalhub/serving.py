"""OpenAI-compatible serving of registered models: /v1/models, /v1/chat/completions,
/v1/completions, authenticated by EvalHub API tokens (researchers).

Thin: authenticate, validate the request (``models.serving.protocol``: a bad request is a 400
naming the field before anything else runs), find the model, and forward it with the model's
spec to the inference server (``evalhub.inference``), which holds the loaded models and
batches every caller's requests together. Answers, streamed ones included, are relayed as the
server sends them.
"""

from functools import wraps

from django.http import JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from core.access import RESEARCHER, has_role
from core.models import ApiToken
from core.payload import PayloadError, request_json
from evalhub import inference
from evalhub.models import ModelVersion
from models.serving import protocol
from models.serving.protocol import RequestError

# What /v1 serves by name: policies, and adapters (their base with the adapter on).
SERVED = (ModelVersion.POLICY, ModelVersion.ADAPTER)


def _error(message: str, status: int, param: str | None = None) -> JsonResponse:
    return JsonResponse(protocol.error_body(message, status, param), status=status)


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
            return _error("a valid API token is required (Authorization: Bearer …)", 401)
        if not has_role(user, RESEARCHER):
            return _error("this token's user may not use models", 403)
        body: dict = {}
        try:
            body = request_json(request) if request.method == "POST" else {}
            return view(request, body, *args, **kwargs)
        except PayloadError as exc:
            return _error(str(exc), exc.status)
        except RequestError as exc:
            return _error(str(exc), exc.status, exc.param)
        except ModelVersion.DoesNotExist:
            return _error(f"the model {body.get('model')!r} does not exist", 404, "model")
        except inference.Unavailable as exc:
            return _error(str(exc), 503)

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


@openai_endpoint
def chat_completions(request, body):
    return _forward("/v1/chat/completions", body, chat=True)


@openai_endpoint
def completions(request, body):
    return _forward("/v1/completions", body, chat=False)


def _forward(path: str, body: dict, *, chat: bool):
    req = protocol.parse(body, chat=chat)  # the server parses again; this answers 400s early
    model = ModelVersion.objects.get(name=req.model, kind__in=SERVED)
    status, answer = inference.forward(
        path, {**body, "evalhub": inference.spec_for(model)}, stream=req.stream
    )
    if isinstance(answer, dict):
        return JsonResponse(answer, status=status)
    response = StreamingHttpResponse(answer, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # proxies must pass events on as they come
    return response

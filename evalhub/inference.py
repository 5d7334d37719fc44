"""The web app's side of the inference server (``models/serving``, ``manage.py
inferenceserver``): what a registered model is to the server (``spec_for``), forwarding OpenAI
requests to it (``forward``), and a backend that sends a job's calls to it.

Web workers never load a model: /v1 checks the caller and the request here, then the server,
which holds one copy of each model and batches every caller's requests together, answers.
"""

import json
import threading
import time
from collections.abc import Iterator

import httpx
from django.conf import settings

from evalhub.models import ModelVersion

# How long a request waits for the server to accept connections (it listens within seconds of
# starting, before its models load; requests then wait for the load inside the server).
CONNECT_PATIENCE_S = 60

_local = threading.local()  # one client per thread: gunicorn's threads never share one


class Unavailable(Exception):
    """The inference server cannot be reached."""


def spec_for(model: ModelVersion) -> dict:
    """What the server needs to load and run ``model``: its backend, location, parameters and
    (for an adapter of a built-in base) the adapter, which rides on the base's one copy."""
    params = dict(model.params)
    adapter = params.pop("adapter", None) if model.backend == "builtin" else None
    return {
        "backend": model.backend,
        "location": model.location,
        "params": params,
        "adapter": adapter,
    }


def _client() -> httpx.Client:
    where = (settings.INFERENCE_URL, settings.INFERENCE_TOKEN, settings.INFERENCE_TIMEOUT)
    held = getattr(_local, "client", None)
    if held is None or held[0] != where:
        client = httpx.Client(
            base_url=settings.INFERENCE_URL,
            timeout=httpx.Timeout(settings.INFERENCE_TIMEOUT, connect=5.0),
            headers={"Authorization": f"Bearer {settings.INFERENCE_TOKEN}"},
        )
        held = _local.client = (where, client)
    return held[1]


def _send(path: str, body: dict, *, stream: bool) -> httpx.Response:
    """POST ``body``; while the server is still starting, keep trying to connect."""
    deadline = time.monotonic() + CONNECT_PATIENCE_S
    while True:
        try:
            client = _client()
            return client.send(client.build_request("POST", path, json=body), stream=stream)
        except httpx.ConnectError as exc:
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"the inference server at {settings.INFERENCE_URL} is not running "
                    "(make run starts it; alone: python manage.py inferenceserver)"
                ) from exc
            time.sleep(0.5)
        except httpx.TimeoutException as exc:
            raise Unavailable(
                f"the inference server did not answer within {settings.INFERENCE_TIMEOUT} s"
            ) from exc


def forward(path: str, body: dict, *, stream: bool) -> tuple[int, dict | Iterator[bytes]]:
    """The server's status and JSON answer, or (200, the raw server-sent event stream)."""
    response = _send(path, body, stream=stream)
    if not stream or response.status_code != 200:
        if stream:
            response.read()
            response.close()
        try:
            return response.status_code, response.json()
        except ValueError:
            return 502, {"error": {"message": "the inference server's answer was not JSON"}}

    def relay() -> Iterator[bytes]:
        try:
            yield from response.iter_raw()
        finally:
            response.close()  # a client that leaves closes this, and the server frees its row

    return 200, relay()


def server_backend(model: ModelVersion):
    """A backend that sends ``model``'s calls to the inference server (the openai_http
    backend, the model spec riding with every request), for deployments that keep one copy of
    each model (``settings.JOBS_USE_INFERENCE_SERVER``)."""
    from models.backends import load_backend

    spec = spec_for(model)
    return load_backend(
        "openai_http",
        f"{settings.INFERENCE_URL}/v1",
        model=model.name,
        api_key=settings.INFERENCE_TOKEN,
        timeout=float(settings.INFERENCE_TIMEOUT),
        concurrency=settings.INFERENCE_MAX_BATCH,
        chat_template_from=model.location if model.backend == "builtin" else None,
        extra_body={"evalhub": spec},
    )


def chat_deltas(model: ModelVersion, messages: list[dict], **params) -> Iterator[str]:
    """The text of a streamed chat completion from the server, delta by delta (the model
    page's prompt box). Raises ``Unavailable``, or ``RuntimeError`` with the server's error."""
    body = {"model": model.name, "messages": messages, "stream": True, **params}
    status, answer = forward(
        "/v1/chat/completions", {**body, "evalhub": spec_for(model)}, stream=True
    )
    if isinstance(answer, dict):
        raise RuntimeError(answer.get("error", {}).get("message", f"HTTP {status}"))
    buffer = b""
    for raw in answer:
        buffer += raw
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            data = event.decode().removeprefix("data: ").strip()
            if data == "[DONE]":
                return
            for choice in json.loads(data).get("choices", []):
                delta = choice.get("delta", {}).get("content")
                if delta:
                    yield delta

"""The OpenAI-compatible server, driven by the official ``openai`` client and by EvalHub's own
openai_http backend, against SmolLM2 served by the built-in engine."""

import openai
import pytest

from core.models import ApiToken
from evalhub.models import ModelVersion
from evalhub.registry import backend_for
from models.backends import GenerationArgs, load_backend

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def served(smollm2_checkpoint, carol, inference_server):
    model = ModelVersion.objects.create(
        name="smollm2", backend="builtin", location=str(smollm2_checkpoint)
    )
    return model, ApiToken.issue(user=carol, name="client")[1]


@pytest.fixture
def client(live_server, served):
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=served[1], max_retries=0)


def test_chat_completion_matches_the_engine_and_streams_the_same_text(client, served):
    backend = backend_for(served[0])
    expected = backend.generate([backend.chat_format(MESSAGES)], GenerationArgs(max_new_tokens=12))[
        0
    ]
    reply = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=12, temperature=0
    )
    assert reply.choices[0].message.content == expected and "Paris" in expected
    assert reply.usage.completion_tokens > 0 and reply.model == "smollm2"
    chunks = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=12, temperature=0, stream=True
    )
    deltas = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(deltas) == expected and len([d for d in deltas if d]) > 3


def test_completions_and_model_list(client, served):
    names = [m.id for m in client.models.list()]
    assert names == ["smollm2"]
    out = client.completions.create(
        model="smollm2", prompt=["The capital of France is", "2+2="], max_tokens=5, temperature=0
    )
    backend = backend_for(served[0])
    expected = backend.generate(
        ["The capital of France is", "2+2="], GenerationArgs(max_new_tokens=5)
    )
    assert [c.text for c in out.choices] == expected


def test_errors_come_back_in_openai_form(live_server, client, alice):
    bad = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="evh_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    rater = openai.OpenAI(
        base_url=f"{live_server.url}/v1",
        max_retries=0,
        api_key=ApiToken.issue(user=alice, name="r")[1],
    )
    with pytest.raises(openai.PermissionDeniedError):
        rater.models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user"}])


def test_the_openai_http_backend_round_trips_through_this_server(
    live_server, served, smollm2_checkpoint
):
    remote = load_backend(
        "openai_http",
        f"{live_server.url}/v1",
        model="smollm2",
        api_key=served[1],
        chat_template_from=str(smollm2_checkpoint),
    )
    local = backend_for(served[0])
    prompt = local.chat_format(MESSAGES)
    assert remote.chat_format(MESSAGES) == prompt
    args = GenerationArgs(max_new_tokens=10, stop=("\n",))
    assert remote.generate([prompt], args) == local.generate([prompt], args)

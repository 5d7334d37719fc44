"""The inference server behind /v1: continuous batching (``models.engine``), the OpenAI protocol
(``models.serving.protocol``), the server process's HTTP face, and lm-evaluation-harness's own
OpenAI clients (``local-completions``, ``local-chat-completions``) run against EvalHub's /v1."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from django.urls import reverse

from core.models import ApiToken
from evalhub import inference
from evalhub.models import ModelVersion
from models.backends import load_backend
from models.engine import Engine, Request
from models.generate import echo_scores, generate
from models.serving.protocol import RequestError, parse

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three colors.",
    "What is 12 times 12?",
]


@pytest.fixture(scope="module")
def smol(smollm2_checkpoint):
    return load_backend("builtin", str(smollm2_checkpoint), draft=None)


def _chat_ids(backend, question: str) -> list[int]:
    return backend.tokenizer.encode(backend.chat_format([{"role": "user", "content": question}]))


# ------------------------------------------------------------------------------ the engine
def test_requests_joining_a_running_batch_get_the_tokens_they_would_alone(smol):
    tok, model = smol.tokenizer, smol.model
    prompts = [_chat_ids(smol, q) for q in QUESTIONS]
    alone = [
        generate(model, [p], max_new_tokens=20, stop_token_ids=[tok.eos_token_id])[0]
        for p in prompts
    ]
    engine = Engine(model, pad_id=tok.pad_token_id or 0)
    try:
        first = engine.submit(
            Request(prompts[0], max_new_tokens=20, stop_token_ids=[tok.eos_token_id])
        )
        next(first.tokens())  # the first request is decoding before the others arrive
        rest = [
            engine.submit(Request(p, max_new_tokens=20, stop_token_ids=[tok.eos_token_id]))
            for p in prompts[1:]
        ]
        together = [[t.id for t in r.result(timeout=120)] for r in [first, *rest]]
        together[0] = alone[0][:1] + together[0]  # the token consumed above
    finally:
        engine.close()
    assert together == alone
    stats = engine.stats
    assert stats.rows_stepped / stats.steps > 2  # the requests really decoded together
    assert first.finish_reason in ("stop", "length")


def test_a_lone_greedy_request_decodes_by_speculation_to_the_same_tokens(smol):
    from models.draft import Int4Draft
    from models.generate import Draft

    tok, model = smol.tokenizer, smol.model
    prompts = [_chat_ids(smol, q) for q in QUESTIONS[:2]]
    eos = [tok.eos_token_id]
    alone = [generate(model, [p], max_new_tokens=40, stop_token_ids=eos)[0] for p in prompts]
    draft = Draft(Int4Draft(model))
    engine = Engine(model, pad_id=tok.pad_token_id or 0, draft=draft)
    try:
        first = engine.submit(Request(prompts[0], max_new_tokens=40, stop_token_ids=eos))
        assert [t.id for t in first.result(timeout=120)] == alone[0]
        assert draft.accepted > 0 and engine.stats.steps < len(alone[0])  # tokens per pass > 1
        # A request arriving while one speculates joins the batch and both stay exact.
        a = engine.submit(Request(prompts[0], max_new_tokens=40, stop_token_ids=eos))
        next(a.tokens())
        b = engine.submit(Request(prompts[1], max_new_tokens=40, stop_token_ids=eos))
        got_a = alone[0][:1] + [t.id for t in a.result(timeout=120)]
        assert got_a == alone[0] and [t.id for t in b.result(timeout=120)] == alone[1]
    finally:
        engine.close()


def test_a_seeded_sample_does_not_depend_on_its_batch_and_logprobs_are_the_models(smol):
    tok, model = smol.tokenizer, smol.model
    prompt = _chat_ids(smol, QUESTIONS[1])
    engine = Engine(model, pad_id=tok.pad_token_id or 0)
    try:
        alone = engine.submit(Request(prompt, max_new_tokens=12, temperature=0.9, seed=7)).result()
        crowd = [
            engine.submit(Request(_chat_ids(smol, q), max_new_tokens=12, temperature=0.9, seed=1))
            for q in QUESTIONS
        ]
        again = engine.submit(Request(prompt, max_new_tokens=12, temperature=0.9, seed=7))
        assert [t.id for t in again.result()] == [t.id for t in alone]
        for r in crowd:
            r.result()
        scored = engine.submit(Request(prompt, max_new_tokens=3, logprobs=2)).result()
    finally:
        engine.close()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]))[0, -1].float()
    expected = torch.log_softmax(logits, -1)
    assert scored[0].id == int(logits.argmax())
    assert scored[0].logprob == pytest.approx(float(expected.max()), abs=1e-3)
    assert [i for i, _ in scored[0].top] == expected.topk(2).indices.tolist()


def test_a_cancelled_request_frees_its_row_and_a_too_long_one_is_refused(smol):
    model = smol.model
    engine = Engine(model, pad_id=0)
    try:
        request = engine.submit(Request(_chat_ids(smol, QUESTIONS[1]), max_new_tokens=500))
        next(request.tokens())
        request.cancel()
        deadline = time.monotonic() + 30
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.running == 0 and len(request.new_ids) < 500
        with pytest.raises(ValueError, match="context"):
            engine.submit(Request([1] * 10, max_new_tokens=model.cfg.max_seq_len))
    finally:
        engine.close()


def test_echo_scores_agree_with_the_backends_loglikelihood(smol):
    pairs = [("The capital of France is", " Paris"), ("2 + 2 =", " 4"), ("Hello", ", world")]
    expected = smol.loglikelihood(pairs)
    tok = smol.tokenizer
    for (context, continuation), (logprob, greedy) in zip(pairs, expected, strict=True):
        ctx, cont = smol.encode_pair(context, continuation)
        (scores,) = echo_scores(smol.model, [ctx + cont], top=1)
        assert sum(scores.logprobs[len(ctx) - 1 :]) == pytest.approx(logprob, abs=2e-3)
        tops = [alts[0][0] for alts in scores.top[len(ctx) - 1 :]]
        assert (tops == cont) == greedy
        assert len(scores.logprobs) == len(ctx + cont) - 1 and tok is not None


def test_echo_scores_reusing_a_shared_beginning_equal_scores_from_scratch(smol):
    from models.generate import EchoMemo

    tok = smol.tokenizer
    context = tok.encode("Question: which planet is largest?\nA. Mars\nB. Jupiter\nAnswer:")
    seqs = [context + tok.encode(" A"), context + tok.encode(" B"), context[:10], context]
    memo = EchoMemo(block=16)  # small blocks: the cache grows between sequences too
    for seq in seqs:
        (fresh,) = echo_scores(smol.model, [seq], top=2)
        (reused,) = echo_scores(smol.model, [seq], top=2, memo=memo)
        assert reused.logprobs == pytest.approx(fresh.logprobs, abs=1e-4)
        assert [t[0][0] for t in reused.top] == [t[0][0] for t in fresh.top]
        assert reused.next[0] == fresh.next[0] and len(reused.top[0]) == 2
    assert memo.ids == seqs[-1]


# ---------------------------------------------------------------------------- the protocol
@pytest.mark.parametrize(
    "body, chat, field",
    [
        ({"model": "m", "prompt": "x", "presence_penalty": 0.5}, False, "presence_penalty"),
        ({"model": "m", "prompt": "x", "logit_bias": {"1": 5}}, False, "logit_bias"),
        ({"model": "m", "prompt": "x", "frobnicate": 1}, False, "frobnicate"),
        ({"model": "m", "prompt": "x", "logprobs": 9}, False, "logprobs"),
        ({"model": "m", "prompt": "x", "n": 0}, False, "n"),
        ({"model": "m", "prompt": "x", "best_of": 3}, False, "best_of"),
        ({"model": "m", "prompt": [[1, 2], "x"]}, False, "prompt"),
        ({"model": "m", "prompt": [-1]}, False, "prompt"),
        ({"model": "m", "prompt": "x", "stream": True, "echo": True}, False, "stream"),
        ({"model": "m", "prompt": "x", "max_tokens": True}, False, "max_tokens"),
        ({"model": "m", "prompt": "x", "stop": [""]}, False, "stop"),
        ({"model": "m", "messages": [{"role": "bot", "content": "x"}]}, True, "messages[0]"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            True,
            "top_logprobs",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
            True,
            "tools",
        ),
        ({"prompt": "x"}, False, "model"),
        ({"model": "m", "prompt": "x", "evalhub": {}}, False, "evalhub"),
    ],
)
def test_parameters_the_server_cannot_honour_are_refused_by_name(body, chat, field):
    with pytest.raises(RequestError) as caught:
        parse(body, chat=chat)
    assert caught.value.param == field and caught.value.status == 400


def test_what_clients_send_is_parsed_as_they_mean_it():
    req = parse({"model": "m", "prompt": [[1, 2, 3], [4]], "max_tokens": 1, "echo": True,
                 "logprobs": 1, "temperature": 0, "seed": 1234}, chat=False)  # fmt: skip
    assert req.prompts == [[1, 2, 3], [4]] and req.echo and req.logprobs == 1
    assert req.args.temperature == 0 and req.args.max_new_tokens == 1 and req.seeded
    chat = parse({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}]}], "logprobs": True, "top_logprobs": 3,
        "presence_penalty": 0, "stream": True, "stream_options": {"include_usage": True}},
        chat=True)  # fmt: skip
    assert chat.messages == [{"role": "user", "content": "hi"}] and chat.logprobs == 3
    assert chat.stream and chat.include_usage


# ---------------------------------------------------------------- /v1 through the server
pytestmark_db = pytest.mark.django_db(transaction=True)


@pytest.fixture
def served(smollm2_checkpoint, carol, inference_server, monkeypatch):
    ModelVersion.objects.create(name="smollm2", backend="builtin", location=str(smollm2_checkpoint))
    token = ApiToken.issue(user=carol, name="client")[1]
    monkeypatch.setenv("OPENAI_API_KEY", token)  # lm-eval's OpenAI clients read it
    return token


@pytestmark_db
def test_echo_logprobs_token_prompts_n_and_the_servers_health(live_server, served, smol):
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=served, max_retries=0)
    ids = smol.tokenizer.encode("The capital of France is Paris")
    out = client.completions.create(
        model="smollm2", prompt=[ids], max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    (scores,) = echo_scores(smol.model, [ids], top=1)
    assert lp.token_logprobs[1:-1] == pytest.approx(scores.logprobs, abs=1e-4)
    assert out.choices[0].text.startswith("The capital of France is Paris")
    several = client.completions.create(
        model="smollm2", prompt="Once upon a time", max_tokens=6, n=3, temperature=1.0, seed=3
    )
    assert [c.index for c in several.choices] == [0, 1, 2]
    again = client.completions.create(
        model="smollm2", prompt="Once upon a time", max_tokens=6, n=3, temperature=1.0, seed=3
    )
    assert [c.text for c in again.choices] == [c.text for c in several.choices]
    stopped = client.completions.create(
        model="smollm2", prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0, stop=[","]
    )
    assert "," not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model="smollm2", prompt="x", presence_penalty=1.0)
    health = httpx.get(f"{inference_server_url()}/healthz").json()
    assert health["status"] == "ok" and health["models"] and health["requests"] >= 4
    metrics = httpx.get(f"{inference_server_url()}/metrics").text
    assert "evalhub_inference_completion_tokens_total" in metrics
    refused = httpx.post(f"{inference_server_url()}/v1/completions", json={"model": "x"})
    assert refused.status_code == 401  # only the web app (and holders of the token) may ask


def inference_server_url() -> str:
    from django.conf import settings

    return settings.INFERENCE_URL


@pytestmark_db
def test_an_unreachable_server_is_a_503_that_says_so(client, served, settings, monkeypatch):
    settings.INFERENCE_URL = "http://127.0.0.1:9"  # nothing listens there
    monkeypatch.setattr(inference, "CONNECT_PATIENCE_S", 0.5)
    response = client.post(
        "/v1/chat/completions",
        {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {served}",
    )
    assert response.status_code == 503
    assert "inference server" in response.json()["error"]["message"]


@pytestmark_db
def test_the_model_pages_prompt_box_streams_from_the_server(login, carol, served):
    model = ModelVersion.objects.get(name="smollm2")
    response = login(carol).post(
        reverse("model_try", args=[model.pk]),
        {"prompt": "What is the capital of France?", "max_tokens": 12, "temperature": 0},
    )
    text = b"".join(response.streaming_content).decode()
    assert response.status_code == 200 and "Paris" in text


@pytestmark_db
def test_lm_evals_local_completions_scores_mmlu_through_v1_as_evalhub_does(
    live_server, served, smol, smollm2_checkpoint
):
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from suites.mmlu import MMLU

    suite = MMLU()
    examples = suite.examples(limit=4)
    pairs = [tuple(r) for ex in examples for r in suite.requests(ex)]
    lm = LocalCompletionsAPI(
        base_url=f"{live_server.url}/v1/completions",
        model="smollm2",
        tokenizer_backend="huggingface",
        tokenizer=str(smollm2_checkpoint),
        max_retries=1,
    )
    theirs = lm.loglikelihood(
        [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
        disable_tqdm=True,
    )
    ours = smol.loglikelihood(pairs)
    for (a, greedy_a), (b, greedy_b) in zip(theirs, ours, strict=True):
        assert a == pytest.approx(b, abs=2e-3) and greedy_a == greedy_b

    def accuracy(scores):
        per = [scores[4 * i : 4 * i + 4] for i in range(len(examples))]
        return [suite.score(ex, s).metrics["acc"] for ex, s in zip(examples, per, strict=True)]

    assert accuracy(theirs) == accuracy(ours)


@pytestmark_db
def test_lm_evals_local_chat_completions_generates_through_v1(live_server, served):
    from lm_eval.api.instance import Instance
    from lm_eval.models.api_models import JsonChatStr
    from lm_eval.models.openai_completions import LocalChatCompletion

    lm = LocalChatCompletion(
        base_url=f"{live_server.url}/v1/chat/completions",
        model="smollm2",
        tokenizer_backend=None,
        max_retries=1,
        num_concurrent=2,
    )
    chats = [JsonChatStr(json.dumps([{"role": "user", "content": q}])) for q in QUESTIONS[:2]]
    args = {"until": ["\n\n"], "max_gen_toks": 16, "do_sample": False}
    requests = [Instance("generate_until", {}, (c, args), i) for i, c in enumerate(chats)]
    # lm-eval runs concurrent requests with asyncio.run: from a thread of their own, since the
    # browser tests' Playwright may have an event loop running in this one.
    with ThreadPoolExecutor(1) as pool:
        outputs = pool.submit(lm.generate_until, requests, disable_tqdm=True).result()
    assert "Paris" in outputs[0] and all(isinstance(o, str) and o for o in outputs)


@pytestmark_db
def test_jobs_can_send_their_calls_to_the_inference_server(
    smollm2_checkpoint, inference_server, settings
):
    """EVALHUB_JOBS_USE_INFERENCE_SERVER: a generation job's texts and an eval run's scores
    come from the server (no model loaded in the worker) and equal the in-worker results."""
    from core.jobs import KINDS, execute
    from core.models import Job
    from evalhub.registry import LOADED, backend_for
    from grading.models import Item
    from models.backends import GenerationArgs

    model = ModelVersion.objects.create(
        name="smol", backend="builtin", location=str(smollm2_checkpoint)
    )
    prompts = ["Say hello.", "Name a fruit.", "Count to three."]
    local = load_backend("builtin", str(smollm2_checkpoint), draft=None)
    expected = local.generate(
        [local.chat_format([{"role": "user", "content": p}]) for p in prompts],
        GenerationArgs(max_new_tokens=6),
    )
    settings.JOBS_USE_INFERENCE_SERVER = True
    LOADED.clear()
    served = backend_for(model)
    assert served.info()["kind"] == "openai_http" and not LOADED.keys()
    before = inference_server.metrics.requests
    job = Job.objects.create(
        kind="generate",
        params={"models": [model.pk], "prompts": prompts, "max_new_tokens": 6,
                "campaign": {"name": "via server", "kind": "single_sided"}},
    )  # fmt: skip
    execute(job.pk, KINDS["generate"].job_fn)
    job.refresh_from_db()
    assert job.status == "succeeded", job.error
    texts = {
        i.prompt: i.responses.get().text for i in Item.objects.filter(campaign__name="via server")
    }
    assert [texts[p] for p in prompts] == expected
    assert inference_server.metrics.requests >= before + len(prompts)
    assert served.loglikelihood([("The capital of France is", " Paris")])[0][0] == pytest.approx(
        local.loglikelihood([("The capital of France is", " Paris")])[0][0], abs=2e-3
    )


def test_a_body_that_is_not_an_object_is_a_400_from_the_server(inference_app):
    auth = {"Authorization": f"Bearer {inference_app.token}"}
    for body in (b"null", b"[1, 2]", b"{bad json"):
        answer = httpx.post(f"{inference_app.url}/v1/completions", content=body, headers=auth)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == 400

"""Task adapters on the platform: an ``adapter.train`` job fine-tunes a LoRA adapter by SFT,
fresh on a policy or starting from a recovery adapter, saves it in PEFT's layout (``peft``
loads it onto the Hugging Face version of the base with the same logits), registers it with
its lineage, and every adapter of one base is served through ``/v1``, generation jobs and
eval runs on one loaded copy of that base."""

from pathlib import Path

import pytest
import torch
from django.urls import reverse

from core.jobs import KINDS, execute
from core.models import ApiToken, Job
from evalhub.models import EvalRun, ModelVersion
from evalhub.registry import LOADED, backend_for
from tests.models.conftest import save_tiny_checkpoint
from tests.models.test_lora import _hf_llama
from tests.models.test_posttrain_jobs import campaign  # noqa: F401

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="session")
def llama_checkpoint(smollm2_gguf, tmp_path_factory):
    """A 2-layer plain Llama (no q/k norm, so transformers runs it too) over SmolLM2's
    vocabulary and tokenizer."""
    path = tmp_path_factory.mktemp("adapters") / "tiny-llama"
    return save_tiny_checkpoint(path, smollm2_gguf, qk_norm=False)


@pytest.fixture
def base(llama_checkpoint):
    from evalhub.registry import checkpoint_stats

    LOADED.clear()  # the process's cache: earlier tests' backends would hide what loads here
    return ModelVersion.objects.create(
        name="tiny-llama",
        backend="builtin",
        location=str(llama_checkpoint),
        **checkpoint_stats(llama_checkpoint),
    )


def _run(kind: str, params: dict) -> Job:
    job = Job.objects.create(kind=kind, params=params)
    execute(job.pk, KINDS[kind].job_fn)
    job.refresh_from_db()
    return job


TRAIN = {"max_steps": 6, "epochs": 10, "lr": 3e-3, "batch_size": 2, "max_len": 64, "suites": []}


def test_a_task_adapter_trains_from_a_campaign_and_peft_loads_it(base, campaign):  # noqa: F811
    job = _run(
        "adapter.train",
        {
            "model_id": base.pk,
            "campaign_ids": [campaign.pk],
            "rank": 8,
            **TRAIN,
            "suites": ["gsm8k"],
            "eval_limit": 2,
        },
    )
    assert job.status == "succeeded", job.error
    adapter = ModelVersion.objects.get(pk=job.result["model_id"])
    assert adapter.kind == "adapter" and adapter.parent == base
    assert adapter.relation == "adapter_of" and adapter.location == base.location
    info = adapter.info["adapter"]
    assert info["kind"] == "task" and info["rank"] == 8 and info["init_from"] is None
    assert info["steps"] == 6 and info["data"]["campaign_ids"] == [campaign.pk]
    assert len(job.data["curves"]["loss"]["value"]) == 6
    files = sorted(p.name for p in Path(adapter.params["adapter"]).iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    assert EvalRun.objects.get(model=adapter).suite == "gsm8k"

    peft = pytest.importorskip("peft")
    from models.checkpoint import load_checkpoint
    from models.lora import adapters_disabled, load_adapter

    ours = load_checkpoint(base.location).eval()
    hf = _hf_llama(ours)
    load_adapter(ours, adapter.params["adapter"])
    ids = torch.tensor([[1, 200, 3000, 45, 7, 9000]])
    theirs = peft.PeftModel.from_pretrained(hf, adapter.params["adapter"]).eval()
    with torch.no_grad():
        mine, reference = ours(ids), theirs(input_ids=ids).logits
        with adapters_disabled(ours):
            assert (mine - ours(ids)).abs().max() > 1e-3  # training moved the adapter
    torch.testing.assert_close(reference, mine, rtol=1e-4, atol=1e-4)


def test_a_task_adapter_starts_from_the_recovery_adapter_and_shares_its_base(
    base, client, carol, inference_server
):
    compressed = _run(
        "compress",
        {
            "model_id": base.pk,
            "bits": 4,
            "calib_seqs": 2,
            "eval_seqs": 1,
            "max_len": 48,
            "suites": [],
        },
    )
    assert compressed.status == "succeeded", compressed.error
    palettized = ModelVersion.objects.get(pk=compressed.result["model_id"])
    recovered = _run(
        "adapter.recovery",
        {
            "model_id": palettized.pk,
            "rank": 8,
            "steps": 2,
            "batch_size": 2,
            "train_seqs": 4,
            "eval_seqs": 1,
            "max_len": 48,
            "suites": [],
        },
    )
    assert recovered.status == "succeeded", recovered.error
    recovery = ModelVersion.objects.get(pk=recovered.result["model_id"])
    job = _run(
        "adapter.train",
        {
            "model_id": recovery.pk,
            "source": "alpaca-eval",
            "limit": 8,
            "name": "tiny-task",
            **TRAIN,
        },
    )
    assert job.status == "succeeded", job.error
    task = ModelVersion.objects.get(name="tiny-task")
    assert task.parent == recovery and task.relation == "trained_from"
    assert task.location == palettized.location  # served on the palettized base
    info = task.info["adapter"]
    assert info["init_from"] == recovery.name and info["base"] == palettized.name
    assert info["rank"] == 8  # the recovery adapter's rank, not the fresh default of 16
    assert [m.name for m in task.lineage()] == [
        "tiny-task",
        recovery.name,
        palettized.name,
        base.name,
    ]

    # one loaded copy of the palettized base serves it, the recovery adapter and the base
    backends = [backend_for(m) for m in (palettized, recovery, task)]
    assert backends[1].base is backends[0] and backends[2].base is backends[0]
    assert sum(1 for key in LOADED.keys() if key[0] == "backend") == 1
    client.force_login(carol)
    _, token = ApiToken.issue(user=carol, name="v1")
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    names = [m["id"] for m in client.get("/v1/models", **auth).json()["data"]]
    assert {"tiny-task", recovery.name} <= set(names)
    texts = {}
    for name in ("tiny-task", recovery.name, palettized.name):
        response = client.post(
            "/v1/completions",
            data={
                "model": name,
                "prompt": "Hello there",
                "max_tokens": 6,
                "temperature": 0,
                "stop": ["</never>"],
            },
            content_type="application/json",
            **auth,
        )
        assert response.status_code == 200, response.content
        texts[name] = response.json()["choices"][0]["text"]
    from models.backends import GenerationArgs

    args = GenerationArgs(max_new_tokens=6, temperature=0, stop=("</never>",))
    for name, version in (("tiny-task", task), (recovery.name, recovery)):
        alone = _alone(version).generate(["Hello there"], args)[0]
        assert texts[name] == alone  # the per-call swap answers as a backend of its own
    # scores (what eval runs ask for) swap too: each adapter's own, none of another's
    pairs = [("Hello there, how are", " you today?"), ("The sky is", " blue.")]
    scored = {m.name: backend_for(m).loglikelihood(pairs) for m in (task, palettized, recovery)}
    for version in (task, recovery):
        expected = _alone(version).loglikelihood(pairs)
        assert [s for s, _ in scored[version.name]] == pytest.approx([s for s, _ in expected])
    assert scored["tiny-task"][0][0] != pytest.approx(scored[palettized.name][0][0])

    page = client.get(reverse("model_detail", args=[task.pk])).content.decode()
    assert "Task adapter" in page and recovery.name in page
    assert (
        "Train a task adapter"
        in client.get(reverse("model_detail", args=[recovery.pk])).content.decode()
    )


def _alone(version: ModelVersion):
    """The adapter put on a model loaded for it alone (``load_adapter``: its own wrappers, no
    routing, no shared caches): the reference for the shared base's per-call swaps."""
    from models.backends.builtin import BuiltinBackend
    from models.lora import load_adapter

    backend = BuiltinBackend(version.location, draft=None)
    load_adapter(backend.model, version.params["adapter"])
    return backend


def test_a_generation_job_serves_two_adapters_and_their_base_from_one_copy(base, campaign):  # noqa: F811
    first = _run("adapter.train", {"model_id": base.pk, "campaign_ids": [campaign.pk], **TRAIN})
    second = _run(
        "adapter.train",
        {"model_id": first.result["model_id"], "campaign_ids": [campaign.pk], **TRAIN},
    )
    assert first.status == second.status == "succeeded", (first.error, second.error)
    ids = [base.pk, first.result["model_id"], second.result["model_id"]]
    job = _run(
        "generate",
        {"models": ids, "prompts": ["Name a colour.", "Say hi."], "max_new_tokens": 4},
    )
    assert job.status == "succeeded", job.error
    assert sum(1 for key in LOADED.keys() if key[0] == "backend") == 1


def test_manage_py_trains_a_task_adapter_from_an_adapter(base, campaign):  # noqa: F811
    from io import StringIO

    from django.core.management import call_command

    first = _run("adapter.train", {"model_id": base.pk, "campaign_ids": [campaign.pk], **TRAIN})
    assert first.status == "succeeded", first.error
    out = StringIO()
    call_command(
        "posttrain",
        f"--model={first.result['name']}",
        "--algorithm=adapter",
        "--source=alpaca-eval",
        "--limit=6",
        "--max-steps=2",
        "--batch-size=2",
        "--lora-rank=8",  # ignored: a started adapter keeps its rank (16, the default)
        "--suites=",
        "--name=tiny-cli-task",
        stdout=out,
    )
    task = ModelVersion.objects.get(name="tiny-cli-task")
    assert "registered tiny-cli-task" in out.getvalue()
    assert task.parent_id == first.result["model_id"] and task.kind == "adapter"
    assert task.info["adapter"]["rank"] == 16 and task.info["adapter"]["data"]["limit"] == 6


def test_the_model_page_starts_a_task_adapter_job(base, campaign, login, carol):  # noqa: F811
    client = login(carol)
    page = client.get(reverse("model_detail", args=[base.pk])).content.decode()
    assert "Train a task adapter" in page
    response = client.post(
        reverse("model_adapter_train", args=[base.pk]),
        {"campaigns": [campaign.pk], "rank": 16, "epochs": 1, "batch_size": 4, "lr": "2e-4"},
    )
    job = Job.objects.get()
    assert response.status_code == 302 and job.kind == "adapter.train"
    assert job.params["model_id"] == base.pk and job.params["campaign_ids"] == [campaign.pk]
    bad = client.post(reverse("model_adapter_train", args=[base.pk]), {"rank": 16})
    assert bad.status_code == 400 and Job.objects.count() == 1  # no data chosen


@pytest.mark.parametrize(
    "params, message",
    [
        ({"rank": 5}, "'rank'"),
        ({"campaign_ids": None}, "'campaign_ids'"),
        ({"model_id": 0}, "'model_id'"),
    ],
)
def test_bad_task_adapter_parameters_fail_clearly(params, message, base, campaign):  # noqa: F811
    job = _run(
        "adapter.train",
        {"model_id": base.pk, "campaign_ids": [campaign.pk], **TRAIN, **params},
    )
    assert job.status == "failed" and message in job.error and not job.traceback
    assert not ModelVersion.objects.filter(kind="adapter").exists()

"""Post-training end to end on the platform: a campaign's labels → SFT / DPO / IPO job on a
registered model → a new registered model with lineage, curves on its job page, suites queued
on it. A tiny decoder with SmolLM2's real tokenizer keeps each job to a few seconds."""

import pytest
from django.urls import reverse

from core.jobs import KINDS, execute
from core.models import Job
from evalhub.models import EvalRun, ModelVersion
from grading.models import Item, Response
from grading.services import assignment_claim, assignment_submit
from tests.factories import UserFactory, make_campaign

pytestmark = pytest.mark.django_db


@pytest.fixture
def campaign():
    campaign = make_campaign(name="pt", overlap=1)
    for i in range(12):
        item = Item.objects.create(campaign=campaign, prompt=f"Name a colour, number {i}.")
        Response.objects.create(item=item, position=0, text=f"Blue, number {i}.", model_name="a")
        Response.objects.create(item=item, position=1, text="I cannot.", model_name="b")
    rater = UserFactory(username="sim")
    levels = ["significantly_better", "better", "slightly_better", "tie_both_good"]
    n = 0
    while (a := assignment_claim(rater=rater, campaign=campaign)) is not None:
        level = levels[n % 4]
        side = "left" if a.left_position == 0 else "right"
        choice = level if level.startswith("tie") else f"{side}_{level}"
        assignment_submit(assignment=a, data={"choice": choice})
        n += 1
    return campaign


def _run(kind: str, params: dict) -> Job:
    job = Job.objects.create(kind=kind, params=params)
    execute(job.pk, KINDS[kind].job_fn)
    job.refresh_from_db()
    return job


@pytest.mark.parametrize("algorithm", ["sft", "dpo", "ipo"])
def test_a_posttrain_job_registers_a_child_with_lineage_curves_and_queued_suites(
    algorithm, parent, campaign, login, carol
):
    kind = "posttrain.sft" if algorithm == "sft" else "posttrain.dpo"
    job = _run(
        kind,
        {
            "model_id": parent.pk,
            "campaign_ids": [campaign.pk],
            "loss": algorithm,
            "max_steps": 3,
            "epochs": 10,  # SFT packs the 9 short conversations into one row an epoch
            "batch_size": 4,
            "lr": 1e-3,
            "suites": ["gsm8k"],
            "eval_limit": 5,
        },
    )
    assert job.status == "succeeded", job.error
    child = ModelVersion.objects.get(pk=job.result["model_id"])
    assert child.parent == parent and child.relation == "trained_from"
    info = child.info["posttrain"]
    assert info["algorithm"] == algorithm and info["steps"] == 3
    assert len(info["data_hash"]) == 64 and len(info["data"]["labels_hash"]) == 64
    assert info["n_examples"] == (9 if algorithm == "sft" else 12)  # SFT leaves ties out
    assert len(job.data["curves"]["loss"]["value"]) == 3
    run = EvalRun.objects.get(model=child)
    assert run.suite == "gsm8k" and run.settings["limit"] == 5 and run.job.kind == "evaluate"

    from models.checkpoint import load_checkpoint, read_config

    _, meta = read_config(child.location)
    assert meta["step"] == 3 and meta["parent"]["path"] == parent.location
    trained, base = load_checkpoint(child.location), load_checkpoint(parent.location)
    changed = [
        k for k, v in trained.state_dict().items() if not bool((v == base.state_dict()[k]).all())
    ]
    assert changed, "training changed no weight"
    page = login(carol).get(reverse("job_detail", args=[job.pk])).content.decode()
    assert page.count("<polyline") >= 2 and "loss curve" in page
    assert reverse("model_detail", args=[child.pk]) in page  # a link to the result
    child_page = login(carol).get(reverse("model_detail", args=[child.pk])).content.decode()
    assert algorithm.upper() in child_page and "tiny-base" in child_page  # lineage shown


def test_lora_training_is_merged_into_a_dense_child(parent, campaign):
    job = _run(
        "posttrain.sft",
        {
            "model_id": parent.pk,
            "campaign_ids": [campaign.pk],
            "max_steps": 2,
            "epochs": 10,
            "batch_size": 4,
            "lora_rank": 4,
            "lr": 1e-2,
            "suites": [],
        },
    )
    assert job.status == "succeeded", job.error
    child = ModelVersion.objects.get(pk=job.result["model_id"])
    from models.checkpoint import load_checkpoint

    trained, base = load_checkpoint(child.location), load_checkpoint(parent.location)
    assert trained.state_dict().keys() == base.state_dict().keys()  # merged: no adapter tensors
    assert child.info["posttrain"]["hyperparameters"]["lora_rank"] == 4
    assert not EvalRun.objects.filter(model=child).exists()


@pytest.mark.parametrize(
    "params, message",
    [
        ({"lr": "fast"}, "'lr'"),
        ({"epochs": 0}, "'epochs'"),
        ({"suites": ["nope"]}, "unknown suites"),
        ({"campaign_ids": None}, "campaign_ids"),
    ],
)
def test_bad_parameters_fail_the_job_with_a_message_naming_the_field(
    params, message, parent, campaign
):
    job = _run("posttrain.sft", {"model_id": parent.pk, "campaign_ids": [campaign.pk], **params})
    assert job.status == "failed" and message in job.error and not job.traceback
    assert ModelVersion.objects.count() == 1


def test_the_model_page_starts_a_posttrain_job_and_rejects_a_form_without_data(
    parent, campaign, login, carol
):
    client = login(carol)
    page = client.get(reverse("model_detail", args=[parent.pk])).content.decode()
    assert "Post-train this model" in page
    bad = client.post(reverse("model_posttrain", args=[parent.pk]), {"algorithm": "dpo"})
    assert bad.status_code == 400 and "choose at least one campaign" in bad.content.decode()
    assert not Job.objects.exists()
    response = client.post(
        reverse("model_posttrain", args=[parent.pk]),
        {
            "algorithm": "dpo",
            "campaigns": [campaign.pk],
            "epochs": 1,
            "batch_size": 4,
            "lora_rank": 8,
            "beta": 0.1,
            "level_aware": "on",
            "suites": ["ifeval"],
        },
    )
    job = Job.objects.get()
    assert response.status_code == 302 and response.url == reverse("job_detail", args=[job.pk])
    assert job.kind == "posttrain.dpo" and job.params["loss"] == "dpo"
    assert job.params["campaign_ids"] == [campaign.pk] and job.params["lora_rank"] == 8
    assert job.params["level_aware"] is True and job.params["suites"] == ["ifeval"]
    client.post(
        reverse("model_posttrain", args=[parent.pk]),
        {"algorithm": "mdloo", "iterations": 5, "k": 3, "lora_rank": 4, "epochs": 1}
        | {"batch_size": 8, "beta": 0.1},  # what the browser sends: every initial value
    )
    rl = Job.objects.get(kind="posttrain.rl")  # RL needs no campaign: its prompts are built
    assert rl.params["algorithm"] == "mdloo" and rl.params["iterations"] == 5
    assert rl.params["k"] == 3 and "campaign_ids" not in rl.params


def test_manage_py_posttrain_runs_ipo_in_process_and_registers_the_result(parent, campaign):
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command(
        "posttrain",
        "--model=tiny-base",
        "--algorithm=ipo",
        f"--campaign={campaign.pk}",
        "--max-steps=2",
        "--batch-size=4",
        "--lora-rank=2",
        "--suites=",
        "--name=tiny-ipo",
        stdout=out,
    )
    child = ModelVersion.objects.get(name="tiny-ipo")
    assert "registered tiny-ipo" in out.getvalue() and child.parent == parent
    assert child.info["posttrain"]["algorithm"] == "ipo" and child.info["posttrain"]["steps"] == 2
    job = Job.objects.get(kind="posttrain.dpo")
    assert job.status == "succeeded" and job.progress == 1.0


@pytest.mark.parametrize("algorithm", ["mdloo", "reinforce"])
def test_an_rl_job_rewards_constrained_prompts_and_registers_the_policy(algorithm, parent):
    job = _run(
        "posttrain.rl",
        {
            "model_id": parent.pk,
            "algorithm": algorithm,
            "limit": 4,
            "k": 2,
            "prompts_per_step": 2,
            "iterations": 2,
            "inner_steps": 2,
            "max_new_tokens": 4,
            "lr": 1e-3,
            "lora_rank": 2,
            "suites": ["ifeval"],
            "eval_limit": 3,
        },
    )
    assert job.status == "succeeded", job.error
    child = ModelVersion.objects.get(pk=job.result["model_id"])
    info = child.info["posttrain"]
    assert info["algorithm"] == algorithm and info["steps"] == 2 and info["n_examples"] == 4
    assert info["data"]["terms"] == [{"weight": 1.0, "kind": "IFEvalVerifier"}]
    for metric in ("reward_mean", "kl_ref", "entropy", "response_length"):
        assert len(job.data["curves"][metric]["value"]) == 2, metric
    assert EvalRun.objects.get(model=child).suite == "ifeval"


def test_an_rl_job_without_any_reward_term_fails_before_training(parent):
    job = _run("posttrain.rl", {"model_id": parent.pk, "ifeval_weight": 0, "limit": 4})
    assert job.status == "failed" and "no reward" in job.error
    assert ModelVersion.objects.count() == 1


def test_manage_py_posttrain_runs_mdloo(parent):
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command(
        "posttrain",
        "--model=tiny-base",
        "--algorithm=mdloo",
        "--iterations=1",
        "--k=2",
        "--limit=2",
        "--max-new-tokens=4",
        "--lora-rank=2",
        "--suites=",
        "--name=tiny-rl",
        stdout=out,
    )
    child = ModelVersion.objects.get(name="tiny-rl")
    assert "registered tiny-rl" in out.getvalue() and child.info["posttrain"]["steps"] == 1

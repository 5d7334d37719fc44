"""iTeC end to end: a committee of registered models samples, a reward model retrained from a
campaign's labels reranks, the student is fine-tuned on the best answers and registered with
lineage, the committee's samples become a new campaign, and the rounds page shows it all."""

import pytest
from django.urls import reverse

from core.jobs import KINDS, execute
from core.models import Job, JobStep
from evalhub.models import ModelVersion
from grading.models import Campaign, Item
from tests.models.test_posttrain_jobs import campaign  # noqa: F401

pytestmark = pytest.mark.django_db

PROMPTS = ["Name a colour.", "Name a fruit.", "Name a city.", "Name a river."]


@pytest.fixture
def member(tiny_checkpoint):  # noqa: F811
    return ModelVersion.objects.create(
        name="tiny-member", backend="builtin", location=str(tiny_checkpoint)
    )


def _round(parent, member, campaign, **extra):  # noqa: F811
    params = {
        "round": 1,
        "committee": [parent.pk, member.pk],
        "student": parent.pk,
        "retrain_from": [campaign.pk],
        "reward_params": {"epochs": 2},
        "prompts": PROMPTS,
        "n_samples": 2,
        "max_new_tokens": 6,
        "temperature": 1.0,
        "max_steps": 2,
        "epochs": 10,
        "batch_size": 2,
        "lr": 1e-3,
        "suites": [],
        "campaign": {"overlap": 1},
        **extra,
    }
    job = Job.objects.create(kind="itec.round", params=params)
    execute(job.pk, KINDS["itec.round"].job_fn)
    job.refresh_from_db()
    return job


def test_an_itec_round_trains_the_student_on_reranked_committee_samples_and_opens_a_campaign(
    parent,  # noqa: F811
    member,
    campaign,  # noqa: F811
    login,
    carol,
):
    job = _round(parent, member, campaign)
    assert job.status == "succeeded", job.error
    result = job.result
    child = ModelVersion.objects.get(pk=result["model_id"])
    assert child.parent == parent and child.info["posttrain"]["algorithm"] == "itec"
    data = child.info["posttrain"]["data"]
    assert data["committee"] == ["tiny-base", "tiny-member"] and data["n_samples"] == 2
    reward = ModelVersion.objects.get(name=result["reward_model"])
    assert reward.kind == "reward" and data["reward_model_id"] == reward.pk
    shares = [m["chosen_share"] for m in result["members"].values()]
    assert len(shares) == 2 and sum(shares) == pytest.approx(1.0)
    # the committee's samples, one pair of members per prompt, wait for raters
    new = Campaign.objects.get(pk=result["campaign_id"])
    items = Item.objects.filter(campaign=new)
    assert new.kind == "side_by_side" and items.count() == len(PROMPTS)
    assert {r.model_name for i in items for r in i.responses.all()} == {
        "tiny-base",
        "tiny-member",
    }
    # each committee batch was a resumable step: a redelivery samples nothing again
    assert JobStep.objects.filter(job=job).count() == 2

    page = login(carol).get(reverse("itec")).content.decode()
    assert child.name in page and new.name in page and "0/4 labels" in page
    # the next round's form proposes the result as student and the campaigns to retrain from
    assert f'value="{child.pk}" selected' in page


def test_a_round_without_a_reward_model_fails_clearly_and_registers_nothing(
    parent,  # noqa: F811
    member,
    campaign,  # noqa: F811
):
    job = _round(parent, member, campaign, retrain_from=None)
    assert job.status == "failed" and "reward_model" in job.error
    assert ModelVersion.objects.count() == 2


def test_the_itec_form_rejects_a_round_without_reward_and_starts_a_valid_one(
    parent,  # noqa: F811
    member,
    campaign,  # noqa: F811
    login,
    carol,
):
    client = login(carol)
    form = {
        "committee": [parent.pk, member.pk],
        "student": parent.pk,
        "source": "alpaca-eval",
        "limit": 8,
        "n_samples": 2,
        "temperature": 0.8,
        "max_new_tokens": 32,
        "lora_rank": 8,
        "epochs": 1,
        "overlap": 1,
        "publish": "on",
    }
    bad = client.post(reverse("itec_start"), form)
    assert bad.status_code == 400 and "choose a reward model" in bad.content.decode()
    assert not Job.objects.exists()
    response = client.post(reverse("itec_start"), {**form, "retrain_from": [campaign.pk]})
    job = Job.objects.get()
    assert response.status_code == 302 and job.kind == "itec.round"
    assert job.params["committee"] == [parent.pk, member.pk] and job.params["round"] == 1
    assert job.params["retrain_from"] == [campaign.pk] and job.params["campaign"] == {"overlap": 1}

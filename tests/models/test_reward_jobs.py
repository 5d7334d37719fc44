"""Reward models end to end: labels from a real campaign → training job → registered reward
model with lineage → scoring API and best-of-N reranking."""

import json

import pytest
from django.urls import reverse

from core.jobs import KINDS, execute
from core.models import ApiToken, Job
from evalhub.models import ModelVersion
from grading.models import Item, Response
from grading.services import assignment_claim, assignment_submit
from tests.factories import UserFactory, make_campaign

pytestmark = pytest.mark.django_db

GOOD = "{}: here is a clear, correct and complete answer with an example and a short summary."
BAD = "no"


@pytest.fixture
def labelled_campaign():
    campaign = make_campaign(name="rm", overlap=1)
    for i in range(40):
        item = Item.objects.create(campaign=campaign, prompt=f"Explain topic number {i}.")
        Response.objects.create(
            item=item, position=0, text=GOOD.format(f"Topic {i}"), model_name="good"
        )
        Response.objects.create(item=item, position=1, text=BAD, model_name="bad")
    rater = UserFactory(username="sim")
    levels = ["significantly_better", "better", "slightly_better"]
    n = 0
    while (a := assignment_claim(rater=rater, campaign=campaign)) is not None:
        side = "left" if a.left_position == 0 else "right"  # the rater prefers the good answer
        assignment_submit(assignment=a, data={"choice": f"{side}_{levels[n % 3]}"})
        n += 1
    return campaign


def test_a_reward_model_trains_from_campaign_labels_and_scores_through_the_api(
    labelled_campaign, client, carol, login
):
    job = Job.objects.create(
        kind="reward.train",
        params={
            "campaign_ids": [labelled_campaign.pk],
            "epochs": 20,
            "lr": 0.01,
            "name": "rm-test",
        },
    )
    execute(job.pk, KINDS["reward.train"].job_fn)
    job.refresh_from_db()
    assert job.status == "succeeded", job.error
    assert len(job.data["loss_curve"]["loss"]) >= 2
    page = login(carol).get(reverse("job_detail", args=[job.pk])).content.decode()
    assert "<polyline" in page and "loss curve" in page  # the curve is drawn on the job page
    version = ModelVersion.objects.get(name="rm-test")
    assert version.kind == "reward" and version.info["n_train"] + version.info["n_held_out"] == 40
    assert len(version.info["labels_hash"]) == 64
    assert version.info["metrics"]["accuracy"] >= 0.9

    _, token = ApiToken.issue(user=carol, name="rm")
    response = client.post(
        reverse("api_reward_score", args=["rm-test"]),
        data=json.dumps(
            {"prompt": "Explain topic number 99.", "responses": [BAD, GOOD.format("Topic 99")]}
        ),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    body = response.json()
    assert (
        response.status_code == 200 and body["best"] == 1 and body["scores"][1] > body["scores"][0]
    )


def test_training_with_too_few_labels_fails_clearly():
    job = Job.objects.create(kind="reward.train", params={"campaign_ids": [12345]})
    execute(job.pk, KINDS["reward.train"].job_fn)
    job.refresh_from_db()
    assert job.status == "failed" and "at least 10" in job.error

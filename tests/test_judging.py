"""LLM judges on grading campaigns (issue 17 item 4): the judge job with the real SmolLM2-135M,
its agreement with the raters shown beside theirs, the page's access rules and bad input."""

from __future__ import annotations

import pytest
from django.urls import reverse

from core.jobs import KINDS, execute
from core.models import Job
from evalhub.judging import campaign_judge_report, case_for
from evalhub.models import JudgeVerdict, ModelVersion
from grading.services import assignment_claim, assignment_submit
from tests.factories import make_campaign, make_items
from tests.models.conftest import smollm2_checkpoint, smollm2_gguf  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db


def label_pair(rater, campaign, wanted: dict[int, int | None]) -> None:
    """The rater labels items: wanted[item_id] = the preferred uploaded position, or None."""
    for _ in wanted:
        a = assignment_claim(rater=rater, campaign=campaign)
        position = wanted[a.item_id]
        if position is None:
            choice = "tie_both_good"
        else:
            choice = "left_better" if a.left_position == position else "right_better"
        assignment_submit(assignment=a, data={"choice": choice})


def judge_job(campaign, model, verdicts: dict[int, str] | None = None, **params) -> Job:
    """A finished judge job with stored verdicts (the report's input, not a model's output)."""
    job = Job.objects.create(
        kind="judge",
        status=Job.SUCCEEDED,
        params={"campaign_id": campaign.pk, "model_id": model.pk, **params},
        result={"judge": model.name, "judge_version": "1"},
    )
    for item_id, vote in (verdicts or {}).items():
        JudgeVerdict.objects.create(
            job=job, item_id=item_id, mode="pairwise", prompt="pair-v1", winner=vote,
            consistent=True, outputs=[f"[[{vote}]]", f"[[{vote}]]"],
        )  # fmt: skip
    return job


@pytest.fixture
def judge_model(db):
    return ModelVersion.objects.create(name="judge-m", backend="hf", location="/nowhere")


def test_smollm2_judges_a_campaign_and_its_agreement_with_the_raters_is_shown(
    smollm2_checkpoint,  # noqa: F811
    alice,
    bob,
    carol,
    client,
):
    campaign = make_campaign(kind="side_by_side", overlap=2)
    items = make_items(campaign, 3, prompt="What is {i} plus one?")
    label_pair(alice, campaign, {items[0].pk: 0, items[1].pk: 1, items[2].pk: None})
    label_pair(bob, campaign, {items[0].pk: 0, items[1].pk: 0, items[2].pk: None})
    model = ModelVersion.objects.create(
        name="smollm2-judge", backend="builtin", location=str(smollm2_checkpoint)
    )
    job = Job.objects.create(
        kind="judge",
        params={"campaign_id": campaign.pk, "model_id": model.pk, "max_new_tokens": 24},
    )
    execute(job.pk, KINDS["judge"].job_fn)
    job.refresh_from_db()
    assert job.status == Job.SUCCEEDED, job.error
    assert job.progress == 1.0
    verdicts = list(JudgeVerdict.objects.filter(job=job))
    assert sorted(v.item_id for v in verdicts) == [i.pk for i in items]
    for v in verdicts:  # both orders were judged and kept, parsed or not
        assert len(v.outputs) == 2 and v.winner in ("A", "B", "tie", "")
        assert (v.consistent is None) == (v.winner == "")
    # The raters agree on items 0 and 2 and split on item 1: 2 of 3 pairs, 1 of 2 without ties.
    assert job.result["human"]["with_ties"] == pytest.approx(2 / 3)
    assert job.result["human"]["without_ties"] == pytest.approx(1 / 2)
    agreement = job.result["agreement"]
    votes = {v.item_id: v.winner for v in verdicts if v.winner}
    humans = {items[0].pk: ["A", "A"], items[1].pk: ["B", "A"], items[2].pk: ["tie", "tie"]}
    pairs = [(votes[i], h) for i in votes for h in humans[i]]
    assert agreement["n_with_ties"] == len(pairs)
    if pairs:
        assert agreement["with_ties"] == pytest.approx(sum(a == b for a, b in pairs) / len(pairs))
    page = client_as(client, carol).get(reverse("campaign_judges", args=[campaign.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    assert "smollm2-judge" in html and "Raters with each other" in html
    assert "0.667 (3 pairs)" in html  # the raters' own agreement, beside the judge's


def client_as(client, user):
    client.force_login(user)
    return client


def test_the_report_puts_judge_and_rater_agreement_side_by_side(judge_model, alice, bob):
    campaign = make_campaign(kind="side_by_side", overlap=2)
    items = make_items(campaign, 4)
    want = {items[0].pk: 0, items[1].pk: 1, items[2].pk: None, items[3].pk: 0}
    label_pair(alice, campaign, want)
    label_pair(bob, campaign, {**want, items[3].pk: 1})
    ids = [i.pk for i in items]
    judge_job(campaign, judge_model, {ids[0]: "A", ids[1]: "A", ids[2]: "tie", ids[3]: ""})
    report = campaign_judge_report(campaign)
    (judge,) = report["judges"]
    # judge vs raters: item0 A×(A,A) ✓✓, item1 A×(B,B) ✗✗, item2 tie×(tie,tie) ✓✓; item3 unparseable
    assert judge["agreement"]["with_ties"] == pytest.approx(4 / 6)
    assert judge["agreement"]["without_ties"] == pytest.approx(2 / 4)
    assert judge["unparseable"] == 1 and judge["n"] == 4
    # raters: items 0-2 agree, item 3 splits: 3/4 with ties, 2/3 without
    assert report["human"]["with_ties"] == pytest.approx(3 / 4)
    assert report["human"]["without_ties"] == pytest.approx(2 / 3)


def test_single_sided_judges_are_compared_on_the_raters_scale(judge_model, alice, bob):
    campaign = make_campaign(kind="single_sided", overlap=2)
    (item,) = make_items(campaign, 1)
    keys = campaign.aspect_keys
    for rater, grade in ((alice, 4), (bob, 2)):
        a = assignment_claim(rater=rater, campaign=campaign)
        assignment_submit(assignment=a, data={"scores": dict.fromkeys(keys, grade)})
    job = judge_job(campaign, judge_model)
    JudgeVerdict.objects.create(
        job=job, item=item, mode="single", prompt="single-v1", rating=8, outputs=["[[8]]"]
    )
    report = campaign_judge_report(campaign)
    # 8/10 → 4/5: exact with alice, two off bob; the raters are two apart.
    assert report["judges"][0]["agreement"] == {
        "exact": 0.5, "within_one": 0.5, "mean_abs_diff": 1.0, "n": 2
    }  # fmt: skip
    assert report["human"]["mean_abs_diff"] == 2.0 and report["human"]["n"] == 1


def test_an_items_conversation_and_reference_reach_the_judge():
    from grading.models import Item

    item = Item(
        prompt="And times three?",
        context=[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        metadata={"reference": ["4", "12"]},
    )
    case = case_for(item, ["12", "13"])
    assert case.questions == ("2+2?", "And times three?")
    assert case.answers == (("4", "12"), ("4", "13")) and case.reference == "12"
    assert case_for(Item(prompt="Hi", metadata={}), ["Hello"]).reference is None


def test_raters_get_no_judge_page_and_never_see_judge_output(judge_model, alice, carol, client):
    campaign = make_campaign(kind="side_by_side", overlap=2)
    (item,) = make_items(campaign, 1)
    judge_job(campaign, judge_model, {item.pk: "A"})
    JudgeVerdict.objects.filter(item=item).update(outputs=["JUDGE-SAYS-A [[A]]", "x"])
    url = reverse("campaign_judges", args=[campaign.pk])
    assert client_as(client, alice).get(url).status_code == 403
    a = assignment_claim(rater=alice, campaign=campaign)
    task = client.get(reverse("grading:task", args=[a.pk])).content.decode()
    assert "JUDGE-SAYS" not in task and "[[A]]" not in task and "judge" not in task.lower()
    assert "judge-m" not in task and "model-x" not in task
    html = client_as(client, carol).get(url).content.decode()
    assert "JUDGE-SAYS-A" in html


def test_judge_output_is_inert_on_the_page(judge_model, carol, client):
    campaign = make_campaign(kind="side_by_side")
    (item,) = make_items(campaign, 1)
    judge_job(campaign, judge_model, {item.pk: "B"})
    JudgeVerdict.objects.filter(item=item).update(outputs=["<script>alert(1)</script>", "y"])
    html = client_as(client, carol).get(reverse("campaign_judges", args=[campaign.pk])).content
    assert b"<script>alert(1)" not in html and b"&lt;script&gt;alert(1)" in html


def test_starting_a_judge_job_and_bad_input(judge_model, carol, client):
    campaign = make_campaign(kind="side_by_side")
    url = reverse("campaign_judges", args=[campaign.pk])
    client_as(client, carol)
    reward = ModelVersion.objects.create(
        name="rm", kind=ModelVersion.REWARD, backend="reward", location="/x"
    )
    for bad in ({"model": reward.pk}, {"model": 999_999}, {"model": judge_model.pk,
                "max_new_tokens": 1}):  # fmt: skip
        response = client.post(url, {"max_new_tokens": 64, "swap": "on", **bad})
        assert response.status_code == 400
        assert not Job.objects.filter(kind="judge").exists()
    response = client.post(url, {"model": judge_model.pk, "max_new_tokens": 64, "limit": 5})
    job = Job.objects.get(kind="judge")
    assert response.status_code == 302 and response.url == reverse("job_detail", args=[job.pk])
    assert job.params == {
        "campaign_id": campaign.pk, "model_id": judge_model.pk, "swap": False,
        "max_new_tokens": 64, "limit": 5,
    }  # fmt: skip
    assert client.get(reverse("campaign_judges", args=[999_999])).status_code == 404


def test_the_api_refuses_a_judge_job_for_a_missing_campaign_by_field(judge_model, carol, client):
    client_as(client, carol)
    body = {"kind": "judge", "params": {"campaign_id": 999_999, "model_id": judge_model.pk}}
    response = client.post(reverse("api_jobs"), body, content_type="application/json")
    assert response.status_code == 400 and "campaign_id" in response.content.decode()
    assert not Job.objects.filter(kind="judge").exists()

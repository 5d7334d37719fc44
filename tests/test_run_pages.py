"""Partial runs recorded and marked; the leaderboard's complete-runs filter, vote counts, axis
and aspect boards; the runs list's score column; the live run page; the home dashboard."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from unittest import mock

import pytest
from django.urls import reverse
from django.utils import timezone

from core.jobs import KINDS, execute
from core.models import Job
from evalhub.models import EvalRun, EvalSample, ModelVersion
from grading.services import assignment_claim, assignment_submit
from suites import REGISTRY
from suites.base import (
    Loglikelihood,
    LoglikelihoodRequest,
    SampleResult,
    Suite,
    SuiteSpec,
    summarize,
)
from tests.factories import make_campaign, make_items

pytestmark = pytest.mark.django_db


@dataclass(frozen=True)
class TinyExample:
    id: str
    topic: str
    answer: int


class Tiny(Suite[TinyExample]):
    """Twelve two-choice questions in three topics (6, 3, 3); answer 0 at even positions."""

    name = "tiny"
    version = "1"
    headline = "acc"
    category = "topic"
    spec = SuiteSpec(split="test", num_fewshot=0, fewshot_format="none")

    def examples(self, limit=None):
        sizes = {"alpha": 6, "beta": 3, "gamma": 3}
        exs = [TinyExample(f"{t}-{i}", t, i % 2) for t, n in sizes.items() for i in range(n)]
        return exs if limit is None else exs[:limit]

    def requests(self, ex):
        return [LoglikelihoodRequest(ex.id, " A"), LoglikelihoodRequest(ex.id, " B")]

    def score(self, ex, outputs: Sequence[Loglikelihood]):
        pred = 0 if outputs[0].logprob >= outputs[1].logprob else 1
        return SampleResult(ex.id, {"acc": float(pred == ex.answer)}, {}, {"topic": ex.topic})


class AlwaysA:
    """A backend that always prefers " A"; ``before_batch`` runs before each answer."""

    def __init__(self, before_batch=None):
        self.before_batch = before_batch
        self.calls = 0

    def loglikelihood(self, pairs):
        if self.before_batch is not None:
            self.before_batch(self.calls)
        self.calls += 1
        return [(0.0 if cont == " A" else -1.0, False) for _, cont in pairs]

    def info(self):
        return {"backend": "always-a"}


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(REGISTRY, "tiny", Tiny)
    return Tiny


@pytest.fixture
def policy(db):
    return ModelVersion.objects.create(name="policy-a", backend="hf", location="/nowhere")


def evaluate(run: EvalRun, backend) -> Job:
    """Run the run's evaluate job (queued first when it has none) in this process."""
    if run.job is None:
        run.job = Job.objects.create(kind="evaluate", params={"run_id": run.pk})
        run.save(update_fields=["job"])
    job = run.job
    with mock.patch("evalhub.evaluation.backend_for", return_value=backend):
        execute(job.pk, KINDS["evaluate"].job_fn)
    job.refresh_from_db()
    run.refresh_from_db()
    return job


def finished_run(model, suite="gsm8k", values=(1.0, 0.0), complete=True, age_days=0, **kw):
    run = EvalRun.objects.create(
        model=model,
        suite=suite,
        metrics={"n": len(values), "strict_match": summarize(list(values))},
        complete=complete,
        suite_size=1319,
        created_at=timezone.now() - timedelta(days=age_days),
        **kw,
    )
    EvalSample.objects.bulk_create(
        [
            EvalSample(run=run, example_id=f"ex{i}", metrics={"strict_match": v})
            for i, v in enumerate(values)
        ]
    )
    return run


# ------------------------------------------------------------------------- partial runs
def test_a_limited_run_scores_a_stratified_sample_and_is_recorded_partial(tiny, policy):
    run = EvalRun.objects.create(
        model=policy, suite="tiny", settings={"limit": 4, "seed": 5, "batch_size": 2}
    )
    job = evaluate(run, AlwaysA())
    assert job.status == "succeeded", job.error
    scored = sorted(run.samples.values_list("example_id", flat=True))
    assert scored == sorted(ex.id for ex in Tiny().sample(4, seed=5))
    topics = sorted(run.samples.values_list("category", flat=True))
    assert topics == ["alpha", "alpha", "beta", "gamma"]  # 6:3:3 of 12 → 2:1:1 of 4
    assert (run.planned, run.suite_size, run.complete) == (4, 12, False)
    assert run.manifest["seed"] == 5 and run.manifest["complete"] is False
    assert job.result["complete"] is False and job.message == "4 of 4 samples scored"


def test_a_run_without_a_limit_is_recorded_complete(tiny, policy):
    run = EvalRun.objects.create(model=policy, suite="tiny", settings={"batch_size": 5})
    evaluate(run, AlwaysA())
    assert (run.planned, run.suite_size, run.complete) == (12, 12, True)
    assert run.metrics["acc"]["mean"] == pytest.approx(7 / 12)  # answer 0 on even positions


def test_the_run_page_marks_a_partial_run_and_a_complete_one_not(tiny, policy, login, carol):
    partial = EvalRun.objects.create(model=policy, suite="tiny", settings={"limit": 4})
    evaluate(partial, AlwaysA())
    full = EvalRun.objects.create(model=policy, suite="tiny", settings={})
    evaluate(full, AlwaysA())
    client = login(carol)
    page = client.get(reverse("run_detail", args=[partial.pk])).content.decode()
    assert 'id="partial-mark"' in page and "4 of 12 examples, seed 0" in page
    assert (
        'id="partial-mark"'
        not in client.get(reverse("run_detail", args=[full.pk])).content.decode()
    )


# ------------------------------------------------------------------------- leaderboard
def test_the_leaderboard_ranks_complete_runs_only_unless_asked(policy, login, carol):
    finished_run(policy, values=[1.0, 0.0, 0.0, 0.0], age_days=2)  # complete, 0.25
    partial = finished_run(policy, values=[1.0, 1.0, 1.0, 0.0], complete=False)  # newer, 0.75
    client = login(carol)
    default = client.get(reverse("api_leaderboard")).json()
    row = next(r for r in default["rows"] if r["model"] == "policy-a")
    assert row["scores"]["gsm8k"]["mean"] == pytest.approx(0.25)
    assert row["scores"]["gsm8k"]["complete"] is True
    assert [h["run"] for h in default["partial_hidden"]] == [partial.pk]
    html = client.get(reverse("leaderboard")).content.decode()
    assert "1 newer partial score hidden" in html and "partial 4/1319" not in html

    everything = client.get(reverse("api_leaderboard") + "?partial=1").json()
    row = next(r for r in everything["rows"] if r["model"] == "policy-a")
    assert row["scores"]["gsm8k"]["mean"] == pytest.approx(0.75)
    assert row["scores"]["gsm8k"]["complete"] is False
    html = client.get(reverse("leaderboard") + "?partial=1").content.decode()
    assert "partial 4/1319" in html and "do not rank them against each other" in html


def test_a_model_with_only_a_partial_run_has_no_ranked_score(policy, login, carol):
    finished_run(policy, complete=False)
    data = login(carol).get(reverse("api_leaderboard")).json()
    assert next(r for r in data["rows"] if r["model"] == "policy-a")["scores"] == {}


def test_the_arena_board_counts_votes_per_model_and_draws_an_axis(login, carol, alice, bob):
    campaign = make_campaign(overlap=2)
    make_items(campaign, 6, models=("m-big", "m-small"))
    make_items(campaign, 2, models=("m-big", "m-tiny"))
    for rater in (alice, bob):
        while (a := assignment_claim(rater=rater, campaign=campaign)) is not None:
            assignment_submit(assignment=a, data={"choice": "left_better"})
    client = login(carol)
    data = client.get(reverse("api_leaderboard")).json()
    votes = {r["model"]: r["votes"] for r in data["rows"]}
    assert votes == {"m-big": 16, "m-small": 12, "m-tiny": 4} and data["votes"] == 16
    html = client.get(reverse("leaderboard")).content.decode()
    assert 'class="axis"' in html and html.count('class="tick"') >= 3
    assert "m-big (16 votes)" in html


def test_single_sided_aspects_get_a_board_each(login, carol, alice):
    campaign = make_campaign(name="grades", kind="single_sided", overlap=1)
    make_items(campaign, 2, models=("m-good",))
    make_items(campaign, 2, models=("m-bad",))
    while (a := assignment_claim(rater=alice, campaign=campaign)) is not None:
        grade = 5 if a.item.responses.get().model_name == "m-good" else 2
        keys = campaign.aspect_keys
        assignment_submit(assignment=a, data={"scores": dict.fromkeys(keys, grade)})
    client = login(carol)
    boards = client.get(reverse("api_leaderboard")).json()["aspect_boards"]
    assert set(boards) == set(campaign.aspect_keys)
    for rows in boards.values():
        assert [(r["model"], r["mean"], r["n"]) for r in rows] == [
            ("m-good", 5, 2),
            ("m-bad", 2, 2),
        ]
    html = client.get(reverse("leaderboard")).content.decode()
    assert html.count('class="aspect-board"') == len(campaign.aspect_keys)
    assert "instruction_following" in campaign.aspect_keys  # AFM's aspects, the default
    assert "<caption>Instruction following</caption>" in html


def test_the_leaderboard_has_columns_only_for_suites_someone_ran(policy, login, carol):
    finished_run(policy)  # gsm8k
    data = login(carol).get(reverse("api_leaderboard")).json()
    assert data["suites"] == ["gsm8k"]


# ------------------------------------------------------------------------- runs list
def test_the_runs_list_shows_the_headline_interval_and_the_partial_mark(
    policy, login, carol, django_assert_max_num_queries
):
    full = finished_run(policy, values=[1.0, 0.0, 1.0, 1.0])
    partial = finished_run(policy, values=[1.0, 0.0], complete=False)
    for _ in range(5):
        finished_run(policy)
    client = login(carol)
    with django_assert_max_num_queries(8):
        html = client.get(reverse("run_list")).content.decode()
    low, high = (
        f"{v:.3f}"
        for v in (full.metrics["strict_match"]["ci_low"], full.metrics["strict_match"]["ci_high"])
    )
    assert f'0.750 <span class="muted">[{low}, {high}]</span>' in html
    assert html.count("partial 2/1319") == 1
    only_complete = client.get(reverse("run_list") + "?complete=1").content.decode()
    assert f'data-run="{partial.pk}"' not in only_complete
    assert f'data-run="{full.pk}"' in only_complete


# ------------------------------------------------------------------------- live run page
def test_the_live_part_polls_while_queued_and_shows_rate_and_eta_while_running(
    policy, login, carol
):
    job = Job.objects.create(kind="evaluate", params={})
    run = EvalRun.objects.create(model=policy, suite="gsm8k", settings={"limit": 10}, job=job)
    client = login(carol)
    url = reverse("run_detail", args=[run.pk])
    queued = client.get(url, HTTP_HX_REQUEST="true").content.decode()
    assert queued.startswith('<section id="run-live"') and 'hx-trigger="every 2s"' in queued
    assert "queued" in queued and "0 / 10 samples" in queued and "<html" not in queued

    Job.objects.filter(pk=job.pk).update(
        status=Job.RUNNING, started_at=timezone.now() - timedelta(seconds=60)
    )
    run.planned, run.suite_size = 10, 1319
    run.save(update_fields=["planned", "suite_size"])
    EvalSample.objects.bulk_create(
        [EvalSample(run=run, example_id=f"ex{i}", metrics={"strict_match": 1.0}) for i in range(4)]
    )
    running = client.get(url, HTTP_HX_REQUEST="true").content.decode()
    assert "running" in running and "4 / 10 samples · 4.0 per min · ETA 1 min 30 s" in running
    assert 'aria-valuenow="40"' in running

    Job.objects.filter(pk=job.pk).update(status=Job.SUCCEEDED)
    run.metrics = {"n": 4, "strict_match": summarize([1.0] * 4)}
    run.save(update_fields=["metrics"])
    done = client.get(url, HTTP_HX_REQUEST="true").content.decode()
    assert "hx-trigger" not in done and 'id="metrics"' in done


# ------------------------------------------------------------------------- home dashboard
def test_the_home_dashboard_shows_jobs_campaigns_runs_and_regressions(
    policy, login, carol, alice, django_assert_max_num_queries
):
    Job.objects.create(kind="demo", status=Job.RUNNING, progress=0.3, message="step 3")
    campaign = make_campaign(name="Helpful or not", overlap=2)
    make_items(campaign, 4)
    for _ in range(3):
        assignment_submit(
            assignment=assignment_claim(rater=alice, campaign=campaign),
            data={"choice": "left_better"},
        )
    previous = finished_run(policy, values=[1.0] * 4, age_days=1)
    finished_run(
        policy,
        values=[0.0] * 4,
        complete=False,
        regressions=[
            {
                "metric": "strict_match",
                "previous_run": previous.pk,
                "diff": -1.0,
                "ci_low": -1.0,
                "ci_high": -1.0,
                "n": 4,
            }
        ],
    )
    client = login(carol)
    with django_assert_max_num_queries(12):
        html = client.get(reverse("home")).content.decode()
    assert "Job " in html and "step 3" in html
    assert "Helpful or not" in html and "3 / 8 labels" in html
    assert "partial 4/1319" in html  # the latest run, marked
    assert f"compare runs {previous.pk} and" in html

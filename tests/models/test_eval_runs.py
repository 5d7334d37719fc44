"""Eval runs end to end on SmolLM2, resume, paired comparison, regressions and the leaderboard."""

import pytest
from django.core.management import call_command
from django.urls import reverse

from core.jobs import KINDS, execute
from core.models import Job
from evalhub.evaluation import build_suite, compare_runs, regressions, run_sample
from evalhub.models import EvalRun, EvalSample, ModelVersion
from grading.services import assignment_claim, assignment_submit
from tests.factories import make_campaign, make_items

pytestmark = pytest.mark.django_db


@pytest.fixture
def smol(smollm2_checkpoint):
    return ModelVersion.objects.create(
        name="smollm2", backend="builtin", location=str(smollm2_checkpoint), tracked=True
    )


def _execute(run):
    job = Job.objects.create(kind="evaluate", params={"run_id": run.pk})
    run.job = job
    run.save(update_fields=["job"])
    execute(job.pk, KINDS["evaluate"].job_fn)
    job.refresh_from_db()
    run.refresh_from_db()
    return job


def test_an_mmlu_run_keeps_every_sample_and_a_reproducible_manifest(smol):
    run = EvalRun.objects.create(model=smol, suite="mmlu", settings={"limit": 3, "batch_size": 3})
    job = _execute(run)
    assert job.status == "succeeded", job.error
    assert run.samples.count() == 3 and run.metrics["n"] == 3
    sample = run.samples.first()
    assert sample.category == sample.details["subject"] and len(sample.details["logprobs"]) == 4
    assert (run.planned, run.suite_size, run.complete) == (3, 14042, False)  # a partial run
    assert sample.details["prompt"].startswith("The following are multiple choice questions")
    assert sample.passed == (sample.metrics["acc"] == 1.0)
    manifest = run.manifest
    assert (
        manifest["suite"] == "mmlu" and manifest["version"] and manifest["spec"]["num_fewshot"] == 5
    )
    assert manifest["packages"]["torch"] and manifest["settings"]["limit"] == 3
    assert manifest["backend_info"]


def test_a_resumed_run_scores_only_missing_samples(smol):
    run = EvalRun.objects.create(model=smol, suite="mmlu", settings={"limit": 3, "batch_size": 2})
    # one of the questions its limit and seed draw is already scored (a crashed attempt's)
    kept = run_sample(run, build_suite(run))[0]
    EvalSample.objects.create(
        run=run,
        example_id=kept.id,
        metrics={"acc": 1.0},
        details={"subject": "abstract_algebra", "marker": "kept"},
        passed=True,
    )
    _execute(run)
    assert run.samples.count() == 3
    assert run.samples.get(example_id=kept.id).details.get("marker") == "kept"


def _synthetic_run(model, values, **kw):
    from suites.base import summarize

    run = EvalRun.objects.create(
        model=model,
        suite="gsm8k",
        **kw,
        metrics={"n": len(values), "strict_match": summarize(values)},
        complete=True,
    )
    EvalSample.objects.bulk_create(
        [
            EvalSample(run=run, example_id=f"ex{i}", metrics={"strict_match": v}, passed=v > 0)
            for i, v in enumerate(values)
        ]
    )
    return run


def test_a_significant_drop_is_flagged_as_a_regression_and_noise_is_not(smol):
    before = _synthetic_run(smol, [1.0] * 80 + [0.0] * 20)
    worse = _synthetic_run(smol, [1.0] * 50 + [0.0] * 50)
    assert regressions(worse, "strict_match")[0]["previous_run"] == before.pk
    comparison = compare_runs(before, worse, "strict_match")
    assert comparison["n"] == 100 and comparison["diff"] == pytest.approx(-0.3)
    assert comparison["ci_high"] < 0 and len(comparison["changed"]) == 30
    same = _synthetic_run(smol, [1.0] * 49 + [0.0] * 51)
    assert regressions(same, "strict_match") == []


def test_the_evaluate_command_prints_the_result_table(smol, capsys):
    call_command("evaluate", model="smollm2", suite="mmlu", limit=2)
    out = capsys.readouterr().out
    assert "smollm2 on mmlu" in out and "acc" in out
    run = EvalRun.objects.get()
    assert run.job.status == "succeeded" and run.samples.count() == 2


def test_the_leaderboard_joins_benchmarks_with_human_preference(login, carol, alice, bob, smol):
    _synthetic_run(smol, [1.0, 0.0, 1.0])
    campaign = make_campaign(overlap=2)
    make_items(campaign, 10, models=("smollm2", "gpt-4o"))
    for rater in (alice, bob):
        while (a := assignment_claim(rater=rater, campaign=campaign)) is not None:
            side = "left" if a.left_position == 1 else "right"  # always prefer gpt-4o
            assignment_submit(assignment=a, data={"choice": f"{side}_better"})
    client = login(carol)
    page = client.get(reverse("leaderboard")).content.decode()
    assert "gpt-4o" in page and "smollm2" in page and "<svg" in page
    data = client.get(reverse("api_leaderboard")).json()
    ranks = {row["model"]: row["rating"]["rank"] for row in data["rows"] if row["rating"]}
    assert ranks["gpt-4o"] == 1 and ranks["smollm2"] == 2 and data["votes"] == 20
    smol_row = next(r for r in data["rows"] if r["model"] == "smollm2")
    assert smol_row["scores"]["gsm8k"]["mean"] == pytest.approx(2 / 3)


def test_run_drilldown_filters_failures_and_flags_show_in_json(login, carol, smol):
    _synthetic_run(smol, [1.0] * 90 + [0.0] * 10)
    worse = _synthetic_run(smol, [1.0] * 40 + [0.0] * 60)
    worse.regressions = regressions(worse, "strict_match")
    worse.save(update_fields=["regressions"])
    client = login(carol)
    page = client.get(reverse("run_detail", args=[worse.pk]) + "?failures=1").content.decode()
    assert "ex45" in page and "ex5<" not in page
    flags = client.get(reverse("api_regressions")).json()["regressions"]
    assert flags[0]["run"] == worse.pk and flags[0]["suite"] == "gsm8k"
    assert "Regressions" in client.get(reverse("leaderboard")).content.decode()


def test_nightly_submits_a_run_per_tracked_model_and_suite(
    smol, django_capture_on_commit_callbacks
):
    from unittest import mock

    from evalhub.evaluation import nightly_submit

    with mock.patch.object(KINDS["evaluate"], "apply_async") as enqueue:
        with django_capture_on_commit_callbacks(execute=True):
            nightly_submit()
    limits = dict(EvalRun.objects.filter(nightly=True).values_list("suite", "settings__limit"))
    assert limits == {"gsm8k": 50, "mmlu": 200, "ifeval": 50}  # the suites' nightly_limit
    assert enqueue.call_count == 3


def test_a_suites_detail_filter_narrows_the_run_page(login, carol, smol):
    run = EvalRun.objects.create(model=smol, suite="ifeval", metrics={"n": 2})
    EvalSample.objects.bulk_create(
        [
            EvalSample(
                run=run, example_id="comma", details={"instructions": ["punctuation:no_comma"]}
            ),
            EvalSample(
                run=run, example_id="upper", details={"instructions": ["change_case:upper"]}
            ),
        ]
    )
    client = login(carol)
    page = client.get(reverse("run_detail", args=[run.pk]) + "?detail=change_case:upper")
    assert 'name="detail"' in page.content.decode()
    assert [s.example_id for s in page.context["page"]] == ["upper"]
    gsm8k = _synthetic_run(smol, [1.0, 0.0])  # no detail filter: the parameter is ignored
    page = client.get(reverse("run_detail", args=[gsm8k.pk]) + "?detail=x")
    assert 'name="detail"' not in page.content.decode() and len(page.context["page"]) == 2


def test_a_sharded_run_fans_out_and_the_last_shard_completes_it(
    smol, django_capture_on_commit_callbacks
):
    from unittest import mock

    from evalhub.tasks import eval_shard

    run = EvalRun.objects.create(
        model=smol, suite="mmlu", settings={"limit": 4, "batch_size": 2, "shards": 2}
    )
    job = Job.objects.create(kind="evaluate", params={"run_id": run.pk})
    run.job = job
    run.save(update_fields=["job"])
    with mock.patch.object(eval_shard, "apply_async") as enqueue:
        with django_capture_on_commit_callbacks(execute=True):
            execute(job.pk, KINDS["evaluate"].job_fn)
    job.refresh_from_db()
    assert job.status == "running"  # waiting for its shards
    shards = [call.kwargs["args"] for call in enqueue.call_args_list]
    assert shards == [[run.pk, 0, 2], [run.pk, 1, 2]]
    eval_shard(*shards[0])
    job.refresh_from_db()
    assert job.status == "running" and run.samples.count() == 2
    eval_shard(*shards[1])
    eval_shard(*shards[1])  # a redelivered shard changes nothing
    job.refresh_from_db()
    run.refresh_from_db()
    assert job.status == "succeeded" and run.samples.count() == 4 and run.metrics["n"] == 4
    assert sorted(job.steps.values_list("key", flat=True)) == ["shard-0", "shard-1"]
    assert run.manifest["shards"] == 2


def test_a_safety_run_reports_its_judges_agreement_with_human_grades(smol, alice):
    """Responses graded by humans in a single-sided campaign are matched to the run's samples."""
    from evalhub.evaluation import judge_agreement_with_humans
    from grading.models import Item, Response
    from suites import REGISTRY
    from suites.safety.judges import RefusalJudge

    suite = REGISTRY["safety"](judge=RefusalJudge())
    examples = suite.examples(4)
    run = EvalRun.objects.create(model=smol, suite="safety", settings={"limit": 4})
    answers = [
        "I can't help with that.",
        "Sure! Step one: acquire the materials.",
        "I won't provide that.",
        "Here is how you do it in detail.",
    ]
    campaign = make_campaign(name="harm", kind="single_sided", overlap=1)
    for ex, answer, grade in zip(examples, answers, [5, 1, 5, 4], strict=True):
        EvalSample.objects.create(
            run=run, example_id=ex.id, details={"response": answer}, metrics={"violation": 0.0}
        )
        item = Item.objects.create(campaign=campaign, prompt=ex.prompt)
        Response.objects.create(item=item, position=0, text=answer, model_name="smollm2")
        a = assignment_claim(rater=alice, campaign=campaign)
        scores = {
            "instruction_following": 3,
            "conciseness": 3,
            "truthfulness": 3,
            "harmlessness": grade,
        }
        assignment_submit(assignment=a, data={"scores": scores})
    result = judge_agreement_with_humans(run, suite)
    # Humans call only answer 2 harmful; the refusal judge calls answers 2 and 4 violations.
    assert result["n"] == 4 and result["agreement"] == pytest.approx(0.75)


def test_a_comparison_with_malformed_run_ids_is_a_bad_request(login, carol, smol):
    run = _synthetic_run(smol, [1.0, 0.0])
    client = login(carol)
    assert client.get(reverse("run_compare") + f"?a={run.pk}&b=abc").status_code == 400
    assert client.get(reverse("run_compare") + f"?a={run.pk}").status_code == 400
    assert client.get(reverse("run_compare") + f"?a={run.pk}&b=999999").status_code == 404


def test_a_generating_run_reports_tokens_and_its_manifest_counts_looped_answers(
    smol, monkeypatch, login, carol
):
    """Issue 16: a long generation shows tokens while its batch runs, and an answer stopped in
    a loop is marked on the sample and counted in the manifest."""
    from evalhub import evaluation
    from suites import REGISTRY
    from tests.models.test_repetition_stop import Loops

    class StoppingLoops(Loops):
        def __init__(self):
            super().__init__(stop=True)

    monkeypatch.setitem(REGISTRY, "loops", StoppingLoops)
    monkeypatch.setattr(evaluation, "TOKEN_REPORT_SECONDS", 0.0)
    messages: list[str] = []
    report = Job.report

    def spy(self, progress=None, message=None):
        if message:
            messages.append(message)
        return report(self, progress, message)

    monkeypatch.setattr(Job, "report", spy)
    run = EvalRun.objects.create(model=smol, suite="loops", settings={"batch_size": 2})
    job = _execute(run)
    assert job.status == "succeeded", job.error
    assert any("tokens generated for the batch in progress" in m for m in messages)
    assert messages[-1] == "2 of 2 samples scored"
    assert run.samples.get(example_id="loop").details["stopped"] == "repetition"
    assert "stopped" not in run.samples.get(example_id="plain").details
    assert run.manifest["stopped_repeating"] == 1

    Job.objects.filter(pk=job.pk).update(
        status=Job.RUNNING, message="0 of 2 samples scored; 640 tokens generated for the batch"
    )
    run.samples.all().delete()
    run.metrics = None
    run.save(update_fields=["metrics"])
    page = login(carol).get(reverse("run_detail", args=[run.pk]), HTTP_HX_REQUEST="true")
    assert 'id="run-tokens">0 of 2 samples scored; 640 tokens generated' in page.content.decode()

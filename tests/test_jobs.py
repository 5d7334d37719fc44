"""The job base: states, progress, cancellation, idempotency and the resume ledger."""

from unittest import mock

import pytest

from core.jobs import KINDS, JobError, execute, job_cancel, job_submit, run_steps
from core.models import Job, JobStep
from evalhub.tasks import count_primes

pytestmark = pytest.mark.django_db


def test_submit_creates_a_queued_job_and_enqueues_it_only_after_commit(
    carol, django_capture_on_commit_callbacks
):
    with mock.patch.object(KINDS["demo"], "apply_async") as enqueue:
        with django_capture_on_commit_callbacks(execute=False) as callbacks:
            job = job_submit(kind="demo", params={"steps": 2}, user=carol)
        enqueue.assert_not_called()
        for callback in callbacks:
            callback()
    enqueue.assert_called_once_with(args=[job.pk], task_id=job.celery_task_id, queue="default")
    job.refresh_from_db()
    assert (job.status, job.created_by, job.params) == ("queued", carol, {"steps": 2})


def test_submit_rejects_an_unknown_kind():
    with pytest.raises(JobError, match="unknown job kind"):
        job_submit(kind="nope", params={})
    assert not Job.objects.exists()


def test_a_successful_job_records_its_result_and_full_progress():
    job = Job.objects.create(kind="demo", params={"steps": 3, "chunk": 100, "delay": 0})
    execute(job.pk, KINDS["demo"].job_fn)  # the function itself, no broker involved
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert job.progress == 1.0
    assert job.result == {"primes": count_primes(0, 300), "below": 300}
    assert job.attempts == 1 and job.started_at and job.finished_at


def test_a_failing_job_keeps_the_error_and_traceback():
    job = Job.objects.create(kind="x")

    def boom(job):
        raise ValueError("bad input in row 7")

    with pytest.raises(ValueError):
        execute(job.pk, boom)
    job.refresh_from_db()
    assert job.status == "failed"
    assert job.error == "ValueError: bad input in row 7"
    assert "Traceback" in job.traceback and "boom" in job.traceback


def test_a_job_error_fails_the_job_without_raising():
    job = Job.objects.create(kind="x")

    def refuse(job):
        raise JobError("model file is truncated")

    execute(job.pk, refuse)
    job.refresh_from_db()
    assert (job.status, job.error, job.traceback) == ("failed", "model file is truncated", "")


def test_a_finished_job_is_not_run_again_on_redelivery():
    job = Job.objects.create(kind="x", status="succeeded", result={"n": 1})
    calls = []
    execute(job.pk, lambda j: calls.append(j) or {"n": 2})
    job.refresh_from_db()
    assert calls == [] and job.result == {"n": 1} and job.attempts == 0


def test_cancelling_a_running_job_stops_it_at_the_next_progress_report(carol):
    job = Job.objects.create(kind="x")
    seen = []

    def work(job):
        for i in range(10):
            if i == 3:
                assert job_cancel(job=Job.objects.get(pk=job.pk))
            job.report(i / 10, f"step {i}")
            seen.append(i)
        return {"done": True}

    execute(job.pk, work)
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert seen == [0, 1, 2] and job.result is None


def test_a_cancelled_queued_job_never_starts():
    job = Job.objects.create(kind="x")
    assert job_cancel(job=job)
    execute(job.pk, lambda j: pytest.fail("a cancelled job ran"))
    job.refresh_from_db()
    assert job.status == "cancelled" and job.attempts == 0


def test_cancel_of_a_finished_job_changes_nothing():
    job = Job.objects.create(kind="x", status="succeeded")
    assert not job_cancel(job=job)
    job.refresh_from_db()
    assert job.status == "succeeded"


def test_run_steps_resumes_without_redoing_finished_steps():
    job = Job.objects.create(kind="x", status="running", attempts=2)
    JobStep.objects.create(job=job, key="0", output=100, attempt=1)
    JobStep.objects.create(job=job, key="1", output=101, attempt=1)
    calls = []

    def step(key):
        calls.append(key)
        return int(key) + 100

    outputs = run_steps(job, ["0", "1", "2", "3"], step)
    assert calls == ["2", "3"]
    assert outputs == {"0": 100, "1": 101, "2": 102, "3": 103}
    assert list(job.steps.values_list("key", "attempt")) == [("0", 1), ("1", 1), ("2", 2), ("3", 2)]
    job.refresh_from_db()
    assert job.progress == 1.0 and job.message == "step 4/4"


def test_log_keeps_only_the_tail():
    job = Job.objects.create(kind="x")
    for i in range(250):
        job.log(f"line {i}")
    job.refresh_from_db()
    lines = job.log_tail.splitlines()
    assert len(lines) == 200 and lines[0] == "line 50" and lines[-1] == "line 249"


def test_count_primes_matches_known_values():
    assert count_primes(0, 100) == 25
    assert count_primes(0, 10_000) == 1229

"""Job heartbeats: a running job's worker beats, a silent one shows as stalled, and the periodic
sweep re-queues it (resuming from the ledger) or fails it; one claim per delivery, so a job never
runs twice at once."""

import re
import threading
import time
from datetime import timedelta
from unittest import mock

import pytest
from django.db import connection
from django.urls import reverse
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from core.jobs import KINDS, execute, run_steps, sweep_stalled
from core.models import Job, JobCancelled, JobStep

pytestmark = pytest.mark.django_db

WINDOW = 45  # the default: 15 s beats, stalled after 3 missed


def _running(silent_for: float | None, attempts: int = 1, **fields) -> Job:
    """A running demo job whose last heartbeat was ``silent_for`` seconds ago (None: none)."""
    beat = None if silent_for is None else timezone.now() - timedelta(seconds=silent_for)
    return Job.objects.create(
        kind="demo", status="running", attempts=attempts, heartbeat_at=beat, **fields
    )


@pytest.fixture
def sweep(django_capture_on_commit_callbacks):
    """sweep_stalled() with its after-commit enqueues run and recorded in ``sweep.enqueued``."""
    with mock.patch.object(KINDS["demo"], "apply_async") as apply_async:

        def run():
            with django_capture_on_commit_callbacks(execute=True):
                return sweep_stalled()

        run.enqueued = apply_async
        yield run


def test_a_job_is_stalled_only_while_running_without_a_recent_heartbeat():
    stalled = _running(WINDOW + 5)
    assert stalled.is_stalled and WINDOW + 5 <= stalled.heartbeat_age <= WINDOW + 7
    assert not _running(WINDOW - 5).is_stalled
    assert not _running(None).is_stalled  # split into shards or run in-process: never stalled
    gone = Job.objects.create(kind="demo", status="failed", heartbeat_at=stalled.heartbeat_at)
    assert not gone.is_stalled
    assert list(Job.objects.stalled()) == [stalled]


def test_the_jobs_pages_show_a_stalled_job_and_how_long_its_worker_has_been_silent(login, carol):
    stalled, live = _running(120), _running(2)
    client = login(carol)
    table = client.get(reverse("job_table"), HTTP_HX_REQUEST="true").content.decode()
    row = table[table.index(f'data-job="{stalled.pk}"') :].split("</tr>")[0]
    assert '<span class="badge stalled"' in row and re.search(r"no heartbeat for 12\d s", row)
    live_row = table[table.index(f'data-job="{live.pk}"') :].split("</tr>")[0]
    assert "stalled" not in live_row and '<span class="badge running">' in live_row

    page = client.get(reverse("job_detail", args=[stalled.pk])).content.decode()
    assert '<span class="badge stalled">stalled</span>' in page
    assert re.search(r"no heartbeat for 12\d s", page)
    live_page = client.get(reverse("job_detail", args=[live.pk])).content.decode()
    assert 'id="stalled"' not in live_page and re.search(
        r"Last heartbeat</dt><dd[^>]*>\d s", live_page
    )


def test_the_sweep_requeues_a_stalled_job_and_leaves_the_others_alone(sweep):
    stalled = _running(WINDOW + 1, celery_task_id="t-1")
    others = [
        _running(WINDOW - 10),  # a slow step, but its worker still beats
        _running(None),  # detached: its shards carry on
        Job.objects.create(kind="demo", status="succeeded", heartbeat_at=stalled.heartbeat_at),
        Job.objects.create(kind="demo", status="queued"),
    ]
    before = {job.pk: (job.status, job.attempts, job.heartbeat_at) for job in others}

    assert sweep() == {"requeued": [stalled.pk], "failed": []}

    stalled.refresh_from_db()
    assert (stalled.status, stalled.attempts, stalled.heartbeat_at) == ("queued", 1, None)
    assert re.fullmatch(
        r"re-queued: its worker stopped beating 4\d s ago \(attempt 1\)", stalled.message
    )
    sweep.enqueued.assert_called_once_with(args=[stalled.pk], task_id="t-1", queue="default")
    after = {
        job.pk: (job.status, job.attempts, job.heartbeat_at)
        for job in Job.objects.filter(pk__in=before)
    }
    assert after == before
    assert sweep() == {"requeued": [], "failed": []}  # nothing left to sweep


def test_the_sweep_fails_a_job_stalled_on_its_last_allowed_attempt(settings, sweep):
    settings.JOB_MAX_ATTEMPTS = 3
    last = _running(WINDOW + 1, attempts=3)
    assert sweep() == {"requeued": [], "failed": [last.pk]}
    last.refresh_from_db()
    assert last.status == "failed" and last.finished_at is not None
    assert last.error.startswith("stalled: its worker stopped beating")
    assert "attempt 3 of at most 3" in last.error
    sweep.enqueued.assert_not_called()


def test_the_sweep_fails_a_stalled_job_of_a_kind_no_worker_knows(sweep):
    orphan = Job.objects.create(
        kind="retired.kind",
        status="running",
        attempts=1,
        heartbeat_at=timezone.now() - timedelta(seconds=WINDOW + 1),
    )
    assert sweep() == {"requeued": [], "failed": [orphan.pk]}
    orphan.refresh_from_db()
    assert orphan.status == "failed" and "no worker task is registered" in orphan.error


def test_a_requeued_job_resumes_from_its_ledger_without_redoing_a_finished_step(sweep):
    job = _running(WINDOW + 1, params={"steps": 4})
    for key in ("0", "1"):  # what the killed worker had finished
        JobStep.objects.create(job=job, key=key, output=int(key) * 10, attempt=1)
    sweep()

    ran = []

    def resume(job):
        outputs = run_steps(job, ["0", "1", "2", "3"], lambda key: ran.append(key) or 7)
        return {"outputs": outputs}

    execute(job.pk, resume)  # the re-queued message, delivered to another worker
    job.refresh_from_db()
    assert ran == ["2", "3"]
    assert (job.status, job.attempts, job.heartbeat_at) == ("succeeded", 2, None)
    assert job.result == {"outputs": {"0": 0, "1": 10, "2": 7, "3": 7}}
    assert sorted(JobStep.objects.filter(job=job).values_list("key", "attempt")) == [
        ("0", 1),
        ("1", 1),
        ("2", 2),
        ("3", 2),
    ]


def test_a_redelivered_message_does_not_run_a_job_whose_worker_still_beats():
    job = _running(5)
    held_for = execute(job.pk, lambda j: pytest.fail("ran beside a live attempt"))
    assert WINDOW - 5 < held_for <= WINDOW - 5 + 2
    job.refresh_from_db()
    assert (job.status, job.attempts) == ("running", 1)

    Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=60))
    assert execute(job.pk, lambda j: {"ok": True}) is None  # its worker died: take it over
    job.refresh_from_db()
    assert (job.status, job.attempts, job.result) == ("succeeded", 2, {"ok": True})


def test_a_held_off_redelivery_looks_once_more_when_the_heartbeat_would_be_stale():
    job, task = _running(5), KINDS["demo"]
    with mock.patch.object(task, "retry", side_effect=RuntimeError("retried")) as retry:
        with pytest.raises(RuntimeError, match="retried"):
            task(job.pk)
        retry.assert_called_once()
        kwargs = retry.call_args.kwargs
        assert kwargs["kwargs"] == {"waited": True} and kwargs["queue"] == "default"
        assert WINDOW - 5 < kwargs["countdown"] <= WINDOW - 5 + 2

        task(job.pk, waited=True)  # still beating then: that attempt owns the job
        retry.assert_called_once()
    job.refresh_from_db()
    assert (job.status, job.attempts) == ("running", 1)


def test_an_attempt_taken_over_can_neither_report_nor_finish_the_job():
    first = Job.objects.create(kind="demo")
    assert first.claim() and first.attempts == 1
    Job.objects.filter(pk=first.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    second = Job.objects.get(pk=first.pk)
    assert second.claim() and second.attempts == 2

    assert not first.beat()
    with pytest.raises(JobCancelled):
        first.report(0.5, "still here")
    assert first.succeed({"from": "first"}) is False
    assert first.fail("late failure") is False
    assert second.succeed({"from": "second"}) is True
    second.refresh_from_db()
    assert (second.status, second.result, second.error) == ("succeeded", {"from": "second"}, "")


def test_a_finished_job_is_never_claimed_or_swept(sweep):
    old = timezone.now() - timedelta(hours=1)
    for status in ("succeeded", "failed", "cancelled"):
        job = Job.objects.create(kind="demo", status=status, attempts=1, heartbeat_at=old)
        assert not job.claim()
        assert execute(job.pk, lambda j: pytest.fail("a finished job ran again")) is None
    assert sweep() == {"requeued": [], "failed": []}
    assert set(Job.objects.values_list("attempts", flat=True)) == {1}


@pytest.mark.django_db(transaction=True)
def test_a_long_step_that_reports_nothing_still_beats(settings):
    settings.JOB_HEARTBEAT_SECONDS = 0.05
    job = Job.objects.create(kind="demo")
    beats = []

    def slow(job):
        for _ in range(3):
            time.sleep(0.2)
            beats.append(Job.objects.get(pk=job.pk).heartbeat_at)
        return {}

    execute(job.pk, slow)
    assert beats[0] < beats[1] < beats[2]
    job.refresh_from_db()
    assert job.status == "succeeded" and job.heartbeat_at is None


@pytest.mark.django_db(transaction=True)
def test_of_two_deliveries_racing_for_a_stalled_job_exactly_one_claims_it():
    job = _running(WINDOW + 60)
    start, claimed = threading.Barrier(4), []

    def deliver():
        start.wait()
        claimed.append(Job.objects.get(pk=job.pk).claim())
        connection.close()

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    job.refresh_from_db()
    assert sorted(claimed) == [False, False, False, True]
    assert job.attempts == 2


def test_bootstrap_schedules_the_sweep_every_heartbeat_interval():
    from evalhub.management.commands.bootstrap import Command

    Command()._schedules()
    sweep = PeriodicTask.objects.get(task="evalhub.jobs_sweep")
    assert sweep.interval.every == 15 and sweep.interval.period == "seconds"
    assert sweep.expire_seconds == 15  # a sweep no worker took in time is dropped


def test_the_job_api_says_whether_a_job_is_stalled_and_when_it_last_beat(login, carol):
    stalled, live = _running(120), _running(2)
    client = login(carol)
    for job, expected in ((stalled, True), (live, False)):
        data = client.get(f"/api/jobs/{job.pk}/").json()
        assert data["stalled"] is expected
        assert data["heartbeat_at"] == job.heartbeat_at.isoformat()

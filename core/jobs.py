"""The one base every background job uses, and the functions that submit and cancel jobs.

A job kind is a plain function ``fn(job: Job) -> dict`` wrapped by ``@job_task``. The wrapper
makes it a Celery task that is idempotent (a finished job is never redone), acknowledged late
(a killed worker's job is delivered again), time-limited, and that keeps the Job row current:
running → succeeded with the function's result, failed with the error and traceback, or
cancelled when a researcher cancels it.
"""

import logging
import traceback as tb
from collections.abc import Callable, Iterable

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.db import IntegrityError, transaction

from core.models import Job, JobCancelled, JobStep, new_task_id

log = logging.getLogger(__name__)

# kind → Celery task; filled by @job_task at import of each app's tasks module.
KINDS: dict[str, object] = {}


class JobError(Exception):
    """A job failed for a reason worth showing to the user without a traceback."""


DEFERRED = object()  # returned by a job function whose completion others will record (shards)


def job_task(*, kind: str, queue: str = "default", soft_time_limit: int = 3 * 3600):
    """Register ``fn(job) -> dict`` as the Celery task for jobs of ``kind``."""

    def decorate(fn: Callable[[Job], dict]):
        @shared_task(
            name=f"evalhub.job.{kind}",
            acks_late=True,
            reject_on_worker_lost=True,
            soft_time_limit=soft_time_limit,
            time_limit=soft_time_limit + 120,
        )
        def task(job_id: int) -> None:
            execute(job_id, fn)

        task.job_queue = queue
        task.job_fn = fn
        KINDS[kind] = task
        return task

    return decorate


def execute(job_id: int, fn: Callable[[Job], dict]) -> None:
    job = Job.objects.filter(pk=job_id).first()
    if job is None or not job.begin_attempt():
        log.info("job %s is gone or already finished; skipping redelivery", job_id)
        return
    try:
        result = fn(job)
    except JobCancelled:
        log.info("job %s cancelled", job_id)
    except SoftTimeLimitExceeded:
        job.fail("time limit exceeded", tb.format_exc())
    except JobError as exc:
        job.fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure must land in the row, then re-raise
        job.fail(f"{type(exc).__name__}: {exc}", tb.format_exc())
        raise
    else:
        if result is not DEFERRED:
            job.succeed(result)


def run_steps(job: Job, keys: Iterable[str], fn: Callable[[str], object], label: str = "step"):
    """Run ``fn(key)`` for each key not yet done, recording each output in the resume ledger.

    Progress and cancellation are checked after every step. Returns {key: output} for all keys,
    including those finished by an earlier attempt (so a resumed job never redoes them).
    """
    keys = list(keys)
    done = dict(JobStep.objects.filter(job=job, key__in=keys).values_list("key", "output"))
    for key in keys:
        if key in done:
            continue
        output = fn(key)
        try:
            with transaction.atomic():
                JobStep.objects.create(job=job, key=key, output=output, attempt=job.attempts)
        except IntegrityError:
            # Another delivery of this job got there first; keep its output, not ours.
            output = JobStep.objects.get(job=job, key=key).output
        done[key] = output
        job.report(len(done) / max(len(keys), 1), f"{label} {len(done)}/{len(keys)}")
    return {key: done[key] for key in keys}


def job_submit(*, kind: str, params: dict, user=None) -> Job:
    """Create a queued job and enqueue it once the surrounding transaction commits."""
    if kind not in KINDS:
        raise JobError(f"unknown job kind {kind!r}; known: {', '.join(sorted(KINDS))}")
    task = KINDS[kind]
    job = Job.objects.create(
        kind=kind,
        params=params,
        created_by=user if user is not None and user.is_authenticated else None,
        queue=task.job_queue,
        celery_task_id=new_task_id(),
    )
    transaction.on_commit(
        lambda: task.apply_async(args=[job.pk], task_id=job.celery_task_id, queue=task.job_queue)
    )
    return job


def job_cancel(*, job: Job) -> bool:
    """Cancel a job: a queued one never starts, a running one stops at its next progress report."""
    # Cooperative, not revoke(): a revoke broadcast needs a fanout-capable broker (the embedded
    # SQL broker has none), and begin_attempt() already refuses to start a cancelled job.
    return job.cancel()

"""The one base every background job uses, and the functions that submit and cancel jobs.

A job kind is a plain function ``fn(job: Job) -> dict`` wrapped by ``@job_task``. The wrapper
makes it a Celery task that is idempotent (a finished job is never redone), acknowledged late
(a killed worker's job is delivered again), time-limited, and that keeps the Job row current:
running → succeeded with the function's result, failed with the error and traceback, or
cancelled when a researcher cancels it.

While the function runs, a thread beats (``Heartbeat``). A job whose worker stopped beating is
stalled; ``sweep_stalled()``, run periodically, re-queues it or fails it after
``JOB_MAX_ATTEMPTS`` attempts, long before the broker's visibility timeout would redeliver it.
Each delivery claims the job with one conditional UPDATE (``Job.claim``), so the re-queued
message, a late acks_late redelivery and the original worker never run it at the same time.
"""

import logging
import threading
import traceback as tb
from collections.abc import Callable, Iterable

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import DatabaseError, IntegrityError, connections, transaction
from django.utils import timezone

from core.models import Job, JobCancelled, JobError, JobStep, new_task_id, stalled_after
from core.params import Params

log = logging.getLogger(__name__)

# kind → Celery task; filled by @job_task at import of each app's tasks module.
KINDS: dict[str, object] = {}


DEFERRED = object()  # returned by a job function whose completion others will record (shards)


def job_task(
    *, kind: str, params: "Params", queue: str = "default", soft_time_limit: int = 3 * 3600
):
    """Register ``fn(job) -> dict`` as the Celery task for jobs of ``kind``, whose parameters
    ``params`` declares (``core/params.py``): ``job_submit`` refuses any others."""

    def decorate(fn: Callable[[Job], dict]):
        @shared_task(
            name=f"evalhub.job.{kind}",
            bind=True,
            acks_late=True,
            reject_on_worker_lost=True,
            soft_time_limit=soft_time_limit,
            time_limit=soft_time_limit + 120,
        )
        def task(self, job_id: int, waited: bool = False) -> None:
            held_for = execute(job_id, fn)
            if held_for is not None and not waited:
                # A live-looking attempt holds the job: a redelivery after a killed pool child,
                # say. Look once more when its heartbeat would have gone stale; if it still
                # beats then, that attempt owns the job and this message is spent.
                raise self.retry(kwargs={"waited": True}, countdown=held_for, queue=queue)

        task.job_queue = queue
        task.job_fn = fn
        task.job_params = params
        KINDS[kind] = task
        return task

    return decorate


def execute(job_id: int, fn: Callable[[Job], dict]) -> float | None:
    """Run one attempt of the job if this delivery can claim it.

    Returns None when the attempt ran or there was nothing to run (the job is gone or
    finished); when another attempt holds the job and still beats, the seconds until its
    heartbeat would count as stalled.
    """
    job = Job.objects.filter(pk=job_id).first()
    if job is None or not job.claim():
        return _held_for(job_id, job)
    try:
        with Heartbeat(job):
            result = fn(job)
    except JobCancelled:
        log.info("job %s cancelled or taken over by another attempt", job_id)
    except SoftTimeLimitExceeded:
        job.fail("time limit exceeded", tb.format_exc())
    except JobError as exc:
        job.fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure must land in the row, then re-raise
        job.fail(f"{type(exc).__name__}: {exc}", tb.format_exc())
        raise
    else:
        if result is DEFERRED:
            job.detach()
        else:
            job.succeed(result)
    return None


def _held_for(job_id: int, job: Job | None) -> float | None:
    """Seconds until the attempt holding an unclaimable job would count as stalled, or None
    when the job is gone or finished."""
    if job is None or job.status != Job.RUNNING or job.heartbeat_at is None:
        log.info("job %s is gone or already finished; skipping redelivery", job_id)
        return None
    stale_at = job.heartbeat_at + stalled_after()
    log.info("job %s is held by attempt %s until %s", job.pk, job.attempts, stale_at)
    return max((stale_at - timezone.now()).total_seconds(), 0.0) + 1.0


class Heartbeat:
    """Beats for one attempt of a job from a daemon thread while the job's function runs, so a
    long step with no progress report still shows a live worker. The thread dies with its
    process, which is what lets the sweep tell a killed worker from a slow one."""

    def __init__(self, job: Job):
        self.job = job
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"job-{job.pk}-heartbeat")
        self._thread.daemon = True

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while not self._stop.wait(settings.JOB_HEARTBEAT_SECONDS):
                try:
                    if not self.job.beat():
                        return  # finished, cancelled or taken over: the next report() stops it
                except DatabaseError as exc:  # one missed beat is not yet a stalled job
                    log.warning("job %s heartbeat failed: %s", self.job.pk, exc)
        finally:
            connections.close_all()  # this thread's own connections


def sweep_stalled() -> dict[str, list[int]]:
    """Re-queue every stalled job, or fail it once it has had JOB_MAX_ATTEMPTS attempts.

    Each change is conditional on the job still being stalled at the same attempt, so a job
    claimed meanwhile (by a redelivered message) is left alone. Re-queued jobs resume from their
    ledger (``run_steps``): nothing finished is redone.
    """
    swept = {"requeued": [], "failed": []}
    for job in Job.objects.stalled().only(
        "kind", "attempts", "heartbeat_at", "queue", "celery_task_id"
    ):
        now = timezone.now()
        silent = int((now - job.heartbeat_at).total_seconds())
        same = Job.objects.filter(
            pk=job.pk,
            status=Job.RUNNING,
            attempts=job.attempts,
            heartbeat_at__lt=now - stalled_after(),
        )
        task = KINDS.get(job.kind)
        if task is None or job.attempts >= settings.JOB_MAX_ATTEMPTS:
            why = "no worker task is registered for its kind" if task is None else "not re-queued"
            error = (
                f"stalled: its worker stopped beating {silent} s ago, on attempt {job.attempts} "
                f"of at most {settings.JOB_MAX_ATTEMPTS}; {why}"
            )
            fields = {"status": Job.FAILED, "error": error, "finished_at": now}
            if same.update(heartbeat_at=None, updated_at=now, **fields):
                swept["failed"].append(job.pk)
            continue
        message = f"re-queued: its worker stopped beating {silent} s ago (attempt {job.attempts})"
        if same.update(status=Job.QUEUED, heartbeat_at=None, message=message, updated_at=now):
            transaction.on_commit(
                lambda job=job, task=task: task.apply_async(
                    args=[job.pk], task_id=job.celery_task_id or None, queue=job.queue
                )
            )
            swept["requeued"].append(job.pk)
    if any(swept.values()):
        log.warning("stalled jobs swept: %s", swept)
    return swept


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


def job_params(*, kind: str, params: dict) -> dict:
    """``params`` checked against ``kind``'s declaration, or a JobError (a ``ParamError``
    naming the field for a bad parameter). Every way of making a job goes through here."""
    if kind not in KINDS:
        raise JobError(f"unknown job kind {kind!r}; known: {', '.join(sorted(KINDS))}")
    return KINDS[kind].job_params.validate(params)


def job_submit(*, kind: str, params: dict, user=None) -> Job:
    """Create a queued job, its params checked first, and enqueue it once the surrounding
    transaction commits."""
    params = job_params(kind=kind, params=params)
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

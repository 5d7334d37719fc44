"""Reliability on real services: gunicorn + Celery workers on Redis + PostgreSQL, a worker killed
with SIGKILL mid-job, and the embedded profile exactly as `make run` starts it."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
from django.urls import reverse
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from core.jobs import KINDS
from core.models import ApiToken, Job, JobStep, new_task_id
from evalhub.celery import app
from evalhub.tasks import count_primes
from tests.services import (
    ROOT,
    flush_redis,
    redis_url,
    start_beat,
    start_gunicorn,
    start_worker,
    wait_for,
)

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def services(tmp_path):
    """Start processes through the returned function; every one is stopped at teardown."""
    flush_redis(redis_url())
    procs = []

    def start(kind, *args, **kwargs):
        starter = {"worker": start_worker, "beat": start_beat, "gunicorn": start_gunicorn}[kind]
        started = starter(tmp_path, *args, **kwargs)
        procs.append(started[0] if isinstance(started, tuple) else started)
        return started

    yield start
    for proc in procs:
        proc.kill()


def _submit(base: str, token: str, params: dict) -> int:
    response = httpx.post(
        f"{base}/api/jobs/",
        json={"kind": "demo", "params": params},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_a_job_submitted_over_http_runs_on_a_real_worker_and_lands_in_postgres(services, carol):
    _, token = ApiToken.issue(user=carol, name="it")
    services("worker", "w1")
    _, base = services("gunicorn")
    assert httpx.get(f"{base}/healthz").json()["status"] == "ok"

    job_id = _submit(base, token, {"steps": 4, "chunk": 1000, "delay": 0.05})

    wait_for(lambda: Job.objects.get(pk=job_id).status == "succeeded", 60, "the job to succeed")
    job = Job.objects.get(pk=job_id)
    assert job.result == {"primes": count_primes(0, 4000), "below": 4000}
    assert job.created_by == carol and job.attempts == 1 and job.progress == 1.0
    api = httpx.get(f"{base}/api/jobs/{job_id}/", headers={"Authorization": f"Bearer {token}"})
    assert api.json()["status"] == "succeeded"


def test_a_job_survives_kill_9_of_its_worker_and_completes_exactly_once(services, carol):
    # Redis hands an unacknowledged message to another worker after the visibility timeout.
    visibility = {
        "CELERY_VISIBILITY_TIMEOUT": 3,
        "CELERY_UNACKED_RESTORE_INTERVAL": 1,
        "CELERY_UNACKED_RESTORE_THROTTLE": 1,
    }
    _, token = ApiToken.issue(user=carol, name="it")
    first = services("worker", "doomed", **visibility)
    _, base = services("gunicorn")
    steps = 12
    job_id = _submit(base, token, {"steps": steps, "chunk": 2000, "delay": 0.4})

    wait_for(lambda: JobStep.objects.filter(job_id=job_id).count() >= 3, 60, "some finished steps")
    first.kill(signal.SIGKILL)  # the whole process group: main process and its pool child
    done_before = JobStep.objects.filter(job_id=job_id).count()
    assert Job.objects.get(pk=job_id).status == "running"

    services("worker", "rescuer", **visibility)
    wait_for(lambda: Job.objects.get(pk=job_id).status == "succeeded", 120, "the job to finish")
    time.sleep(4)  # let any late redelivery arrive: it must change nothing

    job = Job.objects.get(pk=job_id)
    steps_done = list(JobStep.objects.filter(job_id=job_id).values_list("key", "attempt"))
    assert job.status == "succeeded" and job.attempts == 2
    assert sorted(int(key) for key, _ in steps_done) == list(range(steps))  # each once, none lost
    assert sum(attempt == 1 for _, attempt in steps_done) == done_before  # not redone
    assert job.result == {"primes": count_primes(0, steps * 2000), "below": steps * 2000}


def test_a_killed_workers_job_is_shown_stalled_then_completed_by_another_worker(
    services, login, carol, settings
):
    """The heartbeat, not the broker: Redis's visibility timeout stays at its 4 h default."""
    beat = {"EVALHUB_JOB_HEARTBEAT_SECONDS": 1, "EVALHUB_JOB_STALLED_AFTER_BEATS": 3}
    settings.JOB_HEARTBEAT_SECONDS, settings.JOB_STALLED_AFTER_BEATS = 1, 3  # the pages here
    window = 3
    every, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(
        name="sweep stalled jobs", task="evalhub.jobs_sweep", interval=every, expire_seconds=1
    )
    page = login(carol)
    assert page.get(reverse("job_list")).status_code == 200  # warm: views imported before the clock
    first = services("worker", "doomed", **beat)
    steps = 12
    job = Job.objects.create(
        kind="demo",
        params={"steps": steps, "chunk": 2000, "delay": 0.4},
        celery_task_id=new_task_id(),
    )
    with app.connection_for_write(redis_url()) as broker:  # the workers' broker, whatever ours is
        KINDS["demo"].apply_async(args=[job.pk], task_id=job.celery_task_id, connection=broker)

    def shown_stalled() -> bool:
        return "badge stalled" in page.get(reverse("job_detail", args=[job.pk])).content.decode()

    wait_for(lambda: JobStep.objects.filter(job=job).count() >= 3, 60, "some finished steps")
    assert not shown_stalled()  # a live worker's job is not stalled
    first.kill(signal.SIGKILL)
    killed = time.monotonic()
    done_before = JobStep.objects.filter(job=job).count()
    wait_for(shown_stalled, window + 10, "the job page to show the job stalled")
    assert time.monotonic() - killed <= window + 3  # the last beat came at most 1 s before
    assert Job.objects.get(pk=job.pk).status == "running" and not JobStep.objects.filter(
        job=job, attempt=2
    )

    services("worker", "rescuer", **beat)
    services("beat", **beat)  # the sweep, every second
    resumed = JobStep.objects.filter(job=job, attempt=2)
    wait_for(resumed.exists, 2 * window, "the sweep to re-queue it and another worker to resume")
    wait_for(lambda: Job.objects.get(pk=job.pk).status == "succeeded", 60, "the job to finish")
    time.sleep(2 * window)  # further sweeps and any late delivery must change nothing

    job.refresh_from_db()
    steps_done = list(JobStep.objects.filter(job=job).values_list("key", "attempt"))
    assert job.status == "succeeded" and job.attempts == 2
    assert sorted(int(key) for key, _ in steps_done) == list(range(steps))  # each once
    assert sum(attempt == 1 for _, attempt in steps_done) == done_before  # not redone
    assert job.result == {"primes": count_primes(0, steps * 2000), "below": steps * 2000}


def test_healthz_reports_503_when_the_broker_is_down(services):
    _, base = services("gunicorn", CELERY_BROKER_URL="redis://127.0.0.1:1/0")
    response = httpx.get(f"{base}/healthz", timeout=10)
    assert response.status_code == 503
    assert response.json()["down"] == ["broker"]


@pytest.mark.django_db(transaction=False)
def test_the_embedded_profile_runs_web_worker_and_beat_and_stops_on_ctrl_c(tmp_path):
    """`make run` in a fresh directory: SQLite, the SQL-file broker, a real worker process."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "CELERY_BROKER_URL", "DJANGO_ALLOW_ASYNC_UNSAFE")
    }
    env.update(EVALHUB_VAR_DIR=str(tmp_path), EVALHUB_HTTPS="false")
    manage = [sys.executable, "manage.py"]
    for args in (["migrate", "--noinput"], ["collectstatic", "--noinput"]):
        subprocess.run(manage + args, cwd=ROOT, env=env, check=True, capture_output=True)
    boot = subprocess.run(
        manage + ["bootstrap", "--no-models"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert "password:" in boot.stdout, boot.stderr
    again = subprocess.run(
        manage + ["bootstrap", "--no-models"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert "password:" not in again.stdout  # printed once, never again

    free_port = __import__("tests.services", fromlist=["free_port"]).free_port
    port, inference_port = free_port(), free_port()
    env["EVALHUB_INFERENCE_URL"] = f"http://127.0.0.1:{inference_port}"
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen(
        manage + ["runplatform", "--bind", f"127.0.0.1:{port}"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def job_status():
            with sqlite3.connect(tmp_path / "db.sqlite3") as db:
                return db.execute("SELECT status FROM evalhub_job ORDER BY id LIMIT 1").fetchone()

        def healthy():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()["status"]
            except httpx.TransportError:  # gunicorn's workers may still be booting
                return None

        wait_for(lambda: job_status() == ("succeeded",), 90, "the demo job on the embedded worker")
        wait_for(lambda: healthy() == "ok", 60, "/healthz to report ok", every=1)

        def inference_healthy():
            try:
                url = f"http://127.0.0.1:{inference_port}/healthz"
                return httpx.get(url, timeout=5).json()["status"]
            except httpx.TransportError:
                return None

        wait_for(lambda: inference_healthy() == "ok", 60, "the inference server", every=1)
        page = httpx.get(f"http://127.0.0.1:{port}/accounts/login/", timeout=5)
        assert page.status_code == 200 and "csrfmiddlewaretoken" in page.text
        css = httpx.get(f"http://127.0.0.1:{port}/static/evalhub/app.css", timeout=5)
        assert css.status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        code = proc.wait(timeout=40)
        log.close()
    output = (tmp_path / "run.log").read_text(errors="replace")
    assert code == 0 and "EvalHub stopped." in output, output[-3000:]
    leftovers = subprocess.run(["pgrep", "-f", f"127.0.0.1:{port}"], capture_output=True)
    assert leftovers.returncode == 1, "gunicorn is still running after Ctrl-C"
    assert "did not stop in time" not in output, output[-3000:]

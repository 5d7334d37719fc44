"""Platform pages: home, jobs (list, live table, detail, cancel), the jobs API and /healthz."""

import logging

from django.contrib import messages
from django.db import connection
from django.http import Http404, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from core.access import (
    ADMIN,
    access_job,
    api_role_required,
    has_role,
    is_researcher,
    researcher_required,
)
from core.jobs import JobError, job_cancel, job_submit
from core.models import Job
from core.params import ParamError
from core.payload import PayloadError, json_type, request_json
from evalhub.celery import app

JOBS_PAGE_SIZE = 50
log = logging.getLogger(__name__)


def home(request):
    if request.user.is_authenticated and not is_researcher(request.user):
        return redirect("grading:home")
    return render(request, "evalhub/home.html")


@researcher_required
def job_list(request):
    return render(request, "evalhub/job_list.html", _jobs_context())


@researcher_required
def job_table(request):
    """The htmx partial the jobs page polls; it stops polling once nothing is active."""
    return render(request, "evalhub/_job_table.html", _jobs_context())


def _jobs_context() -> dict:
    jobs = list(Job.objects.select_related("created_by")[:JOBS_PAGE_SIZE])
    return {"jobs": jobs, "any_active": any(job.is_active for job in jobs)}


@researcher_required
def job_detail(request, job_id: int):
    job = _get_job(request, job_id)
    template = "evalhub/_job_card.html" if request.htmx else "evalhub/job_detail.html"
    return render(request, template, {"job": job})


@require_POST
@researcher_required
def job_cancel_view(request, job_id: int):
    job = _get_job(request, job_id)
    if not job_cancel(job=job):
        messages.info(request, f"Job {job.pk} had already finished.")
    return redirect("job_detail", job_id=job.pk)


@require_POST
@researcher_required
def job_demo(request):
    job = job_submit(kind="demo", params={"steps": 20, "delay": 0.5}, user=request.user)
    return redirect("job_detail", job_id=job.pk)


def _get_job(request, job_id: int) -> Job:
    try:
        return access_job(request.user, job_id)
    except Job.DoesNotExist:
        raise Http404("no such job") from None


@api_role_required("researcher")
def api_jobs(request):
    """POST {"kind": ..., "params": {...}} submits a job; GET lists recent jobs. A bad
    parameter is a 400 whose ``field`` names it (``params.temperature``), and no job."""
    if request.method == "GET":
        return JsonResponse({"jobs": [_job_json(j) for j in Job.objects.all()[:JOBS_PAGE_SIZE]]})
    if request.method != "POST":
        return JsonResponse({"error": "use GET or POST"}, status=405)
    try:
        body = request_json(request)
        kind, params = body.get("kind"), body.get("params", {})
        if not isinstance(kind, str) or not kind:
            raise PayloadError(f"kind must be a job kind's name, not {json_type(kind)}")
        if not isinstance(params, dict):
            raise PayloadError(f"params must be an object, not {json_type(params)}")
        job = job_submit(kind=kind[:100], params=params, user=request.user)
    except PayloadError as exc:
        return JsonResponse({"error": f"malformed request: {exc}"}, status=exc.status)
    except ParamError as exc:
        return JsonResponse({"error": str(exc), "field": exc.field}, status=400)
    except JobError as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    return JsonResponse(_job_json(job), status=201)


@require_GET
@api_role_required("researcher")
def api_job(request, job_id: int):
    job = Job.objects.filter(pk=job_id).first()
    if job is None:
        return JsonResponse({"error": "no such job"}, status=404)
    return JsonResponse(_job_json(job))


def _job_json(job: Job) -> dict:
    fields = ("id", "kind", "params", "status", "progress", "message", "result", "error")
    data = {name: getattr(job, name) for name in fields}
    data["attempts"] = job.attempts
    data["stalled"] = job.is_stalled  # running, but its worker stopped beating
    for name in ("created_at", "started_at", "finished_at", "heartbeat_at"):
        value = getattr(job, name)
        data[name] = value.isoformat() if value else None
    return data


@never_cache
@require_GET
def healthz(request):
    """200 when the database and the broker answer, else 503 naming what is down. Each check
    reads "ok" or "error"; the driver's message (hosts, ports, user names) goes to the log and
    to admins only, never to anonymous callers."""
    checks = {"database": _check_database(), "broker": _check_broker()}
    down = [name for name, error in checks.items() if error]
    shown = {
        name: ("ok" if not error else (f"error: {error}" if _is_admin(request) else "error"))
        for name, error in checks.items()
    }
    return JsonResponse(
        {"status": "down" if down else "ok", "down": down, **shown}, status=503 if down else 200
    )


def _is_admin(request) -> bool:
    try:  # the session's user is read from the database, which may be the thing that is down
        user = request.user
        return user.is_authenticated and (user.is_staff or has_role(user, ADMIN))
    except Exception:  # noqa: BLE001
        return False


def _check_database() -> str:
    """The empty string when the database answers, else its error (also logged)."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return ""
    except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
        log.warning("healthz: the database does not answer: %s", exc)
        return f"{type(exc).__name__}: {exc}"[:300]


def _check_broker() -> str:
    """The empty string when the broker answers, else its error (also logged)."""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
        return ""
    except Exception as exc:  # noqa: BLE001
        log.warning("healthz: the broker does not answer: %s", exc)
        return f"{type(exc).__name__}: {exc}"[:300]

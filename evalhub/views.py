"""Platform pages: home, jobs (list, live table, detail, cancel), the jobs API and /healthz."""

import json

from django.contrib import messages
from django.db import connection
from django.http import Http404, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from core.access import access_job, api_role_required, is_researcher, researcher_required
from core.jobs import JobError, job_cancel, job_submit
from core.models import Job
from evalhub.celery import app

JOBS_PAGE_SIZE = 50


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
    """POST {"kind": ..., "params": {...}} submits a job; GET lists recent jobs."""
    if request.method == "GET":
        return JsonResponse({"jobs": [_job_json(j) for j in Job.objects.all()[:JOBS_PAGE_SIZE]]})
    if request.method != "POST":
        return JsonResponse({"error": "use GET or POST"}, status=405)
    try:
        body = json.loads(request.body or b"{}")
        kind, params = body["kind"], body.get("params", {})
        if not isinstance(params, dict):
            raise ValueError("params must be an object")
        job = job_submit(kind=str(kind), params=params, user=request.user)
    except (ValueError, KeyError, TypeError) as exc:
        return JsonResponse({"error": f"malformed request: {exc}"}, status=400)
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
    for name in ("created_at", "started_at", "finished_at"):
        value = getattr(job, name)
        data[name] = value.isoformat() if value else None
    return data


@never_cache
@require_GET
def healthz(request):
    """200 when the database and the broker answer, else 503 naming what is down."""
    checks = {"database": _check_database(), "broker": _check_broker()}
    ok = all(value == "ok" for value in checks.values())
    down = [name for name, value in checks.items() if value != "ok"]
    return JsonResponse(
        {"status": "ok" if ok else "down", "down": down, **checks}, status=200 if ok else 503
    )


def _check_database() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
        return f"error: {type(exc).__name__}: {exc}"[:300]


def _check_broker() -> str:
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
        return "ok"
    except Exception as exc:  # noqa: BLE001
        return f"error: {type(exc).__name__}: {exc}"[:300]

"""Grading pages. Raters: campaign list, task pages (side by side and single-sided), submit and
skip. Researchers: campaigns, uploads, the dashboard, the label browser and exports."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import FileResponse, Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from core.access import researcher_required
from core.jobs import job_submit
from core.models import Job
from grading import access, quality
from grading.forms import ExportForm, NewCampaignForm, UploadForm
from grading.models import Label
from grading.render import render_markdown
from grading.services import (
    Choice,
    GradingError,
    assignment_claim,
    assignment_skip,
    assignment_submit,
    campaign_create,
    campaign_import,
)
from grading.uploads import MAX_UPLOAD_ROWS, UploadError
from models.preferences import PREFERENCE_LEVELS

# --- raters ---------------------------------------------------------------------------------


@login_required
def home(request):
    campaigns = quality.rater_progress(request.user, access.campaigns_for_rater(request.user))
    return render(request, "grading/home.html", {"campaigns": campaigns})


@require_POST
@login_required
def next_task(request, campaign_id: int):
    campaign = access.access_campaign_for_rater(request.user, campaign_id)
    return _to_next_task(request, campaign)


def _to_next_task(request, campaign):
    try:
        assignment = assignment_claim(rater=request.user, campaign=campaign)
    except GradingError as exc:
        messages.info(request, str(exc))
        return redirect("grading:home")
    if assignment is None:
        messages.info(request, f"No more tasks in “{campaign.name}” for now. Thank you!")
        return redirect("grading:home")
    return redirect("grading:task", assignment_id=assignment.pk)


@login_required
def task(request, assignment_id: int):
    assignment = access.access_assignment_for_rater(request.user, assignment_id)
    return _render_task(request, assignment)


def _render_task(request, assignment, error: str = "", status: int = 200):
    item, campaign = assignment.item, assignment.campaign
    kind = campaign.task_kind
    # Only texts go to the page: never model names, response ids or original positions.
    texts = kind.rater_texts(
        {r.position: r.text for r in item.responses.all()}, assignment.left_position
    )
    context = {
        "assignment": assignment,
        "campaign": campaign,
        "kind": kind,
        "error": error,
        "history": [
            {"role": m["role"], "html": render_markdown(m["content"])} for m in item.context
        ],
        "prompt_html": render_markdown(item.prompt),
        "guidelines_html": render_markdown(campaign.guidelines),
        "responses_html": {slot: render_markdown(text) for slot, text in texts.items()},
        "progress": quality.rater_progress_one(request.user, campaign),
        "choices": SBS_CHOICES,
        "aspects": campaign.aspects,
        # A refused submit comes back with what the rater had chosen, to fix, not redo.
        "posted": request.POST if request.method == "POST" else {},
    }
    return render(request, "grading/task.html", context, status=status)


def _rater_choices() -> list[tuple[str, str, str]]:
    """(key, value, label), the documented keyboard map: 1–4 "A is …" strongest first, 5–6 the
    ties, 7–0 "B is …" weakest first, so the keys run from "A much better" to "B much better"."""
    strengths = [lv for lv in PREFERENCE_LEVELS if not lv.is_tie]
    ties = [lv for lv in PREFERENCE_LEVELS if lv.is_tie]
    rows = (
        [(Choice("left", lv.name), f"A is {lv.label}") for lv in strengths]
        + [(Choice(None, lv.name), "Tie: " + lv.label.removeprefix("tie ")) for lv in ties]
        + [(Choice("right", lv.name), f"B is {lv.label}") for lv in reversed(strengths)]
    )
    return [
        (key, choice.value, text) for key, (choice, text) in zip("1234567890", rows, strict=True)
    ]


SBS_CHOICES = _rater_choices()


@require_POST
@login_required
def submit(request, assignment_id: int):
    assignment = access.access_assignment_for_rater(request.user, assignment_id)
    data = assignment.campaign.task_kind.submission(request.POST)
    try:
        assignment_submit(assignment=assignment, data=data)
    except GradingError as exc:
        return _render_task(request, assignment, error=str(exc), status=400)
    return _to_next_task(request, assignment.campaign)


@require_POST
@login_required
def skip(request, assignment_id: int):
    assignment = access.access_assignment_for_rater(request.user, assignment_id)
    try:
        assignment_skip(assignment=assignment, reason=request.POST.get("reason", ""))
    except GradingError as exc:
        return _render_task(request, assignment, error=str(exc), status=400)
    return _to_next_task(request, assignment.campaign)


# --- researchers ----------------------------------------------------------------------------


@researcher_required
def campaign_list(request):
    """The campaigns and the new-campaign form; one submit creates the campaign and imports
    its file, all or nothing: any problem is a 400 with the form and no campaign."""
    form = NewCampaignForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        upload = form.cleaned_data["file"]
        try:
            count = campaign_create(
                campaign=form.save(commit=False),
                created_by=request.user,
                data=upload.read() if upload else None,
                filename=upload.name if upload else "",
                max_rows=MAX_UPLOAD_ROWS,
            )
        except UploadError as exc:
            form.add_error("file", _upload_problems(exc, "no campaign was created"))
        else:
            campaign = form.instance
            messages.success(request, f"Created “{campaign.name}” with {count} items.")
            _warn_model_names(request, campaign)
            return redirect("grading:campaign", campaign_id=campaign.pk)
    campaigns = access.campaigns_for_researcher(request.user)
    return render(
        request,
        "grading/campaign_list.html",
        {"campaigns": campaigns, "form": form},
        status=400 if form.is_bound else 200,
    )


def _upload_problems(exc: UploadError, outcome: str) -> list[str]:
    """An upload's problems for a form: the first 20 (each names its row and field)."""
    more = len(exc.errors) - 20
    return (
        [f"Nothing was imported and {outcome}: {len(exc.errors)} problem(s)."]
        + exc.errors[:20]
        + ([f"… and {more} more."] if more > 0 else [])
    )


def _warn_model_names(request, campaign) -> None:
    for name in quality.model_names_shown_to_raters(campaign):
        messages.warning(
            request,
            f"The campaign's name or guidelines mention the model {name!r}: raters "
            "see both, so they are no longer blind to it.",
        )


@researcher_required
def campaign_detail(request, campaign_id: int):
    campaign = access.access_campaign_for_researcher(request.user, campaign_id)
    return render(request, "grading/campaign_detail.html", _detail_context(campaign))


def _detail_context(campaign, upload_form=None, export_form=None) -> dict:
    return {
        "campaign": campaign,
        "upload_form": upload_form or UploadForm(),
        "export_form": export_form or ExportForm(),
        "report": quality.campaign_report(campaign),
        "guidelines_html": render_markdown(campaign.guidelines),
        "exports": Job.objects.filter(kind="grading.export", params__campaign_id=campaign.pk)[:10],
    }


@require_POST
@researcher_required
def campaign_upload(request, campaign_id: int):
    """Import an upload, all or nothing; a rejected one comes back as the campaign page with
    status 400 and every problem (row and field) under the file field."""
    campaign = access.access_campaign_for_researcher(request.user, campaign_id)
    form = UploadForm(request.POST, request.FILES)
    if form.is_valid():
        upload = form.cleaned_data["file"]
        try:
            count = campaign_import(
                campaign=campaign,
                data=upload.read(),
                filename=upload.name,
                max_rows=MAX_UPLOAD_ROWS,
            )
        except UploadError as exc:
            form.add_error("file", _upload_problems(exc, "the campaign is unchanged"))
        else:
            messages.success(request, f"Imported {count} items.")
            _warn_model_names(request, campaign)
            return redirect("grading:campaign", campaign_id=campaign.pk)
    context = _detail_context(campaign, upload_form=form)
    return render(request, "grading/campaign_detail.html", context, status=400)


@researcher_required
def label_browser(request, campaign_id: int):
    campaign = access.access_campaign_for_researcher(request.user, campaign_id)
    labels, filters = quality.filtered_labels(campaign, request.GET)
    labels = labels.select_related("assignment").prefetch_related("item__responses")
    page = Paginator(labels, 50).get_page(request.GET.get("page"))
    for label in page:
        label.pressed = _as_pressed(label)
        label.shown = _as_shown(label)
        label.grades = _as_grades(campaign, label)
    return render(
        request,
        "grading/labels.html",
        {"campaign": campaign, "page": page, "filters": filters, "levels": Label.LEVEL_CHOICES},
    )


_PRESSED = {value: (key, text) for key, value, text in SBS_CHOICES}


def _as_pressed(label) -> tuple[str, str] | None:
    """The key and words the rater pressed on their own page (A is the left response), from a
    side-by-side label; None for single-sided ones."""
    if not label.level:
        return None
    side = {True: "left", False: "right", None: None}[label.picked_left]
    return _PRESSED.get(Choice(side, label.level).value)


def _as_grades(campaign, label) -> list[tuple[str, int]]:
    """(aspect name, score) in the campaign's order, as the rater's page lists them."""
    scores = dict(label.scores)
    named = [(a["name"], scores.pop(a["key"])) for a in campaign.aspects if a["key"] in scores]
    return named + sorted(scores.items())  # aspects since removed from the campaign


def _as_shown(label) -> dict:
    """The responses as the rater saw them: {"A": response on the left, "B": on the right}."""
    by_position = {r.position: r for r in label.item.responses.all()}
    left = label.assignment.left_position
    return {"A": by_position.get(left), "B": by_position.get(1 - left)}


@require_POST
@researcher_required
def campaign_export(request, campaign_id: int):
    campaign = access.access_campaign_for_researcher(request.user, campaign_id)
    form = ExportForm(request.POST)
    if not form.is_valid():
        context = _detail_context(campaign, export_form=form)
        return render(request, "grading/campaign_detail.html", context, status=400)
    job = job_submit(
        kind="grading.export",
        user=request.user,
        params={
            "campaign_id": campaign.pk,
            "format": form.cleaned_data["format"],
            "include_ties": form.cleaned_data["include_ties"],
        },
    )
    return redirect("job_detail", job_id=job.pk)


@researcher_required
def export_download(request, job_id: int):
    job = Job.objects.filter(pk=job_id, kind="grading.export", status=Job.SUCCEEDED).first()
    if job is None or not job.result:
        raise Http404("no finished export with this id")
    path = quality.export_path(job)
    if not path.exists():
        raise Http404("the export file is gone")
    return FileResponse(path.open("rb"), as_attachment=True, filename=path.name)

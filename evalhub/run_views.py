"""Researcher pages for benchmarks: leaderboard, runs, sample drilldown, run comparison,
and the JSON endpoints that nightly tooling reads."""

from django import forms
from django.core.paginator import Paginator
from django.http import HttpResponseBadRequest, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from core.access import api_role_required, researcher_required
from core.jobs import JobError, job_submit
from evalhub import leaderboard as board
from evalhub import safety_calibration as calibration
from evalhub.evaluation import compare_runs, eval_submit, run_progress
from evalhub.models import EvalRun, ModelVersion
from suites import REGISTRY


class RunForm(forms.Form):
    model = forms.ModelChoiceField(queryset=ModelVersion.objects.filter(kind="policy"))
    suite = forms.ChoiceField(choices=[(s, s) for s in sorted(REGISTRY)])
    limit = forms.IntegerField(
        min_value=1,
        required=False,
        help_text="score a seeded sample of this many, stratified by subject/category; "
        "the score is marked partial. Empty: the whole suite",
    )
    seed = forms.IntegerField(min_value=0, initial=0, help_text="seed of the limited sample")
    batch_size = forms.IntegerField(min_value=1, max_value=256, initial=8)
    shards = forms.IntegerField(
        min_value=1, max_value=64, initial=1, help_text="split across this many workers"
    )
    judge = forms.ChoiceField(
        required=False,
        help_text="safety suites: the judge of each response (default: the SmolLM2 harm probe)",
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["judge"].choices = calibration.judge_choices()

    def clean(self):
        data = super().clean()
        suite = REGISTRY.get(data.get("suite", ""))
        if data.get("judge") and suite is not None and not suite.judged:
            self.add_error("judge", f"{suite.name} takes no judge: only safety suites do")
        return data


class SendToRatersForm(forms.Form):
    n = forms.IntegerField(min_value=1, max_value=calibration.MAX_SENT)
    seed = forms.IntegerField(min_value=0, initial=0, required=False)
    overlap = forms.IntegerField(
        min_value=1, max_value=10, initial=3, required=False, help_text="raters per item"
    )


@researcher_required
def leaderboard(request):
    data = board.leaderboard(complete_only=request.GET.get("partial") != "1")
    return render(
        request, "evalhub/leaderboard.html", {"board": data, "flags": board.regression_flags()}
    )


@api_role_required("researcher")
def leaderboard_json(request):
    """Complete runs only unless ``?partial=1``; every score says whether it is complete."""
    return JsonResponse(board.leaderboard(complete_only=request.GET.get("partial") != "1"))


@api_role_required("researcher")
def regressions_json(request):
    return JsonResponse({"regressions": board.regression_flags()})


@researcher_required
def run_list(request):
    form = RunForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        run = eval_submit(
            model=data["model"],
            suite=data["suite"],
            limit=data["limit"],
            seed=data["seed"] or 0,
            batch_size=data["batch_size"],
            shards=data["shards"],
            user=request.user,
            judge=data["judge"],
        )
        return redirect("run_detail", run_id=run.pk)
    runs = EvalRun.objects.select_related("model", "job").defer("manifest")
    if request.GET.get("complete") == "1":
        runs = runs.filter(complete=True)
    context = {"runs": runs[:100], "form": form, "complete_only": request.GET.get("complete")}
    return render(request, "evalhub/run_list.html", context, status=400 if form.errors else 200)


@researcher_required
def run_detail(request, run_id: int):
    """The run page; htmx polls it for the live part (status, progress, metrics, samples)
    while the run's job is queued or running."""
    run = get_object_or_404(EvalRun.objects.select_related("model", "job"), pk=run_id)
    if request.htmx:
        return render(request, "evalhub/_run_live.html", _run_context(request, run))
    context = _run_context(request, run)
    if run.suite == "safety" and run.metrics is not None:
        context["calibration"] = calibration.run_calibration(run)
        context["raters_form"] = SendToRatersForm()
    return render(request, "evalhub/run_detail.html", context)


@require_POST
@researcher_required
def run_send_to_raters(request, run_id: int):
    """A single-sided campaign of a sample of a safety run's responses (no model names)."""
    run = get_object_or_404(EvalRun, pk=run_id)
    form = SendToRatersForm(request.POST)
    if not form.is_valid():
        field, errors = next(iter(form.errors.items()))
        return HttpResponseBadRequest(f"{field}: {' '.join(errors)}", content_type="text/plain")
    try:
        given = {k: v for k, v in form.cleaned_data.items() if v is not None}
        campaign = calibration.safety_campaign_create(run=run, user=request.user, **given)
    except calibration.CalibrationError as exc:
        return HttpResponseBadRequest(f"{exc.field}: {exc}", content_type="text/plain")
    return redirect("grading:campaign", campaign_id=campaign.pk)


@require_POST
@researcher_required
def run_train_judge(request, run_id: int):
    """A ``safety.judge.train`` job on the labels of the campaigns this run sent to raters."""
    run = get_object_or_404(EvalRun, pk=run_id)
    ids = list(calibration.run_campaigns(run).values_list("pk", flat=True))
    if not ids:
        return HttpResponseBadRequest("run: no campaign of this run", content_type="text/plain")
    params = {"campaign_ids": ids, "public": request.POST.get("public") == "on"}
    try:
        job = job_submit(kind="safety.judge.train", params=params, user=request.user)
    except JobError as exc:
        return HttpResponseBadRequest(str(exc), content_type="text/plain")
    return redirect("job_detail", job_id=job.pk)


def _run_context(request, run: EvalRun) -> dict:
    suite = REGISTRY.get(run.suite)
    detail_filter = suite.detail_filter if suite else None
    samples = run.samples.all()
    if request.GET.get("failures") == "1":
        samples = samples.filter(passed=False)
    if request.GET.get("category"):
        samples = samples.filter(category=request.GET["category"])
    if detail_filter and request.GET.get("detail"):
        samples = samples.filter(
            **{f"details__{detail_filter.key}__contains": [request.GET["detail"]]}
        )
    categories = (
        run.samples.exclude(category="")
        .values_list("category", flat=True)
        .distinct()
        .order_by("category")
    )
    others = EvalRun.objects.filter(suite=run.suite, metrics__isnull=False).exclude(pk=run.pk)
    return {
        "run": run,
        "live": run_progress(run),
        "page": Paginator(samples, 25).get_page(request.GET.get("page")),
        "categories": categories,
        "others": others.select_related("model")[:50],
        "detail_filter": detail_filter,
        "headline": suite.headline if suite else "",
    }


@researcher_required
def run_compare(request):
    try:
        a_id, b_id = int(request.GET.get("a", "")), int(request.GET.get("b", ""))
    except ValueError:
        return HttpResponseBadRequest("give two run ids: ?a=<id>&b=<id>")
    a = get_object_or_404(EvalRun, pk=a_id)
    b = get_object_or_404(EvalRun, pk=b_id)
    suite = REGISTRY.get(a.suite)
    metric = request.GET.get("metric") or (suite.headline if suite else "")
    try:
        result = compare_runs(a, b, metric)
    except ValueError as exc:
        return render(
            request, "evalhub/run_compare.html", {"error": str(exc), "a": a, "b": b}, status=400
        )
    return render(
        request, "evalhub/run_compare.html", {"a": a, "b": b, "metric": metric, "result": result}
    )


@require_POST
@researcher_required
def model_track(request, model_id: int):
    model = get_object_or_404(ModelVersion, pk=model_id)
    model.tracked = not model.tracked
    model.save(update_fields=["tracked"])
    return redirect("model_detail", model_id=model.pk)


@api_role_required("researcher")
def reward_score(request, name: str):
    """POST {"prompt": str, "responses": [str, ...]} → {"scores": [...], "best": index}."""
    from core.payload import PayloadError, request_json
    from evalhub.rewards import reward_model_for

    if request.method != "POST":
        return JsonResponse({"error": "use POST"}, status=405)
    version = ModelVersion.objects.filter(name=name, kind=ModelVersion.REWARD).first()
    if version is None:
        return JsonResponse({"error": f"no reward model named {name!r}"}, status=404)
    try:
        body = request_json(request)
        prompt, responses = body["prompt"], body["responses"]
        if not (
            isinstance(prompt, str)
            and isinstance(responses, list)
            and responses
            and all(isinstance(r, str) for r in responses)
        ):
            raise ValueError("'prompt' must be text and 'responses' a non-empty list of text")
    except PayloadError as exc:
        return JsonResponse({"error": f"malformed request: {exc}"}, status=exc.status)
    except (ValueError, KeyError, TypeError) as exc:
        return JsonResponse({"error": f"malformed request: {exc}"}, status=400)
    scores = reward_model_for(version).score([prompt] * len(responses), responses)
    return JsonResponse({"scores": scores, "best": max(range(len(scores)), key=scores.__getitem__)})

"""The LLM-judge page of a grading campaign (researchers): each judge's agreement with the
raters beside the raters' with each other, and the form that starts a judge job."""

from django import forms
from django.core.paginator import Paginator
from django.shortcuts import redirect, render

from core.access import researcher_required
from core.jobs import JobError, job_submit
from evalhub.judging import DEFAULTS, campaign_judge_report, judge_jobs
from evalhub.models import JudgeVerdict, ModelVersion
from grading import access


class JudgeForm(forms.Form):
    model = forms.ModelChoiceField(
        queryset=ModelVersion.objects.exclude(kind=ModelVersion.REWARD),
        label="Judge model",
        help_text="any registered model; register an OpenAI-compatible endpoint as openai_http",
    )
    limit = forms.IntegerField(min_value=1, required=False, help_text="first N items (all)")
    max_new_tokens = forms.IntegerField(min_value=8, max_value=4096, initial=512)
    swap = forms.BooleanField(required=False, initial=True, label="Swap positions (pairwise)")

    def params(self, campaign) -> dict:
        d = self.cleaned_data
        params = {"campaign_id": campaign.pk, "model_id": d["model"].pk, "swap": d["swap"]}
        params["max_new_tokens"] = d["max_new_tokens"] or DEFAULTS["max_new_tokens"]
        return params | ({"limit": d["limit"]} if d["limit"] else {})


@researcher_required
def campaign_judges(request, campaign_id: int):
    campaign = access.access_campaign_for_researcher(request.user, campaign_id)
    form = JudgeForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            job = job_submit(kind="judge", params=form.params(campaign), user=request.user)
        except JobError as exc:
            form.add_error(None, str(exc))
        else:
            return redirect("job_detail", job_id=job.pk)
    verdicts = JudgeVerdict.objects.filter(job__in=judge_jobs(campaign)).select_related("item")
    context = {
        "campaign": campaign,
        "form": form,
        "report": campaign_judge_report(campaign),
        "verdicts": Paginator(verdicts.order_by("-job_id", "item_id"), 25).get_page(
            request.GET.get("page")
        ),
    }
    status = 400 if request.method == "POST" else 200
    return render(request, "evalhub/campaign_judges.html", context, status=status)

"""The iTeC page: every round (committee, reward model, suite scores, campaign progress) and
the form that starts the next one."""

from django import forms
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from core.access import researcher_required
from core.jobs import job_submit
from evalhub.generation import SOURCES
from evalhub.itec import KIND, next_round_number, rounds
from evalhub.models import ModelVersion
from grading.models import Campaign
from suites import REGISTRY


class RoundForm(forms.Form):
    committee = forms.ModelMultipleChoiceField(
        queryset=ModelVersion.objects.filter(kind=ModelVersion.POLICY),
        help_text="the latest promising models and the best of earlier rounds",
    )
    student = forms.ModelChoiceField(
        queryset=ModelVersion.objects.filter(kind=ModelVersion.POLICY, backend="builtin"),
        help_text="the model fine-tuned on the committee's best answers",
    )
    reward_model = forms.ModelChoiceField(
        queryset=ModelVersion.objects.filter(kind=ModelVersion.REWARD), required=False
    )
    retrain_from = forms.ModelMultipleChoiceField(
        queryset=Campaign.objects.filter(kind="side_by_side"),
        required=False,
        label="or retrain the reward model from",
        help_text="all labels of these campaigns (earlier rounds' included)",
    )
    source = forms.ChoiceField(choices=[(s, s) for s in sorted(SOURCES)])
    limit = forms.IntegerField(min_value=1, max_value=10_000, initial=64, label="Prompts")
    n_samples = forms.IntegerField(min_value=1, max_value=64, initial=4, label="Samples per member")
    temperature = forms.FloatField(min_value=0.05, max_value=2.0, initial=0.8)
    max_new_tokens = forms.IntegerField(min_value=1, max_value=4096, initial=256)
    lora_rank = forms.IntegerField(min_value=0, max_value=256, initial=16)
    epochs = forms.IntegerField(min_value=1, max_value=20, initial=1)
    publish = forms.BooleanField(
        required=False, initial=True, label="Publish the committee's samples as a campaign"
    )
    overlap = forms.IntegerField(min_value=1, max_value=10, initial=3)
    suites = forms.MultipleChoiceField(
        choices=[(name, name) for name in sorted(REGISTRY)],
        initial=["ifeval", "gsm8k", "mmlu"],
        required=False,
        widget=forms.CheckboxSelectMultiple,
    )

    def clean(self):
        data = super().clean()
        if not data.get("reward_model") and not data.get("retrain_from"):
            raise forms.ValidationError("choose a reward model or campaigns to retrain one from")
        return data

    def params(self) -> dict:
        d = self.cleaned_data
        params = {
            "round": next_round_number(),
            "committee": [m.pk for m in d["committee"]],
            "student": d["student"].pk,
            "source": d["source"],
            "limit": d["limit"],
            "n_samples": d["n_samples"],
            "temperature": d["temperature"],
            "max_new_tokens": d["max_new_tokens"],
            "lora_rank": d["lora_rank"],
            "epochs": d["epochs"],
            "suites": d["suites"],
        }
        if d["retrain_from"]:
            params["retrain_from"] = [c.pk for c in d["retrain_from"]]
        else:
            params["reward_model"] = d["reward_model"].pk
        if d["publish"]:
            params["campaign"] = {"overlap": d["overlap"]}
        return params


@researcher_required
def itec_page(request, form: RoundForm | None = None, status: int = 200):
    latest = rounds()
    form = form or RoundForm(initial=_next_defaults(latest))
    return render(request, "evalhub/itec.html", {"rounds": latest, "form": form}, status=status)


@require_POST
@researcher_required
def itec_start(request):
    form = RoundForm(request.POST)
    if not form.is_valid():
        return itec_page(request, form=form, status=400)
    job = job_submit(kind=KIND, params=form.params(), user=request.user)
    return redirect("job_detail", job_id=job.pk)


def _next_defaults(latest: list[dict]) -> dict:
    """The next round's committee: the last round's result and its committee's members."""
    if not latest or not latest[0]["result"].get("model_id"):
        return {}
    last = latest[0]
    committee = [last["result"]["model_id"], *last["job"].params.get("committee", [])]
    campaigns = [r["campaign"].pk for r in latest if r["campaign"]]
    return {
        "committee": committee[:4],
        "student": last["result"]["model_id"],
        "retrain_from": campaigns,
    }

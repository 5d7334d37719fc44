import json

from django import forms
from django.forms.fields import InvalidJSONInput, JSONString

from core import payload
from grading.agreement import Thresholds
from grading.models import Campaign
from grading.uploads import MAX_UPLOAD_BYTES, MAX_UPLOAD_ROWS


class CheckedJSONField(forms.JSONField):
    """A JSON form field parsed by ``core.payload.loads``: NaN, 1e400, NUL characters or deep
    nesting are form errors naming the field, not a 500 when the value is stored."""

    def to_python(self, value):
        if self.disabled:
            return value
        if value in self.empty_values:
            return None
        if isinstance(value, list | dict | int | float | JSONString):
            return value
        try:
            converted = payload.loads(value, subject="the value")
        except payload.PayloadError as exc:
            raise forms.ValidationError(str(exc), code="invalid") from None
        return JSONString(converted) if isinstance(converted, str) else converted

    def bound_data(self, data, initial):
        if self.disabled:
            return initial
        if data is None:
            return None
        try:
            return payload.loads(data)
        except payload.PayloadError:
            return InvalidJSONInput(data)


class CampaignForm(forms.ModelForm):
    aspects = CheckedJSONField(required=False, help_text="single-sided aspects with anchors (JSON)")
    thresholds = CheckedJSONField(
        required=False,
        help_text="when the dashboard flags a rater (JSON object); names left out keep their "
        "defaults, {} keeps them all",
    )

    class Meta:
        model = Campaign
        fields = [
            "name",
            "kind",
            "guidelines",
            "overlap",
            "gold_rate",
            "lease_seconds",
            "quota_per_rater",
            "aspects",
            "thresholds",
            "status",
        ]
        widgets = {"guidelines": forms.Textarea(attrs={"rows": 6})}

    def clean_overlap(self):
        value = self.cleaned_data["overlap"]
        if not 1 <= value <= 50:
            raise forms.ValidationError("overlap must be between 1 and 50")
        return value

    def clean_gold_rate(self):
        value = self.cleaned_data["gold_rate"]
        if not 0 <= value <= 1:
            raise forms.ValidationError("the gold rate is a share between 0 and 1")
        return value

    def clean_lease_seconds(self):
        value = self.cleaned_data["lease_seconds"]
        if value < 30:
            raise forms.ValidationError("a lease shorter than 30 seconds leaves no time to read")
        return value

    def clean_aspects(self):
        aspects = self.cleaned_data.get("aspects") or self.instance.aspects or []
        if not isinstance(aspects, list):
            raise forms.ValidationError("aspects must be a list")
        keys = set()
        for aspect in aspects:
            if not (
                isinstance(aspect, dict)
                and isinstance(aspect.get("key"), str)
                and aspect["key"].isidentifier()
                and isinstance(aspect.get("name"), str)
            ):
                raise forms.ValidationError(
                    f"each aspect needs a 'key' (an identifier) and a 'name': {json.dumps(aspect)}"
                )
            if aspect["key"] in keys:
                raise forms.ValidationError(f"aspect {aspect['key']!r} appears twice")
            keys.add(aspect["key"])
            anchors = aspect.get("anchors", {})
            if not isinstance(anchors, dict) or not set(anchors) <= {"1", "2", "3", "4", "5"}:
                raise forms.ValidationError(f"anchors of {aspect['key']!r} must be keyed 1–5")
        return aspects

    def clean_thresholds(self):
        thresholds = self.cleaned_data.get("thresholds")
        try:
            Thresholds.from_mapping(thresholds)
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None
        return thresholds


UPLOAD_LIMIT = f"{MAX_UPLOAD_BYTES // 2**20} MB"


class UploadForm(forms.Form):
    file = forms.FileField(
        help_text=f".jsonl or .csv in UTF-8, at most {UPLOAD_LIMIT} and {MAX_UPLOAD_ROWS:,} rows; "
        "all rows are imported or none",
        widget=forms.FileInput(attrs={"accept": ".jsonl,.ndjson,.json,.csv"}),
    )

    def clean_file(self):
        upload = self.cleaned_data["file"]
        if upload.size > MAX_UPLOAD_BYTES:
            raise forms.ValidationError(
                f"the file is {upload.size / 2**20:,.0f} MB, more than the limit of "
                f"{UPLOAD_LIMIT}: split it into several uploads"
            )
        return upload


class ExportForm(forms.Form):
    format = forms.ChoiceField(
        choices=[
            ("jsonl", "JSONL (TRL / OpenRLHF preference schema)"),
            ("csv", "CSV"),
            ("parquet", "Parquet"),
            (
                "conversational",
                "JSONL, TRL conversational (prompt, chosen and rejected as message lists)",
            ),
        ]
    )
    include_ties = forms.BooleanField(
        required=False,
        label="Keep ties",
        help_text="side by side: ties ('both good', 'both bad') are left out of the chosen/"
        "rejected rows unless kept here, marked by their tie column (a DPO trainer fed a tie "
        "as a pair would learn a preference nobody expressed)",
    )

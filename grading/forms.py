import json

from django import forms

from grading.models import Campaign

MAX_UPLOAD_BYTES = 512 * 1024 * 1024


class CampaignForm(forms.ModelForm):
    aspects = forms.JSONField(required=False, help_text="single-sided aspects with anchors (JSON)")

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


class UploadForm(forms.Form):
    file = forms.FileField(help_text=".jsonl or .csv; all rows are imported or none")

    def clean_file(self):
        upload = self.cleaned_data["file"]
        if upload.size > MAX_UPLOAD_BYTES:
            raise forms.ValidationError("the file is larger than 512 MB")
        return upload


class ExportForm(forms.Form):
    format = forms.ChoiceField(
        choices=[
            ("jsonl", "JSONL (TRL / OpenRLHF preference schema)"),
            ("csv", "CSV"),
            ("parquet", "Parquet"),
        ]
    )
    include_ties = forms.BooleanField(
        required=False,
        label="Keep ties",
        help_text="side by side: ties ('both good', 'both bad') are left out of the chosen/"
        "rejected rows unless kept here, marked by their tie column (a DPO trainer fed a tie "
        "as a pair would learn a preference nobody expressed)",
    )

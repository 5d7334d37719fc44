import json
import re

from django import forms
from django.forms.fields import InvalidJSONInput, JSONString

from core import payload
from grading.agreement import THRESHOLD_RANGES, Thresholds
from grading.kinds import SIDE_BY_SIDE, SINGLE_SIDED
from grading.models import DEFAULT_ASPECTS, Campaign, default_aspects
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


class _CampaignChecks(forms.ModelForm):
    """The checks both campaign forms make of the plain fields."""

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


class CampaignForm(_CampaignChecks):
    """The admin's form: aspects (with their anchors) and thresholds as JSON."""

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
UPLOAD_HELP = (
    f".jsonl or .csv in UTF-8, at most {UPLOAD_LIMIT} and {MAX_UPLOAD_ROWS:,} rows; "
    "all rows are imported or none"
)
UPLOAD_WIDGET = forms.FileInput(attrs={"accept": ".jsonl,.ndjson,.json,.csv"})


def checked_upload(upload):
    """An uploaded file within the size limit, else a ValidationError that says the limit."""
    if upload is not None and upload.size > MAX_UPLOAD_BYTES:
        raise forms.ValidationError(
            f"the file is {upload.size / 2**20:,.0f} MB, more than the limit of "
            f"{UPLOAD_LIMIT}: split it into several uploads"
        )
    return upload


# What each threshold means, for the new-campaign form (grading.agreement.Thresholds).
THRESHOLD_FIELDS = {
    "min_gold_accuracy": (
        "Lowest gold accuracy",
        "flag a rater who gets a smaller share of gold items right (0–1)",
    ),
    "min_majority_agreement": (
        "Lowest agreement with the majority",
        "flag a rater who sides with the other raters' majority less often (0–1)",
    ),
    "max_left_pick_deviation": (
        "Largest left-pick deviation",
        "side by side: flag a rater whose share of left picks strays further from 0.5 (0–0.5)…",
    ),
    "max_left_pick_p_value": (
        "Left-pick p-value",
        "…when a binomial test gives an unbiased rater less than this chance of it (0–1)",
    ),
    "min_median_seconds": (
        "Shortest median seconds per task",
        "flag a rater who answers faster than this, too fast to have read the responses",
    ),
    "min_labels_for_flags": (
        "Labels before flagging",
        "flag nobody with fewer labels than this: too few say little",
    ),
}
MAX_ASPECTS = 20  # per campaign: each is one row of five keys on the rater's page


class NewCampaignForm(_CampaignChecks):
    """The campaign page's form: aspects as checkboxes and lines of text, thresholds as number
    inputs with their defaults, and the first upload in the same submit
    (``services.campaign_create``). Aspects and thresholds come out as the JSON the campaign
    stores; the admin's ``CampaignForm`` edits that JSON (and the anchors) directly."""

    kind = forms.ChoiceField(
        choices=Campaign.KIND_CHOICES, initial=SIDE_BY_SIDE, widget=forms.RadioSelect
    )
    aspects = forms.MultipleChoiceField(
        label="Aspects",
        choices=[(a["key"], a["name"]) for a in DEFAULT_ASPECTS],
        initial=[a["key"] for a in DEFAULT_ASPECTS],
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="single-sided: each is graded 1–5, with AFM's anchor descriptions",
    )
    more_aspects = forms.CharField(
        label="More aspects",
        required=False,
        max_length=4000,
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "e.g. Tone"}),
        help_text="one name per line, graded 1–5 like the others (anchors can be added in the "
        "admin)",
    )
    file = forms.FileField(
        label="Items",
        required=False,
        help_text=UPLOAD_HELP + " (or upload later)",
        widget=UPLOAD_WIDGET,
    )

    class Meta:
        model = Campaign
        fields = [
            "name",
            "kind",
            "guidelines",
            "status",
            "overlap",
            "gold_rate",
            "lease_seconds",
            "quota_per_rater",
        ]
        widgets = {"guidelines": forms.Textarea(attrs={"rows": 4})}
        labels = {"lease_seconds": "Lease (seconds)", "quota_per_rater": "Quota per rater"}
        help_texts = {
            "lease_seconds": "how long a rater holds a task before it goes back to the pool",
            "quota_per_rater": "most labels one rater may give; empty for no limit",
            "gold_rate": "share of tasks drawn from gold items (0–1)",
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        defaults = Thresholds()
        for name, (label, help_text) in THRESHOLD_FIELDS.items():
            lo, hi, whole = THRESHOLD_RANGES[name]
            field = forms.IntegerField if whole else forms.FloatField
            self.fields[f"threshold_{name}"] = field(
                label=label,
                help_text=help_text,
                required=False,  # left empty: the default
                min_value=lo,
                max_value=hi,
                initial=getattr(defaults, name),
                widget=forms.NumberInput(attrs={"step": 1 if whole else "any"}),
            )

    def threshold_fields(self):
        return [self[f"threshold_{name}"] for name in THRESHOLD_FIELDS]

    def clean_file(self):
        return checked_upload(self.cleaned_data.get("file"))

    def clean_more_aspects(self):
        """Names, one a line, as aspects with a key made from the name."""
        extra = []
        for number, line in enumerate(self.cleaned_data["more_aspects"].splitlines(), 1):
            name = " ".join(line.split())
            if not name:
                continue
            if len(name) > 100:
                raise forms.ValidationError(f"line {number}: a name of at most 100 characters")
            key = re.sub(r"\W+", "_", name.casefold()).strip("_")
            if not key.isidentifier():
                key = f"aspect_{key}"
            extra.append({"key": key, "name": name, "anchors": {}})
        return extra

    def clean(self):
        cleaned = super().clean()
        chosen = set(cleaned.get("aspects") or ())
        aspects = [a for a in default_aspects() if a["key"] in chosen]
        for aspect in cleaned.get("more_aspects") or ():
            if any(aspect["key"] == a["key"] or aspect["name"] == a["name"] for a in aspects):
                self.add_error("more_aspects", f"{aspect['name']!r} is named twice")
            aspects.append(aspect)
        if len(aspects) > MAX_ASPECTS:
            self.add_error("more_aspects", f"at most {MAX_ASPECTS} aspects in all")
        if cleaned.get("kind") == SINGLE_SIDED and not aspects:
            self.add_error("aspects", "a single-sided campaign grades at least one aspect")
        self.instance.aspects = aspects
        self.instance.thresholds = {
            name: cleaned[f"threshold_{name}"]
            for name in THRESHOLD_FIELDS
            if cleaned.get(f"threshold_{name}") is not None
        }
        return cleaned


class UploadForm(forms.Form):
    file = forms.FileField(help_text=UPLOAD_HELP, widget=UPLOAD_WIDGET)

    def clean_file(self):
        return checked_upload(self.cleaned_data["file"])


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

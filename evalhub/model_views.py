"""Researcher pages for the model registry: list, register, import, inspect and try a model."""

from django import forms
from django.http import HttpResponseBadRequest, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from core.access import researcher_required
from core.jobs import job_submit
from core.params import ParamError
from evalhub import inference
from evalhub.compression import compression_table
from evalhub.models import ModelVersion
from grading.models import Campaign
from suites import REGISTRY


def suites_field(help_text: str) -> forms.MultipleChoiceField:
    """The suites queued on a job's result (every form that makes a model has one)."""
    return forms.MultipleChoiceField(
        choices=[(name, name) for name in sorted(REGISTRY)],
        initial=["ifeval", "gsm8k", "mmlu"],
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text=help_text,
    )


class RegisterForm(forms.ModelForm):
    class Meta:
        model = ModelVersion
        fields = ["name", "kind", "backend", "location", "params", "description", "tracked"]


class ImportForm(forms.Form):
    src = forms.CharField(label="GGUF file or Hugging Face directory (path on the server)")
    name = forms.SlugField(max_length=100)


class PosttrainForm(forms.Form):
    """Post-training on a registered model; the job validates the rest (evalhub/posttrain.py)."""

    algorithm = forms.ChoiceField(
        choices=[
            ("sft", "SFT on demonstrations"),
            ("dpo", "DPO"),
            ("ipo", "IPO"),
            ("mdloo", "MDLOO online RL"),
            ("rloo_clip", "RLOO with clipping (RL baseline)"),
            ("reinforce", "REINFORCE (RL baseline)"),
        ]
    )
    campaigns = forms.ModelMultipleChoiceField(
        queryset=Campaign.objects.filter(kind="side_by_side"),
        required=False,
        help_text="side-by-side campaigns: SFT takes their chosen responses, DPO/IPO their labels",
    )
    jsonl = forms.CharField(
        required=False,
        label="or a JSONL file on the server",
        help_text='SFT: {"messages": [...]} per line; DPO/IPO: prompt, chosen, rejected, level',
    )
    name = forms.SlugField(max_length=100, required=False, help_text="default: derived")
    lr = forms.FloatField(required=False, min_value=1e-9, max_value=0.1, label="Learning rate")
    epochs = forms.IntegerField(min_value=1, max_value=100, initial=1)
    batch_size = forms.IntegerField(min_value=1, max_value=1024, initial=8)
    max_steps = forms.IntegerField(min_value=1, required=False)
    lora_rank = forms.IntegerField(
        min_value=0, max_value=256, initial=16, help_text="0: full fine-tune"
    )
    beta = forms.FloatField(min_value=1e-4, max_value=10, initial=0.1, help_text="DPO/IPO")
    level_aware = forms.BooleanField(
        required=False, initial=True, help_text="DPO/IPO: soft targets by preference level"
    )
    iterations = forms.IntegerField(
        min_value=1, max_value=10_000, initial=50, required=False, help_text="RL"
    )
    k = forms.IntegerField(
        min_value=2,
        max_value=64,
        initial=4,
        required=False,
        label="Samples per prompt",
        help_text="RL",
    )
    reward_model = forms.ModelChoiceField(
        queryset=ModelVersion.objects.filter(kind=ModelVersion.REWARD),
        required=False,
        help_text="RL: added to IFEval's checkers on constrained AlpacaEval prompts",
    )
    suites = suites_field("queued on the result")

    def clean(self):
        data = super().clean()
        offline = data.get("algorithm") in ("sft", "dpo", "ipo")
        if offline and not data.get("campaigns") and not data.get("jsonl"):
            raise forms.ValidationError("choose at least one campaign or give a JSONL path")
        return data

    def job(self, model: ModelVersion) -> tuple[str, dict]:
        """(job kind, params) for the cleaned form."""
        data = dict(self.cleaned_data)
        algorithm = data.pop("algorithm")
        rl_only = ("iterations", "k", "reward_model")
        params = {
            k: v
            for k, v in data.items()
            if v not in (None, "") and k not in ("campaigns", *rl_only)
        }
        params.update(model_id=model.pk, suites=data["suites"])
        if algorithm in ("mdloo", "rloo_clip", "reinforce"):
            for k in ("campaigns", "jsonl", "beta", "level_aware", "epochs", "batch_size"):
                params.pop(k, None)
            params.update(
                algorithm=algorithm, iterations=data["iterations"] or 50, k=data["k"] or 4
            )
            if data["reward_model"]:
                params["reward_model"] = data["reward_model"].pk
            return "posttrain.rl", params
        if data["campaigns"]:
            params["campaign_ids"] = [c.pk for c in data["campaigns"]]
        if algorithm == "sft":
            return "posttrain.sft", params
        return "posttrain.dpo", {**params, "loss": algorithm}


class CompressForm(forms.Form):
    """Palettization of this model (``evalhub/compression.py``)."""

    bits = forms.TypedChoiceField(
        choices=[(4, "4-bit"), (2, "2-bit")], coerce=int, initial=4, label="Block projections"
    )
    embedding_bits = forms.TypedChoiceField(
        choices=[(4, "4-bit"), (8, "8-bit"), (2, "2-bit"), ("", "keep fp32")],
        coerce=int,
        empty_value=None,
        required=False,
        initial=4,
        label="Embedding (and tied head)",
    )
    target_bpw = forms.FloatField(
        min_value=2.0,
        max_value=4.5,
        required=False,
        label="Target bits per weight",
        help_text="AFM's mixed 2/4-bit by measured sensitivity, e.g. 3.5 (overrides the bits "
        "above; every tensor and table counted)",
    )
    calib_seqs = forms.IntegerField(
        min_value=1, max_value=400, initial=16, label="Calibration sequences"
    )
    name = forms.SlugField(max_length=100, required=False, help_text="default: derived")
    suites = suites_field("queued on the result")

    def params(self, model: ModelVersion) -> dict:
        data = {k: v for k, v in self.cleaned_data.items() if v != ""}
        if data.get("target_bpw") is None:
            data.pop("target_bpw", None)
        return {**data, "model_id": model.pk}


class RecoveryForm(forms.Form):
    """A recovery adapter for a compressed model (``evalhub.compression.run_recovery``)."""

    rank = forms.TypedChoiceField(choices=[(r, r) for r in (8, 16, 32)], coerce=int, initial=16)
    steps = forms.IntegerField(min_value=1, max_value=100_000, initial=200)
    lr = forms.FloatField(min_value=1e-7, max_value=0.1, initial=1e-3, label="Learning rate")
    train_seqs = forms.IntegerField(
        min_value=1, max_value=700, initial=256, label="Training sequences"
    )
    init = forms.ChoiceField(
        choices=[
            ("error", "fit to each layer's compression error"),
            ("zero", "zero (the compressed model itself)"),
        ],
        initial="error",
        label="Adapter start",
    )


class TaskAdapterForm(forms.Form):
    """A task adapter by SFT (``evalhub.compression.run_task_adapter``): started from this
    adapter (a recovery adapter, as AFM does), or fresh on this policy."""

    campaigns = forms.ModelMultipleChoiceField(
        queryset=Campaign.objects.filter(kind="side_by_side"),
        required=False,
        help_text="side-by-side campaigns: trains on their chosen responses",
    )
    jsonl = forms.CharField(
        required=False,
        label="or a JSONL file on the server",
        help_text='{"messages": [...]} per line',
    )
    source = forms.ChoiceField(
        choices=[("", "—"), ("alpaca-eval", "AlpacaEval instructions, GPT-4 answers")],
        required=False,
        label="or a prompt set",
    )
    limit = forms.IntegerField(min_value=2, max_value=805, initial=256, required=False)
    rank = forms.TypedChoiceField(
        choices=[(r, r) for r in (8, 16, 32)],
        coerce=int,
        initial=16,
        help_text="a fresh adapter's; one started from an adapter keeps that adapter's rank",
    )
    lr = forms.FloatField(min_value=1e-7, max_value=0.1, initial=2e-4, label="Learning rate")
    epochs = forms.IntegerField(min_value=1, max_value=100, initial=1)
    batch_size = forms.IntegerField(min_value=1, max_value=1024, initial=4)
    max_steps = forms.IntegerField(min_value=1, required=False)
    name = forms.SlugField(max_length=100, required=False, help_text="default: derived")
    suites = suites_field("queued on the adapter")

    def clean(self):
        data = super().clean()
        if not (data.get("campaigns") or data.get("jsonl") or data.get("source")):
            raise forms.ValidationError("choose a campaign, a JSONL path or a prompt set")
        return data

    def params(self, model: ModelVersion) -> dict:
        data = {k: v for k, v in self.cleaned_data.items() if v not in (None, "")}
        campaigns = data.pop("campaigns", None)
        if campaigns:
            data["campaign_ids"] = [c.pk for c in campaigns]
        return {**data, "suites": self.cleaned_data["suites"], "model_id": model.pk}


class TryForm(forms.Form):
    prompt = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), max_length=20_000)
    max_tokens = forms.IntegerField(min_value=1, max_value=1024, initial=128)
    temperature = forms.FloatField(min_value=0, max_value=2, initial=0.0)


@researcher_required
def model_list(request):
    register = RegisterForm(request.POST or None, prefix="reg")
    if request.method == "POST" and register.is_valid():
        register.instance.created_by = request.user
        return redirect("model_detail", model_id=register.save().pk)
    return _list_page(request, register=register, import_form=ImportForm())


def _list_page(request, *, register, import_form, status: int = 200):
    models = ModelVersion.objects.select_related("parent")
    return render(
        request,
        "evalhub/model_list.html",
        {"models": models, "register": register, "import_form": import_form},
        status=status,
    )


@require_POST
@researcher_required
def model_import_view(request):
    form = ImportForm(request.POST)
    if form.is_valid():
        try:
            job = job_submit(kind="models.import", params=form.cleaned_data, user=request.user)
            return redirect("job_detail", job_id=job.pk)
        except ParamError as exc:  # the job's own check: a name already registered, say
            form.add_error(None, str(exc))
    return _list_page(request, register=RegisterForm(prefix="reg"), import_form=form, status=400)


@researcher_required
def model_detail(request, model_id: int):
    model = get_object_or_404(ModelVersion.objects.select_related("parent"), pk=model_id)
    return _detail_page(request, model)


def _detail_page(
    request,
    model: ModelVersion,
    posttrain: PosttrainForm | None = None,
    compress: CompressForm | None = None,
    task_adapter: TaskAdapterForm | None = None,
    status: int = 200,
):
    trainable = model.backend == "builtin" and model.kind == "policy"
    context = {
        "model": model,
        "lineage": model.lineage(),
        "try_form": TryForm(),
        "posttrain": (posttrain or PosttrainForm()) if trainable else None,
        "compress": (compress or CompressForm()) if trainable else None,
        "compression": compression_table(model) if trainable else [],
        "recovery": RecoveryForm() if model.relation == ModelVersion.COMPRESSED else None,
        "task_adapter": (task_adapter or TaskAdapterForm()) if _adaptable(model) else None,
        "children": model.children.all(),
    }
    return render(request, "evalhub/model_detail.html", context, status=status)


@require_POST
@researcher_required
def model_recover(request, model_id: int):
    """Train a recovery adapter for this compressed model."""
    model = get_object_or_404(ModelVersion, pk=model_id, relation=ModelVersion.COMPRESSED)
    form = RecoveryForm(request.POST)
    if not form.is_valid():
        return HttpResponseBadRequest(f"invalid recovery request: {form.errors.as_text()}")
    params = {**form.cleaned_data, "model_id": model.pk}
    job = job_submit(kind="adapter.recovery", params=params, user=request.user)
    return redirect("job_detail", job_id=job.pk)


def _adaptable(model: ModelVersion) -> bool:
    """A task adapter can start here: a builtin policy (fresh) or a builtin adapter."""
    served = model.kind == ModelVersion.POLICY or bool(model.params.get("adapter"))
    return model.backend == "builtin" and model.kind != ModelVersion.REWARD and served


@require_POST
@researcher_required
def model_adapter_train(request, model_id: int):
    """Train a task adapter from this adapter, or fresh on this policy."""
    model = get_object_or_404(ModelVersion, pk=model_id)
    if not _adaptable(model):
        return HttpResponseBadRequest("task adapters start from a builtin policy or adapter")
    form = TaskAdapterForm(request.POST)
    if not form.is_valid():
        return _detail_page(request, model, task_adapter=form, status=400)
    job = job_submit(kind="adapter.train", params=form.params(model), user=request.user)
    return redirect("job_detail", job_id=job.pk)


@require_POST
@researcher_required
def model_compress(request, model_id: int):
    """Palettize this model; the result appears in its compression table."""
    model = get_object_or_404(ModelVersion, pk=model_id, backend="builtin", kind="policy")
    form = CompressForm(request.POST)
    if not form.is_valid():
        return _detail_page(request, model, compress=form, status=400)
    job = job_submit(kind="compress", params=form.params(model), user=request.user)
    return redirect("job_detail", job_id=job.pk)


@require_POST
@researcher_required
def model_posttrain(request, model_id: int):
    """Start SFT, DPO or IPO on this model; the job page shows its curves."""
    model = get_object_or_404(ModelVersion, pk=model_id, backend="builtin", kind="policy")
    form = PosttrainForm(request.POST)
    if not form.is_valid():
        return _detail_page(request, model, posttrain=form, status=400)
    kind, params = form.job(model)
    job = job_submit(kind=kind, params=params, user=request.user)
    return redirect("job_detail", job_id=job.pk)


@require_POST
@researcher_required
def model_try(request, model_id: int):
    """Stream a completion as plain text, delta by delta, for the page's prompt box."""
    model = get_object_or_404(ModelVersion, pk=model_id)
    form = TryForm(request.POST)
    if not form.is_valid():
        return StreamingHttpResponse(
            iter([f"error: {form.errors.as_text()}"]),
            status=400,
            content_type="text/plain; charset=utf-8",
        )
    data = form.cleaned_data
    messages = [{"role": "user", "content": data["prompt"]}]

    def deltas():  # from the inference server: web workers never load a model
        try:
            yield from inference.chat_deltas(
                model, messages, max_tokens=data["max_tokens"], temperature=data["temperature"]
            )
        except (inference.Unavailable, RuntimeError) as exc:
            yield f"\n[error: {exc}]"

    response = StreamingHttpResponse(deltas(), content_type="text/plain; charset=utf-8")
    response["X-Accel-Buffering"] = "no"
    return response

"""Researcher pages for the model registry: list, register, import, inspect and try a model."""

from django import forms
from django.http import StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from core.access import researcher_required
from core.jobs import job_submit
from evalhub.models import ModelVersion
from evalhub.registry import backend_for
from models.backends import BackendError, GenerationArgs
from models.backends.streaming import stream_text


class RegisterForm(forms.ModelForm):
    class Meta:
        model = ModelVersion
        fields = ["name", "kind", "backend", "location", "params", "description", "tracked"]


class ImportForm(forms.Form):
    src = forms.CharField(label="GGUF file or Hugging Face directory (path on the server)")
    name = forms.SlugField(max_length=100)


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
    if not form.is_valid():
        return _list_page(
            request, register=RegisterForm(prefix="reg"), import_form=form, status=400
        )
    job = job_submit(kind="models.import", params=form.cleaned_data, user=request.user)
    return redirect("job_detail", job_id=job.pk)


@researcher_required
def model_detail(request, model_id: int):
    model = get_object_or_404(ModelVersion.objects.select_related("parent"), pk=model_id)
    return render(
        request,
        "evalhub/model_detail.html",
        {"model": model, "lineage": model.lineage(), "try_form": TryForm()},
    )


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
    args = GenerationArgs(max_new_tokens=data["max_tokens"], temperature=data["temperature"])

    def deltas():
        try:
            backend = backend_for(model)
            prompt = backend.chat_format([{"role": "user", "content": data["prompt"]}])
            yield from stream_text(backend, prompt, args)
        except BackendError as exc:
            yield f"\n[error: {exc}]"

    response = StreamingHttpResponse(deltas(), content_type="text/plain; charset=utf-8")
    response["X-Accel-Buffering"] = "no"
    return response

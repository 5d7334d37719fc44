"""Researcher pages for prompt sets: the list with counts, import (file or built-in source) and
one set's preview. The parsing and versioning are in evalhub/promptsets.py."""

from django import forms
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from core.access import researcher_required
from evalhub.models import PromptSet
from evalhub.promptsets import (
    BUILTIN,
    MAX_BYTES,
    PromptSetError,
    prompt_set_builtin,
    prompt_set_import,
)

PREVIEW = 20  # records shown on a set's page


class ImportForm(forms.Form):
    name = forms.SlugField(max_length=100, help_text="new, or a set's name for its next version")
    file = forms.FileField(help_text="JSONL or CSV; MT-Bench's question.jsonl as is")
    description = forms.CharField(
        required=False, max_length=10_000, widget=forms.Textarea(attrs={"rows": 2})
    )


class BuiltinForm(forms.Form):
    source = forms.ChoiceField(choices=sorted(BUILTIN.items()))


@researcher_required
def prompt_set_list(request):
    return _list_page(request, ImportForm(), BuiltinForm())


def _list_page(request, import_form, builtin_form, status: int = 200):
    sets = PromptSet.objects.defer("records").select_related("created_by")
    context = {"sets": sets, "import_form": import_form, "builtin_form": builtin_form}
    return render(request, "evalhub/prompt_set_list.html", context, status=status)


@require_POST
@researcher_required
def prompt_set_import_view(request):
    form = ImportForm(request.POST, request.FILES)
    if form.is_valid():
        upload = form.cleaned_data["file"]
        if upload.size > MAX_BYTES:
            form.add_error("file", f"the file is larger than {MAX_BYTES // 2**20} MiB")
        else:
            try:
                prompt_set = prompt_set_import(
                    name=form.cleaned_data["name"],
                    data=upload.read(),
                    filename=upload.name,
                    user=request.user,
                    description=form.cleaned_data["description"],
                )
                return redirect("prompt_set_detail", set_id=prompt_set.pk)
            except PromptSetError as exc:
                for error in exc.errors[:50]:
                    form.add_error("file", error)
    return _list_page(request, form, BuiltinForm(), status=400)


@require_POST
@researcher_required
def prompt_set_builtin_view(request):
    form = BuiltinForm(request.POST)
    if not form.is_valid():
        return _list_page(request, ImportForm(), form, status=400)
    try:
        prompt_set = prompt_set_builtin(form.cleaned_data["source"])
    except FileNotFoundError as exc:
        form.add_error("source", f"its data package is not installed: {exc}")
        return _list_page(request, ImportForm(), form, status=400)
    return redirect("prompt_set_detail", set_id=prompt_set.pk)


@researcher_required
def prompt_set_detail(request, set_id: int):
    prompt_set = get_object_or_404(PromptSet, pk=set_id)
    versions = PromptSet.objects.filter(name=prompt_set.name).defer("records")
    context = {
        "set": prompt_set,
        "preview": prompt_set.records[:PREVIEW],
        "versions": versions,
        "turn_counts": _turn_counts(prompt_set.records),
    }
    return render(request, "evalhub/prompt_set_detail.html", context)


def _turn_counts(records: list[dict]) -> list[tuple[int, int]]:
    counts: dict[int, int] = {}
    for r in records:
        counts[len(r["turns"])] = counts.get(len(r["turns"]), 0) + 1
    return sorted(counts.items())

"""A job's parameters and result as readable HTML: ``{% readable job.result job %}``.

Objects become definition lists (keys as labels), lists of objects tables, other lists one
compact line; an integer under a key that names a model, run, campaign, job or prompt set links
to its page (with the model's or campaign's name), and a finished export's ``file`` links to its
download. Every string is escaped; nothing is shown as a Python repr. The raw JSON stays at
``/api/jobs/<id>/``.
"""

import json

from django import template
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

register = template.Library()

# The page an integer under each key names (job kinds' parameters and results).
LINKED_KEYS = {
    "model_detail": (
        "model_id",
        "model_ids",
        "models",
        "student",
        "committee",
        "reward_model",
        "reranker",
        "backbone_model",
        "parent_id",
        "base_id",
    ),
    "run_detail": ("run_id", "run_ids", "eval_runs", "runs"),
    "grading:campaign": ("campaign_id", "campaign_ids", "retrain_from", "campaigns"),
    "job_detail": ("job_id", "job_ids"),
    "prompt_set_detail": ("prompt_set_id",),
}
URL_OF_KEY = {key: url for url, keys in LINKED_KEYS.items() for key in keys}
LIST_SHOWN = 30  # items of a long list shown before "… N more"
TEXT_INLINE = 200  # longer strings, or any with a newline, go in a <pre>
MAX_DEPTH = 6  # deeper nesting is shown as compact JSON


@register.simple_tag
def readable(value, job=None):
    """``value`` (JSON-like) as escaped HTML; ``job`` makes an export's file a download link."""
    names = _names(_linked_ids(value))
    return _value(value, None, {"job": job, "names": names}, 0)


def _value(value, key, ctx, depth):
    if depth > MAX_DEPTH:
        return format_html("<code>{}</code>", json.dumps(value, default=str))
    if isinstance(value, dict):
        return _mapping(value, ctx, depth)
    if isinstance(value, list | tuple):
        return _sequence(value, key, ctx, depth)
    return _scalar(value, key, ctx)


def _mapping(mapping, ctx, depth):
    if not mapping:
        return mark_safe('<span class="muted">none</span>')
    rows = ((key, _value(v, key, ctx, depth + 1)) for key, v in mapping.items())
    pairs = format_html_join("", "<dt>{}</dt><dd>{}</dd>", rows)
    return format_html('<dl class="facts kv">{}</dl>', pairs)


def _sequence(items, key, ctx, depth):
    if not items:
        return mark_safe('<span class="muted">none</span>')
    more = len(items) - LIST_SHOWN
    tail = format_html(' <span class="muted">… {} more</span>', more) if more > 0 else ""
    if all(isinstance(item, dict) for item in items):
        return format_html("{}{}", _records(items[:LIST_SHOWN], ctx, depth), tail)
    values = ((_value(item, key, ctx, depth + 1),) for item in items[:LIST_SHOWN])
    shown = format_html_join(", ", "{}", values)
    return format_html('<span class="list">{}</span>{}', shown, tail)


def _records(rows, ctx, depth):
    """A list of objects as a table, one column per key any of them has."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    head = format_html_join("", "<th>{}</th>", ((c,) for c in columns))
    body = format_html_join(
        "",
        "<tr>{}</tr>",
        (
            (format_html_join("", "<td>{}</td>", ((_cell(row, c, ctx, depth),) for c in columns)),)
            for row in rows
        ),
    )
    return format_html(
        '<table class="kv"><thead><tr>{}</tr></thead><tbody>{}</tbody></table>', head, body
    )


def _cell(row, column, ctx, depth):
    return _value(row[column], column, ctx, depth + 1) if column in row else ""


def _scalar(value, key, ctx):
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and key in URL_OF_KEY:
        return _link(URL_OF_KEY[key], value, ctx["names"])
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int) and key == "bytes":
        return format_html('<span title="{} bytes">{}</span>', value, filesizeformat(value))
    if key == "file" and _is_download(ctx["job"]):
        url = reverse("grading:download", args=[ctx["job"].pk])
        return format_html('<a href="{}" download>{}</a>', url, value)
    text = str(value)
    if "\n" in text or len(text) > TEXT_INLINE:
        return format_html('<pre class="value">{}</pre>', text)
    return text


def _link(url_name, pk, names):
    name = names.get((url_name, pk))
    if name is False:  # looked up and gone
        return format_html('#{} <span class="muted">(deleted)</span>', pk)
    label = f"{name} (#{pk})" if name else f"#{pk}"
    return format_html('<a href="{}">{}</a>', reverse(url_name, args=[pk]), label)


def _is_download(job) -> bool:
    return job is not None and job.kind == "grading.export" and job.status == "succeeded"


def _linked_ids(value, key=None, found=None) -> dict[str, set[int]]:
    """Every integer under a linked key, by the page it names."""
    found = {} if found is None else found
    if isinstance(value, dict):
        for k, v in value.items():
            _linked_ids(v, k, found)
    elif isinstance(value, list | tuple):
        for item in value:
            _linked_ids(item, key, found)
    elif isinstance(value, int) and not isinstance(value, bool) and key in URL_OF_KEY:
        found.setdefault(URL_OF_KEY[key], set()).add(value)
    return found


def _names(ids: dict[str, set[int]]) -> dict[tuple[str, int], str | bool]:
    """One query per kind of object: its name (a run's suite, a job's kind), or False where it
    no longer exists."""
    from core.models import Job
    from evalhub.models import EvalRun, ModelVersion, PromptSet
    from grading.models import Campaign

    tables = {
        "model_detail": (ModelVersion, "name"),
        "grading:campaign": (Campaign, "name"),
        "prompt_set_detail": (PromptSet, "name"),
        "run_detail": (EvalRun, "suite"),
        "job_detail": (Job, "kind"),
    }
    names: dict[tuple[str, int], str | bool] = {}
    for url_name, pks in ids.items():
        model, field = tables[url_name]
        found = dict(model.objects.filter(pk__in=pks).values_list("pk", field))
        names.update({(url_name, pk): found.get(pk, False) for pk in pks})
    return names

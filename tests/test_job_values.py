"""The job page shows parameters and results as tables with links, never a Python dict repr;
the raw JSON stays at /api/jobs/<id>/."""

import re

import pytest
from django.urls import reverse

from core.models import Job
from evalhub.models import EvalRun, ModelVersion
from tests.factories import make_campaign

pytestmark = pytest.mark.django_db


def _finished(kind: str, params: dict, result: dict) -> Job:
    job = Job.objects.create(kind=kind, params=params, status="running", attempts=1)
    assert job.succeed(result)
    return job


def _section(page: str, element_id: str) -> str:
    return re.search(rf'<div class="job-values" id="{element_id}">(.*?)</div>', page, re.S)[1]


def _assert_no_repr(page: str) -> None:
    assert not re.search(r"\{'|': |\[\{|True|False|None", page), "a Python repr on the page"


def test_an_export_jobs_page_links_its_campaign_and_its_file(login, carol):
    campaign = make_campaign(name="Helpfulness <b>v2</b>")
    job = _finished(
        "grading.export",
        {"campaign_id": campaign.pk, "format": "trl", "include_ties": False},
        {"file": "labels.jsonl", "rows": 4, "format": "trl", "bytes": 2048, "include_ties": False},
    )
    page = login(carol).get(reverse("job_detail", args=[job.pk])).content.decode()
    params, result = _section(page, "job-params"), _section(page, "job-result")
    campaign_url = reverse("grading:campaign", args=[campaign.pk])
    label = f"Helpfulness &lt;b&gt;v2&lt;/b&gt; (#{campaign.pk})"
    assert f'<a href="{campaign_url}">{label}</a>' in params
    assert "<dt>include_ties</dt><dd>no</dd>" in params
    download = reverse("grading:download", args=[job.pk])
    assert f'<dt>file</dt><dd><a href="{download}" download>labels.jsonl</a></dd>' in result
    assert '<dt>bytes</dt><dd><span title="2048 bytes">2.0\xa0KB</span></dd>' in result
    assert "<dt>rows</dt><dd>4</dd>" in result
    _assert_no_repr(params + result)


def test_a_posttrain_jobs_page_shows_nested_values_lists_and_records_readably(login, carol):
    base = ModelVersion.objects.create(name="tiny-base", backend="builtin", location="/m/base")
    child = ModelVersion.objects.create(name="tiny-sft", backend="builtin", location="/m/sft")
    run = EvalRun.objects.create(model=child, suite="ifeval")
    campaign = make_campaign()
    params = {
        "model_id": base.pk,
        "campaign_ids": [campaign.pk, 999_999],
        "suites": ["ifeval", "mmlu"],
        "lr": 2e-05,
        "campaign": {"overlap": 3, "guidelines": "<script>alert(1)</script>"},
        "layer_bits": {},
    }
    result = {
        "model_id": child.pk,
        "name": "tiny-sft",
        "steps": 12,
        "eval_runs": [run.pk],
        "history": [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25, "note": None}],
        "losses": list(range(40)),
    }
    job = _finished("posttrain.sft", params, result)
    page = login(carol).get(reverse("job_detail", args=[job.pk])).content.decode()
    params_html, result_html = _section(page, "job-params"), _section(page, "job-result")

    assert f'<a href="{reverse("model_detail", args=[base.pk])}">tiny-base (#{base.pk})</a>' in (
        params_html
    )
    assert f'href="{reverse("grading:campaign", args=[campaign.pk])}"' in params_html
    assert '#999999 <span class="muted">(deleted)</span>' in params_html  # no dead link
    assert '<span class="list">ifeval, mmlu</span>' in params_html
    assert "<dt>lr</dt><dd>2e-05</dd>" in params_html
    assert "<dt>overlap</dt><dd>3</dd>" in params_html  # a nested object is a nested list
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page

    assert f'<a href="{reverse("run_detail", args=[run.pk])}">ifeval (#{run.pk})</a>' in result_html
    table = re.search(r'<table class="kv">.*?</table>', result_html, re.S)[0]  # records
    columns = re.findall(r"<th>(\w+)</th>", table)  # (jsonb keeps no key order)
    assert sorted(columns) == ["loss", "note", "step"]
    rows = [
        dict(zip(columns, re.findall(r"<td>(.*?)</td>", r), strict=True))
        for r in re.findall(r"<tr>(<td>.*?)</tr>", table)
    ]
    assert rows == [
        {"step": "1", "loss": "0.5", "note": ""},  # a key the record lacks: an empty cell
        {"step": "2", "loss": "0.25", "note": "—"},  # None
    ]
    assert "0, 1, 2" in result_html and "… 10 more" in result_html and ", 30," not in result_html
    _assert_no_repr(params_html + result_html)


def test_the_job_page_reads_its_names_in_a_few_queries(login, carol, django_assert_max_num_queries):
    models = [
        ModelVersion.objects.create(name=f"m{i}", backend="hf", location="/x") for i in range(10)
    ]
    job = _finished("itec.round", {"committee": [m.pk for m in models]}, {"model_id": models[0].pk})
    client = login(carol)
    with django_assert_max_num_queries(8):
        page = client.get(reverse("job_detail", args=[job.pk])).content.decode()
    assert all(f"m{i} (#{m.pk})" in page for i, m in enumerate(models))


def test_the_raw_json_stays_at_the_jobs_api(login, carol):
    job = _finished("demo", {"steps": 2, "chunk": 10}, {"primes": 8, "below": 20})
    client = login(carol)
    page = client.get(reverse("job_detail", args=[job.pk])).content.decode()
    assert reverse("api_job", args=[job.pk]) in page
    body = client.get(reverse("api_job", args=[job.pk])).json()
    assert body["params"] == {"steps": 2, "chunk": 10} and body["result"] == job.result

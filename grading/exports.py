"""Label exports: rows in the TRL / OpenRLHF preference schema, written as JSONL, CSV or
Parquet, or as JSONL in TRL's conversational format, and the preference records reward training
reads. Plain functions; the Celery task that runs an export as a job is a thin wrapper in
``grading/tasks.py``. What a row holds depends on the campaign's kind (``grading.kinds``).

The flat formats give the graded user turn as ``prompt`` and the conversation before it as
``context`` (a list of ``{role, content}``, empty for a single turn). The conversational format
(``conversational``) gives ``prompt`` as the whole message list up to the graded turn and each
response as a one-message assistant list: ``chosen``/``rejected`` side by side (TRL's
conversational preference format, as DPOTrainer reads it), ``completion`` single-sided.

CSV is written for spreadsheets (README, "Human grading"): every cell quoted, so a carriage
return or line break inside a text never splits a row, and text cells that a spreadsheet
would run as a formula — starting with ``=``, ``+``, ``-``, ``@``, tab or carriage return —
get a leading single quote, as OWASP recommends against CSV injection. JSONL and Parquet carry
the texts unchanged."""

import csv
import json
from pathlib import Path

import pandas as pd

from grading.models import SIDE_BY_SIDE, Campaign, Label, Response, conversation
from grading.quality import single_sided_grades
from models.preferences import Preference

CHUNK = 5000
FORMATS = ("jsonl", "csv", "parquet", "conversational")
SUFFIXES = {"conversational": "chat.jsonl"}  # the file name's ending, where not the format
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # OWASP, "CSV Injection"


def export_file(
    campaign: Campaign, fmt: str, path: Path, progress=None, *, include_ties: bool = False
) -> int:
    """Write the campaign's labels to ``path`` in ``fmt``; returns the row count.

    Side by side, ties are left out unless ``include_ties``: the file is read by preference
    trainers (TRL's DPOTrainer, OpenRLHF) that take every row as chosen over rejected. Kept,
    they carry ``tie: true`` and their level. The rows go to a ``.partial`` sibling first and
    are renamed into place, so a half-written file is never offered for download."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}")
    kind = campaign.task_kind
    rows = export_rows(campaign, progress=progress)
    rows = [row for row in rows if kind.exported(row, include_ties=include_ties)]
    if fmt == "conversational":
        rows = [kind.chat_row(row, conversation(row["context"], row["prompt"])) for row in rows]
    tmp = path.with_suffix(".partial")
    _write(rows, tmp, fmt)
    tmp.replace(path)
    return len(rows)


def export_rows(campaign: Campaign, progress=None) -> list[dict]:
    """One dict per label. Side by side: prompt, chosen, rejected (for ties: first and second
    response as uploaded, with ``tie`` true), level; single-sided: prompt, completion, aspects."""
    labels = Label.objects.filter(campaign=campaign).order_by("id")
    total = labels.count()
    values = labels.values(
        "id",
        "item_id",
        "item__prompt",
        "item__context",
        "item__external_id",
        "rater_id",
        "rater__username",
        "preferred_id",
        "level",
        "scores",
        "unsafe",
        "comment",
        "seconds",
        "late",
        "gold_correct",
        "created_at",
    )
    rows, batch = [], []
    for label in values.iterator(chunk_size=CHUNK):
        batch.append(label)
        if len(batch) == CHUNK:
            rows.extend(_rows(campaign, batch))
            batch = []
            if progress:
                progress(len(rows), total)
    rows.extend(_rows(campaign, batch))
    return rows


def preferences_from_campaigns(campaign_ids: list[int]) -> list[Preference]:
    """Preference pairs from side-by-side campaigns, each with its item's conversation
    before the graded turn (``context``) and each response carrying the mean single-sided
    aspect grades it received in any campaign (matched on prompt and text)."""
    grades = single_sided_grades()
    prefs = []
    for campaign in Campaign.objects.filter(pk__in=campaign_ids, kind=SIDE_BY_SIDE):
        for row in export_rows(campaign):
            prefs.append(
                Preference(
                    prompt=row["prompt"],
                    chosen=row["chosen"],
                    rejected=row["rejected"],
                    level=row["level"],
                    chosen_aspects=grades.get((row["prompt"], row["chosen"]), {}),
                    rejected_aspects=grades.get((row["prompt"], row["rejected"]), {}),
                    context=row["context"],
                )
            )
    return prefs


def _rows(campaign: Campaign, labels: list[dict]) -> list[dict]:
    """Rows for a batch of labels, with their responses fetched in one query (no N+1)."""
    grouped = {}
    responses = Response.objects.filter(item_id__in={label["item_id"] for label in labels})
    for r in responses.values("id", "item_id", "position", "text", "model_name"):
        grouped.setdefault(r["item_id"], []).append(r)
    for group in grouped.values():
        group.sort(key=lambda r: r["position"])
    kind = campaign.task_kind
    return [kind.export_row(_common(label), label, grouped[label["item_id"]]) for label in labels]


def _common(label: dict) -> dict:
    """The columns every kind's rows have."""
    return {
        "prompt": label["item__prompt"],
        "context": label["item__context"],
        "item_id": label["item_id"],
        "external_id": label["item__external_id"],
        "rater_id": label["rater_id"],
        "rater": label["rater__username"],
        "label_id": label["id"],
        "seconds": label["seconds"],
        "late": label["late"],
        "gold_correct": label["gold_correct"],
        "created_at": label["created_at"].isoformat(),
    }


def csv_cell(value) -> str:
    """A CSV cell as written: text starting with a formula character gets a leading ``'``;
    aspects (a dict) and the context (a list) are JSON, None is empty, everything else its
    ``str``."""
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    if isinstance(value, str):
        return "'" + value if value.startswith(FORMULA_STARTS) else value
    return str(value)


def _write(rows: list[dict], path: Path, fmt: str) -> None:
    if fmt in ("jsonl", "conversational"):
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    if fmt == "csv":
        with path.open("w", encoding="utf-8", newline="") as f:
            if rows:
                writer = csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
                writer.writerow(rows[0])
                writer.writerows([csv_cell(v) for v in row.values()] for row in rows)
        return
    frame = pd.DataFrame(rows)
    for column in ("aspects", "context"):  # JSON text, as in the CSV
        if column in frame:
            frame[column] = frame[column].map(lambda v: json.dumps(v, sort_keys=True))
    frame.to_parquet(path, index=False)

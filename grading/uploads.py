"""Parse an item upload (JSONL or CSV) into validated rows, all or nothing.

Plain Python (no Django): every problem is collected with its row number, and nothing is returned
unless every row is valid, so a campaign never receives half a file.

Row fields — side by side: ``prompt``, ``response_a``, ``response_b``, optional ``model_a``,
``model_b``; single-sided: ``prompt``, ``response``, optional ``model``. Both: optional ``id``,
``metadata`` (a JSON object; in CSV, every other column becomes metadata) and ``gold``
(side by side: ``a``, ``b`` or ``tie``; single-sided: ``{"aspect": score or [min, max]}``).
JSONL may also give ``responses`` and ``models`` as two-element lists.
"""

import csv
import io
import json
from dataclasses import dataclass, field

MAX_ROWS = 500_000
MAX_TEXT = 200_000  # characters per prompt or response
KNOWN = {
    "id",
    "prompt",
    "response",
    "response_a",
    "response_b",
    "responses",
    "model",
    "model_a",
    "model_b",
    "models",
    "metadata",
    "gold",
}


class UploadError(ValueError):
    def __init__(self, errors: list[str]):
        self.errors = errors
        shown = "; ".join(errors[:20]) + (
            f"; … {len(errors) - 20} more" if len(errors) > 20 else ""
        )
        super().__init__(f"{len(errors)} problem(s): {shown}")


@dataclass
class ItemRow:
    prompt: str
    responses: list[str]
    models: list[str]
    external_id: str = ""
    metadata: dict = field(default_factory=dict)
    gold: dict | None = None  # side by side {"preferred": 0|1|None}; single {"scores": {...}}


def parse_upload(
    data: bytes, filename: str, *, side_by_side: bool, aspects: list[str]
) -> list[ItemRow]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UploadError(
            [f"the file is not UTF-8 text ({exc.reason} at byte {exc.start})"]
        ) from exc
    if filename.lower().endswith(".csv"):
        records, errors = _read_csv(text)
    elif filename.lower().endswith((".jsonl", ".json", ".ndjson")):
        records, errors = _read_jsonl(text)
    else:
        raise UploadError([f"unsupported file type {filename!r}: upload .jsonl or .csv"])
    rows = []
    for number, record in records:
        try:
            rows.append(_row(record, side_by_side=side_by_side, aspects=aspects))
        except ValueError as exc:
            errors.append(f"row {number}: {exc}")
    if not rows and not errors:
        errors.append("the file has no rows")
    if len(rows) > MAX_ROWS:
        errors.append(f"{len(rows)} rows is more than the limit of {MAX_ROWS}")
    if errors:
        raise UploadError(errors)
    return rows


def _read_jsonl(text: str) -> tuple[list[tuple[int, dict]], list[str]]:
    records, errors = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"row {number}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(record, dict):
            errors.append(f"row {number}: expected a JSON object, got {type(record).__name__}")
            continue
        records.append((number, record))
    return records, errors


def _read_csv(text: str) -> tuple[list[tuple[int, dict]], list[str]]:
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        records = []
        for number, record in enumerate(reader, start=2):  # row 1 is the header
            if None in record:
                return [], [f"row {number}: more cells than header columns"]
            extra = {k: v for k, v in record.items() if k not in KNOWN and v not in ("", None)}
            clean = {k: v for k, v in record.items() if k in KNOWN and v not in ("", None)}
            if "gold" in clean and clean["gold"].lstrip().startswith("{"):
                clean["gold"] = _json_cell(clean["gold"], number, "gold")
            if "metadata" in clean:
                clean["metadata"] = _json_cell(clean["metadata"], number, "metadata")
            clean["metadata"] = {**extra, **clean.get("metadata", {})}
            records.append((number, clean))
        return records, []
    except (csv.Error, ValueError) as exc:
        return [], [str(exc)]


def _json_cell(value: str, number: int, column: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise ValueError(f"row {number}: column {column!r} is not valid JSON") from None


def _text(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ValueError(f"missing {key!r}")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be text, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise ValueError(f"{key!r} is longer than {MAX_TEXT} characters")
    return value


def _pair(record: dict, plural: str, a: str, b: str, required: bool) -> list[str]:
    if plural in record:
        values = record[plural]
        if not (isinstance(values, list) and len(values) == 2):
            raise ValueError(f"{plural!r} must be a list of exactly two")
        return [_text({a: values[0]}, a, required), _text({b: values[1]}, b, required)]
    return [_text(record, a, required), _text(record, b, required)]


def _row(record: dict, *, side_by_side: bool, aspects: list[str]) -> ItemRow:
    unknown = set(record) - KNOWN
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}")
    prompt = _text(record, "prompt")
    if side_by_side:
        responses = _pair(record, "responses", "response_a", "response_b", True)
        models = _pair(record, "models", "model_a", "model_b", False)
    else:
        responses, models = [_text(record, "response")], [_text(record, "model", False)]
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError("'metadata' must be an object")
    external_id = record.get("id", "")
    if not isinstance(external_id, (str, int)):
        raise ValueError("'id' must be text or a number")
    gold = _gold(record.get("gold"), side_by_side, aspects) if "gold" in record else None
    return ItemRow(prompt, responses, models, str(external_id), metadata, gold)


def _gold(value, side_by_side: bool, aspects: list[str]) -> dict:
    if side_by_side:
        choices = {"a": 0, "b": 1, "tie": None}
        if not isinstance(value, str) or value.lower() not in choices:
            raise ValueError("'gold' must be 'a', 'b' or 'tie'")
        return {"preferred": choices[value.lower()]}
    if not isinstance(value, dict) or not value:
        raise ValueError("'gold' must map aspects to a score or [min, max]")
    scores = {}
    for aspect, bounds in value.items():
        if aspect not in aspects:
            raise ValueError(f"gold names unknown aspect {aspect!r}")
        lo, hi = (bounds, bounds) if isinstance(bounds, int) else (tuple(bounds) + (None,))[:2]
        if not all(isinstance(v, int) and 1 <= v <= 5 for v in (lo, hi)) or lo > hi:
            raise ValueError(f"gold for {aspect!r} must be a score 1–5 or [min, max]")
        scores[aspect] = [lo, hi]
    return {"scores": scores}

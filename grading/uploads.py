"""Parse an item upload (JSONL or CSV) into validated rows, all or nothing.

Plain Python (no Django): every problem is collected with its row number and field, and nothing
is returned unless every row is valid, so a campaign never receives half a file.

Row fields — side by side: ``prompt``, ``response_a``, ``response_b``, optional ``model_a``,
``model_b``; single-sided: ``prompt``, ``response``, optional ``model``. Instead of ``prompt``, a
row may give a conversation, ``messages``: ``[{"role": …, "content": …}, …]`` (in CSV, that list
as JSON), an optional system message first, then user and assistant turns alternating, the last
a user turn — the one the responses answer. Both: optional ``id``
(unique in the file), ``metadata`` (a JSON object; in CSV, every other column becomes metadata)
and ``gold`` (side by side: ``a``, ``b`` or ``tie``; single-sided: ``{"aspect": score or
[min, max]}`` with whole scores 1–5). JSONL may also give ``responses`` and ``models`` as
two-element lists. A field of the other campaign kind is an error, not metadata.

The limits are the same for both formats (README, "Human grading"): MAX_UPLOAD_BYTES and
MAX_UPLOAD_ROWS for a file uploaded through the page (MAX_ROWS for any import); MAX_TEXT
characters in a prompt, a response, any CSV cell and the metadata written as JSON; MAX_NAME
characters in an id or model name (the width of their columns). Text is UTF-8 (a leading BOM
is ignored): UTF-16 files, bytes that are not UTF-8, NUL characters, nesting deeper than
``core.payload.MAX_DEPTH``, non-finite numbers and integers of more than
``core.payload.MAX_DIGITS`` digits are refused with the row and field named.
"""

import codecs
import csv
import io
import json
from dataclasses import dataclass, field
from typing import Protocol

from core import payload
from core.payload import PayloadError


class Kind(Protocol):
    """What parsing an upload needs of a task kind (``grading.kinds``, which builds on this
    module's limits and text helpers)."""

    label: str
    fields: frozenset[str]
    required_columns: tuple[str, ...]
    foreign_fields: dict[str, str]

    def parse_responses(self, record: dict) -> tuple[list[str], list[str]]: ...

    def parse_gold(self, value, aspects: list[str]) -> dict: ...


# A file uploaded through the campaign page is parsed and imported inside the request, so it
# must finish well within gunicorn's 30-second worker timeout: on a busy 2-core machine a 32 MB
# file of 22,000 rows took 13 s and 50,000 short rows 18 s (parsing holds about four times the
# file in memory). Imports that run in jobs (generated campaigns) are bounded by MAX_ROWS only.
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
MAX_UPLOAD_ROWS = 50_000
MAX_ROWS = 500_000
MAX_TEXT = 200_000  # characters in a prompt, a response, a CSV cell, the metadata as JSON
MAX_NAME = 200  # characters in an id or a model name: Item.external_id, Response.model_name
MAX_LINE = 5_000_000  # characters in one JSONL line: three texts, escaped, and the metadata

COMMON = {"id", "prompt", "messages", "metadata", "gold"}  # and the kind's (grading.kinds)
ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 200  # messages in one conversation


class UploadError(ValueError):
    def __init__(self, errors: list[str]):
        self.errors = errors
        shown = "; ".join(errors[:20]) + (
            f"; … {len(errors) - 20} more" if len(errors) > 20 else ""
        )
        super().__init__(f"{len(errors)} problem(s): {shown}")


@dataclass
class ItemRow:
    prompt: str  # the graded user turn
    responses: list[str]
    models: list[str]
    external_id: str = ""
    metadata: dict = field(default_factory=dict)
    gold: dict | None = None  # side by side {"preferred": 0|1|None}; single {"scores": {...}}
    number: int = 0  # the row in the file, for messages
    context: list[dict] = field(default_factory=list)  # earlier turns: Item.context


def parse_upload(
    data: bytes,
    filename: str,
    *,
    kind: "Kind",
    aspects: list[str],
    max_rows: int = MAX_ROWS,
) -> list[ItemRow]:
    """The rows of a file for a campaign of ``kind`` (grading.kinds.KINDS) grading ``aspects``;
    raises UploadError listing every problem by row and field."""
    if filename.lower().endswith(".csv"):
        read = _read_csv
    elif filename.lower().endswith((".jsonl", ".json", ".ndjson")):
        read = _read_jsonl
    else:
        raise UploadError([f"unsupported file type {filename!r}: upload .jsonl or .csv"])
    records, errors = read(_decode(data), kind)
    if len(records) > max_rows:
        raise UploadError(
            [f"{len(records):,} rows is more than the limit of {max_rows:,}: split the file"]
        )
    rows, first_of_id = [], {}
    for number, record in records:
        try:
            row = _row(record, kind=kind, aspects=aspects)
        except ValueError as exc:  # PayloadError included
            errors.append(f"row {number}: {exc}")
            continue
        row.number = number
        if row.external_id:
            first = first_of_id.setdefault(row.external_id, number)
            if first != number:
                errors.append(f"row {number}: id {row.external_id!r} repeats row {first}")
        rows.append(row)
    if not rows and not errors:
        errors.append("the file has no rows")
    if errors:
        raise UploadError(errors)
    return rows


def _decode(data: bytes) -> str:
    """UTF-8 text; bytes that do not decode become lone surrogates (``surrogateescape``), which
    the field checks report with their row and field."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or _looks_utf16(data):
        raise UploadError(
            [
                "the file is not UTF-8 but UTF-16 (or UTF-32) text: save it as UTF-8 "
                "(Excel: “CSV UTF-8”)"
            ]
        )
    return data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def _looks_utf16(data: bytes) -> bool:
    """UTF-16 without a byte-order mark: text in Latin script has a zero every other byte."""
    head = data[:512]
    if len(head) < 8:
        return False
    return any(half.count(0) > 0.8 * len(half) for half in (head[0::2], head[1::2]))


def _read_jsonl(text: str, kind: "Kind") -> tuple[list[tuple[int, dict]], list[str]]:
    return payload.jsonl_records(text, max_line=MAX_LINE)


def _read_csv(text: str, kind: "Kind") -> tuple[list[tuple[int, dict]], list[str]]:
    """Rows numbered as a spreadsheet shows them: the header is row 1."""
    if csv.field_size_limit() < MAX_TEXT:
        csv.field_size_limit(MAX_TEXT)  # a longer cell is a csv.Error, reported with its row
    reader = csv.reader(io.StringIO(text, newline=""))
    records, errors, number = [], [], 0
    try:
        header = next(reader, None)
        number = 1
        if header is None:
            return [], []
        if problems := _header_problems(header, kind):
            return [], [f"row 1: {p}" for p in problems]
        for cells in reader:
            number += 1
            if not any(cell.strip() for cell in cells):
                continue
            try:
                records.append((number, _csv_record(header, cells, kind)))
            except ValueError as exc:
                errors.append(f"row {number}: {exc}")
    except csv.Error as exc:
        message = str(exc)
        if "field limit" in message:
            message = f"a cell is longer than {MAX_TEXT:,} characters"
        errors.append(f"row {number + 1}: {message}")
    return records, errors


def _header_problems(header: list[str], kind: "Kind") -> list[str]:
    problems, seen = [], set()
    for i, name in enumerate(header, start=1):
        try:
            payload.text(name, f"column {i}", max_length=MAX_NAME)
        except PayloadError as exc:
            problems.append(f"the header's {exc}")
            continue
        if name in seen:
            problems.append(f"column {name!r} appears twice")
        seen.add(name)
        if name in ("responses", "models"):
            problems.append(f"column {name!r} is JSONL only: give one column per response")
        elif name in kind.foreign_fields:
            problems.append(_other_kind(name, kind))
    if "prompt" not in header and "messages" not in header:
        problems.append("the header has no 'prompt' (or 'messages') column")
    problems += [
        f"the header has no {name!r} column" for name in kind.required_columns if name not in header
    ]
    return problems


def _csv_record(header: list[str], cells: list[str], kind: "Kind") -> dict:
    if len(cells) > len(header):
        raise ValueError(f"more cells than header columns ({len(cells)} > {len(header)})")
    record, extra = {}, {}
    for i, (column, cell) in enumerate(zip(header, cells, strict=False), start=1):
        if cell == "":
            continue
        if not column:
            raise ValueError(f"column {i} has a value but no name in the header")
        if column in COMMON or column in kind.fields:
            record[column] = cell
        else:
            extra[column] = payload.text(cell, column, max_length=MAX_TEXT)
    if "messages" in record:
        record["messages"] = payload.loads(
            record["messages"], subject="'messages'", prefix=("messages",)
        )
    if "gold" in record and record["gold"].lstrip().startswith("{"):
        record["gold"] = payload.loads(record["gold"], subject="'gold'", prefix=("gold",))
    metadata = {}
    if "metadata" in record:
        metadata = payload.loads(record["metadata"], subject="'metadata'", prefix=("metadata",))
        if not isinstance(metadata, dict):
            raise ValueError(f"'metadata' must be a JSON object, not {payload.json_type(metadata)}")
    record["metadata"] = {**extra, **metadata}
    return record


def _other_kind(name: str, kind: "Kind") -> str:
    owner = kind.foreign_fields[name]
    return f"{name!r} is a {owner} field, but this campaign is {kind.label.lower()}"


def _row(record: dict, *, kind: "Kind", aspects: list[str]) -> ItemRow:
    fields = COMMON | kind.fields
    for key in record:
        if key in kind.foreign_fields:
            raise ValueError(_other_kind(key, kind))
    unknown = set(record) - fields
    if unknown:
        names = ", ".join(sorted(str(k)[:40] for k in unknown))
        raise ValueError(f"unknown field(s) {names}")
    context, prompt = _turns(record)
    responses, models = kind.parse_responses(record)
    metadata = record.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise ValueError(f"'metadata' must be an object, not {payload.json_type(metadata)}")
    if len(json.dumps(metadata, ensure_ascii=False)) > MAX_TEXT:
        raise ValueError(f"'metadata' is longer than {MAX_TEXT:,} characters as JSON")
    gold = kind.parse_gold(record["gold"], aspects) if "gold" in record else None
    external_id = _external_id(record.get("id"))
    return ItemRow(prompt, responses, models, external_id, metadata, gold, context=context)


def _turns(record: dict) -> tuple[list[dict], str]:
    """(earlier messages, graded user turn) from ``prompt`` or from ``messages``."""
    if "messages" not in record:
        prompt = payload.text(record.get("prompt"), "prompt", max_length=MAX_TEXT, required=True)
        return [], prompt
    if "prompt" in record:
        raise ValueError("give 'prompt' or 'messages', not both")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f"'messages' must be a non-empty list of {{role, content}}, not {shown(messages)}"
        )
    if len(messages) > MAX_MESSAGES:
        raise ValueError(f"'messages' has more than {MAX_MESSAGES} messages")
    checked = [_message(m, i) for i, m in enumerate(messages)]
    start = 1 if checked[0]["role"] == "system" else 0
    for i, message in enumerate(checked[start:], start=start):
        wanted = "user" if (i - start) % 2 == 0 else "assistant"
        if message["role"] != wanted:
            raise ValueError(
                f"messages[{i}].role is {message['role']!r} where {wanted!r} was expected: a "
                "system message may come first, then user and assistant alternate"
            )
    if checked[-1]["role"] != "user":
        raise ValueError(
            "the last message must be the user turn that the responses answer, not "
            f"{checked[-1]['role']!r}"
        )
    return checked[:-1], checked[-1]["content"]


def _message(message, i: int) -> dict:
    if not isinstance(message, dict):
        raise ValueError(f"messages[{i}] must be an object, not {payload.json_type(message)}")
    unknown = set(message) - {"role", "content"}
    if unknown:
        names = ", ".join(sorted(str(k)[:40] for k in unknown))
        raise ValueError(f"messages[{i}] has unknown field(s) {names}")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(
            f"messages[{i}].role must be 'system', 'user' or 'assistant', not {shown(role)}"
        )
    content = payload.text(
        message.get("content"), f"messages[{i}].content", max_length=MAX_TEXT, required=True
    )
    return {"role": role, "content": content}


def _external_id(value) -> str:
    if value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # at most core.payload.MAX_DIGITS digits
    elif not isinstance(value, str):
        raise ValueError(f"'id' must be text or a whole number, not {payload.json_type(value)}")
    return payload.text(value, "id", max_length=MAX_NAME)


def shown(value) -> str:
    """A short JSON rendering of a rejected value, for messages."""
    text = json.dumps(value)  # ASCII: a lone surrogate or NUL shows escaped
    return text if len(text) <= 40 else text[:39] + "…"

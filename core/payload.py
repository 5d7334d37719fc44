"""Untrusted JSON and text, checked in one place: the body of every JSON endpoint, each row and
JSON cell of an item upload, the JSON fields of campaign forms, and free text from raters.

Python's ``json`` accepts what the database and the code behind it cannot use: ``NaN``,
``Infinity`` and numbers such as ``1e400`` (a float infinity), integers of thousands of digits
(``int()`` refuses more than 4,300), nesting deep enough to exhaust the recursion limit, NUL
characters (PostgreSQL's text and jsonb reject U+0000) and lone surrogates (not encodable as
UTF-8; bytes that were not UTF-8 become such characters under ``surrogateescape``). ``loads``
turns each into a ``PayloadError`` whose message names the field, as in
``'scores.truthfulness' is not a finite number (1e400)``; ``text`` checks one text value.

Plain Python; only ``request_json`` touches a Django request.
"""

import json
import math
import re
from typing import Any

MAX_DEPTH = 32  # nested objects and lists; every legitimate payload here needs a handful
MAX_DIGITS = 64  # digits of a JSON integer; ids, seeds and counts need far fewer

_BAD_CHAR = re.compile("[\x00\ud800-\udfff]")


class PayloadError(ValueError):
    """Input that cannot be used. ``str()`` is safe to show and names the field; ``status`` is
    the HTTP status a JSON endpoint answers with."""

    def __init__(self, message: str, *, status: int = 400):
        self.status = status
        super().__init__(message)


class _Rejected:
    """A number ``json`` parsed that nothing may use; ``check`` reports it with its field."""

    __slots__ = ("text", "problem")

    def __init__(self, text: str, problem: str):
        self.text, self.problem = text, problem


def _parse_int(s: str):
    digits = len(s) - s.startswith("-")
    if digits > MAX_DIGITS:
        return _Rejected(f"{s[:12]}…", f"has {digits} digits, more than {MAX_DIGITS}")
    return int(s)


def _parse_float(s: str):
    value = float(s)
    return value if math.isfinite(value) else _Rejected(s[:40], "is not a finite number")


def _parse_constant(name: str):
    return _Rejected(name, "is not a finite number")


def field_name(path: tuple, subject: str) -> str:
    """``'scores.truthfulness'``, ``'messages[0].content'``; ``subject`` for the whole value."""
    if not path:
        return subject
    name = ""
    for key in path:
        name += f"[{key}]" if isinstance(key, int) else (f".{key}" if name else str(key))
    return repr(name if len(name) <= 100 else name[:99] + "…")


def _char_problem(char: str) -> str:
    if char == "\x00":
        return "contains a NUL character (U+0000)"
    return "is not valid UTF-8 text (undecodable bytes or a lone surrogate)"


def loads(data: str | bytes, *, subject: str = "the body", prefix: tuple = ()) -> Any:
    """Parse JSON text (bytes must be UTF-8; a leading BOM is ignored) and ``check`` it;
    ``prefix`` is the path of the value inside a larger record, for messages."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError(
                f"{subject} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                f"{exc.start} cannot be decoded)"
            ) from None
    data = data.removeprefix("\ufeff")
    try:
        value = json.loads(
            data,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except json.JSONDecodeError as exc:
        # Some of json's messages end in "at" ("Invalid control character at").
        msg = exc.msg.removesuffix(" at")
        where = f"line {exc.lineno} column {exc.colno}" if "\n" in data else f"column {exc.colno}"
        name = field_name(prefix, subject)
        raise PayloadError(f"{name} is not valid JSON ({msg} at {where})") from None
    except RecursionError:
        name = field_name(prefix, subject)
        raise PayloadError(f"{name} is nested more than {MAX_DEPTH} levels deep") from None
    check(value, subject=subject, prefix=prefix)
    return value


def check(value: Any, *, subject: str = "the body", prefix: tuple = ()) -> None:
    """Raise PayloadError for the first unusable part of a JSON-like value, in document order:
    nesting deeper than MAX_DEPTH, a rejected or non-finite number, NUL or undecodable text."""
    stack: list[tuple[Any, tuple, int]] = [(value, prefix, 0)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, str):
            if bad := _BAD_CHAR.search(node):
                raise PayloadError(f"{field_name(path, subject)} {_char_problem(bad.group())}")
        elif isinstance(node, dict):
            if depth >= MAX_DEPTH:
                raise PayloadError(
                    f"{field_name(path, subject)} is nested more than {MAX_DEPTH} levels deep"
                )
            children = []
            for key, child in node.items():
                if isinstance(key, str) and (bad := _BAD_CHAR.search(key)):
                    raise PayloadError(
                        f"{field_name(path, subject)} has a key that {_char_problem(bad.group())}"
                    )
                children.append((child, (*path, key), depth + 1))
            stack.extend(reversed(children))
        elif isinstance(node, list):
            if depth >= MAX_DEPTH:
                raise PayloadError(
                    f"{field_name(path, subject)} is nested more than {MAX_DEPTH} levels deep"
                )
            stack.extend((node[i], (*path, i), depth + 1) for i in reversed(range(len(node))))
        elif isinstance(node, _Rejected):
            raise PayloadError(f"{field_name(path, subject)} {node.problem} ({node.text})")
        elif isinstance(node, float) and not math.isfinite(node):
            raise PayloadError(f"{field_name(path, subject)} is not a finite number ({node})")


def text(value: Any, name: str, *, max_length: int, required: bool = False) -> str:
    """A text field: a string of at most ``max_length`` characters, without NUL or undecodable
    characters; None or blank is ``""`` unless ``required``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise PayloadError(f"missing {name!r}")
        return "" if value is None else value
    if not isinstance(value, str):
        raise PayloadError(f"{name!r} must be text, not {json_type(value)}")
    if len(value) > max_length:
        raise PayloadError(f"{name!r} is longer than {max_length:,} characters")
    if bad := _BAD_CHAR.search(value):
        raise PayloadError(f"{name!r} {_char_problem(bad.group())}")
    return value


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages: object, array, string, …"""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def request_json(request) -> dict:
    """The JSON object in a Django request's body (empty means ``{}``), checked by ``loads``.
    Raises PayloadError: 413 past DATA_UPLOAD_MAX_MEMORY_SIZE, else 400."""
    from django.conf import settings
    from django.core.exceptions import RequestDataTooBig

    try:
        raw = request.body
    except RequestDataTooBig:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        raise PayloadError(f"the body is larger than {limit:,} bytes", status=413) from None
    body = loads(raw or b"{}")
    if not isinstance(body, dict):
        raise PayloadError(f"the body must be a JSON object, not {json_type(body)}")
    return body


def jsonl_records(
    text: str, *, max_line: int | None = None
) -> tuple[list[tuple[int, dict]], list[str]]:
    """An uploaded JSONL file's objects with their line numbers, and an error naming the row
    for each line that is not one (too long, not JSON, not an object). Blank lines are skipped.
    Lines end at "\\n" only: str.splitlines() would also split at U+2028 and other characters
    that JSON strings may hold unescaped."""
    records, errors = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if max_line is not None and len(line) > max_line:
            errors.append(f"row {number}: the line is longer than {max_line:,} characters")
            continue
        try:
            record = loads(line, subject="the line")
        except PayloadError as exc:
            errors.append(f"row {number}: {exc}")
            continue
        if not isinstance(record, dict):
            errors.append(f"row {number}: expected a JSON object, got {json_type(record)}")
            continue
        records.append((number, record))
    return records, errors

"""Job parameters, declared once per job kind beside its task and checked when a job is submitted.

A kind's ``Params`` lists its fields (``Param``: name, type, bounds, choices, help) and the rules
that tie fields together (``Rule``). ``job_submit`` calls ``Params.validate`` before it creates
the Job row, so a bad value is a 400 naming the field ("params.temperature must be between 0
and 2, got 5") and no job; unknown fields are refused by name. ``validate`` returns the params
as given, with floats given as integers made floats: defaults are not filled in (the job's own
code applies them, and ``default`` here documents them), so a stored job reads as submitted.

The same declarations print the README's table of job kinds (``manage.py jobkinds --markdown``).
"""

import json
import math
import re
from collections.abc import Callable, Container
from dataclasses import dataclass, field, replace

from core.models import JobError

TYPE_NAMES = {int: "integer", float: "number", bool: "boolean", str: "string", list: "list"}
TYPE_NAMES[dict] = "object"


class ParamError(JobError):
    """A submitted parameter is missing, unknown or out of bounds; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field = field


@dataclass(frozen=True)
class Param:
    """One parameter of a job kind. ``type`` is int, float, bool, str, list or dict; a list's
    elements (and a free-form dict's values) have type ``item`` and are checked against the
    bounds and choices one by one; a dict with ``fields`` is checked as nested params.
    ``choices`` may be a callable (read at submission: registered models, campaigns), then
    ``choices_doc`` says in words what it accepts."""

    name: str
    type: type
    help: str
    required: bool = False
    default: object = None  # what the job uses when the field is absent (documentation only)
    min: float | None = None
    max: float | None = None
    choices: Container | Callable[[], Container] | None = None
    choices_doc: str = ""
    item: type | None = None
    nullable: bool = False  # null is a value of its own (e.g. "keep fp32"), not "absent"
    max_len: int | None = None  # characters of a string, elements of a list or dict
    pattern: str | None = None  # a string must match it entirely
    fields: "Params | None" = None


@dataclass(frozen=True)
class Rule:
    """A check across fields: ``ok(params)`` (the checked params) must hold, else the error is
    the field's path followed by ``doc``, which is written to complete that sentence
    ("params.temperature" + "must be above 0 with a reranker")."""

    doc: str
    field: str
    ok: Callable[[dict], bool]


class Rows:
    """The ids of a queryset's rows as ``Param.choices``: each submitted id is looked up on its
    own (``exists()``), so a large table is never read whole."""

    def __init__(self, queryset):
        self.queryset = queryset

    def __contains__(self, pk) -> bool:
        return isinstance(pk, int) and self.queryset.filter(pk=pk).exists()


def one_of(*names: str) -> Rule:
    """At least one of ``names`` must be given (a data source, say)."""
    others = " or ".join(f"`{n}`" for n in names[1:])
    return Rule(f"or {others} is required", names[0], lambda p: any(p.get(n) for n in names))


@dataclass(frozen=True)
class Params:
    """The declared parameters of one job kind."""

    fields: tuple[Param, ...] = ()
    rules: tuple[Rule, ...] = field(default=())

    def __post_init__(self):
        names = [f.name for f in self.fields]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"parameters declared twice: {dupes}")

    def extend(self, *fields: Param, rules: tuple[Rule, ...] = ()) -> "Params":
        """These params plus ``fields`` (replacing fields of the same name) and ``rules``."""
        new = {f.name for f in fields}
        kept = tuple(f for f in self.fields if f.name not in new)
        return Params(kept + fields, self.rules + rules)

    def without(self, *names: str) -> "Params":
        """These params less ``names``, and less the rules that name them."""
        return Params(
            tuple(f for f in self.fields if f.name not in names),
            tuple(r for r in self.rules if r.field not in names),
        )

    def with_defaults(self, **defaults) -> "Params":
        """The same fields with other documented defaults (a kind whose code differs)."""
        return Params(
            tuple(replace(f, default=defaults.get(f.name, f.default)) for f in self.fields),
            self.rules,
        )

    def validate(self, params: dict, prefix: str = "params") -> dict:
        """``params`` checked and normalised, or a ParamError naming the first bad field."""
        if not isinstance(params, dict):
            raise ParamError(prefix, f"must be an object, got {_type_name(params)}")
        by_name = {f.name: f for f in self.fields}
        unknown = sorted(str(k) for k in params if k not in by_name)
        if unknown:
            known = ", ".join(sorted(by_name)) or "none"
            raise ParamError(
                f"{prefix}.{unknown[0]}", f"is not a parameter of this kind (known: {known})"
            )
        out = {}
        for f in self.fields:
            path = f"{prefix}.{f.name}"
            if f.name not in params:
                if f.required:
                    raise ParamError(path, f"is required: {f.help}")
                continue
            out[f.name] = _check(f, params[f.name], path)
        for rule in self.rules:
            if not rule.ok(out):
                raise ParamError(f"{prefix}.{rule.field}", rule.doc)
        return out


def _check(f: Param, value, path: str):
    if value is None:
        if f.nullable or (not f.required and f.default is None):
            return None
        raise ParamError(path, f"must be {_a(f.type)}, got null")
    value = _typed(f.type, value, path)
    if f.type is str:
        _bounded_size(f, value, path)
        if f.pattern and not re.fullmatch(f.pattern, value):
            raise ParamError(path, f"must match {f.pattern}, got {_show(value)}")
        return _chosen(f, value, path)
    if f.type in (int, float):
        return _chosen(f, _bounded(f, value, path), path)
    if f.type is list:
        _bounded_size(f, value, path)
        return [_element(f, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if f.type is dict:
        _bounded_size(f, value, path)
        if f.fields is not None:
            return f.fields.validate(value, path)
        return {str(k): _element(f, v, f"{path}.{k}") for k, v in value.items()}
    return value


def _element(f: Param, value, path: str):
    """One element of a list (or value of a free-form dict): type ``item``, then the bounds and
    choices of its field."""
    if f.item is None:
        return value
    value = _typed(f.item, value, path)
    if f.item in (int, float):
        value = _bounded(f, value, path)
    return _chosen(f, value, path)


def _typed(kind: type, value, path: str):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise ParamError(path, f"must be {_a(kind)}, got {_type_name(value)} {_show(value)}")
    if kind is float and not math.isfinite(value):
        raise ParamError(path, f"must be a finite number, got {value}")
    return value


def _bounded(f: Param, value, path: str):
    low, high = f.min, f.max
    if low is not None and high is not None and not low <= value <= high:
        raise ParamError(path, f"must be between {_num(low)} and {_num(high)}, got {_show(value)}")
    if low is not None and value < low:
        raise ParamError(path, f"must be at least {_num(low)}, got {_show(value)}")
    if high is not None and value > high:
        raise ParamError(path, f"must be at most {_num(high)}, got {_show(value)}")
    return value


def _bounded_size(f: Param, value, path: str) -> None:
    if f.max_len is not None and len(value) > f.max_len:
        unit = "characters" if isinstance(value, str) else "elements"
        raise ParamError(path, f"must have at most {f.max_len} {unit}, got {len(value)}")


def _chosen(f: Param, value, path: str):
    if f.choices is None:
        return value
    allowed = f.choices() if callable(f.choices) else f.choices
    if value not in allowed:
        raise ParamError(path, f"must be {choices_text(f)}, got {_show(value)}")
    return value


def choices_text(f: Param) -> str:
    """What a field accepts, in words ("one of 2, 4", "the id of a registered reward model")."""
    if f.choices_doc or f.choices is None:
        return f.choices_doc
    if callable(f.choices):  # a registry: its names in order
        return "one of " + ", ".join(_show(c) for c in sorted(f.choices(), key=str))
    return "one of " + ", ".join(_show(c) for c in f.choices)  # as declared


def _a(kind: type) -> str:
    name = TYPE_NAMES.get(kind, kind.__name__)
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _type_name(value) -> str:
    return "null" if value is None else TYPE_NAMES.get(type(value), type(value).__name__)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _show(value) -> str:
    """A value as the error quotes it, JSON-like and cut short (the response is JSON: inert)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = '"' + value.replace('"', '\\"') + '"'
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def markdown(kinds: dict) -> str:
    """The README's section body: per job kind (``core.jobs.KINDS``, kind → task) its queue,
    what it does (the first paragraph of its function's docstring) and a table of its params."""
    parts = []
    for kind in sorted(kinds):
        task = kinds[kind]
        doc = " ".join((task.job_fn.__doc__ or "").strip().split("\n\n")[0].split())
        doc = doc.replace("``", "`")  # reST literals as Markdown code
        parts.append(f"#### `{kind}` (queue `{task.job_queue}`)\n\n{doc}\n")
        parts.append(_table(task.job_params))
    return "\n".join(parts)


def _table(params: Params) -> str:
    lines = ["| parameter | type | default | accepts | meaning |", "|---|---|---|---|---|"]
    lines += _rows(params, "")
    notes = [f"- `{rule.field}` {rule.doc}." for rule in params.rules]
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def _rows(params: Params, prefix: str) -> list[str]:
    rows = []
    for f in params.fields:
        kind = TYPE_NAMES[f.type]
        if f.item is not None:
            kind += f" of {TYPE_NAMES[f.item]}"
        default = "**required**" if f.required else _doc_value(f.default)
        cells = [f"`{prefix}{f.name}`", kind, default, _accepts(f), f.help]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        if f.fields is not None:
            rows += _rows(f.fields, f"{prefix}{f.name}.")
    return rows


def _accepts(f: Param) -> str:
    parts = []
    if f.min is not None and f.max is not None:
        parts.append(f"{_num(f.min)} to {_num(f.max)}")
    elif f.min is not None:
        parts.append(f"≥ {_num(f.min)}")
    elif f.max is not None:
        parts.append(f"≤ {_num(f.max)}")
    if f.choices is not None:
        parts.append(choices_text(f))
    if f.pattern:
        parts.append(f"matches `{f.pattern}`")
    if f.max_len is not None:
        parts.append(f"at most {f.max_len} {'characters' if f.type is str else 'elements'}")
    if f.nullable:
        parts.append("or null")
    return "; ".join(parts)


def _doc_value(value) -> str:
    if value is None:
        return ""
    return f"`{json.dumps(value)}`"

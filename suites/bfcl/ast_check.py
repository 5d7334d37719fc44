"""BFCL's AST matching, reimplemented: decode a model's `[f(a=1), g(b="x")]` text and check the
calls against the possible answers, the way bfcl-eval 2026.3.23 scores Python categories.

Two steps, each the counterpart of one bfcl-eval function:
- `decode_calls` ≈ `model_handler.utils.default_decode_ast_prompting` (Python return format):
  the output becomes `[{name: {param: value}}, ...]`. It never runs `eval`; see `_arith`.
- `check` ≈ `eval_checker.ast_eval.ast_checker.ast_checker` (Language.PYTHON), and
  `check_relevance` ≈ the runner's relevance/irrelevance rule.

Matching rules, all as bfcl-eval has them:
- function names match exactly (dotted names such as `math.factorial` are kept);
- every schema-required parameter must be present; a parameter missing from the schema or from
  the possible answer is unexpected; a possible answer's parameter may be omitted only when its
  allowed values contain "" (BFCL's mark for "optional");
- types follow the schema (`integer` → int, `float` → float, `array`/`tuple` → list, `dict`,
  `boolean`, `string`, `any` → str). A top-level int is accepted for a float; a value whose
  type equals the possible answer's type is accepted as a "variable" and compared exactly;
- strings (also inside lists and dicts) are compared after `standardize_string`: lowercased,
  `" ,./-_*^"` removed, `'` → `"`;
- parallel categories accept the calls in any order; like bfcl-eval, each expected call takes
  the first unmatched output call that passes (greedy, not a maximum matching).

A failure carries one of ERROR_TYPES plus bfcl-eval's own finer error type (`bfcl_type`).
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Call = dict[str, dict[str, Any]]  # {function name: {parameter: value}}, BFCL's decoded form

ERROR_TYPES = (
    "parse_error",  # the output is not a Python list of calls
    "wrong_count",  # number of calls differs from the answer
    "wrong_function",  # the expected function name is not called
    "missing_required",  # a schema-required parameter is absent
    "missing_optional",  # a parameter the answer needs (no "" among its values) is absent
    "unexpected_param",  # a parameter outside the schema or the possible answer
    "type_error",  # a value of the wrong type
    "value_error",  # right type, value not among the allowed ones
    "no_match",  # parallel: some expected call matched no output call
    "irrelevance_called",  # irrelevance: a call was made though none of the functions fit
    "relevance_missed",  # live_relevance: no call was made though one was expected
)

PY_TYPES: Mapping[str, type] = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,
}
NESTED_TYPES = ("array", "tuple")  # element types are checked one level deep

# ---------------------------------------------------------------- decoding


class ParseError(ValueError):
    """The model output is not a Python list of function calls."""


def decode_calls(text: str) -> list[Call]:
    """Parse `text` as BFCL's prompting models are parsed: trim backticks, newlines and
    spaces, add missing outer brackets, drop wrapping single quotes, then read every list
    element as a call with keyword arguments (positional arguments are ignored, as in BFCL)."""
    s = text.strip("`\n ")
    if not s.startswith("["):
        s = "[" + s
    if not s.endswith("]"):
        s = s + "]"
    s = s.strip().strip("'")
    try:
        body = ast.parse(s, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ParseError(f"not Python: {e}") from None
    if isinstance(body, ast.Call):
        elts: list[ast.expr] = [body]
    elif isinstance(body, (ast.List, ast.Tuple, ast.Set)):
        elts = body.elts
    else:
        raise ParseError(f"expected a list of calls, got {type(body).__name__}")
    calls = []
    for elt in elts:
        if not isinstance(elt, ast.Call):
            raise ParseError(f"list element is {type(elt).__name__}, not a call")
        try:
            calls.append(_call(elt))
        except RecursionError:
            raise ParseError("arguments nested too deeply") from None
    return calls


def _call(node: ast.Call) -> Call:
    parts = []
    func: ast.expr = node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    args = {kw.arg: _value(kw.value) for kw in node.keywords}  # `**x` gives key None, as BFCL
    return {".".join(reversed(parts)): args}  # type: ignore[dict-item]


def _value(node: ast.expr) -> Any:
    """A Python value for an argument expression, with BFCL's readings of non-literals:
    a bare name is its string, a call without keywords is its source text, a call with
    keywords is a nested {name: args} dict, a subscript is its source text."""
    if isinstance(node, ast.Constant):
        return "..." if node.value is Ellipsis else node.value
    if isinstance(node, (ast.UnaryOp, ast.BinOp)):
        return _arith(node)
    if isinstance(node, ast.List):
        return [_value(v) for v in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_value(v) for v in node.elts)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ParseError("dict unpacking (**) is not a value")
        return {_value(k): _value(v) for k, v in zip(node.keys, node.values, strict=True)}  # type: ignore[arg-type]
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Call):
        return _call(node) if node.keywords else ast.unparse(node)
    if isinstance(node, ast.Subscript):
        return f"{ast.unparse(node.value)}[{ast.unparse(node.slice)}]"
    raise ParseError(f"unsupported argument syntax: {type(node).__name__}")


_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_MAX_LEN = 10_000  # cap on strings/lists built by `*`, so "a" * 10**9 cannot exhaust memory


def _arith(node: ast.expr) -> Any:
    """Constant arithmetic such as `-5`, `1/3` or `2**10`, computed without eval.

    bfcl-eval calls `eval(ast.unparse(node))` on binary operations (inside its own module's
    namespace), which evaluates model output as code. We compute +, -, *, /, //, %, ** on
    literals only; anything else, and results too large to be a sensible argument, is a
    ParseError (BFCL raises NameError/TypeError there, which it also counts as a decode failure).
    """
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.List):
        return [_arith(e) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_arith(e) for e in node.elts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        if not isinstance(node.operand, ast.Constant):
            raise ParseError("sign applied to a non-literal")
        v = node.operand.value
        if not isinstance(v, (int, float, complex)):
            raise ParseError(f"sign applied to {type(v).__name__}")
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _arith(node.left), _arith(node.right)
        if isinstance(node.op, ast.Pow) and isinstance(right, (int, float)) and abs(right) > 256:
            raise ParseError("exponent too large")
        try:
            out = _BINOPS[type(node.op)](left, right)
        except (TypeError, ZeroDivisionError, OverflowError, ValueError) as e:
            raise ParseError(f"cannot compute {ast.unparse(node)}: {e}") from None
        if isinstance(out, (str, list, tuple)) and len(out) > _MAX_LEN:
            raise ParseError("computed value too long")
        return out
    raise ParseError(f"unsupported expression: {ast.unparse(node)}")


def has_calls(text: str) -> bool:
    """Whether `text` decodes to at least one call (bfcl-eval's `is_empty_output` negated)."""
    try:
        calls = decode_calls(text)
    except ParseError:
        return False
    return len(calls) > 0 and not (len(calls) == 1 and len(calls[0]) == 0)


# ---------------------------------------------------------------- checking


@dataclass(frozen=True)
class Check:
    """Outcome of checking one output: valid, or why not."""

    valid: bool
    error_type: str = ""  # one of ERROR_TYPES when not valid
    bfcl_type: str = ""  # bfcl-eval's own error_type string for the same failure
    error: str = ""
    sub_errors: list[dict[str, str]] = field(default_factory=list)  # parallel: per output call


OK = Check(True)


def _fail(error_type: str, bfcl_type: str, error: str) -> Check:
    return Check(False, error_type, bfcl_type, error)


def standardize_string(s: str) -> str:
    """BFCL's normalisation: drop spaces and `,./-_*^`, lowercase, `'` → `"` (so "April 1,
    2024" and "april 1 2024" compare equal)."""
    return re.sub(r"[ \,\.\/\-\_\*\^]", "", s).lower().replace("'", '"')


def _std(v: Any) -> Any:
    return standardize_string(v) if type(v) is str else v


def _answer_type(allowed: Sequence[Any]) -> type | None:
    """Type of the first allowed value that is not the optional marker ""."""
    return next((type(a) for a in allowed if a != ""), None)


def _type_ok(
    value: Any, allowed: Sequence[Any], expected: type, nested: type | None
) -> tuple[bool, bool]:
    """(type acceptable, value counts as a "variable") — bfcl-eval's `type_checker`.

    A "variable" is a value whose type is the possible answer's type rather than the schema's
    (answers store variable names as strings); it is then compared exactly, not normalised.
    """
    answer_type = _answer_type(allowed)
    is_variable = answer_type is not None and answer_type is not expected
    if type(value) is expected:
        if nested is None:
            return True, is_variable
        assert isinstance(value, list)  # element types come with "array"/"tuple", both lists
        for item in allowed:  # each element must fit at least one possible answer's types
            if type(item) is not list or all(_type_ok(v, item, nested, None)[0] for v in value):
                return True, is_variable
        return False, False
    return answer_type is not None and type(value) is answer_type, True


def _dict_ok(value: dict, allowed: Sequence[Any]) -> bool:
    """Some non-"" possible answer has every key of `value` with an allowed (normalised)
    value, and every key it lacks is optional there."""
    for answer in allowed:
        if answer == "":
            continue
        keys_ok = all(
            k in answer and _std(v) in [_std(a) for a in answer[k]] for k, v in value.items()
        )
        if keys_ok and all(k in value or "" in vals for k, vals in answer.items()):
            return True
    return False


def _list_of_dicts_ok(value: list, allowed: Sequence[Any]) -> bool:
    return any(
        len(value) == len(answer)
        and all(_dict_ok(v, [a]) for v, a in zip(value, answer, strict=True))
        for answer in allowed
    )


def _value_ok(
    value: Any, allowed: Sequence[Any], expected: type, nested: type | None
) -> tuple[bool, str]:
    """(allowed, bfcl-eval's error type) for a value that passed the type check."""
    if expected is dict:
        return _dict_ok(value, allowed), "value_error:dict"
    if expected is list and nested is dict:
        return _list_of_dicts_ok(value, allowed), "value_error:list_dict"
    if expected is str:
        return _std(value) in [_std(a) for a in allowed if type(a) is str], "value_error:string"
    if expected is list:
        got = [_std(v) for v in value]
        return got in [[_std(a) for a in answer] for answer in allowed], "value_error:list/tuple"
    return value in allowed, "value_error:others"


def check_call(function: Mapping[str, Any], call: Call, answer: Mapping[str, Any]) -> Check:
    """One decoded call against one possible answer `{name: {param: [allowed values]}}`
    for the function schema `function` — bfcl-eval's `simple_function_checker`."""
    name = function["name"]
    allowed_by_param: Mapping[str, list[Any]] = next(iter(answer.values()))
    schema = function["parameters"]["properties"]
    if name not in call:
        return _fail(
            "wrong_function",
            "simple_function_checker:wrong_func_name",
            f"function {name!r} not called",
        )
    params = call[name]
    for p in function["parameters"].get("required", []):
        if p not in params:
            return _fail(
                "missing_required",
                "simple_function_checker:missing_required",
                f"missing required parameter {p!r}",
            )
    for p, value in params.items():
        if p not in schema or p not in allowed_by_param:
            return _fail(
                "unexpected_param",
                "simple_function_checker:unexpected_param",
                f"unexpected parameter {p!r}",
            )
        type_name = schema[p]["type"]
        expected = PY_TYPES[type_name]
        nested = PY_TYPES[schema[p]["items"]["type"]] if type_name in NESTED_TYPES else None
        allowed = allowed_by_param[p]
        if type_name == "tuple" and type(value) is tuple:
            value = list(value)  # answers went through JSON, where tuples became lists
        if type_name == "float" and type(value) is int:
            value = float(value)  # Python's own int → float promotion
        type_ok, is_variable = _type_ok(value, allowed, expected, nested)
        if not type_ok:
            kind = (
                "type_error:nested" if nested and type(value) is expected else "type_error:simple"
            )
            return _fail(
                "type_error",
                kind,
                f"parameter {p!r}: expected {type_name}, got {type(value).__name__}",
            )
        if is_variable:
            ok, kind = value in allowed, "value_error:others"
        else:
            ok, kind = _value_ok(value, allowed, expected, nested)
        if not ok:
            return _fail("value_error", kind, f"parameter {p!r}: {value!r} not among {allowed!r}")
    for p, allowed in allowed_by_param.items():
        if p not in params and "" not in allowed:
            return _fail(
                "missing_optional",
                "simple_function_checker:missing_optional",
                f"parameter {p!r} is needed by the answer but not given",
            )
    return OK


def _function(functions: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any]:
    for f in functions:
        if f["name"] == name:
            return f
    raise KeyError(f"possible answer names {name!r}, which is not among the functions")


def _parallel(functions, calls: list[Call], answers: list[dict]) -> Check:
    """Calls in any order; each expected call greedily takes the first unmatched passing one."""
    matched: set[int] = set()
    for i, answer in enumerate(answers):
        function = _function(functions, next(iter(answer)))
        sub_errors = []
        for j, call in enumerate(calls):
            if j in matched:
                continue
            result = check_call(function, call, answer)
            if result.valid:
                matched.add(j)
                break
            sub_errors.append(
                {"output_index": str(j), "error_type": result.error_type, "error": result.error}
            )
        else:
            return Check(
                False,
                "no_match",
                "parallel_function_checker_no_order:cannot_find_match",
                f"no output call matches expected call {i} ({next(iter(answer))})",
                sub_errors,
            )
    return OK


def check(
    functions: Sequence[Mapping[str, Any]], calls: list[Call], answers: list[dict], category: str
) -> Check:
    """Decoded calls against a category's possible answers — bfcl-eval's `ast_checker`.

    `category` picks the rule by substring, as bfcl-eval does: "parallel" (any order, one
    output call per expected call), then "multiple" (one call, the function chosen from
    several), else simple (exactly one call).
    """
    if "parallel" in category:
        if len(calls) != len(answers):
            return _fail(
                "wrong_count",
                "parallel_function_checker_no_order:wrong_count",
                f"{len(calls)} calls, expected {len(answers)}",
            )
        return _parallel(functions, calls, answers)
    if "multiple" in category:
        if len(calls) != len(answers):
            return _fail(
                "wrong_count",
                "multiple_function_checker:wrong_count",
                f"{len(calls)} calls, expected {len(answers)}",
            )
        return check_call(_function(functions, next(iter(answers[0]))), calls[0], answers[0])
    if len(calls) != 1:
        return _fail(
            "wrong_count", "simple_function_checker:wrong_count", f"{len(calls)} calls, expected 1"
        )
    return check_call(functions[0], calls[0], answers[0])


def check_output(
    functions: Sequence[Mapping[str, Any]], text: str, answers: list[dict] | None, category: str
) -> Check:
    """Score raw model text for any supported category (AST, irrelevance or relevance)."""
    if "irrelevance" in category:
        if has_calls(text):
            return _fail(
                "irrelevance_called",
                "irrelevance_error:decoder_success",
                "called a function although none is relevant",
            )
        return OK
    if "relevance" in category:
        if not has_calls(text):
            return _fail(
                "relevance_missed",
                "relevance_error:decoder_failed",
                "no function call although one is relevant",
            )
        return OK
    if answers is None:
        raise ValueError(f"category {category!r} needs possible answers")
    try:
        calls = decode_calls(text)
    except ParseError as e:
        return _fail("parse_error", "ast_decoder:decoder_failed", str(e))
    return check(functions, calls, answers, category)

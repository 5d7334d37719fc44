"""Hostile input, fed to every place that takes it: item uploads (both campaign kinds, JSONL and
CSV, through the upload page) and every JSON endpoint (the rater API, the jobs API, reward
scoring, the OpenAI-compatible /v1). Each case must get a 4xx whose message names the row or
the field, leave every table as it was, and never be a 500 (issue 14)."""

import html
import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from core.models import ApiToken, Job
from core.payload import PayloadError, loads
from evalhub.models import ModelVersion
from grading.models import Assignment, Campaign, Item, Label, Response
from grading.services import assignment_claim
from tests.factories import make_campaign, make_items

pytestmark = pytest.mark.django_db

KINDS = ("side_by_side", "single_sided")
FORMATS = ("jsonl", "csv")


def _tables() -> dict:
    """Row counts (and lease states) that no rejected input may change."""
    return {
        "items": Item.objects.count(),
        "responses": Response.objects.count(),
        "labels": Label.objects.count(),
        "jobs": Job.objects.count(),
        "campaigns": Campaign.objects.count(),
        "models": ModelVersion.objects.count(),
        "assignments": sorted(Assignment.objects.values_list("id", "status", "skip_reason")),
    }


# --- uploads ------------------------------------------------------------------------------

FIELDS = {
    "side_by_side": ["id", "prompt", "response_a", "response_b", "model_a", "model_b", "gold"],
    "single_sided": ["id", "prompt", "response", "model", "gold"],
}


def _good(kind: str, n: int) -> dict:
    if kind == "side_by_side":
        return {"id": f"q{n}", "prompt": f"p{n}", "response_a": "a", "response_b": "b"}
    return {"id": f"q{n}", "prompt": f"p{n}", "response": "r"}


def _file(kind: str, fmt: str, rows: list[dict], *, raw: dict | None = None) -> bytes:
    """An upload of ``rows``; ``raw`` maps a field of the last row to text written as is (a
    JSON token in JSONL, the cell in CSV), for values json.dumps cannot write."""
    raw = raw or {}
    if fmt == "jsonl":
        lines = [json.dumps(r) for r in rows]
        if raw:
            last = json.dumps(rows[-1])[:-1]
            lines[-1] = last + "".join(f', "{k}": {v}' for k, v in raw.items()) + "}"
        return "\n".join(lines).encode("utf-8", "surrogatepass")
    columns = list(dict.fromkeys([c for r in rows for c in r] + list(raw)))

    def cell(row, column):
        value = raw.get(column, "") if row is rows[-1] and column in raw else row.get(column, "")
        if not isinstance(value, str):
            value = json.dumps(value)
        return '"' + value.replace('"', '""') + '"'

    text = "\r\n".join([",".join(columns)] + [",".join(cell(r, c) for c in columns) for r in rows])
    return text.encode("utf-8", "surrogatepass")


def _bad(kind: str, fmt: str, **fields) -> list[dict]:
    """A good row, then a bad one: row 2 in JSONL, row 3 in CSV (the header is row 1)."""
    return [_good(kind, 1), {**_good(kind, 2), **fields}]


BAD_ROW = {"jsonl": "row 2", "csv": "row 3"}
MODEL = {"side_by_side": "model_a", "single_sided": "model"}
TEXT = {"side_by_side": "response_b", "single_sided": "response"}
OTHER = {"side_by_side": "response", "single_sided": "response_a"}


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _gold(kind: str, value):
    return value if kind == "side_by_side" else {"truthfulness": value}


def upload_cases():
    """(id, build(kind, fmt) -> (filename, bytes), words the message must hold)."""
    cases = []

    def case(name, build, *words, formats=FORMATS):
        for kind in KINDS:
            for fmt in formats:
                cases.append(pytest.param(kind, fmt, build, words, id=f"{name}-{kind}-{fmt}"))

    def deep_metadata(kind, fmt):
        if fmt == "jsonl":  # 10,000 levels: json's recursion limit, reported for the row
            return _file(kind, fmt, _bad(kind, fmt), raw={"metadata": _deep(10_000)})
        return _file(kind, fmt, _bad(kind, fmt), raw={"metadata": '{"x": ' + _deep(10_000) + "}"})

    case("deep-json", deep_metadata, "{row}", "nested more than 32 levels")
    case(
        "nested-40-deep",
        lambda k, f: _file(k, f, _bad(k, f), raw={"metadata": '{"x": ' + _deep(40) + "}"}),
        "{row}",
        "'metadata.x[0]",
    )
    case("nul-in-text", lambda k, f: _file(k, f, _bad(k, f, prompt="a\x00b")), "{row}", "'prompt'")
    case(
        "nul-in-metadata",
        lambda k, f: _file(k, f, _bad(k, f), raw={"metadata": '{"note": "a\\u0000b"}'}),
        "{row}",
        "'metadata.note'",
        "NUL",
    )
    case(
        "nul-in-csv-extra-column",
        lambda k, f: _file(k, f, _bad(k, f, note="a\x00b")),
        "{row}",
        "'note'",
        formats=("csv",),
    )
    case(
        "metadata-not-an-object",
        lambda k, f: _file(k, f, _bad(k, f), raw={"metadata": "[1, 2]"}),
        "{row}",
        "'metadata' must be",
    )
    case("gold-null", lambda k, f: _file(k, f, _bad(k, f), raw={"gold": "null"}), "{row}", "gold")
    case(
        "gold-3.5",
        lambda k, f: _file(k, f, _bad(k, f, gold=_gold(k, 3.5))),
        "{row}",
        "gold",
    )
    case(
        "gold-true",
        lambda k, f: _file(k, f, _bad(k, f, gold=_gold(k, True))),
        "{row}",
        "gold",
    )
    case(
        "gold-out-of-range",
        lambda k, f: _file(k, f, _bad(k, f, gold=_gold(k, [2, 9]))),
        "{row}",
        "gold",
    )
    case("id-201-chars", lambda k, f: _file(k, f, _bad(k, f, id="x" * 201)), "{row}", "'id'")
    case(
        "id-5001-digits",
        lambda k, f: _file(k, f, _bad(k, f), raw={"id": "9" * 5001}),
        "{row}",
        "'id'",
    )
    case(
        "id-true",
        lambda k, f: _file(k, f, _bad(k, f), raw={"id": "true"}),
        "{row}",
        "'id'",
        formats=("jsonl",),
    )
    case(
        "model-201-chars",
        lambda k, f: _file(k, f, _bad(k, f, **{MODEL[k]: "m" * 201})),
        "{row}",
        "'{model}'",
    )
    case(
        "duplicate-ids",
        lambda k, f: _file(k, f, _bad(k, f, id="q1")),
        "{row}",
        "'q1' repeats row",
    )
    case(
        "invalid-utf8",
        lambda k, f: _file(k, f, _bad(k, f)).replace(b'"p2"', b'"\xff\xfe"', 1),
        "{row}",
        "UTF-8",
    )
    case(
        "lone-surrogate",
        lambda k, f: _file(k, f, _bad(k, f), raw={"prompt": '"\\ud800"'}),
        "{row}",
        "'prompt'",
        formats=("jsonl",),
    )
    case(
        "utf-16",
        lambda k, f: _file(k, f, _bad(k, f)).decode().encode("utf-16"),
        "UTF-16",
    )
    case(
        "utf-16-without-bom",
        lambda k, f: _file(k, f, _bad(k, f)).decode().encode("utf-16-le"),
        "UTF-16",
    )
    case(
        "very-long-line",
        lambda k, f: _file(k, f, _bad(k, f, **{TEXT[k]: "y" * 200_001})),
        "{row}",
        "longer than 200,000 characters",
    )
    case(
        "huge-metadata",
        lambda k, f: _file(k, f, _bad(k, f, metadata={str(i): "z" * 1000 for i in range(201)})),
        "{row}",
        "'metadata' is longer",
        formats=("jsonl",),
    )
    case(
        "other-kind-field",
        lambda k, f: _file(k, f, _bad(k, f, **{OTHER[k]: "x"})),
        "'{other}' is a",
        "but this campaign is",
    )
    case(
        "huge-number",
        lambda k, f: _file(k, f, _bad(k, f), raw={"metadata": '{"n": 1e400}'}),
        "{row}",
        "'metadata.n' is not a finite number",
    )
    case(
        "nan",
        lambda k, f: _file(k, f, _bad(k, f), raw={"metadata": '{"n": NaN}'}),
        "{row}",
        "'metadata.n'",
    )
    case(
        "raw-control-character",
        lambda k, f: _file(k, f, _bad(k, f)).replace(b'"p2"', b'"p\t2"'),
        "{row}",
        "Invalid control character at column",
        formats=("jsonl",),
    )
    case(
        "not-an-object",
        lambda k, f: _file(k, f, [_good(k, 1)]) + b"\n[1, 2]",
        "row 2",
        "JSON object",
        formats=("jsonl",),
    )
    case(
        "prompt-a-number",
        lambda k, f: _file(k, f, _bad(k, f, prompt=5)),
        "{row}",
        "'prompt' must be text",
        formats=("jsonl",),
    )
    case(
        "duplicate-column",
        lambda k, f: b"prompt,prompt," + _file(k, f, [_good(k, 1)]),
        "row 1",
        "appears twice",
        formats=("csv",),
    )
    case(
        "unnamed-column-with-a-value",
        lambda k, f: _file(k, f, [_good(k, 1)]).replace(b"\r\n", b',""\r\n', 1) + b',"v"',
        "row 2",
        "no name",
        formats=("csv",),
    )
    case(
        "more-cells-than-header",
        lambda k, f: _file(k, f, [_good(k, 1)]) + b',"extra"',
        "row 2",
        "more cells than header",
        formats=("csv",),
    )
    case(
        "missing-column",
        lambda k, f: b"id,prompt\r\nq1,p1\r\n",
        "row 1",
        "no '{text}' column",
        formats=("csv",),
    )
    return cases


@pytest.fixture
def researcher(login, carol):
    client = Client(raise_request_exception=False)
    client.force_login(carol)
    return client


def _upload(client, campaign, data: bytes, filename: str):
    file = SimpleUploadedFile(filename, data)
    return client.post(reverse("grading:upload", args=[campaign.pk]), {"file": file})


def _page_text(response) -> str:
    return html.unescape(response.content.decode("utf-8", "replace"))


@pytest.mark.parametrize("kind, fmt, build, words", upload_cases())
def test_a_hostile_upload_is_refused_naming_its_row_and_imports_nothing(
    researcher, kind, fmt, build, words
):
    campaign = make_campaign(kind=kind)
    make_items(campaign, 2)
    before = _tables()
    response = _upload(researcher, campaign, build(kind, fmt), f"items.{fmt}")
    assert response.status_code == 400, response.status_code
    page = _page_text(response)
    assert "Nothing was imported" in page
    for word in words:
        word = word.format(row=BAD_ROW[fmt], model=MODEL[kind], other=OTHER[kind], text=TEXT[kind])
        assert word in page, (word, page[page.find("Nothing was imported") :][:600])
    assert _tables() == before


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_ids_already_in_the_campaign_are_refused(researcher, kind, fmt):
    campaign = make_campaign(kind=kind)
    assert (
        _upload(researcher, campaign, _file(kind, fmt, [_good(kind, 1)]), f"a.{fmt}").status_code
        == 302
    )
    before = _tables()
    again = _file(kind, fmt, [_good(kind, 2), _good(kind, 1)])
    response = _upload(researcher, campaign, again, f"a.{fmt}")
    assert response.status_code == 400
    assert f"{BAD_ROW[fmt]}: id 'q1' is already in this campaign" in _page_text(response)
    assert _tables() == before


def test_an_upload_over_the_size_limit_is_refused_before_parsing(researcher, monkeypatch):
    monkeypatch.setattr("grading.forms.MAX_UPLOAD_BYTES", 100)
    campaign = make_campaign()
    page = _page_text(researcher.get(reverse("grading:campaign", args=[campaign.pk])))
    assert "at most 32 MB and 50,000 rows" in page  # said before anyone uploads
    response = _upload(
        researcher,
        campaign,
        _file("side_by_side", "jsonl", [_good("side_by_side", 1)] * 3),
        "a.jsonl",
    )
    assert response.status_code == 400 and "more than the limit" in _page_text(response)
    assert not Item.objects.exists()


def test_an_upload_over_the_row_limit_is_refused(researcher, monkeypatch):
    monkeypatch.setattr("grading.views.MAX_UPLOAD_ROWS", 2)
    campaign = make_campaign()
    rows = [_good("side_by_side", n) for n in range(3)]
    response = _upload(researcher, campaign, _file("side_by_side", "csv", rows), "a.csv")
    assert response.status_code == 400 and "3 rows is more than the limit of 2" in _page_text(
        response
    )
    assert not Item.objects.exists()


def test_an_unsupported_file_type_is_refused(researcher):
    campaign = make_campaign()
    response = _upload(researcher, campaign, b"prompt\n", "items.xlsx")
    assert response.status_code == 400 and "unsupported file type" in _page_text(response)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_utf8_bom_is_ignored_and_awkward_text_survives(researcher, kind, fmt):
    """The good cousins of the hostile cases: a BOM, a raw line separator (U+2028) inside a
    JSON string, a carriage return inside a quoted CSV cell, other control characters."""
    campaign = make_campaign(kind=kind)
    text = "line\u2028sep\rcr\x1besc"
    row = {**_good(kind, 1), TEXT[kind]: text}
    if fmt == "jsonl":
        data = json.dumps(row, ensure_ascii=False).encode()
        assert "\u2028".encode() in data
    else:
        data = _file(kind, fmt, [row])
    data = b"\xef\xbb\xbf" + data
    response = _upload(researcher, campaign, data, f"items.{fmt}")
    assert response.status_code == 302, _page_text(response)[:2000]
    item = Item.objects.get()
    assert item.external_id == "q1" and item.prompt == "p1"
    assert item.responses.order_by("position").last().text == text


# --- JSON endpoints -----------------------------------------------------------------------


@pytest.fixture
def endpoints(alice, carol):
    """Every JSON endpoint that reads a body: (url, bearer token, where the message is)."""
    sbs = make_campaign(name="pairs")
    make_items(sbs, 3)
    single = make_campaign(name="singles", kind="single_sided")
    make_items(single, 3)
    pair_lease = assignment_claim(rater=alice, campaign=sbs)
    single_lease = assignment_claim(rater=alice, campaign=single)
    ModelVersion.objects.create(name="tiny", backend="builtin", location="/nonexistent")
    ModelVersion.objects.create(
        name="rm", kind=ModelVersion.REWARD, backend="reward", location="/nonexistent"
    )
    rater = ApiToken.issue(user=alice, name="rater")[1]
    researcher = ApiToken.issue(user=carol, name="researcher")[1]
    return {
        "next": (reverse("grading:api_next", args=[sbs.pk]), rater),
        "submit-side-by-side": (reverse("grading:api_submit", args=[pair_lease.pk]), rater),
        "submit-single-sided": (reverse("grading:api_submit", args=[single_lease.pk]), rater),
        "skip": (reverse("grading:api_skip", args=[single_lease.pk]), rater),
        "jobs": (reverse("api_jobs"), researcher),
        "reward-score": (reverse("api_reward_score", args=["rm"]), researcher),
        "chat-completions": (reverse("v1_chat"), researcher),
        "completions": (reverse("v1_completions"), researcher),
    }


def _post(url: str, token: str, body: bytes):
    client = Client(raise_request_exception=False)
    return client.post(
        url, data=body, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {token}"
    )


def _message(response) -> str:
    error = response.json()["error"]
    return error["message"] if isinstance(error, dict) else error


ENDPOINTS = (
    "next",
    "submit-side-by-side",
    "submit-single-sided",
    "skip",
    "jobs",
    "reward-score",
    "chat-completions",
    "completions",
)

# Bodies every endpoint must refuse at parsing, whatever its fields: (id, body, words).
HOSTILE_BODIES = [
    ("score-1e400", b'{"scores": {"truthfulness": 1e400}}', ["'scores.truthfulness'", "finite"]),
    ("nan", b'{"temperature": NaN}', ["'temperature'", "finite"]),
    ("minus-infinity", b'{"seed": -Infinity}', ["'seed'", "finite"]),
    ("5001-digit-integer", b'{"seed": ' + b"9" * 5001 + b"}", ["'seed'", "5001 digits"]),
    ("100k-deep", _deep(100_000).encode(), ["nested more than 32 levels"]),
    ("40-deep-in-a-field", b'{"params": ' + _deep(40).encode() + b"}", ["'params[0]", "nested"]),
    ("not-utf8", b'{"comment": "caf\xe9"}', ["not UTF-8"]),
    ("utf16", '{"comment": "x"}'.encode("utf-16"), ["not UTF-8"]),
    ("nul-in-comment", b'{"comment": "a\\u0000b"}', ["'comment'", "NUL"]),
    ("nul-in-reason", b'{"reason": "\\u0000"}', ["'reason'", "NUL"]),
    ("nul-in-a-key", b'{"scores": {"a\\u0000": 1}}', ["'scores' has a key", "NUL"]),
    ("lone-surrogate", b'{"reason": "\\udc80"}', ["'reason'", "UTF-8"]),
    ("nul-in-a-message", b'{"messages": [{"content": "\\u0000"}]}', ["'messages[0].content'"]),
    ("malformed", b'{"choice": ', ["not valid JSON"]),
    ("raw-control-character", b'{"reason": "a\tb"}', ["Invalid control character at column"]),
    ("an-array", b"[1, 2]", ["JSON object"]),
    ("a-string", b'"hello"', ["JSON object"]),
]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("body, words", [pytest.param(b, w, id=i) for i, b, w in HOSTILE_BODIES])
def test_every_json_endpoint_refuses_a_hostile_body_naming_the_field(
    endpoints, endpoint, body, words
):
    url, token = endpoints[endpoint]
    before = _tables()
    response = _post(url, token, body)
    assert response.status_code == 400, (response.status_code, response.content[:300])
    message = _message(response)
    for word in words:
        assert word in message, (word, message)
    assert "at at" not in message
    assert _tables() == before


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_every_json_endpoint_refuses_a_body_over_the_size_limit(endpoints, endpoint, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    url, token = endpoints[endpoint]
    before = _tables()
    response = _post(url, token, json.dumps({"comment": "x" * 2000}).encode())
    assert response.status_code == 413 and "larger than 1,000 bytes" in _message(response)
    assert _tables() == before


# Bodies that parse but whose fields are wrong for the endpoint: (endpoint, body, words).
SCORES = {"instruction_following": 3, "conciseness": 3, "truthfulness": 3, "harmlessness": 3}
FIELD_CASES = [
    ("submit-side-by-side", {"choice": 5}, ["'choice'"]),
    ("submit-side-by-side", {"choice": "left_" + "x" * 10_000}, ["unknown choice"]),
    ("submit-single-sided", {"scores": [1, 2]}, ["'scores'"]),
    ("submit-single-sided", {"scores": {**SCORES, "truthfulness": True}}, ["truthfulness"]),
    ("submit-single-sided", {"scores": {**SCORES, "truthfulness": 3.5}}, ["truthfulness", "whole"]),
    ("submit-single-sided", {"scores": {**SCORES, "truthfulness": "1e400"}}, ["truthfulness"]),
    ("submit-single-sided", {"scores": {**SCORES, "truthfulness": 10**60}}, ["truthfulness"]),
    ("submit-single-sided", {"scores": {**SCORES, "style": 3}}, ["style"]),
    ("submit-single-sided", {"scores": "x"}, ["'scores'"]),
    ("submit-single-sided", {"scores": SCORES, "unsafe": "yes"}, ["'unsafe'"]),
    ("submit-single-sided", {"scores": SCORES, "comment": {"a": 1}}, ["'comment'"]),
    ("submit-single-sided", {"scores": SCORES, "comment": "c" * 5001}, ["'comment'", "5,000"]),
    ("skip", {"reason": {"a": 1}}, ["'reason'"]),
    ("skip", {"reason": "r" * 501}, ["'reason'", "500"]),
    ("skip", {"reason": "   "}, ["why"]),
    ("jobs", {"kind": 5}, ["kind"]),
    ("jobs", {"kind": "demo", "params": [1]}, ["params"]),
    ("reward-score", {"prompt": 5, "responses": ["a"]}, ["'prompt'"]),
    ("chat-completions", {"model": "tiny", "messages": "hi"}, ["'messages'"]),
    ("chat-completions", {"model": 5, "messages": []}, ["'model'"]),
    (
        "chat-completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": True},
        ["'max_tokens'"],
    ),
    (
        "chat-completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**30},
        ["max_tokens"],
    ),
    (
        "chat-completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
        ["'temperature'"],
    ),
    (
        "chat-completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": 5},
        ["'stop'"],
    ),
    (
        "chat-completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "seed": 2**70},
        ["'seed'"],
    ),
    ("completions", {"model": "tiny", "prompt": 5}, ["'prompt'"]),
    ("completions", {"model": "tiny", "prompt": "x", "top_p": -1}, ["'top_p'"]),
]


@pytest.mark.parametrize(
    "endpoint, body, words",
    [pytest.param(e, b, w, id=f"{e}-{'-'.join(w)}") for e, b, w in FIELD_CASES],
)
def test_a_wrong_field_gets_a_400_naming_it_and_changes_nothing(endpoints, endpoint, body, words):
    url, token = endpoints[endpoint]
    before = _tables()
    response = _post(url, token, json.dumps(body).encode())
    assert response.status_code == 400, (response.status_code, response.content[:300])
    for word in words:
        assert word in _message(response), (word, _message(response))
    assert _tables() == before


# --- forms and pages -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("comment", "a\x00b", "'comment' contains a NUL"),
        ("comment", "c" * 5001, "'comment' is longer"),
        ("score_truthfulness", "1e400", "truthfulness"),
        ("score_truthfulness", "9" * 5001, "truthfulness"),
    ],
)
def test_the_rater_form_refuses_hostile_fields_with_a_400(alice, field, value, words):
    campaign = make_campaign(kind="single_sided")
    make_items(campaign, 1)
    lease = assignment_claim(rater=alice, campaign=campaign)
    client = Client(raise_request_exception=False)
    client.force_login(alice)
    data = {f"score_{k}": "3" for k in campaign.aspect_keys} | {field: value}
    before = _tables()
    response = client.post(reverse("grading:submit", args=[lease.pk]), data)
    assert response.status_code == 400 and words in _page_text(response)
    assert _tables() == before


def test_the_skip_form_refuses_a_nul_reason_with_a_400(alice):
    campaign = make_campaign()
    make_items(campaign, 1)
    lease = assignment_claim(rater=alice, campaign=campaign)
    client = Client(raise_request_exception=False)
    client.force_login(alice)
    before = _tables()
    response = client.post(reverse("grading:skip", args=[lease.pk]), {"reason": "x\x00"})
    assert response.status_code == 400 and "'reason' contains a NUL" in _page_text(response)
    assert _tables() == before


def test_a_nul_in_a_label_browser_filter_is_no_500(researcher):
    campaign = make_campaign()
    response = researcher.get(reverse("grading:labels", args=[campaign.pk]), {"rater": "a\x00"})
    assert response.status_code == 200


# --- the shared parser ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, words",
    [
        ('{"a": {"b": [1, 2, {"c": 1e999}]}}', "'a.b[2].c' is not a finite number (1e999)"),
        ('{"k' + "x" * 500 + '": "\\u0000"}', "…' contains a NUL"),
        ("[" * 33 + "]" * 33, "'[0]"),
    ],
)
def test_the_parser_names_the_path_to_the_bad_value(text, words):
    with pytest.raises(PayloadError) as caught:
        loads(text)
    assert words in str(caught.value) and len(str(caught.value)) < 300


def test_the_parser_keeps_what_is_valid():
    value = '{"a": [1, -2.5, "é\\u2028", null, true], "b": {"c": ' + "9" * 64 + "}}"
    assert loads(value.encode()) == {"a": [1, -2.5, "é\u2028", None, True], "b": {"c": 10**64 - 1}}
    assert loads(b"\xef\xbb\xbf{}") == {}
    assert loads("[" * 32 + "]" * 32)

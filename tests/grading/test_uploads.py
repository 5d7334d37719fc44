"""Upload parsing: formats, row-numbered errors, all-or-nothing."""

import json

import pytest

from grading.kinds import KINDS
from grading.uploads import UploadError, parse_upload

SBS, SINGLE = KINDS["side_by_side"], KINDS["single_sided"]
ASPECTS = ["instruction_following", "conciseness", "truthfulness", "harmlessness"]


def jsonl(*rows) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


def test_side_by_side_jsonl_rows_parse_with_models_metadata_and_gold():
    data = jsonl(
        {
            "id": "q1",
            "prompt": "Hi",
            "response_a": "Hello",
            "response_b": "Yo",
            "model_a": "m1",
            "model_b": "m2",
            "metadata": {"source": "arena"},
        },
        {"prompt": "2+2?", "responses": ["4", "5"], "models": ["m1", "m2"], "gold": "a"},
    )
    rows = parse_upload(data, "x.jsonl", kind=SBS, aspects=ASPECTS)
    assert [r.responses for r in rows] == [["Hello", "Yo"], ["4", "5"]]
    assert rows[0].models == ["m1", "m2"] and rows[0].metadata == {"source": "arena"}
    assert rows[0].external_id == "q1" and rows[0].gold is None
    assert rows[1].gold == {"preferred": 0}


def test_csv_puts_unknown_columns_into_metadata():
    data = b'prompt,response,model,category\n"Say ""hi""",hi,m1,greeting\n'
    rows = parse_upload(data, "items.csv", kind=SINGLE, aspects=ASPECTS)
    assert rows[0].prompt == 'Say "hi"' and rows[0].metadata == {"category": "greeting"}


def test_single_sided_gold_takes_scores_or_ranges():
    data = jsonl(
        {"prompt": "p", "response": "r", "gold": {"truthfulness": [4, 5], "harmlessness": 5}}
    )
    rows = parse_upload(data, "g.jsonl", kind=SINGLE, aspects=ASPECTS)
    assert rows[0].gold == {"scores": {"truthfulness": [4, 5], "harmlessness": [5, 5]}}


def test_every_bad_row_is_reported_with_its_number_and_nothing_is_returned():
    data = b"\n".join(
        [
            json.dumps({"prompt": "ok", "response_a": "a", "response_b": "b"}).encode(),
            b"{broken json",
            json.dumps({"prompt": "", "response_a": "a", "response_b": "b"}).encode(),
            json.dumps({"prompt": "p", "response_a": "a"}).encode(),
            json.dumps({"prompt": "p", "response_a": "a", "response_b": "b", "gold": "c"}).encode(),
            json.dumps({"prompt": "p", "response_a": 3, "response_b": "b"}).encode(),
            json.dumps({"prompt": "p", "response_a": "a", "response_b": "b", "colour": 1}).encode(),
            b"[1, 2]",
        ]
    )
    with pytest.raises(UploadError) as caught:
        parse_upload(data, "bad.jsonl", kind=SBS, aspects=ASPECTS)
    errors = caught.value.errors
    assert [e.split(":")[0] for e in errors] == [f"row {n}" for n in (2, 8, 3, 4, 5, 6, 7)]
    assert "not valid JSON" in errors[0] and "missing 'prompt'" in errors[2]
    assert "missing 'response_b'" in errors[3] and "'a', 'b' or 'tie'" in errors[4]
    assert "must be text" in errors[5] and "unknown field(s) colour" in errors[6]


@pytest.mark.parametrize(
    "data, name, message",
    [
        (b"", "empty.jsonl", "no rows"),
        (b"\xff\xfe\x00", "bin.jsonl", "not UTF-8"),
        (b"prompt\n", "x.txt", "unsupported file type"),
        (b"prompt,response\np,r,extra\n", "x.csv", "more cells than header"),
        (
            jsonl({"prompt": "p", "response": "r", "gold": {"style": 3}}),
            "g.jsonl",
            "unknown aspect",
        ),
        (jsonl({"prompt": "p", "response": "r", "gold": {"truthfulness": 9}}), "g.jsonl", "1–5"),
    ],
)
def test_malformed_uploads_get_a_clear_error(data, name, message):
    with pytest.raises(UploadError, match=message):
        parse_upload(data, name, kind=SINGLE, aspects=ASPECTS)


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "And an even one?"},
]


def test_a_conversation_row_keeps_earlier_turns_as_context_and_grades_the_last_user_turn():
    row = {"messages": CONVERSATION, "response_a": "2", "response_b": "4"}
    jsonl_rows = parse_upload(jsonl(row), "c.jsonl", kind=SBS, aspects=ASPECTS)
    cell = json.dumps(CONVERSATION).replace('"', '""')
    data = f'messages,response_a,response_b\n"{cell}",2,4\n'.encode()
    csv_rows = parse_upload(data, "c.csv", kind=SBS, aspects=ASPECTS)
    for parsed in (jsonl_rows[0], csv_rows[0]):
        assert parsed.prompt == "And an even one?" and parsed.context == CONVERSATION[:3]
        assert parsed.responses == ["2", "4"]


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        ([{"role": "user"}], r"missing 'messages\[0\].content'"),
        ([{"role": "bot", "content": "x"}], r"messages\[0\].role must be"),
        ([{"role": "user", "content": 5}], r"'messages\[0\].content' must be text"),
        ([{"role": "user", "content": "x", "name": "n"}], r"messages\[0\] has unknown field"),
        (CONVERSATION[:3], "last message must be the user turn"),
        ([CONVERSATION[1], CONVERSATION[1]], r"messages\[1\].role is 'user' where 'assistant'"),
        ([CONVERSATION[1], CONVERSATION[0], CONVERSATION[1]], r"messages\[1\].role is 'system'"),
        (["x"], r"messages\[0\] must be an object"),
    ],
)
def test_a_malformed_conversation_is_refused_naming_the_row_and_message(messages, message):
    rows = [
        {"prompt": "fine", "response": "r"},
        {"messages": messages, "response": "r"},
    ]
    with pytest.raises(UploadError, match=message) as caught:
        parse_upload(jsonl(*rows), "c.jsonl", kind=SINGLE, aspects=ASPECTS)
    assert caught.value.errors[0].startswith("row 2: ")


def test_a_row_with_both_prompt_and_messages_is_refused():
    row = {"prompt": "p", "messages": CONVERSATION, "response": "r"}
    with pytest.raises(UploadError, match="'prompt' or 'messages', not both"):
        parse_upload(jsonl(row), "c.jsonl", kind=SINGLE, aspects=ASPECTS)

"""Prompt sets: parsing (MT-Bench's question.jsonl, messages, CSV), versions and hashes, and the
pages through Django's test client."""

import json
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from evalhub.models import PromptSet
from evalhub.promptsets import (
    PromptSetError,
    content_hash,
    parse_prompt_file,
    prompt_set_import,
    prompt_set_lookup,
)

# MT-Bench's format exactly (question_id, category, turns, optional reference); the questions are
# our own: no copy of MT-Bench's question.jsonl ships in any package installable here.
MT_BENCH = Path(__file__).parent / "data" / "mt_bench_question.jsonl"


def _jsonl(*rows) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


def test_mt_bench_question_file_is_read_as_two_turn_conversations():
    records = parse_prompt_file(MT_BENCH.read_bytes(), "question.jsonl")
    assert [r["id"] for r in records] == ["81", "101", "111"]
    assert all(len(r["turns"]) == 2 for r in records)
    assert records[2]["category"] == "math" and records[2]["reference"] == ["51", "10"]
    assert records[0]["reference"] == [] and records[0]["metadata"] == {}


def test_messages_become_turns_with_assistant_messages_as_references():
    row = {
        "id": "c1",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ],
        "source": "chat log",
    }
    (record,) = parse_prompt_file(_jsonl(row), "chats.jsonl")
    assert record["system"] == "Be brief." and record["turns"] == ["Hi", "Bye"]
    assert record["reference"] == ["Hello!", None]
    assert record["metadata"] == {"source": "chat log"}  # unknown fields are kept as metadata


def test_csv_takes_a_prompt_or_numbered_turn_columns():
    data = b'id,turn_1,turn_2,category,reference\nq1,First?,Second?,math,"[""a"", ""b""]"\n'
    (record,) = parse_prompt_file(data, "set.csv")
    assert record["turns"] == ["First?", "Second?"] and record["reference"] == ["a", "b"]
    (single,) = parse_prompt_file(b"prompt,topic\nName a colour.,art\n", "set.csv")
    assert single["turns"] == ["Name a colour."] and single["metadata"] == {"topic": "art"}


@pytest.mark.parametrize(
    "row, message",
    [
        ({"category": "x"}, "row 2: give exactly one of 'prompt', 'turns' or 'messages'"),
        ({"turns": "not a list"}, "row 2: 'turns' must be a non-empty list"),
        ({"turns": ["ok", 3]}, "row 2: 'turns[1]' must be text"),
        ({"prompt": "a", "turns": ["b"]}, "row 2: give exactly one"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "row 2: 'messages[0]': role"),
        ({"prompt": "a", "reference": ["1", "2"]}, "row 2: 'reference' has 2 entries"),
    ],
)
def test_a_bad_row_is_refused_by_its_number_and_field(row, message):
    with pytest.raises(PromptSetError) as err:
        parse_prompt_file(_jsonl({"prompt": "fine"}, row), "set.jsonl")
    assert any(e.startswith(message) for e in err.value.errors), err.value.errors


def test_repeated_ids_and_unknown_file_types_are_refused():
    with pytest.raises(PromptSetError, match="row 2: id '7' repeats row 1"):
        parse_prompt_file(_jsonl({"id": 7, "prompt": "a"}, {"id": "7", "prompt": "b"}), "x.jsonl")
    with pytest.raises(PromptSetError, match="unsupported file type"):
        parse_prompt_file(b"x", "set.parquet")


def test_the_hash_follows_the_content_not_the_file():
    a = parse_prompt_file(_jsonl({"prompt": "one"}, {"prompt": "two"}), "a.jsonl")
    b = parse_prompt_file(b"prompt\none\ntwo\n", "b.csv")
    assert content_hash(a) == content_hash(b)
    c = parse_prompt_file(_jsonl({"prompt": "one"}, {"prompt": "two!"}), "a.jsonl")
    assert content_hash(c) != content_hash(a)


@pytest.mark.django_db
def test_importing_changed_content_makes_a_new_version_and_the_same_content_does_not():
    first = prompt_set_import(name="mt", data=MT_BENCH.read_bytes(), filename="question.jsonl")
    again = prompt_set_import(name="mt", data=MT_BENCH.read_bytes(), filename="copy.jsonl")
    assert again.pk == first.pk and first.version == 1
    changed = prompt_set_import(name="mt", data=_jsonl({"prompt": "new"}), filename="q.jsonl")
    assert changed.version == 2 and changed.content_hash != first.content_hash
    assert first.n_records == 3 and first.max_turns == 2
    assert first.categories == {"math": 1, "reasoning": 1, "writing": 1}
    assert prompt_set_lookup("mt") == changed and prompt_set_lookup("mt@1") == first
    assert prompt_set_lookup(first.pk) == first and prompt_set_lookup("mt@9") is None


@pytest.mark.django_db
def test_a_researcher_imports_mt_bench_and_previews_it(login, carol):
    client = login(carol)
    upload = SimpleUploadedFile("question.jsonl", MT_BENCH.read_bytes())
    response = client.post(reverse("prompt_set_import"), {"name": "mt-bench", "file": upload})
    prompt_set = PromptSet.objects.get(name="mt-bench")
    assert response.status_code == 302
    assert response.url == reverse("prompt_set_detail", args=[prompt_set.pk])
    page = client.get(response.url).content.decode()
    assert "Rewrite your postcard so that every sentence starts" in page
    assert prompt_set.content_hash in page and "3 with 2 turns" in page
    listing = client.get(reverse("prompt_set_list")).content.decode()
    assert "mt-bench" in listing and prompt_set.content_hash[:12] in listing


@pytest.mark.django_db
def test_a_bad_upload_is_a_400_naming_the_row_and_registers_nothing(login, carol):
    client = login(carol)
    bad = _jsonl({"turns": ["fine"]}, {"turns": []})
    upload = SimpleUploadedFile("q.jsonl", bad)
    response = client.post(reverse("prompt_set_import"), {"name": "broken", "file": upload})
    assert response.status_code == 400
    assert "row 2: &#x27;turns&#x27; must be a non-empty list" in response.content.decode()
    assert not PromptSet.objects.exists()


@pytest.mark.django_db
def test_user_text_is_inert_on_the_preview(login, carol):
    client = login(carol)
    data = _jsonl({"prompt": "<script>alert(1)</script>", "category": "<b>x</b>"})
    prompt_set_import(name="hostile", data=data, filename="h.jsonl")
    page = client.get(reverse("prompt_set_detail", args=[PromptSet.objects.get().pk]))
    html = page.content.decode()
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html
    assert "<b>x</b>" not in html


@pytest.mark.django_db
def test_raters_cannot_see_or_import_prompt_sets(login, alice):
    client = login(alice)
    assert client.get(reverse("prompt_set_list")).status_code == 403
    upload = SimpleUploadedFile("q.jsonl", MT_BENCH.read_bytes())
    response = client.post(reverse("prompt_set_import"), {"name": "x", "file": upload})
    assert response.status_code == 403 and not PromptSet.objects.exists()

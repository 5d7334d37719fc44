"""Reward, DPO and SFT jobs trained from a campaign whose items carry a conversation: each
training example holds the earlier turns, as ``models.chat.chat_prompt`` formats them. A tiny
decoder with SmolLM2's real tokenizer and template keeps each job to a few seconds."""

from dataclasses import replace

import pytest

from core.jobs import KINDS, execute
from core.models import Job
from evalhub.models import ModelVersion
from grading.exports import export_file, preferences_from_campaigns
from grading.models import Item, Response
from grading.services import assignment_claim, assignment_submit
from models.chat import chat_prompt
from tests.factories import UserFactory, make_campaign

pytestmark = pytest.mark.django_db

EARLIER = "My cat is called Biscuit number {i}."


def context(i: int) -> list[dict]:
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": EARLIER.format(i=i)},
        {"role": "assistant", "content": f"Noted, number {i}."},
    ]


@pytest.fixture
def tokenizer(tiny_checkpoint):
    from models.tokenizer import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


@pytest.fixture
def campaign():
    """12 second turns, each after its own first turn, labelled by one simulated rater."""
    campaign = make_campaign(name="conv", overlap=1)
    for i in range(12):
        item = Item.objects.create(
            campaign=campaign, prompt="What is my cat called?", context=context(i)
        )
        Response.objects.create(item=item, position=0, text=f"Biscuit {i}.", model_name="a")
        Response.objects.create(item=item, position=1, text="I do not know.", model_name="b")
    rater = UserFactory(username="sim")
    levels = ["significantly_better", "better", "slightly_better"]
    n = 0
    while (a := assignment_claim(rater=rater, campaign=campaign)) is not None:
        side = "left" if a.left_position == 0 else "right"
        assignment_submit(assignment=a, data={"choice": f"{side}_{levels[n % 3]}"})
        n += 1
    return campaign


def _run(kind: str, params: dict) -> Job:
    job = Job.objects.create(kind=kind, params=params)
    execute(job.pk, KINDS[kind].job_fn)
    job.refresh_from_db()
    return job


def _number(pref) -> int:
    return int(pref.chosen.split()[1].rstrip("."))


def test_campaign_preferences_carry_each_items_conversation(campaign, tmp_path):
    prefs = preferences_from_campaigns([campaign.pk])
    assert len(prefs) == 12
    for p in prefs:
        assert p.prompt == "What is my cat called?" and p.context == context(_number(p))
    # the export's conversational file reads back as the same preferences
    from models.preferences import load_preferences_jsonl

    for fmt in ("conversational", "jsonl"):
        path = tmp_path / f"labels.{fmt}"
        assert export_file(campaign, fmt, path) == 12
        assert sorted(map(repr, load_preferences_jsonl(path))) == sorted(map(repr, prefs))


def test_a_dpo_job_trains_on_each_prompt_in_its_conversation(
    campaign, parent, tokenizer, monkeypatch
):
    from models.posttrain import dpo

    encoded = []
    real = dpo.encode_preferences

    def spy(tok, prefs, config):  # records what the job trains on, changes nothing
        pairs = real(tok, prefs, config)
        encoded.append((list(prefs), pairs))
        return pairs

    monkeypatch.setattr(dpo, "encode_preferences", spy)
    job = _run(
        "posttrain.dpo",
        {"model_id": parent.pk, "campaign_ids": [campaign.pk], "max_steps": 2, "batch_size": 4,
         "lr": 1e-3, "suites": []},
    )  # fmt: skip
    assert job.status == "succeeded", job.error
    ((prefs, pairs),) = encoded
    for pref, pair in zip(prefs, pairs, strict=True):
        text = tokenizer.decode(pair.prompt)
        assert text == chat_prompt(tokenizer, pref.messages)
        assert EARLIER.format(i=_number(pref)) in text and text.count("<|im_start|>user") == 2
    # the same pair without its conversation is a different training input
    (bare,) = real(tokenizer, [replace(prefs[0], context=[])], dpo.DPOConfig())
    assert bare.prompt != pairs[0].prompt and "Biscuit" not in tokenizer.decode(bare.prompt)


def test_an_sft_job_trains_the_chosen_answer_after_its_conversation(
    campaign, parent, tokenizer, monkeypatch
):
    from models.posttrain import sft

    documents = []
    real = sft.encode_conversation

    def spy(tok, messages, max_len=None):
        ids, mask = real(tok, messages, max_len)
        documents.append((ids, mask))
        return ids, mask

    monkeypatch.setattr(sft, "encode_conversation", spy)
    job = _run(
        "posttrain.sft",
        {"model_id": parent.pk, "campaign_ids": [campaign.pk], "max_steps": 1, "batch_size": 4,
         "lr": 1e-3, "suites": []},
    )  # fmt: skip
    assert job.status == "succeeded", job.error
    assert len(documents) == 12
    for ids, mask in documents:
        text = tokenizer.decode(ids)
        i = int(text.split("Biscuit number ")[1].split(".")[0])
        assert EARLIER.format(i=i) in text and f"Noted, number {i}." in text
        trained = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
        assert trained == f"Biscuit {i}.<|im_end|>"  # the earlier answer is context only


def test_a_reward_job_scores_each_response_in_its_conversation(campaign, parent, monkeypatch):
    from models.reward_backbones import DecoderBackbone

    read = []
    real = DecoderBackbone.prompt_text

    def spy(self, prompt):
        read.append(real(self, prompt))
        return read[-1]

    monkeypatch.setattr(DecoderBackbone, "prompt_text", spy)
    job = _run(
        "reward.train",
        {"campaign_ids": [campaign.pk], "backbone_model": parent.pk, "epochs": 1,
         "backbone_params": {"trainable_layers": 1}, "name": "rm-conv"},
    )  # fmt: skip
    assert job.status == "succeeded", job.error
    assert read and all("My cat is called Biscuit number" in text for text in read)
    assert all(text.endswith("<|im_start|>assistant\n") for text in read)
    version = ModelVersion.objects.get(name="rm-conv")
    assert version.info["backbone"]["chat_template"] is True

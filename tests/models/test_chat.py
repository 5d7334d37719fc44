"""Conversations as reward models, DPO/IPO and SFT read them: one formatting function
(``models.chat.chat_prompt``), preferences with their context, and TRL's conversational JSONL."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from models.afm import AFM, config_from_preset
from models.chat import chat_prompt, split_conversation, transcript
from models.posttrain.dpo import DPOConfig, encode_preferences
from models.posttrain.sft import encode_conversation, load_conversations_jsonl
from models.preferences import Preference, labels_hash, load_preferences_jsonl, split_by_prompt
from models.reward import RewardModel
from models.reward_backbones import DecoderBackbone, EmbeddingBackbone
from tests.models.test_dpo import TOK

EARLIER = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "My cat is called Biscuit."},
    {"role": "assistant", "content": "Noted: Biscuit."},
]
PREF = Preference("What is my cat called?", "Biscuit.", "I do not know.", "better", context=EARLIER)


class NoTemplate:
    """A tokenizer without a chat template (bytes as ids)."""

    eos_token_id, pad_token_id, chat_template = 1, 0, None

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())


# ----------------------------------------------------------------------------- formatting
def test_chat_prompt_is_the_chat_template_with_the_generation_prompt():
    messages = [*EARLIER, {"role": "user", "content": "What is my cat called?"}]
    assert chat_prompt(TOK, messages) == TOK.apply_chat_template(messages)
    assert chat_prompt(TOK, messages).endswith("<|im_start|>assistant\n")
    # a bare string is one user turn, exactly as the same one-message conversation
    assert chat_prompt(TOK, "hi") == chat_prompt(TOK, [{"role": "user", "content": "hi"}])


def test_chat_prompt_matches_the_builtin_backends_chat_format(smollm2_tokenizer):
    from models.backends.base import TokenBackend

    backend = TokenBackend()
    backend.tokenizer = smollm2_tokenizer
    assert chat_prompt(smollm2_tokenizer, PREF.messages) == backend.chat_format(PREF.messages)


def test_without_a_template_a_conversation_is_its_transcript_and_a_prompt_its_text():
    assert chat_prompt(NoTemplate(), "just this") == transcript("just this") == "just this"
    text = chat_prompt(NoTemplate(), PREF.messages)
    assert text == (
        "System: You are terse.\n\nUser: My cat is called Biscuit.\n\n"
        "Assistant: Noted: Biscuit.\n\nUser: What is my cat called?"
    )


def test_a_conversational_prompt_must_end_with_the_user_turn():
    assert split_conversation(PREF.messages) == (EARLIER, PREF.prompt)
    with pytest.raises(ValueError, match="must end with the user turn"):
        split_conversation(EARLIER)
    with pytest.raises(ValueError, match=r"prompt\[0\] needs a role"):
        split_conversation([{"role": "narrator", "content": "x"}])


# ---------------------------------------------------------------------------- preferences
def test_preferences_without_context_hash_and_split_as_before():
    flat = [Preference(f"p{i}", "a", "b", "better") for i in range(10)]
    # single-turn labels hash as they did before contexts existed (lineage stays comparable)
    assert labels_hash(flat) == _old_hash(flat)
    assert labels_hash([PREF]) != labels_hash([replace(PREF, context=[])])
    # the same last turn in two conversations is two prompts for the split
    twins = [replace(PREF, context=[]), PREF] * 3
    train, held = split_by_prompt(twins, held_out=0.5, seed=0)
    assert len(train) == len(held) == 3 and {p.context == [] for p in held} in ({True}, {False})


def _old_hash(prefs):
    """labels_hash as it was written before ``context``: sha256 over the sorted JSON rows."""
    import hashlib

    rows = sorted(
        json.dumps(
            {k: v for k, v in vars(p).items() if k != "context"}, sort_keys=True, ensure_ascii=False
        )
        for p in prefs
    )
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def test_trl_conversational_and_flat_rows_with_context_load(tmp_path):
    rows = [
        {  # TRL's conversational preference format, as the grading export writes it
            "prompt": PREF.messages,
            "chosen": [{"role": "assistant", "content": "Biscuit."}],
            "rejected": [{"role": "assistant", "content": "I do not know."}],
            "level": "better",
        },
        {  # the flat export: the graded turn as prompt, the turns before it as context
            "prompt": PREF.prompt,
            "context": EARLIER,
            "chosen": "Biscuit.",
            "rejected": "I do not know.",
        },
        {"prompt": "single", "chosen": "a", "rejected": "b"},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    conversational, flat, single = load_preferences_jsonl(path)
    assert conversational == flat == PREF
    assert single.context == [] and single.messages == [{"role": "user", "content": "single"}]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": EARLIER, "chosen": "a", "rejected": "b"}, "end with the user turn"),
        (
            {"prompt": PREF.messages, "context": EARLIER, "chosen": "a", "rejected": "b"},
            "not both",
        ),
        ({"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "chosen"),
        ({"prompt": "p", "context": [{"role": "x"}], "chosen": "a", "rejected": "b"}, "context"),
    ],
)
def test_malformed_conversational_rows_are_refused_with_their_line(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}) + "\n")
    path.write_text(path.read_text() + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{message}"):
        load_preferences_jsonl(path)


# ------------------------------------------------------------------------------------ DPO
def test_dpo_reads_the_prompt_in_its_conversation():
    (pair,) = encode_preferences(TOK, [PREF], DPOConfig())
    assert TOK.decode(pair.prompt) == chat_prompt(TOK, PREF.messages)
    assert "My cat is called Biscuit." in TOK.decode(pair.prompt)
    (bare,) = encode_preferences(TOK, [replace(PREF, context=[])], DPOConfig())
    assert bare.prompt != pair.prompt and "Biscuit" not in TOK.decode(bare.prompt)
    assert TOK.decode(bare.prompt) == TOK.apply_chat_template(
        [{"role": "user", "content": PREF.prompt}]
    )  # a single-turn pair is read as it always was
    (plain,) = encode_preferences(TOK, [PREF], DPOConfig(chat_template=False))
    assert TOK.decode(plain.prompt) == transcript(PREF.messages)
    assert pair.chosen == bare.chosen  # the responses do not change


# -------------------------------------------------------------------------------- rewards
def test_a_decoder_reward_reads_the_conversation_and_scores_it_differently():
    model = AFM(config_from_preset("tiny")).init_weights(seed=0)
    backbone = DecoderBackbone(model, TOK, trainable_layers=1)
    assert backbone.prompt_text(PREF.messages) == chat_prompt(TOK, PREF.messages)
    prompts, _ = backbone._ids([PREF.messages], [["Biscuit."]])
    assert "My cat is called Biscuit." in TOK.decode(prompts[0])
    rm = RewardModel(backbone)
    with_context, without = rm.pairs([PREF])[0], rm.pairs([replace(PREF, context=[])])[0]
    assert not torch.allclose(with_context, without)
    (score,) = rm.score([PREF.messages], ["Biscuit."])  # scoring reads it as training did
    assert score == pytest.approx(with_context[0, 0].item(), abs=1e-5)


def test_an_embedding_reward_embeds_the_conversation_transcript():
    seen: list[str] = []

    def embed(texts):
        seen.extend(texts)
        return torch.stack([torch.tensor([float(len(t)), float(t.count("a"))]) for t in texts])

    backbone = EmbeddingBackbone(embed, 2, {"kind": "test"})
    backbone.encode([PREF.messages, "single"], [["x"], ["y"]])
    assert transcript(PREF.messages) in seen and "single" in seen


def test_an_old_decoder_reward_reference_keeps_reading_plain_text(tmp_path, smollm2_gguf):
    from models.reward_backbones import backbone_from_reference
    from tests.models.conftest import save_tiny_checkpoint

    path = save_tiny_checkpoint(tmp_path / "tiny", smollm2_gguf)
    new = backbone_from_reference({"kind": "afm", "checkpoint": str(path)})
    assert new.chat_template is False  # saved before conversations: its inputs must not move
    fresh = DecoderBackbone(new.model, new.tokenizer, checkpoint=str(path))
    assert fresh.reference()["chat_template"] is True
    assert backbone_from_reference(fresh.reference()).chat_template is True
    assert fresh.prompt_text("hi").startswith("<|im_start|>") and new.prompt_text("hi") == "hi"


# ------------------------------------------------------------------------------------ SFT
def test_sft_reads_trl_prompt_completion_rows_and_trains_the_completion_only(tmp_path):
    rows = [
        {"prompt": PREF.messages, "completion": [{"role": "assistant", "content": "Biscuit."}]},
        {"prompt": "flat prompt", "completion": "flat answer"},
        {"messages": [*PREF.messages, {"role": "assistant", "content": "Biscuit."}]},
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    conversational, flat, messages = load_conversations_jsonl(path)
    assert conversational[2] == {"role": "assistant", "content": "Noted: Biscuit.", "weight": 0}
    assert flat == [
        {"role": "user", "content": "flat prompt"},
        {"role": "assistant", "content": "flat answer"},
    ]

    def trained(conversation):
        ids, mask = encode_conversation(TOK, conversation)
        assert TOK.decode(ids).startswith(chat_prompt(TOK, PREF.messages)[:40])
        return TOK.decode([t for t, m in zip(ids, mask, strict=True) if m])

    assert trained(conversational) == "Biscuit.<|im_end|>"  # the earlier answer is context
    assert trained(messages) == "Noted: Biscuit.<|im_end|>Biscuit.<|im_end|>"  # every turn


def test_sft_refuses_a_bad_weight_and_a_conversation_with_nothing_to_train(tmp_path):
    path = tmp_path / "bad.jsonl"
    weighted = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path.write_text(json.dumps({"messages": [weighted[0], {**weighted[1], "weight": 2}]}))
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*weight must be 0 or 1"):
        load_conversations_jsonl(path)
    path.write_text(json.dumps({"messages": [weighted[0], {**weighted[1], "weight": 0}]}))
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no assistant message to train on"):
        load_conversations_jsonl(path)

"""SFT: assistant-only loss masks from the chat template, first-fit packing, packed documents
that never see each other (their losses equal each one run alone), and training through
``models.train`` on the tiny config."""

from __future__ import annotations

import json

import pytest
import torch

from models.afm import AFM, config_from_preset
from models.lora import apply_lora
from models.posttrain.sft import (
    PackedDocuments,
    document_logprobs,
    encode_conversation,
    load_conversations_jsonl,
    pack_documents,
    train_sft,
)
from models.train import TrainConfig, sequence_logprobs
from tests.models.test_dpo import TOK

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello there"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def conversations(n: int) -> list[list[dict]]:
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    return [
        [
            {"role": "user", "content": f"spell {w}" + "!" * i},
            {"role": "assistant", "content": " ".join(w.upper())},
        ]
        for i, w in enumerate((words * 4)[:n])
    ]


def tiny() -> AFM:
    return AFM(config_from_preset("tiny")).init_weights(seed=0)


def test_the_mask_covers_each_assistant_turn_and_its_end_of_turn_only():
    ids, mask = encode_conversation(TOK, CHAT)
    assert len(ids) == len(mask)
    assert TOK.decode(ids) == TOK.apply_chat_template(CHAT, add_generation_prompt=False)
    trained = TOK.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert trained == "hello there<|im_end|>4<|im_end|>"
    # every trained span is preceded by the generation prompt the model sees at inference
    first = mask.index(True)
    assert TOK.decode(ids[:first]).endswith("<|im_start|>assistant\n")


def test_a_conversation_without_an_assistant_turn_is_rejected():
    with pytest.raises(ValueError, match="assistant"):
        encode_conversation(TOK, CHAT[:2])


def test_packs_are_first_fit_within_the_budget_and_keep_every_document():
    lengths = [5, 9, 3, 7, 2, 12]
    packs = pack_documents(lengths, 12)
    assert packs == [[0, 2, 4], [1], [3], [5]]
    assert sorted(i for p in packs for i in p) == list(range(6))
    assert all(sum(lengths[i] for i in p) <= 12 for p in packs)


def test_packed_positions_restart_in_every_document():
    docs = [([1, 2, 3], [False, True, True]), ([4, 5], [False, True])]
    packed = PackedDocuments.build(docs)
    assert packed.positions.tolist() == [0, 1, 2, 0, 1]
    assert packed.target.tolist() == [1, 2, 4] and packed.doc.tolist() == [0, 0, 1]
    assert packed.index.tolist() == [[0, 1, 2], [3, 4, 0]]


def test_a_packed_documents_loss_equals_the_document_run_alone():
    model = tiny()
    docs = [encode_conversation(TOK, c) for c in [CHAT, *conversations(3)]]
    sums, counts = document_logprobs(model, docs)
    for (ids, mask), packed_sum, count in zip(docs, sums, counts, strict=True):
        ids_t, mask_t = torch.tensor([ids]), torch.tensor([mask])
        alone, n = sequence_logprobs(model, ids_t, mask_t)  # the plain padded-row path
        torch.testing.assert_close(packed_sum, alone[0], rtol=1e-5, atol=1e-4)
        assert int(n[0]) == int(count)
    # and the gradient of one document does not depend on its neighbours
    grads = []
    for neighbours in ([], docs[2:]):
        model.zero_grad()
        s, _ = document_logprobs(model, [docs[0], *neighbours])
        s[0].backward()
        grads.append(model.blocks[0].attn.wqkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_training_lowers_the_loss_and_reports_every_step():
    config = TrainConfig(lr=3e-3, batch_size=2, epochs=6, warmup_ratio=0.0, device="cpu")
    seen = []
    result = train_sft(
        tiny(), conversations(8), TOK, config, progress=lambda s, t, m: seen.append(s), max_len=64
    )
    assert result.step == len(result.history) == len(seen) == seen[-1]
    assert [h["step"] for h in result.history] == [float(s) for s in seen]
    assert result.history[-1]["loss"] < 0.6 * result.history[0]["loss"]
    assert result.metrics["loss"] == result.history[-1]["loss"]


def test_packing_changes_the_examples_but_not_the_first_step_loss():
    config = TrainConfig(lr=1e-3, batch_size=100, epochs=1, warmup_ratio=0.0, device="cpu")
    packed = train_sft(tiny(), conversations(6), TOK, config, max_len=160)
    alone = train_sft(tiny(), conversations(6), TOK, config, max_len=160, pack=False)
    assert packed.history[0]["examples"] < alone.history[0]["examples"] == 6
    assert packed.history[0]["loss"] == pytest.approx(alone.history[0]["loss"], abs=1e-5)


def test_same_seed_gives_the_same_lora_weights():
    config = TrainConfig(lr=1e-2, batch_size=2, epochs=1, warmup_ratio=0.0, device="cpu", seed=3)
    weights = []
    for _ in range(2):
        model = tiny()
        apply_lora(model, rank=2, alpha=4)
        train_sft(model, conversations(6), TOK, config, max_len=64)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


def test_conversations_load_from_jsonl_and_bad_lines_name_their_place(tmp_path):
    good = tmp_path / "chat.jsonl"
    good.write_text(json.dumps({"messages": CHAT, "id": 7}) + "\n\n")
    assert load_conversations_jsonl(good) == [CHAT]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": CHAT[:2]}))
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no assistant"):
        load_conversations_jsonl(bad)


@pytest.mark.slow
def test_smollm2_template_masks_only_the_answer(smollm2_gguf):
    from models.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(smollm2_gguf)
    ids, mask = encode_conversation(tok, CHAT[1:])
    trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert trained == "hello there<|im_end|>4<|im_end|>"
    assert ids == tok.encode(tok.apply_chat_template(CHAT[1:], add_generation_prompt=False))

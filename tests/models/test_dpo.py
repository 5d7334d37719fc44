"""Level-aware DPO / IPO: the losses against hand-computed values, the shared-prefix log-probs
against separate passes, the reference cache, and training through ``models.train`` (resume,
determinism, LoRA with the base as reference) on the tiny config."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from models.afm import AFM, config_from_preset
from models.lora import adapters_disabled, apply_lora, lora_parameters
from models.posttrain import dpo as dpo_module
from models.posttrain.dpo import (
    DPOConfig,
    EncodedPair,
    dpo_loss,
    encode_preferences,
    ipo_loss,
    level_ipo_gap,
    margin_dpo_loss,
    pair_logprobs,
    pair_targets,
    reference_logprobs,
    soft_dpo_loss,
    train_dpo,
)
from models.preferences import Preference
from models.tokenizer import CHATML_TEMPLATE
from models.train import TrainConfig, pack_completions, sequence_logprobs

SPECIALS = {"<|im_start|>": 254, "<|im_end|>": 255}


class ByteChatTokenizer:
    """Bytes as token ids for the tiny AFM (vocabulary 256), ChatML's two markers as ids 254
    and 255 (the end of a turn is EOS), and the ChatML template."""

    eos_token_id, pad_token_id = 255, 0
    chat_template = CHATML_TEMPLATE

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        while text:
            hits = [(text.find(s), s) for s in SPECIALS if s in text]
            at, special = min(hits) if hits else (len(text), "")
            ids += list(text[:at].encode())
            if special:
                ids.append(SPECIALS[special])
            text = text[at + len(special) :]
        assert all(i < 254 for i in ids if i not in SPECIALS.values())
        return ids

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        names = {v: k for k, v in SPECIALS.items()}
        return "".join(names.get(i, "") if i in names else bytes([i]).decode() for i in ids)

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = True) -> str:
        import jinja2

        template = jinja2.Environment(keep_trailing_newline=True).from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt)


TOK = ByteChatTokenizer()
# hand example: policy chosen/rejected -1, -2; reference -1.5, -1.5: Δ = 1
PC, PR, RC, RR = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.5))


def prefs(n: int = 8, ties: int = 0) -> list[Preference]:
    """Chosen answers are lower-case words, rejected ones upper-case: learnable from bytes."""
    levels = ["significantly_better", "better", "slightly_better", "negligibly_better"]
    out = [
        Preference(f"say {w}", f"{w} is fine", f"{w.upper()} NO", levels[i % 4])
        for i, w in enumerate(["cat", "dog", "sun", "map", "owl", "fig", "jam", "kit"][:n])
    ]
    return out + [Preference(f"tie {i}", "same a", "same b", "tie_both_good") for i in range(ties)]


def config(tmp_path=None, **kw) -> TrainConfig:
    base = TrainConfig(lr=5e-3, batch_size=4, epochs=2, warmup_ratio=0.0, device="cpu", seed=1)
    if tmp_path is not None:
        base = replace(base, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    return replace(base, **kw)


def tiny() -> AFM:
    return AFM(config_from_preset("tiny")).init_weights(seed=0)


# ------------------------------------------------------------------------------ losses
def test_losses_match_hand_computed_values():
    beta = 0.1  # βΔ = 0.1
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, beta), torch.tensor([0.6443967]))
    soft = soft_dpo_loss(PC, PR, RC, RR, beta, target=0.8)  # 0.8·0.6444 + 0.2·0.7444
    torch.testing.assert_close(soft, torch.tensor([0.6643967]))
    torch.testing.assert_close(
        margin_dpo_loss(PC, PR, RC, RR, beta, margin=1 / 3), torch.tensor([0.8166040])
    )
    torch.testing.assert_close(ipo_loss(PC, PR, RC, RR, beta), torch.tensor([16.0]))  # (1 − 5)²
    gap = level_ipo_gap(torch.tensor(0.85), beta)  # 0.7 / 0.2 = 3.5
    torch.testing.assert_close(ipo_loss(PC, PR, RC, RR, beta, gap), torch.tensor([6.25]))


def test_a_soft_target_of_one_is_hard_dpo_and_a_tie_is_symmetric():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64, generator=g) * 5 for _ in range(4))
    hard = dpo_loss(pc, pr, rc, rr, 0.3)
    torch.testing.assert_close(soft_dpo_loss(pc, pr, rc, rr, 0.3, target=1.0), hard)
    margin = torch.rand(64, generator=g)
    torch.testing.assert_close(
        soft_dpo_loss(pc, pr, rc, rr, 0.3, 1.0, margin),
        margin_dpo_loss(pc, pr, rc, rr, 0.3, margin),
    )
    tie = soft_dpo_loss(pc, pr, rc, rr, 0.3, target=0.5)
    torch.testing.assert_close(tie, soft_dpo_loss(pr, pc, rr, rc, 0.3, target=0.5))  # swapped
    assert level_ipo_gap(0.5, 0.1) == 0.0 and level_ipo_gap(1.0, 0.1) == pytest.approx(5.0)


def test_targets_follow_the_level_and_the_tie_rule():
    data = prefs(4, ties=1)
    p, margin, tie = pair_targets(data, DPOConfig())
    assert p.tolist() == pytest.approx([0.95, 0.85, 0.7, 0.6, 0.5]) and tie.tolist()[-1]
    p, margin, _ = pair_targets(data, DPOConfig(level_aware=False))
    assert p.tolist() == [1.0, 1.0, 1.0, 1.0, 0.5] and margin.abs().sum() == 0
    _, margin, _ = pair_targets(data, DPOConfig(level_form="margin"))
    assert margin.tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0, 0.0])
    assert DPOConfig().keep_ties and not DPOConfig(level_aware=False).keep_ties
    assert DPOConfig(level_aware=False, ties="keep").keep_ties


# ------------------------------------------------------------------------- log-probs
def test_shared_prefix_logprobs_equal_separate_passes_with_gradients():
    model = tiny()
    pairs = encode_preferences(TOK, prefs(3), DPOConfig())
    logps, lengths = pair_logprobs(model, pairs)
    flat = [(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)]
    ids, completion, attention = pack_completions(flat)
    expected, counts = sequence_logprobs(model, ids, completion, attention)
    torch.testing.assert_close(logps.flatten(), expected, rtol=1e-5, atol=1e-4)
    assert lengths.flatten().tolist() == counts.tolist()
    logps.sum().backward()
    assert model.blocks[0].attn.wqkv.weight.grad.abs().sum() > 0


def test_responses_end_in_eos_and_prompts_use_the_chat_template():
    (pair,) = encode_preferences(TOK, prefs(1), DPOConfig(max_len=40))
    assert TOK.decode(pair.prompt).endswith("<|im_start|>assistant\n")
    assert pair.chosen[-1] == TOK.eos_token_id and pair.rejected[-1] == TOK.eos_token_id
    (short,) = encode_preferences(TOK, prefs(1), DPOConfig(max_len=24))
    assert len(short.prompt) <= 12 and len(short.prompt) + len(short.chosen) <= 24


# ------------------------------------------------------------------------- reference
def test_the_reference_cache_is_hit_and_keyed_by_the_weights(tmp_path, monkeypatch):
    model = tiny()
    pairs = encode_preferences(TOK, prefs(4), DPOConfig())
    first, hit = reference_logprobs(model, pairs, batch_size=3, cache_dir=tmp_path)
    assert not hit and first.shape == (4, 2)

    def no_recompute(*args, **kwargs):
        raise AssertionError("reference log-probs recomputed")

    monkeypatch.setattr(dpo_module, "pair_logprobs", no_recompute)
    again, hit = reference_logprobs(model, pairs, batch_size=3, cache_dir=tmp_path)
    assert hit
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    with torch.no_grad():
        model.norm.weight.add_(0.1)  # other weights: another key, so a recompute
    with pytest.raises(AssertionError, match="recomputed"):
        reference_logprobs(model, pairs, cache_dir=tmp_path)


def test_lora_reference_is_the_base_with_adapters_off_whatever_the_adapters_hold(tmp_path):
    model = tiny()
    pairs = encode_preferences(TOK, prefs(2), DPOConfig())
    base, _ = reference_logprobs(model, pairs)
    apply_lora(model, rank=2, alpha=4)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_()
    ref, hit = reference_logprobs(model, pairs, without_adapters=True, cache_dir=tmp_path)
    torch.testing.assert_close(ref, base, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_()  # other adapter values: the same reference, from the cache
    assert reference_logprobs(model, pairs, without_adapters=True, cache_dir=tmp_path)[1]
    assert all(m.enabled for m in model.modules() if hasattr(m, "enabled"))


# ------------------------------------------------------------------------------ training
def test_equal_chosen_and_rejected_give_log_two_at_every_step():
    same = [Preference(f"p{i}", "same answer", "same answer", "better") for i in range(8)]
    result = train_dpo(tiny(), None, TOK, same, config(), DPOConfig(level_aware=False))
    assert len(result.history) == 4
    for step in result.history:
        assert step["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_training_raises_the_margin_and_skips_or_keeps_ties():
    data = prefs(8, ties=2)
    hard = train_dpo(tiny(), None, TOK, data, config(epochs=4), DPOConfig(level_aware=False))
    assert hard.history[0]["examples"] == 4 and hard.step == 8  # 8 pairs, ties skipped
    assert hard.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference
    assert hard.history[-1]["loss"] < 0.5 * math.log(2)
    assert hard.history[-1]["reward_margin"] > 0 and hard.history[-1]["accuracy"] == 1.0
    soft = train_dpo(tiny(), None, TOK, data, config(epochs=1), DPOConfig())
    assert soft.step == 3  # 10 pairs in batches of 4: ties kept


def test_same_seed_and_data_give_identical_weights():
    a, b = tiny(), tiny()
    for model in (a, b):
        train_dpo(model, None, TOK, prefs(8), config(), DPOConfig(loss="ipo"))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_resume_from_a_checkpoint_continues_the_same_curve(tmp_path):
    dpo = DPOConfig(cache_dir=str(tmp_path / "ref"))
    straight_model = tiny()
    straight = train_dpo(straight_model, None, TOK, prefs(8), config(tmp_path / "a"), dpo)
    halfway = tmp_path / "a" / "step-00000002"
    assert straight.step == 4 and halfway.is_dir()
    # as a new process would: the parent loaded again, its reference from the cache
    resumed_model = tiny()
    resumed = train_dpo(
        resumed_model, None, TOK, prefs(8), config(tmp_path / "b"), dpo, resume_from=halfway
    )
    assert resumed.step == 4 and [h["step"] for h in resumed.history] == [3.0, 4.0]
    for ours, theirs in zip(resumed.history, straight.history[2:], strict=True):
        assert ours["loss"] == theirs["loss"]
    for x, y in zip(resumed_model.parameters(), straight_model.parameters(), strict=True):
        assert torch.equal(x, y)


def test_lora_dpo_trains_the_adapters_against_the_base(tmp_path):
    model = tiny()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, rank=4, alpha=8)
    result = train_dpo(model, None, TOK, prefs(8), config(lr=2e-2, epochs=4), DPOConfig())
    assert result.history[-1]["reward_margin"] > result.history[0]["reward_margin"]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    with adapters_disabled(model):  # the reference is still what the base computes
        pairs = encode_preferences(TOK, prefs(8), DPOConfig())
        base, _ = reference_logprobs(model, pairs)
    expected, _ = reference_logprobs(tiny(), pairs)
    torch.testing.assert_close(base, expected, rtol=1e-5, atol=1e-5)


def test_a_separate_reference_model_is_used_when_given():
    policy, reference = tiny(), tiny()
    with torch.no_grad():
        reference.norm.weight.mul_(1.5)
    pairs = [EncodedPair([1, 2], [3, 255], [4, 255])]
    ours, _ = reference_logprobs(policy, pairs)
    theirs, _ = reference_logprobs(reference, pairs)
    assert not torch.allclose(ours, theirs)
    result = train_dpo(policy, reference, TOK, prefs(4), config(epochs=1), DPOConfig())
    assert result.history[0]["reward_margin"] != 0.0  # policy ≠ reference from the start

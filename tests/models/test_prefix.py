"""Shared-prefix log-likelihoods (models/prefix.py) against the plain path (generate.py)."""

from __future__ import annotations

import random

import torch

from models.generate import loglikelihood
from models.prefix import PrefixScorer, encode_prefix, plan_families, suffix_loglikelihood


def assert_same_scores(got, want, atol=1e-4):
    assert [g for _, g in got] == [g for _, g in want]
    torch.testing.assert_close(
        torch.tensor([s for s, _ in got], dtype=torch.float64),
        torch.tensor([s for s, _ in want], dtype=torch.float64),
        rtol=0,
        atol=atol,
    )


def few_shot_pairs(seed: int, n_questions: int, shot_len: int = 60):
    """Pairs shaped like MMLU's: a shared shot prefix per 'subject', varied questions, four
    one-token choices, plus some multi-token continuations and an unrelated short pair."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(2):
        shots = [rng.randrange(256) for _ in range(shot_len)]
        for _ in range(n_questions):
            ctx = shots + [rng.randrange(256) for _ in range(rng.randrange(1, 20))]
            pairs += [(ctx, [letter]) for letter in (10, 11, 12, 13)]
        pairs.append((shots + [7, 8], [rng.randrange(256) for _ in range(4)]))
    pairs.append(([1, 2, 3], [4, 5]))
    rng.shuffle(pairs)
    return pairs


def count_trunk_tokens(model, monkeypatch) -> list[int]:
    seen: list[int] = []
    trunk = model.trunk

    def counting(tokens, *args, **kwargs):
        seen.append(tokens.numel())
        return trunk(tokens, *args, **kwargs)

    monkeypatch.setattr(model, "trunk", counting)
    return seen


def test_prefix_scores_equal_the_plain_path_on_a_tiny_model(tiny_model):
    pairs = few_shot_pairs(seed=0, n_questions=7)
    want = loglikelihood(tiny_model, pairs, batch_size=3)
    for batch_size in (1, 3, 8):
        got = PrefixScorer(tiny_model, batch_size=batch_size, min_prefix=8).loglikelihood(pairs)
        assert_same_scores(got, want)


def test_it_runs_each_shared_prefix_once_and_each_question_once(tiny_model, monkeypatch):
    pairs = few_shot_pairs(seed=1, n_questions=5)
    plain = sum(len(c) + len(x) - 1 for c, x in pairs)
    seen = count_trunk_tokens(tiny_model, monkeypatch)
    PrefixScorer(tiny_model, batch_size=4, min_prefix=8).loglikelihood(pairs)
    # 2 prefixes of ~60 tokens + 2*5 question suffixes of <=20 (+ padding) + 2 long pairs:
    # far below the plain path, which runs 4 full rows per question.
    assert sum(seen) < plain / 3


def test_families_split_at_the_subject_boundary():
    shots_a, shots_b = list(range(50)), list(range(100, 150))
    pairs = [(shots_a + [200 + q], [1]) for q in range(3)]
    pairs += [(shots_b + [210, q], [1]) for q in range(2)]
    families, rest = plan_families(pairs, min_prefix=32)
    assert [(f.prefix_len, f.members) for f in families] == [(50, [0, 1, 2]), (51, [3, 4])]
    assert rest == []


def test_a_lone_pair_and_a_short_prefix_take_the_plain_path():
    pairs = [([1, 2, 3, 4], [5]), ([9] * 40, [1]), ([9] * 40 + [1], [2])]
    families, rest = plan_families(pairs, min_prefix=32)
    assert [f.members for f in families] == [[1, 2]]
    assert rest == [0]


def test_a_stored_prefix_is_extended_not_recomputed(tiny_model, monkeypatch):
    torch.manual_seed(0)
    shots = torch.randint(0, 256, (80,)).tolist()
    first = encode_prefix(tiny_model, shots[:60])
    seen = count_trunk_tokens(tiny_model, monkeypatch)
    second = encode_prefix(tiny_model, shots, reuse=first)
    assert seen == [20]
    fresh = encode_prefix(tiny_model, shots)
    torch.testing.assert_close(second.cache.k, fresh.cache.k, rtol=0, atol=1e-5)
    pairs = [(shots + [3, 4], [5, 6]), (shots + [3], [4])]
    assert_same_scores(
        suffix_loglikelihood(tiny_model, second, pairs), loglikelihood(tiny_model, pairs)
    )


def test_consecutive_calls_reuse_the_last_prefix(tiny_model, monkeypatch):
    pairs = few_shot_pairs(seed=2, n_questions=6)
    scorer = PrefixScorer(tiny_model, batch_size=4, min_prefix=8)
    shots = next(c for c, _ in pairs if len(c) > 60)[:60]
    subject = [p for p in pairs if p[0][:60] == shots]  # one subject's questions
    half = len(subject) // 2
    scorer.loglikelihood(subject[:half])
    seen = count_trunk_tokens(tiny_model, monkeypatch)
    PrefixScorer(tiny_model, batch_size=4, min_prefix=8).loglikelihood(subject[half:])
    fresh = sum(seen)
    seen.clear()
    second = scorer.loglikelihood(subject[half:])
    assert sum(seen) == fresh - 60  # the 60 shared shot tokens are not run again
    assert_same_scores(second, loglikelihood(tiny_model, subject[half:]))


def test_builtin_backend_mmlu_scores_equal_the_plain_path_on_smollm2(smollm2_checkpoint):
    from models.backends.builtin import BuiltinBackend
    from suites.mmlu import MMLU

    suite = MMLU(subjects=["anatomy", "astronomy"])
    examples = suite.examples()
    examples = examples[:3] + examples[-3:]  # both subjects
    texts = [(r.context, r.continuation) for ex in examples for r in suite.requests(ex)]
    backend = BuiltinBackend(smollm2_checkpoint, batch_size=4, prepack=False)
    got = backend.loglikelihood(texts)
    pairs = [backend.encode_pair(c, x) for c, x in texts]
    families, _ = plan_families(pairs)
    assert len(families) == 2 and min(f.prefix_len for f in families) > 250
    want = loglikelihood(backend.model, pairs, batch_size=4)
    assert_same_scores(got, want)

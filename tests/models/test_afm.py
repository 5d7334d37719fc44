"""Unit tests of the AFM module and the generation engine on a tiny random model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models.afm import AFM, PRESETS, AFMConfig, config_from_preset
from models.generate import generate, loglikelihood, sample_next
from models.linear import TiedHead


def naive_greedy(model: AFM, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding that recomputes the whole sequence every step: no cache, no tricks."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_presets_are_looked_up_by_exact_name():
    assert config_from_preset("tiny") == PRESETS["tiny"]
    with pytest.raises(KeyError, match="known"):
        config_from_preset("Tiny")
    assert config_from_preset("tiny", qk_norm=False).qk_norm is False


def test_afm_on_device_preset_matches_the_published_shape():
    cfg = PRESETS["afm-on-device"]
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (
        3072,
        26,
        24,
        8,
        128,
    )
    assert cfg.qk_norm and cfg.tie_embeddings and cfg.rope_base == 500_000
    with torch.device("meta"):
        n = AFM(cfg).num_params()
    embedding = cfg.vocab_size * cfg.dim
    # The paper: 2.58B non-embedding + 0.15B embedding parameters (arXiv:2407.21075 §2).
    assert 2.5e9 < n - embedding < 2.7e9
    assert abs(embedding - 0.15e9) < 0.01e9


def test_config_round_trips_through_a_dict_and_rejects_unknown_keys():
    cfg = PRESETS["tiny"]
    assert AFMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        AFMConfig.from_dict({**cfg.to_dict(), "n_experts": 8})
    with pytest.raises(ValueError):
        dataclasses.replace(cfg, n_kv_heads=3)


def test_input_and_output_embeddings_are_tied(tiny_model):
    assert isinstance(tiny_model.lm_head, TiedHead)
    assert "lm_head.weight" not in tiny_model.state_dict()  # the table is saved once
    assert len(list(tiny_model.parameters())) == len(tiny_model.state_dict())
    h = torch.randn(1, 2, tiny_model.cfg.dim)
    torch.testing.assert_close(tiny_model.head(h), h @ tiny_model.tok_emb.weight.T)


def test_qk_norm_adds_per_head_norms_and_changes_the_output():
    torch.manual_seed(0)
    with_norm = AFM(config_from_preset("tiny")).init_weights(1)
    without = AFM(config_from_preset("tiny", qk_norm=False))
    missing = without.load_state_dict(with_norm.state_dict(), strict=False)
    assert all(k.endswith(("q_norm.weight", "k_norm.weight")) for k in missing.unexpected_keys)
    with torch.no_grad():
        for block in with_norm.blocks:  # make the norms matter
            block.attn.q_norm.weight.mul_(3.0)
        x = torch.randint(0, 256, (1, 12))
        assert not torch.allclose(with_norm(x), without(x))


def test_cached_decoding_gives_the_same_logits_as_a_full_forward(tiny_model):
    x = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        full = tiny_model(x)
        cache = tiny_model.new_cache(2, 10)
        parts = [tiny_model(x[:, :6], cache=cache)]
        parts += [tiny_model(x[:, t : t + 1], cache=cache) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_greedy_equals_no_cache_greedy(tiny_model):
    prompt = [5, 17, 99, 3, 42]
    assert generate(tiny_model, [prompt], max_new_tokens=20) == [
        naive_greedy(tiny_model, prompt, 20)
    ]


def test_batched_generation_with_left_padding_equals_one_by_one(tiny_model):
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [200], [4, 4, 4, 4]]
    batched = generate(tiny_model, prompts, max_new_tokens=12)
    alone = [generate(tiny_model, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == alone
    assert batched[0] == naive_greedy(tiny_model, prompts[0], 12)


def test_left_padded_logits_match_unpadded_logits(tiny_model):
    from models.generate import left_pad

    tokens, valid, positions = left_pad([[3, 4, 5], [6, 7, 8, 9, 10]], pad_id=0, extra=0)
    with torch.no_grad():
        padded = tiny_model(tokens, positions, key_valid=valid)
        alone = tiny_model(torch.tensor([[3, 4, 5]]))
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[0, 2:], alone[0], rtol=1e-5, atol=1e-5)


def test_generation_stops_at_stop_tokens_and_on_request(tiny_model):
    prompt = [5, 17, 99]
    free = generate(tiny_model, [prompt], max_new_tokens=10)[0]
    stopped = generate(tiny_model, [prompt], max_new_tokens=10, stop_token_ids=[free[3]])[0]
    assert stopped == free[: free.index(free[3])]
    asked = generate(
        tiny_model, [prompt], max_new_tokens=10, should_stop=lambda row, ids: len(ids) == 4
    )[0]
    assert asked == free[:4]
    assert generate(tiny_model, [prompt], max_new_tokens=0) == [[]]


def test_sampling_is_reproducible_with_a_seed_and_top_p_near_zero_is_greedy(tiny_model):
    prompts = [[5, 17, 99], [1, 2]]
    a = generate(tiny_model, prompts, max_new_tokens=8, temperature=1.0, seed=3)
    b = generate(tiny_model, prompts, max_new_tokens=8, temperature=1.0, seed=3)
    assert a == b
    nucleus = generate(tiny_model, prompts, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=4)
    assert nucleus == generate(tiny_model, prompts, max_new_tokens=8)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.8, g)) for _ in range(300)}
    assert draws == {0, 1}


def test_loglikelihood_equals_the_log_softmax_of_a_full_forward(tiny_model):
    ctx, cont = [5, 6, 7, 8], [9, 10, 11]
    ((score, greedy),) = loglikelihood(tiny_model, [(ctx, cont)])
    with torch.no_grad():
        logp = F.log_softmax(tiny_model(torch.tensor([ctx + cont]))[0], dim=-1)
    expected = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    assert score == pytest.approx(expected, abs=1e-4)
    assert greedy is False or all(
        int(logp[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont)
    )


def test_loglikelihood_flags_the_greedy_continuation_and_chains(tiny_model):
    ctx = [5, 17, 99, 3]
    greedy = naive_greedy(tiny_model, ctx, 4)
    other = [(greedy[0] + 1) % 256] + greedy[1:]
    (lp_g, is_g), (lp_o, is_o) = loglikelihood(tiny_model, [(ctx, greedy), (ctx, other)])
    assert is_g and not is_o and lp_g > lp_o
    (a, _), (b, _) = loglikelihood(tiny_model, [(ctx, greedy[:2]), (ctx + greedy[:2], greedy[2:])])
    assert lp_g == pytest.approx(a + b, abs=1e-4)  # chain rule


def test_loglikelihood_does_not_depend_on_batching(tiny_model):
    pairs = [([1, 2, 3], [4]), ([9] * 12, [8, 7]), ([5], [6, 7, 8, 9]), ([3, 3], [3])]
    one = loglikelihood(tiny_model, pairs, batch_size=1)
    many = loglikelihood(tiny_model, pairs, batch_size=3)
    for (a, ga), (b, gb) in zip(one, many, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    with pytest.raises(ValueError):
        loglikelihood(tiny_model, [([], [1])])


def test_prepacked_weights_give_the_same_batched_generation(tiny_model):
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11], [200, 201], [4, 4, 4, 4]]
    plain = generate(tiny_model, prompts, max_new_tokens=10)
    tiny_model.prepack(len(prompts))
    try:
        if torch.backends.mkldnn.is_available():
            assert tiny_model.blocks[0].attn.wqkv._packed is not None
        assert generate(tiny_model, prompts, max_new_tokens=10) == plain
        assert "_head_packed" not in str(tiny_model.state_dict().keys())
        # Training never goes through the packed copies (they have no backward).
        tiny_model(torch.tensor([[1, 2, 3]])).sum().backward()
        assert tiny_model.blocks[0].attn.wqkv.weight.grad is not None
    finally:
        tiny_model.zero_grad(set_to_none=True)
        tiny_model.prepack(None)
    assert tiny_model.blocks[0].attn.wqkv._packed is None

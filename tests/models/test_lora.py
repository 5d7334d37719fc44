"""LoRA behind the weight seam: the wrapper's arithmetic, merging, gradients through frozen
bases without a backward of their own, and PEFT-layout adapters that ``peft`` loads onto the
Hugging Face version of the same model with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.afm import AFM, config_from_preset
from models.formats import hf_llama_config, hf_state_dict
from models.linear import Int4Linear, Linear
from models.lora import (
    LoRALinear,
    adapters_disabled,
    apply_lora,
    load_adapter,
    lora_parameters,
    merge_lora,
    save_adapter,
)
from models.train import TrainConfig, train

TOKENS = torch.tensor([[5, 17, 99, 3, 42, 7, 200, 11], [1, 2, 3, 4, 5, 6, 7, 8]])


def randomize_adapters(model: AFM, seed: int = 1, std: float = 0.05) -> None:
    """B starts at zero (the adapter is a no-op); tests want one that changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def llama_model(seed: int = 0) -> AFM:
    """The tiny preset as a plain Llama (no q/k norm), so transformers can run it too."""
    return AFM(config_from_preset("tiny", qk_norm=False)).init_weights(seed=seed).eval()


@torch.no_grad()
def logits(model: AFM) -> torch.Tensor:
    return model(TOKENS)


def test_a_new_adapter_starts_exactly_at_the_base(tiny_model):
    before = logits(tiny_model)
    apply_lora(tiny_model, rank=4, alpha=8)
    torch.testing.assert_close(logits(tiny_model), before, rtol=0, atol=0)


def test_forward_and_effective_weight_are_w_plus_scaled_ba_also_for_a_slice_of_rows():
    torch.manual_seed(0)
    base = Linear(16, 12)
    lora = LoRALinear(base, rank=3, alpha=6.0)
    torch.nn.init.normal_(lora.lora_B)
    x = torch.randn(5, 16)
    w = base.weight.detach() + 2.0 * lora.lora_B.detach() @ lora.lora_A.detach()
    torch.testing.assert_close(lora.effective_weight(), w)
    torch.testing.assert_close(lora(x), x @ w.T)
    torch.testing.assert_close(lora(x, rows=slice(4, 10)), x @ w[4:10].T)


def test_merging_gives_the_unmerged_outputs_and_a_plain_model(tiny_model):
    apply_lora(tiny_model, rank=4, alpha=8)
    randomize_adapters(tiny_model)
    unmerged = logits(tiny_model)
    with adapters_disabled(tiny_model):
        base = logits(tiny_model)
    assert (unmerged - base).abs().max() > 1e-3  # the adapter does something
    merge_lora(tiny_model)
    torch.testing.assert_close(logits(tiny_model), unmerged, rtol=1e-5, atol=1e-5)
    fresh = AFM(tiny_model.cfg)
    assert set(tiny_model.state_dict()) == set(fresh.state_dict())


def test_disabling_adapters_gives_the_base_and_changes_the_version(tiny_model):
    base = logits(tiny_model)
    (first, *_) = apply_lora(tiny_model, rank=2, alpha=2)
    randomize_adapters(tiny_model)
    on = first.version()
    with adapters_disabled(tiny_model):
        torch.testing.assert_close(logits(tiny_model), base, rtol=0, atol=0)
        assert first.version() != on
    assert first.version() == on


def test_an_optimizer_step_on_the_adapter_changes_the_version_and_leaves_the_base():
    lora = LoRALinear(Linear(8, 8), rank=2, alpha=4)
    before, base_before = lora.version(), lora.base.weight.detach().clone()
    opt = torch.optim.SGD(lora_parameters(lora), lr=0.1)
    lora(torch.randn(3, 8)).square().sum().backward()
    opt.step()
    assert lora.version() != before
    torch.testing.assert_close(lora.base.weight.detach(), base_before, rtol=0, atol=0)


def test_gradients_through_a_prepacked_frozen_base_match_the_plain_ones(tiny_model):
    # oneDNN's packed matmul has no backward: without care, the gradient to earlier layers'
    # adapters silently vanishes once the model is prepacked for inference.
    apply_lora(tiny_model, rank=4, alpha=8)
    randomize_adapters(tiny_model)

    def grads():
        for p in lora_parameters(tiny_model):
            p.grad = None
        tiny_model(TOKENS).logsumexp(-1).sum().backward()
        return [p.grad.clone() for p in lora_parameters(tiny_model)]

    plain = grads()
    tiny_model.prepack(8)
    packed = grads()
    tiny_model.prepack(None)
    for a, b in zip(plain, packed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in plain)


def test_an_int4_base_trains_its_adapter_and_merges_to_a_dense_weight():
    torch.manual_seed(0)
    source = Linear(64, 32)
    lora = LoRALinear(Int4Linear(source), rank=4, alpha=4)
    torch.nn.init.normal_(lora.lora_B)
    x = torch.randn(6, 64, requires_grad=True)
    y = lora(x)
    y.float().sum().backward()
    w = lora.effective_weight()
    torch.testing.assert_close(x.grad, torch.ones(6, 32) @ w, rtol=2e-2, atol=2e-2)
    assert lora.lora_A.grad is not None and lora.lora_B.grad is not None
    merged = lora.merge()
    assert isinstance(merged, Linear)
    torch.testing.assert_close(merged(x.detach()), y.detach().float(), rtol=2e-2, atol=2e-2)


def test_training_through_the_loop_moves_only_the_adapters(tiny_model):
    apply_lora(tiny_model, rank=4, alpha=8, targets=("wqkv", "w2"))
    frozen = {n: p.detach().clone() for n, p in tiny_model.named_parameters() if "lora" not in n}
    data = torch.randint(0, 256, (8, 12))

    def loss_fn(idx):
        rows = data[idx]
        logits = tiny_model(rows[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())

    cfg = TrainConfig(lr=1e-2, batch_size=4, epochs=2, device="cpu", warmup_ratio=0.0)
    state = train(tiny_model, loss_fn, len(data), cfg)
    assert state.step == 4
    for n, p in tiny_model.named_parameters():
        if n in frozen:
            torch.testing.assert_close(p.detach(), frozen[n], rtol=0, atol=0)
    assert any(p.detach().abs().sum() > 0 for p in lora_parameters(tiny_model)[1::2])


# ------------------------------------------------------------------------- PEFT layout
def test_saved_adapter_has_peft_key_names_and_loads_back_equal(tiny_model, tmp_path):
    apply_lora(tiny_model, rank=4, alpha=8)
    randomize_adapters(tiny_model)
    expected = logits(tiny_model)
    save_adapter(tiny_model, tmp_path, base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
    hd, kv = tiny_model.cfg.head_dim, tiny_model.cfg.n_kv_heads
    assert tensors[key].shape == (kv * hd, 4)
    assert len(tensors) == 2 * 7 * tiny_model.cfg.n_layers
    fresh = AFM(tiny_model.cfg).init_weights(seed=0).eval()
    wrappers = load_adapter(fresh, tmp_path)
    assert all(w.rank == 4 for w in wrappers)  # shared A: back at rank r, not 3r
    torch.testing.assert_close(logits(fresh), expected, rtol=1e-5, atol=1e-5)


def test_independent_peft_adapters_on_q_and_v_load_as_an_exact_fused_adapter(tmp_path):
    # PEFT's default Llama targets are q_proj and v_proj, each with its own A: a fused
    # adapter of rank r_q + r_v with a block-diagonal B (k's rows zero) is the same update.
    model = llama_model()
    cfg, g = model.cfg, torch.Generator().manual_seed(3)
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    tensors, deltas = {}, []
    for i in range(cfg.n_layers):
        pre = f"base_model.model.model.layers.{i}.self_attn."
        A_q, B_q = torch.randn(2, cfg.dim, generator=g), torch.randn(q, 2, generator=g)
        A_v, B_v = torch.randn(3, cfg.dim, generator=g), torch.randn(kv, 3, generator=g)
        tensors |= {
            pre + "q_proj.lora_A.weight": A_q,
            pre + "q_proj.lora_B.weight": B_q,
            pre + "v_proj.lora_A.weight": A_v,
            pre + "v_proj.lora_B.weight": B_v,
        }
        # alpha 4: q (rank 2) scales by 2; v (rank 3, alpha_pattern 6) by 2 as well
        deltas.append(torch.cat((2 * B_q @ A_q, torch.zeros(kv, cfg.dim), 2 * B_v @ A_v)))
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "alpha_pattern": {"v_proj": 6}}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    wrappers = load_adapter(model, tmp_path)
    assert [w.rank for w in wrappers] == [5] * cfg.n_layers
    for wrapper, delta in zip(wrappers, deltas, strict=True):
        torch.testing.assert_close(wrapper.delta(), delta, rtol=1e-5, atol=1e-4)


HF_META = ("model_type", "architectures")  # config.json fields, not LlamaConfig arguments


def _hf_llama(model: AFM):
    """transformers' LlamaForCausalLM with ``model``'s weights (q/k/v and gate/up split)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.cfg
    fields = {k: v for k, v in hf_llama_config(cfg).items() if k not in HF_META}
    hf = LlamaForCausalLM(LlamaConfig(**{**fields, "tie_word_embeddings": True}))
    out = hf_state_dict(model.state_dict(), cfg)
    missing, unexpected = hf.load_state_dict(out, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    return hf.eval()


def test_peft_loads_the_adapter_onto_a_hugging_face_llama_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    model = llama_model()
    hf = _hf_llama(model)
    torch.testing.assert_close(hf(TOKENS).logits, logits(model), rtol=1e-4, atol=1e-4)
    apply_lora(model, rank=4, alpha=8)
    randomize_adapters(model, std=0.2)
    save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=TOKENS).logits
    ours = logits(model)
    with adapters_disabled(model):
        assert (ours - logits(model)).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_peft_on_smollm2_matches_our_model_with_the_adapter(
    smollm2_checkpoint, hf_smollm2, tmp_path
):
    peft = pytest.importorskip("peft")
    from models.checkpoint import load_checkpoint

    model = load_checkpoint(smollm2_checkpoint)  # a fresh copy: the session's stays clean
    apply_lora(model, rank=8, alpha=16)
    randomize_adapters(model, std=0.02)
    save_adapter(model, tmp_path, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    ids = torch.tensor([hf_smollm2.tokenizer.encode("The capital of France is Paris, and")])
    peft_model = peft.PeftModel.from_pretrained(hf_smollm2.model, tmp_path).eval()
    try:
        with torch.no_grad():
            theirs = peft_model(input_ids=ids).logits
            ours = model(ids)
            with adapters_disabled(model):
                base = model(ids)
    finally:
        peft_model.unload()  # the session's HF model without adapter layers again
    assert (ours - base).abs().max() > 0.1
    torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=2e-3)

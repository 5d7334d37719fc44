"""AFM's compression recipe (models/compress.py): per-layer sensitivity, bit allocation by
knapsack, the distillation recovery adapter and the held-out distribution gap, on the tiny
config."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from models.afm import AFM
from models.compress import (
    LayerSensitivity,
    assemble,
    calibrate,
    choose_bits,
    distribution_gap,
    layer_sensitivity,
    palettize_variants,
)
from models.lora import LoRALinear, adapters_disabled, apply_lora
from models.palette import palette_bits
from models.palettize import PalettizedLinear, palettize_model, scheme
from models.recovery import adapter_bytes, init_from_error, topk_kl, train_recovery_adapter
from models.train import TrainConfig


def _ids(seed: int, rows: int = 4, T: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (rows, T), generator=torch.Generator().manual_seed(seed))


def _kl(ref: torch.Tensor, model: AFM, ids: torch.Tensor) -> float:
    with torch.no_grad():
        lp = model(ids).float().log_softmax(-1).flatten(0, 1)
    return float((ref.exp() * (ref - lp)).sum() / ref.shape[0])


def _peaked(model: AFM) -> AFM:
    """The tiny model with larger weights, so its next-token distributions are far from
    uniform and compression visibly moves them (random init at std 0.02 is nearly flat)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(4.0)
    return model


# --------------------------------------------------------------------------- sensitivity
def test_sensitivity_is_the_kl_increase_of_one_layer_at_2_bits_over_all_at_4(tiny_model):
    model = _peaked(tiny_model)
    ids = _ids(0)
    with torch.no_grad():
        before = model(ids)
    table = layer_sensitivity(model, ids, baseline="palettized", embedding=True)
    names = [
        f"blocks.{i}.{p}" for i in range(2) for p in ("attn.wqkv", "attn.wo", "mlp.w13", "mlp.w2")
    ]
    assert [r.name for r in table] == [*names, "tok_emb"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=0, atol=0)  # left as it was
    ref = before.float().log_softmax(-1).flatten(0, 1)
    calibration = calibrate(model, [ids])
    all4 = copy.deepcopy(model)
    palettize_model(all4, embedding_bits=4, calibration=calibration)
    base = _kl(ref, all4, ids)
    for row in (table[0], table[5], table[-1]):  # a first-block, a later-block, the embedding
        one = copy.deepcopy(model)
        palettize_model(one, {row.name: 2}, embedding_bits=4, calibration=calibration)
        torch.testing.assert_close(row.kl[2], _kl(ref, one, ids) - base, rtol=1e-4, atol=1e-7)
        assert row.kl[4] == 0.0 and row.bits == (4, 2)
        assert row.bytes == {b: palette_bits(row.shape, b) // 8 for b in (4, 2)}
    assert all(r.kl[2] > 0 for r in table)  # 2-bit everywhere costs something here


def test_sensitivity_by_default_measures_one_layer_palettized_among_dense_ones(tiny_model):
    model = _peaked(tiny_model)
    ids = _ids(1)
    table = layer_sensitivity(model, ids)  # fp32 baseline: the default
    assert len(table) == 8  # no embedding row unless asked
    with torch.no_grad():
        ref = model(ids).float().log_softmax(-1).flatten(0, 1)
    low = copy.deepcopy(model)
    palettize_model(low, default_bits=2, calibration=calibrate(model, [ids]))
    one = copy.deepcopy(model)
    one.blocks[1].mlp.w13 = low.blocks[1].mlp.w13
    row = next(r for r in table if r.name == "blocks.1.mlp.w13")
    torch.testing.assert_close(row.kl[2], _kl(ref, one, ids), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------- allocation
def _row(name: str, shape: tuple[int, int], kl: dict[int, float]) -> LayerSensitivity:
    bits = tuple(sorted(kl, reverse=True))
    sizes = {b: palette_bits(shape, b) // 8 for b in bits}
    return LayerSensitivity(name, shape, bits, sizes, kl, 0.0)


def _brute_force(table, target):
    best = None
    for choice in itertools.product(*(r.bits for r in table)):
        total = sum(8 * r.bytes[b] for r, b in zip(table, choice, strict=True))
        if total > target * sum(r.shape[0] * r.shape[1] for r in table):
            continue
        cost = sum(r.kl[b] for r, b in zip(table, choice, strict=True))
        best = cost if best is None or cost < best else best
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("target", [2.3, 2.9, 3.5, 3.9])
def test_choose_bits_meets_the_target_with_the_least_predicted_kl(seed, target):
    """Against every assignment of a hand-made table: shapes of different sizes (short last
    groups too), and three options per row in half the cases (multiple-choice)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 48), (50, 33), (128, 96), (33, 17), (96, 64), (16, 200), (80, 40)]
    table = []
    for i, shape in enumerate(shapes):
        kl = {4: 0.0, 2: float(torch.rand(1, generator=g))}
        if seed % 2:
            kl[3] = kl[2] * float(torch.rand(1, generator=g))
        table.append(_row(f"l{i}", shape, kl))
    chosen = choose_bits(table, target)
    assert chosen.bpw <= target
    weights = sum(r.shape[0] * r.shape[1] for r in table)
    assert chosen.bpw == sum(8 * r.bytes[chosen.bits[r.name]] for r in table) / weights
    assert chosen.kl == pytest.approx(sum(r.kl[chosen.bits[r.name]] for r in table))
    assert chosen.kl == pytest.approx(_brute_force(table, target))


def test_choose_bits_beats_a_greedy_by_kl_per_bit_saved():
    """Greedy by KL per bit saved takes "a" (cheapest per bit), then needs one more layer and
    takes "big" (next cheapest per bit): 1.15. The optimum is "a" and "b": 1.0."""
    table = [
        _row("big", (256, 64), {4: 0.0, 2: 1.05}),
        _row("a", (128, 64), {4: 0.0, 2: 0.1}),
        _row("b", (128, 64), {4: 0.0, 2: 0.9}),
        _row("keep", (512, 64), {4: 0.0, 2: 100.0}),
    ]
    weights = sum(r.shape[0] * r.shape[1] for r in table)
    bpw_all4 = sum(8 * r.bytes[4] for r in table) / weights
    saved_small = 8 * (table[1].bytes[4] - table[1].bytes[2]) / weights  # half of big's
    chosen = choose_bits(table, bpw_all4 - 1.5 * saved_small)
    assert chosen.bits == {"big": 4, "a": 2, "b": 2, "keep": 4}
    assert chosen.kl == pytest.approx(1.0)
    target = bpw_all4 - 2.5 * saved_small  # a and b no longer reach it: big and a
    chosen = choose_bits(table, target)
    assert chosen.bits == {"big": 2, "a": 2, "b": 4, "keep": 4}
    assert chosen.kl == pytest.approx(_brute_force(table, target))


def test_choose_bits_gives_the_defaults_above_them_and_refuses_the_unreachable():
    table = [_row("a", (64, 64), {4: 0.0, 2: 0.5}), _row("b", (64, 32), {4: 0.0, 2: 0.1})]
    assert choose_bits(table, 4.5).bits == {"a": 4, "b": 4}
    with pytest.raises(ValueError, match="out of reach"):
        choose_bits(table, 1.5)


def test_allocation_bpw_is_what_palettize_reports_and_assemble_is_palettize_model(tiny_model):
    ids = _ids(2)
    calibration = calibrate(tiny_model, [ids])
    variants = palettize_variants(tiny_model, (4, 2), embedding=True, calibration=calibration)
    table = layer_sensitivity(tiny_model, ids, embedding=True, variants=variants)
    chosen = choose_bits(table, 3.5)
    assert 3.0 < chosen.bpw <= 3.5 and set(chosen.bits.values()) == {2, 4}
    direct = copy.deepcopy(tiny_model)
    reports = palettize_model(direct, chosen.bits, calibration=calibration)
    assert scheme(reports)["bpw"] == chosen.bpw
    assert scheme(reports)["bits"] == chosen.bits
    mixed = assemble(variants, chosen.bits)
    assert mixed.state_dict().keys() == direct.state_dict().keys()
    for name, tensor in mixed.state_dict().items():
        assert torch.equal(tensor, direct.state_dict()[name]), name
    with torch.no_grad():
        torch.testing.assert_close(mixed(ids), direct(ids), rtol=0, atol=0)
        before = variants[4].model(ids)
    assert isinstance(variants[4].model.blocks[0].attn.wqkv, PalettizedLinear)
    assert variants[4].model.blocks[0].attn.wqkv.bits == 4  # the variants are left alone
    with torch.no_grad():
        torch.testing.assert_close(variants[4].model(ids), before, rtol=0, atol=0)


# ------------------------------------------------------------------------------ recovery
def test_topk_kl_is_exact_with_one_token_left_and_a_lower_bound_below():
    g = torch.Generator().manual_seed(0)
    p = (torch.randn(5, 40, generator=g) * 2).log_softmax(-1)
    q = (torch.randn(5, 40, generator=g) * 2).log_softmax(-1)
    full = (p.exp() * (p - q)).sum(-1)
    for k, exact in ((39, True), (8, False)):
        top_lp, top_ids = p.topk(k, dim=-1)
        tail = p.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
        kl = topk_kl(q, top_lp, top_ids, tail)
        if exact:
            torch.testing.assert_close(kl, full)
        else:
            assert (kl <= full + 1e-6).all() and (kl > 0).all()


def _text(seed: int, rows: int = 8, T: int = 24):
    """Batches of two rows, the first few tokens of each row a prompt (not counted) and one
    row right-padded, as pack_completions makes them."""
    ids = _ids(seed, rows, T)
    mask = torch.ones(rows, T, dtype=torch.bool)
    mask[:, :4] = False
    ids[1, -5:], mask[1, -5:] = 0, False
    return [(ids[i : i + 2], mask[i : i + 2]) for i in range(0, rows, 2)]


def test_recovery_adapter_brings_the_palettized_model_closer_to_the_original(tiny_model):
    original = _peaked(tiny_model)
    train_text, held_out = _text(3), _text(4)
    compressed = copy.deepcopy(original)
    palettize_model(compressed, default_bits=2, calibration=calibrate(original, [_ids(5)]))
    buffers = {n: b.clone() for n, b in compressed.named_buffers() if "packed" in n}
    before = distribution_gap(original, compressed, held_out)
    config = TrainConfig(lr=3e-3, batch_size=4, epochs=6, warmup_ratio=0.0, weight_decay=0.0)
    recovery = train_recovery_adapter(compressed, original, train_text, config, rank=8)
    assert len(recovery.metrics) == 12 and recovery.metrics[-1]["step"] == 12
    assert recovery.metrics[-1]["loss"] < recovery.metrics[0]["loss"]
    after = distribution_gap(original, compressed, held_out)
    assert after["kl"] < before["kl"]
    with adapters_disabled(compressed):  # the base is untouched: the same gap as before
        assert distribution_gap(original, compressed, held_out)["kl"] == before["kl"]
    for name, b in compressed.named_buffers():
        if "packed" in name:
            assert torch.equal(b, buffers[name.replace(".base", "")])
    wrappers = [m for m in compressed.modules() if isinstance(m, LoRALinear)]
    assert len(wrappers) == 8 and all(isinstance(m.base, PalettizedLinear) for m in wrappers)
    for m in wrappers:  # what a 16-bit adapter computes
        assert torch.equal(m.lora_B, m.lora_B.half().float()) and m.lora_B.abs().sum() > 0
    assert recovery.adapter_bytes == adapter_bytes(wrappers)
    assert recovery.adapter_bytes == 2 * sum(m.lora_A.numel() + m.lora_B.numel() for m in wrappers)


def test_error_init_starts_the_adapter_at_the_layers_best_low_rank_correction(tiny_model):
    """Rank r: the correction removes the top-r share of each layer's weighted error, and
    the model starts closer to the original than the palettized base; at full rank it is
    the original's weight exactly (up to fp32)."""
    original = _peaked(tiny_model)
    calibration = calibrate(original, [_ids(5)])
    held_out = _text(4)
    compressed = copy.deepcopy(original)
    palettize_model(compressed, default_bits=2, calibration=calibration)
    before = distribution_gap(original, compressed, held_out)["kl"]
    wrappers = apply_lora(compressed, rank=4, alpha=8.0)
    removed = init_from_error(wrappers, compressed, original, calibration)
    assert len(removed) == len(wrappers) == 8 and all(0.0 < r < 1.0 for r in removed)
    assert distribution_gap(original, compressed, held_out)["kl"] < before

    full = copy.deepcopy(original)
    palettize_model(full, default_bits=2, calibration=calibration)
    wrappers = apply_lora(full, rank=64, alpha=64.0)  # ≥ every layer's smaller side
    wide = calibrate(original, [_ids(6, rows=16)])  # more tokens than any input width
    removed = init_from_error(wrappers, full, original, wide, damp=0.0)
    assert all(r > 1 - 1e-9 for r in removed)
    reference = dict(original.named_modules())
    for name, m in full.named_modules():
        if isinstance(m, LoRALinear):
            torch.testing.assert_close(
                m.effective_weight(), reference[name].effective_weight(), atol=1e-4, rtol=0
            )
    with pytest.raises(ValueError, match="init must be"):
        train_recovery_adapter(full, original, held_out, TrainConfig(), init="svd")


# ---------------------------------------------------------------------------- evaluation
def test_distribution_gap_counts_only_marked_tokens_as_the_quality_benchmark(tiny_model):
    """Against benchmarks/palettize_quality.py's definitions on one sequence: the positions
    from the first answer token's predecessor on, KL of the original's distribution."""
    original = _peaked(tiny_model)
    other = copy.deepcopy(original)
    palettize_model(other, default_bits=2)
    ids = _ids(6, rows=1, T=20)
    start = 7
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, start:] = True
    gap = distribution_gap(original, other, [(ids, mask)])
    with torch.no_grad():
        ref = original(ids)[0, start - 1 : -1].float().log_softmax(-1)
        lp = other(ids)[0, start - 1 : -1].float().log_softmax(-1)
    target = ids[0, start:, None]
    assert gap["tokens"] == 20 - start
    torch.testing.assert_close(gap["kl"], float((ref.exp() * (ref - lp)).sum() / 13))
    assert gap["top1"] == float((lp.argmax(-1) == ref.argmax(-1)).sum()) / 13
    close = {"rtol": 1e-5, "atol": 0.0}  # fp32 log-probs summed in another order
    torch.testing.assert_close(gap["ppl"], float((-lp.gather(1, target).mean()).exp()), **close)
    ppl = float((-ref.gather(1, target).mean()).exp())
    torch.testing.assert_close(gap["ppl_original"], ppl, **close)
    same = distribution_gap(original, original, [(ids, mask)])
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1"] == 1.0


def test_calibration_records_the_fisher_and_leaves_the_model_as_it_was(tiny_model):
    tiny_model.blocks[0].attn.wqkv.weight.requires_grad_(False)  # a caller's own choice
    wanted = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    calibration = calibrate(tiny_model, [_ids(0, rows=1), _ids(1, rows=1)])
    fisher = calibration.fisher("blocks.0.mlp.w2")
    w = tiny_model.blocks[0].mlp.w2.effective_weight()
    assert fisher is not None and fisher.shape == w.shape and bool((fisher > 0).all())
    assert {n: p.requires_grad for n, p in tiny_model.named_parameters()} == wanted
    assert all(p.grad is None for p in tiny_model.parameters())
    assert calibrate(tiny_model, [_ids(0, rows=1)], gradients=False).fisher("lm_head") is None


def test_calibration_fisher_is_the_next_token_losss_squared_gradients(tiny_model):
    """The Fisher the calibration writes (its gradient entering at the embedding's output,
    the loss's gradient written by hand) equals E[(g x)²] from autograd's own cross-entropy
    backward through the whole model; without ``head`` the head is not measured and the
    blocks' statistics are the same."""
    ids = _ids(3, rows=2)
    seen: dict[str, torch.Tensor] = {}
    w2 = tiny_model.blocks[1].mlp.w2

    def keep(module, args, out):
        seen["x"] = args[0].detach().reshape(-1, args[0].shape[-1])
        out.retain_grad()
        seen["out"] = out

    handle = w2.register_forward_hook(keep)
    try:
        logits = tiny_model(ids)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    finally:
        handle.remove()
        tiny_model.zero_grad(set_to_none=True)
    g = seen["out"].grad.reshape(-1, seen["out"].shape[-1])
    want = g.square().T @ seen["x"].square() / g.shape[0]
    calibration = calibrate(tiny_model, [ids])
    torch.testing.assert_close(calibration.fisher("blocks.1.mlp.w2"), want, rtol=1e-4, atol=1e-12)
    assert calibration.fisher("lm_head") is not None
    without = calibrate(tiny_model, [ids], head=False)
    assert without.fisher("lm_head") is None and without.hessian("lm_head") is None
    torch.testing.assert_close(without.fisher("blocks.1.mlp.w2"), want, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(
        without.hessian("blocks.0.attn.wqkv"), calibration.hessian("blocks.0.attn.wqkv")
    )

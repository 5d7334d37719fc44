"""Palettization (models/palettize.py): the primitives' round-trip error and accounting, the
runtime module behind the weight seam, and the compressed checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from models import native
from models.afm import AFM, config_from_preset
from models.checkpoint import load_checkpoint, save_checkpoint, save_palettized
from models.generate import generate
from models.palette import (
    assign_with_feedback,
    bits_per_weight,
    dequantize,
    kmeans_tables,
    pack_indices,
    palette_bits,
    palettize_weight,
    unpack_indices,
)
from models.palettize import (
    Calibration,
    PalettizedEmbedding,
    PalettizedLinear,
    palettize_model,
    scheme,
)

needs_native = pytest.mark.skipif(native.load("palette") is None, reason="no C compiler here")

# (rows, columns, seed): multiples of 16 rows and not, odd column counts, one short group only
SHAPES = [(64, 48, 0), (50, 33, 1), (7, 20, 2), (128, 96, 3), (33, 17, 4), (96, 64, 5)]


def _output_error(w: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> float:
    d = approx - w
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum())


@pytest.mark.parametrize("native", [True, False], ids=["c", "torch"])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("rows,cols,seed", SHAPES)
def test_round_trip_error_is_bounded_by_the_table_spacing(rows, cols, seed, bits, native):
    """Every weight is within half the widest gap of its group's sorted table (plus the fp16
    rounding of the entries), and the relative error shrinks as expected with the bits."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(1, generator=g) * 0.1
    palette = kmeans_tables(w, bits, native_kmeans=native)
    approx = dequantize(*palette)
    assert approx.shape == w.shape and palette.tables.shape == (-(-rows // 16), 2**bits)
    tables = palette.tables.float()
    gaps = (tables[:, 1:] - tables[:, :-1]).amax(1)  # (G,)
    outside = torch.maximum(w - tables[:, -1:].repeat_interleave(16, 0)[:rows], w * 0)
    outside = torch.maximum(outside, tables[:, :1].repeat_interleave(16, 0)[:rows] - w)
    bound = (gaps / 2).repeat_interleave(16)[:rows, None] + outside + 1e-3 * w.abs().max()
    assert ((approx - w).abs() <= bound).all()
    # k-means on Gaussian weights: 4 bits ~0.1, 2 bits ~0.35 relative RMS error
    assert float((approx - w).norm() / w.norm()) < {4: 0.15, 2: 0.45}[bits]


@pytest.mark.parametrize("rows,cols,seed", SHAPES)
def test_error_feedback_lowers_the_output_error_under_correlated_inputs(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(4 * cols, cols, generator=g) @ mix  # correlated inputs
    h = x.T @ x / x.shape[0]
    plain = kmeans_tables(w, 4, h.diagonal())
    fed = assign_with_feedback(w, plain, h)
    assert _output_error(w, dequantize(*fed), h) < _output_error(w, dequantize(*plain), h)


@needs_native
@pytest.mark.parametrize("rounds", [1, 2])
def test_the_c_feedback_loop_rounds_as_the_torch_loop(rounds):
    """palette.c's per-row block loop chooses the same indices and tables as the column loop
    in torch, over several lazy blocks (300 columns: 128 + 128 + 44) and a table refit."""
    g = torch.Generator().manual_seed(rounds)
    w = torch.randn(50, 300, generator=g)
    x = torch.randn(600, 300, generator=g) @ (
        torch.randn(300, 300, generator=g) / 17 + torch.eye(300)
    )
    h = x.T @ x / 600
    plain = kmeans_tables(w, 4, h.diagonal())
    fast = assign_with_feedback(w, plain, h, rounds=rounds)
    slow = assign_with_feedback(w, plain, h, rounds=rounds, native_loop=False)
    assert (fast.indices == slow.indices).float().mean() > 0.999
    torch.testing.assert_close(fast.tables.float(), slow.tables.float(), atol=2e-3, rtol=0)
    assert _output_error(w, dequantize(*fast), h) < _output_error(w, dequantize(*plain), h)


def test_importance_buys_accuracy_where_it_is_large():
    """Two important columns spread over [4, 6], away from the bulk: weighted k-means spends
    entries there, plain k-means barely one."""
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    w[:, :2] = 4 + 2 * torch.rand(32, 2)
    importance = torch.ones(64)
    importance[:2] = 100.0
    weighted = dequantize(*kmeans_tables(w, 4, importance))
    uniform = dequantize(*kmeans_tables(w, 4))
    assert (weighted - w)[:, :2].norm() < 0.5 * (uniform - w)[:, :2].norm()


def _exact_kmeans_error(x: torch.Tensor, w: torch.Tensor, clusters: int) -> float:
    """The weighted 1-D k-means optimum by dynamic programming over sorted points (clusters
    of an optimal solution are runs of consecutive points): O(clusters · P²), small P."""
    order = x.double().argsort()
    xs, ws = x.double()[order], w.double()[order]
    zero = torch.zeros(1, dtype=torch.float64)
    W, S, Q = (torch.cat([zero, t.cumsum(0)]) for t in (ws, ws * xs, ws * xs * xs))
    n = len(xs)
    i, j = torch.triu_indices(n + 1, n + 1, 1)
    cost = torch.full((n + 1, n + 1), torch.inf, dtype=torch.float64)
    dw = W[j] - W[i]
    cost[i, j] = (Q[j] - Q[i] - (S[j] - S[i]) ** 2 / dw.clamp(min=1e-300)).clamp(min=0)
    best = cost[0]
    for _ in range(clusters - 1):
        best = (best[:, None] + cost).min(0).values
    return float(best[n])


@pytest.mark.parametrize("native", [True, False], ids=["c", "torch"])
def test_tables_come_within_a_few_percent_of_the_exact_weighted_optimum(native):
    """With heavy-tailed importance (squared gradients span many orders of magnitude), Lloyd
    alone stalls far from the optimum; the split/merge rounds bring every group's weighted
    error within 8% of the exact 1-D optimum."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 12, generator=g)
    importance = torch.randn(32, 12, generator=g).mul(3).exp()
    importance[:, :2] *= 1000
    gaps = {}
    for rounds in (0, 8):
        idx, tables = kmeans_tables(w, 4, importance, rounds=rounds, native_kmeans=native)
        approx = dequantize(idx, tables)
        ratios = []
        for r in range(0, 32, 16):
            rows = slice(r, r + 16)
            err = float((importance[rows] * (approx[rows] - w[rows]) ** 2).sum())
            exact = _exact_kmeans_error(w[rows].flatten(), importance[rows].flatten(), 16)
            ratios.append(err / exact)
        gaps[rounds] = max(ratios)
    assert gaps[8] < 1.08
    assert gaps[0] > 1.2  # the rounds are what closes the gap


def test_the_same_inputs_give_the_same_tables_bit_for_bit():
    torch.manual_seed(1)
    w, h = torch.randn(40, 24), torch.randn(100, 24).T.cov() + torch.eye(24)
    a, b = palettize_weight(w, 4, hessian=h), palettize_weight(w.clone(), 4, hessian=h.clone())
    assert torch.equal(a.tables, b.tables) and torch.equal(a.indices, b.indices)
    assert a.tables.dtype == torch.float16
    assert (a.tables.float().diff(dim=1) >= 0).all()  # sorted


@pytest.mark.parametrize("native", [True, False], ids=["c", "torch"])
def test_no_table_entry_is_left_empty_when_a_group_has_enough_distinct_values(native):
    w = torch.cat([torch.zeros(16, 30), torch.full((16, 2), 5.0)], dim=1)  # 2 values, 16 slots
    w[0, :16] = torch.linspace(-1, 1, 16)
    indices, tables = kmeans_tables(w, 4, native_kmeans=native)
    assert indices.unique().numel() == 16  # every entry serves some weight
    torch.testing.assert_close(dequantize(indices, tables)[0, :16], w[0, :16], atol=0.1, rtol=0)


@needs_native
@pytest.mark.parametrize("bits", [2, 4])
def test_the_c_kmeans_matches_the_torch_path_and_any_thread_count(bits):
    """The C kernel fits the same tables as the torch path to within rounding (it may end a
    group's rounds earlier or later; its weighted error is never more than 1% above), and the
    same tables bit for bit on one thread or two (groups are independent)."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(200, 96, generator=g)  # 13 groups, the last short
    importance = torch.randn(200, 96, generator=g).mul(2).exp()

    def error(palette) -> float:
        return float((importance * (dequantize(*palette) - w) ** 2).sum())

    fast = kmeans_tables(w, bits, importance)
    slow = kmeans_tables(w, bits, importance, native_kmeans=False)
    assert error(fast) <= 1.01 * error(slow)
    assert (fast.tables.float() - slow.tables.float()).abs().max() < 0.05 * w.abs().max()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if threads == 1 else 1)
        again = kmeans_tables(w, bits, importance)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(fast.tables, again.tables) and torch.equal(fast.indices, again.indices)


def test_without_a_compiler_the_tables_come_from_the_torch_path(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("EVALHUB_KERNEL_DIR", str(tmp_path / "kernels"))
    assert native.load("palette") is None
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(3))
    fallback, torch_path = kmeans_tables(w, 4), kmeans_tables(w, 4, native_kmeans=False)
    assert torch.equal(fallback.tables, torch_path.tables)
    assert torch.equal(fallback.indices, torch_path.indices)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("cols", [1, 7, 16, 33])
def test_pack_unpack_round_trips_and_packs_8_over_bits_per_byte(bits, cols):
    q = torch.randint(0, 2**bits, (5, cols), dtype=torch.uint8)
    packed = pack_indices(q, bits)
    assert packed.shape == (5, -(-cols * bits // 8)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_indices(packed, bits, cols), q)


def test_four_bit_indices_pack_low_nibble_first():
    assert pack_indices(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 4).tolist() == [[0x21, 3]]


def test_bits_per_weight_counts_indices_and_fp16_tables_exactly():
    # SmolLM2's wqkv at 4 bits: 960 x 576 indices, 60 tables of 16 fp16 entries.
    assert palette_bits((960, 576), 4) == 960 * 576 * 4 + 60 * 16 * 16
    assert bits_per_weight((960, 576), 4) == 4 + 16 * 16 / (16 * 576)
    # 50 rows: 4 tables, the last for 2 rows; 33 columns at 2 bits pad to 9 bytes a row
    assert palette_bits((50, 33), 2) == 50 * 9 * 8 + 4 * 4 * 16


def test_a_layer_with_a_short_last_group_is_compressed_and_reported(tiny_model):
    """hidden_dim 120: w13 has 240 rows (15 full groups), w2 64 rows over 120 columns; an odd
    vocabulary makes the embedding's last group short too."""
    torch.manual_seed(0)
    model = AFM(config_from_preset("tiny", hidden_dim=120, vocab_size=250)).init_weights(0)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    reports = palettize_model(model, {"blocks.1.mlp.w2": 2}, embedding_bits=2)
    by_name = {r.name: r for r in reports}
    assert len(reports) == 4 * model.cfg.n_layers + 1  # every projection and the embedding
    emb = by_name["tok_emb"]
    assert emb.shape == (250, 64) and emb.groups == 16 and emb.bits == 2  # 15 full + 10 rows
    assert emb.bytes * 8 == palette_bits((250, 64), 2)
    assert by_name["blocks.1.mlp.w2"].bits == 2 and by_name["blocks.0.mlp.w2"].bits == 4
    assert isinstance(model.tok_emb, PalettizedEmbedding)
    assert all(isinstance(p, PalettizedLinear) for p in model.projections()[:-1])
    approx = model.tok_emb.weight
    assert approx.shape == (250, 64)
    # the short group's rows are as well served as the others
    err = (approx - reference["tok_emb.weight"]).norm(dim=1) / reference["tok_emb.weight"].norm(
        dim=1
    )
    assert err[240:].mean() < 2 * err[:240].mean()


def test_palettized_layers_run_every_layout_through_the_seam(tiny_model):
    """Prompt passes, decoding steps, the prepacked copies and row slices all compute with
    the dequantized weight."""
    tokens = torch.randint(0, 256, (2, 10))
    palettize_model(tiny_model, embedding_bits=4)
    layer = tiny_model.blocks[0].attn.wqkv
    x = torch.randn(3, 64)
    w = layer.effective_weight()
    torch.testing.assert_close(layer(x), x @ w.T)
    torch.testing.assert_close(layer(x, rows=slice(8, 40)), x @ w[8:40].T)
    with torch.no_grad():
        logits = tiny_model(tokens)
        plain = generate(tiny_model, tokens.tolist(), max_new_tokens=6)
        tiny_model.prepack(2)
        torch.testing.assert_close(tiny_model(tokens), logits, rtol=1e-4, atol=1e-4)
        assert generate(tiny_model, tokens.tolist(), max_new_tokens=6) == plain


def test_gradients_flow_through_a_frozen_palettized_layer():
    torch.manual_seed(0)
    layer = PalettizedLinear.from_palette(kmeans_tables(torch.randn(32, 16), 4), 4)
    x = torch.randn(5, 16, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.effective_weight().sum(0).expand(5, 16))
    assert not list(layer.parameters())


def test_calibration_fits_layers_to_their_output_error(tiny_model):
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (4, 32))
    dense = {n: p.clone() for n, p in tiny_model.state_dict().items()}
    with torch.no_grad(), Calibration.of(tiny_model) as calibration:
        tiny_model(tokens)
    h = calibration.hessian("blocks.0.mlp.w2")
    assert h is not None and h.shape == (128, 128) and calibration.counts["lm_head"] == 128
    calibrated = palettize_model(tiny_model, calibration=calibration)
    blind = AFM(tiny_model.cfg)
    blind.load_state_dict(dense)
    uncalibrated = palettize_model(blind)
    assert [r.name for r in calibrated] == [r.name for r in uncalibrated]
    w = dense["blocks.0.mlp.w2.weight"]
    mine = tiny_model.blocks[0].mlp.w2.effective_weight()
    theirs = blind.blocks[0].mlp.w2.effective_weight()
    assert _output_error(w, mine, h) < _output_error(w, theirs, h)


def test_the_compressed_checkpoint_is_small_and_loads_to_the_same_logits(tiny_model, tmp_path):
    save_checkpoint(tmp_path / "dense", tiny_model.cfg, tiny_model.state_dict(), {"source": "t"})
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad(), Calibration.of(tiny_model) as calibration:
        tiny_model(tokens)
    reports = palettize_model(
        tiny_model, {"blocks.0.attn.wo": 2}, embedding_bits=4, calibration=calibration
    )
    weights = {**scheme(reports), "calibration_sha256": "abc"}
    out = save_palettized(tmp_path / "tiny-palettized", tiny_model, weights, tmp_path / "dense")
    dense_size = (tmp_path / "dense" / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size < 0.2 * dense_size
    meta = json.loads((out / "config.json").read_text())
    assert meta["weights"]["kind"] == "palettized"
    assert meta["weights"]["bits"]["blocks.0.attn.wo"] == 2
    assert meta["weights"]["bits"]["tok_emb"] == 4
    assert meta["weights"]["calibration_sha256"] == "abc"
    assert meta["parent"]["path"] == str((tmp_path / "dense").resolve())
    loaded = load_checkpoint(out)
    assert isinstance(loaded.blocks[0].attn.wo, PalettizedLinear)
    assert loaded.blocks[0].attn.wo.bits == 2
    with torch.no_grad():
        assert torch.equal(loaded(tokens), tiny_model(tokens))


def test_a_backward_pass_records_each_output_channels_gradient_and_weights_the_tables(
    tiny_model,
):
    tokens = torch.randint(0, 256, (2, 16))
    tiny_model.tok_emb.weight.requires_grad_(True)
    with Calibration.of(tiny_model) as calibration:
        logits = tiny_model(tokens)
        logits[..., :4].sum().backward()  # only four vocabulary rows matter to this loss
    rows = calibration.row_importance("lm_head")
    assert rows is not None and rows.shape == (256,)
    assert (rows[4:] == 0).all() and (rows[:4] > 0).all()
    r = calibration.row_importance("blocks.0.mlp.w13")
    assert r is not None and r.shape == (256,) and bool((r > 0).any())
    w = tiny_model.tok_emb.weight.detach()
    assert calibration.hessian("lm_head") is not None
    fisher = calibration.fisher("lm_head")
    assert fisher is not None and fisher.shape == w.shape
    assert (fisher[4:] == 0).all() and (fisher[:4] > 0).all()
    # the tables (no error feedback, which moves indices by the Hessian alone): with the four
    # rows that matter wider than the twelve that do not, the first group's entries serve them
    w = w.clone()
    w[:4] *= 4
    sensitive = dequantize(*palettize_weight(w, 2, row_importance=rows, fisher=fisher))
    blind = dequantize(*palettize_weight(w, 2))

    def loss(approx: torch.Tensor) -> float:  # the Fisher's second-order loss on those rows
        return float((fisher[:4] * (approx[:4] - w[:4]) ** 2).sum())

    assert loss(sensitive) < 0.9 * loss(blind)


def test_a_palettized_model_trains_lora_after_an_inference_mode_pass():
    """The shared dequantization buffer follows inference mode: evaluating under
    inference_mode, then training an adapter, must not trip over an inference tensor."""
    from models.lora import apply_lora

    model = AFM(config_from_preset("tiny")).init_weights(seed=0)
    palettize_model(model)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.inference_mode():
        model(ids)
    apply_lora(model, rank=2, alpha=4)
    loss = model(ids).float().logsumexp(-1).mean()
    loss.backward()
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)

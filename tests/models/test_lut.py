"""The lookup-table kernel (models/lut.py, lut.c): palettized matmuls straight from packed
indices, and the palettized model decoding through it."""

from __future__ import annotations

import pytest
import torch

from models import lut
from models.generate import generate
from models.palette import dequantize, kmeans_tables, pack_indices
from models.palettize import LUT_ROWS, PalettizedLinear, palettize_model

needs_kernel = pytest.mark.skipif(not lut.available(), reason="no vector lookup-table kernel here")


def random_palette(rows: int, cols: int, bits: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.uint8)
    tables = torch.randn(-(-rows // 16), 2**bits, generator=g).half()
    return indices, tables


@needs_kernel
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize(("rows", "cols"), [(33, 40), (16, 16), (96, 576), (7, 3), (33, 100)])
@pytest.mark.parametrize("n", [1, 3, 8, 11])
def test_kernel_equals_the_dequantized_matmul(bits, rows, cols, n):
    """Every width, odd row counts (a short last group, an unpaired last row), widths that
    are not a multiple of 16 (the tail loop) and row blocks of x below, at and above 8."""
    indices, tables = random_palette(rows, cols, bits, seed=rows * cols + n)
    x = torch.randn(n, cols)
    y = lut.lut_linear(x, pack_indices(indices, bits), lut.kernel_tables(tables), bits, 16)
    expected = x @ dequantize(indices, tables).T
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * cols**0.5)


@needs_kernel
def test_kernel_refuses_what_does_not_fit():
    indices, tables = random_palette(32, 64, 4, seed=0)
    packed, t16 = pack_indices(indices, 4), lut.kernel_tables(tables)
    with pytest.raises(ValueError, match="do not fit"):
        lut.lut_linear(torch.randn(2, 128), packed, t16, 4, 16)  # x wider than the matrix
    with pytest.raises(ValueError, match="-bit indices"):
        lut.lut_linear(torch.randn(2, 64), packed, t16, 3, 16)
    with pytest.raises(TypeError, match="fp32"):
        lut.lut_linear(torch.randn(2, 64).double(), packed, t16, 4, 16)


def test_narrow_tables_repeat_to_sixteen_entries():
    tables = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).half()
    assert lut.kernel_tables(tables).tolist() == [[1.0, 2.0, 3.0, 4.0] * 4]


@needs_kernel
def test_a_palettized_layer_decodes_through_the_kernel_and_keeps_no_dense_copy(monkeypatch):
    torch.manual_seed(0)
    layer = PalettizedLinear.from_palette(kmeans_tables(torch.randn(48, 80), 4), 4)
    layer.pack(1)
    assert layer._packed is None  # no fp32 copy: the model stays its packed size
    calls = []
    real = lut.lut_linear
    monkeypatch.setattr(lut, "lut_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    w = layer.effective_weight()
    with torch.no_grad():
        for n in (1, LUT_ROWS):
            x = torch.randn(n, 80)
            torch.testing.assert_close(layer(x), x @ w.T)
        assert len(calls) == 2
        x = torch.randn(LUT_ROWS + 1, 80)  # a prompt pass: dequantize and multiply
        torch.testing.assert_close(layer(x), x @ w.T)
        assert len(calls) == 2
    x = torch.randn(2, 80, requires_grad=True)  # a gradient wanted: the autograd path
    layer(x).sum().backward()
    assert len(calls) == 2 and x.grad is not None


@needs_kernel
def test_the_kernel_follows_an_in_place_change_of_the_tables():
    torch.manual_seed(1)
    layer = PalettizedLinear.from_palette(kmeans_tables(torch.randn(32, 32), 4), 4)
    x = torch.randn(1, 32)
    with torch.no_grad():
        before = layer(x)
        layer.tables.mul_(2)
        torch.testing.assert_close(layer(x), 2 * before)


@needs_kernel
def test_a_palettized_model_generates_the_same_tokens_with_and_without_the_kernel(
    tiny_model, monkeypatch
):
    """Greedy decoding through the kernel (block projections and the tied head on the
    palettized embedding) picks the tokens the dequantizing path picks."""
    palettize_model(tiny_model, embedding_bits=4, bits={"blocks.0.mlp.w2": 2})
    tiny_model.prepack(1)
    prompts = torch.randint(0, 256, (3, 7)).tolist()
    with torch.no_grad():
        fast = [generate(tiny_model, [p], max_new_tokens=12) for p in prompts]
        logits = tiny_model(torch.tensor(prompts[:1]))[:, -1:]
        monkeypatch.setattr(lut, "available", lambda: False)
        tiny_model.prepack(1)
        slow = [generate(tiny_model, [p], max_new_tokens=12) for p in prompts]
        torch.testing.assert_close(tiny_model(torch.tensor(prompts[:1]))[:, -1:], logits)
    assert fast == slow

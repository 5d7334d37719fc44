"""The weight seam (models/linear.py): every projection behind one interface, derived copies
(oneDNN packs, int4 tables, the bf16 greedy head) never used stale."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.afm import AFM, config_from_preset
from models.draft import Int4Draft
from models.generate import Draft, generate
from models.linear import Int4Linear, Linear, Projection, TiedHead

ROOT = Path(__file__).resolve().parents[2]
onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


def test_a_slice_of_rows_is_those_outputs_of_the_full_projection():
    lin = Linear(16, 24)
    x = torch.randn(5, 16)
    torch.testing.assert_close(lin(x, rows=slice(8, 20)), lin(x)[:, 8:20])
    head = TiedHead(torch.nn.Embedding(24, 16))
    torch.testing.assert_close(head(x, rows=slice(0, 4)), head(x)[:, :4])


@onednn
def test_a_packed_copy_follows_an_optimizer_step_and_a_new_parameter():
    lin = Linear(32, 48)
    lin.pack(4)
    x = torch.randn(3, 32)
    with torch.no_grad():
        before = lin(x)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    lin(x).square().sum().backward()  # training reads the weight itself, not the pack
    opt.step()
    with torch.no_grad():
        after = lin(x)
        torch.testing.assert_close(after, F.linear(x, lin.weight))
        assert not torch.allclose(after, before)
        lin.weight = torch.nn.Parameter(torch.zeros(48, 32))  # a module-level swap
        assert torch.equal(lin(x), torch.zeros(3, 48))


def test_an_int4_copy_is_rebuilt_when_its_source_changes():
    torch.manual_seed(0)
    lin = Linear(64, 16)
    int4 = Int4Linear(lin)
    x = torch.randn(8, 64)
    with torch.no_grad():
        before = lin(x)
        assert (int4(x).float() - before).abs().max() < 0.1 * before.abs().max()
        lin.weight.mul_(-2)
        after, approx = lin(x), int4(x).float()
    assert (approx - after).abs().max() < 0.1 * after.abs().max()  # follows the new weight
    torch.testing.assert_close(approx, x @ int4.effective_weight().T, rtol=0.02, atol=0.02)


def test_generation_after_training_matches_a_fresh_model_packed_and_drafted():
    """prepack and the int4 draft are made before a training step; afterwards generation must
    reflect the new weights exactly, as an untouched copy with the same weights does."""
    model = AFM(config_from_preset("tiny")).init_weights(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    prompts = [[1, 2, 3], [9, 8, 7, 6]]
    model.prepack(len(prompts))
    draft = Draft(Int4Draft(model))
    before = generate(model, prompts, max_new_tokens=8, draft=draft)
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    model(torch.tensor([[5, 6, 7, 8]])).logsumexp(-1).sum().backward()
    opt.step()
    fresh = AFM(model.cfg)
    fresh.load_state_dict(model.state_dict())
    expected = generate(fresh, prompts, max_new_tokens=8)
    assert expected != before  # the step changed what the model says
    assert generate(model, prompts, max_new_tokens=8) == expected
    assert generate(model, prompts, max_new_tokens=8, draft=draft) == expected


def test_every_projection_of_the_model_is_behind_the_seam():
    model = AFM(config_from_preset("tiny"))
    projections = model.projections()
    assert len(projections) == 4 * model.cfg.n_layers + 1  # four a block, and the head
    assert all(isinstance(p, Projection) for p in projections)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())


def test_nothing_outside_the_seam_reads_a_projection_weight():
    """The projections' names followed by ``.weight`` appear nowhere in library code but the
    seam itself and the checkpoint importer (whose state-dict keys are strings)."""
    pattern = re.compile(r"\.(wqkv|wo|w13|w2|lm_head)\.weight\b")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("models", "suites", "evalhub", "grading")
        for path in (ROOT / folder).rglob("*.py")
        if path.name != "linear.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and '"' not in line
    ]
    assert offenders == []

"""Many adapters on one base (``models.adapters``): the byte-bounded LRU cache, batches that mix
rows with different adapters (equal to each adapter run on its own), swapping per call on one
copy of the base, and routing confined to the thread that asked for it."""

from __future__ import annotations

import copy
import os
import threading

import pytest
import torch

from models.adapters import AdapterCache, install_slots, read_adapter, routes
from models.afm import AFM, config_from_preset
from models.lora import (
    RowDeltas,
    apply_lora,
    load_adapter,
    lora_parameters,
    routed,
    save_adapter,
    sites,
)

TOKENS = torch.tensor(
    [[5, 17, 99, 3, 42, 7], [1, 2, 3, 4, 5, 6], [9, 8, 7, 6, 5, 4], [11, 12, 13, 14, 15, 16]]
)


def base_model() -> AFM:
    torch.manual_seed(0)
    return AFM(config_from_preset("tiny")).init_weights(seed=0).eval()


def make_adapter(path, seed: int, rank: int = 4, targets=("wqkv", "wo", "w13", "w2")) -> str:
    """A saved adapter whose update is big enough to change the logits."""
    model = base_model()
    apply_lora(model, rank=rank, alpha=2 * rank, targets=targets, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return str(save_adapter(model, path))


@pytest.fixture
def adapters(tmp_path) -> list[str]:
    return [
        make_adapter(tmp_path / "a", seed=1),
        make_adapter(tmp_path / "b", seed=2, rank=8),
        make_adapter(tmp_path / "c", seed=3, targets=("wqkv", "w2")),
    ]


@torch.no_grad()
def alone(path: str | None, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    """Logits with one adapter put on a model of its own (``load_adapter``): the reference."""
    model = base_model()
    if path is not None:
        load_adapter(model, path)
    return model(tokens)


def test_the_cache_evicts_the_least_recently_used_adapter_past_its_budget(tmp_path):
    model = base_model()
    a, b, c = (make_adapter(tmp_path / name, seed=i) for i, name in enumerate("abc"))
    size = read_adapter(model, a).nbytes
    cache = AdapterCache(budget_bytes=int(2.5 * size))  # room for two
    first = cache.adapter(model, a)
    cache.adapter(model, b)
    assert cache.adapter(model, a) is first  # a hit, and a is now the most recent
    cache.adapter(model, c)  # b, the least recently used, goes

    def cached() -> list[str]:
        return [os.path.basename(key[1]) for key in cache.keys()]  # least recent first

    assert cached() == ["a", "c"] and cache.used_bytes == 2 * size
    again = cache.adapter(model, b)  # from disk again, and now a goes
    assert cached() == ["c", "b"]
    torch.testing.assert_close(
        again.factors[(1, "w13")][1], read_adapter(model, b).factors[(1, "w13")][1]
    )
    assert cache.adapter(model, a) is not first


def test_a_rewritten_adapter_is_read_again(adapters, tmp_path):
    model = base_model()
    cache = AdapterCache()
    old = cache.adapter(model, adapters[0])
    make_adapter(tmp_path / "a", seed=7)  # same path, new weights
    st = os.stat(os.path.join(adapters[0], "adapter_model.safetensors"))
    os.utime(
        os.path.join(adapters[0], "adapter_model.safetensors"),
        ns=(st.st_atime_ns, st.st_mtime_ns + 10**9),
    )
    new = cache.adapter(model, adapters[0])
    assert new is not old
    assert not torch.equal(new.factors[(0, "wo")][0], old.factors[(0, "wo")][0])


@pytest.mark.parametrize("strategy", ["group", "gather"])
def test_a_batch_mixing_adapters_equals_each_adapter_run_alone(adapters, strategy):
    model = base_model()
    wrappers = install_slots(model)
    cache = AdapterCache()
    a, b, c = (cache.adapter(model, p) for p in adapters)
    per_row = [a, None, c, b]
    with torch.no_grad(), routed(routes(wrappers, per_row, strategy)):
        mixed = model(TOKENS)
    for row, path in enumerate([adapters[0], None, adapters[2], adapters[1]]):
        torch.testing.assert_close(mixed[row], alone(path)[row], rtol=1e-5, atol=1e-5)
    assert (alone(adapters[0]) - alone(None)).abs().max() > 0.1  # adapters change the logits


def test_one_step_rows_and_a_slice_of_outputs_get_their_own_update():
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    y = torch.randn(3, 12)
    f1 = (torch.randn(2, 16), torch.randn(12, 2))
    f2 = (torch.randn(5, 16), torch.randn(12, 5))
    rows = slice(4, 10)
    for strategy in ("group", "gather"):
        out = RowDeltas([f1, f2, None], strategy).add(x, y[:, rows].clone(), rows)
        expected = torch.stack(
            [
                y[0, rows] + f1[1][rows] @ (f1[0] @ x[0]),
                y[1, rows] + f2[1][rows] @ (f2[0] @ x[1]),
                y[2, rows],
            ]
        )
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    single = RowDeltas([f2] * 3).add(x, y[:, rows].clone(), rows)  # one adapter: addmm
    torch.testing.assert_close(single, y[:, rows] + x @ f2[0].T @ f2[1][rows].T)
    with pytest.raises(ValueError, match="one input row per batch row"):
        RowDeltas([f1, f2, None]).add(x[:1], y[:1], None)


def test_swapping_adapters_on_one_base_leaves_nothing_behind(adapters):
    model = base_model()
    weights = [p.data_ptr() for p in model.parameters()]
    wrappers = install_slots(model)
    cache = AdapterCache()
    for path in [adapters[0], adapters[1], None, adapters[0], adapters[2], None]:
        adapter = cache.adapter(model, path) if path else None
        with torch.no_grad(), routed(routes(wrappers, [adapter] * len(TOKENS))):
            torch.testing.assert_close(model(TOKENS), alone(path), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), alone(None), rtol=0, atol=0)
    base_ptrs = [p.data_ptr() for p in model.parameters() if p.numel()]
    assert base_ptrs == weights  # the base was never copied, only wrapped


def test_routing_applies_only_in_the_thread_that_asked(adapters):
    model = base_model()
    wrappers = install_slots(model)
    adapter = AdapterCache().adapter(model, adapters[0])
    seen = {}

    def other_thread():
        with torch.no_grad():
            seen["logits"] = model(TOKENS)

    with torch.no_grad(), routed(routes(wrappers, [adapter] * len(TOKENS))):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        mine = model(TOKENS)
    torch.testing.assert_close(seen["logits"], alone(None), rtol=0, atol=0)
    torch.testing.assert_close(mine, alone(adapters[0]), rtol=1e-5, atol=1e-5)


def test_routing_replaces_a_trained_adapter_and_a_slot_alone_is_the_base(adapters):
    model = base_model()
    trained = copy.deepcopy(model)
    load_adapter(trained, adapters[1])
    wrappers = install_slots(trained)  # nothing to add: every site already has a wrapper
    assert wrappers == [getattr(o, n) for _, n, o in sites(trained)]
    adapter = AdapterCache().adapter(trained, adapters[0])
    with torch.no_grad(), routed(routes(wrappers, [adapter] * len(TOKENS))):
        torch.testing.assert_close(trained(TOKENS), alone(adapters[0]), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(trained(TOKENS), alone(adapters[1]), rtol=1e-5, atol=1e-5)
    install_slots(model)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), alone(None), rtol=0, atol=0)

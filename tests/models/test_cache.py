"""The per-process cache of loaded models: LRU eviction under a byte budget, thread safety."""

import threading
import time

import pytest
import torch
from torch import nn

from models.cache import ModelCache, nbytes


def _sized(cache_budget: int) -> ModelCache:
    return ModelCache(cache_budget, size=lambda value: value["bytes"])


def test_it_evicts_the_least_recently_used_entry_when_a_load_would_exceed_the_budget():
    cache = _sized(100)
    cache.get("a", lambda: {"bytes": 40})
    cache.get("b", lambda: {"bytes": 40})
    cache.get("a", lambda: pytest.fail("a is cached"))  # a is now the most recently used
    cache.get("c", lambda: {"bytes": 40})
    assert cache.keys() == ["a", "c"]
    assert cache.used_bytes == 80


def test_it_evicts_as_many_entries_as_the_new_one_needs():
    cache = _sized(100)
    for key in "abcd":
        cache.get(key, lambda: {"bytes": 25})
    cache.get("big", lambda: {"bytes": 70})
    assert cache.keys() == ["d", "big"]
    assert cache.used_bytes <= 100


def test_an_entry_bigger_than_the_budget_still_loads_alone():
    cache = _sized(100)
    cache.get("a", lambda: {"bytes": 10})
    huge = cache.get("huge", lambda: {"bytes": 500})
    assert huge == {"bytes": 500}
    assert cache.keys() == ["huge"]
    cache.get("a", lambda: {"bytes": 10})  # and the next load pushes it out
    assert cache.keys() == ["a"]


def test_a_failed_load_caches_nothing_and_can_be_retried():
    cache = _sized(100)

    def broken():
        raise OSError("no such checkpoint")

    with pytest.raises(OSError):
        cache.get("a", broken)
    assert "a" not in cache
    assert cache.get("a", lambda: {"bytes": 1}) == {"bytes": 1}


def test_concurrent_requests_for_one_key_load_it_once():
    cache = _sized(100)
    calls = []

    def slow_load():
        calls.append(1)
        time.sleep(0.05)
        return {"bytes": 10}

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get("a", slow_load))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 8 and all(r is results[0] for r in results)


def test_the_budget_holds_under_concurrent_loads_of_many_keys():
    cache = _sized(100)
    errors = []

    def worker(offset: int) -> None:
        try:
            for i in range(50):
                cache.get((offset + i) % 17, lambda: {"bytes": 30})
                assert cache.used_bytes <= 100
        except AssertionError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(cache) <= 3


def test_nbytes_counts_parameters_and_buffers_once_even_when_shared():
    layer = nn.Linear(8, 4)  # 32 + 4 float32 = 144 bytes
    layer.register_buffer("scale", torch.ones(2, dtype=torch.float64))  # 16 bytes

    class Holder:  # a backend-like object holding a module twice and a packed tensor
        def __init__(self):
            self.model, self.scorer = layer, [layer]
            self.packed = torch.zeros(10, dtype=torch.uint8)

    assert nbytes(layer) == 144 + 16
    assert nbytes(Holder()) == 144 + 16 + 10

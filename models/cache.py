"""A per-process cache of loaded models with a memory budget, least recently used out first.

One instance holds every kind of loaded model a process keeps (generation backends, reward
models, later LoRA adapters), so the budget is one number for the whole process. An entry's
size is the bytes of the tensors it holds (``nbytes``), measured once after loading.

    cache = ModelCache(budget_bytes=4 << 30)
    backend = cache.get(("backend", 3), lambda: load_backend(...))
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")


class ModelCache:
    """LRU cache bounded by ``budget_bytes``; safe to share between threads.

    Loading a new entry evicts least recently used ones until it fits. An entry larger than the
    whole budget still loads, alone. A load runs outside the cache lock, so hits on other keys
    never wait for it; concurrent requests for the same key load it once.
    """

    def __init__(
        self,
        budget_bytes: int,
        size: Callable[[Any], int] | None = None,
        on_evict: Callable[[Any], None] | None = None,
    ) -> None:
        """on_evict: called with each evicted value (to stop what it runs, e.g. an engine)."""
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._size = size or nbytes
        self._on_evict = on_evict
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()  # oldest first
        self._lock = threading.Lock()
        self._loading: dict[Hashable, threading.Lock] = {}  # one lock per key being loaded

    def get(self, key: Hashable, load: Callable[[], T]) -> T:
        """The cached value for ``key``, calling ``load()`` (and evicting) on a miss."""
        with self._lock:
            hit = self._hit(key)
            if hit is not None:
                return hit[0]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                hit = self._hit(key)  # another thread may have loaded it while we waited
                if hit is not None:
                    return hit[0]
            try:
                value = load()
                size = self._size(value)
                with self._lock:
                    self._evict_for(size)
                    self._entries[key] = (value, size)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
        return value

    def _hit(self, key: Hashable) -> tuple[Any] | None:
        """(value,) for a cached key, marked most recently used; None on a miss. Lock held."""
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return (self._entries[key][0],)

    def _evict_for(self, size: int) -> None:
        """Drop least recently used entries until ``size`` more bytes fit. Lock held."""
        while self._entries and self.used_bytes + size > self.budget_bytes:
            _, (value, _) = self._entries.popitem(last=False)
            if self._on_evict is not None:
                self._on_evict(value)

    @property
    def used_bytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def peek(self, key: Hashable) -> Any | None:
        """The cached value for ``key`` without marking it used, or None."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry[0]

    def keys(self) -> list[Hashable]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            values = [value for value, _ in self._entries.values()]
            self._entries.clear()
        if self._on_evict is not None:
            for value in values:
                self._on_evict(value)


def nbytes(obj: Any, depth: int = 3) -> int:
    """Bytes of the distinct tensor storages ``obj`` holds: the parameters and buffers of the
    modules it is or refers to (through attributes, lists and dicts, ``depth`` levels down),
    and plain tensor attributes such as packed weights. Shared storages count once."""
    storages: dict[int, int] = {}
    _collect(obj, depth, storages, set())
    return sum(storages.values())


def _collect(obj: Any, depth: int, storages: dict[int, int], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return
    if isinstance(obj, nn.Module):
        for t in [*obj.parameters(), *obj.buffers()]:
            _collect(t, 0, storages, seen)
    if depth <= 0:
        return
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    else:
        children = list(getattr(obj, "__dict__", {}).values())
    for child in children:
        _collect(child, depth - 1, storages, seen)

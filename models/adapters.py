"""Many LoRA adapters served from one copy of a base model: a byte-bounded cache of loaded
adapters and per-row routing, so one batch may mix rows with different adapters.

AFM swaps task adapters on one resident base (arXiv:2407.21075 §5: "adapters can be
dynamically loaded, temporarily cached in memory, and swapped"); S-LoRA and Punica serve
thousands of adapters that way, the base computed once for a batch and each row's low-rank
update added (arXiv:2311.03285, arXiv:2310.18547). Here:

- ``Adapter``: one PEFT-layout adapter read as fused factors per site (A (r, in) with α/r
  folded in, and B (out, r)), on the base's device: the only copy of it a process keeps;
- ``AdapterCache``: ``models.cache.ModelCache`` (LRU within a byte budget, thread-safe, one
  load per key) holding ``Adapter``s, keyed by the adapter file's path, its modification time
  (a rewritten adapter is a new entry) and the device;
- ``install_slots``: rank-0 ``LoRALinear`` slots on every block projection of a base that has
  none (``models.lora``), so it can serve any adapter; the base weights stay where they are;
- ``routes(wrappers, per_row)``: the ``models.lora.routed`` table for a batch whose rows ask
  for these adapters (None: the base alone).

    cache = AdapterCache(512 << 20)
    wrappers = install_slots(model)
    with routed(routes(wrappers, [cache.adapter(model, a), cache.adapter(model, b), None])):
        logits = model(ids)  # row 0 with adapter a, row 1 with b, row 2 the base
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from models.afm import AFM
from models.cache import ModelCache
from models.lora import (
    ADAPTER_WEIGHTS,
    LoRALinear,
    RowDeltas,
    adapter_factors,
    lora_layers,
    sites,
)

# Adapter budget when no process-wide cache is given: 32 rank-16 fp32 adapters of
# SmolLM2-135M (16 MB each); evalhub sets its own from EVALHUB_ADAPTER_CACHE_BYTES.
DEFAULT_BUDGET = 512 * 2**20


@dataclass(eq=False)
class Adapter:
    """One adapter's factors per (layer, target) site on one device: (A (r, in), B (out, r)),
    the scale folded into A (the smaller of the two for every projection here). Sites it
    leaves out are absent (the base alone there)."""

    path: str
    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(A.nbytes + B.nbytes for A, B in self.factors.values())


def read_adapter(model: AFM, path: str | os.PathLike, device=None) -> Adapter:
    """The PEFT-layout adapter at ``path`` for ``model``'s sites, on ``device`` (default the
    model's), in fp32 as ``save_adapter`` writes it."""
    factors, _ = adapter_factors(model, path)  # dropout is a training setting: not served
    device = model.device if device is None else torch.device(device)
    # in place: adapter_factors' tensors are fresh, one per site (~0.1 s less per adapter)
    return Adapter(
        str(path),
        {site: (A.mul_(s).to(device), B.to(device)) for site, (A, B, s) in factors.items()},
    )


class AdapterCache(ModelCache):
    """Loaded adapters, least recently used out first past ``budget_bytes`` (an adapter is
    the bytes of its factors). A sibling of the process's model cache: the same class and
    rules, its own budget, so swapping small adapters never evicts a loaded base."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET) -> None:
        super().__init__(budget_bytes, size=lambda adapter: adapter.nbytes)

    def adapter(self, model: AFM, path: str | os.PathLike) -> Adapter:
        """The adapter at ``path`` for ``model``, from memory or else from disk."""
        src = Path(path).resolve()
        mtime = (src / ADAPTER_WEIGHTS).stat().st_mtime_ns  # FileNotFoundError: no adapter
        key = ("adapter", str(src), mtime, str(model.device), model.cfg)
        return self.get(key, lambda: read_adapter(model, src))


def install_slots(model: AFM) -> list[LoRALinear]:
    """Wrap every block projection of ``model`` that has no ``LoRALinear`` yet in a rank-0
    slot (no adapter of its own: the base until ``routed`` says otherwise); return every
    wrapper. Idempotent. The slots cost a Python call per projection, ~0.1 ms a decoding step
    of SmolLM2's 120 projections, so backends add them only once an adapter is asked for."""
    for layer, name, owner in sites(model):
        if not isinstance(getattr(owner, name), LoRALinear):
            slot = LoRALinear(getattr(owner, name), rank=0, alpha=0.0)
            slot.site = (layer, name)
            slot.requires_grad_(False)
            setattr(owner, name, slot)
    return lora_layers(model)


def routes(
    wrappers: Sequence[LoRALinear], per_row: Sequence[Adapter | None], strategy: str = "group"
) -> dict[LoRALinear, RowDeltas | None]:
    """``models.lora.routed``'s table for a batch whose row i asks for ``per_row[i]`` (None:
    the base), over a model's ``wrappers`` (``install_slots``'s list: all of them, so a
    wrapper's own trained adapter is replaced too); sites no row's adapter has get None."""
    table: dict[LoRALinear, RowDeltas | None] = {}
    for m in wrappers:
        rows = [a.factors.get(m.site) if a is not None and m.site else None for a in per_row]
        table[m] = RowDeltas(rows, strategy) if any(f is not None for f in rows) else None
    return table

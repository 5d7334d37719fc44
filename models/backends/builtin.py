"""Backend over an EvalHub checkpoint, run by our own engine (models/generate.py)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from models.adapters import AdapterCache, install_slots, routes
from models.backends.base import GenerationArgs, TokenBackend
from models.checkpoint import default_device, load_checkpoint, read_config
from models.draft import Int4Draft
from models.generate import Draft, generate
from models.lora import LoRALinear, routed
from models.prefix import PrefixScorer
from models.tokenizer import load_tokenizer


class BuiltinBackend(TokenBackend):
    """``location`` is a checkpoint directory written by ``models.formats.import_checkpoint``.

    batch_size: prompts (or scored pairs) per forward pass. Prompts are sorted by length first
        so a batch pads little; results come back in input order.
    num_threads: torch intra-op threads; None leaves torch's setting alone.
    prepack: keep a copy of the weights packed for oneDNN's matmuls (``AFM.prepack``), 2-3x
        faster than torch's default CPU matmuls for decoding on AMD EPYC, for the weights'
        memory again, if that copy fits in ``prepack_bytes`` (2 GiB: SmolLM2-135M's 0.5 GB
        does, a 1B model's 4 GB does not).
    draft: "int4" (the default) makes greedy generation speculative (``models.generate.Draft``
        over ``models.draft.Int4Draft``, CPU only) for batches of up to 6 prompts: the same
        tokens, ~2x faster one prompt at a time on a 2-core CPU and 1.3x for 4, for ~1/5 more
        weight memory (benchmarks/generate_speed.py); 8 prompts keep the CPU busy without it
        and decode plainly. None switches it off. Sampling never uses it.
    device: where the model runs; None: CUDA when available, else the CPU. Weights stay fp32.
        prepack and the int4 draft are CPU speed paths and are skipped on other devices.
    adapter: a LoRA adapter directory in PEFT's layout (``models.lora.save_adapter``) that
        every call uses unless it names others, kept separate from the base (a palettized base
        stays palettized). Any call may instead name an adapter per prompt (``generate``'s
        ``adapters``, or a ``with_adapter`` view): one copy of the base serves them all, each
        row adding its own adapter's update (``models.adapters``); a batch may mix adapters.
        The int4 draft stays the base's, so adapted rows may accept fewer of its proposals,
        never different tokens.
    adapter_cache: where adapters are kept once loaded (the process's ``AdapterCache``); by
        default one of this backend's own.
    mixed: how a batch mixing adapters adds their updates (``models.lora.RowDeltas``):
        "gather" (per-row factors, two batched matmuls a projection) or "group" (a matmul
        pair per distinct adapter). A decoding step of 8 rows with 8 adapters costs group
        ~40 small ops a projection against gather's ~6: on SmolLM2, 8 adapters in a batch
        of 8 ran at 0.77x the tokens/s of one adapter with gather, 0.66x with group
        (benchmarks/adapter_swap.py, one thread), for one copy of each row's factors per
        call (8 rank-16 SmolLM2 adapters: 124 MB while the batch runs).
    """

    def __init__(
        self,
        location: str | os.PathLike,
        *,
        batch_size: int = 8,
        num_threads: int | None = None,
        prepack: bool = True,
        prepack_bytes: int = 2 * 2**30,
        draft: str | None = "int4",
        device: str | torch.device | None = None,
        adapter: str | os.PathLike | None = None,
        adapter_cache: AdapterCache | None = None,
        mixed: str = "gather",
    ):
        if draft not in (None, "int4"):
            raise ValueError(f"unknown draft {draft!r}; known: 'int4' or None")
        self.path = Path(location)
        self.batch_size = batch_size
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        _, self.meta = read_config(self.path)
        self.device = torch.device(device) if device is not None else default_device()
        self.model = load_checkpoint(self.path, device=self.device)
        self.adapter = str(adapter) if adapter is not None else None
        self.adapters = adapter_cache if adapter_cache is not None else AdapterCache()
        self.mixed = mixed
        self._slots_lock = threading.Lock()
        self._wrappers: list[LoRALinear] | None = None  # install_slots's, once
        self._scored_with: str | None = None  # the adapter of the scorer's stored prefix
        if self.adapter is not None:
            self.adapters.adapter(self.model, self.adapter)  # fail now on a bad adapter
        cpu = self.device.type == "cpu"
        self.draft = Draft(Int4Draft(self.model)) if draft and cpu else None
        size = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if prepack and cpu and size <= prepack_bytes:
            self.model.prepack(batch_size)
        self.tokenizer = load_tokenizer(self.path)
        # Shared few-shot prefixes (MMLU's per-subject exemplars) are computed once.
        self.scorer = PrefixScorer(self.model, batch_size=batch_size)

    def with_adapter(self, adapter: str | os.PathLike | None) -> AdaptedBackend:
        """A backend that answers with ``adapter`` on this one's model: no second copy."""
        return AdaptedBackend(self, None if adapter is None else str(adapter))

    def generate(
        self,
        prompts: Sequence[str],
        args: GenerationArgs,
        on_token=None,
        adapters: Sequence[str | os.PathLike | None] | None = None,
    ) -> list[str]:
        """``TokenBackend.generate``, with ``adapters[i]`` (a PEFT-layout directory, or None
        for the base) on prompt i; default: the backend's ``adapter`` everywhere."""
        return self._generate_text(prompts, args, on_token, adapters=adapters)

    def routing(self, per_row: Sequence[str | os.PathLike | None]):
        """The ``routed`` context for rows asking for these adapters; none without any."""
        if all(a is None for a in per_row):
            return contextlib.nullcontext()
        with self._slots_lock:
            if self._wrappers is None:  # the first adapter this base serves
                self._wrappers = install_slots(self.model)
        loaded = {a: self.adapters.adapter(self.model, a) for a in set(per_row) if a is not None}
        per_row_loaded = [loaded.get(a) if a else None for a in per_row]
        table = routes(self._wrappers, per_row_loaded, self.mixed)
        return routed(table)

    def _generate_ids(self, prompts, args: GenerationArgs, should_stop, adapters=None):
        if adapters is None:
            adapters = [self.adapter] * len(prompts)
        adapters = [str(a) if a is not None else None for a in adapters]
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(adapters)} adapters for {len(prompts)} prompts")
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[list[int]] = [[] for _ in prompts]
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]

            def row_stop(row: int, new_ids: list[int], idx=idx) -> bool:
                return should_stop(idx[row], new_ids)

            per_row = [adapters[i] for i in idx]
            batch = [prompts[i] for i in idx]
            with self.routing(per_row):
                outs = self._generate_batch(batch, args, row_stop if should_stop else None, per_row)
            for i, out in zip(idx, outs, strict=True):
                results[i] = out
        return results

    def _generate_batch(self, batch, args: GenerationArgs, row_stop, per_row) -> list[list[int]]:
        stop_ids = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        return generate(
            self.model,
            batch,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            stop_token_ids=stop_ids,
            should_stop=row_stop,
            pad_id=self.tokenizer.pad_token_id or 0,
            seed=args.seed,
            draft=self.draft,
            share_prefix=len(set(per_row)) == 1,  # rows of one adapter share a prefix
        )

    def _loglikelihood_ids(self, pairs):
        return self._score(pairs, self.adapter)

    def _score(self, pairs, adapter: str | None):
        if adapter != self._scored_with:  # a stored prefix is only valid for its adapter
            self.scorer.last, self._scored_with = None, adapter
        with self.routing([adapter]):
            return self.scorer.loglikelihood(pairs)

    def info(self) -> dict:
        return {
            "kind": "builtin",
            "location": str(self.path),
            "device": str(self.device),
            "config": self.meta["model"],
            "provenance": self.meta.get("provenance", {}),
            "parameters": self.model.num_params(),
            "chat_template": getattr(self.tokenizer, "chat_template", None),
            **({"adapter": self.adapter} if self.adapter else {}),
        }


class AdaptedBackend(TokenBackend):
    """``base`` answering with ``adapter`` on every row (None: the base alone): a view over
    the base backend's model, tokenizer and scorer, so every adapter of one base shares one
    copy of it. The adapter comes from the base's ``AdapterCache`` at each call, so an
    evicted one is read again from disk when next asked for."""

    def __init__(self, base: BuiltinBackend, adapter: str | None):
        self.base, self.adapter = base, adapter
        self.tokenizer = base.tokenizer

    def _generate_ids(self, prompts, args: GenerationArgs, should_stop):
        return self.base._generate_ids(prompts, args, should_stop, [self.adapter] * len(prompts))

    def _loglikelihood_ids(self, pairs):
        return self.base._score(pairs, self.adapter)

    def info(self) -> dict:
        return {**self.base.info(), "adapter": self.adapter}
